//! Counters of the pool's metadata thread (the slow path of volume writes):
//! queue depth, batch sizes, fdatasync and commit latency, time spent waiting for
//! the catalog writer, failures. Reactors add to `enqueued` when they hand a
//! request over (already a channel send with an allocation); everything else is
//! written by the metadata thread alone. Relaxed atomics, no locks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::counters::{Histogram, HistogramSnapshot};

#[derive(Debug, Default)]
pub(crate) struct MetaStats {
    enqueued: AtomicU64,
    dequeued: AtomicU64,
    batch_size: Histogram,
    writer_wait_ns: Histogram,
    fdatasync_ns: Histogram,
    commit_ns: Histogram,
    batch_ns: Histogram,
    prepare_failures: AtomicU64,
    durability_failures: AtomicU64,
}

/// A copy of [`MetaStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetaStatsSnapshot {
    /// Requests handed to the metadata thread and not yet taken into a batch.
    pub queue_depth: u64,
    /// Requests handed to it since the pool opened.
    pub requests: u64,
    /// Requests per batch (one transaction each, except batches retried request
    /// by request after a failed preparation).
    pub batch_size: HistogramSnapshot,
    /// Time waiting for the catalog's write transaction (the control plane may hold
    /// it), per transaction, ns.
    pub writer_wait_ns: HistogramSnapshot,
    /// fdatasync of the pool per transaction, ns.
    pub fdatasync_ns: HistogramSnapshot,
    /// The catalog commit per transaction, ns.
    pub commit_ns: HistogramSnapshot,
    /// A whole batch, from taking it to answering its requests, ns.
    pub batch_ns: HistogramSnapshot,
    /// Batches whose preparation failed (e.g. pool full; retried one by one).
    pub prepare_failures: u64,
    /// Transactions whose fdatasync or commit failed (their requests got EIO).
    pub durability_failures: u64,
}

impl MetaStats {
    pub(crate) fn enqueued(&self) {
        self.enqueued.fetch_add(1, Relaxed);
    }
    pub(crate) fn dequeued(&self, n: usize) {
        self.dequeued.fetch_add(n as u64, Relaxed);
        self.batch_size.record(n as u64);
    }
    pub(crate) fn writer_wait(&self) -> &Histogram {
        &self.writer_wait_ns
    }
    pub(crate) fn fdatasync(&self) -> &Histogram {
        &self.fdatasync_ns
    }
    pub(crate) fn commit(&self) -> &Histogram {
        &self.commit_ns
    }
    pub(crate) fn batch(&self) -> &Histogram {
        &self.batch_ns
    }
    pub(crate) fn prepare_failed(&self) {
        self.prepare_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn durability_failed(&self) {
        self.durability_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetaStatsSnapshot {
        // Dequeued first: a request counted out is always counted in already.
        let out = self.dequeued.load(Relaxed);
        let inn = self.enqueued.load(Relaxed);
        MetaStatsSnapshot {
            queue_depth: inn.saturating_sub(out),
            requests: inn,
            batch_size: self.batch_size.snapshot(),
            writer_wait_ns: self.writer_wait_ns.snapshot(),
            fdatasync_ns: self.fdatasync_ns.snapshot(),
            commit_ns: self.commit_ns.snapshot(),
            batch_ns: self.batch_ns.snapshot(),
            prepare_failures: self.prepare_failures.load(Relaxed),
            durability_failures: self.durability_failures.load(Relaxed),
        }
    }
}
