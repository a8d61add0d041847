//! One virtqueue, served by one reactor.
//!
//! The poller pops descriptor chains, turns them into bdev requests on the
//! reactor's channel of the disk, and puts finished requests in the used
//! ring. Notifications follow the data path's hybrid polling:
//! * while there is work the guest's kicks are suppressed (EVENT_IDX: the
//!   avail event is left behind; without it, `VRING_USED_F_NO_NOTIFY`) and
//!   the avail ring is polled on every reactor loop;
//! * a poll that finds nothing re-enables kicks, checks the ring once more
//!   and arms an `IORING_OP_POLL_ADD` on the kick eventfd, so an idle queue
//!   costs nothing and a kick wakes the parked reactor;
//! * the guest is interrupted (call eventfd) once per poll that used
//!   buffers, and only when its `used_event` asks for it.
//!
//! The control thread reaches a running queue only through [`QueueShared`]:
//! a stop flag, the call eventfd's descriptor, and a new memory table. A
//! stop drains: no new chains are taken, every request in flight completes
//! into the used ring, then the ring position is reported and the poller
//! ends.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use io_uring::{opcode, types};
use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::inflight::QueueInflight;
use super::request::{self, BlkRequest, Kind, Segs, SECTOR};
use super::DiskInfo;
use crate::bdev::slab::Slab;
use crate::bdev::{IoCompletion, IoOp, IoRequest, Lent, Lower, MAX_IO_BYTES};
use crate::iobuf::{BufPool, IoBuf};
use crate::reactor::{Poll, Poller, ReactorCtx};
use crate::uring::{Ring, Route};

/// Bits of a bdev tag that number a request's part.
const PART_BITS: u32 = 16;
/// Largest request taken (larger ones are answered IOERR): bounded so one
/// request can always get its buffers from the reactor's pool.
pub(crate) const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Ranges per discard / write-zeroes request.
pub(crate) const MAX_RANGES: usize = 16;
/// Longest range of a discard / write-zeroes, in sectors (the bdev's
/// request size for trims).
pub(crate) const MAX_RANGE_SECTORS: u32 = (32 << 20) / SECTOR as u32;

/// Where a stopped queue left off (GET_VRING_BASE answers `next_avail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped {
    pub next_avail: u16,
    pub next_used: u16,
}

/// What the control thread shares with a running queue.
pub(crate) struct QueueShared {
    stop: AtomicBool,
    /// The call eventfd (raw; owned by the control side, which closes an old
    /// one only after a reactor round trip).
    pub(super) call: AtomicI32,
    /// A new memory table for the poller to take.
    new_mem: Mutex<Option<Arc<GuestMemoryMmap>>>,
    mem_changed: AtomicBool,
    /// Set by the poller when it has drained.
    stopped: Mutex<Option<Stopped>>,
    stopped_cv: Condvar,
}

impl QueueShared {
    pub(super) fn new(call: i32) -> Arc<QueueShared> {
        Arc::new(QueueShared {
            stop: AtomicBool::new(false),
            call: AtomicI32::new(call),
            new_mem: Mutex::new(None),
            mem_changed: AtomicBool::new(false),
            stopped: Mutex::new(None),
            stopped_cv: Condvar::new(),
        })
    }

    /// Hand the poller a new memory table (requests in flight keep the old one).
    pub(super) fn set_mem(&self, mem: Arc<GuestMemoryMmap>) {
        *self.new_mem.lock().expect("queue mem") = Some(mem);
        self.mem_changed.store(true, Ordering::Release);
    }

    /// Ask the poller to drain and stop.
    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Wait until the poller has drained (`None` after `timeout`).
    pub(super) fn wait_stopped(&self, timeout: std::time::Duration) -> Option<Stopped> {
        let g = self.stopped.lock().expect("queue stopped");
        let (g, _) = self
            .stopped_cv
            .wait_timeout_while(g, timeout, |s| s.is_none())
            .expect("queue stopped");
        *g
    }

    fn report(&self, s: Stopped) {
        *self.stopped.lock().expect("queue stopped") = Some(s);
        self.stopped_cv.notify_all();
    }
}

/// Everything a queue needs to start on its reactor.
pub(super) struct QueueStart {
    pub index: u16,
    /// The queue's inflight record, when the VMM keeps one.
    pub inflight: Option<QueueInflight>,
    /// Chains the last backend took and never answered, oldest first.
    pub resubmit: Vec<u16>,
    pub queue: Queue,
    pub mem: Arc<GuestMemoryMmap>,
    pub kick: File,
    pub shared: Arc<QueueShared>,
    pub disk: Arc<DiskInfo>,
}

/// Why a queue's poller did not start on a reactor.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    #[error("opening the disk's I/O channel on reactor {reactor}: {source}")]
    Channel {
        reactor: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("reactor {0} has no free completion route")]
    NoRoute(usize),
}

/// Start the queue's poller on this reactor (run from a reactor message).
pub(super) fn start(ctx: &mut ReactorCtx, s: QueueStart) -> Result<(), StartError> {
    let chan = s
        .disk
        .export
        .bdev
        .open_channel(&ctx.chan)
        .map_err(|source| StartError::Channel {
            reactor: ctx.id,
            source,
        })?;
    let ring = ctx.chan.ring.clone();
    let kick_route = ring.route().ok_or(StartError::NoRoute(ctx.id))?;
    ctx.add_poller(Box::new(QueuePoller {
        index: s.index,
        inflight: s.inflight,
        resubmit: s.resubmit,
        queue: s.queue,
        mem: s.mem,
        kick: s.kick,
        kick_route,
        kick_armed: false,
        ring,
        pool: ctx.chan.pool.clone(),
        chan: Lower::new(chan),
        disk: s.disk,
        sh: s.shared,
        slots: Slab::default(),
        waiting: VecDeque::new(),
        // Off until the first idle poll writes the avail event itself: what the
        // ring holds may be a previous connection's.
        kicks_on: false,
        signal: false,
        stopping: false,
        descs: Vec::new(),
        done: (0, 0),
    }));
    Ok(())
}

/// A request in flight.
struct Slot {
    head: u16,
    /// Data bytes the request moves (for the reactor's counters).
    bytes: u64,
    status: *mut u8,
    data: Segs,
    parts: u32,
    failed: bool,
    /// Bytes the device wrote into the chain, status byte excluded.
    written: u32,
    /// The memory table the request's pointers point into.
    _mem: Arc<GuestMemoryMmap>,
}

/// A popped chain that waits for pool buffers.
struct Waiting {
    head: u16,
    req: BlkRequest,
}

struct QueuePoller {
    index: u16,
    inflight: Option<QueueInflight>,
    resubmit: Vec<u16>,
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    kick: File,
    kick_route: Route,
    kick_armed: bool,
    ring: Rc<Ring>,
    pool: BufPool,
    chan: Lower,
    disk: Arc<DiskInfo>,
    sh: Arc<QueueShared>,
    slots: Slab<Slot>,
    waiting: VecDeque<Waiting>,
    /// Whether guest kicks are enabled (we are about to go idle).
    kicks_on: bool,
    /// Used buffers were added since the last interrupt.
    signal: bool,
    stopping: bool,
    descs: Vec<Descriptor>,
    /// Requests answered and their data bytes since the last poll (for the
    /// reactor's counters).
    done: (u64, u64),
}

/// Write the status byte.
fn set_status(p: *mut u8, s: u32) {
    // SAFETY: `p` points at the chain's status byte inside the mapped memory
    // table, which the request (or the poller) holds; a volatile store
    // because the guest shares the page.
    unsafe { std::ptr::write_volatile(p, s as u8) };
}

impl QueuePoller {
    fn alloc_slot(&mut self, s: Slot) -> u64 {
        self.slots.insert(s) as u64
    }

    /// Put a finished chain in the used ring.
    fn used(&mut self, head: u16, len: u32) {
        if let Some(f) = &mut self.inflight {
            f.answering(head);
        }
        let r = self.queue.add_used(&*self.mem, head, len);
        if let Some(f) = &mut self.inflight {
            f.answered(head, self.queue.next_used());
        }
        if let Err(e) = r {
            self.disk.note_used_ring_error(self.index, head, &e);
        }
        self.signal = true;
    }

    /// Answer a chain at once.
    fn answer(&mut self, head: u16, status: *mut u8, s: u32, written: u32) {
        set_status(status, s);
        self.used(head, written + 1);
    }

    /// Take chains from the avail ring; returns how many.
    fn take_avail(&mut self) -> usize {
        let mut n = 0;
        while let Some(w) = self.waiting.pop_front() {
            if let Err(w) = self.submit(w) {
                self.waiting.push_front(w);
                return n;
            }
            n += 1;
        }
        let mem = self.mem.clone();
        if !self.resubmit.is_empty() {
            // Chains a crashed backend took and never answered go first, in
            // the order it took them.
            for head in std::mem::take(&mut self.resubmit) {
                let (descs, ended) = request::walk(&mem, self.queue.desc_table(), self.queue.size(), head);
                self.descs = descs;
                n += 1;
                if !self.handle_chain(&mem, head, ended) {
                    break;
                }
            }
        }
        while self.waiting.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            n += 1;
            let head = chain.head_index();
            if let Some(f) = &mut self.inflight {
                f.taken(head);
            }
            self.descs.clear();
            self.descs.extend(chain);
            let ended = self.descs.last().is_some_and(|d| !d.has_next());
            if !self.handle_chain(&mem, head, ended) {
                break;
            }
        }
        n
    }

    /// Parse and submit the chain in `self.descs`; false if it had to wait
    /// for buffers (take no more chains now).
    fn handle_chain(&mut self, mem: &GuestMemoryMmap, head: u16, ended: bool) -> bool {
        match request::parse(mem, &self.descs, ended) {
            Ok(req) => {
                if let Err(w) = self.submit(Waiting { head, req }) {
                    self.waiting.push_back(w);
                    return false;
                }
            }
            Err(r) => {
                self.disk.note_malformed(self.index, head, r.why);
                match r.status {
                    Some(st) => self.answer(head, st, VIRTIO_BLK_S_IOERR, 0),
                    // No status byte to write; the head still goes back to the
                    // guest (if it is a valid index) so the ring moves on.
                    None => self.used(head, 0),
                }
            }
        }
        true
    }

    /// Check a read/write/trim range against the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        let bs = self.disk.block_size as u64;
        let Some(off) = sector.checked_mul(SECTOR) else {
            return false;
        };
        off % bs == 0 && bytes.is_multiple_of(bs) && off.checked_add(bytes).is_some_and(|end| end <= self.disk.capacity)
    }

    /// Turn a request into bdev requests; `Err` hands it back when the pool
    /// has no buffers now.
    fn submit(&mut self, w: Waiting) -> Result<(), Waiting> {
        let Waiting { head, req } = w;
        match req.kind {
            Kind::Unsupported(_) => {
                self.answer(head, req.status, VIRTIO_BLK_S_UNSUPP, 0);
                Ok(())
            }
            Kind::GetId => {
                self.get_id(head, &req);
                Ok(())
            }
            Kind::Write | Kind::Discard | Kind::WriteZeroes if self.disk.read_only => {
                self.answer(head, req.status, VIRTIO_BLK_S_IOERR, 0);
                Ok(())
            }
            Kind::Flush => {
                self.submit_flush(head, &req);
                Ok(())
            }
            Kind::Read | Kind::Write => self.submit_rw(head, req),
            Kind::Discard | Kind::WriteZeroes => {
                self.submit_ranges(head, &req);
                Ok(())
            }
        }
    }

    /// VIRTIO_BLK_T_GET_ID: the disk's serial, answered at once.
    fn get_id(&mut self, head: u16, req: &BlkRequest) {
        let id = self.disk.id_bytes();
        let n = (req.data_len as usize).min(id.len());
        // SAFETY: the segments were checked against the memory table
        // this poller holds.
        unsafe { request::scatter(&req.data, 0, &id[..n]) };
        self.answer(head, req.status, VIRTIO_BLK_S_OK, n as u32);
    }

    #[inline]
    fn submit_flush(&mut self, head: u16, req: &BlkRequest) {
        let idx = self.alloc_slot(Slot {
            head,
            bytes: 0,
            status: req.status,
            data: Segs::new(),
            parts: 1,
            failed: false,
            written: 0,
            _mem: self.mem.clone(),
        });
        self.chan.submit(IoRequest::flush(idx << PART_BITS));
    }

    /// A read or write: checked, then split into parts of at most
    /// [`MAX_IO_BYTES`], on guest memory (`lent`) or on pool buffers.
    #[inline]
    fn submit_rw(&mut self, head: u16, req: BlkRequest) -> Result<(), Waiting> {
        if req.data_len > MAX_REQUEST_BYTES || !self.in_range(req.sector, req.data_len) {
            self.answer(head, req.status, VIRTIO_BLK_S_IOERR, 0);
            return Ok(());
        }
        let write = req.kind == Kind::Write;
        let fua = write && !self.disk.writeback.load(Ordering::Relaxed);
        if self.disk.lent {
            self.submit_lent(head, &req, write, fua);
            return Ok(());
        }
        self.submit_buffered(head, req, write, fua)
    }

    /// The length of part `p` of a request of `len` bytes.
    #[inline]
    fn part_len(len: usize, p: usize) -> usize {
        (MAX_IO_BYTES as usize).min(len - p * MAX_IO_BYTES as usize)
    }

    /// A read or write on guest memory: the crypto layer encrypts from /
    /// decrypts into it itself, no pool buffer here, no copy.
    #[inline]
    fn submit_lent(&mut self, head: u16, req: &BlkRequest, write: bool, fua: bool) {
        let len = req.data_len as usize;
        let parts = len.div_ceil(MAX_IO_BYTES as usize);
        let off = req.sector * SECTOR;
        let op = if write { IoOp::Write } else { IoOp::Read };
        let reqs: SmallVec<[IoRequest; 4]> = (0..parts)
            .map(|p| {
                let segs = request::slice(&req.data, p * MAX_IO_BYTES as usize, Self::part_len(len, p));
                // SAFETY: the segments were checked against the memory
                // table, which the slot holds until the request completes.
                let lent = unsafe { Lent::new(segs) };
                IoRequest::lent(op, off + (p as u64) * MAX_IO_BYTES, lent, 0)
            })
            .collect();
        let idx = self.alloc_slot(Slot {
            head,
            bytes: len as u64,
            status: req.status,
            data: Segs::new(),
            parts: parts as u32,
            failed: false,
            written: if write { 0 } else { len as u32 },
            _mem: self.mem.clone(),
        });
        for (p, mut r) in reqs.into_iter().enumerate() {
            r.tag = (idx << PART_BITS) | p as u64;
            r.fua = fua;
            self.chan.submit(r);
        }
    }

    /// A read or write on pool buffers (a write's payload copied in first);
    /// `Err` hands it back when the pool has no buffers now.
    #[inline]
    fn submit_buffered(&mut self, head: u16, req: BlkRequest, write: bool, fua: bool) -> Result<(), Waiting> {
        let len = req.data_len as usize;
        let parts = len.div_ceil(MAX_IO_BYTES as usize);
        let off = req.sector * SECTOR;
        let mut bufs: SmallVec<[IoBuf; 4]> = SmallVec::new();
        for p in 0..parts {
            match self.pool.alloc(Self::part_len(len, p)) {
                Some(b) => bufs.push(b),
                None => return Err(Waiting { head, req }),
            }
        }
        if write {
            for (p, b) in bufs.iter_mut().enumerate() {
                // SAFETY: the segments were checked against the memory
                // table this poller holds.
                unsafe { request::gather(&req.data, p * MAX_IO_BYTES as usize, b) };
            }
        }
        let idx = self.alloc_slot(Slot {
            head,
            bytes: len as u64,
            status: req.status,
            data: req.data,
            parts: parts as u32,
            failed: false,
            written: if write { 0 } else { len as u32 },
            _mem: self.mem.clone(),
        });
        for (p, b) in bufs.into_iter().enumerate() {
            let at = off + (p as u64) * MAX_IO_BYTES;
            let tag = (idx << PART_BITS) | p as u64;
            let mut r = if write {
                IoRequest::write(at, b, tag)
            } else {
                IoRequest::read(at, b, tag)
            };
            r.fua = fua;
            self.chan.submit(r);
        }
        Ok(())
    }

    /// Discard and write-zeroes: every range checked, then one bdev request
    /// per range.
    fn submit_ranges(&mut self, head: u16, req: &BlkRequest) {
        // SAFETY: the segments were checked against the memory table
        // this poller holds.
        let Some(ranges) = (unsafe { request::ranges(req, MAX_RANGES) }) else {
            return self.answer(head, req.status, VIRTIO_BLK_S_IOERR, 0);
        };
        let zeroes = req.kind == Kind::WriteZeroes;
        for r in &ranges {
            let flags_ok = if zeroes {
                r.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 0
            } else {
                r.flags == 0
            };
            if !flags_ok {
                return self.answer(head, req.status, VIRTIO_BLK_S_UNSUPP, 0);
            }
            if r.sectors == 0 || r.sectors > MAX_RANGE_SECTORS || !self.in_range(r.sector, r.sectors as u64 * SECTOR) {
                return self.answer(head, req.status, VIRTIO_BLK_S_IOERR, 0);
            }
        }
        let idx = self.alloc_slot(Slot {
            head,
            bytes: 0,
            status: req.status,
            data: Segs::new(),
            parts: ranges.len() as u32,
            failed: false,
            written: 0,
            _mem: self.mem.clone(),
        });
        for (p, r) in ranges.iter().enumerate() {
            let tag = (idx << PART_BITS) | p as u64;
            let (at, n) = (r.sector * SECTOR, r.sectors as u64 * SECTOR);
            self.chan.submit(if zeroes {
                IoRequest::write_zeroes(at, n, tag)
            } else {
                IoRequest::unmap(at, n, tag)
            });
        }
    }

    fn complete(&mut self, c: IoCompletion) {
        let idx = (c.tag >> PART_BITS) as usize;
        let part = (c.tag & ((1 << PART_BITS) - 1)) as usize;
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        match c.result {
            Err(e) => {
                if !s.failed {
                    self.disk.note_io_error(self.index, c.op, &e);
                }
                s.failed = true;
            }
            Ok(()) => {
                if c.op == IoOp::Read {
                    if let Some(b) = &c.buf {
                        // SAFETY: the segments point into the memory table the
                        // slot holds (`_mem`).
                        unsafe { request::scatter(&s.data, part * MAX_IO_BYTES as usize, b) };
                    }
                }
            }
        }
        drop(c.buf);
        s.parts -= 1;
        if s.parts > 0 {
            return;
        }
        let s = self.slots.remove(idx).expect("live slot");
        let (st, written) = if s.failed {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            (VIRTIO_BLK_S_OK, s.written)
        };
        self.done.0 += 1;
        self.done.1 += s.bytes;
        self.answer(s.head, s.status, st, written);
    }

    fn interrupt(&mut self) {
        if !self.signal {
            return;
        }
        self.signal = false;
        match self.queue.needs_notification(&*self.mem) {
            Ok(false) => {}
            _ => {
                let fd = self.sh.call.load(Ordering::Acquire);
                if fd >= 0 {
                    let one = 1u64;
                    // SAFETY: an 8-byte write from a live u64 to the call
                    // eventfd; the control side closes a replaced descriptor
                    // only after a round trip through this reactor.
                    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                }
            }
        }
    }

    fn arm_kick(&mut self) {
        if self.kick_armed {
            return;
        }
        let e = opcode::PollAdd::new(types::Fd(self.kick.as_raw_fd()), libc::POLLIN as u32).build();
        // SAFETY: a poll has no buffer; the descriptor is a dup we own and
        // the kernel holds its own reference while the poll is in flight.
        self.kick_armed = unsafe { self.ring.push(&self.kick_route, 0, e) };
    }

    fn drain_kick(&mut self) -> bool {
        let mut kicked = false;
        while self.kick_route.pop().is_some() {
            self.kick_armed = false;
            kicked = true;
        }
        if kicked {
            let mut v = 0u64;
            // SAFETY: an 8-byte read into a live u64 from the kick eventfd,
            // which POLLIN said is readable (a plain read of an eventfd that
            // is not readable would block, so only after the poll fired).
            unsafe { libc::read(self.kick.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        kicked
    }
}

impl Poller for QueuePoller {
    fn poll(&mut self, ctx: &ReactorCtx) -> Poll {
        let p = self.poll_queue();
        if self.done.0 > 0 {
            ctx.stats
                .add_ios(crate::reactor::IoSource::Vhost, self.done.0, self.done.1);
            self.done = (0, 0);
        }
        p
    }

    fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }
}

impl QueuePoller {
    fn poll_queue(&mut self) -> Poll {
        let mut work = 0usize;
        if self.drain_kick() {
            work += 1;
        }
        if self.sh.mem_changed.swap(false, Ordering::AcqRel) {
            if let Some(m) = self.sh.new_mem.lock().expect("queue mem").take() {
                self.mem = m;
            }
        }
        let mut comps = self.chan.poll();
        for c in comps.drain(..) {
            self.complete(c);
            work += 1;
        }
        self.chan.recycle(comps);
        if !self.stopping && self.sh.stop.load(Ordering::Acquire) {
            self.stopping = true;
        }
        if self.stopping {
            // Drain: chains already taken still run; no new ones.
            while let Some(w) = self.waiting.pop_front() {
                if let Err(w) = self.submit(w) {
                    self.waiting.push_front(w);
                    break;
                }
            }
            self.interrupt();
            if !self.slots.is_empty() || !self.waiting.is_empty() {
                return Poll::Busy(work.max(1));
            }
            if self.kick_armed {
                // End our poll of the kick eventfd by making it readable.
                let one = 1u64;
                // SAFETY: an 8-byte write from a live u64 to our own dup of the
                // kick eventfd.
                unsafe { libc::write(self.kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
                let _ = self.ring.flush();
                self.ring.reap();
                self.drain_kick();
                if self.kick_armed {
                    return Poll::Busy(1);
                }
            }
            self.sh.report(Stopped {
                next_avail: self.queue.next_avail(),
                next_used: self.queue.next_used(),
            });
            return Poll::Done;
        }
        work += self.take_avail();
        self.interrupt();
        if work > 0 {
            if self.kicks_on {
                let _ = self.queue.disable_notification(&*self.mem);
                self.kicks_on = false;
            }
            return Poll::Busy(work);
        }
        if !self.kicks_on {
            self.kicks_on = true;
            // A chain published just before kicks came back on is seen here.
            if self.queue.enable_notification(&*self.mem).unwrap_or(true) {
                return Poll::Busy(1);
            }
        }
        self.arm_kick();
        Poll::Idle
    }
}

impl Drop for QueuePoller {
    fn drop(&mut self) {
        // A reactor shutting down drops pollers without draining: say where
        // the ring is so the control thread does not wait for nothing.
        self.sh.report(Stopped {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        });
    }
}
