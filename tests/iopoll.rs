//! Polled completions (IOPOLL) on the uring bdev: used where the kernel
//! completes a file's I/O by polling, and a clean fallback to the interrupt
//! ring where it answers `EOPNOTSUPP` (this machine's virtio disk has no poll
//! queues; loop devices never poll).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use sealdisk::BdevRef;
use sealdisk::{Iopoll, UringBdev, UringOpts};

fn tmpfile(name: &str) -> std::path::PathBuf {
    // The system temp dir, not /dev/shm: tmpfs refuses IOPOLL outright.
    let d = std::env::temp_dir().join(format!("sealdisk-iopoll-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("disk.img")
}

fn open(path: &Path, iopoll: Iopoll) -> Arc<UringBdev> {
    Arc::new(
        UringBdev::open(
            path,
            &UringOpts {
                create_size: Some(8 << 20),
                iopoll,
                ..UringOpts::default()
            },
        )
        .expect("open O_DIRECT"),
    )
}

/// What sysfs says about the queue under `path` (`queue/io_poll`).
fn sysfs_polls(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).unwrap();
    let dev = if m.file_type().is_block_device() {
        m.rdev()
    } else {
        m.dev()
    };
    let base = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    ["queue/io_poll", "../queue/io_poll"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{base}/{q}")).ok())
        .is_some_and(|v| v.trim() == "1")
}

/// Write, read back, flush; the data must survive whatever ring served it.
fn round_trip(r: &sealdisk::Reactors, bdev: &Arc<UringBdev>, seed: u64) {
    let b: BdevRef = bdev.clone();
    let data = random_bytes(64 << 10, seed);
    let out = run_ios(
        r,
        0,
        &b,
        vec![
            Op::Write {
                offset: 1 << 20,
                data: data.clone(),
            },
            Op::Read {
                offset: 1 << 20,
                len: 64 << 10,
            },
            Op::Flush,
        ],
    );
    for d in &out {
        assert!(d.result.is_ok(), "{:?}", d.result);
    }
    assert_eq!(out[1].data, data, "read back differs");
}

#[test]
fn auto_mode_follows_the_devices_poll_queues() {
    let path = tmpfile("auto");
    let bdev = open(&path, Iopoll::Auto);
    assert_eq!(bdev.uses_iopoll(), sysfs_polls(&path));
    let off = open(&path, Iopoll::Off);
    assert!(!off.uses_iopoll());
    let r = reactors(&[0]);
    round_trip(&r, &bdev, 1);
}

#[test]
fn forced_iopoll_polls_what_the_kernel_allows_and_falls_back_cleanly() {
    let path = tmpfile("on");
    let bdev = open(&path, Iopoll::On);
    assert!(bdev.uses_iopoll());
    let r = reactors(&[0]);
    let b: BdevRef = bdev.clone();
    // A read of a hole in a sparse ext4 file needs no device I/O: the kernel
    // completes it on the polled ring even without poll queues.
    let out = run_ios(&r, 0, &b, vec![Op::Read { offset: 0, len: 4096 }]);
    assert!(out[0].result.is_ok(), "{:?}", out[0].result);
    assert_eq!(out[0].data, vec![0u8; 4096]);
    assert!(bdev.polled_ios() >= 1, "the hole read did not complete by polling");
    assert!(bdev.uses_iopoll());
    // A write reaches the device: without poll queues the kernel refuses it
    // on the polled ring; the channel resubmits it and the bdev stops polling.
    round_trip(&r, &bdev, 2);
    assert_eq!(bdev.uses_iopoll(), sysfs_polls(&path));
    // Later channels and requests keep working.
    round_trip(&r, &bdev, 3);
}

#[test]
fn loop_devices_refuse_iopoll_and_fall_back() {
    let path = tmpfile("loop");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&path)
        .output()
        .expect("losetup (util-linux) must be installed");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let r = reactors(&[0]);
    let auto = open(Path::new(&dev), Iopoll::Auto);
    assert!(!auto.uses_iopoll(), "{dev} advertises poll queues");
    let on = open(Path::new(&dev), Iopoll::On);
    round_trip(&r, &on, 4);
    assert!(!on.uses_iopoll(), "{dev}: still polling after the kernel refused it");
    assert_eq!(on.polled_ios(), 0);
}
