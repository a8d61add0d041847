//! The few operating-system calls the control plane and the CLI need that std does
//! not offer, behind safe functions, so those modules stay free of `unsafe`. The
//! frontends ask [`peer_cred`] too (the pid of a socket's peer, for their log lines).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Opens `rel` read-only beneath `dir`, as the kernel resolves it (openat2 with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`): no `..` or
/// absolute component leaving `dir` (EXDEV), no symlink anywhere on the way (ELOOP).
pub(crate) fn open_beneath(dir: &Path, rel: &Path) -> io::Result<File> {
    let d = File::open(dir)?;
    let c = CString::new(rel.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zero is a valid `open_how` (no flags); the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a live directory descriptor, a NUL-terminated path and a
    // live `open_how` of the size passed; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            d.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// The process at the other end of a unix socket connection (SO_PEERCRED):
/// `(uid, pid)`.
pub(crate) fn peer_cred(s: &UnixStream) -> Option<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into the live `cred`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.uid, cred.pid))
}

/// The id of the group called `name` (getgrnam_r(3)); `Ok(None)`: no such group.
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: zero is a valid `group` (null pointers, gid 0); getgrnam_r fills it.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: getgrnam_r(3) with a NUL-terminated name, a live `group`, a live
        // buffer of the length passed and a live result pointer; it writes only there.
        let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
        match rc {
            0 if out.is_null() => return Ok(None),
            0 => return Ok(Some(gr.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// `lseek(2)` with `SEEK_DATA` (`data`) or `SEEK_HOLE`: the next data or hole at or
/// after `pos`; `Ok(None)` when there is none (ENXIO: `pos` is at or past the end).
/// Only the file offset moves, which pread/pwrite users never look at.
pub(crate) fn seek_data_or_hole(f: &File, pos: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: lseek(2) on a descriptor `f` keeps open for the call; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// `pwritev(2)` of `bufs`, in order, at `off`, until all of it is written (a short
/// write goes on from where it stopped). At most `IOV_MAX` (1024) buffers.
pub(crate) fn pwritev_all(f: &File, mut off: u64, bufs: &[&[u8]]) -> io::Result<()> {
    assert!(bufs.len() <= 1024, "pwritev_all: more than IOV_MAX buffers");
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let rest = &iov[first..];
        // SAFETY: every iovec points into a slice of `bufs`, borrowed for this call and
        // only read by the kernel; `rest.len()` ≤ IOV_MAX; `f` stays open for the call.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                rest.as_ptr(),
                rest.len() as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        let mut n = n as usize;
        off += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same slice.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Runs `handler` on SIGINT instead of the default (exit). The handler must only do
/// async-signal-safe work (e.g. store to an atomic).
pub(crate) fn on_sigint(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: signal(2) with a valid signal number and a function pointer of the
    // handler type; the caller's handler is async-signal-safe (documented above).
    unsafe { libc::signal(libc::SIGINT, handler as *const () as libc::sighandler_t) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pwritev_all_writes_every_buffer_in_order() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        let (a, b, c) = (vec![1u8; 5000], Vec::new(), vec![2u8; 3]);
        pwritev_all(&f, 10, &[&a, &b, &c]).unwrap();
        let mut got = vec![0u8; 5013];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..10].iter().all(|&x| x == 0));
        assert!(got[10..5010].iter().all(|&x| x == 1));
        assert_eq!(&got[5010..], &[2, 2, 2]);
        // A read-only descriptor: the error comes back.
        let ro = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(pwritev_all(&ro, 0, &[&a]).is_err());
    }

    #[test]
    fn seek_finds_data_and_holes_in_a_sparse_file() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        let d = seek_data_or_hole(&f, 0, true).unwrap().unwrap();
        assert!(d <= 1 << 20, "data found at {d}");
        let h = seek_data_or_hole(&f, 1 << 20, false).unwrap().unwrap();
        assert!(h > 1 << 20 && h <= 4 << 20, "hole after the data at {h}");
        assert_eq!(seek_data_or_hole(&f, 5 << 20, true).unwrap(), None, "past the end");
    }

    #[test]
    fn group_ids_of_root_and_of_no_group() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-sealdisk").unwrap(), None);
        assert!(group_id("bad\0name").is_err());
    }

    #[test]
    fn peer_cred_names_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (uid, pid) = peer_cred(&a).unwrap();
        assert_eq!(pid as u32, std::process::id());
        // SAFETY: getuid(2) has no preconditions.
        assert_eq!(uid, unsafe { libc::getuid() });
    }

    #[test]
    fn open_beneath_refuses_escapes_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("sub/f"), d.join("link")).unwrap();
        assert!(open_beneath(d, Path::new("sub/f")).is_ok());
        let code = |r: io::Result<File>| r.unwrap_err().raw_os_error();
        assert_eq!(code(open_beneath(d, Path::new("../x"))), Some(libc::EXDEV));
        assert_eq!(code(open_beneath(d, Path::new("/etc/passwd"))), Some(libc::EXDEV));
        assert_eq!(code(open_beneath(d, Path::new("link"))), Some(libc::ELOOP));
    }
}
