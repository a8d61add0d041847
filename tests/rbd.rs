//! The Ceph RBD backend (issue #22) against a real single-node cluster that each test starts
//! with `tools/ceph-cluster.sh` in a temporary directory and stops at the end (also on panic).
//! Without Ceph these fail, unless `SEALDISK_SKIP_CEPH=1` is set.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sealdisk::bdev::crypto::CryptoBdev;
use sealdisk::bdev::rbd::RbdBdev;
use sealdisk::bdev::{BdevRef, IoError, IoOp, IoRequest};
use sealdisk::rbd::{Cluster, Completion, CreateOpts, RbdError, DISK_OPTIONS};

fn connect(c: &ceph::Cluster) -> sealdisk::rbd::IoCtx {
    Cluster::connect(&c.conf, DISK_OPTIONS)
        .expect("connect to the test cluster")
        .ioctx("rbd")
        .expect("open pool rbd")
}

/// Waits (polling the eventfd-notified queue) for the one AIO in flight on `img`.
fn wait_aio(img: &sealdisk::rbd::Image, fd: i32) -> (usize, isize) {
    let t = Instant::now();
    let mut got = Vec::new();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let mut v = 0u64;
        // SAFETY: an 8-byte read into a live u64 (non-blocking eventfd).
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        img.poll_io_events(&mut got, 8).unwrap();
        if let Some(c) = got.pop() {
            assert!(got.is_empty(), "one AIO in flight, more than one completion");
            return (c.arg(), c.return_value());
        }
        assert!(t.elapsed() < Duration::from_secs(30), "AIO did not complete");
    }
}

#[test]
fn binding_round_trips_data_metadata_snapshots_and_clones() {
    let Some(c) = ceph::Cluster::start("binding") else {
        return;
    };
    let io = connect(&c);
    io.create("disk-a", 8 << 20, &CreateOpts::default()).unwrap();
    let img = io.open("disk-a").unwrap();
    let st = img.stat().unwrap();
    assert_eq!(st.size, 8 << 20);
    assert_eq!(st.order, 22);
    let id = img.id().unwrap();
    assert_eq!(st.block_name_prefix, format!("rbd_data.{id}"));
    let f = img.features().unwrap();
    assert_eq!(f & 0b101, 0b101, "layering and exclusive-lock: {f:#x}");

    // Synchronous and AIO (eventfd + poll_io_events) round trips.
    let data = random_bytes(64 << 10, 7);
    assert_eq!(img.write(4096, &data).unwrap(), data.len());
    let mut back = vec![0u8; data.len()];
    assert_eq!(img.read(4096, &mut back).unwrap(), data.len());
    assert_eq!(back, data);

    // SAFETY: eventfd has no preconditions.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    img.set_notification_eventfd(efd).unwrap();
    let data2 = random_bytes(128 << 10, 8);
    // SAFETY: `data2` outlives the request (waited for below).
    unsafe { img.aio_write(1 << 20, data2.as_ptr(), data2.len(), Completion::new(41).unwrap()) }.unwrap();
    let (arg, ret) = wait_aio(&img, efd);
    assert_eq!(arg, 41);
    assert!(ret >= 0, "aio write: {ret}");
    img.aio_flush(Completion::new(42).unwrap()).unwrap();
    assert_eq!(wait_aio(&img, efd), (42, 0));
    let mut back2 = vec![0u8; data2.len()];
    // SAFETY: `back2` outlives the request (waited for below).
    unsafe { img.aio_read(1 << 20, back2.as_mut_ptr(), back2.len(), Completion::new(43).unwrap()) }.unwrap();
    assert_eq!(wait_aio(&img, efd), (43, data2.len() as isize));
    assert_eq!(back2, data2);
    // A read past the end comes back as an error through the completion or the call.
    let mut past = vec![0u8; 4096];
    // SAFETY: `past` outlives the request.
    match unsafe { img.aio_read(8 << 20, past.as_mut_ptr(), 4096, Completion::new(44).unwrap()) } {
        Ok(()) => {
            let (arg, ret) = wait_aio(&img, efd);
            assert_eq!(arg, 44);
            assert!(ret < 0, "read past the end: {ret}");
        }
        Err(e) => assert!(e.errno().is_some(), "{e}"),
    }

    // Discard of part of an object reads back as zeros (rbd_skip_partial_discard=false).
    img.aio_discard(4096, 8192, Completion::new(45).unwrap()).unwrap();
    assert_eq!(wait_aio(&img, efd).0, 45);
    img.aio_write_zeroes(16384, 4096, Completion::new(46).unwrap()).unwrap();
    assert_eq!(wait_aio(&img, efd).0, 46);
    img.read(4096, &mut back).unwrap();
    assert!(back[..8192].iter().all(|&b| b == 0), "discarded range not zero");
    assert_eq!(&back[8192..12288], &data[8192..12288], "data after the discard kept");
    assert!(back[12288..16384].iter().all(|&b| b == 0), "zeroed range not zero");
    assert_eq!(&back[16384..], &data[16384..]);

    // Metadata.
    assert_eq!(img.metadata_get("sealdisk.account").unwrap(), None);
    img.metadata_set("sealdisk.account", "acct1").unwrap();
    let long = "x".repeat(5000);
    img.metadata_set("sealdisk.long", &long).unwrap();
    assert_eq!(img.metadata_get("sealdisk.account").unwrap().as_deref(), Some("acct1"));
    assert_eq!(
        img.metadata_get("sealdisk.long").unwrap().as_deref(),
        Some(long.as_str())
    );
    let out = c.cmd("rbd", &["image-meta", "get", "rbd/disk-a", "sealdisk.account"]);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "acct1");
    img.metadata_remove("sealdisk.long").unwrap();
    assert_eq!(img.metadata_get("sealdisk.long").unwrap(), None);

    // Snapshot, protect, clone, rollback.
    img.snap_create("s1").unwrap();
    assert!(img.snap_exists("s1").unwrap());
    assert!(!img.snap_exists("nope").unwrap());
    img.snap_protect("s1").unwrap();
    assert!(img.snap_is_protected("s1").unwrap());
    io.clone_image("disk-a", "s1", "disk-b", &CreateOpts::default())
        .unwrap();
    let clone = io.open("disk-b").unwrap();
    let mut cb = vec![0u8; data2.len()];
    clone.read(1 << 20, &mut cb).unwrap();
    assert_eq!(cb, data2, "the clone shares the snapshot's data");
    img.write(1 << 20, &[0xEE; 4096]).unwrap();
    clone.read(1 << 20, &mut cb).unwrap();
    assert_eq!(cb, data2, "a write to the parent does not reach the clone");
    // A protected snapshot with a clone cannot go.
    let e = img.snap_unprotect("s1").unwrap_err();
    assert!(e.is_busy(), "{e}");
    clone.flatten().unwrap();
    drop(clone);
    img.snap_unprotect("s1").unwrap();
    img.snap_rollback("s1").unwrap();
    img.read(1 << 20, &mut back2).unwrap();
    assert_eq!(back2, data2, "rollback restores the snapshot");
    // An image with a snapshot cannot be removed.
    drop(img);
    let e = io.remove("disk-a").unwrap_err();
    assert!(
        matches!(e, RbdError::Call { call: "rbd_remove", errno } if errno < 0),
        "{e}"
    );
    let img = io.open("disk-a").unwrap();
    img.snap_remove("s1").unwrap();
    drop(img);
    io.remove("disk-a").unwrap();
    io.remove("disk-b").unwrap();
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(efd) };
}

#[test]
fn binding_errors_keep_the_errno() {
    let Some(c) = ceph::Cluster::start("errors") else {
        return;
    };
    let io = connect(&c);
    let e = io.open("missing").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(
        e,
        RbdError::Call {
            call: "rbd_open",
            errno: -libc::ENOENT
        }
    );
    assert!(e.to_string().contains("rbd_open"), "{e}");
    io.create("d", 1 << 20, &CreateOpts::default()).unwrap();
    let e = io.create("d", 1 << 20, &CreateOpts::default()).unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert!(matches!(io.open("a\0b"), Err(RbdError::BadName(_))));
    let e = io.remove("missing").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let img = io.open("d").unwrap();
    let e = img.snap_protect("nosnap").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = io.clone_image("d", "nosnap", "c", &CreateOpts::default()).unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    // A missing pool.
    let cl = Cluster::connect(&c.conf, DISK_OPTIONS).unwrap();
    assert!(cl.ioctx("no-such-pool").err().unwrap().is_not_found());
    // A missing ceph.conf.
    let e = Cluster::connect(std::path::Path::new("/nonexistent/ceph.conf"), &[])
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            RbdError::Call {
                call: "rados_conf_read_file",
                ..
            }
        ),
        "{e}"
    );
    // The image is unchanged by the failed calls.
    assert_eq!(img.size().unwrap(), 1 << 20);
}

/// One request's result and, for a read, its data.
type Outcome = (Result<(), IoError>, Vec<u8>);

/// Runs `ops` on reactor `r` with up to `qd` in flight at once; returns per-op results and
/// data (reads) in op order.
fn run_pipelined(
    reactors: &sealdisk::reactor::Reactors,
    r: usize,
    bdev: &BdevRef,
    ops: Vec<Op>,
    qd: usize,
) -> Vec<Outcome> {
    let bdev = bdev.clone();
    reactors
        .call(r, Duration::from_secs(120), move |ctx| {
            let mut ch = bdev.open_channel(&ctx.chan).expect("open channel");
            let n = ops.len();
            let mut res: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
            let mut next = 0;
            let mut inflight = 0;
            let mut max_inflight = 0;
            let mut done = 0;
            let mut out = Vec::new();
            let t = Instant::now();
            while done < n {
                while next < n && inflight < qd {
                    let tag = next as u64;
                    let req = match &ops[next] {
                        Op::Read { offset, len } => IoRequest::read(*offset, ctx.chan.pool.alloc(*len).unwrap(), tag),
                        Op::Write { offset, data } => {
                            let mut b = ctx.chan.pool.alloc(data.len()).unwrap();
                            b.copy_from_slice(data);
                            IoRequest::write(*offset, b, tag)
                        }
                        Op::Flush => IoRequest::flush(tag),
                        Op::Unmap { offset, len } => IoRequest::unmap(*offset, *len, tag),
                        Op::WriteZeroes { offset, len } => IoRequest::write_zeroes(*offset, *len, tag),
                    };
                    match ch.submit(req) {
                        Ok(()) => {
                            next += 1;
                            inflight += 1;
                            max_inflight = max_inflight.max(ch.in_flight());
                        }
                        Err(_) => break,
                    }
                }
                ch.poll(&mut out);
                for c in out.drain(..) {
                    let data = match (c.op, &c.buf) {
                        (IoOp::Read, Some(b)) => b.to_vec(),
                        _ => Vec::new(),
                    };
                    res[c.tag as usize] = Some((c.result, data));
                    inflight -= 1;
                    done += 1;
                }
                assert!(t.elapsed() < Duration::from_secs(100), "requests did not complete");
                std::thread::sleep(Duration::from_micros(50));
            }
            assert!(
                max_inflight >= qd.min(n),
                "pipelined: max {max_inflight} in flight, wanted {qd}"
            );
            res.into_iter().map(|r| r.unwrap()).collect()
        })
        .expect("reactor answers")
}

/// The plain64 XTS decryption of one 4 KiB sector outside sealdisk (Python `cryptography`).
fn python_xts_decrypt(key: &[u8; 64], sector: u64, data: &[u8]) -> Vec<u8> {
    let script = "import sys\nfrom cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
                  key = bytes.fromhex(sys.argv[1]); n = int(sys.argv[2]); d = sys.stdin.buffer.read()\n\
                  dec = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, 'little'))).decryptor()\n\
                  sys.stdout.buffer.write(dec.update(d) + dec.finalize())\n";
    let mut child = Command::new("python3")
        .args(["-c", script, &hex::encode(key), &sector.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 with `cryptography` is required (pip install cryptography)"
    );
    out.stdout
}

#[test]
fn rbd_bdev_pipelined_io_through_crypto_on_two_reactors_stores_ciphertext() {
    let Some(c) = ceph::Cluster::start("bdev") else { return };
    let io = connect(&c);
    let size = 32u64 << 20;
    io.create("enc", size, &CreateOpts::default()).unwrap();
    let rbd = RbdBdev::new(io.open("enc").unwrap(), 512).unwrap();
    let prefix = rbd.image().stat().unwrap().block_name_prefix;
    let raw: BdevRef = Arc::new(rbd);
    assert_eq!(raw.capacity(), size);
    let key = test_key(5);
    let enc: BdevRef = Arc::new(CryptoBdev::new(raw.clone(), xts(5), 4096).unwrap());
    let reactors = reactors(&[0, 1]);

    // Each reactor writes its own half with 32 requests in flight, 4 KiB..128 KiB, then
    // reads it back (completions of one reactor's requests may be found by the other).
    let half = size / 2;
    let plan = |r: usize| -> Vec<(u64, Vec<u8>)> {
        let mut off = r as u64 * half;
        let mut v = Vec::new();
        let mut i = 0u64;
        while off + (128 << 10) <= (r as u64 + 1) * half && v.len() < 96 {
            let len = 4096usize << (i % 6);
            v.push((off, random_bytes(len, 1000 * r as u64 + i)));
            off += len as u64;
            i += 1;
        }
        v
    };
    let plans = [plan(0), plan(1)];
    std::thread::scope(|s| {
        for (r, plan) in plans.iter().enumerate() {
            let (reactors, enc) = (&reactors, &enc);
            s.spawn(move || {
                let writes: Vec<Op> = plan
                    .iter()
                    .map(|(o, d)| Op::Write {
                        offset: *o,
                        data: d.clone(),
                    })
                    .collect();
                for (i, (r, _)) in run_pipelined(reactors, r, enc, writes, 32).into_iter().enumerate() {
                    assert_eq!(r, Ok(()), "write {i}");
                }
                let reads: Vec<Op> = plan
                    .iter()
                    .map(|(o, d)| Op::Read {
                        offset: *o,
                        len: d.len(),
                    })
                    .collect();
                for (i, ((r, data), (_, want))) in run_pipelined(reactors, r, enc, reads, 32)
                    .into_iter()
                    .zip(plan)
                    .enumerate()
                {
                    assert_eq!(r, Ok(()), "read {i}");
                    assert!(data == *want, "read {i} differs from what was written");
                }
            });
        }
    });

    // Flush, FUA write, discard, write-zeroes and bad requests through the stack.
    let (o0, d0) = plans[0][0].clone();
    let done = run_pipelined(
        &reactors,
        0,
        &enc,
        vec![
            Op::Flush,
            Op::Unmap { offset: 0, len: 4096 },
            Op::WriteZeroes {
                offset: 8192,
                len: 8192,
            },
            Op::Read { offset: 0, len: 4096 },
            Op::Read {
                offset: 8192,
                len: 8192,
            },
            Op::Read {
                offset: size,
                len: 4096,
            },
            Op::Write {
                offset: 100,
                data: vec![1; 4096],
            },
        ],
        1,
    );
    assert_eq!(done[0].0, Ok(()));
    assert_eq!(done[1].0, Ok(()));
    assert_eq!(done[2].0, Ok(()));
    assert!(done[3].1.iter().all(|&b| b == 0), "discarded sector reads as zeros");
    assert!(done[4].1.iter().all(|&b| b == 0), "zeroed sectors read as zeros");
    assert!(matches!(done[5].0, Err(IoError::OutOfRange { .. })), "{:?}", done[5].0);
    assert!(matches!(done[6].0, Err(IoError::Misaligned { .. })), "{:?}", done[6].0);
    assert_eq!(o0, 0);
    let fua = reactors
        .call(0, Duration::from_secs(60), {
            let enc = enc.clone();
            let d = d0.clone();
            move |ctx| {
                let mut ch = enc.open_channel(&ctx.chan).unwrap();
                let mut b = ctx.chan.pool.alloc(d.len()).unwrap();
                b.copy_from_slice(&d);
                let mut req = IoRequest::write(0, b, 9);
                req.fua = true;
                ch.submit(req).unwrap();
                wait_one(ch.as_mut()).result
            }
        })
        .unwrap();
    assert_eq!(fua, Ok(()));
    drop(reactors);

    // The first RADOS object holds ciphertext: sector 0 decrypts to what was written, outside
    // sealdisk, and the plaintext is nowhere in the object.
    let obj = format!("{prefix}.0000000000000000");
    let path = c.dir.join("obj0");
    c.cmd("rados", &["-p", "rbd", "get", &obj, path.to_str().unwrap()]);
    let stored = std::fs::read(&path).unwrap();
    assert!(stored.len() >= 4096);
    assert_ne!(&stored[..4096], &d0[..4096], "object holds plaintext");
    assert_eq!(python_xts_decrypt(&key, 0, &stored[..4096]), d0[..4096]);
    let (_, d1) = &plans[0][1];
    let at = plans[0][1].0 as usize;
    assert!(
        !stored.windows(64).any(|w| w == &d1[..64]),
        "a plaintext run of the second write is in the object"
    );
    assert_eq!(
        python_xts_decrypt(&key, (at / 4096) as u64, &stored[at..at + 4096]),
        d1[..4096]
    );
}
