//! Thin volumes with cluster-granular copy-on-write, in one pool.
//!
//! A pool is a file or block device cut into clusters (default 256 KiB);
//! cluster 0 holds a header, the rest hold volume data. Which volume cluster
//! lives where is metadata in the catalog database (redb), next to the
//! catalog's own tables, so an ECS operation changes both in one transaction:
//!
//! * `vol_size`: volume id → size in bytes (disks and snapshots alike);
//! * `vol_map`: (volume id, cluster index) → physical cluster;
//! * `refs`: physical cluster → number of map entries pointing at it;
//! * `free`: physical clusters released below the high-water mark;
//! * `pool_meta`: cluster size, capacity, high-water mark, format version.
//!
//! A snapshot or clone copies the map and bumps the reference counts: no
//! data moves. A cluster with one reference is written in place (fast path,
//! on the reactor); an unallocated or shared cluster goes to the pool's
//! metadata thread (slow path), which writes the new cluster (copying the
//! old one's bytes as they are: ciphertext stays ciphertext, because the
//! XTS tweak is the disk's sector number, not the pool's), makes the data
//! durable (fdatasync), commits the map change, and only then publishes it
//! to the reactors. Unallocated clusters read as zeros.
//!
//! `docs/reliability.md` states the durability contract and how each part
//! is enforced: publish-after-commit ([`meta`]), snapshots that drain
//! in-flight fast-path writes and cluster reuse after a grace period
//! ([`epochs`]), and the fault injection the tests use ([`faults`]).

mod bdev;
mod epochs;
mod faults;
// Its three `pub` items become `pub(crate)` once the work under way in meta.rs has
// landed; until then the lint is off here.
mod meta;
mod meta_stats;
mod staged;
mod tables;

pub(crate) use bdev::VolumeBdev;
pub use faults::{FaultPoint, FaultSpecError, Faults};
pub(crate) use meta_stats::{MetaStats, MetaStatsSnapshot};

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata};

use crate::bdev::uring::{UringBdev, UringOpts};
use crate::bdev::{Bdev, BdevRef};
use tables::*;

/// Default cluster (allocation and copy-on-write unit).
pub(crate) const DEFAULT_CLUSTER: u64 = 256 << 10;

/// How long a snapshot of a live volume waits for its in-flight fast-path
/// writes to land before it gives up (the device stalls).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a volume operation failed. I/O and database failures keep their cause
/// (`std::error::Error::source`).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("size {size}: {why}")]
    BadSize { size: u64, why: String },
    /// The volume is on the data path (attached); detach it first.
    #[error("volume {0} is attached; detach it first")]
    InUse(String),
    #[error("pool is full: {needed} bytes needed, {free} free; grow the pool or delete snapshots")]
    PoolFull { needed: u64, free: u64 },
    /// The pool device or file failed; `context` says what was being done.
    #[error("pool I/O error: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The database holding the volume maps failed.
    #[error("catalog error: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    /// Fast-path writes did not drain in time (a snapshot or clone waits for them).
    #[error("writes in flight on {volume} did not complete within {secs} s; nothing was copied, try again")]
    Busy { volume: String, secs: u64 },
    #[error("pool metadata is inconsistent: {0}")]
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
            VolumeError::Io { .. } | VolumeError::Busy { .. } => "Pool.IoError",
            VolumeError::Db { .. } => "Catalog.Error",
            VolumeError::Corrupt(_) => "Pool.Corrupt",
        }
    }

    /// A pool I/O failure while doing `context`.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> VolumeError {
        VolumeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result of [`Pool::check`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub volumes: u64,
    pub clusters_in_use: u64,
    pub clusters_free: u64,
    pub problems: Vec<String>,
}

/// Pool format version (header and tables).
pub(crate) const POOL_VERSION: u64 = 1;
const MAGIC: &[u8; 8] = b"SEALPOOL";

pub(crate) fn db_err(e: impl Into<redb::Error>) -> VolumeError {
    db_err_in("volume tables")(e)
}

/// A database failure while doing `context`.
pub(crate) fn db_err_in<E: Into<redb::Error>>(context: &'static str) -> impl Fn(E) -> VolumeError {
    move |e| VolumeError::Db {
        context,
        source: Box::new(e.into()),
    }
}

fn check_id(id: &str) -> Result<(), VolumeError> {
    let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::NotFound(format!("{id:?} (malformed id)")))
    }
}

/// A pool of clusters on a file or block device, with its volume maps in the
/// catalog database.
pub struct Pool {
    pub(crate) db: Arc<redb::Database>,
    path: PathBuf,
    pub(crate) cluster: u64,
    pub(crate) capacity_clusters: u64,
    /// The data path's view of the pool device.
    pub(crate) base: BdevRef,
    /// Volumes with a live bdev, with their in-memory maps.
    pub(crate) open: Mutex<HashMap<String, Weak<bdev::VolState>>>,
    /// Which I/O could still address a cluster (see [`epochs`]).
    pub(crate) epochs: Arc<epochs::Epochs>,
    /// Freed clusters waiting for a grace period before reuse.
    limbo: Arc<epochs::Limbo>,
    faults: Arc<Faults>,
    pub(crate) meta: meta::MetaHandle,
}

impl Pool {
    /// Open the pool at `path`, creating it (a sparse file of `create_size`
    /// bytes, or the whole block device) and its tables if they do not exist.
    pub fn open(db: Arc<redb::Database>, path: &Path, create_size: u64) -> Result<Arc<Pool>, VolumeError> {
        Pool::open_with(db, path, create_size, DEFAULT_CLUSTER)
    }

    /// [`Pool::open`] with a chosen cluster size (power of two, 64 KiB ..
    /// 4 MiB) for a new pool; an existing pool keeps its own.
    pub fn open_with(
        db: Arc<redb::Database>,
        path: &Path,
        create_size: u64,
        cluster: u64,
    ) -> Result<Arc<Pool>, VolumeError> {
        Pool::open_with_faults(db, path, create_size, cluster, Arc::new(Faults::default()))
    }

    /// [`Pool::open_with`] with faults injected into the metadata thread's
    /// fdatasync and commit (tests; `serve` reads them from `SEALDISK_FAULTS`).
    pub fn open_with_faults(
        db: Arc<redb::Database>,
        path: &Path,
        create_size: u64,
        cluster: u64,
        faults: Arc<Faults>,
    ) -> Result<Arc<Pool>, VolumeError> {
        if !cluster.is_power_of_two() || !(64 << 10..=4 << 20).contains(&cluster) {
            return Err(VolumeError::BadSize {
                size: cluster,
                why: "cluster size must be a power of two from 64 KiB to 4 MiB".into(),
            });
        }
        let existing = stored_cluster(&db)?;
        let new = existing.is_none();
        let cluster = existing.unwrap_or(cluster);
        let base = UringBdev::open(
            path,
            &UringOpts {
                create_size: new.then_some(create_size),
                buffered: false,
                ..UringOpts::default()
            },
        )
        .map_err(|e| VolumeError::io(path.display().to_string(), e))?;
        let capacity_clusters = base.capacity() / cluster;
        if capacity_clusters < 2 {
            return Err(VolumeError::BadSize {
                size: base.capacity(),
                why: format!("a pool needs at least two {cluster}-byte clusters"),
            });
        }
        let header = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| VolumeError::io(path.display().to_string(), e))?;
        if new {
            format_pool(&header, &db, cluster)?;
        } else {
            check_pool_header(&header, path, cluster)?;
        }
        let epochs = Arc::new(epochs::Epochs::default());
        let limbo = Arc::new(epochs::Limbo::default());
        let meta = meta::MetaHandle::start(
            db.clone(),
            path,
            cluster,
            capacity_clusters,
            meta::Shared {
                epochs: epochs.clone(),
                limbo: limbo.clone(),
                faults: faults.clone(),
                stats: Arc::new(MetaStats::default()),
            },
        )?;
        Ok(Arc::new(Pool {
            db,
            path: path.to_path_buf(),
            cluster,
            capacity_clusters,
            base: Arc::new(base),
            open: Mutex::new(HashMap::new()),
            epochs,
            limbo,
            faults,
            meta,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The faults injected into this pool's metadata thread.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Pool capacity in bytes (data clusters only).
    pub fn capacity(&self) -> u64 {
        (self.capacity_clusters - 1) * self.cluster
    }

    fn live(&self, id: &str) -> Option<Arc<bdev::VolState>> {
        self.open.lock().expect("open volumes").get(id).and_then(Weak::upgrade)
    }

    /// Whether a bdev of `id` is live (the volume is on the data path).
    pub fn is_open(&self, id: &str) -> bool {
        self.live(id).is_some()
    }

    /// A volume size both backends accept: a non-zero multiple of 4096, at most 1 PiB.
    pub(crate) fn check_size(size: u64) -> Result<(), VolumeError> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(VolumeError::BadSize {
                size,
                why: "must be a non-zero multiple of 4096 bytes".into(),
            });
        }
        if size > 1 << 50 {
            return Err(VolumeError::BadSize {
                size,
                why: "larger than 1 PiB".into(),
            });
        }
        Ok(())
    }

    /// A new, empty (all-zero) thin volume of `size` bytes (multiple of 4096).
    pub fn create_volume(&self, txn: &redb::WriteTransaction, id: &str, size: u64) -> Result<(), VolumeError> {
        check_id(id)?;
        Pool::check_size(size)?;
        let mut sizes = txn.open_table(VOL_SIZE).map_err(db_err)?;
        if sizes.get(id).map_err(db_err)?.is_some() {
            return Err(VolumeError::Exists(id.into()));
        }
        sizes.insert(id, size).map_err(db_err)?;
        Ok(())
    }

    /// `dst` becomes a copy-on-write copy of `src` (snapshot or clone), of
    /// `size` bytes (≥ src's size). Shares clusters; copies nothing. If `src`
    /// is attached, its writes to now-shared clusters go copy-on-write from
    /// here on, and this waits until every fast-path write that started
    /// before has landed (so the copy holds it and no later copy-on-write
    /// misses it). Slow-path writes are serialised with `txn` by the
    /// catalog's single writer: committed ones are in the copy, later ones
    /// see the shared clusters.
    pub fn clone_volume(
        &self,
        txn: &redb::WriteTransaction,
        src: &str,
        dst: &str,
        size: u64,
    ) -> Result<(), VolumeError> {
        check_id(src)?;
        check_id(dst)?;
        Pool::check_size(size)?;
        let mut sizes = txn.open_table(VOL_SIZE).map_err(db_err)?;
        let src_size = sizes
            .get(src)
            .map_err(db_err)?
            .map(|v| v.value())
            .ok_or_else(|| VolumeError::NotFound(src.into()))?;
        if sizes.get(dst).map_err(db_err)?.is_some() {
            return Err(VolumeError::Exists(dst.into()));
        }
        if size < src_size {
            return Err(VolumeError::BadSize {
                size,
                why: format!("smaller than the source ({src_size} bytes)"),
            });
        }
        if let Some(live) = self.live(src) {
            // From now on every write to `src` takes the slow path, which
            // consults the reference counts (and finds them shared); then
            // drain the fast-path writes that saw an OWNED bit.
            live.share_all();
            if !self.epochs.synchronize(DRAIN_TIMEOUT) {
                return Err(VolumeError::Busy {
                    volume: src.to_string(),
                    secs: DRAIN_TIMEOUT.as_secs(),
                });
            }
        }
        sizes.insert(dst, size).map_err(db_err)?;
        let mut map = txn.open_table(VOL_MAP).map_err(db_err)?;
        let entries: Vec<(u64, u64)> = map
            .range((src, 0u64)..=(src, u64::MAX))
            .map_err(db_err)?
            .map(|r| r.map(|(k, v)| (k.value().1, v.value())))
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        let mut refs = txn.open_table(REFS).map_err(db_err)?;
        for (c, p) in entries {
            map.insert((dst, c), p).map_err(db_err)?;
            let n = refs.get(p).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            refs.insert(p, n + 1).map_err(db_err)?;
        }
        Ok(())
    }

    /// Drop every map entry of `id` (not attached), releasing clusters no one
    /// else uses. They are reused only after a grace period: another
    /// volume's read issued before it copied away from a shared cluster may
    /// still be in flight.
    fn drop_map(&self, txn: &redb::WriteTransaction, id: &str) -> Result<(), VolumeError> {
        let mut map = txn.open_table(VOL_MAP).map_err(db_err)?;
        let entries: Vec<(u64, u64)> = map
            .extract_from_if((id, 0u64)..=(id, u64::MAX), |_, _| true)
            .map_err(db_err)?
            .map(|r| r.map(|(k, v)| (k.value().1, v.value())))
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        let mut refs = txn.open_table(REFS).map_err(db_err)?;
        let mut free = txn.open_table(FREE).map_err(db_err)?;
        let mut freed = Vec::new();
        for (_, p) in entries {
            let n = refs.get(p).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            if n <= 1 {
                refs.remove(p).map_err(db_err)?;
                free.insert(p, ()).map_err(db_err)?;
                freed.push(p);
            } else {
                refs.insert(p, n - 1).map_err(db_err)?;
            }
        }
        // If `txn` aborts they were never freed: they just leave limbo later.
        self.limbo.ticket(&freed, self.epochs.request());
        Ok(())
    }

    /// Replace `id`'s contents with a copy-on-write copy of `from` (or make it
    /// all zeros). Keeps its size (`from` must not be larger). `id` must be
    /// detached.
    pub fn reset_volume(&self, txn: &redb::WriteTransaction, id: &str, from: Option<&str>) -> Result<(), VolumeError> {
        check_id(id)?;
        if self.is_open(id) {
            return Err(VolumeError::InUse(id.into()));
        }
        let size = {
            let sizes = txn.open_table(VOL_SIZE).map_err(db_err)?;
            let size = sizes
                .get(id)
                .map_err(db_err)?
                .map(|v| v.value())
                .ok_or_else(|| VolumeError::NotFound(id.into()))?;
            if let Some(f) = from {
                check_id(f)?;
                let fs = sizes
                    .get(f)
                    .map_err(db_err)?
                    .map(|v| v.value())
                    .ok_or_else(|| VolumeError::NotFound(f.into()))?;
                if fs > size {
                    return Err(VolumeError::BadSize {
                        size,
                        why: format!("smaller than {f} ({fs} bytes)"),
                    });
                }
            }
            size
        };
        self.drop_map(txn, id)?;
        if let Some(f) = from {
            // Re-create `id` as a clone of `from` with its own size.
            txn.open_table(VOL_SIZE).map_err(db_err)?.remove(id).map_err(db_err)?;
            self.clone_volume(txn, f, id, size)?;
        }
        Ok(())
    }

    /// Delete `id`, releasing clusters no one else shares. Must be detached.
    pub fn delete_volume(&self, txn: &redb::WriteTransaction, id: &str) -> Result<(), VolumeError> {
        check_id(id)?;
        if self.is_open(id) {
            return Err(VolumeError::InUse(id.into()));
        }
        if txn
            .open_table(VOL_SIZE)
            .map_err(db_err)?
            .remove(id)
            .map_err(db_err)?
            .is_none()
        {
            return Err(VolumeError::NotFound(id.into()));
        }
        self.drop_map(txn, id)
    }

    /// Ids of every volume in the pool.
    pub fn volume_ids(&self) -> Result<Vec<String>, VolumeError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(VOL_SIZE).map_err(db_err)?;
        let mut ids = Vec::new();
        for e in t.iter().map_err(db_err)? {
            ids.push(e.map_err(db_err)?.0.value().to_string());
        }
        Ok(ids)
    }

    /// Size of a volume, if it exists.
    pub fn volume_size(&self, id: &str) -> Result<Option<u64>, VolumeError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(VOL_SIZE).map_err(db_err)?;
        Ok(t.get(id).map_err(db_err)?.map(|v| v.value()))
    }

    /// Bytes of pool space a volume maps (shared clusters included).
    pub fn mapped_bytes(&self, id: &str) -> Result<u64, VolumeError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(VOL_MAP).map_err(db_err)?;
        let n = t.range((id, 0u64)..=(id, u64::MAX)).map_err(db_err)?.count() as u64;
        Ok(n * self.cluster)
    }

    /// Byte ranges `(offset, len)` of `id` that map pool clusters, in order and
    /// merged, each at most `max` bytes; the rest of the volume reads as zeros. For a
    /// volume no one writes (a snapshot, a clone made for a copy), this is where its
    /// data is.
    pub fn allocated_ranges(&self, id: &str, max: u64) -> Result<Vec<(u64, u64)>, VolumeError> {
        let size = self.volume_size(id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(VOL_MAP).map_err(db_err)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in t.range((id, 0u64)..=(id, u64::MAX)).map_err(db_err)? {
            let c = e.map_err(db_err)?.0.value().1;
            let off = c * self.cluster;
            let len = self.cluster.min(size.saturating_sub(off));
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off && last.1 + len <= max => last.1 += len,
                _ => out.push((off, len)),
            }
        }
        Ok(out)
    }

    /// A block device over the volume (block size 512) for the data path.
    /// While any returned bdev lives, the volume counts as attached.
    pub fn bdev(self: &Arc<Self>, id: &str) -> Result<BdevRef, VolumeError> {
        check_id(id)?;
        let mut open = self.open.lock().expect("open volumes");
        if let Some(v) = open.get(id).and_then(Weak::upgrade) {
            return Ok(Arc::new(VolumeBdev::new(self.clone(), v)));
        }
        let state = Arc::new(bdev::VolState::load(self, id)?);
        open.insert(id.to_string(), Arc::downgrade(&state));
        Ok(Arc::new(VolumeBdev::new(self.clone(), state)))
    }

    /// The metadata thread's counters (queue depth, batches, fdatasync and commit
    /// latency, time waiting for the catalog writer).
    pub fn meta_stats(&self) -> MetaStatsSnapshot {
        self.meta.stats().snapshot()
    }

    /// Verify the pool against the maps: every map entry inside the pool and
    /// inside its volume, reference counts equal to the references, no
    /// cluster both free and used, nothing leaked.
    pub fn check(&self) -> Result<CheckReport, VolumeError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let meta = r.open_table(POOL_META).map_err(db_err)?;
        let high = meta.get("high").map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
        let sizes = r.open_table(VOL_SIZE).map_err(db_err)?;
        let map = r.open_table(VOL_MAP).map_err(db_err)?;
        let refs = r.open_table(REFS).map_err(db_err)?;
        let free = r.open_table(FREE).map_err(db_err)?;
        let mut rep = CheckReport {
            volumes: sizes.len().map_err(db_err)?,
            ..CheckReport::default()
        };
        let mut counted: HashMap<u64, u64> = HashMap::new();
        let vol_sizes: HashMap<String, u64> = sizes
            .iter()
            .map_err(db_err)?
            .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value())))
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        for e in map.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (vol, c) = k.value();
            let p = v.value();
            match vol_sizes.get(vol) {
                None => rep
                    .problems
                    .push(format!("map entry ({vol}, {c}) belongs to no volume")),
                Some(&sz) if c * self.cluster >= sz => rep.problems.push(format!(
                    "map entry ({vol}, {c}) lies past the volume's end ({sz} bytes)"
                )),
                _ => {}
            }
            if p == 0 || p >= high || p >= self.capacity_clusters {
                rep.problems.push(format!(
                    "map entry ({vol}, {c}) points at cluster {p}, outside the allocated pool (1..{high})"
                ));
            }
            *counted.entry(p).or_default() += 1;
        }
        for e in refs.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (p, n) = (k.value(), v.value());
            match counted.remove(&p) {
                None => rep.problems.push(format!(
                    "cluster {p} has reference count {n} but no map entry uses it (leaked)"
                )),
                Some(c) if c != n => rep
                    .problems
                    .push(format!("cluster {p}: reference count {n}, but {c} map entries use it")),
                _ => {}
            }
            if free.get(p).map_err(db_err)?.is_some() {
                rep.problems.push(format!("cluster {p} is both free and in use"));
            }
        }
        for (p, c) in counted {
            rep.problems.push(format!(
                "cluster {p} is used by {c} map entries but has no reference count"
            ));
        }
        let mut nfree = 0;
        for e in free.iter().map_err(db_err)? {
            let p = e.map_err(db_err)?.0.value();
            nfree += 1;
            if p == 0 || p >= high {
                rep.problems
                    .push(format!("free cluster {p} lies outside the allocated pool (1..{high})"));
            }
        }
        rep.clusters_in_use = refs.len().map_err(db_err)?;
        rep.clusters_free = nfree + self.capacity_clusters.saturating_sub(high);
        if rep.clusters_in_use + nfree != high.saturating_sub(1) {
            rep.problems.push(format!(
                "{} clusters in use + {nfree} free != {} allocated below the high-water mark (leaked clusters)",
                rep.clusters_in_use,
                high.saturating_sub(1)
            ));
        }
        Ok(rep)
    }
}

/// The cluster size recorded in the catalog; `None`: a new pool.
fn stored_cluster(db: &redb::Database) -> Result<Option<u64>, VolumeError> {
    let r = db.begin_read().map_err(db_err)?;
    match r.open_table(POOL_META) {
        Ok(t) => Ok(t.get("cluster").map_err(db_err)?.map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(db_err(e)),
    }
}

/// A new pool: its header written and synced, then its catalog tables.
fn format_pool(header: &File, db: &redb::Database, cluster: u64) -> Result<(), VolumeError> {
    let mut h = vec![0u8; 4096];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&POOL_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&cluster.to_le_bytes());
    header
        .write_all_at(&h, 0)
        .map_err(|e| VolumeError::io("writing the pool header", e))?;
    header
        .sync_data()
        .map_err(|e| VolumeError::io("syncing the pool header", e))?;
    let w = db.begin_write().map_err(db_err)?;
    {
        let mut m = w.open_table(POOL_META).map_err(db_err)?;
        m.insert("version", POOL_VERSION).map_err(db_err)?;
        m.insert("cluster", cluster).map_err(db_err)?;
        m.insert("high", 1).map_err(db_err)?;
        w.open_table(VOL_SIZE).map_err(db_err)?;
        w.open_table(VOL_MAP).map_err(db_err)?;
        w.open_table(REFS).map_err(db_err)?;
        w.open_table(FREE).map_err(db_err)?;
    }
    w.commit().map_err(db_err)?;
    Ok(())
}

/// An existing pool's header: the magic, the format version and the catalog's cluster size.
fn check_pool_header(header: &File, path: &Path, cluster: u64) -> Result<(), VolumeError> {
    let mut h = [0u8; 24];
    header
        .read_exact_at(&mut h, 0)
        .map_err(|e| VolumeError::io("reading the pool header", e))?;
    if &h[..8] != MAGIC {
        return Err(VolumeError::Corrupt(format!(
            "{} is not a sealdisk pool (bad magic)",
            path.display()
        )));
    }
    let v = u64::from_le_bytes(h[8..16].try_into().unwrap());
    if v != POOL_VERSION {
        return Err(VolumeError::Corrupt(format!(
            "pool format version {v}; this build reads {POOL_VERSION}"
        )));
    }
    if u64::from_le_bytes(h[16..24].try_into().unwrap()) != cluster {
        return Err(VolumeError::Corrupt(
            "pool header and catalog disagree on the cluster size".into(),
        ));
    }
    Ok(())
}
