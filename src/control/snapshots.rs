//! CreateSnapshot, ModifySnapshotAttribute, DeleteSnapshot, DescribeSnapshots.
//! A snapshot is a copy-on-write clone of its disk's volume and holds the disk's
//! lineage key (one more reference).

use serde_json::{json, Value};

use super::params::check_text;
use super::{same_region, view, Control, ControlError, Params};
use crate::catalog::{self, DiskRecord, SnapshotRecord};
use crate::kms::CallOpts;

impl Control {
    pub(super) fn create_snapshot(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let disk_id = p.str("DiskId")?;
        let name = p.opt_str("SnapshotName")?.unwrap_or_default();
        let _desc = p.opt_str("Description")?;
        let encrypted = p.opt_bool("Encrypted")?;
        p.refuse_kms_key_id()?;
        p.finish()?;
        check_text("SnapshotName", &name)?;
        let check = |txn: &redb::WriteTransaction| {
            let d = self.find_disk(txn, &disk_id, &account)?;
            same_region(region.as_deref(), &d.region, "InvalidDiskId.NotFound", &disk_id)?;
            Ok::<DiskRecord, ControlError>(d)
        };
        let d = self.peek(check)?;
        if let Some(want) = encrypted {
            if want != d.encryption.is_some() {
                return Err(ControlError::limit(
                    "InvalidOperation.EncryptionConversion",
                    format!(
                        "a snapshot is encrypted exactly when its disk is, and disk {disk_id} is {}; omit Encrypted",
                        if d.encryption.is_some() {
                            "encrypted"
                        } else {
                            "not encrypted"
                        }
                    ),
                ));
            }
        }
        if let Some(_enc) = &d.encryption {
            let r = self.kms_reserve(&d.account, &d.region, 1)?;
            self.kms
                .ensure_service_key(&d.account, &d.region, CallOpts::disk(&d.id).reserved(&r))?;
        }
        let txn = self.begin()?;
        let d = check(&txn)?;
        let id = super::util::new_id("s");
        self.pool.clone_volume(&txn, &disk_id, &id, d.size)?;
        if let Some(enc) = &d.encryption {
            self.key_ref(&txn, enc)?;
        }
        let rec = SnapshotRecord {
            id: id.clone(),
            account: d.account.clone(),
            region: d.region.clone(),
            name,
            source_disk: d.id.clone(),
            source_disk_size: d.size,
            size: d.size,
            category: d.category,
            encryption: d.encryption.clone(),
            created_at: super::util::now_rfc3339(),
        };
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(json!({ "SnapshotId": id, "Encrypted": rec.encryption.is_some() }))
    }

    pub(super) fn modify_snapshot_attribute(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let id = p.str("SnapshotId")?;
        let name = p.opt_str("SnapshotName")?;
        let _desc = p.opt_str("Description")?;
        let encrypted = p.opt_bool("Encrypted")?;
        let cmk = p.opt_str("KMSKeyId")?;
        p.finish()?;
        if let Some(n) = &name {
            check_text("SnapshotName", n)?;
        }
        let s = self.peek(|txn| self.find_snapshot(txn, &id, &account))?;
        self.refuse_conversion_or_cmk_change("snapshot", &id, &s.account, &s.region, &s.encryption, encrypted, cmk)?;
        let txn = self.begin()?;
        let mut s = self.find_snapshot(&txn, &id, &account)?;
        if let Some(n) = name {
            s.name = n;
        }
        catalog::put(&txn, &s)?;
        txn.commit()?;
        Ok(json!({ "SnapshotId": id }))
    }

    pub(super) fn delete_snapshot(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("SnapshotId")?;
        let force = p.opt_bool("Force")?.unwrap_or(false);
        p.finish()?;
        let check = |txn: &redb::WriteTransaction| {
            let s = self.find_snapshot(txn, &id, &account)?;
            same_region(region.as_deref(), &s.region, "InvalidSnapshotId.NotFound", &id)?;
            let users: Vec<String> = catalog::list::<DiskRecord>(txn)?
                .into_iter()
                .filter(|d| d.source_snapshot.as_deref() == Some(id.as_str()))
                .map(|d| d.id)
                .collect();
            if !users.is_empty() && !force {
                return Err(ControlError::state(
                    "IncorrectSnapshotStatus.UsedByDisk",
                    format!(
                        "snapshot {id} was used to create disk(s) {}; pass Force=true to delete it anyway \
                         (those disks can then no longer be re-initialized)",
                        users.join(", ")
                    ),
                ));
            }
            let shred = match &s.encryption {
                Some(enc) => self.would_shred(txn, enc)?,
                None => None,
            };
            Ok((s, shred))
        };
        let (_, shred) = self.peek(check)?;
        self.audit_shred(shred.as_ref(), &id)?;
        let txn = self.begin()?;
        let (s, _) = check(&txn)?;
        self.pool.delete_volume(&txn, &id)?;
        catalog::remove::<SnapshotRecord>(&txn, &id)?;
        let shredded = match &s.encryption {
            Some(enc) => self.key_unref(&txn, enc, shred.is_some())?,
            None => false,
        };
        txn.commit()?;
        Ok(json!({ "SnapshotId": id, "KeyShredded": shredded }))
    }

    pub(super) fn describe_snapshots(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let ids = p.opt_str_list("SnapshotIds")?;
        let disk = p.opt_str("DiskId")?;
        let encrypted = p.opt_bool("Encrypted")?;
        p.finish()?;
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let snaps: Vec<SnapshotRecord> = catalog::list_r(&r)?;
        let out: Vec<Value> = snaps
            .iter()
            .filter(|s| {
                s.account == account
                    && region.as_ref().is_none_or(|r| *r == s.region)
                    && ids.as_ref().is_none_or(|l| l.contains(&s.id))
                    && disk.as_ref().is_none_or(|d| *d == s.source_disk)
                    && encrypted.is_none_or(|e| e == s.encryption.is_some())
            })
            .map(view::snapshot)
            .collect();
        Ok(json!({ "TotalCount": out.len(), "Snapshots": { "Snapshot": out } }))
    }
}
