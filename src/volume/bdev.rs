//! The volume block device: the fast path of a thin volume.
//!
//! The channel splits a request at cluster boundaries and looks each cluster
//! up in the volume's in-memory map (one atomic load, no lock):
//! * reads of unallocated clusters are zeros, allocated ones are read from
//!   the pool at their physical location;
//! * writes where every cluster is the volume's own go straight to the pool;
//!   anything else (first write, shared after a snapshot, discards) goes to
//!   the metadata thread and completes when its answer comes back.
//!
//! A request inside one cluster (the common case) passes the caller's buffer
//! down untouched; one that spans clusters uses a pool buffer per piece.
//!
//! Every request that addresses the pool device enters the pool's epoch
//! ([`super::epochs`]) before it loads the map and leaves it on completion:
//! that is how a snapshot knows when fast-path writes started before it have
//! landed, and when a freed cluster can no longer be addressed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::epochs::{Epochs, Slots};
use super::meta::{MetaOp, MetaReq};
use super::tables::*;
use super::{db_err, Pool, VolumeError};
use crate::bdev::slab::Slab;
use crate::bdev::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest, LayerCounters, Lower};
use crate::iobuf::{BufPool, IoBuf};

/// Per-request lists stay inline (no heap allocation on the I/O path): a
/// request of at most 512 KiB spans at most 3 clusters of the default size.
type Inline<T> = smallvec::SmallVec<[T; 4]>;

/// Map entry bit: the cluster has one reference (this volume's) and may be
/// written in place.
const OWNED: u64 = 1 << 63;

/// A volume's in-memory map, shared by its channels on every reactor.
///
/// Entries are published only once durable (by the metadata thread after its
/// commit). `owners` is the ownership generation, bumped whenever every
/// entry loses its OWNED bit (a snapshot or clone is being taken): the
/// metadata thread sets OWNED only if the generation it saw in its
/// transaction is still current. The data path never takes that lock.
pub(crate) struct VolState {
    pub id: String,
    pub size: u64,
    /// Per cluster: 0 = unallocated, else (physical cluster) | OWNED?
    map: Box<[AtomicU64]>,
    owners: Mutex<u64>,
    /// New clusters the metadata thread published (its only writer).
    pub counters: VolCounters,
}

/// What the slow path did for one volume, counted once durable.
#[derive(Default)]
pub(crate) struct VolCounters {
    /// Writes into a shared cluster that copied it (copy-on-write).
    pub cow_copies: AtomicU64,
    /// First writes into an unallocated cluster.
    pub allocs: AtomicU64,
}

impl VolState {
    pub(crate) fn load(pool: &Pool, id: &str) -> Result<VolState, VolumeError> {
        let r = pool.db.begin_read().map_err(db_err)?;
        let size = r
            .open_table(VOL_SIZE)
            .map_err(db_err)?
            .get(id)
            .map_err(db_err)?
            .map(|v| v.value())
            .ok_or_else(|| VolumeError::NotFound(id.into()))?;
        let n = size.div_ceil(pool.cluster) as usize;
        let map: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let t = r.open_table(VOL_MAP).map_err(db_err)?;
        let refs = r.open_table(REFS).map_err(db_err)?;
        for e in t.range((id, 0u64)..=(id, u64::MAX)).map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (c, p) = (k.value().1 as usize, v.value());
            if c >= n {
                return Err(VolumeError::Corrupt(format!(
                    "volume {id} maps cluster {c} past its end"
                )));
            }
            let owned = refs.get(p).map_err(db_err)?.map(|v| v.value()) == Some(1);
            map[c].store(p | if owned { OWNED } else { 0 }, Ordering::Release);
        }
        Ok(VolState {
            id: id.into(),
            size,
            map,
            owners: Mutex::new(0),
            counters: VolCounters::default(),
        })
    }

    /// The map entry of cluster `c`. Sequentially consistent (a plain load on
    /// x86), so that it is ordered after the epoch entry before it.
    pub(crate) fn entry(&self, c: u64) -> u64 {
        self.map[c as usize].load(Ordering::SeqCst)
    }

    /// The current ownership generation.
    pub(crate) fn owner_gen(&self) -> u64 {
        *self.owners.lock().expect("volume owners")
    }

    /// Publish a durable map entry: `phys` (0 = unmapped), owned if the
    /// transaction found it the volume's alone in generation `owned_gen` and
    /// no snapshot has been taken since.
    pub(crate) fn publish(&self, c: u64, phys: u64, owned_gen: Option<u64>) {
        let g = self.owners.lock().expect("volume owners");
        let v = match owned_gen {
            Some(gen) if phys != 0 && gen == *g => phys | OWNED,
            _ => phys,
        };
        self.map[c as usize].store(v, Ordering::SeqCst);
    }

    /// Every cluster becomes shared (a snapshot or clone is being taken):
    /// from here on writes take the slow path, which consults the reference
    /// counts. The caller then waits for a grace period, so no fast-path
    /// write that saw an OWNED bit is still in flight.
    pub(crate) fn share_all(&self) {
        let mut g = self.owners.lock().expect("volume owners");
        *g += 1;
        for e in self.map.iter() {
            e.fetch_and(!OWNED, Ordering::SeqCst);
        }
    }
}

/// A thin volume as a block device (block size 512).
pub(crate) struct VolumeBdev {
    name: String,
    pool: Arc<Pool>,
    state: Arc<VolState>,
}

impl VolumeBdev {
    pub(crate) fn new(pool: Arc<Pool>, state: Arc<VolState>) -> VolumeBdev {
        VolumeBdev {
            name: format!("vol:{}", state.id),
            pool,
            state,
        }
    }
}

impl Bdev for VolumeBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn capacity(&self) -> u64 {
        self.state.size
    }
    fn dma_writes(&self) -> bool {
        self.pool.base.dma_writes()
    }
    fn allocation(&self, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        let end = offset.checked_add(len)?.min(self.state.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let c = at / self.pool.cluster;
            let stop = ((c + 1) * self.pool.cluster).min(end);
            let mapped = self.state.entry(c) != 0;
            match out.last_mut() {
                Some((n, m)) if *m == mapped => *n += stop - at,
                _ => out.push((stop - at, mapped)),
            }
            at = stop;
        }
        Some(out)
    }
    fn layer_counters(&self, c: &mut LayerCounters) {
        c.cow_copies += self.state.counters.cow_copies.load(Ordering::Relaxed);
        c.cluster_allocs += self.state.counters.allocs.load(Ordering::Relaxed);
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        let meta = self
            .pool
            .meta
            .sender()
            .ok_or_else(|| std::io::Error::other("pool is shutting down"))?;
        let (reply_tx, replies) = mpsc::channel();
        Ok(Box::new(VolumeChannel {
            meta_stats: self.pool.meta.stats().clone(),
            lower: Lower::new(self.pool.base.open_channel(ctx)?),
            epochs: self.pool.epochs.clone(),
            slots: self.pool.epochs.register(),
            state: self.state.clone(),
            cluster: self.pool.cluster,
            bufs: ctx.pool.clone(),
            meta,
            reply_tx,
            replies,
            waker: ctx.waker.clone(),
            pending: Slab::default(),
            ready: VecDeque::new(),
        }))
    }
}

/// One piece of a request: (cluster, offset in cluster, length, offset in
/// the caller's buffer).
#[derive(Clone, Copy)]
struct Piece {
    cluster: u64,
    off: u64,
    len: u64,
    buf_off: usize,
}

/// [`Pending::epoch`] of a request that did not enter an epoch.
const NO_EPOCH: u8 = u8::MAX;

struct Pending {
    tag: u64,
    op: IoOp,
    /// Epoch parity entered, or [`NO_EPOCH`].
    epoch: u8,
    parts: usize,
    result: Result<(), IoError>,
    buf: Option<IoBuf>,
    /// Buffer offset of each sub-request (for copying pieces back).
    pieces: Inline<usize>,
}

struct VolumeChannel {
    /// First field: dropped (waiting for the device) before `slots`.
    lower: Lower,
    epochs: Arc<Epochs>,
    slots: Arc<Slots>,
    state: Arc<VolState>,
    cluster: u64,
    bufs: BufPool,
    meta: Sender<MetaReq>,
    meta_stats: Arc<super::MetaStats>,
    reply_tx: Sender<(u64, Result<(), IoError>)>,
    replies: Receiver<(u64, Result<(), IoError>)>,
    waker: crate::bdev::Waker,
    pending: Slab<Pending>,
    ready: VecDeque<IoCompletion>,
}

const PART_BITS: u32 = 8;

impl VolumeChannel {
    fn pieces(&self, offset: u64, len: u64) -> Inline<Piece> {
        let mut v = Inline::new();
        let mut pos = offset;
        while pos < offset + len {
            let c = pos / self.cluster;
            let o = pos % self.cluster;
            let l = (self.cluster - o).min(offset + len - pos);
            v.push(Piece {
                cluster: c,
                off: o,
                len: l,
                buf_off: (pos - offset) as usize,
            });
            pos += l;
        }
        v
    }

    fn slot(&mut self, p: Pending) -> usize {
        self.pending.insert(p)
    }

    fn down(&mut self, req: IoRequest) {
        self.lower.submit(req);
    }

    fn phys(&self, e: u64, p: &Piece) -> u64 {
        (e & !OWNED) * self.cluster + p.off
    }

    fn finish(&mut self, idx: usize, result: Result<(), IoError>, part_buf: Option<(usize, IoBuf)>) {
        let p = self.pending.get_mut(idx).expect("live request");
        if let Err(e) = result {
            if p.result.is_ok() {
                p.result = Err(e);
            }
        }
        if let Some((part, b)) = part_buf {
            match (p.op, p.buf.as_mut()) {
                (IoOp::Read, Some(dst)) => {
                    let off = p.pieces[part];
                    dst[off..off + b.len()].copy_from_slice(&b);
                }
                // The caller's own buffer, passed straight down.
                (_, None) => p.buf = Some(b),
                // A write's piece buffer: back to the pool.
                _ => drop(b),
            }
        }
        p.parts -= 1;
        if p.parts == 0 {
            let p = self.pending.remove(idx).expect("live request");
            if p.epoch != NO_EPOCH {
                self.slots.leave(p.epoch);
            }
            self.ready.push_back(IoCompletion {
                tag: p.tag,
                op: p.op,
                result: p.result,
                buf: p.buf,
            });
        }
    }

    fn send_to_meta(&mut self, tag: u64, op: IoOp, buf: Option<IoBuf>, mop: MetaOp) {
        let idx = self.slot(Pending {
            tag,
            op,
            epoch: NO_EPOCH,
            parts: 1,
            result: Ok(()),
            buf,
            pieces: Inline::new(),
        });
        let req = MetaReq {
            vol: self.state.clone(),
            op: mop,
            tag: idx as u64,
            reply: self.reply_tx.clone(),
            waker: self.waker.clone(),
        };
        if self.meta.send(req).is_err() {
            self.finish(idx, Err(IoError::Device { errno: libc::ESHUTDOWN }), None);
        } else {
            self.meta_stats.enqueued();
        }
    }
}

impl VolumeChannel {
    /// A flush goes straight down as one part.
    #[inline]
    fn submit_flush(&mut self, tag: u64) {
        let idx = self.slot(Pending {
            tag,
            op: IoOp::Flush,
            epoch: NO_EPOCH,
            parts: 1,
            result: Ok(()),
            buf: None,
            pieces: Inline::new(),
        });
        self.down(IoRequest::flush((idx as u64) << PART_BITS));
    }

    /// Unmap and write-zeroes change the map: the metadata thread does them.
    #[inline]
    fn submit_zero(&mut self, req: IoRequest) {
        self.send_to_meta(
            req.tag,
            req.op,
            None,
            MetaOp::Zero {
                offset: req.offset,
                len: req.len,
            },
        );
    }

    #[inline]
    fn submit_read(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        let pieces = self.pieces(req.offset, req.bytes());
        let epoch = self.slots.enter(&self.epochs);
        let entries: Inline<u64> = pieces.iter().map(|p| self.state.entry(p.cluster)).collect();
        let mapped = entries.iter().filter(|&&e| e != 0).count();
        if mapped == 0 {
            self.read_unmapped(req, epoch);
            return Ok(());
        }
        if pieces.len() == 1 {
            let at = self.phys(entries[0], &pieces[0]);
            self.read_one(req, epoch, at);
            return Ok(());
        }
        self.read_spanning(req, epoch, &pieces, &entries)
    }

    /// A read of unallocated clusters only: zeros, completed at once.
    #[inline]
    fn read_unmapped(&mut self, req: IoRequest, epoch: u8) {
        self.slots.leave(epoch);
        let mut buf = req.buf.expect("validated");
        buf.fill(0);
        self.ready.push_back(IoCompletion {
            tag: req.tag,
            op: IoOp::Read,
            result: Ok(()),
            buf: Some(buf),
        });
    }

    /// A read inside one mapped cluster: the caller's buffer goes down at
    /// physical offset `at`.
    #[inline]
    fn read_one(&mut self, req: IoRequest, epoch: u8, at: u64) {
        let buf = req.buf.expect("validated");
        let idx = self.slot(Pending {
            tag: req.tag,
            op: IoOp::Read,
            epoch,
            parts: 1,
            result: Ok(()),
            buf: None,
            pieces: smallvec::smallvec![0],
        });
        self.down(IoRequest::read(at, buf, (idx as u64) << PART_BITS));
    }

    /// A read spanning clusters: a pool buffer per mapped piece (copied back
    /// on completion), zeros for the unmapped ones. Without pool buffers the
    /// request is handed back (back-pressure).
    fn read_spanning(&mut self, req: IoRequest, epoch: u8, pieces: &[Piece], entries: &[u64]) -> Result<(), IoRequest> {
        let mut buf = req.buf.expect("validated");
        let mut temps: Inline<IoBuf> = Inline::new();
        for (p, &e) in pieces.iter().zip(entries) {
            if e != 0 {
                match self.bufs.alloc(p.len as usize) {
                    Some(t) => temps.push(t),
                    None => {
                        self.slots.leave(epoch);
                        return Err(IoRequest::read(req.offset, buf, req.tag));
                    }
                }
            }
        }
        let mut offs = Inline::new();
        for (p, &e) in pieces.iter().zip(entries) {
            if e == 0 {
                buf[p.buf_off..p.buf_off + p.len as usize].fill(0);
            } else {
                offs.push(p.buf_off);
            }
        }
        let idx = self.slot(Pending {
            tag: req.tag,
            op: IoOp::Read,
            epoch,
            parts: temps.len(),
            result: Ok(()),
            buf: Some(buf),
            pieces: offs,
        });
        let mut part = 0;
        for (p, &e) in pieces.iter().zip(entries) {
            if e != 0 {
                let mut t = temps.remove(0);
                t.set_len(p.len as usize);
                let at = self.phys(e, p);
                self.down(IoRequest::read(at, t, ((idx as u64) << PART_BITS) | part));
                part += 1;
            }
        }
        Ok(())
    }

    #[inline]
    fn submit_write(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        let pieces = self.pieces(req.offset, req.bytes());
        let epoch = self.slots.enter(&self.epochs);
        let entries: Inline<u64> = pieces.iter().map(|p| self.state.entry(p.cluster)).collect();
        if entries.iter().any(|e| e & OWNED == 0) {
            self.write_slow(req, epoch);
            return Ok(());
        }
        if pieces.len() == 1 {
            let at = self.phys(entries[0], &pieces[0]);
            self.write_one(req, epoch, at);
            return Ok(());
        }
        self.write_spanning(req, epoch, &pieces, &entries)
    }

    /// First write or shared cluster: the slow path (the metadata thread
    /// serialises it with snapshots and frees).
    fn write_slow(&mut self, req: IoRequest, epoch: u8) {
        self.slots.leave(epoch);
        let buf = req.buf.expect("validated");
        let data = buf.to_vec();
        self.send_to_meta(
            req.tag,
            IoOp::Write,
            Some(buf),
            MetaOp::Write {
                offset: req.offset,
                data,
            },
        );
    }

    /// A write inside one cluster the volume owns: the caller's buffer goes
    /// down at physical offset `at`.
    #[inline]
    fn write_one(&mut self, req: IoRequest, epoch: u8, at: u64) {
        let buf = req.buf.expect("validated");
        let idx = self.slot(Pending {
            tag: req.tag,
            op: IoOp::Write,
            epoch,
            parts: 1,
            result: Ok(()),
            buf: None,
            pieces: smallvec::smallvec![0],
        });
        let mut w = IoRequest::write(at, buf, (idx as u64) << PART_BITS);
        w.fua = req.fua;
        self.down(w);
    }

    /// A write spanning owned clusters: each piece is copied into a pool
    /// buffer of its own. Without pool buffers the request is handed back
    /// (back-pressure).
    fn write_spanning(
        &mut self,
        req: IoRequest,
        epoch: u8,
        pieces: &[Piece],
        entries: &[u64],
    ) -> Result<(), IoRequest> {
        let buf = req.buf.expect("validated");
        let mut temps: Inline<IoBuf> = Inline::new();
        for p in pieces {
            match self.bufs.alloc(p.len as usize) {
                Some(mut t) => {
                    t.set_len(p.len as usize);
                    t.copy_from_slice(&buf[p.buf_off..p.buf_off + p.len as usize]);
                    temps.push(t);
                }
                None => {
                    self.slots.leave(epoch);
                    let mut r = IoRequest::write(req.offset, buf, req.tag);
                    r.fua = req.fua;
                    return Err(r);
                }
            }
        }
        let offs = pieces.iter().map(|p| p.buf_off).collect();
        let idx = self.slot(Pending {
            tag: req.tag,
            op: IoOp::Write,
            epoch,
            parts: pieces.len(),
            result: Ok(()),
            buf: Some(buf),
            pieces: offs,
        });
        for (part, (p, t)) in pieces.iter().zip(temps).enumerate() {
            let mut w = IoRequest::write(
                self.phys(entries[part], p),
                t,
                ((idx as u64) << PART_BITS) | part as u64,
            );
            w.fua = req.fua;
            self.down(w);
        }
        Ok(())
    }
}

impl Channel for VolumeChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if let Err(e) = validate(&req, 512, self.state.size, crate::bdev::MAX_IO_BYTES) {
            self.ready.push_back(IoCompletion {
                tag: req.tag,
                op: req.op,
                result: Err(e),
                buf: req.buf,
            });
            return Ok(());
        }
        match req.op {
            IoOp::Flush => {
                self.submit_flush(req.tag);
                Ok(())
            }
            IoOp::Unmap | IoOp::WriteZeroes => {
                self.submit_zero(req);
                Ok(())
            }
            IoOp::Read => self.submit_read(req),
            IoOp::Write => self.submit_write(req),
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut comps = self.lower.poll();
        for c in comps.drain(..) {
            let idx = (c.tag >> PART_BITS) as usize;
            let part = (c.tag & ((1 << PART_BITS) - 1)) as usize;
            self.finish(idx, c.result, c.buf.map(|b| (part, b)));
        }
        self.lower.recycle(comps);
        while let Ok((idx, res)) = self.replies.try_recv() {
            self.finish(idx as usize, res, None);
        }
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }
}

impl Drop for VolumeChannel {
    fn drop(&mut self) {
        // Wait for slow-path answers still owed to us (the metadata thread
        // holds no buffer of ours, so this only keeps replies tidy).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.pending.iter().any(|p| p.parts > 0 && p.op != IoOp::Read) && std::time::Instant::now() < deadline {
            let mut v = Vec::new();
            self.poll(&mut v);
            std::thread::yield_now();
        }
    }
}
