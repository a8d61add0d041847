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
//! commit, by the reaper (a thread, from the start), which retries until Ceph lets go
//! (an image keeps its RBD snapshots, so a deleted disk's image goes once its last
//! snapshot is gone). A deleted snapshot with clones (DeleteSnapshot with Force of a
//! snapshot disks were made from) has each clone flattened by the reaper, outside any
//! catalog lock, then goes: its trash row is the committed intent, so a flatten a crash
//! interrupted is finished after the restart. So no abort can lose data a committed row
//! names, and every removal is retried until it is done.
//!
//! Creations are crash-safe too: before it makes an image or snapshot in Ceph, the store
//! records it in its own small database (`rbd-intents.redb` in the data directory,
//! committed at once: the caller's catalog transaction is still open). The reaper settles
//! each intent once no catalog transaction is open (it takes the catalog's write lock, so
//! the creating transaction has committed or aborted): named by a row, the intent goes;
//! named by none (the transaction aborted, or the daemon died before the commit), the
//! image or snapshot is removed from Ceph first.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::bdev::rbd::RbdBdev;
use crate::bdev::BdevRef;
use crate::rbd::{Cluster, CreateOpts, IoCtx, RbdError, DISK_OPTIONS};
use crate::volume::{CheckReport, FaultPoint, Faults, VolumeError};

const VOLUMES: TableDefinition<&str, &str> = TableDefinition::new("rbd_volumes");
const TRASH: TableDefinition<&str, &str> = TableDefinition::new("rbd_trash");
/// This host's id (`host` → `h-<16 hex>`), made on first use: written into every image
/// this host makes or adopts (`sealdisk.host`), so a host removes only its own.
const HOST: TableDefinition<&str, &str> = TableDefinition::new("rbd_host");
/// In the intents database: Ceph objects about to be made (`image` or `image@snap`),
/// until the reaper finds the row that names them or removes them.
const INTENTS: TableDefinition<&str, &str> = TableDefinition::new("rbd_intents");
/// The intents database's file in the data directory.
pub(crate) const INTENTS_FILE: &str = "rbd-intents.redb";

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

impl Vol {
    /// A volume that is a whole RBD image of its own (no snapshot, no hidden base).
    fn image(id: &str, size: u64) -> Vol {
        Vol {
            size,
            image: id.into(),
            snap: None,
            base: None,
        }
    }
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

/// A Ceph object a creation is about to make: an image, or a snapshot of one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Made {
    image: String,
    snap: Option<String>,
}

impl Made {
    fn key(&self) -> String {
        match &self.snap {
            Some(s) => format!("{}@{s}", self.image),
            None => self.image.clone(),
        }
    }

    fn from_key(k: &str) -> Made {
        match k.split_once('@') {
            Some((i, s)) => Made {
                image: i.into(),
                snap: Some(s.into()),
            },
            None => Made {
                image: k.into(),
                snap: None,
            },
        }
    }

    /// Whether row `v` needs this object (it is the row's image or snapshot, or the
    /// row's image is this image, or its hidden base is this snapshot).
    fn named_by(&self, v: &Vol) -> bool {
        match &self.snap {
            None => v.image == self.image || v.base.as_ref().is_some_and(|b| b.0 == self.image),
            Some(s) => {
                (v.image == self.image && v.snap.as_ref() == Some(s))
                    || v.base.as_ref().is_some_and(|b| b.0 == self.image && b.1 == *s)
            }
        }
    }
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
    /// Ceph objects being made ([`INTENTS`]), in a database of their own.
    intents: redb::Database,
    /// `rbd_created` and `rbd_flatten` (tests and crash harnesses).
    faults: Arc<Faults>,
}

impl RbdStore {
    /// Connects to the cluster of `conf`, opens `pool`, the store's catalog tables and its
    /// intents database (`intents`, made if missing), and starts the reaper.
    pub fn open(
        db: Arc<redb::Database>,
        conf: &Path,
        pool: &str,
        intents: &Path,
        faults: Arc<Faults>,
    ) -> Result<Arc<RbdStore>, VolumeError> {
        let intents = redb::Database::create(intents).map_err(|e| db_err("rbd intents")(e.into()))?;
        {
            let txn = intents.begin_write().map_err(|e| db_err("rbd intents")(e.into()))?;
            txn.open_table(INTENTS).map_err(|e| db_err("rbd intents")(e.into()))?;
            txn.commit().map_err(|e| db_err("rbd intents")(e.into()))?;
        }
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
            intents,
            faults,
        });
        // The first pass at once (what the last run left), in the thread: a long flatten
        // does not hold the start up.
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("rbd-reaper".into())
            .spawn(move || loop {
                match weak.upgrade() {
                    Some(s) => s.reap(),
                    None => return,
                }
                std::thread::sleep(REAP_EVERY);
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

    /// Records, durably, that `m` is about to be made in Ceph.
    fn intend(&self, m: &Made) -> Result<(), VolumeError> {
        let txn = self
            .intents
            .begin_write()
            .map_err(|e| db_err("rbd intents")(e.into()))?;
        txn.open_table(INTENTS)
            .map_err(|e| db_err("rbd intents")(e.into()))?
            .insert(m.key().as_str(), "")
            .map_err(|e| db_err("rbd intents")(e.into()))?;
        txn.commit().map_err(|e| db_err("rbd intents")(e.into()))
    }

    /// Forgets intents (made nothing, or settled).
    fn forget(&self, done: &[Made]) -> Result<(), VolumeError> {
        if done.is_empty() {
            return Ok(());
        }
        let txn = self
            .intents
            .begin_write()
            .map_err(|e| db_err("rbd intents")(e.into()))?;
        {
            let mut t = txn.open_table(INTENTS).map_err(|e| db_err("rbd intents")(e.into()))?;
            for m in done {
                t.remove(m.key().as_str())
                    .map_err(|e| db_err("rbd intents")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| db_err("rbd intents")(e.into()))
    }

    /// After a Ceph call that failed and made nothing: its intent goes (so that a
    /// same-named object someone else made is never taken for ours).
    fn made_nothing(&self, m: &Made) {
        if let Err(e) = self.forget(std::slice::from_ref(m)) {
            warn!(object = %m.key(), error = %e, "RBD: forgetting the intent of a failed creation");
        }
    }

    /// Intents not yet settled.
    fn intents(&self) -> Result<Vec<Made>, VolumeError> {
        let r = self.intents.begin_read().map_err(|e| db_err("rbd intents")(e.into()))?;
        let t = r.open_table(INTENTS).map_err(|e| db_err("rbd intents")(e.into()))?;
        let mut v = Vec::new();
        for e in t.iter().map_err(|e| db_err("rbd intents")(e.into()))? {
            let (k, _) = e.map_err(|e| db_err("rbd intents")(e.into()))?;
            v.push(Made::from_key(k.value()));
        }
        Ok(v)
    }

    /// Settles the intents: the catalog's write lock is taken first, so the
    /// transaction of each creation has committed or aborted. An object a row (or a
    /// trash row) names stays; one no row names is removed from Ceph (an image another
    /// host owns now is left). Settled intents are forgotten.
    fn settle(&self) -> Result<(), VolumeError> {
        if self.intents()?.is_empty() {
            return Ok(());
        }
        let guard = self.db.begin_write().map_err(|e| db_err("rbd intents")(e.into()))?;
        let pending = self.intents()?;
        let mut rows = Vec::new();
        for table in [VOLUMES, TRASH] {
            let t = guard.open_table(table).map_err(|e| db_err("rbd volumes")(e.into()))?;
            for e in t.iter().map_err(|e| db_err("rbd volumes")(e.into()))? {
                let (k, v) = e.map_err(|e| db_err("rbd volumes")(e.into()))?;
                rows.push(parse(k.value(), v.value())?);
            }
        }
        let mut done = Vec::new();
        // Snapshots before images: an image goes only once its snapshots are gone.
        let mut order = pending;
        order.sort_by_key(|m| m.snap.is_none());
        for m in order {
            if rows.iter().any(|v| m.named_by(v)) {
                done.push(m);
                continue;
            }
            // Removed while the lock is held: no transaction can name it meanwhile.
            let r = match &m.snap {
                Some(sn) => self.drop_snapshot(&m.image, sn),
                None => self.remove_image(&m.image),
            };
            match r {
                Ok(Reaped::Done) => {
                    warn!(object = %m.key(), "RBD: a creation whose transaction never committed is gone from Ceph (removed now, or never made)");
                    done.push(m);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(object = %m.key(), error = %e, "RBD: removing an uncommitted creation failed; will retry")
                }
            }
        }
        drop(guard);
        self.forget(&done)
    }

    /// Removes image `image` unless another host owns it now; gone already is done.
    fn remove_image(&self, image: &str) -> Result<Reaped, RbdError> {
        match self.owned_elsewhere(image).and_then(|other| match other {
            Some(h) => {
                warn!(image, host = %h, "RBD reaper: the image belongs to another host now; left");
                Ok(())
            }
            None => self.io.remove(image),
        }) {
            Ok(()) => Ok(Reaped::Done),
            Err(e) if e.is_not_found() => Ok(Reaped::Done),
            Err(e) if e.is_busy() || e.errno() == Some(libc::ENOTEMPTY) => Ok(Reaped::Busy),
            Err(e) => Err(e),
        }
    }

    /// Makes image `m` in Ceph with `make` (`what` it does, for errors): an intent
    /// first, its tag `sealdisk.host` right after. On an error nothing is left (a
    /// same-named image that was there already is not touched).
    fn make_image(&self, m: &Made, what: &str, make: impl FnOnce() -> Result<(), RbdError>) -> Result<(), VolumeError> {
        self.intend(m)?;
        if let Err(e) = make() {
            self.made_nothing(m);
            return Err(if e.is_exists() {
                VolumeError::Exists(format!(
                    "{} (an RBD image of that name is in pool {})",
                    m.image,
                    self.pool()
                ))
            } else {
                ceph_err(what)(e)
            });
        }
        if let Err(e) = self.claim(&m.image) {
            let _ = self.io.remove(&m.image);
            return Err(e);
        }
        Ok(())
    }

    /// Injected failure after a creation, before the caller's commit (`rbd_created`).
    fn created(&self) -> Result<(), VolumeError> {
        self.faults
            .at(FaultPoint::RbdCreated)
            .map_err(|e| VolumeError::io("after an RBD creation", e))
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
        let m = Made {
            image: id.into(),
            snap: None,
        };
        self.make_image(&m, &format!("create RBD image {id}"), || {
            self.io.create(id, size, &CreateOpts::default())
        })?;
        put(txn, VOLUMES, id, &Vol::image(id, size))?;
        self.created()
    }

    /// A protected snapshot `image@snap` (an intent first).
    fn snapshot(&self, image: &str, snap: &str) -> Result<(), VolumeError> {
        let img = self
            .io
            .open(image)
            .map_err(ceph_err(format!("open RBD image {image}")))?;
        let m = Made {
            image: image.into(),
            snap: Some(snap.into()),
        };
        self.intend(&m)?;
        if let Err(e) = img.snap_create(snap) {
            self.made_nothing(&m);
            return Err(ceph_err(format!("create RBD snapshot {image}@{snap}"))(e));
        }
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
        let mut flattened = false;
        loop {
            match img.snap_unprotect(snap) {
                Ok(()) => break,
                Err(e) if e.is_not_found() => return Ok(Reaped::Done),
                // Clones depend on it: each gets its own copy of the data, then again.
                Err(e) if e.is_busy() && !flattened => {
                    if !self.flatten_children(image, snap)? {
                        return Ok(Reaped::Busy);
                    }
                    flattened = true;
                }
                Err(e) if e.is_busy() => return Ok(Reaped::Busy),
                // EINVAL: not protected.
                Err(e) if e.errno() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
        }
        match img.snap_remove(snap) {
            Ok(()) => Ok(Reaped::Done),
            Err(e) if e.is_not_found() => Ok(Reaped::Done),
            Err(e) if e.is_busy() => Ok(Reaped::Busy),
            Err(e) => Err(e),
        }
    }

    /// Flattens every clone of `image@snap` (a deleted snapshot), through the data
    /// path's own handle where the clone is open here (that handle holds its exclusive
    /// lock). `false`: one cannot be flattened now (another client holds its lock, or it
    /// is in another pool), to be tried again.
    fn flatten_children(&self, image: &str, snap: &str) -> Result<bool, RbdError> {
        let kids = match self.io.open_at(image, Some(snap)) {
            Ok(i) => i.children()?,
            Err(e) if e.is_not_found() => return Ok(true),
            Err(e) => return Err(e),
        };
        for (pool, child) in kids {
            if pool != self.pool() {
                warn!(snapshot = %format!("{image}@{snap}"), clone = %format!("{pool}/{child}"),
                      "RBD reaper: a clone in another pool keeps the deleted snapshot");
                return Ok(false);
            }
            if let Err(e) = self.faults.at(FaultPoint::RbdFlatten) {
                warn!(clone = %child, error = %e, "RBD reaper: flatten not started; will retry");
                return Ok(false);
            }
            info!(snapshot = %format!("{image}@{snap}"), clone = %child,
                  "RBD reaper: flattening a clone of a deleted snapshot");
            let r = match self.live(&child) {
                Some(b) => b.image().flatten(),
                None => self.io.open(&child).and_then(|i| i.flatten()),
            };
            match r {
                Ok(()) => info!(clone = %child, "RBD reaper: clone flattened"),
                Err(e) if e.is_not_found() => {}
                // EINVAL: its head has no parent any more, but its own snapshots
                // still read through this one: it goes when they do.
                Err(e) if e.errno() == Some(libc::EINVAL) => return Ok(false),
                Err(e) if e.is_busy() || e.errno() == Some(libc::EROFS) => {
                    warn!(clone = %child, error = %e,
                          "RBD reaper: another client holds the clone's lock (attached on another host?); will retry");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
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
            put(
                txn,
                VOLUMES,
                dst,
                &Vol {
                    size: s.size,
                    image: s.image,
                    snap: Some(dst.into()),
                    base: None,
                },
            )?;
            return self.created();
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
        let m = Made {
            image: dst.into(),
            snap: None,
        };
        let made = self
            .make_image(&m, &format!("clone RBD snapshot {parent}@{psnap} as {dst}"), || {
                self.io.clone_image(&parent, &psnap, dst, &CreateOpts::default())
            })
            .and_then(|()| {
                let grown = if size > s.size {
                    self.io.open(dst).and_then(|img| img.resize(size))
                } else {
                    Ok(())
                };
                grown.map_err(|e| {
                    let _ = self.io.remove(dst);
                    ceph_err(format!("resize RBD image {dst}"))(e)
                })
            });
        if let Err(e) = made {
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
        )?;
        self.created()
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
        if let Err(e) = self.settle() {
            warn!(error = %e, "RBD reaper: settling the creation intents failed; will retry");
        }
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
                None => self.remove_image(&v.image).map(|r| match (r, &v.base) {
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

    /// Bytes of the volume's RBD objects that exist (its own or, for a clone, its
    /// parent's), whole objects at a time.
    pub fn mapped_bytes(&self, id: &str) -> Result<u64, VolumeError> {
        Ok(self.allocated(id)?.iter().map(|r| r.1).sum())
    }

    /// Where the volume's RBD objects exist (`rbd_diff_iterate2`, whole objects,
    /// parents included), in order, clipped to the volume.
    fn allocated(&self, id: &str) -> Result<Vec<(u64, u64)>, VolumeError> {
        check_id(id)?;
        let v = self.read_row(id)?.ok_or_else(|| VolumeError::NotFound(id.into()))?;
        let img = self
            .io
            .open_at(&v.image, v.snap.as_deref())
            .map_err(ceph_err(format!("open RBD image of {id}")))?;
        let size = img
            .size()
            .map_err(ceph_err(format!("size of RBD image of {id}")))?
            .min(v.size);
        let mut ext = img
            .allocated(0, size)
            .map_err(ceph_err(format!("allocated objects of {id}")))?;
        ext.sort_unstable();
        Ok(clip_and_merge(ext, size))
    }

    /// The ranges that hold data (see [`RbdStore::mapped_bytes`]), in pieces of at most
    /// `max` bytes; the rest of the volume reads as zeros.
    pub fn allocated_ranges(&self, id: &str, max: u64) -> Result<Vec<(u64, u64)>, VolumeError> {
        Ok(split(&self.allocated(id)?, max.max(4096)))
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
        put(txn, VOLUMES, id, &Vol::image(id, size))
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

/// Sorted extents clipped to `size`, touching ones merged.
fn clip_and_merge(ext: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ext {
        let end = o.saturating_add(l).min(size);
        if end <= o {
            continue;
        }
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(end - *po),
            _ => out.push((o, end - o)),
        }
    }
    out
}

/// Extents cut into pieces of at most `max` bytes.
fn split(ext: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(o, l) in ext {
        let mut at = o;
        while at < o + l {
            let n = max.min(o + l - at);
            out.push((at, n));
            at += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_clipped_merged_and_split() {
        let e = clip_and_merge(vec![(0, 4), (4, 4), (10, 2), (11, 5), (30, 10)], 35);
        assert_eq!(e, vec![(0, 8), (10, 6), (30, 5)]);
        assert_eq!(clip_and_merge(vec![(40, 4)], 35), vec![]);
        assert_eq!(
            split(&e, 3),
            vec![(0, 3), (3, 3), (6, 2), (10, 3), (13, 3), (30, 3), (33, 2)]
        );
        assert_eq!(split(&[], 3), vec![]);
    }

    #[test]
    fn intents_are_named_by_the_rows_that_need_them() {
        let disk = Vol {
            size: 1,
            image: "d-1".into(),
            snap: None,
            base: Some(("i-1".into(), "d-1".into())),
        };
        let snap = Vol {
            size: 1,
            image: "d-2".into(),
            snap: Some("s-1".into()),
            base: None,
        };
        let m = |k: &str| Made::from_key(k);
        assert_eq!(m("d-1@s-1").key(), "d-1@s-1");
        assert_eq!(m("d-1").snap, None);
        assert!(m("d-1").named_by(&disk));
        assert!(m("i-1").named_by(&disk), "a clone needs its parent");
        assert!(m("i-1@d-1").named_by(&disk), "and its hidden base snapshot");
        assert!(!m("i-1@d-2").named_by(&disk));
        assert!(m("d-2@s-1").named_by(&snap));
        assert!(m("d-2").named_by(&snap));
        assert!(!m("d-2@s-2").named_by(&snap));
        assert!(!m("d-3").named_by(&snap));
    }
}
