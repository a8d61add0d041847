//! The `sealdisk serve` daemon as a process: first run on an empty data directory, JSON-RPC
//! errors over the socket, SIGTERM shutdown, restart restoring attachments (and their
//! data), `sealdisk check` clean and then failing on a corrupted catalog, and no key bytes
//! in any file or log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{run_ios, Op, TempDir};
use sealdisk::testing::catalog;
use sealdisk::Client;
use sealdisk::Control;
use sealdisk::Pool;
use sealdisk::{CallOpts, KeyContext, Kms, KmsConfig};

const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const MIB: u64 = 1 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");

/// A daemon and the log its stderr goes to.
struct Daemon {
    child: common::Daemon,
    log: PathBuf,
}

fn start(dir: &Path, log: PathBuf) -> Daemon {
    start_with(dir, log, "64M")
}

fn start_with(dir: &Path, log: PathBuf, pool_size: &str) -> Daemon {
    start_args(dir, log, pool_size, &[])
}

fn start_args(dir: &Path, log: PathBuf, pool_size: &str, extra: &[&std::ffi::OsStr]) -> Daemon {
    let child = common::start_daemon_with(BIN, dir, &["--cores", "0", "--pool-size", pool_size], &log, |c| {
        c.args(extra);
    });
    Daemon { child, log }
}

fn stop(mut d: Daemon) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d.child.0.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = d.child.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(&d.log).unwrap();
            assert!(st.success(), "daemon exit {st:?}: {log}");
            return log;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's parts in this process (the daemon must not be running).
fn open_in_process(dir: &Path, reactors: &Arc<sealdisk::Reactors>) -> Arc<Control> {
    common::control_in(dir, Kms::open(KmsConfig::local(dir)).unwrap(), 64 * MIB, reactors, None)
}

fn raw(c: &mut Client, line: &str) -> Value {
    serde_json::from_str(&c.raw(line).unwrap()).unwrap()
}

fn disks(c: &mut Client) -> Vec<Value> {
    c.call("DescribeDisks", json!({"AccountId": A})).unwrap()["Disks"]["Disk"]
        .as_array()
        .unwrap()
        .clone()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let mut i = 0;
    while i < hay.len() {
        let end = (i + 4096).min(hay.len());
        if hay[i..end].iter().any(|&b| b != 0) {
            let we = (end + needle.len()).min(hay.len());
            if hay[i..we].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        i = end;
    }
    false
}

#[test]
fn serve_restart_restores_attachments_and_check() {
    let dir = TempDir::new("data");
    let logs = TempDir::new("logs");
    let d = &dir.0;

    // First run: nothing but a data directory path.
    let dm = start(d, logs.0.join("1.log"));
    let sock = d.join("sealdisk.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let mut c = Client::connect(&sock).unwrap();
    c.call("ActivateKms", json!({"RegionId": R, "AccountId": A})).unwrap();
    let inst = c
        .call(
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB,
                   "DataDisk.1.SizeBytes": 4 * MIB, "DataDisk.1.Encrypted": "true",
                   "DataDisk.2.SizeBytes": 4 * MIB}),
        )
        .unwrap();
    let data: Vec<String> = inst["DataDiskIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    let (enc, plain) = (data[0].clone(), data[1].clone());
    let iid = inst["InstanceId"].as_str().unwrap().to_owned();

    // JSON-RPC errors.
    let v = raw(&mut c, "{not json");
    assert_eq!(
        (v["error"]["code"].clone(), v["error"]["data"]["code"].clone()),
        (json!(-32700), json!("Rpc.ParseError"))
    );
    let v = raw(&mut c, r#"{"jsonrpc":"2.0","id":7,"method":"NoSuch","params":{}}"#);
    assert_eq!(v["error"]["code"], -32601);
    assert_eq!(v["id"], 7);
    let v = raw(
        &mut c,
        r#"{"jsonrpc":"2.0","id":8,"method":"CreateDisk","params":[1,2]}"#,
    );
    assert_eq!(v["error"]["code"], -32602);
    let v = raw(
        &mut c,
        r#"{"jsonrpc":"2.0","id":9,"method":"CreateDisk","params":{"RegionId":"cn-hangzhou","AccountId":"acct1","Size":[]}}"#,
    );
    assert_eq!(
        (v["error"]["code"].clone(), v["error"]["data"]["code"].clone()),
        (json!(-32602), json!("InvalidParameter.Size"))
    );
    let v = raw(&mut c, r#"{"id":1,"method":"DescribeDisks"}"#);
    assert_eq!(v["error"]["code"], -32600);
    let v = raw(
        &mut c,
        r#"[{"jsonrpc":"2.0","id":1,"method":"DescribeKmsUsage","params":{"AccountId":"acct1"}},{"jsonrpc":"2.0","method":"DescribeDisks","params":{"AccountId":"acct1"}}]"#,
    );
    assert_eq!(v.as_array().unwrap().len(), 1, "batch: the notification gets no reply");
    let e = c
        .call(
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 1, "Encrypted": true, "DiskRole": "system"}),
        )
        .unwrap_err();
    assert_eq!(
        (e.rpc_code, e.code.as_str()),
        (-32000, "InvalidOperation.EncryptedSystemDisk")
    );
    assert!(e.message.contains("encrypt a data disk"), "{}", e.message);
    // Reactor counters: host-level (the CLI adds no account), unknown params refused.
    let v = c.call("DescribeReactors", json!({})).unwrap();
    let rs = v["Reactors"].as_array().unwrap();
    assert!(!rs.is_empty());
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r["ReactorId"], i);
        for k in ["Core", "BusyNs", "IdleNs", "Ios", "Bytes", "QueueFull", "SlowParks"] {
            assert!(r[k].is_u64(), "{k} in {r}");
        }
    }
    // An idle daemon's reactors park (idle time is counted when a park ends).
    let t = Instant::now();
    loop {
        let v = c.call("DescribeReactors", json!({})).unwrap();
        if v["Reactors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["IdleNs"].as_u64().unwrap() > 0)
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "reactors never parked: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = c.call("DescribeReactors", json!({"Verbose": true})).unwrap_err();
    assert_eq!(e.code, "InvalidParameter.Unrecognized");
    let out = Command::new(BIN)
        .args([
            "describe-reactors",
            "--json",
            "--account",
            A,
            "--region",
            R,
            "--data-dir",
        ])
        .arg(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Reactors"].as_array().unwrap().len(), rs.len());
    // The CLI talks to the same socket.
    let out = Command::new(BIN)
        .args(["describe-disks", "--json", "--account", A, "--data-dir"])
        .arg(d)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["TotalCount"], 3);
    let out = Command::new(BIN)
        .args([
            "create-disk",
            "--account",
            A,
            "--region",
            R,
            "Size=1",
            "Encrypted=true",
            "DiskKind=local",
            "--data-dir",
        ])
        .arg(d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidOperation.EncryptedLocalDisk"));
    drop(c);
    let log1 = stop(dm);
    assert!(log1.contains("keys wiped"), "{log1}");

    // Write data through the data path in this process, as a frontend would.
    let reactors = Arc::new(common::reactors(&[0]));
    let pattern = common::random_bytes(32 << 10, 99);
    {
        let ctl = open_in_process(d, &reactors);
        let (ok, failed) = ctl.restore_attachments().unwrap();
        assert!(failed.is_empty());
        assert_eq!(ok.len(), 3);
        for id in [&enc, &plain] {
            let b = ctl.exports().get(id).unwrap().bdev;
            let r = run_ios(
                &reactors,
                0,
                &b,
                vec![
                    Op::Write {
                        offset: MIB,
                        data: pattern.clone(),
                    },
                    Op::Flush,
                ],
            );
            assert!(r.iter().all(common::is_ok));
        }
        ctl.detach_all_exports();
    }

    // Restart: the attachments come back on the data path.
    let dm = start(d, logs.0.join("2.log"));
    let mut c = Client::connect(&sock).unwrap();
    let all = disks(&mut c);
    assert_eq!(all.len(), 3);
    for disk in &all {
        assert_eq!(disk["Status"], "In_use", "{disk}");
        assert_eq!(disk["Exported"], true, "{disk}");
        assert_eq!(disk["InstanceId"], iid.as_str());
    }
    c.call(
        "DetachDisk",
        json!({"AccountId": A, "DiskId": plain, "InstanceId": iid}),
    )
    .unwrap();
    drop(c);
    let log2 = stop(dm);
    assert!(log2.contains("restored 3 attached disk(s)"), "{log2}");

    // A copy killed after making its volume but before the catalog rows that
    // name it: the offline check names the volume, the next start removes it.
    {
        let db = catalog::open(&d.join(catalog::CATALOG_FILE)).unwrap();
        let pool = Pool::open(db.clone(), &d.join("pool.img"), 64 * MIB).unwrap();
        let txn = db.begin_write().unwrap();
        pool.create_volume(&txn, "d-interrupted", 4 * MIB).unwrap();
        txn.commit().unwrap();
        let b = pool.bdev("d-interrupted").unwrap();
        let r = run_ios(
            &reactors,
            0,
            &b,
            vec![
                Op::Write {
                    offset: 0,
                    data: pattern.clone(),
                },
                Op::Flush,
            ],
        );
        assert!(r.iter().all(common::is_ok));
    }
    let out = Command::new(BIN).args(["check", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "check must flag the unreferenced volume");
    assert!(String::from_utf8_lossy(&out.stdout).contains("d-interrupted"));

    let dm = start(d, logs.0.join("3.log"));
    let mut c = Client::connect(&sock).unwrap();
    for disk in disks(&mut c) {
        let attached = disk["DiskId"] != plain.as_str();
        assert_eq!(disk["Exported"], attached, "{disk}");
    }
    let chk = c.call("CheckPool", json!({})).unwrap();
    assert_eq!(chk["Consistent"], true, "{chk}");
    drop(c);
    let log3 = stop(dm);
    assert!(
        log3.contains("removed 1 volume(s)") && log3.contains("d-interrupted"),
        "{log3}"
    );

    // Offline check: clean.
    let out = Command::new(BIN).args(["check", "--data-dir"]).arg(d).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // The data survived both restarts; look for key bytes everywhere.
    {
        let ctl = open_in_process(d, &reactors);
        ctl.restore_attachments().unwrap();
        let b = ctl.exports().get(&enc).unwrap().bdev;
        let mut r = run_ios(
            &reactors,
            0,
            &b,
            vec![Op::Read {
                offset: MIB,
                len: 32 << 10,
            }],
        );
        assert_eq!(r.remove(0).data, pattern, "encrypted disk data after restarts");
        ctl.detach_all_exports();
        let rd = ctl.db().begin_read().unwrap();
        let keys: Vec<catalog::KeyRecord> = catalog::list_r(&rd).unwrap();
        assert_eq!(keys.len(), 1);
        let k = &keys[0];
        let key = ctl
            .kms()
            .unwrap_data_key(
                &KeyContext::new(&k.account, &k.region, &k.key_id),
                &k.wrapped,
                CallOpts::default(),
            )
            .unwrap();
        let mut paths = Vec::new();
        files(d, &mut paths);
        files(&logs.0, &mut paths);
        for p in &paths {
            let c = std::fs::read(p).unwrap();
            for w in key.as_bytes().chunks(16) {
                assert!(!contains(&c, w), "key bytes in {}", p.display());
                assert!(
                    !contains(&c, hex::encode(w).as_bytes()),
                    "hex key bytes in {}",
                    p.display()
                );
            }
        }
        // Corrupt the catalog: the wrapped key disappears behind the disk's back.
        drop(rd);
        let w = ctl.db().begin_write().unwrap();
        catalog::remove::<catalog::KeyRecord>(&w, &k.key_id).unwrap();
        w.commit().unwrap();
    }
    let out = Command::new(BIN).args(["check", "--data-dir"]).arg(d).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrapped key"));
}

/// SIGKILL while CreateEncryptedCopy is copying (its new volume exists, the
/// catalog rows that name it do not): the next start removes the half-made
/// volume and says so, CheckPool is clean, no disk appeared, and the same
/// copy then completes.
#[test]
fn sigkill_during_create_encrypted_copy_leaves_nothing_half_made() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("copykill");
    let logs = TempDir::new("copykill-logs");
    let src = TempDir::new("copykill-src");
    let d = &dir.0;
    // A raw image with data in every block (nothing for the copy to skip).
    let img = src.0.join("src.img");
    {
        let mut f = std::fs::File::create(&img).unwrap();
        let mut chunk = vec![0u8; MIB as usize];
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i % 251 + 1) as u8;
        }
        for _ in 0..96 {
            f.write_all(&chunk).unwrap();
        }
    }
    let import = [std::ffi::OsStr::new("--import-dir"), src.0.as_os_str()];
    let dm = start_args(d, logs.0.join("1.log"), "256M", &import);
    let sock = d.join("sealdisk.sock");
    let mut c = Client::connect(&sock).unwrap();
    c.call("ActivateKms", json!({"RegionId": R, "AccountId": A})).unwrap();
    let pool = d.join("pool.img");
    let used = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let before = used(&pool);
    let task = c
        .call(
            "CreateEncryptedCopy",
            json!({"RegionId": R, "AccountId": A, "SourcePath": img.to_str().unwrap()}),
        )
        .unwrap();
    let tid = task["TaskId"].as_str().expect("a background task").to_owned();
    // Kill once the copy has written some of its data into the pool.
    let t = Instant::now();
    while used(&pool) < before + 8 * MIB {
        let v = c
            .call("DescribeTasks", json!({"AccountId": A, "TaskIds": [tid]}))
            .unwrap();
        assert_eq!(
            v["TaskSet"]["Task"][0]["TaskStatus"], "Processing",
            "the copy ended before it could be killed: {v}"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "the copy wrote nothing");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut child = dm.child;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    drop(c);

    let dm = start_args(d, logs.0.join("2.log"), "256M", &import);
    let mut c = Client::connect(&sock).unwrap();
    let chk = c.call("CheckPool", json!({})).unwrap();
    assert_eq!(chk["Consistent"], true, "{chk}");
    assert!(disks(&mut c).is_empty(), "a half-made copy became a disk");
    // The same copy completes now.
    let v = c
        .call(
            "CreateEncryptedCopy",
            json!({"RegionId": R, "AccountId": A, "SourcePath": img.to_str().unwrap()}),
        )
        .unwrap();
    let v = common::wait_task(v, |mut q| {
        q["AccountId"] = A.into();
        c.call("DescribeTasks", q).unwrap()
    })
    .unwrap();
    assert_eq!(v["BytesCopied"], 96 * MIB, "{v}");
    let chk = c.call("CheckPool", json!({})).unwrap();
    assert_eq!(chk["Consistent"], true, "{chk}");
    drop(c);
    let log2 = stop(dm);
    assert!(
        log2.contains("removed 1 volume(s) no disk, snapshot or image refers to"),
        "the start after the kill must say what it swept: {log2}"
    );
    // Who called: the RPC log line and the KMS audit record carry this process's uid
    // and pid (SO_PEERCRED), also for the copy's background task.
    // SAFETY: getuid(2) has no preconditions.
    let me = format!("uid:{},pid:{}", unsafe { libc::getuid() }, std::process::id());
    assert!(
        log2.lines().any(|l| l.contains(" rpc method=CreateEncryptedCopy ")
            && l.contains(&format!("account=\"{A}\""))
            && l.contains(&format!("caller={me} "))
            && l.contains("code=ok")),
        "{log2}"
    );
    let audit = std::fs::read_to_string(d.join("kms/audit.log")).unwrap();
    let entries: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let gen = entries
        .iter()
        .rev()
        .find(|e| e["operation"] == "GenerateDataKey")
        .expect("the copy generated a key");
    assert_eq!(gen["caller"]["pid"], std::process::id(), "{gen}");
    // SAFETY: as above.
    assert_eq!(gen["caller"]["uid"], unsafe { libc::getuid() }, "{gen}");
}
