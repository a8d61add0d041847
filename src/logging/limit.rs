//! A rate limit for log lines a client can cause at any rate: at most `burst` lines
//! per window; the rest are counted and the count goes with the next line let
//! through. Lock-free (one atomic word of state, one counter), so a reactor may
//! use it on its error path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// Bits of the state word that count lines in the current window.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Milliseconds since the first use of any limit, plus one (0: never).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// See the module documentation. `const`, so it can be a `static`.
#[derive(Debug)]
pub(crate) struct RateLimit {
    burst: u64,
    window_ms: u64,
    /// Window start (ms, [`now_ms`]) << COUNT_BITS | lines in the window.
    state: AtomicU64,
    suppressed: AtomicU64,
    suppressed_total: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::standard()
    }
}

impl RateLimit {
    /// At most `burst` lines (1 ..= 2^24 - 1) per `window_ms` milliseconds.
    pub(crate) const fn new(burst: u32, window_ms: u64) -> RateLimit {
        let burst = if burst == 0 {
            1
        } else if burst as u64 > COUNT_MASK {
            COUNT_MASK
        } else {
            burst as u64
        };
        RateLimit {
            burst,
            window_ms: if window_ms == 0 { 1 } else { window_ms },
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// The limit for events a client causes: 10 lines per 10 seconds.
    pub(crate) const fn standard() -> RateLimit {
        RateLimit::new(10, 10_000)
    }

    /// `Some(n)`: log this event, and say that `n` were suppressed since the last
    /// line; `None`: suppressed (counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let mut s = self.state.load(Relaxed);
        loop {
            let (start, n) = (s >> COUNT_BITS, s & COUNT_MASK);
            let next = if start == 0 || now.saturating_sub(start) >= self.window_ms {
                (now << COUNT_BITS) | 1
            } else if n < self.burst {
                s + 1
            } else {
                self.suppressed.fetch_add(1, Relaxed);
                self.suppressed_total.fetch_add(1, Relaxed);
                return None;
            };
            match self.state.compare_exchange_weak(s, next, Relaxed, Relaxed) {
                Ok(_) => return Some(self.suppressed.swap(0, Relaxed)),
                Err(cur) => s = cur,
            }
        }
    }

    /// Events suppressed since this limit was made.
    #[cfg(test)]
    pub(crate) fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_suppressed_then_counted_on_the_next_line() {
        let l = RateLimit::new(3, 1000);
        let t = 5000;
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t + 1), Some(0));
        assert_eq!(l.allow_at(t + 2), Some(0));
        for i in 0..7 {
            assert_eq!(l.allow_at(t + 3 + i), None);
        }
        assert_eq!(l.suppressed_total(), 7);
        // A new window: the first line carries the count.
        assert_eq!(l.allow_at(t + 1000), Some(7));
        assert_eq!(l.allow_at(t + 1001), Some(0));
        assert_eq!(l.suppressed_total(), 7);
    }

    #[test]
    fn lines_stay_bounded_under_a_flood_from_many_threads() {
        let l = std::sync::Arc::new(RateLimit::new(5, 60_000));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| l.allow().is_some()).count())
            })
            .collect();
        let lines: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(lines, 5, "one window, burst 5");
        assert_eq!(l.suppressed_total(), 40_000 - 5);
    }

    #[test]
    fn degenerate_settings_still_let_lines_through() {
        let l = RateLimit::new(0, 0);
        assert_eq!(l.allow_at(10), Some(0));
        assert_eq!(l.allow_at(11), Some(0), "window of at least 1 ms");
    }
}
