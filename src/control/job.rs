//! Drive a bdev from the control plane without blocking a reactor: a list of reads,
//! writes and flushes runs as a poller on a reactor, up to [`QUEUE_DEPTH`] in flight,
//! and the calling (control-plane) thread waits for the result. CreateEncryptedCopy and
//! ExportImage move their data this way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::bdev::{BdevRef, Channel, IoCompletion, IoError, IoRequest};
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
                ch: None,
                ops,
                next: 0,
                inflight: 0,
                pending: None,
                data,
                err: None,
                cancel: c,
                reply: Some(tx),
                done: Vec::new(),
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
    ch: Option<Box<dyn Channel>>,
    ops: Vec<Op>,
    next: usize,
    inflight: usize,
    /// A request the channel handed back (back-pressure), to submit again.
    pending: Option<IoRequest>,
    data: Vec<u8>,
    err: Option<JobError>,
    cancel: Arc<AtomicBool>,
    reply: Option<mpsc::SyncSender<Result<Vec<u8>, JobError>>>,
    done: Vec<IoCompletion>,
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
        self.ch = None;
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
        let mut ch = match self.ch.take() {
            Some(c) => c,
            None => match self.bdev.open_channel(&ctx.chan) {
                Ok(c) => c,
                Err(e) => {
                    self.err = Some(JobError::Other(format!("opening a channel: {e}")));
                    return self.finish();
                }
            },
        };
        let mut work = 0;
        let (mut ios, mut bytes) = (0u64, 0u64);
        ch.poll(&mut self.done);
        for c in std::mem::take(&mut self.done) {
            work += 1;
            self.inflight -= 1;
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
        if ios > 0 {
            ctx.stats.add_ios(crate::reactor::IoSource::Job, ios, bytes);
        }
        if self.cancel.load(Ordering::Acquire) && self.err.is_none() {
            self.err = Some(JobError::Other("cancelled".into()));
        }
        while self.err.is_none() && self.inflight < QUEUE_DEPTH {
            let req = match self.pending.take() {
                Some(r) => r,
                None if self.next < self.ops.len() => match self.request(ctx, self.next) {
                    Some(r) => {
                        self.next += 1;
                        r
                    }
                    None => break, // no buffer free: back-pressure, retry on the next poll
                },
                None => break,
            };
            match ch.submit(req) {
                Ok(()) => {
                    self.inflight += 1;
                    work += 1;
                }
                Err(r) => {
                    self.pending = Some(r);
                    break;
                }
            }
        }
        self.ch = Some(ch);
        let all_sent = self.next == self.ops.len() && self.pending.is_none();
        if self.inflight == 0 && (self.err.is_some() || all_sent) {
            self.pending = None;
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
