//! SIGKILL crash harness against the real daemon (`sealdisk serve`, NBD over its socket).
//!
//! Every cycle: pipelined 4 KiB writes (queue depth [`QD`], never two in flight to one
//! block) with FLUSH, FUA and whole-cluster TRIMs into an encrypted data disk (the
//! "victim"), while a second thread runs CreateSnapshot, CreateDisk from the snapshot,
//! Attach/Detach, ResetDisk, DeleteDisk and DeleteSnapshot on a clone; then `kill -9`,
//! restart on the same data directory, and check:
//!
//! * every block reads back as its last durable version or a later one (durable: a FUA
//!   write when acknowledged; any write acknowledged before a FLUSH was *sent*, once that
//!   FLUSH is acknowledged); never-written blocks read as zeros;
//! * every object whose Create returned success exists, every one whose Delete returned
//!   success is gone, an interrupted operation happened wholly or not at all (attachments
//!   match the data path, ResetDisk restored all of the snapshot's data or none, at most
//!   one unexplained object per interrupted Create), and `CheckPool` is consistent;
//! * live, before the kill: a snapshot's clone holds, per sampled block, a version between
//!   the newest acknowledged before CreateSnapshot and the newest sent before it returned,
//!   and a ResetDisk that returned success restored the snapshot's markers.
//!
//! The kill comes at a uniform random moment, or aimed: just after a victim snapshot (the
//! copy-on-write storm), or just after a write to a freshly trimmed cluster became durable
//! while that cluster's first write was still unacknowledged (a crash then tests that the
//! later write does not depend on an allocation not yet committed). Each daemon start gets
//! a random `SEALDISK_FAULTS` profile: none, or delays in the metadata thread's fdatasync
//! and commit that widen its windows. The data directory persists over the cycles of one
//! run (recovery after recovery).
//!
//! Environment: `SEALDISK_CRASH_CYCLES` (default 10), `SEALDISK_CRASH_SEED` (default
//! random, printed; timing is not replayed), `SEALDISK_CRASH_KILL` (`uniform`, `snapshot`
//! or `burst` for every cycle), `SEALDISK_CRASH_FAULTS` (one `SEALDISK_FAULTS` spec for
//! every start, `none` for none). `tools/crash-harness.sh` runs it long in release mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use sealdisk::testing::nbd::*;
use sealdisk::{Client, RpcError};

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const MIB: u64 = 1 << 20;
/// Size of the victim (and of its snapshots and clones).
const DISK_BYTES: u64 = 64 * MIB;
const POOL_SIZE: &str = "256M";
/// The pool's cluster (allocation and copy-on-write unit, `volume::DEFAULT_CLUSTER`).
const CLUSTER: u64 = 256 << 10;
const BLOCK: u64 = 4096;
const CLUSTERS: usize = (DISK_BYTES / CLUSTER) as usize;
const SLOTS: usize = (CLUSTER / BLOCK) as usize;
/// Working-set blocks per cluster: 8 × 256 clusters = 2048 blocks.
const WS_PER_CLUSTER: usize = 8;
/// Requests in flight on the writer's connection.
const QD: usize = 32;
/// A FLUSH after about this many writes (uniform in half to one and a half times).
const FLUSH_EVERY: u32 = 48;
const FUA_ONE_IN: u32 = 8;
const TRIM_ONE_IN: u32 = 150;
/// A burst: writes to every working-set block of one cluster (after each TRIM on the
/// trimmed cluster; else on a random cluster, one op in [`BURST_ONE_IN`]), the first at
/// once. The first goes to the metadata thread (a first write, or copy-on-write after a
/// snapshot); the others should arrive while its batch is between publishing the cluster
/// and committing it. On a trimmed cluster they go at random moments over a half to one
/// and a quarter of the recent latency of such first writes (the metadata thread's queue
/// and batch); on a random cluster over 0.3 ms up to 2 ms plus 2.5 times the injected
/// commit delay.
const BURST_ONE_IN: u32 = 60;
const BURST_FUA_ONE_IN: u32 = 2;
/// Working-set blocks read from each snapshot's clone (against the snapshot window).
const SNAP_SAMPLE: usize = 32;
/// Never-written victim blocks read back after each restart (must be zeros).
const NON_WS_SAMPLE: usize = 128;
/// Marker blocks on each clone (ResetDisk's all-or-nothing check), in these clusters.
const MARKER_CLUSTERS: [usize; 4] = [3, 77, 150, 251];
/// The kill lands this long (uniform, ms) after the writer and the control thread start...
const KILL_MS: (u64, u64) = (50, 800);
/// ...or (one cycle in three) this long (uniform, ms, plus four times the injected commit
/// delay) after the first CreateSnapshot of the victim the control thread gets acknowledged:
/// inside the copy-on-write storm that follows (every cluster shared)...
const AIMED_SNAPSHOT_MS: (u64, u64) = (0, 20);
/// ...or (one cycle in three) this long (uniform, µs) after the writer sees a write to a
/// freshly trimmed cluster become durable (FUA acknowledged, or acknowledged and flushed)
/// while that cluster's first write is still unacknowledged: a durable write ordered
/// ahead of the allocation it depends on, the moment a crash tests that ordering.
const AIMED_BURST_US: (u64, u64) = (0, 300);
const KILL_MODES: [&str; 3] = ["uniform", "snapshot", "burst"];
/// Fault profiles for the daemon's metadata thread (`SEALDISK_FAULTS`), chosen per daemon
/// start: delays widen the windows between preparing a batch and its commit being durable.
const FAULT_PROFILES: [&str; 5] = [
    "",
    "",
    "commit:delay=1ms",
    "commit:delay=3ms",
    "pool_sync:delay=2ms,commit:delay=2ms",
];
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// A cycle (restart, checks, cleanup, load) taking longer is a hang: the watchdog kills.
const CYCLE_LIMIT: Duration = Duration::from_secs(120);
const DAEMON_START_LIMIT: Duration = Duration::from_secs(30);

const MAGIC_DATA: [u8; 8] = *b"SDCRASH1";
const MAGIC_MARK: [u8; 8] = *b"SDMARKR1";

// ---- temp dir, daemon process, watchdog -----------------------------------------

/// Removed when dropped, except while panicking (kept for a post-mortem).
/// A temporary directory (`tempfile`), removed on drop unless the test failed: then
/// it is kept for inspection.
struct TempDir(PathBuf, Option<tempfile::TempDir>);
impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.1.take() {
                eprintln!("crash harness: kept {} for inspection", t.keep().display());
            }
        }
    }
}

fn tempdir(tag: &str) -> TempDir {
    let t = tempfile::Builder::new()
        .prefix(&format!("sealdisk-crash-{tag}-"))
        .tempdir()
        .unwrap();
    TempDir(t.path().to_path_buf(), Some(t))
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Starts `serve` with `faults` (a `SEALDISK_FAULTS` spec, "" for none).
fn start_daemon(dir: &Path, log: &Path, faults: &str) -> (Daemon, Client) {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(BIN);
    if faults.is_empty() {
        cmd.env_remove("SEALDISK_FAULTS");
    } else {
        cmd.env("SEALDISK_FAULTS", faults);
    }
    let child = cmd
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--cores", "0", "--pool-size", POOL_SIZE, "--no-qos"])
        // The control thread makes about 8 KMS calls per loop; the quota is not under test.
        .args(["--kms-quota-rate", "100000", "--kms-quota-burst", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        log: log.to_owned(),
    };
    let sock = dir.join("sealdisk.sock");
    let t = Instant::now();
    loop {
        if let Ok(c) = Client::connect(&sock) {
            return (d, c);
        }
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("daemon exited while starting ({st}):\n{}", d.log_text());
        }
        assert!(
            t.elapsed() < DAEMON_START_LIMIT,
            "daemon did not start in {DAEMON_START_LIMIT:?}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the daemon if it is not cancelled (dropped) within its limit, so that a hung
/// daemon turns into connection errors instead of a hung test.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<bool>>,
}

impl Watchdog {
    fn arm(pid: i32, limit: Duration, what: String) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || match rx.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                eprintln!("crash harness: watchdog: {what} took longer than {limit:?}; killing the daemon");
                // SAFETY: kill(2) on the daemon, which the main thread reaps only after
                // cancelling this watchdog.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                true
            }
            _ => false,
        });
        Watchdog {
            cancel: Some(tx),
            thread: Some(thread),
        }
    }

    /// Cancels; true if it had fired.
    fn disarm(mut self) -> bool {
        self.cancel.take();
        self.thread.take().map(|t| t.join().unwrap_or(true)).unwrap_or(false)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.cancel.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- RPC -------------------------------------------------------------------------

/// An RPC's outcome as the harness sees it.
enum Res {
    Ok(Value),
    /// An error reply: the daemon refused (nothing changed).
    Refused(RpcError),
    /// No reply: the daemon died (the operation is in doubt).
    Dead(RpcError),
}

fn rpc(c: &mut Client, method: &str, params: Value) -> Res {
    match c.call(method, params) {
        Ok(v) => Res::Ok(v),
        Err(e) if e.code == "Rpc.Transport" => Res::Dead(e),
        Err(e) => Res::Refused(e),
    }
}

/// Like [`rpc`], retrying `IncorrectDiskStatus.InUse` (a detached volume's last NBD
/// channel still draining) for up to 10 s.
fn rpc_retry(c: &mut Client, method: &str, params: Value) -> Res {
    let t = Instant::now();
    loop {
        match rpc(c, method, params.clone()) {
            Res::Refused(e) if e.code == "IncorrectDiskStatus.InUse" && t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// An RPC that must succeed (checks and cleanup on a live daemon).
fn must(c: &mut Client, method: &str, params: Value) -> Value {
    match rpc_retry(c, method, params.clone()) {
        Res::Ok(v) => v,
        Res::Refused(e) | Res::Dead(e) => panic!("{method} {params}: {} ({})", e.code, e.message),
    }
}

fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_owned()
}

fn list(v: &Value, outer: &str, inner: &str) -> Vec<Value> {
    v[outer][inner]
        .as_array()
        .unwrap_or_else(|| panic!("{outer}.{inner} in {v}"))
        .clone()
}

// ---- NBD client ------------------------------------------------------------------

struct Nbd {
    s: UnixStream,
}

fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    encode_request(&Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    })
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Fixed-newstyle handshake and NBD_OPT_GO: `Ok(Err(reply type))` if the export was
/// refused (`REP_ERR_UNKNOWN` for a detached disk).
fn nbd_connect(sock: &Path, export: &str) -> std::io::Result<Result<Nbd, u32>> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut h = [0u8; 18];
    s.read_exact(&mut h)?;
    if h[0..8] != NBD_MAGIC.to_be_bytes() || h[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(bad(format!("bad NBD greeting {h:02x?}")));
    }
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    s.write_all(&m)?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if h[0..8] != OPT_REPLY_MAGIC.to_be_bytes() {
            return Err(bad(format!("bad option reply {h:02x?}")));
        }
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; n];
        s.read_exact(&mut data)?;
        match t {
            REP_INFO => {
                if data.len() >= 10 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    if size != DISK_BYTES {
                        return Err(bad(format!("export {export} has size {size}, not {DISK_BYTES}")));
                    }
                }
            }
            REP_ACK => return Ok(Ok(Nbd { s })),
            t => return Ok(Err(t)),
        }
    }
}

impl Nbd {
    /// A reply header: (error, cookie).
    fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut h = [0u8; REPLY_LEN];
        self.s.read_exact(&mut h)?;
        if h[0..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(bad(format!("bad reply magic {h:02x?}")));
        }
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// One write, waited for: the NBD error (0 = acknowledged).
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<u32> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let mut m = request(CMD_WRITE, flags, 1, offset, data.len() as u32).to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m)?;
        let (err, cookie) = self.reply()?;
        if cookie != 1 {
            return Err(bad(format!("reply for cookie {cookie}, expected 1")));
        }
        Ok(err)
    }

    /// 4 KiB reads of `offsets`, pipelined 64 at a time.
    fn read_blocks(&mut self, offsets: &[u64]) -> std::io::Result<Vec<Vec<u8>>> {
        let mut out = vec![Vec::new(); offsets.len()];
        for (ci, chunk) in offsets.chunks(64).enumerate() {
            let base = ci * 64;
            let mut m = Vec::with_capacity(chunk.len() * REQUEST_LEN);
            for (i, &o) in chunk.iter().enumerate() {
                m.extend_from_slice(&request(CMD_READ, 0, (base + i) as u64, o, BLOCK as u32));
            }
            self.s.write_all(&m)?;
            for _ in chunk {
                let (err, cookie) = self.reply()?;
                let i = cookie as usize;
                if i < base || i >= base + chunk.len() || !out[i].is_empty() {
                    return Err(bad(format!("reply for unexpected cookie {cookie}")));
                }
                if err != 0 {
                    return Err(bad(format!("read at {:#x} failed with NBD error {err}", offsets[i])));
                }
                let mut d = vec![0u8; BLOCK as usize];
                self.s.read_exact(&mut d)?;
                out[i] = d;
            }
        }
        Ok(out)
    }

    /// NBD_CMD_DISC, then wait for the server to close.
    fn disconnect(mut self) -> std::io::Result<()> {
        self.s.write_all(&request(CMD_DISC, 0, 0, 0, 0))?;
        let mut b = [0u8; 64];
        match self.s.read(&mut b)? {
            0 => Ok(()),
            n => Err(bad(format!("{n} unexpected bytes after NBD_CMD_DISC"))),
        }
    }
}

// ---- block contents --------------------------------------------------------------

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A tagged 4 KiB block: magic, run, two u32 and a u64 of header, filler, crc32c.
fn tagged(magic: [u8; 8], run: u64, a: u32, b: u32, c: u64) -> Vec<u8> {
    let mut d = vec![0u8; BLOCK as usize];
    d[0..8].copy_from_slice(&magic);
    d[8..16].copy_from_slice(&run.to_le_bytes());
    d[16..20].copy_from_slice(&a.to_le_bytes());
    d[20..24].copy_from_slice(&b.to_le_bytes());
    d[24..32].copy_from_slice(&c.to_le_bytes());
    let mut x = mix(run ^ mix(a as u64 ^ mix(b as u64 ^ mix(c)))) | 1;
    for ch in d[32..4092].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ch.copy_from_slice(&x.to_le_bytes()[..ch.len()]);
    }
    let crc = crc32c::crc32c(&d[..4092]);
    d[4092..].copy_from_slice(&crc.to_le_bytes());
    d
}

/// Version `v` of working-set block `b`, written in `cycle`.
fn data_block(run: u64, b: usize, v: u64, cycle: u32) -> Vec<u8> {
    tagged(MAGIC_DATA, run, b as u32, cycle, v)
}

/// Marker `idx` on a clone: `phase` 1 (before the clone's snapshot) or 2 (after).
fn marker_block(run: u64, idx: usize, phase: u32, iter: u64) -> Vec<u8> {
    tagged(MAGIC_MARK, run, idx as u32, phase, iter)
}

/// What a block read back as.
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Zero,
    Data { b: usize, v: u64, cycle: u32 },
    Mark { idx: usize, phase: u32, iter: u64 },
    Junk(String),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Zero => write!(f, "zeros"),
            Seen::Data { b, v, cycle } => write!(f, "seq {v} of block {b} (written in cycle {cycle})"),
            Seen::Mark { idx, phase, iter } => write!(f, "marker {idx} phase {phase} of loop {iter}"),
            Seen::Junk(s) => write!(f, "{s}"),
        }
    }
}

fn decode(run: u64, d: &[u8]) -> Seen {
    if d.iter().all(|&x| x == 0) {
        return Seen::Zero;
    }
    let crc_ok = crc32c::crc32c(&d[..4092]).to_le_bytes() == d[4092..4096];
    let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().unwrap());
    let magic = &d[0..8];
    if crc_ok && u64_at(8) == run && (magic == MAGIC_DATA || magic == MAGIC_MARK) {
        let (a, b, c) = (u32_at(16), u32_at(20), u64_at(24));
        let again = tagged(magic.try_into().unwrap(), run, a, b, c);
        if again == d {
            return if magic == MAGIC_DATA {
                Seen::Data {
                    b: a as usize,
                    v: c,
                    cycle: b,
                }
            } else {
                Seen::Mark {
                    idx: a as usize,
                    phase: b,
                    iter: c,
                }
            };
        }
    }
    let zeros = d.chunks(512).filter(|s| s.iter().all(|&x| x == 0)).count();
    Seen::Junk(format!(
        "unrecognised data (magic {:02x?}, crc {}, header block {} cycle {} seq {}, {zeros}/8 zero sectors: \
         torn or foreign)",
        magic,
        if crc_ok { "ok" } else { "bad" },
        u32_at(16),
        u32_at(20),
        u64_at(24)
    ))
}

// ---- layout ----------------------------------------------------------------------

struct Layout {
    /// Offset of each working-set block.
    ws: Vec<u64>,
    /// Working-set blocks of each cluster.
    by_cluster: Vec<Vec<usize>>,
    /// Blocks never written on the victim.
    non_ws: Vec<u64>,
    /// Marker offsets on clones (never written on the victim).
    markers: Vec<u64>,
}

impl Layout {
    fn new(rng: &mut StdRng) -> Layout {
        let mut ws = Vec::new();
        let mut by_cluster = Vec::new();
        let mut non_ws = Vec::new();
        let mut markers = Vec::new();
        for c in 0..CLUSTERS {
            let mut slots: Vec<usize> = sample(rng, SLOTS, WS_PER_CLUSTER).into_vec();
            slots.sort_unstable();
            let mut mine = Vec::new();
            for &s in &slots {
                mine.push(ws.len());
                ws.push(c as u64 * CLUSTER + s as u64 * BLOCK);
            }
            by_cluster.push(mine);
            let free: Vec<usize> = (0..SLOTS).filter(|s| !slots.contains(s)).collect();
            if MARKER_CLUSTERS.contains(&c) {
                markers.push(c as u64 * CLUSTER + free[free.len() / 2] as u64 * BLOCK);
            }
            non_ws.extend(free.iter().map(|&s| c as u64 * CLUSTER + s as u64 * BLOCK));
        }
        Layout {
            ws,
            by_cluster,
            non_ws,
            markers,
        }
    }

    fn cluster_of(&self, b: usize) -> u64 {
        self.ws[b] / CLUSTER
    }
}

// ---- the writer's model ----------------------------------------------------------

/// How a block's durable version became durable.
#[derive(Clone, Copy, Debug, PartialEq)]
enum By {
    /// Never written: zeros.
    Initial,
    /// Read back after the restart that ended this cycle.
    ReadBack(u32),
    /// Its FUA write (or TRIM) was acknowledged in this cycle.
    Fua(u32),
    /// Acknowledged before a FLUSH was sent that was acknowledged in this cycle.
    Flush(u32),
}

/// One version of a block: data with sequence number `v`, or zeros (a TRIM).
#[derive(Clone, Copy, Debug)]
struct Ver {
    v: u64,
    zero: bool,
    cycle: u32,
    fua: bool,
    /// Ack order (the model's event counter) when acknowledged.
    acked: Option<u64>,
    failed: bool,
}

impl std::fmt::Display for Ver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.v == 0 {
            return write!(f, "seq 0 (never written: zeros)");
        }
        write!(
            f,
            "seq {}{}{} cycle {} {}",
            self.v,
            if self.zero { " (trim: zeros)" } else { "" },
            if self.fua { " FUA" } else { "" },
            self.cycle,
            match (self.acked, self.failed) {
                (_, true) => "failed",
                (Some(_), _) => "acknowledged",
                (None, _) => "unacknowledged (in flight at the kill)",
            }
        )
    }
}

struct Blk {
    durable: Ver,
    by: By,
    /// Versions after `durable`, oldest first, acknowledged or not.
    later: Vec<Ver>,
    busy: bool,
    next_v: u64,
    /// Newest acknowledged (or read-back) version.
    acked_v: u64,
    /// Newest version sent.
    sent_v: u64,
    /// Versions that are zeros (0: never written).
    zeros: Vec<u64>,
}

enum Pend {
    Write { b: usize, v: u64, fua: bool },
    Trim { bs: Vec<(usize, u64)>, fua: bool },
    Flush { at: u64 },
}

#[derive(Clone, Copy, Default, Debug)]
struct WStats {
    writes_sent: u64,
    writes_acked: u64,
    fua_acked: u64,
    flushes_sent: u64,
    flushes_acked: u64,
    trims_sent: u64,
    trims_acked: u64,
    /// Most requests in flight at once.
    max_in_flight: u64,
}

impl WStats {
    fn add(&mut self, o: &WStats) {
        self.writes_sent += o.writes_sent;
        self.writes_acked += o.writes_acked;
        self.fua_acked += o.fua_acked;
        self.flushes_sent += o.flushes_sent;
        self.flushes_acked += o.flushes_acked;
        self.trims_sent += o.trims_sent;
        self.trims_acked += o.trims_acked;
        self.max_in_flight = self.max_in_flight.max(o.max_in_flight);
    }
}

struct Model {
    run: u64,
    cycle: u32,
    blocks: Vec<Blk>,
    by_cluster: Vec<Vec<usize>>,
    inflight: HashMap<u64, Pend>,
    /// Acknowledgements processed so far.
    events: u64,
    next_cookie: u64,
    writes_since_flush: u32,
    flush_at: u32,
    /// Blocks to write and when (µs after the burst's first write), in time order.
    burst: std::collections::VecDeque<(u64, usize)>,
    /// When the burst's first write was sent.
    burst_start: Option<Instant>,
    /// The burst is on a cluster the writer just trimmed (its first write is a first write).
    burst_fresh: bool,
    /// The injected commit delay of the daemon under load (ms), for the burst spread.
    fault_ms: u64,
    /// Running average of the latency of a trimmed cluster's first write (µs).
    fresh_latency_us: u64,
    /// The current burst on a trimmed cluster: its first write and the others sent.
    fresh: Option<Fresh>,
    /// Told when a write of `fresh` is durable before its first write is acknowledged.
    overtaken: Option<mpsc::Sender<Instant>>,
    st: WStats,
    errors: Vec<String>,
    /// The writer's connection is gone (and when).
    dead: Option<(Instant, String)>,
}

struct Shared {
    m: Mutex<Model>,
    cv: Condvar,
}

/// A burst on a freshly trimmed cluster.
struct Fresh {
    /// (block, version) of its first write.
    first: (usize, u64),
    /// (block, version) of the writes after it.
    rest: Vec<(usize, u64)>,
    /// `overtaken` was told.
    told: bool,
    /// When its first write was sent (until its reply, which samples the latency).
    sent: Option<Instant>,
}

impl Model {
    fn new(run: u64, layout: &Layout) -> Model {
        let v0 = Ver {
            v: 0,
            zero: true,
            cycle: 0,
            fua: false,
            acked: Some(0),
            failed: false,
        };
        Model {
            run,
            cycle: 0,
            blocks: (0..layout.ws.len())
                .map(|_| Blk {
                    durable: v0,
                    by: By::Initial,
                    later: Vec::new(),
                    busy: false,
                    next_v: 1,
                    acked_v: 0,
                    sent_v: 0,
                    zeros: vec![0],
                })
                .collect(),
            by_cluster: layout.by_cluster.clone(),
            inflight: HashMap::new(),
            events: 0,
            next_cookie: 1,
            writes_since_flush: 0,
            flush_at: FLUSH_EVERY,
            burst: Default::default(),
            burst_start: None,
            burst_fresh: false,
            fault_ms: 0,
            fresh_latency_us: 2000,
            fresh: None,
            overtaken: None,
            st: WStats::default(),
            errors: Vec::new(),
            dead: None,
        }
    }

    fn new_version(&mut self, b: usize, zero: bool, fua: bool) -> u64 {
        let cycle = self.cycle;
        let k = &mut self.blocks[b];
        let v = k.next_v;
        k.next_v += 1;
        k.busy = true;
        k.sent_v = v;
        if zero {
            k.zeros.push(v);
        }
        k.later.push(Ver {
            v,
            zero,
            cycle,
            fua,
            acked: None,
            failed: false,
        });
        v
    }

    /// Chooses and registers the next request; its bytes.
    fn next_request(&mut self, rng: &mut StdRng, offsets: &[u64]) -> Vec<u8> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        if self.writes_since_flush >= self.flush_at {
            self.writes_since_flush = 0;
            self.flush_at = rng.gen_range(FLUSH_EVERY / 2..=FLUSH_EVERY * 3 / 2);
            self.inflight.insert(cookie, Pend::Flush { at: self.events });
            self.st.flushes_sent += 1;
            return request(CMD_FLUSH, 0, cookie, 0, 0).to_vec();
        }
        // The burst's next write, once due and its block idle (after the TRIM that began it).
        if let Some(&(after, b)) = self.burst.front() {
            let due = self
                .burst_start
                .is_none_or(|t| t + Duration::from_micros(after) <= Instant::now());
            if due && !self.blocks[b].busy {
                self.burst.pop_front();
                let first = self.burst_start.is_none();
                if first {
                    self.burst_start = Some(Instant::now());
                }
                if self.burst.is_empty() {
                    self.burst_start = None;
                }
                let fua = rng.gen_ratio(1, BURST_FUA_ONE_IN);
                let req = self.write(cookie, b, fua, offsets);
                let v = self.blocks[b].sent_v;
                match (&mut self.fresh, first && self.burst_fresh) {
                    (_, true) => {
                        self.fresh = Some(Fresh {
                            first: (b, v),
                            rest: Vec::new(),
                            told: false,
                            sent: Some(Instant::now()),
                        })
                    }
                    (Some(f), false) if self.burst_fresh => f.rest.push((b, v)),
                    _ => {}
                }
                return req;
            }
        } else if rng.gen_ratio(1, BURST_ONE_IN) {
            let c = rng.gen_range(0..CLUSTERS);
            self.plan_burst(rng, c, false);
        }
        if self.burst.is_empty() && rng.gen_ratio(1, TRIM_ONE_IN) {
            let c = rng.gen_range(0..CLUSTERS);
            if self.by_cluster[c].iter().all(|&b| !self.blocks[b].busy) {
                let fua = rng.gen_bool(0.5);
                self.plan_burst(rng, c, true);
                let bs: Vec<(usize, u64)> = self.by_cluster[c]
                    .clone()
                    .into_iter()
                    .map(|b| (b, self.new_version(b, true, fua)))
                    .collect();
                self.inflight.insert(cookie, Pend::Trim { bs, fua });
                self.st.trims_sent += 1;
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                return request(CMD_TRIM, flags, cookie, c as u64 * CLUSTER, CLUSTER as u32).to_vec();
            }
        }
        let b = loop {
            let b = rng.gen_range(0..self.blocks.len());
            if !self.blocks[b].busy {
                break b;
            }
        };
        let fua = rng.gen_ratio(1, FUA_ONE_IN);
        self.write(cookie, b, fua, offsets)
    }

    fn plan_burst(&mut self, rng: &mut StdRng, c: usize, fresh: bool) {
        let (lo, hi) = if fresh {
            let l = self.fresh_latency_us.max(500);
            (l / 2, l * 5 / 4)
        } else {
            (0, rng.gen_range(300..=2000 + 2500 * self.fault_ms))
        };
        let mut plan: Vec<(u64, usize)> = self.by_cluster[c]
            .iter()
            .enumerate()
            .map(|(i, &b)| (if i == 0 { 0 } else { rng.gen_range(lo..=hi) }, b))
            .collect();
        plan.sort_unstable();
        self.burst.extend(plan);
        self.burst_start = None;
        self.burst_fresh = fresh;
        self.fresh = None;
    }

    /// Tells `overtaken` (once per burst) if a later write of the fresh burst is durable
    /// while its first write is not yet acknowledged.
    fn check_overtaken(&mut self) {
        let Some(f) = &mut self.fresh else { return };
        if self.blocks[f.first.0].acked_v >= f.first.1 {
            if let Some(t) = f.sent.take() {
                let us = t.elapsed().as_micros() as u64;
                self.fresh_latency_us = (3 * self.fresh_latency_us + us) / 4;
            }
            return;
        }
        if f.told {
            return;
        }
        if f.rest.iter().any(|&(b, v)| self.blocks[b].durable.v >= v) {
            f.told = true;
            if let Some(tx) = &self.overtaken {
                let _ = tx.send(Instant::now());
            }
        }
    }

    fn write(&mut self, cookie: u64, b: usize, fua: bool, offsets: &[u64]) -> Vec<u8> {
        let v = self.new_version(b, false, fua);
        self.inflight.insert(cookie, Pend::Write { b, v, fua });
        self.st.writes_sent += 1;
        self.writes_since_flush += 1;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let mut m = request(CMD_WRITE, flags, cookie, offsets[b], BLOCK as u32).to_vec();
        m.extend_from_slice(&data_block(self.run, b, v, self.cycle));
        m
    }

    fn make_durable(&mut self, b: usize, v: u64, by: By) {
        let k = &mut self.blocks[b];
        if v <= k.durable.v {
            return;
        }
        let ver = *k.later.iter().find(|x| x.v == v).expect("a later version");
        k.durable = ver;
        k.by = by;
        k.later.retain(|x| x.v > v);
    }

    /// A version's reply: acknowledged (`err` 0) or failed.
    fn settle(&mut self, b: usize, v: u64, err: u32, what: &str) -> bool {
        let ack = self.events;
        let k = &mut self.blocks[b];
        k.busy = false;
        let ver = k.later.iter_mut().find(|x| x.v == v).expect("an in-flight version");
        if err != 0 {
            ver.failed = true;
            self.errors.push(format!(
                "{what} of block {b} (seq {v}, cycle {}) failed with NBD error {err}",
                self.cycle
            ));
            return false;
        }
        ver.acked = Some(ack);
        k.acked_v = v;
        true
    }

    fn on_reply(&mut self, cookie: u64, err: u32) {
        let Some(p) = self.inflight.remove(&cookie) else {
            self.errors.push(format!("reply for unknown cookie {cookie}"));
            return;
        };
        if err == 0 {
            self.events += 1;
        }
        let cycle = self.cycle;
        match p {
            Pend::Write { b, v, fua } => {
                if self.settle(b, v, err, "write") {
                    self.st.writes_acked += 1;
                    if fua {
                        self.st.fua_acked += 1;
                        self.make_durable(b, v, By::Fua(cycle));
                    }
                }
            }
            Pend::Trim { bs, fua } => {
                let mut ok = false;
                for (b, v) in bs {
                    ok = self.settle(b, v, err, "trim");
                    if ok && fua {
                        self.make_durable(b, v, By::Fua(cycle));
                    }
                }
                if ok {
                    self.st.trims_acked += 1;
                }
            }
            Pend::Flush { at } => {
                if err != 0 {
                    self.errors
                        .push(format!("FLUSH failed with NBD error {err} (cycle {cycle})"));
                    return;
                }
                self.st.flushes_acked += 1;
                for b in 0..self.blocks.len() {
                    let newest = self.blocks[b]
                        .later
                        .iter()
                        .rev()
                        .find(|x| x.acked.is_some_and(|a| a <= at))
                        .map(|x| x.v);
                    if let Some(v) = newest {
                        self.make_durable(b, v, By::Flush(cycle));
                    }
                }
            }
        }
        self.check_overtaken();
    }

    /// Checks block `b` as read back after a restart; the version it matched.
    fn check(&self, b: usize, seen: &Seen) -> Option<Ver> {
        let k = &self.blocks[b];
        let mut allowed = std::iter::once(&k.durable).chain(k.later.iter());
        let hit = match seen {
            Seen::Zero => allowed.find(|x| x.zero),
            Seen::Data { b: sb, v, cycle } if *sb == b => allowed.find(|x| !x.zero && x.v == *v && x.cycle == *cycle),
            _ => None,
        };
        hit.copied()
    }

    /// After a successful check: what was read is the new durable version.
    fn adopt(&mut self, b: usize, ver: Ver) {
        let cycle = self.cycle;
        let k = &mut self.blocks[b];
        k.durable = Ver {
            acked: Some(0),
            fua: false,
            failed: false,
            ..ver
        };
        k.by = By::ReadBack(cycle);
        k.later.clear();
        k.busy = false;
        k.acked_v = ver.v;
    }
}

fn lost_message(m: &Model, layout: &Layout, b: usize, seen: &Seen, seed: u64) -> String {
    let k = &m.blocks[b];
    let by = match k.by {
        By::Initial => "never written: zeros".to_string(),
        By::ReadBack(c) => format!("read back after the restart of cycle {c}"),
        By::Fua(c) => format!("its FUA write was acknowledged in cycle {c}"),
        By::Flush(c) => format!("acknowledged before a FLUSH acknowledged in cycle {c}"),
    };
    let later: Vec<String> = k.later.iter().map(|v| v.to_string()).collect();
    format!(
        "lost write: block {b} (offset {:#x}, cluster {}), cycle {}, seed {seed}: expected durable {} ({by}) \
         or a later version [{}], got {seen}",
        layout.ws[b],
        layout.cluster_of(b),
        m.cycle,
        k.durable,
        later.join("; ")
    )
}

fn writer_send(sh: Arc<Shared>, mut w: UnixStream, mut rng: StdRng, offsets: Arc<Layout>) {
    loop {
        let msg = {
            let mut m = sh.m.lock().unwrap();
            while m.inflight.len() >= QD && m.dead.is_none() {
                m = sh.cv.wait_timeout(m, Duration::from_millis(200)).unwrap().0;
            }
            if m.dead.is_some() {
                return;
            }
            let r = m.next_request(&mut rng, &offsets.ws);
            m.st.max_in_flight = m.st.max_in_flight.max(m.inflight.len() as u64);
            r
        };
        if let Err(e) = w.write_all(&msg) {
            let mut m = sh.m.lock().unwrap();
            if m.dead.is_none() {
                m.dead = Some((Instant::now(), format!("send: {e}")));
            }
            sh.cv.notify_all();
            return;
        }
    }
}

fn writer_recv(sh: Arc<Shared>, r: UnixStream) {
    let mut n = Nbd { s: r };
    loop {
        let res = n.reply();
        let mut m = sh.m.lock().unwrap();
        match res {
            Ok((err, cookie)) => m.on_reply(cookie, err),
            Err(e) => {
                if m.dead.is_none() {
                    m.dead = Some((Instant::now(), format!("receive: {e}")));
                }
                sh.cv.notify_all();
                return;
            }
        }
        sh.cv.notify_all();
    }
}

// ---- the control thread ----------------------------------------------------------

const STEPS: [&str; 14] = [
    "CreateSnapshot of the victim",
    "CreateDisk from that snapshot",
    "AttachDisk of the clone",
    "NBD: read the clone, write markers phase 1 (FUA)",
    "CreateSnapshot of the clone",
    "NBD: write markers phase 2 (FUA), disconnect",
    "DetachDisk of the clone",
    "ResetDisk of the clone to its snapshot",
    "AttachDisk of the clone",
    "NBD: read back the reset markers",
    "DetachDisk of the clone",
    "DeleteDisk of the clone",
    "DeleteSnapshot of the clone's snapshot",
    "DeleteSnapshot of the victim's snapshot",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tri {
    Yes,
    No,
    Either,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    Zero,
    M { phase: u32, iter: u64 },
}

/// Possible whole-disk marker states; each lists the allowed contents per marker block.
type Alts = Vec<Vec<BTreeSet<Mark>>>;

struct DiskExp {
    present: Tri,
    attached: Tri,
    alts: Alts,
    /// A ResetDisk in doubt appended the snapshot's states from this index.
    reset_from: Option<usize>,
}

struct SnapExp {
    present: Tri,
    /// The marker states of its source (snapshots of clones).
    alts: Option<Alts>,
}

/// What the daemon must show after the restart, from the replies the control thread got.
#[derive(Default)]
struct CtlState {
    snaps: BTreeMap<String, SnapExp>,
    disks: BTreeMap<String, DiskExp>,
    /// Source disk of each CreateSnapshot in doubt.
    unknown_snaps: Vec<String>,
    /// Source snapshot of each CreateDisk in doubt.
    unknown_disks: Vec<String>,
}

#[derive(Clone, Copy, Default, Debug)]
struct OpCount {
    acked: u64,
    refused: u64,
    in_doubt: u64,
}

/// Per snapshot of the victim: sampled blocks and, per block, the window of versions its
/// clone may hold (newest acknowledged before CreateSnapshot was sent .. newest sent
/// before it returned) and whether a TRIM (zeros) lies in it.
struct Window {
    snap: String,
    samples: Vec<(usize, u64, u64, bool)>,
}

struct Ctl {
    c: Client,
    nbd_sock: PathBuf,
    inst: String,
    victim: String,
    layout: Arc<Layout>,
    sh: Arc<Shared>,
    rng: StdRng,
    run: u64,
    step: usize,
    iter: u64,
    s: Option<String>,
    clone: Option<String>,
    s2: Option<String>,
    conn: Option<Nbd>,
    window: Option<Window>,
    st: CtlState,
    ops: BTreeMap<&'static str, OpCount>,
    /// Refusals (ECS state rules), logged.
    refusals: Vec<String>,
    /// Wrong answers from a live daemon.
    failures: Vec<String>,
    /// The daemon went away: when, why, in which step.
    died: Option<(Instant, String, usize)>,
    /// Told when a CreateSnapshot of the victim is acknowledged (aimed kills).
    snap_acked: Option<mpsc::Sender<Instant>>,
    /// The RPC the kill interrupted: its method and the disk or snapshot it names.
    in_doubt: Option<(&'static str, String)>,
    /// Interrupted RPCs, per method: (happened wholly, not at all).
    outcomes: BTreeMap<&'static str, (u64, u64)>,
}

impl Ctl {
    fn op(&mut self, name: &'static str) -> &mut OpCount {
        self.ops.entry(name).or_default()
    }

    fn call(&mut self, name: &'static str, p: Value) -> Res {
        let target = match name {
            "CreateDisk" | "DeleteSnapshot" => p["SnapshotId"].as_str(),
            _ => p["DiskId"].as_str(),
        }
        .unwrap_or_default()
        .to_owned();
        let r = rpc_retry(&mut self.c, name, p);
        match &r {
            Res::Ok(_) => self.op(name).acked += 1,
            Res::Refused(e) => {
                self.op(name).refused += 1;
                let msg = format!("{name}: {} ({})", e.code, e.message);
                eprintln!("crash harness: control: refused: {msg}");
                self.refusals.push(msg);
            }
            Res::Dead(e) => {
                self.op(name).in_doubt += 1;
                self.died = Some((Instant::now(), format!("{name}: {e}"), self.step));
                self.in_doubt = Some((name, target));
            }
        }
        r
    }

    fn nbd_died(&mut self, e: std::io::Error) -> bool {
        self.died = Some((Instant::now(), format!("NBD: {e}"), self.step));
        false
    }

    fn disk(&mut self, id: &str) -> &mut DiskExp {
        self.st.disks.get_mut(id).expect("a known disk")
    }

    fn attached(&self) -> Option<String> {
        let c = self.clone.clone()?;
        (self.st.disks[&c].attached == Tri::Yes).then_some(c)
    }

    fn detached(&self) -> Option<String> {
        let c = self.clone.clone()?;
        (self.st.disks[&c].attached == Tri::No).then_some(c)
    }

    fn mark_sent(&mut self, c: &str, i: usize, m: &Mark) {
        for alt in self.disk(c).alts.iter_mut() {
            alt[i].insert(m.clone());
        }
    }

    fn mark_acked(&mut self, c: &str, i: usize, m: &Mark) {
        for alt in self.disk(c).alts.iter_mut() {
            alt[i] = BTreeSet::from([m.clone()]);
        }
    }

    /// One step of the loop; false when the daemon is gone.
    fn step(&mut self) -> bool {
        let ok = match self.step {
            0 => self.snapshot_victim(),
            1 => self.create_clone(),
            2 | 8 => self.attach(),
            3 => self.check_clone_and_mark(),
            4 => self.snapshot_clone(),
            5 => self.mark_phase2(),
            6 | 10 => self.detach(),
            7 => self.reset(),
            9 => self.read_back_reset(),
            11 => self.delete_clone(),
            12 => {
                let s2 = self.s2.take();
                self.delete_snapshot(s2, false)
            }
            13 => {
                let s = self.s.take();
                let force = self.clone.is_some();
                self.delete_snapshot(s, force)
            }
            _ => unreachable!(),
        };
        if ok {
            self.step = (self.step + 1) % STEPS.len();
            if self.step == 0 {
                self.iter += 1;
                self.clone = None;
                self.window = None;
            }
        }
        ok
    }

    fn snapshot_victim(&mut self) -> bool {
        let n = self.layout.ws.len();
        let picks: Vec<usize> = sample(&mut self.rng, n, SNAP_SAMPLE).into_vec();
        let lo: Vec<u64> = {
            let m = self.sh.m.lock().unwrap();
            picks.iter().map(|&b| m.blocks[b].acked_v).collect()
        };
        let p = json!({"AccountId": A, "DiskId": self.victim, "SnapshotName": "crash-victim"});
        match self.call("CreateSnapshot", p) {
            Res::Ok(v) => {
                let id = str_of(&v, "SnapshotId");
                let m = self.sh.m.lock().unwrap();
                let samples = picks
                    .iter()
                    .zip(lo)
                    .map(|(&b, lo)| {
                        let k = &m.blocks[b];
                        let hi = k.sent_v;
                        (b, lo, hi, k.zeros.iter().any(|&z| z >= lo && z <= hi))
                    })
                    .collect();
                drop(m);
                self.window = Some(Window {
                    snap: id.clone(),
                    samples,
                });
                self.st.snaps.insert(
                    id.clone(),
                    SnapExp {
                        present: Tri::Yes,
                        alts: None,
                    },
                );
                self.s = Some(id);
                if let Some(tx) = &self.snap_acked {
                    let _ = tx.send(Instant::now());
                }
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.st.unknown_snaps.push(self.victim.clone());
                false
            }
        }
    }

    fn create_clone(&mut self) -> bool {
        let Some(s) = self.s.clone() else { return true };
        let p =
            json!({"RegionId": R, "AccountId": A, "SnapshotId": s, "DiskCategory": "ssd", "DiskName": "crash-clone"});
        match self.call("CreateDisk", p) {
            Res::Ok(v) => {
                let id = str_of(&v, "DiskId");
                let zero = vec![BTreeSet::from([Mark::Zero]); self.layout.markers.len()];
                self.st.disks.insert(
                    id.clone(),
                    DiskExp {
                        present: Tri::Yes,
                        attached: Tri::No,
                        alts: vec![zero],
                        reset_from: None,
                    },
                );
                self.clone = Some(id);
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.st.unknown_disks.push(s);
                false
            }
        }
    }

    fn attach(&mut self) -> bool {
        let Some(c) = self.detached() else { return true };
        let p = json!({"AccountId": A, "DiskId": c, "InstanceId": self.inst});
        match self.call("AttachDisk", p) {
            Res::Ok(_) => {
                self.disk(&c).attached = Tri::Yes;
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.disk(&c).attached = Tri::Either;
                false
            }
        }
    }

    fn detach(&mut self) -> bool {
        let Some(c) = self.attached() else { return true };
        let p = json!({"AccountId": A, "DiskId": c, "InstanceId": self.inst});
        match self.call("DetachDisk", p) {
            Res::Ok(_) => {
                self.disk(&c).attached = Tri::No;
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.disk(&c).attached = Tri::Either;
                false
            }
        }
    }

    /// NBD GO on an attached clone; None (a failure recorded) if refused.
    fn open_clone(&mut self, c: &str) -> Result<Option<Nbd>, std::io::Error> {
        match nbd_connect(&self.nbd_sock, c)? {
            Ok(n) => Ok(Some(n)),
            Err(t) => {
                self.failures
                    .push(format!("clone {c} is attached but NBD GO answered {t:#x}"));
                Ok(None)
            }
        }
    }

    fn write_markers(&mut self, c: &str, conn: &mut Nbd, phase: u32) -> Result<(), std::io::Error> {
        for i in 0..self.layout.markers.len() {
            let m = Mark::M { phase, iter: self.iter };
            self.mark_sent(c, i, &m);
            let data = marker_block(self.run, i, phase, self.iter);
            match conn.write(self.layout.markers[i], &data, true)? {
                0 => self.mark_acked(c, i, &m),
                e => self.failures.push(format!(
                    "FUA write of marker {i} to clone {c} failed with NBD error {e}"
                )),
            }
        }
        Ok(())
    }

    fn check_clone_and_mark(&mut self) -> bool {
        let Some(c) = self.attached() else { return true };
        let mut conn = match self.open_clone(&c) {
            Ok(Some(n)) => n,
            Ok(None) => return true,
            Err(e) => return self.nbd_died(e),
        };
        if let Some(w) = self.window.take().filter(|w| Some(&w.snap) == self.s.as_ref()) {
            let offs: Vec<u64> = w.samples.iter().map(|s| self.layout.ws[s.0]).collect();
            let got = match conn.read_blocks(&offs) {
                Ok(g) => g,
                Err(e) => return self.nbd_died(e),
            };
            for (&(b, lo, hi, zero_ok), d) in w.samples.iter().zip(&got) {
                let seen = decode(self.run, d);
                let ok = match &seen {
                    Seen::Zero => zero_ok,
                    Seen::Data { b: sb, v, .. } => *sb == b && lo <= *v && *v <= hi,
                    _ => false,
                };
                if !ok {
                    self.failures.push(format!(
                        "snapshot {} of the victim: block {b} (offset {:#x}) reads {seen} through clone {c}, \
                         expected seq {lo}..={hi} (acknowledged before CreateSnapshot .. sent before it returned){}",
                        w.snap,
                        self.layout.ws[b],
                        if zero_ok { " or zeros" } else { "" }
                    ));
                }
            }
        }
        if let Err(e) = self.write_markers(&c, &mut conn, 1) {
            return self.nbd_died(e);
        }
        self.conn = Some(conn);
        true
    }

    fn snapshot_clone(&mut self) -> bool {
        let Some(c) = self.clone.clone() else { return true };
        let p = json!({"AccountId": A, "DiskId": c, "SnapshotName": "crash-clone-snap"});
        match self.call("CreateSnapshot", p) {
            Res::Ok(v) => {
                let id = str_of(&v, "SnapshotId");
                let alts = self.st.disks[&c].alts.clone();
                self.st.snaps.insert(
                    id.clone(),
                    SnapExp {
                        present: Tri::Yes,
                        alts: Some(alts),
                    },
                );
                self.s2 = Some(id);
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.st.unknown_snaps.push(c);
                false
            }
        }
    }

    fn mark_phase2(&mut self) -> bool {
        let Some(mut conn) = self.conn.take() else { return true };
        let c = self.clone.clone().expect("a connection to the clone");
        if let Err(e) = self.write_markers(&c, &mut conn, 2) {
            return self.nbd_died(e);
        }
        match conn.disconnect() {
            Ok(()) => true,
            Err(e) => self.nbd_died(e),
        }
    }

    fn reset(&mut self) -> bool {
        let (Some(c), Some(s2)) = (self.detached(), self.s2.clone()) else {
            return true;
        };
        let snap_alts = self.st.snaps[&s2].alts.clone().expect("a snapshot of the clone");
        let p = json!({"AccountId": A, "DiskId": c, "SnapshotId": s2});
        match self.call("ResetDisk", p) {
            Res::Ok(_) => {
                self.disk(&c).alts = snap_alts;
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                // Wholly or not at all: every marker the snapshot's, or every one as before.
                let d = self.disk(&c);
                d.reset_from = Some(d.alts.len());
                d.alts.extend(snap_alts);
                false
            }
        }
    }

    fn read_back_reset(&mut self) -> bool {
        let Some(c) = self.attached() else { return true };
        let mut conn = match self.open_clone(&c) {
            Ok(Some(n)) => n,
            Ok(None) => return true,
            Err(e) => return self.nbd_died(e),
        };
        let got = match conn.read_blocks(&self.layout.markers) {
            Ok(g) => g,
            Err(e) => return self.nbd_died(e),
        };
        if let Err(msg) = match_markers(self.run, &self.st.disks[&c].alts, &got) {
            self.failures
                .push(format!("clone {c} after ResetDisk (live, loop {}): {msg}", self.iter));
        }
        match conn.disconnect() {
            Ok(()) => true,
            Err(e) => self.nbd_died(e),
        }
    }

    fn delete_clone(&mut self) -> bool {
        let Some(c) = self.detached() else { return true };
        match self.call("DeleteDisk", json!({"AccountId": A, "DiskId": c})) {
            Res::Ok(_) => {
                self.disk(&c).present = Tri::No;
                self.clone = None;
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.disk(&c).present = Tri::Either;
                false
            }
        }
    }

    fn delete_snapshot(&mut self, s: Option<String>, force: bool) -> bool {
        let Some(s) = s else { return true };
        match self.call(
            "DeleteSnapshot",
            json!({"AccountId": A, "SnapshotId": s, "Force": force}),
        ) {
            Res::Ok(_) => {
                self.st.snaps.get_mut(&s).expect("a known snapshot").present = Tri::No;
                true
            }
            Res::Refused(_) => true,
            Res::Dead(_) => {
                self.st.snaps.get_mut(&s).expect("a known snapshot").present = Tri::Either;
                false
            }
        }
    }
}

fn seen_mark(s: &Seen) -> Option<Mark> {
    match s {
        Seen::Zero => Some(Mark::Zero),
        Seen::Mark { phase, iter, .. } => Some(Mark::M {
            phase: *phase,
            iter: *iter,
        }),
        _ => None,
    }
}

/// The markers read must match one whole alternative; its index.
fn match_markers(run: u64, alts: &Alts, got: &[Vec<u8>]) -> Result<usize, String> {
    let seen: Vec<Seen> = got.iter().map(|d| decode(run, d)).collect();
    let marks: Vec<Option<Mark>> = seen
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Seen::Mark { idx, .. } if *idx != i => None,
            s => seen_mark(s),
        })
        .collect();
    let fits = alts.iter().position(|alt| {
        alt.iter()
            .zip(&marks)
            .all(|(allowed, m)| m.as_ref().is_some_and(|m| allowed.contains(m)))
    });
    if let Some(i) = fits {
        return Ok(i);
    }
    let got: Vec<String> = seen.iter().map(|s| s.to_string()).collect();
    Err(format!(
        "markers read [{}], expected one of these whole-disk states {alts:?} (interrupted ResetDisk: all or nothing)",
        got.join("; ")
    ))
}

// ---- after a restart -------------------------------------------------------------

#[derive(Default)]
struct CycleFigures {
    blocks_checked: u64,
    durable_checked: u64,
    newer_than_durable: u64,
    lost: Vec<String>,
}

/// Reads every working-set block (and a sample of never-written ones) of the victim,
/// checks them against the model and adopts what was read.
fn verify_victim(
    sh: &Shared,
    layout: &Layout,
    nbd_sock: &Path,
    victim: &str,
    rng: &mut StdRng,
    seed: u64,
) -> CycleFigures {
    let mut conn = match nbd_connect(nbd_sock, victim).expect("NBD connection after restart") {
        Ok(n) => n,
        Err(t) => panic!("victim {victim} is not back on the data path after the restart: NBD GO answered {t:#x}"),
    };
    let got = conn.read_blocks(&layout.ws).expect("reading the working set");
    let extra: Vec<u64> = sample(rng, layout.non_ws.len(), NON_WS_SAMPLE)
        .into_iter()
        .map(|i| layout.non_ws[i])
        .collect();
    let zeros = conn.read_blocks(&extra).expect("reading never-written blocks");
    conn.disconnect().expect("NBD disconnect");
    let mut m = sh.m.lock().unwrap();
    m.inflight.clear();
    let mut f = CycleFigures::default();
    let cycle = m.cycle;
    for (b, d) in got.iter().enumerate() {
        let seen = decode(m.run, d);
        f.blocks_checked += 1;
        match m.check(b, &seen) {
            Some(ver) => {
                if matches!(m.blocks[b].by, By::Fua(c) | By::Flush(c) if c == cycle) {
                    f.durable_checked += 1;
                }
                if ver.v != m.blocks[b].durable.v {
                    f.newer_than_durable += 1;
                }
                m.adopt(b, ver);
            }
            None => f.lost.push(lost_message(&m, layout, b, &seen, seed)),
        }
    }
    for (o, d) in extra.iter().zip(&zeros) {
        let seen = decode(m.run, d);
        if seen != Seen::Zero {
            f.lost.push(format!(
                "never-written victim block at offset {o:#x} (cluster {}) reads {seen}, not zeros \
                 (cycle {cycle}, seed {seed})",
                o / CLUSTER
            ));
        }
    }
    f
}

/// Checks the control plane after a restart against what the control thread was told;
/// then deletes every clone and snapshot. Returns the failures, the pool's clusters in use
/// and how the interrupted RPC (if any) turned out.
fn verify_control(ctl: &mut Ctl, system_disk: &str) -> (Vec<String>, u64, Option<String>) {
    let mut fails = Vec::new();
    let c = &mut ctl.c;
    let disks: BTreeMap<String, Value> = list(&must(c, "DescribeDisks", json!({"AccountId": A})), "Disks", "Disk")
        .into_iter()
        .map(|d| (str_of(&d, "DiskId"), d))
        .collect();
    let snaps: BTreeMap<String, Value> = list(
        &must(c, "DescribeSnapshots", json!({"AccountId": A})),
        "Snapshots",
        "Snapshot",
    )
    .into_iter()
    .map(|s| (str_of(&s, "SnapshotId"), s))
    .collect();
    let in_use = |d: &Value| d["Status"] == "In_use";
    match disks.get(&ctl.victim) {
        Some(d) if in_use(d) && d["Exported"] == true => {}
        d => fails.push(format!(
            "victim {} after restart: {d:?}, expected attached and exported",
            ctl.victim
        )),
    }
    if !disks.contains_key(system_disk) {
        fails.push(format!("system disk {system_disk} is gone"));
    }
    for (id, d) in &disks {
        if d["Exported"] != in_use(d) {
            fails.push(format!(
                "disk {id}: Status {} but Exported {} after restart (a restart restores every attachment)",
                d["Status"], d["Exported"]
            ));
        }
    }
    let present = |what: &str, id: &str, want: Tri, there: bool, fails: &mut Vec<String>| match (want, there) {
        (Tri::Yes, false) => fails.push(format!("{what} {id}: its Create succeeded but it is gone")),
        (Tri::No, true) => fails.push(format!("{what} {id}: its Delete succeeded but it exists")),
        _ => {}
    };
    for (id, e) in &ctl.st.snaps {
        present("snapshot", id, e.present, snaps.contains_key(id), &mut fails);
    }
    for (id, e) in &ctl.st.disks {
        present("disk", id, e.present, disks.contains_key(id), &mut fails);
        if let Some(d) = disks.get(id) {
            let att = in_use(d);
            match (e.attached, att) {
                (Tri::Yes, false) => fails.push(format!("disk {id}: its AttachDisk succeeded but it is detached")),
                (Tri::No, true) => fails.push(format!("disk {id}: detached (or never attached) but In_use")),
                _ => {}
            }
            if att && d["InstanceId"] != ctl.inst.as_str() {
                fails.push(format!(
                    "disk {id} is attached to {} , not {}",
                    d["InstanceId"], ctl.inst
                ));
            }
        }
    }
    // Objects nobody was told about: at most one per Create in doubt, and of the right source.
    let mut snap_sources = ctl.st.unknown_snaps.clone();
    for (id, s) in snaps.iter().filter(|(id, _)| !ctl.st.snaps.contains_key(*id)) {
        let src = str_of(s, "SourceDiskId");
        match snap_sources.iter().position(|x| *x == src) {
            Some(i) if s["Encrypted"] == true && s["SizeBytes"] == DISK_BYTES => {
                snap_sources.remove(i);
            }
            _ => fails.push(format!(
                "snapshot {id} ({s}) exists but no CreateSnapshot in doubt explains it (in doubt: {:?})",
                ctl.st.unknown_snaps
            )),
        }
    }
    let mut disk_sources = ctl.st.unknown_disks.clone();
    for (id, d) in disks
        .iter()
        .filter(|(id, _)| !ctl.st.disks.contains_key(*id) && **id != ctl.victim && *id != system_disk)
    {
        let src = str_of(d, "SourceSnapshotId");
        match disk_sources.iter().position(|x| *x == src) {
            Some(i) if d["Encrypted"] == true && !in_use(d) => {
                disk_sources.remove(i);
            }
            _ => fails.push(format!(
                "disk {id} ({d}) exists but no CreateDisk in doubt explains it (in doubt: {:?})",
                ctl.st.unknown_disks
            )),
        }
    }
    let chk = must(c, "CheckPool", json!({}));
    if chk["Consistent"] != true || chk["Problems"].as_array().is_none_or(|p| !p.is_empty()) {
        fails.push(format!("CheckPool after restart: {chk}"));
    }
    // Clone contents: NBD answers by attachment; markers are one whole state.
    let clones: Vec<String> = ctl
        .st
        .disks
        .keys()
        .filter(|id| disks.contains_key(*id))
        .cloned()
        .collect();
    let mut matched: BTreeMap<String, usize> = BTreeMap::new();
    for id in clones {
        let attached = in_use(&disks[&id]);
        let go = nbd_connect(&ctl.nbd_sock, &id).expect("NBD connection");
        let mut conn = match (go, attached) {
            (Ok(n), true) => n,
            (Err(t), false) if t == REP_ERR_UNKNOWN => {
                must(
                    &mut ctl.c,
                    "AttachDisk",
                    json!({"AccountId": A, "DiskId": id, "InstanceId": ctl.inst}),
                );
                match nbd_connect(&ctl.nbd_sock, &id).expect("NBD connection") {
                    Ok(n) => n,
                    Err(t) => panic!("clone {id}: NBD GO answered {t:#x} right after AttachDisk"),
                }
            }
            (Ok(_), false) => {
                fails.push(format!("clone {id} is detached but its NBD export answers"));
                continue;
            }
            (Err(t), _) => {
                fails.push(format!("clone {id} (attached: {attached}): NBD GO answered {t:#x}"));
                continue;
            }
        };
        let got = conn.read_blocks(&ctl.layout.markers).expect("reading markers");
        conn.disconnect().expect("NBD disconnect");
        match match_markers(ctl.run, &ctl.st.disks[&id].alts, &got) {
            Ok(i) => {
                matched.insert(id, i);
            }
            Err(msg) => fails.push(format!("clone {id} after restart: {msg}")),
        }
    }
    // Which way the interrupted RPC went (its all-or-nothing checks are the ones above).
    let known = |id: &str| id == ctl.victim || id == system_disk || ctl.st.disks.contains_key(id);
    let outcome = ctl.in_doubt.take().map(|(op, id)| {
        let done = match op {
            "CreateSnapshot" => Some(
                snaps
                    .iter()
                    .any(|(k, s)| !ctl.st.snaps.contains_key(k) && s["SourceDiskId"] == id.as_str()),
            ),
            "CreateDisk" => Some(
                disks
                    .iter()
                    .any(|(k, d)| !known(k) && d["SourceSnapshotId"] == id.as_str()),
            ),
            "AttachDisk" => disks.get(&id).map(in_use),
            "DetachDisk" => disks.get(&id).map(|d| !in_use(d)),
            "ResetDisk" => match (matched.get(&id), ctl.st.disks.get(&id).and_then(|d| d.reset_from)) {
                (Some(&i), Some(from)) => Some(i >= from),
                _ => None,
            },
            "DeleteDisk" => Some(!disks.contains_key(&id)),
            "DeleteSnapshot" => Some(!snaps.contains_key(&id)),
            _ => None,
        };
        let e = ctl.outcomes.entry(op).or_default();
        match done {
            Some(true) => e.0 += 1,
            Some(false) => e.1 += 1,
            None => {}
        }
        let how = match done {
            Some(true) => "happened wholly",
            Some(false) => "did not happen at all",
            None => "outcome not determined",
        };
        format!("{op}({id}) {how}")
    });
    // Cleanup: only the instance's two disks stay.
    let c = &mut ctl.c;
    let disks = list(&must(c, "DescribeDisks", json!({"AccountId": A})), "Disks", "Disk");
    for d in disks {
        let id = str_of(&d, "DiskId");
        if id == ctl.victim || id == system_disk {
            continue;
        }
        for a in d["Attachments"]["Attachment"].as_array().cloned().unwrap_or_default() {
            must(
                c,
                "DetachDisk",
                json!({"AccountId": A, "DiskId": id, "InstanceId": a["InstanceId"]}),
            );
        }
        must(c, "DeleteDisk", json!({"AccountId": A, "DiskId": id}));
    }
    let snaps = list(
        &must(c, "DescribeSnapshots", json!({"AccountId": A})),
        "Snapshots",
        "Snapshot",
    );
    for s in snaps {
        must(
            c,
            "DeleteSnapshot",
            json!({"AccountId": A, "SnapshotId": s["SnapshotId"], "Force": true}),
        );
    }
    let chk = must(c, "CheckPool", json!({}));
    if chk["Consistent"] != true || chk["Pool"]["volumes"] != 2 {
        fails.push(format!("CheckPool after cleanup: {chk}"));
    }
    let in_use_clusters = chk["Pool"]["clusters_in_use"].as_u64().unwrap_or(0);
    ctl.st = CtlState::default();
    ctl.step = 0;
    ctl.s = None;
    ctl.clone = None;
    ctl.s2 = None;
    ctl.conn = None;
    ctl.window = None;
    ctl.died = None;
    (fails, in_use_clusters, outcome)
}

// ---- the test --------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let n = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(n.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// The longest delay (ms) a fault spec injects.
fn fault_delay_ms(spec: &str) -> u64 {
    spec.split(',')
        .filter_map(|i| i.split_once("delay=")?.1.strip_suffix("ms")?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn log_lines(log: &str, keys: &[&str]) -> Vec<String> {
    log.lines()
        .filter(|l| keys.iter().any(|k| l.contains(k)))
        .map(|l| l.split_once("sealdisk: ").map_or(l, |x| x.1).to_owned())
        .collect()
}

#[test]
fn sigkill_during_pipelined_writes_and_control_ops_loses_nothing() {
    let cycles = env_u64("SEALDISK_CRASH_CYCLES").unwrap_or(10) as u32;
    let seed = env_u64("SEALDISK_CRASH_SEED").unwrap_or_else(|| rand::Rng::gen(&mut rand::rngs::OsRng));
    assert!(cycles > 0, "SEALDISK_CRASH_CYCLES must be at least 1");
    let dir = tempdir("data");
    let logs = tempdir("logs");
    let d = &dir.0;
    let nbd_sock = d.join("nbd.sock");
    eprintln!(
        "crash harness: {cycles} cycles, seed {seed} (replay with SEALDISK_CRASH_SEED={seed}; timing is not replayed), \
         data dir {}",
        d.display()
    );
    let t_run = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let layout = Arc::new(Layout::new(&mut rng));
    // SEALDISK_CRASH_FAULTS: one SEALDISK_FAULTS spec for every start ("none": no faults);
    // unset: a random profile per start.
    let fixed_faults = std::env::var("SEALDISK_CRASH_FAULTS").ok();
    let pick_faults = |rng: &mut StdRng| match fixed_faults.as_deref() {
        Some("none") => String::new(),
        Some(f) => f.to_owned(),
        None => FAULT_PROFILES[rng.gen_range(0..FAULT_PROFILES.len())].to_owned(),
    };
    let mut faults = pick_faults(&mut rng);
    // SEALDISK_CRASH_KILL: one kill mode for every cycle; unset: a random one per cycle.
    let kill_mode_env = std::env::var("SEALDISK_CRASH_KILL").ok();
    let (mut daemon, mut c) = start_daemon(d, &logs.0.join("start-0.log"), &faults);
    must(&mut c, "ActivateKms", json!({"RegionId": R, "AccountId": A}));
    let inst = must(
        &mut c,
        "CreateInstance",
        json!({"RegionId": R, "AccountId": A, "SystemDisk.SizeBytes": 4 * MIB,
               "DataDisk.1.SizeBytes": DISK_BYTES, "DataDisk.1.Encrypted": "true",
               "DataDisk.1.Category": "ssd", "DataDisk.1.DiskName": "crash-victim"}),
    );
    let inst_id = str_of(&inst, "InstanceId");
    let system_disk = str_of(&inst, "SystemDiskId");
    let victim = inst["DataDiskIds"][0].as_str().expect("a data disk").to_owned();

    let run = seed;
    let sh = Arc::new(Shared {
        m: Mutex::new(Model::new(run, &layout)),
        cv: Condvar::new(),
    });
    let mut ctl = Ctl {
        c,
        nbd_sock: nbd_sock.clone(),
        inst: inst_id,
        victim: victim.clone(),
        layout: layout.clone(),
        sh: sh.clone(),
        rng: StdRng::seed_from_u64(mix(seed ^ 1)),
        run,
        step: 0,
        iter: 0,
        s: None,
        clone: None,
        s2: None,
        conn: None,
        window: None,
        st: CtlState::default(),
        ops: BTreeMap::new(),
        refusals: Vec::new(),
        failures: Vec::new(),
        died: None,
        snap_acked: None,
        in_doubt: None,
        outcomes: BTreeMap::new(),
    };
    let mut total = WStats::default();
    let mut total_durable = 0u64;
    let mut total_checked = 0u64;
    let mut swept_total = 0usize;
    let mut max_clusters = 0u64;
    let mut dog = Watchdog::arm(daemon.pid(), CYCLE_LIMIT, "setup".into());

    for cycle in 1..=cycles {
        let t_cycle = Instant::now();
        let mut failures: Vec<String> = Vec::new();
        {
            let mut m = sh.m.lock().unwrap();
            m.cycle = cycle;
            m.fault_ms = fault_delay_ms(&faults);
            m.burst.clear();
            m.burst_start = None;
            m.fresh = None;
        }
        let ops_before = ctl.ops.clone();
        // Random start in the control loop, so kills land in every step.
        let prefix = rng.gen_range(0..STEPS.len());
        for _ in 0..prefix {
            assert!(
                ctl.step(),
                "cycle {cycle}: the daemon went away before the kill ({:?}):\n{}",
                ctl.died,
                daemon.log_text()
            );
        }

        // Load: the writer (sender + receiver) and the control thread, then the kill.
        let conn = match nbd_connect(&nbd_sock, &victim).expect("NBD connection to the victim") {
            Ok(n) => n,
            Err(t) => panic!("victim {victim}: NBD GO answered {t:#x}"),
        };
        // 0: uniform, 1: after a victim snapshot, 2: inside a fresh-cluster burst.
        let mode = match kill_mode_env.as_deref() {
            None => rng.gen_range(0..3),
            Some(m) => KILL_MODES
                .iter()
                .position(|k| *k == m)
                .unwrap_or_else(|| panic!("SEALDISK_CRASH_KILL={m:?}: use one of {KILL_MODES:?}")),
        };
        let (aim_tx, aim_rx) = mpsc::channel();
        match mode {
            1 => ctl.snap_acked = Some(aim_tx),
            2 => sh.m.lock().unwrap().overtaken = Some(aim_tx),
            _ => {}
        }
        let r = conn.s.try_clone().unwrap();
        sh.m.lock().unwrap().dead = None;
        let (sh1, sh2, l1) = (sh.clone(), sh.clone(), layout.clone());
        let wrng = StdRng::seed_from_u64(mix(seed ^ mix(cycle as u64)));
        let t_load = Instant::now();
        let sender = std::thread::spawn(move || writer_send(sh1, conn.s, wrng, l1));
        let receiver = std::thread::spawn(move || writer_recv(sh2, r));
        let control = std::thread::spawn(move || {
            while ctl.step() {}
            ctl
        });
        let delay = Duration::from_millis(rng.gen_range(KILL_MS.0..=KILL_MS.1));
        let fault_ms = fault_delay_ms(&faults);
        let after = match mode {
            1 => Duration::from_millis(rng.gen_range(AIMED_SNAPSHOT_MS.0..=AIMED_SNAPSHOT_MS.1) + 4 * fault_ms),
            _ => Duration::from_micros(rng.gen_range(AIMED_BURST_US.0..=AIMED_BURST_US.1)),
        };
        let what = [
            "",
            "a victim snapshot",
            "a fresh-cluster write durable ahead of the first",
        ][mode];
        let kill_mode = if mode == 0 {
            std::thread::sleep(delay);
            "uniform".to_string()
        } else {
            // The first such event; none within the uniform delay (at least 400 ms): kill then.
            let wait = delay.max(Duration::from_millis(400));
            match aim_rx.recv_timeout(wait) {
                Ok(at) => {
                    std::thread::sleep(after.saturating_sub(at.elapsed()));
                    format!("{} µs after {what}", at.elapsed().as_micros())
                }
                Err(_) => format!("aimed at {what}, none in {} ms", wait.as_millis()),
            }
        };
        let delay = t_load.elapsed();
        assert!(!dog.disarm(), "cycle {cycle}: the watchdog fired (a hang)");
        let killed_at = Instant::now();
        let early = daemon.child.try_wait().unwrap();
        daemon.kill9();
        assert!(
            early.is_none(),
            "cycle {cycle}: the daemon exited on its own ({early:?}):\n{}",
            daemon.log_text()
        );
        sender.join().expect("writer sender");
        receiver.join().expect("writer receiver");
        ctl = control.join().expect("control thread");
        ctl.snap_acked = None;
        sh.m.lock().unwrap().overtaken = None;
        let (kill_step, kill_note) = match &ctl.died {
            Some((at, why, step)) => {
                if *at < killed_at {
                    failures.push(format!("control thread lost the daemon before the kill: {why}"));
                }
                (*step, why.clone())
            }
            None => (ctl.step, "no reply pending".into()),
        };
        {
            let m = sh.m.lock().unwrap();
            if let Some((at, why)) = &m.dead {
                if *at < killed_at {
                    failures.push(format!("writer lost its connection before the kill: {why}"));
                }
            }
            failures.extend(m.errors.iter().cloned());
        }
        failures.append(&mut ctl.failures);

        // Restart on the same data directory; check everything.
        let t_restart = Instant::now();
        let log = logs.0.join(format!("cycle-{cycle}.log"));
        let cycle_faults = std::mem::replace(&mut faults, pick_faults(&mut rng));
        let (nd, nc) = start_daemon(d, &log, &faults);
        daemon = nd;
        ctl.c = nc;
        let restart = t_restart.elapsed();
        dog = Watchdog::arm(daemon.pid(), CYCLE_LIMIT, format!("cycle {}", cycle + 1));
        let f = verify_victim(&sh, &layout, &nbd_sock, &victim, &mut rng, seed);
        let (mut cf, clusters, outcome) = verify_control(&mut ctl, &system_disk);
        failures.append(&mut cf);
        max_clusters = max_clusters.max(clusters);
        let text = daemon.log_text();
        let swept = log_lines(&text, &["removed", "could not restore"]);
        swept_total += swept.iter().filter(|l| l.contains("removed")).count();
        failures.extend(
            log_lines(&text, &["could not restore"])
                .into_iter()
                .map(|l| format!("daemon log: {l}")),
        );

        let (st, fresh_ms) = {
            let mut m = sh.m.lock().unwrap();
            m.errors.clear();
            (std::mem::take(&mut m.st), m.fresh_latency_us as f64 / 1000.0)
        };
        total.add(&st);
        total_durable += f.durable_checked;
        total_checked += f.blocks_checked;
        let ops: Vec<String> = ctl
            .ops
            .iter()
            .filter_map(|(k, v)| {
                let b = ops_before.get(k).copied().unwrap_or_default();
                let n = v.acked - b.acked;
                (n > 0).then(|| format!("{k} {n}"))
            })
            .collect();
        eprintln!(
            "cycle {cycle}/{cycles}: faults [{cycle_faults}], kill {} ms after start ({kill_mode}) in control step \
             {kill_step} \"{}\": {}; writes sent {} acked {} (FUA {}), flushes {}/{}, trims {}/{}, max in flight {}, \
             first write to a trimmed cluster ~{fresh_ms:.1} ms; \
             blocks checked {}, durable checked {}, newer than durable {}, lost {}; control acked: {}; \
             restart {:.2} s, sweep: {}; pool clusters {}; cycle {:.1} s",
            delay.as_millis(),
            STEPS[kill_step],
            outcome.unwrap_or(kill_note),
            st.writes_sent,
            st.writes_acked,
            st.fua_acked,
            st.flushes_acked,
            st.flushes_sent,
            st.trims_acked,
            st.trims_sent,
            st.max_in_flight,
            f.blocks_checked,
            f.durable_checked,
            f.newer_than_durable,
            f.lost.len(),
            if ops.is_empty() { "none".into() } else { ops.join(", ") },
            restart.as_secs_f64(),
            if swept.is_empty() {
                "nothing".into()
            } else {
                swept.join(" | ")
            },
            clusters,
            t_cycle.elapsed().as_secs_f64(),
        );
        if !f.lost.is_empty() || !failures.is_empty() {
            for l in f.lost.iter().take(20) {
                eprintln!("  {l}");
            }
            if f.lost.len() > 20 {
                eprintln!("  ... and {} more lost blocks", f.lost.len() - 20);
            }
            for l in &failures {
                eprintln!("  {l}");
            }
            eprintln!(
                "crash harness: FAILED in cycle {cycle} of {cycles}, seed {seed}: lost {}, other failures {}; \
                 daemon logs in {}",
                f.lost.len(),
                failures.len(),
                logs.0.display()
            );
            let first = f.lost.first().or(failures.first()).cloned().unwrap_or_default();
            panic!(
                "cycle {cycle}, seed {seed}: {} lost write(s), {} other failure(s); first: {first}",
                f.lost.len(),
                failures.len()
            );
        }
    }
    assert!(!dog.disarm(), "the watchdog fired (a hang) after the last cycle");

    // A clean stop after all that.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid(), libc::SIGTERM) };
    let st = daemon.child.wait().unwrap();
    assert!(st.success(), "daemon exit {st:?} on SIGTERM:\n{}", daemon.log_text());

    let ops: Vec<String> = ctl
        .ops
        .iter()
        .map(|(k, v)| format!("{k} {} acked/{} refused/{} in doubt", v.acked, v.refused, v.in_doubt))
        .collect();
    eprintln!("control operations: {}", ops.join(", "));
    let outcomes: Vec<String> = ctl
        .outcomes
        .iter()
        .map(|(k, (done, undone))| format!("{k} {done} wholly/{undone} not at all"))
        .collect();
    eprintln!(
        "interrupted control operations after restart: {}",
        if outcomes.is_empty() {
            "none".into()
        } else {
            outcomes.join(", ")
        }
    );
    if !ctl.refusals.is_empty() {
        eprintln!("refusals (ECS rules): {}", ctl.refusals.join("; "));
    }
    eprintln!(
        "writes sent {}, FUA acked {}, flushes {}/{}, trims {}/{}, max in flight {}; {total_checked} block reads \
         checked; \
         {swept_total} restart(s) swept volumes; peak pool clusters in use {max_clusters}; {:.1} s",
        total.writes_sent,
        total.fua_acked,
        total.flushes_acked,
        total.flushes_sent,
        total.trims_acked,
        total.trims_sent,
        total.max_in_flight,
        t_run.elapsed().as_secs_f64()
    );
    eprintln!(
        "crash harness: {cycles} cycles, {} writes acknowledged, {total_durable} durable checked, lost 0, seed {seed}",
        total.writes_acked
    );
}
