//! Where disks, snapshots and images live: the local file pool
//! ([`crate::volume::Pool`], the default) or a Ceph RBD pool ([`rbd::RbdStore`],
//! `serve --backend rbd`). The control plane calls [`Store`], which has the pool's
//! volume operations and hands each to the backend in use.

pub(crate) mod rbd;

use std::path::Path;
use std::sync::Arc;

use crate::bdev::BdevRef;
use crate::volume::{CheckReport, MetaStatsSnapshot, Pool, VolumeError};

/// Which backend `serve` uses (`--backend file|rbd`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Backend {
    /// The pool file or device (`--pool`).
    #[default]
    File,
    /// RBD images in pool `pool` of the cluster that `ceph_conf` describes.
    Rbd {
        ceph_conf: std::path::PathBuf,
        pool: String,
    },
}

/// The backend of a daemon's volumes.
#[derive(Clone)]
pub enum Store {
    File(Arc<Pool>),
    Rbd(Arc<rbd::RbdStore>),
}

impl From<Arc<Pool>> for Store {
    fn from(p: Arc<Pool>) -> Store {
        Store::File(p)
    }
}

impl Store {
    /// The file pool, if that is the backend.
    pub fn file(&self) -> Option<&Arc<Pool>> {
        match self {
            Store::File(p) => Some(p),
            Store::Rbd(_) => None,
        }
    }

    /// The pool file or device (`None` on RBD).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Store::File(p) => Some(p.path()),
            Store::Rbd(_) => None,
        }
    }

    /// Allocation unit: the pool's cluster, or the RBD object size.
    pub fn cluster_size(&self) -> u64 {
        match self {
            Store::File(p) => p.cluster_size(),
            Store::Rbd(r) => r.object_size(),
        }
    }

    pub fn is_open(&self, id: &str) -> bool {
        match self {
            Store::File(p) => p.is_open(id),
            Store::Rbd(r) => r.is_open(id),
        }
    }

    pub fn create_volume(&self, txn: &redb::WriteTransaction, id: &str, size: u64) -> Result<(), VolumeError> {
        match self {
            Store::File(p) => p.create_volume(txn, id, size),
            Store::Rbd(r) => r.create_volume(txn, id, size),
        }
    }

    pub fn clone_volume(
        &self,
        txn: &redb::WriteTransaction,
        src: &str,
        dst: &str,
        size: u64,
    ) -> Result<(), VolumeError> {
        match self {
            Store::File(p) => p.clone_volume(txn, src, dst, size),
            Store::Rbd(r) => r.clone_volume(txn, src, dst, size),
        }
    }

    pub fn reset_volume(&self, txn: &redb::WriteTransaction, id: &str, from: Option<&str>) -> Result<(), VolumeError> {
        match self {
            Store::File(p) => p.reset_volume(txn, id, from),
            Store::Rbd(r) => r.reset_volume(txn, id, from),
        }
    }

    pub fn delete_volume(&self, txn: &redb::WriteTransaction, id: &str) -> Result<(), VolumeError> {
        match self {
            Store::File(p) => p.delete_volume(txn, id),
            Store::Rbd(r) => r.delete_volume(txn, id),
        }
    }

    pub fn volume_ids(&self) -> Result<Vec<String>, VolumeError> {
        match self {
            Store::File(p) => p.volume_ids(),
            Store::Rbd(r) => r.volume_ids(),
        }
    }

    pub fn volume_size(&self, id: &str) -> Result<Option<u64>, VolumeError> {
        match self {
            Store::File(p) => p.volume_size(id),
            Store::Rbd(r) => r.volume_size(id),
        }
    }

    pub fn mapped_bytes(&self, id: &str) -> Result<u64, VolumeError> {
        match self {
            Store::File(p) => p.mapped_bytes(id),
            Store::Rbd(r) => r.mapped_bytes(id),
        }
    }

    pub fn allocated_ranges(&self, id: &str, max: u64) -> Result<Vec<(u64, u64)>, VolumeError> {
        match self {
            Store::File(p) => p.allocated_ranges(id, max),
            Store::Rbd(r) => r.allocated_ranges(id, max),
        }
    }

    pub fn bdev(&self, id: &str) -> Result<BdevRef, VolumeError> {
        match self {
            Store::File(p) => p.bdev(id),
            Store::Rbd(r) => r.bdev(id),
        }
    }

    /// The file pool's metadata thread counters (zeros on RBD, which has none).
    pub fn meta_stats(&self) -> MetaStatsSnapshot {
        match self {
            Store::File(p) => p.meta_stats(),
            Store::Rbd(_) => MetaStatsSnapshot::default(),
        }
    }

    pub fn check(&self) -> Result<CheckReport, VolumeError> {
        match self {
            Store::File(p) => p.check(),
            Store::Rbd(r) => r.check(),
        }
    }

    /// What another host needs to adopt disk `id` (account, region, category, size,
    /// wrapped key and its format), stored with the volume where the backend can (RBD
    /// image metadata); a no-op on the file pool.
    pub fn describe_volume(
        &self,
        txn: &redb::WriteTransaction,
        id: &str,
        meta: &[(&str, String)],
    ) -> Result<(), VolumeError> {
        match self {
            Store::File(_) => Ok(()),
            Store::Rbd(r) => r.describe_volume(txn, id, meta),
        }
    }
}
