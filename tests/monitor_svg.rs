//! tools/disk-monitor-svg.py: DescribeDiskMonitorData JSON (one reply, or JSON lines)
//! and a series of metrics scrapes become an SVG chart; bad input gets an error.
//! Needs python3 (fails, never skips, without it).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn tool(args: &[&str], stdin: Option<&str>) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/disk-monitor-svg.py");
    let mut c = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): install python3 (apt-get install python3)"));
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    c.wait_with_output().unwrap()
}

fn reply(start: u64, n: u64) -> serde_json::Value {
    let points: Vec<_> = (0..n)
        .map(|i| {
            serde_json::json!({
                "DiskId": "d-00000000000000aa",
                "TimeStamp": sealdisk::rfc3339(start + i * 60),
                "IOPSRead": 1000.0 + i as f64, "IOPSWrite": 500.0,
                "BPSRead": 4096000.0, "BPSWrite": 2048000.0,
                "LatencyRead": 80.5, "LatencyWrite": 120.0,
                "LatencyReadP99": 300.0, "LatencyWriteP99": 900.0,
            })
        })
        .collect();
    serde_json::json!({"DiskId": "d-00000000000000aa", "Period": 60, "TotalCount": n,
                       "MonitorData": {"DiskMonitorData": points}})
}

fn check_svg(out: &Output, title: &str, polylines: usize) -> String {
    let svg = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(title), "title {title} missing");
    assert_eq!(svg.matches("<polyline").count(), polylines, "{svg}");
    for label in ["read IOPS", "write IOPS", "read p99", "write p99", "latency (µs)"] {
        assert!(svg.contains(label), "{label} missing");
    }
    svg
}

#[test]
fn monitor_json_becomes_a_chart() {
    let tmp = tempfile::Builder::new().prefix("sealdisk-svg-").tempdir().unwrap();
    let dir = tmp.path();
    let input = dir.join("monitor.json");
    std::fs::write(&input, serde_json::to_string_pretty(&reply(1_800_000_000, 10)).unwrap()).unwrap();
    let out_file = dir.join("chart.svg");
    let out = tool(&[input.to_str().unwrap(), "-o", out_file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&out_file).unwrap();
    assert!(svg.contains("disk d-00000000000000aa") && svg.matches("<polyline").count() == 6);
    // The IOPS axis reaches the largest value (1009 -> 2k).
    assert!(svg.contains(">2k<"), "{svg}");
    // JSON lines (disk-stats --watch --json), from stdin.
    let lines = format!(
        "{}\n{}\n",
        reply(1_800_000_000, 1),
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": reply(1_800_000_060, 1)})
    );
    check_svg(&tool(&["-"], Some(&lines)), "d-00000000000000aa", 6);
}

#[test]
fn a_scrape_series_becomes_a_chart() {
    let mut text = String::new();
    for (k, t) in [(0u64, 100u64), (1, 102), (2, 104)] {
        text.push_str(&format!(
            "# TIME {t}\n# HELP sealdisk_disk_ops_total x\n# TYPE sealdisk_disk_ops_total counter\n"
        ));
        for (op, n) in [("read", 100 * k), ("write", 10 * k)] {
            let d = "disk=\"d-00000000000000bb\"";
            text.push_str(&format!("sealdisk_disk_ops_total{{{d},op=\"{op}\"}} {n}\n"));
            text.push_str(&format!(
                "sealdisk_disk_latency_seconds_bucket{{{d},op=\"{op}\",le=\"0.0001\"}} {}\n",
                n * 9 / 10
            ));
            text.push_str(&format!(
                "sealdisk_disk_latency_seconds_bucket{{{d},op=\"{op}\",le=\"0.001\"}} {n}\n"
            ));
            text.push_str(&format!(
                "sealdisk_disk_latency_seconds_bucket{{{d},op=\"{op}\",le=\"+Inf\"}} {n}\n"
            ));
            text.push_str(&format!(
                "sealdisk_disk_latency_seconds_sum{{{d},op=\"{op}\"}} {}\n",
                n as f64 * 50e-6
            ));
            text.push_str(&format!("sealdisk_disk_latency_seconds_count{{{d},op=\"{op}\"}} {n}\n"));
        }
    }
    let svg = check_svg(&tool(&["-", "--title", "scraped"], Some(&text)), "scraped", 6);
    // 100 reads per 2 s = 50 IOPS: the axis tops at 50.
    assert!(svg.contains(">50<"), "{svg}");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    for (input, want) in [
        ("{\"Disks\": {}}", "not DescribeDiskMonitorData output"),
        ("{\"MonitorData\": {\"DiskMonitorData\": []}}", "no datapoints"),
        ("sealdisk_disk_ops_total 1\n", "before the first '# TIME"),
        ("# TIME 1\nsealdisk_disk_ops_total 1\n", "at least two scrapes"),
        (
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-32602}}",
            "error reply",
        ),
    ] {
        let out = tool(&["-"], Some(input));
        assert_eq!(out.status.code(), Some(1), "{input}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{input}: {err}");
    }
}
