//! `iostat`: per-disk I/O statistics, kept by one generic layer on top of
//! every attached disk's stack (SPDK's bdev iostat is the model).
//!
//! [`StatsBdev`] wraps any bdev. Its channel stamps each request with a
//! [`clock::Clock`] tick on submit and, on completion, counts per direction
//! (read, write, flush, discard = unmap and write-zeroes) the operations,
//! bytes, errors, total latency and a latency histogram ([`hist`]). The
//! latency is the stack's as the frontend sees it: QoS holds, encryption,
//! copy-on-write and the device included. Failed requests count as errors
//! only (not as operations, bytes or latency).
//!
//! # Clock reads
//!
//! Reading the time-stamp counter costs ~25 ns on this project's VMs (and
//! `Instant::now` ~70 ns), as much as the whole budget of the layer, so a
//! channel reads the clock at most once per `poll` (only while it has
//! requests in flight: once for the whole batch of completions) and once per
//! submit *after an idle spell* (nothing in flight). Every other request is
//! stamped with the tick of its channel's last poll. Frontends poll their
//! channels every loop iteration before they submit new work, so a stamp is
//! early by at most the work done between the poll and the submit in that
//! iteration (µs); a latency is never under-reported, and a request that
//! completes at the next poll shows one loop iteration.
//!
//! # No lock on the data path
//!
//! Each channel (one per reactor per connection or virtqueue) claims a
//! *shard* of the disk's [`DiskStats`] when it opens and releases it when
//! it closes. A claimed shard has one writer, the reactor that owns the
//! channel, which updates it with relaxed loads and stores (no lock prefix,
//! no read-modify-write): a request costs a slab slot for its stamp and five
//! load/store pairs, plus its share of the clock reads above. The control plane reads the shards
//! whenever it likes (relaxed loads; a reader may see a request's count
//! before its bytes, which the next sample settles) and sums them. Nothing
//! is ever reset or swapped: counters only grow, and readers take
//! differences between two snapshots. A released shard keeps its counts and
//! the next channel to open claims it again (the release is a `Release`
//! store, the claim an `Acquire` compare-exchange, so the new owner sees
//! the old one's last values), so shards never move, are never freed while
//! the disk is attached, and number at most the channels open at once.
//! Shards are made lazily in a fixed table of [`MAX_SHARDS`] slots; a
//! channel beyond those shares one overflow shard updated with atomic adds.
//!
//! Counts kept by layers below (QoS holds and held time, copy-on-write and
//! first writes of the volume) are read through
//! [`Bdev::layer_counters`](super::Bdev::layer_counters) at snapshot time:
//! each layer keeps its own atomics on its own slow path. [`DiskStats`]
//! holds only a weak reference to the stack below, so statistics kept after
//! a detach never keep a disk's key alive.

pub(crate) mod clock;
pub(crate) mod hist;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use super::slab::Slab;
use super::{Bdev, BdevRef, Channel, ChannelCtx, IoCompletion, IoOp, IoRequest, LayerCounters};
use clock::Clock;
use hist::{AtomicHist, Hist};

/// Shards made per disk before channels share the overflow shard.
pub(crate) const MAX_SHARDS: usize = 64;

/// A direction of I/O, as the statistics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    Read = 0,
    Write = 1,
    Flush = 2,
    /// Unmap and write-zeroes.
    Discard = 3,
}

impl Dir {
    pub const ALL: [Dir; 4] = [Dir::Read, Dir::Write, Dir::Flush, Dir::Discard];

    #[inline]
    pub fn of(op: IoOp) -> Dir {
        match op {
            IoOp::Read => Dir::Read,
            IoOp::Write => Dir::Write,
            IoOp::Flush => Dir::Flush,
            IoOp::Unmap | IoOp::WriteZeroes => Dir::Discard,
        }
    }

    /// `read`, `write`, `flush`, `discard`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
            Dir::Flush => "flush",
            Dir::Discard => "discard",
        }
    }
}

#[derive(Default)]
struct DirCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    lat_ns: AtomicU64,
    hist: AtomicHist,
}

/// One channel's counters.
#[derive(Default)]
struct Shard {
    dirs: [DirCounters; 4],
}

#[inline]
fn bump(a: &AtomicU64, v: u64, exclusive: bool) {
    if exclusive {
        a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        a.fetch_add(v, Ordering::Relaxed);
    }
}

impl Shard {
    #[inline]
    fn record(&self, exclusive: bool, dir: Dir, bytes: u64, ns: u64, ok: bool) {
        let d = &self.dirs[dir as usize];
        if ok {
            bump(&d.ops, 1, exclusive);
            bump(&d.bytes, bytes, exclusive);
            bump(&d.lat_ns, ns, exclusive);
            if exclusive {
                d.hist.record_exclusive(ns);
            } else {
                d.hist.record_shared(ns);
            }
        } else {
            bump(&d.errors, 1, exclusive);
        }
    }

    fn add_to(&self, s: &mut IoStats) {
        for (d, out) in self.dirs.iter().zip(s.dirs.iter_mut()) {
            out.ops += d.ops.load(Ordering::Relaxed);
            out.bytes += d.bytes.load(Ordering::Relaxed);
            out.errors += d.errors.load(Ordering::Relaxed);
            out.lat_ns += d.lat_ns.load(Ordering::Relaxed);
            d.hist.add_to(&mut out.hist);
        }
    }
}

#[derive(Default)]
struct Slot {
    claimed: AtomicBool,
    shard: OnceLock<Arc<Shard>>,
}

/// One direction's counters at one moment (or their growth between two).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Completed without error.
    pub ops: u64,
    pub bytes: u64,
    /// Completed with an error.
    pub errors: u64,
    /// Sum of the latencies of `ops`, nanoseconds.
    pub lat_ns: u64,
    /// Latencies of `ops`, nanoseconds.
    pub hist: Hist,
}

impl DirStats {
    pub fn since(&self, e: &DirStats) -> DirStats {
        DirStats {
            ops: self.ops.saturating_sub(e.ops),
            bytes: self.bytes.saturating_sub(e.bytes),
            errors: self.errors.saturating_sub(e.errors),
            lat_ns: self.lat_ns.saturating_sub(e.lat_ns),
            hist: self.hist.since(&e.hist),
        }
    }
}

/// A disk's statistics at one moment (or their growth between two).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    /// By [`Dir`] (index `Dir as usize`).
    pub dirs: [DirStats; 4],
    /// What the layers below counted since the disk was put on the data path.
    pub layers: LayerCounters,
}

impl IoStats {
    pub fn dir(&self, d: Dir) -> &DirStats {
        &self.dirs[d as usize]
    }

    pub fn since(&self, e: &IoStats) -> IoStats {
        IoStats {
            dirs: std::array::from_fn(|i| self.dirs[i].since(&e.dirs[i])),
            layers: self.layers.since(&e.layers),
        }
    }

    /// Errors in every direction.
    pub fn errors(&self) -> u64 {
        self.dirs.iter().map(|d| d.errors).sum()
    }
}

/// The statistics of one disk: the shards its channels write, and what the
/// layers below count.
pub struct DiskStats {
    slots: Box<[Slot]>,
    overflow: Arc<Shard>,
    below: Weak<dyn Bdev>,
    /// The layers' counters when the disk was put on the data path.
    base: LayerCounters,
    clock: Clock,
}

impl DiskStats {
    fn new(below: &BdevRef) -> DiskStats {
        let mut base = LayerCounters::default();
        below.layer_counters(&mut base);
        DiskStats {
            slots: (0..MAX_SHARDS).map(|_| Slot::default()).collect(),
            overflow: Arc::new(Shard::default()),
            below: Arc::downgrade(below),
            base,
            clock: Clock::get(),
        }
    }

    /// A shard for a new channel: (slot, shard), slot `None` for the shared
    /// overflow shard.
    fn claim(&self) -> (Option<usize>, Arc<Shard>) {
        for (i, s) in self.slots.iter().enumerate() {
            if s.claimed
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return (Some(i), s.shard.get_or_init(|| Arc::new(Shard::default())).clone());
            }
        }
        (None, self.overflow.clone())
    }

    fn release(&self, slot: usize) {
        self.slots[slot].claimed.store(false, Ordering::Release);
    }

    /// The counters now: every shard summed, and the layers below.
    pub fn snapshot(&self) -> IoStats {
        let mut s = IoStats::default();
        for slot in self.slots.iter() {
            if let Some(sh) = slot.shard.get() {
                sh.add_to(&mut s);
            }
        }
        self.overflow.add_to(&mut s);
        if let Some(b) = self.below.upgrade() {
            let mut l = LayerCounters::default();
            b.layer_counters(&mut l);
            s.layers = l.since(&self.base);
        }
        s
    }

    /// Shards made so far (tests).
    pub fn shards(&self) -> usize {
        self.slots.iter().filter(|s| s.shard.get().is_some()).count()
    }
}

/// The statistics layer over a bdev.
pub struct StatsBdev {
    name: String,
    inner: BdevRef,
    stats: Arc<DiskStats>,
}

impl StatsBdev {
    /// Counts everything `inner` is asked to do through this layer.
    pub fn new(inner: BdevRef) -> StatsBdev {
        StatsBdev {
            name: format!("iostat({})", inner.name()),
            stats: Arc::new(DiskStats::new(&inner)),
            inner,
        }
    }

    pub fn stats(&self) -> &Arc<DiskStats> {
        &self.stats
    }
}

impl Bdev for StatsBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn lower(&self) -> Option<&dyn Bdev> {
        Some(&*self.inner)
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        let inner = self.inner.open_channel(ctx)?;
        let (slot, shard) = self.stats.claim();
        Ok(Box::new(StatsChannel {
            inner,
            exclusive: slot.is_some(),
            slot,
            shard,
            stats: self.stats.clone(),
            clock: self.stats.clock,
            now: 0,
            pending: Slab::default(),
        }))
    }
}

/// A request in flight: the caller's tag, its submit tick and its bytes.
struct Stamp {
    tag: u64,
    t0: u64,
    bytes: u64,
}

struct StatsChannel {
    inner: Box<dyn Channel>,
    shard: Arc<Shard>,
    /// Whether this channel is the shard's only writer.
    exclusive: bool,
    slot: Option<usize>,
    stats: Arc<DiskStats>,
    clock: Clock,
    /// The tick of the last poll that had requests in flight (or of the
    /// last submit after an idle spell): the stamp of new requests.
    now: u64,
    pending: Slab<Stamp>,
}

impl Channel for StatsChannel {
    #[inline]
    fn submit(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if self.pending.is_empty() {
            // After an idle spell `now` is stale: read the clock.
            self.now = self.clock.ticks();
        }
        let stamp = Stamp {
            tag: req.tag,
            t0: self.now,
            bytes: req.bytes(),
        };
        let idx = self.pending.insert(stamp);
        req.tag = idx as u64;
        self.inner.submit(req).map_err(|mut r| {
            r.tag = self.pending.remove(idx).expect("just inserted").tag;
            r
        })
    }

    #[inline]
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let start = out.len();
        let n = self.inner.poll(out);
        if self.pending.is_empty() {
            return n;
        }
        // One clock read for the whole batch, and the stamp of the requests
        // submitted until the next poll.
        let now = self.clock.ticks();
        self.now = now;
        if out.len() > start {
            for c in &mut out[start..] {
                let s = self
                    .pending
                    .remove(c.tag as usize)
                    .expect("a request this layer sent down");
                c.tag = s.tag;
                let ns = self.clock.ns(now.saturating_sub(s.t0));
                self.shard
                    .record(self.exclusive, Dir::of(c.op), s.bytes, ns, c.result.is_ok());
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

impl Drop for StatsChannel {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            self.stats.release(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_of_ops() {
        assert_eq!(Dir::of(IoOp::Read), Dir::Read);
        assert_eq!(Dir::of(IoOp::Write), Dir::Write);
        assert_eq!(Dir::of(IoOp::Flush), Dir::Flush);
        assert_eq!(Dir::of(IoOp::Unmap), Dir::Discard);
        assert_eq!(Dir::of(IoOp::WriteZeroes), Dir::Discard);
    }

    #[test]
    fn released_shards_are_claimed_again_and_keep_their_counts() {
        let below: BdevRef = Arc::new(crate::bdev::null::NullBdev::new("n", 1 << 20, 512));
        let s = DiskStats::new(&below);
        let (a, sa) = s.claim();
        let (b, _sb) = s.claim();
        assert_eq!((a, b), (Some(0), Some(1)));
        sa.record(true, Dir::Read, 4096, 1000, true);
        sa.record(true, Dir::Write, 512, 10, false);
        s.release(0);
        let (c, sc) = s.claim();
        assert_eq!(c, Some(0), "the released slot is reused");
        sc.record(true, Dir::Read, 4096, 3000, true);
        let snap = s.snapshot();
        assert_eq!(snap.dir(Dir::Read).ops, 2);
        assert_eq!(snap.dir(Dir::Read).bytes, 8192);
        assert_eq!(snap.dir(Dir::Read).lat_ns, 4000);
        assert_eq!(snap.dir(Dir::Read).hist.count(), 2);
        assert_eq!(snap.dir(Dir::Write).ops, 0);
        assert_eq!(snap.dir(Dir::Write).errors, 1);
        assert_eq!(s.shards(), 2);
    }

    #[test]
    fn channels_beyond_the_table_share_the_overflow_shard() {
        let below: BdevRef = Arc::new(crate::bdev::null::NullBdev::new("n", 1 << 20, 512));
        let s = DiskStats::new(&below);
        let held: Vec<_> = (0..MAX_SHARDS).map(|_| s.claim()).collect();
        assert!(held.iter().all(|(slot, _)| slot.is_some()));
        let (none, over) = s.claim();
        assert_eq!(none, None);
        std::thread::scope(|t| {
            for _ in 0..4 {
                t.spawn(|| {
                    for _ in 0..1000 {
                        over.record(false, Dir::Flush, 0, 5, true);
                    }
                });
            }
        });
        assert_eq!(s.snapshot().dir(Dir::Flush).ops, 4000);
    }
}
