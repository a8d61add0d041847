//! The task of a migration: the copy (readers, writers, checkpoints), verify, and the
//! transaction that finishes it.

use std::collections::BTreeMap;
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::verify::verify_blocks;
use super::{Msg, Run, Source, Stats, BLOCK, CHECKPOINT_EVERY, PIECE, READERS, WINDOW, WRITERS};
use crate::bdev::BdevRef;
use crate::catalog::{self, DiskKind, DiskRecord, DiskRole, MigrationRecord};
use crate::control::copy::{io_error, nonzero_runs};
use crate::control::job::{run_job, Op};
use crate::control::tasks::Task;
use crate::control::{Control, ControlError};
use crate::reactor::Reactors;
use crate::volume::VolumeError;

impl Control {
    /// Steps 4 to 6, on the task's thread.
    pub(super) fn run_migration(
        &self,
        task: &Task,
        rec: MigrationRecord,
        run: Run,
        reactors: &Reactors,
    ) -> Result<Value, ControlError> {
        let started = Instant::now();
        let Run {
            mut source,
            dst,
            verify,
            resumed_from,
        } = run;
        let rounded = rec.source_size.div_ceil(BLOCK) * BLOCK;
        let size = rec.source_size;
        let mut st = Stats {
            read: rec.bytes_read,
            written: rec.bytes_written,
        };
        let mut offset = rec.offset;
        let key = rec.key.clone();
        // 4. Copy.
        let copied = self.copy_windows(task, &rec, reactors, &mut source, &dst, &mut st, &mut offset);
        if let Err(e) = copied {
            if !task.cancelled() {
                tracing::warn!(
                    source = %rec.source,
                    target = %rec.target,
                    offset,
                    error = %e,
                    "migration stopped; MigrateDisk with the same source and target resumes it"
                );
            }
            return Err(e);
        }
        run_job(reactors, &dst, vec![Op::Flush], Vec::new()).map_err(|e| io_error(e, "flushing the target"))?;
        self.checkpoint(reactors, &dst, &key, rounded, st)?;
        let copy_secs = started.elapsed().as_secs_f64();

        // 5. Verify.
        let verified = if verify {
            let t = Instant::now();
            let target_ranges = self.pool.allocated_ranges(&rec.target, WINDOW)?;
            verify_blocks(
                reactors,
                &mut source,
                &dst,
                &target_ranges,
                rounded,
                size,
                &|| task.cancelled(),
                &|n| task.progress(n),
            )?;
            Some(t.elapsed().as_secs_f64())
        } else {
            None
        };
        drop(source);
        drop(dst);

        // 6. Finish.
        self.finish_migration(&rec)?;
        let allocated = self.pool.mapped_bytes(&rec.target).unwrap_or(0);
        let secs = started.elapsed().as_secs_f64();
        let mut v = super::summary(&rec, resumed_from);
        let more = json!({
            "BytesRead": st.read,
            "BytesWritten": st.written,
            "BytesSkipped": rounded.saturating_sub(st.written),
            "TargetAllocatedBytes": allocated,
            "CopySeconds": copy_secs,
            "Seconds": secs,
            "Verify": if verified.is_some() { "passed" } else { "off" },
            "VerifySeconds": verified,
        });
        if let (Some(v), Value::Object(more)) = (v.as_object_mut(), more) {
            v.extend(more);
        }
        Ok(v)
    }

    /// Step 4, from `offset` on: reader threads read windows ahead (reader i the i-th of
    /// every READERS windows, each over its own source handle: a second NBD connection, a
    /// second descriptor of the file), writer threads write, this thread keeps the order
    /// of finished windows for the checkpoint ([`Order`]). `st` and `offset` end where the
    /// copy got to (checkpointed if it was interrupted).
    #[allow(clippy::too_many_arguments)]
    fn copy_windows(
        &self,
        task: &Task,
        rec: &MigrationRecord,
        reactors: &Reactors,
        source: &mut Source,
        dst: &BdevRef,
        st_out: &mut Stats,
        offset_out: &mut u64,
    ) -> Result<(), ControlError> {
        let rounded = rec.source_size.div_ceil(BLOCK) * BLOCK;
        let size = rec.source_size;
        let key = rec.key.as_str();
        let mut readers = Vec::new();
        for _ in 1..READERS {
            match source.try_clone() {
                Ok(s) => readers.push(s),
                Err(_) => break, // one stream then
            }
        }
        let (wtx, wrx) = mpsc::sync_channel::<(u64, Vec<u8>)>(WRITERS);
        let wrx = Mutex::new(wrx);
        let (dtx, drx) = mpsc::channel::<Result<(u64, u64), ControlError>>();
        let mut order = Order::new(*offset_out, *st_out, &drx);
        let copied = std::thread::scope(|s| {
            let (tx, rx) = mpsc::sync_channel::<Result<Msg, ControlError>>(4);
            let streams = readers.len() as u64 + 1;
            let first = order.offset;
            for (i, src) in std::iter::once(&mut *source).chain(readers.iter_mut()).enumerate() {
                let tx = tx.clone();
                let from = first + i as u64 * WINDOW;
                s.spawn(move || read_windows(src, reactors, &tx, from, streams * WINDOW, rounded, size));
            }
            drop(tx);
            // Writers: each takes a piece of data, writes its non-zero blocks as one job
            // (up to 32 requests in flight) and reports the bytes written; several jobs
            // run at once.
            for _ in 0..WRITERS {
                let (wrx, dtx) = (&wrx, dtx.clone());
                s.spawn(move || loop {
                    let next = wrx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((off, data)) = next else { return };
                    if dtx
                        .send(write_nonzero(reactors, dst, off, data).map(|n| (off, n)))
                        .is_err()
                    {
                        return;
                    }
                });
            }
            drop(dtx);
            let mut res = self.feed_writers(task, reactors, dst, key, &rx, &wtx, &mut order, rounded);
            drop(rx);
            drop(wtx);
            // Let every write in flight finish; a failed one fails the copy.
            let mut failed = order.drain_all();
            let write_failed = res.is_ok() && failed.is_some();
            if write_failed {
                res = Err(failed.take().expect("checked"));
            } else if res.is_ok() && task.cancelled() {
                // The readers were done before the cancel came, but it came before the
                // migration finished: it stops here all the same (the checkpoint below
                // keeps what is written; the same call resumes and finishes).
                res = Err(task.cancelled_error());
            }
            if !write_failed && res.is_err() && failed.is_none() {
                // Interrupted with everything before `offset` written: keep it, the next
                // run resumes here.
                order.fold_below(order.offset);
                let _ = self.checkpoint(reactors, dst, key, order.offset, order.st);
            }
            if res.is_ok() {
                order.fold_below(u64::MAX);
            }
            res
        });
        // The other readers' handles (a disk's clone must be closed before it is deleted).
        drop(readers);
        *st_out = order.st;
        *offset_out = order.offset;
        copied
    }

    /// This thread's part of step 4: hands what the readers read to the writers, moves
    /// the checkpoint offset over finished windows and checkpoints every
    /// [`CHECKPOINT_EVERY`] (after waiting for the writes below it).
    #[allow(clippy::too_many_arguments)]
    fn feed_writers(
        &self,
        task: &Task,
        reactors: &Reactors,
        dst: &BdevRef,
        key: &str,
        rx: &mpsc::Receiver<Result<Msg, ControlError>>,
        wtx: &mpsc::SyncSender<(u64, Vec<u8>)>,
        order: &mut Order<'_>,
        rounded: u64,
    ) -> Result<(), ControlError> {
        let mut last_cp = Instant::now();
        for m in rx.iter() {
            match m? {
                Msg::Data { off, data } => {
                    order.read(off, data.len() as u64);
                    while order.reap(false)? {}
                    wtx.send((off, data))
                        .map_err(|_| ControlError::DataPath("the migration writers stopped".into()))?;
                    order.sent();
                }
                Msg::WindowDone { start, end } => {
                    task.progress(order.window_done(start, end));
                    if task.cancelled() {
                        return Err(task.cancelled_error());
                    }
                    if last_cp.elapsed() >= CHECKPOINT_EVERY {
                        // Everything before `offset` written, then durable.
                        order.drain()?;
                        order.fold_below(order.offset);
                        self.checkpoint(reactors, dst, key, order.offset, order.st)?;
                        last_cp = Instant::now();
                    }
                }
            }
        }
        if order.offset != rounded {
            return Err(ControlError::DataPath(format!(
                "the source readers stopped at offset {} of {rounded}",
                order.offset
            )));
        }
        Ok(())
    }

    /// Step 6: the source's clone deleted (its key unreferenced, shredded if that was
    /// its last use, audited), a new target's disk row, the migration row removed: one
    /// transaction.
    fn finish_migration(&self, rec: &MigrationRecord) -> Result<(), ControlError> {
        let shred = match (&rec.snapshot, &rec.source_encryption) {
            (Some(_), Some(enc)) => self.peek(|txn| self.would_shred(txn, enc))?,
            _ => None,
        };
        self.audit_shred(shred.as_ref(), &rec.source)?;
        let txn = self.begin()?;
        if let Some(snap) = &rec.snapshot {
            self.wait_closed(snap);
            match self.pool.delete_volume(&txn, snap) {
                Ok(()) | Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(enc) = &rec.source_encryption {
                self.key_unref(&txn, enc, shred.is_some())?;
            }
        }
        if rec.target_new {
            let now = crate::control::util::now_rfc3339();
            catalog::put(
                &txn,
                &DiskRecord {
                    id: rec.target.clone(),
                    account: rec.account.clone(),
                    region: rec.region.clone(),
                    name: rec.name.clone(),
                    description: rec.description.clone(),
                    size: rec.size,
                    category: rec.category,
                    kind: DiskKind::Cloud,
                    role: DiskRole::Data,
                    encryption: rec.target_encryption.clone(),
                    source_snapshot: None,
                    source_image: None,
                    multi_attach: false,
                    qos: self.cfg.qos.caps(rec.category, rec.size),
                    created_at: now,
                },
            )?;
        }
        catalog::remove::<MigrationRecord>(&txn, &rec.key)?;
        txn.commit()?;
        Ok(())
    }

    /// Flushes the target and records `offset` as the migration's checkpoint.
    fn checkpoint(
        &self,
        reactors: &Reactors,
        dst: &BdevRef,
        key: &str,
        offset: u64,
        st: Stats,
    ) -> Result<(), ControlError> {
        run_job(reactors, dst, vec![Op::Flush], Vec::new()).map_err(|e| io_error(e, "flushing the target"))?;
        let txn = self.begin()?;
        let mut rec = catalog::get::<MigrationRecord>(&txn, key)?
            .ok_or_else(|| ControlError::state("OperationConflict", "the migration row is gone"))?;
        rec.offset = offset;
        rec.bytes_read = st.read;
        rec.bytes_written = st.written;
        catalog::put(&txn, &rec)?;
        txn.commit()?;
        Ok(())
    }
}

/// The copy's order keeper: windows finish out of order and writes complete out of
/// order, but a checkpoint may only record an offset below which everything is written.
/// Bytes read and written are kept per window (by its start) until the checkpoint passes
/// the window, so a resume counts none twice.
struct Order<'a> {
    /// Where the copy started this run (windows are counted from here).
    first: u64,
    /// Everything below is read and handed to the writers.
    offset: u64,
    /// Totals of the windows below the last fold.
    st: Stats,
    /// Pieces handed to the writers and not yet answered.
    inflight: usize,
    pending: BTreeMap<u64, Stats>,
    /// Finished windows above `offset`: start -> end.
    done: BTreeMap<u64, u64>,
    answers: &'a mpsc::Receiver<Result<(u64, u64), ControlError>>,
}

impl<'a> Order<'a> {
    fn new(offset: u64, st: Stats, answers: &'a mpsc::Receiver<Result<(u64, u64), ControlError>>) -> Order<'a> {
        Order {
            first: offset,
            offset,
            st,
            inflight: 0,
            pending: BTreeMap::new(),
            done: BTreeMap::new(),
            answers,
        }
    }

    fn window_of(&self, off: u64) -> u64 {
        self.first + (off - self.first) / WINDOW * WINDOW
    }

    /// `len` source bytes at `off` were read.
    fn read(&mut self, off: u64, len: u64) {
        let w = self.window_of(off);
        self.pending.entry(w).or_default().read += len;
    }

    /// A piece went to the writers: one more answer to wait for.
    fn sent(&mut self) {
        self.inflight += 1;
    }

    /// One writer's answer (`wait`: block for it); false when none was there.
    fn reap(&mut self, wait: bool) -> Result<bool, ControlError> {
        let r = if wait {
            self.answers
                .recv()
                .map_err(|_| ControlError::DataPath("a migration writer stopped".into()))?
        } else {
            match self.answers.try_recv() {
                Ok(r) => r,
                Err(_) => return Ok(false),
            }
        };
        self.inflight -= 1;
        let (off, n) = r?;
        let w = self.window_of(off);
        self.pending.entry(w).or_default().written += n;
        Ok(true)
    }

    /// Waits for every write in flight; the first failure stops the wait.
    fn drain(&mut self) -> Result<(), ControlError> {
        while self.inflight > 0 {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Waits for every write in flight whatever happens; returns the first failure.
    fn drain_all(&mut self) -> Option<ControlError> {
        let mut failed = None;
        while self.inflight > 0 {
            if let Err(e) = self.reap(true) {
                failed.get_or_insert(e);
            }
        }
        failed
    }

    /// Window `start..end` is read: `offset` moves over the windows finished without a
    /// gap; returns how far it moved.
    fn window_done(&mut self, start: u64, end: u64) -> u64 {
        self.done.insert(start, end);
        let from = self.offset;
        while let Some(e) = self.done.remove(&self.offset) {
            self.offset = e;
        }
        self.offset - from
    }

    /// Adds the windows below `offset` to the totals.
    fn fold_below(&mut self, offset: u64) {
        let above = self.pending.split_off(&offset);
        for w in std::mem::replace(&mut self.pending, above).into_values() {
            self.st.read += w.read;
            self.st.written += w.written;
        }
    }
}

/// Writes the non-zero 4 KiB blocks of `data` (source bytes at `off`) to `dst`; returns
/// the bytes written.
fn write_nonzero(reactors: &Reactors, dst: &BdevRef, off: u64, data: Vec<u8>) -> Result<u64, ControlError> {
    let mut written = 0;
    let ops: Vec<Op> = nonzero_runs(&data, PIECE)
        .into_iter()
        .map(|(a, b)| {
            written += (b - a) as u64;
            Op::Write {
                offset: off + a as u64,
                at: a,
                len: b - a,
            }
        })
        .collect();
    if !ops.is_empty() {
        run_job(reactors, dst, ops, data).map_err(|e| io_error(e, "writing the target"))?;
    }
    Ok(written)
}

/// One reader thread: the windows at `start`, `start + stride`, ... below `rounded`,
/// each extent read sent as [`Msg::Data`], then [`Msg::WindowDone`]. Stops when the
/// receiver is gone, or at the first error (sent).
fn read_windows(
    src: &mut Source,
    reactors: &Reactors,
    tx: &mpsc::SyncSender<Result<Msg, ControlError>>,
    start: u64,
    stride: u64,
    rounded: u64,
    size: u64,
) {
    let mut win = start;
    while win < rounded {
        let wlen = WINDOW.min(rounded - win);
        let r = (|| {
            for (o, n) in src.extents(win, wlen, size)? {
                let data = src.read(reactors, o, n, size)?;
                if tx.send(Ok(Msg::Data { off: o, data })).is_err() {
                    return Ok(false);
                }
            }
            Ok(tx
                .send(Ok(Msg::WindowDone {
                    start: win,
                    end: win + wlen,
                }))
                .is_ok())
        })();
        match r {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
        win += stride;
    }
}
