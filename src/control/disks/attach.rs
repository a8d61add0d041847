//! AttachDisk and DetachDisk: putting a disk on the data path and taking it off.
//!
//! Attach unwraps the data key (one metered KMS call) into secret memory, builds the
//! disk's XTS engine and stacks `iostat → qos → crypto(4096, plain64) → volume`, and registers one export
//! per disk (a MultiAttach disk attached to several instances still has one export).
//! Detach removes the export; the key is wiped when the last `Arc<Xts>` (held by the
//! export and any frontend connection still draining) drops.

use std::sync::Arc;

use redb::WriteTransaction;
use serde_json::{json, Value};

use crate::bdev::crypto::CryptoBdev;
use crate::bdev::iostat::StatsBdev;
use crate::bdev::qos::{QosBdev, QosLimits};
use crate::bdev::BdevRef;
use crate::catalog::{self, AttachmentRecord, DiskRecord};
use crate::control::{Control, ControlError, Params, ENCRYPTION_SECTOR};
use crate::export::Export;
use crate::kms::{CallOpts, DataKey, KeyContext, Reservation};

/// Disks put back on the data path, and the ones that failed (disk id, error).
pub(in crate::control) type Restored = (Vec<String>, Vec<(String, ControlError)>);

impl Control {
    /// The block device of a disk for the data path. With `key` the plaintext key is
    /// already at hand (CreateInstance); otherwise an encrypted disk's key is unwrapped
    /// (one KMS call, from `res` if given).
    pub(in crate::control) fn build_export(
        &self,
        d: &DiskRecord,
        key: Option<DataKey>,
        res: Option<&Reservation>,
    ) -> Result<Export, ControlError> {
        let vol = self.pool.bdev(&d.id)?;
        let bdev: BdevRef = match &d.encryption {
            None => vol,
            Some(enc) => {
                let key = match key {
                    Some(k) => k,
                    None => {
                        // A read transaction: the caller may hold the write transaction.
                        let r = self
                            .db
                            .begin_read()
                            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
                        let row = catalog::get_r::<crate::catalog::KeyRecord>(&r, &enc.key_id)?.ok_or_else(|| {
                            ControlError::Catalog(catalog::CatalogError::Corrupt(format!(
                                "wrapped key {} is missing; run `sealdisk check`",
                                enc.key_id
                            )))
                        })?;
                        drop(r);
                        let ctx = KeyContext::new(&row.account, &row.region, &row.key_id);
                        let mut opts = CallOpts::disk(&d.id);
                        if let Some(r) = res {
                            opts = opts.reserved(r);
                        }
                        self.kms.unwrap_data_key(&ctx, &row.wrapped, opts)?
                    }
                };
                let xts = Arc::new(
                    key.xts()
                        .map_err(|e| ControlError::DataPath(format!("XTS engine: {e}")))?,
                );
                drop(key);
                Arc::new(
                    CryptoBdev::new(vol, xts, ENCRYPTION_SECTOR).map_err(|e| ControlError::DataPath(e.to_string()))?,
                )
            }
        };
        // QoS caps sit on top, so a throttled request holds no bounce buffer.
        let bdev: BdevRef = match (&d.qos, self.cfg.qos.enabled) {
            (Some(c), true) => Arc::new(QosBdev::new(
                bdev,
                QosLimits {
                    iops: Some(c.iops),
                    bytes_per_sec: Some(c.bandwidth_bytes),
                },
            )),
            _ => bdev,
        };
        // Statistics on top of all: the latency the frontend sees, QoS holds included.
        let top = StatsBdev::new(bdev);
        let stats = top.stats().clone();
        Ok(Export::new(&d.id, Arc::new(top), false).with_stats(stats))
    }

    /// Records an attachment in `txn` after checking it is allowed.
    pub(in crate::control) fn check_attach(
        &self,
        txn: &WriteTransaction,
        d: &DiskRecord,
        instance_id: &str,
    ) -> Result<Vec<AttachmentRecord>, ControlError> {
        let inst = self.find_instance(txn, instance_id, &d.account)?;
        if inst.region != d.region {
            return Err(ControlError::state(
                "InvalidOperation.RegionMismatch",
                format!(
                    "disk {} is in {} and instance {} in {}; a disk attaches only in its own region",
                    d.id, d.region, inst.id, inst.region
                ),
            ));
        }
        if let Some(m) = self.migration_target_of(txn, &d.id)? {
            return Err(ControlError::state(
                "IncorrectDiskStatus.Migrating",
                format!(
                    "disk {} is the target of a migration ({m}) that has not finished; let it finish (run it \
                     again to resume) or abandon it first",
                    d.id
                ),
            ));
        }
        let atts: Vec<AttachmentRecord> = catalog::list::<AttachmentRecord>(txn)?
            .into_iter()
            .filter(|a| a.disk_id == d.id)
            .collect();
        if atts.iter().any(|a| a.instance_id == instance_id) {
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                format!("disk {} is already attached to instance {instance_id}", d.id),
            ));
        }
        if !atts.is_empty() && !d.multi_attach {
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                format!(
                    "disk {} is attached to instance {}; detach it first, or use a MultiAttach (shared) disk",
                    d.id, atts[0].instance_id
                ),
            ));
        }
        Ok(atts)
    }

    pub(in crate::control) fn attach_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let disk_id = p.str("DiskId")?;
        let instance_id = p.str("InstanceId")?;
        let _ = p.opt_bool("DeleteWithInstance")?;
        p.finish()?;
        let check = |txn: &WriteTransaction| {
            let d = self.find_disk(txn, &disk_id, &account)?;
            let atts = self.check_attach(txn, &d, &instance_id)?;
            let first = atts.is_empty() && self.exports.get(&disk_id).is_none();
            Ok::<_, ControlError>((d, first))
        };
        let (d, first) = self.peek(check)?;
        let res = match &d.encryption {
            Some(_) => Some(self.kms_reserve(&d.account, &d.region, 1)?),
            None => None,
        };
        // The KMS call (unwrap, or metering the new use of a shared disk) before the
        // write transaction.
        let export = if first {
            Some(self.build_export(&d, None, res.as_ref())?)
        } else {
            self.meter_use(&d, res.as_ref())?;
            None
        };
        let txn = self.begin()?;
        check(&txn)?;
        catalog::put(
            &txn,
            &AttachmentRecord {
                disk_id: disk_id.clone(),
                instance_id: instance_id.clone(),
                attached_at: crate::control::util::now_rfc3339(),
            },
        )?;
        if let Some(e) = export {
            self.exports
                .add(e)
                .map_err(|e| ControlError::state("IncorrectDiskStatus", e.to_string()))?;
        }
        if let Err(e) = txn.commit() {
            if first {
                self.exports.remove(&disk_id);
            }
            return Err(e.into());
        }
        let vhost = self.instance_add(&instance_id, &disk_id);
        self.exports.instances().wait_bound(std::time::Duration::from_secs(1));
        let mut reply = json!({
            "DiskId": disk_id,
            "InstanceId": instance_id,
            "Export": disk_id,
            "Socket": crate::export::instance_socket(&self.cfg.data_dir, &instance_id).display().to_string(),
        });
        if let Some(p) = vhost {
            reply["VhostSocket"] = json!(p.display().to_string());
        }
        tracing::info!(
            disk = %disk_id,
            instance = %instance_id,
            account = %account,
            encrypted = d.encryption.is_some(),
            new_export = first,
            "disk attached"
        );
        Ok(reply)
    }

    pub(in crate::control) fn detach_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let disk_id = p.str("DiskId")?;
        let instance_id = p.str("InstanceId")?;
        p.finish()?;
        let check = |txn: &WriteTransaction| {
            let d = self.find_disk(txn, &disk_id, &account)?;
            self.find_instance(txn, &instance_id, &account)?;
            self.attached_to(txn, &d, &instance_id)?;
            Ok::<_, ControlError>(d)
        };
        let d = self.peek(check)?;
        self.meter_use(&d, None)?;
        let txn = self.begin()?;
        let d = check(&txn)?;
        let last = self.detach_in(&txn, &d, &instance_id)?;
        txn.commit()?;
        self.instance_drop(&instance_id, &disk_id);
        if last {
            self.exports.remove(&disk_id);
        }
        tracing::info!(
            disk = %disk_id,
            instance = %instance_id,
            account = %account,
            export_removed = last,
            "disk detached"
        );
        Ok(json!({ "DiskId": disk_id, "InstanceId": instance_id, "Detached": true }))
    }

    /// Puts an attached disk on its instance's sockets: the instance's NBD socket (an
    /// export of its own there, so detaching it from this instance ends only this
    /// instance's connections) and its own vhost-user-blk socket, whose path is returned.
    pub(in crate::control) fn instance_add(&self, instance_id: &str, disk_id: &str) -> Option<std::path::PathBuf> {
        let e = self.exports.get(disk_id)?;
        let _ =
            self.exports
                .instances()
                .get_or_create(instance_id)
                .add(Export::new(disk_id, e.bdev.clone(), e.read_only));
        let v = self.vhost.as_ref()?;
        match v.add(instance_id, Export::new(disk_id, e.bdev.clone(), e.read_only)) {
            Ok(p) => Some(p),
            Err(err) => {
                tracing::error!(disk = disk_id, instance = instance_id, error = %err, "vhost-user: cannot serve the disk to its instance");
                None
            }
        }
    }

    /// Takes a disk off its instance's sockets: its NBD connections there end, and its
    /// vhost-user device drains its requests and stops.
    pub(in crate::control) fn instance_drop(&self, instance_id: &str, disk_id: &str) {
        if let Some(v) = &self.vhost {
            v.remove(instance_id, disk_id);
        }
        if let Some(r) = self.exports.instances().get(instance_id) {
            r.remove(disk_id);
        }
    }

    /// The disk's attachments, if one of them is to `instance_id`; else an error.
    fn attached_to(
        &self,
        txn: &WriteTransaction,
        d: &DiskRecord,
        instance_id: &str,
    ) -> Result<Vec<AttachmentRecord>, ControlError> {
        let atts: Vec<AttachmentRecord> = catalog::list::<AttachmentRecord>(txn)?
            .into_iter()
            .filter(|a| a.disk_id == d.id)
            .collect();
        if !atts.iter().any(|a| a.instance_id == instance_id) {
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                format!("disk {} is not attached to instance {instance_id}", d.id),
            ));
        }
        Ok(atts)
    }

    /// Removes one attachment in `txn` (the caller metered the KMS use first,
    /// [`Control::meter_use`]); `true` if it was the last, so the caller removes the
    /// export after committing.
    pub(in crate::control) fn detach_in(
        &self,
        txn: &WriteTransaction,
        d: &DiskRecord,
        instance_id: &str,
    ) -> Result<bool, ControlError> {
        let atts = self.attached_to(txn, d, instance_id)?;
        catalog::remove::<AttachmentRecord>(txn, &catalog::attachment_key(&d.id, instance_id))?;
        Ok(atts.len() == 1)
    }

    /// After a restart: puts every disk the catalog says is attached back on the data
    /// path. Returns the restored disk ids and the failures (disk id, error).
    pub fn restore_attachments(&self) -> Result<Restored, ControlError> {
        let _g = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let atts: Vec<AttachmentRecord> = catalog::list_r(&r)?;
        let mut ids: Vec<String> = atts.iter().map(|a| a.disk_id.clone()).collect();
        ids.dedup();
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for id in ids {
            if self.exports.get(&id).is_some() {
                continue;
            }
            let Some(d) = catalog::get_r::<DiskRecord>(&r, &id)? else {
                failed.push((
                    id.clone(),
                    ControlError::NotFound {
                        code: "InvalidDiskId.NotFound",
                        id,
                    },
                ));
                continue;
            };
            match self
                .build_export(&d, None, None)
                .and_then(|e| self.exports.add(e).map_err(|e| ControlError::DataPath(e.to_string())))
            {
                Ok(()) => ok.push(id),
                Err(e) => failed.push((id, e)),
            }
        }
        for a in &atts {
            self.instance_add(&a.instance_id, &a.disk_id);
        }
        self.exports.instances().wait_bound(std::time::Duration::from_secs(1));
        Ok((ok, failed))
    }

    /// Shutdown: takes every disk off the data path (the catalog keeps the attachments,
    /// so a restart restores them). Keys are wiped as the exports drop.
    pub fn detach_all_exports(&self) -> Vec<String> {
        let _g = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = &self.vhost {
            v.remove_all();
        }
        self.exports.instances().clear();
        let names = self.exports.names();
        for n in &names {
            self.exports.remove(n);
        }
        names
    }
}
