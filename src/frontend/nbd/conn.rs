//! One NBD connection in transmission phase, owned by a reactor.
//!
//! Receiving: one `IORING_OP_RECV` in flight at a time, into a 256 KiB
//! receive buffer; every request header in it is parsed in one go (batching).
//! Write payloads are copied from the receive buffer into pool buffers, or,
//! when the payload continues beyond what has arrived, received straight
//! into the pool buffer (no copy for large writes).
//!
//! Sending: replies queue up and go out coalesced, one `IORING_OP_SENDMSG`
//! (headers and read data as an iovec list) in flight at a time.
//!
//! Requests over the bdev's maximum are split into parts of at most
//! [`MAX_IO_BYTES`] (reads, writes) or [`ZERO_CHUNK`] (trim, write-zeroes),
//! and answered once, when every part is done.
//!
//! Closing: the socket is shut down (which completes the receive in
//! flight), then the connection waits for its kernel operations and bdev
//! requests to finish, so every buffer returns to the pool before the
//! poller is dropped.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::proto::*;
use super::Shared;
use crate::bdev::slab::Slab;
use crate::bdev::{IoError, IoOp, IoRequest, Lower, MAX_IO_BYTES};
use crate::export::Export;
use crate::iobuf::{BufPool, IoBuf};
use crate::reactor::{Poll, Poller, ReactorCtx};
use crate::uring::{Ring, Route};

/// Receive buffer size of a busy connection. A new connection starts with
/// [`RBUF_START`] (heap memory, not the reactor's pool: an idle connection
/// must cost little, there may be ten thousand) and grows by four each time
/// the client fills it.
const RBUF: usize = 256 << 10;
const RBUF_START: usize = 16 << 10;
/// Write payloads from this size on are received straight into their chunk
/// buffers (a header-sized receive first): one more receive per request
/// costs less than copying the payload out of `rbuf`.
const BIG_WRITE: u32 = 64 << 10;
/// Largest part of a trim / write-zeroes handed to the bdev at once.
const ZERO_CHUNK: u64 = 32 << 20;
/// Requests in flight per connection before we stop reading the socket.
const MAX_REQS: usize = 256;
/// Replies per `sendmsg`.
const MAX_IOV: usize = 256;
/// Parts per request (tag = slot << PART_BITS | part).
const PART_BITS: u32 = 8;

const TAG_RECV: u64 = 1;
const TAG_SEND: u64 = 2;

/// Start a connection on this reactor (called from a message).
#[allow(clippy::too_many_arguments)]
pub(super) fn start(
    ctx: &mut ReactorCtx,
    sh: Arc<Shared>,
    fd: OwnedFd,
    export: Export,
    tail: Vec<u8>,
    go: Option<u32>,
    modes: Modes,
    peer: String,
) {
    if sh.stop.load(Ordering::SeqCst) || export.is_revoked() {
        return; // fd dropped: the client sees the connection close
    }
    // A connection that cannot be taken: counted, logged, and (after NBD_OPT_GO) told
    // why with an error reply to its GO instead of a silent close.
    let refuse = |why: String| {
        let n = sh.refused.fetch_add(1, Ordering::SeqCst) + 1;
        crate::log_limited!(
            sh.log_conns,
            warn,
            disk = %export.name,
            reactor = ctx.id,
            peer = %peer,
            refused_so_far = n,
            why = %why,
            "NBD: connection refused"
        );
        if let Some(opt) = go {
            let reply = super::proto::option_reply(opt, super::proto::REP_ERR_SHUTDOWN, why.as_bytes());
            // SAFETY: write(2) of a live buffer to the connection's own descriptor.
            let _ = unsafe { libc::write(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
        }
    };
    let chan = match export.bdev.open_channel(&ctx.chan) {
        Ok(c) => c,
        Err(e) => return refuse(format!("opening its I/O channel: {e}")),
    };
    let rbuf = vec![0u8; RBUF_START];
    let ring = ctx.chan.ring.clone();
    let Some(route) = ring.route() else {
        return refuse("65536 connections on this reactor".into());
    };
    let fixed = ring.register_file(fd.as_raw_fd()).ok();
    sh.conns.fetch_add(1, Ordering::SeqCst);
    crate::log_limited!(
        sh.log_conns,
        info,
        disk = %export.name,
        reactor = ctx.id,
        peer = %peer,
        "NBD: connection started"
    );
    let bs = export.bdev.block_size();
    let cap = export.bdev.capacity();
    let max_payload = sh.max_payload;
    let c = Conn {
        route,
        ring,
        pool: ctx.chan.pool.clone(),
        sock: fd,
        fixed,
        chan: Lower::new(chan),
        export,
        sh,
        block_size: bs as u64,
        capacity: cap,
        max_payload,
        rbuf: ManuallyDrop::new(rbuf),
        rpos: 0,
        rlen: 0,
        rx: None,
        rx_state: RxState::Header,
        stalled: false,
        big_writes: false,
        slots: Slab::default(),
        replies: VecDeque::new(),
        head: tail,
        tx: None,
        tx_armed: false,
        phase: Phase::Running,
        done: (0, 0),
        modes,
        closed: None,
        peer,
        reactor: ctx.id,
        served: 0,
    };
    ctx.add_poller(Box::new(c));
}

/// Why a connection closed, for its last log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client sent NBD_CMD_DISC and every reply went out.
    Disconnect,
    /// The client closed its end.
    ClientClosed,
    /// A request header without the NBD magic: the connection is killed.
    BadMagic,
    /// Receiving failed (errno).
    RecvFailed(i32),
    /// Sending failed (errno).
    SendFailed(i32),
    /// The export was revoked (DetachDisk, DeleteInstance).
    Revoked,
    /// The server is shutting down.
    ServerStopping,
}

impl Close {
    /// A close the operator should hear about (the connection was killed).
    fn is_error(self) -> bool {
        matches!(self, Close::BadMagic | Close::RecvFailed(_) | Close::SendFailed(_))
    }
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::Disconnect => f.write_str("client disconnected (NBD_CMD_DISC)"),
            Close::ClientClosed => f.write_str("client closed the connection"),
            Close::BadMagic => f.write_str("killed: a request header without the NBD request magic"),
            Close::RecvFailed(e) => write!(f, "killed: receive failed: {}", std::io::Error::from_raw_os_error(*e)),
            Close::SendFailed(e) => write!(f, "killed: send failed: {}", std::io::Error::from_raw_os_error(*e)),
            Close::Revoked => f.write_str("export revoked (disk detached)"),
            Close::ServerStopping => f.write_str("server stopping"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// `NBD_CMD_DISC` seen: no more requests; finish, reply, then close.
    Disconnecting,
    /// Socket shut down; waiting for in-flight work before dropping.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxTarget {
    Rbuf,
    Chunk { slot: usize, chunk: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    Header,
    /// Filling write payload chunk `chunk` of request `slot`.
    Payload {
        slot: usize,
        chunk: usize,
        filled: usize,
    },
    /// Discarding the payload of a refused write.
    Drain {
        left: u64,
    },
}

struct Req {
    cookie: u64,
    op: IoOp,
    /// Payload bytes (reads and writes), for the reactor's counters.
    bytes: u64,
    offset: u64,
    fua: bool,
    /// Parts not completed yet (submitted or still to be).
    parts_left: u32,
    /// First error (NBD errno), 0 if none.
    err: u32,
    /// Read: the parts' buffers, in order, as they come back. Write: the
    /// payload chunks until each is filled and submitted.
    bufs: Inline<Option<IoBuf>>,
    /// Trim / write-zeroes with FUA: flush once the parts are done.
    flush_after: bool,
}

/// Per-request buffer lists stay inline (one part up to 512 KiB covers
/// almost every request), so parsing a request allocates nothing.
type Inline<T> = smallvec::SmallVec<[T; 2]>;

struct Reply {
    /// A simple reply header, or a structured chunk's header and payload up to
    /// the data (inline up to 32 bytes: every reply but block status).
    hdr: smallvec::SmallVec<[u8; 32]>,
    data: Inline<IoBuf>,
}

/// What the transmission phase speaks, as negotiated in the handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Modes {
    /// `NBD_OPT_STRUCTURED_REPLY`: reads are answered in structured chunks.
    pub structured: bool,
    /// `base:allocation` was selected: `NBD_CMD_BLOCK_STATUS` is served.
    pub block_status: bool,
}

/// A structured error chunk (the last of its reply).
fn error_chunk(err: u32, cookie: u64) -> smallvec::SmallVec<[u8; 32]> {
    let mut h = smallvec::SmallVec::new();
    h.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6));
    h.extend_from_slice(&err.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h
}

/// One `sendmsg` in flight: everything it points at lives here, boxed so
/// the addresses stay put until the completion.
struct SendBatch {
    _hdrs: Vec<u8>,
    _bufs: Vec<IoBuf>,
    iov: Vec<libc::iovec>,
    first: usize,
    msg: libc::msghdr,
}

pub(super) struct Conn {
    ring: Rc<Ring>,
    route: Route,
    pool: BufPool,
    sock: OwnedFd,
    fixed: Option<u32>,
    chan: Lower,
    export: Export,
    sh: Arc<Shared>,
    block_size: u64,
    capacity: u64,
    max_payload: u32,
    /// Receive buffer. Dropped by hand in `Drop` (leaked if the kernel may
    /// still write it); grown only while no receive targets it.
    rbuf: ManuallyDrop<Vec<u8>>,
    rpos: usize,
    rlen: usize,
    rx: Option<RxTarget>,
    rx_state: RxState,
    /// Waiting for buffers or request slots before parsing on.
    stalled: bool,
    /// The last request was a write with a large payload: receive only the
    /// next header into `rbuf`, so that a following large payload lands
    /// straight in its chunk buffer instead of being copied out of `rbuf`.
    big_writes: bool,
    slots: Slab<Req>,
    replies: VecDeque<Reply>,
    /// Bytes to send before any reply (the end of the handshake).
    head: Vec<u8>,
    tx: Option<Box<SendBatch>>,
    /// The batch's `sendmsg` is in the kernel.
    tx_armed: bool,
    phase: Phase,
    /// Requests (and their payload bytes) finished since the last poll.
    done: (u64, u64),
    modes: Modes,
    /// Why it was shut down (the first reason wins).
    closed: Option<Close>,
    /// The client: `pid:N` on a unix socket, the address on TCP.
    peer: String,
    reactor: usize,
    /// Requests answered.
    served: u64,
}

impl Conn {
    /// The connection's last log line (rate-limited: a client can connect and
    /// close at any rate).
    fn log_closed(&self) {
        let why = self.closed.unwrap_or(Close::ServerStopping);
        crate::log_limited!(
            self.sh.log_conns,
            if why.is_error() => warn else info,
            disk = %self.export.name,
            reactor = self.reactor,
            peer = %self.peer,
            requests = self.served,
            why = %why,
            "NBD: connection closed"
        );
    }
}

fn nbd_errno(e: &IoError, op: IoOp) -> u32 {
    match e {
        IoError::OutOfRange { .. } if op == IoOp::Write || op == IoOp::WriteZeroes => ENOSPC,
        IoError::OutOfRange { .. } | IoError::Misaligned { .. } | IoError::MissingBuffer => EINVAL,
        IoError::TooLarge { .. } => EOVERFLOW,
        IoError::Unsupported(_) => EINVAL,
        IoError::Device { errno } => match *errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::ENOMEM => ENOMEM,
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            _ => EIO,
        },
        IoError::Short { .. } => EIO,
    }
}

impl Conn {
    fn push(&self, tag: u64, e: squeue::Entry) -> bool {
        // SAFETY: callers pass entries whose buffers (receive buffer, payload
        // chunk, or a boxed SendBatch) are owned by this Conn and are neither
        // dropped nor reused until the completion with this tag is reaped;
        // `Drop` waits for outstanding completions (or leaks the memory).
        unsafe { self.ring.push(&self.route, tag, e) }
    }

    fn recv_entry(&self, ptr: *mut u8, len: u32) -> squeue::Entry {
        match self.fixed {
            Some(s) => opcode::Recv::new(types::Fixed(s), ptr, len).build(),
            None => opcode::Recv::new(types::Fd(self.sock.as_raw_fd()), ptr, len).build(),
        }
    }

    fn sendmsg_entry(&self, msg: *const libc::msghdr) -> squeue::Entry {
        let flags = libc::MSG_NOSIGNAL as u32;
        match self.fixed {
            Some(s) => opcode::SendMsg::new(types::Fixed(s), msg).flags(flags).build(),
            None => opcode::SendMsg::new(types::Fd(self.sock.as_raw_fd()), msg)
                .flags(flags)
                .build(),
        }
    }

    /// Unparsed received bytes.
    fn rdata(&self) -> &[u8] {
        // SAFETY: rpos..rlen lies inside the receive buffer and is not the
        // target of the receive in flight (that writes rlen.. only).
        unsafe { std::slice::from_raw_parts(self.rbuf.as_ptr().add(self.rpos), self.rlen - self.rpos) }
    }

    /// Shuts the connection down; `why` is what its last log line says.
    fn kill(&mut self, why: Close) {
        if self.phase != Phase::Dead {
            self.phase = Phase::Dead;
            self.closed.get_or_insert(why);
            // SAFETY: shutdown(2) on a descriptor we own; completes the
            // receive in flight (0 bytes) and fails further sends.
            unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn new_slot(&mut self, r: Req) -> usize {
        self.slots.insert(r)
    }

    fn submit(&mut self, req: IoRequest) {
        self.chan.submit(req);
    }

    fn reply(&mut self, err: u32, cookie: u64) {
        self.replies.push_back(Reply {
            hdr: smallvec::SmallVec::from_slice(&simple_reply(err, cookie)),
            data: Inline::new(),
        });
    }

    /// The answer to a read that moves no data: an error, or an empty read.
    /// With structured replies a read never gets a simple reply.
    fn reply_read(&mut self, err: u32, cookie: u64) {
        if !self.modes.structured {
            return self.reply(err, cookie);
        }
        let hdr = if err != 0 {
            error_chunk(err, cookie)
        } else {
            smallvec::SmallVec::from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
        };
        self.replies.push_back(Reply {
            hdr,
            data: Inline::new(),
        });
    }

    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`, from the volume map.
    fn block_status(&mut self, r: &Request) {
        if !self.modes.block_status {
            let e = EINVAL;
            return if self.modes.structured {
                self.replies.push_back(Reply {
                    hdr: error_chunk(e, r.cookie),
                    data: Inline::new(),
                })
            } else {
                self.reply(e, r.cookie)
            };
        }
        let range = if r.len == 0 {
            Err(EINVAL)
        } else {
            self.check_range(r, EINVAL)
        };
        if let Err(e) = range {
            self.replies.push_back(Reply {
                hdr: error_chunk(e, r.cookie),
                data: Inline::new(),
            });
            return;
        }
        let runs = self
            .export
            .bdev
            .allocation(r.offset, r.len as u64)
            .unwrap_or_else(|| vec![(r.len as u64, true)]);
        let take = if r.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { runs.len() };
        let mut hdr: smallvec::SmallVec<[u8; 32]> = smallvec::SmallVec::new();
        let n = take.min(runs.len());
        hdr.extend_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            4 + 8 * n as u32,
        ));
        hdr.extend_from_slice(&META_ID_BASE_ALLOCATION.to_be_bytes());
        for &(len, allocated) in &runs[..n] {
            let flags = if allocated { 0 } else { STATE_HOLE | STATE_ZERO };
            hdr.extend_from_slice(&(len as u32).to_be_bytes());
            hdr.extend_from_slice(&flags.to_be_bytes());
        }
        self.replies.push_back(Reply {
            hdr,
            data: Inline::new(),
        });
    }

    /// Allocate `n` buffers of the given lengths, all or none.
    fn alloc_chunks(&self, len: u64) -> Option<Inline<Option<IoBuf>>> {
        let mut v = Inline::new();
        let mut off = 0;
        while off < len {
            let l = (len - off).min(MAX_IO_BYTES) as usize;
            let mut b = self.pool.alloc(l)?;
            b.set_len(l);
            v.push(Some(b));
            off += l as u64;
        }
        Some(v)
    }

    /// Check a request's range; `Err(nbd errno)` if it cannot be served.
    fn check_range(&self, r: &Request, past_end: u32) -> Result<(), u32> {
        super::proto::check_range(r, self.block_size, self.capacity, past_end)
    }

    /// Act on one request header. Returns false when resources are short
    /// (the header stays unparsed and is retried).
    fn start_request(&mut self, r: Request) -> bool {
        self.big_writes = r.cmd == CMD_WRITE && r.len >= BIG_WRITE;
        match r.cmd {
            CMD_DISC => {
                self.phase = Phase::Disconnecting;
                true
            }
            CMD_BLOCK_STATUS => {
                self.block_status(&r);
                true
            }
            CMD_READ => self.start_read(&r),
            CMD_WRITE => self.start_write(&r),
            CMD_FLUSH => self.start_flush(&r),
            CMD_TRIM => self.start_zero(&r, IoOp::Unmap),
            CMD_WRITE_ZEROES => self.start_zero(&r, IoOp::WriteZeroes),
            _ => {
                // CACHE, BLOCK_STATUS (not negotiated) and unknown commands.
                self.reply(EINVAL, r.cookie);
                true
            }
        }
    }

    /// `NBD_CMD_READ`: refused, answered empty, or split into parts of at
    /// most [`MAX_IO_BYTES`], each into a pool buffer of its own.
    #[inline]
    fn start_read(&mut self, r: &Request) -> bool {
        if r.len > self.max_payload {
            self.reply_read(EINVAL, r.cookie);
        } else if let Err(e) = self.check_range(r, EINVAL) {
            self.reply_read(e, r.cookie);
        } else if r.len == 0 {
            self.reply_read(0, r.cookie);
        } else {
            if self.slots.len() >= MAX_REQS {
                return false;
            }
            let Some(bufs) = self.alloc_chunks(r.len as u64) else {
                return false;
            };
            let n = bufs.len();
            let slot = self.new_slot(Req {
                cookie: r.cookie,
                op: IoOp::Read,
                bytes: r.len as u64,
                offset: r.offset,
                fua: false,
                parts_left: n as u32,
                err: 0,
                bufs: (0..n).map(|_| None).collect(),
                flush_after: false,
            });
            for (i, b) in bufs.into_iter().enumerate() {
                let off = r.offset + i as u64 * MAX_IO_BYTES;
                self.submit(IoRequest::read(off, b.expect("allocated"), tag(slot, i)));
            }
        }
        true
    }

    /// `NBD_CMD_WRITE`: refused (its payload drained), answered at once if
    /// empty, or its payload chunks allocated and the receiver switched to
    /// filling them (each chunk is submitted when full).
    #[inline]
    fn start_write(&mut self, r: &Request) -> bool {
        let refuse = if self.export.read_only {
            Some(EPERM)
        } else if r.len > self.max_payload {
            Some(EINVAL)
        } else {
            self.check_range(r, ENOSPC).err()
        };
        if let Some(e) = refuse {
            self.reply(e, r.cookie);
            if r.len > 0 {
                self.rx_state = RxState::Drain { left: r.len as u64 };
            }
        } else if r.len == 0 {
            self.reply(0, r.cookie);
        } else {
            if self.slots.len() >= MAX_REQS {
                return false;
            }
            let Some(bufs) = self.alloc_chunks(r.len as u64) else {
                return false;
            };
            let slot = self.new_slot(Req {
                cookie: r.cookie,
                op: IoOp::Write,
                bytes: r.len as u64,
                offset: r.offset,
                fua: r.flags & CMD_FLAG_FUA != 0,
                parts_left: bufs.len() as u32,
                err: 0,
                bufs,
                flush_after: false,
            });
            self.rx_state = RxState::Payload {
                slot,
                chunk: 0,
                filled: 0,
            };
        }
        true
    }

    /// `NBD_CMD_FLUSH`: one flush down.
    #[inline]
    fn start_flush(&mut self, r: &Request) -> bool {
        if self.slots.len() >= MAX_REQS {
            return false;
        }
        let slot = self.new_slot(Req {
            cookie: r.cookie,
            op: IoOp::Flush,
            bytes: 0,
            offset: 0,
            fua: false,
            parts_left: 1,
            err: 0,
            bufs: Inline::new(),
            flush_after: false,
        });
        self.submit(IoRequest::flush(tag(slot, 0)));
        true
    }

    /// `NBD_CMD_TRIM` (`op` = Unmap) and `NBD_CMD_WRITE_ZEROES`: refused,
    /// answered at once if empty, or split into parts of at most
    /// [`ZERO_CHUNK`] (with FUA: a flush once they are done).
    fn start_zero(&mut self, r: &Request, op: IoOp) -> bool {
        let past_end = if op == IoOp::Unmap { EINVAL } else { ENOSPC };
        if self.export.read_only {
            self.reply(EPERM, r.cookie);
        } else if let Err(e) = self.check_range(r, past_end) {
            self.reply(e, r.cookie);
        } else if op == IoOp::WriteZeroes && r.flags & CMD_FLAG_FAST_ZERO != 0 {
            // We cannot promise that zeroing is faster than writing
            // zeros on every backend below (see docs/nbd.md).
            self.reply(ENOTSUP, r.cookie);
        } else if r.len == 0 {
            self.reply(0, r.cookie);
        } else {
            if self.slots.len() >= MAX_REQS {
                return false;
            }
            let len = r.len as u64;
            let n = len.div_ceil(ZERO_CHUNK) as usize;
            let slot = self.new_slot(Req {
                cookie: r.cookie,
                op,
                bytes: 0,
                offset: r.offset,
                fua: false,
                parts_left: n as u32,
                err: 0,
                bufs: Inline::new(),
                flush_after: r.flags & CMD_FLAG_FUA != 0,
            });
            for i in 0..n {
                let off = i as u64 * ZERO_CHUNK;
                let l = (len - off).min(ZERO_CHUNK);
                let t = tag(slot, i);
                let req = if op == IoOp::Unmap {
                    IoRequest::unmap(r.offset + off, l, t)
                } else {
                    IoRequest::write_zeroes(r.offset + off, l, t)
                };
                self.submit(req);
            }
        }
        true
    }

    /// Parse and act on everything received so far. Returns work done.
    fn parse(&mut self) -> usize {
        let mut work = 0;
        self.stalled = false;
        while self.phase == Phase::Running {
            match self.rx_state {
                RxState::Header => {
                    let parsed = parse_request(self.rdata());
                    match parsed {
                        None => break,
                        Some(Err(BadMagic(_))) => {
                            self.kill(Close::BadMagic);
                            break;
                        }
                        Some(Ok(r)) => {
                            if !self.start_request(r) {
                                self.stalled = true;
                                break;
                            }
                            self.rpos += REQUEST_LEN;
                            work += 1;
                        }
                    }
                }
                RxState::Payload { slot, chunk, filled } => {
                    let avail = self.rlen - self.rpos;
                    if avail == 0 {
                        break;
                    }
                    let req = self.slots.get_mut(slot).expect("live write");
                    let b = req.bufs[chunk].as_mut().expect("unfilled chunk");
                    let n = avail.min(b.len() - filled);
                    // SAFETY: rpos..rpos+n is received data in the receive
                    // buffer (no receive in flight targets it); the chunk is a
                    // different pool buffer.
                    let src = unsafe { std::slice::from_raw_parts(self.rbuf.as_ptr().add(self.rpos), n) };
                    b[filled..filled + n].copy_from_slice(src);
                    self.rpos += n;
                    self.payload_progress(slot, chunk, filled + n);
                    work += 1;
                }
                RxState::Drain { left } => {
                    let avail = (self.rlen - self.rpos) as u64;
                    if avail == 0 {
                        break;
                    }
                    let n = avail.min(left);
                    self.rpos += n as usize;
                    self.rx_state = if n == left {
                        RxState::Header
                    } else {
                        RxState::Drain { left: left - n }
                    };
                }
            }
        }
        work
    }

    /// Chunk `chunk` of write `slot` now holds `filled` bytes: submit it when
    /// full and move on.
    fn payload_progress(&mut self, slot: usize, chunk: usize, filled: usize) {
        let req = self.slots.get_mut(slot).expect("live write");
        let full = req.bufs[chunk].as_ref().expect("chunk").len();
        if filled < full {
            self.rx_state = RxState::Payload { slot, chunk, filled };
            return;
        }
        let b = req.bufs[chunk].take().expect("chunk");
        let mut w = IoRequest::write(req.offset + chunk as u64 * MAX_IO_BYTES, b, tag(slot, chunk));
        w.fua = req.fua;
        // The connection never reads a write's buffer again: an encrypted disk
        // encrypts it in place.
        w.scratch = true;
        self.rx_state = if chunk + 1 < req.bufs.len() {
            RxState::Payload {
                slot,
                chunk: chunk + 1,
                filled: 0,
            }
        } else {
            RxState::Header
        };
        self.submit(w);
    }

    /// Post a receive if none is in flight and there is room.
    fn arm_recv(&mut self) {
        if self.rx.is_some() || self.phase != Phase::Running {
            return;
        }
        if let RxState::Payload { slot, chunk, filled } = self.rx_state {
            if self.rpos == self.rlen {
                // Receive the rest of this chunk straight into it.
                let req = self.slots.get_mut(slot).expect("live write");
                let b = req.bufs[chunk].as_mut().expect("unfilled chunk");
                // SAFETY: filled < len, so the pointer stays in the buffer.
                let ptr = unsafe { b.as_mut_ptr().add(filled) };
                let len = (b.len() - filled) as u32;
                let e = self.recv_entry(ptr, len);
                if self.push(TAG_RECV, e) {
                    self.rx = Some(RxTarget::Chunk { slot, chunk });
                }
                return;
            }
        }
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rpos > 0 && (self.rlen == self.rbuf.len() || self.stalled) {
            // Compact (nothing is in flight into the buffer now).
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        if self.rlen == self.rbuf.len() {
            if self.rbuf.len() >= RBUF {
                return; // full of unparsed requests: back-pressure on the client
            }
            // A busy client: a larger buffer (no receive targets it now).
            let mut bigger = vec![0u8; (self.rbuf.len() * 4).min(RBUF)];
            bigger[..self.rlen].copy_from_slice(&self.rbuf[..self.rlen]);
            *self.rbuf = bigger;
        }
        let mut want = self.rbuf.len() - self.rlen;
        if self.big_writes {
            // Just the rest of the next header (see `big_writes`).
            want = want.min(REQUEST_LEN - (self.rlen - self.rpos).min(REQUEST_LEN - 1));
        }
        // SAFETY: rlen < rbuf.len(), so the pointer stays in the buffer.
        let ptr = unsafe { self.rbuf.as_mut_ptr().add(self.rlen) };
        let e = self.recv_entry(ptr, want as u32);
        if self.push(TAG_RECV, e) {
            self.rx = Some(RxTarget::Rbuf);
        }
    }

    fn on_recv(&mut self, target: RxTarget, res: i32) {
        if res <= 0 {
            // 0: the client closed (or we shut the socket down); <0: error.
            if self.phase == Phase::Running {
                self.kill(if res == 0 {
                    Close::ClientClosed
                } else {
                    Close::RecvFailed(-res)
                });
            }
            return;
        }
        if self.phase == Phase::Dead {
            return;
        }
        let n = res as usize;
        match target {
            RxTarget::Rbuf => self.rlen += n,
            RxTarget::Chunk { slot, chunk } => {
                if let RxState::Payload { filled, .. } = self.rx_state {
                    self.payload_progress(slot, chunk, filled + n);
                }
            }
        }
    }

    /// Handle bdev completions.
    fn on_completions(&mut self) -> usize {
        let mut comps = self.chan.poll();
        let n = comps.len();
        for c in comps.drain(..) {
            let slot = (c.tag >> PART_BITS) as usize;
            let part = (c.tag & ((1 << PART_BITS) - 1)) as usize;
            let req = self.slots.get_mut(slot).expect("completion for a live request");
            if let Err(e) = &c.result {
                if req.err == 0 {
                    req.err = nbd_errno(e, c.op);
                    crate::log_limited!(
                        self.sh.log_io,
                        warn,
                        disk = %self.export.name,
                        reactor = self.reactor,
                        op = ?c.op,
                        error = %e,
                        nbd_errno = req.err,
                        "NBD: request failed; the client gets an error reply"
                    );
                }
            }
            if req.op == IoOp::Read {
                req.bufs[part] = c.buf;
            }
            req.parts_left -= 1;
            if req.parts_left > 0 {
                continue;
            }
            if req.flush_after && req.err == 0 {
                req.flush_after = false;
                req.parts_left = 1;
                self.submit(IoRequest::flush(tag(slot, 0)));
                continue;
            }
            let req = self.slots.remove(slot).expect("live");
            self.done.0 += 1;
            self.done.1 += req.bytes;
            self.served += 1;
            let data: Inline<IoBuf> = if req.op == IoOp::Read && req.err == 0 {
                req.bufs.into_iter().map(|b| b.expect("every part returned")).collect()
            } else {
                Inline::new()
            };
            let hdr = match (req.op, self.modes.structured) {
                // One data chunk for the whole read (so NBD_CMD_FLAG_DF holds).
                (IoOp::Read, true) if req.err == 0 => {
                    let mut h = smallvec::SmallVec::new();
                    h.extend_from_slice(&chunk_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        8 + req.bytes as u32,
                    ));
                    h.extend_from_slice(&req.offset.to_be_bytes());
                    h
                }
                (IoOp::Read, true) => error_chunk(req.err, req.cookie),
                _ => smallvec::SmallVec::from_slice(&simple_reply(req.err, req.cookie)),
            };
            self.replies.push_back(Reply { hdr, data });
        }
        self.chan.recycle(comps);
        n
    }

    /// Send queued replies if no send is in flight.
    fn arm_send(&mut self) {
        if self.tx_armed || self.phase == Phase::Dead {
            return;
        }
        if self.tx.is_none() {
            if self.replies.is_empty() && self.head.is_empty() {
                return;
            }
            self.tx = Some(self.build_batch());
        }
        let b = self.tx.as_mut().expect("batch");
        // SAFETY: first < iov.len() (a batch with nothing left is dropped).
        b.msg.msg_iov = unsafe { b.iov.as_mut_ptr().add(b.first) };
        b.msg.msg_iovlen = b.iov.len() - b.first;
        let p: *const libc::msghdr = &b.msg;
        let e = self.sendmsg_entry(p);
        // Submission queue full: retried on the next poll.
        self.tx_armed = self.push(TAG_SEND, e);
    }

    /// Coalesce queued replies (headers and read data) into one iovec list.
    fn build_batch(&mut self) -> Box<SendBatch> {
        let mut take = Vec::new();
        let mut niov = 1;
        while let Some(r) = self.replies.front() {
            if niov + 1 + r.data.len() > MAX_IOV && !take.is_empty() {
                break;
            }
            niov += 1 + r.data.len();
            take.push(self.replies.pop_front().expect("front"));
        }
        let mut hdrs = std::mem::take(&mut self.head);
        let head_len = hdrs.len();
        hdrs.reserve_exact(take.iter().map(|r| r.hdr.len()).sum());
        for r in &take {
            hdrs.extend_from_slice(&r.hdr);
        }
        // `hdrs` is complete and never grows again: pointers into its heap
        // storage stay valid while the batch lives.
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(niov);
        let base = hdrs.as_ptr();
        let mut run_start = 0usize; // start of the pending run of header bytes
        let mut pos = head_len;
        let mut bufs = Vec::new();
        for r in take {
            pos += r.hdr.len();
            if !r.data.is_empty() {
                iov.push(libc::iovec {
                    // SAFETY: run_start < pos <= hdrs.len().
                    iov_base: unsafe { base.add(run_start) } as *mut libc::c_void,
                    iov_len: pos - run_start,
                });
                run_start = pos;
                for b in r.data {
                    iov.push(libc::iovec {
                        iov_base: b.as_ptr() as *mut libc::c_void,
                        iov_len: b.len(),
                    });
                    bufs.push(b);
                }
            }
        }
        if pos > run_start {
            iov.push(libc::iovec {
                // SAFETY: run_start < pos == hdrs.len().
                iov_base: unsafe { base.add(run_start) } as *mut libc::c_void,
                iov_len: pos - run_start,
            });
        }
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Box::new(SendBatch {
            _hdrs: hdrs,
            _bufs: bufs,
            iov,
            first: 0,
            msg,
        })
    }

    fn on_send(&mut self, res: i32) {
        if res < 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                return; // re-armed by `arm_send`
            }
            self.tx = None;
            self.kill(Close::SendFailed(-res));
            return;
        }
        let Some(b) = self.tx.as_mut() else { return };
        let mut n = res as usize;
        while n > 0 && b.first < b.iov.len() {
            let v = &mut b.iov[b.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                b.first += 1;
            } else {
                // SAFETY: n < iov_len, so the pointer stays in the buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        if b.first >= b.iov.len() {
            self.tx = None; // buffers back to the pool
        }
        // Otherwise a short send: `arm_send` sends the rest.
    }
}

fn tag(slot: usize, part: usize) -> u64 {
    debug_assert!(part < 1 << PART_BITS);
    ((slot as u64) << PART_BITS) | part as u64
}

impl Conn {
    fn quiescent(&self) -> bool {
        self.rx.is_none() && !self.tx_armed && self.chan.in_flight() == 0
    }
}

impl Poller for Conn {
    /// Requests in the bdev stack (a QoS limit may hold them), requests
    /// refused by back-pressure, or a header waiting for buffers: all may
    /// need a poll without any wake-up. An idle connection has none (its
    /// armed receive wakes the reactor).
    fn pending(&self) -> bool {
        !self.slots.is_empty() || self.chan.has_deferred() || self.stalled
    }

    fn poll(&mut self, ctx: &ReactorCtx) -> Poll {
        let mut work = 0;
        if self.phase != Phase::Dead {
            if self.sh.stop.load(Ordering::Relaxed) {
                self.kill(Close::ServerStopping);
            } else if self.export.is_revoked() {
                self.kill(Close::Revoked);
            }
        }
        while let Some((t, res)) = self.route.pop() {
            work += 1;
            match t {
                TAG_RECV => {
                    if let Some(target) = self.rx.take() {
                        self.on_recv(target, res);
                    }
                }
                _ => {
                    self.tx_armed = false;
                    self.on_send(res);
                }
            }
        }
        if self.phase == Phase::Dead {
            // Nothing more will be answered: requests not yet handed to the
            // bdev are dropped (their buffers go back to the pool).
            self.chan.drop_deferred();
        }
        work += self.on_completions();
        if self.done.0 > 0 {
            ctx.stats
                .add_ios(crate::reactor::IoSource::Nbd, self.done.0, self.done.1);
            self.done = (0, 0);
        }
        if self.phase == Phase::Running {
            work += self.parse();
        }
        if self.phase == Phase::Disconnecting
            && self.slots.is_empty()
            && !self.chan.has_deferred()
            && self.tx.is_none()
            && self.replies.is_empty()
            && self.head.is_empty()
        {
            self.kill(Close::Disconnect);
        }
        self.arm_send();
        self.arm_recv();
        if self.phase == Phase::Dead && self.quiescent() {
            self.log_closed();
            return Poll::Done;
        }
        if work > 0 {
            Poll::Busy(work)
        } else {
            Poll::Idle
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.kill(Close::ServerStopping);
        // Wait for our operations still in the kernel before their buffers
        // can go back to the pool (only when the reactor itself stops).
        let mut spins = 0;
        while (self.rx.is_some() || self.tx_armed) && spins < 1000 {
            let _ = self.ring.flush();
            let _ = self.ring.wait(std::time::Duration::from_millis(1));
            self.ring.reap();
            while let Some((t, _)) = self.route.pop() {
                if t == TAG_RECV {
                    self.rx = None;
                } else {
                    self.tx_armed = false;
                }
            }
            spins += 1;
        }
        if self.rx.is_some() || self.tx_armed {
            // Leak rather than recycle memory the kernel may still write.
            std::mem::forget(self.tx.take());
            for s in self.slots.drain() {
                std::mem::forget(s.bufs);
            }
        } else {
            // SAFETY: dropped exactly once, here; the kernel no longer uses
            // it (no receive in flight) and nothing touches it afterwards.
            unsafe { ManuallyDrop::drop(&mut self.rbuf) };
        }
        if let Some(s) = self.fixed {
            self.ring.unregister_file(s);
        }
        self.sh.conns.fetch_sub(1, Ordering::SeqCst);
    }
}
