//! ActivateKms, DescribeKmsKey, DescribeKmsUsage, ScheduleKeyDeletion (always refused).

use serde_json::{json, Value};

use super::{Control, ControlError, Params};
use crate::catalog::{self, ActivationRecord, DiskRecord, KeyRecord};

impl Control {
    pub(super) fn activate_kms(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        p.finish()?;
        self.kms.activate(&account, &region)?;
        let txn = self.begin()?;
        let key = format!("{account}/{region}");
        let rec = match catalog::get::<ActivationRecord>(&txn, &key)? {
            Some(r) => r,
            None => {
                let r = ActivationRecord {
                    account: account.clone(),
                    region: region.clone(),
                    activated_at: super::util::now_rfc3339(),
                };
                catalog::put(&txn, &r)?;
                r
            }
        };
        txn.commit()?;
        Ok(json!({ "AccountId": account, "RegionId": region, "Activated": true, "ActivatedAt": rec.activated_at }))
    }

    pub(super) fn describe_kms_key(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        p.finish()?;
        let info = self.kms.describe_service_key(&account, &region)?;
        Ok(json!({
            "KeyMetadata": {
                "KeyId": info.id,
                "AccountId": info.account,
                "RegionId": info.region,
                "CreationDate": info.created_at,
                "Backend": info.backend.to_string(),
                "KeyUsage": "ENCRYPT/DECRYPT",
                "KeySpec": "Aliyun_AES_256",
                "Creator": "ECS",
                "KeyState": "Enabled",
                "DeletionProtection": "Enabled",
                "Description": "service key of the disks of this account and region; cannot be deleted, chosen or replaced",
            }
        }))
    }

    pub(super) fn describe_kms_usage(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        p.finish()?;
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let keys: Vec<KeyRecord> = catalog::list_r(&r)?;
        let disks: Vec<DiskRecord> = catalog::list_r(&r)?;
        let acts: Vec<ActivationRecord> = catalog::list_r(&r)?;
        let usage = self.kms.usage(&account);
        let mut regions: Vec<String> = usage.iter().map(|u| u.region.clone()).collect();
        regions.extend(acts.iter().filter(|a| a.account == account).map(|a| a.region.clone()));
        regions.extend(keys.iter().filter(|k| k.account == account).map(|k| k.region.clone()));
        regions.sort();
        regions.dedup();
        if let Some(want) = &region {
            regions.retain(|r| r == want);
        }
        let out: Vec<Value> = regions
            .iter()
            .map(|reg| {
                let u = usage.iter().find(|u| &u.region == reg);
                json!({
                    "RegionId": reg,
                    "Activated": self.kms.is_activated(&account, reg),
                    "Calls": u.map(|u| u.calls).unwrap_or(0),
                    "Throttled": u.map(|u| u.throttled).unwrap_or(0),
                    "Available": u.map(|u| u.available),
                    "DataKeys": keys.iter().filter(|k| k.account == account && &k.region == reg).count(),
                    "EncryptedDisks": disks.iter().filter(|d| d.account == account && &d.region == reg
                        && d.encryption.is_some()).count(),
                })
            })
            .collect();
        Ok(json!({ "AccountId": account, "Regions": out }))
    }

    /// The service key can never be deleted: the KMS refuses and audits the attempt.
    pub(super) fn schedule_key_deletion(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        let _key = p.opt_str("KeyId")?;
        let _days = p.opt_u64("PendingWindowInDays")?;
        p.finish()?;
        self.kms.delete_service_key(&account, &region)?;
        Ok(json!({}))
    }
}
