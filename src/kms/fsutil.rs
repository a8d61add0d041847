//! Small filesystem helpers: private directories, atomic durable writes, the directory
//! lock, and RFC 3339 time stamps.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::KmsError;

/// Creates `dir` (and parents) if needed and makes it `0700`.
pub fn private_dir(dir: &Path) -> Result<(), KmsError> {
    fs::create_dir_all(dir).map_err(|e| KmsError::io("creating directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| KmsError::io("chmod 700", dir, e))
}

/// `fsync` of a directory, so renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), KmsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KmsError::io("fsync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically and durably: write `path.tmp` (mode 0600),
/// fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KmsError> {
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
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, KmsError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KmsError::io("reading", path, e)),
    }
}

/// An exclusive `flock` on a lock file, held for the life of the value.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting; `Kms.StoreLocked` if someone else holds it.
    pub fn acquire(path: &Path) -> Result<DirLock, KmsError> {
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

/// Seconds and nanoseconds since the Unix epoch, now.
pub fn now_unix() -> (u64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// RFC 3339 UTC time stamp, e.g. `2026-11-28T02:42:45.123Z` (milliseconds) or without
/// fraction when `millis` is `None`.
pub fn rfc3339(secs: u64, millis: Option<u32>) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem / 60) % 60, rem % 60);
    match millis {
        Some(ms) => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z"),
        None => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    }
}

/// The current time as RFC 3339 with milliseconds.
pub fn rfc3339_now() -> String {
    let (s, ns) = now_unix();
    rfc3339(s, Some(ns / 1_000_000))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, None), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400, Some(5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_833_765, None), "2026-11-28T02:42:45Z");
        assert_eq!(rfc3339(4_102_444_799, None), "2099-12-31T23:59:59Z");
    }
}
