//! Fault injection at the three points where the pool's metadata thread makes
//! things durable (the write of a batch's staged clusters, the pool device's
//! fdatasync and the catalog commit), and at two points of the RBD store (a volume
//! made in Ceph before its catalog commit, the flatten of a deleted snapshot's clone).
//!
//! Tests (and `serve` with `SEALDISK_FAULTS`, for crash harnesses that need
//! wider race windows) can fail the N-th call from now, delay every call, or
//! hold calls until released, and count them. With no faults set a check is
//! one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The metadata thread's fdatasync of the pool device, before a commit.
    PoolSync,
    /// The metadata thread's catalog commit (the volume map change).
    Commit,
    /// The metadata thread's write of a batch's staged (new or copied) clusters.
    StagedWrite,
    /// The RBD store, after it made a volume in Ceph and before the caller's catalog
    /// transaction commits (`rbd_created`): a failure there aborts that transaction.
    RbdCreated,
    /// The RBD reaper, before it flattens a clone of a deleted snapshot (`rbd_flatten`).
    RbdFlatten,
}

#[derive(Default)]
struct Point {
    calls: AtomicU64,
    /// Call number (1-based) that fails; 0 = none.
    fail_at: AtomicU64,
    delay_us: AtomicU64,
    hold: Mutex<Hold>,
    cv: Condvar,
}

#[derive(Default)]
struct Hold {
    armed: bool,
    waiting: u64,
}

/// Injected faults for one pool.
#[derive(Default)]
pub struct Faults {
    any: AtomicBool,
    points: [Point; 5],
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("pool_sync_calls", &self.calls(FaultPoint::PoolSync))
            .field("commit_calls", &self.calls(FaultPoint::Commit))
            .field("rbd_created_calls", &self.calls(FaultPoint::RbdCreated))
            .field("rbd_flatten_calls", &self.calls(FaultPoint::RbdFlatten))
            .finish()
    }
}

/// A fault spec item that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault {0:?}: expected POINT:delay=Nms or POINT:fail=N, POINT commit, pool_sync, staged_write, rbd_created or rbd_flatten")]
pub struct FaultSpecError(pub String);

impl Faults {
    fn point(&self, p: FaultPoint) -> &Point {
        &self.points[p as usize]
    }

    /// The `n`-th call from now (1 = the next) fails with EIO.
    pub fn fail_nth(&self, p: FaultPoint, n: u64) {
        let pt = self.point(p);
        pt.fail_at.store(pt.calls.load(SeqCst) + n.max(1), SeqCst);
        self.any.store(true, SeqCst);
    }

    /// Every call sleeps `d` first.
    pub fn delay(&self, p: FaultPoint, d: Duration) {
        self.point(p).delay_us.store(d.as_micros() as u64, SeqCst);
        self.any.store(true, SeqCst);
    }

    /// Calls block until [`Faults::release`].
    pub fn hold(&self, p: FaultPoint) {
        self.point(p).hold.lock().expect("fault hold").armed = true;
        self.any.store(true, SeqCst);
    }

    /// Lets held calls (and later ones) go on.
    pub fn release(&self, p: FaultPoint) {
        let pt = self.point(p);
        pt.hold.lock().expect("fault hold").armed = false;
        pt.cv.notify_all();
    }

    /// Waits until a call is blocked in a hold; `false` on timeout.
    pub fn wait_held(&self, p: FaultPoint, timeout: Duration) -> bool {
        let t = Instant::now();
        while self.point(p).hold.lock().expect("fault hold").waiting == 0 {
            if t.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Calls made at `p` so far.
    pub fn calls(&self, p: FaultPoint) -> u64 {
        self.point(p).calls.load(SeqCst)
    }

    /// Faults from a spec such as `commit:delay=5ms,pool_sync:fail=3`
    /// (point `commit`, `pool_sync`, `staged_write`, `rbd_created` or `rbd_flatten`;
    /// `delay=Nms`, `fail=N` for the N-th call).
    pub fn parse(spec: &str) -> Result<Faults, FaultSpecError> {
        let f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || FaultSpecError(item.to_owned());
            let (point, action) = item.split_once(':').ok_or_else(bad)?;
            let p = match point {
                "commit" => FaultPoint::Commit,
                "pool_sync" => FaultPoint::PoolSync,
                "staged_write" => FaultPoint::StagedWrite,
                "rbd_created" => FaultPoint::RbdCreated,
                "rbd_flatten" => FaultPoint::RbdFlatten,
                _ => return Err(bad()),
            };
            let (k, v) = action.split_once('=').ok_or_else(bad)?;
            match k {
                "delay" => {
                    let ms: u64 = v.strip_suffix("ms").and_then(|n| n.parse().ok()).ok_or_else(bad)?;
                    f.delay(p, Duration::from_millis(ms));
                }
                "fail" => f.fail_nth(p, v.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(f)
    }

    /// Called by the metadata thread at `p`.
    pub(crate) fn at(&self, p: FaultPoint) -> std::io::Result<()> {
        if !self.any.load(Relaxed) {
            return Ok(());
        }
        let pt = self.point(p);
        let n = pt.calls.fetch_add(1, SeqCst) + 1;
        {
            let mut h = pt.hold.lock().expect("fault hold");
            if h.armed {
                h.waiting += 1;
                while h.armed {
                    h = pt.cv.wait(h).expect("fault hold");
                }
                h.waiting -= 1;
            }
        }
        let d = pt.delay_us.load(SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        if pt.fail_at.load(SeqCst) == n {
            return Err(std::io::Error::other(format!("injected fault at {p:?} call {n}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_nth_fails_exactly_that_call() {
        let f = Faults::default();
        f.fail_nth(FaultPoint::Commit, 2);
        assert!(f.at(FaultPoint::Commit).is_ok());
        assert!(f.at(FaultPoint::Commit).is_err());
        assert!(f.at(FaultPoint::Commit).is_ok());
        assert!(f.at(FaultPoint::PoolSync).is_ok());
        assert_eq!(f.calls(FaultPoint::Commit), 3);
    }

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let f = Faults::parse(
            "commit:delay=1ms, pool_sync:fail=1, staged_write:fail=2, rbd_created:fail=2, rbd_flatten:delay=1ms",
        )
        .unwrap();
        assert!(f.at(FaultPoint::PoolSync).is_err());
        assert!(f.at(FaultPoint::Commit).is_ok());
        assert!(f.at(FaultPoint::StagedWrite).is_ok());
        assert!(f.at(FaultPoint::StagedWrite).is_err(), "the second staged write fails");
        assert!(f.at(FaultPoint::RbdCreated).is_ok());
        assert!(f.at(FaultPoint::RbdCreated).is_err());
        assert!(f.at(FaultPoint::RbdFlatten).is_ok());
        for bad in [
            "commit",
            "disk:fail=1",
            "commit:fail=x",
            "commit:delay=5",
            "commit:boom=1",
            "rbd:fail=1",
        ] {
            assert!(Faults::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn held_calls_wait_for_release() {
        let f = std::sync::Arc::new(Faults::default());
        f.hold(FaultPoint::Commit);
        let g = f.clone();
        let t = std::thread::spawn(move || g.at(FaultPoint::Commit));
        assert!(f.wait_held(FaultPoint::Commit, Duration::from_secs(5)));
        f.release(FaultPoint::Commit);
        assert!(t.join().unwrap().is_ok());
    }
}
