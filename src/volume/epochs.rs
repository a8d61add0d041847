//! Which I/O could still address a physical cluster: epochs over the pool's
//! volume channels, in the manner of SRCU.
//!
//! Every request a volume channel sends to the pool device (a read of a
//! mapped cluster, a fast-path write) [`Slots::enter`]s the pool's current
//! epoch before it loads the volume map and leaves it when the device has
//! completed it. Each channel counts its own requests per epoch parity, so
//! the data path writes only its own cache line and takes no lock.
//!
//! A *grace period* flips the epoch and waits until the old parity's count
//! is zero on every channel, twice (a request that read the epoch just before
//! a flip may count itself under the parity the second flip drains). When a
//! grace period that began after a change to the maps was published ends, no
//! request that loaded the old map entry is still in flight. The pool uses
//! that for two things:
//! * a freed cluster is reused only after such a grace period, so a stalled
//!   read never returns another volume's data;
//! * a snapshot of a live volume clears its owned bits and then waits for one,
//!   so no fast-path write started earlier is still landing in a cluster that
//!   is now shared (SPDK's freeze-and-drain, without stopping new I/O).
//!
//! Grace periods advance by [`Epochs::poll`], which never blocks: the metadata
//! thread polls between batches, the control plane polls in
//! [`Epochs::synchronize`].

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A channel's in-flight request counts, per epoch parity. Written only by the
/// reactor that owns the channel.
#[derive(Default)]
pub(crate) struct Slots {
    counts: [AtomicU64; 2],
}

/// The pool's epoch and the slots of every live volume channel.
#[derive(Default)]
pub(crate) struct Epochs {
    epoch: AtomicU64,
    chans: Mutex<Vec<Weak<Slots>>>,
    gp: Mutex<Grace>,
}

#[derive(Default)]
struct Grace {
    /// Grace periods completed.
    completed: u64,
    /// Highest grace period number someone waits for.
    wanted: u64,
    /// 0: none in progress; 1 or 2: waiting for the parity `draining` after
    /// the first or second flip.
    phase: u8,
    draining: usize,
}

impl Slots {
    /// Enter the current epoch; returns the parity to [`Slots::leave`] with.
    /// Call before loading the volume map.
    #[inline]
    pub(crate) fn enter(&self, epochs: &Epochs) -> u8 {
        let e = (epochs.epoch.load(SeqCst) & 1) as usize;
        let c = &self.counts[e];
        // Single writer: a load and a sequentially consistent store, so the
        // count is visible before this thread's later map loads.
        c.store(c.load(Relaxed) + 1, SeqCst);
        e as u8
    }

    /// Leave the epoch entered with parity `e` (the device completed the I/O).
    #[inline]
    pub(crate) fn leave(&self, e: u8) {
        let c = &self.counts[e as usize];
        c.store(c.load(Relaxed) - 1, Release);
    }
}

impl Epochs {
    /// Slots for a new channel.
    pub(crate) fn register(&self) -> Arc<Slots> {
        let s = Arc::new(Slots::default());
        let mut chans = self.chans.lock().expect("epoch channels");
        chans.retain(|w| w.strong_count() > 0);
        chans.push(Arc::downgrade(&s));
        s
    }

    /// Requests counted under parity `e` on all live channels. A dropped
    /// channel's requests have completed (its lower channel waits for them).
    fn in_flight(&self, e: usize) -> u64 {
        let chans = self.chans.lock().expect("epoch channels");
        chans
            .iter()
            .filter_map(Weak::upgrade)
            .map(|s| s.counts[e].load(SeqCst))
            .sum()
    }

    /// A ticket: once [`Epochs::completed`] reaches it, every request that
    /// entered an epoch before this call has left it.
    pub(crate) fn request(&self) -> u64 {
        let mut g = self.gp.lock().expect("grace period");
        // A grace period already under way may have flipped before requests
        // that loaded the old map; only the next one is sure to cover them.
        let t = g.completed + if g.phase == 0 { 1 } else { 2 };
        g.wanted = g.wanted.max(t);
        t
    }

    /// Advance grace periods as far as possible without waiting; returns the
    /// number completed.
    pub(crate) fn poll(&self) -> u64 {
        let mut g = self.gp.lock().expect("grace period");
        loop {
            match g.phase {
                0 if g.wanted > g.completed => self.flip(&mut g, 1),
                1 if self.in_flight(g.draining) == 0 => self.flip(&mut g, 2),
                2 if self.in_flight(g.draining) == 0 => {
                    g.phase = 0;
                    g.completed += 1;
                }
                _ => return g.completed,
            }
        }
    }

    fn flip(&self, g: &mut Grace, phase: u8) {
        let old = self.epoch.fetch_add(1, SeqCst);
        g.draining = (old & 1) as usize;
        g.phase = phase;
    }

    /// Waits until every request that entered an epoch before this call has
    /// completed. `false` if that took longer than `timeout` (a device stalls).
    pub(crate) fn synchronize(&self, timeout: Duration) -> bool {
        let t = self.request();
        let start = Instant::now();
        let mut nap = Duration::from_micros(10);
        while self.poll() < t {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
        true
    }
}

/// Freed clusters waiting for their grace period: cluster → ticket
/// ([`Epochs::request`]); `u64::MAX` while the transaction that frees it is
/// still open. Used by the metadata thread (allocation) and the control plane
/// (deletes), never by the data path.
#[derive(Default)]
pub(crate) struct Limbo {
    m: Mutex<std::collections::HashMap<u64, u64>>,
}

impl Limbo {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        self.m.lock().expect("cluster limbo")
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// `p` is being freed by an open transaction: not reusable at all yet.
    pub(crate) fn hold(&self, p: u64) {
        self.map().insert(p, u64::MAX);
    }

    /// `ps` are freed (durably or about to be); reusable once grace period
    /// `ticket` has completed.
    pub(crate) fn ticket(&self, ps: &[u64], ticket: u64) {
        let mut m = self.map();
        for &p in ps {
            m.insert(p, ticket);
        }
    }

    /// `ps` were not freed after all (their transaction failed).
    pub(crate) fn forget(&self, ps: &[u64]) {
        let mut m = self.map();
        for p in ps {
            m.remove(p);
        }
    }

    /// Whether `p` must not be allocated yet.
    pub(crate) fn holds(&self, p: u64) -> bool {
        self.map().contains_key(&p)
    }

    /// Release every cluster whose grace period is among the `completed`.
    pub(crate) fn prune(&self, completed: u64) {
        self.map().retain(|_, t| *t > completed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_waits_for_requests_entered_before_it_in_either_parity() {
        let ep = Epochs::default();
        let a = ep.register();
        let b = ep.register();
        let ea = a.enter(&ep);
        let t = ep.request();
        assert!(ep.poll() < t, "a request is in flight");
        // A request entering after the flip lands in the other parity and does
        // not hold the first phase back, but the second phase drains it.
        let eb = b.enter(&ep);
        assert_ne!(ea, eb);
        a.leave(ea);
        assert!(ep.poll() < t, "second phase waits for the other parity");
        b.leave(eb);
        assert!(ep.poll() >= t);
        // Nothing in flight: the next grace period completes at once.
        assert!(ep.synchronize(Duration::from_secs(1)));
    }

    #[test]
    fn dropped_channels_do_not_hold_grace_periods() {
        let ep = Epochs::default();
        let a = ep.register();
        let _ = a.enter(&ep);
        drop(a);
        assert!(ep.synchronize(Duration::from_secs(1)));
    }

    #[test]
    fn limbo_releases_clusters_only_after_their_grace_period() {
        let ep = Epochs::default();
        let ch = ep.register();
        let l = Limbo::default();
        let e = ch.enter(&ep);
        l.hold(7);
        l.ticket(&[7], ep.request());
        l.prune(ep.poll());
        assert!(l.holds(7), "a read that may address cluster 7 is in flight");
        ch.leave(e);
        l.prune(ep.poll());
        assert!(!l.holds(7));
        l.hold(8);
        l.prune(ep.poll());
        assert!(l.holds(8), "a cluster of an open transaction is never released");
        l.forget(&[8]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_stalled_request_times_synchronize_out() {
        let ep = Epochs::default();
        let a = ep.register();
        let e = a.enter(&ep);
        assert!(!ep.synchronize(Duration::from_millis(20)));
        a.leave(e);
        assert!(ep.synchronize(Duration::from_secs(1)));
    }
}
