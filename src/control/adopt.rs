//! `AdoptDisk` (a sealdisk extension; RBD backend only): registers in this host's
//! catalog a disk image that another host made in the shared RBD pool, from what that
//! host wrote in the image's metadata (`sealdisk.*`: account, region, category, size,
//! key id, wrapped key and its format). The caller's account and region must be the
//! disk's, and an encrypted disk's key must unwrap through this host's KMS (the shared
//! one, e.g. OpenBao transit). The image is then this host's (`sealdisk.host`): the
//! other host no longer removes it. With `AttachDisk` this moves a disk between hosts;
//! while the other host still has it attached, the RBD exclusive lock refuses the attach
//! here (`IncorrectDiskStatus.InUse`).

use serde_json::{json, Value};

use super::{Control, ControlError, Params};
use crate::catalog::{self, Category, DiskKind, DiskRecord, DiskRole, Encryption, KeyRecord};
use crate::kms::{CallOpts, KeyContext, WrappedKey};
use crate::store::Store;

impl Control {
    pub(super) fn adopt_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        let disk_id = p.str("DiskId")?;
        p.finish()?;
        let Store::Rbd(rbd) = &self.pool else {
            return Err(ControlError::state(
                "InvalidOperation.Backend",
                "AdoptDisk needs the RBD backend (serve --backend rbd)",
            ));
        };
        let well_formed = !disk_id.is_empty()
            && disk_id.len() <= 128
            && disk_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !well_formed {
            return Err(ControlError::NotFound {
                code: "InvalidDiskId.NotFound",
                id: disk_id,
            });
        }
        let meta = rbd.image_meta(&disk_id)?.ok_or_else(|| ControlError::NotFound {
            code: "InvalidDiskId.NotFound",
            id: disk_id.clone(),
        })?;
        let get = |k: &str| {
            meta.get(k).cloned().ok_or_else(|| {
                ControlError::state(
                    "InvalidDisk.NotAdoptable",
                    format!("image {disk_id} has no sealdisk.{k} metadata: not a disk made by sealdisk"),
                )
            })
        };
        if get("account")? != account || get("region")? != region {
            return Err(ControlError::CrossAccount {
                what: "disk",
                id: disk_id,
            });
        }
        let bad = |k: &str| {
            ControlError::state(
                "InvalidDisk.NotAdoptable",
                format!("image {disk_id}: sealdisk.{k} is malformed"),
            )
        };
        let size: u64 = get("size")?.parse().map_err(|_| bad("size"))?;
        let category = Category::parse(&get("category")?).ok_or_else(|| bad("category"))?;
        let key = match meta.get("wrapped_key") {
            None => None,
            Some(w) => {
                let wrapped: WrappedKey = serde_json::from_str(w).map_err(|_| bad("wrapped_key"))?;
                let format: u32 = get("key_format")?.parse().map_err(|_| bad("key_format"))?;
                if format != wrapped.format {
                    return Err(bad("key_format"));
                }
                let enc = Encryption {
                    key_id: get("key_id")?,
                    cmk_id: wrapped.cmk_id.clone(),
                };
                // The key must unwrap here (shared KMS), or the disk is useless here.
                let res = self.kms_reserve(&account, &region, 1)?;
                let ctx = KeyContext::new(&account, &region, &enc.key_id);
                drop(
                    self.kms
                        .unwrap_data_key(&ctx, &wrapped, CallOpts::disk(&disk_id).reserved(&res))?,
                );
                Some((enc, wrapped))
            }
        };
        let txn = self.begin()?;
        if catalog::get::<DiskRecord>(&txn, &disk_id)?.is_some() {
            return Err(ControlError::state(
                "InvalidDiskId.Exists",
                format!("disk {disk_id} is already in this host's catalog"),
            ));
        }
        rbd.adopt_volume(&txn, &disk_id, size)?;
        if let Some((enc, wrapped)) = &key {
            if catalog::get::<KeyRecord>(&txn, &enc.key_id)?.is_none() {
                catalog::put(
                    &txn,
                    &KeyRecord {
                        key_id: enc.key_id.clone(),
                        account: account.clone(),
                        region: region.clone(),
                        wrapped: wrapped.clone(),
                        refs: 0,
                        origin_disk: disk_id.clone(),
                        created_at: super::util::now_rfc3339(),
                    },
                )?;
            }
            self.key_ref(&txn, enc)?;
        }
        let rec = DiskRecord {
            id: disk_id.clone(),
            account,
            region,
            name: String::new(),
            description: String::new(),
            size,
            category,
            kind: DiskKind::Cloud,
            role: DiskRole::Data,
            encryption: key.map(|k| k.0),
            source_snapshot: None,
            source_image: None,
            multi_attach: false,
            qos: self.cfg.qos.caps(category, size),
            created_at: super::util::now_rfc3339(),
        };
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(json!({
            "DiskId": disk_id,
            "Encrypted": rec.encryption.is_some(),
            "PreviousHost": meta.get("host"),
        }))
    }
}
