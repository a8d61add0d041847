//! `qos`: per-disk IOPS and bandwidth caps, like a cloud disk category's.
//!
//! One shared limiter per disk (all reactors' channels draw from it) built
//! from two GCRA token buckets on atomics: a request may start when its cost
//! fits the bucket's burst; otherwise the channel holds it and retries on
//! its next poll. Nothing blocks and nothing is dropped.
//!
//! The limiter counts the requests it held and how long they waited
//! ([`Bdev::layer_counters`]: `qos_holds`, `qos_held_ns`); those atomic adds
//! happen only on the throttled path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::iostat::clock::Clock;
use super::{Bdev, BdevRef, Channel, ChannelCtx, IoCompletion, IoOp, IoRequest, LayerCounters};

/// Caps of one disk. `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QosLimits {
    pub iops: Option<u64>,
    pub bytes_per_sec: Option<u64>,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bytes_per_sec.is_none()
    }
}

/// Generic cell rate algorithm on one atomic: `tat` is the theoretical
/// arrival time (ns since `epoch`) of the next unit.
struct Gcra {
    ns_per_unit: f64,
    burst_ns: u64,
    tat: AtomicU64,
}

impl Gcra {
    fn new(rate: u64, burst_units: u64) -> Gcra {
        let ns_per_unit = 1e9 / rate.max(1) as f64;
        Gcra {
            ns_per_unit,
            burst_ns: (ns_per_unit * burst_units.max(1) as f64) as u64,
            tat: AtomicU64::new(0),
        }
    }

    /// Take `units` if they fit now (`now` ns since the epoch): the debt
    /// after taking them must stay within the burst. An idle bucket admits
    /// anything, so a request larger than the burst cannot starve.
    fn try_take(&self, units: u64, now: u64) -> bool {
        let cost = (self.ns_per_unit * units as f64) as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now) + cost;
            if tat > now && new - now > self.burst_ns {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }

    /// Give back units taken by a request that then could not start.
    fn refund(&self, units: u64) {
        let cost = (self.ns_per_unit * units as f64) as u64;
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| Some(t.saturating_sub(cost)));
    }
}

/// The shared limiter of one disk.
pub(crate) struct Limiter {
    epoch: Instant,
    iops: Option<Gcra>,
    bw: Option<Gcra>,
    /// Requests held back (each counted once).
    holds: AtomicU64,
    /// Nanoseconds held requests waited, in all.
    held_ns: AtomicU64,
}

impl Limiter {
    /// Burst: 1/10 s worth of the rate (at least one unit).
    pub(crate) fn new(l: QosLimits) -> Limiter {
        Limiter {
            epoch: Instant::now(),
            iops: l.iops.map(|r| Gcra::new(r, (r / 10).max(1))),
            bw: l.bytes_per_sec.map(|r| Gcra::new(r, (r / 10).max(1 << 20))),
            holds: AtomicU64::new(0),
            held_ns: AtomicU64::new(0),
        }
    }

    fn admit(&self, bytes: u64) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        if let Some(g) = &self.iops {
            if !g.try_take(1, now) {
                return false;
            }
        }
        if let Some(g) = &self.bw {
            if !g.try_take(bytes, now) {
                if let Some(i) = &self.iops {
                    i.refund(1);
                }
                return false;
            }
        }
        true
    }

    fn refund(&self, bytes: u64) {
        if let Some(g) = &self.iops {
            g.refund(1);
        }
        if let Some(g) = &self.bw {
            g.refund(bytes);
        }
    }
}

pub struct QosBdev {
    name: String,
    inner: BdevRef,
    limiter: Arc<Limiter>,
    clock: Clock,
}

impl QosBdev {
    pub fn new(inner: BdevRef, limits: QosLimits) -> QosBdev {
        QosBdev {
            name: format!("qos({})", inner.name()),
            inner,
            limiter: Arc::new(Limiter::new(limits)),
            clock: Clock::get(),
        }
    }
}

impl Bdev for QosBdev {
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
    fn layer_counters(&self, c: &mut LayerCounters) {
        c.qos_holds += self.limiter.holds.load(Ordering::Relaxed);
        c.qos_held_ns += self.limiter.held_ns.load(Ordering::Relaxed);
        self.inner.layer_counters(c);
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(QosChannel {
            inner: self.inner.open_channel(ctx)?,
            limiter: self.limiter.clone(),
            held: VecDeque::new(),
            clock: self.clock,
        }))
    }
}

struct QosChannel {
    inner: Box<dyn Channel>,
    limiter: Arc<Limiter>,
    /// Held requests with the tick they were held at.
    held: VecDeque<(IoRequest, u64)>,
    clock: Clock,
}

impl QosChannel {
    fn start(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        let bytes = if matches!(req.op, IoOp::Read | IoOp::Write) {
            req.bytes()
        } else {
            0
        };
        let metered = req.op != IoOp::Flush;
        if metered && !self.limiter.admit(bytes) {
            return Err(req);
        }
        self.inner.submit(req).inspect_err(|_| {
            if metered {
                self.limiter.refund(bytes);
            }
        })
    }

    fn hold(&mut self, req: IoRequest) {
        self.limiter.holds.fetch_add(1, Ordering::Relaxed);
        self.held.push_back((req, self.clock.ticks()));
    }
}

impl Channel for QosChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if !self.held.is_empty() {
            self.hold(req);
            return Ok(());
        }
        if let Err(r) = self.start(req) {
            self.hold(r);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        while let Some((r, t)) = self.held.pop_front() {
            if let Err(r) = self.start(r) {
                self.held.push_front((r, t));
                break;
            }
            self.limiter
                .held_ns
                .fetch_add(self.clock.ns_since(t), Ordering::Relaxed);
        }
        self.inner.poll(out)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
}
