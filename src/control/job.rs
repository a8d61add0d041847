//! Drive a bdev from the control plane without blocking a reactor: a list of reads,
//! writes and flushes runs as a poller on a reactor, up to [`QUEUE_DEPTH`] in flight,
//! and the calling (control-plane) thread waits for the result. CreateEncryptedCopy and
//! ExportImage move their data this way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::bdev::{BdevRef, IoError, IoQueue, IoRequest};
use crate::reactor::{Poll, Poller, ReactorCtx, Reactors};

/// Largest single read of a job built by [`read_ops`].
const READ_PIECE: u64 = 256 << 10;
/// Requests in flight per job.
pub(super) const QUEUE_DEPTH: usize = 32;
/// A job that takes longer than this fails.
pub(super) const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an I/O job failed.
#[derive(Debug)]
pub(super) enum JobError {
    Io(IoError),
    Other(String),
}

/// One request of a job; `at..at+len` is its place in the job's buffer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op {
    Read { offset: u64, at: usize, len: usize },
    Write { offset: u64, at: usize, len: usize },
    Flush,
}

/// Runs `ops` against `bdev` as a poller on a reactor (never blocking it), up to
/// [`QUEUE_DEPTH`] at a time; writes take their bytes from `data`, reads fill it.
/// Returns `data`.
pub(super) fn run_job(reactors: &Reactors, bdev: &BdevRef, ops: Vec<Op>, data: Vec<u8>) -> Result<Vec<u8>, JobError> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let r = NEXT.fetch_add(1, Ordering::Relaxed) % reactors.len().max(1);
    let (tx, rx) = mpsc::sync_channel(1);
    let cancel = Arc::new(AtomicBool::new(false));
    let (b, c) = (bdev.clone(), cancel.clone());
    reactors
        .call(r, Duration::from_secs(10), move |ctx: &mut ReactorCtx| {
            ctx.add_poller(Box::new(Job {
                bdev: b,
                q: None,
                ops,
                next: 0,
                data,
                err: None,
                cancel: c,
                reply: Some(tx),
            }))
        })
        .map_err(|e| JobError::Other(e.to_string()))?;
    match rx.recv_timeout(JOB_TIMEOUT) {
        Ok(r) => r,
        Err(_) => {
            cancel.store(true, Ordering::Release);
            // Let the poller drain and drop its channel before the caller cleans up.
            let _ = rx.recv_timeout(Duration::from_secs(10));
            Err(JobError::Other(format!("I/O did not complete within {JOB_TIMEOUT:?}")))
        }
    }
}

struct Job {
    bdev: BdevRef,
    /// The channel, opened on the reactor at the first poll.
    q: Option<IoQueue>,
    ops: Vec<Op>,
    next: usize,
    data: Vec<u8>,
    err: Option<JobError>,
    cancel: Arc<AtomicBool>,
    reply: Option<mpsc::SyncSender<Result<Vec<u8>, JobError>>>,
}

impl Job {
    fn request(&self, ctx: &ReactorCtx, i: usize) -> Option<IoRequest> {
        Some(match self.ops[i] {
            Op::Read { offset, len, .. } => {
                let mut b = ctx.chan.pool.alloc(len)?;
                b.set_len(len);
                IoRequest::read(offset, b, i as u64)
            }
            Op::Write { offset, at, len } => {
                let mut b = ctx.chan.pool.alloc(len)?;
                b.set_len(len);
                b.copy_from_slice(&self.data[at..at + len]);
                IoRequest::write(offset, b, i as u64)
            }
            Op::Flush => IoRequest::flush(i as u64),
        })
    }

    fn finish(&mut self) -> Poll {
        self.q = None;
        let res = match self.err.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut self.data)),
        };
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(res);
        }
        Poll::Done
    }
}

impl Poller for Job {
    fn poll(&mut self, ctx: &ReactorCtx) -> Poll {
        let mut q = match self.q.take() {
            Some(q) => q,
            None => match self.bdev.open_channel(&ctx.chan) {
                Ok(c) => IoQueue::new(c),
                Err(e) => {
                    self.err = Some(JobError::Other(format!("opening a channel: {e}")));
                    return self.finish();
                }
            },
        };
        let mut work = 0;
        let (mut ios, mut bytes) = (0u64, 0u64);
        let was_blocked = q.is_blocked();
        let mut done = q.reap();
        if was_blocked && !q.is_blocked() {
            work += 1;
        }
        for c in done.drain(..) {
            work += 1;
            ios += 1;
            bytes += match self.ops.get(c.tag as usize) {
                Some(&Op::Read { len, .. } | &Op::Write { len, .. }) => len as u64,
                _ => 0,
            };
            match (c.result, self.ops.get(c.tag as usize)) {
                (Err(e), _) => {
                    self.err.get_or_insert(JobError::Io(e));
                }
                (Ok(()), Some(&Op::Read { at, len, .. })) => match &c.buf {
                    Some(b) if b.len() >= len => self.data[at..at + len].copy_from_slice(&b[..len]),
                    _ => {
                        self.err
                            .get_or_insert(JobError::Other("a read returned no data".into()));
                    }
                },
                (Ok(()), _) => {}
            }
        }
        q.recycle(done);
        if ios > 0 {
            ctx.stats.add_ios(crate::reactor::IoSource::Job, ios, bytes);
        }
        if self.cancel.load(Ordering::Acquire) && self.err.is_none() {
            self.err = Some(JobError::Other("cancelled".into()));
        }
        if self.err.is_some() {
            // Nothing more goes down after a failure.
            drop(q.take_held());
        }
        while self.err.is_none() && q.in_flight() < QUEUE_DEPTH && !q.is_blocked() && self.next < self.ops.len() {
            let Some(req) = self.request(ctx, self.next) else {
                break; // no buffer free: back-pressure, retry on the next poll
            };
            self.next += 1;
            // The loop runs only while nothing is held, so the queue takes it.
            if q.submit(req).is_err() {
                unreachable!("submit while a request is held");
            }
            if q.is_blocked() {
                break; // held (back-pressure): resent first on the next poll
            }
            work += 1;
        }
        let idle = q.in_flight() == 0;
        self.q = Some(q);
        if idle && (self.err.is_some() || self.next == self.ops.len()) {
            return self.finish();
        }
        if work > 0 {
            Poll::Busy(work)
        } else {
            Poll::Idle
        }
    }
}

/// Reads of `len` bytes at `off`, in pieces, filling a job buffer of `len` bytes.
pub(super) fn read_ops(off: u64, len: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = READ_PIECE.min(len - pos);
        ops.push(Op::Read {
            offset: off + pos,
            at: pos as usize,
            len: n as usize,
        });
        pos += n;
    }
    ops
}
