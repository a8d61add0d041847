//! The statistics layer (`bdev::iostat`) on real channels: counts per direction,
//! errors, latency histograms, shards reused across channels, QoS holds and held time,
//! copy-on-write and first writes of a volume.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sealdisk::testing::Dir;
use sealdisk::MallocBdev;
use sealdisk::StatsBdev;
use sealdisk::{BdevRef, IoQueue, IoRequest};
use sealdisk::{QosBdev, QosLimits};

fn over(b: BdevRef) -> (BdevRef, Arc<sealdisk::DiskStats>) {
    let s = StatsBdev::new(b);
    let st = s.stats().clone();
    (Arc::new(s), st)
}

#[test]
fn counts_ops_bytes_errors_and_latency_per_direction() {
    let r = reactors(&[0]);
    let (b, st) = over(Arc::new(MallocBdev::new("m", 8 << 20, 512)));
    let data = random_bytes(8192, 7);
    let out = run_ios(
        &r,
        0,
        &b,
        vec![
            Op::Write {
                offset: 0,
                data: data[..4096].to_vec(),
            },
            Op::Write {
                offset: 4096,
                data: data[4096..].to_vec(),
            },
            Op::Write {
                offset: 1 << 20,
                data: vec![1; 512],
            },
            Op::Read { offset: 0, len: 8192 },
            Op::Read {
                offset: 1 << 20,
                len: 512,
            },
            Op::Flush,
            Op::Unmap {
                offset: 1 << 20,
                len: 4096,
            },
            Op::WriteZeroes { offset: 0, len: 8192 },
            // Past the end: an error, counted as such.
            Op::Read {
                offset: 8 << 20,
                len: 4096,
            },
            // Misaligned write: an error.
            Op::Write {
                offset: 100,
                data: vec![0; 512],
            },
        ],
    );
    // The layer hands data and tags through untouched (run_ios checks the tags).
    assert_eq!(out[3].data, data);
    assert!(out[8].result.is_err() && out[9].result.is_err());
    let s = st.snapshot();
    let rd = s.dir(Dir::Read);
    assert_eq!((rd.ops, rd.bytes, rd.errors), (2, 8192 + 512, 1));
    let wr = s.dir(Dir::Write);
    assert_eq!((wr.ops, wr.bytes, wr.errors), (3, 8192 + 512, 1));
    let fl = s.dir(Dir::Flush);
    assert_eq!((fl.ops, fl.bytes, fl.errors), (1, 0, 0));
    let di = s.dir(Dir::Discard);
    assert_eq!((di.ops, di.bytes, di.errors), (2, 4096 + 8192, 0));
    assert_eq!(s.errors(), 2);
    for d in Dir::ALL {
        let x = s.dir(d);
        assert_eq!(x.hist.count(), x.ops, "{d:?}: one latency per completed request");
        assert!(x.lat_ns > 0, "{d:?}: latency summed");
        assert!(x.hist.quantile(1.0) >= x.lat_ns / x.ops.max(1), "{d:?}: max >= mean");
    }
    // Nothing below counts QoS or copy-on-write here.
    assert_eq!(s.layers, Default::default());
}

#[test]
fn channels_in_turn_reuse_one_shard_and_channels_at_once_get_their_own() {
    let r = reactors(&[0, 1]);
    let (b, st) = over(Arc::new(MallocBdev::new("m", 1 << 20, 512)));
    for i in 0..3u64 {
        run_ios(
            &r,
            (i % 2) as usize,
            &b,
            vec![Op::Write {
                offset: i * 4096,
                data: vec![i as u8; 4096],
            }],
        );
    }
    assert_eq!(st.shards(), 1, "each channel released its shard for the next");
    assert_eq!(st.snapshot().dir(Dir::Write).ops, 3);
    // Two channels open at once: a shard each, counts summed.
    let bd = b.clone();
    r.call(1, Duration::from_secs(30), move |ctx| {
        let mut chans = [
            IoQueue::new(bd.open_channel(&ctx.chan).unwrap()),
            IoQueue::new(bd.open_channel(&ctx.chan).unwrap()),
        ];
        for k in 0..100u64 {
            let q = &mut chans[(k % 2) as usize];
            let mut buf = ctx.chan.pool.alloc(512).unwrap();
            buf.set_len(512);
            submit(q, IoRequest::read(k * 512, buf, k));
            assert_eq!(wait_next(q).tag, k);
        }
    })
    .unwrap();
    assert_eq!(st.shards(), 2);
    assert_eq!(st.snapshot().dir(Dir::Read).ops, 100);
}

#[test]
fn qos_holds_and_held_time_are_counted() {
    let r = reactors(&[0]);
    // 10 IOPS, a burst of 1: of 5 requests sent at once, 4 are held.
    let q: BdevRef = Arc::new(QosBdev::new(
        Arc::new(MallocBdev::new("m", 1 << 20, 512)),
        QosLimits {
            iops: Some(10),
            bytes_per_sec: None,
        },
    ));
    let (b, st) = over(q);
    let bd = b.clone();
    r.call(0, Duration::from_secs(30), move |ctx| {
        let mut q = IoQueue::new(bd.open_channel(&ctx.chan).unwrap());
        for k in 0..5u64 {
            let mut buf = ctx.chan.pool.alloc(512).unwrap();
            buf.set_len(512);
            submit(&mut q, IoRequest::read(k * 512, buf, k));
        }
        let mut tags: Vec<u64> = (0..5).map(|_| wait_next(&mut q).tag).collect();
        tags.sort();
        assert_eq!(tags, [0, 1, 2, 3, 4]);
    })
    .unwrap();
    let s = st.snapshot();
    assert_eq!(s.layers.qos_holds, 4);
    // The held requests waited for 100, 200, 300, 400 ms of rate at least.
    assert!(
        s.layers.qos_held_ns >= 900_000_000,
        "held {} ns in all",
        s.layers.qos_held_ns
    );
    let rd = s.dir(Dir::Read);
    assert_eq!(rd.ops, 5);
    assert!(rd.hist.quantile(0.99) >= 390_000_000, "the last read waited ~400 ms");
}

#[test]
fn volume_first_writes_and_copy_on_write_are_counted() {
    let dir = TempDir::new("iostat-vol");
    let db = Arc::new(redb::Database::create(dir.0.join("catalog.redb")).unwrap());
    let pool = sealdisk::Pool::open_with(db.clone(), &dir.0.join("pool.img"), 16 << 20, 64 << 10).unwrap();
    let w = db.begin_write().unwrap();
    pool.create_volume(&w, "d-1", 1 << 20).unwrap();
    w.commit().unwrap();
    let r = reactors(&[0]);
    let (b, st) = over(pool.bdev("d-1").unwrap());
    let write = |off: u64| {
        let out = run_ios(
            &r,
            0,
            &b,
            vec![Op::Write {
                offset: off,
                data: vec![7; 4096],
            }],
        );
        out[0].result.clone().unwrap();
    };
    write(0);
    write(64 << 10);
    write(4096); // in place: the cluster is the volume's own
    let s = st.snapshot().layers;
    assert_eq!((s.cluster_allocs, s.cow_copies), (2, 0));
    let w = db.begin_write().unwrap();
    pool.clone_volume(&w, "d-1", "s-1", 1 << 20).unwrap();
    w.commit().unwrap();
    write(8192); // shared with the snapshot now: copied
    write(12288); // the copy is the volume's own
    let s = st.snapshot();
    assert_eq!((s.layers.cluster_allocs, s.layers.cow_copies), (2, 1));
    assert_eq!(s.dir(Dir::Write).ops, 5);
}

#[test]
fn a_request_after_an_idle_spell_is_stamped_afresh() {
    let r = reactors(&[0]);
    let (b, st) = over(Arc::new(MallocBdev::new("m", 1 << 20, 512)));
    let bd = b.clone();
    r.call(0, Duration::from_secs(30), move |ctx| {
        let mut q = IoQueue::new(bd.open_channel(&ctx.chan).unwrap());
        for k in 0..3u64 {
            let mut buf = ctx.chan.pool.alloc(512).unwrap();
            buf.set_len(512);
            submit(&mut q, IoRequest::read(0, buf, k));
            assert_eq!(wait_next(&mut q).tag, k);
            // Idle: no request in flight, the channel not polled.
            std::thread::sleep(Duration::from_millis(300));
        }
    })
    .unwrap();
    let rd = st.snapshot().dirs[Dir::Read as usize].clone();
    assert_eq!(rd.ops, 3);
    // None of the idle time counts as latency (a malloc read takes microseconds).
    assert!(
        rd.hist.quantile(1.0) < 250_000_000,
        "max latency {} ns",
        rd.hist.quantile(1.0)
    );
}
