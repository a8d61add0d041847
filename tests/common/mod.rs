//! Helpers shared by the data-path tests: run requests on a reactor and wait.
#![allow(dead_code)]

pub mod guest;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sealdisk::{BdevRef, BufPool, IoCompletion, IoError, IoOp, IoQueue, IoRequest};
use sealdisk::{ReactorConfig, Reactors};

/// One request for [`run_ios`].
#[derive(Clone, Debug)]
pub enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Flush,
    Unmap { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

/// What came back: the read data (or the write's buffer after completion).
#[derive(Debug)]
pub struct Done {
    pub result: Result<(), IoError>,
    pub data: Vec<u8>,
}

pub fn reactors(cores: &[usize]) -> Reactors {
    let cfg = ReactorConfig {
        cores: cores.to_vec(),
        pool_bytes: 16 << 20,
        ..ReactorConfig::default()
    };
    Reactors::start(&cfg).expect("reactors start")
}

/// The bdev request for `op`, tagged `tag`, on a buffer from `pool` (a read's filled
/// with `fill`, if given).
fn request(pool: &BufPool, op: Op, tag: u64, fill: Option<u8>) -> IoRequest {
    match op {
        Op::Read { offset, len } => {
            let mut b = pool.alloc(len.max(1)).expect("buffer");
            b.set_len(len);
            if let Some(x) = fill {
                b.fill(x);
            }
            IoRequest::read(offset, b, tag)
        }
        Op::Write { offset, data } => {
            let mut b = pool.alloc(data.len().max(1)).expect("buffer");
            b.set_len(data.len());
            b.copy_from_slice(&data);
            IoRequest::write(offset, b, tag)
        }
        Op::Flush => IoRequest::flush(tag),
        Op::Unmap { offset, len } => IoRequest::unmap(offset, len, tag),
        Op::WriteZeroes { offset, len } => IoRequest::write_zeroes(offset, len, tag),
    }
}

/// How long a test waits for a request before it fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// What a completion hands back to a test.
fn done(c: IoCompletion) -> Done {
    Done {
        result: c.result,
        data: c.buf.map(|b| b.to_vec()).unwrap_or_default(),
    }
}

/// Open a channel on reactor `r`, run `ops` one after another, return their
/// results.
pub fn run_ios(reactors: &Reactors, r: usize, bdev: &BdevRef, ops: Vec<Op>) -> Vec<Done> {
    let bdev = bdev.clone();
    reactors
        .call(r, Duration::from_secs(30), move |ctx| {
            let mut q = IoQueue::new(bdev.open_channel(&ctx.chan).expect("open channel"));
            let mut out = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                let tag = i as u64;
                // A read's buffer starts as 0xEE: data the device did not write shows.
                let req = request(&ctx.chan.pool, op, tag, Some(0xEE));
                submit(&mut q, req);
                let c = wait_next(&mut q);
                assert_eq!(c.tag, tag);
                out.push(done(c));
            }
            out
        })
        .expect("reactor answers")
}

/// Like [`run_ios`], but every request is submitted before any is waited for (they
/// overlap, as a guest's do); the results come back in the order of `ops`.
pub fn run_ios_pipelined(reactors: &Reactors, r: usize, bdev: &BdevRef, ops: Vec<Op>) -> Vec<Done> {
    let bdev = bdev.clone();
    reactors
        .call(r, Duration::from_secs(30), move |ctx| {
            let mut q = IoQueue::new(bdev.open_channel(&ctx.chan).expect("open channel"));
            let n = ops.len();
            for (i, op) in ops.into_iter().enumerate() {
                submit(&mut q, request(&ctx.chan.pool, op, i as u64, None));
            }
            let mut out: Vec<Option<Done>> = (0..n).map(|_| None).collect();
            for c in q.drain(IO_TIMEOUT, None).expect("requests complete") {
                let i = c.tag as usize;
                out[i] = Some(done(c));
            }
            out.into_iter()
                .map(|d| d.expect("every request completed once"))
                .collect()
        })
        .expect("reactor answers")
}

/// Submits `req` to `q`, which must take it at once (no back-pressure at a test's depth).
pub fn submit(q: &mut IoQueue, req: IoRequest) {
    let tag = req.tag;
    q.submit(req)
        .unwrap_or_else(|_| panic!("request {tag}: the queue already holds a refused request"));
    assert!(!q.is_blocked(), "request {tag}: back-pressure at a test's depth");
}

/// The next completion on `q` (the oldest reaped); the others stay in the queue.
pub fn wait_next(q: &mut IoQueue) -> IoCompletion {
    let mut v = q.wait(1, IO_TIMEOUT, None);
    assert!(!v.is_empty(), "request did not complete within {IO_TIMEOUT:?}");
    let c = v.remove(0);
    q.recycle(v);
    c
}

/// The completion tagged `tag` on `q`; the others stay in the queue.
pub fn wait_tag(q: &mut IoQueue, tag: u64) -> IoCompletion {
    let t = Instant::now();
    let mut have = 0;
    loop {
        let left = IO_TIMEOUT.saturating_sub(t.elapsed());
        let mut v = q.wait(have + 1, left, None);
        if let Some(i) = v.iter().position(|c| c.tag == tag) {
            let c = v.remove(i);
            q.recycle(v);
            return c;
        }
        have = v.len();
        q.recycle(v);
        assert!(q.in_flight() > 0, "request {tag} is not in flight");
        assert!(
            t.elapsed() < IO_TIMEOUT,
            "request {tag} did not complete within {IO_TIMEOUT:?}"
        );
    }
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn test_key(seed: u8) -> [u8; 64] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
}

pub fn xts(seed: u8) -> Arc<sealdisk::Xts> {
    Arc::new(sealdisk::Xts::new(&test_key(seed)).unwrap())
}

pub fn is_ok(d: &Done) -> bool {
    d.result.is_ok()
}

pub fn op_name(op: &Op) -> IoOp {
    match op {
        Op::Read { .. } => IoOp::Read,
        Op::Write { .. } => IoOp::Write,
        Op::Flush => IoOp::Flush,
        Op::Unmap { .. } => IoOp::Unmap,
        Op::WriteZeroes { .. } => IoOp::WriteZeroes,
    }
}

/// If `reply` names a background task (`TaskId`), waits for it through `describe`
/// (a DescribeTasks call for the task's account) and returns its result, or its error
/// as (code, message). Other replies come back as they are.
pub fn wait_task(
    reply: serde_json::Value,
    mut describe: impl FnMut(serde_json::Value) -> serde_json::Value,
) -> Result<serde_json::Value, (String, String)> {
    let Some(id) = reply.get("TaskId").and_then(|v| v.as_str()).map(str::to_owned) else {
        return Ok(reply);
    };
    let t = Instant::now();
    loop {
        let v = describe(serde_json::json!({ "TaskIds": [id] }));
        let task = &v["TaskSet"]["Task"][0];
        match task["TaskStatus"].as_str() {
            Some("Finished") => return Ok(task["Result"].clone()),
            Some("Failed") => {
                return Err((
                    task["Error"]["Code"].as_str().unwrap_or("").to_owned(),
                    task["Error"]["Message"].as_str().unwrap_or("").to_owned(),
                ))
            }
            Some("Cancelled") => return Err(("OperationCancelled".into(), "cancelled".into())),
            Some("Processing") => {}
            _ => panic!("task {id}: {v}"),
        }
        assert!(t.elapsed() < Duration::from_secs(120), "task {id} did not finish: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A minimal NBD client over a unix socket: fixed-newstyle greeting, no zeroes.
pub fn nbd_hello(sock: &std::path::Path) -> std::os::unix::net::UnixStream {
    use sealdisk::testing::nbd::*;
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut h = [0u8; 18];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), NBD_MAGIC);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

/// Sends option `opt` with `data`.
pub fn nbd_option(s: &mut std::os::unix::net::UnixStream, opt: u32, data: &[u8]) {
    use sealdisk::testing::nbd::IHAVEOPT;
    use std::io::Write;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// One option reply: (type, data).
pub fn nbd_reply(s: &mut std::os::unix::net::UnixStream) -> (u32, Vec<u8>) {
    use std::io::Read;
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    let mut d = vec![0u8; u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (u32::from_be_bytes(r[12..16].try_into().unwrap()), d)
}

/// Greeting and `NBD_OPT_GO` for `export`: the connection in transmission, or the
/// error reply type.
pub fn nbd_go(sock: &std::path::Path, export: &str) -> Result<std::os::unix::net::UnixStream, u32> {
    use sealdisk::testing::nbd::*;
    let mut s = nbd_hello(sock);
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    nbd_option(&mut s, OPT_GO, &d);
    loop {
        match nbd_reply(&mut s) {
            (REP_INFO, _) => continue,
            (REP_ACK, _) => return Ok(s),
            (t, _) => return Err(t),
        }
    }
}

/// A temporary directory `.0`, removed on drop with everything next to it (a daemon's
/// log, `start_daemon`): it lives inside a `tempfile` directory of its own.
pub struct TempDir(pub std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    /// A fresh `$TMPDIR/sealdisk-<name>-XXXXXX/d` (short: unix socket paths beneath it
    /// must fit in 108 bytes).
    pub fn new(name: &str) -> TempDir {
        let outer = tempfile::Builder::new()
            .prefix(&format!("sealdisk-{name}-"))
            .tempdir()
            .unwrap();
        let d = outer.path().join("d");
        std::fs::create_dir(&d).unwrap();
        TempDir(d, outer)
    }
}

/// The control plane in this process over the data directory `dir`: its catalog, a pool
/// file of `pool_size` bytes, the KMS `kms`, data moved on `reactors`, MigrateDisk's
/// file sources beneath `import_dir`.
pub fn control_in(
    dir: &std::path::Path,
    kms: sealdisk::Kms,
    pool_size: u64,
    reactors: &Arc<Reactors>,
    import_dir: Option<std::path::PathBuf>,
) -> Arc<sealdisk::Control> {
    use sealdisk::testing::catalog;
    let db = catalog::open(&dir.join(catalog::CATALOG_FILE)).unwrap();
    let pool = sealdisk::Pool::open(db.clone(), &dir.join("pool.img"), pool_size).unwrap();
    sealdisk::Control::new(
        db,
        pool,
        Arc::new(kms),
        sealdisk::Exports::new(),
        Some(reactors.clone()),
        sealdisk::ControlConfig {
            data_dir: dir.to_owned(),
            qos: sealdisk::QosConfig::default(),
            import_dir,
            import_devices: false,
            vmm_gid: None,
        },
    )
}

/// A `sealdisk serve` child, killed on drop.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `sealdisk serve --data-dir data` with `args` and `env`, stderr appended to
/// `data.log` (next to the directory); returns once the control socket answers.
pub fn start_daemon(bin: &str, data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
    start_daemon_with(bin, data, args, &data.with_extension("log"), |c| {
        c.envs(env.iter().copied());
    })
}

/// [`start_daemon`] with stderr appended to `log_path`, and the command adjusted by
/// `adjust` (environment, more arguments) before it starts. Panics with the log if the
/// daemon exits before it answers.
pub fn start_daemon_with(
    bin: &str,
    data: &std::path::Path,
    args: &[&str],
    log_path: &std::path::Path,
    adjust: impl FnOnce(&mut std::process::Command),
) -> Daemon {
    use std::process::{Command, Stdio};
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--data-dir"])
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    adjust(&mut cmd);
    let mut d = Daemon(cmd.spawn().unwrap());
    let t = Instant::now();
    while sealdisk::Client::connect(&data.join("sealdisk.sock")).is_err() {
        if let Some(st) = d.0.try_wait().unwrap() {
            panic!(
                "daemon exited ({st}): {}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon did not start: {}",
            std::fs::read_to_string(log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

/// One RPC as account `acct1` in `cn-hangzhou`; panics on an error reply.
pub fn rpc(data: &std::path::Path, method: &str, mut params: serde_json::Value) -> serde_json::Value {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    params["AccountId"] = "acct1".into();
    params["RegionId"] = "cn-hangzhou".into();
    c.call(method, params).unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// ActivateKms, an instance with a 4 MiB system disk, and a data disk of `size` bytes
/// (encrypted if asked) attached to it: (instance id, disk id, AttachDisk's reply).
pub fn instance_with_disk(data: &std::path::Path, size: u64, encrypted: bool) -> (String, String, serde_json::Value) {
    use serde_json::json;
    rpc(data, "ActivateKms", json!({}));
    let inst = rpc(data, "CreateInstance", json!({"SystemDisk.SizeBytes": 4 << 20}))["InstanceId"]
        .as_str()
        .unwrap()
        .to_owned();
    let disk = rpc(data, "CreateDisk", json!({"SizeBytes": size, "Encrypted": encrypted}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let att = rpc(data, "AttachDisk", json!({"DiskId": disk, "InstanceId": inst}));
    (inst, disk, att)
}

/// One NBD request in transmission (simple replies): its reply's error and, for a read
/// without error, `read_len` bytes of data.
pub fn nbd_cmd(
    s: &mut std::os::unix::net::UnixStream,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
    read_len: usize,
) -> (u32, Vec<u8>) {
    use sealdisk::testing::nbd::*;
    use std::io::{Read, Write};
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let mut d = Vec::new();
    if err == 0 && read_len > 0 {
        d = vec![0u8; read_len];
        s.read_exact(&mut d).unwrap();
    }
    (err, d)
}

/// An NBD write of `data` at `offset`: the reply's error (0 = done).
pub fn nbd_write(s: &mut std::os::unix::net::UnixStream, cookie: u64, offset: u64, data: &[u8]) -> u32 {
    use sealdisk::testing::nbd::CMD_WRITE;
    nbd_cmd(s, CMD_WRITE, cookie, offset, data.len() as u32, data, 0).0
}

/// An NBD read: (error, data).
pub fn nbd_read(s: &mut std::os::unix::net::UnixStream, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
    use sealdisk::testing::nbd::CMD_READ;
    nbd_cmd(s, CMD_READ, cookie, offset, len, &[], len as usize)
}
