//! Per-reactor counters: written by the reactor thread (relaxed atomics),
//! read by anyone.
//!
//! Busy and idle time are counted as SPDK does: a loop iteration that found
//! work (a message, a completion, a request) is busy time; one that found
//! none is idle time, even while the reactor spins waiting for work, and so
//! is a park.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Adds `v` to a counter that only the reactor's own thread writes: a plain
/// load and store (no locked read-modify-write on the loop's path).
#[inline]
fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
}

/// Where an I/O came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSource {
    /// A vhost-user-blk virtqueue (a VM).
    Vhost = 0,
    /// An NBD connection.
    Nbd = 1,
    /// A `bench io` job.
    Bench = 2,
    /// A control-plane copy job (CreateEncryptedCopy, ExportImage).
    Job = 3,
}

const SOURCES: usize = 4;

#[derive(Debug, Default)]
pub struct ReactorStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    busy_polls: AtomicU64,
    idle_polls: AtomicU64,
    ios: [AtomicU64; SOURCES],
    bytes: [AtomicU64; SOURCES],
    queue_full: AtomicU64,
    slow_parks: AtomicU64,
    parks: AtomicU64,
}

/// I/Os and their payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoCount {
    pub ios: u64,
    pub bytes: u64,
}

impl IoCount {
    fn since(&self, e: &IoCount) -> IoCount {
        IoCount {
            ios: self.ios - e.ios,
            bytes: self.bytes - e.bytes,
        }
    }
}

/// I/Os per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoSources {
    pub vhost: IoCount,
    pub nbd: IoCount,
    pub bench: IoCount,
    pub job: IoCount,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Time in loop iterations that found work.
    pub busy_ns: u64,
    /// Time in iterations that found none (spinning) and parked.
    pub idle_ns: u64,
    /// Loop iterations.
    pub polls: u64,
    /// Iterations that found no work.
    pub idle_polls: u64,
    /// I/Os from every source (the sum of `by_source`).
    pub ios: u64,
    pub bytes: u64,
    pub by_source: IoSources,
    pub queue_full: u64,
    /// Parks that lasted the whole park timeout while a poller had pending
    /// work (`Poller::pending`).
    pub slow_parks: u64,
    /// Times the reactor parked (slept in its ring).
    pub parks: u64,
}

impl ReactorStats {
    // Everything but `queue_full` is written by the reactor's own thread only
    // (`bump`); `queue_full` by the senders.

    /// One loop iteration of `d` that found work (reactor thread only).
    pub fn add_busy(&self, d: Duration) {
        bump(&self.busy_ns, d.as_nanos() as u64);
        bump(&self.busy_polls, 1);
    }
    /// One loop iteration of `d` that found no work (reactor thread only).
    pub fn add_idle_poll(&self, d: Duration) {
        bump(&self.idle_ns, d.as_nanos() as u64);
        bump(&self.idle_polls, 1);
    }
    /// A park of `d` (reactor thread only).
    pub fn add_idle(&self, d: Duration) {
        bump(&self.idle_ns, d.as_nanos() as u64);
        bump(&self.parks, 1);
    }
    /// One I/O from `src` (reactor thread only).
    pub fn add_io(&self, src: IoSource, bytes: u64) {
        self.add_ios(src, 1, bytes);
    }
    /// `n` I/Os from `src` moving `bytes` in all (reactor thread only).
    pub fn add_ios(&self, src: IoSource, n: u64, bytes: u64) {
        bump(&self.ios[src as usize], n);
        bump(&self.bytes[src as usize], bytes);
    }
    /// A message refused by the full queue (any sender).
    pub fn add_queue_full(&self) {
        self.queue_full.fetch_add(1, Relaxed);
    }
    /// (Reactor thread only.)
    pub fn add_slow_park(&self) {
        bump(&self.slow_parks, 1);
    }
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = |i: usize| IoCount {
            ios: self.ios[i].load(Relaxed),
            bytes: self.bytes[i].load(Relaxed),
        };
        let by_source = IoSources {
            vhost: c(IoSource::Vhost as usize),
            nbd: c(IoSource::Nbd as usize),
            bench: c(IoSource::Bench as usize),
            job: c(IoSource::Job as usize),
        };
        let all = [by_source.vhost, by_source.nbd, by_source.bench, by_source.job];
        StatsSnapshot {
            busy_ns: self.busy_ns.load(Relaxed),
            idle_ns: self.idle_ns.load(Relaxed),
            polls: self.busy_polls.load(Relaxed) + self.idle_polls.load(Relaxed),
            idle_polls: self.idle_polls.load(Relaxed),
            ios: all.iter().map(|c| c.ios).sum(),
            bytes: all.iter().map(|c| c.bytes).sum(),
            by_source,
            queue_full: self.queue_full.load(Relaxed),
            slow_parks: self.slow_parks.load(Relaxed),
            parks: self.parks.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// Counters accumulated between `earlier` and `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        let s = &self.by_source;
        let e = &earlier.by_source;
        StatsSnapshot {
            busy_ns: self.busy_ns - earlier.busy_ns,
            idle_ns: self.idle_ns - earlier.idle_ns,
            polls: self.polls - earlier.polls,
            idle_polls: self.idle_polls - earlier.idle_polls,
            ios: self.ios - earlier.ios,
            bytes: self.bytes - earlier.bytes,
            by_source: IoSources {
                vhost: s.vhost.since(&e.vhost),
                nbd: s.nbd.since(&e.nbd),
                bench: s.bench.since(&e.bench),
                job: s.job.since(&e.job),
            },
            queue_full: self.queue_full - earlier.queue_full,
            slow_parks: self.slow_parks - earlier.slow_parks,
            parks: self.parks - earlier.parks,
        }
    }

    /// The counters of two reactors together.
    pub fn plus(&self, o: &StatsSnapshot) -> StatsSnapshot {
        let add = |a: IoCount, b: IoCount| IoCount {
            ios: a.ios + b.ios,
            bytes: a.bytes + b.bytes,
        };
        let (s, t) = (&self.by_source, &o.by_source);
        StatsSnapshot {
            busy_ns: self.busy_ns + o.busy_ns,
            idle_ns: self.idle_ns + o.idle_ns,
            polls: self.polls + o.polls,
            idle_polls: self.idle_polls + o.idle_polls,
            ios: self.ios + o.ios,
            bytes: self.bytes + o.bytes,
            by_source: IoSources {
                vhost: add(s.vhost, t.vhost),
                nbd: add(s.nbd, t.nbd),
                bench: add(s.bench, t.bench),
                job: add(s.job, t.job),
            },
            queue_full: self.queue_full + o.queue_full,
            slow_parks: self.slow_parks + o.slow_parks,
            parks: self.parks + o.parks,
        }
    }

    /// Busy share of the time counted, in percent (0 when none).
    pub fn busy_percent(&self) -> f64 {
        let total = self.busy_ns + self.idle_ns;
        if total == 0 {
            0.0
        } else {
            self.busy_ns as f64 * 100.0 / total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ios_are_summed_over_sources_and_diffed() {
        let s = ReactorStats::default();
        s.add_io(IoSource::Nbd, 4096);
        s.add_ios(IoSource::Vhost, 3, 3 * 512);
        let a = s.snapshot();
        s.add_io(IoSource::Job, 65536);
        s.add_io(IoSource::Bench, 4096);
        s.add_busy(Duration::from_nanos(100));
        s.add_idle_poll(Duration::from_nanos(300));
        let b = s.snapshot();
        assert_eq!((a.ios, a.bytes), (4, 4096 + 1536));
        assert_eq!((b.ios, b.bytes), (6, 4096 + 1536 + 65536 + 4096));
        let d = b.since(&a);
        assert_eq!(d.by_source.job, IoCount { ios: 1, bytes: 65536 });
        assert_eq!(d.by_source.vhost, IoCount::default());
        assert_eq!((d.busy_ns, d.idle_ns, d.polls, d.idle_polls), (100, 300, 2, 1));
        assert!((d.busy_percent() - 25.0).abs() < 1e-9);
    }
}
