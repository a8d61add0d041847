//! Per-reactor counters: written by the reactor thread (relaxed atomics),
//! read by anyone.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct ReactorStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    ios: AtomicU64,
    bytes: AtomicU64,
    queue_full: AtomicU64,
    slow_parks: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub ios: u64,
    pub bytes: u64,
    pub queue_full: u64,
    /// Parks that lasted the whole park timeout while a poller had pending
    /// work (`Poller::pending`).
    pub slow_parks: u64,
}

impl ReactorStats {
    pub fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
    pub fn add_idle(&self, d: Duration) {
        self.idle_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
    pub fn add_io(&self, bytes: u64) {
        self.ios.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
    /// `n` I/Os moving `bytes` in all.
    pub fn add_ios(&self, n: u64, bytes: u64) {
        self.ios.fetch_add(n, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
    pub fn add_queue_full(&self) {
        self.queue_full.fetch_add(1, Relaxed);
    }
    pub fn add_slow_park(&self) {
        self.slow_parks.fetch_add(1, Relaxed);
    }
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            busy_ns: self.busy_ns.load(Relaxed),
            idle_ns: self.idle_ns.load(Relaxed),
            ios: self.ios.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            slow_parks: self.slow_parks.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// Counters accumulated between `earlier` and `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            busy_ns: self.busy_ns - earlier.busy_ns,
            idle_ns: self.idle_ns - earlier.idle_ns,
            ios: self.ios - earlier.ios,
            bytes: self.bytes - earlier.bytes,
            queue_full: self.queue_full - earlier.queue_full,
            slow_parks: self.slow_parks - earlier.slow_parks,
        }
    }
}
