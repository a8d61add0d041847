//! Plain counters for the slow paths (the volume metadata thread, the KMS): a
//! [`Histogram`] of values (durations in nanoseconds, batch sizes) in power-of-two
//! buckets, kept in relaxed atomics. Writers never lock; readers take a
//! [`HistogramSnapshot`] (serde-serializable) whenever they like. The metrics
//! endpoint renders snapshots as Prometheus histograms (cumulative `le` buckets).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Buckets: `le` = 2^0, 2^1, ..., 2^(BUCKETS-2), and +Inf.
const BUCKETS: usize = 40;

/// Count, sum, max and power-of-two buckets of recorded values.
#[derive(Debug)]
pub(crate) struct Histogram {
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of a [`Histogram`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum: u64,
    pub max: u64,
    /// `(le, values <= le)`, cumulative, for every power of two up to the one that
    /// holds the largest value (`le` = `u64::MAX` stands for +Inf).
    pub buckets: Vec<(u64, u64)>,
}

/// The bucket of `v`: the smallest `i` with `v <= 2^i`, capped at the +Inf bucket.
fn bucket(v: u64) -> usize {
    let i = if v <= 1 {
        0
    } else {
        (64 - (v - 1).leading_zeros()) as usize
    };
    i.min(BUCKETS - 1)
}

impl Histogram {
    /// Records one value.
    pub(crate) fn record(&self, v: u64) {
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.max.fetch_max(v, Relaxed);
        self.buckets[bucket(v)].fetch_add(1, Relaxed);
    }

    /// Records a duration in nanoseconds.
    pub(crate) fn record_duration(&self, d: Duration) {
        self.record(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let raw: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let last = raw.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
        let mut cum = 0;
        let buckets = raw[..last]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                cum += n;
                (if i == BUCKETS - 1 { u64::MAX } else { 1u64 << i }, cum)
            })
            .collect();
        HistogramSnapshot {
            count: self.count.load(Relaxed),
            sum: self.sum.load(Relaxed),
            max: self.max.load(Relaxed),
            buckets,
        }
    }
}

impl HistogramSnapshot {
    /// Mean of the recorded values (0 when none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_powers_of_two() {
        let h = Histogram::default();
        for v in [0, 1, 2, 3, 4, 5, 1000] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!((s.count, s.sum, s.max), (7, 1015, 1000));
        assert_eq!(s.buckets[0], (1, 2)); // 0 and 1
        assert_eq!(s.buckets[1], (2, 3));
        assert_eq!(s.buckets[2], (4, 5)); // 3, 4
        assert_eq!(s.buckets[3], (8, 6)); // 5
        assert_eq!(*s.buckets.last().unwrap(), (1024, 7));
        assert_eq!(s.buckets.len(), 11);
        assert!((s.mean() - 1015.0 / 7.0).abs() < 1e-9);
    }

    #[test]
    fn huge_values_land_in_the_infinite_bucket() {
        let h = Histogram::default();
        h.record(u64::MAX / 2);
        let s = h.snapshot();
        assert_eq!(*s.buckets.last().unwrap(), (u64::MAX, 1));
        assert_eq!(s.buckets.len(), BUCKETS);
    }

    #[test]
    fn an_empty_histogram_has_no_buckets() {
        let s = Histogram::default().snapshot();
        assert_eq!(s, HistogramSnapshot::default());
        assert_eq!(s.mean(), 0.0);
    }
}
