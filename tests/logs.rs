//! The daemon's log: JSON lines with `--log-format json` (an RPC line has method,
//! account, request id, caller, code, duration, and the error message on failure),
//! levels from `--log-level` (wins) or `RUST_LOG`, bad settings refused, lifecycle
//! lines with their fields, and client-caused lines rate-limited with a count of the
//! suppressed ones.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

use sealdisk::Client;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const BASE: [&str; 5] = ["--cores", "0", "--pool-size", "64M", "--no-qos"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    BASE.iter().copied().chain(extra.iter().copied()).collect()
}

fn log_path(data: &Path) -> std::path::PathBuf {
    data.with_extension("log")
}

/// Every line of a JSON log, parsed; panics on a line that is not a JSON object.
fn json_lines(data: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log_path(data)).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            assert!(v.is_object(), "{l}");
            for k in ["timestamp", "level", "target"] {
                assert!(v[k].is_string(), "{k} in {l}");
            }
            assert!(v["fields"].is_null(), "fields are flattened: {l}");
            v
        })
        .collect()
}

/// Waits until `pred` holds for the log's lines (the log is written as things
/// happen; a line may follow the client's view by a moment).
fn wait_lines(data: &Path, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let l = json_lines(data);
        if pred(&l) {
            return l;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: not in the log:\n{}",
            std::fs::read_to_string(log_path(data)).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn failing_call(data: &Path) -> sealdisk::RpcError {
    let mut c = Client::connect(&data.join("sealdisk.sock")).unwrap();
    c.call(
        "DescribeDisks",
        json!({"AccountId": "acct1", "RegionId": "cn-hangzhou", "Bogus": 1}),
    )
    .unwrap_err()
}

#[test]
fn json_lines_carry_the_rpc_fields_and_the_error_message() {
    let d = TempDir::new("logs-json");
    let data = d.0.join("data");
    let _dm = start_daemon(BIN, &data, &args(&["--log-format", "json"]), &[]);
    let ok = rpc(&data, "ActivateKms", json!({}));
    let ok_id = ok["RequestId"].as_str().unwrap().to_owned();
    let e = failing_call(&data);
    assert_eq!(e.code, "InvalidParameter.Unrecognized");
    let err_id = e.data["request_id"].as_str().expect("data.request_id").to_owned();
    assert!(err_id.starts_with("req-") && err_id != ok_id, "{err_id}");
    let lines = wait_lines(&data, "both RPC lines", |l| {
        l.iter().any(|v| v["request_id"] == ok_id.as_str()) && l.iter().any(|v| v["request_id"] == err_id.as_str())
    });
    let ok_line = lines
        .iter()
        .find(|v| v["request_id"] == ok_id.as_str() && v["message"] == "rpc")
        .unwrap();
    assert_eq!(ok_line["target"], "sealdisk::control::rpc", "{ok_line}");
    assert_eq!(ok_line["level"], "INFO", "{ok_line}");
    assert_eq!(ok_line["method"], "ActivateKms", "{ok_line}");
    assert_eq!(ok_line["account"], "acct1", "{ok_line}");
    assert_eq!(ok_line["code"], "ok", "{ok_line}");
    assert!(ok_line["duration_us"].is_u64(), "{ok_line}");
    assert!(ok_line["error"].is_null(), "{ok_line}");
    // SAFETY: getuid(2) has no preconditions.
    let me = format!("uid:{},", unsafe { libc::getuid() });
    assert!(
        ok_line["caller"].as_str().unwrap().starts_with(&me),
        "the caller is this test process: {ok_line}"
    );
    let err_line = lines
        .iter()
        .find(|v| v["request_id"] == err_id.as_str() && v["message"] == "rpc failed")
        .unwrap();
    assert_eq!(err_line["level"], "WARN", "{err_line}");
    assert_eq!(err_line["method"], "DescribeDisks", "{err_line}");
    assert_eq!(err_line["code"], "InvalidParameter.Unrecognized", "{err_line}");
    assert_eq!(err_line["error"], e.message.as_str(), "the error message: {err_line}");
    assert!(err_line["duration_us"].is_u64(), "{err_line}");
    // The start-up line, with its fields.
    let serving = lines.iter().find(|v| v["message"] == "serving").expect("serving line");
    assert_eq!(serving["target"], "sealdisk::daemon");
    assert_eq!(serving["reactors"], 1, "{serving}");
    assert_eq!(serving["kms"], "local", "{serving}");
    // Attach: a lifecycle line with the disk and instance, inside the RPC's span
    // (which carries the request id).
    let (inst, disk, att) = instance_with_disk(&data, 4 << 20, true);
    let att_id = att["RequestId"].as_str().unwrap().to_owned();
    let lines = wait_lines(&data, "disk attached", |l| {
        l.iter().any(|v| v["message"] == "disk attached")
    });
    let a = lines.iter().find(|v| v["message"] == "disk attached").unwrap();
    assert_eq!(
        (a["disk"].as_str(), a["instance"].as_str()),
        (Some(&*disk), Some(&*inst)),
        "{a}"
    );
    assert_eq!(a["level"], "INFO");
    assert_eq!(a["span"]["name"], "rpc", "{a}");
    assert_eq!(a["span"]["request_id"], att_id.as_str(), "{a}");
    assert_eq!(a["span"]["method"], "AttachDisk", "{a}");
    // An NBD connection: started and closed, with the disk and why.
    let s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    drop(s);
    let lines = wait_lines(&data, "NBD connection closed", |l| {
        l.iter().any(|v| v["message"] == "NBD: connection closed")
    });
    let started = lines
        .iter()
        .find(|v| v["message"] == "NBD: connection started")
        .unwrap();
    assert_eq!(started["disk"], disk.as_str(), "{started}");
    assert!(started["peer"].as_str().unwrap().starts_with("pid:"), "{started}");
    let closed = lines.iter().find(|v| v["message"] == "NBD: connection closed").unwrap();
    assert_eq!(closed["disk"], disk.as_str(), "{closed}");
    assert_eq!(closed["why"], "client closed the connection", "{closed}");
    assert_eq!(closed["level"], "INFO", "{closed}");
    assert_eq!(closed["suppressed"], 0, "{closed}");
}

#[test]
fn log_level_warn_hides_info_lines_and_wins_over_rust_log() {
    let d = TempDir::new("logs-warn");
    let data = d.0.join("data");
    let _dm = start_daemon(BIN, &data, &args(&["--log-level", "warn"]), &[("RUST_LOG", "debug")]);
    let ok = rpc(&data, "ActivateKms", json!({}));
    let e = failing_call(&data);
    let id = e.data["request_id"].as_str().unwrap().to_owned();
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(log_path(&data)).unwrap();
        if text.contains(&id) {
            break text;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no line for {id}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !text.contains(ok["RequestId"].as_str().unwrap()),
        "the ok RPC line is info: {text}"
    );
    for l in text.lines() {
        assert!(!l.contains(" INFO ") && !l.contains(" DEBUG "), "{l}");
    }
    // Human format (the default): level, target, message, key=value fields.
    let line = text.lines().find(|l| l.contains(&id)).unwrap();
    assert!(!line.starts_with('{'), "{line}");
    for want in [
        " WARN ",
        "sealdisk::control::rpc:",
        "rpc failed",
        "method=DescribeDisks",
        "code=InvalidParameter.Unrecognized",
        "duration_us=",
        &format!("request_id={id}"),
        "account=\"acct1\"",
    ] {
        assert!(line.contains(want), "{want:?} in {line}");
    }
    assert!(line.contains(&e.message), "the error message: {line}");
}

#[test]
fn rust_log_sets_levels_per_target_when_no_flag_is_given() {
    let d = TempDir::new("logs-env");
    let data = d.0.join("data");
    let env = [("RUST_LOG", "warn,sealdisk::control::rpc=info")];
    let _dm = start_daemon(BIN, &data, &args(&["--log-format", "json"]), &env);
    let ok = rpc(&data, "ActivateKms", json!({}));
    let id = ok["RequestId"].as_str().unwrap().to_owned();
    let lines = wait_lines(&data, "the RPC line", |l| {
        l.iter().any(|v| v["request_id"] == id.as_str())
    });
    assert!(
        lines.iter().all(|v| v["message"] != "serving"),
        "sealdisk::daemon is at warn"
    );
    assert!(lines
        .iter()
        .filter(|v| v["level"] == "INFO")
        .all(|v| v["target"] == "sealdisk::control::rpc"));
}

#[test]
fn bad_log_settings_are_refused_before_anything_is_made() {
    let d = TempDir::new("logs-bad");
    for (flags, env, want) in [
        (
            vec!["--log-level", "verbose"],
            None,
            "--log-level \"verbose\": use one of error, warn, info, debug, trace, off",
        ),
        (
            vec!["--log-format", "xml"],
            None,
            "--log-format \"xml\": use human or json",
        ),
        (vec![], Some("sealdisk=loud"), "RUST_LOG=\"sealdisk=loud\""),
    ] {
        let data = d.0.join("data");
        let mut c = Command::new(BIN);
        c.args(["serve", "--data-dir"]).arg(&data).args(BASE).args(&flags);
        match env {
            Some(v) => c.env("RUST_LOG", v),
            None => c.env_remove("RUST_LOG"),
        };
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?} {env:?}: {err}");
        assert!(err.contains(want), "{want:?} in {err}");
        assert!(!data.exists(), "{flags:?}: nothing is created");
    }
}

/// One NBD client that sends flags the server does not know: its handshake fails.
fn bad_handshake(sock: &Path) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed without a word");
}

#[test]
fn a_flood_of_bad_nbd_handshakes_is_rate_limited_and_counted() {
    let d = TempDir::new("logs-flood");
    let data = d.0.join("data");
    let _dm = start_daemon(BIN, &data, &args(&["--log-format", "json"]), &[]);
    let sock = data.join("nbd.sock");
    const N: usize = 300;
    let t0 = Instant::now();
    for _ in 0..N {
        bad_handshake(&sock);
    }
    let flood = t0.elapsed();
    let failed = |l: &[Value]| -> Vec<Value> {
        l.iter()
            .filter(|v| v["message"] == "NBD: handshake failed")
            .cloned()
            .collect()
    };
    // The limit is 10 lines per 10 s window.
    let windows = flood.as_secs() / 10 + 1;
    std::thread::sleep(Duration::from_secs(1));
    let during = failed(&json_lines(&data));
    assert!(!during.is_empty());
    assert!(
        during.len() as u64 <= 10 * windows,
        "{} lines for {N} failed handshakes in {flood:?}",
        during.len()
    );
    for v in &during {
        assert_eq!(v["level"], "WARN", "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("unknown client flags 0xffffffff"),
            "{v}"
        );
        assert!(v["peer"].as_str().unwrap().starts_with("pid:"), "{v}");
    }
    // After the window, the next failure is logged with the count of those that
    // were not: every failure is in the log, as a line or in a count.
    std::thread::sleep(Duration::from_millis(10_500).saturating_sub(t0.elapsed() - flood));
    bad_handshake(&sock);
    let lines = wait_lines(&data, "the line after the window", |l| {
        let f = failed(l);
        f.len() > during.len() && f.iter().map(|v| 1 + v["suppressed"].as_u64().unwrap()).sum::<u64>() == N as u64 + 1
    });
    let all = failed(&lines);
    let last = all.last().unwrap();
    assert!(last["suppressed"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(all.len(), during.len() + 1, "one more line, not one per failure");
}

#[test]
fn a_flood_of_malformed_vhost_chains_is_rate_limited() {
    use sealdisk::testing::vmm::{blk_header, RawDesc};
    use sealdisk::testing::vmm::{Driver, DriverOptions};
    const N: usize = 200;
    let d = TempDir::new("logs-vhost");
    let data = d.0.join("data");
    let _dm = start_daemon(BIN, &data, &args(&["--log-format", "json"]), &[]);
    let (inst, disk, att) = instance_with_disk(&data, 4 << 20, true);
    let sock = att["VhostSocket"].as_str().expect("a vhost-user socket").to_owned();
    let opts = DriverOptions::default();
    let mut drv = Driver::connect(Path::new(&sock), &opts).expect("connect as the VMM");
    let hdr = drv.alloc(16).unwrap();
    let st = drv.alloc(1).unwrap();
    drv.mem().write_at(hdr.gpa(), &blk_header(0, 0)).unwrap();
    let q = drv.queue(0).size();
    // A read whose data buffer lies outside the memory table: answered IOERR, and
    // logged (a guest could send these at any rate).
    let chain = [
        (q - 3, RawDesc::read(hdr.gpa(), 16, Some(q - 2))),
        (q - 2, RawDesc::write(opts.mem_size + (1 << 30), 4096, Some(q - 1))),
        (q - 1, RawDesc::write(st.gpa(), 1, None)),
    ];
    let t0 = Instant::now();
    for i in 0..N {
        let id = drv.queue(0).push_raw(&chain, q - 3, Some(st.gpa())).unwrap();
        let c = drv
            .queue(0)
            .wait_for(id, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("chain {i}: no answer: {e}"));
        assert_eq!(c.status, 1, "VIRTIO_BLK_S_IOERR");
    }
    let flood = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let refused: Vec<Value> = json_lines(&data)
        .into_iter()
        .filter(|v| v["message"] == "vhost-user: refused a malformed descriptor chain")
        .collect();
    assert!(!refused.is_empty());
    assert!(
        refused.len() as u64 <= 10 * (flood.as_secs() / 10 + 1),
        "{} lines for {N} malformed chains in {flood:?}",
        refused.len()
    );
    for v in &refused {
        assert_eq!(v["level"], "WARN", "{v}");
        assert_eq!(
            (v["disk"].as_str(), v["instance"].as_str()),
            (Some(&*disk), Some(&*inst)),
            "{v}"
        );
        assert_eq!(v["queue"], 0, "{v}");
        assert_eq!(v["head"], q - 3, "{v}");
        assert!(v["why"].is_string() && v["suppressed"].is_u64(), "{v}");
    }
    // The VMM's connect is logged with the disk and instance too.
    let connected = json_lines(&data)
        .into_iter()
        .find(|v| v["message"] == "vhost-user: VMM connected")
        .expect("VMM connected line");
    assert_eq!(connected["disk"], disk.as_str(), "{connected}");
    assert_eq!(connected["vmm_pid"], std::process::id(), "{connected}");
}

#[test]
fn a_data_path_panic_is_a_json_line_too() {
    let d = TempDir::new("logs-panic");
    let data = d.0.join("data");
    let mut dm = start_daemon(
        BIN,
        &data,
        &args(&["--log-format", "json"]),
        &[("SEALDISK_FAULTS", "reactor:panic=1500ms")],
    );
    let t = Instant::now();
    let st = loop {
        if let Some(st) = dm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the daemon lives on after a reactor panic"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(sealdisk::EXIT_DATA_PATH_PANIC));
    // Every line is JSON (json_lines panics otherwise), the panic among them.
    let lines = json_lines(&data);
    let p = lines
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reactor-0 panicked"))
        })
        .expect("the panic's line");
    assert_eq!(p["level"], "ERROR", "{p}");
    assert!(
        p["message"].as_str().unwrap().contains("injected by SEALDISK_FAULTS"),
        "{p}"
    );
}
