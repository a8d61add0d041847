//! KMS API quota: one token bucket per (account, region).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::KmsError;

/// A monotonic clock for the quota; injectable so tests need not sleep.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since an arbitrary, fixed origin; never goes backwards.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug)]
pub(crate) struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub(crate) fn new() -> SystemClock {
        SystemClock { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to (tests, simulations).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// Quota settings, the same for every (account, region).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuotaConfig {
    /// Sustained rate: KMS calls per second added back to each bucket. Default 100.
    pub rate_per_sec: f64,
    /// Bucket size: calls that may be made at once after an idle period. Default 200.
    pub burst: u32,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            rate_per_sec: 100.0,
            burst: 200,
        }
    }
}

impl QuotaConfig {
    pub(crate) fn validate(&self) -> Result<(), KmsError> {
        if !(self.rate_per_sec.is_finite() && self.rate_per_sec >= 0.0) || self.burst == 0 {
            return Err(KmsError::Config {
                detail: format!(
                    "quota rate_per_sec must be a finite number >= 0 and burst >= 1 (got {} and {})",
                    self.rate_per_sec, self.burst
                ),
            });
        }
        Ok(())
    }
}

/// KMS usage of one region of an account, since this process opened the KMS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionUsage {
    /// Region id.
    pub region: String,
    /// KMS calls granted (each metered call counts once, reserved or not).
    pub calls: u64,
    /// Calls and reservations refused with `Throttling.KmsQuota`.
    pub throttled: u64,
    /// Whole calls available right now.
    pub available: u32,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Duration,
    calls: u64,
    throttled: u64,
}

/// All buckets, shared by the `Kms` and its outstanding reservations.
#[derive(Debug)]
pub(crate) struct QuotaTable {
    cfg: QuotaConfig,
    clock: Arc<dyn Clock>,
    buckets: Mutex<BTreeMap<(String, String), Bucket>>,
}

impl QuotaTable {
    pub(crate) fn new(cfg: QuotaConfig, clock: Arc<dyn Clock>) -> QuotaTable {
        QuotaTable {
            cfg,
            clock,
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    fn with_bucket<T>(&self, account: &str, region: &str, f: impl FnOnce(&mut Bucket, &QuotaConfig) -> T) -> T {
        let now = self.clock.now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map
            .entry((account.to_owned(), region.to_owned()))
            .or_insert_with(|| Bucket {
                tokens: f64::from(self.cfg.burst),
                last: now,
                calls: 0,
                throttled: 0,
            });
        let dt = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.cfg.rate_per_sec).min(f64::from(self.cfg.burst));
        b.last = now;
        f(b, &self.cfg)
    }

    /// Takes `n` tokens at once or none. `count_calls`: also count them as calls (a
    /// direct call), else they are a reservation (counted when used).
    pub(crate) fn take(&self, account: &str, region: &str, n: u32, count_calls: bool) -> Result<(), KmsError> {
        self.with_bucket(account, region, |b, cfg| {
            let need = f64::from(n);
            // A tiny epsilon absorbs floating-point dust from refills.
            if b.tokens + 1e-9 >= need {
                b.tokens = (b.tokens - need).max(0.0);
                if count_calls {
                    b.calls += u64::from(n);
                }
                return Ok(());
            }
            b.throttled += 1;
            let retry_after = if n > cfg.burst || cfg.rate_per_sec <= 0.0 {
                None
            } else {
                let secs = (need - b.tokens) / cfg.rate_per_sec;
                Some(Duration::from_secs_f64(secs).max(Duration::from_millis(1)))
            };
            Err(KmsError::Throttled {
                account: account.to_owned(),
                region: region.to_owned(),
                needed: n,
                retry_after,
            })
        })
    }

    fn count_call(&self, account: &str, region: &str) {
        self.with_bucket(account, region, |b, _| b.calls += 1);
    }

    fn refund(&self, account: &str, region: &str, n: u32) {
        if n > 0 {
            self.with_bucket(account, region, |b, cfg| {
                b.tokens = (b.tokens + f64::from(n)).min(f64::from(cfg.burst));
            });
        }
    }

    pub(crate) fn usage(&self, account: &str) -> Vec<RegionUsage> {
        let regions: Vec<String> = {
            let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            map.keys()
                .filter(|(a, _)| a == account)
                .map(|(_, r)| r.clone())
                .collect()
        };
        regions
            .into_iter()
            .map(|region| {
                self.with_bucket(account, &region, |b, _| RegionUsage {
                    region: region.clone(),
                    calls: b.calls,
                    throttled: b.throttled,
                    available: (b.tokens + 1e-9).floor() as u32,
                })
            })
            .collect()
    }
}

/// Quota for `n` KMS calls of one (account, region), taken up front.
///
/// Pass it in [`CallOpts::reservation`](super::CallOpts) to the calls of the operation;
/// each call then uses one reserved unit instead of the bucket (once the reservation is
/// used up, further calls meter the bucket as usual). Units still unused when the
/// reservation drops go back to the bucket.
#[derive(Debug)]
pub struct Reservation {
    table: Arc<QuotaTable>,
    account: String,
    region: String,
    remaining: AtomicU32,
}

impl Reservation {
    pub(crate) fn new(table: Arc<QuotaTable>, account: &str, region: &str, n: u32) -> Reservation {
        Reservation {
            table,
            account: account.to_owned(),
            region: region.to_owned(),
            remaining: AtomicU32::new(n),
        }
    }

    /// Reserved calls not used yet.
    pub fn remaining(&self) -> u32 {
        self.remaining.load(Ordering::SeqCst)
    }

    /// Account the reservation is for.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// Region the reservation is for.
    pub fn region(&self) -> &str {
        &self.region
    }

    pub(crate) fn same_table(&self, table: &Arc<QuotaTable>) -> bool {
        Arc::ptr_eq(&self.table, table)
    }

    /// Uses one unit; `false` if none is left.
    pub(crate) fn use_one(&self) -> bool {
        let ok = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
            .is_ok();
        if ok {
            self.table.count_call(&self.account, &self.region);
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let left = self.remaining.swap(0, Ordering::SeqCst);
        self.table.refund(&self.account, &self.region, left);
    }
}
