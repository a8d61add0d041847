//! Differential tests: every kernel against implementations outside this
//! crate and outside Rust.
//!
//! * Python `cryptography` (OpenSSL underneath), driven through one
//!   long-lived `python3` process per test that answers JSON-line requests;
//! * the `openssl` command line, for a handful of sectors and data units.
//!   `openssl enc` refuses XTS ciphers outright, so this one uses
//!   `openssl enc -aes-256-ecb` as the AES oracle with the XTS arithmetic
//!   written out here (see the comment above `openssl_cli_every_kernel`).
//!
//! Both tools are required. If `python3`, its `cryptography` module or
//! `openssl` is missing, these tests fail with a message saying what to
//! install; they never skip silently.
//!
//! The random cases are seeded. Set `SEALDISK_DIFF_SEED` to replay or vary
//! them; the seed in use is printed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sealdisk::{Kernel, Xts, SECTOR_SIZES};
use serde_json::{json, Value};

fn rng(test: &str) -> StdRng {
    let seed = match std::env::var("SEALDISK_DIFF_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("SEALDISK_DIFF_SEED={s:?} is not a u64: {e}")),
        Err(_) => 0x0d1f_f5ea_1d15_c000,
    };
    println!("{test}: SEALDISK_DIFF_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn random_key(r: &mut impl RngCore) -> [u8; 64] {
    let mut k = [0u8; 64];
    loop {
        r.fill_bytes(&mut k);
        if k[..32] != k[32..] {
            return k;
        }
    }
}

fn random_bytes(r: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    r.fill_bytes(&mut v);
    v
}

/// The plain64 tweak value of sector `n`: LE64(n) ‖ 0^64.
fn plain64(n: u64) -> [u8; 16] {
    (n as u128).to_le_bytes()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Encrypt,
    Decrypt,
}

impl Dir {
    const BOTH: [Dir; 2] = [Dir::Encrypt, Dir::Decrypt];

    fn name(self) -> &'static str {
        match self {
            Dir::Encrypt => "encrypt",
            Dir::Decrypt => "decrypt",
        }
    }
}

// ---------------------------------------------------------------------------
// Python `cryptography`
// ---------------------------------------------------------------------------

/// Runs in `python3 -c`. One JSON request per line on stdin, one JSON answer
/// per line on stdout. A request has `key` (hex, 64 bytes), `data` (hex),
/// `dir` ("encrypt" or "decrypt"), and either `tweak` (hex, 16 bytes, one
/// data unit) or `sector` and `sector_size` (whole sectors, one by one, tweak
/// value = sector number as a 128-bit little-endian integer).
const PY_REFERENCE: &str = r#"
import json, sys
try:
    import cryptography
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
except Exception as e:
    print(json.dumps({"fatal": "cannot import the Python module `cryptography`: %r" % (e,)}), flush=True)
    sys.exit(3)

def xts(key, tweak, data, decrypt):
    c = Cipher(algorithms.AES(key), modes.XTS(tweak))
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(data) + ctx.finalize()

print(json.dumps({"ready": cryptography.__version__, "python": sys.version.split()[0]}), flush=True)
for line in sys.stdin:
    try:
        r = json.loads(line)
        key = bytes.fromhex(r["key"])
        data = bytes.fromhex(r["data"])
        dec = {"encrypt": False, "decrypt": True}[r["dir"]]
        if "sector" in r:
            ss, first = r["sector_size"], r["sector"]
            assert len(data) % ss == 0
            out = b"".join(
                xts(key, (first + i).to_bytes(16, "little"), data[i * ss:(i + 1) * ss], dec)
                for i in range(len(data) // ss)
            )
        else:
            out = xts(key, bytes.fromhex(r["tweak"]), data, dec)
        answer = {"out": out.hex()}
    except Exception as e:
        answer = {"error": repr(e)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"#;

const PY_HELP: &str = "install Python 3 and the `cryptography` package \
     (`pip install cryptography`, or the distribution's python3-cryptography)";

/// One `python3` process serving XTS requests for the life of a test.
struct PyRef {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    calls: usize,
}

impl PyRef {
    fn start() -> PyRef {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PY_REFERENCE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `python3` ({e}): {PY_HELP}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut py = PyRef {
            child,
            stdin,
            stdout,
            calls: 0,
        };
        let hello = py.read_answer();
        if let Some(msg) = hello["fatal"].as_str() {
            panic!("{msg}: {PY_HELP}");
        }
        let version = hello["ready"]
            .as_str()
            .unwrap_or_else(|| panic!("python3 helper said {hello} instead of ready: {PY_HELP}"));
        println!(
            "reference: Python {} with cryptography {version}",
            hello["python"].as_str().unwrap_or("?")
        );
        py
    }

    fn read_answer(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("reading from the python3 helper");
        if n == 0 {
            let status = self.child.wait().ok();
            panic!("the python3 helper exited ({status:?}) without answering: {PY_HELP}");
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("python3 helper answered {line:?}, not JSON: {e}"))
    }

    fn call(&mut self, req: Value) -> Vec<u8> {
        let stdin = self.stdin.as_mut().expect("helper stdin open");
        writeln!(stdin, "{req}")
            .and_then(|()| stdin.flush())
            .expect("writing to the python3 helper");
        let answer = self.read_answer();
        self.calls += 1;
        match answer["out"].as_str() {
            Some(h) => hex::decode(h).expect("python3 helper answered bad hex"),
            None => panic!("python3 helper refused a request: {answer}"),
        }
    }

    /// Whole sectors starting at `first`, one data unit per sector.
    fn sectors(&mut self, key: &[u8; 64], data: &[u8], first: u64, ss: usize, dir: Dir) -> Vec<u8> {
        self.call(json!({
            "key": hex::encode(key),
            "data": hex::encode(data),
            "dir": dir.name(),
            "sector": first,
            "sector_size": ss,
        }))
    }

    /// One data unit with a raw 128-bit tweak value.
    fn data_unit(&mut self, key: &[u8; 64], tweak: &[u8; 16], data: &[u8], dir: Dir) -> Vec<u8> {
        self.call(json!({
            "key": hex::encode(key),
            "tweak": hex::encode(tweak),
            "data": hex::encode(data),
            "dir": dir.name(),
        }))
    }
}

impl Drop for PyRef {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF ends the helper's loop
        let _ = self.child.wait();
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: differs from the reference (lengths {} and {}, first difference at byte {at:?})\n got  {}\n want {}",
            got.len(),
            want.len(),
            hex::encode(&got[..got.len().min(64)]),
            hex::encode(&want[..want.len().min(64)]),
        );
    }
}

/// A buffer of `len` bytes starting `shift` bytes into a larger allocation,
/// so the kernels see addresses that are not 16- or 32-byte aligned.
struct Shifted {
    backing: Vec<u8>,
    shift: usize,
    len: usize,
}

impl Shifted {
    fn new(contents: &[u8], shift: usize, r: &mut impl RngCore) -> Shifted {
        let mut backing = random_bytes(r, contents.len() + 64);
        backing[shift..shift + contents.len()].copy_from_slice(contents);
        Shifted {
            backing,
            shift,
            len: contents.len(),
        }
    }

    fn get(&self) -> &[u8] {
        &self.backing[self.shift..self.shift + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.backing[self.shift..self.shift + self.len]
    }

    /// The bytes around the slice, which no call may touch.
    fn guard(&self) -> Vec<u8> {
        let mut g = self.backing[..self.shift].to_vec();
        g.extend_from_slice(&self.backing[self.shift + self.len..]);
        g
    }
}

/// First sectors worth testing for a run of `nsec` sectors: zero, a run
/// ending at u64::MAX, carries out of the low 32 bits and into bit 63, random
/// values (the first six, used for long runs), then one and runs ending at
/// u64::MAX - k for k in 1..4.
fn first_sectors(r: &mut impl Rng, nsec: u64) -> Vec<u64> {
    let top = u64::MAX - (nsec - 1);
    vec![
        0,
        top,
        0xffff_fffe,
        0x7fff_ffff_ffff_fffe,
        r.gen::<u64>() >> r.gen_range(1..64),
        r.gen::<u64>().min(top),
        1,
        top - 1,
        top - 2,
        top - 3,
    ]
}

#[test]
fn python_cryptography_sectors_every_kernel() {
    let mut r = rng("python_cryptography_sectors_every_kernel");
    let mut py = PyRef::start();
    let kernels = Kernel::available();
    let mut cases = 0usize;
    for &kernel in &kernels {
        for &ss in &SECTOR_SIZES {
            for &nsec in &[1u64, 2, 3, 8, 17] {
                // Keep the bytes per kernel and sector size bounded.
                let firsts = first_sectors(&mut r, nsec);
                let firsts = if nsec * ss as u64 > 16384 {
                    &firsts[..6]
                } else {
                    &firsts[..]
                };
                for &first in firsts {
                    let key = random_key(&mut r);
                    let xts = Xts::with_kernel(&key, kernel).unwrap();
                    for dir in Dir::BOTH {
                        let what = format!(
                            "{kernel} {} sector_size={ss} sectors={nsec} first={first:#x}",
                            dir.name()
                        );
                        let input = random_bytes(&mut r, nsec as usize * ss);
                        let want = py.sectors(&key, &input, first, ss, dir);

                        // In place, at a random misalignment (0..=31).
                        let mut buf = Shifted::new(&input, r.gen_range(0..32), &mut r);
                        let guard = buf.guard();
                        match dir {
                            Dir::Encrypt => xts.encrypt_sectors(buf.get_mut(), first, ss),
                            Dir::Decrypt => xts.decrypt_sectors(buf.get_mut(), first, ss),
                        }
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_same(buf.get(), &want, &format!("{what} in place"));
                        assert_eq!(buf.guard(), guard, "{what}: wrote outside the buffer");

                        // Out of place, source and destination misaligned
                        // independently (1..=31).
                        let src = Shifted::new(&input, r.gen_range(1..32), &mut r);
                        let mut dst = Shifted::new(&random_bytes(&mut r, input.len()), r.gen_range(1..32), &mut r);
                        let guard = dst.guard();
                        match dir {
                            Dir::Encrypt => xts.encrypt_sectors_to(src.get(), dst.get_mut(), first, ss),
                            Dir::Decrypt => xts.decrypt_sectors_to(src.get(), dst.get_mut(), first, ss),
                        }
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_same(dst.get(), &want, &format!("{what} out of place"));
                        assert_eq!(src.get(), &input[..], "{what}: source modified");
                        assert_eq!(dst.guard(), guard, "{what}: wrote outside the buffer");
                        cases += 1;
                    }
                }
            }
        }
    }
    // Per kernel and direction: 4 sizes x (3 counts x 10 + 2 counts x 10 or 6).
    let per_kernel_dir: usize = SECTOR_SIZES
        .iter()
        .map(|&ss| {
            [1u64, 2, 3, 8, 17]
                .iter()
                .map(|&n| if n * ss as u64 > 16384 { 6 } else { 10 })
                .sum::<usize>()
        })
        .sum();
    println!(
        "python sectors: {cases} cases ({} helper calls) over {} kernels",
        py.calls,
        kernels.len()
    );
    assert_eq!(cases, kernels.len() * 2 * per_kernel_dir);
    assert!(cases >= 2 * 150, "too few cases ran: {cases}");
}

#[test]
fn python_cryptography_data_units_every_kernel() {
    let mut r = rng("python_cryptography_data_units_every_kernel");
    let mut py = PyRef::start();
    let kernels = Kernel::available();
    // Every length from one block to past two 16-block strides of the widest
    // kernel, then larger ones on either side of sector sizes; many are not
    // a multiple of 16 (ciphertext stealing).
    let lengths: Vec<usize> = (16..=560)
        .chain([1000, 1023, 1025, 2047, 2049, 4095, 4096, 4097, 4111, 8191])
        .collect();
    let mut cases = 0usize;
    let mut cts_cases = 0usize;
    for &kernel in &kernels {
        let key = random_key(&mut r);
        let xts = Xts::with_kernel(&key, kernel).unwrap();
        for &len in &lengths {
            for dir in Dir::BOTH {
                // Full 128-bit tweak values, including high halves that the
                // sector API never produces.
                let tweak: [u8; 16] = match r.gen_range(0..4) {
                    0 => plain64(r.gen()),
                    1 => [0xff; 16],
                    _ => r.gen(),
                };
                let what = format!(
                    "{kernel} {} data unit len={len} tweak={}",
                    dir.name(),
                    hex::encode(tweak)
                );
                let input = random_bytes(&mut r, len);
                let want = py.data_unit(&key, &tweak, &input, dir);
                let mut buf = Shifted::new(&input, r.gen_range(0..32), &mut r);
                let guard = buf.guard();
                match dir {
                    Dir::Encrypt => xts.encrypt_data_unit(buf.get_mut(), &tweak),
                    Dir::Decrypt => xts.decrypt_data_unit(buf.get_mut(), &tweak),
                }
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_same(buf.get(), &want, &what);
                assert_eq!(buf.guard(), guard, "{what}: wrote outside the buffer");
                cases += 1;
                if len % 16 != 0 {
                    cts_cases += 1;
                }
            }
        }
        // A data unit whose tweak is plain64(n) and whose length is a sector
        // size is sector n: check the two APIs agree with Python together.
        for &ss in &SECTOR_SIZES {
            let n = u64::MAX - r.gen_range(0..4);
            let input = random_bytes(&mut r, ss);
            let want = py.data_unit(&key, &plain64(n), &input, Dir::Encrypt);
            let mut a = input.clone();
            xts.encrypt_data_unit(&mut a, &plain64(n)).unwrap();
            let mut b = input.clone();
            xts.encrypt_sectors(&mut b, n, ss).unwrap();
            assert_same(&a, &want, &format!("{kernel} data unit = sector {n:#x}"));
            assert_same(&b, &want, &format!("{kernel} sector {n:#x}"));
            cases += 1;
        }
    }
    println!(
        "python data units: {cases} cases ({cts_cases} with ciphertext stealing, {} helper calls) over {} kernels",
        py.calls,
        kernels.len()
    );
    assert_eq!(cases, kernels.len() * (2 * lengths.len() + SECTOR_SIZES.len()));
    assert!(cts_cases >= 2 * 500, "too few ciphertext-stealing cases: {cts_cases}");
}

#[test]
fn python_reference_refuses_what_the_engine_refuses() {
    // The reference is not a yes-man: like the engine, it refuses a data
    // unit shorter than one block and a key whose halves are equal.
    let mut py = PyRef::start();
    let mut refused = |key: [u8; 64], data: &[u8]| {
        let req = json!({
            "key": hex::encode(key),
            "tweak": hex::encode([0u8; 16]),
            "data": hex::encode(data),
            "dir": "encrypt",
        });
        let stdin = py.stdin.as_mut().unwrap();
        writeln!(stdin, "{req}").and_then(|()| stdin.flush()).unwrap();
        let answer = py.read_answer();
        answer["error"].as_str().map(str::to_string)
    };
    let distinct: [u8; 64] = core::array::from_fn(|i| i as u8);
    let short = refused(distinct, &[0u8; 15]);
    assert!(short.is_some(), "python accepted a 15-byte data unit");
    let equal = refused([0x11; 64], &[0u8; 32]);
    assert!(equal.is_some(), "python accepted a key with equal halves");
    assert!(
        refused(distinct, &[0u8; 16]).is_none(),
        "python refused a valid request"
    );
    println!("python refuses: {short:?}; {equal:?}");
}

// ---------------------------------------------------------------------------
// The openssl command line
// ---------------------------------------------------------------------------
//
// `openssl enc -aes-256-xts` does not work: `enc` refuses every XTS cipher
// ("enc XTS ciphers not supported", apps/lib/opt.c `opt_cipher`, OpenSSL
// 1.1.1 and 3.x), and the OpenSSL CLI has no other raw XTS command. So this
// test uses `openssl enc -aes-256-ecb -nopad` as the AES oracle, and builds
// XTS on top of it here, from IEEE 1619 itself (`xts_via_openssl_ecb`):
// T = AES-ENC(k2, tweak value), T_j = T * x^j in GF(2^128), block j =
// AES(k1, P_j ^ T_j) ^ T_j, with ciphertext stealing for a partial last
// block. The AES rounds, the key schedules (both halves, both directions)
// and the tweak encryption come from OpenSSL; only the XOR/doubling glue
// is this file's, and it is checked against IEEE 1619 vector 10 before use.

const OPENSSL_HELP: &str = "install the OpenSSL command-line tool (`openssl`, 1.1.1 or 3.x)";

fn openssl_version() -> String {
    let out = Command::new("openssl")
        .arg("version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `openssl` ({e}): {OPENSSL_HELP}"));
    assert!(out.status.success(), "`openssl version` failed: {OPENSSL_HELP}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// AES-256-ECB over whole blocks by `openssl enc`.
fn openssl_ecb(key: &[u8], data: &[u8], dir: Dir) -> Vec<u8> {
    assert_eq!(key.len(), 32);
    assert_eq!(data.len() % 16, 0);
    let mut child = Command::new("openssl")
        .args(["enc", "-aes-256-ecb", "-nopad", "-nosalt"])
        .arg(if dir == Dir::Encrypt { "-e" } else { "-d" })
        .arg("-K")
        .arg(hex::encode(key))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `openssl` ({e}): {OPENSSL_HELP}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("waiting for openssl");
    writer.join().unwrap().expect("writing to openssl");
    assert!(
        out.status.success(),
        "openssl enc -aes-256-ecb failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len(), "openssl enc returned a short answer");
    out.stdout
}

/// Multiplication by x in GF(2^128), IEEE 1619 byte order (little-endian).
fn times_x(t: [u8; 16]) -> [u8; 16] {
    let v = u128::from_le_bytes(t);
    let carry = v >> 127;
    ((v << 1) ^ (carry * 0x87)).to_le_bytes()
}

fn xor_into(dst: &mut [u8], a: &[u8]) {
    for (d, x) in dst.iter_mut().zip(a) {
        *d ^= x;
    }
}

/// One XTS-AES-256 data unit with OpenSSL's AES (see the comment above).
fn xts_via_openssl_ecb(key: &[u8; 64], tweak: &[u8; 16], data: &[u8], dir: Dir) -> Vec<u8> {
    assert!(data.len() >= 16);
    let (k1, k2) = key.split_at(32);
    let t0: [u8; 16] = openssl_ecb(k2, tweak, Dir::Encrypt).try_into().unwrap();
    let m = data.len() / 16;
    let r = data.len() % 16;
    // T_0 .. T_m (T_m is only used for ciphertext stealing).
    let mut ts = vec![t0];
    for _ in 0..m {
        let next = times_x(*ts.last().unwrap());
        ts.push(next);
    }
    // Whole blocks in one openssl call: all m when r == 0; with stealing,
    // blocks 0..m-1 on encrypt, and on decrypt blocks 0..m-2 plus C_{m-1}
    // under T_m (decryption takes the last two tweaks in swapped order).
    let tweak_for = |j: usize| {
        if r != 0 && dir == Dir::Decrypt && j == m - 1 {
            ts[m]
        } else {
            ts[j]
        }
    };
    let mut masked = data[..16 * m].to_vec();
    for (j, block) in masked.chunks_exact_mut(16).enumerate() {
        xor_into(block, &tweak_for(j));
    }
    let mut out = openssl_ecb(k1, &masked, dir);
    for (j, block) in out.chunks_exact_mut(16).enumerate() {
        xor_into(block, &tweak_for(j));
    }
    if r == 0 {
        return out;
    }
    // Ciphertext stealing: `last` is CC (encrypt) or PP (decrypt).
    let last: [u8; 16] = out[16 * (m - 1)..].try_into().unwrap();
    let mut joined = [0u8; 16];
    joined[..r].copy_from_slice(&data[16 * m..]);
    joined[r..].copy_from_slice(&last[r..]);
    let t = if dir == Dir::Encrypt { ts[m] } else { ts[m - 1] };
    xor_into(&mut joined, &t);
    let mut head = openssl_ecb(k1, &joined, dir);
    xor_into(&mut head, &t);
    out.truncate(16 * (m - 1));
    out.extend_from_slice(&head);
    out.extend_from_slice(&last[..r]);
    out
}

#[test]
fn openssl_cli_every_kernel() {
    let version = openssl_version();
    println!("reference: {version}, AES-256-ECB through `openssl enc`");

    // The glue is right: the first two blocks of IEEE 1619-2007 vector 10
    // (key1 = e, key2 = pi, data unit sequence number ff).
    let v10_key: [u8; 64] = hex::decode(
        "2718281828459045235360287471352662497757247093699959574966967627\
         3141592653589793238462643383279502884197169399375105820974944592",
    )
    .unwrap()
    .try_into()
    .unwrap();
    let v10_pt: Vec<u8> = (0u8..32).collect();
    let v10_ct = hex::decode("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b").unwrap();
    assert_same(
        &xts_via_openssl_ecb(&v10_key, &plain64(0xff), &v10_pt, Dir::Encrypt),
        &v10_ct,
        "openssl-ECB XTS vs IEEE 1619 vector 10",
    );
    assert_same(
        &xts_via_openssl_ecb(&v10_key, &plain64(0xff), &v10_ct, Dir::Decrypt),
        &v10_pt,
        "openssl-ECB XTS inverse vs IEEE 1619 vector 10",
    );

    let mut r = rng("openssl_cli_every_kernel");
    let kernels = Kernel::available();
    let key = random_key(&mut r);
    let engines: Vec<Xts> = kernels.iter().map(|&k| Xts::with_kernel(&key, k).unwrap()).collect();
    let mut cases = 0usize;

    // Whole sectors, sector by sector through openssl.
    for (ss, first, nsec) in [
        (512usize, 0u64, 1usize),
        (512, u64::MAX, 1),
        (1024, u64::MAX - 1, 2),
        (2048, 0xffff_ffff, 1),
        (4096, r.gen(), 1),
    ] {
        for dir in Dir::BOTH {
            let input = random_bytes(&mut r, ss * nsec);
            let want: Vec<u8> = input
                .chunks_exact(ss)
                .enumerate()
                .flat_map(|(i, s)| xts_via_openssl_ecb(&key, &plain64(first + i as u64), s, dir))
                .collect();
            for xts in &engines {
                let what = format!(
                    "{} {} {nsec} sector(s) of {ss} from {first:#x} vs openssl",
                    xts.kernel(),
                    dir.name()
                );
                let mut buf = input.clone();
                match dir {
                    Dir::Encrypt => xts.encrypt_sectors(&mut buf, first, ss),
                    Dir::Decrypt => xts.decrypt_sectors(&mut buf, first, ss),
                }
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_same(&buf, &want, &what);
                cases += 1;
            }
        }
    }
    // Data units with ciphertext stealing and arbitrary 128-bit tweaks.
    for len in [17usize, 31, 100, 527, 4095] {
        let tweak: [u8; 16] = r.gen();
        for dir in Dir::BOTH {
            let input = random_bytes(&mut r, len);
            let want = xts_via_openssl_ecb(&key, &tweak, &input, dir);
            for xts in &engines {
                let what = format!("{} {} data unit of {len} bytes vs openssl", xts.kernel(), dir.name());
                let mut buf = input.clone();
                match dir {
                    Dir::Encrypt => xts.encrypt_data_unit(&mut buf, &tweak),
                    Dir::Decrypt => xts.decrypt_data_unit(&mut buf, &tweak),
                }
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_same(&buf, &want, &what);
                cases += 1;
            }
        }
    }
    println!("openssl: {cases} cases over {} kernels", kernels.len());
    assert_eq!(cases, kernels.len() * 2 * (5 + 5));
}
