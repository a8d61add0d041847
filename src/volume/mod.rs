//! Thin volumes with cluster-granular copy-on-write, in one pool.
//!
//! (Interface first; implementation in progress.)

use std::path::Path;
use std::sync::Arc;

use crate::bdev::BdevRef;

/// Default cluster (allocation and copy-on-write unit).
pub const DEFAULT_CLUSTER: u64 = 256 << 10;

/// Why a volume operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeError {
    NotFound(String),
    Exists(String),
    BadSize {
        size: u64,
        why: String,
    },
    /// The volume is on the data path (attached); detach it first.
    InUse(String),
    PoolFull {
        needed: u64,
        free: u64,
    },
    Io(String),
    Db(String),
    Corrupt(String),
}

impl VolumeError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            VolumeError::NotFound(_) => "InvalidVolume.NotFound",
            VolumeError::Exists(_) => "InvalidVolume.Exists",
            VolumeError::BadSize { .. } => "InvalidParameter.Size",
            VolumeError::InUse(_) => "IncorrectDiskStatus.InUse",
            VolumeError::PoolFull { .. } => "Pool.Full",
            VolumeError::Io(_) => "Pool.IoError",
            VolumeError::Db(_) => "Catalog.Error",
            VolumeError::Corrupt(_) => "Pool.Corrupt",
        }
    }
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VolumeError::NotFound(id) => write!(f, "volume {id} does not exist"),
            VolumeError::Exists(id) => write!(f, "volume {id} already exists"),
            VolumeError::BadSize { size, why } => write!(f, "size {size}: {why}"),
            VolumeError::InUse(id) => write!(f, "volume {id} is attached; detach it first"),
            VolumeError::PoolFull { needed, free } => {
                write!(
                    f,
                    "pool is full: {needed} bytes needed, {free} free; grow the pool or delete snapshots"
                )
            }
            VolumeError::Io(e) => write!(f, "pool I/O error: {e}"),
            VolumeError::Db(e) => write!(f, "catalog error: {e}"),
            VolumeError::Corrupt(e) => write!(f, "pool metadata is inconsistent: {e}"),
        }
    }
}

impl std::error::Error for VolumeError {}

/// Result of [`Pool::check`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub volumes: u64,
    pub clusters_in_use: u64,
    pub clusters_free: u64,
    pub problems: Vec<String>,
}

/// A pool of clusters on a file or block device, with its volume maps in the
/// catalog database.
pub struct Pool {
    _priv: (),
}

impl Pool {
    /// Open the pool at `path` (creating a sparse file of `create_size` bytes
    /// if it does not exist), with its tables in `db`.
    pub fn open(_db: Arc<redb::Database>, _path: &Path, _create_size: u64) -> Result<Arc<Pool>, VolumeError> {
        todo!()
    }
    pub fn cluster_size(&self) -> u64 {
        todo!()
    }
    /// Pool capacity in bytes.
    pub fn capacity(&self) -> u64 {
        todo!()
    }
    /// A new, empty (all-zero) thin volume of `size` bytes (multiple of 4096).
    pub fn create_volume(&self, _txn: &redb::WriteTransaction, _id: &str, _size: u64) -> Result<(), VolumeError> {
        todo!()
    }
    /// `dst` becomes a copy-on-write copy of `src` (snapshot or clone), of
    /// `size` bytes (≥ src's size). Shares clusters; copies nothing.
    pub fn clone_volume(
        &self,
        _txn: &redb::WriteTransaction,
        _src: &str,
        _dst: &str,
        _size: u64,
    ) -> Result<(), VolumeError> {
        todo!()
    }
    /// Replace `id`'s contents with a copy-on-write copy of `from` (or make it
    /// all zeros). Keeps its size. `id` must be detached.
    pub fn reset_volume(
        &self,
        _txn: &redb::WriteTransaction,
        _id: &str,
        _from: Option<&str>,
    ) -> Result<(), VolumeError> {
        todo!()
    }
    /// Delete `id`, releasing clusters no one else shares. Must be detached.
    pub fn delete_volume(&self, _txn: &redb::WriteTransaction, _id: &str) -> Result<(), VolumeError> {
        todo!()
    }
    /// Size of a volume, if it exists.
    pub fn volume_size(&self, _id: &str) -> Result<Option<u64>, VolumeError> {
        todo!()
    }
    /// A block device over the volume (block size 512) for the data path.
    /// While any returned bdev lives, the volume counts as attached.
    pub fn bdev(self: &Arc<Self>, _id: &str) -> Result<BdevRef, VolumeError> {
        todo!()
    }
    /// Whether a bdev of `id` is live.
    pub fn is_open(&self, _id: &str) -> bool {
        todo!()
    }
    /// Verify the pool against the maps: no leaked, doubly counted or
    /// out-of-range clusters.
    pub fn check(&self) -> Result<CheckReport, VolumeError> {
        todo!()
    }
}
