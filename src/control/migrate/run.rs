//! The task of a migration: the copy (readers, writers, checkpoints), verify, and the
//! transaction that finishes it.

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
    /// of finished windows for the checkpoint. `st` and `offset` end where the copy got to
    /// (checkpointed if it was interrupted).
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
        let (mut st, mut offset) = (*st_out, *offset_out);
        let mut readers = Vec::new();
        for _ in 1..READERS {
            match source.try_clone() {
                Ok(s) => readers.push(s),
                Err(_) => break, // one stream then
            }
        }
        let (wtx, wrx) = mpsc::sync_channel::<(u64, Vec<u8>)>(WRITERS);
        let (mut wtx, wrx) = (Some(wtx), Mutex::new(wrx));
        let (dtx, drx) = mpsc::channel::<Result<(u64, u64), ControlError>>();
        let mut dtx = Some(dtx);
        let copied = std::thread::scope(|s| {
            let (tx, rx) = mpsc::sync_channel::<Result<Msg, ControlError>>(4);
            let streams = readers.len() as u64 + 1;
            let first = offset;
            for (i, src) in std::iter::once(&mut *source).chain(readers.iter_mut()).enumerate() {
                let tx = tx.clone();
                s.spawn(move || {
                    read_windows(
                        src,
                        reactors,
                        &tx,
                        first + i as u64 * WINDOW,
                        streams * WINDOW,
                        rounded,
                        size,
                    )
                });
            }
            drop(tx);
            // Writers: each takes a piece of data, writes its non-zero blocks as one job
            // (up to 32 requests in flight) and reports the bytes written; several jobs
            // run at once.
            let wtx = wtx.take().expect("once");
            let dtx = dtx.take().expect("once");
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
            let mut inflight = 0usize;
            let mut failed: Option<ControlError> = None;
            // Bytes read and written per window (by its start): a checkpoint records only
            // the windows below it, so a resume counts none twice.
            let win_of = |off: u64| first + (off - first) / WINDOW * WINDOW;
            let mut pending: std::collections::BTreeMap<u64, Stats> = std::collections::BTreeMap::new();
            // One writer's answer; `wait`: block for it.
            let reap = |inflight: &mut usize,
                        pending: &mut std::collections::BTreeMap<u64, Stats>,
                        wait: bool|
             -> Result<bool, ControlError> {
                let r = if wait {
                    drx.recv()
                        .map_err(|_| ControlError::DataPath("a migration writer stopped".into()))?
                } else {
                    match drx.try_recv() {
                        Ok(r) => r,
                        Err(_) => return Ok(false),
                    }
                };
                *inflight -= 1;
                let (off, n) = r?;
                pending.entry(win_of(off)).or_default().written += n;
                Ok(true)
            };
            let mut last_cp = Instant::now();
            let mut done = std::collections::BTreeMap::new();
            let mut res = (|| {
                for m in rx.iter() {
                    match m? {
                        Msg::Data { off, data } => {
                            pending.entry(win_of(off)).or_default().read += data.len() as u64;
                            while reap(&mut inflight, &mut pending, false)? {}
                            wtx.send((off, data))
                                .map_err(|_| ControlError::DataPath("the migration writers stopped".into()))?;
                            inflight += 1;
                        }
                        Msg::WindowDone { start, end } => {
                            // Windows finish out of order; the checkpoint moves over the
                            // ones finished without a gap.
                            done.insert(start, end);
                            while let Some(e) = done.remove(&offset) {
                                task.progress(e - offset);
                                offset = e;
                            }
                            if task.cancelled() {
                                return Err(task.cancelled_error());
                            }
                            if last_cp.elapsed() >= CHECKPOINT_EVERY {
                                // Everything before `offset` written, then durable.
                                while inflight > 0 {
                                    reap(&mut inflight, &mut pending, true)?;
                                }
                                fold_below(&mut st, &mut pending, offset);
                                self.checkpoint(reactors, dst, key, offset, st)?;
                                last_cp = Instant::now();
                            }
                        }
                    }
                }
                if offset != rounded {
                    return Err(ControlError::DataPath(format!(
                        "the source readers stopped at offset {offset} of {rounded}"
                    )));
                }
                Ok(())
            })();
            drop(rx);
            drop(wtx);
            // Let every write in flight finish; a failed one fails the copy.
            while inflight > 0 {
                if let Err(e) = reap(&mut inflight, &mut pending, true) {
                    failed.get_or_insert(e);
                }
            }
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
                fold_below(&mut st, &mut pending, offset);
                let _ = self.checkpoint(reactors, dst, key, offset, st);
            }
            if res.is_ok() {
                fold_below(&mut st, &mut pending, u64::MAX);
            }
            res
        });
        // The other readers' handles (a disk's clone must be closed before it is deleted).
        drop(readers);
        *st_out = st;
        *offset_out = offset;
        copied
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

/// Adds the counts of the windows starting below `offset` to `st` and forgets them.
fn fold_below(st: &mut Stats, pending: &mut std::collections::BTreeMap<u64, Stats>, offset: u64) {
    let above = pending.split_off(&offset);
    for w in std::mem::replace(pending, above).into_values() {
        st.read += w.read;
        st.written += w.written;
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
