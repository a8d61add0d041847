//! Block devices: a small bdev API and its modules, stacked like SPDK's
//! vbdevs.
//!
//! A [`Bdev`] describes a device (block size, capacity, limits) and opens a
//! [`Channel`] per reactor. A channel is the only way to do I/O: it is owned
//! by one reactor thread, takes requests with [`Channel::submit`] and hands
//! back completions from [`Channel::poll`]. Nothing on the I/O path locks.
//!
//! Stacking rule: a virtual bdev (e.g. [`crypto::CryptoBdev`]) holds the bdev
//! below it and opens the lower channel inside its own `open_channel`, on the
//! same reactor; its channel calls only that lower channel.
//!
//! Requests own their buffer ([`IoBuf`]) until the completion gives it back,
//! so no buffer can be freed or reused while the device still uses it.

// Its `pub` constants (BOUNCE_CHUNK, STREAM_MAX) become `pub(crate)` once the data
// path work under way in crypto.rs has landed; until then the lint is off here.
pub(crate) mod crypto;
mod error;
pub(crate) mod iostat;
pub(crate) mod malloc;
pub(crate) mod null;
pub(crate) mod qos;
mod queue;
pub(crate) mod rbd;
pub(crate) mod slab;
pub(crate) mod uring;

pub use error::{IopollError, StackError};
pub use queue::{DrainTimeout, IoQueue};

use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use crate::iobuf::{BufPool, IoBuf};
use crate::uring::Ring;

/// Largest single request any bdev in the stack accepts (frontends split
/// larger client requests). Half the largest pool buffer, so a request over
/// the limit can still be built to be refused.
pub const MAX_IO_BYTES: u64 = 512 << 10;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    /// Discard: the range reads back as zeros afterwards.
    Unmap,
    WriteZeroes,
}

/// Memory a frontend lends a read or write instead of a pool buffer: the
/// guest's own buffers (vhost-user). A write's payload is read from it, a
/// read's data lands in it; the bdev never keeps it past the completion.
/// Only a bdev whose [`Bdev::takes_lent`] says so gets such a request (the
/// crypto layer: it encrypts from the segments straight into its bounce
/// buffers and decrypts into them), so no device below ever sees one.
#[derive(Debug)]
pub struct Lent {
    segs: LentSegs,
    len: usize,
}

/// The (pointer, length) pieces of a [`Lent`]; one is kept inline (a 4 KiB
/// guest request is one page), more go to the heap.
pub(crate) type LentSegs = smallvec::SmallVec<[(*mut u8, usize); 1]>;

impl Lent {
    /// # Safety
    /// Every segment must stay mapped, and be used by nobody but the request's
    /// bdev for writing, until the request completes. (Guest memory: the
    /// guest may still change the bytes; they are read once, never trusted.)
    pub(crate) unsafe fn new(segs: LentSegs) -> Lent {
        let len = segs.iter().map(|s| s.1).sum();
        Lent { segs, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[(*mut u8, usize)] {
        &self.segs
    }
}

/// One I/O request. Reads and writes carry `buf` (its length is the I/O
/// length), or, on a bdev that takes them, `lent` memory instead; other
/// requests carry neither. `len` is used for unmap and write-zeroes.
#[derive(Debug)]
pub struct IoRequest {
    pub op: IoOp,
    pub offset: u64,
    pub len: u64,
    pub buf: Option<IoBuf>,
    /// Frontend memory instead of `buf` (`Lent`).
    pub lent: Option<Lent>,
    /// A write whose `buf` the caller never reads again: a layer may overwrite
    /// it (the crypto layer encrypts in place instead of into a bounce
    /// buffer) and need not hand it back.
    pub scratch: bool,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// Caller's cookie, returned in the completion.
    pub tag: u64,
}

impl IoRequest {
    pub fn read(offset: u64, buf: IoBuf, tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Read,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            lent: None,
            scratch: false,
            fua: false,
            tag,
        }
    }

    pub fn write(offset: u64, buf: IoBuf, tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Write,
            offset,
            len: buf.len() as u64,
            buf: Some(buf),
            lent: None,
            scratch: false,
            fua: false,
            tag,
        }
    }

    pub fn flush(tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            buf: None,
            lent: None,
            scratch: false,
            fua: false,
            tag,
        }
    }

    pub fn unmap(offset: u64, len: u64, tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Unmap,
            offset,
            len,
            buf: None,
            lent: None,
            scratch: false,
            fua: false,
            tag,
        }
    }

    pub fn write_zeroes(offset: u64, len: u64, tag: u64) -> IoRequest {
        IoRequest {
            op: IoOp::WriteZeroes,
            offset,
            len,
            buf: None,
            lent: None,
            scratch: false,
            fua: false,
            tag,
        }
    }

    /// A read or write of frontend memory (`Lent`).
    pub fn lent(op: IoOp, offset: u64, lent: Lent, tag: u64) -> IoRequest {
        IoRequest {
            op,
            offset,
            len: lent.len() as u64,
            buf: None,
            lent: Some(lent),
            scratch: false,
            fua: false,
            tag,
        }
    }

    /// Bytes the request covers.
    pub fn bytes(&self) -> u64 {
        match self.op {
            IoOp::Read | IoOp::Write => match (&self.buf, &self.lent) {
                (Some(b), _) => b.len() as u64,
                (None, Some(l)) => l.len() as u64,
                (None, None) => 0,
            },
            IoOp::Unmap | IoOp::WriteZeroes => self.len,
            IoOp::Flush => 0,
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub op: IoOp,
    pub result: Result<(), IoError>,
    /// The request's buffer, handed back.
    pub buf: Option<IoBuf>,
}

/// Why a request failed. Every variant says what was wrong with numbers a
/// user can check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    TooLarge {
        len: u64,
        max: u64,
    },
    MissingBuffer,
    Unsupported(IoOp),
    /// The device failed the request (errno).
    Device {
        errno: i32,
    },
    /// The device transferred fewer bytes than asked.
    Short {
        want: u64,
        got: u64,
    },
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::OutOfRange { offset, len, capacity } => write!(
                f,
                "I/O of {len} bytes at offset {offset} runs past the end of the device ({capacity} bytes)"
            ),
            IoError::Misaligned {
                offset,
                len,
                block_size,
            } => write!(
                f,
                "I/O at offset {offset}, length {len} is not aligned to the {block_size}-byte block size"
            ),
            IoError::TooLarge { len, max } => {
                write!(
                    f,
                    "I/O of {len} bytes exceeds the maximum of {max} bytes per request; split it"
                )
            }
            IoError::MissingBuffer => write!(f, "read or write request without a buffer"),
            IoError::Unsupported(op) => write!(f, "{op:?} is not supported by this device"),
            IoError::Device { errno } => {
                write!(f, "device error: {}", std::io::Error::from_raw_os_error(*errno))
            }
            IoError::Short { want, got } => write!(f, "short transfer: {got} of {want} bytes"),
        }
    }
}

impl std::error::Error for IoError {}

/// Wakes the reactor that owns a channel (cheap when it is not parked).
/// Work completed on another thread (the volume metadata thread) calls it
/// after posting its answer, so the reactor does not sleep on it.
pub(crate) type Waker = Arc<dyn Fn() + Send + Sync>;

/// Per-reactor resources a channel may use: the reactor's ring, buffer pool
/// and waker. Given to [`Bdev::open_channel`] by the reactor that will own it.
#[derive(Clone)]
pub struct ChannelCtx {
    pub ring: Rc<Ring>,
    /// The reactor's IOPOLL ring, for files that support polled completions.
    pub iopoll: crate::uring::PollRing,
    pub pool: BufPool,
    pub waker: Waker,
}

/// A block device.
pub trait Bdev: Send + Sync {
    /// Name for logs and reports.
    fn name(&self) -> &str;
    /// Logical block size: offsets and lengths must be multiples of it.
    fn block_size(&self) -> u32;
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// The bdev below a stacked layer (QoS, statistics, crypto): the methods
    /// below that a layer does not define pass through to it. Such a layer maps
    /// offsets one to one and reads an unallocated range as zeros (or defines
    /// [`Bdev::allocation`] itself). `None` (a base device): the defaults.
    fn lower(&self) -> Option<&dyn Bdev> {
        None
    }
    /// Largest request accepted.
    fn max_io_bytes(&self) -> u64 {
        self.lower().map_or(MAX_IO_BYTES, |l| l.max_io_bytes())
    }
    /// Whether the device has a volatile write cache (so FLUSH matters).
    fn volatile_cache(&self) -> bool {
        self.lower().is_none_or(|l| l.volatile_cache())
    }
    /// Whether a device reads write payloads by DMA (rather than the CPU
    /// copying them). A layer that fills write buffers of its own (the crypto
    /// layer's bounce buffers) then fills them with streaming stores.
    fn dma_writes(&self) -> bool {
        self.lower().is_some_and(|l| l.dma_writes())
    }
    /// Whether reads and writes may carry `Lent` memory instead of a buffer.
    fn takes_lent(&self) -> bool {
        self.lower().is_some_and(|l| l.takes_lent())
    }
    /// Which parts of `offset..offset + len` hold data: runs of (length,
    /// allocated), in order, covering the range; an unallocated run reads as
    /// zeros. `None`: the device does not know (every byte is data). Served
    /// from in-memory state without I/O, so a frontend may ask on the data
    /// path (NBD block status).
    fn allocation(&self, offset: u64, len: u64) -> Option<Vec<(u64, bool)>> {
        self.lower()?.allocation(offset, len)
    }
    /// Adds what this layer and the layers below it counted on their own
    /// (QoS holds, copy-on-write) into `c`; a virtual bdev forwards to the
    /// bdev below. Read by the control plane ([`iostat::DiskStats`]), never
    /// on the data path.
    fn layer_counters(&self, c: &mut LayerCounters) {
        if let Some(l) = self.lower() {
            l.layer_counters(c);
        }
    }
    /// Open an I/O channel for the calling reactor.
    fn open_channel(&self, ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>>;
}

/// Counts that layers below the statistics layer ([`iostat`]) keep about
/// their own slow paths, cumulative since the layer was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerCounters {
    /// Requests the QoS limiter held back (`qos`).
    pub qos_holds: u64,
    /// Total time requests waited in the QoS limiter, nanoseconds.
    pub qos_held_ns: u64,
    /// Clusters copied because a write hit a shared cluster (`volume`).
    pub cow_copies: u64,
    /// Clusters allocated by a first write (`volume`).
    pub cluster_allocs: u64,
}

impl LayerCounters {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &LayerCounters) -> LayerCounters {
        LayerCounters {
            qos_holds: self.qos_holds.saturating_sub(earlier.qos_holds),
            qos_held_ns: self.qos_held_ns.saturating_sub(earlier.qos_held_ns),
            cow_copies: self.cow_copies.saturating_sub(earlier.cow_copies),
            cluster_allocs: self.cluster_allocs.saturating_sub(earlier.cluster_allocs),
        }
    }

    pub fn add(&mut self, o: &LayerCounters) {
        self.qos_holds += o.qos_holds;
        self.qos_held_ns += o.qos_held_ns;
        self.cow_copies += o.cow_copies;
        self.cluster_allocs += o.cluster_allocs;
    }
}

/// A per-reactor I/O queue of a bdev.
pub trait Channel {
    /// Queue a request. `Err(req)` hands it back untouched: back-pressure
    /// (queue or buffers full); retry after polling. Invalid requests are
    /// accepted and complete with an error.
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest>;
    /// Move finished requests into `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize;
    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
}

/// The channel below a virtual bdev's channel, with the stacking rule's
/// back-pressure handling: a request the lower channel refuses waits here and
/// goes first, in order, on the next poll, so a vbdev never drops or
/// reorders what it sends down.
pub(crate) struct Lower {
    chan: Box<dyn Channel>,
    deferred: std::collections::VecDeque<IoRequest>,
    scratch: Vec<IoCompletion>,
}

impl Lower {
    pub(crate) fn new(chan: Box<dyn Channel>) -> Lower {
        Lower {
            chan,
            deferred: Default::default(),
            scratch: Vec::new(),
        }
    }

    /// Send a request down (or queue it behind earlier refused ones). Inlined
    /// so the request is built where the call below takes it: copying a
    /// request just built stalls the CPU (~10 ns a request).
    #[inline(always)]
    pub(crate) fn submit(&mut self, req: IoRequest) {
        if !self.deferred.is_empty() {
            self.deferred.push_back(req);
        } else if let Err(r) = self.chan.submit(req) {
            self.deferred.push_back(r);
        }
    }

    /// Retry refused requests, then collect the lower channel's completions.
    /// Hand the vector back with [`Lower::recycle`] to reuse its storage.
    pub(crate) fn poll(&mut self) -> Vec<IoCompletion> {
        while let Some(r) = self.deferred.pop_front() {
            if let Err(r) = self.chan.submit(r) {
                self.deferred.push_front(r);
                break;
            }
        }
        let mut v = std::mem::take(&mut self.scratch);
        self.chan.poll(&mut v);
        v
    }

    /// Return the (drained) vector from [`Lower::poll`].
    pub(crate) fn recycle(&mut self, v: Vec<IoCompletion>) {
        debug_assert!(v.is_empty());
        self.scratch = v;
    }

    /// Requests refused by the lower channel, waiting to be resent.
    pub(crate) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Drop the requests not yet accepted below (their buffers go back to
    /// the pool): for a caller that will answer nothing more.
    pub(crate) fn drop_deferred(&mut self) {
        self.deferred.clear();
    }

    /// Requests the lower channel holds.
    pub(crate) fn in_flight(&self) -> usize {
        self.chan.in_flight()
    }
}

/// Check a request against a device's geometry.
pub(crate) fn validate(req: &IoRequest, block_size: u32, capacity: u64, max_io: u64) -> Result<(), IoError> {
    let len = match req.op {
        IoOp::Flush => return Ok(()),
        IoOp::Read | IoOp::Write => match (&req.buf, &req.lent) {
            (Some(b), _) => b.len() as u64,
            (None, Some(l)) => l.len() as u64,
            (None, None) => return Err(IoError::MissingBuffer),
        },
        IoOp::Unmap | IoOp::WriteZeroes => req.len,
    };
    let bs = block_size as u64;
    // Block sizes are powers of two in practice: a mask instead of two
    // divisions (~10 ns per request on the data path).
    let misaligned = if bs.is_power_of_two() {
        (req.offset | len) & (bs - 1) != 0
    } else {
        !req.offset.is_multiple_of(bs) || !len.is_multiple_of(bs)
    };
    if misaligned || len == 0 {
        return Err(IoError::Misaligned {
            offset: req.offset,
            len,
            block_size,
        });
    }
    if matches!(req.op, IoOp::Read | IoOp::Write) && len > max_io {
        return Err(IoError::TooLarge { len, max: max_io });
    }
    if req.offset.checked_add(len).is_none_or(|end| end > capacity) {
        return Err(IoError::OutOfRange {
            offset: req.offset,
            len,
            capacity,
        });
    }
    Ok(())
}

/// Shared handle to a bdev.
pub type BdevRef = Arc<dyn Bdev>;
