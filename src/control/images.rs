//! CreateImage, ModifyImageSharePermission, CopyImage, ExportImage, DescribeImages,
//! DeleteImage. An image is its own copy-on-write volume, cloned from a snapshot (or
//! from another image by CopyImage). Images of encrypted snapshots keep the lineage key
//! and cannot be shared, copied or exported.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::job::{read_ops, run_job};
use super::params::{check_account, check_region, check_text};
use super::{same_region, view, Control, ControlError, Params};
use crate::bdev::BdevRef;
use crate::catalog::{self, ImageRecord};
use crate::reactor::Reactors;

/// Bytes read per reactor call when exporting.
const EXPORT_BATCH: u64 = 8 << 20;

impl Control {
    pub(super) fn create_image(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let snap_id = p.str("SnapshotId")?;
        let name = p.opt_str("ImageName")?.unwrap_or_default();
        let _desc = p.opt_str("Description")?;
        p.finish()?;
        check_text("ImageName", &name)?;
        let txn = self.begin()?;
        let s = self.find_snapshot(&txn, &snap_id, &account)?;
        same_region(region.as_deref(), &s.region, "InvalidSnapshotId.NotFound", &snap_id)?;
        let id = super::util::new_id("m");
        self.pool.clone_volume(&txn, &snap_id, &id, s.size)?;
        if let Some(enc) = &s.encryption {
            self.key_ref(&txn, enc)?;
        }
        let rec = ImageRecord {
            id: id.clone(),
            account,
            region: s.region.clone(),
            name,
            source_snapshot: Some(snap_id),
            source_image: None,
            size: s.size,
            encryption: s.encryption.clone(),
            shared_with: Vec::new(),
            created_at: super::util::now_rfc3339(),
        };
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(json!({ "ImageId": id, "Encrypted": rec.encryption.is_some() }))
    }

    pub(super) fn modify_image_share_permission(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let id = p.str("ImageId")?;
        let add = p.opt_str_list("AddAccount")?.unwrap_or_default();
        let remove = p.opt_str_list("RemoveAccount")?.unwrap_or_default();
        p.finish()?;
        for a in add.iter().chain(&remove) {
            check_account(a)?;
        }
        let txn = self.begin()?;
        let mut m = self.find_image(&txn, &id, &account, false)?;
        if m.encryption.is_some() && !add.is_empty() {
            return Err(ControlError::limit(
                "InvalidOperation.EncryptedImageShare",
                format!(
                    "image {id} comes from an encrypted snapshot and cannot be shared; share an image made from \
                     an unencrypted snapshot"
                ),
            ));
        }
        for a in add {
            if a != account && !m.shared_with.contains(&a) {
                m.shared_with.push(a);
            }
        }
        m.shared_with.retain(|a| !remove.contains(a));
        m.shared_with.sort();
        catalog::put(&txn, &m)?;
        txn.commit()?;
        Ok(json!({ "ImageId": id, "SharedWith": m.shared_with }))
    }

    pub(super) fn copy_image(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("ImageId")?;
        let dest = p.str("DestinationRegionId")?;
        let name = p.opt_str("DestinationImageName")?;
        let _desc = p.opt_str("DestinationDescription")?;
        p.refuse_kms_key_id()?;
        let encrypted = p.opt_bool("Encrypted")?;
        p.finish()?;
        check_region(&dest, "DestinationRegionId")?;
        let txn = self.begin()?;
        let m = self.find_image(&txn, &id, &account, false)?;
        same_region(region.as_deref(), &m.region, "InvalidImageId.NotFound", &id)?;
        if m.encryption.is_some() {
            return Err(ControlError::limit(
                "InvalidOperation.EncryptedImageCopy",
                format!(
                    "image {id} comes from an encrypted snapshot and cannot be copied (its key belongs to region {})",
                    m.region
                ),
            ));
        }
        if encrypted == Some(true) {
            return Err(ControlError::limit(
                "InvalidOperation.EncryptionConversion",
                "an unencrypted image cannot be copied into an encrypted one",
            ));
        }
        let new_id = super::util::new_id("m");
        self.pool.clone_volume(&txn, &id, &new_id, m.size)?;
        let rec = ImageRecord {
            id: new_id.clone(),
            account,
            region: dest.clone(),
            name: name.unwrap_or_else(|| m.name.clone()),
            source_snapshot: None,
            source_image: Some(id.clone()),
            size: m.size,
            encryption: None,
            shared_with: Vec::new(),
            created_at: super::util::now_rfc3339(),
        };
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(json!({ "ImageId": new_id, "RegionId": dest }))
    }

    pub(super) fn export_image(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("ImageId")?;
        let bucket = p.opt_str("OSSBucket")?.unwrap_or_else(|| "exports".into());
        let prefix = p.opt_str("OSSPrefix")?.unwrap_or_default();
        let format = p.opt_str("ImageFormat")?.unwrap_or_else(|| "raw".into());
        p.finish()?;
        let ok_name =
            |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if bucket.is_empty() || !ok_name(&bucket, 63) || bucket.starts_with('.') {
            return Err(ControlError::param(
                "InvalidParameter.OSSBucket",
                "OSSBucket: 1-63 characters of A-Z a-z 0-9 . _ - (a directory under DATA_DIR/exports)",
            ));
        }
        if !ok_name(&prefix, 64) || prefix.starts_with('.') {
            return Err(ControlError::param(
                "InvalidParameter.OSSPrefix",
                "OSSPrefix: at most 64 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if !format.eq_ignore_ascii_case("raw") {
            return Err(ControlError::param(
                "InvalidParameter.ImageFormat",
                "ImageFormat: only raw is supported (convert with qemu-img afterwards)",
            ));
        }
        let txn = self.begin()?;
        let m = self.find_image(&txn, &id, &account, false)?;
        same_region(region.as_deref(), &m.region, "InvalidImageId.NotFound", &id)?;
        if m.encryption.is_some() {
            return Err(ControlError::limit(
                "InvalidOperation.EncryptedImageExport",
                format!("image {id} comes from an encrypted snapshot and cannot be exported"),
            ));
        }
        drop(txn);
        let reactors = self.reactors.clone().ok_or_else(|| {
            ControlError::DataPath("ExportImage needs the reactors (run it through the daemon)".into())
        })?;
        let dir = self.cfg.data_dir.join(crate::layout::EXPORTS_DIR).join(&bucket);
        std::fs::create_dir_all(&dir).map_err(|e| ControlError::DataPath(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("{prefix}{id}.raw"));
        if path.exists() {
            return Err(ControlError::state(
                "InvalidParameter.OSSPrefix",
                format!("{} exists already; remove it or give another OSSPrefix", path.display()),
            ));
        }
        let bdev = self.pool.bdev(&id)?;
        let ranges = self.pool.allocated_ranges(&id, EXPORT_BATCH)?;
        let total = ranges.iter().map(|r| r.1).sum();
        let ctl = self
            .me
            .upgrade()
            .ok_or_else(|| ControlError::DataPath("the control plane is shutting down".into()))?;
        let (tid, tpath, size) = (id.clone(), path.clone(), m.size);
        let task = self.tasks.spawn(&account, "ExportImage", &id, total, move |task| {
            export_to_file(&reactors, &bdev, &ranges, &tpath, task)?;
            drop(ctl);
            Ok(json!({ "ImageId": tid, "Path": tpath.display().to_string(), "SizeBytes": size }))
        })?;
        Ok(json!({ "TaskId": task.id, "ImageId": id, "Path": path.display().to_string(), "SizeBytes": m.size }))
    }

    pub(super) fn delete_image(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("ImageId")?;
        let _force = p.opt_bool("Force")?;
        p.finish()?;
        let check = |txn: &redb::WriteTransaction| {
            let m = self.find_image(txn, &id, &account, false)?;
            same_region(region.as_deref(), &m.region, "InvalidImageId.NotFound", &id)?;
            let shred = match &m.encryption {
                Some(enc) => self.would_shred(txn, enc)?,
                None => None,
            };
            Ok((m, shred))
        };
        let (_, shred) = self.peek(check)?;
        self.audit_shred(shred.as_ref(), &id)?;
        let txn = self.begin()?;
        let (m, _) = check(&txn)?;
        self.pool.delete_volume(&txn, &id)?;
        catalog::remove::<ImageRecord>(&txn, &id)?;
        let shredded = match &m.encryption {
            Some(enc) => self.key_unref(&txn, enc, shred.is_some())?,
            None => false,
        };
        txn.commit()?;
        Ok(json!({ "ImageId": id, "KeyShredded": shredded }))
    }

    pub(super) fn describe_images(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let ids = p.opt_str_list("ImageId")?;
        let owner = p.opt_str("ImageOwnerAlias")?.unwrap_or_else(|| "all".into());
        p.finish()?;
        if !["self", "others", "all"].contains(&owner.as_str()) {
            return Err(ControlError::param(
                "InvalidParameter.ImageOwnerAlias",
                "ImageOwnerAlias: use self, others or all",
            ));
        }
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let images: Vec<ImageRecord> = catalog::list_r(&r)?;
        let out: Vec<Value> = images
            .iter()
            .filter(|m| {
                let mine = m.account == account;
                let shared = m.shared_with.contains(&account);
                (match owner.as_str() {
                    "self" => mine,
                    "others" => shared,
                    _ => mine || shared,
                }) && region.as_ref().is_none_or(|r| *r == m.region)
                    && ids.as_ref().is_none_or(|l| l.contains(&m.id))
            })
            .map(|m| view::image(m, &account))
            .collect();
        Ok(json!({ "TotalCount": out.len(), "Images": { "Image": out } }))
    }
}

/// Writes the byte ranges `ranges` of `bdev` (its allocated clusters; the rest reads as
/// zeros) into a new sparse file of the volume's size (mode 0600; refused if the file
/// exists), reading through the data path with pollers on the reactors (never blocking
/// one). All-zero blocks stay holes. Stops between batches when `task` is cancelled and
/// removes the partial file.
fn export_to_file(
    reactors: &Reactors,
    bdev: &BdevRef,
    ranges: &[(u64, u64)],
    path: &Path,
    task: &super::tasks::Task,
) -> Result<(), ControlError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let err = |e: String| ControlError::DataPath(format!("export to {}: {e}", path.display()));
    let tmp: PathBuf = path.with_extension("raw.partial");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(e.to_string()))?;
    let res = (|| {
        f.set_len(bdev.capacity()).map_err(|e| err(e.to_string()))?;
        for &(off, n) in ranges {
            if task.cancelled() {
                return Err(task.cancelled_error());
            }
            let data = run_job(reactors, bdev, read_ops(off, n), vec![0; n as usize])
                .map_err(|e| err(format!("reading the image: {e:?}")))?;
            for (s, e) in super::copy::nonzero_runs(&data, n as usize) {
                f.write_all_at(&data[s..e], off + s as u64)
                    .map_err(|e| err(e.to_string()))?;
            }
            task.progress(n);
        }
        f.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
