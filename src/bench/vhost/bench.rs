//! `sealdisk bench vhost --socket PATH`: fio-style jobs through a
//! vhost-user-blk backend. One thread per job, each owning one virtqueue
//! (job n on queue n), keeping `iodepth` requests in flight and sleeping on
//! the queue's call eventfd when nothing has completed. With `--pid` the
//! backend's CPU time over the measured interval gives `cpu_ns_per_io`.
//!
//! Results are [`GroupResult`]s, so the fio JSON and text come from
//! [`super::super::report`]; [`to_json`] and [`to_text`] add the vhost
//! figures (daemon CPU, notifications) in place of the reactor's.

use super::super::BenchError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::cpu::{self, CpuDelta};
use super::driver::{feature_names, protocol_names, Driver, DriverOptions};
use super::mem::{GuestBuf, Seg};
use super::virtq::{BlkOp, Completion, QueueStats, Virtq};
use crate::bench::fio::{FileJob, JobSpec};
use crate::bench::io::{GroupResult, IoBenchReport};
use crate::bench::job::{refill, scramble, DirStats, Progress, ProgressLine};
use crate::bench::report;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};

/// Options of a run.
#[derive(Debug, Clone)]
pub struct VhostBenchOpts {
    pub socket: PathBuf,
    pub jobs: Vec<FileJob>,
    /// The backend's pid, for its CPU time.
    pub pid: Option<u32>,
    /// Entries per virtqueue (None: enough for the deepest job, at least 256).
    pub queue_size: Option<u16>,
    /// Ack VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Busy-poll the used rings instead of sleeping on the call eventfds
    /// (a core per job; isolates the backend's latency from notifications).
    pub spin: bool,
    pub progress: bool,
}

/// One job definition's results.
#[derive(Debug, Clone)]
pub struct VhostGroup {
    pub group: GroupResult,
    /// The backend's CPU over the measured interval (with `--pid`).
    pub daemon: Option<CpuDelta>,
    /// This process's CPU over the same interval.
    pub bench: CpuDelta,
    /// Per queue used, over the whole job (ramp included).
    pub queues: Vec<QueueStats>,
}

impl VhostGroup {
    pub fn ios(&self) -> u64 {
        self.group.read.ios + self.group.write.ios
    }
    pub fn daemon_ns_per_io(&self) -> Option<f64> {
        self.daemon.as_ref().map(|d| d.cpu_ns as f64 / self.ios().max(1) as f64)
    }
    pub fn bench_ns_per_io(&self) -> f64 {
        self.bench.cpu_ns as f64 / self.ios().max(1) as f64
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct VhostBenchReport {
    pub socket: PathBuf,
    pub pid: Option<u32>,
    pub groups: Vec<VhostGroup>,
    pub negotiated: super::Negotiated,
    pub config: super::BlkConfig,
    pub queue_size: u16,
    pub num_queues: usize,
}

/// Segments per request of `bs` bytes: one, or pieces of `size_max` when
/// the device sets it.
fn seg_plan(d: &Driver, bs: u64) -> Result<u64, BenchError> {
    let n = d.negotiated();
    let c = d.config();
    let piece = if n.has(VIRTIO_BLK_F_SIZE_MAX) && c.size_max > 0 {
        (c.size_max as u64 / 512 * 512).max(512)
    } else {
        bs
    };
    let nsegs = bs.div_ceil(piece);
    if n.has(VIRTIO_BLK_F_SEG_MAX) && c.seg_max > 0 && nsegs > c.seg_max as u64 {
        return Err(BenchError::Refused(format!(
            "bs={bs} needs {nsegs} segments of at most {piece} bytes; the device takes {}",
            c.seg_max
        )));
    }
    Ok(piece)
}

fn check_job(j: &FileJob) -> Result<(), BenchError> {
    if j.job.verify || j.job.verify_only {
        return Err(BenchError::Refused("verify is not supported by bench vhost".into()));
    }
    if j.target.backend.is_some() || j.target.encrypt || j.target.sector_size.is_some() {
        return Err(BenchError::Refused(format!(
            "job {}: backend/filename/encrypt/sector_size do not apply: bench vhost drives the socket",
            j.job.name
        )));
    }
    Ok(())
}

/// Run the jobs, one after another, on one connection.
pub fn run(opts: &VhostBenchOpts) -> Result<VhostBenchReport, BenchError> {
    for j in &opts.jobs {
        check_job(j)?;
    }
    // Descriptors: header + data pieces + status per request; the pieces
    // depend on the device, so plan with up to 128 KiB pieces and check later.
    let need = opts
        .jobs
        .iter()
        .map(|j| j.job.iodepth as u64 * (j.job.bs.div_ceil(4096).min(128) + 2))
        .max()
        .unwrap_or(1);
    let queue_size = opts
        .queue_size
        .unwrap_or_else(|| (need.next_power_of_two().clamp(256, 1024)) as u16);
    let data: u64 = opts
        .jobs
        .iter()
        .map(|j| j.job.numjobs as u64 * j.job.iodepth as u64 * j.job.bs.div_ceil(4096) * 4096)
        .max()
        .unwrap_or(0);
    let max_jobs = opts.jobs.iter().map(|j| j.job.numjobs as u64).max().unwrap_or(1);
    let rings = max_jobs * (queue_size as u64 * 160 + 16 * 4096);
    let mem_size = (2 * rings + data + (16 << 20)).div_ceil(1 << 20) << 20;
    let mut features = super::driver::DEFAULT_FEATURES;
    if !opts.event_idx {
        features &= !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    }
    let dopts = DriverOptions {
        mem_size,
        queue_size,
        features,
        ..DriverOptions::default()
    };
    let mut d =
        Driver::connect(&opts.socket, &dopts).map_err(|e| BenchError::setup(opts.socket.display().to_string(), e))?;
    let mut groups = Vec::new();
    for fj in &opts.jobs {
        groups.push(run_job(&mut d, &fj.job, opts)?);
    }
    let _ = d.stop();
    Ok(VhostBenchReport {
        socket: opts.socket.clone(),
        pid: opts.pid,
        groups,
        negotiated: *d.negotiated(),
        config: d.config().clone(),
        queue_size,
        num_queues: d.num_queues(),
    })
}

/// A job gives up when nothing completes for this long.
const STALL: Duration = Duration::from_secs(30);

struct JobOut {
    read: DirStats,
    write: DirStats,
    runtime: Duration,
    error: Option<String>,
    stats: QueueStats,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ramp,
    Run,
    Drain,
}

struct Slot {
    buf: GuestBuf,
    start: Instant,
    is_read: bool,
}

/// The job-thread loop on queue `q` over `[start, start + blocks * bs)`.
#[allow(clippy::too_many_arguments)]
fn job_loop(
    q: &mut Virtq,
    spec: &JobSpec,
    index: u32,
    region_start: u64,
    region_blocks: u64,
    piece: u64,
    spin: bool,
    start: &Barrier,
    abort: &AtomicBool,
    prog: &Progress,
) -> JobOut {
    let bs = spec.bs;
    let mem = q.mem().clone();
    let base = q.stats();
    let fail = |e: String| {
        abort.store(true, Ordering::Relaxed);
        JobOut {
            read: DirStats::default(),
            write: DirStats::default(),
            runtime: Duration::ZERO,
            error: Some(e),
            stats: QueueStats::default(),
        }
    };
    let seed = 0x5ea1_d15c_0000_0001u64.wrapping_mul(index as u64 + 1);
    let mut fill = std::array::from_fn(|i| (seed ^ 0x9e37_79b9_7f4a_7c15).rotate_left(16 * i as u32) | 1);
    let mut slots = Vec::with_capacity(spec.iodepth as usize);
    for _ in 0..spec.iodepth {
        match mem.alloc(bs, 4096) {
            Ok(mut b) => {
                // Random-looking data from the start (never all zeros).
                refill(b.as_mut_slice(), &mut fill);
                slots.push(Slot {
                    buf: b,
                    start: Instant::now(),
                    is_read: false,
                });
            }
            Err(e) => {
                start.wait();
                return fail(format!("guest buffers for iodepth={} x bs={bs}: {e}", spec.iodepth));
            }
        }
    }
    let mut head_slot = vec![u32::MAX; q.size() as usize];
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let mut rng = seed ^ 0xdead_beef;
    let mut next_rand = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let read_pct = spec.rw.read_pct(spec.rwmixread) as u64;
    let random = spec.rw.is_random();
    let size_limit = if spec.time_based { u64::MAX } else { region_blocks * bs };
    let mut seq = 0u64;
    let mut stamp = seed << 20;
    let mut segs: Vec<Seg> = Vec::with_capacity(bs.div_ceil(piece) as usize);
    let mut done: Vec<Completion> = Vec::with_capacity(q.size() as usize);
    let (mut read, mut write) = (DirStats::default(), DirStats::default());
    let mut error = None;
    let mut issued = 0u64;

    start.wait();
    let t0 = Instant::now();
    let ramp_end = t0 + spec.ramp_time;
    let deadline = spec.runtime.map(|r| ramp_end + r);
    let mut phase = if spec.ramp_time.is_zero() {
        Phase::Run
    } else {
        Phase::Ramp
    };
    let mut run_start = t0;
    let mut run_end = None;
    let mut last_done = t0;
    loop {
        let now = Instant::now();
        if free.len() < slots.len() && now.duration_since(last_done) > STALL {
            error.get_or_insert(format!(
                "no completion for {}s with {} requests in flight",
                STALL.as_secs(),
                slots.len() - free.len()
            ));
            abort.store(true, Ordering::Relaxed);
            break;
        }
        if phase == Phase::Ramp && now >= ramp_end {
            phase = Phase::Run;
            run_start = now;
            read = DirStats::default();
            write = DirStats::default();
            issued = 0;
        }
        if phase == Phase::Run && (deadline.is_some_and(|d| now >= d) || issued >= size_limit) {
            phase = Phase::Drain;
        }
        if phase != Phase::Drain && abort.load(Ordering::Relaxed) {
            phase = Phase::Drain;
        }
        if phase == Phase::Drain && free.len() == slots.len() {
            run_end.get_or_insert(now);
            break;
        }
        // Fill the queue back up to iodepth.
        if phase != Phase::Drain {
            while let Some(&s) = free.last() {
                if phase == Phase::Run && issued >= size_limit {
                    break;
                }
                let block = if random {
                    next_rand() % region_blocks
                } else {
                    let b = seq;
                    seq = (seq + 1) % region_blocks;
                    b
                };
                let offset = region_start + block * bs;
                let is_read = read_pct == 100 || (read_pct > 0 && next_rand() % 100 < read_pct);
                let slot = &mut slots[s];
                if !is_read {
                    if spec.refill_buffers {
                        refill(slot.buf.as_mut_slice(), &mut fill);
                    } else if spec.scramble_buffers {
                        stamp += 1;
                        scramble(slot.buf.as_mut_slice(), offset, stamp);
                    }
                }
                segs.clear();
                let mut off = 0;
                while off < bs {
                    let len = piece.min(bs - off);
                    segs.push(slot.buf.sub(off, len as u32));
                    off += len;
                }
                let sector = offset / 512;
                let op = if is_read {
                    BlkOp::Read { sector, segs: &segs }
                } else {
                    BlkOp::Write { sector, segs: &segs }
                };
                match q.push(&op) {
                    Ok(_) => {}
                    Err(super::Error::QueueFull { .. }) => break,
                    Err(e) => {
                        error = Some(e.to_string());
                        phase = Phase::Drain;
                        break;
                    }
                }
                let head = q.last_pushed_head();
                head_slot[head as usize] = s as u32;
                slot.start = Instant::now();
                slot.is_read = is_read;
                free.pop();
                issued += bs;
            }
            q.publish();
        }
        done.clear();
        if q.poll_into(&mut done) == 0 && spin {
            std::hint::spin_loop();
        } else if done.is_empty() {
            let mut wait = Duration::from_millis(100);
            if let Some(d) = deadline {
                wait = wait.min(
                    d.saturating_duration_since(Instant::now())
                        .max(Duration::from_micros(100)),
                );
            }
            if phase == Phase::Ramp {
                wait = wait.min(
                    ramp_end
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_micros(100)),
                );
            }
            if let Err(e) = q.wait_into(&mut done, wait) {
                error.get_or_insert(e.to_string());
                abort.store(true, Ordering::Relaxed);
                break;
            }
        }
        let now = Instant::now();
        if !done.is_empty() {
            last_done = now;
        }
        for c in &done {
            let s = head_slot[c.head as usize] as usize;
            let slot = &slots[s];
            if c.status != 0 && error.is_none() {
                error = Some(format!(
                    "{} at head {}: status {} from the device",
                    if slot.is_read { "read" } else { "write" },
                    c.head,
                    c.status
                ));
                phase = Phase::Drain;
                abort.store(true, Ordering::Relaxed);
            }
            let ns = now.duration_since(slot.start).as_nanos() as u64;
            if phase != Phase::Ramp && c.status == 0 {
                let d = if slot.is_read { &mut read } else { &mut write };
                d.ios += 1;
                d.bytes += bs;
                let _ = d.clat.record(ns.max(1));
            }
            prog.ios.fetch_add(1, Ordering::Relaxed);
            prog.bytes.fetch_add(bs, Ordering::Relaxed);
            free.push(s);
        }
        if let Some(e) = q.errors().first() {
            error.get_or_insert(format!("device protocol error: {e}"));
            abort.store(true, Ordering::Relaxed);
            break;
        }
    }
    let s = q.stats();
    JobOut {
        read,
        write,
        runtime: run_end.unwrap_or_else(Instant::now).duration_since(run_start),
        error,
        stats: QueueStats {
            submitted: s.submitted - base.submitted,
            completed: s.completed - base.completed,
            publishes: s.publishes - base.publishes,
            kicks: s.kicks - base.kicks,
            kicks_suppressed: s.kicks_suppressed - base.kicks_suppressed,
            sleeps: s.sleeps - base.sleeps,
            calls: s.calls - base.calls,
        },
    }
}

fn run_job(d: &mut Driver, spec: &JobSpec, opts: &VhostBenchOpts) -> Result<VhostGroup, BenchError> {
    let nq = d.num_queues();
    if spec.numjobs as usize > nq {
        return Err(BenchError::Refused(format!(
            "numjobs={} but the device has {nq} queue(s): one job per virtqueue",
            spec.numjobs
        )));
    }
    let cap = d.config().capacity_bytes();
    let bs = spec.bs;
    let piece = seg_plan(d, bs)?;
    let descs = spec.iodepth as u64 * (bs.div_ceil(piece) + 2);
    let qsize = d.queue(0).size() as u64;
    if descs > qsize {
        return Err(BenchError::Refused(format!(
            "iodepth={} x {} descriptors per request needs {descs} descriptors; the queues have {qsize} (--queue-size)",
            spec.iodepth,
            bs.div_ceil(piece) + 2
        )));
    }
    let mut regions = Vec::new();
    for j in 0..spec.numjobs as u64 {
        let off = spec.offset + j * spec.offset_increment;
        if !off.is_multiple_of(bs) || off >= cap {
            return Err(BenchError::Refused(format!(
                "job {j}: offset {off} is not a multiple of bs={bs} or not below the capacity ({cap} bytes)"
            )));
        }
        let len = spec.size.unwrap_or(cap - off).min(cap - off);
        let blocks = len / bs;
        if blocks == 0 {
            return Err(BenchError::Refused(format!(
                "job {j}: size={len} is smaller than bs={bs}"
            )));
        }
        regions.push((off, blocks));
    }
    let prog = Progress::default();
    let abort = AtomicBool::new(false);
    let start = Barrier::new(spec.numjobs as usize + 1);
    let target = format!("vhost-user-blk:{}", opts.socket.display());
    let me = std::process::id();
    let (outs, daemon, bench, wall) = std::thread::scope(|sc| -> Result<_, BenchError> {
        let mut handles = Vec::new();
        for (j, q) in d.queues_mut().iter_mut().take(spec.numjobs as usize).enumerate() {
            let (prog, abort, start) = (&prog, &abort, &start);
            let (off, blocks) = regions[j];
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vhost-job{j}"))
                    .spawn_scoped(sc, move || {
                        job_loop(q, spec, j as u32, off, blocks, piece, opts.spin, start, abort, prog)
                    })
                    .map_err(|e| BenchError::setup("spawning a job thread", e))?,
            );
        }
        start.wait();
        let t0 = Instant::now();
        // The measured interval starts after the ramp.
        let ramp_end = t0 + spec.ramp_time;
        let mut line = ProgressLine::new(&spec.name, t0, opts.progress);
        let mut samples = None;
        let sample_all = || -> Result<_, BenchError> {
            let dm = match opts.pid {
                Some(p) => Some(cpu::sample(p).map_err(|source| BenchError::Io {
                    path: format!("/proc/{p}").into(),
                    source,
                })?),
                None => None,
            };
            let mine = cpu::sample(me).map_err(|source| BenchError::Io {
                path: "/proc/self".into(),
                source,
            })?;
            Ok((dm, mine))
        };
        if spec.ramp_time.is_zero() {
            samples = Some(sample_all()?);
        }
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
            if samples.is_none() && Instant::now() >= ramp_end {
                samples = Some(sample_all()?);
            }
            if opts.progress && line.since_last() >= Duration::from_secs(1) {
                line.print(&prog);
            }
        }
        line.finish();
        let end = sample_all()?;
        let begin = samples.unwrap_or_else(|| end.clone());
        let wall = end.1.at.duration_since(begin.1.at);
        let daemon = match (&begin.0, &end.0) {
            (Some(a), Some(b)) => Some(cpu::delta(a, b)),
            _ => None,
        };
        let bench = cpu::delta(&begin.1, &end.1);
        let outs: Vec<JobOut> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| BenchError::Refused("a job thread panicked".into()))
            })
            .collect::<Result<_, _>>()?;
        Ok((outs, daemon, bench, wall))
    })?;
    let mut g = GroupResult {
        name: spec.name.clone(),
        spec: spec.clone(),
        target,
        read: DirStats::default(),
        write: DirStats::default(),
        runtime: Duration::ZERO,
        usr_cpu: bench.usr_ns as f64 / wall.as_nanos().max(1) as f64 * 100.0,
        sys_cpu: bench.sys_ns as f64 / wall.as_nanos().max(1) as f64 * 100.0,
        error: None,
        verified_blocks: 0,
        verify_errors: 0,
        reactor: Default::default(),
        reactors: Default::default(),
    };
    let mut queues = Vec::new();
    for o in &outs {
        g.read.merge(&o.read);
        g.write.merge(&o.write);
        g.runtime = g.runtime.max(o.runtime);
        if g.error.is_none() {
            g.error.clone_from(&o.error);
        }
        queues.push(o.stats);
    }
    Ok(VhostGroup {
        group: g,
        daemon,
        bench,
        queues,
    })
}

fn sum_stats(v: &[QueueStats]) -> QueueStats {
    v.iter().fold(QueueStats::default(), |a, s| QueueStats {
        submitted: a.submitted + s.submitted,
        completed: a.completed + s.completed,
        publishes: a.publishes + s.publishes,
        kicks: a.kicks + s.kicks,
        kicks_suppressed: a.kicks_suppressed + s.kicks_suppressed,
        sleeps: a.sleeps + s.sleeps,
        calls: a.calls + s.calls,
    })
}

fn cpu_json(d: &CpuDelta, ios: u64) -> Value {
    json!({
        "cpu_ns": d.cpu_ns,
        "usr_ns": d.usr_ns,
        "sys_ns": d.sys_ns,
        "wall_ns": d.wall_ns,
        "cpu_pct": d.pct(),
        "cpu_ns_per_io": d.cpu_ns as f64 / ios.max(1) as f64,
        "source": d.source,
        "threads_exited": d.threads_exited,
        "threads": d.threads.iter().filter(|t| t.2 > 0).take(16)
            .map(|t| json!({"tid": t.0, "name": t.1, "cpu_ns": t.2})).collect::<Vec<_>>(),
    })
}

fn io_report(r: &VhostBenchReport) -> IoBenchReport {
    IoBenchReport {
        groups: r.groups.iter().map(|g| g.group.clone()).collect(),
        cipher_ns_per_io: None,
        cipher_hot_ns_per_io: None,
        kernel: String::new(),
        cores: Vec::new(),
        rounds: Vec::new(),
    }
}

/// fio's JSON layout (from `report::to_json`) with the vhost figures in
/// each job's `sealdisk` object and the device in the top-level one.
pub fn to_json(r: &VhostBenchReport) -> Value {
    let mut v = report::to_json(&io_report(r));
    v["global options"]["ioengine"] = json!("vhost-user-blk");
    if let Some(jobs) = v["jobs"].as_array_mut() {
        for (j, g) in jobs.iter_mut().zip(&r.groups) {
            let ios = g.ios();
            let qs = sum_stats(&g.queues);
            j["job options"]["ioengine"] = json!("vhost-user-blk");
            j["job options"]["filename"] = json!(r.socket.display().to_string());
            j["sealdisk"] = json!({
                "target": g.group.target,
                "socket": r.socket.display().to_string(),
                "queues": g.queues.len(),
                "daemon_pid": r.pid,
                "daemon": g.daemon.as_ref().map(|d| cpu_json(d, ios)),
                "cpu_ns_per_io": g.daemon_ns_per_io(),
                "bench": cpu_json(&g.bench, ios),
                "notifications": {
                    "kicks": qs.kicks,
                    "kicks_suppressed": qs.kicks_suppressed,
                    "calls": qs.calls,
                    "sleeps": qs.sleeps,
                    "kicks_per_io": qs.kicks as f64 / qs.completed.max(1) as f64,
                    "calls_per_io": qs.calls as f64 / qs.completed.max(1) as f64,
                },
            });
        }
    }
    let n = &r.negotiated;
    let c = &r.config;
    v["sealdisk"] = json!({
        "vhost": {
            "socket": r.socket.display().to_string(),
            "device_features": format!("{:#x}", n.device_features),
            "acked_features": feature_names(n.acked_features),
            "protocol_features": format!("{:#x}", n.protocol_offered),
            "acked_protocol_features": protocol_names(n.protocol_acked),
            "event_idx": n.event_idx(),
            "device_queues": r.config.num_queues,
            "queues": r.num_queues,
            "queue_size": r.queue_size,
            "capacity_bytes": c.capacity_bytes(),
            "blk_size": c.blk_size,
            "seg_max": c.seg_max,
            "size_max": c.size_max,
        }
    });
    v
}

/// fio-like text (`report::to_text`) with the CPU line naming the bench's
/// and the daemon's CPU per I/O.
pub fn to_text(r: &VhostBenchReport) -> String {
    use std::fmt::Write;
    let base = report::to_text(&io_report(r));
    let mut out = String::new();
    let mut k = 0;
    for line in base.lines() {
        if line.starts_with("  cpu: ") {
            if let Some(g) = r.groups.get(k) {
                let qs = sum_stats(&g.queues);
                let _ = writeln!(
                    out,
                    "  bench cpu: usr={:.1}%, sys={:.1}%, {:.0} ns/IO; {:.3} kicks/IO, {:.3} calls/IO",
                    g.group.usr_cpu,
                    g.group.sys_cpu,
                    g.bench_ns_per_io(),
                    qs.kicks as f64 / qs.completed.max(1) as f64,
                    qs.calls as f64 / qs.completed.max(1) as f64,
                );
                if let Some(d) = &g.daemon {
                    let _ = writeln!(
                        out,
                        "  daemon cpu (pid {}): {:.1}% of a core (usr {:.1}%, sys {:.1}%), {:.0} ns/IO [{}]",
                        r.pid.unwrap_or(0),
                        d.pct(),
                        d.usr_ns as f64 / d.wall_ns.max(1) as f64 * 100.0,
                        d.sys_ns as f64 / d.wall_ns.max(1) as f64 * 100.0,
                        g.daemon_ns_per_io().unwrap_or(0.0),
                        d.source
                    );
                }
            }
            k += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
