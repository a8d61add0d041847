//! The ECS operations in process: Control over a real catalog, pool, local KMS and
//! reactors in a temporary data directory. Every operation's happy path, every limit's
//! code with the catalog unchanged, lineage keys, reset/reinit data, quota, crypto-shred,
//! `check`, and no key bytes anywhere.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use common::{run_ios, Op, TempDir};
use sealdisk::testing::catalog;
use sealdisk::Reactors;
use sealdisk::{CallOpts, KeyContext, Kms, KmsConfig, QuotaConfig};
use sealdisk::{Control, ControlError};

const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const B: &str = "acct2";
const MIB: u64 = 1 << 20;

struct Env {
    ctl: std::sync::Arc<Control>,
    reactors: Arc<Reactors>,
    dir: TempDir,
    replies: std::cell::RefCell<Vec<String>>,
}

impl Env {
    fn new(tag: &str) -> Env {
        Env::with_quota(tag, QuotaConfig::default())
    }
    fn with_quota(tag: &str, quota: QuotaConfig) -> Env {
        let dir = TempDir::new(tag);
        let mut kc = KmsConfig::local(&dir.0);
        kc.quota = quota;
        let reactors = Arc::new(common::reactors(&[0]));
        let ctl = common::control_in(&dir.0, Kms::open(kc).unwrap(), 64 * MIB, &reactors, None);
        Env {
            ctl,
            reactors,
            dir,
            replies: Default::default(),
        }
    }
    fn call(&self, m: &str, p: Value) -> Result<Value, ControlError> {
        let r = self.ctl.call(m, p);
        match &r {
            Ok(v) => self.replies.borrow_mut().push(v.to_string()),
            Err(e) => self.replies.borrow_mut().push(format!("{} {e}", e.code())),
        }
        r
    }
    fn ok(&self, m: &str, p: Value) -> Value {
        let account = p["AccountId"].clone();
        let v = self.call(m, p).unwrap_or_else(|e| panic!("{m}: {} {e}", e.code()));
        common::wait_task(v, |mut q| {
            q["AccountId"] = account.clone();
            self.ctl.call("DescribeTasks", q).unwrap()
        })
        .unwrap_or_else(|(c, e)| panic!("{m}: {c} {e}"))
    }
    fn err(&self, m: &str, p: Value) -> String {
        match self.call(m, p) {
            Ok(v) => panic!("{m} should have failed, got {v}"),
            Err(e) => e.code().to_owned(),
        }
    }
    /// Everything: catalog tables, exports, and the pool's volume list as sizes.
    fn dump(&self) -> Value {
        let r = self.ctl.db().begin_read().unwrap();
        let mut d = catalog::dump(&r).unwrap();
        d["exports"] = json!(self.ctl.exports().names());
        d
    }
    fn activate(&self, account: &str) {
        self.ok("ActivateKms", json!({"RegionId": R, "AccountId": account}));
    }
    fn disk(&self, extra: Value) -> String {
        let mut p = json!({"RegionId": R, "AccountId": A, "SizeBytes": 4 * MIB, "DiskCategory": "ssd"});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        if extra.get("Size").is_some() {
            p.as_object_mut().unwrap().remove("SizeBytes");
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
    fn describe_disk(&self, id: &str) -> Value {
        let v = self.ok("DescribeDisks", json!({"AccountId": A, "DiskIds": [id]}));
        v["Disks"]["Disk"][0].clone()
    }
    fn write(&self, disk: &str, offset: u64, data: Vec<u8>) {
        let bdev = self.ctl.exports().get(disk).expect("disk is exported").bdev;
        let d = run_ios(&self.reactors, 0, &bdev, vec![Op::Write { offset, data }, Op::Flush]);
        assert!(d.iter().all(common::is_ok), "write failed: {:?}", d[0].result);
    }
    fn read(&self, disk: &str, offset: u64, len: usize) -> Vec<u8> {
        let bdev = self.ctl.exports().get(disk).expect("disk is exported").bdev;
        let mut d = run_ios(&self.reactors, 0, &bdev, vec![Op::Read { offset, len }]);
        let d = d.remove(0);
        assert!(d.result.is_ok());
        d.data
    }
    fn check_clean(&self) {
        let rep = sealdisk::check(self.ctl.db(), self.ctl.pool()).unwrap();
        assert!(rep.consistent(), "check found problems: {:?}", rep.problems);
    }
}

fn attach(e: &Env, d: &str, i: &str) {
    e.ok("AttachDisk", json!({"AccountId": A, "DiskId": d, "InstanceId": i}));
}
fn detach(e: &Env, d: &str, i: &str) {
    e.ok("DetachDisk", json!({"AccountId": A, "DiskId": d, "InstanceId": i}));
}
fn snapshot(e: &Env, d: &str) -> String {
    e.ok("CreateSnapshot", json!({"AccountId": A, "DiskId": d}))["SnapshotId"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn every_operation_happy_path() {
    let e = Env::new("happy");
    assert_eq!(
        e.err("DescribeKmsKey", json!({"RegionId": R, "AccountId": A})),
        "Kms.NotActivated"
    );
    e.activate(A);
    e.activate(A); // idempotent
    assert_eq!(
        e.err("DescribeKmsKey", json!({"RegionId": R, "AccountId": A})),
        "Kms.ServiceKeyNotFound",
        "the CMK is created with the first encrypted disk"
    );
    let enc = e.disk(json!({"Encrypted": true, "DiskName": "data1"}));
    let plain = e.disk(json!({"Size": 1, "DiskCategory": "cloud_efficiency", "MultiAttach": "Enabled"}));
    let key = e.ok("DescribeKmsKey", json!({"RegionId": R, "AccountId": A}));
    let cmk = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned();
    let de = e.describe_disk(&enc);
    assert_eq!(de["Encrypted"], true);
    assert_eq!(de["KMSKeyId"], cmk.as_str());
    assert_eq!(de["Category"], "ssd");
    assert_eq!(de["Status"], "Available");
    assert!(de["QoS"]["Iops"].as_u64().unwrap() >= 1800);
    let dp = e.describe_disk(&plain);
    assert_eq!(
        (dp["Encrypted"].clone(), dp["Size"].clone(), dp["Category"].clone()),
        (json!(false), json!(1), json!("ultra"))
    );

    // Instance with an encrypted data disk and one from a snapshot.
    let i1 = e.instance(A);
    attach(&e, &enc, &i1);
    assert_eq!(e.describe_disk(&enc)["Status"], "In_use");
    e.write(&enc, 0, vec![0x5a; 8192]);
    let s1 = snapshot(&e, &enc);
    let snaps = e.ok("DescribeSnapshots", json!({"AccountId": A, "DiskId": enc}));
    assert_eq!(snaps["TotalCount"], 1);
    assert_eq!(snaps["Snapshots"]["Snapshot"][0]["Encrypted"], true);
    let inst = e.ok(
        "CreateInstance",
        json!({"RegionId": R, "AccountId": A, "InstanceName": "vm2", "SystemDisk": {"SizeBytes": 4 * MIB, "Category": "ssd"},
               "DataDisk": [{"SnapshotId": s1}, {"SizeBytes": 4 * MIB, "Encrypted": true, "Category": "ultra"}]}),
    );
    let i2 = inst["InstanceId"].as_str().unwrap().to_owned();
    let dds: Vec<String> = inst["DataDiskIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    assert_eq!(dds.len(), 2);
    assert_eq!(
        e.read(&dds[0], 0, 8192),
        vec![0x5a; 8192],
        "clone of the snapshot reads its data"
    );
    let insts = e.ok("DescribeInstances", json!({"AccountId": A}));
    assert_eq!(insts["TotalCount"], 2);
    // Shared block storage: one disk on two instances.
    attach(&e, &plain, &i1);
    attach(&e, &plain, &i2);
    assert_eq!(
        e.describe_disk(&plain)["Attachments"]["Attachment"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    detach(&e, &plain, &i2);
    assert!(e.ctl.exports().get(&plain).is_some(), "still attached to i1");
    detach(&e, &plain, &i1);
    assert!(e.ctl.exports().get(&plain).is_none());

    // Reset / ReInit.
    detach(&e, &enc, &i1);
    e.ok("ResetDisk", json!({"AccountId": A, "DiskId": enc, "SnapshotId": s1}));
    e.ok("ReInitDisk", json!({"AccountId": A, "DiskId": enc}));
    e.ok(
        "ModifyDiskAttribute",
        json!({"AccountId": A, "DiskId": enc, "DiskName": "renamed"}),
    );
    assert_eq!(e.describe_disk(&enc)["DiskName"], "renamed");
    e.ok(
        "ModifySnapshotAttribute",
        json!({"AccountId": A, "SnapshotId": s1, "SnapshotName": "s"}),
    );

    // Images from an unencrypted snapshot: share, copy, export.
    e.ok("AttachDisk", json!({"AccountId": A, "DiskId": plain, "InstanceId": i1}));
    e.write(&plain, 4096, vec![0x33; 4096]);
    e.ok("DetachDisk", json!({"AccountId": A, "DiskId": plain, "InstanceId": i1}));
    let ps = snapshot(&e, &plain);
    let img = e.ok(
        "CreateImage",
        json!({"AccountId": A, "SnapshotId": ps, "ImageName": "base"}),
    )["ImageId"]
        .as_str()
        .unwrap()
        .to_owned();
    e.ok(
        "ModifyImageSharePermission",
        json!({"AccountId": A, "ImageId": img, "AddAccount.1": B}),
    );
    let theirs = e.ok("DescribeImages", json!({"AccountId": B}));
    assert_eq!(theirs["Images"]["Image"][0]["ImageOwnerAlias"], "others");
    let copy = e.ok(
        "CopyImage",
        json!({"AccountId": A, "ImageId": img, "DestinationRegionId": "cn-shanghai"}),
    );
    assert_eq!(copy["RegionId"], "cn-shanghai");
    let ex = e.ok(
        "ExportImage",
        json!({"AccountId": A, "ImageId": img, "OSSBucket": "b1"}),
    );
    let bytes = std::fs::read(ex["Path"].as_str().unwrap()).unwrap();
    assert_eq!(bytes.len() as u64, MIB << 10);
    assert_eq!(&bytes[4096..8192], &[0x33; 4096][..]);
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    let mine = e.ok("DescribeImages", json!({"AccountId": A, "ImageOwnerAlias": "self"}));
    assert_eq!(mine["TotalCount"], 2);
    // An instance from the shared image, in the other account.
    e.activate(B);
    let ib = e.ok("CreateInstance", json!({"RegionId": R, "AccountId": B, "ImageId": img}));
    assert!(ib["InstanceId"].is_string());

    // Deletes.
    e.ok("DeleteInstance", json!({"AccountId": A, "InstanceId": i2}));
    let after = e.ok("DescribeDisks", json!({"AccountId": A, "DiskIds": dds}));
    assert_eq!(after["TotalCount"], 2, "data disks stay after DeleteInstance");
    for d in &dds {
        e.ok("DeleteDisk", json!({"AccountId": A, "DiskId": d}));
    }
    e.ok("DeleteImage", json!({"AccountId": A, "ImageId": copy["ImageId"]}));
    e.ok(
        "DeleteSnapshot",
        json!({"AccountId": A, "SnapshotId": s1, "Force": true}),
    );
    let usage = e.ok("DescribeKmsUsage", json!({"AccountId": A}));
    assert!(usage["Regions"][0]["Calls"].as_u64().unwrap() >= 8);
    let chk = e.ok("CheckPool", json!({}));
    assert_eq!(chk["Consistent"], true, "{chk}");
    e.check_clean();
    assert_no_key_bytes(&e);
}

/// Fixture for the limit table: objects of both accounts.
struct Fix {
    plain: String,
    enc: String,
    enc_attached: String,
    plain_snap: String,
    enc_snap: String,
    enc_image: String,
    plain_image: String,
    inst: String,
    other_disk: String,
    other_inst: String,
}

fn fixture(e: &Env) -> Fix {
    e.activate(A);
    e.activate(B);
    let plain = e.disk(json!({}));
    let enc = e.disk(json!({"Encrypted": true}));
    let enc_attached = e.disk(json!({"Encrypted": true}));
    let inst = e.instance(A);
    attach(e, &enc_attached, &inst);
    let plain_snap = snapshot(e, &plain);
    let enc_snap = snapshot(e, &enc);
    let img = |s: &str| {
        e.ok("CreateImage", json!({"AccountId": A, "SnapshotId": s}))["ImageId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let enc_image = img(&enc_snap);
    let plain_image = img(&plain_snap);
    let other_disk = e.ok(
        "CreateDisk",
        json!({"RegionId": R, "AccountId": B, "SizeBytes": 4 * MIB}),
    )["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_inst = e.instance(B);
    Fix {
        plain,
        enc,
        enc_attached,
        plain_snap,
        enc_snap,
        enc_image,
        plain_image,
        inst,
        other_disk,
        other_inst,
    }
}

#[test]
fn every_limit_has_its_code_and_changes_nothing() {
    let e = Env::new("limits");
    let f = fixture(&e);
    let base = json!({"RegionId": R, "AccountId": A, "SizeBytes": 4 * MIB});
    let with = |extra: Value| {
        let mut p = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        // Encryption only for cloud data disks.
        (
            "CreateDisk",
            with(json!({"Encrypted": true, "DiskRole": "system"})),
            "InvalidOperation.EncryptedSystemDisk",
        ),
        (
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB, "SystemDisk.Encrypted": true}),
            "InvalidOperation.EncryptedSystemDisk",
        ),
        (
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "ImageId": f.enc_image}),
            "InvalidOperation.EncryptedSystemDisk",
        ),
        (
            "CreateDisk",
            with(json!({"Encrypted": true, "DiskKind": "local"})),
            "InvalidOperation.EncryptedLocalDisk",
        ),
        (
            "CreateDisk",
            with(json!({"Encrypted": true, "DiskCategory": "ephemeral_ssd"})),
            "InvalidOperation.EncryptedLocalDisk",
        ),
        (
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB, "DataDisk.1.SizeBytes": 4 * MIB, "DataDisk.1.Encrypted": true, "DataDisk.1.DiskKind": "ephemeral"}),
            "InvalidOperation.EncryptedLocalDisk",
        ),
        // No conversion, either way, disks and snapshots.
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SnapshotId": f.plain_snap, "Encrypted": true}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SnapshotId": f.enc_snap, "Encrypted": false}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "CreateSnapshot",
            json!({"AccountId": A, "DiskId": f.plain, "Encrypted": true}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "CreateSnapshot",
            json!({"AccountId": A, "DiskId": f.enc, "Encrypted": false}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "ModifyDiskAttribute",
            json!({"AccountId": A, "DiskId": f.plain, "Encrypted": true}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "ModifyDiskAttribute",
            json!({"AccountId": A, "DiskId": f.enc, "Encrypted": false}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "ModifySnapshotAttribute",
            json!({"AccountId": A, "SnapshotId": f.enc_snap, "Encrypted": false}),
            "InvalidOperation.EncryptionConversion",
        ),
        (
            "ModifySnapshotAttribute",
            json!({"AccountId": A, "SnapshotId": f.plain_snap, "Encrypted": true}),
            "InvalidOperation.EncryptionConversion",
        ),
        // Images of encrypted snapshots.
        (
            "ModifyImageSharePermission",
            json!({"AccountId": A, "ImageId": f.enc_image, "AddAccount": [B]}),
            "InvalidOperation.EncryptedImageShare",
        ),
        (
            "CopyImage",
            json!({"AccountId": A, "ImageId": f.enc_image, "DestinationRegionId": "cn-beijing"}),
            "InvalidOperation.EncryptedImageCopy",
        ),
        (
            "ExportImage",
            json!({"AccountId": A, "ImageId": f.enc_image}),
            "InvalidOperation.EncryptedImageExport",
        ),
        // The CMK: not chosen, not changed, not deleted.
        (
            "CreateDisk",
            with(json!({"Encrypted": true, "KMSKeyId": "my-key"})),
            "InvalidParameter.KMSKeyId",
        ),
        (
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "DataDisk.1.SizeBytes": 4 * MIB, "DataDisk.1.Encrypted": true, "DataDisk.1.KMSKeyId": "k"}),
            "InvalidParameter.KMSKeyId",
        ),
        (
            "ModifyDiskAttribute",
            json!({"AccountId": A, "DiskId": f.enc, "KMSKeyId": "other-cmk"}),
            "InvalidOperation.CmkChange",
        ),
        (
            "ModifySnapshotAttribute",
            json!({"AccountId": A, "SnapshotId": f.enc_snap, "KMSKeyId": "other-cmk"}),
            "InvalidOperation.CmkChange",
        ),
        (
            "ScheduleKeyDeletion",
            json!({"RegionId": R, "AccountId": A}),
            "InvalidOperation.CmkDeletion",
        ),
        // KMS not activated.
        (
            "CreateDisk",
            json!({"RegionId": "cn-beijing", "AccountId": A, "SizeBytes": 4 * MIB, "Encrypted": true}),
            "Kms.NotActivated",
        ),
        // Cross-account.
        (
            "AttachDisk",
            json!({"AccountId": A, "DiskId": f.other_disk, "InstanceId": f.inst}),
            "Forbidden.CrossAccount",
        ),
        (
            "AttachDisk",
            json!({"AccountId": A, "DiskId": f.plain, "InstanceId": f.other_inst}),
            "Forbidden.CrossAccount",
        ),
        (
            "DeleteDisk",
            json!({"AccountId": B, "DiskId": f.plain}),
            "Forbidden.CrossAccount",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": B, "SnapshotId": f.plain_snap}),
            "Forbidden.CrossAccount",
        ),
        (
            "DeleteSnapshot",
            json!({"AccountId": B, "SnapshotId": f.plain_snap}),
            "Forbidden.CrossAccount",
        ),
        (
            "CopyImage",
            json!({"AccountId": B, "ImageId": f.plain_image, "DestinationRegionId": "cn-beijing"}),
            "Forbidden.CrossAccount",
        ),
        (
            "CreateInstance",
            json!({"RegionId": R, "AccountId": B, "ImageId": f.plain_image}),
            "Forbidden.CrossAccount",
        ),
        // Unknown ids.
        (
            "DeleteDisk",
            json!({"AccountId": A, "DiskId": "d-0000000000000000"}),
            "InvalidDiskId.NotFound",
        ),
        (
            "CreateSnapshot",
            json!({"AccountId": A, "DiskId": "d-nope"}),
            "InvalidDiskId.NotFound",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SnapshotId": "s-nope"}),
            "InvalidSnapshotId.NotFound",
        ),
        (
            "CreateImage",
            json!({"AccountId": A, "SnapshotId": "s-nope"}),
            "InvalidSnapshotId.NotFound",
        ),
        (
            "AttachDisk",
            json!({"AccountId": A, "DiskId": f.plain, "InstanceId": "i-nope"}),
            "InvalidInstanceId.NotFound",
        ),
        (
            "CopyImage",
            json!({"AccountId": A, "ImageId": "m-nope", "DestinationRegionId": "x"}),
            "InvalidImageId.NotFound",
        ),
        (
            "DeleteDisk",
            json!({"AccountId": A, "RegionId": "cn-beijing", "DiskId": f.plain}),
            "InvalidDiskId.NotFound",
        ),
        // Sizes.
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 0}),
            "InvalidParameter.Size",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 40000}),
            "InvalidParameter.Size",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SizeBytes": 1000}),
            "InvalidParameter.Size",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 1, "SizeBytes": 4096}),
            "InvalidParameter.Size",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SnapshotId": f.plain_snap, "SizeBytes": MIB}),
            "InvalidParameter.Size",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A}),
            "MissingParameter.Size",
        ),
        // Shared block storage.
        (
            "CreateDisk",
            with(json!({"MultiAttach": "Enabled", "DiskCategory": "basic"})),
            "InvalidOperation.MultiAttachCategory",
        ),
        (
            "CreateDisk",
            with(json!({"MultiAttach": true, "DiskCategory": "cloud"})),
            "InvalidOperation.MultiAttachCategory",
        ),
        (
            "AttachDisk",
            json!({"AccountId": A, "DiskId": f.enc_attached, "InstanceId": f.inst}),
            "IncorrectDiskStatus",
        ),
        // State.
        (
            "DetachDisk",
            json!({"AccountId": A, "DiskId": f.plain, "InstanceId": f.inst}),
            "IncorrectDiskStatus",
        ),
        (
            "ResetDisk",
            json!({"AccountId": A, "DiskId": f.enc_attached, "SnapshotId": f.enc_snap}),
            "InvalidParameter.SnapshotNotOfDisk",
        ),
        (
            "ReInitDisk",
            json!({"AccountId": A, "DiskId": f.enc_attached}),
            "IncorrectDiskStatus",
        ),
        (
            "DeleteDisk",
            json!({"AccountId": A, "DiskId": f.enc_attached}),
            "IncorrectDiskStatus",
        ),
        (
            "DeleteSnapshot",
            json!({"AccountId": A, "SnapshotId": f.enc_snap}),
            "IncorrectSnapshotStatus.UsedByDisk",
        ),
        // Parameters.
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SizeBytes": "lots"}),
            "InvalidParameter.SizeBytes",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 1, "Sise": 2}),
            "InvalidParameter.Unrecognized",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "Size": 1}),
            "MissingParameter.AccountId",
        ),
        (
            "CreateDisk",
            json!({"RegionId": "bad region!", "AccountId": A, "Size": 1}),
            "InvalidRegionId.Malformed",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": "a/b", "Size": 1}),
            "InvalidAccountId.Malformed",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 1, "DiskCategory": "gold"}),
            "InvalidParameter.DiskCategory",
        ),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "Size": 1, "Encrypted": "maybe"}),
            "InvalidParameter.Encrypted",
        ),
        ("NoSuchAction", json!({}), "InvalidAction.NotFound"),
    ];
    // A disk made from the encrypted snapshot makes DeleteSnapshot refuse (above).
    e.ok(
        "CreateDisk",
        json!({"RegionId": R, "AccountId": A, "SnapshotId": f.enc_snap}),
    );
    for (m, p, code) in cases {
        let before = e.dump();
        let got = e.err(m, p.clone());
        assert_eq!(got, code, "{m} {p}");
        let after = e.dump();
        assert_eq!(before, after, "{m} {p} changed the catalog");
    }
    e.check_clean();
}

#[test]
fn lineage_key_is_shared_and_clones_read_snapshot_data() {
    let e = Env::new("lineage");
    e.activate(A);
    let d = e.disk(json!({"Encrypted": true}));
    let i = e.instance(A);
    attach(&e, &d, &i);
    let pattern = common::random_bytes(64 << 10, 7);
    e.write(&d, 128 << 10, pattern.clone());
    let s = snapshot(&e, &d);
    e.write(&d, 128 << 10, vec![0xee; 64 << 10]); // the disk moves on; the snapshot must not
    let c = e.ok(
        "CreateDisk",
        json!({"RegionId": R, "AccountId": A, "SnapshotId": s, "SizeBytes": 8 * MIB}),
    )["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (dd, cd) = (e.describe_disk(&d), e.describe_disk(&c));
    assert_eq!(cd["Encrypted"], true, "a disk from an encrypted snapshot is encrypted");
    assert_eq!(
        cd["DataKeyId"], dd["DataKeyId"],
        "with the lineage key, never a new one"
    );
    assert_eq!(cd["KMSKeyId"], dd["KMSKeyId"]);
    assert_eq!(cd["SizeBytes"], 8 * MIB);
    let i2 = e.instance(A);
    attach(&e, &c, &i2);
    assert_eq!(e.read(&c, 128 << 10, 64 << 10), pattern);
    assert_eq!(e.read(&c, 0, 4096), vec![0; 4096], "unwritten sectors read as zeros");
    assert_eq!(
        e.read(&c, 6 * MIB, 4096),
        vec![0; 4096],
        "the grown tail reads as zeros"
    );
    assert_eq!(e.read(&d, 128 << 10, 64 << 10), vec![0xee; 64 << 10]);
    // Ciphertext only on the pool.
    let pool = std::fs::read(e.dir.0.join("pool.img")).unwrap();
    assert!(!contains(&pool, &pattern[..32]), "plaintext found in the pool file");
    // One wrapped key for the whole lineage.
    let r = e.ctl.db().begin_read().unwrap();
    let keys: Vec<catalog::KeyRecord> = catalog::list_r(&r).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].refs, 3, "disk, snapshot, clone");
    drop(r);
    e.check_clean();
    assert_no_key_bytes(&e);
}

#[test]
fn reset_and_reinit_restore_the_right_data() {
    let e = Env::new("reset");
    e.activate(A);
    let i = e.instance(A);
    for encrypted in [true, false] {
        let d = e.disk(json!({"Encrypted": encrypted}));
        attach(&e, &d, &i);
        let a = common::random_bytes(16384, 1);
        e.write(&d, 0, a.clone());
        let s = snapshot(&e, &d);
        e.write(&d, 0, vec![0x11; 16384]);
        e.write(&d, MIB, vec![0x22; 4096]);
        assert_eq!(
            e.err("ResetDisk", json!({"AccountId": A, "DiskId": d, "SnapshotId": s})),
            "IncorrectDiskStatus"
        );
        detach(&e, &d, &i);
        e.ok("ResetDisk", json!({"AccountId": A, "DiskId": d, "SnapshotId": s}));
        attach(&e, &d, &i);
        assert_eq!(e.read(&d, 0, 16384), a, "ResetDisk brings back the snapshot");
        assert_eq!(e.read(&d, MIB, 4096), vec![0; 4096], "later writes are gone");
        detach(&e, &d, &i);
        e.ok("ReInitDisk", json!({"AccountId": A, "DiskId": d}));
        attach(&e, &d, &i);
        assert_eq!(
            e.read(&d, 0, 16384),
            vec![0; 16384],
            "ReInitDisk of a blank disk: zeros"
        );
        // A disk from the snapshot re-initialises to the snapshot.
        let c = e.ok("CreateDisk", json!({"RegionId": R, "AccountId": A, "SnapshotId": s}))["DiskId"]
            .as_str()
            .unwrap()
            .to_owned();
        attach(&e, &c, &i);
        e.write(&c, 0, vec![0x44; 16384]);
        detach(&e, &c, &i);
        e.ok("ReInitDisk", json!({"AccountId": A, "DiskId": c}));
        attach(&e, &c, &i);
        assert_eq!(e.read(&c, 0, 16384), a, "ReInitDisk of a clone: the snapshot's data");
        assert_eq!(e.describe_disk(&c)["DataKeyId"], e.describe_disk(&d)["DataKeyId"]);
        detach(&e, &c, &i);
        detach(&e, &d, &i);
        // Force-deleting the source snapshot leaves the clone without an initial state.
        e.ok(
            "DeleteSnapshot",
            json!({"AccountId": A, "SnapshotId": s, "Force": true}),
        );
        assert_eq!(
            e.err("ReInitDisk", json!({"AccountId": A, "DiskId": c})),
            "InvalidOperation.SourceSnapshotDeleted"
        );
    }
    e.check_clean();
}

#[test]
fn a_refilling_quota_tells_when_to_retry() {
    // One call, then one every 100 s: the second encrypted disk is refused with a hint of
    // at most 100 s (and more than nothing), and the message carries it.
    let e = Env::with_quota(
        "quota-hint",
        QuotaConfig {
            rate_per_sec: 0.01,
            burst: 1,
        },
    );
    e.activate(A);
    e.disk(json!({"Encrypted": true}));
    let before = e.dump();
    let p = json!({"RegionId": R, "AccountId": A, "SizeBytes": 4 * MIB, "Encrypted": true});
    let err = e.call("CreateDisk", p).unwrap_err();
    assert_eq!(err.code(), "Throttling.KmsQuota");
    let ms = err.retry_after_ms().expect("a refilling quota gives a retry hint");
    assert!(ms > 0 && ms <= 100_000, "retry after {ms} ms");
    assert!(err.to_string().contains(&format!("retry after {ms} ms")), "{err}");
    assert_eq!(before, e.dump(), "over quota, CreateDisk changed something");
}

#[test]
fn quota_exhaustion_mid_sequence_changes_nothing() {
    // Four KMS calls, no refill.
    let e = Env::with_quota(
        "quota",
        QuotaConfig {
            rate_per_sec: 0.0,
            burst: 4,
        },
    );
    e.activate(A);
    let i = e.instance(A); // no KMS call: plain system disk
    let d = e.disk(json!({"Encrypted": true})); // 1
    attach(&e, &d, &i); // 2
    let _s = snapshot(&e, &d); // 3
                               // CreateInstance with two encrypted data disks needs 2 units; 1 is left.
    let before = e.dump();
    let p = json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB,
                   "DataDisk.1.SizeBytes": 4 * MIB, "DataDisk.1.Encrypted": true,
                   "DataDisk.2.SizeBytes": 4 * MIB, "DataDisk.2.Encrypted": true});
    let err = e.call("CreateInstance", p).unwrap_err();
    assert_eq!(err.code(), "Throttling.KmsQuota");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    // No refill: the calls can never be granted, so there is no retry hint, and the
    // message says why.
    assert_eq!(err.retry_after_ms(), None, "{err}");
    assert!(err.to_string().contains("can never be granted"), "{err}");
    assert_eq!(before, e.dump(), "over quota, CreateInstance changed something");
    detach(&e, &d, &i); // 4
    for (m, p) in [
        ("AttachDisk", json!({"AccountId": A, "DiskId": d, "InstanceId": i})),
        ("CreateSnapshot", json!({"AccountId": A, "DiskId": d})),
        ("ReInitDisk", json!({"AccountId": A, "DiskId": d})),
        (
            "CreateDisk",
            json!({"RegionId": R, "AccountId": A, "SizeBytes": 4 * MIB, "Encrypted": true}),
        ),
    ] {
        let before = e.dump();
        assert_eq!(e.err(m, p), "Throttling.KmsQuota", "{m}");
        assert_eq!(before, e.dump(), "over quota, {m} changed something");
    }
    // Plain disks need no KMS.
    e.disk(json!({}));
    let usage = e.ok("DescribeKmsUsage", json!({"AccountId": A, "RegionId": R}));
    assert_eq!(usage["Regions"][0]["Calls"], 4);
    assert!(usage["Regions"][0]["Throttled"].as_u64().unwrap() >= 5);
    e.check_clean();
}

#[test]
fn last_holder_shreds_the_key_and_it_is_audited() {
    let e = Env::new("shred");
    e.activate(A);
    let d = e.disk(json!({"Encrypted": true}));
    let s = snapshot(&e, &d);
    let key_id = e.describe_disk(&d)["DataKeyId"].as_str().unwrap().to_owned();
    let r = e.ok("DeleteDisk", json!({"AccountId": A, "DiskId": d}));
    assert_eq!(r["KeyShredded"], false, "the snapshot still holds the key");
    let rows = |e: &Env| {
        let r = e.ctl.db().begin_read().unwrap();
        catalog::get_r::<catalog::KeyRecord>(&r, &key_id).unwrap()
    };
    assert_eq!(rows(&e).unwrap().refs, 1);
    let r = e.ok("DeleteSnapshot", json!({"AccountId": A, "SnapshotId": s}));
    assert_eq!(r["KeyShredded"], true);
    assert!(rows(&e).is_none(), "wrapped key removed");
    let audit = std::fs::read_to_string(e.ctl.kms().audit_log_path()).unwrap();
    let shred: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["operation"] == "CryptoShred")
        .collect();
    assert_eq!(shred.len(), 1);
    assert_eq!(shred[0]["key_id"], key_id.as_str());
    assert_eq!(shred[0]["disk_id"], s.as_str());
    assert_eq!(shred[0]["result"], "ok");
    e.check_clean();
}

#[test]
fn check_finds_a_corrupted_catalog_and_pool() {
    let e = Env::new("corrupt");
    e.activate(A);
    let d = e.disk(json!({"Encrypted": true}));
    let _s = snapshot(&e, &d);
    let plain = e.disk(json!({}));
    e.check_clean();
    // Catalog: a key's reference count off by one.
    let key_id = e.describe_disk(&d)["DataKeyId"].as_str().unwrap().to_owned();
    let w = e.ctl.db().begin_write().unwrap();
    let mut k: catalog::KeyRecord = catalog::get(&w, &key_id).unwrap().unwrap();
    k.refs += 1;
    catalog::put(&w, &k).unwrap();
    w.commit().unwrap();
    let rep = sealdisk::check(e.ctl.db(), e.ctl.pool()).unwrap();
    assert!(
        rep.problems.iter().any(|p| p.contains("reference count")),
        "{:?}",
        rep.problems
    );
    // Pool: a disk's volume vanishes behind the catalog's back.
    let w = e.ctl.db().begin_write().unwrap();
    k.refs -= 1;
    catalog::put(&w, &k).unwrap();
    e.ctl.pool().delete_volume(&w, &plain).unwrap();
    w.commit().unwrap();
    let rep = sealdisk::check(e.ctl.db(), e.ctl.pool()).unwrap();
    assert!(
        rep.problems
            .iter()
            .any(|p| p.contains(&plain) && p.contains("no volume")),
        "{:?}",
        rep.problems
    );
}

/// Substring search that skips all-zero 4 KiB blocks (pools are mostly sparse zeros).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    const BLK: usize = 4096;
    let mut i = 0;
    while i < hay.len() {
        let end = (i + BLK).min(hay.len());
        let blk = &hay[i..end];
        if blk.iter().any(|&b| b != 0) {
            let win_end = (end + needle.len()).min(hay.len());
            if hay[i..win_end].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        i = end;
    }
    false
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if !p.to_string_lossy().ends_with(".sock") {
            out.push(p);
        }
    }
}

/// Unwraps every data key of the catalog and looks for 16-byte windows of it (raw and
/// hex) in every file under the data directory and in every reply the test received.
fn assert_no_key_bytes(e: &Env) {
    let r = e.ctl.db().begin_read().unwrap();
    let keys: Vec<catalog::KeyRecord> = catalog::list_r(&r).unwrap();
    drop(r);
    assert!(!keys.is_empty());
    let mut paths = Vec::new();
    files(&e.dir.0, &mut paths);
    let contents: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let replies = e.replies.borrow().join("\n");
    for k in keys {
        let ctx = KeyContext::new(&k.account, &k.region, &k.key_id);
        let key = e
            .ctl
            .kms()
            .unwrap_data_key(&ctx, &k.wrapped, CallOpts::default())
            .unwrap();
        let bytes = key.as_bytes();
        for w in [&bytes[..16], &bytes[16..32], &bytes[32..48], &bytes[48..]] {
            let hx = hex::encode(w);
            for (p, c) in paths.iter().zip(&contents) {
                assert!(!contains(c, w), "key bytes in {}", p.display());
                assert!(!contains(c, hx.as_bytes()), "hex key bytes in {}", p.display());
            }
            assert!(!contains(replies.as_bytes(), hx.as_bytes()));
        }
    }
}

/// Eight threads run attach / detach / snapshot / clone / reset / delete on two
/// instances and a handful of disks at once (operations on different objects run
/// concurrently; on the same object one after the other). Refusals are fine; what must
/// hold afterwards: the pool checks clean, and a disk is exported exactly when it has
/// an attachment.
#[test]
fn concurrent_operations_on_shared_objects_leave_a_consistent_catalog_and_data_path() {
    let e = Env::new("concurrent");
    e.ok("ActivateKms", json!({"RegionId": R, "AccountId": A}));
    let inst = |e: &Env| {
        e.ok(
            "CreateInstance",
            json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB}),
        )["InstanceId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let instances = [inst(&e), inst(&e)];
    let disks: Vec<String> = (0..4)
        .map(|i| {
            e.ok(
                "CreateDisk",
                json!({"RegionId": R, "AccountId": A, "SizeBytes": 4 * MIB,
                       "Encrypted": i % 2 == 0, "MultiAttach": i >= 2, "DiskCategory": "ssd"}),
            )["DiskId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let ctl = e.ctl.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (ctl, disks, instances) = (ctl.clone(), disks.clone(), instances.clone());
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                let mut ok = 0;
                for _ in 0..100 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let d = &disks[(x % 4) as usize];
                    let i = &instances[((x >> 8) % 2) as usize];
                    let base = json!({"RegionId": R, "AccountId": A});
                    let with = |kv: &[(&str, &str)]| {
                        let mut p = base.clone();
                        for (k, v) in kv {
                            p[*k] = (*v).into();
                        }
                        p
                    };
                    let r = match (x >> 16) % 6 {
                        0 | 1 => ctl.call("AttachDisk", with(&[("DiskId", d), ("InstanceId", i)])),
                        2 | 3 => ctl.call("DetachDisk", with(&[("DiskId", d), ("InstanceId", i)])),
                        4 => ctl.call("CreateSnapshot", with(&[("DiskId", d)])).and_then(|s| {
                            let sid = s["SnapshotId"].as_str().unwrap().to_owned();
                            let c = ctl.call("CreateDisk", with(&[("SnapshotId", &sid)]))?;
                            let cid = c["DiskId"].as_str().unwrap().to_owned();
                            ctl.call("DeleteDisk", with(&[("DiskId", &cid)]))?;
                            ctl.call("DeleteSnapshot", with(&[("SnapshotId", &sid), ("Force", "true")]))
                        }),
                        _ => ctl.call("DescribeDisks", base.clone()),
                    };
                    if r.is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let ok: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ok > 100, "only {ok} operations succeeded");
    let chk = e.ok("CheckPool", json!({}));
    assert_eq!(chk["Consistent"], true, "{chk}");
    let all = e.ok("DescribeDisks", json!({"RegionId": R, "AccountId": A}));
    for d in all["Disks"]["Disk"].as_array().unwrap() {
        let attached = d["Status"] == "In_use";
        assert_eq!(d["Exported"], attached, "exported exactly when attached: {d}");
    }
    // Every snapshot and clone was deleted again; the lineage keys count right.
    let snaps = e.ok("DescribeSnapshots", json!({"RegionId": R, "AccountId": A}));
    assert_eq!(snaps["TotalCount"], 0, "{snaps}");
}
