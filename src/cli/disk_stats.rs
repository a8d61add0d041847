//! `sealdisk disk-stats DiskId=...`: a disk's I/O like iostat, from
//! `DescribeDiskMonitorData`.
//!
//! Without `--watch`: one line for the last minute. With `--watch [SECONDS]` (default
//! 1): a line per interval, each covering the interval that just ended (the daemon
//! samples on whole seconds; the line comes ~0.3 s after the interval's end), until
//! interrupted or `--count` lines. `--json`: the raw replies (one compact reply per line
//! with `--watch`).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Account, Connection};
use crate::control::client::{Client, RpcError};

/// `sealdisk disk-stats`.
#[derive(clap::Args)]
pub(super) struct DiskStatsArgs {
    /// print a line every SECONDS (default 1) until interrupted
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        default_missing_value = "1",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    watch: Option<u64>,
    /// with --watch: stop after N lines
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), requires = "watch")]
    count: Option<u64>,
    /// DiskId=d-... (required)
    #[arg(value_name = "Key=Value", num_args = 0..)]
    pub(super) params: Vec<String>,
    #[command(flatten)]
    pub(super) conn: Connection,
    #[command(flatten)]
    pub(super) account: Account,
}

const HEADER: &str = "TimeStamp                  r/s       w/s    rMB/s    wMB/s  r_await  w_await    r_p99    w_p99      f/s      d/s  errors  qos_holds  cow";

/// Milliseconds from a µs field.
fn ms(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0) / 1e3
}

/// One iostat-like line for a datapoint (`None`: no data for the interval).
pub(super) fn line(t: &str, p: Option<&Value>) -> String {
    let Some(p) = p else {
        return format!("{t:<20}  (no data: the disk is not attached, or the daemon has not sampled it yet)");
    };
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    format!(
        "{t:<20} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.1} {:>8.1} {:>7} {:>10} {:>4}",
        f("IOPSRead"),
        f("IOPSWrite"),
        f("BPSRead") / 1e6,
        f("BPSWrite") / 1e6,
        ms(p, "LatencyRead"),
        ms(p, "LatencyWrite"),
        ms(p, "LatencyReadP99"),
        ms(p, "LatencyWriteP99"),
        f("IOPSFlush"),
        f("IOPSDiscard"),
        p["Errors"].as_u64().unwrap_or(0),
        p["QosHolds"].as_u64().unwrap_or(0),
        p["CowCopies"].as_u64().unwrap_or(0),
    )
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn query(c: &mut Client, base: &Value, start: u64, end: u64, period: u64) -> Result<Value, RpcError> {
    let mut q = base.clone();
    q["StartTime"] = crate::control::util::rfc3339(start).into();
    q["EndTime"] = crate::control::util::rfc3339(end).into();
    q["Period"] = period.into();
    c.call("DescribeDiskMonitorData", q)
}

fn first_point(v: &Value) -> Option<&Value> {
    v["MonitorData"]["DiskMonitorData"].as_array().and_then(|a| a.first())
}

/// Runs `disk-stats`; `params` are the Key=Value parameters with AccountId/RegionId.
pub(super) fn run(m: &DiskStatsArgs, mut c: Client, params: Value) -> ExitCode {
    let json = m.conn.json;
    let fail = |e: RpcError| {
        if json {
            let err = serde_json::json!({ "code": e.rpc_code, "message": e.message, "data": e.data });
            println!("{}", serde_json::to_string_pretty(&err).expect("json"));
        }
        eprintln!("sealdisk: {}: {}", e.code, e.message);
        ExitCode::from(if e.rpc_code == 0 { 2 } else { 1 })
    };
    let mut out = std::io::stdout();
    let Some(every) = m.watch else {
        let end = now().as_secs();
        return match query(&mut c, &params, end - 60, end, 60) {
            Ok(v) if json => {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
                ExitCode::SUCCESS
            }
            Ok(v) => {
                println!("{HEADER}");
                println!("{}", line(&crate::control::util::rfc3339(end - 60), first_point(&v)));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    };
    let count = m.count;
    let mut printed = 0u64;
    loop {
        // Just after the end of the next interval (the sampler samples on whole seconds).
        let t = now();
        let end = t.as_secs() / every * every + every;
        let wake = Duration::from_secs(end) + Duration::from_millis(300);
        std::thread::sleep(wake.saturating_sub(t));
        let v = match query(&mut c, &params, end - every, end, every) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if json {
            println!("{v}");
        } else {
            if printed.is_multiple_of(20) {
                println!("{HEADER}");
            }
            println!("{}", line(&crate::control::util::rfc3339(end - every), first_point(&v)));
        }
        let _ = out.flush();
        printed += 1;
        if count.is_some_and(|n| printed >= n) {
            return ExitCode::SUCCESS;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_show_rates_latencies_in_ms_and_missing_data() {
        let p = serde_json::json!({
            "IOPSRead": 1000.0, "IOPSWrite": 10.0, "BPSRead": 4096000.0, "BPSWrite": 40960.0,
            "LatencyRead": 250.0, "LatencyWrite": 1500.0, "LatencyReadP99": 900.0, "LatencyWriteP99": 4000.0,
            "IOPSFlush": 1.0, "IOPSDiscard": 0.0, "Errors": 2, "QosHolds": 3, "CowCopies": 4
        });
        let l = super::line("2026-12-06T14:00:00Z", Some(&p));
        for want in [
            "1000.0", "10.0", "4.10", "0.04", "0.250", "1.500", "0.900", "4.000", " 2 ", " 3 ", " 4",
        ] {
            assert!(l.contains(want), "{want:?} missing from {l:?}");
        }
        assert!(super::line("t", None).contains("no data"));
        let cols = super::HEADER.split_whitespace().count();
        assert_eq!(l.split_whitespace().count(), cols, "{l}");
    }
}
