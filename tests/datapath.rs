//! The data path: reactors, bdevs and the crypto layer, with real I/O.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sealdisk::CryptoBdev;
use sealdisk::MallocBdev;
use sealdisk::NullBdev;
use sealdisk::{BdevRef, IoError, IoQueue, IoRequest, MAX_IO_BYTES};
use sealdisk::{ReactorConfig, Reactors, SendError};
use sealdisk::{UringBdev, UringOpts};

/// A RAM disk and an O_DIRECT file in a temporary directory (removed when the returned
/// `TempDir` drops).
fn backends(tag: &str) -> (TempDir, Vec<(String, BdevRef)>) {
    let dir = TempDir::new(tag);
    let file = UringBdev::open(
        &dir.0.join("disk.img"),
        &UringOpts {
            create_size: Some(16 << 20),
            buffered: false,
            ..UringOpts::default()
        },
    )
    .expect("O_DIRECT file in the temp dir");
    let bdevs = vec![
        (
            "malloc".into(),
            Arc::new(MallocBdev::new("m", 16 << 20, 512)) as BdevRef,
        ),
        ("uring-file".into(), Arc::new(file) as BdevRef),
    ];
    (dir, bdevs)
}

#[test]
fn crypto_layer_round_trips_and_stores_ciphertext_at_the_right_sectors() {
    let r = reactors(&[0]);
    let (_dir, bdevs) = backends("integrity");
    for (name, base) in bdevs {
        for ss in [512u32, 4096] {
            let xts = xts(ss as u8);
            let enc: BdevRef = Arc::new(CryptoBdev::new(base.clone(), xts.clone(), ss).unwrap());
            // O_DIRECT writes are read by the device, so the layer fills its
            // bounce buffers with streaming stores there (and only there).
            assert_eq!(enc.dma_writes(), name == "uring-file", "{name}");
            let cases = [
                (0u64, 4096usize),
                (ss as u64 * 7, 3 * ss as usize),
                // The largest one-piece write, and the smallest split one.
                (2 << 20, 128 << 10),
                (3 << 20, (128 << 10) + ss as usize),
                (1 << 20, 256 << 10),
                (15 << 20, 512 << 10),
            ];
            for (i, &(off, len)) in cases.iter().enumerate() {
                let data = random_bytes(len, i as u64 + 1);
                let out = run_ios(
                    &r,
                    0,
                    &enc,
                    vec![
                        Op::Write {
                            offset: off,
                            data: data.clone(),
                        },
                        Op::Read { offset: off, len },
                    ],
                );
                assert!(out[0].result.is_ok(), "{name}: write {:?}", out[0].result);
                assert_eq!(out[0].data, data, "{name}: the caller's write buffer was modified");
                assert_eq!(out[1].data, data, "{name} ss={ss}: read back differs at {off}");
                // The device below holds XTS ciphertext with sector = offset / ss.
                let raw = run_ios(&r, 0, &base, vec![Op::Read { offset: off, len }]);
                let mut expect = data.clone();
                xts.encrypt_sectors(&mut expect, off / ss as u64, ss as usize).unwrap();
                assert_eq!(
                    raw[0].data, expect,
                    "{name} ss={ss}: stored bytes are not the expected ciphertext"
                );
                assert_ne!(raw[0].data, data);
            }
        }
    }
}

#[test]
fn unwritten_unmapped_and_zeroed_ranges_read_as_zeros() {
    let r = reactors(&[0]);
    let (_dir, bdevs) = backends("zeros");
    for (name, base) in bdevs {
        let enc: BdevRef = Arc::new(CryptoBdev::new(base.clone(), xts(9), 4096).unwrap());
        let data = random_bytes(64 << 10, 77);
        let out = run_ios(
            &r,
            0,
            &enc,
            vec![
                Op::Read {
                    offset: 8 << 20,
                    len: 8192,
                },
                Op::Write {
                    offset: 0,
                    data: data.clone(),
                },
                Op::Unmap {
                    offset: 0,
                    len: 16 << 10,
                },
                Op::WriteZeroes {
                    offset: 32 << 10,
                    len: 8 << 10,
                },
                Op::Flush,
                Op::Read {
                    offset: 0,
                    len: 64 << 10,
                },
            ],
        );
        assert!(
            out.iter().all(is_ok),
            "{name}: {:?}",
            out.iter().map(|d| &d.result).collect::<Vec<_>>()
        );
        assert!(
            out[0].data.iter().all(|&b| b == 0),
            "{name}: never-written range must read as zeros"
        );
        let back = &out[5].data;
        assert!(
            back[..16 << 10].iter().all(|&b| b == 0),
            "{name}: unmapped range must read as zeros"
        );
        assert_eq!(&back[16 << 10..32 << 10], &data[16 << 10..32 << 10]);
        assert!(
            back[32 << 10..40 << 10].iter().all(|&b| b == 0),
            "{name}: write-zeroes range must read as zeros"
        );
        assert_eq!(&back[40 << 10..], &data[40 << 10..]);
    }
}

#[test]
fn bad_requests_complete_with_clear_errors() {
    let r = reactors(&[0]);
    let (_dir, mut all) = backends("bad");
    let base = all[0].1.clone();
    all.push((
        "crypto".into(),
        Arc::new(CryptoBdev::new(base, xts(3), 4096).unwrap()) as BdevRef,
    ));
    all.push(("null".into(), Arc::new(NullBdev::new("n", 16 << 20, 512)) as BdevRef));
    for (name, b) in all {
        let bs = b.block_size() as u64;
        let cap = b.capacity();
        let out = run_ios(
            &r,
            0,
            &b,
            vec![
                Op::Read {
                    offset: cap,
                    len: bs as usize,
                },
                Op::Read {
                    offset: cap - bs,
                    len: 2 * bs as usize,
                },
                Op::Write {
                    offset: 1,
                    data: vec![0; bs as usize],
                },
                Op::Write {
                    offset: 0,
                    data: vec![0; bs as usize + 1],
                },
                Op::Read {
                    offset: 0,
                    len: (MAX_IO_BYTES + bs) as usize,
                },
                Op::Unmap { offset: 0, len: 0 },
                Op::WriteZeroes {
                    offset: cap - bs,
                    len: 2 * bs,
                },
            ],
        );
        assert!(
            matches!(out[0].result, Err(IoError::OutOfRange { .. })),
            "{name}: {:?}",
            out[0].result
        );
        assert!(
            matches!(out[1].result, Err(IoError::OutOfRange { .. })),
            "{name}: {:?}",
            out[1].result
        );
        assert!(
            matches!(out[2].result, Err(IoError::Misaligned { offset: 1, .. })),
            "{name}: {:?}",
            out[2].result
        );
        assert!(
            matches!(out[3].result, Err(IoError::Misaligned { .. })),
            "{name}: {:?}",
            out[3].result
        );
        assert!(
            matches!(out[4].result, Err(IoError::TooLarge { .. })),
            "{name}: {:?}",
            out[4].result
        );
        assert!(
            matches!(out[5].result, Err(IoError::Misaligned { len: 0, .. })),
            "{name}: {:?}",
            out[5].result
        );
        assert!(
            matches!(out[6].result, Err(IoError::OutOfRange { .. })),
            "{name}: {:?}",
            out[6].result
        );
        let msg = out[0].result.as_ref().unwrap_err().to_string();
        assert!(msg.contains("past the end"), "{msg}");
    }
}

#[test]
fn refused_requests_change_nothing() {
    let r = reactors(&[0]);
    let base: BdevRef = Arc::new(MallocBdev::new("m", 1 << 20, 512));
    let enc: BdevRef = Arc::new(CryptoBdev::new(base.clone(), xts(5), 4096).unwrap());
    let before = run_ios(
        &r,
        0,
        &base,
        vec![Op::Read {
            offset: 0,
            len: 1 << 20,
        }],
    );
    let cap = enc.capacity();
    let out = run_ios(
        &r,
        0,
        &enc,
        vec![
            Op::Write {
                offset: cap - 4096,
                data: vec![1; 8192],
            },
            Op::Write {
                offset: 512,
                data: vec![1; 4096],
            },
            Op::Write {
                offset: 0,
                data: vec![1; 1000],
            },
        ],
    );
    assert!(out.iter().all(|d| d.result.is_err()));
    let after = run_ios(
        &r,
        0,
        &base,
        vec![Op::Read {
            offset: 0,
            len: 1 << 20,
        }],
    );
    assert_eq!(before[0].data, after[0].data, "a refused write changed the device");
}

#[test]
fn crypto_layer_applies_back_pressure_when_bounce_buffers_run_out() {
    let cfg = ReactorConfig {
        cores: vec![0],
        pool_bytes: 1 << 20,
        ..ReactorConfig::default()
    };
    let r = Reactors::start(&cfg).unwrap();
    let base: BdevRef = Arc::new(NullBdev::new("n", 64 << 20, 512));
    let enc: BdevRef = Arc::new(CryptoBdev::new(base, xts(1), 4096).unwrap());
    let (refused, completed) = r
        .call(0, Duration::from_secs(10), move |ctx| {
            let mut q = IoQueue::new(enc.open_channel(&ctx.chan).unwrap());
            // The whole 1 MiB arena goes to one caller buffer: no room for a
            // bounce buffer, so the write must be handed back (the queue holds
            // it), not dropped.
            let big = ctx.chan.pool.alloc(256 << 10).unwrap();
            let rest: Vec<_> = std::iter::from_fn(|| ctx.chan.pool.alloc(256 << 10)).collect();
            q.submit(IoRequest::write(0, big, 1)).map_err(|_| ()).unwrap();
            let refused = match q.take_held() {
                Some(req) => req.tag == 1 && req.buf.as_ref().map(|b| b.len()) == Some(256 << 10),
                None => false,
            };
            drop(rest);
            let b = ctx.chan.pool.alloc(4096).unwrap();
            submit(&mut q, IoRequest::write(0, b, 2));
            let c = wait_next(&mut q);
            (refused, c.tag == 2 && c.result.is_ok())
        })
        .unwrap();
    assert!(refused, "an exhausted pool must hand the request back");
    assert!(completed, "after buffers free up, writes go through");
}

#[test]
fn crypto_layer_decrypts_a_large_completion_batch_in_slices() {
    use sealdisk::testing::DECRYPT_BUDGET;
    let r = reactors(&[0]);
    let base: BdevRef = Arc::new(MallocBdev::new("m", 1 << 20, 512));
    let enc: BdevRef = Arc::new(CryptoBdev::new(base, xts(3), 4096).unwrap());
    let (first_poll, total, intact) = r
        .call(0, Duration::from_secs(10), move |ctx| {
            let n = 2 * DECRYPT_BUDGET / 4096;
            let mut q = IoQueue::new(enc.open_channel(&ctx.chan).unwrap());
            for i in 0..n {
                let mut b = ctx.chan.pool.alloc(4096).unwrap();
                b.copy_from_slice(&random_bytes(4096, i as u64));
                submit(&mut q, IoRequest::write(i as u64 * 4096, b, i as u64));
                assert!(wait_next(&mut q).result.is_ok());
            }
            // The reads on a channel of their own, polled by hand: the test
            // counts what each poll hands back.
            let mut ch = enc.open_channel(&ctx.chan).unwrap();
            // The RAM backend completes at once: all n reads are done below
            // before the first poll, and the layer hands them back a budget
            // at a time.
            for i in 0..n {
                let b = ctx.chan.pool.alloc(4096).unwrap();
                ch.submit(IoRequest::read(i as u64 * 4096, b, i as u64))
                    .map_err(|_| ())
                    .unwrap();
            }
            let mut out = Vec::new();
            let first_poll = ch.poll(&mut out);
            let mut polls = 0;
            while out.len() < n && polls < 1000 {
                ch.poll(&mut out);
                polls += 1;
            }
            let intact = out
                .iter()
                .all(|c| c.result.is_ok() && c.buf.as_deref() == Some(&random_bytes(4096, c.tag)[..]));
            (first_poll, out.len(), intact)
        })
        .unwrap();
    assert_eq!(
        first_poll,
        DECRYPT_BUDGET / 4096,
        "one poll decrypts one budget of reads"
    );
    assert_eq!(total, 2 * DECRYPT_BUDGET / 4096, "the rest come on later polls");
    assert!(intact, "every read decrypts to what was written");
}

#[test]
fn full_message_queue_is_back_pressure_not_a_hang() {
    let cfg = ReactorConfig {
        cores: vec![0],
        queue_depth: 2,
        ..ReactorConfig::default()
    };
    let r = Reactors::start(&cfg).unwrap();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    r.send(
        0,
        Box::new(move |_| {
            started_tx.send(()).unwrap();
            let _ = hold_rx.recv_timeout(Duration::from_secs(10));
        }),
    )
    .map_err(|_| ())
    .unwrap();
    started_rx.recv().unwrap();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut full = 0;
    for _ in 0..5 {
        let c = counter.clone();
        match r.send(
            0,
            Box::new(move |_| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        ) {
            Ok(()) => {}
            Err(SendError::Full(_)) => full += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(full, 3, "queue of 2: three of five sends must be refused");
    assert!(r.stats()[0].queue_full >= 3);
    hold_tx.send(()).unwrap();
    let n = r
        .call(0, Duration::from_secs(5), move |_| ())
        .map(|_| counter.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(n.unwrap(), 2, "the accepted messages run once the reactor is free");
    assert!(matches!(r.send(7, Box::new(|_| ())), Err(SendError::NoSuchReactor(7))));
}

#[test]
fn idle_reactors_park() {
    let r = reactors(&[0, 1]);
    std::thread::sleep(Duration::from_millis(300));
    // CPU time each reactor thread ran, in ns, from the scheduler's own
    // accounting (/proc/self/task/TID/schedstat, first field): exact, unlike
    // utime+stime, which charge whole clock ticks to whoever is running when
    // the tick fires (a thread waking every 10 ms can be charged far more than
    // it ran when the machine is loaded).
    let cpu_ns = move |tid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("task schedstat");
        s.split_whitespace().next().unwrap().parse().unwrap()
    };
    let tids = r.thread_ids();
    let cpu_before: Vec<u64> = tids.iter().map(|&t| cpu_ns(t)).collect();
    let before = r.stats();
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let wall = t0.elapsed().as_nanos() as f64;
    let after = r.stats();
    for (t, b) in tids.iter().zip(&cpu_before) {
        let used = (cpu_ns(*t) - b) as f64 / wall;
        assert!(
            used < 0.02,
            "an idle reactor thread used {:.2}% of a core",
            used * 100.0
        );
    }
    for (a, b) in after.iter().zip(&before) {
        let d = a.since(b);
        let busy = d.busy_ns as f64 / (d.busy_ns + d.idle_ns) as f64;
        assert!(
            busy < 0.02,
            "an idle reactor spent {:.1}% of its time busy",
            busy * 100.0
        );
        // Parked, not spinning (spinning would count as idle time too).
        assert!(d.parks > 0 && d.polls < 1000, "{d:?}");
    }
    // And it still answers promptly after parking.
    let t = std::time::Instant::now();
    r.call(1, Duration::from_secs(2), |ctx| ctx.id).unwrap();
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn core_lists_parse_and_refuse_bad_input() {
    use sealdisk::parse_cores;
    assert_eq!(parse_cores("0").unwrap(), vec![0]);
    assert_eq!(parse_cores("0-1").unwrap(), vec![0, 1]);
    assert!(parse_cores("1-0").is_err());
    assert!(parse_cores("x").is_err());
    assert!(parse_cores("").is_err());
    assert!(parse_cores("4096").unwrap_err().to_string().contains("not available"));
}

#[test]
fn qos_caps_iops_and_bandwidth_without_dropping_requests() {
    use sealdisk::{QosBdev, QosLimits};
    let r = reactors(&[0]);
    let base: BdevRef = Arc::new(MallocBdev::new("m", 8 << 20, 512));
    for (limits, n, min_secs) in [
        // 400 I/Os at 1000 IOPS with a 100-I/O burst: at least 0.3 s.
        (
            QosLimits {
                iops: Some(1000),
                bytes_per_sec: None,
            },
            400usize,
            0.3f64,
        ),
        // 4 MiB at 8 MiB/s with a 1 MiB burst: at least 0.375 s.
        (
            QosLimits {
                iops: None,
                bytes_per_sec: Some(8 << 20),
            },
            1024,
            0.375,
        ),
    ] {
        let q: BdevRef = Arc::new(QosBdev::new(base.clone(), limits));
        let t = std::time::Instant::now();
        let done = r
            .call(0, Duration::from_secs(30), move |ctx| {
                let mut ch = IoQueue::new(q.open_channel(&ctx.chan).unwrap());
                for i in 0..n {
                    let b = ctx.chan.pool.alloc(4096).unwrap();
                    submit(&mut ch, IoRequest::write((i as u64 % 2048) * 4096, b, i as u64));
                }
                let v = ch
                    .drain(Duration::from_secs(25), None)
                    .expect("every request completes");
                v.iter().filter(|c| c.result.is_ok()).count()
            })
            .unwrap();
        assert_eq!(done, n, "every request completes");
        let secs = t.elapsed().as_secs_f64();
        assert!(
            secs >= min_secs,
            "{limits:?}: {n} requests took {secs:.3}s, faster than the cap allows"
        );
    }
}

/// A device that completes every request on the next poll and fails the reads and
/// writes at the given offsets with EIO; a read fills its buffer with 0xAB first,
/// so data a failed read must not hand back would show.
struct Failing {
    fail: Vec<u64>,
}

struct FailingChannel {
    fail: Vec<u64>,
    ready: Vec<sealdisk::IoCompletion>,
}

impl sealdisk::Bdev for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn capacity(&self) -> u64 {
        64 << 20
    }
    fn open_channel(&self, _ctx: &sealdisk::ChannelCtx) -> std::io::Result<Box<dyn sealdisk::Channel>> {
        Ok(Box::new(FailingChannel {
            fail: self.fail.clone(),
            ready: Vec::new(),
        }))
    }
}

impl sealdisk::Channel for FailingChannel {
    fn submit(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if let (sealdisk::IoOp::Read, Some(b)) = (req.op, req.buf.as_mut()) {
            b.fill(0xAB);
        }
        let failed = matches!(req.op, sealdisk::IoOp::Read | sealdisk::IoOp::Write) && self.fail.contains(&req.offset);
        self.ready.push(sealdisk::IoCompletion {
            tag: req.tag,
            op: req.op,
            result: if failed {
                Err(IoError::Device { errno: libc::EIO })
            } else {
                Ok(())
            },
            buf: req.buf,
        });
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<sealdisk::IoCompletion>) -> usize {
        let n = self.ready.len();
        out.append(&mut self.ready);
        n
    }
    fn in_flight(&self) -> usize {
        self.ready.len()
    }
}

/// Overlapping requests whose pieces complete in one batch, some failing: each
/// answer keeps its own tag, result and buffer. A write split in pieces fails
/// if one piece does and hands back the caller's plaintext; a failed read hands
/// back zeros, never what the device returned; a scratch write comes back as
/// ciphertext in the caller's own buffer.
#[test]
fn crypto_layer_answers_a_mixed_batch_with_failed_pieces_correctly() {
    let r = reactors(&[0]);
    // The second 128 KiB piece of the 512 KiB write at 256 KiB, and a 4 KiB read.
    let lower: BdevRef = Arc::new(Failing {
        fail: vec![(256 << 10) + (128 << 10), 1 << 20],
    });
    let enc: BdevRef = Arc::new(CryptoBdev::new(lower, xts(3), 4096).unwrap());
    let answers = r
        .call(0, Duration::from_secs(10), move |ctx| {
            let mut ch = enc.open_channel(&ctx.chan).unwrap();
            let pool = &ctx.chan.pool;
            let buf = |len: usize, fill: u8| {
                let mut b = pool.alloc(len).unwrap();
                b.set_len(len);
                b.fill(fill);
                b
            };
            let mut scratch = IoRequest::write(4 << 20, buf(4096, 0x66), 15);
            scratch.scratch = true;
            let reqs = vec![
                IoRequest::write(0, buf(4096, 0x11), 10),
                IoRequest::write(256 << 10, buf(512 << 10, 0x22), 11),
                IoRequest::read(1 << 20, buf(4096, 0x33), 12),
                IoRequest::read(8 << 10, buf(4096, 0x44), 13),
                IoRequest::write(2 << 20, buf(256 << 10, 0x55), 14),
                scratch,
            ];
            for q in reqs {
                ch.submit(q).map_err(|_| "back-pressure").unwrap();
            }
            let mut out = Vec::new();
            let t = std::time::Instant::now();
            while out.len() < 6 && t.elapsed() < Duration::from_secs(5) {
                ch.poll(&mut out);
            }
            assert_eq!(ch.in_flight(), 0, "nothing left behind");
            out.into_iter()
                .map(|c| (c.tag, c.op, c.result, c.buf.map(|b| b.to_vec())))
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(
        answers.len(),
        6,
        "one answer per request: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let by_tag = |t: u64| {
        answers
            .iter()
            .find(|a| a.0 == t)
            .unwrap_or_else(|| panic!("no answer for tag {t}"))
    };
    let eio = Err(IoError::Device { errno: libc::EIO });
    let (_, _, res, b) = by_tag(10);
    assert_eq!(*res, Ok(()));
    assert_eq!(
        b.as_deref(),
        Some(&[0x11u8; 4096][..]),
        "a write hands back the caller's plaintext"
    );
    let (_, _, res, b) = by_tag(11);
    assert_eq!(*res, eio, "a write with a failed piece fails");
    assert!(b
        .as_ref()
        .is_some_and(|b| b.len() == 512 << 10 && b.iter().all(|&x| x == 0x22)));
    let (_, _, res, b) = by_tag(12);
    assert_eq!(*res, eio);
    assert!(
        b.as_ref().is_some_and(|b| b.len() == 4096 && b.iter().all(|&x| x == 0)),
        "a failed read hands back zeros"
    );
    let (_, _, res, b) = by_tag(13);
    assert_eq!(*res, Ok(()));
    let b = b.as_ref().unwrap();
    assert!(
        b.len() == 4096 && b.iter().any(|&x| x != 0xAB) && b.iter().any(|&x| x != 0x44),
        "a read is decrypted"
    );
    let (_, _, res, b) = by_tag(14);
    assert_eq!(*res, Ok(()));
    assert!(b
        .as_ref()
        .is_some_and(|b| b.len() == 256 << 10 && b.iter().all(|&x| x == 0x55)));
    let (_, _, res, b) = by_tag(15);
    assert_eq!(*res, Ok(()));
    let b = b.as_ref().unwrap();
    assert!(
        b.len() == 4096 && b.iter().any(|&x| x != 0x66),
        "a scratch write comes back encrypted"
    );
}
