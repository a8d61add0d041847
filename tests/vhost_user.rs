//! The vhost-user-blk frontend in process, no VM: the test is the VMM (the driver in
//! `sealdisk::bench::vhost` over the disk's socket, memfd guest memory, split
//! virtqueues with EVENT_IDX), the disk an encrypted RAM disk on two reactors.
//! Negotiation and config; reads, writes (pipelined, multi-segment), flush, discard,
//! write-zeroes and GET_ID on both queues; ciphertext at rest; every malformed chain
//! answered without harm; read-only disks; disconnect and reconnect; a detach that
//! drains the queues and drops the key.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use common::Op;
use sealdisk::testing::vmm::Seg;
use sealdisk::testing::vmm::{blk_header, BlkOp, RawDesc, STATUS_UNWRITTEN};
use sealdisk::testing::vmm::{Driver, DriverOptions};
use sealdisk::BdevRef;
use sealdisk::CryptoBdev;
use sealdisk::Export;
use sealdisk::MallocBdev;
use sealdisk::Reactors;
use sealdisk::Xts;
use sealdisk::{VhostConfig, VhostServer};
use vhost::vhost_user::VhostUserProtocolFeatures as P;

const MIB: u64 = 1 << 20;
const CAP: u64 = 16 * MIB;
const DISK: &str = "d-vhosttest0001";
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct Rig {
    dir: PathBuf,
    reactors: Arc<Reactors>,
    server: Arc<VhostServer>,
    sock: PathBuf,
    xts: Arc<Xts>,
    ram: BdevRef,
    /// Removes the directory on drop, after everything above.
    _tmp: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.remove_all();
    }
}

fn rig(name: &str, read_only: bool) -> Rig {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("sealdisk-vhost-{name}-"))
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let reactors = Arc::new(common::reactors(&[0, 1]));
    let ram: BdevRef = Arc::new(MallocBdev::new("ram", CAP, 512));
    let xts = common::xts(3);
    let disk: BdevRef = Arc::new(CryptoBdev::new(ram.clone(), xts.clone(), 4096).unwrap());
    let server = VhostServer::new(
        VhostConfig {
            instances_dir: dir.join("instances"),
            gid: None,
            num_queues: Some(2),
        },
        reactors.clone(),
    );
    let sock = server.add("i-test", Export::new(DISK, disk, read_only)).unwrap();
    Rig {
        _tmp: tmp,
        dir,
        reactors,
        server,
        sock,
        xts,
        ram,
    }
}

fn connect(r: &Rig) -> Driver {
    Driver::connect(&r.sock, &DriverOptions::default()).expect("connect")
}

fn sector(off: u64) -> u64 {
    off / 512
}

#[test]
fn negotiation_and_config() {
    let r = rig("nego", false);
    assert_eq!(
        r.sock,
        r.dir.join("instances/i-test/vhost").join(format!("{DISK}.sock"))
    );
    let d = connect(&r);
    let n = d.negotiated();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert!(n.device_features & (1 << b) != 0, "feature bit {b} not offered");
    }
    assert_eq!(
        n.device_features & (1 << VIRTIO_BLK_F_RO),
        0,
        "a writable disk is not RO"
    );
    for p in [
        P::CONFIG,
        P::MQ,
        P::REPLY_ACK,
        P::CONFIGURE_MEM_SLOTS,
        P::INFLIGHT_SHMFD,
    ] {
        assert!(n.protocol_offered & p.bits() != 0, "protocol feature {p:?} not offered");
    }
    assert_eq!(n.queue_num, Some(2));
    let c = d.config();
    assert_eq!(c.capacity, CAP / 512);
    assert_eq!(c.blk_size, 4096, "the encrypted disk's block size");
    assert_eq!(c.num_queues, 2);
    assert!(c.seg_max >= 64, "SEG_MAX {}", c.seg_max);
    assert!(c.size_max >= 64 << 10, "SIZE_MAX {}", c.size_max);
    assert_eq!(d.num_queues(), 2);
}

#[test]
fn io_on_both_queues_with_ciphertext_at_rest() {
    let r = rig("io", false);
    let mut d = connect(&r);
    // Pipelined: 32 writes in flight per queue, then 32 reads, both queues.
    for q in 0..2 {
        let mut bufs = Vec::new();
        let mut ids = Vec::new();
        for i in 0..32u64 {
            let off = (q as u64 * 32 + i) * 64 * 1024;
            let data = common::random_bytes(64 * 1024, off + 1);
            let mut b = d.alloc(data.len()).unwrap();
            b.as_mut_slice().copy_from_slice(&data);
            let segs = [b.seg()];
            ids.push(
                d.queue(q)
                    .push(&BlkOp::Write {
                        sector: sector(off),
                        segs: &segs,
                    })
                    .unwrap(),
            );
            bufs.push(b);
        }
        d.queue(q).publish();
        assert!(d.queue(q).in_flight() >= 16, "queue depth at least 16");
        for id in ids {
            let c = d.queue(q).wait_for(id, Duration::from_secs(10)).unwrap();
            assert_eq!(c.status, OK);
        }
    }
    for q in 0..2 {
        let mut bufs = Vec::new();
        let mut ids = Vec::new();
        for i in 0..32u64 {
            let off = (q as u64 * 32 + i) * 64 * 1024;
            let b = d.alloc(64 * 1024).unwrap();
            let segs = [b.seg()];
            ids.push(
                d.queue(1 - q)
                    .push(&BlkOp::Read {
                        sector: sector(off),
                        segs: &segs,
                    })
                    .unwrap(),
            );
            bufs.push((off, b));
        }
        d.queue(1 - q).publish();
        for id in ids {
            let c = d.queue(1 - q).wait_for(id, Duration::from_secs(10)).unwrap();
            assert_eq!(c.status, OK);
            assert_eq!(c.len, 64 * 1024 + 1, "used length: data and status byte");
        }
        for (off, b) in &bufs {
            assert!(
                b.as_slice() == &common::random_bytes(64 * 1024, off + 1)[..],
                "data at {off}"
            );
        }
    }
    // Multi-segment, unaligned to the cipher's sectors (512-byte pieces) and large
    // (1 MiB, split below): same data back.
    let data = common::random_bytes(MIB as usize, 99);
    let parts: Vec<&[u8]> = std::iter::once(&data[..512])
        .chain(std::iter::once(&data[512..4096 + 512]))
        .chain(data[4096 + 512..].chunks(128 * 1024))
        .collect();
    assert_eq!(d.write_v(0, sector(8 * MIB), &parts).unwrap(), OK);
    let (st, back) = d
        .read_v(
            1,
            sector(8 * MIB),
            &[4096, 1000 * 512, MIB as usize - 4096 - 1000 * 512],
        )
        .unwrap();
    assert_eq!(st, OK);
    assert!(back == data, "multi-segment read-back differs");

    // At rest: the RAM disk holds the XTS ciphertext of what was written.
    let half = MIB as usize / 2;
    let raw = common::run_ios(
        &r.reactors,
        0,
        &r.ram,
        vec![
            Op::Read {
                offset: 8 * MIB,
                len: half,
            },
            Op::Read {
                offset: 8 * MIB + half as u64,
                len: half,
            },
        ],
    );
    assert!(raw.iter().all(common::is_ok));
    let at_rest: Vec<u8> = raw.iter().flat_map(|d| d.data.iter().copied()).collect();
    let mut expect = data.clone();
    r.xts.encrypt_sectors(&mut expect, 8 * MIB / 4096, 4096).unwrap();
    assert!(at_rest == expect, "the RAM disk holds the ciphertext");
    assert!(at_rest[..4096] != data[..4096]);

    // Flush, GET_ID.
    assert_eq!(d.flush(0).unwrap(), OK);
    assert_eq!(d.flush(1).unwrap(), OK);
    assert_eq!(d.get_id(1).unwrap(), DISK);
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let r = rig("trim", false);
    let mut d = connect(&r);
    let data = common::random_bytes(256 * 1024, 5);
    assert_eq!(d.write(0, 0, &data).unwrap(), OK);
    assert_eq!(d.discard(0, sector(64 * 1024), 128).unwrap(), OK);
    assert_eq!(d.write_zeroes(1, sector(192 * 1024), 128, true).unwrap(), OK);
    let (st, back) = d.read(1, 0, 256 * 1024).unwrap();
    assert_eq!(st, OK);
    assert!(back[..64 * 1024] == data[..64 * 1024]);
    assert!(
        back[64 * 1024..128 * 1024].iter().all(|&b| b == 0),
        "discarded range reads zeros"
    );
    assert!(back[128 * 1024..192 * 1024] == data[128 * 1024..192 * 1024]);
    assert!(back[192 * 1024..].iter().all(|&b| b == 0), "zeroed range reads zeros");
    // Misaligned to the 4 KiB block and past the end: refused, nothing changes.
    assert_eq!(d.discard(0, 1, 8).unwrap(), IOERR);
    assert_eq!(d.write_zeroes(0, sector(CAP) - 8, 16, false).unwrap(), IOERR);
    assert!(d.read(0, 0, 64 * 1024).unwrap().1 == data[..64 * 1024]);
}

#[test]
fn bad_requests_are_answered_and_change_nothing() {
    let r = rig("bad", false);
    let mut d = connect(&r);
    let data = common::random_bytes(4096, 7);
    assert_eq!(d.write(0, 0, &data).unwrap(), OK);
    // Past the end, straddling the end, misaligned to the 4 KiB block, zero-length
    // and odd-length data, unknown type.
    let w = |d: &mut Driver, s: u64, n: usize| d.write(0, s, &vec![0xAB; n]).unwrap();
    assert_eq!(w(&mut d, sector(CAP), 4096), IOERR);
    assert_eq!(w(&mut d, sector(CAP) - 4, 4096), IOERR);
    assert_eq!(w(&mut d, u64::MAX / 512, 4096), IOERR);
    assert_eq!(w(&mut d, 1, 4096), IOERR);
    assert_eq!(w(&mut d, 0, 1000), IOERR);
    assert_eq!(d.read(0, sector(CAP), 4096).unwrap().0, IOERR);
    let b = d.alloc(512).unwrap();
    let segs = [b.seg()];
    let c = d
        .run(
            1,
            &BlkOp::Other {
                type_: 0x55,
                sector: 0,
                segs: &segs,
                device_writes: false,
            },
        )
        .unwrap();
    assert_eq!(c.status, UNSUPP);
    // A read with device-readable data buffers (wrong direction).
    let c = d
        .run(
            1,
            &BlkOp::Other {
                type_: VIRTIO_BLK_T_IN,
                sector: 0,
                segs: &segs,
                device_writes: false,
            },
        )
        .unwrap();
    assert_eq!(c.status, IOERR);
    assert_eq!(d.read(1, 0, 4096).unwrap(), (OK, data.clone()), "nothing changed");
}

/// Malformed descriptor chains, written by hand into queue `q`'s table: each is
/// answered (IOERR, or returned used without a status when it has none) and the
/// queue keeps working.
#[test]
fn malformed_chains_never_hurt_the_daemon() {
    let r = rig("chains", false);
    let mut d = connect(&r);
    let data = common::random_bytes(4096, 11);
    assert_eq!(d.write(0, 0, &data).unwrap(), OK);
    let mem_size = DriverOptions::default().mem_size;
    let hdr = d.alloc(16).unwrap();
    let buf = d.alloc(4096).unwrap();
    let st = d.alloc(1).unwrap();
    let (h, b, s) = (hdr.gpa(), buf.gpa(), st.gpa());
    let mem = d.mem().clone();
    let set_hdr = |t: u32, sec: u64| mem.write_at(h, &blk_header(t, sec)).unwrap();
    let q = d.queue(0).size();
    let (i0, i1, i2) = (q - 3, q - 2, q - 1);
    let write_ro = |addr, len, next| RawDesc::read(addr, len, next);
    let write_w = |addr, len, next| RawDesc::write(addr, len, next);
    // (what, descriptors, head, the status byte the test must find afterwards)
    type Case = (&'static str, Vec<(u16, RawDesc)>, u16, u8);
    let cases: Vec<Case> = vec![
        (
            "data outside the memory table",
            vec![
                (i0, write_ro(h, 16, Some(i1))),
                (i1, write_w(mem_size + (1 << 30), 4096, Some(i2))),
                (i2, write_w(s, 1, None)),
            ],
            i0,
            IOERR,
        ),
        (
            "buffer running off the end of guest memory",
            vec![
                (i0, write_ro(h, 16, Some(i1))),
                (i1, write_w(mem_size - 512, 4096, Some(i2))),
                (i2, write_w(s, 1, None)),
            ],
            i0,
            IOERR,
        ),
        (
            "header shorter than 16 bytes",
            vec![
                (i0, write_ro(h, 8, Some(i1))),
                (i1, write_w(b, 4096, Some(i2))),
                (i2, write_w(s, 1, None)),
            ],
            i0,
            IOERR,
        ),
        (
            "header in a device-writable descriptor",
            vec![
                (i0, write_w(h, 16, Some(i1))),
                (i1, write_w(b, 4096, Some(i2))),
                (i2, write_w(s, 1, None)),
            ],
            i0,
            IOERR,
        ),
        // The chain never ends, so no descriptor is its status byte: returned used
        // with nothing written.
        (
            "a loop",
            vec![
                (i0, write_ro(h, 16, Some(i1))),
                (i1, write_w(b, 4096, Some(i2))),
                (i2, write_w(s, 1, Some(i0))),
            ],
            i0,
            STATUS_UNWRITTEN,
        ),
        (
            "next index past the queue",
            vec![(i0, write_ro(h, 16, Some(i1))), (i1, write_w(b, 4096, Some(q + 5)))],
            i0,
            STATUS_UNWRITTEN,
        ),
        (
            "status byte in a read-only descriptor",
            vec![
                (i0, write_ro(h, 16, Some(i1))),
                (i1, write_w(b, 4096, Some(i2))),
                (i2, write_ro(s, 1, None)),
            ],
            i0,
            STATUS_UNWRITTEN,
        ),
        (
            "status descriptor of length 0",
            vec![
                (i0, write_ro(h, 16, Some(i1))),
                (i1, write_w(b, 4096, Some(i2))),
                (i2, write_w(s, 0, None)),
            ],
            i0,
            STATUS_UNWRITTEN,
        ),
        (
            "a lone descriptor",
            vec![(i0, write_w(s, 1, None))],
            i0,
            STATUS_UNWRITTEN,
        ),
    ];
    for (what, descs, head, want) in cases {
        set_hdr(VIRTIO_BLK_T_IN, 0);
        let _ = mem.write_at(b, &[0x5A; 4096]);
        let id = d.queue(0).push_raw(&descs, head, Some(s)).unwrap();
        let c = d
            .queue(0)
            .wait_for(id, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(c.status, want, "{what}");
        let mut after = [0u8; 4096];
        mem.read_at(b, &mut after).unwrap();
        assert_eq!(after, [0x5A; 4096], "{what}: the data buffer was not written");
        // The queue still works.
        assert_eq!(d.read(0, 0, 4096).unwrap(), (OK, data.clone()), "after {what}");
    }
    // A chain longer than the queue (every descriptor chained to the next, the last
    // to the first): cut off, answered IOERR through its last status-looking descriptor
    // or returned used; either way the queue goes on.
    let n = d.queue(1).size();
    let mut long: Vec<(u16, RawDesc)> = vec![(0, write_ro(h, 16, Some(1)))];
    for i in 1..n {
        long.push((i, write_w(b, 512, Some((i + 1) % n))));
    }
    let free = d.queue(1).free_descs();
    assert_eq!(free as u16, n, "queue 1 is idle");
    let id = d.queue(1).push_raw(&long, 0, Some(s)).unwrap();
    let c = d.queue(1).wait_for(id, Duration::from_secs(10)).unwrap();
    assert_ne!(c.status, OK, "a chain longer than the queue is refused");
    assert_eq!(d.read(1, 0, 4096).unwrap(), (OK, data.clone()));
    // A head index past the queue size: consumed without a used entry; the queue goes on.
    let _ = d.queue(0).push_raw(&[], q + 7, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.read(0, 0, 4096).unwrap(), (OK, data.clone()));
    let _ = Seg { gpa: 0, len: 0 };
}

#[test]
fn read_only_disk_refuses_writes() {
    let r = rig("ro", true);
    let mut d = connect(&r);
    assert!(
        d.negotiated().device_features & (1 << VIRTIO_BLK_F_RO) != 0,
        "RO offered"
    );
    assert_eq!(d.negotiated().device_features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(d.write(0, 0, &[1u8; 4096]).unwrap(), IOERR);
    assert_eq!(d.write_zeroes(0, 0, 8, false).unwrap(), IOERR);
    assert_eq!(d.read(0, 0, 4096).unwrap(), (OK, vec![0u8; 4096]));
}

#[test]
fn disconnect_and_reconnect_get_a_working_device() {
    let r = rig("reconnect", false);
    let data = common::random_bytes(64 * 1024, 21);
    {
        let mut d = connect(&r);
        assert_eq!(d.write(0, 0, &data).unwrap(), OK);
        // Requests in flight when the VMM goes away.
        let bufs: Vec<_> = (0..16).map(|_| d.alloc(4096).unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let segs = [b.seg()];
            d.queue(1)
                .push(&BlkOp::Read {
                    sector: 8 * i as u64,
                    segs: &segs,
                })
                .unwrap();
        }
        d.queue(1).publish();
        d.disconnect();
    }
    for round in 0..3 {
        let mut d = connect(&r);
        assert_eq!(
            d.read(round % 2, 0, 64 * 1024).unwrap(),
            (OK, data.clone()),
            "round {round}"
        );
        assert_eq!(d.write(1, sector(MIB), &data).unwrap(), OK);
        let stopped = d.stop().unwrap();
        assert_eq!(stopped.len(), 2, "GET_VRING_BASE on both queues");
    }
}

#[test]
fn detach_drains_and_drops_the_key() {
    let r = rig("detach", false);
    let mut d = connect(&r);
    let data = common::random_bytes(128 * 1024, 31);
    let mut bufs = Vec::new();
    let mut ids = Vec::new();
    for i in 0..24u64 {
        let mut b = d.alloc(data.len()).unwrap();
        b.as_mut_slice().copy_from_slice(&data);
        let segs = [b.seg()];
        ids.push(
            d.queue(0)
                .push(&BlkOp::Write {
                    sector: i * 256,
                    segs: &segs,
                })
                .unwrap(),
        );
        bufs.push(b);
    }
    d.queue(0).publish();
    let before = Arc::strong_count(&r.xts);
    r.server.remove("i-test", DISK);
    assert!(!r.sock.exists(), "the socket goes");
    // Every request that was taken got its answer before the device stopped.
    let done = d.queue(0).poll();
    for c in &done {
        assert_eq!(c.status, OK);
    }
    assert!(
        Arc::strong_count(&r.xts) < before,
        "the data path let go of the key ({} -> {})",
        before,
        Arc::strong_count(&r.xts)
    );
    assert!(std::os::unix::net::UnixStream::connect(&r.sock).is_err());
}

/// An idle VM costs nothing: with the device set up and no requests, the reactors park
/// (the queues wait on their kick eventfds in the rings) instead of polling; the next
/// request wakes them and is answered. The reactors count the requests served.
#[test]
fn idle_queues_park_and_a_kick_wakes_them() {
    let r = rig("idle", false);
    let mut d = connect(&r);
    let data = common::random_bytes(4096, 41);
    assert_eq!(d.write(0, 0, &data).unwrap(), OK);
    assert_eq!(d.write(1, 8, &data).unwrap(), OK);
    std::thread::sleep(Duration::from_millis(200));
    let before = r.reactors.stats();
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let after = r.reactors.stats();
    let wall = t.elapsed().as_nanos() as u64;
    for (a, b) in after.iter().zip(&before) {
        let d = a.since(b);
        let busy = d.busy_ns;
        assert!(
            busy < wall / 20,
            "an idle reactor was busy {busy} ns of {wall} ns (it should park on the kick eventfd)"
        );
        // Idle spinning counts as idle time, so parking shows in the loop count: a
        // parked reactor iterates a few times a second, a spinning one millions.
        assert!(
            d.polls < 1000,
            "an idle reactor looped {} times in {wall} ns (it should park on the kick eventfd): {d:?}",
            d.polls
        );
    }
    // The kick after the idle second wakes the parked reactors.
    for q in 0..2 {
        assert_eq!(d.read(q, 8 * q as u64, 4096).unwrap(), (OK, data.clone()), "queue {q}");
    }
    // The counters follow the answers within the reactor's loop iteration.
    let t = std::time::Instant::now();
    let mut ios = 0;
    while t.elapsed() < Duration::from_secs(5) {
        ios = r.reactors.stats().iter().map(|s| s.ios).sum::<u64>();
        if ios >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ios >= 4, "the reactors count vhost-user requests ({ios})");
}

/// Memory hot-plug (ADD_MEM_REG / REM_MEM_REG, CONFIGURE_MEM_SLOTS): a range the
/// backend cannot reach until it is added, can while it is in the table, and cannot
/// again once it is removed; bad adds and removes are refused and change nothing.
#[test]
fn memory_regions_added_and_removed_at_run_time() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
    let r = rig("hotplug", false);
    let hole = 32 * MIB..40 * MIB;
    let mut d = Driver::connect(
        &r.sock,
        &DriverOptions {
            mem_hole: Some(hole.clone()),
            ..DriverOptions::default()
        },
    )
    .expect("connect");
    let data = common::random_bytes(4096, 21);
    assert_eq!(d.write(0, 0, &data).unwrap(), OK);
    let mem = d.mem().clone();
    let hdr = d.alloc(16).unwrap();
    let st = d.alloc(1).unwrap();
    let (h, s, b) = (hdr.gpa(), st.gpa(), hole.start + 4096);
    let q = d.queue(0).size();
    // A read of sector 0 into the hole, or a write of sector 64 from it.
    let run = |d: &mut Driver, write: bool| {
        let t = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
        let sec = if write { 64 } else { 0 };
        mem.write_at(h, &blk_header(t, sec)).unwrap();
        let data_desc = if write {
            RawDesc::read(b, 4096, Some(q - 1))
        } else {
            RawDesc::write(b, 4096, Some(q - 1))
        };
        let descs = [
            (q - 3, RawDesc::read(h, 16, Some(q - 2))),
            (q - 2, data_desc),
            (q - 1, RawDesc::write(s, 1, None)),
        ];
        let id = d.queue(0).push_raw(&descs, q - 3, Some(s)).unwrap();
        d.queue(0).wait_for(id, Duration::from_secs(10)).unwrap().status
    };
    let at_b = |m: &sealdisk::testing::vmm::GuestMem| {
        let mut v = vec![0u8; 4096];
        m.read_at(b, &mut v).unwrap();
        v
    };
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: hole.start,
        memory_size: hole.end - hole.start,
        userspace_addr: mem.hva(hole.start),
        mmap_offset: hole.start,
        mmap_handle: mem.fd(),
    };

    // Not in the table yet: refused, the range untouched.
    mem.fill(b, 4096, 0x5A).unwrap();
    assert_eq!(run(&mut d, false), IOERR, "a buffer outside the table");
    assert_eq!(at_b(&mem), vec![0x5A; 4096]);

    // Added: reads land there, decrypted; writes come from there.
    d.frontend().add_mem_region(&region).expect("ADD_MEM_REG");
    assert_eq!(run(&mut d, false), OK, "a buffer in the added region");
    assert!(at_b(&mem) == data, "the read landed in the added region");
    let fresh = common::random_bytes(4096, 22);
    mem.write_at(b, &fresh).unwrap();
    assert_eq!(run(&mut d, true), OK);
    assert_eq!(d.read(1, 64, 4096).unwrap(), (OK, fresh.clone()));

    // Adding it twice (overlapping a region in the table) is refused; the table and
    // the queues go on as they were.
    assert!(
        d.frontend().add_mem_region(&region).is_err(),
        "an overlapping region is refused"
    );
    assert_eq!(run(&mut d, false), OK, "the region is still there after a refused add");
    let elsewhere = VhostUserMemoryRegionInfo {
        guest_phys_addr: 1 << 40,
        ..region
    };
    assert!(
        d.frontend().remove_mem_region(&elsewhere).is_err(),
        "removing an unknown region is refused"
    );

    // Removed: out of reach again; the rest of memory works.
    d.frontend().remove_mem_region(&region).expect("REM_MEM_REG");
    mem.fill(b, 4096, 0x5A).unwrap();
    assert_eq!(run(&mut d, false), IOERR, "a buffer in a removed region");
    assert_eq!(at_b(&mem), vec![0x5A; 4096], "nothing written into a removed region");
    assert_eq!(d.read(1, 0, 4096).unwrap(), (OK, data.clone()));
    assert_eq!(d.read(0, 64, 4096).unwrap(), (OK, fresh.clone()));

    // A whole new table whose regions come highest address first (VMMs do not sort):
    // taken as it is, the queues go on.
    let mut table = mem.regions();
    table.reverse();
    assert!(table.len() == 2 && table[0].guest_phys_addr > table[1].guest_phys_addr);
    d.frontend()
        .set_mem_table(&table)
        .expect("SET_MEM_TABLE, regions unsorted");
    assert_eq!(d.read(0, 0, 4096).unwrap(), (OK, data));
    assert_eq!(d.read(1, 64, 4096).unwrap(), (OK, fresh));
}
