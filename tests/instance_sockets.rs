//! Only its own VM reaches a disk: each instance's NBD socket,
//! `DATA_DIR/instances/<InstanceId>/nbd.sock`, lists and opens exactly the disks attached
//! to that instance; other names are refused; DetachDisk ends that instance's open
//! connections to the disk within a second and later opens are refused; the socket is
//! mode 0660 with the `--vmm-group` group; the administrator's `DATA_DIR/nbd.sock` stays
//! 0600 and serves every attached disk.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{rpc, start_daemon, Daemon, TempDir};
use sealdisk::testing::nbd::*;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const MIB: u64 = 1 << 20;

fn start(data: &Path, extra: &[&str]) -> Daemon {
    let args = [&["--cores", "0", "--pool-size", "64M", "--no-qos"][..], extra].concat();
    start_daemon(BIN, data, &args, &[])
}

/// NBD_OPT_LIST on `sock`: the export names.
fn list(sock: &Path) -> Vec<String> {
    let mut s = common::nbd_hello(sock);
    common::nbd_option(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        match common::nbd_reply(&mut s) {
            (REP_SERVER, d) => names.push(String::from_utf8(d[4..].to_vec()).unwrap()),
            (REP_ACK, _) => break,
            (t, _) => panic!("LIST reply {t:#x}"),
        }
    }
    names.sort();
    names
}

/// One 4 KiB read; false if the connection failed or the read was refused.
fn read_ok(s: &mut UnixStream) -> bool {
    let r = encode_request(&Request {
        flags: 0,
        cmd: CMD_READ,
        cookie: 9,
        offset: 0,
        len: 4096,
    });
    if s.write_all(&r).is_err() {
        return false;
    }
    let mut h = [0u8; 16];
    if s.read_exact(&mut h).is_err() || u32::from_be_bytes(h[4..8].try_into().unwrap()) != 0 {
        return false;
    }
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).is_ok()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn each_instance_socket_serves_exactly_its_own_disks() {
    let dir = TempDir::new("inst");
    let data = dir.0.join("data");
    let _dm = start(&data, &["--vmm-group", "daemon"]);
    // SAFETY: getgrnam(3) with a NUL-terminated literal; read at once.
    let vmm_gid = unsafe { (*libc::getgrnam(c"daemon".as_ptr())).gr_gid };
    let mk = |data: &Path| {
        let v = rpc(
            data,
            "CreateInstance",
            json!({"SystemDisk.SizeBytes": 4 * MIB, "DataDisk.1.SizeBytes": 4 * MIB}),
        );
        let sock = PathBuf::from(v["Socket"].as_str().unwrap());
        let disks = vec![
            v["SystemDiskId"].as_str().unwrap().to_owned(),
            v["DataDiskIds"][0].as_str().unwrap().to_owned(),
        ];
        (v["InstanceId"].as_str().unwrap().to_owned(), sock, disks)
    };
    let (i1, s1, d1) = mk(&data);
    let (_i2, s2, d2) = mk(&data);
    assert_eq!(s1, data.join("instances").join(&i1).join("nbd.sock"));
    // Mode and group.
    let m = std::fs::metadata(&s1).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), vmm_gid);
    let admin = data.join("nbd.sock");
    assert_eq!(std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777, 0o600);
    // LIST: its own disks only; the admin socket lists all.
    assert_eq!(list(&s1), sorted(d1.clone()));
    assert_eq!(list(&s2), sorted(d2.clone()));
    assert_eq!(list(&admin), sorted([d1.clone(), d2.clone()].concat()));
    // Another instance's disk, a detached disk, an unknown name: refused.
    let loose = rpc(&data, "CreateDisk", json!({"SizeBytes": 4 * MIB}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in [d2[1].as_str(), loose.as_str(), "d-nosuch"] {
        let e = common::nbd_go(&s1, name)
            .err()
            .unwrap_or_else(|| panic!("{name} opened on another instance's socket"));
        assert!(e == REP_ERR_UNKNOWN || e == REP_ERR_POLICY, "{name}: {e:#x}");
    }
    // Its own disk: served.
    let mut c = common::nbd_go(&s1, &d1[1]).unwrap();
    assert!(read_ok(&mut c));
    // Attach the loose disk to instance 1: it appears there (and only there); AttachDisk
    // names the socket.
    let v = rpc(&data, "AttachDisk", json!({"DiskId": loose, "InstanceId": i1}));
    assert_eq!(v["Socket"], s1.display().to_string());
    assert!(list(&s1).contains(&loose));
    assert!(!list(&s2).contains(&loose));
    // Detach instance 1's data disk: the open connection's next request fails within a
    // second, and later opens are refused.
    rpc(&data, "DetachDisk", json!({"DiskId": d1[1], "InstanceId": i1}));
    let t = Instant::now();
    while read_ok(&mut c) {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a detached disk's connection still serves"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(common::nbd_go(&s1, &d1[1]).is_err(), "a detached disk opened");
    // The other instance is unaffected.
    let mut c2 = common::nbd_go(&s2, &d2[1]).unwrap();
    assert!(read_ok(&mut c2));
    // Deleting an instance removes its socket.
    rpc(&data, "DeleteInstance", json!({"InstanceId": i1}));
    let t = Instant::now();
    while s1.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a deleted instance's socket stays"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(read_ok(&mut c2));
}

#[test]
fn instance_sockets_come_back_after_a_restart() {
    let dir = TempDir::new("inst-rs");
    let data = dir.0.join("data");
    let dm = start(&data, &[]);
    let v = rpc(
        &data,
        "CreateInstance",
        json!({"SystemDisk.SizeBytes": 4 * MIB, "DataDisk.1.SizeBytes": 4 * MIB}),
    );
    let sock = PathBuf::from(v["Socket"].as_str().unwrap());
    let disk = v["DataDiskIds"][0].as_str().unwrap().to_owned();
    drop(dm);
    let _dm = start(&data, &[]);
    assert!(
        list(&sock).contains(&disk),
        "after a restart the instance's socket serves its disks"
    );
    assert_eq!(std::fs::metadata(&sock).unwrap().gid(), 0);
    let mut c = common::nbd_go(&sock, &disk).unwrap();
    assert!(read_ok(&mut c));
}

#[test]
fn the_control_socket_opens_to_a_group_only_when_asked() {
    let dir = TempDir::new("inst-rpc");
    let data = dir.0.join("data");
    {
        let _dm = start(&data, &[]);
        let m = std::fs::metadata(data.join("sealdisk.sock")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    }
    {
        let _dm = start(&data, &["--rpc-group", "daemon"]);
        let m = std::fs::metadata(data.join("sealdisk.sock")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), 1);
        let d = std::fs::metadata(&data).unwrap();
        assert_eq!((d.permissions().mode() & 0o777, d.gid()), (0o710, 1));
    }
    for bad in [
        &["--rpc-group", "no-such-group-here"][..],
        &["--vmm-group", "no-such-group-here"][..],
        &["--vmm-group", "daemon", "--rpc-group", "root"][..],
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("group"), "{bad:?}: {err}");
    }
}
