//! `rbd`: an image in a Ceph cluster through librbd's AIO calls.
//!
//! One open [`Image`] is shared by every reactor's channel. Requests are
//! started from the reactor with callback-less completions; librbd writes the
//! image's eventfd (`rbd_set_image_notification`) when any of them finishes,
//! and the finished ones are taken with `rbd_poll_io_events`. A channel with
//! requests in flight keeps an `IORING_OP_POLL_ADD` on that eventfd in its
//! reactor's ring, so a parked reactor wakes when one completes and never
//! spins for Ceph (whose OSD may need the core).
//!
//! Whichever channel polls the image receives every reactor's completions:
//! each completion carries its owner's inbox address and slot (the inbox is
//! 4096-aligned, the slot fits in the low 12 bits). A completion for another
//! channel is pushed to that channel's lock-free inbox and its reactor woken
//! with the channel's [`Waker`].
//!
//! FLUSH is `rbd_aio_flush`, unmap `rbd_aio_discard` (the client connects
//! with `rbd_skip_partial_discard = false`, [`crate::rbd::DISK_OPTIONS`], so a
//! discarded range reads as zeros), write-zeroes `rbd_aio_write_zeroes`; a FUA write is the
//! write followed by a flush.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use io_uring::{opcode, types};

use super::slab::Slab;
use super::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest, Waker};
use crate::iobuf::IoBuf;
use crate::rbd::{Completion, Image, RbdError};
use crate::uring::{Ring, Route};

/// Requests one channel keeps in flight (back-pressure beyond). Slots must
/// fit below the inbox's alignment.
const MAX_IN_FLIGHT: usize = 1024;
const INBOX_ALIGN: usize = 4096;
const _: () = assert!(MAX_IN_FLIGHT <= INBOX_ALIGN);

/// How long a closing channel waits for requests still in the cluster
/// (librados times them out first: [`crate::rbd::DISK_OPTIONS`]).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The image and the eventfd librbd writes; the image is closed before the
/// descriptor (field order).
struct Shared {
    image: Image,
    event: OwnedFd,
}

pub struct RbdBdev {
    name: String,
    shared: Arc<Shared>,
    capacity: u64,
    block_size: u32,
}

impl RbdBdev {
    /// Serve `image` (open, not shared with anyone else's notification).
    pub fn new(image: Image, block_size: u32) -> Result<RbdBdev, RbdError> {
        let capacity = image.size()? / block_size as u64 * block_size as u64;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(RbdError::Call {
                call: "eventfd",
                errno: -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EMFILE),
            });
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        image.set_notification_eventfd(event.as_raw_fd())?;
        Ok(RbdBdev {
            name: format!("rbd:{}", image.name()),
            shared: Arc::new(Shared { image, event }),
            capacity,
            block_size,
        })
    }

    pub fn image(&self) -> &Image {
        &self.shared.image
    }
}

impl Bdev for RbdBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> io::Result<Box<dyn Channel>> {
        let route = ctx
            .ring
            .route()
            .ok_or_else(|| io::Error::other("65536 channels on this reactor's ring"))?;
        Ok(Box::new(RbdChannel {
            shared: self.shared.clone(),
            inbox: Arc::new(Inbox {
                done: SegQueue::new(),
                waker: ctx.waker.clone(),
            }),
            ring: ctx.ring.clone(),
            route,
            armed: false,
            block_size: self.block_size,
            capacity: self.capacity,
            max_io: self.max_io_bytes(),
            slab: Slab::default(),
            ready: VecDeque::new(),
            comps: Vec::with_capacity(32),
            mine: Vec::new(),
        }))
    }
}

/// Where other channels put this channel's finished requests.
#[repr(align(4096))]
struct Inbox {
    /// (slot, librbd's return value).
    done: SegQueue<(usize, isize)>,
    waker: Waker,
}

struct InFlight {
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    want: u64,
    fua: bool,
    /// A FUA write whose data is written: its flush is in flight.
    flushing: bool,
    buf: Option<IoBuf>,
}

struct RbdChannel {
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    ring: Rc<Ring>,
    /// The eventfd poll's completions.
    route: Route,
    armed: bool,
    block_size: u32,
    capacity: u64,
    max_io: u64,
    slab: Slab<InFlight>,
    ready: VecDeque<IoCompletion>,
    /// Scratch for `rbd_poll_io_events`.
    comps: Vec<Completion>,
    /// Scratch: this channel's own (slot, result) found while polling.
    mine: Vec<(usize, isize)>,
}

impl RbdChannel {
    fn inbox_addr(&self) -> usize {
        Arc::as_ptr(&self.inbox) as usize
    }

    fn complete_now(&mut self, req: IoRequest, result: Result<(), IoError>) {
        self.ready.push_back(IoCompletion {
            tag: req.tag,
            op: req.op,
            result,
            buf: req.buf,
        });
    }

    /// Start slot `idx`'s request (or its flush, for a FUA write whose data
    /// is written) in librbd.
    fn start(&mut self, idx: usize) -> Result<(), RbdError> {
        let c = Completion::new(self.inbox_addr() | idx)?;
        let image = &self.shared.image;
        let f = self.slab.get_mut(idx).expect("live slot");
        if f.flushing {
            return image.aio_flush(c);
        }
        match f.op {
            IoOp::Read => {
                let buf = f.buf.as_mut().expect("validated");
                // SAFETY: the buffer stays in the slab entry, untouched, until
                // the completion comes back (`poll`) or the channel gives up
                // waiting for it and leaks it (`Drop`).
                unsafe { image.aio_read(f.offset, buf.as_mut_ptr(), buf.len(), c) }
            }
            IoOp::Write => {
                let buf = f.buf.as_ref().expect("validated");
                // SAFETY: as for reads.
                unsafe { image.aio_write(f.offset, buf.as_ptr(), buf.len(), c) }
            }
            IoOp::Flush => image.aio_flush(c),
            IoOp::Unmap => image.aio_discard(f.offset, f.len, c),
            IoOp::WriteZeroes => image.aio_write_zeroes(f.offset, f.len, c),
        }
    }

    /// Take finished requests from librbd: this channel's into `mine`,
    /// other channels' into their inboxes (and wake them).
    fn reap_image(&mut self) {
        let mut v = 0u64;
        // SAFETY: an 8-byte read into a live u64 from our eventfd
        // (non-blocking: EAGAIN when nothing was written).
        unsafe { libc::read(self.shared.event.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        let me = self.inbox_addr();
        loop {
            self.comps.clear();
            let n = match self.shared.image.poll_io_events(&mut self.comps, 32) {
                Ok(n) => n,
                Err(_) => break,
            };
            for c in self.comps.drain(..) {
                let arg = c.arg();
                let ret = c.return_value();
                drop(c);
                let (addr, slot) = (arg & !(INBOX_ALIGN - 1), arg & (INBOX_ALIGN - 1));
                if addr == me {
                    self.mine.push((slot, ret));
                } else {
                    let p = addr as *const Inbox;
                    // SAFETY: `p` is the inbox of the channel that started
                    // this request (`Arc::as_ptr` of its inbox). That channel
                    // keeps its Arc until every request it started has come
                    // back through its inbox (`Drop` waits, or leaks the Arc),
                    // and this one has not yet, so the inbox is alive here; we
                    // take a reference of our own before handing the result
                    // over, so it stays alive while we push and wake.
                    let inbox = unsafe {
                        Arc::increment_strong_count(p);
                        Arc::from_raw(p)
                    };
                    inbox.done.push((slot, ret));
                    (inbox.waker)();
                }
            }
            if n < 32 {
                break;
            }
        }
    }

    /// Finish slot `idx` with librbd's result `ret`.
    fn finish(&mut self, idx: usize, ret: isize) {
        let Some(f) = self.slab.get_mut(idx) else {
            return;
        };
        let result = if ret < 0 {
            Err(IoError::Device { errno: -ret as i32 })
        } else if f.op == IoOp::Read && !f.flushing && (ret as u64) < f.want {
            Err(IoError::Short {
                want: f.want,
                got: ret as u64,
            })
        } else {
            Ok(())
        };
        if result.is_ok() && f.op == IoOp::Write && f.fua && !f.flushing {
            f.flushing = true;
            match self.start(idx) {
                Ok(()) => return,
                Err(e) => {
                    let f = self.slab.remove(idx).expect("live slot");
                    self.ready.push_back(IoCompletion {
                        tag: f.tag,
                        op: f.op,
                        result: Err(rbd_io_error(&e)),
                        buf: f.buf,
                    });
                    return;
                }
            }
        }
        let f = self.slab.remove(idx).expect("live slot");
        self.ready.push_back(IoCompletion {
            tag: f.tag,
            op: f.op,
            result,
            buf: f.buf,
        });
    }

    fn collect(&mut self) {
        self.reap_image();
        self.drain();
    }

    /// Finish what `reap_image` found for this channel and what other channels put in
    /// its inbox.
    fn drain(&mut self) {
        let mut mine = std::mem::take(&mut self.mine);
        for (slot, ret) in mine.drain(..) {
            self.finish(slot, ret);
        }
        self.mine = mine;
        while let Some((slot, ret)) = self.inbox.done.pop() {
            self.finish(slot, ret);
        }
    }

    fn arm(&mut self) {
        if self.armed {
            return;
        }
        let e = opcode::PollAdd::new(types::Fd(self.shared.event.as_raw_fd()), libc::POLLIN as u32).build();
        // SAFETY: a poll has no buffer; the kernel holds its own reference to
        // the eventfd while the poll is armed.
        self.armed = unsafe { self.ring.push(&self.route, 0, e) };
    }
}

fn rbd_io_error(e: &RbdError) -> IoError {
    IoError::Device {
        errno: e.errno().unwrap_or(libc::EIO),
    }
}

impl Channel for RbdChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if let Err(e) = validate(&req, self.block_size, self.capacity, self.max_io) {
            self.complete_now(req, Err(e));
            return Ok(());
        }
        if self.slab.len() >= MAX_IN_FLIGHT {
            return Err(req);
        }
        let want = req.bytes();
        let idx = self.slab.insert(InFlight {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            want,
            fua: req.fua,
            flushing: false,
            buf: req.buf,
        });
        debug_assert!(idx < INBOX_ALIGN);
        if let Err(e) = self.start(idx) {
            let f = self.slab.remove(idx).expect("just inserted");
            self.ready.push_back(IoCompletion {
                tag: f.tag,
                op: f.op,
                result: Err(rbd_io_error(&e)),
                buf: f.buf,
            });
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        if self.armed {
            // The eventfd's poll goes to the kernel and its completion comes back
            // without the reactor's loop, so a caller polling in a loop makes progress
            // (both are free when there is nothing to do).
            let _ = self.ring.flush();
            self.ring.reap();
        }
        let mut fired = false;
        while self.route.pop().is_some() {
            self.armed = false;
            fired = true;
        }
        if !self.slab.is_empty() {
            // librbd is asked (an eventfd read and `rbd_poll_io_events`: a syscall and
            // a lock) only when the eventfd's poll fired, or when none is armed (none
            // yet, or the ring was full): a reactor spinning with requests in flight
            // does not pay them on every turn. Results other channels took for us are
            // in the inbox (and their waker woke us), looked at every turn.
            if fired || !self.armed {
                self.reap_image();
            }
            self.drain();
            if !self.slab.is_empty() {
                self.arm();
            }
        }
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.slab.len() + self.ready.len()
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        // librbd may still write into (or read from) the buffers of requests
        // in flight: wait for them (librados times requests out), and if they
        // do not come back, leak their buffers and the inbox rather than
        // hand memory back that librbd may use.
        let start = Instant::now();
        while !self.slab.is_empty() && start.elapsed() < DRAIN_TIMEOUT {
            self.collect();
            self.ready.clear();
            if !self.slab.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if !self.slab.is_empty() {
            for f in self.slab.drain() {
                std::mem::forget(f.buf);
            }
            std::mem::forget(self.inbox.clone());
        }
        if self.armed {
            // Fire the armed poll so the ring lets go of it; its completion
            // finds no route and is dropped.
            let one = 1u64;
            // SAFETY: an 8-byte write from a live u64 to our eventfd.
            unsafe { libc::write(self.shared.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}
