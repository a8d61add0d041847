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

/// The disk file in `dir` (under the system temp dir, not /dev/shm: tmpfs refuses
/// IOPOLL outright).
fn disk(dir: &TempDir) -> std::path::PathBuf {
    dir.0.join("disk.img")
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
fn auto_mode_polls_exactly_when_it_says_it_does() {
    let dir = TempDir::new("iopoll-auto");
    let path = disk(&dir);
    let r = reactors(&[0]);
    let auto = open(&path, Iopoll::Auto);
    let chose_polling = auto.uses_iopoll();
    round_trip(&r, &auto, 1);
    // Whatever auto chose for this file's device, every request completed, and the
    // requests completed by polling exactly when it chose polling: a device without poll
    // queues never costs a refused submission (the loop device test checks that one),
    // and one with them keeps polling (the kernel took every request on the polled ring).
    if chose_polling {
        assert!(auto.uses_iopoll(), "auto chose polling, then fell back");
        assert!(
            auto.polled_ios() >= 2,
            "auto polls, but {} requests completed by polling",
            auto.polled_ios()
        );
    } else {
        assert_eq!(
            auto.polled_ios(),
            0,
            "auto chose interrupts, yet requests completed by polling"
        );
    }
    let off = open(&path, Iopoll::Off);
    assert!(!off.uses_iopoll());
    round_trip(&r, &off, 5);
    assert_eq!(off.polled_ios(), 0, "iopoll=off polled");
}

#[test]
fn forced_iopoll_polls_what_the_kernel_allows_and_falls_back_cleanly() {
    let dir = TempDir::new("iopoll-on");
    let path = disk(&dir);
    let bdev = open(&path, Iopoll::On);
    assert!(bdev.uses_iopoll());
    let r = reactors(&[0]);
    let b: BdevRef = bdev.clone();
    // A read of a hole in a sparse ext4 file needs no device I/O: the kernel
    // completes it on the polled ring even without poll queues.
    let out = run_ios(&r, 0, &b, vec![Op::Read { offset: 0, len: 4096 }]);
    assert!(out[0].result.is_ok(), "{:?}", out[0].result);
    assert_eq!(out[0].data, vec![0u8; 4096]);
    let after_hole = bdev.polled_ios();
    assert!(after_hole >= 1, "the hole read did not complete by polling");
    assert!(bdev.uses_iopoll());
    // A write reaches the device: without poll queues the kernel refuses it on the
    // polled ring, the channel resubmits it and the bdev stops polling; with them it
    // completes by polling. Either way the data round-trips.
    round_trip(&r, &bdev, 2);
    let after_write = bdev.polled_ios();
    if bdev.uses_iopoll() {
        assert!(
            after_write > after_hole,
            "still polling, but the write did not complete by polling"
        );
    }
    // Later channels and requests keep working; after a fallback nothing polls again.
    let fell_back = !bdev.uses_iopoll();
    round_trip(&r, &bdev, 3);
    if fell_back {
        assert!(!bdev.uses_iopoll(), "polling again after the fallback");
        assert_eq!(
            bdev.polled_ios(),
            after_write,
            "requests completed by polling after the fallback"
        );
    }
}

#[test]
fn loop_devices_refuse_iopoll_and_fall_back() {
    let dir = TempDir::new("iopoll-loop");
    let path = disk(&dir);
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
