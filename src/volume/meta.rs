//! The pool's metadata thread: the slow path of volume writes.
//!
//! Writes to unallocated or shared clusters, and discards, come here from
//! the reactors. The thread takes whatever has queued up as one batch and,
//! in one catalog transaction: allocates clusters, writes the new cluster
//! contents (old bytes copied as they are, new bytes merged in), makes the
//! pool file durable (fdatasync) and commits. Only after the commit does it
//! publish the new map entries to the reactors and answer the requests. So:
//! * data is durable before any durable map entry points at it;
//! * no write takes the fast path into a cluster whose mapping is not yet
//!   durable (until it is published, writes there keep coming here), so a
//!   FLUSH over acknowledged writes never depends on a commit in flight;
//! * a failed fdatasync or commit changes nothing the reactors see: the
//!   requests it carried fail with EIO, nothing acknowledged is rolled back.
//!   A batch whose *preparation* fails (pool full) is retried request by
//!   request, so one request's error does not fail its neighbours.
//!
//! A cluster freed here (or by the control plane) is reused only after a
//! grace period ([`super::epochs`]) that began once the unmapping was
//! published, so a read that still targets it never sees another volume's
//! data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{ReadableTable, ReadableTableMetadata};

use super::bdev::VolState;
use super::epochs::{Epochs, Limbo};
use super::faults::{FaultPoint, Faults};
use super::meta_stats::MetaStats;
use super::staged::{AlignedBuf, Staged};
use super::tables::*;
use super::{db_err, VolumeError};
use crate::bdev::IoError;

const MAX_BATCH: usize = 128;
/// Memory a batch's staged clusters may take, about: a batch takes at most this over two
/// clusters per request (128 requests at the default 256 KiB clusters, 8 at 4 MiB).
const STAGED_BUDGET: u64 = 64 << 20;

/// Requests per batch for this cluster size.
fn max_batch(cluster: u64) -> usize {
    ((STAGED_BUDGET / (2 * cluster)) as usize).clamp(8, MAX_BATCH)
}
/// Failed volume writes (a guest can cause them at any rate, e.g. by filling the pool).
static PREPARE_ERRORS: crate::logging::RateLimit = crate::logging::RateLimit::standard();
/// How often an idle metadata thread advances grace periods while freed
/// clusters wait for one.
const RECLAIM_TICK: Duration = Duration::from_millis(1);
/// Longest an allocation waits for freed clusters' grace period when the pool
/// has no other room (the requests it waits for are device I/O in flight).
const GRACE_WAIT: Duration = Duration::from_secs(1);

pub(crate) enum MetaOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Zero a range; whole clusters are unmapped.
    Zero {
        offset: u64,
        len: u64,
    },
}

pub(crate) struct MetaReq {
    pub vol: Arc<VolState>,
    pub op: MetaOp,
    pub tag: u64,
    pub reply: Sender<(u64, Result<(), IoError>)>,
    /// Wakes the requesting reactor once the reply is posted.
    pub waker: crate::bdev::Waker,
}

/// What the metadata thread shares with the rest of the pool.
pub(crate) struct Shared {
    pub epochs: Arc<Epochs>,
    pub limbo: Arc<Limbo>,
    pub faults: Arc<Faults>,
    pub stats: Arc<MetaStats>,
}

pub(crate) struct MetaHandle {
    tx: Mutex<Option<Sender<MetaReq>>>,
    stats: Arc<MetaStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MetaHandle {
    pub(crate) fn start(
        db: Arc<redb::Database>,
        path: &Path,
        cluster: u64,
        capacity: u64,
        shared: Shared,
    ) -> Result<MetaHandle, VolumeError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| VolumeError::io(path.display().to_string(), e))?;
        let (tx, rx) = mpsc::channel();
        let stats = shared.stats.clone();
        let mut worker = Worker {
            db,
            file,
            cluster,
            capacity,
            shared,
            buf: AlignedBuf::new(cluster as usize),
            staged: Staged::new(cluster as usize),
        };
        let thread = std::thread::Builder::new()
            .name("pool-meta".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| VolumeError::io("starting the pool metadata thread", e))?;
        Ok(MetaHandle {
            tx: Mutex::new(Some(tx)),
            stats,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A sender for a channel to keep (cheap to clone, lock-free to use).
    pub(crate) fn sender(&self) -> Option<Sender<MetaReq>> {
        self.tx.lock().expect("meta sender").clone()
    }

    /// The thread's counters (senders count what they hand over).
    pub(crate) fn stats(&self) -> &Arc<MetaStats> {
        &self.stats
    }
}

impl Drop for MetaHandle {
    fn drop(&mut self) {
        self.tx.lock().expect("meta sender").take();
        if let Some(t) = self.thread.lock().expect("meta thread").take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    db: Arc<redb::Database>,
    file: File,
    cluster: u64,
    capacity: u64,
    shared: Shared,
    buf: AlignedBuf,
    staged: Staged,
}

/// A map entry to publish to the reactors once its commit is durable.
struct Publish {
    vol: Arc<VolState>,
    cluster: u64,
    /// Physical cluster, or 0 (unmapped).
    phys: u64,
    /// The volume's ownership generation when the transaction found the
    /// cluster to be the volume's alone (None: shared or unmapped).
    owned_gen: Option<u64>,
    /// Whether the entry is a new cluster, and why (counted once durable).
    fresh: Option<Fresh>,
}

/// Why a write took a new cluster.
#[derive(Clone, Copy)]
enum Fresh {
    /// The cluster was unallocated (first write).
    Allocated,
    /// The cluster was shared: its bytes were copied (copy-on-write).
    Copied,
}

/// What a prepared transaction will change once committed.
#[derive(Default)]
struct Effects {
    publish: Vec<Publish>,
    /// Clusters this transaction frees (held in limbo meanwhile).
    freed: Vec<u64>,
}

/// Why a batch failed.
enum Failure {
    /// Preparing one of its requests failed (e.g. the pool is full).
    Prepare(VolumeError),
    /// The fdatasync or the commit failed: nothing of the batch is durable.
    Durability(VolumeError),
}

fn io(e: std::io::Error) -> VolumeError {
    VolumeError::io("pool metadata I/O", e)
}

fn to_io_error(e: &VolumeError) -> IoError {
    match e {
        VolumeError::PoolFull { .. } => IoError::Device { errno: libc::ENOSPC },
        _ => IoError::Device { errno: libc::EIO },
    }
}

/// A request the metadata thread answers with an error (rate-limited: a guest can
/// cause them at any rate, e.g. by filling the pool).
fn note_failed_write(volume: &str, e: &VolumeError) {
    crate::log_limited!(
        PREPARE_ERRORS,
        warn,
        volume,
        error = %e,
        errno = %to_io_error(e),
        "pool metadata: a volume write failed"
    );
}

impl Worker {
    fn run(&mut self, rx: Receiver<MetaReq>) {
        loop {
            let first = if self.shared.limbo.is_empty() {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(RECLAIM_TICK) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => {
                        self.reclaim();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let t0 = Instant::now();
            let mut batch = vec![first];
            while batch.len() < max_batch(self.cluster) {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.shared.stats.dequeued(batch.len());
            self.reclaim();
            match self.commit(&batch) {
                Ok(()) => {
                    for r in &batch {
                        let _ = r.reply.send((r.tag, Ok(())));
                    }
                }
                Err(Failure::Prepare(e)) if batch.len() > 1 => {
                    tracing::debug!(requests = batch.len(), error = %e, "pool metadata: batch failed; retrying request by request");
                    // Find out which request fails: one transaction each.
                    for r in &batch {
                        let res = self.commit(std::slice::from_ref(r)).map_err(|f| match f {
                            Failure::Prepare(e) | Failure::Durability(e) => {
                                note_failed_write(&r.vol.id, &e);
                                to_io_error(&e)
                            }
                        });
                        let _ = r.reply.send((r.tag, res));
                    }
                }
                Err(Failure::Prepare(e)) => {
                    note_failed_write(&batch[0].vol.id, &e);
                    let _ = batch[0].reply.send((batch[0].tag, Err(to_io_error(&e))));
                }
                Err(Failure::Durability(e)) => {
                    tracing::error!(
                        requests = batch.len(),
                        error = %e,
                        "pool metadata: fdatasync or commit failed; the batch's requests failed with EIO, nothing else changed"
                    );
                    for r in &batch {
                        let _ = r.reply.send((r.tag, Err(IoError::Device { errno: libc::EIO })));
                    }
                }
            }
            for r in &batch {
                (r.waker)();
            }
            self.shared.stats.batch().record_duration(t0.elapsed());
        }
    }

    /// Advance grace periods; clusters whose grace period ended become
    /// reusable.
    fn reclaim(&self) {
        if !self.shared.limbo.is_empty() {
            let done = self.shared.epochs.poll();
            self.shared.limbo.prune(done);
        }
    }

    fn commit(&mut self, batch: &[MetaReq]) -> Result<(), Failure> {
        let res = self.commit_inner(batch);
        match &res {
            Err(Failure::Prepare(_)) => self.shared.stats.prepare_failed(),
            Err(Failure::Durability(_)) => self.shared.stats.durability_failed(),
            Ok(()) => {}
        }
        res
    }

    fn commit_inner(&mut self, batch: &[MetaReq]) -> Result<(), Failure> {
        let stats = self.shared.stats.clone();
        let t = Instant::now();
        let txn = self.db.begin_write().map_err(|e| Failure::Prepare(db_err(e)))?;
        stats.writer_wait().record_duration(t.elapsed());
        let mut fx = Effects::default();
        self.staged.clear();
        let res = batch
            .iter()
            .try_for_each(|r| self.apply(&txn, r, &mut fx))
            .and_then(|()| {
                if self.staged.is_empty() {
                    return Ok(());
                }
                self.shared
                    .faults
                    .at(FaultPoint::StagedWrite)
                    .and_then(|()| self.staged.write_out(&self.file))
                    .map_err(io)
            })
            .map_err(Failure::Prepare)
            .and_then(|()| {
                let t = Instant::now();
                let r = self
                    .shared
                    .faults
                    .at(FaultPoint::PoolSync)
                    .and_then(|()| self.file.sync_data());
                stats.fdatasync().record_duration(t.elapsed());
                r.map_err(|e| Failure::Durability(VolumeError::io("fdatasync of the pool", e)))
            })
            .and_then(|()| {
                self.shared
                    .faults
                    .at(FaultPoint::Commit)
                    .map_err(|e| Failure::Durability(crate::volume::db_err_in("commit of the volume maps")(e)))
            });
        let res = match res {
            // Dropping the transaction aborts it.
            Ok(()) => {
                let t = Instant::now();
                let r = txn.commit().map_err(|e| Failure::Durability(db_err(e)));
                stats.commit().record_duration(t.elapsed());
                r
            }
            Err(f) => Err(f),
        };
        self.staged.clear();
        if res.is_err() {
            // Nothing was freed after all.
            self.shared.limbo.forget(&fx.freed);
            return res;
        }
        // Durable: now the reactors may use the new entries.
        for p in &fx.publish {
            p.vol.publish(p.cluster, p.phys, p.owned_gen);
            match p.fresh {
                Some(Fresh::Allocated) => p.vol.counters.allocs.fetch_add(1, Ordering::Relaxed),
                Some(Fresh::Copied) => p.vol.counters.cow_copies.fetch_add(1, Ordering::Relaxed),
                None => 0,
            };
        }
        if !fx.freed.is_empty() {
            let t = self.shared.epochs.request();
            self.shared.limbo.ticket(&fx.freed, t);
        }
        Ok(())
    }

    fn alloc(&mut self, txn: &redb::WriteTransaction) -> Result<u64, VolumeError> {
        let mut waited = false;
        loop {
            let mut free = txn.open_table(FREE).map_err(db_err)?;
            let (mut pick, mut held) = (None, false);
            for e in free.iter().map_err(db_err)? {
                let p = e.map_err(db_err)?.0.value();
                if !self.shared.limbo.holds(p) {
                    pick = Some(p);
                    break;
                }
                held = true;
            }
            if let Some(p) = pick {
                free.remove(p).map_err(db_err)?;
                return Ok(p);
            }
            let mut meta = txn.open_table(POOL_META).map_err(db_err)?;
            let high = meta.get("high").map_err(db_err)?.map(|v| v.value()).unwrap_or(1);
            if high < self.capacity {
                meta.insert("high", high + 1).map_err(db_err)?;
                return Ok(high);
            }
            // Full but for freed clusters still in their grace period (a volume
            // deleted a moment ago while other volumes' reads are in flight): wait
            // for a grace period once rather than fail a write the pool has room for.
            if held && !waited && self.shared.epochs.synchronize(GRACE_WAIT) {
                waited = true;
                self.reclaim();
                continue;
            }
            let nfree = free.len().map_err(db_err)?;
            return Err(VolumeError::PoolFull {
                needed: self.cluster,
                free: nfree * self.cluster,
            });
        }
    }

    fn decref(&mut self, txn: &redb::WriteTransaction, p: u64, fx: &mut Effects) -> Result<(), VolumeError> {
        let mut refs = txn.open_table(REFS).map_err(db_err)?;
        let n = refs.get(p).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
        if n <= 1 {
            refs.remove(p).map_err(db_err)?;
            txn.open_table(FREE).map_err(db_err)?.insert(p, ()).map_err(db_err)?;
            // Not even this transaction may reuse it.
            self.shared.limbo.hold(p);
            fx.freed.push(p);
        } else {
            refs.insert(p, n - 1).map_err(db_err)?;
        }
        Ok(())
    }

    fn refcount(txn: &redb::WriteTransaction, p: u64) -> Result<u64, VolumeError> {
        Ok(txn
            .open_table(REFS)
            .map_err(db_err)?
            .get(p)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    fn apply(&mut self, txn: &redb::WriteTransaction, r: &MetaReq, fx: &mut Effects) -> Result<(), VolumeError> {
        let vol = &r.vol;
        let (offset, len) = match &r.op {
            MetaOp::Write { offset, data } => (*offset, data.len() as u64),
            MetaOp::Zero { offset, len } => (*offset, *len),
        };
        let cl = self.cluster;
        let mut pos = offset;
        while pos < offset + len {
            let c = pos / cl;
            let o = pos % cl;
            let l = (cl - o).min(offset + len - pos);
            let part = match &r.op {
                MetaOp::Write { data, .. } => Some(&data[(pos - offset) as usize..(pos - offset + l) as usize]),
                MetaOp::Zero { .. } => None,
            };
            let cur = txn
                .open_table(VOL_MAP)
                .map_err(db_err)?
                .get((vol.id.as_str(), c))
                .map_err(db_err)?
                .map(|v| v.value());
            // A discard of a whole cluster (or of its part inside the volume)
            // unmaps it.
            let whole = o == 0 && (l == cl || pos + l >= vol.size);
            match (cur, part) {
                (None, None) => {}
                (Some(p), None) if whole => {
                    txn.open_table(VOL_MAP)
                        .map_err(db_err)?
                        .remove((vol.id.as_str(), c))
                        .map_err(db_err)?;
                    self.decref(txn, p, fx)?;
                    fx.publish.push(Publish {
                        vol: vol.clone(),
                        cluster: c,
                        phys: 0,
                        owned_gen: None,
                        fresh: None,
                    });
                }
                (Some(p), part) if Worker::refcount(txn, p)? == 1 => {
                    // Ours alone: write in place (into its staged copy if this
                    // batch took it).
                    let gen = vol.owner_gen();
                    if !self.staged.merge(p, o as usize, l as usize, part) {
                        let b = &mut self.buf.as_mut()[..l as usize];
                        match part {
                            Some(d) => b.copy_from_slice(d),
                            None => b.fill(0),
                        }
                        self.file.write_all_at(b, p * cl + o).map_err(io)?;
                    }
                    fx.publish.push(Publish {
                        vol: vol.clone(),
                        cluster: c,
                        phys: p,
                        owned_gen: Some(gen),
                        fresh: None,
                    });
                }
                (cur, part) => {
                    // Copy on write (or first write): a new cluster with the
                    // old bytes as they are and the new bytes merged in.
                    let gen = vol.owner_gen();
                    let new = self.alloc(txn)?;
                    let cl_us = cl as usize;
                    match cur {
                        // A shared cluster is never one this batch wrote (those are
                        // the volume's alone), so the file holds its bytes.
                        Some(p) => {
                            let b = self.staged.take_filled(new);
                            self.file.read_exact_at(&mut b[..cl_us], p * cl).map_err(io)?;
                        }
                        None => {
                            self.staged.take_zeroed(new);
                        }
                    }
                    self.staged.merge(new, o as usize, l as usize, part);
                    txn.open_table(VOL_MAP)
                        .map_err(db_err)?
                        .insert((vol.id.as_str(), c), new)
                        .map_err(db_err)?;
                    txn.open_table(REFS).map_err(db_err)?.insert(new, 1).map_err(db_err)?;
                    if let Some(p) = cur {
                        self.decref(txn, p, fx)?;
                    }
                    fx.publish.push(Publish {
                        vol: vol.clone(),
                        cluster: c,
                        phys: new,
                        owned_gen: Some(gen),
                        fresh: Some(if cur.is_some() { Fresh::Copied } else { Fresh::Allocated }),
                    });
                }
            }
            pos += l;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::max_batch;

    #[test]
    fn batches_shrink_with_the_cluster_size_so_staged_memory_stays_bounded() {
        assert_eq!(max_batch(64 << 10), 128);
        assert_eq!(max_batch(256 << 10), 128);
        assert_eq!(max_batch(1 << 20), 32);
        assert_eq!(max_batch(4 << 20), 8);
        for shift in 16..=22 {
            let cl = 1u64 << shift;
            assert!(max_batch(cl) as u64 * 2 * cl <= 64 << 20 || max_batch(cl) == 8);
        }
    }
}
