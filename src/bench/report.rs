//! Output of `sealdisk bench io`: fio 3.33's JSON layout (so tools that read
//! fio's JSON read ours), fio-like text, and an SVG chart of plain vs
//! encrypted.

use serde_json::{json, Map, Value};

use super::io::{median, GroupResult, IoBenchReport, RoundFigures, RoundPair};
use super::job::DirStats;

const PCTS: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99,
];

fn dir_json(d: &DirStats, runtime_ms: u64) -> Value {
    let secs = (runtime_ms as f64 / 1000.0).max(1e-9);
    let h = &d.clat;
    let mut pct = Map::new();
    for p in PCTS {
        let v = if d.ios == 0 { 0 } else { h.value_at_quantile(p / 100.0) };
        pct.insert(format!("{p:.6}"), json!(v));
    }
    let (min, max, mean, sd) = if d.ios == 0 {
        (0, 0, 0.0, 0.0)
    } else {
        (h.min(), h.max(), h.mean(), h.stdev())
    };
    let stat = |with_pct: bool| {
        let mut m = json!({"min": min, "max": max, "mean": mean, "stddev": sd, "N": d.ios});
        if with_pct && d.ios > 0 {
            m["percentile"] = Value::Object(pct.clone());
        }
        m
    };
    json!({
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes / 1024,
        "bw_bytes": (d.bytes as f64 / secs) as u64,
        "bw": (d.bytes as f64 / secs / 1024.0) as u64,
        "iops": d.ios as f64 / secs,
        "runtime": if d.ios > 0 { runtime_ms } else { 0 },
        "total_ios": d.ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0},
        "clat_ns": stat(true),
        "lat_ns": stat(false),
    })
}

fn job_json(g: &GroupResult) -> Value {
    let ms = g.runtime.as_millis() as u64;
    let s = &g.spec;
    let mut opts = json!({
        "rw": s.rw.name(),
        "bs": s.bs.to_string(),
        "iodepth": s.iodepth.to_string(),
        "numjobs": s.numjobs.to_string(),
        "offset": s.offset.to_string(),
        "time_based": (s.time_based as u8).to_string(),
        "ioengine": "sealdisk",
        "filename": g.target,
    });
    if let Some(sz) = s.size {
        opts["size"] = json!(sz.to_string());
    }
    if let Some(rt) = s.runtime {
        opts["runtime"] = json!(rt.as_secs_f64().to_string());
    }
    if matches!(s.rw, super::fio::Rw::Rw | super::fio::Rw::RandRw) {
        opts["rwmixread"] = json!(s.rwmixread.to_string());
    }
    if s.verify {
        opts["verify"] = json!("crc32c");
    }
    let empty = DirStats::default();
    json!({
        "jobname": g.name,
        "groupid": 0,
        "error": if g.error.is_some() { libc::EIO } else { 0 },
        "error_message": g.error,
        "eta": 0,
        "elapsed": g.runtime.as_secs(),
        "job options": opts,
        "read": dir_json(&g.read, ms),
        "write": dir_json(&g.write, ms),
        "trim": dir_json(&empty, 0),
        "sync": {"total_ios": 0},
        "job_runtime": ms,
        "usr_cpu": g.usr_cpu,
        "sys_cpu": g.sys_cpu,
        "ctx": 0,
        "majf": 0,
        "minf": 0,
        "verify": {"blocks": g.verified_blocks, "errors": g.verify_errors},
        "sealdisk": {
            "target": g.target,
            "reactor_busy_ns": g.reactor.busy_ns,
            "reactor_idle_ns": g.reactor.idle_ns,
            "reactor_busy_ns_per_io": g.busy_ns_per_io(),
        },
    })
}

/// Ratios of the encrypted group to the plain one (with `--compare`).
pub(crate) fn ratios(r: &IoBenchReport) -> Option<Value> {
    let p = r.groups.iter().find(|g| g.name == "plain")?;
    let e = r.groups.iter().find(|g| g.name == "encrypted")?;
    let dir = |pd: &DirStats, ed: &DirStats, pt: f64, et: f64| -> Value {
        if pd.ios == 0 || ed.ios == 0 {
            return Value::Null;
        }
        let q = |d: &DirStats, x: f64| d.clat.value_at_quantile(x) as f64;
        json!({
            "iops": (ed.ios as f64 / et) / (pd.ios as f64 / pt),
            "bw": (ed.bytes as f64 / et) / (pd.bytes as f64 / pt),
            "clat_p50": q(ed, 0.5) / q(pd, 0.5),
            "clat_p99": q(ed, 0.99) / q(pd, 0.99),
            "clat_p99.9": q(ed, 0.999) / q(pd, 0.999),
            "clat_mean": ed.clat.mean() / pd.clat.mean(),
        })
    };
    let (pt, et) = (p.runtime.as_secs_f64().max(1e-9), e.runtime.as_secs_f64().max(1e-9));
    let mut v = json!({
        "read": dir(&p.read, &e.read, pt, et),
        "write": dir(&p.write, &e.write, pt, et),
        "busy_ns_per_io": {"plain": p.busy_ns_per_io(), "encrypted": e.busy_ns_per_io()},
    });
    if let Some(c) = r.cipher_ns_per_io {
        let extra = e.busy_ns_per_io() - p.busy_ns_per_io();
        v["cipher_ns_per_io"] = json!(c);
        if let Some(h) = r.cipher_hot_ns_per_io {
            v["cipher_hot_ns_per_io"] = json!(h);
        }
        v["extra_ns_per_io"] = json!(extra);
        // The stack's overhead beyond the cipher itself: 1.0 = exactly the
        // cipher's cost over the job's working set.
        v["extra_over_cipher"] = json!(extra / c);
        v["kernel"] = json!(r.kernel);
    }
    // Each round's plain and encrypted runs are next to each other in time,
    // so the median of the per-round ratios cancels the host's drift between
    // rounds and ignores a round that a burst of other load hit.
    if r.rounds.len() > 1 {
        let med = |f: &dyn Fn(&RoundPair) -> f64| median(r.rounds.iter().map(f).collect());
        let mut m = json!({
            "rounds": r.rounds.len(),
            "iops": med(&|p| p.encrypted.iops / p.plain.iops.max(1e-9)),
            "clat_p99": med(&|p| p.encrypted.clat_p99_ns / p.plain.clat_p99_ns.max(1.0)),
        });
        if let Some(c) = r.cipher_ns_per_io {
            m["extra_over_cipher"] = json!(med(&|p| (p.encrypted.busy_ns_per_io - p.plain.busy_ns_per_io) / c));
        }
        v["round_median"] = m;
        // The rounds themselves, in order: the spread says how far to trust
        // the median.
        let fig = |f: &RoundFigures| json!({"iops": f.iops, "clat_p99_ns": f.clat_p99_ns, "busy_ns_per_io": f.busy_ns_per_io});
        v["rounds"] = r
            .rounds
            .iter()
            .map(|p| json!({"plain": fig(&p.plain), "encrypted": fig(&p.encrypted)}))
            .collect();
    }
    Some(v)
}

/// fio-compatible JSON (one object).
pub(crate) fn to_json(r: &IoBenchReport) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut top = json!({
        "fio version": concat!("sealdisk-", env!("CARGO_PKG_VERSION")),
        "timestamp": now,
        "time": "",
        "global options": {"ioengine": "sealdisk"},
        "jobs": r.groups.iter().map(job_json).collect::<Vec<_>>(),
        "sealdisk": {"xts_kernel": r.kernel, "cores": r.cores},
    });
    if let Some(ratios) = ratios(r) {
        top["sealdisk"]["ratios"] = ratios;
    }
    top
}

fn human_bw(bps: f64) -> String {
    if bps >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}GiB/s", bps / 1073741824.0)
    } else {
        format!("{:.1}MiB/s", bps / 1048576.0)
    }
}

/// fio-like text.
pub(crate) fn to_text(r: &IoBenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for g in &r.groups {
        let _ = writeln!(
            s,
            "{}: (target={}) rw={}, bs={}, iodepth={}, numjobs={}{}",
            g.name,
            g.target,
            g.spec.rw.name(),
            g.spec.bs,
            g.spec.iodepth,
            g.spec.numjobs,
            g.error.as_ref().map_or(String::new(), |e| format!(", err={e}"))
        );
        let secs = g.runtime.as_secs_f64().max(1e-9);
        for (name, d) in [("read", &g.read), ("write", &g.write)] {
            if d.ios == 0 {
                continue;
            }
            let h = &d.clat;
            let _ = writeln!(
                s,
                "  {name}: IOPS={:.0}, BW={} ({} in {:.1}s)\n    clat (usec): min={:.1}, max={:.1}, avg={:.1}, stdev={:.1}\n    clat percentiles (usec): 50th={:.1}, 99th={:.1}, 99.9th={:.1}",
                d.ios as f64 / secs,
                human_bw(d.bytes as f64 / secs),
                d.bytes,
                secs,
                h.min() as f64 / 1e3,
                h.max() as f64 / 1e3,
                h.mean() / 1e3,
                h.stdev() / 1e3,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                h.value_at_quantile(0.999) as f64 / 1e3,
            );
        }
        let _ = writeln!(
            s,
            "  cpu: usr={:.1}%, sys={:.1}%; reactor busy {:.0} ns/IO",
            g.usr_cpu,
            g.sys_cpu,
            g.busy_ns_per_io()
        );
        if g.spec.verify || g.spec.verify_only {
            let _ = writeln!(
                s,
                "  verify: {} blocks checked, {} errors",
                g.verified_blocks, g.verify_errors
            );
        }
    }
    if let Some(v) = ratios(r) {
        let _ = writeln!(s, "encrypted / plain:");
        for dir in ["read", "write"] {
            if let Some(d) = v.get(dir).filter(|d| !d.is_null()) {
                let _ = writeln!(
                    s,
                    "  {dir}: IOPS x{:.3}, clat p50 x{:.3}, p99 x{:.3}, p99.9 x{:.3}",
                    d["iops"].as_f64().unwrap_or(0.0),
                    d["clat_p50"].as_f64().unwrap_or(0.0),
                    d["clat_p99"].as_f64().unwrap_or(0.0),
                    d["clat_p99.9"].as_f64().unwrap_or(0.0)
                );
            }
        }
        if let Some(m) = v.get("round_median") {
            let _ = writeln!(
                s,
                "  median of {} rounds: IOPS x{:.3}, clat p99 x{:.3}{}",
                m["rounds"],
                m["iops"].as_f64().unwrap_or(0.0),
                m["clat_p99"].as_f64().unwrap_or(0.0),
                m["extra_over_cipher"]
                    .as_f64()
                    .map_or(String::new(), |x| format!(", extra {x:.2} x the cipher"))
            );
        }
        if let Some(c) = v.get("cipher_ns_per_io").and_then(Value::as_f64) {
            let _ = writeln!(
                s,
                "  reactor cost per I/O: plain {:.0} ns, encrypted {:.0} ns; extra {:.0} ns = {:.2} x the cipher alone ({c:.0} ns over the job's buffers, {:.0} ns on one hot buffer, {})",
                v["busy_ns_per_io"]["plain"].as_f64().unwrap_or(0.0),
                v["busy_ns_per_io"]["encrypted"].as_f64().unwrap_or(0.0),
                v["extra_ns_per_io"].as_f64().unwrap_or(0.0),
                v["extra_over_cipher"].as_f64().unwrap_or(0.0),
                v["cipher_hot_ns_per_io"].as_f64().unwrap_or(0.0),
                r.kernel
            );
        }
    }
    s
}

/// An SVG bar chart: IOPS and p99 latency per group and direction.
pub(crate) fn to_svg(r: &IoBenchReport) -> String {
    use std::fmt::Write;
    let mut bars: Vec<(String, f64, f64)> = Vec::new(); // label, iops, p99 us
    for g in &r.groups {
        let secs = g.runtime.as_secs_f64().max(1e-9);
        for (dir, d) in [("read", &g.read), ("write", &g.write)] {
            if d.ios > 0 {
                bars.push((
                    format!("{} {dir}", g.name),
                    d.ios as f64 / secs,
                    d.clat.value_at_quantile(0.99) as f64 / 1e3,
                ));
            }
        }
    }
    let (w, h, top, left) = (760.0, 360.0, 40.0, 60.0);
    let panel = (w - left - 40.0) / 2.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">sealdisk bench io: plain vs encrypted ({})</text>"#,
        r.kernel
    );
    for (pi, (title, pick)) in [("IOPS", 0usize), ("clat p99 (us)", 1)].iter().enumerate() {
        let x0 = left + pi as f64 * (panel + 20.0);
        let vals: Vec<f64> = bars.iter().map(|b| if *pick == 0 { b.1 } else { b.2 }).collect();
        let max = vals.iter().cloned().fold(1e-9, f64::max);
        let bw = (panel / bars.len().max(1) as f64) * 0.7;
        let _ = writeln!(s, r#"<text x="{x0}" y="{}">{title}</text>"#, top + 10.0);
        for (i, (b, v)) in bars.iter().zip(&vals).enumerate() {
            let bh = (h - top - 90.0) * v / max;
            let x = x0 + i as f64 * (panel / bars.len() as f64);
            let y = h - 60.0 - bh;
            let color = if b.0.starts_with("encrypted") {
                "#c0392b"
            } else {
                "#2471a3"
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{bh:.1}" fill="{color}"/>"#
            );
            let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" font-size="10">{v:.0}</text>"#, y - 3.0);
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" font-size="10">{}</text>"#,
                h - 45.0 + (i % 2) as f64 * 12.0,
                b.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
