//! `sealdisk bench io`: a fio-compatible load generator on the reactor/bdev
//! stack (like SPDK's bdevperf). Jobs are spread over the reactors; with
//! `--compare` the same jobs run on the plain backend and on the crypto layer
//! over the *same* backend, alternating (ABBA), and the report gives both
//! plus the ratios.

use super::BenchError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fio::{FileJob, JobSpec, TargetSpec};
use super::job::{DirStats, Job, JobResult, Progress, ProgressLine};
use crate::bdev::crypto::CryptoBdev;
use crate::bdev::iostat::StatsBdev;
use crate::bdev::malloc::MallocBdev;
use crate::bdev::null::NullBdev;
use crate::bdev::uring::{Iopoll, UringBdev, UringOpts};
use crate::bdev::BdevRef;
use crate::crypto::Xts;
use crate::reactor::{ReactorConfig, Reactors, StatsSnapshot};

/// Options of a bench run.
#[derive(Debug, Clone)]
pub struct IoBenchOpts {
    pub jobs: Vec<FileJob>,
    pub compare: bool,
    /// Alternations per target with `--compare` (ABBA order).
    pub rounds: u32,
    pub reactors: ReactorConfig,
    /// Print a progress line to stderr.
    pub progress: bool,
    /// Polled completions for `file:` backends.
    pub iopoll: Iopoll,
    /// Stack the per-disk statistics layer (`bdev::iostat`) on top of every
    /// target, as the daemon does on every attached disk (`--iostat on`).
    pub iostat: bool,
}

/// Results of one job definition on one target (all its numjobs, all
/// rounds, merged like fio's group_reporting).
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// Job name (with `--compare`: `plain` or `encrypted`).
    pub name: String,
    pub spec: JobSpec,
    pub target: String,
    pub read: DirStats,
    pub write: DirStats,
    /// Sum over rounds of the measured wall time.
    pub runtime: Duration,
    pub usr_cpu: f64,
    pub sys_cpu: f64,
    pub error: Option<String>,
    pub verified_blocks: u64,
    pub verify_errors: u64,
    /// Reactor counters over the measured runs.
    pub reactor: StatsSnapshot,
    /// Reactors the jobs ran on.
    pub reactors: std::collections::BTreeSet<usize>,
}

impl GroupResult {
    /// Reactor busy time per completed I/O, nanoseconds.
    pub fn busy_ns_per_io(&self) -> f64 {
        let ios = self.read.ios + self.write.ios;
        if ios == 0 {
            0.0
        } else {
            self.reactor.busy_ns as f64 / ios as f64
        }
    }
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct IoBenchReport {
    pub groups: Vec<GroupResult>,
    /// With `--compare`: nanoseconds the XTS kernel takes for one request
    /// of `bs` bytes over the job's working set (its `iodepth` buffers in
    /// turn, in place or into bounce buffers as the crypto layer does),
    /// measured in this run: the cipher's own cost in the stack.
    pub cipher_ns_per_io: Option<f64>,
    /// The same on one buffer that stays in L1 (the kernel's best case).
    pub cipher_hot_ns_per_io: Option<f64>,
    pub kernel: String,
    pub cores: Vec<usize>,
    /// With `--compare`: each round's plain and encrypted run, in order, for
    /// the first job definition (the one [`super::report::ratios`] compares).
    pub rounds: Vec<RoundPair>,
}

/// One `--compare` round: the plain and the encrypted run side by side.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundPair {
    pub plain: RoundFigures,
    pub encrypted: RoundFigures,
}

/// What one run of one round did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundFigures {
    pub iops: f64,
    /// Reactor busy time per I/O, nanoseconds.
    pub busy_ns_per_io: f64,
    pub clat_p99_ns: f64,
}

impl RoundFigures {
    fn of(out: &RunOut) -> RoundFigures {
        let mut clat = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is valid");
        let mut ios = 0;
        for r in &out.results {
            ios += r.read.ios + r.write.ios;
            let _ = clat.add(&r.read.clat);
            let _ = clat.add(&r.write.clat);
        }
        let runtime = out.results.iter().map(|r| r.runtime).max().unwrap_or_default();
        RoundFigures {
            iops: ios as f64 / runtime.as_secs_f64().max(1e-9),
            busy_ns_per_io: if ios == 0 {
                0.0
            } else {
                out.reactor.busy_ns as f64 / ios as f64
            },
            clat_p99_ns: clat.value_at_quantile(0.99) as f64,
        }
    }
}

fn build_base(t: &TargetSpec, job: &JobSpec, iopoll: Iopoll) -> Result<BdevRef, BenchError> {
    let want = job.offset + job.offset_increment * (job.numjobs as u64 - 1) + job.size.unwrap_or(1 << 30);
    let backend = t.backend.as_deref().unwrap_or("malloc");
    Ok(match backend {
        "malloc" => Arc::new(MallocBdev::new("malloc0", want, 512)),
        "null" => Arc::new(NullBdev::new("null0", want.max(1 << 40), 512)),
        b if b.starts_with("file:") => {
            let path = PathBuf::from(&b[5..]);
            let create = (!path.exists()).then_some(want);
            Arc::new(
                UringBdev::open(
                    &path,
                    &UringOpts {
                        create_size: create,
                        buffered: false,
                        iopoll,
                    },
                )
                .map_err(|e| BenchError::Io {
                    path: path.clone(),
                    source: e,
                })?,
            )
        }
        b if b.starts_with("volume:") => volume_backend(&PathBuf::from(&b[7..]), want)?,
        other => {
            return Err(BenchError::Refused(format!(
                "unknown backend {other:?}: use file:PATH, volume:POOL_PATH, malloc or null"
            )))
        }
    })
}

/// `volume:POOL_PATH`: a thin volume in a new pool at POOL_PATH (its catalog
/// beside it as POOL_PATH.catalog; both replaced), so the job measures the
/// volume layer over the pool's device (a pool on /dev/shm is RAM). The
/// volume is written once before the job, so the job runs on the fast path
/// (clusters the volume owns); [`prefill`] times those first writes.
fn volume_backend(path: &std::path::Path, want: u64) -> Result<BdevRef, BenchError> {
    let cat = path.with_extension("catalog");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&cat);
    let size = want.div_ceil(4096) * 4096;
    let cluster = crate::volume::DEFAULT_CLUSTER;
    let db = crate::catalog::open(&cat).map_err(|e| BenchError::setup(cat.display().to_string(), e))?;
    let pool = crate::volume::Pool::open(db.clone(), path, size + 2 * cluster)
        .map_err(|e| BenchError::setup(format!("pool {}", path.display()), e))?;
    let w = db
        .begin_write()
        .map_err(|e| BenchError::setup(cat.display().to_string(), e))?;
    pool.create_volume(&w, "bench", size)
        .map_err(|e| BenchError::setup("the bench volume", e))?;
    w.commit()
        .map_err(|e| BenchError::setup(cat.display().to_string(), e))?;
    pool.bdev("bench").map_err(|e| BenchError::setup("the bench volume", e))
}

/// Writes one 4 KiB block into every cluster of a fresh volume, one at a
/// time, and reports the latency of those first writes (slow path: allocate,
/// fdatasync, commit, publish).
fn prefill(reactors: &Reactors, bdev: &BdevRef) -> Result<(), BenchError> {
    let cluster = crate::volume::DEFAULT_CLUSTER;
    let n = bdev.capacity().div_ceil(cluster);
    let b = bdev.clone();
    let lat = reactors.call(
        0,
        Duration::from_secs(3600),
        move |ctx| -> Result<Vec<u64>, BenchError> {
            let ch = b.open_channel(&ctx.chan).map_err(|e| BenchError::setup(b.name(), e))?;
            let mut q = crate::bdev::IoQueue::new(ch);
            let mut lat = Vec::with_capacity(n as usize);
            for c in 0..n {
                let mut buf = ctx
                    .chan
                    .pool
                    .alloc_zeroed(4096)
                    .ok_or_else(|| BenchError::Refused("prefill: no buffer on reactor 0".into()))?;
                buf.set_len(4096);
                buf[0] = 1;
                let t = Instant::now();
                let req = crate::bdev::IoRequest::write(c * cluster, buf, c);
                if q.submit(req).is_err() || q.take_held().is_some() {
                    return Err(BenchError::Refused("prefill: back-pressure on an idle channel".into()));
                }
                let mut out = q.wait(1, Duration::MAX, None);
                if let Some(done) = out.pop() {
                    done.result
                        .map_err(|e| BenchError::setup(format!("first write of cluster {c}"), e))?;
                }
                q.recycle(out);
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok(lat)
        },
    )??;
    let mut sorted = lat.clone();
    sorted.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64;
    let p = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    eprintln!(
        "first writes into fresh clusters: {} at QD1, mean {:.1} us, p50 {:.1} us, p99 {:.1} us",
        lat.len(),
        mean / 1e3,
        p(0.5),
        p(0.99)
    );
    Ok(())
}

/// `b`, with the statistics layer on top if `iostat`.
fn with_iostat(b: BdevRef, iostat: bool) -> BdevRef {
    if iostat {
        Arc::new(StatsBdev::new(b))
    } else {
        b
    }
}

fn random_key() -> crate::secmem::SecretMem {
    use rand::RngCore;
    let mut k = crate::secmem::SecretMem::new(64).expect("secret memory for a benchmark key");
    loop {
        rand::rngs::OsRng.fill_bytes(k.as_mut_slice());
        if k.as_slice()[..32] != k.as_slice()[32..] {
            return k;
        }
    }
}

fn crypto_over(base: &BdevRef, t: &TargetSpec) -> Result<(BdevRef, Arc<Xts>), BenchError> {
    let key = random_key();
    let xts = Arc::new(
        Xts::new(key.as_slice().try_into().expect("64 bytes")).map_err(|e| BenchError::setup("the XTS engine", e))?,
    );
    let ss = t.sector_size.unwrap_or(4096);
    let crypto = CryptoBdev::new(base.clone(), xts.clone(), ss).map_err(|e| BenchError::setup(base.name(), e))?;
    Ok((Arc::new(crypto), xts))
}

fn rusage() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

struct RunOut {
    results: Vec<JobResult>,
    wall: Duration,
    usr: f64,
    sys: f64,
    reactor: StatsSnapshot,
}

fn sum_stats(v: &[StatsSnapshot]) -> StatsSnapshot {
    v.iter().fold(StatsSnapshot::default(), |a, s| a.plus(s))
}

/// Run `spec.numjobs` jobs on `bdev`, spread round-robin over the reactors.
fn run_once(
    reactors: &Reactors,
    bdev: &BdevRef,
    spec: &JobSpec,
    label: &str,
    progress: bool,
) -> Result<RunOut, BenchError> {
    let (tx, rx) = mpsc::channel();
    let prog = Arc::new(Progress::default());
    let abort = Arc::new(AtomicBool::new(false));
    let before = reactors.stats();
    let (u0, s0) = rusage();
    let t0 = Instant::now();
    for j in 0..spec.numjobs {
        let r = j as usize % reactors.len();
        let (bdev, mut spec, prog, job_abort, tx) =
            (bdev.clone(), spec.clone(), prog.clone(), abort.clone(), tx.clone());
        spec.offset += spec.offset_increment * j as u64;
        let setup = reactors.call(r, Duration::from_secs(10), move |ctx| -> Result<(), BenchError> {
            let chan = bdev
                .open_channel(&ctx.chan)
                .map_err(|e| BenchError::setup(bdev.name(), e))?;
            let job = Job::new(spec, j, ctx, chan, bdev.capacity(), prog, job_abort, tx)?;
            ctx.add_poller(Box::new(job));
            Ok(())
        })?;
        if let Err(e) = setup {
            abort.store(true, Ordering::Relaxed);
            return Err(e);
        }
    }
    drop(tx);
    let mut results = Vec::new();
    let mut line = ProgressLine::new(label, t0, progress);
    while results.len() < spec.numjobs as usize {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(r) => results.push(r),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if progress {
                    line.print(&prog);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(BenchError::Refused(
                    "a job ended without reporting (reactor stopped?)".into(),
                ));
            }
        }
    }
    line.finish();
    let wall = t0.elapsed();
    let (u1, s1) = rusage();
    let after = reactors.stats();
    let delta: Vec<StatsSnapshot> = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    Ok(RunOut {
        results,
        wall,
        usr: u1 - u0,
        sys: s1 - s0,
        reactor: sum_stats(&delta),
    })
}

fn merge_into(g: &mut GroupResult, out: &RunOut) {
    let mut runtime = Duration::ZERO;
    for r in &out.results {
        g.read.merge(&r.read);
        g.write.merge(&r.write);
        runtime = runtime.max(r.runtime);
        g.verified_blocks += r.verified_blocks;
        g.verify_errors += r.verify_errors;
        g.reactors.insert(r.reactor);
        if g.error.is_none() {
            g.error.clone_from(&r.error);
        }
    }
    let secs = out.wall.as_secs_f64().max(1e-9);
    let old = g.runtime.as_secs_f64();
    let total = old + secs;
    // CPU as % of one core over the whole measured time (fio's usr_cpu).
    g.usr_cpu = (g.usr_cpu * old + out.usr / secs * 100.0 * secs) / total;
    g.sys_cpu = (g.sys_cpu * old + out.sys / secs * 100.0 * secs) / total;
    g.runtime += runtime;
    g.reactor = sum_stats(&[g.reactor, out.reactor]);
}

fn new_group(name: &str, spec: &JobSpec, target: &str) -> GroupResult {
    GroupResult {
        name: name.into(),
        spec: spec.clone(),
        target: target.into(),
        read: DirStats::default(),
        write: DirStats::default(),
        runtime: Duration::ZERO,
        usr_cpu: 0.0,
        sys_cpu: 0.0,
        error: None,
        verified_blocks: 0,
        verify_errors: 0,
        reactor: StatsSnapshot::default(),
        reactors: Default::default(),
    }
}

/// What one request's encryption is in a job: `bs` bytes in `ss`-byte
/// sectors, cycling over `depth` request buffers (a job at that queue depth
/// keeps that many), in place or into as many bounce buffers, with
/// streaming stores where the crypto layer uses them.
#[derive(Clone, Copy)]
struct CipherWork {
    bs: usize,
    ss: usize,
    depth: usize,
    in_place: bool,
    stream: bool,
}

/// The cipher's own cost in nanoseconds per request, measured on reactor
/// 0's thread (the core the jobs run on, between their rounds): `hot` is
/// one buffer encrypted again and again (it stays in L1), `working_set` is
/// the job's buffers in turn (they live in L2 at QD32, as in the stack).
/// Each is the median of five 40 ms windows' means.
#[derive(Clone, Copy, Debug, Default)]
struct CipherCost {
    hot: f64,
    working_set: f64,
}

fn cipher_ns(reactors: &Reactors, xts: &Arc<Xts>, w: CipherWork) -> Result<CipherCost, BenchError> {
    let xts = xts.clone();
    reactors
        .call(0, Duration::from_secs(10), move |_| {
            let len = w.bs.max(w.ss) / w.ss * w.ss;
            // Past 64 MiB a larger working set misses the caches no more.
            let depth = w.depth.clamp(1, ((64 << 20) / len).max(1));
            let mut src = AlignedBufs::new(depth, len);
            let mut dst = AlignedBufs::new(if w.in_place { 0 } else { depth }, len);
            let mut windows = |bufs: usize| {
                let mut means = Vec::with_capacity(5);
                let mut sector = 0u64;
                for _ in 0..5 {
                    let t = Instant::now();
                    let mut n = 0u64;
                    while t.elapsed() < Duration::from_millis(40) {
                        for _ in 0..16 {
                            let i = (n % bufs as u64) as usize;
                            if w.in_place {
                                xts.encrypt_sectors(src.get_mut(i), sector, w.ss)
                            } else if w.stream && len <= crate::bdev::crypto::STREAM_MAX {
                                xts.encrypt_sectors_for_device(src.get(i), dst.get_mut(i), sector, w.ss)
                            } else {
                                xts.encrypt_sectors_to(src.get(i), dst.get_mut(i), sector, w.ss)
                            }
                            .expect("whole sectors");
                            n += 1;
                            sector += (len / w.ss) as u64;
                        }
                    }
                    means.push(t.elapsed().as_nanos() as f64 / n as f64);
                }
                median(means).unwrap_or(0.0)
            };
            CipherCost {
                hot: windows(1),
                working_set: windows(depth),
            }
        })
        .map_err(BenchError::from)
}

/// `n` page-aligned buffers of `len` bytes in one allocation, filled.
struct AlignedBufs {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBufs {
    fn new(n: usize, len: usize) -> AlignedBufs {
        let mem = vec![0x5au8; n * len + 4096];
        let start = mem.as_ptr().align_offset(4096);
        AlignedBufs { mem, start, len }
    }
    fn get(&self, i: usize) -> &[u8] {
        let at = self.start + i * self.len;
        &self.mem[at..at + self.len]
    }
    fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let at = self.start + i * self.len;
        &mut self.mem[at..at + self.len]
    }
}

/// The median of the samples.
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Run the benchmark.
pub fn run(opts: &IoBenchOpts) -> Result<IoBenchReport, BenchError> {
    let reactors = Reactors::start(&opts.reactors).map_err(|e| BenchError::setup("starting reactors", e))?;
    let mut groups = Vec::new();
    let mut cipher = None;
    let mut cipher_hot = None;
    let mut round_pairs = Vec::new();
    let mut kernel = crate::crypto::Kernel::selected()
        .map_err(|e| BenchError::setup("the XTS kernel", e))?
        .name()
        .to_string();
    for fj in &opts.jobs {
        let base = build_base(&fj.target, &fj.job, opts.iopoll)?;
        if fj.target.backend.as_deref().is_some_and(|b| b.starts_with("volume:")) {
            prefill(&reactors, &base)?;
        }
        if opts.compare {
            let (enc, xts) = crypto_over(&base, &fj.target)?;
            let (base, enc) = (with_iostat(base, opts.iostat), with_iostat(enc, opts.iostat));
            let backend_name = base.name().to_string();
            kernel = xts.kernel().name().to_string();
            let rounds = opts.rounds.max(1);
            let mut spec = fj.job.clone();
            if let Some(rt) = spec.runtime {
                spec.runtime = Some(rt / rounds);
            }
            if !spec.time_based {
                spec.size = spec.size.map(|s| (s / rounds as u64 / spec.bs).max(1) * spec.bs);
            }
            let mut plain = new_group("plain", &fj.job, &backend_name);
            let mut encrypted = new_group("encrypted", &fj.job, enc.name());
            let work = CipherWork {
                bs: fj.job.bs as usize,
                ss: fj.target.sector_size.unwrap_or(4096) as usize,
                depth: fj.job.iodepth as usize,
                in_place: fj.job.inplace,
                stream: base.dma_writes(),
            };
            // The cipher's own cost, sampled before and after every round on
            // the reactors' core: the machine's speed drifts over a run.
            let mut samples = vec![cipher_ns(&reactors, &xts, work)?];
            let mut pairs = Vec::new();
            for r in 0..rounds {
                let order: [bool; 2] = if r % 2 == 0 { [false, true] } else { [true, false] };
                let mut pair = RoundPair::default();
                for is_enc in order {
                    let (bdev, g, label) = if is_enc {
                        (&enc, &mut encrypted, "encrypted")
                    } else {
                        (&base, &mut plain, "plain")
                    };
                    let out = run_once(&reactors, bdev, &spec, label, opts.progress)?;
                    merge_into(g, &out);
                    *(if is_enc { &mut pair.encrypted } else { &mut pair.plain }) = RoundFigures::of(&out);
                }
                pairs.push(pair);
                samples.push(cipher_ns(&reactors, &xts, work)?);
            }
            cipher = median(samples.iter().map(|c| c.working_set).collect());
            cipher_hot = median(samples.iter().map(|c| c.hot).collect());
            if round_pairs.is_empty() {
                round_pairs = pairs;
            }
            groups.push(plain);
            groups.push(encrypted);
        } else {
            let bdev = if fj.target.encrypt {
                let (enc, xts) = crypto_over(&base, &fj.target)?;
                kernel = xts.kernel().name().to_string();
                enc
            } else {
                base.clone()
            };
            let bdev = with_iostat(bdev, opts.iostat);
            let target_name = bdev.name().to_string();
            let mut g = new_group(&fj.job.name, &fj.job, &target_name);
            let out = run_once(&reactors, &bdev, &fj.job, &fj.job.name, opts.progress)?;
            merge_into(&mut g, &out);
            groups.push(g);
        }
    }
    let cores = opts.reactors.cores.clone();
    reactors.shutdown();
    Ok(IoBenchReport {
        groups,
        cipher_ns_per_io: cipher,
        cipher_hot_ns_per_io: cipher_hot,
        kernel,
        cores,
        rounds: round_pairs,
    })
}
