//! Volumes in a Ceph RBD pool (`serve --backend rbd --ceph-conf PATH --rbd-pool NAME`).
//!
//! * A disk (any volume that is not a snapshot) is an RBD image `<pool>/<id>`, format 2,
//!   with layering and exclusive-lock.
//! * A snapshot (`s-…`) of an image is an RBD snapshot `<image>@<id>`, protected.
//! * A volume made from a snapshot is an RBD clone of it; one made from an image (a disk
//!   from a custom image, CopyImage) is a clone of a hidden protected snapshot
//!   `<image>@<new id>` made for it, removed with the clone.
//! * Reset to one of the disk's own snapshots is a rollback; to zeros, write-zeroes over
//!   the image.
//!
//! The catalog (redb) is the source of truth on this host: table `rbd_volumes` says where
//! each volume is. Ordering against the cluster: a volume is made in Ceph inside the
//! caller's catalog transaction, before it commits; a deleted volume's row moves to
//! `rbd_trash` in that transaction, and its image or snapshot is removed only after the
//! commit, by the reaper (a thread, and once at start), which retries until Ceph lets go
//! (an image keeps its RBD snapshots, so a deleted disk's image goes once its last
//! snapshot is gone; a snapshot with clones stays until they are gone). So no abort can
//! lose data a committed row names, and every removal is retried until it is done.
//! What an abort after a creation can leave (an image or snapshot no row names) carries
//! the new id and is named in the log by [`RbdStore::check`].

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::bdev::rbd::RbdBdev;
use crate::bdev::BdevRef;
use crate::rbd::{Cluster, CreateOpts, IoCtx, RbdError, DISK_OPTIONS};
use crate::volume::{CheckReport, VolumeError};

const VOLUMES: TableDefinition<&str, &str> = TableDefinition::new("rbd_volumes");
const TRASH: TableDefinition<&str, &str> = TableDefinition::new("rbd_trash");
/// This host's id (`host` → `h-<16 hex>`), made on first use: written into every image
/// this host makes or adopts (`sealdisk.host`), so a host removes only its own.
const HOST: TableDefinition<&str, &str> = TableDefinition::new("rbd_host");

/// RBD object size (order 22), the store's allocation unit.
pub(crate) const OBJECT_SIZE: u64 = 4 << 20;
/// How often the reaper looks for committed deletions.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// Prefix of the image metadata keys sealdisk writes.
pub(crate) const META_PREFIX: &str = "sealdisk.";

/// Where a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Vol {
    size: u64,
    /// The RBD image (the volume itself, or the image a snapshot belongs to).
    image: String,
    /// Set for a snapshot: `<image>@<snap>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snap: Option<String>,
    /// A clone's hidden parent snapshot (image, snapshot) made for it, removed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<(String, String)>,
}

fn db_err(context: &'static str) -> impl Fn(redb::Error) -> VolumeError {
    move |e| VolumeError::Db {
        context,
        source: Box::new(e),
    }
}

fn ceph_err(context: impl Into<String>) -> impl FnOnce(RbdError) -> VolumeError {
    let context = context.into();
    move |e| VolumeError::Io {
        context,
        source: io::Error::other(e),
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

/// Snapshots are RBD snapshots; everything else is an image.
fn is_snapshot_id(id: &str) -> bool {
    id.starts_with("s-")
}

fn parse(id: &str, v: &str) -> Result<Vol, VolumeError> {
    serde_json::from_str(v).map_err(|e| VolumeError::Corrupt(format!("rbd volume row {id}: {e}")))
}

fn row(txn: &redb::WriteTransaction, id: &str) -> Result<Option<Vol>, VolumeError> {
    let t = txn.open_table(VOLUMES).map_err(|e| db_err("rbd volumes")(e.into()))?;
    let v = t.get(id).map_err(|e| db_err("rbd volumes")(e.into()))?;
    v.map(|v| parse(id, v.value())).transpose()
}

fn put(txn: &redb::WriteTransaction, table: TableDefinition<&str, &str>, id: &str, v: &Vol) -> Result<(), VolumeError> {
    let mut t = txn.open_table(table).map_err(|e| db_err("rbd volumes")(e.into()))?;
    let s = serde_json::to_string(v).expect("serialisable");
    t.insert(id, s.as_str()).map_err(|e| db_err("rbd volumes")(e.into()))?;
    Ok(())
}

/// What happened to a trash entry.
enum Reaped {
    Done,
    /// Part of it is left (the hidden base snapshot of a removed clone).
    Left(Vol),
    /// Ceph refuses for now (snapshots, clones, a watcher): try again later.
    Busy,
}

pub struct RbdStore {
    db: Arc<redb::Database>,
    io: IoCtx,
    /// Open data-path bdevs (one image handle per volume in this process).
    open: Mutex<HashMap<String, Weak<RbdBdev>>>,
    /// Serialises reaper passes.
    reaping: Mutex<()>,
    /// This host's id ([`HOST`]).
    host: String,
}

impl RbdStore {
    /// Connects to the cluster of `conf`, opens `pool` and the store's catalog tables, and
    /// starts the reaper.
    pub fn open(db: Arc<redb::Database>, conf: &Path, pool: &str) -> Result<Arc<RbdStore>, VolumeError> {
        let cluster =
            Cluster::connect(conf, DISK_OPTIONS).map_err(ceph_err(format!("connect ({})", conf.display())))?;
        let io = cluster.ioctx(pool).map_err(ceph_err(format!("RBD pool {pool}")))?;
        let txn = db.begin_write().map_err(|e| db_err("rbd tables")(e.into()))?;
        txn.open_table(VOLUMES).map_err(|e| db_err("rbd tables")(e.into()))?;
        txn.open_table(TRASH).map_err(|e| db_err("rbd tables")(e.into()))?;
        let host = {
            let mut t = txn.open_table(HOST).map_err(|e| db_err("rbd tables")(e.into()))?;
            let have = t
                .get("host")
                .map_err(|e| db_err("rbd tables")(e.into()))?
                .map(|v| v.value().to_string());
            match have {
                Some(h) => h,
                None => {
                    let h = format!("h-{:016x}", rand::random::<u64>());
                    t.insert("host", h.as_str())
                        .map_err(|e| db_err("rbd tables")(e.into()))?;
                    h
                }
            }
        };
        txn.commit().map_err(|e| db_err("rbd tables")(e.into()))?;
        let store = Arc::new(RbdStore {
            db,
            io,
            open: Mutex::default(),
            reaping: Mutex::default(),
            host,
        });
        store.reap();
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("rbd-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(REAP_EVERY);
                match weak.upgrade() {
                    Some(s) => s.reap(),
                    None => return,
                }
            })
            .map_err(|e| VolumeError::io("start the RBD reaper thread", e))?;
        Ok(store)
    }

    pub fn pool(&self) -> &str {
        self.io.pool()
    }

    /// This host's id, as written in `sealdisk.host` of its images.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host that owns `image` (`sealdisk.host`), if another than this one.
    fn owned_elsewhere(&self, image: &str) -> Result<Option<String>, RbdError> {
        let img = self.io.open(image)?;
        Ok(img
            .metadata_get(&format!("{META_PREFIX}host"))?
            .filter(|h| *h != self.host))
    }

    /// Marks `image` as this host's.
    fn claim(&self, image: &str) -> Result<(), VolumeError> {
        let img = self
            .io
            .open(image)
            .map_err(ceph_err(format!("open RBD image {image}")))?;
        img.metadata_set(&format!("{META_PREFIX}host"), &self.host)
            .map_err(ceph_err(format!("image-meta of {image}")))
    }

    pub fn object_size(&self) -> u64 {
        OBJECT_SIZE
    }

    fn read_row(&self, id: &str) -> Result<Option<Vol>, VolumeError> {
        let r = self.db.begin_read().map_err(|e| db_err("rbd volumes")(e.into()))?;
        let t = r.open_table(VOLUMES).map_err(|e| db_err("rbd volumes")(e.into()))?;
        let v = t.get(id).map_err(|e| db_err("rbd volumes")(e.into()))?;
        v.map(|v| parse(id, v.value())).transpose()
    }

    fn live(&self, id: &str) -> Option<Arc<RbdBdev>> {
        self.open.lock().expect("open volumes").get(id).and_then(Weak::upgrade)
    }

    pub fn is_open(&self, id: &str) -> bool {
        self.live(id).is_some()
    }

    pub fn create_volume(&self, txn: &redb::WriteTransaction, id: &str, size: u64) -> Result<(), VolumeError> {
        check_id(id)?;
        crate::volume::Pool::check_size(size)?;
        if row(txn, id)?.is_some() {
            return Err(VolumeError::Exists(id.into()));
        }
        self.io.create(id, size, &CreateOpts::default()).map_err(|e| {
            if e.is_exists() {
                VolumeError::Exists(format!("{id} (an RBD image of that name is in pool {})", self.pool()))
            } else {
                ceph_err(format!("create RBD image {id}"))(e)
            }
        })?;
        if let Err(e) = self.claim(id) {
            let _ = self.io.remove(id);
            return Err(e);
        }
        put(
            txn,
            VOLUMES,
            id,
            &Vol {
                size,
                image: id.into(),
                snap: None,
                base: None,
            },
        )
    }

    /// A protected snapshot `image@snap`.
    fn snapshot(&self, image: &str, snap: &str) -> Result<(), VolumeError> {
        let img = self
            .io
            .open(image)
            .map_err(ceph_err(format!("open RBD image {image}")))?;
        img.snap_create(snap)
            .map_err(ceph_err(format!("create RBD snapshot {image}@{snap}")))?;
        if let Err(e) = img.snap_protect(snap) {
            let _ = img.snap_remove(snap);
            return Err(ceph_err(format!("protect RBD snapshot {image}@{snap}"))(e));
        }
        Ok(())
    }

    /// Unprotect and remove `image@snap`; gone already is done.
    fn drop_snapshot(&self, image: &str, snap: &str) -> Result<Reaped, RbdError> {
        match self.owned_elsewhere(image) {
            Ok(Some(h)) => {
                warn!(image, snap, host = %h, "RBD reaper: the image belongs to another host now; snapshot left");
                return Ok(Reaped::Done);
            }
            Ok(None) => {}
            Err(e) if e.is_not_found() => return Ok(Reaped::Done),
            Err(e) => return Err(e),
        }
        let img = match self.io.open(image) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => return Ok(Reaped::Done),
            Err(e) => return Err(e),
        };
        match img.snap_unprotect(snap) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(Reaped::Done),
            Err(e) if e.is_busy() => return Ok(Reaped::Busy),
            // EINVAL: not protected.
            Err(e) if e.errno() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
        match img.snap_remove(snap) {
            Ok(()) => Ok(Reaped::Done),
            Err(e) if e.is_not_found() => Ok(Reaped::Done),
            Err(e) if e.is_busy() => Ok(Reaped::Busy),
            Err(e) => Err(e),
        }
    }

    pub fn clone_volume(
        &self,
        txn: &redb::WriteTransaction,
        src: &str,
        dst: &str,
        size: u64,
    ) -> Result<(), VolumeError> {
        check_id(src)?;
        check_id(dst)?;
        crate::volume::Pool::check_size(size)?;
        let s = row(txn, src)?.ok_or_else(|| VolumeError::NotFound(src.into()))?;
        if row(txn, dst)?.is_some() {
            return Err(VolumeError::Exists(dst.into()));
        }
        if size < s.size {
            return Err(VolumeError::BadSize {
                size,
                why: format!("smaller than the source ({} bytes)", s.size),
            });
        }
        if is_snapshot_id(dst) && s.snap.is_none() {
            self.snapshot(&s.image, dst)?;
            return put(
                txn,
                VOLUMES,
                dst,
                &Vol {
                    size: s.size,
                    image: s.image,
                    snap: Some(dst.into()),
                    base: None,
                },
            );
        }
        let (parent, psnap, base) = match &s.snap {
            Some(sn) => (s.image.clone(), sn.clone(), None),
            None => {
                self.snapshot(&s.image, dst)?;
                (
                    s.image.clone(),
                    dst.to_string(),
                    Some((s.image.clone(), dst.to_string())),
                )
            }
        };
        let made = self
            .io
            .clone_image(&parent, &psnap, dst, &CreateOpts::default())
            .map_err(ceph_err(format!("clone RBD snapshot {parent}@{psnap} as {dst}")))
            .and_then(|()| self.claim(dst))
            .and_then(|()| {
                if size > s.size {
                    let img = self.io.open(dst).map_err(ceph_err(format!("open RBD image {dst}")))?;
                    img.resize(size).map_err(ceph_err(format!("resize RBD image {dst}")))?;
                }
                Ok(())
            });
        if let Err(e) = made {
            let _ = self.io.remove(dst);
            if let Some((i, sn)) = &base {
                let _ = self.drop_snapshot(i, sn);
            }
            return Err(e);
        }
        put(
            txn,
            VOLUMES,
            dst,
            &Vol {
                size,
                image: dst.into(),
                snap: None,
                base,
            },
        )
    }

    pub fn reset_volume(&self, txn: &redb::WriteTransaction, id: &str, from: Option<&str>) -> Result<(), VolumeError> {
        check_id(id)?;
        if self.is_open(id) {
            return Err(VolumeError::InUse(id.into()));
        }
        let v = row(txn, id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        if v.snap.is_some() {
            return Err(VolumeError::Corrupt(format!("reset of snapshot {id}")));
        }
        let Some(f) = from else {
            let img = self
                .io
                .open(&v.image)
                .map_err(ceph_err(format!("open RBD image {id}")))?;
            return img
                .write_zeroes_sync(0, v.size)
                .map_err(ceph_err(format!("zero RBD image {id}")));
        };
        check_id(f)?;
        let fv = row(txn, f)?.ok_or_else(|| VolumeError::NotFound(f.into()))?;
        if fv.size > v.size {
            return Err(VolumeError::BadSize {
                size: v.size,
                why: format!("smaller than {f} ({} bytes)", fv.size),
            });
        }
        match &fv.snap {
            Some(sn) if fv.image == v.image => {
                let img = self
                    .io
                    .open(&v.image)
                    .map_err(ceph_err(format!("open RBD image {id}")))?;
                img.snap_rollback(sn)
                    .map_err(ceph_err(format!("roll RBD image {id} back to {sn}")))
            }
            _ => {
                // Another volume's data: the image is made again as a clone of it. An
                // image that has snapshots of its own cannot be replaced.
                self.io.remove(&v.image).map_err(|e| {
                    if e.errno() == Some(libc::ENOTEMPTY) || e.is_busy() {
                        VolumeError::InUse(format!("{id} (it has snapshots; reset it from one of them)"))
                    } else {
                        ceph_err(format!("remove RBD image {id}"))(e)
                    }
                })?;
                if let Some(b) = &v.base {
                    let gone = Vol {
                        size: 0,
                        image: b.0.clone(),
                        snap: Some(b.1.clone()),
                        base: None,
                    };
                    put(txn, TRASH, &format!("{id}.base.{}", b.1), &gone)?;
                }
                txn.open_table(VOLUMES)
                    .map_err(|e| db_err("rbd volumes")(e.into()))?
                    .remove(id)
                    .map_err(|e| db_err("rbd volumes")(e.into()))?;
                self.clone_volume(txn, f, id, v.size)
            }
        }
    }

    pub fn delete_volume(&self, txn: &redb::WriteTransaction, id: &str) -> Result<(), VolumeError> {
        check_id(id)?;
        if self.is_open(id) {
            return Err(VolumeError::InUse(id.into()));
        }
        let v = {
            let mut t = txn.open_table(VOLUMES).map_err(|e| db_err("rbd volumes")(e.into()))?;
            let v = t.remove(id).map_err(|e| db_err("rbd volumes")(e.into()))?;
            match v {
                Some(v) => parse(id, v.value())?,
                None => return Err(VolumeError::NotFound(id.into())),
            }
        };
        // Removed from Ceph once this transaction has committed (`reap`).
        put(txn, TRASH, id, &v)
    }

    /// Removes from Ceph what committed deletions left, as far as Ceph allows now.
    pub fn reap(&self) {
        let _one = self.reaping.lock().expect("reaper");
        let pending: Vec<(String, Vol)> = match (|| {
            let r = self.db.begin_read().map_err(|e| db_err("rbd trash")(e.into()))?;
            let t = r.open_table(TRASH).map_err(|e| db_err("rbd trash")(e.into()))?;
            let mut v = Vec::new();
            for e in t.iter().map_err(|e| db_err("rbd trash")(e.into()))? {
                let (k, val) = e.map_err(|e| db_err("rbd trash")(e.into()))?;
                v.push((k.value().to_string(), parse(k.value(), val.value())?));
            }
            Ok::<_, VolumeError>(v)
        })() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "RBD reaper: reading the trash");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        // Snapshots first: an image goes only once its snapshots are gone.
        let mut order = pending;
        order.sort_by_key(|(_, v)| v.snap.is_none());
        let mut changes: Vec<(String, Option<Vol>)> = Vec::new();
        for (id, v) in order {
            let r = match &v.snap {
                Some(sn) => self.drop_snapshot(&v.image, sn),
                None => match self.owned_elsewhere(&v.image).and_then(|other| match other {
                    Some(h) => {
                        warn!(image = %v.image, host = %h, "RBD reaper: the image belongs to another host now; left");
                        Ok(())
                    }
                    None => self.io.remove(&v.image),
                }) {
                    Ok(()) => Ok(Reaped::Done),
                    Err(e) if e.is_not_found() => Ok(Reaped::Done),
                    Err(e) if e.is_busy() || e.errno() == Some(libc::ENOTEMPTY) => Ok(Reaped::Busy),
                    Err(e) => Err(e),
                }
                .map(|r| match (r, &v.base) {
                    (Reaped::Done, Some((i, s))) => Reaped::Left(Vol {
                        size: 0,
                        image: i.clone(),
                        snap: Some(s.clone()),
                        base: None,
                    }),
                    (r, _) => r,
                }),
            };
            match r {
                Ok(Reaped::Done) => changes.push((id, None)),
                Ok(Reaped::Left(rest)) => {
                    // Its base snapshot can usually go at once.
                    let sn = rest.snap.clone().expect("a snapshot");
                    match self.drop_snapshot(&rest.image, &sn) {
                        Ok(Reaped::Done) => changes.push((id, None)),
                        _ => changes.push((id, Some(rest))),
                    }
                }
                Ok(Reaped::Busy) => {}
                Err(e) => warn!(volume = %id, error = %e, "RBD reaper: removing a deleted volume failed; will retry"),
            }
        }
        if changes.is_empty() {
            return;
        }
        let done = (|| {
            let txn = self.db.begin_write().map_err(|e| db_err("rbd trash")(e.into()))?;
            for (id, rest) in &changes {
                match rest {
                    None => {
                        txn.open_table(TRASH)
                            .map_err(|e| db_err("rbd trash")(e.into()))?
                            .remove(id.as_str())
                            .map_err(|e| db_err("rbd trash")(e.into()))?;
                    }
                    Some(v) => put(&txn, TRASH, id, v)?,
                }
            }
            txn.commit().map_err(|e| db_err("rbd trash")(e.into()))
        })();
        if let Err(e) = done {
            warn!(error = %e, "RBD reaper: updating the trash failed; will retry");
        }
    }

    /// Deleted volumes whose image or snapshot is not yet removed from Ceph.
    pub fn trash_len(&self) -> Result<u64, VolumeError> {
        let r = self.db.begin_read().map_err(|e| db_err("rbd trash")(e.into()))?;
        let t = r.open_table(TRASH).map_err(|e| db_err("rbd trash")(e.into()))?;
        t.len().map_err(|e| db_err("rbd trash")(e.into()))
    }

    pub fn volume_ids(&self) -> Result<Vec<String>, VolumeError> {
        let r = self.db.begin_read().map_err(|e| db_err("rbd volumes")(e.into()))?;
        let t = r.open_table(VOLUMES).map_err(|e| db_err("rbd volumes")(e.into()))?;
        let mut ids = Vec::new();
        for e in t.iter().map_err(|e| db_err("rbd volumes")(e.into()))? {
            ids.push(e.map_err(|e| db_err("rbd volumes")(e.into()))?.0.value().to_string());
        }
        Ok(ids)
    }

    pub fn volume_size(&self, id: &str) -> Result<Option<u64>, VolumeError> {
        Ok(self.read_row(id)?.map(|v| v.size))
    }

    /// RBD images are thin but this store does not ask Ceph which objects exist: the
    /// whole volume counts as mapped.
    pub fn mapped_bytes(&self, id: &str) -> Result<u64, VolumeError> {
        self.volume_size(id)?.ok_or_else(|| VolumeError::NotFound(id.into()))
    }

    /// The whole volume, in pieces of at most `max` bytes (see [`RbdStore::mapped_bytes`]).
    pub fn allocated_ranges(&self, id: &str, max: u64) -> Result<Vec<(u64, u64)>, VolumeError> {
        let size = self.volume_size(id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        let step = max.max(4096);
        Ok((0..size.div_ceil(step))
            .map(|i| (i * step, step.min(size - i * step)))
            .collect())
    }

    /// The data path's block device of a volume (512-byte blocks); a snapshot opens
    /// read-only. One image handle per volume in this process.
    pub fn bdev(&self, id: &str) -> Result<BdevRef, VolumeError> {
        check_id(id)?;
        let mut open = self.open.lock().expect("open volumes");
        if let Some(b) = open.get(id).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let v = self.read_row(id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        let img = self
            .io
            .open_at(&v.image, v.snap.as_deref())
            .map_err(ceph_err(format!("open RBD image of {id}")))?;
        if v.snap.is_none() {
            // Fencing: while this handle lives, no other client (host) writes the image.
            img.lock_acquire_exclusive().map_err(|e| {
                if e.errno() == Some(libc::EROFS) || e.is_busy() {
                    VolumeError::InUse(format!(
                        "{id} (another client holds its RBD exclusive lock: it is attached on another host)"
                    ))
                } else {
                    ceph_err(format!("exclusive lock of RBD image {id}"))(e)
                }
            })?;
        }
        let b = Arc::new(RbdBdev::new(img, 512).map_err(ceph_err(format!("RBD bdev of {id}")))?);
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(id.to_string(), Arc::downgrade(&b));
        Ok(b)
    }

    /// Every row against Ceph: its image or snapshot exists, with the row's size.
    pub fn check(&self) -> Result<CheckReport, VolumeError> {
        let mut rep = CheckReport::default();
        for id in self.volume_ids()? {
            rep.volumes += 1;
            let Some(v) = self.read_row(&id)? else { continue };
            match self.io.open_at(&v.image, v.snap.as_deref()).and_then(|i| i.size()) {
                Ok(s) if s == v.size || v.snap.is_some() && s <= v.size => {}
                Ok(s) => rep
                    .problems
                    .push(format!("volume {id}: catalog size {} but RBD size {s}", v.size)),
                Err(e) => rep.problems.push(format!("volume {id}: {e}")),
            }
        }
        Ok(rep)
    }

    /// The `sealdisk.*` metadata of image `id` (keys without the prefix), `None` when
    /// there is no such image.
    pub fn image_meta(&self, id: &str) -> Result<Option<HashMap<String, String>>, VolumeError> {
        check_id(id)?;
        let img = match self.io.open(id) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(ceph_err(format!("open RBD image {id}"))(e)),
        };
        let mut m = HashMap::new();
        for k in [
            "account",
            "region",
            "category",
            "size",
            "key_id",
            "cmk_id",
            "key_format",
            "wrapped_key",
            "host",
        ] {
            if let Some(v) = img
                .metadata_get(&format!("{META_PREFIX}{k}"))
                .map_err(ceph_err(format!("image-meta of {id}")))?
            {
                m.insert(k.to_string(), v);
            }
        }
        Ok(Some(m))
    }

    /// Registers image `id` (made by another host) as a volume of `size` bytes here and
    /// marks it as this host's.
    pub fn adopt_volume(&self, txn: &redb::WriteTransaction, id: &str, size: u64) -> Result<(), VolumeError> {
        check_id(id)?;
        crate::volume::Pool::check_size(size)?;
        if row(txn, id)?.is_some() {
            return Err(VolumeError::Exists(id.into()));
        }
        let img = self.io.open(id).map_err(ceph_err(format!("open RBD image {id}")))?;
        let have = img.size().map_err(ceph_err(format!("size of RBD image {id}")))?;
        if have != size {
            return Err(VolumeError::BadSize {
                size,
                why: format!("the RBD image {id} has {have} bytes"),
            });
        }
        drop(img);
        self.claim(id)?;
        put(
            txn,
            VOLUMES,
            id,
            &Vol {
                size,
                image: id.into(),
                snap: None,
                base: None,
            },
        )
    }

    /// Writes `sealdisk.<key>` image metadata on volume `id`'s image.
    pub fn describe_volume(
        &self,
        txn: &redb::WriteTransaction,
        id: &str,
        meta: &[(&str, String)],
    ) -> Result<(), VolumeError> {
        let v = row(txn, id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        if v.snap.is_some() {
            return Ok(());
        }
        let img = self
            .io
            .open(&v.image)
            .map_err(ceph_err(format!("open RBD image {id}")))?;
        for (k, val) in meta {
            img.metadata_set(&format!("{META_PREFIX}{k}"), val)
                .map_err(ceph_err(format!("image-meta of {id}")))?;
        }
        Ok(())
    }
}
