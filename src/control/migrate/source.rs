//! The sources MigrateDisk reads: a disk's point-in-time clone, a file, an NBD export;
//! where their data is, and reading it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::BLOCK;
use crate::bdev::uring::{UringBdev, UringOpts};
use crate::bdev::BdevRef;
use crate::control::copy::{io_error, read_file};
use crate::control::job::{read_ops, run_job};
use crate::control::nbd_client::{NbdClient, NbdError};
use crate::control::ControlError;
use crate::reactor::Reactors;

/// An open source, ready to read.
pub(super) enum Source {
    /// A disk's point-in-time clone (through its crypto layer if encrypted) and where
    /// its data is.
    Disk {
        bdev: BdevRef,
        ranges: Vec<(u64, u64)>,
    },
    /// A file or block device: its data read with io_uring (through the page cache, as
    /// it was opened), where its data is found with SEEK_DATA/SEEK_HOLE.
    File {
        file: File,
        path: PathBuf,
        bdev: BdevRef,
    },
    Nbd(Box<NbdClient>),
}

impl Source {
    /// A file source over `file` (opened read-only beneath the import directory).
    pub(super) fn file(file: File, path: PathBuf) -> Result<Source, ControlError> {
        let bad = |e: std::io::Error| ControlError::DataPath(format!("{}: {e}", path.display()));
        let ring_file = file.try_clone().map_err(bad)?;
        let opts = UringOpts {
            buffered: true,
            ..UringOpts::default()
        };
        let bdev: BdevRef = Arc::new(UringBdev::from_file(ring_file, &path, &opts).map_err(bad)?);
        Ok(Source::File { file, path, bdev })
    }

    /// Another handle on the same source, for another reader: the same clone, another
    /// descriptor of the file, another connection to the NBD server.
    pub(super) fn try_clone(&self) -> Result<Source, ControlError> {
        Ok(match self {
            Source::Disk { bdev, ranges } => Source::Disk {
                bdev: bdev.clone(),
                ranges: ranges.clone(),
            },
            Source::File { file, path, bdev } => Source::File {
                file: file
                    .try_clone()
                    .map_err(|e| ControlError::DataPath(format!("{}: {e}", path.display())))?,
                path: path.clone(),
                bdev: bdev.clone(),
            },
            Source::Nbd(c) => Source::Nbd(Box::new(c.reconnect().map_err(|e| nbd_error(e, "connecting again"))?)),
        })
    }

    /// Data ranges of `off..off+len` (block-aligned, merged, in order); the rest of the
    /// source reads as zeros.
    pub(super) fn extents(&mut self, off: u64, len: u64, size: u64) -> Result<Vec<(u64, u64)>, ControlError> {
        let end = off + len;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| {
            let s = (s / BLOCK * BLOCK).max(off);
            let e = e.div_ceil(BLOCK).saturating_mul(BLOCK).min(end);
            if e <= s {
                return;
            }
            match out.last_mut() {
                Some(l) if l.0 + l.1 >= s => l.1 = l.1.max(e - l.0),
                _ => out.push((s, e - s)),
            }
        };
        match self {
            Source::Disk { ranges, .. } => {
                for &(o, n) in ranges.iter() {
                    if o < end && o + n > off {
                        push(o.max(off), (o + n).min(end));
                    }
                }
            }
            Source::File { file, path, .. } => {
                for (s, e) in file_data_ranges(file, off, end.min(size))
                    .map_err(|e| ControlError::DataPath(format!("{}: {e}", path.display())))?
                {
                    push(s, e);
                }
            }
            Source::Nbd(c) => {
                for (o, n) in c.data_extents(off, len).map_err(|e| nbd_error(e, "block status"))? {
                    push(o, o + n);
                }
            }
        }
        Ok(out)
    }

    /// `len` bytes at `off` (zeros past the source's end at `size`).
    pub(super) fn read(&mut self, reactors: &Reactors, off: u64, len: u64, size: u64) -> Result<Vec<u8>, ControlError> {
        match self {
            Source::Disk { bdev, .. } => run_job(reactors, bdev, read_ops(off, len), vec![0; len as usize])
                .map_err(|e| io_error(e, "reading the source disk")),
            Source::File { file, path, bdev } => {
                // The ring reads whole 512-byte sectors: up to the last whole one (its
                // capacity); a shorter tail past it is read with pread.
                let end = (off + len).min(size);
                let ring_end = end.min(bdev.capacity()).max(off);
                let mut buf = vec![0u8; len as usize];
                if ring_end > off {
                    buf = run_job(reactors, bdev, read_ops(off, ring_end - off), buf)
                        .map_err(|e| io_error(e, &format!("reading {}", path.display())))?;
                }
                if end > ring_end {
                    let tail = read_file(file, ring_end, end - ring_end)
                        .map_err(|e| ControlError::DataPath(format!("{}: {e}", path.display())))?;
                    let at = (ring_end - off) as usize;
                    buf[at..at + tail.len()].copy_from_slice(&tail);
                }
                Ok(buf)
            }
            Source::Nbd(c) => {
                let mut buf = vec![0u8; len as usize];
                let n = size.saturating_sub(off).min(len) as usize;
                if n > 0 {
                    c.read(off, &mut buf[..n]).map_err(|e| nbd_error(e, "reading"))?;
                }
                Ok(buf)
            }
        }
    }
}

pub(super) fn nbd_error(e: NbdError, what: &str) -> ControlError {
    ControlError::state("Migration.SourceFailed", format!("NBD source: {what}: {e}"))
}

/// Data ranges of a file in `off..end` by SEEK_DATA/SEEK_HOLE; the whole range where the
/// file system (or a block device) cannot tell.
fn file_data_ranges(f: &File, off: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let seek = |pos: u64, whence: i32| crate::sys::seek_data_or_hole(f, pos, whence == libc::SEEK_DATA);
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Ok(vec![(off, end)]);
            }
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole));
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// A file's identity for a resume: size and modification time.
pub(super) fn file_stamp(f: &File) -> Option<String> {
    let m = f.metadata().ok()?;
    Some(format!("{}:{}.{:09}", m.len(), m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_data_ranges_follow_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("ranges");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 5 << 20).unwrap();
        f.flush().unwrap();
        let f = File::open(&p).unwrap();
        let r = file_data_ranges(&f, 0, 8 << 20).unwrap();
        // The file system may round to its block size, but the holes between stay.
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(
            r[0].0 <= 1 << 20 && r[0].1 >= (1 << 20) + 4096 && r[0].1 < 5 << 20,
            "{r:?}"
        );
        assert!(r[1].0 <= 5 << 20 && r[1].1 >= (5 << 20) + 4096, "{r:?}");
    }
}
