//! Thin volumes: zeros when unwritten, copy-on-write snapshots and clones
//! (ciphertext copied as it is), reset, delete, discard, pool full, restart,
//! and `check` catching inconsistencies.

mod common;

use std::sync::Arc;

use common::*;
use redb::ReadableTable;
use sealdisk::CryptoBdev;
use sealdisk::{BdevRef, IoError};
use sealdisk::{Pool, VolumeError};

const CL: u64 = 64 << 10;

struct Env {
    db: Arc<redb::Database>,
    pool: Arc<Pool>,
    /// The catalog's and pool's directory, removed when the last holder drops (after
    /// the pool and catalog above).
    dir: Arc<TempDir>,
}

fn env(name: &str, pool_size: u64) -> Env {
    reopen(Arc::new(TempDir::new(&format!("vol-{name}"))), pool_size)
}

fn reopen(dir: Arc<TempDir>, pool_size: u64) -> Env {
    let db = Arc::new(redb::Database::create(dir.0.join("catalog.redb")).unwrap());
    let pool = Pool::open_with(db.clone(), &dir.0.join("pool.img"), pool_size, CL).unwrap();
    Env { db, pool, dir }
}

impl Env {
    fn txn(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), VolumeError>) -> Result<(), VolumeError> {
        let w = self.db.begin_write().unwrap();
        f(&w)?;
        w.commit().unwrap();
        Ok(())
    }
}

fn read(r: &sealdisk::Reactors, b: &BdevRef, off: u64, len: usize) -> Vec<u8> {
    // At most MAX_IO_BYTES per request.
    let mut v = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(256 << 10);
        let out = run_ios(
            r,
            0,
            b,
            vec![Op::Read {
                offset: off + pos as u64,
                len: n,
            }],
        );
        out[0].result.as_ref().expect("read");
        v.extend(out.into_iter().next().unwrap().data);
        pos += n;
    }
    v
}

fn write(r: &sealdisk::Reactors, b: &BdevRef, off: u64, data: &[u8]) -> Result<(), IoError> {
    run_ios(
        r,
        0,
        b,
        vec![Op::Write {
            offset: off,
            data: data.to_vec(),
        }],
    )
    .remove(0)
    .result
}

#[test]
fn unwritten_zero_then_data_fast_and_slow_path_and_spanning_io() {
    let e = env("basic", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 4 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    assert_eq!(v.capacity(), 4 << 20);
    assert!(read(&r, &v, 0, 8192).iter().all(|&b| b == 0));
    let a = random_bytes(8192, 1);
    write(&r, &v, 4096, &a).unwrap(); // first write: slow path allocates
    let b = random_bytes(4096, 2);
    write(&r, &v, 0, &b).unwrap(); // same cluster, now owned: fast path
    let back = read(&r, &v, 0, 12288);
    assert_eq!(&back[..4096], &b[..]);
    assert_eq!(&back[4096..], &a[..]);
    // Spanning two clusters, one never written.
    let span = random_bytes(32768, 3);
    write(&r, &v, 3 * CL - 16384, &span).unwrap();
    assert_eq!(read(&r, &v, 3 * CL - 16384, 32768), span);
    assert!(read(&r, &v, 5 * CL, 4096).iter().all(|&x| x == 0));
    assert_eq!(e.pool.mapped_bytes("d-1").unwrap(), 3 * CL);
    let rep = e.pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn snapshot_freezes_and_clone_shares_then_diverges() {
    let e = env("snap", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    let before = random_bytes(1 << 20, 4);
    for i in 0..4 {
        let chunk = &before[i * (256 << 10)..(i + 1) * (256 << 10)];
        write(&r, &v, (i * (256 << 10)) as u64, chunk).unwrap();
    }
    // Snapshot while attached: no data moves.
    let used = e.pool.check().unwrap().clusters_in_use;
    e.txn(|t| e.pool.clone_volume(t, "d-1", "s-1", 1 << 20)).unwrap();
    assert_eq!(
        e.pool.check().unwrap().clusters_in_use,
        used,
        "a snapshot copies no data"
    );
    // Overwrite on the disk goes copy-on-write.
    let after = random_bytes(4096, 5);
    write(&r, &v, 8192, &after).unwrap();
    assert_eq!(e.pool.check().unwrap().clusters_in_use, used + 1);
    let snap = e.pool.bdev("s-1").unwrap();
    assert_eq!(read(&r, &snap, 0, 1 << 20), before, "snapshot keeps the old data");
    let now = read(&r, &v, 0, 16384);
    assert_eq!(&now[8192..12288], &after[..]);
    assert_eq!(&now[..8192], &before[..8192], "rest of the CoW cluster is carried over");
    drop(snap);
    // A clone (bigger than the snapshot) reads the snapshot, then diverges.
    e.txn(|t| e.pool.clone_volume(t, "s-1", "d-2", 2 << 20)).unwrap();
    let c = e.pool.bdev("d-2").unwrap();
    assert_eq!(c.capacity(), 2 << 20);
    assert_eq!(read(&r, &c, 0, 1 << 20), before);
    assert!(read(&r, &c, 1 << 20, 4096).iter().all(|&x| x == 0));
    write(&r, &c, 0, &vec![7u8; 4096]).unwrap();
    assert_eq!(read(&r, &v, 0, 4096), &before[..4096]);
    let rep = e.pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn encrypted_lineage_copies_ciphertext_as_is() {
    let e = env("enc", 16 << 20);
    let r = reactors(&[0]);
    let key = xts(11);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    let ev: BdevRef = Arc::new(CryptoBdev::new(v.clone(), key.clone(), 4096).unwrap());
    let data = random_bytes(CL as usize, 6);
    write(&r, &ev, 0, &data).unwrap();
    let cipher_before = read(&r, &v, 0, CL as usize);
    assert_ne!(cipher_before, data);
    e.txn(|t| e.pool.clone_volume(t, "d-1", "s-1", 1 << 20)).unwrap();
    e.txn(|t| e.pool.clone_volume(t, "s-1", "d-2", 1 << 20)).unwrap();
    let c = e.pool.bdev("d-2").unwrap();
    let ec: BdevRef = Arc::new(CryptoBdev::new(c.clone(), key.clone(), 4096).unwrap());
    assert_eq!(
        read(&r, &ec, 0, CL as usize),
        data,
        "clone decrypts with the lineage key"
    );
    // Copy-on-write of one sector: the rest of the cluster is the same
    // ciphertext, byte for byte (no decrypt/re-encrypt).
    write(&r, &ec, 4096, &vec![9u8; 4096]).unwrap();
    let cipher_after = read(&r, &c, 0, CL as usize);
    assert_eq!(&cipher_after[..4096], &cipher_before[..4096]);
    assert_eq!(&cipher_after[8192..], &cipher_before[8192..]);
    assert_ne!(&cipher_after[4096..8192], &cipher_before[4096..8192]);
    // A wrong key does not read the data.
    let other: BdevRef = Arc::new(CryptoBdev::new(c, xts(12), 4096).unwrap());
    assert_ne!(read(&r, &other, 0, 4096), &data[..4096]);
}

#[test]
fn reset_reinit_delete_and_in_use_refusals() {
    let e = env("reset", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    let old = random_bytes(8192, 8);
    write(&r, &v, 0, &old).unwrap();
    e.txn(|t| e.pool.clone_volume(t, "d-1", "s-1", 1 << 20)).unwrap();
    write(&r, &v, 0, &random_bytes(8192, 9)).unwrap();
    // Attached: reset and delete refused.
    let w = e.db.begin_write().unwrap();
    assert!(matches!(
        e.pool.reset_volume(&w, "d-1", Some("s-1")),
        Err(VolumeError::InUse(_))
    ));
    assert!(matches!(e.pool.delete_volume(&w, "d-1"), Err(VolumeError::InUse(_))));
    drop(w);
    drop(v);
    e.txn(|t| e.pool.reset_volume(t, "d-1", Some("s-1"))).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    assert_eq!(read(&r, &v, 0, 8192), old, "reset rolls back to the snapshot");
    drop(v);
    e.txn(|t| e.pool.reset_volume(t, "d-1", None)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    assert!(read(&r, &v, 0, 8192).iter().all(|&x| x == 0), "re-init to blank");
    drop(v);
    e.txn(|t| e.pool.delete_volume(t, "s-1")).unwrap();
    e.txn(|t| e.pool.delete_volume(t, "d-1")).unwrap();
    let rep = e.pool.check().unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(rep.clusters_in_use, 0, "everything released");
    let w = e.db.begin_write().unwrap();
    assert!(matches!(e.pool.delete_volume(&w, "d-1"), Err(VolumeError::NotFound(_))));
    assert!(matches!(
        e.pool.create_volume(&w, "d-9", 1000),
        Err(VolumeError::BadSize { .. })
    ));
    assert!(matches!(
        e.pool.create_volume(&w, "bad id/..", 4096),
        Err(VolumeError::NotFound(_))
    ));
    assert!(matches!(
        e.pool.clone_volume(&w, "nope", "d-3", 4096),
        Err(VolumeError::NotFound(_))
    ));
}

#[test]
fn discard_unmaps_whole_clusters_and_zeroes_partial_ones() {
    let e = env("discard", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    write(&r, &v, 0, &random_bytes(4 * CL as usize, 10)).unwrap();
    assert_eq!(e.pool.mapped_bytes("d-1").unwrap(), 4 * CL);
    let out = run_ios(
        &r,
        0,
        &v,
        vec![
            Op::Unmap {
                offset: CL,
                len: 2 * CL,
            },
            Op::WriteZeroes {
                offset: 4096,
                len: 4096,
            },
        ],
    );
    assert!(out.iter().all(is_ok));
    assert_eq!(
        e.pool.mapped_bytes("d-1").unwrap(),
        2 * CL,
        "whole clusters are released"
    );
    let back = read(&r, &v, 0, 4 * CL as usize);
    assert!(back[4096..8192].iter().all(|&x| x == 0));
    assert!(back[CL as usize..3 * CL as usize].iter().all(|&x| x == 0));
    assert!(back[..4096].iter().any(|&x| x != 0));
    assert!(e.pool.check().unwrap().problems.is_empty());
}

#[test]
fn a_full_pool_fails_the_write_with_enospc_and_stays_consistent() {
    let e = env("full", 4 * CL);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    for i in 0..3 {
        write(&r, &v, i * CL, &[1u8; 4096]).unwrap();
    }
    let err = write(&r, &v, 3 * CL, &[1u8; 4096]).unwrap_err();
    assert_eq!(err, IoError::Device { errno: libc::ENOSPC });
    assert!(
        read(&r, &v, 3 * CL, 4096).iter().all(|&x| x == 0),
        "the failed write left nothing behind"
    );
    assert!(e.pool.check().unwrap().problems.is_empty());
}

/// Sets its flag when dropped, unwinding included.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Clusters a delete frees wait out a grace period before reuse (a read that loaded the
/// old map may still be in flight). A write that needs them right after the delete, while
/// another volume's reads keep the grace period busy, waits for it instead of failing
/// with ENOSPC. (Seen as a rare Pool.Full from a CreateEncryptedCopy right after a failed
/// one under a loaded test suite.)
#[test]
fn a_write_right_after_a_delete_reuses_the_freed_clusters_while_reads_are_in_flight() {
    // Three usable clusters: one for the reader's volume, two for the volume that is
    // deleted and made again, round after round.
    let e = env("reuse", 4 * CL);
    let r = reactors(&[0, 1]);
    e.txn(|t| e.pool.create_volume(t, "d-reader", 1 << 20)).unwrap();
    let reader = e.pool.bdev("d-reader").unwrap();
    write(&r, &reader, 0, &[7u8; 4096]).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reads = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ops = (0..8)
                    .map(|i| Op::Read {
                        offset: i * 4096,
                        len: 4096,
                    })
                    .collect();
                for d in run_ios_pipelined(&r, 1, &reader, ops) {
                    assert!(d.result.is_ok(), "read: {:?}", d.result);
                    n += 1;
                }
            }
            n
        });
        // Stops the reader however the rounds end (a failed round must not hang the scope).
        let stopper = StopOnDrop(&stop);
        for round in 0..20 {
            let id = format!("d-{round}");
            e.txn(|t| e.pool.create_volume(t, &id, 1 << 20)).unwrap();
            let v = e.pool.bdev(&id).unwrap();
            for c in 0..2 {
                write(&r, &v, c * CL, &[round as u8 + 1; 4096])
                    .unwrap_or_else(|err| panic!("round {round}, cluster {c}: {err:?}"));
            }
            drop(v);
            e.txn(|t| e.pool.delete_volume(t, &id)).unwrap();
        }
        drop(stopper);
        assert!(reads.join().unwrap() > 0, "the reads ran");
    });
    assert!(e.pool.check().unwrap().problems.is_empty());
}

#[test]
fn data_and_maps_survive_reopen() {
    let e = env("reopen", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    let data = random_bytes(3 * 4096, 12);
    write(&r, &v, CL - 4096, &data).unwrap();
    drop(v);
    let dir = e.dir.clone();
    drop(e);
    let e = reopen(dir, 16 << 20);
    let v = e.pool.bdev("d-1").unwrap();
    assert_eq!(read(&r, &v, CL - 4096, 3 * 4096), data);
    assert!(e.pool.check().unwrap().problems.is_empty());
}

#[test]
fn check_reports_leaked_and_miscounted_clusters() {
    let e = env("check", 16 << 20);
    let r = reactors(&[0]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    write(&r, &v, 0, &[1u8; 4096]).unwrap();
    write(&r, &v, CL, &[1u8; 4096]).unwrap();
    drop(v);
    assert!(e.pool.check().unwrap().problems.is_empty());
    // Corrupt the metadata behind the pool's back.
    let refs: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("refs");
    let map: redb::TableDefinition<(&str, u64), u64> = redb::TableDefinition::new("vol_map");
    let w = e.db.begin_write().unwrap();
    {
        let mut t = w.open_table(map).unwrap();
        let (k, p) = {
            let first = t.first().unwrap().unwrap();
            ((first.0.value().0.to_string(), first.0.value().1), first.1.value())
        };
        t.remove((k.0.as_str(), k.1)).unwrap();
        let _ = p;
        let mut rt = w.open_table(refs).unwrap();
        rt.insert(9999u64, 1).unwrap();
    }
    w.commit().unwrap();
    let rep = e.pool.check().unwrap();
    assert!(rep.problems.iter().any(|p| p.contains("leaked")), "{:?}", rep.problems);
    assert!(rep.problems.len() >= 2, "{:?}", rep.problems);
}

/// Many slow-path requests in one metadata batch: first writes, a second and third
/// write into a cluster the same batch took, a partial zeroing of it, a write across
/// two new adjacent clusters, a copy-on-write of a snapshot's cluster with a second
/// write merged into the copy, and a cluster written then discarded. The batch stages
/// new clusters in memory and writes them out together; every byte must be as if the
/// requests ran one by one, in order, and stay so after a reopen.
#[test]
fn requests_of_one_batch_into_the_same_new_clusters_merge_in_order() {
    use sealdisk::FaultPoint;
    use std::time::{Duration, Instant};
    let e = env("batch-merge", 16 << 20);
    let r = reactors(&[0, 1]);
    e.txn(|t| e.pool.create_volume(t, "d-1", 1 << 20)).unwrap();
    let v = e.pool.bdev("d-1").unwrap();
    let base = random_bytes(CL as usize, 40);
    write(&r, &v, 0, &base).unwrap();
    e.txn(|t| e.pool.clone_volume(t, "d-1", "s-1", 1 << 20)).unwrap();

    // Hold the commit of a first batch (from reactor 0), so everything after it (from
    // reactor 1) queues up as one.
    let faults = e.pool.faults().clone();
    faults.hold(FaultPoint::Commit);
    let model = std::thread::scope(|s| {
        let first = s.spawn(|| write(&r, &v, 9 * CL, &[9u8; 4096]));
        assert!(faults.wait_held(FaultPoint::Commit, Duration::from_secs(10)));
        let d = |n: u64| random_bytes(4096, 100 + n);
        let ops = vec![
            Op::Write {
                offset: 2 * CL,
                data: d(1),
            },
            Op::Write {
                offset: 2 * CL + 8192,
                data: d(2),
            },
            Op::Write {
                offset: 2 * CL,
                data: d(3),
            },
            Op::WriteZeroes {
                offset: 2 * CL + 8192,
                len: 4096,
            },
            Op::Write {
                offset: 4 * CL - 4096,
                data: random_bytes(8192, 104),
            },
            Op::Write {
                offset: 4096,
                data: d(5),
            },
            Op::Write {
                offset: 12288,
                data: d(6),
            },
            Op::Write {
                offset: 5 * CL,
                data: random_bytes(CL as usize, 107),
            },
            Op::Unmap {
                offset: 5 * CL,
                len: CL,
            },
        ];
        let n = ops.len() as u64;
        let mut model = vec![0u8; 1 << 20];
        model[..CL as usize].copy_from_slice(&base);
        model[9 * CL as usize..9 * CL as usize + 4096].fill(9);
        for op in &ops {
            match op {
                Op::Write { offset, data } => {
                    model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                Op::WriteZeroes { offset, len } | Op::Unmap { offset, len } => {
                    model[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                _ => unreachable!(),
            }
        }
        let batch = s.spawn(|| run_ios_pipelined(&r, 1, &v, ops));
        let t = Instant::now();
        while e.pool.meta_stats().queue_depth < n {
            assert!(t.elapsed() < Duration::from_secs(20), "requests did not queue");
            std::thread::sleep(Duration::from_millis(5));
        }
        let commits = faults.calls(FaultPoint::Commit);
        faults.release(FaultPoint::Commit);
        first.join().unwrap().unwrap();
        for d in batch.join().unwrap() {
            d.result.unwrap();
        }
        assert_eq!(
            faults.calls(FaultPoint::Commit),
            commits + 1,
            "the queued requests were one batch"
        );
        model
    });
    assert_eq!(read(&r, &v, 0, 1 << 20), model);
    let snap = e.pool.bdev("s-1").unwrap();
    assert_eq!(read(&r, &snap, 0, CL as usize), base, "the snapshot keeps its bytes");
    drop(snap);
    // Clusters 0 (copy), 2, 3, 4 (new) and 9 mapped; 5 was discarded; plus the snapshot's.
    assert_eq!(e.pool.mapped_bytes("d-1").unwrap(), 5 * CL);
    assert!(e.pool.check().unwrap().problems.is_empty());
    drop(v);
    let dir = e.dir.clone();
    drop(e);
    let e = reopen(dir, 16 << 20);
    let v = e.pool.bdev("d-1").unwrap();
    assert_eq!(read(&r, &v, 0, 1 << 20), model, "the same after a reopen");
}
