//! Per-disk monitoring data over time, served as `DescribeDiskMonitorData` (ECS's name).
//!
//! A sampler thread of the control plane ([`Control::start_sampler`]) wakes at every
//! whole second of the wall clock ([`BASE_PERIOD`]), reads each attached disk's
//! statistics ([`DiskStats::snapshot`]: relaxed loads of the shards its reactors
//! write, nothing the data path waits for) and appends what changed since its last
//! sample to the disk's ring: operations, bytes, errors and summed latency per
//! direction, the non-empty buckets of the read/write/flush/discard latency
//! histograms, QoS holds and held time, copy-on-writes and first writes. A sample
//! taken at second `S` covers `[S-1, S)` and is stamped `S-1`; a sampler that wakes
//! late folds the missed seconds into its next sample; if the wall clock steps back,
//! the rings are emptied (their times no longer mean anything).
//!
//! The rings keep [`WINDOW`] seconds (one hour). An idle second costs 16 bytes; a
//! busy one ~200 bytes plus 8 per non-empty histogram bucket, so a disk busy for the
//! whole hour holds about 1-2 MiB. A detached disk's ring stays until its newest
//! sample leaves the window; re-attaching starts new counters and the ring goes on.
//!
//! A query merges the samples of each `Period` (a multiple of the base period) into
//! one datapoint: rates divide by the seconds that have a sample (the disk was
//! attached), means divide summed latency by operations, and p99s come from the
//! merged histograms (`hdrhistogram`). Periods without any sample (disk detached, or
//! in the future) have no datapoint.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::util::{parse_rfc3339, rfc3339};
use super::{Control, ControlError, Params};
use crate::bdev::iostat::hist::Hist;
use crate::bdev::iostat::{Dir, DiskStats, IoStats};
use crate::bdev::LayerCounters;
use crate::catalog::{self, DiskRecord};
use crate::export::Exports;

/// Seconds each sample covers: every `Period` is a multiple of it.
pub(crate) const BASE_PERIOD: u64 = 1;
/// Seconds of samples kept per disk.
pub(crate) const WINDOW: u64 = 3600;
/// Most datapoints one query may ask for (ECS: `InvalidParameter.TooManyDataQueried`).
pub(crate) const MAX_DATAPOINTS: u64 = 400;
/// `Period` when none is given (ECS's default).
pub(crate) const DEFAULT_PERIOD: u64 = 60;

/// One direction in one sample.
#[derive(Default)]
struct DirSample {
    ops: u64,
    bytes: u64,
    errors: u64,
    lat_ns: u64,
    /// Non-empty latency buckets: (bucket, count).
    hist: Box<[(u16, u32)]>,
}

struct SampleData {
    dirs: [DirSample; 4],
    layers: LayerCounters,
}

/// What happened in one base period; `None`: nothing at all.
struct Sample {
    t: u64,
    data: Option<Box<SampleData>>,
}

impl Sample {
    fn new(t: u64, d: &IoStats) -> Sample {
        let idle = d.dirs.iter().all(|x| x.ops == 0 && x.errors == 0) && d.layers == LayerCounters::default();
        if idle {
            return Sample { t, data: None };
        }
        let dirs = std::array::from_fn(|i| {
            let x = &d.dirs[i];
            DirSample {
                ops: x.ops,
                bytes: x.bytes,
                errors: x.errors,
                lat_ns: x.lat_ns,
                hist: x
                    .hist
                    .buckets()
                    .map(|(b, c)| (b as u16, c.min(u32::MAX as u64) as u32))
                    .collect(),
            }
        });
        Sample {
            t,
            data: Some(Box::new(SampleData { dirs, layers: d.layers })),
        }
    }
}

#[derive(Default)]
struct Ring {
    /// The statistics sampled last (while the disk is attached) and their values.
    source: Option<(Arc<DiskStats>, IoStats)>,
    samples: VecDeque<Sample>,
}

#[derive(Default)]
struct State {
    disks: HashMap<String, Ring>,
    /// The second of the last sample taken.
    last: Option<u64>,
}

/// The rings of every disk (control plane only).
#[derive(Default)]
pub struct Monitor {
    state: Mutex<State>,
}

/// Sums of one datapoint.
#[derive(Default)]
struct Agg {
    secs: u64,
    ops: [u64; 4],
    bytes: [u64; 4],
    errors: [u64; 4],
    lat_ns: [u64; 4],
    hist: [Hist; 2],
    layers: LayerCounters,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Monitor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the sample of the base period that ends at second `now` from
    /// `disks` (id, statistics), the disks attached now.
    pub fn sample(&self, now: u64, disks: Vec<(String, Arc<DiskStats>)>) {
        // Read the shards before taking the lock (it is the query's too).
        let snaps: Vec<(String, Arc<DiskStats>, IoStats)> =
            disks.into_iter().map(|(id, s)| (id, s.clone(), s.snapshot())).collect();
        let mut st = self.state();
        let last = st.last;
        match last {
            Some(l) if now == l => return,
            Some(l) if now < l => {
                for r in st.disks.values_mut() {
                    r.samples.clear();
                }
            }
            _ => {}
        }
        st.last = Some(now);
        let t = now.saturating_sub(BASE_PERIOD);
        let mut seen = std::collections::HashSet::new();
        for (id, stats, snap) in snaps {
            let ring = st.disks.entry(id.clone()).or_default();
            let delta = match &ring.source {
                Some((s, last)) if Arc::ptr_eq(s, &stats) => snap.since(last),
                // Newly attached: everything since the attach.
                _ => snap.clone(),
            };
            ring.samples.push_back(Sample::new(t, &delta));
            ring.source = Some((stats, snap));
            seen.insert(id);
        }
        let oldest = now.saturating_sub(WINDOW);
        st.disks.retain(|id, r| {
            if !seen.contains(id) {
                r.source = None;
            }
            while r.samples.front().is_some_and(|s| s.t < oldest) {
                r.samples.pop_front();
            }
            r.source.is_some() || !r.samples.is_empty()
        });
    }

    /// Datapoints of `disk` for the periods `[start + k*period, ...)` before `end`
    /// that have samples.
    pub fn datapoints(&self, disk: &str, start: u64, end: u64, period: u64) -> Vec<Value> {
        let st = self.state();
        let Some(ring) = st.disks.get(disk) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut lo = start;
        while lo < end {
            let hi = (lo + period).min(end);
            let a = ring.samples.partition_point(|s| s.t < lo);
            let b = ring.samples.partition_point(|s| s.t < hi);
            if a < b {
                let mut g = Agg::default();
                for s in ring.samples.range(a..b) {
                    g.secs += BASE_PERIOD;
                    let Some(d) = &s.data else { continue };
                    for (i, x) in d.dirs.iter().enumerate() {
                        g.ops[i] += x.ops;
                        g.bytes[i] += x.bytes;
                        g.errors[i] += x.errors;
                        g.lat_ns[i] += x.lat_ns;
                        if i < 2 {
                            g.hist[i].add_buckets(x.hist.iter().map(|&(b, c)| (b as usize, c as u64)));
                        }
                    }
                    g.layers.add(&d.layers);
                }
                out.push(datapoint(disk, lo, &g));
            }
            lo = hi;
        }
        out
    }

    /// Seconds of samples `disk` has (tests, the CLI).
    pub fn samples(&self, disk: &str) -> usize {
        self.state().disks.get(disk).map_or(0, |r| r.samples.len())
    }
}

fn datapoint(disk: &str, t: u64, g: &Agg) -> Value {
    let secs = g.secs.max(1) as f64;
    let rate = |x: u64| round3(x as f64 / secs);
    let (r, w, f, d) = (
        Dir::Read as usize,
        Dir::Write as usize,
        Dir::Flush as usize,
        Dir::Discard as usize,
    );
    let mean_us = |i: usize| {
        if g.ops[i] == 0 {
            0.0
        } else {
            round3(g.lat_ns[i] as f64 / g.ops[i] as f64 / 1e3)
        }
    };
    let p99_us = |i: usize| round3(g.hist[i].quantile(0.99) as f64 / 1e3);
    json!({
        "DiskId": disk,
        "TimeStamp": rfc3339(t),
        "IOPSRead": rate(g.ops[r]),
        "IOPSWrite": rate(g.ops[w]),
        "IOPSTotal": rate(g.ops[r] + g.ops[w]),
        "BPSRead": rate(g.bytes[r]),
        "BPSWrite": rate(g.bytes[w]),
        "BPSTotal": rate(g.bytes[r] + g.bytes[w]),
        "LatencyRead": mean_us(r),
        "LatencyWrite": mean_us(w),
        "LatencyReadP99": p99_us(r),
        "LatencyWriteP99": p99_us(w),
        "IOPSFlush": rate(g.ops[f]),
        "IOPSDiscard": rate(g.ops[d]),
        "BPSDiscard": rate(g.bytes[d]),
        "OpsRead": g.ops[r],
        "OpsWrite": g.ops[w],
        "BytesRead": g.bytes[r],
        "BytesWrite": g.bytes[w],
        "ErrorsRead": g.errors[r],
        "ErrorsWrite": g.errors[w],
        "Errors": g.errors.iter().sum::<u64>(),
        "QosHolds": g.layers.qos_holds,
        "QosHeldMs": round3(g.layers.qos_held_ns as f64 / 1e6),
        "CowCopies": g.layers.cow_copies,
        "ClusterAllocations": g.layers.cluster_allocs,
        "Seconds": g.secs,
    })
}

/// Seconds since the epoch, now.
fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The running sampler thread; stops and joins on drop.
pub struct Sampler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        let (m, c) = &*self.stop;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The attached disks with statistics.
fn attached(exports: &Exports) -> Vec<(String, Arc<DiskStats>)> {
    exports
        .names()
        .into_iter()
        .filter_map(|n| exports.get(&n).and_then(|e| e.stats.map(|s| (n, s))))
        .collect()
}

/// Starts the thread that samples every attached disk of `exports` into `monitor`
/// each base period, on whole seconds of the wall clock.
pub(crate) fn start_sampler(monitor: Arc<Monitor>, exports: Arc<Exports>) -> std::io::Result<Sampler> {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("stats-sampler".into())
        .spawn(move || {
            let (m, c) = &*s2;
            let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let now = unix_now();
                let base = Duration::from_secs(BASE_PERIOD);
                let into = Duration::from_nanos((now.as_nanos() % base.as_nanos()) as u64);
                // Just after the next boundary.
                let wait = base - into + Duration::from_millis(5);
                stopped = c.wait_timeout(stopped, wait).unwrap_or_else(|p| p.into_inner()).0;
                if *stopped {
                    return;
                }
                let sec = unix_now().as_secs() / BASE_PERIOD * BASE_PERIOD;
                drop(stopped);
                monitor.sample(sec, attached(&exports));
                stopped = m.lock().unwrap_or_else(|p| p.into_inner());
            }
        })?;
    Ok(Sampler {
        stop,
        thread: Some(thread),
    })
}

/// `Period`, `StartTime` and `EndTime` of a query, checked: (start, end, period).
pub(crate) fn check_query(
    start: &str,
    end: &str,
    period: Option<u64>,
    now: u64,
) -> Result<(u64, u64, u64), ControlError> {
    let s = parse_rfc3339(start)
        .map_err(|e| ControlError::param("InvalidStartTime.Malformed", format!("StartTime: {e}")))?;
    let e = parse_rfc3339(end).map_err(|e| ControlError::param("InvalidEndTime.Malformed", format!("EndTime: {e}")))?;
    check_range(s, e, period, now, BASE_PERIOD)
}

/// The checks of a query in seconds, with base period `base`.
pub(crate) fn check_range(
    s: u64,
    e: u64,
    period: Option<u64>,
    now: u64,
    base: u64,
) -> Result<(u64, u64, u64), ControlError> {
    if e < s {
        return Err(ControlError::param(
            "InvalidEndTime.BeforeStartTime",
            format!(
                "EndTime {} is before StartTime {}; give a range that ends after it starts",
                rfc3339(e),
                rfc3339(s)
            ),
        ));
    }
    let p = period.unwrap_or(DEFAULT_PERIOD);
    if p == 0 || !p.is_multiple_of(base) {
        return Err(ControlError::param(
            "InvalidPeriod.ValueNotSupported",
            format!("Period {p} is not a positive multiple of the base period ({base} s); e.g. 60, 600 or 3600"),
        ));
    }
    let n = (e - s).div_ceil(p);
    if n > MAX_DATAPOINTS {
        return Err(ControlError::param(
            "InvalidParameter.TooManyDataQueried",
            format!(
                "(EndTime - StartTime) / Period is {n} datapoints, more than {MAX_DATAPOINTS}; \
                 shorten the range or give a longer Period"
            ),
        ));
    }
    let oldest = now.saturating_sub(WINDOW);
    if s < oldest {
        return Err(ControlError::param(
            "InvalidStartTime.ValueNotSupported",
            format!(
                "StartTime {} is before {}: monitoring data is kept for the last {WINDOW} s only",
                rfc3339(s),
                rfc3339(oldest)
            ),
        ));
    }
    Ok((s, e, p))
}

impl Control {
    /// Starts the sampler thread (the daemon does; without it there is no data).
    pub fn start_sampler(&self) -> std::io::Result<Sampler> {
        start_sampler(self.monitor.clone(), self.exports.clone())
    }

    /// The monitoring rings.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    pub(super) fn describe_disk_monitor_data(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let disk_id = p.str("DiskId")?;
        let start = p.str("StartTime")?;
        let end = p.str("EndTime")?;
        let period = p.opt_u64("Period")?;
        p.finish()?;
        let (s, e, per) = check_query(&start, &end, period, unix_now().as_secs())?;
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let d = catalog::get_r::<DiskRecord>(&r, &disk_id)?.ok_or_else(|| ControlError::NotFound {
            code: "InvalidDiskId.NotFound",
            id: disk_id.clone(),
        })?;
        drop(r);
        if d.account != account {
            return Err(ControlError::CrossAccount {
                what: "disk",
                id: disk_id,
            });
        }
        super::same_region(region.as_deref(), &d.region, "InvalidDiskId.NotFound", &disk_id)?;
        let points = self.monitor.datapoints(&disk_id, s, e, per);
        Ok(json!({
            "DiskId": disk_id,
            "Period": per,
            "TotalCount": points.len(),
            "MonitorData": { "DiskMonitorData": points },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::iostat::StatsBdev;
    use crate::bdev::BdevRef;

    fn code(r: Result<(u64, u64, u64), ControlError>) -> String {
        r.expect_err("refused").code().to_owned()
    }

    #[test]
    fn query_checks() {
        let now = 1_800_000_000;
        assert_eq!(check_range(now - 60, now, None, now, 1).unwrap(), (now - 60, now, 60));
        assert_eq!(
            code(check_range(now, now - 1, None, now, 1)),
            "InvalidEndTime.BeforeStartTime"
        );
        assert_eq!(
            code(check_range(now - 60, now, Some(0), now, 1)),
            "InvalidPeriod.ValueNotSupported"
        );
        assert_eq!(
            code(check_range(now - 60, now, Some(7), now, 5)),
            "InvalidPeriod.ValueNotSupported"
        );
        assert!(check_range(now - 60, now, Some(10), now, 5).is_ok());
        assert_eq!(
            code(check_range(now - 401, now, Some(1), now, 1)),
            "InvalidParameter.TooManyDataQueried"
        );
        assert!(check_range(now - 400, now, Some(1), now, 1).is_ok());
        assert_eq!(
            code(check_range(now - WINDOW - 1, now, Some(60), now, 1)),
            "InvalidStartTime.ValueNotSupported"
        );
        assert_eq!(
            code(check_query("2026-11-28 00:00:00", "2026-11-28T00:00:00Z", None, now)),
            "InvalidStartTime.Malformed"
        );
        assert_eq!(
            code(check_query("2026-11-28T00:00:00Z", "yesterday", None, now)),
            "InvalidEndTime.Malformed"
        );
    }

    fn stats() -> (BdevRef, Arc<DiskStats>) {
        let b = StatsBdev::new(Arc::new(crate::bdev::null::NullBdev::new("n", 1 << 30, 512)));
        let s = b.stats().clone();
        (Arc::new(b), s)
    }

    #[test]
    fn rings_sample_merge_and_age_out() {
        let m = Monitor::default();
        let (_b, s) = stats();
        let t0 = 1_800_000_000;
        m.sample(t0, vec![("d-1".into(), s.clone())]);
        m.sample(t0 + 1, vec![("d-1".into(), s.clone())]);
        m.sample(t0 + 1, vec![("d-1".into(), s.clone())]); // same second: ignored
        assert_eq!(m.samples("d-1"), 2);
        let p = m.datapoints("d-1", t0 - 1, t0 + 1, 60);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0]["Seconds"], 2);
        assert_eq!(p[0]["OpsRead"], 0);
        // Detached: no new samples, the old ones age out.
        m.sample(t0 + 2, vec![]);
        assert_eq!(m.samples("d-1"), 2);
        m.sample(t0 + WINDOW + 5, vec![]);
        assert_eq!(m.samples("d-1"), 0);
        assert!(m.datapoints("d-1", t0, t0 + 10, 1).is_empty());
        assert!(m.datapoints("d-unknown", t0, t0 + 10, 1).is_empty());
    }
}
