//! Reactor and slow-path counters: busy vs idle counted as SPDK does (a poll that
//! found no work is idle, even while spinning), I/Os per reactor from every source,
//! the volume metadata thread's queue, batches and latencies, KMS calls per backend;
//! all served by DescribeReactors.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

use sealdisk::testing::nbd::*;
use sealdisk::{Poll, Poller, ReactorConfig, ReactorCtx, Reactors, StatsSnapshot};

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");

/// Finds no work, ever.
struct IdlePoller;
impl Poller for IdlePoller {
    fn poll(&mut self, _: &ReactorCtx) -> Poll {
        Poll::Idle
    }
}

/// Does "work" on every poll until told to stop.
struct BusyPoller(Arc<AtomicBool>);
impl Poller for BusyPoller {
    fn poll(&mut self, _: &ReactorCtx) -> Poll {
        if self.0.load(Ordering::Relaxed) {
            Poll::Done
        } else {
            Poll::Busy(1)
        }
    }
}

/// One reactor on core 0 that spins for a minute after its last work (never parks
/// during the test).
fn spinning_reactor() -> Reactors {
    Reactors::start(&ReactorConfig {
        cores: vec![0],
        pool_bytes: 4 << 20,
        spin: Duration::from_secs(60),
        ..ReactorConfig::default()
    })
    .unwrap()
}

/// The reactor's counters over `d` of wall time.
fn over(r: &Reactors, d: Duration) -> StatsSnapshot {
    let before = r.stats()[0];
    std::thread::sleep(d);
    r.stats()[0].since(&before)
}

#[test]
fn a_spinning_reactor_with_an_idle_poller_counts_idle_not_busy() {
    let r = spinning_reactor();
    r.call(0, Duration::from_secs(5), |ctx| ctx.add_poller(Box::new(IdlePoller)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let d = over(&r, Duration::from_millis(600));
    assert_eq!(d.parks, 0, "the reactor spins (spin = 60 s): {d:?}");
    assert!(d.idle_polls > 100, "it polled, finding nothing: {d:?}");
    assert_eq!(d.polls, d.idle_polls, "no iteration found work: {d:?}");
    assert!(d.idle_ns > 300_000_000, "the spinning time is idle time: {d:?}");
    assert!(
        d.busy_percent() < 1.0,
        "a reactor spinning over an idle poller reports {:.2}% busy: {d:?}",
        d.busy_percent()
    );
}

#[test]
fn a_reactor_whose_poller_finds_work_counts_busy() {
    let r = spinning_reactor();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    r.call(0, Duration::from_secs(5), move |ctx| {
        ctx.add_poller(Box::new(BusyPoller(s)))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let d = over(&r, Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    assert!(
        d.busy_percent() > 95.0,
        "every iteration found work, yet {:.1}% busy: {d:?}",
        d.busy_percent()
    );
    assert!(d.polls > 100 && d.idle_polls < d.polls / 20, "{d:?}");
}

/// NBD writes of `n` 64 KiB blocks at `base` (each lands in a new cluster: the
/// metadata thread's slow path), then reads of the same; checks every reply.
fn nbd_write_read(sock: &std::path::Path, export: &str, base: u64, n: u64) {
    let mut s = nbd_go(sock, export).unwrap_or_else(|t| panic!("GO {export}: {t:#x}"));
    let data = random_bytes(64 << 10, base + 1);
    for i in 0..n {
        let mut r = encode_request(&Request {
            flags: 0,
            cmd: CMD_WRITE,
            cookie: i,
            offset: base + i * (256 << 10),
            len: data.len() as u32,
        })
        .to_vec();
        r.extend_from_slice(&data);
        s.write_all(&r).unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0, "write {i}");
    }
    for i in 0..n {
        s.write_all(&encode_request(&Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: i,
            offset: base + i * (256 << 10),
            len: data.len() as u32,
        }))
        .unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0, "read {i}");
        let mut b = vec![0u8; data.len()];
        s.read_exact(&mut b).unwrap();
        assert!(b == data, "read {i} returns what was written");
    }
}

/// DescribeReactors (host-level: no account).
fn describe(data: &std::path::Path) -> Value {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    c.call("DescribeReactors", json!({})).unwrap()
}

fn reactors_sum(v: &Value, f: impl Fn(&Value) -> u64) -> u64 {
    v["Reactors"].as_array().unwrap().iter().map(f).sum()
}

#[test]
fn describe_reactors_counts_every_source_and_the_slow_path() {
    let d = TempDir::new("counters");
    let data = d.0.join("data");
    let _dm = start_daemon(BIN, &data, &["--cores", "0,1", "--pool-size", "256M", "--no-qos"], &[]);
    let before = describe(&data);
    let m0 = before["MetadataThread"].clone();
    assert_eq!(m0["Requests"], 0, "{before}");
    assert_eq!(m0["QueueDepth"], 0, "{before}");
    assert_eq!(before["Kms"]["Backend"], "local");
    // An encrypted disk: GenerateDataKey (CreateDisk) and UnwrapDataKey (AttachDisk)
    // on the local KMS.
    let (_inst, disk, _) = instance_with_disk(&data, 16 << 20, true);
    let n = 8;
    nbd_write_read(&data.join("nbd.sock"), &disk, 0, n);
    let v = describe(&data);
    // NBD: n writes and n reads of 64 KiB, on some reactor.
    let nbd = reactors_sum(&v, |r| r["IosBySource"]["Nbd"]["Ios"].as_u64().unwrap());
    let nbd_bytes = reactors_sum(&v, |r| r["IosBySource"]["Nbd"]["Bytes"].as_u64().unwrap());
    assert_eq!((nbd, nbd_bytes), (2 * n, 2 * n * (64 << 10)), "{v}");
    let all = reactors_sum(&v, |r| r["Ios"].as_u64().unwrap());
    assert_eq!(all, 2 * n, "the total is the sum over sources: {v}");
    for r in v["Reactors"].as_array().unwrap() {
        for k in ["Polls", "IdlePolls", "Parks", "BusyNs", "IdleNs"] {
            assert!(r[k].is_u64(), "{k} in {r}");
        }
        assert!(r["IdlePolls"].as_u64() <= r["Polls"].as_u64(), "{r}");
    }
    // Every write went to a new cluster: the metadata thread took them, synced the
    // pool and committed (at least one transaction, at most one per request).
    let m = &v["MetadataThread"];
    assert_eq!(m["Requests"], n, "{m}");
    assert_eq!(m["QueueDepth"], 0, "all answered: {m}");
    assert_eq!(m["BatchSize"]["Sum"], n, "{m}");
    let batches = m["BatchSize"]["Count"].as_u64().unwrap();
    assert!((1..=n).contains(&batches), "{m}");
    for k in ["FdatasyncNs", "CommitNs", "WriterWaitNs", "BatchNs"] {
        assert_eq!(m[k]["Count"], batches, "{k}: one per transaction: {m}");
        assert!(m[k]["Sum"].as_u64().unwrap() > 0, "{k}: {m}");
        assert!(
            m[k]["Max"].as_u64().unwrap() <= m[k]["Sum"].as_u64().unwrap(),
            "{k}: {m}"
        );
    }
    assert_eq!(
        (m["PrepareFailures"].clone(), m["DurabilityFailures"].clone()),
        (json!(0), json!(0))
    );
    // KMS: the calls so far went to the local backend, none failed.
    let k = &v["Kms"];
    let calls = k["Local"]["Calls"].as_u64().unwrap();
    assert!(calls >= 2, "GenerateDataKey and UnwrapDataKey at least: {k}");
    assert_eq!(k["Local"]["Errors"], 0, "{k}");
    assert_eq!(k["Local"]["LatencyNs"]["Count"], calls, "{k}");
    assert_eq!(k["Transit"]["Calls"], 0, "{k}");
    // A copy job (CreateEncryptedCopy of a plaintext disk with data) counts as Job
    // I/O on the reactors.
    let inst = rpc(&data, "CreateInstance", json!({"SystemDisk.SizeBytes": 4 << 20}))["InstanceId"]
        .as_str()
        .unwrap()
        .to_owned();
    let plain = rpc(&data, "CreateDisk", json!({"SizeBytes": 4 << 20, "Encrypted": false}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    rpc(&data, "AttachDisk", json!({"DiskId": plain, "InstanceId": inst}));
    nbd_write_read(&data.join("nbd.sock"), &plain, 0, 4);
    let reply = rpc(&data, "CreateEncryptedCopy", json!({"SourceDiskId": plain}));
    wait_task(reply, |q| rpc(&data, "DescribeTasks", q)).expect("the copy finishes");
    let w = describe(&data);
    let job = reactors_sum(&w, |r| r["IosBySource"]["Job"]["Ios"].as_u64().unwrap());
    let job_bytes = reactors_sum(&w, |r| r["IosBySource"]["Job"]["Bytes"].as_u64().unwrap());
    assert!(
        job > 0 && job_bytes >= 4 * (64 << 10),
        "the copy's reads and writes: {w}"
    );
    let kms_after = w["Kms"]["Local"]["Calls"].as_u64().unwrap();
    assert!(kms_after > calls, "the copy's GenerateDataKey: {w}");
}

#[test]
fn kms_errors_and_throttling_are_counted_per_backend() {
    use sealdisk::{CallOpts, KeyContext, Kms, KmsConfig, QuotaConfig};
    let d = TempDir::new("counters-kms");
    let mut cfg = KmsConfig::local(&d.0);
    cfg.quota = QuotaConfig {
        rate_per_sec: 0.001,
        burst: 2,
    };
    let kms = Kms::open(cfg).unwrap();
    kms.activate("acct1", "cn-hangzhou").unwrap();
    let ctx = KeyContext::new("acct1", "cn-hangzhou", "k-1");
    let (_key, wrapped) = kms.generate_data_key(&ctx, CallOpts::default()).unwrap();
    // Unwrapping under another context fails in the backend (Kms.UnwrapFailed).
    let other = KeyContext::new("acct1", "cn-hangzhou", "k-2");
    assert!(kms.unwrap_data_key(&other, &wrapped, CallOpts::default()).is_err());
    // The burst of 2 is used up: the quota refuses before the backend.
    let e = kms.generate_data_key(&ctx, CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Throttling.KmsQuota");
    let s = kms.stats();
    assert_eq!((s.local.calls, s.local.errors, s.local.throttled), (2, 1, 1), "{s:?}");
    assert_eq!(s.local.latency_ns.count, 2);
    assert!(s.local.latency_ns.sum > 0);
    assert_eq!(s.transit, Default::default());
}
