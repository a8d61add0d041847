//! The guest harness itself (tests/common/guest.rs), against qemu-storage-daemon's
//! vhost-user-blk export of a raw file: a Linux guest under QEMU TCG writes a pattern with
//! O_DIRECT and reads it back; the host finds exactly that pattern in the file.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest;

const MIB: u64 = 1 << 20;

struct Qsd {
    child: Child,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-storage-daemon exporting `raw` as vhost-user-blk on `sock`.
fn start_qsd(raw: &Path, sock: &Path, num_queues: u16) -> Qsd {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", raw.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (package qemu-utils)");
    let mut qsd = Qsd { child };
    let until = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(st) = qsd.child.try_wait().unwrap() {
            panic!("qemu-storage-daemon exited: {st}");
        }
        assert!(Instant::now() < until, "qemu-storage-daemon made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    qsd
}

#[test]
fn guest_writes_pattern_through_qsd_vhost_user_blk() {
    if !guest::require_guest() {
        return;
    }
    let tmp = common::TempDir::new("guestboot");
    let dir = &tmp.0;
    let raw = dir.join("disk.raw");
    let sock = dir.join("vhost.sock");
    let disk_size = 64 * MIB;
    std::fs::File::create(&raw).unwrap().set_len(disk_size).unwrap();

    let (offset_mib, size_mib, seed) = (1, 4, 0xa5);
    let qsd = start_qsd(&raw, &sock, 2);
    let opts = guest::BootOpts::new(&sock, guest::pattern_script(offset_mib, size_mib, seed));
    let run = guest::boot_vhost_blk(&opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("guest ran in {:?}: {:?}", run.elapsed, guest::guest_lines(&run.console));
    run.expect_ok().unwrap_or_else(|e| panic!("{e}"));

    let pattern = guest::pattern_bytes(size_mib, seed);
    let want = guest::sha256_hex(&pattern);
    let disk = run.values("GUEST-DISK");
    assert!(
        disk.iter()
            .any(|d| d.starts_with(&format!("size={disk_size} queues=2"))),
        "guest saw {disk:?}\n{}",
        run.describe()
    );
    assert_eq!(
        run.value("GUEST-PATTERN-SUM").as_deref(),
        Some(want.as_str()),
        "guest's pattern generator"
    );
    assert_eq!(
        run.value("GUEST-SUM").as_deref(),
        Some(want.as_str()),
        "guest's read-back"
    );

    // The host's view of the file: the pattern at the offset, zeros around it.
    let f = std::fs::File::open(&raw).unwrap();
    let mut all = vec![0u8; disk_size as usize];
    f.read_exact_at(&mut all, 0).unwrap();
    let (start, end) = ((offset_mib * MIB) as usize, ((offset_mib + size_mib) * MIB) as usize);
    assert!(all[..start].iter().all(|b| *b == 0), "bytes before the pattern changed");
    assert!(
        all[start..end] == pattern[..],
        "the file does not hold the pattern at {offset_mib} MiB"
    );
    assert!(all[end..].iter().all(|b| *b == 0), "bytes after the pattern changed");
    drop(qsd);
}
