//! MigrateDisk (`sealdisk migrate`): move existing data onto encryption (or back) as one
//! resumable, verifiable background task.
//!
//! Sources: a sealdisk disk (`SourceDiskId`, read from a point-in-time clone), a raw
//! image file or block device beneath the import directory (`SourcePath`, as for
//! CreateEncryptedCopy), or an NBD export (`SourceNbdUri`: `nbd+unix:///E?socket=P`,
//! the socket beneath the import directory, or `nbd://HOST[:PORT]/E`). Target: a new
//! disk (default) or an existing, empty, detached disk (`TargetDiskId`). A plaintext
//! source goes into an encrypted target (a new one is encrypted); an encrypted source
//! disk goes into a new **unencrypted** disk (or any existing one), decrypted through
//! its own key: the audit log records `DecryptData` for that key.
//!
//! Order of events:
//!
//! 1. Checks, all before anything changes (a refusal changes nothing): parameters,
//!    source (exists, readable, beneath the import directory, an NBD server that
//!    answers), target (same account and region, not the source, detached, empty,
//!    large enough), direction (plaintext into plaintext is refused), KMS activation
//!    and quota for every KMS call (reserved).
//! 2. KMS: a new data key for a new encrypted target, unwraps of the source's and an
//!    existing target's key.
//! 3. One transaction: the new target volume, the source disk's point-in-time clone,
//!    the new key's row (held by the migration), one more reference to the source's
//!    key, and the migration row ([`MigrationRecord`], checkpoint 0). The call returns a
//!    `TaskId`.
//! 4. The task: [`READERS`] reader threads read the source's data extents (allocated clusters of
//!    the clone; SEEK_DATA/SEEK_HOLE of a file; NBD `base:allocation`) in windows of
//!    [`WINDOW`] bytes while [`WRITERS`] write jobs write their non-zero 4 KiB blocks
//!    through the target's stack (`crypto → volume` or `volume`) on the reactors. About
//!    once a second it flushes the target and commits the checkpoint (the offset below
//!    which the target is durably complete) in the migration row.
//! 5. `Verify`: both sides read again through their data paths, CRC32C per 4 KiB block
//!    compared; the first difference fails the task with its offset.
//! 6. One transaction: the disk row of a new target, the clone and the migration row
//!    removed, the source key's extra reference dropped.
//!
//! Interrupted anywhere (CancelTask, the CLI's Ctrl-C, shutdown, a kill of the daemon,
//! a failing source) the migration row, its volumes and keys stay: MigrateDisk with the
//! same source and target finds the row and resumes from its checkpoint (while its task
//! still runs, it returns that task). `Abandon=true` removes what an interrupted
//! migration made (an existing target is emptied again).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::nbd_client::{parse_uri, NbdAddr, NbdClient};
use super::params::{check_text, size_from_source, size_limit};
use super::{same_region, Control, ControlError, Params, ENCRYPTION_SECTOR};
use crate::bdev::crypto::{CryptoBdev, BOUNCE_CHUNK};
use crate::bdev::BdevRef;
use crate::catalog::{self, AttachmentRecord, Category, DiskRecord, Encryption, KeyRecord, MigrationRecord};
use crate::crypto::Xts;
use crate::kms::{CallOpts, KeyContext, Reservation};
use crate::reactor::Reactors;
use crate::volume::VolumeError;

/// Zero-detection, checksum and alignment unit.
const BLOCK: u64 = 4096;
/// Source bytes handled per round (extents, read, write, progress).
const WINDOW: u64 = 8 << 20;
/// How often the checkpoint is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Largest single write (the crypto layer's bounce chunk).
const PIECE: usize = BOUNCE_CHUNK;
/// Write jobs in flight at once (each up to 32 requests).
const WRITERS: usize = 4;
/// Reader threads, each with its own handle on the source (NBD: its own connection).
const READERS: usize = 2;
/// The task action name (DescribeTasks `TaskAction`).
const ACTION: &str = "MigrateDisk";

/// Migrations (by key) whose call is setting them up: two calls for the same source and
/// target must not both create, resume or abandon it. Other migrations are not held up
/// (a setup may wait seconds for an NBD server).
static SETTING_UP: Mutex<std::collections::BTreeSet<String>> = Mutex::new(std::collections::BTreeSet::new());

/// Holds a migration key in [`SETTING_UP`] until dropped.
struct SetupGuard(String);

impl SetupGuard {
    fn take(key: &str) -> Result<SetupGuard, ControlError> {
        let mut s = SETTING_UP.lock().unwrap_or_else(|e| e.into_inner());
        if !s.insert(key.to_owned()) {
            return Err(ControlError::state(
                "OperationConflict",
                "another call is starting, resuming or abandoning this same migration; run it again in a moment \
                 to follow it",
            ));
        }
        Ok(SetupGuard(key.to_owned()))
    }
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        SETTING_UP.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.0);
    }
}

/// The source as the caller named it.
enum SourceArg {
    Disk(String),
    Path(String),
    Nbd(String),
}

/// What the task needs besides the migration row.
struct Run {
    source: Source,
    dst: BdevRef,
    verify: bool,
    /// The checkpoint a resumed migration starts from.
    resumed_from: Option<u64>,
}

/// What the copy did (cumulative over every run of the migration).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    read: u64,
    written: u64,
}

/// A piece of source data for the writer, or the end of a window.
enum Msg {
    Data { off: u64, data: Vec<u8> },
    WindowDone { start: u64, end: u64 },
}

/// What step 2 of a migration made: a new target's key (its context and wrapped
/// form), and the XTS engines of the source and the target (if encrypted).
struct MigrationKeys {
    new_key: Option<(KeyContext, crate::kms::WrappedKey)>,
    src_xts: Option<Arc<Xts>>,
    dst_xts: Option<Arc<Xts>>,
}

mod run;
mod source;
mod verify;

use source::{file_stamp, Source};

/// What a migration's reply and its task's result both say about it.
fn summary(rec: &MigrationRecord, resumed_from: Option<u64>) -> Value {
    json!({
        "DiskId": rec.target,
        "NewDisk": rec.target_new,
        "Encrypted": rec.target_encryption.is_some(),
        "SizeBytes": rec.size,
        "Source": rec.source,
        "SourceKind": rec.source_kind,
        "SourceSizeBytes": rec.source_size,
        "Resumed": resumed_from.is_some(),
        "ResumedFrom": resumed_from,
    })
}

/// The one source given: `SourceDiskId`, `SourcePath` or `SourceNbdUri`.
fn source_arg(
    src_disk: Option<String>,
    src_path: Option<String>,
    src_nbd: Option<String>,
) -> Result<SourceArg, ControlError> {
    match (src_disk, src_path, src_nbd) {
        (Some(d), None, None) => Ok(SourceArg::Disk(d)),
        (None, Some(f), None) => Ok(SourceArg::Path(f)),
        (None, None, Some(u)) => Ok(SourceArg::Nbd(u)),
        (None, None, None) => Err(ControlError::param(
            "MissingParameter.Source",
            "give the source: SourceDiskId (a disk), SourcePath (a raw image or block device beneath the \
                 import directory) or SourceNbdUri (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT)",
        )),
        _ => Err(ControlError::param(
            "InvalidParameter.Source",
            "give one source: SourceDiskId, SourcePath or SourceNbdUri, not several",
        )),
    }
}

impl Control {
    pub(super) fn migrate_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        let src_disk = p.opt_str("SourceDiskId")?;
        let src_path = p.opt_str("SourcePath")?;
        let src_nbd = p.opt_str("SourceNbdUri")?;
        let target = p.opt_str("TargetDiskId")?.filter(|t| t != "new");
        let category = p.opt_str("DiskCategory")?;
        let size = p.size()?;
        let name = p.opt_str("DiskName")?;
        let description = p.opt_str("Description")?;
        let verify = p.opt_bool("Verify")?.unwrap_or(false);
        let abandon = p.opt_bool("Abandon")?.unwrap_or(false);
        p.refuse_kms_key_id()?;
        p.finish()?;
        if let Some(n) = &name {
            check_text("DiskName", n)?;
        }
        if let Some(d) = &description {
            check_text("Description", d)?;
        }
        let category = super::disks::parse_cloud_category(
            category.as_deref(),
            "InvalidOperation.LocalDiskTarget",
            "; migrate into a cloud disk (basic, ultra, ssd)",
        )?;
        let source = source_arg(src_disk, src_path, src_nbd)?;
        let source_name = match &source {
            SourceArg::Disk(d) => d.clone(),
            SourceArg::Path(f) => self.import_path_name(f)?,
            SourceArg::Nbd(u) => u.clone(),
        };
        let key = MigrationRecord::key_of(&account, &region, &source_name, target.as_deref().unwrap_or("new"));
        let _setup = SetupGuard::take(&key)?;
        let existing = {
            let r = self
                .db
                .begin_read()
                .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
            catalog::get_r::<MigrationRecord>(&r, &key)?
        };
        if abandon {
            let rec = existing.ok_or_else(|| ControlError::NotFound {
                code: "InvalidMigration.NotFound",
                id: format!("{source_name} -> {}", target.as_deref().unwrap_or("new")),
            })?;
            return self.abandon_migration(rec);
        }
        if let Some(rec) = existing {
            return self.follow_or_resume(rec, size, category, verify);
        }
        self.start_migration(
            &account,
            &region,
            key,
            source,
            source_name,
            target,
            category,
            size,
            name.unwrap_or_default(),
            description.unwrap_or_default(),
            verify,
        )
    }

    /// A migration with this key exists: its running task, or a resume (with the same
    /// size and category for a new target).
    fn follow_or_resume(
        &self,
        rec: MigrationRecord,
        size: Option<u64>,
        category: Option<Category>,
        verify: bool,
    ) -> Result<Value, ControlError> {
        if let Some(t) = self.tasks.running(ACTION, &rec.target) {
            return Ok(json!({
                "TaskId": t.id,
                "DiskId": rec.target,
                "Resumed": true,
                "ResumedFrom": rec.offset,
                "CheckpointBytes": rec.offset,
                "Running": true,
            }));
        }
        let mismatch = |what: &str| {
            ControlError::param(
                "InvalidParameter.MigrationMismatch",
                format!(
                    "an interrupted migration of {} into {} exists with another {what}; run it again with the \
                     same arguments to resume, or with Abandon=true (--abandon) to remove it",
                    rec.source, rec.target
                ),
            )
        };
        if size.is_some_and(|s| s != rec.size) && rec.target_new {
            return Err(mismatch("size"));
        }
        if category.is_some_and(|c| c != rec.category) && rec.target_new {
            return Err(mismatch("category"));
        }
        self.resume_migration(rec, verify)
    }

    /// The canonical name of an import path (what the migration row records): the
    /// path beneath the import directory.
    fn import_path_name(&self, path: &str) -> Result<String, ControlError> {
        let Some(dir) = &self.cfg.import_dir else {
            return Ok(path.to_owned()); // refused when opened
        };
        let p = std::path::Path::new(path);
        Ok(if p.is_absolute() {
            path.to_owned()
        } else {
            dir.join(p).display().to_string()
        })
    }

    /// Checks an NBD URI and connects: a unix socket must lie beneath the import
    /// directory (no symlinks), as image files do.
    fn open_nbd(&self, uri: &str) -> Result<NbdClient, ControlError> {
        let u = parse_uri(uri).map_err(|e| ControlError::param("InvalidParameter.SourceNbdUri", e.to_string()))?;
        if let NbdAddr::Unix(sock) = &u.addr {
            let Some(dir) = &self.cfg.import_dir else {
                return Err(ControlError::limit(
                    "InvalidOperation.ImportDisabled",
                    "NBD unix sockets are read only beneath the import directory, and the daemon has none \
                     (serve --import-dir DIR)",
                ));
            };
            // The directory the socket is in must lie beneath the import directory (and
            // outside the data directory, whose nbd.sock serves every account's disks);
            // the socket itself must not be a symlink. A socket that is missing or not
            // listened on is a source that does not answer (below).
            let beneath = match (std::fs::canonicalize(dir), sock.parent().map(std::fs::canonicalize)) {
                (Ok(d), Some(Ok(parent))) => {
                    parent.starts_with(&d)
                        && !std::fs::symlink_metadata(sock).is_ok_and(|m| m.file_type().is_symlink())
                        && !std::fs::canonicalize(&self.cfg.data_dir).is_ok_and(|dd| parent.starts_with(dd))
                }
                _ => false,
            };
            if !beneath {
                return Err(ControlError::param(
                    "InvalidParameter.SourceNbdUri",
                    format!(
                        "NBD socket {} is not beneath the import directory {} (or is a symlink)",
                        sock.display(),
                        dir.display()
                    ),
                ));
            }
        }
        let c = NbdClient::connect(&u).map_err(|e| {
            ControlError::state(
                "InvalidOperation.SourceUnavailable",
                format!("NBD source {uri} does not answer: {e}"),
            )
        })?;
        if c.size() == 0 {
            return Err(ControlError::state(
                "InvalidOperation.SourceUnavailable",
                format!("NBD source {uri} is empty"),
            ));
        }
        Ok(c)
    }

    /// The plaintext key of an encrypted object, unwrapped through the KMS (metered from
    /// `res`, audited as UnwrapDataKey).
    fn unwrap_key(
        &self,
        enc: &Encryption,
        disk_id: &str,
        res: &crate::kms::Reservation,
    ) -> Result<(Arc<Xts>, KeyContext), ControlError> {
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let row = catalog::get_r::<KeyRecord>(&r, &enc.key_id)?.ok_or_else(|| {
            ControlError::Catalog(catalog::CatalogError::Corrupt(format!(
                "wrapped key {} is missing; run `sealdisk check`",
                enc.key_id
            )))
        })?;
        drop(r);
        let ctx = KeyContext::new(&row.account, &row.region, &row.key_id);
        let key = self
            .kms
            .unwrap_data_key(&ctx, &row.wrapped, CallOpts::disk(disk_id).reserved(res))?;
        let xts = Arc::new(
            key.xts()
                .map_err(|e| ControlError::DataPath(format!("XTS engine: {e}")))?,
        );
        Ok((xts, ctx))
    }

    /// `bdev` through a crypto layer with `xts`, or as it is.
    fn crypto_over(bdev: BdevRef, xts: Option<Arc<Xts>>) -> Result<BdevRef, ControlError> {
        Ok(match xts {
            Some(x) => Arc::new(
                CryptoBdev::new(bdev, x, ENCRYPTION_SECTOR).map_err(|e| ControlError::DataPath(e.to_string()))?,
            ),
            None => bdev,
        })
    }

    /// Whether some migration row names `disk` as its target.
    pub(super) fn migration_target_of(
        &self,
        txn: &redb::WriteTransaction,
        disk: &str,
    ) -> Result<Option<String>, ControlError> {
        Ok(catalog::list::<MigrationRecord>(txn)?
            .into_iter()
            .find(|m| m.target == disk)
            .map(|m| m.key))
    }

    /// Refuses an existing target that is not a valid one for `src_size` bytes.
    fn check_target(
        &self,
        txn: &redb::WriteTransaction,
        t: &DiskRecord,
        src_size: u64,
        src_encrypted: bool,
    ) -> Result<(), ControlError> {
        if t.encryption.is_none() && !src_encrypted {
            return Err(ControlError::limit(
                "InvalidOperation.UnencryptedTarget",
                format!(
                    "disk {} is unencrypted and so is the source: that is a copy, not an encryption; migrate into \
                     an encrypted disk (or a new one: omit TargetDiskId)",
                    t.id
                ),
            ));
        }
        if t.size < src_size {
            return Err(ControlError::limit(
                "InvalidOperation.TargetTooSmall",
                format!(
                    "disk {} has {} bytes, smaller than the source ({src_size} bytes); resize it or migrate into a \
                     new disk",
                    t.id, t.size
                ),
            ));
        }
        let attached = catalog::list::<AttachmentRecord>(txn)?
            .into_iter()
            .any(|a| a.disk_id == t.id);
        if attached || self.pool.is_open(&t.id) {
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                format!("disk {} is attached; detach it before migrating into it", t.id),
            ));
        }
        if let Some(k) = self.migration_target_of(txn, &t.id)? {
            return Err(ControlError::state(
                "IncorrectDiskStatus.Migrating",
                format!(
                    "disk {} is the target of another migration ({k}); finish or abandon that one first",
                    t.id
                ),
            ));
        }
        let used = self.pool.mapped_bytes(&t.id)?;
        if used > 0 {
            return Err(ControlError::limit(
                "InvalidOperation.TargetNotEmpty",
                format!(
                    "disk {} holds data ({used} bytes allocated); a migration writes only into an empty disk \
                     (ReInitDisk empties one)",
                    t.id
                ),
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn start_migration(
        &self,
        account: &str,
        region: &str,
        key: String,
        source: SourceArg,
        source_name: String,
        target: Option<String>,
        category: Option<Category>,
        size: Option<u64>,
        name: String,
        description: String,
        verify: bool,
    ) -> Result<Value, ControlError> {
        let reactors = self.reactors.clone().ok_or_else(|| {
            ControlError::DataPath("MigrateDisk needs the reactors (run it through the daemon)".into())
        })?;
        // 1. Checks. The write transaction only reads and is dropped before any I/O.
        let (kind, src_size, src_rec, nbd, file) = match &source {
            SourceArg::Disk(id) => {
                let txn = self.begin()?;
                let d = self.find_disk(&txn, id, account)?;
                same_region(Some(region), &d.region, "InvalidDiskId.NotFound", id)?;
                ("disk", d.size, Some(d), None, None)
            }
            SourceArg::Path(path) => {
                let (_, f, size) = self.open_source_path(path)?;
                ("file", size, None, None, Some(f))
            }
            SourceArg::Nbd(uri) => {
                let c = self.open_nbd(uri)?;
                ("nbd", c.size(), None, Some(c), None)
            }
        };
        self.start_checked(
            account,
            region,
            key,
            kind,
            source_name,
            src_size,
            src_rec,
            nbd,
            file,
            target,
            category,
            size,
            name,
            description,
            verify,
            reactors,
        )
    }

    /// Steps 1 (target and direction) to 3, and the task.
    #[allow(clippy::too_many_arguments)]
    fn start_checked(
        &self,
        account: &str,
        region: &str,
        key: String,
        kind: &str,
        source_name: String,
        src_size: u64,
        src_rec: Option<DiskRecord>,
        nbd: Option<NbdClient>,
        file: Option<File>,
        target: Option<String>,
        category: Option<Category>,
        size: Option<u64>,
        name: String,
        description: String,
        verify: bool,
        reactors: Arc<Reactors>,
    ) -> Result<Value, ControlError> {
        let src_rounded = src_size.div_ceil(BLOCK) * BLOCK;
        let src_enc = src_rec.as_ref().and_then(|d| d.encryption.clone());
        let tgt_rec = match &target {
            Some(t) => Some(self.existing_target(
                account,
                region,
                t,
                src_rec.as_ref(),
                size.is_some() || category.is_some(),
                src_size,
                src_enc.is_some(),
            )?),
            None => None,
        };
        let new_size = match &tgt_rec {
            Some(t) => size_limit(t.size, src_size)?,
            None => size_from_source(size, src_size, src_rounded)?,
        };
        // A new target is encrypted unless the source is an encrypted disk (the way back).
        let new_encrypted = tgt_rec.is_none() && src_enc.is_none();
        let tgt_enc = tgt_rec.as_ref().and_then(|t| t.encryption.clone());
        let units = u32::from(new_encrypted) + u32::from(src_enc.is_some()) + u32::from(tgt_enc.is_some());
        let res = if units > 0 {
            Some(self.kms_reserve(account, region, units)?)
        } else {
            None
        };

        // 2. Keys.
        let target_id = tgt_rec
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_else(|| super::util::new_id("d"));
        let MigrationKeys {
            new_key,
            src_xts,
            dst_xts,
        } = self.migration_keys(
            account,
            region,
            &target_id,
            new_encrypted,
            src_enc.as_ref().zip(src_rec.as_ref().map(|s| s.id.as_str())),
            tgt_enc.as_ref(),
            res.as_ref(),
        )?;
        let shred_new = |nk: &Option<(KeyContext, crate::kms::WrappedKey)>| {
            if let Some((ctx, _)) = nk {
                let _ = self.kms.audit_crypto_shred(ctx, Some(&target_id));
            }
        };
        drop(res);

        // 3. One transaction: volumes, key rows, the migration row.
        let snapshot = src_rec.as_ref().map(|_| super::util::new_id("mgsnap"));
        let target_encryption = match (&new_key, &tgt_rec) {
            (Some((ctx, w)), _) => Some(Encryption {
                key_id: ctx.key_id.clone(),
                cmk_id: w.cmk_id.clone(),
            }),
            (None, Some(t)) => t.encryption.clone(),
            (None, None) => None,
        };
        let rec = MigrationRecord {
            key: key.clone(),
            account: account.to_owned(),
            region: region.to_owned(),
            source_kind: kind.to_owned(),
            source: source_name,
            source_size: src_size,
            source_stamp: file.as_ref().and_then(file_stamp),
            snapshot: snapshot.clone(),
            source_encryption: src_enc.clone(),
            target: target_id.clone(),
            target_new: tgt_rec.is_none(),
            target_encryption,
            size: new_size,
            category: category
                .or(src_rec.as_ref().map(|d| d.category))
                .unwrap_or(Category::Ssd),
            name,
            description,
            offset: 0,
            bytes_read: 0,
            bytes_written: 0,
            created_at: super::util::now_rfc3339(),
        };
        let made = self.commit_migration(&rec, src_rec.as_ref(), tgt_rec.as_ref(), new_key.as_ref());
        if let Err(e) = made {
            shred_new(&new_key);
            return Err(e);
        }
        let source = match (nbd, file, &snapshot) {
            (Some(c), _, _) => Ok(Source::Nbd(Box::new(c))),
            (None, Some(f), _) => Source::file(f, PathBuf::from(&rec.source)),
            (None, None, Some(snap)) => self.open_snapshot(snap, src_xts),
            _ => Err(ControlError::DataPath("no source".into())),
        };
        self.spawn_migration(rec, source, dst_xts, verify, None, reactors)
    }

    /// Step 2: a new target's data key (generated when `new_encrypted`), the keys of an
    /// encrypted source (`src`: its encryption and disk id; the use audited) and of an
    /// encrypted existing target (unwrapped). On a failure a new key is shredded
    /// (audited).
    #[allow(clippy::too_many_arguments)]
    fn migration_keys(
        &self,
        account: &str,
        region: &str,
        target_id: &str,
        new_encrypted: bool,
        src: Option<(&Encryption, &str)>,
        tgt_enc: Option<&Encryption>,
        res: Option<&Reservation>,
    ) -> Result<MigrationKeys, ControlError> {
        let mut new_key: Option<(KeyContext, crate::kms::WrappedKey)> = None;
        let mut dst_xts = None;
        let shred_new = |nk: &Option<(KeyContext, crate::kms::WrappedKey)>| {
            if let Some((ctx, _)) = nk {
                let _ = self.kms.audit_crypto_shred(ctx, Some(target_id));
            }
        };
        if new_encrypted {
            let key_id = super::util::new_id("k");
            let ctx = KeyContext::new(account, region, &key_id);
            let r = res.expect("reserved");
            let (k, wrapped) = self
                .kms
                .generate_data_key(&ctx, CallOpts::disk(target_id).reserved(r))?;
            let xts = k.xts().map_err(|e| ControlError::DataPath(format!("XTS engine: {e}")));
            new_key = Some((ctx, wrapped));
            match xts {
                Ok(x) => dst_xts = Some(Arc::new(x)),
                Err(e) => {
                    shred_new(&new_key);
                    return Err(e);
                }
            }
        }
        let keyed = (|| {
            let mut src_xts = None;
            if let Some((enc, src_id)) = src {
                let (x, ctx) = self.unwrap_key(enc, src_id, res.expect("reserved"))?;
                self.kms.audit_decrypt_data(&ctx, Some(src_id))?;
                src_xts = Some(x);
            }
            if let Some(enc) = tgt_enc {
                let (x, _) = self.unwrap_key(enc, target_id, res.expect("reserved"))?;
                dst_xts = Some(x);
            }
            Ok::<_, ControlError>(src_xts)
        })();
        let src_xts = match keyed {
            Ok(x) => x,
            Err(e) => {
                shred_new(&new_key);
                return Err(e);
            }
        };
        Ok(MigrationKeys {
            new_key,
            src_xts,
            dst_xts,
        })
    }

    /// Step 1 for an existing target: the account's disk in the region, not the
    /// source, without `Size`/`DiskCategory` (`new_params`), fit for the source.
    #[allow(clippy::too_many_arguments)]
    fn existing_target(
        &self,
        account: &str,
        region: &str,
        t: &str,
        src_rec: Option<&DiskRecord>,
        new_params: bool,
        src_size: u64,
        src_encrypted: bool,
    ) -> Result<DiskRecord, ControlError> {
        let txn = self.begin()?;
        let d = self.find_disk(&txn, t, account)?;
        same_region(Some(region), &d.region, "InvalidDiskId.NotFound", t)?;
        if src_rec.is_some_and(|s| s.id == d.id) {
            return Err(ControlError::limit(
                "InvalidOperation.SourceIsTarget",
                format!("disk {t} is both the source and the target; migrate into another disk"),
            ));
        }
        if new_params {
            return Err(ControlError::param(
                "InvalidParameter.TargetDiskId",
                "Size and DiskCategory are for a new target disk; an existing target keeps its own",
            ));
        }
        self.check_target(&txn, &d, src_size, src_encrypted)?;
        Ok(d)
    }

    /// Step 3: one transaction makes the target volume (or checks the existing target
    /// again), the source's point-in-time clone, the key rows and the migration row.
    fn commit_migration(
        &self,
        rec: &MigrationRecord,
        src_rec: Option<&DiskRecord>,
        tgt_rec: Option<&DiskRecord>,
        new_key: Option<&(KeyContext, crate::kms::WrappedKey)>,
    ) -> Result<(), ControlError> {
        let txn = self.begin()?;
        if catalog::get::<MigrationRecord>(&txn, &rec.key)?.is_some() {
            return Err(ControlError::state(
                "OperationConflict",
                "another call started this migration meanwhile; run it again to follow it",
            ));
        }
        if let Some(s) = src_rec {
            // Still there, still as checked.
            let now = self.find_disk(&txn, &s.id, &rec.account)?;
            if now.encryption != s.encryption || now.size != s.size {
                return Err(ControlError::state(
                    "OperationConflict",
                    "the source changed; try again",
                ));
            }
        }
        if let Some(t) = tgt_rec {
            let now = self.find_disk(&txn, &t.id, &rec.account)?;
            self.check_target(&txn, &now, rec.source_size, rec.source_encryption.is_some())?;
        } else {
            self.pool.create_volume(&txn, &rec.target, rec.size)?;
        }
        if let (Some(s), Some(snap)) = (src_rec, &rec.snapshot) {
            self.pool.clone_volume(&txn, &s.id, snap, s.size)?;
        }
        if let Some(enc) = &rec.source_encryption {
            self.key_ref(&txn, enc)?;
        }
        if let Some((ctx, wrapped)) = new_key {
            catalog::put(
                &txn,
                &KeyRecord {
                    key_id: ctx.key_id.clone(),
                    account: rec.account.clone(),
                    region: rec.region.clone(),
                    wrapped: wrapped.clone(),
                    refs: 1,
                    origin_disk: rec.target.clone(),
                    created_at: super::util::now_rfc3339(),
                },
            )?;
        }
        catalog::put(&txn, rec)?;
        txn.commit()?;
        Ok(())
    }

    fn open_snapshot(&self, snap: &str, xts: Option<Arc<Xts>>) -> Result<Source, ControlError> {
        let ranges = self.pool.allocated_ranges(snap, WINDOW)?;
        let bdev = Self::crypto_over(self.pool.bdev(snap)?, xts)?;
        Ok(Source::Disk { bdev, ranges })
    }

    /// Starts the task of `rec` (new, or resumed at its checkpoint). A source or target
    /// that cannot be opened fails here, with the migration row kept for a later resume.
    fn spawn_migration(
        &self,
        rec: MigrationRecord,
        source: Result<Source, ControlError>,
        dst_xts: Option<Arc<Xts>>,
        verify: bool,
        resumed_from: Option<u64>,
        reactors: Arc<Reactors>,
    ) -> Result<Value, ControlError> {
        let source = source?;
        let dst = Self::crypto_over(self.pool.bdev(&rec.target)?, dst_xts)?;
        let Some(ctl) = self.me.upgrade() else {
            return Err(ControlError::DataPath("the control plane is shutting down".into()));
        };
        let rounded = rec.source_size.div_ceil(BLOCK) * BLOCK;
        let reply = summary(&rec, resumed_from);
        let run = Run {
            source,
            dst,
            verify,
            resumed_from,
        };
        let target = rec.target.clone();
        // Verify reads the whole source again: it counts in the task's total.
        let total = rounded - rec.offset + if verify { rounded } else { 0 };
        let task = self
            .tasks
            .spawn(&rec.account.clone(), ACTION, &target, total, move |task| {
                ctl.run_migration(task, rec, run, &reactors)
            })?;
        let mut v = reply;
        v["TaskId"] = task.id.clone().into();
        Ok(v)
    }

    /// An interrupted migration, again: its keys unwrapped, its source opened and
    /// checked against what it was, its task started at the checkpoint.
    fn resume_migration(&self, rec: MigrationRecord, verify: bool) -> Result<Value, ControlError> {
        let reactors = self.reactors.clone().ok_or_else(|| {
            ControlError::DataPath("MigrateDisk needs the reactors (run it through the daemon)".into())
        })?;
        if self.pool.volume_size(&rec.target)?.is_none() {
            return Err(ControlError::state(
                "IncorrectDiskStatus.Migrating",
                format!(
                    "the target {} of this interrupted migration is gone; remove the migration with Abandon=true",
                    rec.target
                ),
            ));
        }
        let opened: Option<Source> = match rec.source_kind.as_str() {
            "file" => {
                let (_, f, size) = self.open_source_path(&rec.source)?;
                if size != rec.source_size || file_stamp(&f) != rec.source_stamp {
                    return Err(ControlError::state(
                        "InvalidOperation.SourceChanged",
                        format!(
                            "{} changed since the migration began (size or modification time); the copied part \
                             would not match it. Abandon the migration (Abandon=true) and start again",
                            rec.source
                        ),
                    ));
                }
                Some(Source::file(f, PathBuf::from(&rec.source))?)
            }
            "nbd" => {
                let c = self.open_nbd(&rec.source)?;
                if c.size() != rec.source_size {
                    return Err(ControlError::state(
                        "InvalidOperation.SourceChanged",
                        format!(
                            "NBD source {} now has {} bytes, not {}; abandon the migration and start again",
                            rec.source,
                            c.size(),
                            rec.source_size
                        ),
                    ));
                }
                Some(Source::Nbd(Box::new(c)))
            }
            _ => None, // the snapshot: opened below, with the source's key
        };
        let units = u32::from(rec.source_encryption.is_some()) + u32::from(rec.target_encryption.is_some());
        let res = if units > 0 {
            Some(self.kms_reserve(&rec.account, &rec.region, units)?)
        } else {
            None
        };
        let mut src_xts = None;
        if let Some(enc) = &rec.source_encryption {
            let src_id = rec.source.clone();
            let (x, ctx) = self.unwrap_key(enc, &src_id, res.as_ref().expect("reserved"))?;
            self.kms.audit_decrypt_data(&ctx, Some(&src_id))?;
            src_xts = Some(x);
        }
        let dst_xts = match &rec.target_encryption {
            Some(enc) => Some(self.unwrap_key(enc, &rec.target, res.as_ref().expect("reserved"))?.0),
            None => None,
        };
        drop(res);
        let source = match (&rec.snapshot, opened) {
            (Some(snap), _) => self.open_snapshot(snap, src_xts),
            (None, Some(s)) => Ok(s),
            (None, None) => Err(ControlError::Catalog(catalog::CatalogError::Corrupt(format!(
                "migration {}: source kind {:?} without a snapshot",
                rec.key, rec.source_kind
            )))),
        };
        let from = Some(rec.offset);
        self.spawn_migration(rec, source, dst_xts, verify, from, reactors)
    }

    /// Abandon=true: removes what an interrupted migration made; an existing target is
    /// emptied again (it was empty when the migration began).
    fn abandon_migration(&self, rec: MigrationRecord) -> Result<Value, ControlError> {
        if let Some(t) = self.tasks.running(ACTION, &rec.target) {
            return Err(ControlError::state(
                "IncorrectTaskStatus",
                format!(
                    "the migration is running as task {}; CancelTask it first, then abandon it",
                    t.id
                ),
            ));
        }
        // Keys this drops the last hold of: audit their shred first.
        let (tgt_shred, src_shred) = self.peek(|txn| {
            let t = match (&rec.target_encryption, rec.target_new) {
                (Some(enc), true) => self.would_shred(txn, enc)?,
                _ => None,
            };
            let s = match (&rec.source_encryption, &rec.snapshot) {
                (Some(enc), Some(_)) => self.would_shred(txn, enc)?,
                _ => None,
            };
            Ok((t, s))
        })?;
        self.audit_shred(tgt_shred.as_ref(), &rec.target)?;
        self.audit_shred(src_shred.as_ref(), &rec.source)?;
        for id in std::iter::once(rec.target.as_str()).chain(rec.snapshot.as_deref()) {
            self.wait_closed(id);
        }
        let txn = self.begin()?;
        if catalog::get::<MigrationRecord>(&txn, &rec.key)?.is_none() {
            return Err(ControlError::state(
                "OperationConflict",
                "the migration is gone already",
            ));
        }
        let gone = |r: Result<(), VolumeError>| match r {
            Ok(()) | Err(VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(ControlError::from(e)),
        };
        if rec.target_new {
            gone(self.pool.delete_volume(&txn, &rec.target))?;
            if let Some(enc) = &rec.target_encryption {
                self.key_unref(&txn, enc, tgt_shred.is_some())?;
            }
        } else if self.pool.volume_size(&rec.target)?.is_some() {
            gone(self.pool.reset_volume(&txn, &rec.target, None))?;
        }
        if let Some(snap) = &rec.snapshot {
            gone(self.pool.delete_volume(&txn, snap))?;
            if let Some(enc) = &rec.source_encryption {
                self.key_unref(&txn, enc, src_shred.is_some())?;
            }
        }
        catalog::remove::<MigrationRecord>(&txn, &rec.key)?;
        txn.commit()?;
        Ok(json!({
            "Abandoned": true,
            "DiskId": rec.target,
            "Source": rec.source,
            "CheckpointBytes": rec.offset,
        }))
    }
}
