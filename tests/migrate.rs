//! `sealdisk migrate` / MigrateDisk against a real daemon: a holey raw image into a new
//! encrypted disk and back into a new unencrypted one, identical (`qemu-img compare`
//! through NBD, and `--verify`'s checksums) and thin (the pool allocates only the
//! clusters with data); a plaintext disk into an existing empty encrypted disk; an NBD
//! source served by `qemu-nbd` from a qcow2 image (unix socket and TCP); resume after a
//! SIGKILL of the daemon, of the CLI, and after Ctrl-C; abandon; and every refusal,
//! each leaving the catalog and the pool unchanged.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{Daemon, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 256 << 10;
const ACCOUNT: &str = "acct1";
const REGION: &str = "cn-hangzhou";

/// A test's directories: `data` (the daemon's) and `imp` (its import directory).
struct Env {
    dir: TempDir,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir = TempDir::new(&format!("migrate-{name}"));
        std::fs::create_dir_all(dir.0.join("imp")).unwrap();
        Env { dir }
    }
    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }
    fn imp(&self) -> PathBuf {
        self.dir.0.join("imp")
    }
    fn daemon(&self, env: &[(&str, &str)]) -> Daemon {
        let imp = self.imp();
        common::start_daemon(
            BIN,
            &self.data(),
            &[
                "--cores",
                "0",
                "--pool-size",
                "512M",
                "--no-qos",
                "--import-dir",
                imp.to_str().unwrap(),
            ],
            env,
        )
    }
}

/// CheckPool (a host method: no account).
fn check_pool(data: &Path) -> Value {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    c.call("CheckPool", json!({})).unwrap()
}

/// One RPC as acct1; the error as (code, message).
fn call(data: &Path, method: &str, mut params: Value) -> Result<Value, (String, String)> {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    params["AccountId"] = ACCOUNT.into();
    params["RegionId"] = REGION.into();
    c.call(method, params).map_err(|e| (e.code, e.message))
}

/// MigrateDisk and its task's end.
fn migrate(data: &Path, params: Value) -> Result<Value, (String, String)> {
    let r = call(data, "MigrateDisk", params)?;
    common::wait_task(r, |q| common::rpc(data, "DescribeTasks", q))
}

fn cli_cmd(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("migrate")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("SEALDISK_ACCOUNT", ACCOUNT)
        .env("SEALDISK_REGION", REGION);
    c
}

/// `sealdisk migrate ARGS --json`: its summary, or panics with its output.
fn cli_json(data: &Path, args: &[&str]) -> Value {
    let out = run_bounded(cli_cmd(data, args).arg("--json"));
    assert!(out.status.success(), "migrate {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Runs `c` to its end, killing it (and failing) after two minutes.
fn run_bounded(c: &mut Command) -> Output {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{c:?} did not finish in 120 s: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Catalog and pool as the RPCs show them (no request ids).
fn state(data: &Path) -> Value {
    let mut disks = common::rpc(data, "DescribeDisks", json!({}));
    disks.as_object_mut().unwrap().remove("RequestId");
    let mut pool = check_pool(data);
    pool.as_object_mut().unwrap().remove("RequestId");
    json!({ "disks": disks, "pool": pool })
}

fn clusters_in_use(data: &Path) -> u64 {
    check_pool(data)["Pool"]["clusters_in_use"].as_u64().unwrap()
}

fn assert_consistent(data: &Path, migrations: u64) {
    let c = check_pool(data);
    assert_eq!(c["Consistent"], true, "{c}");
    assert_eq!(c["Migrations"], migrations, "{c}");
}

/// The NBD URI of the attached disk `disk` on the admin socket.
fn nbd_uri(data: &Path, disk: &str) -> String {
    format!("nbd+unix:///{disk}?socket={}", data.join("nbd.sock").display())
}

/// Runs qemu-io's `cmds` on the raw image at `uri`: they all succeed and every pattern
/// read back matches.
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io (qemu-utils)");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("verification failed"),
        "qemu-io {cmds:?}: {}",
        text(&out)
    );
}

/// A new instance (with a 4 MiB system disk): its id.
fn new_instance(data: &Path) -> String {
    common::rpc(data, "CreateInstance", json!({"SystemDisk.SizeBytes": 4 << 20}))["InstanceId"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Attaches `disk` to a new instance; its NBD URI on the admin socket.
fn attach(data: &Path, disk: &str) -> String {
    let inst = new_instance(data);
    common::rpc(data, "AttachDisk", json!({"DiskId": disk, "InstanceId": inst}));
    nbd_uri(data, disk)
}

/// `qemu-img compare` of a raw file (or NBD URI) and an NBD URI: identical.
fn assert_identical(a: &str, b: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a, b])
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "qemu-img compare {a} {b}: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "{}",
        text(&out)
    );
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    common::random_bytes(n, seed)
}

/// A raw image at `path`, 24 MiB + 1000 bytes: random data at [0, 3 MiB), written zeros
/// at [3 MiB, 4 MiB) (allocated, but all zero), 4196 random bytes at 8 MiB, random data
/// at [16.5 MiB, 17 MiB), 700 random bytes at 24 MiB + 200 (across the last whole
/// 512-byte sector into the file's ragged tail), holes elsewhere. Returns (bytes of
/// non-zero 4 KiB blocks, clusters holding them).
fn holey_image(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(24 * MIB + 1000).unwrap();
    f.write_all_at(&random(3 * MIB as usize, 1), 0).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], 3 * MIB).unwrap();
    f.write_all_at(&random(4196, 2), 8 * MIB).unwrap();
    f.write_all_at(&random(512 << 10, 3), 16 * MIB + (512 << 10)).unwrap();
    f.write_all_at(&random(700, 4), 24 * MIB + 200).unwrap();
    f.sync_all().unwrap();
    (3 * MIB + 8192 + (512 << 10) + 4096, 12 + 1 + 2 + 1)
}

#[test]
fn a_holey_image_into_an_encrypted_disk_and_back_is_identical_and_thin() {
    let env = Env::new("both-ways");
    let data = env.data();
    let _d = env.daemon(&[]);
    common::rpc(&data, "ActivateKms", json!({}));
    let src = env.imp().join("vm.raw");
    let (nonzero, clusters) = holey_image(&src);
    let before = clusters_in_use(&data);
    let job_bytes = || -> u64 {
        sealdisk::Client::connect(&data.join("sealdisk.sock"))
            .unwrap()
            .call("DescribeReactors", json!({}))
            .unwrap()["Reactors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["IosBySource"]["Job"]["Bytes"].as_u64().unwrap())
            .sum()
    };

    // Into a new encrypted disk (relative path: beneath the import directory).
    let r = cli_json(&data, &["vm.raw", "--verify"]);
    assert_eq!(r["Encrypted"], true, "{r}");
    assert_eq!(r["NewDisk"], true, "{r}");
    assert_eq!(r["Verify"], "passed", "{r}");
    assert_eq!(r["SizeBytes"], 24 * MIB + 4096, "{r}");
    assert_eq!(r["BytesWritten"], nonzero, "{r}");
    assert_eq!(r["BytesSkipped"], 24 * MIB + 4096 - nonzero, "{r}");
    // SEEK_DATA/SEEK_HOLE: the holes were never read.
    assert!(r["BytesRead"].as_u64().unwrap() <= 6 * MIB, "{r}");
    assert!(r["Seconds"].as_f64().unwrap() > 0.0, "{r}");
    // Thin: only the clusters with non-zero data are allocated in the pool.
    assert_eq!(r["TargetAllocatedBytes"], clusters * CLUSTER, "{r}");
    assert_eq!(clusters_in_use(&data), before + clusters);
    let enc = r["DiskId"].as_str().unwrap().to_owned();
    let d = &common::rpc(&data, "DescribeDisks", json!({"DiskIds": [enc]}))["Disks"]["Disk"][0];
    assert_eq!(d["Encrypted"], true, "{d}");
    assert_consistent(&data, 0);

    // Back into a new unencrypted disk, decrypted through the source's key (audited).
    let r2 = cli_json(&data, &[&enc, "--verify"]);
    assert_eq!(r2["Encrypted"], false, "{r2}");
    assert_eq!(r2["NewDisk"], true, "{r2}");
    assert_eq!(r2["Verify"], "passed", "{r2}");
    assert_eq!(r2["BytesWritten"], nonzero, "{r2}");
    assert_eq!(r2["TargetAllocatedBytes"], clusters * CLUSTER, "{r2}");
    let plain = r2["DiskId"].as_str().unwrap().to_owned();
    let audit = std::fs::read_to_string(data.join("kms/audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"DecryptData\"") && l.contains(&format!("\"disk_id\":\"{enc}\""))),
        "no DecryptData audit record for {enc}"
    );
    assert_eq!(clusters_in_use(&data), before + 2 * clusters);
    assert_consistent(&data, 0);

    // Both read back as the image through NBD.
    let src_s = src.to_str().unwrap();
    assert_identical(src_s, &attach(&data, &enc));
    assert_identical(src_s, &attach(&data, &plain));

    // The human output of another run names the result.
    let jobs_before = job_bytes();
    let out = cli_cmd(&data, &["vm.raw"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The reactors (io_uring) read the file, all but the last block (counted whole in
    // BytesRead, 1000 bytes in the file, the ring's 512 of them and pread's 488), as
    // they wrote the disk.
    let read = r["BytesRead"].as_u64().unwrap();
    let jobs = job_bytes() - jobs_before;
    assert!(
        jobs >= read - 4096 + nonzero,
        "reactor job bytes {jobs} for {read} read and {nonzero} written"
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("encrypted") && s.contains("verify: off"), "{s}");
}

#[test]
fn a_live_plaintext_disk_into_an_existing_empty_encrypted_disk() {
    let env = Env::new("existing");
    let data = env.data();
    let _d = env.daemon(&[]);
    let (_inst, plain, _) = common::instance_with_disk(&data, 16 * MIB, false);
    let src_uri = nbd_uri(&data, &plain);
    qemu_io(&src_uri, &["write -P 0x5a 1M 1M", "write -P 0x17 9M 12k"]);
    let target = common::rpc(&data, "CreateDisk", json!({"SizeBytes": 32 * MIB, "Encrypted": true}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = migrate(
        &data,
        json!({"SourceDiskId": plain, "TargetDiskId": target, "Verify": true}),
    )
    .unwrap();
    assert_eq!(r["DiskId"], target.as_str(), "{r}");
    assert_eq!(r["NewDisk"], false, "{r}");
    assert_eq!(r["Encrypted"], true, "{r}");
    assert_eq!(r["Verify"], "passed", "{r}");
    assert_eq!(r["BytesWritten"], MIB + (12 << 10), "{r}");
    // The source disk's allocated clusters only were read.
    assert!(r["BytesRead"].as_u64().unwrap() <= 2 * MIB, "{r}");
    assert_eq!(r["TargetAllocatedBytes"], 5 * CLUSTER, "{r}");
    // The target has the source's bytes, and zeros past the source's end.
    let t_uri = attach(&data, &target);
    qemu_io(
        &t_uri,
        &["read -P 0x5a 1M 1M", "read -P 0x17 9M 12k", "read -P 0 16M 16M"],
    );
    // Now it holds data: a second migration into it is refused.
    let (code, msg) = migrate(&data, json!({"SourceDiskId": plain, "TargetDiskId": target})).unwrap_err();
    assert!(
        code == "InvalidOperation.TargetNotEmpty" || code == "IncorrectDiskStatus",
        "{code}: {msg}"
    );
    assert_consistent(&data, 0);
}

#[test]
fn every_refusal_has_its_code_and_changes_nothing() {
    let env = Env::new("refusals");
    let data = env.data();
    let _d = env.daemon(&[]);
    common::rpc(&data, "ActivateKms", json!({}));
    holey_image(&env.imp().join("vm.raw"));
    let mk = |size: u64, enc: bool| {
        common::rpc(&data, "CreateDisk", json!({"SizeBytes": size, "Encrypted": enc}))["DiskId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let small_enc = mk(8 * MIB, true);
    let big_plain = mk(64 * MIB, false);
    let big_plain2 = mk(64 * MIB, false);
    let full_enc = mk(64 * MIB, true);
    let attached_enc = mk(64 * MIB, true);
    // Data in `full_enc` (attach, write, detach).
    let inst = new_instance(&data);
    common::rpc(&data, "AttachDisk", json!({"DiskId": full_enc, "InstanceId": inst}));
    qemu_io(&nbd_uri(&data, &full_enc), &["write -P 1 0 4k"]);
    common::rpc(&data, "DetachDisk", json!({"DiskId": full_enc, "InstanceId": inst}));
    common::rpc(&data, "AttachDisk", json!({"DiskId": attached_enc, "InstanceId": inst}));
    // A socket file no one listens on, beneath the import directory.
    let dead = env.imp().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    // A TCP port no one listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let outside_file = tempfile::Builder::new()
        .prefix("sealdisk-migrate-outside-")
        .suffix(".raw")
        .tempfile()
        .unwrap();
    let outside = outside_file.path();
    std::fs::write(outside, vec![7u8; 8192]).unwrap();

    let before = state(&data);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": small_enc}),
            "InvalidOperation.TargetTooSmall",
        ),
        (
            json!({"SourcePath": "vm.raw", "SizeBytes": 8 * MIB}),
            "InvalidParameter.Size",
        ),
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": full_enc}),
            "InvalidOperation.TargetNotEmpty",
        ),
        (
            json!({"SourceDiskId": big_plain, "TargetDiskId": big_plain}),
            "InvalidOperation.SourceIsTarget",
        ),
        (
            json!({"SourceDiskId": full_enc, "TargetDiskId": full_enc}),
            "InvalidOperation.SourceIsTarget",
        ),
        (
            json!({"SourceDiskId": big_plain, "TargetDiskId": big_plain2}),
            "InvalidOperation.UnencryptedTarget",
        ),
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": big_plain}),
            "InvalidOperation.UnencryptedTarget",
        ),
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": attached_enc}),
            "IncorrectDiskStatus",
        ),
        (
            json!({"SourcePath": outside.to_str().unwrap()}),
            "InvalidParameter.SourcePath",
        ),
        (
            json!({"SourcePath": "../../../etc/passwd"}),
            "InvalidParameter.SourcePath",
        ),
        (json!({"SourcePath": "missing.raw"}), "InvalidParameter.SourcePath"),
        (
            json!({"SourceNbdUri": format!("nbd+unix:///x?socket={}", dead.display())}),
            "InvalidOperation.SourceUnavailable",
        ),
        (
            json!({"SourceNbdUri": format!("nbd+unix:///x?socket={}", env.imp().join("none.sock").display())}),
            "InvalidOperation.SourceUnavailable",
        ),
        (
            json!({"SourceNbdUri": format!("nbd://127.0.0.1:{port}/x")}),
            "InvalidOperation.SourceUnavailable",
        ),
        (
            json!({"SourceNbdUri": format!("nbd+unix:///d?socket={}", data.join("nbd.sock").display())}),
            "InvalidParameter.SourceNbdUri",
        ),
        (json!({"SourceNbdUri": "nbds://h/x"}), "InvalidParameter.SourceNbdUri"),
        (json!({"SourceDiskId": "d-0000000000000000"}), "InvalidDiskId.NotFound"),
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": "d-0000000000000000"}),
            "InvalidDiskId.NotFound",
        ),
        (json!({}), "MissingParameter.Source"),
        (
            json!({"SourcePath": "vm.raw", "SourceDiskId": big_plain}),
            "InvalidParameter.Source",
        ),
        (
            json!({"SourcePath": "vm.raw", "DiskCategory": "local_ssd_pro"}),
            "InvalidOperation.LocalDiskTarget",
        ),
        (
            json!({"SourcePath": "vm.raw", "TargetDiskId": attached_enc, "SizeBytes": 64 * MIB}),
            "InvalidParameter.TargetDiskId",
        ),
        (
            json!({"SourcePath": "vm.raw", "Abandon": true}),
            "InvalidMigration.NotFound",
        ),
        (
            json!({"SourcePath": "vm.raw", "Bogus": 1}),
            "InvalidParameter.Unrecognized",
        ),
    ];
    for (params, code) in cases {
        let (got, msg) = call(&data, "MigrateDisk", params.clone())
            .map(|v| panic!("{params} was accepted: {v}"))
            .unwrap_err();
        assert_eq!(got, code, "{params}: {msg}");
        assert!(!msg.is_empty());
        assert_eq!(state(&data), before, "{params} changed something");
    }
    // A local kind: what it is and what to do instead.
    let (_, msg) = call(
        &data,
        "MigrateDisk",
        json!({"SourcePath": "vm.raw", "DiskCategory": "local_ssd_pro"}),
    )
    .unwrap_err();
    assert_eq!(
        msg, "local_ssd_pro is a local disk; migrate into a cloud disk (basic, ultra, ssd)",
        "{msg}"
    );
    let tasks = common::rpc(&data, "DescribeTasks", json!({}));
    assert_eq!(tasks["TotalCount"], 0, "{tasks}");
    assert_consistent(&data, 0);

    // The CLI: a refusal exits 1 with the code; a bad --size exits 2.
    let out = cli_cmd(&data, &["vm.raw", "--to", &small_enc]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidOperation.TargetTooSmall"));
    let out = cli_cmd(&data, &["vm.raw", "--size", "12Q"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(state(&data), before);
}

/// `qemu-nbd` serving a file read-only, killed on drop.
struct QemuNbd(Child);
impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_nbd_source_served_by_qemu_nbd_from_qcow2() {
    let env = Env::new("nbd");
    let data = env.data();
    let _d = env.daemon(&[]);
    common::rpc(&data, "ActivateKms", json!({}));
    let raw = env.dir.0.join("vm.raw"); // outside the import directory: only qemu-nbd reads it
    let (nonzero, clusters) = holey_image(&raw);
    let qcow = env.dir.0.join("vm.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "{}", text(&out));
    let sock = env.imp().join("qnbd.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let serve = |args: &[&str]| {
        QemuNbd(
            Command::new("qemu-nbd")
                .args(["-r", "-t", "-f", "qcow2", "-x", "vm"])
                .args(args)
                .arg(&qcow)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-nbd (qemu-utils)"),
        )
    };
    // Several clients on the unix socket (the migration reads over two connections); one
    // on TCP (the second connection is not greeted: one stream).
    let _q1 = serve(&["--shared=4", "-k", sock.to_str().unwrap()]);
    let _q2 = serve(&["-b", "127.0.0.1", "-p", &port.to_string()]);
    let t = Instant::now();
    while !(sock.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        assert!(t.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let raw_s = raw.to_str().unwrap();
    for uri in [
        format!("nbd+unix:///vm?socket={}", sock.display()),
        format!("nbd://127.0.0.1:{port}/vm"),
    ] {
        let r = cli_json(&data, &[&uri, "--verify"]);
        assert_eq!(r["SourceKind"], "nbd", "{r}");
        assert_eq!(r["Encrypted"], true, "{r}");
        assert_eq!(r["Verify"], "passed", "{r}");
        assert_eq!(r["BytesWritten"], nonzero, "{uri}: {r}");
        // base:allocation: the qcow2's unallocated clusters were never read.
        assert!(r["BytesRead"].as_u64().unwrap() < 8 * MIB, "{uri}: {r}");
        assert_eq!(r["TargetAllocatedBytes"], clusters * CLUSTER, "{uri}: {r}");
        assert_identical(raw_s, &attach(&data, r["DiskId"].as_str().unwrap()));
    }
    assert_consistent(&data, 0);
}

/// Size of [`dense_image`].
const DENSE: u64 = 128 * MIB;

/// An image of random data (every block non-zero) in the import directory.
fn dense_image(env: &Env, name: &str) -> PathBuf {
    use std::io::Read;
    let p = env.imp().join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    let n = std::io::copy(&mut std::fs::File::open("/dev/urandom").unwrap().take(DENSE), &mut f).unwrap();
    assert_eq!(n, DENSE);
    p
}

/// Waits until the one MigrateDisk task has done at least `bytes` and `secs` passed;
/// fails if it ends first.
fn wait_progress(data: &Path, bytes: u64, since: Instant, secs: f64) -> Value {
    loop {
        let t = common::rpc(data, "DescribeTasks", json!({"TaskAction": "MigrateDisk"}));
        let all = t["TaskSet"]["Task"].as_array().unwrap();
        if let Some(task) = all.iter().find(|x| x["TaskStatus"] == "Processing") {
            if task["BytesDone"].as_u64().unwrap_or(0) >= bytes && since.elapsed().as_secs_f64() >= secs {
                return task.clone();
            }
        } else if !all.is_empty()
            && all.iter().all(|x| x["TaskStatus"] != "Processing")
            && since.elapsed() > Duration::from_secs(5)
        {
            panic!("the migration ended before the test could interrupt it: {t}");
        }
        assert!(since.elapsed() < Duration::from_secs(60), "no progress: {t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Slow commits (every batch of new clusters waits; a batch carries up to 16 MiB), so a
/// 128 MiB copy takes seconds.
const SLOW: &[(&str, &str)] = &[("SEALDISK_FAULTS", "commit:delay=500ms")];

#[test]
fn resume_after_a_sigkill_of_the_daemon_gives_identical_data() {
    let env = Env::new("kill-daemon");
    let data = env.data();
    let src = dense_image(&env, "dense.raw");
    let mut d = env.daemon(SLOW);
    common::rpc(&data, "ActivateKms", json!({}));
    let start = Instant::now();
    let r = call(&data, "MigrateDisk", json!({"SourcePath": "dense.raw"})).unwrap();
    let disk = r["DiskId"].as_str().unwrap().to_owned();
    // Past a checkpoint (one a second: the same call again follows the running task and
    // shows it), not finished.
    wait_progress(&data, 8 * MIB, start, 0.0);
    let cp = loop {
        let f = call(&data, "MigrateDisk", json!({"SourcePath": "dense.raw"})).unwrap();
        assert_eq!(f["Running"], true, "finished before a checkpoint was seen: {f}");
        assert_eq!(f["DiskId"], disk.as_str(), "{f}");
        if f["CheckpointBytes"].as_u64().unwrap() > 0 {
            break f["CheckpointBytes"].as_u64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    };
    // Still running (BytesDone counts what was read, which may run ahead of the writes
    // the slow commits hold back): the resume below shows the kill came before the end.
    let task = wait_progress(&data, 0, start, 0.0);
    assert_eq!(task["TaskStatus"], "Processing", "finished too soon: {task}");
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    drop(d);

    let _d = env.daemon(&[]);
    // The interrupted migration survived the restart, and nothing is inconsistent.
    assert_consistent(&data, 1);
    let disks = common::rpc(&data, "DescribeDisks", json!({}));
    assert_eq!(disks["TotalCount"], 0, "a half-made disk is visible: {disks}");
    let r = cli_json(&data, &["dense.raw", "--verify"]);
    assert_eq!(r["DiskId"], disk.as_str(), "{r}");
    assert_eq!(r["Resumed"], true, "{r}");
    let from = r["ResumedFrom"].as_u64().unwrap();
    assert!(from >= cp && from < DENSE, "resumed from {from}, checkpoint {cp}: {r}");
    assert_eq!(r["Verify"], "passed", "{r}");
    // The same result as an uninterrupted run.
    assert_eq!(r["BytesWritten"], DENSE, "{r}");
    assert_eq!(r["BytesRead"], DENSE, "{r}");
    assert_eq!(r["TargetAllocatedBytes"], DENSE, "{r}");
    assert_consistent(&data, 0);
    assert_identical(src.to_str().unwrap(), &attach(&data, &disk));
}

#[test]
fn resume_after_the_cli_is_killed_or_interrupted_and_abandon() {
    let env = Env::new("kill-cli");
    let data = env.data();
    let src = dense_image(&env, "dense.raw");
    let _d = env.daemon(SLOW);
    common::rpc(&data, "ActivateKms", json!({}));
    let empty = state(&data);

    // SIGKILL of the CLI: the task goes on; the same command follows it to its end.
    let start = Instant::now();
    let mut c = cli_cmd(&data, &["dense.raw"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_progress(&data, 8 * MIB, start, 0.0);
    c.kill().unwrap();
    c.wait().unwrap();
    let r = cli_json(&data, &["dense.raw"]);
    assert_eq!(r["BytesWritten"], DENSE, "{r}");
    let first = r["DiskId"].as_str().unwrap().to_owned();
    assert_identical(src.to_str().unwrap(), &attach(&data, &first));
    assert_consistent(&data, 0);
    let after_first = clusters_in_use(&data);

    // Ctrl-C: the migration stops at a checkpoint; --abandon removes what it made.
    let ctrl_c = |data: &Path| {
        let start = Instant::now();
        let c = cli_cmd(data, &["dense.raw", "--category", "ultra"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_progress(data, 8 * MIB, start, 0.0);
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("resume"),
            "{}",
            text(&out)
        );
        let t = common::rpc(
            data,
            "DescribeTasks",
            json!({"TaskAction": "MigrateDisk", "TaskStatus": "Cancelled"}),
        );
        assert!(t["TotalCount"].as_u64().unwrap() >= 1, "{t}");
        assert_consistent(data, 1);
    };
    ctrl_c(&data);
    let r = cli_json(&data, &["dense.raw", "--abandon"]);
    assert_eq!(r["Abandoned"], true, "{r}");
    assert_consistent(&data, 0);
    assert_eq!(clusters_in_use(&data), after_first);
    let audit = std::fs::read_to_string(data.join("kms/audit.log")).unwrap();
    assert!(audit.contains(&format!(
        "\"CryptoShred\",\"disk_id\":\"{}\"",
        r["DiskId"].as_str().unwrap()
    )));

    // Ctrl-C again; the same command resumes from the checkpoint.
    ctrl_c(&data);
    let r = cli_json(&data, &["dense.raw", "--category", "ultra", "--verify"]);
    assert_eq!(r["Resumed"], true, "{r}");
    assert!(r["ResumedFrom"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["Verify"], "passed", "{r}");
    assert_eq!(r["BytesWritten"], DENSE, "{r}");
    let d = &common::rpc(&data, "DescribeDisks", json!({"DiskIds": [r["DiskId"]]}))["Disks"]["Disk"][0];
    assert_eq!(d["Category"], "ultra", "{d}");
    assert_identical(src.to_str().unwrap(), &attach(&data, r["DiskId"].as_str().unwrap()));
    assert_consistent(&data, 0);
    drop(empty);
}

#[test]
fn an_interrupted_decryption_keeps_the_source_key_until_it_finishes() {
    let env = Env::new("decrypt-resume");
    let data = env.data();
    let _d = env.daemon(SLOW);
    let (inst, enc, _) = common::instance_with_disk(&data, 48 * MIB, true);
    let uri = nbd_uri(&data, &enc);
    qemu_io(&uri, &["write -P 0x3c 0 48M"]);
    // From the attached disk (a point-in-time clone) into a new unencrypted disk; stopped.
    let start = Instant::now();
    let r = call(&data, "MigrateDisk", json!({"SourceDiskId": enc})).unwrap();
    let target = r["DiskId"].as_str().unwrap().to_owned();
    assert_eq!(r["Encrypted"], false, "{r}");
    let task = wait_progress(&data, 8 * MIB, start, 0.0);
    common::rpc(&data, "CancelTask", json!({"TaskId": task["TaskId"]}));
    let t = Instant::now();
    while common::rpc(&data, "DescribeTasks", json!({"TaskIds": [task["TaskId"]]}))["TaskSet"]["Task"][0]["TaskStatus"]
        == "Processing"
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_consistent(&data, 1);
    // The VM overwrites its disk, then the disk is deleted: the migration still holds the
    // clone and the key (no shred yet; the catalog's key reference counts agree).
    qemu_io(&uri, &["write -P 0x77 0 1M"]);
    common::rpc(&data, "DetachDisk", json!({"DiskId": enc, "InstanceId": inst}));
    common::rpc(&data, "DeleteDisk", json!({"DiskId": enc}));
    let shreds = |data: &Path| {
        std::fs::read_to_string(data.join("kms/audit.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"CryptoShred\""))
            .count()
    };
    assert_eq!(shreds(&data), 0);
    assert_consistent(&data, 1);
    // Resumed: the data as it was when the migration began; then the key is shredded.
    let r = migrate(&data, json!({"SourceDiskId": enc, "Verify": true})).unwrap();
    assert_eq!(r["DiskId"], target.as_str(), "{r}");
    assert_eq!(r["Resumed"], true, "{r}");
    assert_eq!(r["Verify"], "passed", "{r}");
    assert_eq!(r["BytesWritten"], 48 * MIB, "{r}");
    assert_eq!(shreds(&data), 1);
    assert_consistent(&data, 0);
    qemu_io(&attach(&data, &target), &["read -P 0x3c 0 48M"]);
}

#[test]
fn an_interrupted_migration_into_an_existing_disk_blocks_attach_and_abandon_empties_it() {
    let env = Env::new("abandon-existing");
    let data = env.data();
    dense_image(&env, "dense.raw");
    let _d = env.daemon(SLOW);
    common::rpc(&data, "ActivateKms", json!({}));
    let target = common::rpc(&data, "CreateDisk", json!({"SizeBytes": DENSE, "Encrypted": true}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let inst = new_instance(&data);
    let before = clusters_in_use(&data);
    let start = Instant::now();
    let r = call(
        &data,
        "MigrateDisk",
        json!({"SourcePath": "dense.raw", "TargetDiskId": target}),
    )
    .unwrap();
    assert_eq!(r["NewDisk"], false, "{r}");
    let task = wait_progress(&data, 8 * MIB, start, 0.0);
    // Running: the target cannot be attached, and abandoning waits for a cancel.
    let (code, _) = call(&data, "AttachDisk", json!({"DiskId": target, "InstanceId": inst})).unwrap_err();
    assert_eq!(code, "IncorrectDiskStatus.Migrating");
    let (code, _) = call(
        &data,
        "MigrateDisk",
        json!({"SourcePath": "dense.raw", "TargetDiskId": target, "Abandon": true}),
    )
    .unwrap_err();
    assert_eq!(code, "IncorrectTaskStatus");
    common::rpc(&data, "CancelTask", json!({"TaskId": task["TaskId"]}));
    let t = Instant::now();
    while common::rpc(&data, "DescribeTasks", json!({"TaskIds": [task["TaskId"]]}))["TaskSet"]["Task"][0]["TaskStatus"]
        == "Processing"
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Interrupted: still not attachable, nor deleted, reset or re-initialised under the
    // migration (each refused, nothing changed); the target holds part of the data.
    let (code, _) = call(&data, "AttachDisk", json!({"DiskId": target, "InstanceId": inst})).unwrap_err();
    assert_eq!(code, "IncorrectDiskStatus.Migrating");
    let before_refusals = state(&data);
    let snap = common::rpc(&data, "CreateSnapshot", json!({"DiskId": target}))["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_snap = state(&data);
    for (method, params) in [
        ("DeleteDisk", json!({"DiskId": target})),
        ("ReInitDisk", json!({"DiskId": target})),
        ("ResetDisk", json!({"DiskId": target, "SnapshotId": snap})),
    ] {
        let (code, msg) = call(&data, method, params).unwrap_err();
        assert_eq!(code, "IncorrectDiskStatus.Migrating", "{method}: {msg}");
        assert_eq!(state(&data), with_snap, "{method} changed something");
    }
    common::rpc(&data, "DeleteSnapshot", json!({"SnapshotId": snap}));
    assert_eq!(state(&data), before_refusals);
    assert!(clusters_in_use(&data) > before);
    assert_consistent(&data, 1);
    // Abandoned: the target is empty again and attachable; nothing else is left.
    let r = migrate(
        &data,
        json!({"SourcePath": "dense.raw", "TargetDiskId": target, "Abandon": true}),
    )
    .unwrap();
    assert_eq!(r["Abandoned"], true, "{r}");
    assert_eq!(clusters_in_use(&data), before);
    assert_consistent(&data, 0);
    common::rpc(&data, "AttachDisk", json!({"DiskId": target, "InstanceId": inst}));
    qemu_io(&nbd_uri(&data, &target), &["read -P 0 0 16M"]);
}
