//! Runs for months: connection churn far past 65,536 on one reactor with flat
//! descriptors and memory, more concurrent NBD connections than a fixed slot
//! table held, and a panicking reactor that takes the daemon down loudly
//! instead of leaving it half alive.

mod common;

use common::TempDir;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use sealdisk::testing::nbd::*;
use sealdisk::Client;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const MIB: u64 = 1 << 20;

fn dir(tag: &str) -> TempDir {
    TempDir::new(&format!("long-{tag}"))
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn start(d: &Path, log: &str, faults: Option<&str>) -> Daemon {
    start_on(d, log, faults, "0")
}

fn start_on(d: &Path, log: &str, faults: Option<&str>, cores: &str) -> Daemon {
    let log = d.join(log);
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--data-dir"])
        .arg(d.join("data"))
        .args(["--cores", cores, "--pool-size", "64M", "--no-qos", "--import-dir"])
        .arg(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    match faults {
        Some(f) => cmd.env("SEALDISK_FAULTS", f),
        None => cmd.env_remove("SEALDISK_FAULTS"),
    };
    let mut child = cmd.spawn().unwrap();
    let sock = d.join("data/sealdisk.sock");
    let t = Instant::now();
    while Client::connect(&sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited ({st}): {}", std::fs::read_to_string(&log).unwrap());
        }
        assert!(t.elapsed() < Duration::from_secs(30), "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, log }
}

/// An instance with one plaintext data disk (attached, so exported); its id.
fn disk(d: &Path) -> String {
    let mut c = Client::connect(&d.join("data/sealdisk.sock")).unwrap();
    let v: Value = c
        .call(
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB,
                   "DataDisk.1.SizeBytes": 4 * MIB}),
        )
        .unwrap();
    v["DataDiskIds"][0].as_str().unwrap().to_owned()
}

/// Handshake (fixed newstyle, NBD_OPT_GO) on the daemon's NBD socket.
fn connect(sock: &Path, export: &str) -> UnixStream {
    common::nbd_go(sock, export).unwrap_or_else(|t| panic!("GO {export}: reply {t:#x}"))
}

fn send_read(s: &mut UnixStream, cookie: u64) {
    let r = encode_request(&Request {
        flags: 0,
        cmd: CMD_READ,
        cookie,
        offset: 0,
        len: 4096,
    });
    s.write_all(&r).unwrap();
}

fn recv_read(s: &mut UnixStream, cookie: u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "read failed");
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).unwrap();
}

/// (open descriptors, resident KiB) of a process.
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// 70,000 connect / read / disconnect cycles (`SEALDISK_LONG_CYCLES`) on a
/// daemon with one reactor: past the 65,536 completion routes a ring once
/// handed out for good. Every cycle is served, and descriptors and memory
/// stay flat.
#[test]
fn connection_churn_past_65536_on_one_reactor_keeps_serving_with_flat_fds_and_memory() {
    let total = env_usize("SEALDISK_LONG_CYCLES", 70_000) as u64;
    let d = dir("churn");
    let dm = start(&d.0, "serve.log", None);
    let export = disk(&d.0);
    let sock = d.0.join("data/nbd.sock");
    let cycles = |n: u64, t: u64| {
        let (sock, export) = (sock.clone(), export.clone());
        std::thread::spawn(move || {
            for i in 0..n {
                let mut s = connect(&sock, &export);
                send_read(&mut s, t << 32 | i);
                recv_read(&mut s, t << 32 | i);
            }
        })
    };
    // Warm up (buffer pools, allocator arenas), then measure.
    for h in [cycles(1000, 0), cycles(1000, 1)] {
        h.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = footprint(dm.child.id());
    let t = Instant::now();
    for h in [cycles(total / 2, 2), cycles(total - total / 2, 3)] {
        h.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = footprint(dm.child.id());
    eprintln!(
        "churn: {total} connect/read/disconnect cycles in {:.1} s on one reactor: fds {} -> {}, RSS {} -> {} KiB",
        t.elapsed().as_secs_f64(),
        before.0,
        after.0,
        before.1,
        after.1
    );
    assert!(after.0 <= before.0 + 4, "descriptors leak: {before:?} -> {after:?}");
    assert!(after.1 <= before.1 + 16 * 1024, "memory grows: {before:?} -> {after:?}");
    let log = std::fs::read_to_string(&dm.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// 2,000 NBD connections (`SEALDISK_LONG_CONNS`) open at once to a daemon
/// with two reactors (the old table held 32 per reactor, and 64 handshakes at
/// once): every one completes its handshake and is served.
#[test]
fn two_thousand_concurrent_nbd_connections_are_all_served() {
    let n = env_usize("SEALDISK_LONG_CONNS", 2000);
    assert!(raise_nofile() as usize > n + 100, "the test needs {n} descriptors");
    let d = dir("many");
    let _dm = start_on(&d.0, "serve.log", None, "0,1");
    let t = Instant::now();
    let export = disk(&d.0);
    let sock = d.0.join("data/nbd.sock");
    // Connect from several threads at once, as a host full of VMs does.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (sock, export) = (sock.clone(), export.clone());
            std::thread::spawn(move || (0..n / 8).map(|_| connect(&sock, &export)).collect::<Vec<_>>())
        })
        .collect();
    let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    if joined.iter().any(|j| j.is_err()) {
        panic!(
            "connections failed; daemon log: {}",
            std::fs::read_to_string(&_dm.log).unwrap()
        );
    }
    let mut conns: Vec<UnixStream> = joined.into_iter().flat_map(|j| j.unwrap()).collect();
    assert_eq!(conns.len(), n / 8 * 8);
    let open = t.elapsed();
    for (i, s) in conns.iter_mut().enumerate() {
        send_read(s, i as u64);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        recv_read(s, i as u64);
    }
    let (fds, rss) = footprint(_dm.child.id());
    eprintln!(
        "concurrent: {} NBD connections open at once on two reactors, all served; opened in {:.1} s, \
         all read in {:.1} s; daemon fds {fds}, RSS {rss} KiB",
        conns.len(),
        open.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

/// A reactor that panics takes the daemon down at once with a log line that
/// names it and a non-zero exit; the next start recovers a consistent pool.
#[test]
fn a_reactor_panic_exits_the_daemon_non_zero_and_the_next_start_recovers() {
    let d = dir("panic");
    let mut dm = start(&d.0, "1.log", Some("reactor:panic=300ms"));
    let t = Instant::now();
    let st = loop {
        if let Some(st) = dm.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the daemon lives on after a reactor panic"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&dm.log).unwrap();
    assert_eq!(st.code(), Some(sealdisk::EXIT_DATA_PATH_PANIC), "{log}");
    assert!(log.contains("reactor-0 panicked"), "{log}");
    assert!(log.contains("injected by SEALDISK_FAULTS"), "{log}");
    drop(dm);
    let _dm = start(&d.0, "2.log", None);
    let mut c = Client::connect(&d.0.join("data/sealdisk.sock")).unwrap();
    let chk = c.call("CheckPool", json!({})).unwrap();
    assert_eq!(chk["Consistent"], true, "{chk}");
    // A malformed fault spec is refused at start with a clear error.
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(d.0.join("other"))
        .env("SEALDISK_FAULTS", "reactor:panic=soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected reactor:panic=Nms"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn call(d: &Path, m: &str, mut p: Value) -> Value {
    let mut c = Client::connect(&d.join("data/sealdisk.sock")).unwrap();
    if p.get("AccountId").is_none() && m != "CheckPool" {
        p["AccountId"] = A.into();
        p["RegionId"] = R.into();
    }
    c.call(m, p).unwrap_or_else(|e| panic!("{m}: {e}"))
}

fn task(d: &Path, id: &str) -> Value {
    call(d, "DescribeTasks", json!({"TaskIds": [id]}))["TaskSet"]["Task"][0].clone()
}

fn wait_task(d: &Path, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = task(d, id);
        if v["TaskStatus"] != "Processing" {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "task {id} did not end: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw image of `mib` MiB with data in every block.
fn image_file(d: &Path, mib: usize) -> PathBuf {
    let p = d.join("src.img");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 251 + 1) as u8).collect();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    p
}

/// CreateEncryptedCopy returns a TaskId at once; while it copies, DescribeDisks,
/// DescribeTasks and another disk's operations answer; CancelTask stops it and leaves
/// nothing behind; SIGTERM during another copy stops the daemon within 5 s with a
/// clean catalog and pool.
#[test]
fn a_copy_is_a_background_task_that_describe_calls_pass_and_cancel_and_sigterm_stop() {
    let d = dir("tasks");
    let src = dir("tasks-src");
    let img = image_file(&src.0, 192);
    // Slow commits keep the copy running long enough to be watched (every first write
    // into a cluster commits).
    let mut dm = start(&d.0, "1.log", Some("commit:delay=20ms"));
    call(&d.0, "ActivateKms", json!({}));
    let other = disk(&d.0);
    let copy = |d: &Path| {
        call(d, "CreateEncryptedCopy", json!({"SourcePath": img.to_str().unwrap()}))["TaskId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let id = copy(&d.0);
    // Other calls go on while it copies.
    let disks = call(&d.0, "DescribeDisks", json!({}));
    assert!(disks["TotalCount"].as_u64().unwrap() >= 2);
    call(&d.0, "CreateSnapshot", json!({"DiskId": other}));
    let t = task(&d.0, &id);
    assert_eq!(
        t["TaskStatus"], "Processing",
        "the copy ended before the other calls: {t}"
    );
    assert_eq!(t["TaskAction"], "CreateEncryptedCopy");
    assert_eq!(t["BytesTotal"], 192 * MIB);
    // Cancel it: nothing is left.
    call(&d.0, "CancelTask", json!({"TaskId": id}));
    let t = wait_task(&d.0, &id);
    assert_eq!(t["TaskStatus"], "Cancelled", "{t}");
    let chk = call(&d.0, "CheckPool", json!({}));
    assert_eq!(chk["Consistent"], true, "{chk}");
    let disks = call(&d.0, "DescribeDisks", json!({}));
    assert_eq!(disks["TotalCount"], 2, "the cancelled copy left a disk: {disks}");
    // Cancelling it again, or an unknown task, is a clear error.
    let mut c = Client::connect(&d.0.join("data/sealdisk.sock")).unwrap();
    let e = c.call("CancelTask", json!({"AccountId": A, "TaskId": id})).unwrap_err();
    assert_eq!(e.code, "IncorrectTaskStatus", "{e}");
    let e = c
        .call("CancelTask", json!({"AccountId": A, "TaskId": "t-nosuch"}))
        .unwrap_err();
    assert_eq!(e.code, "InvalidTaskId.NotFound", "{e}");
    let e = c
        .call("DescribeTasks", json!({"AccountId": A, "Bogus": 1}))
        .unwrap_err();
    assert!(e.code.starts_with("InvalidParameter"), "{e}");
    // SIGTERM during a copy.
    let id = copy(&d.0);
    assert_eq!(task(&d.0, &id)["TaskStatus"], "Processing");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(dm.child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let st = loop {
        if let Some(st) = dm.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGTERM during a copy took over 5 s: {}",
            std::fs::read_to_string(&dm.log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "{st}: {}", std::fs::read_to_string(&dm.log).unwrap());
    let out = Command::new(BIN)
        .args(["check", "--data-dir"])
        .arg(d.0.join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A 1 TiB thin disk with data at its start, middle and end: CreateEncryptedCopy and
/// ExportImage (of an image of its snapshot) complete, reading only what is allocated,
/// and both hold the data at its offsets.
#[test]
fn copy_and_export_of_a_1_tib_thin_disk_complete() {
    let d = dir("tib");
    let _dm = start(&d.0, "1.log", None);
    call(&d.0, "ActivateKms", json!({}));
    let inst = call(&d.0, "CreateInstance", json!({"SystemDisk.SizeBytes": 4 * MIB}));
    let iid = inst["InstanceId"].as_str().unwrap().to_owned();
    let tib = 1u64 << 40;
    let src = call(&d.0, "CreateDisk", json!({"SizeBytes": tib}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    call(&d.0, "AttachDisk", json!({"DiskId": src, "InstanceId": iid}));
    let offsets = [0u64, tib / 2 + 12345 * 4096, tib - 4096];
    let block = |o: u64| -> Vec<u8> { (0..4096).map(|i| ((o >> 12) as u8) ^ (i as u8) | 1).collect() };
    let sock = d.0.join("data/nbd.sock");
    {
        let mut s = connect(&sock, &src);
        for (i, &o) in offsets.iter().enumerate() {
            let mut r = encode_request(&Request {
                flags: 0,
                cmd: CMD_WRITE,
                cookie: i as u64,
                offset: o,
                len: 4096,
            })
            .to_vec();
            r.extend_from_slice(&block(o));
            s.write_all(&r).unwrap();
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        }
    }
    let read_at = |export: &str, o: u64| -> Vec<u8> {
        let mut s = connect(&sock, export);
        let r = encode_request(&Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: 1,
            offset: o,
            len: 4096,
        });
        s.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        let mut b = vec![0u8; 4096];
        s.read_exact(&mut b).unwrap();
        b
    };
    let t = Instant::now();
    let id = call(&d.0, "CreateEncryptedCopy", json!({"SourceDiskId": src}))["TaskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = wait_task(&d.0, &id);
    assert_eq!(done["TaskStatus"], "Finished", "{done}");
    let copied = done["Result"]["DiskId"].as_str().unwrap().to_owned();
    assert_eq!(done["Result"]["BytesCopied"], 3 * 4096, "{done}");
    let copy_secs = t.elapsed().as_secs_f64();
    call(&d.0, "AttachDisk", json!({"DiskId": copied, "InstanceId": iid}));
    for &o in &offsets {
        assert_eq!(read_at(&copied, o), block(o), "the copy at {o}");
    }
    let snap = call(&d.0, "CreateSnapshot", json!({"DiskId": src}))["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned();
    let image = call(&d.0, "CreateImage", json!({"SnapshotId": snap}))["ImageId"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = Instant::now();
    let ex = call(&d.0, "ExportImage", json!({"ImageId": image}));
    let done = wait_task(&d.0, ex["TaskId"].as_str().unwrap());
    assert_eq!(done["TaskStatus"], "Finished", "{done}");
    let path = PathBuf::from(done["Result"]["Path"].as_str().unwrap());
    let f = std::fs::File::open(&path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), tib);
    use std::os::unix::fs::FileExt;
    for &o in &offsets {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, o).unwrap();
        assert_eq!(b, block(o), "the export at {o}");
    }
    eprintln!(
        "1 TiB thin disk: CreateEncryptedCopy {copy_secs:.1} s, ExportImage {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&path);
}
