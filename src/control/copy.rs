//! CreateEncryptedCopy: the supported way to encrypt existing data. A plaintext disk
//! (or a raw image file / block device on the host) is copied into a new encrypted
//! data disk through that disk's crypto layer on the reactors, so only ciphertext
//! reaches the pool.
//!
//! Order of events:
//!
//! 1. Every check first: parameters, the source (same account and region, not
//!    encrypted, a readable file or block device outside the data directory), the size,
//!    KMS activation and one unit of KMS quota (reserved). A refusal changes nothing.
//! 2. A new data key from the KMS (`GenerateDataKey`, audited, metered like CreateDisk).
//! 3. One transaction creates the new (empty, thin) volume and, for a source disk, a
//!    temporary copy-on-write clone of it (a point-in-time snapshot: the copy is
//!    crash-consistent while the VM keeps writing, and nothing done to the source
//!    meanwhile can disturb it). No catalog row yet: a half-made disk is never
//!    visible, and its key is stored nowhere. The call returns here with a `TaskId`;
//!    the rest runs as a background task ([`super::tasks`]).
//! 4. The copy: the source is read in batches (through the reactors for a disk, only
//!    its allocated clusters; with `pread` for a file), all-zero 4 KiB blocks are
//!    skipped (the new disk stays thin), the rest is written through the new disk's
//!    `crypto → volume` stack by a poller on a reactor (up to 32 writes in flight), then
//!    flushed. `CancelTask` (or shutdown) stops it between batches.
//! 5. One transaction records the wrapped key, the disk row, and deletes the temporary
//!    clone. The new disk is detached. The task's result is the call's old reply.
//!
//! Any failure or cancellation after step 2 deletes the new volume and the temporary
//! clone and drops the key (audited as a crypto-shred): nothing is left behind. A kill
//! leaves the volumes without catalog rows; the next start removes them.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::job::{read_ops, run_job, JobError, Op};
use super::params::{check_text, size_from_source};
use super::{same_region, Control, ControlError, Params, ENCRYPTION_SECTOR};
use crate::bdev::crypto::{CryptoBdev, BOUNCE_CHUNK};
use crate::bdev::{BdevRef, IoError};
use crate::catalog::{self, Category, DiskKind, DiskRecord, DiskRole, Encryption, KeyRecord};
use crate::kms::{CallOpts, KeyContext};
use crate::reactor::Reactors;
use crate::volume::VolumeError;

/// Zero-detection and allocation unit.
const BLOCK: u64 = 4096;
/// Bytes of source handled per round (read, scan, write).
const BATCH: u64 = 4 << 20;
/// Largest single write (the crypto layer's bounce chunk).
const PIECE: u64 = BOUNCE_CHUNK as u64;

/// Where the data comes from.
enum Source {
    /// A plaintext disk; `tmp` is the temporary clone that is read instead.
    Disk { rec: Box<DiskRecord>, tmp: String },
    /// A raw image file or block device.
    File { path: PathBuf, file: File },
}

/// Everything the background part of a copy needs.
struct CopyJob {
    source: Source,
    /// The new disk's data key (dropped once the copy is written).
    xts: Arc<crate::crypto::Xts>,
    src_size: u64,
    src_rounded: u64,
    reactors: Arc<Reactors>,
    disk: NewDisk,
}

/// The disk a copy makes, recorded in step 5.
struct NewDisk {
    /// The temporary clone of a source disk.
    tmp: Option<String>,
    disk_id: String,
    key_id: String,
    wrapped: crate::kms::WrappedKey,
    ctx: KeyContext,
    new_size: u64,
    category: Category,
    name: String,
    description: String,
    account: String,
    region: String,
}

/// What the copy did.
#[derive(Debug, Default, Clone, Copy)]
struct CopyStats {
    copied: u64,
}

impl Control {
    pub(super) fn create_encrypted_copy(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        let src_disk = p.opt_str("SourceDiskId")?;
        let src_path = p.opt_str("SourcePath")?;
        let category = p.opt_str("DiskCategory")?;
        let size = p.size()?;
        let name = p.opt_str("DiskName")?.unwrap_or_default();
        let description = p.opt_str("Description")?.unwrap_or_default();
        p.refuse_kms_key_id()?;
        p.finish()?;
        check_text("DiskName", &name)?;
        check_text("Description", &description)?;
        let category = super::disks::parse_cloud_category(
            category.as_deref(),
            "InvalidOperation.EncryptedLocalDisk",
            " and cannot be encrypted; copy into a cloud disk (basic, ultra, ssd)",
        )?;

        // 1. Checks.
        let (source, src_size, default_category) = self.copy_source(src_disk, src_path, &account, &region)?;
        let src_rounded = src_size.div_ceil(BLOCK) * BLOCK;
        let new_size = size_from_source(size, src_size, src_rounded)?;
        let category = category.unwrap_or(default_category);
        let reactors = self.reactors.clone().ok_or_else(|| {
            ControlError::DataPath("CreateEncryptedCopy needs the reactors (run it through the daemon)".into())
        })?;
        let res = self.kms_reserve(&account, &region, 1)?;

        // 2. The data key.
        let disk_id = super::util::new_id("d");
        let key_id = super::util::new_id("k");
        let ctx = KeyContext::new(&account, &region, &key_id);
        let (key, wrapped) = self
            .kms
            .generate_data_key(&ctx, CallOpts::disk(&disk_id).reserved(&res))?;
        drop(res);
        let xts = match key.xts() {
            Ok(x) => Arc::new(x),
            Err(e) => {
                let _ = self.kms.audit_crypto_shred(&ctx, Some(&disk_id));
                return Err(ControlError::DataPath(format!("XTS engine: {e}")));
            }
        };
        drop(key);

        // 3. The new volume (and the point-in-time clone of a source disk).
        let tmp = match &source {
            Source::Disk { tmp, .. } => Some(tmp.clone()),
            Source::File { .. } => None,
        };
        if let Err(e) = self.create_copy_volumes(&source, tmp.as_deref(), &disk_id, new_size) {
            let _ = self.kms.audit_crypto_shred(&ctx, Some(&disk_id));
            return Err(e);
        }

        // 4. and 5.: a background task.
        let job = CopyJob {
            source,
            xts,
            src_size,
            src_rounded,
            reactors,
            disk: NewDisk {
                tmp,
                disk_id,
                key_id,
                wrapped,
                ctx,
                new_size,
                category,
                name,
                description,
                account,
                region,
            },
        };
        self.spawn_copy(job)
    }

    /// Step 1 for the source: exactly one of `SourceDiskId` (a plaintext disk of the
    /// account in the region) and `SourcePath`. Returns the source, its size and the
    /// category the copy gets by default. The write transaction only reads here and is
    /// dropped before any I/O (the pool's metadata thread needs the writer).
    fn copy_source(
        &self,
        src_disk: Option<String>,
        src_path: Option<String>,
        account: &str,
        region: &str,
    ) -> Result<(Source, u64, Category), ControlError> {
        let txn = self.begin()?;
        match (src_disk, src_path) {
            (Some(_), Some(_)) => Err(ControlError::param(
                "InvalidParameter.SourceDiskId",
                "give SourceDiskId (a plaintext disk) or SourcePath (a raw image file or block device), not both",
            )),
            (None, None) => Err(ControlError::param(
                "MissingParameter.SourceDiskId",
                "SourceDiskId (a plaintext disk) or SourcePath (a raw image file or block device on the host) \
                     is required",
            )),
            (Some(id), None) => {
                let d = self.find_disk(&txn, &id, account)?;
                same_region(Some(region), &d.region, "InvalidDiskId.NotFound", &id)?;
                if d.encryption.is_some() {
                    return Err(ControlError::limit(
                        "InvalidOperation.SourceEncrypted",
                        format!(
                            "disk {id} is already encrypted; CreateEncryptedCopy encrypts plaintext data. For \
                             another disk with the same data, use CreateSnapshot and CreateDisk SnapshotId=..."
                        ),
                    ));
                }
                let (size, cat) = (d.size, d.category);
                let tmp = super::util::new_id("cptmp");
                Ok((Source::Disk { rec: Box::new(d), tmp }, size, cat))
            }
            (None, Some(path)) => {
                let (path, file, size) = self.open_source_path(&path)?;
                Ok((Source::File { path, file }, size, Category::Ssd))
            }
        }
    }

    /// Step 3: one transaction creates the new volume and, for a source disk, its
    /// temporary clone `tmp`.
    fn create_copy_volumes(
        &self,
        source: &Source,
        tmp: Option<&str>,
        disk_id: &str,
        new_size: u64,
    ) -> Result<(), ControlError> {
        let txn = self.begin()?;
        self.pool.create_volume(&txn, disk_id, new_size)?;
        if let (Source::Disk { rec, .. }, Some(t)) = (source, tmp) {
            self.pool.clone_volume(&txn, &rec.id, t, rec.size)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Steps 4 and 5 as a background task; the reply names it. If the task cannot
    /// start, what step 3 made is removed and the key dropped (audited).
    fn spawn_copy(&self, job: CopyJob) -> Result<Value, ControlError> {
        let total = match &job.source {
            Source::Disk { tmp, .. } => self
                .pool
                .allocated_ranges(tmp, BATCH)
                .map(|v| v.iter().map(|r| r.1).sum())
                .unwrap_or(job.src_rounded),
            Source::File { .. } => job.src_rounded,
        };
        let (source_id, mode) = match &job.source {
            Source::Disk { rec, .. } => (rec.id.clone(), "snapshot"),
            Source::File { path, .. } => (path.display().to_string(), "file"),
        };
        let (disk_id, account, new_size, src_size) = (
            job.disk.disk_id.clone(),
            job.disk.account.clone(),
            job.disk.new_size,
            job.src_size,
        );
        let cleanup_tmp = job.disk.tmp.clone();
        let cleanup_ctx = job.disk.ctx.clone();
        // The copy never starts: remove what step 3 made and drop the key (audited).
        let abandon = |e: ControlError| {
            self.discard_copy(&disk_id, cleanup_tmp.as_deref());
            let _ = self.kms.audit_crypto_shred(&cleanup_ctx, Some(&disk_id));
            Err(e)
        };
        let Some(ctl) = self.me.upgrade() else {
            return abandon(ControlError::DataPath("the control plane is shutting down".into()));
        };
        let task = match self
            .tasks
            .spawn(&account, "CreateEncryptedCopy", &disk_id, total, move |task| {
                ctl.run_copy(task, job, &source_id, mode)
            }) {
            Ok(t) => t,
            Err(e) => return abandon(e),
        };
        Ok(json!({
            "TaskId": task.id,
            "DiskId": disk_id,
            "Encrypted": true,
            "SizeBytes": new_size,
            "SourceSizeBytes": src_size,
            "CopyMode": mode,
        }))
    }

    /// Steps 4 and 5 of a copy, on its task's thread; the result is the task's result.
    fn run_copy(
        &self,
        task: &super::tasks::Task,
        job: CopyJob,
        source_id: &str,
        mode: &str,
    ) -> Result<Value, ControlError> {
        let CopyJob {
            source,
            xts,
            src_size,
            src_rounded,
            reactors,
            disk,
        } = job;
        let finished = self
            .copy_into(task, &reactors, &source, &disk.disk_id, xts, src_rounded)
            .and_then(|stats| {
                self.record_copy(&disk)?;
                Ok(stats)
            });
        let stats = match finished {
            Ok(s) => s,
            Err(e) => {
                self.discard_copy(&disk.disk_id, disk.tmp.as_deref());
                let _ = self.kms.audit_crypto_shred(&disk.ctx, Some(&disk.disk_id));
                return Err(e);
            }
        };
        Ok(json!({
            "DiskId": disk.disk_id,
            "Encrypted": true,
            "SizeBytes": disk.new_size,
            "Source": source_id,
            "SourceSizeBytes": src_size,
            "CopyMode": mode,
            "BytesCopied": stats.copied,
            "BytesSkipped": src_rounded - stats.copied,
        }))
    }

    /// Step 4: the first `src_rounded` bytes of `source` (only the allocated
    /// clusters of a disk's clone) written through volume `disk_id` and the crypto
    /// layer of key `xts`. The key is dropped with the layer when this returns.
    fn copy_into(
        &self,
        task: &super::tasks::Task,
        reactors: &Reactors,
        source: &Source,
        disk_id: &str,
        xts: Arc<crate::crypto::Xts>,
        src_rounded: u64,
    ) -> Result<CopyStats, ControlError> {
        let dst: BdevRef = Arc::new(
            CryptoBdev::new(self.pool.bdev(disk_id)?, xts, ENCRYPTION_SECTOR)
                .map_err(|e| ControlError::DataPath(e.to_string()))?,
        );
        match source {
            Source::Disk { tmp, .. } => {
                let src = self.pool.bdev(tmp)?;
                let ranges = self.pool.allocated_ranges(tmp, BATCH)?;
                let ranges: Vec<(u64, u64)> = ranges
                    .into_iter()
                    .filter(|r| r.0 < src_rounded)
                    .map(|(o, n)| (o, n.min(src_rounded - o)))
                    .collect();
                copy(reactors, &dst, &ranges, task, |off, len| {
                    run_job(reactors, &src, read_ops(off, len), vec![0; len as usize])
                        .map_err(|e| io_error(e, "reading the source disk"))
                })
            }
            Source::File { path, file } => {
                let ranges: Vec<(u64, u64)> = (0..src_rounded)
                    .step_by(BATCH as usize)
                    .map(|o| (o, BATCH.min(src_rounded - o)))
                    .collect();
                copy(reactors, &dst, &ranges, task, |off, len| {
                    read_file(file, off, len).map_err(|e| ControlError::DataPath(format!("{}: {e}", path.display())))
                })
            }
        }
    }

    /// Step 5: one transaction deletes the temporary clone and records the wrapped
    /// key and the disk row.
    fn record_copy(&self, disk: &NewDisk) -> Result<(), ControlError> {
        let txn = self.begin()?;
        if let Some(t) = &disk.tmp {
            self.wait_closed(t);
            self.pool.delete_volume(&txn, t)?;
        }
        let enc = Encryption {
            key_id: disk.key_id.clone(),
            cmk_id: disk.wrapped.cmk_id.clone(),
        };
        catalog::put(
            &txn,
            &KeyRecord {
                key_id: disk.key_id.clone(),
                account: disk.account.clone(),
                region: disk.region.clone(),
                wrapped: disk.wrapped.clone(),
                refs: 0,
                origin_disk: disk.disk_id.clone(),
                created_at: super::util::now_rfc3339(),
            },
        )?;
        self.key_ref(&txn, &enc)?;
        let rec = DiskRecord {
            id: disk.disk_id.clone(),
            account: disk.account.clone(),
            region: disk.region.clone(),
            name: disk.name.clone(),
            description: disk.description.clone(),
            size: disk.new_size,
            category: disk.category,
            kind: DiskKind::Cloud,
            role: DiskRole::Data,
            encryption: Some(enc),
            source_snapshot: None,
            source_image: None,
            multi_attach: false,
            qos: self.cfg.qos.caps(disk.category, disk.new_size),
            created_at: super::util::now_rfc3339(),
        };
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(())
    }

    /// Checks and opens `SourcePath`: only beneath the import directory (`serve
    /// --import-dir`; none: refused), resolved by the kernel without leaving it and
    /// without following any symlink (`openat2` with `RESOLVE_BENEATH |
    /// RESOLVE_NO_SYMLINKS`, so nothing can swap a path between the check and the open),
    /// a regular file with one link (a hard link could name a file outside) or, with
    /// `--import-devices`, a block device; never the pool. Returns the path as given
    /// beneath the import directory, the open file and its size.
    pub(super) fn open_source_path(&self, path: &str) -> Result<(PathBuf, File, u64), ControlError> {
        let bad =
            |why: String| ControlError::param("InvalidParameter.SourcePath", format!("SourcePath {path:?}: {why}"));
        let Some(dir) = &self.cfg.import_dir else {
            return Err(ControlError::limit(
                "InvalidOperation.ImportDisabled",
                "SourcePath is off: the daemon has no import directory (serve --import-dir DIR); copy from a disk \
                 with SourceDiskId, or put the image under an import directory",
            ));
        };
        let p = Path::new(path);
        // Relative to the import directory; an absolute path must lie beneath it.
        let rel = if p.is_absolute() {
            p.strip_prefix(dir)
                .map_err(|_| bad(format!("is not beneath the import directory {}", dir.display())))?
        } else {
            p
        };
        if rel.as_os_str().is_empty() {
            return Err(bad("names the import directory itself, not a file".into()));
        }
        let file = crate::sys::open_beneath(dir, rel).map_err(|e| {
            bad(match e.raw_os_error() {
                Some(libc::EXDEV) => format!("leaves the import directory {}", dir.display()),
                Some(libc::ELOOP) => "goes through a symlink (not followed)".into(),
                _ => format!("cannot be opened beneath {} ({e})", dir.display()),
            })
        })?;
        let meta = file.metadata().map_err(|e| bad(format!("cannot be read ({e})")))?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            if !self.cfg.import_devices {
                return Err(bad(
                    "is a block device; the daemon imports devices only with serve --import-devices".into(),
                ));
            }
        } else if !ft.is_file() {
            return Err(bad("must be a raw image file or a block device".into()));
        } else if meta.nlink() != 1 {
            return Err(bad(format!(
                "has {} hard links; a hard link can name a file outside the import directory, so copy the \
                 image into it instead",
                meta.nlink()
            )));
        }
        if let (Ok(dd), Ok(real)) = (
            std::fs::canonicalize(&self.cfg.data_dir),
            std::fs::canonicalize(dir.join(rel)),
        ) {
            if real.starts_with(&dd) {
                return Err(bad(
                    "is inside the daemon's data directory (catalog, pool, keys); copy from a disk with SourceDiskId"
                        .into(),
                ));
            }
        }
        if let Some(pm) = self.pool.path().and_then(|p| std::fs::metadata(p).ok()) {
            let same_file = pm.dev() == meta.dev() && pm.ino() == meta.ino();
            let same_dev = ft.is_block_device() && pm.file_type().is_block_device() && pm.rdev() == meta.rdev();
            if same_file || same_dev {
                return Err(bad("is the daemon's pool; copy from a disk with SourceDiskId".into()));
            }
        }
        let mut file = file;
        let size = if ft.is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| bad(format!("size unknown ({e})")))?
        } else {
            meta.len()
        };
        if size == 0 {
            return Err(bad("is empty".into()));
        }
        Ok((dir.join(rel), file, size))
    }

    /// Waits (briefly) until no bdev of `id` is alive: the copy's pollers drop theirs
    /// as they finish.
    pub(super) fn wait_closed(&self, id: &str) {
        let t = Instant::now();
        while self.pool.is_open(id) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes a half-made copy: the new volume and the temporary clone.
    fn discard_copy(&self, disk_id: &str, tmp: Option<&str>) {
        self.wait_closed(disk_id);
        if let Some(t) = tmp {
            self.wait_closed(t);
        }
        let r = (|| {
            let txn = self.begin()?;
            for id in std::iter::once(disk_id).chain(tmp) {
                match self.pool.delete_volume(&txn, id) {
                    Ok(()) | Err(VolumeError::NotFound(_)) => {}
                    Err(e) => return Err(ControlError::from(e)),
                }
            }
            txn.commit()?;
            Ok::<(), ControlError>(())
        })();
        if let Err(e) = r {
            tracing::error!(
                disk = disk_id,
                error = %e,
                "CreateEncryptedCopy could not remove the half-made volume; `sealdisk check` lists it"
            );
        }
    }
}

/// Copies the byte ranges `(offset, len)` (multiples of [`BLOCK`]) from
/// `read(offset, n)` into `dst`, skipping all-zero blocks, and flushes `dst`. Stops
/// between batches when `task` is cancelled.
fn copy(
    reactors: &Reactors,
    dst: &BdevRef,
    ranges: &[(u64, u64)],
    task: &super::tasks::Task,
    mut read: impl FnMut(u64, u64) -> Result<Vec<u8>, ControlError>,
) -> Result<CopyStats, ControlError> {
    let mut st = CopyStats::default();
    for &(off, n) in ranges {
        if task.cancelled() {
            return Err(task.cancelled_error());
        }
        let data = read(off, n)?;
        let mut ops = Vec::new();
        for (start, end) in nonzero_runs(&data, PIECE as usize) {
            ops.push(Op::Write {
                offset: off + start as u64,
                at: start,
                len: end - start,
            });
            st.copied += (end - start) as u64;
        }
        if !ops.is_empty() {
            run_job(reactors, dst, ops, data).map_err(|e| io_error(e, "writing the new disk"))?;
        }
        task.progress(n);
    }
    run_job(reactors, dst, vec![Op::Flush], Vec::new()).map_err(|e| io_error(e, "flushing the new disk"))?;
    Ok(st)
}

/// Byte ranges of `data` holding non-zero [`BLOCK`]s, merged up to `max` bytes each.
pub(super) fn nonzero_runs(data: &[u8], max: usize) -> Vec<(usize, usize)> {
    let blk = BLOCK as usize;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, b) in data.chunks(blk).enumerate() {
        // OR-folding 64-byte pieces vectorises; an early-exit byte loop does not.
        if b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0) {
            continue;
        }
        let (s, e) = (i * blk, (i * blk + b.len()));
        match out.last_mut() {
            Some(last) if last.1 == s && e - last.0 <= max => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

pub(super) fn io_error(e: JobError, what: &str) -> ControlError {
    match e {
        JobError::Io(IoError::Device { errno }) if errno == libc::ENOSPC => {
            ControlError::Volume(VolumeError::PoolFull { needed: BLOCK, free: 0 })
        }
        JobError::Io(IoError::Device { errno }) => {
            ControlError::Volume(VolumeError::io(what, std::io::Error::from_raw_os_error(errno)))
        }
        JobError::Io(e) => ControlError::Volume(VolumeError::io(what, std::io::Error::other(e.to_string()))),
        JobError::Other(e) => ControlError::DataPath(format!("{what}: {e}")),
    }
}

/// Reads `len` bytes at `off` from a file (zeros past its end).
pub(super) fn read_file(f: &File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::nonzero_runs;

    #[test]
    fn runs_skip_zero_blocks_and_merge_up_to_max() {
        let mut d = vec![0u8; 10 * 4096];
        d[0] = 1; // block 0
        d[4096 + 4095] = 1; // block 1
        d[3 * 4096 + 17] = 1; // block 3
        for b in 5..10 {
            d[b * 4096] = 9;
        }
        assert_eq!(
            nonzero_runs(&d, 8192),
            vec![
                (0, 8192),
                (3 * 4096, 4 * 4096),
                (5 * 4096, 7 * 4096),
                (7 * 4096, 9 * 4096),
                (9 * 4096, 10 * 4096)
            ]
        );
        assert!(nonzero_runs(&vec![0u8; 3 * 4096], 8192).is_empty());
        // A short tail block counts too.
        assert_eq!(nonzero_runs(&[0, 0, 7], 8192), vec![(0, 3)]);
    }
}
