//! KMS call counters per backend: calls that reached the backend, their latency and
//! errors, and calls refused by the quota before reaching it. Relaxed atomics; the
//! control plane's threads write them, anyone reads a snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::BackendKind;
use crate::counters::{Histogram, HistogramSnapshot};

#[derive(Debug, Default)]
struct BackendStats {
    calls: AtomicU64,
    errors: AtomicU64,
    throttled: AtomicU64,
    latency_ns: Histogram,
}

/// Counters of every backend (a daemon uses one; both are always reported).
#[derive(Debug, Default)]
pub(crate) struct KmsStats {
    local: BackendStats,
    transit: BackendStats,
}

/// One backend's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KmsBackendSnapshot {
    /// Metered calls that reached the backend (GenerateDataKey, UnwrapDataKey,
    /// EnsureServiceKey, DescribeServiceKey).
    pub calls: u64,
    /// Of those, the ones that failed.
    pub errors: u64,
    /// Calls refused by the quota before reaching the backend.
    pub throttled: u64,
    /// Latency of the calls that reached the backend, ns.
    pub latency_ns: HistogramSnapshot,
}

/// A copy of [`KmsStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KmsStatsSnapshot {
    pub local: KmsBackendSnapshot,
    pub transit: KmsBackendSnapshot,
}

impl KmsStats {
    fn of(&self, b: BackendKind) -> &BackendStats {
        match b {
            BackendKind::Local => &self.local,
            BackendKind::Transit => &self.transit,
        }
    }

    pub(crate) fn call(&self, b: BackendKind, took: Duration, ok: bool) {
        let s = self.of(b);
        s.calls.fetch_add(1, Relaxed);
        if !ok {
            s.errors.fetch_add(1, Relaxed);
        }
        s.latency_ns.record_duration(took);
    }

    pub(crate) fn throttled(&self, b: BackendKind) {
        self.of(b).throttled.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> KmsStatsSnapshot {
        let one = |s: &BackendStats| KmsBackendSnapshot {
            calls: s.calls.load(Relaxed),
            errors: s.errors.load(Relaxed),
            throttled: s.throttled.load(Relaxed),
            latency_ns: s.latency_ns.snapshot(),
        };
        KmsStatsSnapshot {
            local: one(&self.local),
            transit: one(&self.transit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_per_backend() {
        let s = KmsStats::default();
        s.call(BackendKind::Transit, Duration::from_micros(3), false);
        s.call(BackendKind::Transit, Duration::from_micros(1), true);
        s.throttled(BackendKind::Local);
        let v = s.snapshot();
        assert_eq!((v.transit.calls, v.transit.errors, v.transit.throttled), (2, 1, 0));
        assert_eq!(v.transit.latency_ns.sum, 4000);
        assert_eq!((v.local.calls, v.local.throttled), (0, 1));
    }
}
