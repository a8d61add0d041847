//! One benchmark job: a poller on a reactor that keeps `iodepth` requests in
//! flight on its own bdev channel (closed loop), like a fio job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::fio::JobSpec;
use super::BenchError;
use crate::bdev::{Channel, IoCompletion, IoOp, IoQueue, IoRequest};
use crate::iobuf::IoBuf;
use crate::reactor::{Poll, Poller, ReactorCtx};

/// Per-direction results.
#[derive(Debug, Clone)]
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    /// Completion latency (submit to completion), nanoseconds.
    pub clat: Histogram<u64>,
}

impl Default for DirStats {
    fn default() -> Self {
        DirStats {
            ios: 0,
            bytes: 0,
            clat: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds"),
        }
    }
}

impl DirStats {
    fn record(&mut self, bytes: u64, ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        let _ = self.clat.record(ns.max(1));
    }
    pub fn merge(&mut self, o: &DirStats) {
        self.ios += o.ios;
        self.bytes += o.bytes;
        let _ = self.clat.add(&o.clat);
    }
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub(crate) struct JobResult {
    pub reactor: usize,
    pub read: DirStats,
    pub write: DirStats,
    /// Length of the measured phase (after ramp).
    pub runtime: Duration,
    pub error: Option<String>,
    pub verified_blocks: u64,
    pub verify_errors: u64,
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub ios: AtomicU64,
    pub bytes: AtomicU64,
}

/// The progress line a run prints on stderr about once a second, rewritten in place
/// (`\r`) on a terminal.
pub(crate) struct ProgressLine {
    label: String,
    tty: bool,
    t0: Instant,
    last_ios: u64,
    last_t: Instant,
}

impl ProgressLine {
    /// A line for the run `label` that began at `t0`; `enabled`: the caller prints it.
    pub(crate) fn new(label: &str, t0: Instant, enabled: bool) -> ProgressLine {
        ProgressLine {
            label: label.to_owned(),
            tty: enabled && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            t0,
            last_ios: 0,
            last_t: Instant::now(),
        }
    }

    /// Time since the last line (or since the line was made).
    pub(crate) fn since_last(&self) -> Duration {
        self.last_t.elapsed()
    }

    /// Prints the counts of `p`, with the rate since the last line.
    pub(crate) fn print(&mut self, p: &Progress) {
        let ios = p.ios.load(Ordering::Relaxed);
        let bytes = p.bytes.load(Ordering::Relaxed);
        let line = format!(
            "[{}] {:>6.1}s  {:>9.0} IOPS  {:>8.1} MiB total",
            self.label,
            self.t0.elapsed().as_secs_f64(),
            (ios - self.last_ios) as f64 / self.last_t.elapsed().as_secs_f64(),
            bytes as f64 / 1048576.0
        );
        if self.tty {
            eprint!("\r{line}  ");
        } else {
            eprintln!("{line}");
        }
        (self.last_ios, self.last_t) = (ios, Instant::now());
    }

    /// Ends a line rewritten in place.
    pub(crate) fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ramp,
    Run,
    /// No new main-phase I/O; waiting for in-flight to finish.
    Drain,
    Verify,
    Done,
}

const VERIFY_MAGIC: u32 = 0x5344_5631; // "SDV1"

/// Fill a block for `verify=crc32c`: magic, offset, crc32c of the rest, then
/// pseudo-random bytes derived from the offset and `seed`.
pub fn fill_verify_block(block: &mut [u8], offset: u64, seed: u64) {
    let mut x = offset ^ seed ^ 0x9e37_79b9_7f4a_7c15;
    for w in block[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    block[0..4].copy_from_slice(&VERIFY_MAGIC.to_le_bytes());
    block[4..12].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&block[16..]), &offset.to_le_bytes());
    block[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// fio's `scramble_buffers`: write `offset` and `stamp` into the first 16
/// bytes of every 512-byte piece of `buf` (fio stamps each piece too).
pub(crate) fn scramble(buf: &mut [u8], offset: u64, stamp: u64) {
    for (i, piece) in buf.chunks_mut(512).enumerate() {
        if piece.len() >= 16 {
            piece[..8].copy_from_slice(&(offset + 512 * i as u64).to_le_bytes());
            piece[8..16].copy_from_slice(&stamp.to_le_bytes());
        }
    }
}

/// fio's `refill_buffers`: overwrite `buf` with fresh pseudo-random bytes
/// from `state` (four interleaved xorshift64 streams, so the loop is not one
/// serial dependency chain).
pub(crate) fn refill(buf: &mut [u8], state: &mut [u64; 4]) {
    for chunk in buf.chunks_mut(32) {
        let mut out = [0u8; 32];
        for (lane, x) in state.iter_mut().enumerate() {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            out[lane * 8..lane * 8 + 8].copy_from_slice(&x.to_le_bytes());
        }
        chunk.copy_from_slice(&out[..chunk.len()]);
    }
}

/// A block that fails [`check_verify_block`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("verify: bad magic {magic:#x} in block at offset {offset}")]
    BadMagic { magic: u32, offset: u64 },
    #[error("verify: block at offset {offset} holds the data of offset {holds}")]
    Misplaced { offset: u64, holds: u64 },
    #[error("verify: crc32c mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { offset: u64, stored: u32, computed: u32 },
}

/// Check a block written by [`fill_verify_block`] at `offset`.
pub fn check_verify_block(block: &[u8], offset: u64) -> Result<(), VerifyError> {
    let magic = u32::from_le_bytes(block[0..4].try_into().unwrap());
    let off = u64::from_le_bytes(block[4..12].try_into().unwrap());
    let crc = u32::from_le_bytes(block[12..16].try_into().unwrap());
    if magic != VERIFY_MAGIC {
        return Err(VerifyError::BadMagic { magic, offset });
    }
    if off != offset {
        return Err(VerifyError::Misplaced { offset, holds: off });
    }
    let want = crc32c::crc32c_append(crc32c::crc32c(&block[16..]), &offset.to_le_bytes());
    if want != crc {
        return Err(VerifyError::Crc {
            offset,
            stored: crc,
            computed: want,
        });
    }
    Ok(())
}

struct Slot {
    buf: Option<IoBuf>,
    start: Instant,
    offset: u64,
    verify_read: bool,
}

/// The job poller.
pub(crate) struct Job {
    spec: JobSpec,
    reactor: usize,
    /// The job's channel; a request it refuses waits there and goes first.
    q: IoQueue,
    region_start: u64,
    region_blocks: u64,
    slots: Vec<Slot>,
    free: Vec<usize>,
    rng: u64,
    /// Writes scrambled so far (the stamp of the next).
    scrambles: u64,
    /// State of the `refill_buffers` generator.
    refill: [u64; 4],
    seq_next: u64,
    seed: u64,
    read_pct: u32,
    phase: Phase,
    started: Instant,
    run_start: Instant,
    run_end: Option<Instant>,
    deadline: Option<Instant>,
    issued_bytes: u64,
    size_limit: u64,
    read: DirStats,
    write: DirStats,
    written: Vec<u64>,
    verify_cursor: u64,
    verified: u64,
    verify_errors: u64,
    error: Option<String>,
    progress: Arc<Progress>,
    abort: Arc<AtomicBool>,
    done: Option<Sender<JobResult>>,
}

impl Job {
    /// A job over `[offset, offset+size)` of the device behind `chan`
    /// (`capacity` bytes). Buffers come from the reactor's pool.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        spec: JobSpec,
        index: u32,
        ctx: &ReactorCtx,
        chan: Box<dyn Channel>,
        capacity: u64,
        progress: Arc<Progress>,
        abort: Arc<AtomicBool>,
        done: Sender<JobResult>,
    ) -> Result<Job, BenchError> {
        let bs = spec.bs;
        if !spec.offset.is_multiple_of(bs) {
            return Err(BenchError::Refused(format!(
                "offset={} is not a multiple of bs={bs}",
                spec.offset
            )));
        }
        if spec.offset >= capacity {
            return Err(BenchError::Refused(format!(
                "offset={} is past the end of the device ({capacity} bytes)",
                spec.offset
            )));
        }
        let len = spec.size.unwrap_or(capacity - spec.offset).min(capacity - spec.offset);
        let region_blocks = len / bs;
        if region_blocks == 0 {
            return Err(BenchError::Refused(format!("size={len} is smaller than bs={bs}")));
        }
        let mut slots = Vec::new();
        let seed = 0x5ea1_d15c_0000_0001u64.wrapping_mul(index as u64 + 1) ^ ctx.id as u64;
        let mut x = seed | 1;
        for _ in 0..spec.iodepth {
            let mut b = ctx.chan.pool.alloc(bs as usize).ok_or_else(|| {
                BenchError::Refused(format!(
                    "reactor {} has no buffer space for iodepth={} x bs={bs}",
                    ctx.id, spec.iodepth
                ))
            })?;
            for w in b.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            slots.push(Slot {
                buf: Some(b),
                start: Instant::now(),
                offset: 0,
                verify_read: false,
            });
        }
        let now = Instant::now();
        let read_pct = spec.rw.read_pct(spec.rwmixread);
        let writes = read_pct < 100;
        Ok(Job {
            reactor: ctx.id,
            q: IoQueue::new(chan),
            region_start: spec.offset,
            region_blocks,
            free: (0..slots.len()).rev().collect(),
            slots,
            rng: seed ^ 0xdead_beef,
            scrambles: seed << 20,
            refill: std::array::from_fn(|i| (seed ^ 0x9e37_79b9_7f4a_7c15).rotate_left(16 * i as u32) | 1),
            seq_next: 0,
            seed,
            read_pct,
            phase: if spec.verify_only {
                Phase::Verify
            } else if spec.ramp_time.is_zero() {
                Phase::Run
            } else {
                Phase::Ramp
            },
            started: now,
            run_start: now,
            run_end: None,
            deadline: spec.runtime.map(|r| now + spec.ramp_time + r),
            issued_bytes: 0,
            size_limit: if spec.time_based { u64::MAX } else { region_blocks * bs },
            read: DirStats::default(),
            write: DirStats::default(),
            written: if spec.verify && writes {
                vec![0; region_blocks.div_ceil(64) as usize]
            } else {
                Vec::new()
            },
            verify_cursor: 0,
            verified: 0,
            verify_errors: 0,
            error: None,
            progress,
            abort,
            done: Some(done),
            spec,
        })
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn next_block(&mut self) -> u64 {
        if self.spec.rw.is_random() {
            self.next_rand() % self.region_blocks
        } else {
            let b = self.seq_next;
            self.seq_next = (self.seq_next + 1) % self.region_blocks;
            b
        }
    }

    fn mark_written(&mut self, block: u64) {
        if let Some(w) = self.written.get_mut((block / 64) as usize) {
            *w |= 1 << (block % 64);
        }
    }

    fn next_verify_block(&mut self) -> Option<u64> {
        while self.verify_cursor < self.region_blocks {
            let b = self.verify_cursor;
            self.verify_cursor += 1;
            if self.spec.verify_only || self.written[(b / 64) as usize] & (1 << (b % 64)) != 0 {
                return Some(b);
            }
        }
        None
    }

    fn fail(&mut self, e: String) {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self.phase = Phase::Drain;
    }

    fn handle(&mut self, c: IoCompletion, now: Instant) {
        let slot = c.tag as usize;
        let ns = now.duration_since(self.slots[slot].start).as_nanos() as u64;
        let offset = self.slots[slot].offset;
        let verify_read = self.slots[slot].verify_read;
        let buf = c.buf.expect("reads and writes return their buffer");
        let bytes = buf.len() as u64;
        if let Err(e) = c.result {
            self.fail(format!("{:?} at offset {offset}: {e}", c.op));
        } else if verify_read {
            self.verified += 1;
            if let Err(e) = check_verify_block(&buf, offset) {
                self.verify_errors += 1;
                if self.error.is_none() {
                    self.error = Some(e.to_string());
                }
            }
        } else {
            if self.phase != Phase::Ramp {
                match c.op {
                    IoOp::Read => self.read.record(bytes, ns),
                    _ => self.write.record(bytes, ns),
                }
            }
            self.progress.ios.fetch_add(1, Ordering::Relaxed);
            self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        self.slots[slot].buf = Some(buf);
        self.free.push(slot);
    }

    /// Build the next request for a free slot, or None when the phase has
    /// nothing more to issue.
    fn next_request(&mut self, slot: usize) -> Option<IoRequest> {
        let bs = self.spec.bs;
        match self.phase {
            Phase::Ramp | Phase::Run => {
                if self.phase == Phase::Run && self.issued_bytes >= self.size_limit {
                    return None;
                }
                let block = self.next_block();
                let offset = self.region_start + block * bs;
                let is_read =
                    self.read_pct == 100 || (self.read_pct > 0 && (self.next_rand() % 100) < self.read_pct as u64);
                let mut buf = self.slots[slot].buf.take().expect("free slot has its buffer");
                if !is_read && self.spec.verify {
                    fill_verify_block(&mut buf, offset, self.seed);
                    self.mark_written(block);
                } else if !is_read && self.spec.refill_buffers {
                    refill(&mut buf, &mut self.refill);
                } else if !is_read && self.spec.scramble_buffers {
                    self.scrambles += 1;
                    scramble(&mut buf, offset, self.scrambles);
                }
                self.issued_bytes += bs;
                self.slots[slot].offset = offset;
                self.slots[slot].verify_read = false;
                Some(if is_read {
                    IoRequest::read(offset, buf, slot as u64)
                } else {
                    let mut w = IoRequest::write(offset, buf, slot as u64);
                    w.scratch = self.spec.inplace;
                    w
                })
            }
            Phase::Verify => {
                let block = self.next_verify_block()?;
                let offset = self.region_start + block * bs;
                let buf = self.slots[slot].buf.take().expect("free slot has its buffer");
                self.slots[slot].offset = offset;
                self.slots[slot].verify_read = true;
                Some(IoRequest::read(offset, buf, slot as u64))
            }
            Phase::Drain | Phase::Done => None,
        }
    }

    fn advance_phase(&mut self, now: Instant) {
        if self.abort.load(Ordering::Relaxed) && matches!(self.phase, Phase::Ramp | Phase::Run | Phase::Verify) {
            self.phase = Phase::Drain;
        }
        if self.phase == Phase::Ramp && now.duration_since(self.started) >= self.spec.ramp_time {
            self.phase = Phase::Run;
            self.run_start = now;
            self.read = DirStats::default();
            self.write = DirStats::default();
            self.issued_bytes = 0;
        }
        if self.phase == Phase::Run {
            let timed_out = self.deadline.is_some_and(|d| now >= d);
            if timed_out || self.issued_bytes >= self.size_limit {
                self.phase = Phase::Drain;
            }
        }
        let idle = self.q.in_flight() == 0;
        if self.phase == Phase::Drain && idle {
            if self.run_end.is_none() {
                self.run_end = Some(now);
            }
            let verify = !self.written.is_empty() && self.error.is_none() && !self.abort.load(Ordering::Relaxed);
            self.phase = if verify && self.verify_cursor == 0 {
                Phase::Verify
            } else {
                Phase::Done
            };
        } else if self.phase == Phase::Verify && idle && self.verify_cursor >= self.region_blocks {
            if self.run_end.is_none() {
                self.run_end = Some(now);
            }
            self.phase = Phase::Done;
        }
    }

    fn finish(&mut self) {
        let end = self.run_end.unwrap_or_else(Instant::now);
        let result = JobResult {
            reactor: self.reactor,
            read: std::mem::take(&mut self.read),
            write: std::mem::take(&mut self.write),
            runtime: end.duration_since(self.run_start),
            error: self.error.take(),
            verified_blocks: self.verified,
            verify_errors: self.verify_errors,
        };
        if let Some(tx) = self.done.take() {
            let _ = tx.send(result);
        }
    }
}

impl Poller for Job {
    fn poll(&mut self, ctx: &ReactorCtx) -> Poll {
        let mut work = 0;
        let was_blocked = self.q.is_blocked();
        let mut comps = self.q.reap();
        if !comps.is_empty() {
            let now = Instant::now();
            for c in comps.drain(..) {
                let bytes = c.buf.as_ref().map_or(0, |b| b.len() as u64);
                ctx.stats.add_io(crate::reactor::IoSource::Bench, bytes);
                self.handle(c, now);
                work += 1;
            }
        }
        self.q.recycle(comps);
        let now = Instant::now();
        self.advance_phase(now);
        if self.q.is_blocked() {
            // Still refused: nothing new until the held request goes.
            return if work > 0 { Poll::Busy(work) } else { Poll::Idle };
        }
        if was_blocked {
            work += 1;
        }
        while let Some(slot) = self.free.pop() {
            let Some(req) = self.next_request(slot) else {
                self.free.push(slot);
                break;
            };
            self.slots[slot].start = now;
            // The loop runs only while nothing is held, so the queue takes it.
            if self.q.submit(req).is_err() {
                unreachable!("submit while a request is held");
            }
            if self.q.is_blocked() {
                // Back-pressure: the queue holds it and resends it on the next poll.
                break;
            }
            work += 1;
        }
        self.advance_phase(now);
        if self.phase == Phase::Done {
            self.finish();
            return Poll::Done;
        }
        if work > 0 {
            Poll::Busy(work)
        } else {
            Poll::Idle
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // A job dropped by a stopping reactor still reports.
        if self.done.is_some() {
            if self.error.is_none() && self.phase != Phase::Done {
                self.error = Some("job stopped before it finished (reactor shut down)".into());
            }
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{refill, scramble};

    #[test]
    fn refill_rewrites_every_byte_with_fresh_data() {
        let mut state = [1, 2, 3, 4];
        let mut a = vec![0u8; 4096];
        refill(&mut a, &mut state);
        let mut b = a.clone();
        refill(&mut b, &mut state);
        // No 32-byte piece repeats, within a buffer or between two refills.
        let mut seen = std::collections::HashSet::new();
        for piece in a.chunks(32).chain(b.chunks(32)) {
            assert!(seen.insert(piece.to_vec()), "a 32-byte piece repeated");
        }
        // Byte values are spread out (not mostly zeros or one value).
        let zeros = a.iter().filter(|&&x| x == 0).count();
        assert!(zeros < 64, "{zeros} zero bytes in 4096");
        // Odd lengths are filled to the end.
        let mut c = vec![0u8; 100];
        refill(&mut c, &mut state);
        assert!(c[96..].iter().any(|&x| x != 0));
    }

    #[test]
    fn scramble_stamps_every_512_byte_piece_and_no_two_writes_match() {
        let orig: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut a = orig.clone();
        scramble(&mut a, 8192, 1);
        let mut b = a.clone();
        scramble(&mut b, 8192, 2);
        assert_ne!(a, b);
        for (i, piece) in a.chunks(512).enumerate() {
            assert_eq!(piece[..8], (8192 + 512 * i as u64).to_le_bytes());
            assert_eq!(piece[8..16], 1u64.to_le_bytes());
            assert_eq!(piece[16..], orig[512 * i + 16..512 * (i + 1)]);
        }
    }
}
