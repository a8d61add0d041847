//! `crypto`: XTS-AES-256 over any bdev, with the disk's own key.
//!
//! * Writes are encrypted out of place into bounce buffers from the reactor's
//!   pool (the caller's buffer is never modified), in chunks of at most
//!   [`BOUNCE_CHUNK`] bytes, each its own write to the device below; a write
//!   whose caller marks it `scratch` is encrypted in its own buffer instead.
//! * Reads go to the device in the caller's buffer and are decrypted in place.
//! * The XTS sector number is the byte offset divided by this layer's sector
//!   size (512 or 4096; `plain64`, see `docs/format.md`).
//! * Unmapped and zeroed ranges read back as zeros: a sector whose stored
//!   bytes are all zero is returned as zeros instead of being decrypted.
//!   Real ciphertext is all-zero with probability 2^-4096 per sector, and
//!   the devices below return zeros for discarded or zeroed ranges, so unmap
//!   and write-zeroes pass straight through and stay cheap.
//! * When the device below reads writes by DMA ([`Bdev::dma_writes`]),
//!   bounce buffers of up to [`STREAM_MAX`] bytes are filled with streaming
//!   stores: the CPU never reads them again, so fetching their cache lines
//!   first is wasted.
//! * Bounce buffers are back-pressure: when the pool is empty the write is
//!   handed back to the caller to retry.
//! * Each poll decrypts at most [`DECRYPT_BUDGET`] bytes of reads, so the
//!   caller gets back to submitting between slices of a large batch.
//! * A batch of completions from below becomes the callers' answers where it
//!   lies (`CryptoChannel::finish` rewrites each in place) and goes up whole:
//!   building a new completion per request stalled the CPU on copies of
//!   structs it had just written.

use std::collections::VecDeque;
use std::sync::Arc;

use super::slab::Slab;
use super::{validate, Bdev, BdevRef, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest, Lent, Lower};
use crate::crypto::Xts;
use crate::iobuf::{BufPool, IoBuf};

/// Largest write handed to the device below in one piece.
pub(crate) const BOUNCE_CHUNK: usize = 128 * 1024;

/// Read bytes decrypted per [`Channel::poll`] (at least one request).
/// The rest wait in the channel for the next poll, so the caller can
/// resubmit the first reads of a large completion batch (the ring submits
/// them early, see `Ring::note_payload`) while the others are still being
/// decrypted, instead of the device idling through the whole batch.
pub const DECRYPT_BUDGET: usize = 32 << 10;

/// Largest bounce buffer filled with streaming stores (when the device below
/// reads writes by DMA). Measured on a virtio disk: at 4 KiB streaming halved
/// the encrypted write path's extra CPU per I/O and cut its p99; at 128 KiB it
/// cost IOPS (0.83–0.85 of plain against 0.89–0.96), as the device's copy of
/// a large payload runs faster out of the CPU's cache than out of memory.
pub(crate) const STREAM_MAX: usize = 16 << 10;

pub struct CryptoBdev {
    name: String,
    inner: BdevRef,
    xts: Arc<Xts>,
    sector_size: u32,
    capacity: u64,
}

impl CryptoBdev {
    /// Stack a crypto layer with `xts` on `inner`. `sector_size` is the
    /// encryption sector (512, 1024, 2048 or 4096) and the layer's block size;
    /// it must be a multiple of the lower block size.
    pub fn new(inner: BdevRef, xts: Arc<Xts>, sector_size: u32) -> Result<CryptoBdev, super::StackError> {
        if !crate::crypto::SECTOR_SIZES.contains(&(sector_size as usize)) {
            return Err(super::StackError::SectorSize(sector_size));
        }
        if !sector_size.is_multiple_of(inner.block_size()) {
            return Err(super::StackError::NotMultiple {
                sector_size,
                lower: inner.name().to_owned(),
                block_size: inner.block_size(),
            });
        }
        let capacity = inner.capacity() / sector_size as u64 * sector_size as u64;
        Ok(CryptoBdev {
            name: format!("crypto({})", inner.name()),
            inner,
            xts,
            sector_size,
            capacity,
        })
    }
}

impl Bdev for CryptoBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.sector_size
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    /// Passes through all but `takes_lent`; an unallocated range reads as zeros
    /// through this layer too.
    fn lower(&self) -> Option<&dyn Bdev> {
        Some(&*self.inner)
    }
    fn takes_lent(&self) -> bool {
        true
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(CryptoChannel {
            lower: Lower::new(self.inner.open_channel(ctx)?),
            xts: self.xts.clone(),
            stream: self.inner.dma_writes(),
            pool: ctx.pool.clone(),
            sector_size: self.sector_size as usize,
            shift: self.sector_size.trailing_zeros(),
            capacity: self.capacity,
            max_io: self.max_io_bytes(),
            pending: Slab::default(),
            ready: Vec::new(),
            backlog: VecDeque::new(),
        }))
    }
}

/// A request in flight below. Kept small (56 bytes): it is written on
/// submit and read back on completion of every I/O; the rare error is boxed.
struct Pending {
    tag: u64,
    offset: u64,
    buf: Option<IoBuf>,
    /// A read into frontend memory: decrypted into it on completion.
    lent: Option<Lent>,
    error: Option<Box<IoError>>,
    parts: u32,
    op: IoOp,
    /// A write encrypted in the caller's own (scratch) buffer: the buffer that comes
    /// back from below is the caller's, and goes back up.
    in_place: bool,
}

const _: () = assert!(std::mem::size_of::<Pending>() <= 96);

impl Pending {
    fn new(tag: u64, op: IoOp, offset: u64, parts: usize, buf: Option<IoBuf>) -> Pending {
        Pending {
            tag,
            offset,
            buf,
            lent: None,
            error: None,
            parts: parts as u32,
            op,
            in_place: false,
        }
    }
}

struct CryptoChannel {
    lower: Lower,
    xts: Arc<Xts>,
    /// The device below reads writes by DMA: fill bounce buffers with
    /// streaming stores (`Xts::encrypt_sectors_for_device`).
    stream: bool,
    pool: BufPool,
    sector_size: usize,
    /// log2 of `sector_size` (every supported size is a power of two): sector
    /// numbers by shifting, not dividing.
    shift: u32,
    capacity: u64,
    max_io: u64,
    pending: Slab<Pending>,
    ready: Vec<IoCompletion>,
    /// Completions from below not yet handled (reads not yet decrypted).
    backlog: VecDeque<IoCompletion>,
}

impl CryptoChannel {
    #[inline]
    fn slot(&mut self, p: Pending) -> u64 {
        self.pending.insert(p) as u64
    }

    /// Encrypt `src` (whole sectors at byte `offset` of the device) into
    /// the bounce buffer `dst`.
    fn encrypt_into(&self, src: &[u8], dst: &mut [u8], offset: u64) {
        let s0 = offset >> self.shift;
        if self.stream && dst.len() <= STREAM_MAX {
            self.xts.encrypt_sectors_for_device(src, dst, s0, self.sector_size)
        } else {
            self.xts.encrypt_sectors_to(src, dst, s0, self.sector_size)
        }
        .expect("validated whole sectors");
    }

    /// Encrypt `dst.len()` bytes of lent memory, from byte `from` of it, into
    /// the bounce buffer `dst` (device offset `offset`). Pieces that are whole
    /// sectors go from the frontend's memory straight through the cipher;
    /// a chunk with a piece that is not is gathered first.
    fn encrypt_lent(&self, lent: &Lent, from: usize, dst: &mut [u8], offset: u64) {
        let ss = self.sector_size;
        let mut pieces: smallvec::SmallVec<[(*const u8, usize, usize); 8]> = smallvec::SmallVec::new();
        let mut aligned = true;
        for_pieces(lent, from, dst.len(), |ptr, at, n| {
            aligned &= at % ss == 0 && n % ss == 0;
            pieces.push((ptr as *const u8, at, n));
        });
        if aligned {
            for (ptr, at, n) in pieces {
                // SAFETY: `Lent::new`'s contract: the segment is mapped for the
                // request's life. The frontend's memory (a guest's) may change
                // under us; the cipher reads each byte once and nothing relies
                // on the values.
                let src = unsafe { std::slice::from_raw_parts(ptr, n) };
                self.encrypt_into(src, &mut dst[at..at + n], offset + at as u64);
            }
        } else {
            for (ptr, at, n) in pieces {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(ptr, dst[at..].as_mut_ptr(), n) };
            }
            self.xts
                .encrypt_sectors(dst, offset / ss as u64, ss)
                .expect("validated whole sectors");
        }
    }

    #[inline(always)]
    fn send_down(&mut self, req: IoRequest) {
        self.lower.submit(req);
    }

    /// Handle one completion from below, rewriting it in place into its
    /// request's answer when it was the request's last part (true), so a batch
    /// of answers goes up without being copied one by one.
    fn finish(&mut self, c: &mut IoCompletion) -> bool {
        let idx = c.tag as usize;
        let p = self.pending.get_mut(idx).expect("completion for a live request");
        if p.parts == 1 && p.error.is_none() {
            // Every request but a write over 128 KiB. Building a new completion
            // here costs more than the rest of the bookkeeping: the CPU stalls
            // copying a struct whose fields it has just written.
            match p.op {
                IoOp::Read if p.lent.is_some() => {
                    let lent = p.lent.take().expect("checked");
                    // The pool buffer goes back here; the frontend's memory holds the data.
                    let buf = c.buf.take().expect("read completes with its buffer");
                    if c.result.is_ok() {
                        decrypt_to_lent(&self.xts, &buf, &lent, p.offset >> self.shift, self.sector_size);
                    }
                }
                IoOp::Read => {
                    let buf = c.buf.as_mut().expect("read completes with its buffer");
                    if c.result.is_ok() {
                        decrypt_in_place(&self.xts, buf, p.offset >> self.shift, self.sector_size);
                    } else {
                        // Never hand back ciphertext as if it were data.
                        buf.fill(0);
                    }
                }
                // The caller's buffer (now ciphertext) goes back up as it is.
                IoOp::Write if p.in_place => {}
                // The bounce buffer goes back to the pool; the caller's comes back.
                IoOp::Write => c.buf = p.buf.take(),
                _ => {}
            }
            c.tag = p.tag;
            self.pending.free(idx);
            return true;
        }
        // A part of a write over 128 KiB (or a later part after a failed one).
        if let Err(e) = std::mem::replace(&mut c.result, Ok(())) {
            if p.error.is_none() {
                p.error = Some(Box::new(e));
            }
        }
        match p.op {
            IoOp::Write if p.in_place => p.buf = c.buf.take(),
            // Bounce buffers go back to the pool here.
            _ => drop(c.buf.take()),
        }
        p.parts -= 1;
        if p.parts > 0 {
            return false;
        }
        *c = IoCompletion {
            tag: p.tag,
            op: p.op,
            result: p.error.take().map_or(Ok(()), |e| Err(*e)),
            buf: p.buf.take(),
        };
        self.pending.free(idx);
        true
    }

    /// Bytes of a read completion, charged to the decrypt budget.
    fn read_bytes(c: &IoCompletion) -> usize {
        match (&c.op, &c.buf) {
            (IoOp::Read, Some(b)) => b.len(),
            _ => 0,
        }
    }
}

/// Decrypt whole sectors, leaving all-zero sectors (never written, discarded
/// or zeroed) as zeros. Runs of non-zero sectors go to the engine in one call.
fn decrypt_in_place(xts: &Xts, buf: &mut [u8], first_sector: u64, ss: usize) {
    let n = buf.len() / ss;
    let mut i = 0;
    while i < n {
        if is_zero(&buf[i * ss..(i + 1) * ss]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && !is_zero(&buf[i * ss..(i + 1) * ss]) {
            i += 1;
        }
        xts.decrypt_sectors(&mut buf[start * ss..i * ss], first_sector + start as u64, ss)
            .expect("whole sectors of a supported size");
    }
}

/// Call `f(ptr, at, n)` for each piece of lent memory covering `len` bytes
/// from byte `from`: `ptr` is the piece's start, `at` its position relative
/// to `from`, `n` its length.
fn for_pieces(lent: &Lent, mut from: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
    let mut at = 0;
    for &(ptr, slen) in lent.segments() {
        if at == len {
            break;
        }
        if from >= slen {
            from -= slen;
            continue;
        }
        let n = (slen - from).min(len - at);
        // The pointer arithmetic stays inside the segment (`from < slen`).
        f(ptr.wrapping_add(from), at, n);
        at += n;
        from = 0;
    }
}

/// Decrypt a read's ciphertext `src` into lent memory (all-zero sectors, never
/// written, stay zeros). Whole-sector pieces are decrypted straight into the
/// frontend's memory; otherwise the data is decrypted here and copied.
fn decrypt_to_lent(xts: &Xts, src: &IoBuf, lent: &Lent, first_sector: u64, ss: usize) {
    let mut pieces: smallvec::SmallVec<[(*mut u8, usize, usize); 8]> = smallvec::SmallVec::new();
    let mut aligned = true;
    for_pieces(lent, 0, src.len(), |ptr, at, n| {
        aligned &= at % ss == 0 && n % ss == 0;
        pieces.push((ptr, at, n));
    });
    if !aligned {
        let mut tmp = src.to_vec();
        decrypt_in_place(xts, &mut tmp, first_sector, ss);
        for (ptr, at, n) in pieces {
            // SAFETY: `Lent::new`'s contract: the segment is mapped and ours to
            // write until the request completes.
            unsafe { std::ptr::copy_nonoverlapping(tmp[at..].as_ptr(), ptr, n) };
        }
        return;
    }
    for (ptr, at, n) in pieces {
        // SAFETY: as above; the guest reads the data once the request completes.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
        let mut i = 0;
        while i < n {
            let sec = &src[at + i..at + i + ss];
            if is_zero(sec) {
                dst[i..i + ss].fill(0);
                i += ss;
                continue;
            }
            let start = i;
            while i < n && !is_zero(&src[at + i..at + i + ss]) {
                i += ss;
            }
            xts.decrypt_sectors_to(
                &src[at + start..at + i],
                &mut dst[start..i],
                first_sector + ((at + start) / ss) as u64,
                ss,
            )
            .expect("whole sectors of a supported size");
        }
    }
}

fn is_zero(s: &[u8]) -> bool {
    // Sector sizes are multiples of 8; ciphertext almost always fails on the
    // first word, so this costs one load per encrypted sector.
    s.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0)
}

impl Channel for CryptoChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if let Err(e) = validate(&req, self.sector_size as u32, self.capacity, self.max_io) {
            self.ready.push(IoCompletion {
                tag: req.tag,
                op: req.op,
                result: Err(e),
                buf: req.buf,
            });
            return Ok(());
        }
        match req.op {
            IoOp::Write if req.lent.is_some() => {
                let lent = req.lent.as_ref().expect("checked");
                let len = lent.len();
                let chunks = len.div_ceil(BOUNCE_CHUNK);
                let mut bounces: smallvec::SmallVec<[IoBuf; 4]> = smallvec::SmallVec::new();
                for c in 0..chunks {
                    match self.pool.alloc(BOUNCE_CHUNK.min(len - c * BOUNCE_CHUNK)) {
                        Some(b) => bounces.push(b),
                        None => return Err(req), // back-pressure; nothing done
                    }
                }
                for (c, b) in bounces.iter_mut().enumerate() {
                    let from = c * BOUNCE_CHUNK;
                    self.encrypt_lent(lent, from, b, req.offset + from as u64);
                }
                let (offset, fua) = (req.offset, req.fua);
                let idx = self.slot(Pending::new(req.tag, IoOp::Write, offset, chunks, None));
                for (c, b) in bounces.into_iter().enumerate() {
                    let mut w = IoRequest::write(offset + (c * BOUNCE_CHUNK) as u64, b, idx);
                    w.fua = fua;
                    self.send_down(w);
                }
            }
            IoOp::Write if req.scratch => {
                // The caller's buffer is ours to overwrite: encrypt it in place
                // (its lines are still in cache from being filled) and send it
                // down as it is; no bounce buffer.
                let (tag, offset, fua) = (req.tag, req.offset, req.fua);
                let mut b = req.buf.expect("validated");
                self.xts
                    .encrypt_sectors(&mut b, offset >> self.shift, self.sector_size)
                    .expect("validated whole sectors");
                let idx = self.pending.insert_with(|| Pending {
                    in_place: true,
                    ..Pending::new(tag, IoOp::Write, offset, 1, None)
                }) as u64;
                let mut w = IoRequest::write(offset, b, idx);
                w.fua = fua;
                self.send_down(w);
            }
            IoOp::Read if req.lent.is_some() => {
                let Some(mut b) = self.pool.alloc(req.bytes() as usize) else {
                    return Err(req); // back-pressure; nothing done
                };
                b.set_len(req.bytes() as usize);
                let mut p = Pending::new(req.tag, IoOp::Read, req.offset, 1, None);
                p.lent = req.lent;
                let idx = self.slot(p);
                self.send_down(IoRequest::read(req.offset, b, idx));
            }
            IoOp::Write if req.bytes() as usize <= BOUNCE_CHUNK => {
                // One piece (every write up to 128 KiB): no chunk loop.
                let src = req.buf.as_ref().expect("validated");
                let Some(mut b) = self.pool.alloc(src.len()) else {
                    return Err(req); // back-pressure; nothing done
                };
                self.encrypt_into(src, &mut b, req.offset);
                let (tag, offset, fua) = (req.tag, req.offset, req.fua);
                let user = req.buf;
                // Built in its slot, not moved in: ~6 ns per write (measured over `null`).
                let idx = self
                    .pending
                    .insert_with(|| Pending::new(tag, IoOp::Write, offset, 1, user)) as u64;
                let mut w = IoRequest::write(offset, b, idx);
                w.fua = fua;
                self.send_down(w);
            }
            IoOp::Write => {
                // Over 128 KiB: one bounce buffer and one write below per piece.
                let src = req.buf.as_ref().expect("validated");
                let len = src.len();
                let chunks = len.div_ceil(BOUNCE_CHUNK);
                // At most MAX_IO_BYTES / BOUNCE_CHUNK = 4 pieces: kept inline, no heap allocation.
                let mut bounces: smallvec::SmallVec<[IoBuf; 4]> = smallvec::SmallVec::new();
                for c in 0..chunks {
                    let clen = BOUNCE_CHUNK.min(len - c * BOUNCE_CHUNK);
                    match self.pool.alloc(clen) {
                        Some(b) => bounces.push(b),
                        None => return Err(req), // back-pressure; nothing done
                    }
                }
                for (c, b) in bounces.iter_mut().enumerate() {
                    let from = c * BOUNCE_CHUNK;
                    self.encrypt_into(&src[from..from + b.len()], b, req.offset + from as u64);
                }
                let (offset, fua) = (req.offset, req.fua);
                let idx = self.slot(Pending::new(req.tag, IoOp::Write, offset, chunks, req.buf));
                for (c, b) in bounces.into_iter().enumerate() {
                    let mut w = IoRequest::write(offset + (c * BOUNCE_CHUNK) as u64, b, idx);
                    w.fua = fua;
                    self.send_down(w);
                }
            }
            IoOp::Read => {
                let idx = self.slot(Pending::new(req.tag, IoOp::Read, req.offset, 1, None));
                let buf = req.buf.expect("validated");
                self.send_down(IoRequest::read(req.offset, buf, idx));
            }
            IoOp::Flush | IoOp::Unmap | IoOp::WriteZeroes => {
                let idx = self.slot(Pending::new(req.tag, req.op, req.offset, 1, None));
                self.send_down(IoRequest {
                    op: req.op,
                    offset: req.offset,
                    len: req.len,
                    buf: None,
                    lent: None,
                    scratch: false,
                    fua: req.fua,
                    tag: idx,
                });
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let before = out.len();
        // Requests refused at submit (invalid) first.
        out.append(&mut self.ready);
        let mut budget = DECRYPT_BUDGET;
        // Older completions first; new ones go straight through while the
        // budget lasts and wait in the backlog after that.
        let mut spent = false;
        while !spent {
            let Some(mut c) = self.backlog.pop_front() else { break };
            let bytes = Self::read_bytes(&c);
            if self.finish(&mut c) {
                out.push(c);
            }
            spent = bytes >= budget;
            budget = budget.saturating_sub(bytes);
        }
        let mut comps = self.lower.poll();
        // New completions become answers where they lie; those of finished
        // requests are packed at the front.
        let (mut i, mut answers) = (0, 0);
        while i < comps.len() && !spent {
            let bytes = Self::read_bytes(&comps[i]);
            if self.finish(&mut comps[i]) {
                if answers != i {
                    comps.swap(answers, i);
                }
                answers += 1;
            }
            spent = bytes >= budget;
            budget = budget.saturating_sub(bytes);
            i += 1;
        }
        self.backlog.extend(comps.drain(i..));
        comps.truncate(answers);
        if out.is_empty() {
            std::mem::swap(out, &mut comps);
        } else {
            out.append(&mut comps);
        }
        self.lower.recycle(comps);
        out.len() - before
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }
}
