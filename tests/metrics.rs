//! `serve --metrics ADDR`: the Prometheus endpoint, scraped over loopback TCP and a unix
//! socket while a client does I/O over NBD; and the addresses it refuses.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");

/// A raw HTTP/1.1 exchange: (status line, head, body).
fn http(mut s: impl Read + Write, request: &str) -> (String, String, String) {
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap().to_owned();
    (status, head.to_owned(), body.to_owned())
}

fn tcp(addr: &str) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn get_metrics(addr: &str) -> String {
    let (status, head, body) = http(tcp(addr), "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    body
}

/// Samples of an exposition text: series (name with labels, as written) -> value; and
/// `# TYPE` per family name. Checks that every family has `# HELP` and `# TYPE` before
/// its samples.
fn parse(text: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (n, t) = rest.split_once(' ').unwrap();
            assert!(helped.contains(n), "# TYPE {n} without # HELP first");
            assert!(
                types.insert(n.to_owned(), t.to_owned()).is_none(),
                "two # TYPE lines for {n}"
            );
        } else {
            let (series, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample {series} before its # TYPE");
            let v: f64 = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            samples.insert(series.to_owned(), v);
        }
    }
    (samples, types)
}

fn val(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series).unwrap_or_else(|| panic!("no series {series}"))
}

#[test]
fn scrapes_show_types_and_counters_that_move_with_nbd_io() {
    let dir = TempDir::new("metrics-tcp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _d = start_daemon(
        BIN,
        &dir.0,
        &["--cores", "0", "--pool-size", "256M", "--no-qos", "--metrics", &addr],
        &[],
    );
    let (_inst, disk, _) = instance_with_disk(&dir.0, 16 << 20, true);
    let (before, types) = parse(&get_metrics(&addr));
    for (name, kind) in [
        ("sealdisk_disk_ops_total", "counter"),
        ("sealdisk_disk_bytes_total", "counter"),
        ("sealdisk_disk_errors_total", "counter"),
        ("sealdisk_disk_latency_seconds", "histogram"),
        ("sealdisk_disk_qos_holds_total", "counter"),
        ("sealdisk_disk_qos_held_seconds_total", "counter"),
        ("sealdisk_disk_cow_copies_total", "counter"),
        ("sealdisk_disk_cluster_allocations_total", "counter"),
        ("sealdisk_disks_attached", "gauge"),
        ("sealdisk_reactor_busy_seconds_total", "counter"),
        ("sealdisk_reactor_idle_seconds_total", "counter"),
        ("sealdisk_reactor_ios_total", "counter"),
        ("sealdisk_reactor_bytes_total", "counter"),
        ("sealdisk_reactor_queue_full_total", "counter"),
        ("sealdisk_reactor_slow_parks_total", "counter"),
        ("sealdisk_reactor_polls_total", "counter"),
        ("sealdisk_reactor_idle_polls_total", "counter"),
        ("sealdisk_reactor_parks_total", "counter"),
        ("sealdisk_reactor_source_ios_total", "counter"),
        ("sealdisk_metadata_queue_depth", "gauge"),
        ("sealdisk_metadata_requests_total", "counter"),
        ("sealdisk_metadata_batch_size", "histogram"),
        ("sealdisk_metadata_fdatasync_seconds", "histogram"),
        ("sealdisk_metadata_commit_seconds", "histogram"),
        ("sealdisk_metadata_writer_wait_seconds", "histogram"),
        ("sealdisk_metadata_failures_total", "counter"),
        ("sealdisk_kms_calls_total", "counter"),
        ("sealdisk_kms_errors_total", "counter"),
        ("sealdisk_kms_call_seconds", "histogram"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "# TYPE of {name}");
    }
    // The instance's system disk and the data disk.
    assert_eq!(val(&before, "sealdisk_disks_attached"), 2.0);
    let l = |op: &str| format!("{{disk=\"{disk}\",op=\"{op}\"}}");
    let series = |name: &str, op: &str| format!("{name}{}", l(op));

    // I/O over the administrator's NBD socket: 8 writes of 4 KiB, 5 reads of 8 KiB.
    let mut s = nbd_go(&dir.0.join("nbd.sock"), &disk).expect("NBD_OPT_GO");
    for i in 0..8u64 {
        assert_eq!(nbd_write(&mut s, i, i * 4096, &[i as u8 + 1; 4096]), 0);
    }
    for i in 0..5u64 {
        let (e, d) = nbd_read(&mut s, 100 + i, i * 8192, 8192);
        assert_eq!(e, 0);
        // Block 2i holds 2i + 1 for the 32 KiB written; the last read is past them.
        assert_eq!(d[0], if i < 4 { 2 * i as u8 + 1 } else { 0 });
    }
    let (after, _) = parse(&get_metrics(&addr));
    let moved = |name: &str, op: &str| val(&after, &series(name, op)) - val(&before, &series(name, op));
    assert_eq!(moved("sealdisk_disk_ops_total", "write"), 8.0);
    assert_eq!(moved("sealdisk_disk_bytes_total", "write"), 32768.0);
    assert_eq!(moved("sealdisk_disk_ops_total", "read"), 5.0);
    assert_eq!(moved("sealdisk_disk_bytes_total", "read"), 40960.0);
    assert_eq!(moved("sealdisk_disk_errors_total", "read"), 0.0);
    assert_eq!(moved("sealdisk_disk_latency_seconds_count", "write"), 8.0);
    assert!(moved("sealdisk_disk_latency_seconds_sum", "write") > 0.0);
    // Buckets: cumulative, ending at +Inf = _count.
    for op in ["read", "write"] {
        let mut last = 0.0;
        for le in sealdisk::testing::LATENCY_BUCKETS {
            let v = val(
                &after,
                &format!("sealdisk_disk_latency_seconds_bucket{{disk=\"{disk}\",op=\"{op}\",le=\"{le}\"}}"),
            );
            assert!(v >= last, "{op}: bucket le={le} below the one before");
            last = v;
        }
        let inf = val(
            &after,
            &format!("sealdisk_disk_latency_seconds_bucket{{disk=\"{disk}\",op=\"{op}\",le=\"+Inf\"}}"),
        );
        assert!(inf >= last);
        assert_eq!(inf, val(&after, &series("sealdisk_disk_latency_seconds_count", op)));
    }
    // The eight writes went to one fresh 256 KiB cluster: one first write, no copy.
    let dl = format!("{{disk=\"{disk}\"}}");
    assert_eq!(
        val(&after, &format!("sealdisk_disk_cluster_allocations_total{dl}"))
            - val(&before, &format!("sealdisk_disk_cluster_allocations_total{dl}")),
        1.0
    );
    assert_eq!(val(&after, &format!("sealdisk_disk_cow_copies_total{dl}")), 0.0);
    let r = "{reactor=\"0\",core=\"0\"}";
    assert!(
        val(&after, &format!("sealdisk_reactor_ios_total{r}"))
            - val(&before, &format!("sealdisk_reactor_ios_total{r}"))
            >= 13.0
    );
    assert!(val(&after, &format!("sealdisk_reactor_busy_seconds_total{r}")) > 0.0);
    let nbd_src = "{reactor=\"0\",core=\"0\",source=\"nbd\"}";
    assert!(
        val(&after, &format!("sealdisk_reactor_source_ios_total{nbd_src}"))
            - val(&before, &format!("sealdisk_reactor_source_ios_total{nbd_src}"))
            >= 13.0
    );
    // The first write of the fresh cluster went through the metadata thread: one
    // fdatasync and one commit more; creating the disk called the local KMS.
    for name in [
        "sealdisk_metadata_fdatasync_seconds_count",
        "sealdisk_metadata_commit_seconds_count",
    ] {
        assert!(val(&after, name) - val(&before, name) >= 1.0, "{name}");
    }
    assert!(val(&after, "sealdisk_metadata_requests_total") - val(&before, "sealdisk_metadata_requests_total") >= 1.0);
    assert_eq!(val(&after, "sealdisk_metadata_queue_depth"), 0.0);
    assert!(val(&after, "sealdisk_kms_calls_total{backend=\"local\"}") >= 1.0);
    assert_eq!(
        val(&after, "sealdisk_kms_call_seconds_count{backend=\"local\"}"),
        val(&after, "sealdisk_kms_calls_total{backend=\"local\"}")
    );

    // Anything but GET /metrics: 404; garbage: 400.
    let (status, _, _) = http(tcp(&addr), "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(tcp(&addr), "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(tcp(&addr), "hello\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // And it still serves.
    assert!(get_metrics(&addr).contains("sealdisk_disk_ops_total"));
}

#[test]
fn unix_socket_endpoint() {
    let dir = TempDir::new("metrics-unix");
    let sock = dir.0.join("metrics.sock");
    let _d = start_daemon(
        BIN,
        &dir.0,
        &[
            "--cores",
            "0",
            "--pool-size",
            "64M",
            "--metrics",
            &format!("unix:{}", sock.display()),
        ],
        &[],
    );
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, _, body) = http(s, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (samples, types) = parse(&body);
    assert_eq!(types["sealdisk_reactor_busy_seconds_total"], "counter");
    assert_eq!(samples["sealdisk_disks_attached"], 0.0);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn non_loopback_and_malformed_addresses_are_refused_before_anything_starts() {
    let dir = TempDir::new("metrics-refused");
    for (addr, want) in [
        ("0.0.0.0:9100", "not a loopback address"),
        ("192.0.2.1:9100", "not a loopback address"),
        ("localhost:9100", "give a loopback address"),
        ("unix:relative.sock", "absolute path"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&dir.0)
            .args(["--metrics", addr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {err}");
        assert!(err.contains(want) && err.contains("--metrics"), "{addr}: {err}");
        assert!(!dir.0.join("catalog.redb").exists(), "{addr}: nothing is created");
    }
}
