//! A real guest on an encrypted disk over vhost-user-blk: QEMU (TCG) boots a small
//! Linux with the disk on `vhost-user-blk-pci` (two queues, one per reactor), writes a
//! pattern with O_DIRECT, reads it back and powers off. The test then reads the same
//! range through the admin NBD socket (same plaintext) and scans the pool file (no
//! plaintext anywhere: only ciphertext at rest).
//!
//! Needs `qemu-system-x86_64` (`.ci/run` installs it); a missing QEMU fails the test
//! unless `SEALDISK_ALLOW_SKIP_GUEST=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use common::{guest, rpc, Daemon, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const MIB: u64 = 1 << 20;

fn start(data: &Path) -> Daemon {
    start_with(data, &[])
}

fn start_with(data: &Path, env: &[(&str, &str)]) -> Daemon {
    common::start_daemon(BIN, data, &["--cores", "0-1", "--pool-size", "256M", "--no-qos"], env)
}

/// `len` bytes at `off` of export `disk` on the admin NBD socket, through qemu-img.
fn nbd_read(data: &Path, disk: &str, off: u64, len: u64) -> Vec<u8> {
    let out = data.with_extension("readback");
    let uri = format!("nbd+unix:///{disk}?socket={}", data.join("nbd.sock").display());
    let st = Command::new("qemu-img")
        .args(["dd", "-f", "raw", "-O", "raw", "bs=1M"])
        .arg(format!("if={uri}"))
        .arg(format!("of={}", out.display()))
        .arg(format!("skip={}", off / MIB))
        // qemu-img dd counts `count` from the start of the input, skipped blocks included.
        .arg(format!("count={}", (off + len) / MIB))
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img dd failed");
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// Whether any 512-byte sector of the file starts with `needle` (the guest's pattern
/// starts every sector with its text; data sits sector-aligned in the pool).
fn file_has_sector_starting(path: &Path, needle: &[u8]) -> bool {
    let data = std::fs::read(path).unwrap();
    data.chunks(512).any(|c| c.starts_with(needle))
}

#[test]
fn guest_writes_and_reads_an_encrypted_disk_over_vhost_user() {
    if !guest::require_guest() {
        return;
    }
    let data = TempDir::new("vhost-guest");
    let _d = start(&data.0);
    let (inst, disk, att) = common::instance_with_disk(&data.0, 64 * MIB, true);
    let sock = PathBuf::from(att["VhostSocket"].as_str().expect("AttachDisk names the vhost socket"));
    assert_eq!(
        sock,
        data.0
            .join("instances")
            .join(&inst)
            .join("vhost")
            .join(format!("{disk}.sock"))
    );

    let run = guest::boot_vhost_blk(&guest::BootOpts::new(&sock, guest::pattern_script(1, 4, 7)))
        .unwrap_or_else(|e| panic!("{e}"));
    run.expect_ok().unwrap_or_else(|e| panic!("{e}"));
    let want = guest::expected_pattern_sum(4, 7);
    assert_eq!(
        run.value("GUEST-SUM").as_deref(),
        Some(want.as_str()),
        "{}",
        run.describe()
    );

    // The host sees what the guest wrote, through the data path.
    let back = nbd_read(&data.0, &disk, MIB, 4 * MIB);
    assert_eq!(back.len() as u64, 4 * MIB, "NBD read-back length");
    assert_eq!(
        guest::sha256_hex(&back),
        want,
        "NBD read-back differs from the guest's pattern"
    );
    // And only ciphertext at rest.
    rpc(&data.0, "DetachDisk", json!({"DiskId": disk, "InstanceId": inst}));
    assert!(!sock.exists(), "DetachDisk removes the vhost socket");
    assert!(
        !file_has_sector_starting(&data.0.join("pool.img"), b"sealdisk seed 7 sector"),
        "plaintext found in the pool"
    );
}

/// The daemon is SIGKILLed while the guest has I/O in flight and started again: QEMU
/// reconnects (`reconnect-ms`), hands the new daemon its inflight area
/// (INFLIGHT_SHMFD), the requests in flight at the crash are taken again, and the
/// guest's writes and reads carry on with the right data.
#[test]
fn guest_disk_survives_a_daemon_restart() {
    if !guest::require_guest() {
        return;
    }
    let data = TempDir::new("vhost-restart");
    const FAULTS: [(&str, &str); 1] = [("SEALDISK_FAULTS", "commit:delay=100ms")];
    let mut d = start_with(&data.0, &FAULTS);
    let (_inst, _disk, att) = common::instance_with_disk(&data.0, 64 * MIB, true);
    let sock = PathBuf::from(att["VhostSocket"].as_str().unwrap());

    // Round i: two writers on the two halves of 4 MiB at 4i MiB (64 KiB direct
    // writes: requests overlap on the two queues), then a direct read-back. Every round
    // writes clusters never written before, so each first write waits for a commit (held
    // 100 ms by SEALDISK_FAULTS): the kill lands with requests in flight.
    let script = r#"set -e
awk -v n=8192 'BEGIN { for (i = 0; i < n; i++) printf "%-511s\n", "restart pattern sector " i }' > /tmp/p
want=$(sha256sum < /tmp/p | cut -d' ' -f1)
i=0
while [ $i -lt 8 ]; do
  dd if=/tmp/p of=/dev/vda bs=64k count=32 seek=$((i*64)) oflag=direct conv=notrunc 2>/dev/null &
  a=$!
  dd if=/tmp/p of=/dev/vda bs=64k skip=32 seek=$((i*64+32)) count=32 oflag=direct conv=notrunc 2>/dev/null &
  b=$!
  wait $a; wait $b
  got=$(dd if=/dev/vda bs=64k skip=$((i*64)) count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "GUEST-MISMATCH $i"; exit 1; }
  echo "GUEST-ROUND $i"
  i=$((i+1))
done
"#
    .to_string();
    let mut opts = guest::BootOpts::new(&sock, script);
    opts.reconnect = Some(1);
    opts.timeout = Duration::from_secs(180);
    let g = guest::spawn_vhost_blk(&opts).unwrap_or_else(|e| panic!("{e}"));
    g.wait_for("GUEST-ROUND 1", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    // Kill the daemon in the middle of a round's writes.
    std::thread::sleep(Duration::from_millis(150));
    let _ = d.0.kill();
    let _ = d.0.wait();
    let killed_after = g.console().matches("GUEST-ROUND").count();
    std::thread::sleep(Duration::from_millis(300));
    d = start_with(&data.0, &FAULTS);
    let run = g.wait().unwrap_or_else(|e| panic!("{e}"));
    run.expect_ok().unwrap_or_else(|e| panic!("{e}"));
    let rounds = run.values("GUEST-ROUND").len();
    assert_eq!(rounds, 8, "{}", run.describe());
    assert!(rounds > killed_after, "no round ran after the restart");
    drop(d);
    let log = std::fs::read_to_string(data.0.with_extension("log")).unwrap_or_default();
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("vhost"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
