//! A cheap monotonic clock for the data path.
//!
//! Timing every request twice must cost only a few nanoseconds. On x86-64,
//! where the kernel itself trusts the time-stamp counter (its clocksource is
//! `tsc`: invariant, synchronised across cores), a tick is one `rdtsc`
//! (no system call, no vDSO arithmetic). Elsewhere a tick is a nanosecond
//! of [`Instant`] since the first use. A request is stamped and completed on
//! the same reactor thread, so both ticks come from the same core anyway.
//!
//! Ticks become nanoseconds with one multiply (32.32 fixed point), by a
//! factor calibrated once against [`Instant`] over ~20 ms ([`Clock::get`]:
//! the control plane calls it when it builds a stack, never a reactor).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The calibrated clock (process-wide).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    tsc: bool,
    /// Nanoseconds per tick, 32.32 fixed point.
    mult: u64,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();
static ANCHOR: OnceLock<Instant> = OnceLock::new();

fn kernel_trusts_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .is_ok_and(|s| s.trim() == "tsc")
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` exists on every x86-64 CPU; it only reads the
    // time-stamp counter (no memory access, no side effect).
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn rdtsc() -> u64 {
    0
}

fn instant_ns() -> u64 {
    ANCHOR.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Clock {
    /// The process's clock, calibrated on first use (blocks ~20 ms then).
    pub(crate) fn get() -> Clock {
        *CLOCK.get_or_init(|| {
            let _ = ANCHOR.get_or_init(Instant::now);
            if !kernel_trusts_tsc() {
                return Clock {
                    tsc: false,
                    mult: 1 << 32,
                };
            }
            let (i0, t0) = (Instant::now(), rdtsc());
            std::thread::sleep(Duration::from_millis(20));
            let (i1, t1) = (Instant::now(), rdtsc());
            let ns = (i1 - i0).as_nanos() as f64;
            let ticks = t1.wrapping_sub(t0) as f64;
            if ticks <= 0.0 || ns <= 0.0 {
                return Clock {
                    tsc: false,
                    mult: 1 << 32,
                };
            }
            Clock {
                tsc: true,
                mult: (ns / ticks * 4_294_967_296.0) as u64,
            }
        })
    }

    /// Now, in ticks (monotonic on this thread's core).
    #[inline]
    pub(crate) fn ticks(&self) -> u64 {
        if self.tsc {
            rdtsc()
        } else {
            instant_ns()
        }
    }

    /// Nanoseconds in `ticks` ticks.
    #[inline]
    pub(crate) fn ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * self.mult as u128) >> 32) as u64
    }

    /// Nanoseconds since `earlier` (a [`Clock::ticks`] value).
    #[inline]
    pub(crate) fn ns_since(&self, earlier: u64) -> u64 {
        self.ns(self.ticks().saturating_sub(earlier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_sleep_within_a_few_percent() {
        let c = Clock::get();
        let t = c.ticks();
        let i = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let ns = c.ns_since(t) as f64;
        let want = i.elapsed().as_nanos() as f64;
        assert!((ns - want).abs() / want < 0.05, "clock says {ns} ns, Instant {want} ns");
    }

    #[test]
    fn ticks_do_not_go_backwards() {
        let c = Clock::get();
        let mut last = c.ticks();
        for _ in 0..10_000 {
            let t = c.ticks();
            assert!(t >= last);
            last = t;
        }
    }
}
