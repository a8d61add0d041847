//! The durability contract of the volume layer, where requests overlap:
//! a write acknowledged before a FLUSH is durable (mapping included) when the
//! FLUSH is acknowledged; snapshots hold exactly what was acknowledged before
//! them while writes keep landing at queue depth 32; a freed cluster is not
//! reused while a request may still address it; a failed commit or fdatasync
//! fails only the requests it carried; and a catalog whose durability stops
//! at the N-th sync recovers to a consistent pool holding every write
//! acknowledged before that.

mod common;

use common::TempDir;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sealdisk::ReactorCtx;
use sealdisk::{BdevRef, IoQueue, IoRequest};
use sealdisk::{FaultPoint, Faults, Pool};

const CL: u64 = 64 << 10;
const BS: usize = 4096;
const VOL_MAP: redb::TableDefinition<(&str, u64), u64> = redb::TableDefinition::new("vol_map");

fn dir(tag: &str) -> TempDir {
    TempDir::new(&format!("dur-{tag}"))
}

fn open(d: &Path, faults: Arc<Faults>) -> (Arc<redb::Database>, Arc<Pool>) {
    let db = Arc::new(redb::Database::create(d.join("catalog.redb")).unwrap());
    let pool = Pool::open_with_faults(db.clone(), &d.join("pool.img"), 64 << 20, CL, faults).unwrap();
    (db, pool)
}

fn txn(db: &redb::Database, f: impl FnOnce(&redb::WriteTransaction)) {
    let w = db.begin_write().unwrap();
    f(&w);
    w.commit().unwrap();
}

/// A block's content: (block, version) in its first 16 bytes, then filler.
fn block(b: u64, v: u64) -> Vec<u8> {
    let mut d = random_bytes(BS, b * 1_000_003 + v + 1);
    d[..8].copy_from_slice(&b.to_le_bytes());
    d[8..16].copy_from_slice(&v.to_le_bytes());
    d
}

/// Which version of block `b` this content is (0 = zeros, never written).
fn version(b: u64, d: &[u8]) -> u64 {
    if d.iter().all(|&x| x == 0) {
        return 0;
    }
    let v = u64::from_le_bytes(d[8..16].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(d[..8].try_into().unwrap()),
        b,
        "block {b} holds another block's data"
    );
    assert_eq!(d, block(b, v), "block {b}: torn or corrupt content");
    v
}

fn wreq(ctx: &ReactorCtx, off: u64, data: &[u8], tag: u64) -> IoRequest {
    let mut buf = ctx.chan.pool.alloc(data.len()).expect("buffer");
    buf.set_len(data.len());
    buf.copy_from_slice(data);
    IoRequest::write(off, buf, tag)
}

fn rreq(ctx: &ReactorCtx, off: u64, len: usize, tag: u64) -> IoRequest {
    let mut buf = ctx.chan.pool.alloc(len).expect("buffer");
    buf.set_len(len);
    IoRequest::read(off, buf, tag)
}

/// Copies the catalog and pool files as they are now: what a machine that
/// lost power at this moment could find (redb's durable root is the last
/// committed one; pages written since are garbage it ignores).
fn crash_image(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["catalog.redb", "pool.img"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn read_vol(r: &sealdisk::Reactors, b: &BdevRef, off: u64, len: usize) -> Vec<u8> {
    let ops = (0..len)
        .step_by(256 << 10)
        .map(|p| Op::Read {
            offset: off + p as u64,
            len: (len - p).min(256 << 10),
        })
        .collect();
    let mut v = Vec::with_capacity(len);
    for d in run_ios(r, 0, b, ops) {
        d.result.as_ref().expect("read");
        v.extend(d.data);
    }
    v
}

/// The race an outside check hit: W1 to a fresh cluster waits for its commit
/// (held here); W2 to another block of the same cluster and a FLUSH follow.
/// Whatever was acknowledged before the FLUSH was sent must be in a crash
/// image taken once the FLUSH is acknowledged. On the old code W2 took the
/// fast path into the not-yet-durable mapping and read back as zeros.
#[test]
fn a_write_acknowledged_before_a_flush_survives_a_crash_while_the_first_write_commits() {
    let d = dir("w1w2");
    let faults = Arc::new(Faults::default());
    let (db, pool) = open(&d.0, faults.clone());
    txn(&db, |t| pool.create_volume(t, "v", 4 << 20).unwrap());
    let vol = pool.bdev("v").unwrap();
    let r = reactors(&[0]);
    let img = d.0.join("img");
    faults.hold(FaultPoint::Commit);
    let (f2, img2) = (faults.clone(), img.clone());
    let from = d.0.clone();
    let (w2_acked_before_flush, w1, w2) = r
        .call(0, Duration::from_secs(60), move |ctx| {
            let mut ch = IoQueue::new(vol.open_channel(&ctx.chan).unwrap());
            submit(&mut ch, wreq(ctx, 0, &block(0, 1), 1));
            assert!(
                f2.wait_held(FaultPoint::Commit, Duration::from_secs(10)),
                "W1 reached its commit"
            );
            submit(&mut ch, wreq(ctx, BS as u64, &block(1, 1), 2));
            // Poll for 200 ms (W1 stays in flight, held at its commit).
            let out = ch.wait(usize::MAX, Duration::from_millis(200), None);
            let w2_acked = out.iter().any(|c| c.tag == 2 && c.result.is_ok());
            ch.recycle(out);
            submit(&mut ch, IoRequest::flush(3));
            let fl = wait_tag(&mut ch, 3);
            assert!(fl.result.is_ok());
            crash_image(&from, &img2);
            f2.release(FaultPoint::Commit);
            let w1 = wait_tag(&mut ch, 1).result;
            let w2 = if w2_acked { Ok(()) } else { wait_tag(&mut ch, 2).result };
            (w2_acked, w1, w2)
        })
        .unwrap();
    assert!(w1.is_ok() && w2.is_ok(), "{w1:?} {w2:?}");
    drop(pool);
    drop(db);
    let (db2, pool2) = open(&img, Arc::new(Faults::default()));
    let got = read_vol(&r, &pool2.bdev("v").unwrap(), BS as u64, BS);
    if w2_acked_before_flush {
        assert_eq!(
            version(1, &got),
            1,
            "W2 was acknowledged before the FLUSH, yet lost in the crash image"
        );
    } else {
        // Not acknowledged before the flush: either outcome is allowed, and
        // the map must not name a cluster whose data is missing.
        let v = version(1, &got);
        assert!(v <= 1);
    }
    let rep = pool2.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    drop((db2, pool2));
    // And with the commit released, both are durable.
    let (_db, pool) = open(&d.0, Arc::new(Faults::default()));
    let v = pool.bdev("v").unwrap();
    assert_eq!(version(0, &read_vol(&r, &v, 0, BS)), 1);
    assert_eq!(version(1, &read_vol(&r, &v, BS as u64, BS)), 1);
}

/// Snapshots every few milliseconds under queue-depth-32 random writes (never
/// two in flight to one block): every snapshot holds, for each block, the last
/// value acknowledged before CreateSnapshot was called or a value in flight
/// during the call, never one submitted after it returned; the live disk
/// ends with the last acknowledged value of every block.
#[test]
fn snapshots_taken_every_few_ms_under_qd32_writes_hold_exactly_what_they_should() {
    const BLOCKS: u64 = 512; // 2 MiB: 32 clusters of 64 KiB
    const QD: usize = 32;
    let d = dir("snapstorm");
    let db = Arc::new(redb::Database::create(d.0.join("catalog.redb")).unwrap());
    let pool = Pool::open_with(db.clone(), &d.0.join("pool.img"), 256 << 20, CL).unwrap();
    txn(&db, |t| pool.create_volume(t, "live", BLOCKS * BS as u64).unwrap());
    let vol = pool.bdev("live").unwrap();
    let r = Arc::new(reactors(&[0]));
    // Global order of events.
    let clock = Arc::new(AtomicU64::new(1));
    // Per block: (version, submitted at, acknowledged at).
    type History = HashMap<u64, Vec<(u64, u64, u64)>>;
    let hist: Arc<Mutex<History>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (c2, h2, s2) = (clock.clone(), hist.clone(), stop.clone());
    let writer = std::thread::spawn({
        let r = r.clone();
        move || {
            r.call(0, Duration::from_secs(120), move |ctx| {
                let mut ch = IoQueue::new(vol.open_channel(&ctx.chan).unwrap());
                let mut rng = 0x9e3779b97f4a7c15u64;
                let mut inflight: HashMap<u64, (u64, u64)> = HashMap::new(); // tag=block -> (version, submitted)
                let mut next_v: HashMap<u64, u64> = HashMap::new();
                let mut acked = 0u64;
                while !s2.load(SeqCst) || !inflight.is_empty() {
                    while !s2.load(SeqCst) && inflight.len() < QD {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let b = rng % BLOCKS;
                        if inflight.contains_key(&b) {
                            continue;
                        }
                        let v = next_v.entry(b).or_insert(0);
                        *v += 1;
                        let at = c2.fetch_add(1, SeqCst);
                        submit(&mut ch, wreq(ctx, b * BS as u64, &block(b, *v), b));
                        inflight.insert(b, (*v, at));
                    }
                    let mut out = ch.reap();
                    for c in out.drain(..) {
                        assert!(c.result.is_ok(), "write failed: {:?}", c.result);
                        let at = c2.fetch_add(1, SeqCst);
                        let (v, sub) = inflight.remove(&c.tag).unwrap();
                        h2.lock().unwrap().entry(c.tag).or_default().push((v, sub, at));
                        acked += 1;
                    }
                    ch.recycle(out);
                }
                acked
            })
            .unwrap()
        }
    });
    // Snapshots: (id, called at, returned at).
    let mut snaps = Vec::new();
    let t = Instant::now();
    while snaps.len() < 60 {
        std::thread::sleep(Duration::from_millis(3));
        let id = format!("s{}", snaps.len());
        let w = db.begin_write().unwrap();
        let called = clock.fetch_add(1, SeqCst);
        pool.clone_volume(&w, "live", &id, BLOCKS * BS as u64).unwrap();
        w.commit().unwrap();
        let returned = clock.fetch_add(1, SeqCst);
        snaps.push((id, called, returned));
    }
    // Writes go on a while after the last snapshot (copy-on-write of it).
    std::thread::sleep(
        Duration::from_millis(1000)
            .saturating_sub(t.elapsed())
            .max(Duration::from_millis(100)),
    );
    stop.store(true, SeqCst);
    let acked = writer.join().unwrap();
    assert!(acked > 1000, "only {acked} writes in the run");
    let hist = hist.lock().unwrap();
    let check = |name: &str, bdev: &BdevRef, allowed: &dyn Fn(u64) -> (u64, Vec<u64>)| {
        let data = read_vol(&r, bdev, 0, (BLOCKS as usize) * BS);
        for b in 0..BLOCKS {
            let got = version(b, &data[b as usize * BS..(b as usize + 1) * BS]);
            let (must, may) = allowed(b);
            assert!(
                got == must || may.contains(&got),
                "{name}: block {b} holds version {got}; allowed {must} or {may:?}"
            );
        }
    };
    for (id, called, returned) in &snaps {
        let snap = pool.bdev(id).unwrap();
        check(id, &snap, &|b| {
            let h = hist.get(&b).map(Vec::as_slice).unwrap_or(&[]);
            let last_before = h.iter().filter(|e| e.2 < *called).map(|e| e.0).max().unwrap_or(0);
            let during: Vec<u64> = h
                .iter()
                .filter(|e| e.1 < *returned && e.2 > *called)
                .map(|e| e.0)
                .collect();
            (last_before, during)
        });
    }
    check("live", &pool.bdev("live").unwrap(), &|b| {
        (
            hist.get(&b).and_then(|h| h.iter().map(|e| e.0).max()).unwrap_or(0),
            vec![],
        )
    });
    let rep = pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    eprintln!(
        "{} snapshots under {acked} acknowledged QD{QD} writes: all consistent",
        snaps.len()
    );
}

/// An injected commit failure (and an fdatasync failure, and a failed write of
/// the batch's staged clusters) fails the requests
/// it carried with EIO, and nothing else: earlier acknowledged writes stay,
/// the in-memory map is not rolled back under them, and the disk goes on.
#[test]
fn a_failed_staged_write_fdatasync_or_commit_fails_only_its_requests_and_the_disk_goes_on() {
    let d = dir("commitfail");
    let faults = Arc::new(Faults::default());
    let (db, pool) = open(&d.0, faults.clone());
    txn(&db, |t| pool.create_volume(t, "v", 4 << 20).unwrap());
    let vol = pool.bdev("v").unwrap();
    let r = reactors(&[0]);
    let f = faults.clone();
    r.call(0, Duration::from_secs(60), move |ctx| {
        let mut ch = IoQueue::new(vol.open_channel(&ctx.chan).unwrap());
        // Cluster 0 allocated and acknowledged, then written on the fast path.
        submit(&mut ch, wreq(ctx, 0, &block(0, 1), 1));
        assert!(wait_tag(&mut ch, 1).result.is_ok());
        submit(&mut ch, wreq(ctx, BS as u64, &block(1, 1), 2));
        assert!(wait_tag(&mut ch, 2).result.is_ok());
        for (i, point) in [FaultPoint::Commit, FaultPoint::PoolSync, FaultPoint::StagedWrite]
            .into_iter()
            .enumerate()
        {
            let c = (i as u64 + 1) * CL; // a fresh cluster each time
            f.fail_nth(point, 1);
            // A pipelined batch: the first write to a fresh cluster and a
            // fast-path write beside it.
            submit(&mut ch, wreq(ctx, c, &block(c / BS as u64, 1), 10));
            submit(&mut ch, wreq(ctx, 2 * BS as u64, &block(2, 1), 11));
            let failed = wait_tag(&mut ch, 10);
            assert_eq!(
                failed.result,
                Err(sealdisk::IoError::Device { errno: libc::EIO }),
                "{point:?}"
            );
            assert!(wait_tag(&mut ch, 11).result.is_ok());
            // Reads: the failed write is not there, the acknowledged ones are.
            submit(&mut ch, rreq(ctx, c, BS, 12));
            let rd = wait_tag(&mut ch, 12);
            assert_eq!(version(c / BS as u64, &rd.buf.unwrap()), 0, "{point:?}");
            for b in 0..3u64 {
                submit(&mut ch, rreq(ctx, b * BS as u64, BS, 13));
                let rd = wait_tag(&mut ch, 13);
                assert_eq!(version(b, &rd.buf.unwrap()), 1, "{point:?}: block {b}");
            }
            // The disk goes on: the same write now succeeds.
            submit(&mut ch, wreq(ctx, c, &block(c / BS as u64, 2), 14));
            assert!(wait_tag(&mut ch, 14).result.is_ok(), "{point:?}");
        }
    })
    .unwrap();
    let rep = pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    drop(pool);
    drop(db);
    let (_db, pool) = open(&d.0, Arc::new(Faults::default()));
    let v = pool.bdev("v").unwrap();
    for (b, want) in [
        (0u64, 1u64),
        (1, 1),
        (2, 1),
        (CL / BS as u64, 2),
        (2 * CL / BS as u64, 2),
        (3 * CL / BS as u64, 2),
    ] {
        assert_eq!(
            version(b, &read_vol(&r, &v, b * BS as u64, BS)),
            want,
            "block {b} after reopen"
        );
    }
}

fn phys(db: &redb::Database, vol: &str, c: u64) -> Option<u64> {
    let r = db.begin_read().unwrap();
    let t = r.open_table(VOL_MAP).unwrap();
    t.get((vol, c)).unwrap().map(|v| v.value())
}

/// A read still in flight (submitted, not yet reaped) keeps the cluster it
/// addresses from reuse after another request frees it; once it completes
/// the cluster is reused.
#[test]
fn a_freed_cluster_is_not_reused_while_a_read_may_still_address_it() {
    let d = dir("reuse");
    let (db, pool) = open(&d.0, Arc::new(Faults::default()));
    txn(&db, |t| {
        pool.create_volume(t, "a", 1 << 20).unwrap();
        pool.create_volume(t, "b", 1 << 20).unwrap();
    });
    let (a, b) = (pool.bdev("a").unwrap(), pool.bdev("b").unwrap());
    let r = reactors(&[0]);
    let db2 = db.clone();
    let (x, while_read, after_read) = r
        .call(0, Duration::from_secs(60), move |ctx| {
            let mut ca = IoQueue::new(a.open_channel(&ctx.chan).unwrap());
            submit(&mut ca, wreq(ctx, 0, &block(0, 1), 1));
            assert!(wait_tag(&mut ca, 1).result.is_ok());
            let x = phys(&db2, "a", 0).expect("a's cluster 0 is mapped");
            // The stalled read: submitted on its own channel, not reaped.
            let mut stalled = IoQueue::new(a.open_channel(&ctx.chan).unwrap());
            submit(&mut stalled, rreq(ctx, 0, BS, 2));
            // Discard a's cluster 0: it is free now.
            submit(&mut ca, IoRequest::unmap(0, CL, 3));
            assert!(wait_tag(&mut ca, 3).result.is_ok());
            assert_eq!(phys(&db2, "a", 0), None);
            // b's first write must get another cluster.
            let mut cb = IoQueue::new(b.open_channel(&ctx.chan).unwrap());
            submit(&mut cb, wreq(ctx, 0, &block(0, 7), 4));
            assert!(wait_tag(&mut cb, 4).result.is_ok());
            let while_read = phys(&db2, "b", 0).unwrap();
            // The read completes (it returns what was there: the old data).
            let rd = wait_tag(&mut stalled, 2);
            assert_eq!(version(0, &rd.buf.unwrap()), 1);
            drop(stalled);
            // Give the metadata thread a moment to end the grace period, then
            // b's next fresh cluster may be the freed one.
            std::thread::sleep(Duration::from_millis(50));
            submit(&mut cb, wreq(ctx, CL, &block(CL / BS as u64, 7), 5));
            assert!(wait_tag(&mut cb, 5).result.is_ok());
            (x, while_read, phys(&db2, "b", 1).unwrap())
        })
        .unwrap();
    assert_ne!(while_read, x, "cluster {x} reused while a read still addressed it");
    assert_eq!(
        after_read, x,
        "the freed cluster is reused once no request can address it"
    );
    let rep = pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// A redb storage backend whose durability stops after `stop_after` syncs:
/// from then on writes land only in memory (the process goes on as if all
/// were well) and the file keeps what was durable. Reopening the file is
/// recovery after a power cut at that moment.
#[derive(Debug)]
struct StopBackend {
    file: std::fs::File,
    syncs: AtomicU64,
    stop_after: u64,
    mem: Mutex<Option<Vec<u8>>>,
}

impl StopBackend {
    fn stopped(&self) -> bool {
        self.mem.lock().unwrap().is_some()
    }
    fn freeze(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let mut m = self.mem.lock().unwrap();
        if m.is_none() && self.syncs.load(SeqCst) >= self.stop_after {
            let len = self.file.metadata().unwrap().len() as usize;
            let mut v = vec![0u8; len];
            self.file.read_exact_at(&mut v, 0).unwrap();
            *m = Some(v);
        }
        m
    }
}

impl redb::StorageBackend for StopBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        match &*self.mem.lock().unwrap() {
            Some(v) => Ok(v.len() as u64),
            None => Ok(self.file.metadata()?.len()),
        }
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        use std::os::unix::fs::FileExt;
        match &*self.mem.lock().unwrap() {
            Some(v) => Ok(v[offset as usize..offset as usize + len].to_vec()),
            None => {
                let mut b = vec![0u8; len];
                self.file.read_exact_at(&mut b, offset)?;
                Ok(b)
            }
        }
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        match &mut *self.freeze() {
            Some(v) => {
                v.resize(len as usize, 0);
                Ok(())
            }
            None => self.file.set_len(len),
        }
    }
    fn sync_data(&self, _eventual: bool) -> Result<(), std::io::Error> {
        if self.stopped() {
            return Ok(());
        }
        self.file.sync_data()?;
        self.syncs.fetch_add(1, SeqCst);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        use std::os::unix::fs::FileExt;
        match &mut *self.freeze() {
            Some(v) => {
                let end = offset as usize + data.len();
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[offset as usize..end].copy_from_slice(data);
                Ok(())
            }
            None => self.file.write_all_at(data, offset),
        }
    }
}

/// Catalog durability stops at the N-th sync (N over a range, so the stop
/// lands before, inside and after commits of first writes, copy-on-writes
/// after a snapshot, and discards); then recovery: the pool checks clean and
/// every write acknowledged while the catalog was still durable reads back.
#[test]
fn recovery_after_catalog_durability_stops_at_the_nth_sync_keeps_every_durable_write() {
    let r = reactors(&[0]);
    for n in 2..14u64 {
        let d = dir(&format!("stop{n}"));
        let path = d.0.join("catalog.redb");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let backend = Arc::new(StopBackend {
            file,
            syncs: AtomicU64::new(0),
            stop_after: n,
            mem: Mutex::new(None),
        });
        let db = Arc::new(
            redb::Builder::new()
                .create_with_backend(SharedBackend(backend.clone()))
                .unwrap(),
        );
        let pool = Pool::open_with(db.clone(), &d.0.join("pool.img"), 16 << 20, CL).unwrap();
        txn(&db, |t| pool.create_volume(t, "v", 1 << 20).unwrap());
        let vol = pool.bdev("v").unwrap();
        // Durable writes: (block, version) acknowledged while not stopped.
        let mut durable: HashMap<u64, u64> = HashMap::new();
        let mut later: HashMap<u64, Vec<u64>> = HashMap::new();
        for step in 0..12u64 {
            // Clusters 0..8 fresh, then four of them again (copy-on-write
            // after the snapshot at step 5).
            let b = (step * 5) % 8 * (CL / BS as u64) + step % 3;
            let res = run_ios(
                &r,
                0,
                &vol,
                vec![
                    Op::Write {
                        offset: b * BS as u64,
                        data: block(b, step + 1),
                    },
                    Op::Flush,
                ],
            );
            assert!(res.iter().all(is_ok));
            if backend.stopped() {
                later.entry(b).or_default().push(step + 1);
            } else {
                durable.insert(b, step + 1);
                later.remove(&b);
            }
            if step == 5 {
                // A snapshot: later writes copy on write.
                let w = db.begin_write().unwrap();
                pool.clone_volume(&w, "v", "snap", 1 << 20).unwrap();
                w.commit().unwrap();
            }
            if step == 8 {
                // Discard cluster 4 (written at step 4).
                let res = run_ios(
                    &r,
                    0,
                    &vol,
                    vec![Op::Unmap {
                        offset: 4 * CL,
                        len: CL,
                    }],
                );
                assert!(res.iter().all(is_ok));
                let blocks = (4 * CL / BS as u64)..(5 * CL / BS as u64);
                if backend.stopped() {
                    for bl in blocks {
                        later.entry(bl).or_default().push(0);
                    }
                } else {
                    for bl in blocks {
                        durable.remove(&bl);
                        later.remove(&bl);
                    }
                }
            }
        }
        assert!(
            backend.stopped(),
            "N={n}: durability never stopped; raise the step count"
        );
        drop(vol);
        drop(pool);
        drop(db);
        drop(backend);
        // Recovery from what was durable.
        let db = Arc::new(redb::Database::create(&path).unwrap());
        let pool = Pool::open_with(db.clone(), &d.0.join("pool.img"), 16 << 20, CL).unwrap();
        let rep = pool.check().unwrap();
        assert!(rep.problems.is_empty(), "N={n}: {:?}", rep.problems);
        if let Some(v) = pool.volume_size("v").unwrap().map(|_| pool.bdev("v").unwrap()) {
            for bl in 0..(1 << 20) / BS as u64 {
                let got = version(bl, &read_vol(&r, &v, bl * BS as u64, BS));
                let want = durable.get(&bl).copied().unwrap_or(0);
                let may = later.get(&bl).cloned().unwrap_or_default();
                assert!(
                    got == want || may.contains(&got),
                    "N={n}: block {bl} reads version {got}, durable {want}, later {may:?}"
                );
            }
        } else {
            assert!(durable.is_empty(), "N={n}: the volume vanished with durable writes");
        }
    }
}

/// `redb` takes its backend by value; this shares one with the test.
#[derive(Debug)]
struct SharedBackend(Arc<StopBackend>);
impl redb::StorageBackend for SharedBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.0.read(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        self.0.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
}

/// CreateSnapshot while a fast-path write is in flight (submitted, not yet
/// completed): the snapshot waits for it, and the write is on the live disk
/// afterwards, also once a later write copies its cluster on write. Without
/// the drain the copy-on-write could copy the cluster before the write
/// landed, and the live disk would lose an acknowledged write.
#[test]
fn a_snapshot_waits_for_fast_path_writes_in_flight_and_the_live_disk_keeps_them() {
    let d = dir("drain");
    let (db, pool) = open(&d.0, Arc::new(Faults::default()));
    txn(&db, |t| pool.create_volume(t, "v", 1 << 20).unwrap());
    let vol = pool.bdev("v").unwrap();
    let r = reactors(&[0]);
    let (db2, pool2) = (db.clone(), pool.clone());
    let waited = r
        .call(0, Duration::from_secs(60), move |ctx| {
            let mut ch = IoQueue::new(vol.open_channel(&ctx.chan).unwrap());
            submit(&mut ch, wreq(ctx, 0, &block(0, 1), 1));
            assert!(wait_tag(&mut ch, 1).result.is_ok());
            // The cluster is owned now: this write takes the fast path and
            // stays in flight until its channel is polled.
            let mut inflight = IoQueue::new(vol.open_channel(&ctx.chan).unwrap());
            submit(&mut inflight, wreq(ctx, BS as u64, &block(1, 1), 2));
            let snap = std::thread::spawn(move || {
                let w = db2.begin_write().unwrap();
                pool2.clone_volume(&w, "v", "snap", 1 << 20).unwrap();
                w.commit().unwrap();
            });
            std::thread::sleep(Duration::from_millis(200));
            let waited = !snap.is_finished();
            assert!(wait_tag(&mut inflight, 2).result.is_ok());
            snap.join().unwrap();
            // Copy-on-write of the now shared cluster.
            submit(&mut ch, wreq(ctx, 2 * BS as u64, &block(2, 1), 3));
            assert!(wait_tag(&mut ch, 3).result.is_ok());
            waited
        })
        .unwrap();
    assert!(
        waited,
        "CreateSnapshot returned while a fast-path write was still in flight"
    );
    let live = read_vol(&r, &pool.bdev("v").unwrap(), 0, 3 * BS);
    let snap = read_vol(&r, &pool.bdev("snap").unwrap(), 0, 3 * BS);
    for b in 0..3u64 {
        let at = b as usize * BS..(b as usize + 1) * BS;
        assert_eq!(version(b, &live[at.clone()]), 1, "live block {b}");
        // The in-flight write landed before the snapshot was taken (it
        // waited for it); the write after it did not reach the snapshot.
        assert_eq!(version(b, &snap[at]), if b < 2 { 1 } else { 0 }, "snapshot block {b}");
    }
    let rep = pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}
