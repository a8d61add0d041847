//! Reactors: one pinned thread per core, each running requests to
//! completion without locks.
//!
//! A reactor owns an io_uring ([`Ring`], single issuer), a pool of aligned
//! buffers registered with that ring ([`BufPool`]) and the pollers placed on
//! it (frontend connections, benchmark jobs); pollers open their own bdev
//! channels from the reactor's [`ChannelCtx`]. Work crosses cores only as
//! messages on a bounded lock-free queue ([`Reactors::send`]); a full queue is
//! reported to the sender ([`SendError::Full`]), never waited on.
//!
//! Hybrid polling: the loop spins while there is work or there was work in
//! the last [`ReactorConfig::spin`]; then it parks in the ring (a read of the
//! reactor's eventfd is armed on the ring, so a message or any completion
//! wakes it), so an idle daemon costs close to nothing.

mod stats;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, types};

pub use stats::StatsSnapshot;
pub(crate) use stats::{IoCount, IoSource, ReactorStats};

use crate::bdev::ChannelCtx;
use crate::iobuf::BufPool;
use crate::uring::{PollRing, Ring, RingOpts, Route};

/// What a poller did in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Did this much work (completions handled, requests submitted).
    Busy(usize),
    /// Nothing to do right now.
    Idle,
    /// Finished; the reactor drops it.
    Done,
}

/// Something the reactor calls on every loop iteration.
pub trait Poller {
    fn poll(&mut self, ctx: &ReactorCtx) -> Poll;
    /// Work that can become ready without a completion or a message to wake
    /// the reactor (a request held by a QoS limit, a retry after
    /// back-pressure): while any poller says so, the reactor parks at most
    /// [`ReactorConfig::park_timeout`]; otherwise up to
    /// [`ReactorConfig::idle_park`].
    fn pending(&self) -> bool {
        true
    }
}

/// A message: code to run on a reactor's thread.
pub(crate) type Msg = Box<dyn FnOnce(&mut ReactorCtx) + Send>;

/// Configuration of the reactor set.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// CPU cores, one reactor each.
    pub cores: Vec<usize>,
    /// Pin each reactor thread to its core.
    pub pin: bool,
    pub ring: RingOpts,
    /// Bytes of I/O buffer arena per reactor.
    pub pool_bytes: usize,
    /// Capacity of each reactor's message queue.
    pub queue_depth: usize,
    /// Keep spinning this long after the last work before parking.
    pub spin: Duration,
    /// Longest park while a poller has [`Poller::pending`] work (it is
    /// polled at least this often).
    pub park_timeout: Duration,
    /// Longest park when no poller has pending work: completions and
    /// messages wake the reactor, so this only bounds how late a poller
    /// notices a flag (a revoked export, a stopping server).
    pub idle_park: Duration,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: all_cores(),
            pin: true,
            ring: RingOpts::default(),
            pool_bytes: 64 << 20,
            queue_depth: 1024,
            spin: Duration::from_micros(20),
            park_timeout: Duration::from_millis(10),
            idle_park: Duration::from_millis(100),
        }
    }
}

/// Every core this process may run on.
pub fn all_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_else(|| vec![0])
}

/// Why a core list (`--cores`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoresError {
    #[error("bad core list {0:?}: use e.g. 0,1 or 0-3")]
    Syntax(String),
    #[error("empty core list {0:?}: name at least one core, e.g. 0 or 0-3")]
    Empty(String),
    #[error("core {core} is not available to this process (available: {available:?})")]
    Unavailable { core: usize, available: Vec<usize> },
}

/// Why [`Reactors::call`] got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("no reactor {0}")]
    NoSuchReactor(usize),
    #[error("reactor {reactor}'s message queue stayed full for {timeout:?}; retry later")]
    QueueFull { reactor: usize, timeout: Duration },
    #[error("reactor {reactor} did not answer within {timeout:?}")]
    Timeout { reactor: usize, timeout: Duration },
}

/// Parse `0,1` / `0-3` / `0-1,4`.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, CoresError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || CoresError::Syntax(s.to_owned());
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        return Err(CoresError::Empty(s.to_owned()));
    }
    let avail = all_cores();
    if let Some(c) = out.iter().find(|c| !avail.contains(c)) {
        return Err(CoresError::Unavailable {
            core: *c,
            available: avail,
        });
    }
    Ok(out)
}

/// Why a message was not delivered.
pub enum SendError {
    /// The reactor's queue is full: back-pressure. The message is handed back.
    Full(Msg),
    /// No reactor with that index.
    NoSuchReactor(usize),
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Full(_) => write!(f, "reactor message queue full; retry later"),
            SendError::NoSuchReactor(i) => write!(f, "no reactor {i}"),
        }
    }
}

/// The state a reactor's messages and pollers see.
pub struct ReactorCtx {
    pub id: usize,
    pub core: usize,
    pub chan: ChannelCtx,
    pub stats: Arc<ReactorStats>,
    new_pollers: Vec<Box<dyn Poller>>,
}

impl ReactorCtx {
    /// Run `p` on this reactor from the next loop iteration on.
    pub fn add_poller(&mut self, p: Box<dyn Poller>) {
        self.new_pollers.push(p);
    }
}

struct Shared {
    queue: ArrayQueue<Msg>,
    tid: std::sync::atomic::AtomicI32,
    parked: AtomicBool,
    stop: AtomicBool,
    waker: OwnedFd,
    stats: Arc<ReactorStats>,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.waker.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

struct Handle {
    core: usize,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The running reactors.
pub struct Reactors {
    handles: Vec<Handle>,
}

impl Reactors {
    /// Start one reactor per configured core. Fails if any ring or pool
    /// cannot be set up (nothing is left running).
    pub fn start(cfg: &ReactorConfig) -> io::Result<Reactors> {
        if cfg.cores.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no cores given"));
        }
        let mut handles = Vec::new();
        let mut ready = Vec::new();
        for (id, &core) in cfg.cores.iter().enumerate() {
            // SAFETY: plain eventfd(2) call; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let shared = Arc::new(Shared {
                queue: ArrayQueue::new(cfg.queue_depth.max(1)),
                tid: std::sync::atomic::AtomicI32::new(0),
                parked: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                // SAFETY: `fd` is a fresh descriptor we own.
                waker: unsafe { OwnedFd::from_raw_fd(fd) },
                stats: Arc::new(ReactorStats::default()),
            });
            let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
            let sh = shared.clone();
            let c = cfg.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{id}"))
                .spawn(move || run(id, core, c, sh, tx))?;
            handles.push(Handle {
                core,
                shared,
                thread: Some(thread),
            });
            ready.push(rx);
        }
        let reactors = Reactors { handles };
        for rx in ready {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("reactor thread died during start-up")),
            }
        }
        Ok(reactors)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The core reactor `i` runs on.
    pub fn core(&self, i: usize) -> usize {
        self.handles[i].core
    }

    /// Queue `msg` for reactor `i`. Never blocks.
    pub fn send(&self, i: usize, msg: Msg) -> Result<(), SendError> {
        let h = self.handles.get(i).ok_or(SendError::NoSuchReactor(i))?;
        if let Err(m) = h.shared.queue.push(msg) {
            h.shared.stats.add_queue_full();
            return Err(SendError::Full(m));
        }
        // Pairs with the fence in `park`: either the reactor sees the message
        // before parking, or we see it parked and wake it.
        fence(Ordering::SeqCst);
        if h.shared.parked.load(Ordering::SeqCst) {
            h.shared.wake();
        }
        Ok(())
    }

    /// Run `f` on reactor `i` and wait for its result (control-plane helper;
    /// retries while the queue is full, for at most `timeout`).
    pub fn call<R: Send + 'static>(
        &self,
        i: usize,
        timeout: Duration,
        f: impl FnOnce(&mut ReactorCtx) -> R + Send + 'static,
    ) -> Result<R, CallError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut msg: Msg = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        let deadline = Instant::now() + timeout;
        loop {
            match self.send(i, msg) {
                Ok(()) => break,
                Err(SendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(SendError::Full(_)) => return Err(CallError::QueueFull { reactor: i, timeout }),
                Err(SendError::NoSuchReactor(r)) => return Err(CallError::NoSuchReactor(r)),
            }
        }
        rx.recv_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        )
        .map_err(|_| CallError::Timeout { reactor: i, timeout })
    }

    /// Kernel thread ids of the reactor threads (for /proc and perf).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.handles
            .iter()
            .map(|h| h.shared.tid.load(Ordering::SeqCst))
            .collect()
    }

    /// Counters of every reactor.
    pub fn stats(&self) -> Vec<StatsSnapshot> {
        self.handles.iter().map(|h| h.shared.stats.snapshot()).collect()
    }

    /// Stop every reactor (pollers are dropped) and join the threads.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::SeqCst);
            h.shared.wake();
        }
        for h in &mut self.handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn run(
    id: usize,
    core: usize,
    cfg: ReactorConfig,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    // SAFETY: gettid has no preconditions.
    shared.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
    let (ring, pool) = match setup(id, core, &cfg) {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    Reactor::new(id, core, cfg, shared, ring, pool).run();
}

/// Pin the thread to its core (if configured), then make the reactor's
/// buffer pool and ring.
fn setup(id: usize, core: usize, cfg: &ReactorConfig) -> io::Result<(Rc<Ring>, BufPool)> {
    if cfg.pin && !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(io::Error::other(format!("could not pin reactor {id} to core {core}")));
    }
    BufPool::new(cfg.pool_bytes)
        .and_then(|pool| Ok((Rc::new(Ring::new(cfg.ring, &pool)?), pool)))
        .map_err(|e| io::Error::new(e.kind(), format!("reactor {id}: {e}")))
}

/// The read of the reactor's eventfd, armed on its ring while it parks (a
/// message's wake-up then completes it).
struct WakeRead {
    route: Route,
    /// The read's target. It must outlive any in-kernel use; it is leaked
    /// (8 bytes per reactor) rather than tied to the ring's teardown order.
    target: *mut u64,
    armed: bool,
}

impl WakeRead {
    fn new(ring: &Ring) -> WakeRead {
        let target: &'static mut u64 = Box::leak(Box::new(0u64));
        WakeRead {
            route: ring.route().expect("a new ring has room for a route"),
            target,
            armed: false,
        }
    }

    /// Its completion (if any) was reaped: arm it again before parking.
    #[inline]
    fn reap(&mut self) {
        while self.route.pop().is_some() {
            self.armed = false;
        }
    }

    fn arm(&mut self, ring: &Ring, shared: &Shared) {
        if !self.armed {
            let e = opcode::Read::new(types::Fd(shared.waker.as_raw_fd()), self.target.cast(), 8).build();
            // SAFETY: the target is a leaked (never freed) u64 and the
            // eventfd lives in `shared`, which outlives this thread's ring
            // use (the ring is dropped when the reactor's loop returns).
            self.armed = unsafe { ring.push(&self.route, 0, e) };
        }
    }
}

/// One reactor thread's loop and what it owns. Fields drop in order: the
/// pollers first (they hold channels on the ring), the ring last.
struct Reactor {
    pollers: Vec<Box<dyn Poller>>,
    wake: WakeRead,
    ctx: ReactorCtx,
    iopoll: PollRing,
    ring: Rc<Ring>,
    shared: Arc<Shared>,
    cfg: ReactorConfig,
}

impl Reactor {
    fn new(id: usize, core: usize, cfg: ReactorConfig, shared: Arc<Shared>, ring: Rc<Ring>, pool: BufPool) -> Reactor {
        let iopoll = PollRing::default();
        let ctx = ReactorCtx {
            id,
            core,
            chan: ChannelCtx {
                ring: ring.clone(),
                iopoll: iopoll.clone(),
                pool,
                waker: {
                    let sh = shared.clone();
                    Arc::new(move || {
                        fence(Ordering::SeqCst);
                        if sh.parked.load(Ordering::SeqCst) {
                            sh.wake();
                        }
                    })
                },
            },
            stats: shared.stats.clone(),
            new_pollers: Vec::new(),
        };
        Reactor {
            pollers: Vec::new(),
            wake: WakeRead::new(&ring),
            ctx,
            iopoll,
            ring,
            shared,
            cfg,
        }
    }

    /// Poll until stopped: spin while there is work or there was some in
    /// the last `spin`, then park.
    fn run(mut self) {
        let mut last_work = Instant::now();
        let mut t_prev = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let work = self.poll_once();
            let now = Instant::now();
            let dt = now.duration_since(t_prev);
            t_prev = now;
            let polling = self.poll_iopoll();
            // Completions already reaped into a route queue (by a channel polled
            // after their owner) are work too: parking now would sleep on them.
            // Busy vs idle as SPDK counts them: an iteration that did work is
            // busy time, one that found none is idle time, spinning or not.
            if work > 0 {
                self.shared.stats.add_busy(dt);
            } else {
                self.shared.stats.add_idle_poll(dt);
            }
            if work > 0 || self.ring.queued() > 0 || polling {
                last_work = now;
                continue;
            }
            if now.duration_since(last_work) < self.cfg.spin {
                continue;
            }
            self.park();
            let t_wake = Instant::now();
            self.shared.stats.add_idle(t_wake.duration_since(t_prev));
            t_prev = t_wake;
        }
    }

    /// One iteration: run the queued messages, submit and reap on the ring,
    /// poll every poller (dropping the finished ones). Returns work done.
    #[inline]
    fn poll_once(&mut self) -> usize {
        let mut work = 0usize;
        while let Some(m) = self.shared.queue.pop() {
            m(&mut self.ctx);
            work += 1;
        }
        self.pollers.append(&mut self.ctx.new_pollers);
        let _ = self.ring.flush();
        self.ring.reap();
        self.wake.reap();
        let ctx = &self.ctx;
        self.pollers.retain_mut(|p| match p.poll(ctx) {
            Poll::Busy(n) => {
                work += n;
                true
            }
            Poll::Idle => true,
            Poll::Done => {
                work += 1;
                false
            }
        });
        let _ = self.ring.flush();
        work
    }

    /// Submit and reap on the IOPOLL ring; true while it has I/O in flight.
    /// That I/O completes only when polled: it never wakes a parked
    /// reactor, so the reactor spins while any is in flight.
    #[inline]
    fn poll_iopoll(&self) -> bool {
        self.iopoll.get().is_some_and(|p| {
            let _ = p.flush();
            p.reap();
            p.in_flight() > 0 || p.queued() > 0
        })
    }

    /// Sleep in the ring until a completion, a message or the park timeout.
    fn park(&mut self) {
        self.shared.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.shared.queue.is_empty() && !self.shared.stop.load(Ordering::SeqCst) {
            self.wake.arm(&self.ring, &self.shared);
            let pending = self.pollers.iter().any(|p| p.pending());
            let timeout = if pending {
                self.cfg.park_timeout
            } else {
                self.cfg.idle_park.max(self.cfg.park_timeout)
            };
            let t = Instant::now();
            let _ = self.ring.wait(timeout);
            if pending && t.elapsed() >= timeout {
                // Requests waiting and nothing for a whole park timeout: a
                // slow device (or a lost wake-up); counted for the stats.
                // (An idle connection's armed receive is not waiting work.)
                self.shared.stats.add_slow_park();
            }
        }
        self.shared.parked.store(false, Ordering::SeqCst);
    }
}
