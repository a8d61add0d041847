//! A reactor's io_uring: one ring per reactor thread (single issuer), shared
//! by every channel on that reactor through `Rc`.
//!
//! Channels push SQEs tagged with their [`Route`]; the reactor submits once
//! per loop iteration (so requests are batched, not one syscall each) and
//! [`Ring::reap`] sorts completions into each route's queue. The reactor's
//! buffer arena is registered as fixed buffer 0, so I/O on pool buffers
//! uses `READ_FIXED`/`WRITE_FIXED` and skips per-I/O page pinning.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use io_uring::{squeue, types, IoUring};

use crate::iobuf::BufPool;

/// Bits of `user_data` left for a route's own tag. Above them: the route's
/// generation (16 bits) and its slot (16 bits).
pub(crate) const TAG_BITS: u32 = 32;
const GEN_BITS: u32 = 16;
/// Most registered-file slots a ring asks for; fewer if the process's file
/// limit is lower (the kernel refuses a table larger than RLIMIT_NOFILE).
/// Past them, channels use plain descriptors.
const MAX_FILE_SLOTS: u32 = 16384;

/// How to set up a ring.
#[derive(Debug, Clone, Copy)]
pub struct RingOpts {
    pub entries: u32,
    /// Kernel-side submission polling thread (IORING_SETUP_SQPOLL).
    pub sqpoll: bool,
    /// Idle time before the SQPOLL thread sleeps.
    pub sqpoll_idle_ms: u32,
    /// IORING_SETUP_COOP_TASKRUN + TASKRUN_FLAG (see [`Ring::reap`]).
    pub coop_taskrun: bool,
    /// Submit as soon as this many payload bytes are queued, instead of at
    /// the end of the loop iteration (see [`Ring::note_payload`]).
    pub eager_submit_bytes: usize,
}

/// Default [`RingOpts::eager_submit_bytes`]: 8 × 4 KiB requests, or every
/// request of 32 KiB and more.
pub(crate) const EAGER_SUBMIT_BYTES: usize = 32 << 10;

impl Default for RingOpts {
    fn default() -> Self {
        RingOpts {
            entries: 256,
            sqpoll: false,
            sqpoll_idle_ms: 50,
            coop_taskrun: true,
            eager_submit_bytes: EAGER_SUBMIT_BYTES,
        }
    }
}

type Queue = Rc<RefCell<VecDeque<(u64, i32)>>>;

/// The ring's routes. A slot is reused after its route is dropped, with a new
/// generation, so a late completion of the old route (a request its channel
/// gave up waiting for) is dropped instead of reaching the new one.
#[derive(Default)]
struct Routes {
    slots: Vec<(u16, Option<Queue>)>,
    free: Vec<u16>,
}

/// Where a channel's completions land. Dropping it frees its slot.
pub struct Route {
    id: u16,
    gen: u16,
    queue: Queue,
    queued: Rc<Cell<usize>>,
    routes: Rc<RefCell<Routes>>,
}

impl Route {
    pub fn id(&self) -> u16 {
        self.id
    }
    /// Next completion `(tag, result)` for this route.
    pub fn pop(&self) -> Option<(u64, i32)> {
        let e = self.queue.borrow_mut().pop_front();
        if e.is_some() {
            self.queued.set(self.queued.get() - 1);
        }
        e
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        let left = self.queue.borrow().len();
        self.queued.set(self.queued.get() - left);
        let mut r = self.routes.borrow_mut();
        r.slots[self.id as usize].1 = None;
        r.free.push(self.id);
    }
}

/// The ring's registered-file table.
struct Files {
    used: Vec<bool>,
    /// Shared registrations: fd → (slot, users).
    shared: std::collections::HashMap<RawFd, (u32, usize)>,
}

/// The ring and its bookkeeping.
pub struct Ring {
    // Field order matters: the ring closes before the arena it registered is
    // unmapped (fields drop in declaration order).
    uring: RefCell<IoUring>,
    routes: Rc<RefCell<Routes>>,
    unsubmitted: Cell<u32>,
    /// Payload bytes of the unsubmitted SQEs (see [`Ring::note_payload`]).
    unsubmitted_bytes: Cell<usize>,
    eager_bytes: usize,
    in_flight: Cell<usize>,
    /// Completions reaped into route queues and not yet popped.
    queued: Rc<Cell<usize>>,
    files: RefCell<Files>,
    arena: (usize, usize),
    sqpoll: bool,
    iopoll: bool,
    _pool: BufPool,
}

impl Ring {
    /// A ring with `pool`'s arena registered as fixed buffer 0.
    pub fn new(opts: RingOpts, pool: &BufPool) -> io::Result<Ring> {
        Self::build(opts, false, pool)
    }

    /// A polled-completion ring (IORING_SETUP_IOPOLL) for `O_DIRECT`
    /// reads and writes on files whose device has poll queues. Nothing
    /// interrupts a waiter on such a ring: its owner must keep calling
    /// [`Ring::flush`] (which polls) while requests are in flight.
    pub fn new_iopoll(entries: u32, pool: &BufPool) -> io::Result<Ring> {
        let opts = RingOpts {
            entries,
            ..RingOpts::default()
        };
        Self::build(opts, true, pool)
    }

    fn build(opts: RingOpts, iopoll: bool, pool: &BufPool) -> io::Result<Ring> {
        let mut b = IoUring::builder();
        if iopoll {
            b.setup_iopoll();
        }
        if opts.sqpoll {
            b.setup_sqpoll(opts.sqpoll_idle_ms);
        } else {
            b.setup_single_issuer();
            if !iopoll && opts.coop_taskrun {
                // Completions of a reactor's I/O run as task work on the
                // reactor's thread. COOP_TASKRUN: the kernel does not
                // interrupt a running reactor with an IPI for each of them;
                // it sets IORING_SQ_TASKRUN instead, which `reap` checks on
                // every loop iteration (one enter runs the whole batch).
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
        }
        let uring = b.build(opts.entries).or_else(|e| {
            if opts.sqpoll || iopoll {
                Err(e)
            } else {
                // Older kernels: no SINGLE_ISSUER / COOP_TASKRUN.
                IoUring::new(opts.entries)
            }
        })?;
        let iov = pool.iovec();
        // SAFETY: the arena stays mapped while `_pool` (a clone held by this
        // Ring, dropped after `uring`) lives.
        unsafe { uring.submitter().register_buffers(&[iov])? };
        let slots = file_slots();
        uring.submitter().register_files_sparse(slots)?;
        Ok(Ring {
            uring: RefCell::new(uring),
            routes: Rc::default(),
            unsubmitted: Cell::new(0),
            unsubmitted_bytes: Cell::new(0),
            eager_bytes: opts.eager_submit_bytes.max(1),
            in_flight: Cell::new(0),
            queued: Rc::new(Cell::new(0)),
            files: RefCell::new(Files {
                used: vec![false; slots as usize],
                shared: Default::default(),
            }),
            arena: (iov.iov_base as usize, iov.iov_len),
            sqpoll: opts.sqpoll,
            iopoll,
            _pool: pool.clone(),
        })
    }

    pub fn is_sqpoll(&self) -> bool {
        self.sqpoll
    }

    pub fn is_iopoll(&self) -> bool {
        self.iopoll
    }

    /// A new completion route; `None` when 65,536 routes are live on this
    /// ring.
    pub fn route(&self) -> Option<Route> {
        let mut routes = self.routes.borrow_mut();
        let queue: Queue = Rc::new(RefCell::new(VecDeque::new()));
        let id = match routes.free.pop() {
            Some(id) => id,
            None => {
                let id = u16::try_from(routes.slots.len()).ok()?;
                routes.slots.push((0, None));
                id
            }
        };
        let slot = &mut routes.slots[id as usize];
        slot.0 = slot.0.wrapping_add(1);
        slot.1 = Some(queue.clone());
        Some(Route {
            id,
            gen: slot.0,
            queue,
            queued: self.queued.clone(),
            routes: self.routes.clone(),
        })
    }

    /// Live routes (for tests and stats).
    pub fn routes(&self) -> usize {
        let r = self.routes.borrow();
        r.slots.len() - r.free.len()
    }

    /// The fixed-buffer index for `ptr..ptr+len`, if it lies in the arena.
    pub fn fixed_buf(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let (base, size) = self.arena;
        let p = ptr as usize;
        (p >= base && p + len <= base + size).then_some(0)
    }

    /// Register `fd` in the ring's file table; returns its slot, or an error
    /// when the table is full (use the plain descriptor then).
    pub fn register_file(&self, fd: RawFd) -> io::Result<u32> {
        let mut files = self.files.borrow_mut();
        let slot = files
            .used
            .iter()
            .position(|used| !used)
            .ok_or_else(|| io::Error::other("no free registered-file slot on this ring"))? as u32;
        self.uring.borrow().submitter().register_files_update(slot, &[fd])?;
        files.used[slot as usize] = true;
        Ok(slot)
    }

    /// Register `fd` once for every channel on this ring that uses it (a
    /// bdev's file); each call must be paired with
    /// [`Ring::unregister_shared_file`], and `fd` must stay open until the
    /// last one.
    pub fn register_shared_file(&self, fd: RawFd) -> io::Result<u32> {
        if let Some((slot, users)) = self.files.borrow_mut().shared.get_mut(&fd) {
            *users += 1;
            return Ok(*slot);
        }
        let slot = self.register_file(fd)?;
        self.files.borrow_mut().shared.insert(fd, (slot, 1));
        Ok(slot)
    }

    /// Release one user of a shared registration of `fd`.
    pub fn unregister_shared_file(&self, fd: RawFd) {
        let slot = {
            let mut files = self.files.borrow_mut();
            let Some((slot, users)) = files.shared.get_mut(&fd) else {
                return;
            };
            *users -= 1;
            if *users > 0 {
                return;
            }
            let slot = *slot;
            files.shared.remove(&fd);
            slot
        };
        self.unregister_file(slot);
    }

    /// Registered-file slots in use.
    pub fn files_registered(&self) -> usize {
        self.files.borrow().used.iter().filter(|u| **u).count()
    }

    /// Release a registered-file slot.
    pub fn unregister_file(&self, slot: u32) {
        let _ = self.uring.borrow().submitter().register_files_update(slot, &[-1]);
        if let Some(s) = self.files.borrow_mut().used.get_mut(slot as usize) {
            *s = false;
        }
    }

    /// Queue an SQE for `route` with `tag` (< 2^48). Returns false when the
    /// submission queue stays full even after submitting (back-pressure).
    ///
    /// # Safety
    /// Every buffer and pointer the entry refers to must stay valid until its
    /// completion has been reaped.
    pub(crate) unsafe fn push(&self, route: &Route, tag: u64, entry: squeue::Entry) -> bool {
        debug_assert!(tag < 1 << TAG_BITS);
        let ud = ((route.id as u64) << (TAG_BITS + GEN_BITS)) | ((route.gen as u64) << TAG_BITS) | tag;
        let entry = entry.user_data(ud);
        let mut ring = self.uring.borrow_mut();
        for attempt in 0..2 {
            // SAFETY: the caller guarantees the entry's buffers outlive it.
            let pushed = unsafe { ring.submission().push(&entry).is_ok() };
            if pushed {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                self.in_flight.set(self.in_flight.get() + 1);
                return true;
            }
            if attempt == 0 {
                let _ = ring.submit();
                self.unsubmitted.set(0);
                self.unsubmitted_bytes.set(0);
            }
        }
        false
    }

    /// Submit queued SQEs (one syscall for the batch; with SQPOLL usually
    /// none). On an IOPOLL ring with requests in flight this also polls the
    /// device for completions (the enter carries GETEVENTS).
    pub fn flush(&self) -> io::Result<usize> {
        if self.unsubmitted.get() == 0 && !(self.iopoll && self.in_flight.get() > 0) {
            return Ok(0);
        }
        self.unsubmitted.set(0);
        self.unsubmitted_bytes.set(0);
        self.uring.borrow().submit()
    }

    /// Count `bytes` of payload for the SQE just pushed; once
    /// [`RingOpts::eager_submit_bytes`] are waiting, submit them now.
    ///
    /// A poller handles a whole batch of completions before the reactor's
    /// end-of-iteration submit, and on the encrypted path every new write
    /// is encrypted first (about 0.5 µs per 4 KiB): without this the device
    /// idles while the reactor encrypts the batch. Submitting every 32 KiB
    /// lifted encrypted / plain at 128 KiB sequential writes from 0.81 to
    /// 0.96–0.98 here (docs/benchmarks.md), for one extra syscall per 32 KiB.
    pub fn note_payload(&self, bytes: usize) {
        let b = self.unsubmitted_bytes.get() + bytes;
        if b >= self.eager_bytes {
            let _ = self.flush();
        } else {
            self.unsubmitted_bytes.set(b);
        }
    }

    /// Sort completed CQEs into their routes' queues. Returns how many.
    pub fn reap(&self) -> usize {
        let mut ring = self.uring.borrow_mut();
        if ring.submission().taskrun() {
            // Completions waiting as task work (COOP_TASKRUN): one enter
            // with GETEVENTS (set by `submit` when it sees the flag) posts them.
            let _ = ring.submit();
            self.unsubmitted.set(0);
            self.unsubmitted_bytes.set(0);
        }
        let routes = self.routes.borrow();
        let mut n = 0;
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            let route = (ud >> (TAG_BITS + GEN_BITS)) as usize;
            let gen = ((ud >> TAG_BITS) & ((1 << GEN_BITS) - 1)) as u16;
            // A route dropped (or reused) since: nobody waits for this one.
            if let Some((g, Some(q))) = routes.slots.get(route) {
                if *g == gen {
                    q.borrow_mut().push_back((ud & ((1 << TAG_BITS) - 1), cqe.result()));
                    self.queued.set(self.queued.get() + 1);
                }
            }
            n += 1;
        }
        self.in_flight.set(self.in_flight.get() - n);
        n
    }

    /// Completions already reaped into route queues that their owners have
    /// not popped yet. A channel polled by one poller can reap completions
    /// that belong to another poller polled earlier in the same loop
    /// iteration; the reactor must not park while any are waiting.
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// Requests pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Submit and block until at least one completion or `timeout`.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        self.unsubmitted.set(0);
        self.unsubmitted_bytes.set(0);
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.uring.borrow().submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Registered-file slots for a new ring: [`MAX_FILE_SLOTS`], or the file
/// limit if that is lower.
fn file_slots() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let cur = if ok { lim.rlim_cur } else { 1024 };
    (cur.min(MAX_FILE_SLOTS as u64) as u32).max(16)
}

/// A reactor's IOPOLL ring, made on first use by a channel whose file
/// supports polled completions (most files here do not, so most reactors
/// never make one). Shared by the reactor, which keeps polling it, and its
/// channels.
#[derive(Clone, Default)]
pub struct PollRing(Rc<OnceCell<Option<Rc<Ring>>>>);

impl PollRing {
    /// The ring, made now if needed; None if the kernel refuses IOPOLL rings
    /// (the caller then uses the reactor's interrupt-driven ring).
    pub fn get_or_init(&self, pool: &BufPool) -> Option<Rc<Ring>> {
        self.0
            .get_or_init(|| Ring::new_iopoll(256, pool).ok().map(Rc::new))
            .clone()
    }

    /// The ring, if one was made.
    pub fn get(&self) -> Option<&Rc<Ring>> {
        self.0.get().and_then(|r| r.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    fn wait_for(ring: &Ring, route: &Route) -> Option<(u64, i32)> {
        for _ in 0..200 {
            ring.reap();
            if let Some(c) = route.pop() {
                return Some(c);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn requests_go_to_the_kernel_once_enough_payload_is_queued() {
        let pool = BufPool::new(1 << 20).unwrap();
        let opts = RingOpts {
            eager_submit_bytes: 8192,
            ..RingOpts::default()
        };
        let ring = Ring::new(opts, &pool).unwrap();
        let route = ring.route().unwrap();
        // SAFETY: a NOP refers to no memory.
        assert!(unsafe { ring.push(&route, 1, opcode::Nop::new().build()) });
        ring.note_payload(4096);
        assert_eq!(
            wait_for(&ring, &route),
            None,
            "below the threshold nothing is submitted"
        );
        // SAFETY: as above.
        assert!(unsafe { ring.push(&route, 2, opcode::Nop::new().build()) });
        ring.note_payload(4096);
        let mut tags = [wait_for(&ring, &route), wait_for(&ring, &route)].map(|c| c.map(|c| c.0));
        tags.sort();
        assert_eq!(
            tags,
            [Some(1), Some(2)],
            "reaching the threshold submits the whole batch"
        );
        // The count starts again after a submit.
        // SAFETY: as above.
        assert!(unsafe { ring.push(&route, 3, opcode::Nop::new().build()) });
        ring.note_payload(4096);
        assert_eq!(wait_for(&ring, &route), None);
        ring.flush().unwrap();
        assert_eq!(wait_for(&ring, &route).map(|c| c.0), Some(3));
    }

    #[test]
    fn routes_are_reused_and_a_dropped_routes_late_completions_go_nowhere() {
        let pool = BufPool::new(1 << 20).unwrap();
        let ring = Ring::new(RingOpts::default(), &pool).unwrap();
        // Far more routes over the ring's life than 16 bits can name at once.
        for _ in 0..70_000 {
            drop(ring.route().unwrap());
        }
        assert_eq!(ring.routes(), 0);
        let a = ring.route().unwrap();
        // SAFETY: a NOP refers to no memory.
        assert!(unsafe { ring.push(&a, 7, opcode::Nop::new().build()) });
        ring.flush().unwrap();
        let id = a.id();
        drop(a);
        let b = ring.route().unwrap();
        assert_eq!(b.id(), id, "the slot is reused");
        assert_eq!(wait_for(&ring, &b), None, "the old route's completion is dropped");
        assert_eq!(ring.queued(), 0);
        // SAFETY: as above.
        assert!(unsafe { ring.push(&b, 8, opcode::Nop::new().build()) });
        ring.flush().unwrap();
        assert_eq!(wait_for(&ring, &b).map(|c| c.0), Some(8));
    }

    #[test]
    fn a_shared_file_takes_one_slot_and_is_released_by_its_last_user() {
        let pool = BufPool::new(1 << 20).unwrap();
        let ring = Ring::new(RingOpts::default(), &pool).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        let s1 = ring.register_shared_file(f.as_raw_fd()).unwrap();
        let s2 = ring.register_shared_file(f.as_raw_fd()).unwrap();
        assert_eq!(s1, s2);
        assert_eq!(ring.files_registered(), 1);
        ring.unregister_shared_file(f.as_raw_fd());
        assert_eq!(ring.files_registered(), 1);
        ring.unregister_shared_file(f.as_raw_fd());
        assert_eq!(ring.files_registered(), 0);
    }
}
