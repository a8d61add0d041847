//! Integration tests for `sealdisk::secmem`: they look at what the kernel really did
//! (`/proc/self/smaps`, fork, RLIMIT_MEMLOCK in a child process), not just at the API.

use std::os::unix::process::CommandExt;
use std::process::Command;

use sealdisk::{Protection, SecretMem, SecretMemError};

const PAGE: usize = 4096;

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn round_up(len: usize) -> usize {
    let ps = page_size();
    len.max(1).div_ceil(ps) * ps
}

/// Whether the memfd_secret tests run: the kernel has it, or it lacks it and the skip is
/// explicitly allowed (`SEALDISK_ALLOW_NO_MEMFD_SECRET=1`); otherwise the test fails,
/// so a kernel without it never leaves that path untested in a green run.
fn memfd_secret_or_allowed_skip() -> bool {
    if kernel_has_memfd_secret() {
        return true;
    }
    if std::env::var("SEALDISK_ALLOW_NO_MEMFD_SECRET").as_deref() == Ok("1") {
        eprintln!("\n!!!!!!!! SKIPPED: no memfd_secret on this kernel (SEALDISK_ALLOW_NO_MEMFD_SECRET=1) !!!!!!!!\n");
        return false;
    }
    panic!(
        "this kernel has no memfd_secret (boot with secretmem.enable=1 on 5.14..6.4); \
         set SEALDISK_ALLOW_NO_MEMFD_SECRET=1 to skip its tests"
    );
}

/// Probes memfd_secret directly, independently of the code under test.
fn kernel_has_memfd_secret() -> bool {
    // SAFETY: memfd_secret takes one flags argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_ulong) };
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the fd we just created and own.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

/// The smaps entry containing `addr`: (header line, VmFlags).
fn smaps_entry(addr: usize) -> (String, Vec<String>) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                current = (start <= addr && addr < end).then(|| line.to_string());
                continue;
            }
        }
        if let (Some(header), Some(flags)) = (&current, line.strip_prefix("VmFlags:")) {
            return (header.clone(), flags.split_whitespace().map(str::to_string).collect());
        }
    }
    panic!("no smaps entry contains {addr:#x}");
}

fn has(flags: &[String], f: &str) -> bool {
    flags.iter().any(|x| x == f)
}

fn both_paths(len: usize) -> Vec<SecretMem> {
    vec![
        SecretMem::new(len).expect("SecretMem::new"),
        SecretMem::new_mlocked(len).expect("SecretMem::new_mlocked"),
    ]
}

#[test]
fn protection_display() {
    assert_eq!(Protection::MemfdSecret.to_string(), "memfd_secret");
    assert_eq!(Protection::Mlock.to_string(), "mlock");
}

#[test]
fn new_uses_memfd_secret_when_kernel_has_it() {
    let m = SecretMem::new(64).unwrap();
    if kernel_has_memfd_secret() {
        assert_eq!(m.protection(), Protection::MemfdSecret);
    } else {
        eprintln!("kernel has no memfd_secret; checking the mlock fallback instead");
        assert_eq!(m.protection(), Protection::Mlock);
    }
    assert_eq!(SecretMem::new_mlocked(64).unwrap().protection(), Protection::Mlock);
}

#[test]
fn zero_filled_page_aligned_requested_len() {
    for len in [0, 1, 31, 64, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 5] {
        for mut m in both_paths(len) {
            assert_eq!(m.len(), len);
            assert_eq!(m.is_empty(), len == 0);
            assert_eq!(m.as_slice().len(), len);
            assert_eq!(m.as_ptr() as usize % page_size(), 0, "{m:?} not page-aligned");
            assert_eq!(m.as_ptr(), m.as_slice().as_ptr());
            assert!(m.as_slice().iter().all(|&b| b == 0), "{m:?} not zero-filled");
            for (i, b) in m.as_mut_slice().iter_mut().enumerate() {
                *b = i as u8 ^ 0x3c;
            }
            let p = m.as_mut_ptr();
            assert_eq!(p as *const u8, m.as_ptr());
            assert!(m.as_slice().iter().enumerate().all(|(i, &b)| b == i as u8 ^ 0x3c));
        }
    }
}

#[test]
fn from_slice_copies() {
    let src: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let m = SecretMem::from_slice(&src).unwrap();
    assert_eq!(m.as_slice(), &src[..]);
    assert!(SecretMem::from_slice(&[]).unwrap().is_empty());
}

#[test]
fn smaps_mlock_path_is_locked_dontdump_wipeonfork() {
    let m = SecretMem::new_mlocked(3 * PAGE + 1).unwrap();
    let (header, flags) = smaps_entry(m.as_ptr() as usize);
    assert!(header.contains(" rw-p "), "private mapping expected: {header}");
    for f in ["lo", "dd", "wf"] {
        assert!(has(&flags, f), "VmFlags lacks {f}: {flags:?}");
    }
    assert!(!has(&flags, "dc"), "mlock path should not be DONTFORK: {flags:?}");
    // The last byte of the rounded mapping is in the same VMA, i.e. also protected.
    let (_, tail) = smaps_entry(m.as_ptr() as usize + round_up(m.len()) - 1);
    assert_eq!(tail, flags);
}

#[test]
fn smaps_memfd_secret_path_is_locked_dontdump_dontfork() {
    if !memfd_secret_or_allowed_skip() {
        return;
    }
    let m = SecretMem::new(2 * PAGE + 7).unwrap();
    assert_eq!(m.protection(), Protection::MemfdSecret, "the kernel has memfd_secret");
    let (header, flags) = smaps_entry(m.as_ptr() as usize);
    // What Linux 6.18 shows: "rw-s ... /secretmem (deleted)", VmFlags "rd wr sh mr mw ms lo dc dd".
    assert!(header.contains(" rw-s "), "shared mapping expected: {header}");
    assert!(header.contains("secretmem"), "not a secretmem mapping: {header}");
    for f in ["lo", "dd", "dc", "sh"] {
        assert!(has(&flags, f), "VmFlags lacks {f}: {flags:?}");
    }
    assert!(
        !has(&flags, "wf"),
        "WIPEONFORK is impossible on shared mappings: {flags:?}"
    );
}

#[test]
fn drop_teardown_wipes_whole_mapping() {
    for len in [1, 100, PAGE, PAGE + 1] {
        for mut m in both_paths(len) {
            let ps = round_up(len);
            m.as_mut_slice().fill(0xa5);
            let base = m.as_mut_ptr();
            // Also dirty the page padding beyond len() so the test sees whether the wipe
            // covers whole pages.
            for i in len..ps {
                // SAFETY: the mapping is rounded up to whole pages, so base..base+ps is
                // ours; nothing else references the padding.
                unsafe { base.add(i).write_volatile(0x5a) };
            }
            let prot = m.protection();
            let mut seen = None;
            m.drop_and_inspect(|all| seen = Some((all.as_ptr() as usize, all.len(), all.iter().position(|&b| b != 0))));
            let (ptr, n, nonzero) = seen.expect("inspector not called");
            assert_eq!(ptr, base as usize);
            assert_eq!(n, ps, "{prot}: teardown must cover the whole rounded mapping");
            assert_eq!(nonzero, None, "{prot}: byte left unwiped at drop (len {len})");
        }
    }
}

#[test]
fn proc_self_mem_reads_mlock_but_not_memfd_secret() {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    for mut m in both_paths(32) {
        m.as_mut_slice().fill(0x77);
        let mut b = [0u8; 1];
        let r = mem.read_at(&mut b, m.as_ptr() as u64);
        match m.protection() {
            // The kernel refuses get_user_pages() on secretmem pages: ptrace-style access
            // (/proc/pid/mem, PTRACE_PEEKDATA, process_vm_readv) fails even for root.
            Protection::MemfdSecret => assert!(r.is_err(), "read secretmem via /proc: {b:?}"),
            // mlock only pins; the pages stay readable through /proc/pid/mem.
            Protection::Mlock => {
                assert_eq!(r.unwrap(), 1);
                assert_eq!(b[0], 0x77);
            }
        }
    }
}

/// Fork, run `child` in the child (only memory reads and raw syscalls: the test harness
/// is multi-threaded), return the child's exit code.
fn fork_and_wait(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `child` (no allocation, no locks) and then `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: terminating the forked child without running the parent's atexit/Drop.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn mincore_ok(ptr: *const u8, len: usize) -> Result<(), i32> {
    let mut vec = [0u8; 8];
    assert!(len <= 8 * PAGE);
    // SAFETY: `vec` has room for one byte per page of the range; mincore only writes there.
    let r = unsafe { libc::mincore(ptr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        // SAFETY: errno is thread-local and always readable.
        Err(unsafe { *libc::__errno_location() })
    }
}

#[test]
fn fork_child_sees_zeros_on_mlock_path() {
    let mut m = SecretMem::new_mlocked(PAGE + 10).unwrap();
    m.as_mut_slice().fill(0xa5);
    let code = fork_and_wait(|| {
        if mincore_ok(m.as_ptr(), round_up(m.len())).is_err() {
            return 2; // mapping missing: that would be DONTFORK, not WIPEONFORK
        }
        if m.as_slice().iter().all(|&b| b == 0) {
            0
        } else {
            1
        }
    });
    assert_eq!(code, 0, "child saw key bytes (1) or no mapping (2)");
    assert!(m.as_slice().iter().all(|&b| b == 0xa5), "parent copy changed");
}

#[test]
fn fork_child_has_no_memfd_secret_mapping() {
    if !memfd_secret_or_allowed_skip() {
        return;
    }
    let mut m = SecretMem::new(PAGE + 10).unwrap();
    assert_eq!(m.protection(), Protection::MemfdSecret, "the kernel has memfd_secret");
    m.as_mut_slice().fill(0xa5);
    let len = round_up(m.len());
    assert_eq!(mincore_ok(m.as_ptr(), len), Ok(()), "parent must have the mapping");
    let code = fork_and_wait(|| match mincore_ok(m.as_ptr(), len) {
        Err(libc::ENOMEM) => 0, // unmapped in the child
        Ok(()) => 1,
        Err(_) => 2,
    });
    assert_eq!(code, 0, "child still has the secret mapping (1) or mincore failed (2)");
    assert!(m.as_slice().iter().all(|&b| b == 0xa5));
}

#[test]
fn debug_never_shows_bytes() {
    let pattern = [0xde, 0xad, 0xbe, 0xef];
    for mut m in both_paths(64) {
        for c in m.as_mut_slice().chunks_mut(4) {
            c.copy_from_slice(&pattern);
        }
        let prot = format!("{:?}", m.protection());
        for s in [format!("{m:?}"), format!("{m:#?}")] {
            let lower = s.to_lowercase();
            for needle in ["de", "ad", "be", "ef", "222", "173", "190", "239", "0x"] {
                assert!(!lower.contains(needle), "{needle:?} in Debug output {s:?}");
            }
            assert!(s.contains("len: 64") && s.contains(&prot), "{s}");
        }
        assert_eq!(
            format!("{m:?}"),
            format!("SecretMem {{ len: 64, protection: {prot}, .. }}")
        );
    }
}

#[test]
fn send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SecretMem>();
    assert_send_sync::<SecretMemError>();
    let m = SecretMem::from_slice(b"moved across threads").unwrap();
    let back = std::thread::spawn(move || {
        assert_eq!(m.as_slice(), b"moved across threads");
        m
    })
    .join()
    .unwrap();
    let shared = &back;
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(shared.len(), 20));
        s.spawn(|| assert_eq!(shared.as_slice()[0], b'm'));
    });
}

// ---- RLIMIT_MEMLOCK, checked in a child process ------------------------------------
//
// The tests run as root, and CAP_IPC_LOCK ignores RLIMIT_MEMLOCK. So the test binary is
// re-executed with the limit lowered and CAP_IPC_LOCK removed from the bounding set before
// execve (which then leaves it out of the child's permitted and effective sets even for
// root). `memlock_child` runs only there.

const CHILD_ENV: &str = "SEALDISK_SECMEM_MEMLOCK_CHILD";
const CAP_IPC_LOCK: u32 = 14;

/// Runs in the forked child before execve: async-signal-safe syscalls only.
fn lower_memlock_and_drop_ipc_lock(limit: u64) -> std::io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: `rl` is a valid rlimit; lowering a limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cap = CAP_IPC_LOCK as libc::c_ulong;
    // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        // EPERM: no CAP_SETPCAP (non-root run), so most likely no CAP_IPC_LOCK to drop
        // either; the child checks that it really lacks it.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    Ok(())
}

fn run_memlock_child(limit: u64) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "memlock_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, limit.to_string());
    // SAFETY: the closure runs between fork and exec; it only makes raw syscalls and builds
    // an io::Error from errno, allocating nothing and taking no locks.
    unsafe { cmd.pre_exec(move || lower_memlock_and_drop_ipc_lock(limit)) };
    let out = cmd.output().expect("re-exec test binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "child test did not run:\n{stdout}"
    );
    stdout
}

fn check_memlock_message(e: &SecretMemError, limit: u64, protection: Protection) -> String {
    match e {
        SecretMemError::MemlockLimit {
            protection: p,
            soft_limit,
            ..
        } => {
            assert_eq!(*p, protection);
            assert_eq!(*soft_limit, Some(limit));
        }
        other => panic!("expected MemlockLimit, got {other:?}"),
    }
    let msg = e.to_string();
    for needle in [
        "RLIMIT_MEMLOCK",
        "ulimit -l",
        "LimitMEMLOCK=",
        &format!("is {} KiB", limit / 1024),
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    println!("MEMLOCK-ERROR({protection}): {msg}");
    msg
}

#[test]
#[ignore = "helper: run by memlock_limit_* in a child process with a lowered limit"]
fn memlock_child() {
    let Ok(limit) = std::env::var(CHILD_ENV) else {
        return; // run by hand with --ignored: nothing to do
    };
    let limit: u64 = limit.parse().unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        cap_eff & (1 << CAP_IPC_LOCK),
        0,
        "child still has CAP_IPC_LOCK; the limit would not apply"
    );
    let memfd = kernel_has_memfd_secret();
    let default = if memfd {
        Protection::MemfdSecret
    } else {
        Protection::Mlock
    };
    let ps = page_size() as u64;

    if limit == 0 {
        // mlock answers EPERM here (limit 0, no capability), memfd_secret's mmap EAGAIN.
        let e = SecretMem::new(1).unwrap_err();
        check_memlock_message(&e, 0, default);
        let e = SecretMem::new_mlocked(1).unwrap_err();
        check_memlock_message(&e, 0, Protection::Mlock);
        return;
    }

    assert!(limit >= 2 * ps);
    // Exactly the limit fits...
    let full = SecretMem::new(limit as usize).expect("allocation within the limit");
    assert_eq!(full.protection(), default);
    // ...one more page does not: the kernel counts it against RLIMIT_MEMLOCK.
    let e = SecretMem::new(1).unwrap_err();
    check_memlock_message(&e, limit, default);
    // Dropping gives the locked pages back (munlock/munmap really happened).
    drop(full);
    let small = SecretMem::new(1).expect("allocation after drop");
    drop(small);
    // The forced mlock path hits the limit too, with the same advice.
    let e = SecretMem::new_mlocked(limit as usize + 1).unwrap_err();
    check_memlock_message(&e, limit, Protection::Mlock);
    let ok = SecretMem::new_mlocked(limit as usize).expect("mlock within the limit");
    drop(ok);
    let again = SecretMem::new_mlocked(limit as usize).expect("mlock after drop");
    drop(again);
}

#[test]
fn memlock_limit_error_names_rlimit_and_fix() {
    let out = run_memlock_child(64 * 1024);
    assert!(out.contains("MEMLOCK-ERROR(mlock): "), "{out}");
    assert!(out.contains("RLIMIT_MEMLOCK is 64 KiB"), "{out}");
}

#[test]
fn memlock_limit_zero_error_names_rlimit_and_fix() {
    let out = run_memlock_child(0);
    assert!(out.contains("RLIMIT_MEMLOCK is 0 KiB"), "{out}");
}
