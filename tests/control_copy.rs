//! CreateEncryptedCopy in process (Control over a real catalog, pool, local KMS and
//! reactors): copies from a plaintext disk (detached and attached) and from a raw file
//! read back identically through the new disk's crypto layer, leave no plaintext of the
//! data in the pool, stay thin; every refusal and failure leaves the catalog and the pool
//! as they were.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use common::{random_bytes, run_ios, Op, TempDir};
use sealdisk::testing::catalog;
use sealdisk::Exports;
use sealdisk::Pool;
use sealdisk::Reactors;
use sealdisk::{Control, ControlConfig, ControlError};
use sealdisk::{Kms, KmsConfig, QuotaConfig};

const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const B: &str = "acct2";
const C: &str = "acct3";
const MIB: u64 = 1 << 20;
const BLK: usize = 4096;

struct Env {
    ctl: std::sync::Arc<Control>,
    reactors: Arc<Reactors>,
    dir: TempDir,
}

impl Env {
    fn new(tag: &str) -> Env {
        Env::with(tag, QuotaConfig::default(), 64 * MIB)
    }
    fn with(tag: &str, quota: QuotaConfig, pool_size: u64) -> Env {
        let dir = TempDir::new(tag);
        let mut kc = KmsConfig::local(&dir.0);
        kc.quota = quota;
        let reactors = Arc::new(common::reactors(&[0]));
        let kms = Kms::open(kc).unwrap();
        let ctl = common::control_in(&dir.0, kms, pool_size, &reactors, Some(std::env::temp_dir()));
        Env { ctl, reactors, dir }
    }
    fn ok(&self, m: &str, p: Value) -> Value {
        let account = p["AccountId"].clone();
        let v = self.ctl.call(m, p).unwrap_or_else(|e| panic!("{m}: {} {e}", e.code()));
        common::wait_task(v, |q| self.describe_tasks(&account, q)).unwrap_or_else(|(c, e)| panic!("{m}: {c} {e}"))
    }
    fn describe_tasks(&self, account: &Value, mut q: Value) -> Value {
        q["AccountId"] = account.clone();
        self.ctl.call("DescribeTasks", q).unwrap()
    }
    fn err(&self, m: &str, p: Value) -> ControlError {
        let account = p["AccountId"].clone();
        match self.ctl.call(m, p) {
            Ok(v) => match common::wait_task(v, |q| self.describe_tasks(&account, q)) {
                Ok(v) => panic!("{m} should have failed, got {v}"),
                Err((code, msg)) => ControlError::state(Box::leak(code.into_boxed_str()), msg),
            },
            Err(e) => e,
        }
    }
    /// The catalog tables, the exports, and the pool's volumes and clusters.
    fn dump(&self) -> Value {
        let r = self.ctl.db().begin_read().unwrap();
        let mut d = catalog::dump(&r).unwrap();
        d["exports"] = json!(self.ctl.exports().names());
        let pc = self.ctl.pool().check().unwrap();
        d["pool"] = json!({"volumes": pc.volumes, "clusters_in_use": pc.clusters_in_use, "problems": pc.problems});
        d
    }
    fn activate(&self, account: &str) {
        self.ok("ActivateKms", json!({"RegionId": R, "AccountId": account}));
    }
    fn disk(&self, account: &str, size: u64, extra: Value) -> String {
        let mut p = json!({"RegionId": R, "AccountId": account, "SizeBytes": size, "DiskCategory": "ssd"});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        self.ok("CreateDisk", p)["DiskId"].as_str().unwrap().to_owned()
    }
    fn instance(&self, account: &str) -> String {
        self.ok(
            "CreateInstance",
            json!({"RegionId": R, "AccountId": account, "SystemDisk.SizeBytes": 4 * MIB}),
        )["InstanceId"]
            .as_str()
            .unwrap()
            .to_owned()
    }
    fn attach(&self, account: &str, d: &str, i: &str) {
        self.ok(
            "AttachDisk",
            json!({"AccountId": account, "DiskId": d, "InstanceId": i}),
        );
    }
    fn detach(&self, account: &str, d: &str, i: &str) {
        self.ok(
            "DetachDisk",
            json!({"AccountId": account, "DiskId": d, "InstanceId": i}),
        );
    }
    fn describe(&self, id: &str) -> Value {
        self.ok("DescribeDisks", json!({"AccountId": A, "DiskIds": [id]}))["Disks"]["Disk"][0].clone()
    }
    fn write(&self, disk: &str, offset: u64, data: Vec<u8>) {
        let bdev = self.ctl.exports().get(disk).expect("disk is exported").bdev;
        let mut ops: Vec<Op> = data
            .chunks(256 * 1024)
            .enumerate()
            .map(|(k, c)| Op::Write {
                offset: offset + (k * 256 * 1024) as u64,
                data: c.to_vec(),
            })
            .collect();
        ops.push(Op::Flush);
        let d = run_ios(&self.reactors, 0, &bdev, ops);
        assert!(
            d.iter().all(common::is_ok),
            "write failed: {:?}",
            d.iter().find(|d| d.result.is_err())
        );
    }
    /// The whole disk, read through its export (attached disks only).
    fn read_all(&self, disk: &str) -> Vec<u8> {
        let bdev = self.ctl.exports().get(disk).expect("disk is exported").bdev;
        let cap = bdev.capacity();
        let mut out = Vec::new();
        let mut off = 0;
        while off < cap {
            let len = (256 * 1024).min(cap - off) as usize;
            let mut d = run_ios(&self.reactors, 0, &bdev, vec![Op::Read { offset: off, len }]);
            let d = d.remove(0);
            assert!(d.result.is_ok(), "read at {off}: {:?}", d.result);
            out.extend_from_slice(&d.data);
            off += len as u64;
        }
        out
    }
    /// Attaches `disk` to `inst`, reads it whole, detaches it.
    fn read_detached(&self, account: &str, disk: &str, inst: &str) -> Vec<u8> {
        self.attach(account, disk, inst);
        let v = self.read_all(disk);
        self.detach(account, disk, inst);
        v
    }
    fn check_clean(&self) {
        let rep = sealdisk::check(self.ctl.db(), self.ctl.pool()).unwrap();
        assert!(rep.consistent(), "check found problems: {:?}", rep.problems);
    }
    fn pool_bytes(&self) -> Vec<u8> {
        std::fs::read(self.dir.0.join("pool.img")).unwrap()
    }
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.ctl.kms().audit_log_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Data with holes: random runs at a few places (some unaligned, one at the very end),
/// zeros elsewhere.
fn holey(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let runs = [
        (0usize, 64 * 1024),
        (MIB as usize + 4096, 8192),
        (2 * MIB as usize + 100, 5000),
        (size / 2 + 12288, 300 * 1024),
        (size - 4096, 4096),
    ];
    for (i, (at, len)) in runs.into_iter().enumerate() {
        let len = len.min(size - at);
        v[at..at + len].copy_from_slice(&random_bytes(len, (seed * 64 + i as u64) * 2 + 1));
    }
    v
}

fn nonzero_blocks(data: &[u8]) -> usize {
    data.chunks(BLK).filter(|b| b.iter().any(|&x| x != 0)).count()
}

/// How often each non-zero 4 KiB block of `data` occurs, 4 KiB-aligned, in `pool`.
fn occurrences(pool: &[u8], data: &[u8]) -> Vec<usize> {
    let mut want: HashMap<&[u8], usize> = HashMap::new();
    for b in data.chunks(BLK).filter(|b| b.len() == BLK && b.iter().any(|&x| x != 0)) {
        want.insert(b, 0);
    }
    for b in pool.chunks(BLK) {
        if let Some(n) = want.get_mut(b) {
            *n += 1;
        }
    }
    want.into_values().collect()
}

#[test]
fn copy_of_a_detached_plaintext_disk_reads_the_same_and_is_ciphertext_in_the_pool() {
    let e = Env::new("disk");
    e.activate(A);
    let i = e.instance(A);
    let size = 8 * MIB;
    let src = e.disk(A, size, json!({"DiskCategory": "ultra"}));
    let data = holey(size as usize, 1);
    e.attach(A, &src, &i);
    e.write(&src, 0, data.clone());
    e.detach(A, &src, &i);

    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourceDiskId": src, "DiskName": "enc-copy"}),
    );
    let new = r["DiskId"].as_str().unwrap().to_owned();
    assert_eq!(r["Encrypted"], true);
    assert_eq!(r["CopyMode"], "snapshot");
    assert_eq!(r["SizeBytes"], size);
    let copied = r["BytesCopied"].as_u64().unwrap();
    assert_eq!(copied, (nonzero_blocks(&data) * BLK) as u64);
    assert_eq!(copied + r["BytesSkipped"].as_u64().unwrap(), size);

    let d = e.describe(&new);
    assert_eq!(d["Encrypted"], true);
    assert_eq!(d["Category"], "ultra", "defaults to the source's category");
    assert_eq!(d["DiskName"], "enc-copy");
    assert!(d["Attachments"]["Attachment"].as_array().is_none_or(|a| a.is_empty()));
    assert!(e.ctl.exports().get(&new).is_none(), "the copy starts detached");
    // Thin: only the clusters holding data are mapped.
    let mapped = e.ctl.pool().mapped_bytes(&new).unwrap();
    assert!(mapped < size / 2, "copy maps {mapped} of {size} bytes");
    let cl = e.ctl.pool().cluster_size() as usize;
    let data_clusters = data.chunks(cl).filter(|c| c.iter().any(|&x| x != 0)).count();
    assert_eq!(mapped, (data_clusters * cl) as u64, "exactly the clusters holding data");
    // The source's plaintext is in the pool exactly once: its own copy.
    let occ = occurrences(&e.pool_bytes(), &data);
    assert!(!occ.is_empty());
    assert!(
        occ.iter().all(|&n| n == 1),
        "plaintext blocks found more than once: {occ:?}"
    );
    // Same data through the new disk's crypto layer; source unchanged.
    assert!(e.read_detached(A, &new, &i) == data, "copy differs from the source");
    assert!(e.read_detached(A, &src, &i) == data, "source changed");
    // One metered, audited GenerateDataKey for the new disk.
    let gen: Vec<Value> = e
        .audit()
        .into_iter()
        .filter(|v| v["disk_id"] == new.as_str() && v["operation"] == "GenerateDataKey")
        .collect();
    assert_eq!(gen.len(), 1, "{gen:?}");
    assert_eq!(gen[0]["result"], "ok");
    e.check_clean();
    // The copy is an ordinary encrypted disk: snapshot, delete (shreds the key).
    let s = e.ok("CreateSnapshot", json!({"AccountId": A, "DiskId": new}))["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned();
    e.ok("DeleteSnapshot", json!({"AccountId": A, "SnapshotId": s}));
    assert_eq!(
        e.ok("DeleteDisk", json!({"AccountId": A, "DiskId": new}))["KeyShredded"],
        true
    );
    e.check_clean();
}

#[test]
fn copy_of_a_raw_file_pads_to_4096_and_honours_size_and_category() {
    let e = Env::new("file");
    e.activate(A);
    let i = e.instance(A);
    let src_dir = TempDir::new("file-src");
    let path = src_dir.0.join("image.raw");
    let len = 3 * MIB as usize + 1000;
    let mut data = holey(len, 2);
    data[len - 1] = 0x5a; // the partial last block holds data
    std::fs::write(&path, &data).unwrap();

    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": path.to_str().unwrap()}),
    );
    let new = r["DiskId"].as_str().unwrap().to_owned();
    let rounded = len.div_ceil(BLK) * BLK;
    assert_eq!(r["CopyMode"], "file");
    assert_eq!(r["SizeBytes"], rounded as u64);
    assert_eq!(r["SourceSizeBytes"], len as u64);
    assert_eq!(e.describe(&new)["Category"], "ssd", "a file source defaults to ssd");
    let mut want = data.clone();
    want.resize(rounded, 0);
    assert_eq!(r["BytesCopied"].as_u64().unwrap(), (nonzero_blocks(&want) * BLK) as u64);
    assert!(e.read_detached(A, &new, &i) == want);
    // None of the file's plaintext reached the pool.
    let occ = occurrences(&e.pool_bytes(), &want);
    assert!(occ.iter().all(|&n| n == 0), "plaintext in the pool: {occ:?}");

    // Bigger than the source, another category: the tail reads as zeros.
    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": path.to_str().unwrap(),
               "SizeBytes": 8 * MIB, "DiskCategory": "basic"}),
    );
    let big = r["DiskId"].as_str().unwrap().to_owned();
    let d = e.describe(&big);
    assert_eq!(
        (d["Category"].as_str(), d["Encrypted"].as_bool()),
        (Some("basic"), Some(true))
    );
    want.resize(8 * MIB as usize, 0);
    assert!(e.read_detached(A, &big, &i) == want);
    // Two copies, two different keys.
    assert_ne!(e.describe(&new)["DataKeyId"], d["DataKeyId"]);
    e.check_clean();
}

#[test]
fn copy_of_an_attached_disk_is_point_in_time_while_the_vm_writes() {
    let e = Env::new("attached");
    e.activate(A);
    let i = e.instance(A);
    let size = 8 * MIB;
    let src = e.disk(A, size, json!({}));
    let data = holey(size as usize, 3);
    e.attach(A, &src, &i);
    e.write(&src, 0, data.clone());
    let volumes_before = e.ctl.pool().check().unwrap().volumes;

    // The "VM" keeps writing a region (6 MiB .. 7 MiB) while the copy runs.
    let region = 6 * MIB..7 * MIB;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let bdev = e.ctl.exports().get(&src).unwrap().bdev;
        let reactors = e.reactors.clone();
        let stop = stop.clone();
        let region = region.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = region.start + (n % 256) * 4096;
                let d = run_ios(
                    &reactors,
                    0,
                    &bdev,
                    vec![Op::Write {
                        offset: off,
                        data: vec![0xAB; 4096],
                    }],
                );
                assert!(d[0].result.is_ok());
                n += 1;
            }
            n
        })
    };
    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourceDiskId": src}),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert_eq!(r["CopyMode"], "snapshot");
    let new = r["DiskId"].as_str().unwrap().to_owned();
    // The temporary clone is gone; only the new disk's volume was added.
    assert_eq!(e.ctl.pool().check().unwrap().volumes, volumes_before + 1);
    e.check_clean();

    let i2 = e.instance(A);
    let got = e.read_detached(A, &new, &i2);
    let (a, b) = (region.start as usize, region.end as usize);
    assert!(
        got[..a] == data[..a] && got[b..] == data[b..],
        "data outside the written region differs"
    );
    // Inside it, every block is either the old data or the VM's write (one point in time).
    for (k, blk) in got[a..b].chunks(BLK).enumerate() {
        let old = &data[a + k * BLK..a + (k + 1) * BLK];
        assert!(blk == old || blk.iter().all(|&x| x == 0xAB), "block {k} is torn");
    }
    // The source is still attached and writable; the copy does not change with it.
    assert!(e.ctl.exports().get(&src).is_some());
    e.write(&src, 0, vec![0xCD; 8192]);
    assert!(e.read_all(&src)[..8192].iter().all(|&x| x == 0xCD));
    assert!(e.read_detached(A, &new, &i2) == got);
    e.check_clean();
}

#[test]
fn every_refusal_has_its_code_and_changes_nothing() {
    let e = Env::new("refuse");
    e.activate(A);
    e.activate(B);
    let plain = e.disk(A, 4 * MIB, json!({}));
    let enc = e.disk(A, 4 * MIB, json!({"Encrypted": true}));
    let other = e.disk(B, 4 * MIB, json!({}));
    let c_disk = e.disk(C, 4 * MIB, json!({})); // C never activated KMS
    let src_dir = TempDir::new("refuse-src");
    let file = src_dir.0.join("img.raw");
    std::fs::write(&file, vec![1u8; 8192]).unwrap();
    let empty = src_dir.0.join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let pool_path = e.dir.0.join("pool.img");
    let kms_file = e.dir.0.join(catalog::CATALOG_FILE);
    let base = |extra: Value| {
        let mut p = json!({"RegionId": R, "AccountId": A});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let cases: Vec<(Value, &str)> = vec![
        (base(json!({"SourceDiskId": enc})), "InvalidOperation.SourceEncrypted"),
        (base(json!({"SourceDiskId": other})), "Forbidden.CrossAccount"),
        (
            base(json!({"SourceDiskId": "d-00000000000000ff"})),
            "InvalidDiskId.NotFound",
        ),
        (
            json!({"RegionId": "cn-beijing", "AccountId": A, "SourceDiskId": plain}),
            "InvalidDiskId.NotFound",
        ),
        (
            base(json!({"SourceDiskId": plain, "SourcePath": file.to_str().unwrap()})),
            "InvalidParameter.SourceDiskId",
        ),
        (base(json!({})), "MissingParameter.SourceDiskId"),
        (
            base(json!({"SourceDiskId": plain, "SizeBytes": 2 * MIB})),
            "InvalidParameter.Size",
        ),
        (
            base(json!({"SourcePath": file.to_str().unwrap(), "SizeBytes": 4096})),
            "InvalidParameter.Size",
        ),
        (
            base(json!({"SourceDiskId": plain, "Size": 1, "SizeBytes": 4 * MIB})),
            "InvalidParameter.Size",
        ),
        (base(json!({"SourcePath": "img.raw"})), "InvalidParameter.SourcePath"),
        (
            base(json!({"SourcePath": "/nonexistent/sealdisk/img.raw"})),
            "InvalidParameter.SourcePath",
        ),
        (
            base(json!({"SourcePath": src_dir.0.to_str().unwrap()})),
            "InvalidParameter.SourcePath",
        ),
        (
            base(json!({"SourcePath": empty.to_str().unwrap()})),
            "InvalidParameter.SourcePath",
        ),
        (
            base(json!({"SourcePath": pool_path.to_str().unwrap()})),
            "InvalidParameter.SourcePath",
        ),
        (
            base(json!({"SourcePath": kms_file.to_str().unwrap()})),
            "InvalidParameter.SourcePath",
        ),
        (
            base(json!({"SourceDiskId": plain, "KMSKeyId": "cmk-x"})),
            "InvalidParameter.KMSKeyId",
        ),
        (
            base(json!({"SourceDiskId": plain, "Encrypted": true})),
            "InvalidParameter.Unrecognized",
        ),
        (
            base(json!({"SourceDiskId": plain, "DiskCategory": "local_ssd_pro"})),
            "InvalidOperation.EncryptedLocalDisk",
        ),
        (
            base(json!({"SourceDiskId": plain, "DiskCategory": "floppy"})),
            "InvalidParameter.DiskCategory",
        ),
        (
            json!({"RegionId": R, "AccountId": C, "SourceDiskId": c_disk}),
            "Kms.NotActivated",
        ),
        (
            json!({"RegionId": R, "AccountId": "bad account!", "SourceDiskId": plain}),
            "InvalidAccountId.Malformed",
        ),
    ];
    let audit_before = e.audit().len();
    for (p, code) in cases {
        let before = e.dump();
        let err = e.err("CreateEncryptedCopy", p.clone());
        assert_eq!(err.code(), code, "{p}: {err}");
        assert!(!err.to_string().is_empty());
        assert_eq!(before, e.dump(), "{p} changed the catalog or the pool");
    }
    // A local kind: what it is and what to do instead.
    let err = e.err(
        "CreateEncryptedCopy",
        base(json!({"SourceDiskId": plain, "DiskCategory": "local_ssd_pro"})),
    );
    assert!(
        err.to_string().contains(
            "local_ssd_pro is a local disk and cannot be encrypted; copy into a cloud disk (basic, ultra, ssd)"
        ),
        "{err}"
    );
    assert_eq!(
        e.audit()
            .iter()
            .skip(audit_before)
            .filter(|v| v["operation"] == "GenerateDataKey")
            .count(),
        0,
        "a refused copy generated a key"
    );
    e.check_clean();
}

#[test]
fn over_quota_the_copy_changes_nothing() {
    let e = Env::with(
        "quota",
        QuotaConfig {
            rate_per_sec: 0.0,
            burst: 1,
        },
        64 * MIB,
    );
    e.activate(A);
    let plain = e.disk(A, 4 * MIB, json!({}));
    e.disk(A, 4 * MIB, json!({"Encrypted": true})); // the only unit
    let before = e.dump();
    let err = e.err(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourceDiskId": plain}),
    );
    assert_eq!(err.code(), "Throttling.KmsQuota");
    assert_eq!(before, e.dump());
    e.check_clean();
}

#[test]
fn pool_full_mid_copy_removes_the_half_made_disk_and_its_key() {
    // 16 MiB pool; a 24 MiB file of random data cannot fit.
    let e = Env::with("full", QuotaConfig::default(), 16 * MIB);
    e.activate(A);
    let src_dir = TempDir::new("full-src");
    let file = src_dir.0.join("big.raw");
    std::fs::write(&file, random_bytes(24 * MIB as usize, 9)).unwrap();
    let before = e.dump();
    let err = e.err(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": file.to_str().unwrap()}),
    );
    assert_eq!(err.code(), "Pool.Full", "{err}");
    assert_eq!(before, e.dump(), "the half-made copy was left behind");
    e.check_clean();
    // The generated key was dropped, and that is audited.
    let audit = e.audit();
    let gen = audit
        .iter()
        .find(|v| v["operation"] == "GenerateDataKey")
        .expect("a key was generated");
    let disk = gen["disk_id"].as_str().unwrap();
    assert!(
        audit
            .iter()
            .any(|v| v["operation"] == "CryptoShred" && v["disk_id"] == disk),
        "no CryptoShred for {disk}"
    );
    // The pool's space is back: a copy that fits succeeds.
    std::fs::write(&file, random_bytes(4 * MIB as usize, 10)).unwrap();
    e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": file.to_str().unwrap()}),
    );
    e.check_clean();
}

/// SourcePath is bounded: no import directory, no SourcePath; with one, only files
/// beneath it, resolved by the kernel without `..` escapes or symlinks, no hard-linked
/// files, block devices only with `import_devices`. Each refusal changes nothing.
#[test]
fn source_paths_stay_beneath_the_import_directory() {
    use std::os::unix::fs::symlink;
    let e = Env::new("import");
    e.activate(A);
    let imp = TempDir::new("import-dir");
    let outside = TempDir::new("import-outside");
    let secret = outside.0.join("secret.raw");
    std::fs::write(&secret, vec![7u8; 8192]).unwrap();
    let inside = imp.0.join("img.raw");
    std::fs::write(&inside, vec![1u8; 8192]).unwrap();
    std::fs::create_dir(imp.0.join("sub")).unwrap();
    symlink(&secret, imp.0.join("link.raw")).unwrap();
    symlink(&outside.0, imp.0.join("dirlink")).unwrap();
    std::fs::hard_link(&secret, imp.0.join("hard.raw")).unwrap();
    // A block device node (the first loop device's numbers) inside the import directory.
    let dev = imp.0.join("dev0");
    let path = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
    // SAFETY: mknod(2) with a live NUL-terminated path.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
    assert_eq!(
        rc,
        0,
        "mknod of a block device node (the test runs as root): {}",
        std::io::Error::last_os_error()
    );

    let call = |p: &str| {
        e.ctl.call(
            "CreateEncryptedCopy",
            json!({"RegionId": R, "AccountId": A, "SourcePath": p}),
        )
    };
    let before = e.dump();
    let refused = |p: &str, code: &str, why: &str| {
        let err = call(p).expect_err(p);
        assert_eq!(err.code(), code, "{p}: {err}");
        assert!(err.to_string().contains(why), "{p}: {err}");
    };
    // This Env's import directory is the system temp dir; these all lie outside it or
    // break its rules.
    refused(
        "/etc/shadow",
        "InvalidParameter.SourcePath",
        "not beneath the import directory",
    );
    let rel = |p: &std::path::Path| {
        p.strip_prefix(std::env::temp_dir())
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };
    let imp_rel = rel(&imp.0);
    // One `..` more than the import directory is deep: out of the temp dir.
    let up = "../".repeat(std::path::Path::new(&imp_rel).components().count() + 1);
    refused(
        &format!("{imp_rel}/{up}etc/passwd"),
        "InvalidParameter.SourcePath",
        "leaves the import directory",
    );
    refused(&format!("{imp_rel}/link.raw"), "InvalidParameter.SourcePath", "symlink");
    refused(
        &format!("{imp_rel}/dirlink/secret.raw"),
        "InvalidParameter.SourcePath",
        "symlink",
    );
    refused(
        &format!("{imp_rel}/hard.raw"),
        "InvalidParameter.SourcePath",
        "hard links",
    );
    refused(
        &format!("{imp_rel}/dev0"),
        "InvalidParameter.SourcePath",
        "--import-devices",
    );
    refused(
        &format!("{imp_rel}/sub"),
        "InvalidParameter.SourcePath",
        "raw image file",
    );
    refused(
        &format!("{imp_rel}/nothing.raw"),
        "InvalidParameter.SourcePath",
        "cannot be opened",
    );
    assert_eq!(before, e.dump(), "a refused SourcePath changed something");
    // Inside, by absolute path and relative to the import directory: copied.
    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": inside.to_str().unwrap()}),
    );
    assert_eq!(r["BytesCopied"], 8192);
    let r = e.ok(
        "CreateEncryptedCopy",
        json!({"RegionId": R, "AccountId": A, "SourcePath": format!("{imp_rel}/sub/../img.raw")}),
    );
    assert_eq!(r["BytesCopied"], 8192);

    // Without an import directory SourcePath is refused; with import_devices a block
    // device passes the device rule (the unbacked loop device is then empty).
    for (dir, devices, path, code, why) in [
        (
            None,
            false,
            inside.to_str().unwrap().to_owned(),
            "InvalidOperation.ImportDisabled",
            "--import-dir",
        ),
        (
            Some(imp.0.clone()),
            true,
            "dev0".to_owned(),
            "InvalidParameter.SourcePath",
            "is empty",
        ),
    ] {
        let db = catalog::open(&TempDir::new("import-cat").0.join(catalog::CATALOG_FILE)).unwrap();
        let pool_dir = TempDir::new("import-pool");
        let pool = Pool::open(db.clone(), &pool_dir.0.join("pool.img"), 16 * MIB).unwrap();
        let kms_dir = TempDir::new("import-kms");
        let kms = Arc::new(Kms::open(KmsConfig::local(&kms_dir.0)).unwrap());
        let mut cfg = ControlConfig::new(pool_dir.0.clone());
        cfg.import_dir = dir;
        cfg.import_devices = devices;
        let ctl = Control::new(db, pool, kms, Exports::new(), Some(e.reactors.clone()), cfg);
        ctl.call("ActivateKms", json!({"RegionId": R, "AccountId": A})).unwrap();
        let err = ctl
            .call(
                "CreateEncryptedCopy",
                json!({"RegionId": R, "AccountId": A, "SourcePath": path}),
            )
            .expect_err("refused");
        assert_eq!(err.code(), code, "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
}
