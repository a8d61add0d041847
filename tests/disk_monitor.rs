//! DescribeDiskMonitorData and `sealdisk disk-stats` against a daemon: the I/O done over
//! NBD shows up in the per-second samples, and every malformed or out-of-limit query gets
//! its own error code.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use sealdisk::rfc3339;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A call as `acct` that must fail: (JSON-RPC code, data.code).
fn refused(data: &std::path::Path, acct: &str, method: &str, mut params: Value) -> (i64, String) {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    params["AccountId"] = acct.into();
    params["RegionId"] = "cn-hangzhou".into();
    let e = c.call(method, params).expect_err("refused");
    assert!(!e.message.is_empty());
    (e.rpc_code, e.code)
}

fn cli(data: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .args(["--account", "acct1", "--region", "cn-hangzhou"])
        .output()
        .unwrap()
}

/// Sums `key` over the datapoints of a reply.
fn total(v: &Value, key: &str) -> u64 {
    v["MonitorData"]["DiskMonitorData"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[key].as_u64().unwrap())
        .sum()
}

#[test]
fn monitor_data_counts_the_io_and_refuses_bad_queries() {
    let dir = TempDir::new("disk-monitor");
    // The pool's first fdatasync fails: the first write into a fresh cluster gets EIO,
    // a data-path error the statistics count (and no cluster: it never became durable).
    let _d = start_daemon(
        BIN,
        &dir.0,
        &["--cores", "0", "--pool-size", "256M", "--no-qos"],
        &[("SEALDISK_FAULTS", "pool_sync:fail=1")],
    );
    let (_inst, disk, _) = instance_with_disk(&dir.0, 16 << 20, true);
    let t0 = now();
    let mut s = nbd_go(&dir.0.join("nbd.sock"), &disk).expect("NBD_OPT_GO");
    assert_ne!(
        nbd_write(&mut s, 1000, 0, &[7; 4096]),
        0,
        "the injected fdatasync failure"
    );
    for i in 0..8u64 {
        assert_eq!(nbd_write(&mut s, i, i * 4096, &[7; 4096]), 0);
    }
    for i in 0..3u64 {
        assert_eq!(nbd_read(&mut s, 50 + i, 0, 16384).0, 0);
    }
    // The sampler takes its sample at the next whole second.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let q = |period: u64| {
        let end = now() + 1;
        rpc(
            &dir.0,
            "DescribeDiskMonitorData",
            json!({"DiskId": disk, "StartTime": rfc3339(t0 - 5), "EndTime": rfc3339(end), "Period": period}),
        )
    };
    let v = loop {
        let v = q(60);
        if total(&v, "OpsRead") == 3 || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(v["DiskId"], disk.as_str());
    assert_eq!(v["Period"], 60);
    assert_eq!(total(&v, "OpsWrite"), 8, "{v}");
    assert_eq!(total(&v, "OpsRead"), 3, "{v}");
    assert_eq!(total(&v, "BytesWrite"), 8 * 4096);
    assert_eq!(total(&v, "BytesRead"), 3 * 16384);
    assert_eq!(total(&v, "ErrorsWrite"), 1);
    assert_eq!(total(&v, "ErrorsRead"), 0);
    assert_eq!(total(&v, "Errors"), 1);
    assert_eq!(total(&v, "ClusterAllocations"), 1);
    let points = v["MonitorData"]["DiskMonitorData"].as_array().unwrap();
    assert_eq!(v["TotalCount"], points.len());
    let busy = points.iter().find(|p| p["OpsWrite"].as_u64() > Some(0)).unwrap();
    for k in [
        "TimeStamp",
        "IOPSRead",
        "IOPSWrite",
        "BPSRead",
        "BPSWrite",
        "LatencyRead",
        "LatencyWrite",
        "LatencyReadP99",
        "LatencyWriteP99",
    ] {
        assert!(busy.get(k).is_some(), "{k} missing: {busy}");
    }
    assert!(busy["IOPSWrite"].as_f64().unwrap() > 0.0);
    assert!(busy["LatencyWrite"].as_f64().unwrap() > 0.0);
    assert!(busy["LatencyWriteP99"].as_f64().unwrap() >= busy["LatencyWrite"].as_f64().unwrap() * 0.5);
    assert!(sealdisk::parse_rfc3339(busy["TimeStamp"].as_str().unwrap()).is_ok());
    // Per second: one datapoint per sampled second, the same totals.
    let v1 = q(1);
    assert_eq!(total(&v1, "OpsWrite"), 8);
    assert!(v1["MonitorData"]["DiskMonitorData"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["Seconds"] == 1));

    // Every bad query: its own code, JSON-RPC invalid params.
    let n = now();
    let base = |start: String, end: String| json!({"DiskId": disk, "StartTime": start, "EndTime": end});
    let ok_range = || base(rfc3339(n - 60), rfc3339(n));
    let cases: Vec<(Value, &str)> = vec![
        (
            base("2026-12-01 00:00:00".into(), rfc3339(n)),
            "InvalidStartTime.Malformed",
        ),
        (base(rfc3339(n - 60), "now".into()), "InvalidEndTime.Malformed"),
        (base(rfc3339(n), rfc3339(n - 60)), "InvalidEndTime.BeforeStartTime"),
        (
            base(rfc3339(n - 3000), rfc3339(n)).merge("Period", json!(1)),
            "InvalidParameter.TooManyDataQueried",
        ),
        (
            base(rfc3339(n - 2 * 3600), rfc3339(n)).merge("Period", json!(60)),
            "InvalidStartTime.ValueNotSupported",
        ),
        (ok_range().merge("Period", json!(0)), "InvalidPeriod.ValueNotSupported"),
        (ok_range().merge("Period", json!("sixty")), "InvalidParameter.Period"),
        (
            ok_range().merge("Colour", json!("red")),
            "InvalidParameter.Unrecognized",
        ),
        (
            json!({"DiskId": disk, "EndTime": rfc3339(n)}),
            "MissingParameter.StartTime",
        ),
        (
            json!({"StartTime": rfc3339(n - 60), "EndTime": rfc3339(n)}),
            "MissingParameter.DiskId",
        ),
    ];
    for (params, code) in cases {
        let (rpc_code, got) = refused(&dir.0, "acct1", "DescribeDiskMonitorData", params.clone());
        assert_eq!(got, code, "{params}");
        assert_eq!(rpc_code, -32602, "{params}");
    }
    let (_, got) = refused(
        &dir.0,
        "acct1",
        "DescribeDiskMonitorData",
        json!({"DiskId": "d-00000000deadbeef", "StartTime": rfc3339(n - 60), "EndTime": rfc3339(n)}),
    );
    assert_eq!(got, "InvalidDiskId.NotFound");
    let (_, got) = refused(&dir.0, "acct2", "DescribeDiskMonitorData", ok_range());
    assert_eq!(got, "Forbidden.CrossAccount");

    // The CLI: one line for the last minute, showing the writes.
    let out = cli(&dir.0, &["disk-stats", &format!("DiskId={disk}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("TimeStamp") && lines[0].contains("r/s") && lines[0].contains("w_await"));
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(cols[2].parse::<f64>().unwrap() > 0.0, "w/s: {text}");
    assert_eq!(cols[11], "1", "errors: {text}");
    // --watch: a header and one line per interval, then stop after --count.
    let out = cli(
        &dir.0,
        &["disk-stats", &format!("DiskId={disk}"), "--watch", "1", "--count", "2"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
    for l in text.lines().skip(1) {
        assert!(!l.contains("no data") && l.split_whitespace().count() == 14, "{text}");
    }
    // --json --watch: one reply per line.
    let out = cli(
        &dir.0,
        &[
            "disk-stats",
            &format!("DiskId={disk}"),
            "--watch",
            "--count",
            "1",
            "--json",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["Period"], 1);
    // Errors reach the CLI's exit status.
    let out = cli(&dir.0, &["disk-stats", "DiskId=d-00000000deadbeef"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidDiskId.NotFound"));
    let out = cli(&dir.0, &["disk-stats", "DiskId=x", "--watch", "0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--watch 0 is refused by the argument parser"
    );
    // The generated ECS command prints a table.
    let out = cli(
        &dir.0,
        &[
            "describe-disk-monitor-data",
            &format!("DiskId={disk}"),
            &format!("StartTime={}", rfc3339(t0 - 5)),
            &format!("EndTime={}", rfc3339(now())),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("TimeStamp") && text.contains("LatencyWriteP99"),
        "{text}"
    );
}

trait Merge {
    fn merge(self, k: &str, v: Value) -> Value;
}

impl Merge for Value {
    fn merge(mut self, k: &str, v: Value) -> Value {
        self[k] = v;
        self
    }
}
