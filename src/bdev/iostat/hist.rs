//! Latency histograms: written by one reactor with relaxed atomics, read by
//! anyone, and handed to `hdrhistogram` for the arithmetic.
//!
//! The data path cannot use `hdrhistogram::Histogram` itself: its counts are
//! plain integers, so no other thread could read them while the reactor
//! records. [`AtomicHist`] keeps the same buckets as an HdrHistogram of
//! lowest value 1 ns and one significant figure (32 linear buckets for
//! 0..31 ns, then 16 sub-buckets per power of two: every value is known to
//! within 1/16, ~6%) up to [`MAX_VALUE`] (~18 minutes; longer latencies
//! count in the last bucket), as an array of `AtomicU64`: recording is one
//! `lzcnt`, a shift and a load/store pair. [`Hist`] is a copy of the counts
//! at one moment; [`Hist::to_hdr`] rebuilds the equivalent
//! `hdrhistogram::Histogram` (every bucket maps onto exactly one of its
//! buckets) for quantiles.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Largest value told apart from larger ones (nanoseconds): 2^40 - 1.
pub(crate) const MAX_VALUE: u64 = (1 << 40) - 1;
/// Number of buckets.
pub(crate) const BUCKETS: usize = 592;

/// The bucket of a value.
#[inline]
pub(crate) fn index(v: u64) -> usize {
    let v = v.min(MAX_VALUE);
    if v < 32 {
        v as usize
    } else {
        // v in [2^e, 2^(e+1)), e >= 5: shift k = e - 4 keeps 5 bits (16..31).
        let k = 59 - v.leading_zeros();
        ((k as usize) << 4) + (v >> k) as usize
    }
}

/// The smallest value in bucket `i`.
pub(crate) fn low(i: usize) -> u64 {
    if i < 32 {
        i as u64
    } else {
        let k = i / 16 - 1;
        ((i % 16 + 16) as u64) << k
    }
}

/// The largest value in bucket `i`.
pub(crate) fn high(i: usize) -> u64 {
    if i < 32 {
        i as u64
    } else {
        low(i) + (1u64 << (i / 16 - 1)) - 1
    }
}

/// A histogram one thread records into and any thread reads.
pub(crate) struct AtomicHist {
    counts: Box<[AtomicU64]>,
}

impl Default for AtomicHist {
    fn default() -> Self {
        AtomicHist {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl AtomicHist {
    /// Count `v` (only the owning thread: a load and a store, no lock prefix).
    #[inline]
    pub(crate) fn record_exclusive(&self, v: u64) {
        let c = &self.counts[index(v)];
        c.store(c.load(Relaxed) + 1, Relaxed);
    }

    /// Count `v` from any thread (an atomic add).
    #[inline]
    pub(crate) fn record_shared(&self, v: u64) {
        self.counts[index(v)].fetch_add(1, Relaxed);
    }

    /// Adds the counts into `h`.
    pub(crate) fn add_to(&self, h: &mut Hist) {
        for (d, c) in h.counts.iter_mut().zip(self.counts.iter()) {
            *d += c.load(Relaxed);
        }
    }
}

/// Counts of a histogram at one moment (or their difference between two).
#[derive(Clone, PartialEq, Eq)]
pub struct Hist {
    counts: Box<[u64]>,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS].into_boxed_slice(),
        }
    }
}

impl std::fmt::Debug for Hist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hist").field("count", &self.count()).finish()
    }
}

impl Hist {
    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Count `n` values of `v` (control plane, tests).
    pub fn record_n(&mut self, v: u64, n: u64) {
        self.counts[index(v)] += n;
    }

    pub fn add(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
    }

    /// What was counted since `earlier` (a copy of the same counters taken
    /// before this one).
    pub fn since(&self, earlier: &Hist) -> Hist {
        Hist {
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter())
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The non-empty buckets: (bucket, count).
    pub fn buckets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i, *c))
    }

    /// Adds sparse `(bucket, count)` pairs (as [`Hist::buckets`] gives them).
    pub fn add_buckets(&mut self, b: impl IntoIterator<Item = (usize, u64)>) {
        for (i, c) in b {
            if let Some(x) = self.counts.get_mut(i) {
                *x += c;
            }
        }
    }

    /// Values at or below `le` nanoseconds: every bucket whose largest value
    /// is at most `le` (a bucket that straddles `le` counts above it).
    pub fn count_le(&self, le: u64) -> u64 {
        self.buckets().take_while(|(i, _)| high(*i) <= le).map(|(_, c)| c).sum()
    }

    /// The equivalent `hdrhistogram::Histogram` (same buckets).
    pub fn to_hdr(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = hdr_empty();
        for (i, c) in self.buckets() {
            h.record_n(low(i), c).expect("values up to MAX_VALUE fit the histogram");
        }
        h
    }

    /// The value at quantile `q` (0..=1) in nanoseconds (the largest value
    /// of its bucket), 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count() == 0 {
            return 0;
        }
        self.to_hdr().value_at_quantile(q)
    }
}

/// An empty `hdrhistogram::Histogram` with [`AtomicHist`]'s buckets.
pub(crate) fn hdr_empty() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, MAX_VALUE, 1).expect("valid bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_with_sixteenth_precision() {
        assert_eq!(index(0), 0);
        assert_eq!(index(31), 31);
        assert_eq!(index(MAX_VALUE), BUCKETS - 1);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS {
            assert_eq!(index(low(i)), i, "low of {i}");
            assert_eq!(index(high(i)), i, "high of {i}");
            if i + 1 < BUCKETS {
                assert_eq!(high(i) + 1, low(i + 1), "gap after {i}");
            }
            if i >= 32 {
                assert!((high(i) - low(i) + 1) * 16 <= low(i) + 1, "bucket {i} too wide");
            }
        }
    }

    #[test]
    fn same_buckets_and_quantiles_as_hdrhistogram() {
        let a = AtomicHist::default();
        let mut reference = hdr_empty();
        let mut x = 0x9e3779b97f4a7c15u64;
        for n in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Log-spread values from 1 ns to ~1 s.
            let v = ((x % 1_000_000_000) >> (x % 30)).max(1);
            if n % 2 == 0 {
                a.record_exclusive(v);
            } else {
                a.record_shared(v);
            }
            reference.record(v).unwrap();
            assert!(
                reference.equivalent(v, low(index(v))),
                "{v} lands in another bucket than hdrhistogram's"
            );
        }
        let mut h = Hist::default();
        a.add_to(&mut h);
        assert_eq!(h.count(), 20_000);
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(h.quantile(q), reference.value_at_quantile(q), "quantile {q}");
        }
    }

    #[test]
    fn since_count_le_and_sparse_round_trip() {
        let mut a = Hist::default();
        a.record_n(100, 3);
        let mut b = a.clone();
        b.record_n(1_000, 2);
        b.record_n(1_000_000, 1);
        let d = b.since(&a);
        assert_eq!(d.count(), 3);
        assert_eq!(d.count_le(999), 0);
        assert_eq!(d.count_le(1_100), 2);
        assert_eq!(d.count_le(u64::MAX), 3);
        let mut c = Hist::default();
        c.add_buckets(d.buckets());
        assert_eq!(c, d);
        assert_eq!(Hist::default().quantile(0.99), 0);
        let p = d.quantile(0.99);
        assert!((1_000_000..1_000_000 + 1_000_000 / 16).contains(&p), "{p}");
    }
}
