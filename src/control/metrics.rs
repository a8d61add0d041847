//! Metrics in the Prometheus text exposition format (version 0.0.4), the format host
//! monitoring scrapes; served by [`super::metrics_http`] on `serve --metrics ADDR`.
//!
//! A [`Registry`] holds *sources*: functions that append metric [`Family`]s when a
//! scrape comes. The daemon registers the per-disk statistics ([`disk_families`]) and
//! the reactors' counters ([`reactor_families`]); other parts of the daemon add their
//! own with [`Registry::add_source`] (the hook for the metadata-thread and KMS counters).
//! Sources run on the metrics thread and only read counters: nothing here is on the data
//! path or holds a lock the data path needs.

use std::fmt::Write as _;
use std::sync::RwLock;

use super::reactors::SlowPathSnapshot;
use crate::bdev::iostat::{Dir, IoStats};
use crate::counters::HistogramSnapshot;
use crate::export::Exports;
use crate::reactor::Reactors;

/// The metric types of the exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One line: the family's name plus `suffix` (`_bucket`, `_sum`, `_count` for
/// histograms and summaries, else empty), labels and value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub suffix: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A metric family: `# HELP`, `# TYPE` and its samples. Counter names end in `_total`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Family {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    pub(crate) fn new(name: &str, kind: Kind, help: &str) -> Family {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        Family {
            name: name.into(),
            help: help.into(),
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with `labels`.
    pub(crate) fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        self.push_suffix("", labels, value);
    }

    pub(crate) fn push_suffix(&mut self, suffix: &'static str, labels: &[(&str, &str)], value: f64) {
        self.samples.push(Sample {
            suffix,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            value,
        });
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub(crate) fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn escape_label(v: &str, out: &mut String) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str, out: &mut String) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// The exposition text of `families`; families of the same name are merged (one
/// `# HELP`/`# TYPE`, the first one's).
pub(crate) fn render(families: &[Family]) -> String {
    let mut order: Vec<&str> = Vec::new();
    for f in families {
        if !order.contains(&f.name.as_str()) {
            order.push(&f.name);
        }
    }
    let mut out = String::new();
    for name in order {
        let mut same = families.iter().filter(|f| f.name == name);
        let first = same.next().expect("a family of this name");
        let _ = write!(out, "# HELP {name} ");
        escape_help(&first.help, &mut out);
        let _ = writeln!(out, "\n# TYPE {name} {}", first.kind.name());
        for s in std::iter::once(first).chain(same).flat_map(|f| &f.samples) {
            out.push_str(name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push_str("=\"");
                    escape_label(v, &mut out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            value(s.value, &mut out);
            out.push('\n');
        }
    }
    out
}

/// Something that adds metric families to a scrape.
pub(crate) type Source = Box<dyn Fn(&mut Vec<Family>) + Send + Sync>;

/// The sources of the metrics endpoint.
#[derive(Default)]
pub(crate) struct Registry {
    sources: RwLock<Vec<Source>>,
}

impl Registry {
    /// Adds a source: `f` appends its families on every scrape. This is the hook for
    /// counters kept elsewhere in the daemon (the metadata thread's, the KMS's).
    pub(crate) fn add_source(&self, f: impl Fn(&mut Vec<Family>) + Send + Sync + 'static) {
        self.sources
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// Every source's families, in the order the sources were added.
    pub(crate) fn gather(&self) -> Vec<Family> {
        let mut v = Vec::new();
        for s in self.sources.read().unwrap_or_else(|p| p.into_inner()).iter() {
            s(&mut v);
        }
        v
    }

    /// The exposition text of a scrape.
    pub(crate) fn render(&self) -> String {
        render(&self.gather())
    }
}

/// Upper bounds (seconds) of the latency histogram buckets on the endpoint.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per-disk families from the statistics of every attached disk (label `disk`, and
/// `op` = read, write, flush, discard).
pub(crate) fn disk_families(exports: &Exports, out: &mut Vec<Family>) {
    let disks: Vec<(String, IoStats)> = exports
        .names()
        .into_iter()
        .filter_map(|n| {
            let s = exports.get(&n)?.stats?;
            Some((n, s.snapshot()))
        })
        .collect();
    let mut ops = Family::new(
        "sealdisk_disk_ops_total",
        Kind::Counter,
        "I/O requests completed without error, by disk and direction (discard: unmap and write-zeroes)",
    );
    let mut bytes = Family::new(
        "sealdisk_disk_bytes_total",
        Kind::Counter,
        "Bytes of completed requests",
    );
    let mut errors = Family::new(
        "sealdisk_disk_errors_total",
        Kind::Counter,
        "I/O requests completed with an error",
    );
    let mut lat = Family::new(
        "sealdisk_disk_latency_seconds",
        Kind::Histogram,
        "Latency of completed requests as the frontend sees them (QoS holds, encryption, copy-on-write and device included)",
    );
    let mut holds = Family::new(
        "sealdisk_disk_qos_holds_total",
        Kind::Counter,
        "Requests the QoS limiter held back",
    );
    let mut held = Family::new(
        "sealdisk_disk_qos_held_seconds_total",
        Kind::Counter,
        "Time requests waited in the QoS limiter",
    );
    let mut cow = Family::new(
        "sealdisk_disk_cow_copies_total",
        Kind::Counter,
        "Clusters copied because a write hit a cluster shared with a snapshot (copy-on-write)",
    );
    let mut alloc = Family::new(
        "sealdisk_disk_cluster_allocations_total",
        Kind::Counter,
        "Clusters allocated by a first write",
    );
    let mut attached = Family::new("sealdisk_disks_attached", Kind::Gauge, "Disks on the data path");
    attached.push(&[], disks.len() as f64);
    for (id, s) in &disks {
        for d in Dir::ALL {
            let x = s.dir(d);
            let l = [("disk", id.as_str()), ("op", d.name())];
            ops.push(&l, x.ops as f64);
            bytes.push(&l, x.bytes as f64);
            errors.push(&l, x.errors as f64);
            for &le in LATENCY_BUCKETS {
                let le_s = format!("{le}");
                lat.push_suffix(
                    "_bucket",
                    &[("disk", id.as_str()), ("op", d.name()), ("le", le_s.as_str())],
                    x.hist.count_le((le * 1e9).round() as u64) as f64,
                );
            }
            lat.push_suffix(
                "_bucket",
                &[("disk", id.as_str()), ("op", d.name()), ("le", "+Inf")],
                x.hist.count() as f64,
            );
            lat.push_suffix("_sum", &l, x.lat_ns as f64 / 1e9);
            lat.push_suffix("_count", &l, x.hist.count() as f64);
        }
        let l = [("disk", id.as_str())];
        holds.push(&l, s.layers.qos_holds as f64);
        held.push(&l, s.layers.qos_held_ns as f64 / 1e9);
        cow.push(&l, s.layers.cow_copies as f64);
        alloc.push(&l, s.layers.cluster_allocs as f64);
    }
    out.extend([attached, ops, bytes, errors, lat, holds, held, cow, alloc]);
}

/// The reactors' counters (`src/reactor/stats.rs`), labelled `reactor` and `core`.
pub(crate) fn reactor_families(reactors: &Reactors, out: &mut Vec<Family>) {
    let mut busy = Family::new(
        "sealdisk_reactor_busy_seconds_total",
        Kind::Counter,
        "Time each reactor spent in loop iterations that found work",
    );
    let mut idle = Family::new(
        "sealdisk_reactor_idle_seconds_total",
        Kind::Counter,
        "Time each reactor spent parked or in iterations that found no work (spinning)",
    );
    let mut ios = Family::new(
        "sealdisk_reactor_ios_total",
        Kind::Counter,
        "I/Os each reactor served, from every source (vhost-user, NBD, bench, copy jobs)",
    );
    let mut bytes = Family::new("sealdisk_reactor_bytes_total", Kind::Counter, "Bytes of those I/Os");
    let mut full = Family::new(
        "sealdisk_reactor_queue_full_total",
        Kind::Counter,
        "Messages refused because the reactor's queue was full",
    );
    let mut slow = Family::new(
        "sealdisk_reactor_slow_parks_total",
        Kind::Counter,
        "Parks that lasted the whole park timeout while a poller had pending work",
    );
    let mut polls = Family::new(
        "sealdisk_reactor_polls_total",
        Kind::Counter,
        "Loop iterations of each reactor",
    );
    let mut idle_polls = Family::new(
        "sealdisk_reactor_idle_polls_total",
        Kind::Counter,
        "Loop iterations that found no work",
    );
    let mut parks = Family::new(
        "sealdisk_reactor_parks_total",
        Kind::Counter,
        "Times each reactor slept in its ring",
    );
    let mut src_ios = Family::new(
        "sealdisk_reactor_source_ios_total",
        Kind::Counter,
        "I/Os each reactor served, by source",
    );
    let mut src_bytes = Family::new(
        "sealdisk_reactor_source_bytes_total",
        Kind::Counter,
        "Bytes of those I/Os, by source",
    );
    for (i, s) in reactors.stats().iter().enumerate() {
        let (r, c) = (i.to_string(), reactors.core(i).to_string());
        let l = [("reactor", r.as_str()), ("core", c.as_str())];
        busy.push(&l, s.busy_ns as f64 / 1e9);
        idle.push(&l, s.idle_ns as f64 / 1e9);
        ios.push(&l, s.ios as f64);
        bytes.push(&l, s.bytes as f64);
        full.push(&l, s.queue_full as f64);
        slow.push(&l, s.slow_parks as f64);
        polls.push(&l, s.polls as f64);
        idle_polls.push(&l, s.idle_polls as f64);
        parks.push(&l, s.parks as f64);
        let by = &s.by_source;
        for (name, n) in [
            ("vhost", by.vhost),
            ("nbd", by.nbd),
            ("bench", by.bench),
            ("job", by.job),
        ] {
            let l = [("reactor", r.as_str()), ("core", c.as_str()), ("source", name)];
            src_ios.push(&l, n.ios as f64);
            src_bytes.push(&l, n.bytes as f64);
        }
    }
    out.extend([
        busy, idle, ios, bytes, full, slow, polls, idle_polls, parks, src_ios, src_bytes,
    ]);
}

/// A power-of-two [`HistogramSnapshot`] as a Prometheus histogram, values scaled by
/// `scale` (1e-9 for nanoseconds to seconds).
fn push_histogram(f: &mut Family, labels: &[(&str, &str)], h: &HistogramSnapshot, scale: f64) {
    for &(le, n) in &h.buckets {
        let le = if le == u64::MAX {
            "+Inf".to_string()
        } else {
            format!("{}", le as f64 * scale)
        };
        let mut l = labels.to_vec();
        l.push(("le", &le));
        f.push_suffix("_bucket", &l, n as f64);
    }
    if h.buckets.last().is_none_or(|b| b.0 != u64::MAX) {
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        f.push_suffix("_bucket", &l, h.count as f64);
    }
    f.push_suffix("_sum", labels, h.sum as f64 * scale);
    f.push_suffix("_count", labels, h.count as f64);
}

/// The slow path: the pool's metadata thread (where first writes, copy-on-write and
/// durability happen) and the KMS, per backend.
pub(crate) fn slow_path_families(s: &SlowPathSnapshot, out: &mut Vec<Family>) {
    let m = &s.metadata_thread;
    let mut depth = Family::new(
        "sealdisk_metadata_queue_depth",
        Kind::Gauge,
        "Requests waiting for the pool's metadata thread",
    );
    depth.push(&[], m.queue_depth as f64);
    let mut reqs = Family::new(
        "sealdisk_metadata_requests_total",
        Kind::Counter,
        "Requests the metadata thread handled (first writes, copy-on-write, unmaps)",
    );
    reqs.push(&[], m.requests as f64);
    let mut batch = Family::new(
        "sealdisk_metadata_batch_size",
        Kind::Histogram,
        "Requests made durable by one fdatasync and commit",
    );
    push_histogram(&mut batch, &[], &m.batch_size, 1.0);
    let mut out_h = Vec::new();
    for (name, help, h) in [
        (
            "sealdisk_metadata_writer_wait_seconds",
            "Time the metadata thread waited for the catalog writer",
            &m.writer_wait_ns,
        ),
        (
            "sealdisk_metadata_fdatasync_seconds",
            "fdatasync of the pool before a commit",
            &m.fdatasync_ns,
        ),
        (
            "sealdisk_metadata_commit_seconds",
            "Catalog commit of the volume maps",
            &m.commit_ns,
        ),
        (
            "sealdisk_metadata_batch_seconds",
            "One whole batch, prepare to answer",
            &m.batch_ns,
        ),
    ] {
        let mut f = Family::new(name, Kind::Histogram, help);
        push_histogram(&mut f, &[], h, 1e-9);
        out_h.push(f);
    }
    let mut fails = Family::new(
        "sealdisk_metadata_failures_total",
        Kind::Counter,
        "Batches that failed: while being prepared (e.g. pool full) or making them durable",
    );
    fails.push(&[("stage", "prepare")], m.prepare_failures as f64);
    fails.push(&[("stage", "durability")], m.durability_failures as f64);

    let mut calls = Family::new("sealdisk_kms_calls_total", Kind::Counter, "KMS calls, per backend");
    let mut errors = Family::new("sealdisk_kms_errors_total", Kind::Counter, "KMS calls that failed");
    let mut throttled = Family::new(
        "sealdisk_kms_throttled_total",
        Kind::Counter,
        "KMS calls refused by the account's quota",
    );
    let mut latency = Family::new("sealdisk_kms_call_seconds", Kind::Histogram, "KMS call latency");
    for (backend, b) in [("local", &s.kms.local), ("transit", &s.kms.transit)] {
        let l = [("backend", backend)];
        calls.push(&l, b.calls as f64);
        errors.push(&l, b.errors as f64);
        throttled.push(&l, b.throttled as f64);
        push_histogram(&mut latency, &l, &b.latency_ns, 1e-9);
    }
    out.extend([depth, reqs, batch]);
    out.extend(out_h);
    out.extend([fails, calls, errors, throttled, latency]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_labels_and_merges_families() {
        let mut a = Family::new("x_total", Kind::Counter, "Things\\counted\nhere");
        a.push(&[("disk", "d-\"1\"\n")], 3.0);
        let mut b = Family::new("x_total", Kind::Counter, "ignored");
        b.push(&[], 1.5);
        let mut h = Family::new("lat_seconds", Kind::Histogram, "h");
        h.push_suffix("_bucket", &[("le", "+Inf")], 2.0);
        h.push_suffix("_sum", &[], 0.25);
        h.push_suffix("_count", &[], 2.0);
        let text = render(&[a, h, b]);
        assert_eq!(
            text,
            "# HELP x_total Things\\\\counted\\nhere\n# TYPE x_total counter\n\
             x_total{disk=\"d-\\\"1\\\"\\n\"} 3\nx_total 1.5\n\
             # HELP lat_seconds h\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{le=\"+Inf\"} 2\nlat_seconds_sum 0.25\nlat_seconds_count 2\n"
        );
    }

    #[test]
    fn names_and_values() {
        assert!(valid_name("sealdisk_disk_ops_total"));
        assert!(!valid_name("9x"));
        assert!(!valid_name("a-b"));
        assert!(!valid_name(""));
        let mut s = String::new();
        value(f64::INFINITY, &mut s);
        value(0.000_01, &mut s);
        assert_eq!(s, "+Inf0.00001");
    }

    #[test]
    fn registry_runs_every_source() {
        let r = Registry::default();
        r.add_source(|v| v.push(Family::new("a_total", Kind::Counter, "a")));
        r.add_source(|v| {
            let mut g = Family::new("b", Kind::Gauge, "b");
            g.push(&[], 7.0);
            v.push(g)
        });
        let t = r.render();
        assert!(t.contains("# TYPE a_total counter\n"));
        assert!(t.contains("# TYPE b gauge\nb 7\n"));
    }
}
