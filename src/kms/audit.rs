//! The KMS audit log: one JSON object per line, fdatasync'd per entry, rotated by size.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::KmsError;
use super::fsutil;
use super::BackendKind;

/// Audit log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditConfig {
    /// Rotate when the current file would grow beyond this many bytes. Default 8 MiB.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` newest … `audit.log.<keep>` oldest). Default 8.
    pub keep: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_bytes: 8 << 20,
            keep: 8,
        }
    }
}

/// Who made the calls on this thread: the peer of the control socket connection
/// (SO_PEERCRED), recorded in every audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub pid: i32,
}

thread_local! {
    static CALLER: std::cell::Cell<Option<Caller>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `caller` as this thread's caller (restored afterwards).
pub(crate) fn with_caller<R>(caller: Option<Caller>, f: impl FnOnce() -> R) -> R {
    let old = CALLER.with(|c| c.replace(caller));
    let r = f();
    CALLER.with(|c| c.set(old));
    r
}

/// This thread's caller, if one was set.
pub(crate) fn caller() -> Option<Caller> {
    CALLER.with(|c| c.get())
}

/// One audit record, as written (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Account id.
    pub account: String,
    /// Region id.
    pub region: String,
    /// Operation, e.g. `GenerateDataKey` (see `docs/kms.md`).
    pub operation: String,
    /// Disk id, when the caller gave one.
    pub disk_id: Option<String>,
    /// Data key id, for data key operations.
    pub key_id: Option<String>,
    /// CMK id, when known.
    pub cmk_id: Option<String>,
    /// `local` or `transit`.
    pub backend: BackendKind,
    /// `ok` or `error`.
    pub result: String,
    /// The error code when `result` is `error`.
    pub error_code: Option<String>,
    /// Who asked (the control socket's peer), when the call came from one.
    #[serde(default)]
    pub caller: Option<Caller>,
}

#[derive(Debug)]
pub(crate) struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    cfg: AuditConfig,
}

fn open_append(path: &Path) -> Result<File, KmsError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| KmsError::io("opening audit log", path, e))
}

impl AuditLog {
    pub(crate) fn open(path: PathBuf, cfg: AuditConfig) -> Result<AuditLog, KmsError> {
        if cfg.keep == 0 || cfg.max_bytes < 4096 {
            return Err(KmsError::Config {
                detail: format!(
                    "audit keep must be >= 1 and max_bytes >= 4096 (got {} and {})",
                    cfg.keep, cfg.max_bytes
                ),
            });
        }
        let file = open_append(&path)?;
        let size = file
            .metadata()
            .map_err(|e| KmsError::io("stat audit log", &path, e))?
            .len();
        fsutil::fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(AuditLog { path, file, size, cfg })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn rotated(&self, i: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let oldest = self.rotated(self.cfg.keep);
        match fs::remove_file(&oldest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for i in (1..self.cfg.keep).rev() {
            match fs::rename(self.rotated(i), self.rotated(i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        fs::rename(&self.path, self.rotated(1))?;
        self.file = open_append(&self.path).map_err(|e| std::io::Error::other(e.to_string()))?;
        self.size = 0;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }

    /// Appends one record and makes it durable (fdatasync) before returning.
    pub(crate) fn append(&mut self, entry: &AuditEntry) -> Result<(), KmsError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| KmsError::AuditFailed {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let res = (|| {
            if self.size > 0 && self.size + line.len() as u64 > self.cfg.max_bytes {
                self.rotate()?;
            }
            self.file.write_all(&line)?;
            self.size += line.len() as u64;
            self.file.sync_data()
        })();
        res.map_err(|source| KmsError::AuditFailed {
            path: self.path.clone(),
            source,
        })
    }
}
