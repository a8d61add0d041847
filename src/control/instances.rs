//! CreateInstance, DescribeInstances, DeleteInstance. An instance is a VM on this host:
//! a system disk (blank or from an image; never encrypted) plus data disks
//! (`DataDisk.n.*`, encrypted or from snapshots), all attached at creation.

use serde_json::{json, Value};

use super::disks::{parse_spec, DiskSpec, KeyPlan};
use super::params::check_text;
use super::{view, Control, ControlError, Params};
use crate::catalog::{self, AttachmentRecord, DiskRecord, DiskRole, InstanceRecord};

/// ECS's limit on data disks per instance at creation.
const MAX_DATA_DISKS: usize = 16;

/// CreateInstance's `SystemDisk.*` and `DataDisk.n.*` (the rest of `p` must be read
/// already: this finishes it): the system disk's spec (from `image_id`, else blank,
/// 20 GiB by default) and the data disks'.
fn instance_disk_specs(
    mut p: Params,
    account: &str,
    region: &str,
    image_id: &Option<String>,
) -> Result<(DiskSpec, Vec<DiskSpec>), ControlError> {
    let mut sys = p.group("SystemDisk")?;
    let mut sys_spec = parse_spec(&mut sys, account, region, "Category", Some(DiskRole::System))?;
    sys.finish()?;
    if sys_spec.snapshot_id.is_some() {
        return Err(ControlError::param(
            "InvalidParameter.SystemDiskSnapshotId",
            "SystemDisk.SnapshotId: a system disk comes from ImageId (create an image from the snapshot)",
        ));
    }
    sys_spec.image_id = image_id.clone();
    let mut data_specs = Vec::new();
    for mut g in p.indexed("DataDisk")? {
        data_specs.push(parse_spec(&mut g, account, region, "Category", Some(DiskRole::Data))?);
        g.finish()?;
    }
    p.finish()?;
    if data_specs.len() > MAX_DATA_DISKS {
        return Err(ControlError::param(
            "InvalidParameter.DataDiskCount",
            format!("at most {MAX_DATA_DISKS} data disks per instance"),
        ));
    }
    if sys_spec.encrypted == Some(true) {
        return Err(ControlError::limit(
            "InvalidOperation.EncryptedSystemDisk",
            "system disks cannot be encrypted; drop SystemDisk.Encrypted and encrypt data disks \
             (DataDisk.n.Encrypted=true)",
        ));
    }
    if sys_spec.size.is_none() && image_id.is_none() {
        sys_spec.size = Some(20 << 30);
    }
    Ok((sys_spec, data_specs))
}

impl Control {
    pub(super) fn create_instance(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        p.refuse_kms_key_id()?;
        let name = p.opt_str("InstanceName")?.unwrap_or_default();
        check_text("InstanceName", &name)?;
        let image_id = p.opt_str("ImageId")?;
        let _ty = p.opt_str("InstanceType")?;
        let (sys_spec, data_specs) = instance_disk_specs(p, &account, &region, &image_id)?;

        let (sys_plan, plans) = self.peek(|txn| {
            let sys_plan = self.plan_disk(txn, sys_spec.clone())?;
            let mut plans = Vec::new();
            for s in &data_specs {
                plans.push(self.plan_disk(txn, s.clone())?);
            }
            Ok((sys_plan, plans))
        })?;
        // Every limit passed. One KMS call per encrypted data disk (its key is generated
        // or unwrapped once and used for the attach as well): reserve them all first.
        let units = plans.iter().filter(|p| p.encrypted).count() as u32;
        let res = if units > 0 {
            Some(self.kms_reserve(&account, &region, units)?)
        } else {
            None
        };
        let instance_id = super::util::new_id("i");
        let none = || KeyPlan {
            enc: None,
            new_row: None,
            key: None,
        };
        let sys_id = super::util::new_id("d");
        // The KMS calls, before the write transaction.
        let mut keyed = Vec::new();
        for plan in &plans {
            let id = super::util::new_id("d");
            let keys = match &res {
                Some(r) if plan.encrypted => self.plan_key(plan, &id, r, true)?,
                _ => none(),
            };
            keyed.push((id, keys));
        }
        let txn = self.begin()?;
        let sys_plan = self.replan(&txn, sys_spec, &sys_plan)?;
        let sys_rec = self.apply_disk(&txn, &sys_plan, &sys_id, &none())?;
        let mut disks: Vec<(DiskRecord, KeyPlan)> = vec![(sys_rec, none())];
        for ((id, keys), (spec, first)) in keyed.into_iter().zip(data_specs.into_iter().zip(&plans)) {
            let plan = self.replan(&txn, spec, first)?;
            let rec = self.apply_disk(&txn, &plan, &id, &keys)?;
            disks.push((rec, keys));
        }
        let now = super::util::now_rfc3339();
        catalog::put(
            &txn,
            &InstanceRecord {
                id: instance_id.clone(),
                account,
                region,
                name,
                system_disk: sys_id.clone(),
                image_id,
                created_at: now.clone(),
            },
        )?;
        for (d, _) in &disks {
            catalog::put(
                &txn,
                &AttachmentRecord {
                    disk_id: d.id.clone(),
                    instance_id: instance_id.clone(),
                    attached_at: now.clone(),
                },
            )?;
        }
        txn.commit()?;
        // Volumes exist now: put every disk on the data path with the keys at hand.
        let data_ids: Vec<String> = disks.iter().skip(1).map(|(d, _)| d.id.clone()).collect();
        let failed = self.export_instance_disks(&instance_id, disks);
        // The instance's socket serves them (and exists) before the reply.
        self.exports.instances().get_or_create(&instance_id);
        self.exports.instances().wait_bound(std::time::Duration::from_secs(1));
        Ok(json!({
            "Socket": crate::export::instance_socket(&self.cfg.data_dir, &instance_id).display().to_string(),
            "InstanceId": instance_id,
            "SystemDiskId": sys_id,
            "DataDiskIds": data_ids,
            "ExportFailures": failed,
        }))
    }

    /// Puts an instance's new disks on the data path with their keys; the failures, as
    /// the reply lists them.
    fn export_instance_disks(&self, instance_id: &str, disks: Vec<(DiskRecord, KeyPlan)>) -> Vec<Value> {
        let mut failed = Vec::new();
        for (d, keys) in disks {
            match self
                .build_export(&d, keys.key, None)
                .and_then(|e| self.exports.add(e).map_err(|e| ControlError::DataPath(e.to_string())))
            {
                Ok(()) => {
                    self.instance_add(instance_id, &d.id);
                }
                Err(e) => failed.push(json!({ "DiskId": d.id, "Code": e.code(), "Message": e.to_string() })),
            }
        }
        failed
    }

    pub(super) fn describe_instances(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let ids = p.opt_str_list("InstanceIds")?;
        p.finish()?;
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let insts: Vec<InstanceRecord> = catalog::list_r(&r)?;
        let atts: Vec<AttachmentRecord> = catalog::list_r(&r)?;
        let out: Vec<Value> = insts
            .iter()
            .filter(|i| {
                i.account == account
                    && region.as_ref().is_none_or(|r| *r == i.region)
                    && ids.as_ref().is_none_or(|l| l.contains(&i.id))
            })
            .map(|i| {
                let data: Vec<String> = atts
                    .iter()
                    .filter(|a| a.instance_id == i.id && a.disk_id != i.system_disk)
                    .map(|a| a.disk_id.clone())
                    .collect();
                view::instance(i, &data)
            })
            .collect();
        Ok(json!({ "TotalCount": out.len(), "Instances": { "Instance": out } }))
    }

    /// Detaches every disk (one KMS call per encrypted one, reserved up front), deletes
    /// the system disk and the instance. Data disks stay, detached.
    pub(super) fn delete_instance(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let id = p.str("InstanceId")?;
        let _force = p.opt_bool("Force")?;
        p.finish()?;
        let check = |txn: &redb::WriteTransaction| {
            let inst = self.find_instance(txn, &id, &account)?;
            let atts: Vec<AttachmentRecord> = catalog::list::<AttachmentRecord>(txn)?
                .into_iter()
                .filter(|a| a.instance_id == id)
                .collect();
            let mut disks = Vec::new();
            for a in &atts {
                disks.push(self.find_disk(txn, &a.disk_id, &account)?);
            }
            let sys = self.find_disk(txn, &inst.system_disk, &account)?;
            let shred = match &sys.encryption {
                Some(enc) => self.would_shred(txn, enc)?,
                None => None,
            };
            Ok((inst, disks, sys, shred))
        };
        let (inst, disks, sys, shred) = self.peek(check)?;
        let units = disks.iter().filter(|d| d.encryption.is_some()).count() as u32;
        // Fail on quota before the first detach; the KMS calls before the write transaction.
        let res = if units > 0 {
            Some(self.kms_reserve(&inst.account, &inst.region, units)?)
        } else {
            None
        };
        for d in &disks {
            self.meter_use(d, res.as_ref())?;
        }
        self.audit_shred(shred.as_ref(), &sys.id)?;
        let txn = self.begin()?;
        let (_, disks, sys, _) = check(&txn)?;
        let mut to_unexport = Vec::new();
        for d in &disks {
            if self.detach_in(&txn, d, &id)? {
                to_unexport.push(d.id.clone());
            }
        }
        // The system disk's volume can only go once it is off the data path; put it back
        // if anything fails before the commit.
        // The instance's socket goes first (its exports hold the disks' volumes open).
        let on_socket = self.exports.instances().get(&id).map(|r| r.names()).unwrap_or_default();
        for d in &on_socket {
            self.instance_drop(&id, d);
        }
        self.exports.instances().remove(&id);
        let sys_export = self.exports.remove(&sys.id).is_some();
        let restore = || {
            if sys_export {
                if let Ok(x) = self.build_export(&sys, None, None) {
                    let _ = self.exports.add(x);
                }
            }
            for d in &on_socket {
                let _ = self.instance_add(&id, d);
            }
        };
        let deleted = (|| {
            self.pool.delete_volume(&txn, &sys.id)?;
            catalog::remove::<DiskRecord>(&txn, &sys.id)?;
            Ok::<(), ControlError>(())
        })();
        if let Err(e) = deleted {
            restore();
            return Err(e);
        }
        if let Some(enc) = &sys.encryption {
            self.key_unref(&txn, enc, shred.is_some())?;
        }
        catalog::remove::<InstanceRecord>(&txn, &id)?;
        if let Err(e) = txn.commit() {
            restore();
            return Err(e.into());
        }
        for d in &to_unexport {
            self.exports.remove(d);
        }
        Ok(json!({ "InstanceId": id, "DeletedSystemDiskId": sys.id }))
    }
}
