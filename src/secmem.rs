//! Secret memory for plaintext key material.
//!
//! [`SecretMem`] is a page-aligned, zero-filled buffer that is kept out of swap, out of
//! core dumps and out of forked children, and is zeroized when dropped. It is backed by
//! `memfd_secret(2)` when the kernel has it (the pages are also removed from the kernel's
//! direct map), and by an `mlock`ed anonymous private mapping otherwise. See
//! `docs/secret-memory.md` for what each path guarantees and how to size `RLIMIT_MEMLOCK`.
//!
//! All `unsafe` code of this module is here, behind a safe API: the mapping is owned
//! exclusively by one `SecretMem`, shared reads need `&self`, writes need `&mut self`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// How the pages of a [`SecretMem`] are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `memfd_secret(2)`: pages unmapped from the kernel direct map, locked, not dumped,
    /// not inherited by children (`MADV_DONTFORK`).
    MemfdSecret,
    /// Anonymous private mapping with `mlock(2)`, `MADV_DONTDUMP` and `MADV_WIPEONFORK`.
    Mlock,
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protection::MemfdSecret => "memfd_secret",
            Protection::Mlock => "mlock",
        })
    }
}

/// Why secret memory could not be allocated.
#[derive(Debug)]
#[non_exhaustive]
pub enum SecretMemError {
    /// The requested length overflows when rounded up to whole pages.
    TooLarge {
        /// Requested length in bytes.
        requested: usize,
    },
    /// Locking the pages would exceed `RLIMIT_MEMLOCK` (and the process lacks
    /// `CAP_IPC_LOCK`).
    MemlockLimit {
        /// Which path hit the limit.
        protection: Protection,
        /// Bytes that had to be locked (whole pages).
        bytes: usize,
        /// Soft `RLIMIT_MEMLOCK` in bytes at the time of the error; `None` means unlimited.
        soft_limit: Option<u64>,
        /// Hard `RLIMIT_MEMLOCK` in bytes; `None` means unlimited.
        hard_limit: Option<u64>,
        /// What the kernel answered.
        source: io::Error,
    },
    /// Any other failing system call.
    Os {
        /// Which path failed.
        protection: Protection,
        /// The failing call, e.g. `"mmap"` or `"madvise(MADV_WIPEONFORK)"`.
        op: &'static str,
        /// Bytes being allocated (whole pages).
        bytes: usize,
        /// What the kernel answered.
        source: io::Error,
    },
}

fn fmt_limit(limit: Option<u64>) -> String {
    match limit {
        None => "unlimited".to_string(),
        Some(b) if b % 1024 == 0 => format!("{} KiB", b / 1024),
        Some(b) => format!("{b} bytes"),
    }
}

impl fmt::Display for SecretMemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretMemError::TooLarge { requested } => write!(
                f,
                "cannot allocate {requested} bytes of secret memory: \
                 the size overflows when rounded up to whole pages"
            ),
            SecretMemError::MemlockLimit {
                protection,
                bytes,
                soft_limit,
                hard_limit,
                source,
            } => write!(
                f,
                "cannot lock {bytes} bytes of secret memory ({protection}): {source}. \
                 The locked-memory limit RLIMIT_MEMLOCK is {} (hard limit {}), and it also \
                 counts memory this process has already locked. Raise it with \
                 `ulimit -l <KiB>` or `ulimit -l unlimited` in the shell that starts sealdisk, \
                 `LimitMEMLOCK=<bytes>` or `LimitMEMLOCK=infinity` in its systemd unit, or a \
                 `memlock` entry in /etc/security/limits.conf; raising it above the hard \
                 limit needs root. Alternatively give the daemon CAP_IPC_LOCK",
                fmt_limit(*soft_limit),
                fmt_limit(*hard_limit),
            ),
            SecretMemError::Os {
                protection,
                op,
                bytes,
                source,
            } => write!(
                f,
                "{op} failed while allocating {bytes} bytes of secret memory \
                 ({protection}): {source}"
            ),
        }
    }
}

impl std::error::Error for SecretMemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SecretMemError::TooLarge { .. } => None,
            SecretMemError::MemlockLimit { source, .. } | SecretMemError::Os { source, .. } => Some(source),
        }
    }
}

fn memlock_error(protection: Protection, bytes: usize, source: io::Error) -> SecretMemError {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable `rlimit` for the duration of the call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } == 0;
    // rlim_t is u32 on some 32-bit targets, hence the cast.
    #[allow(clippy::unnecessary_cast)]
    let conv = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v as u64);
    let (soft_limit, hard_limit) = if ok {
        (conv(rl.rlim_cur), conv(rl.rlim_max))
    } else {
        (None, None)
    };
    SecretMemError::MemlockLimit {
        protection,
        bytes,
        soft_limit,
        hard_limit,
        source,
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// A live `mmap` region; unmapped on drop. Only ever created from a successful `mmap`.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> Result<Mapping, io::Error> {
        // SAFETY: a fresh mapping chosen by the kernel (addr = NULL, no MAP_FIXED) cannot
        // alias any existing Rust object; `len` is non-zero and page-aligned.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }

    fn madvise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is exactly our own live mapping; the advice values used here
        // (DONTDUMP, DONTFORK, WIPEONFORK) do not change its contents in this process.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range came from a successful mmap and is unmapped only here, once;
        // no reference into it outlives the owning SecretMem/Mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Set once memfd_secret proved unavailable, so later allocations skip the probe.
static MEMFD_SECRET_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x"
))]
const SYS_MEMFD_SECRET: Option<libc::c_long> = Some(libc::SYS_memfd_secret);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x"
)))]
const SYS_MEMFD_SECRET: Option<libc::c_long> = None;

/// Page-aligned, locked, non-dumpable, fork-protected memory, zeroized on drop.
///
/// Construct with [`SecretMem::new`] (memfd_secret, else mlock) or
/// [`SecretMem::new_mlocked`]. The length is rounded up to whole pages internally; the
/// whole mapping is zero at creation and zeroized on drop. `Debug` prints only the length
/// and the protection; there is deliberately no `Display` and no `Clone`.
pub struct SecretMem {
    // Field order matters: `map` is unmapped before `_fd` is closed (both by their own
    // Drop, after `SecretMem::drop` has wiped and unlocked).
    map: Mapping,
    len: usize,
    protection: Protection,
    /// The memfd_secret file; held only to be closed last.
    _fd: Option<OwnedFd>,
}

// SAFETY: SecretMem exclusively owns its mapping (no other handle to it exists; the fd
// is private), so moving it to another thread is like moving a Box<[u8]>.
unsafe impl Send for SecretMem {}
// SAFETY: `&SecretMem` only permits reads of the bytes; every write needs `&mut`, so
// sharing between threads is as safe as sharing `&[u8]`.
unsafe impl Sync for SecretMem {}

impl SecretMem {
    /// Allocates `len` zero bytes of secret memory: `memfd_secret` if the kernel has it,
    /// else an `mlock`ed private mapping.
    pub fn new(len: usize) -> Result<SecretMem, SecretMemError> {
        if !MEMFD_SECRET_UNAVAILABLE.load(Ordering::Relaxed) {
            match Self::new_memfd_secret(len)? {
                Some(mem) => return Ok(mem),
                None => MEMFD_SECRET_UNAVAILABLE.store(true, Ordering::Relaxed),
            }
        }
        Self::new_mlocked(len)
    }

    /// Allocates `len` zero bytes in an anonymous `MAP_PRIVATE` mapping, `mlock`ed, with
    /// `MADV_DONTDUMP` and `MADV_WIPEONFORK` (a forked child sees zeros).
    pub fn new_mlocked(len: usize) -> Result<SecretMem, SecretMemError> {
        let p = Protection::Mlock;
        let map_len = round_to_pages(len)?;
        let map = Mapping::map(map_len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
            .map_err(|e| os_err(p, "mmap", map_len, e))?;
        // Exclude from dumps before the pages hold anything.
        map.madvise(libc::MADV_DONTDUMP)
            .map_err(|e| os_err(p, "madvise(MADV_DONTDUMP)", map_len, e))?;
        map.madvise(libc::MADV_WIPEONFORK)
            .map_err(|e| os_err(p, "madvise(MADV_WIPEONFORK)", map_len, e))?;
        // SAFETY: the range is our own live mapping; mlock does not touch its contents
        // (it faults the pages in, and anonymous pages are zero-filled).
        if unsafe { libc::mlock(map.ptr.as_ptr().cast(), map_len) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // ENOMEM/EAGAIN: over the limit; EPERM: limit is 0 and no CAP_IPC_LOCK.
                Some(libc::ENOMEM | libc::EAGAIN | libc::EPERM) => memlock_error(p, map_len, e),
                _ => os_err(p, "mlock", map_len, e),
            });
        }
        let mut mem = SecretMem {
            map,
            len,
            protection: p,
            _fd: None,
        };
        mem.wipe(); // already zero; makes the guarantee explicit
        Ok(mem)
    }

    /// `Ok(None)`: this kernel has no usable memfd_secret, use the fallback.
    fn new_memfd_secret(len: usize) -> Result<Option<SecretMem>, SecretMemError> {
        let p = Protection::MemfdSecret;
        let Some(nr) = SYS_MEMFD_SECRET else {
            return Ok(None);
        };
        let map_len = round_to_pages(len)?;
        // SAFETY: memfd_secret takes one flags argument and returns a new fd or -1.
        let raw = unsafe { libc::syscall(nr, libc::O_CLOEXEC as libc::c_ulong) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // ENOSYS: no secretmem in this kernel (or secretmem.enable=0);
                // EINVAL: flags rejected; EPERM: e.g. a seccomp filter.
                Some(libc::ENOSYS | libc::EINVAL | libc::EPERM) => Ok(None),
                _ => Err(os_err(p, "memfd_secret", map_len, e)),
            };
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) };
        let off = libc::off_t::try_from(map_len).map_err(|_| SecretMemError::TooLarge { requested: len })?;
        // SAFETY: plain syscall on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off) } != 0 {
            return Err(os_err(p, "ftruncate", map_len, io::Error::last_os_error()));
        }
        let map = match Mapping::map(map_len, libc::MAP_SHARED, fd.as_raw_fd()) {
            Ok(m) => m,
            // The kernel checks RLIMIT_MEMLOCK at mmap time (secretmem VMAs are VM_LOCKED)
            // and answers EAGAIN; ENOMEM is treated alike.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                return Err(memlock_error(p, map_len, e))
            }
            Err(e) => return Err(os_err(p, "mmap", map_len, e)),
        };
        // The kernel already marks secretmem VMAs VM_LOCKED|VM_DONTDUMP; say it anyway.
        map.madvise(libc::MADV_DONTDUMP)
            .map_err(|e| os_err(p, "madvise(MADV_DONTDUMP)", map_len, e))?;
        // WIPEONFORK is EINVAL on shared mappings; DONTFORK leaves the child no mapping.
        map.madvise(libc::MADV_DONTFORK)
            .map_err(|e| os_err(p, "madvise(MADV_DONTFORK)", map_len, e))?;
        let mut mem = SecretMem {
            map,
            len,
            protection: p,
            _fd: Some(fd),
        };
        // Fault every page in now: secretmem pages are allocated (and removed from the
        // direct map) on first touch, and a failure there is a SIGBUS; better at creation
        // than in the middle of key handling. The kernel hands out zeroed pages anyway.
        mem.wipe();
        Ok(Some(mem))
    }

    /// Copies `bytes` into new secret memory (see [`SecretMem::new`]). Wiping the source
    /// is the caller's business.
    pub fn from_slice(bytes: &[u8]) -> Result<SecretMem, SecretMemError> {
        let mut mem = SecretMem::new(bytes.len())?;
        mem.as_mut_slice().copy_from_slice(bytes);
        Ok(mem)
    }

    /// Which mechanism protects this memory.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// The requested length in bytes (not rounded to pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if the requested length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `len()` secret bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len <= map.len`, the mapping is live and readable for the lifetime of
        // `&self`, and writes require `&mut self`, so no aliasing `&mut` exists.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.len) }
    }

    /// The `len()` secret bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.len) }
    }

    /// Page-aligned pointer to the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.ptr.as_ptr()
    }

    /// Page-aligned mutable pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Zeroizes the whole mapping, page padding included (volatile writes + fence).
    fn wipe(&mut self) {
        // SAFETY: the whole mapping is live and writable, and `&mut self` guarantees no
        // other reference into it exists.
        let all = unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.len) };
        all.zeroize();
    }

    /// What `Drop` does before the mapping goes away: wipe everything, hand the wiped
    /// mapping to `inspect`, then unlock. Idempotent.
    fn teardown(&mut self, inspect: impl FnOnce(&[u8])) {
        self.wipe();
        // SAFETY: the mapping is live; the slice does not outlive this call.
        inspect(unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) });
        if self.protection == Protection::Mlock {
            // SAFETY: our own live, locked range; unlocking does not change its contents.
            unsafe { libc::munlock(self.map.ptr.as_ptr().cast(), self.map.len) };
        }
    }

    /// Test hook: runs the exact teardown `Drop` runs and lets `inspect` look at the whole
    /// mapping (page padding included) after the wipe, before it is unmapped. It cannot
    /// reveal secrets: it only sees memory that has been wiped.
    #[doc(hidden)]
    pub fn drop_and_inspect(mut self, inspect: impl FnOnce(&[u8])) {
        self.teardown(inspect);
        // `self` drops here: teardown again (a no-op on zeroed, unlocked memory), then
        // munmap and close.
    }
}

impl Drop for SecretMem {
    fn drop(&mut self) {
        // Wipe and unlock; then the fields drop in order: munmap, close(fd).
        self.teardown(|_| {});
    }
}

impl fmt::Debug for SecretMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretMem")
            .field("len", &self.len)
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

fn os_err(protection: Protection, op: &'static str, bytes: usize, source: io::Error) -> SecretMemError {
    SecretMemError::Os {
        protection,
        op,
        bytes,
        source,
    }
}

/// Whole pages covering `len`; at least one page, so every SecretMem has a real mapping.
fn round_to_pages(len: usize) -> Result<usize, SecretMemError> {
    let ps = page_size();
    len.max(1)
        .checked_next_multiple_of(ps)
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or(SecretMemError::TooLarge { requested: len })
}
