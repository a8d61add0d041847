//! vhost-user-blk over the real stack (crypto → thin volume → pool file on io_uring)
//! with faults injected where the volume makes writes durable: the guest sees
//! IOERR for exactly the requests a failed fdatasync or catalog commit carried,
//! OK for the rest, never its failed data on a read, and the queues go on; slow
//! commits under pipelined writes on both queues lose nothing; a VMM that
//! disconnects while writes are held in a commit gets a working device again
//! once they land.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::*;

use sealdisk::testing::vmm::BlkOp;
use sealdisk::testing::vmm::{Driver, DriverOptions};
use sealdisk::BdevRef;
use sealdisk::CryptoBdev;
use sealdisk::Export;
use sealdisk::Reactors;
use sealdisk::{FaultPoint, Faults, Pool};
use sealdisk::{VhostConfig, VhostServer};

const CL: u64 = 64 << 10;
const BS: usize = 4096;
const VOL: u64 = 16 << 20;
const DISK: &str = "d-vhostfault001";
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

struct Rig {
    faults: Arc<Faults>,
    server: Arc<VhostServer>,
    sock: PathBuf,
    _reactors: Arc<Reactors>,
    _pool: Arc<Pool>,
    /// Removes the directory on drop, after everything above.
    _tmp: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Nothing may stay held: a held commit would block the metadata thread.
        self.faults.release(FaultPoint::Commit);
        self.faults.release(FaultPoint::PoolSync);
        self.server.remove_all();
    }
}

fn rig(name: &str) -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("sealdisk-vhostfault-{name}-"))
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let faults = Arc::new(Faults::default());
    let db = Arc::new(redb::Database::create(dir.join("catalog.redb")).unwrap());
    let pool = Pool::open_with_faults(db.clone(), &dir.join("pool.img"), 64 << 20, CL, faults.clone()).unwrap();
    let w = db.begin_write().unwrap();
    pool.create_volume(&w, "v", VOL).unwrap();
    w.commit().unwrap();
    let vol = pool.bdev("v").unwrap();
    let disk: BdevRef = Arc::new(CryptoBdev::new(vol, common::xts(9), 4096).unwrap());
    let reactors = Arc::new(common::reactors(&[0, 1]));
    let server = VhostServer::new(
        VhostConfig {
            instances_dir: dir.join("instances"),
            gid: None,
            num_queues: Some(2),
        },
        reactors.clone(),
    );
    let sock = server.add("i-test", Export::new(DISK, disk, false)).unwrap();
    Rig {
        _tmp: tmp,
        faults,
        server,
        sock,
        _reactors: reactors,
        _pool: pool,
    }
}

fn connect(sock: &Path) -> Driver {
    Driver::connect(sock, &DriverOptions::default()).expect("connect")
}

fn sector(off: u64) -> u64 {
    off / 512
}

/// A block's content, distinct per (offset, version).
fn block(off: u64, v: u64) -> Vec<u8> {
    common::random_bytes(BS, off * 31 + v + 1)
}

/// Push writes of `(queue, offset, data)` all at once (each queue published
/// once, so they are in flight together) and return their statuses in order.
fn pipelined_writes(d: &mut Driver, writes: &[(usize, u64, Vec<u8>)]) -> Vec<u8> {
    let mut bufs = Vec::new();
    let mut ids = Vec::new();
    for (q, off, data) in writes {
        let mut b = d.alloc(data.len()).unwrap();
        b.as_mut_slice().copy_from_slice(data);
        let segs = [b.seg()];
        let id = d
            .queue(*q)
            .push(&BlkOp::Write {
                sector: sector(*off),
                segs: &segs,
            })
            .unwrap();
        ids.push((*q, id));
        bufs.push(b);
    }
    for q in 0..2 {
        d.queue(q).publish();
    }
    ids.into_iter()
        .map(|(q, id)| d.queue(q).wait_for(id, Duration::from_secs(30)).unwrap().status)
        .collect()
}

#[test]
fn a_failed_fdatasync_or_commit_answers_ioerr_for_its_requests_only_and_the_queues_go_on() {
    let r = rig("fail");
    let mut d = connect(&r.sock);
    // Cluster 0 allocated, then overwritten on the fast path.
    assert_eq!(d.write(0, 0, &block(0, 1)).unwrap(), OK);
    for (i, point) in [FaultPoint::PoolSync, FaultPoint::Commit].into_iter().enumerate() {
        let fresh = (i as u64 + 1) * CL;
        r.faults.fail_nth(point, 1);
        // Together: the first write of a fresh cluster (the metadata thread's batch)
        // on queue 0, and a fast-path overwrite of cluster 0 on queue 1.
        let st = pipelined_writes(
            &mut d,
            &[(0, fresh, block(fresh, 1)), (1, BS as u64, block(BS as u64, 1))],
        );
        assert_eq!(
            st,
            vec![IOERR, OK],
            "{point:?}: the fresh cluster's write fails, the other not"
        );
        // The failed write is not there (never its data, never ciphertext): zeros.
        let (s, back) = d.read(1, sector(fresh), BS).unwrap();
        assert_eq!(s, OK, "{point:?}");
        assert!(back.iter().all(|&b| b == 0), "{point:?}: a failed write reads as zeros");
        assert_eq!(d.read(0, sector(BS as u64), BS).unwrap(), (OK, block(BS as u64, 1)));
        // The queues go on: the same write now succeeds, and a flush is clean.
        assert_eq!(d.write(0, sector(fresh), &block(fresh, 2)).unwrap(), OK, "{point:?}");
        assert_eq!(d.flush(1).unwrap(), OK, "{point:?}");
        assert_eq!(d.read(1, sector(fresh), BS).unwrap(), (OK, block(fresh, 2)));
    }
    assert_eq!(d.read(0, 0, BS).unwrap(), (OK, block(0, 1)));
}

#[test]
fn slow_commits_under_pipelined_writes_on_both_queues_lose_nothing() {
    let r = rig("slow");
    let mut d = connect(&r.sock);
    r.faults.delay(FaultPoint::Commit, Duration::from_millis(20));
    r.faults.delay(FaultPoint::PoolSync, Duration::from_millis(5));
    // 32 in flight per queue, 32 KiB apart: every other write opens a fresh
    // 64 KiB cluster (a commit); the one beside it lands in the same cluster,
    // often while that cluster's commit is still in flight.
    let mut writes = Vec::new();
    for q in 0..2usize {
        for i in 0..32u64 {
            let off = (q as u64 * 32 + i) * 4 * BS as u64 * 2;
            writes.push((q, off, block(off, 1)));
        }
    }
    let st = pipelined_writes(&mut d, &writes);
    assert!(st.iter().all(|&s| s == OK), "{st:?}");
    assert_eq!(d.flush(0).unwrap(), OK);
    for (i, (_, off, data)) in writes.iter().enumerate() {
        let (s, back) = d.read(i % 2, sector(*off), BS).unwrap();
        assert_eq!(s, OK);
        assert!(back == *data, "write at {off} lost under slow commits");
    }
    assert!(
        r.faults.calls(FaultPoint::Commit) >= 1,
        "the writes went through commits"
    );
}

#[test]
fn a_vmm_gone_while_writes_wait_in_a_commit_reconnects_to_a_working_disk() {
    let r = rig("gone");
    let mut d = connect(&r.sock);
    r.faults.hold(FaultPoint::Commit);
    let mut bufs = Vec::new();
    for i in 0..16u64 {
        let off = i * CL;
        let mut b = d.alloc(BS).unwrap();
        b.as_mut_slice().copy_from_slice(&block(off, 1));
        let segs = [b.seg()];
        d.queue((i % 2) as usize)
            .push(&BlkOp::Write {
                sector: sector(off),
                segs: &segs,
            })
            .unwrap();
        bufs.push(b);
    }
    d.queue(0).publish();
    d.queue(1).publish();
    assert!(
        r.faults.wait_held(FaultPoint::Commit, Duration::from_secs(10)),
        "the writes reached the commit"
    );
    // The VMM goes away with those writes unanswered; the commit lands later.
    drop(d);
    std::thread::sleep(Duration::from_millis(50));
    r.faults.release(FaultPoint::Commit);
    // A new connection gets a working device; the writes it never saw answered may
    // or may not be there, but each block holds either its data or zeros, never
    // anything else.
    let mut d = connect(&r.sock);
    for i in 0..16u64 {
        let off = i * CL;
        let (s, back) = d.read((i % 2) as usize, sector(off), BS).unwrap();
        assert_eq!(s, OK);
        assert!(
            back == block(off, 1) || back.iter().all(|&b| b == 0),
            "block at {off} holds neither its write nor zeros"
        );
    }
    assert_eq!(d.write(1, sector(3 * CL + BS as u64), &block(7, 7)).unwrap(), OK);
    assert_eq!(d.read(0, sector(3 * CL + BS as u64), BS).unwrap(), (OK, block(7, 7)));
    assert_eq!(d.flush(0).unwrap(), OK);
}
