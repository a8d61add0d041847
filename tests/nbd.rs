//! The NBD server with real clients (nbdinfo, qemu-io, qemu-img, fio's nbd
//! engine) and with a raw socket client sending bad input.
//!
//! A missing client tool is a test failure (CI installs them), never a skip.

mod common;
#[path = "common/tools.rs"]
mod tools;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sealdisk::testing::nbd::*;
use sealdisk::BdevRef;
use sealdisk::CryptoBdev;
use sealdisk::MallocBdev;
use sealdisk::{Export, Exports};
use sealdisk::{NbdConfig, NbdServer};
use sealdisk::{ReactorConfig, Reactors};
use sealdisk::{UringBdev, UringOpts};

const MIB: u64 = 1 << 20;

struct Fixture {
    dir: PathBuf,
    sock: PathBuf,
    reactors: Arc<Reactors>,
    exports: Arc<Exports>,
    server: Option<NbdServer>,
    /// Removes the directory on drop, after everything above.
    _tmp: tempfile::TempDir,
}

impl Fixture {
    /// Reactors on both cores, exports `plain` (malloc, 512-byte blocks) and
    /// `secret` (crypto over malloc, 4096-byte sectors), server on a unix
    /// socket in a fresh temp dir.
    fn new(tag: &str) -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("sealdisk-nbd-{tag}-"))
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let cores: Vec<usize> = sealdisk::all_cores().into_iter().take(2).collect();
        let reactors = start_reactors(cores, ReactorConfig::default().park_timeout);
        let exports = Exports::new();
        let plain: BdevRef = Arc::new(MallocBdev::new("plain", 64 * MIB, 512));
        exports.add(Export::new("plain", plain, false)).unwrap();
        let base: BdevRef = Arc::new(MallocBdev::new("secret-base", 64 * MIB, 512));
        add_encrypted(&exports, "secret", base, 7);
        let sock = dir.join("nbd.sock");
        let server = serve_unix(&sock, &reactors, &exports);
        Fixture {
            _tmp: tmp,
            dir,
            sock,
            reactors,
            exports,
            server: Some(server),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }

    /// Wait until no connection is left and every reactor's pool is back to
    /// empty (every buffer returned).
    fn wait_idle(&self) {
        let t = Instant::now();
        loop {
            let conns = self.server().connections();
            let in_use: Vec<usize> = (0..self.reactors.len())
                .map(|i| {
                    self.reactors
                        .call(i, Duration::from_secs(5), |ctx| ctx.chan.pool.stats().in_use_bytes)
                        .unwrap()
                })
                .collect();
            if conns == 0 && in_use.iter().all(|&b| b == 0) {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "server did not go idle: {conns} connections, pool bytes in use {in_use:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// Reactors on `cores` with 64 MiB buffer pools.
fn start_reactors(cores: Vec<usize>, park_timeout: Duration) -> Arc<Reactors> {
    let cfg = ReactorConfig {
        cores,
        pool_bytes: 64 << 20,
        park_timeout,
        ..ReactorConfig::default()
    };
    Arc::new(Reactors::start(&cfg).expect("reactors"))
}

/// Exports `base` under the crypto layer (4096-byte sectors, the test key `seed`) as `name`.
fn add_encrypted(exports: &Exports, name: &str, base: BdevRef, seed: u8) {
    let enc: BdevRef = Arc::new(CryptoBdev::new(base, xts(seed), 4096).unwrap());
    exports.add(Export::new(name, enc, false)).unwrap();
}

/// An NBD server for `exports` on the unix socket `sock`.
fn serve_unix(sock: &Path, reactors: &Arc<Reactors>, exports: &Arc<Exports>) -> NbdServer {
    let cfg = NbdConfig {
        unix_path: Some(sock.to_path_buf()),
        tcp: None,
        ..Default::default()
    };
    NbdServer::start(cfg, reactors.clone(), exports.clone()).expect("NBD server starts")
}

/// Run a client tool; a missing tool fails the test with a clear message.
fn run(tool: &str, args: &[&str]) -> String {
    tools::run_tool(tool, args)
}

#[test]
fn nbdinfo_shows_sizes_flags_and_block_sizes() {
    let f = Fixture::new("info");
    let out = run("nbdinfo", &["--json", &f.uri("secret")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json output");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "secret", "{out}");
    assert_eq!(e["export-size"], 64 * MIB, "{out}");
    for (k, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_multi_conn", true),
        ("can_cache", false),
        ("can_df", true),
    ] {
        assert_eq!(e[k], want, "{k} in {out}");
    }
    assert_eq!(e["block_size_minimum"], 4096, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], f.server().max_payload(), "{out}");
    let out = run("nbdinfo", &["--json", &f.uri("plain")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["block_size_minimum"], 512, "{out}");
    // Listing shows both exports.
    let out = run("nbdinfo", &["--list", "--json", &f.uri("")]);
    assert!(out.contains("\"plain\"") && out.contains("\"secret\""), "{out}");
    f.wait_idle();
}

#[test]
fn qemu_io_patterns_discard_zeroes_flush() {
    let f = Fixture::new("qemu-io");
    for export in ["plain", "secret"] {
        tools::qemu_io_patterns(&f.uri(export), export);
    }
    f.wait_idle();
}

fn file_bdev(path: &Path, size: u64) -> UringBdev {
    let direct = UringBdev::open(
        path,
        &UringOpts {
            create_size: Some(size),
            buffered: false,
            ..UringOpts::default()
        },
    );
    direct.unwrap_or_else(|_| {
        UringBdev::open(
            path,
            &UringOpts {
                create_size: Some(size),
                buffered: true,
                ..UringOpts::default()
            },
        )
        .expect("backing file")
    })
}

#[test]
fn qemu_img_convert_into_encrypted_export_and_compare() {
    let f = Fixture::new("convert");
    let size = 24 * MIB;
    let pool = f.dir.join("pool.img");
    add_encrypted(&f.exports, "disk-enc", Arc::new(file_bdev(&pool, size)), 42);
    // A random image with a zero hole in the middle (qemu-img writes zeroes
    // for it with WRITE_ZEROES).
    let img = f.dir.join("src.raw");
    let mut data = random_bytes(size as usize, 99);
    data[8 << 20..10 << 20].fill(0);
    std::fs::write(&img, &data).unwrap();
    let uri = f.uri("disk-enc");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", img.to_str().unwrap(), &uri],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", img.to_str().unwrap(), &uri],
    );
    assert!(out.contains("Images are identical"), "{out}");
    // The pool file holds ciphertext only: no 4 KiB block of the image's
    // data appears in it.
    f.exports.remove("disk-enc");
    f.wait_idle();
    let stored = std::fs::read(&pool).unwrap();
    assert_eq!(stored.len() as u64, size);
    let blocks: std::collections::HashSet<&[u8]> = data.chunks(4096).filter(|b| b.iter().any(|&x| x != 0)).collect();
    let leaked = stored.chunks(4096).filter(|b| blocks.contains(b)).count();
    assert_eq!(leaked, 0, "plaintext blocks of the image found in the pool file");
    assert!(stored[..4096] != data[..4096]);
}

fn fio_json_errors(out: &str) -> Vec<(String, i64)> {
    let start = out.find('{').expect("fio JSON output");
    let v: serde_json::Value = serde_json::from_str(&out[start..]).expect("fio JSON");
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["jobname"].as_str().unwrap().to_string(), j["error"].as_i64().unwrap()))
        .collect()
}

#[test]
fn fio_nbd_engine_randrw_verify_two_connections() {
    let f = Fixture::new("fio");
    for export in ["plain", "secret"] {
        let uri = f.uri(export);
        let out = run(
            "fio",
            &[
                "--name=nbd-verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=16M",
                "--offset_increment=16M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--do_verify=1",
                "--output-format=json",
            ],
        );
        let errs = fio_json_errors(&out);
        assert_eq!(errs.len(), 2, "{out}");
        assert!(errs.iter().all(|(_, e)| *e == 0), "{export}: {errs:?}\n{out}");
    }
    f.wait_idle();
}

// ---- raw socket client -------------------------------------------------

struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(sock: &Path, export: &str) -> Client {
        let mut c = Client::hello(sock);
        let r = c.go(export);
        assert_eq!(r, REP_ACK, "GO {export}");
        c
    }

    fn hello(sock: &Path) -> Client {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut h = [0u8; 18];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), NBD_MAGIC);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), IHAVEOPT);
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        Client { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Read one option reply: (type, data).
    fn opt_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPT_REPLY_MAGIC);
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).unwrap();
        (t, d)
    }

    /// NBD_OPT_GO; returns the final reply type.
    fn go(&mut self, export: &str) -> u32 {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (t, _) = self.opt_reply();
            if t != REP_INFO {
                return t;
            }
        }
    }

    fn request(&self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Read a simple reply: (error, cookie), then `data_len` bytes if no error.
    fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = Vec::new();
        if err == 0 {
            d = vec![0u8; data_len];
            self.s.read_exact(&mut d).unwrap();
        }
        (err, cookie, d)
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        let r = self.request(CMD_READ, 0, cookie, offset, len);
        self.send(&r);
        let (e, c, d) = self.reply(len as usize);
        assert_eq!(c, cookie);
        (e, d)
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let mut r = self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32);
        r.extend_from_slice(data);
        self.send(&r);
        let (e, c, _) = self.reply(0);
        assert_eq!(c, cookie);
        e
    }

    /// True if the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn still_serving(f: &Fixture) {
    let mut c = Client::connect(&f.sock, "plain");
    let data = random_bytes(8192, 5);
    assert_eq!(c.write(1, 1 << 20, &data), 0);
    assert!(c.read(2, 1 << 20, 8192) == (0, data), "read back differs");
    c.send(&c.request(CMD_DISC, 0, 3, 0, 0));
    assert!(c.closed());
}

#[test]
fn handshake_unknown_options_and_exports_keep_negotiating() {
    let f = Fixture::new("handshake");
    let mut c = Client::hello(&f.sock);
    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, 77] {
        c.option(opt, &[]);
        assert_eq!(c.opt_reply().0, REP_ERR_UNSUP, "option {opt}");
    }
    // Known options with bad data are refused the same way: negotiation goes on.
    c.option(OPT_LIST_META_CONTEXT, &[]);
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID, "LIST_META_CONTEXT without data");
    c.option(OPT_STRUCTURED_REPLY, &[1]);
    assert_eq!(c.opt_reply().0, REP_ERR_INVALID, "STRUCTURED_REPLY with data");
    assert_eq!(c.go("no-such-disk"), REP_ERR_UNKNOWN);
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (t, d) = c.opt_reply();
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_SERVER);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["plain", "secret"]);
    // NBD_OPT_INFO then GO on the same connection.
    let mut d = 6u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"secret");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_INFO, &d);
    let (t, info) = c.opt_reply();
    assert_eq!(t, REP_INFO);
    assert_eq!(u16::from_be_bytes([info[0], info[1]]), INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 64 * MIB);
    let flags = u16::from_be_bytes([info[10], info[11]]);
    for bit in [
        TF_HAS_FLAGS,
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_SEND_FAST_ZERO,
        TF_CAN_MULTI_CONN,
    ] {
        assert!(flags & bit != 0, "flag {bit:#x} missing from {flags:#x}");
    }
    let (t, bs) = c.opt_reply();
    assert_eq!(t, REP_INFO);
    assert_eq!(u16::from_be_bytes([bs[0], bs[1]]), INFO_BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 4096);
    assert_eq!(c.opt_reply().0, REP_ACK);
    assert_eq!(c.go("secret"), REP_ACK);
    let data = random_bytes(4096, 1);
    assert_eq!(c.write(9, 0, &data), 0);
    assert!(c.read(10, 0, 4096) == (0, data), "read back differs");
    // ABORT on a fresh connection.
    let mut a = Client::hello(&f.sock);
    a.option(OPT_ABORT, &[]);
    assert_eq!(a.opt_reply().0, REP_ACK);
    assert!(a.closed());
    // EXPORT_NAME fallback.
    let mut e = Client::hello(&f.sock);
    e.option(OPT_EXPORT_NAME, b"plain");
    let mut h = [0u8; 10];
    e.s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), 64 * MIB);
    assert_eq!(e.read(1, 0, 512).0, 0);
    drop((c, e));
    f.wait_idle();
}

#[test]
fn pipelined_requests_and_large_split_requests() {
    let f = Fixture::new("pipeline");
    let mut c = Client::connect(&f.sock, "secret");
    // 64 writes in one send, then their replies (any order).
    let mut batch = Vec::new();
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| random_bytes(4096, 1000 + i)).collect();
    for (i, b) in blocks.iter().enumerate() {
        batch.extend_from_slice(&c.request(CMD_WRITE, 0, 100 + i as u64, i as u64 * 8192, 4096));
        batch.extend_from_slice(b);
    }
    c.send(&batch);
    let mut seen: Vec<u64> = (0..64)
        .map(|_| c.reply(0))
        .map(|(e, k, _)| k + e as u64 * 1_000_000)
        .collect();
    seen.sort();
    assert_eq!(seen, (100..164).collect::<Vec<u64>>());
    for (i, b) in blocks.iter().enumerate() {
        assert!(
            &c.read(500 + i as u64, i as u64 * 8192, 4096).1 == b,
            "block {i} differs"
        );
    }
    // Large writes back to back with small ones in one send: each large
    // payload is received straight into its buffer, the small ones from the
    // receive buffer; every byte must land where it belongs.
    let sizes = [128 << 10, 4096, 256 << 10, 64 << 10, 8192, 192 << 10];
    let mut off = 1u64 << 20;
    let mut batch = Vec::new();
    let mut placed = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let d = random_bytes(n, 2000 + i as u64);
        batch.extend_from_slice(&c.request(CMD_WRITE, 0, 700 + i as u64, off, n as u32));
        batch.extend_from_slice(&d);
        placed.push((off, d));
        off += n as u64 + 4096;
    }
    c.send(&batch);
    for _ in &sizes {
        assert_eq!(c.reply(0).0, 0);
    }
    for (i, (o, d)) in placed.iter().enumerate() {
        assert!(
            &c.read(800 + i as u64, *o, d.len() as u32).1 == d,
            "large write {i} differs"
        );
    }
    // The reactors counted those I/Os and bytes.
    let (ios, bytes) = f
        .reactors
        .stats()
        .iter()
        .fold((0, 0), |a, s| (a.0 + s.ios, a.1 + s.bytes));
    let want: u64 = sizes.iter().map(|&n| 2 * n as u64).sum::<u64>() + 2 * 64 * 4096;
    assert!(ios >= 2 * 64 + 2 * sizes.len() as u64, "reactor I/O count {ios}");
    assert!(bytes >= want, "reactor byte count {bytes} < {want}");
    // A request of max_payload bytes: several bdev requests, one reply.
    let max = f.server().max_payload();
    let big = random_bytes(max as usize, 77);
    assert_eq!(c.write(1, 4096, &big), 0);
    let (e, back) = c.read(2, 4096, max);
    assert_eq!(e, 0);
    assert!(back == big, "large read differs");
    // FLUSH, TRIM + FUA, WRITE_ZEROES, FAST_ZERO refused honestly.
    let r = c.request(CMD_FLUSH, 0, 3, 0, 0);
    c.send(&r);
    assert_eq!(c.reply(0).0, 0);
    let r = c.request(CMD_TRIM, CMD_FLAG_FUA, 4, 4096, 8192);
    c.send(&r);
    assert_eq!(c.reply(0).0, 0);
    let r = c.request(CMD_WRITE_ZEROES, 0, 5, 16384, 8192);
    c.send(&r);
    assert_eq!(c.reply(0).0, 0);
    assert!(
        c.read(6, 4096, 8192).1.iter().all(|&b| b == 0),
        "trimmed range reads as zeros"
    );
    assert!(
        c.read(61, 16384, 8192).1.iter().all(|&b| b == 0),
        "zeroed range reads as zeros"
    );
    let r = c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 7, 0, 4096);
    c.send(&r);
    assert_eq!(c.reply(0).0, ENOTSUP);
    drop(c);
    f.wait_idle();
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let f = Fixture::new("badreq");
    let max = f.server().max_payload();
    let mut c = Client::connect(&f.sock, "secret");
    let cap = 64 * MIB;
    // Offset past the end.
    assert_eq!(c.read(1, cap, 4096).0, EINVAL);
    assert_eq!(c.write(2, cap - 4096, &vec![1u8; 8192]), ENOSPC);
    let r = c.request(CMD_TRIM, 0, 3, cap, 4096);
    c.send(&r);
    assert_eq!(c.reply(0).0, EINVAL);
    let r = c.request(CMD_READ, 0, 4, u64::MAX - 511, 4096);
    c.send(&r);
    assert_eq!(c.reply(0).0, EINVAL);
    // Unaligned to the 4096-byte minimum block.
    assert_eq!(c.read(5, 512, 4096).0, EINVAL);
    assert_eq!(c.write(6, 0, &[7u8; 512]), EINVAL);
    // Oversized: read refused, write refused with its payload drained.
    assert_eq!(c.read(7, 0, max + 4096).0, EINVAL);
    assert_eq!(c.write(8, 0, &vec![9u8; max as usize + 4096]), EINVAL);
    // Unknown / unnegotiated commands.
    for cmd in [CMD_CACHE, CMD_BLOCK_STATUS, 99] {
        let r = c.request(cmd, 0, 10 + cmd as u64, 0, 4096);
        c.send(&r);
        assert_eq!(c.reply(0).0, EINVAL, "command {cmd}");
    }
    // Still in sync: a good request works.
    let d = random_bytes(4096, 3);
    assert_eq!(c.write(20, 8192, &d), 0);
    assert!(c.read(21, 8192, 4096) == (0, d), "read back differs");
    // Wrong magic: disconnect.
    let mut r = c.request(CMD_READ, 0, 22, 0, 4096);
    r[0] ^= 0xff;
    c.send(&r);
    assert!(c.closed(), "wrong magic must close the connection");
    still_serving(&f);
    f.wait_idle();
}

#[test]
fn clients_vanishing_mid_request_leave_the_server_serving() {
    let f = Fixture::new("vanish");
    // Half a write payload, then gone.
    let mut a = Client::connect(&f.sock, "secret");
    let mut r = a.request(CMD_WRITE, 0, 1, 0, 4 << 20);
    r.extend_from_slice(&random_bytes(700 << 10, 1));
    a.send(&r);
    drop(a);
    // Half a request header, then gone.
    let mut b = Client::connect(&f.sock, "plain");
    let r = b.request(CMD_READ, 0, 1, 0, 4096);
    b.send(&r[..13]);
    drop(b);
    // Many reads queued, replies never read.
    let mut c = Client::connect(&f.sock, "plain");
    let mut batch = Vec::new();
    for i in 0..200u64 {
        batch.extend_from_slice(&c.request(CMD_READ, 0, i, (i % 64) << 20, 256 << 10));
    }
    c.send(&batch);
    drop(c);
    // Gone in the middle of the handshake.
    let mut d = Client::hello(&f.sock);
    d.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    drop(d);
    still_serving(&f);
    f.wait_idle();
}

#[test]
fn detaching_a_disk_closes_its_connections_and_shutdown_closes_all() {
    let f = Fixture::new("revoke");
    let mut c = Client::connect(&f.sock, "secret");
    assert_eq!(c.read(1, 0, 4096).0, 0);
    let mut other = Client::connect(&f.sock, "plain");
    f.exports.remove("secret");
    assert!(c.closed(), "connection of a detached disk must close");
    let mut n = Client::hello(&f.sock);
    assert_eq!(n.go("secret"), REP_ERR_UNKNOWN, "a detached disk is an unknown export");
    assert_eq!(other.read(2, 0, 4096).0, 0);
    drop(n);
    let mut f = f;
    f.server.take().unwrap().shutdown();
    assert!(other.closed(), "shutdown closes connections");
    assert!(UnixStream::connect(&f.sock).is_err(), "listener closed");
}

#[test]
fn tcp_listener_on_loopback() {
    let f = Fixture::new("tcp");
    let server = NbdServer::start(
        NbdConfig {
            unix_path: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
        f.reactors.clone(),
        f.exports.clone(),
    )
    .expect("TCP server");
    let addr = server.tcp_addr().unwrap();
    assert!(addr.ip().is_loopback());
    let out = run("nbdinfo", &["--size", &format!("nbd://{addr}/secret")]);
    assert_eq!(out.trim(), (64 * MIB).to_string());
    let w = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x7e 1M 256k",
            "-c",
            "read -P 0x7e 1M 256k",
            &format!("nbd://{addr}/secret"),
        ],
    );
    assert!(!w.contains("Pattern verification failed"), "{w}");
    server.shutdown();
}

/// Regression: a bdev channel polled by one connection used to reap the
/// completions of another poller into its route queue after that poller's
/// turn, and the reactor then parked on them until its park timeout (10 ms
/// stalls at p99). With a one-minute park timeout such a stall turns into a
/// hang, so finishing promptly proves no completion is slept on.
#[test]
fn no_completion_is_slept_on_with_a_long_park_timeout() {
    let tmp = common::TempDir::new("nbd-park");
    let dir = &tmp.0;
    let reactors = start_reactors(vec![sealdisk::all_cores()[0]], Duration::from_secs(60));
    let exports = Exports::new();
    add_encrypted(
        &exports,
        "disk",
        Arc::new(file_bdev(&dir.join("disk.img"), 64 * MIB)),
        3,
    );
    let sock = dir.join("nbd.sock");
    let server = serve_unix(&sock, &reactors, &exports);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let t = Instant::now();
    let out = run(
        "fio",
        &[
            "--name=park",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--runtime=3",
            "--time_based",
            "--output-format=json",
        ],
    );
    let took = t.elapsed();
    assert!(fio_json_errors(&out).iter().all(|(_, e)| *e == 0), "{out}");
    assert!(
        took < Duration::from_secs(40),
        "fio took {took:?}: a completion was slept on"
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let max_clat = v["jobs"][0]["read"]["clat_ns"]["max"].as_u64().unwrap();
    assert!(max_clat < 30_000_000_000, "a request waited {max_clat} ns");
    server.shutdown();
}

/// A device whose channels cannot be opened (stands in for any resource a reactor
/// cannot give a new connection).
struct NoChannels;
impl sealdisk::Bdev for NoChannels {
    fn name(&self) -> &str {
        "no-channels"
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn capacity(&self) -> u64 {
        MIB
    }
    fn open_channel(&self, _ctx: &sealdisk::ChannelCtx) -> std::io::Result<Box<dyn sealdisk::Channel>> {
        Err(std::io::Error::other("no channel for you"))
    }
}

#[test]
fn a_connection_the_reactor_cannot_take_gets_an_nbd_error_and_is_counted() {
    let f = Fixture::new("refused");
    f.exports
        .add(Export::new("broken", Arc::new(NoChannels), false))
        .unwrap();
    for i in 1..=3 {
        let mut c = Client::hello(&f.sock);
        assert_eq!(
            c.go("broken"),
            REP_ERR_SHUTDOWN,
            "connection {i}: a clear NBD error, not a silent close"
        );
        assert_eq!(f.server().refused(), i);
    }
    // The others are served as before.
    still_serving(&f);
}
