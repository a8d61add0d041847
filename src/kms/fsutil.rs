//! Small filesystem helpers: private directories, atomic durable writes, the directory
//! lock, and RFC 3339 time stamps.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::KmsError;

/// Creates `dir` (and parents) if needed and makes it `0700`.
pub(super) fn private_dir(dir: &Path) -> Result<(), KmsError> {
    fs::create_dir_all(dir).map_err(|e| KmsError::io("creating directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| KmsError::io("chmod 700", dir, e))
}

/// `fsync` of a directory, so renames and creations in it are durable.
pub(super) fn fsync_dir(dir: &Path) -> Result<(), KmsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KmsError::io("fsync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically and durably: write `path.tmp` (mode 0600),
/// fsync it, rename it over `path`, fsync the directory.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KmsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| KmsError::io("creating", &tmp, e))?;
    f.write_all(bytes).map_err(|e| KmsError::io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| KmsError::io("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| KmsError::io("renaming into place", path, e))?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a whole small state file; `Ok(None)` if it does not exist.
pub(super) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, KmsError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KmsError::io("reading", path, e)),
    }
}

/// An exclusive `flock` on a lock file, held for the life of the value.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting; `Kms.StoreLocked` if someone else holds it.
    pub(super) fn acquire(path: &Path) -> Result<DirLock, KmsError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| KmsError::io("opening lock file", path, e))?;
        // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                KmsError::StoreLocked { path: path.to_owned() }
            } else {
                KmsError::io("locking", path, e)
            });
        }
        Ok(DirLock { _file: file })
    }
}

pub(super) use crate::units::{now_rfc3339_millis as rfc3339_now, now_unix, rfc3339};
