//! Keys only in secret memory: a core dump (`gcore`) of the live daemon with an encrypted
//! disk attached and I/O done, and another after detach, hold no 16-byte window of the
//! disk's data key, of any round key of its three AES-256 schedules (k1 encryption, k1
//! decryption, k2 encryption), of the CMK, the keystore key, the wrapping key or the
//! root key; neither do the files of the data directory (but the root key file itself)
//! and the daemon's log. Run on both x86 kernels (`SEALDISK_XTS_KERNEL=aesni` and
//! `vaes-avx2`).
//!
//! The test learns the keys the run created independently: the root key from its file,
//! the keystore key, the CMK and the wrapping key by `docs/format.md`, the data key by
//! unwrapping it in process after the daemon stopped, the round keys with its own AES
//! key expansion (FIPS-197).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use serde_json::{json, Value};
use sha2::Sha256;

use common::{rpc, start_daemon_with, TempDir};
use sealdisk::testing::nbd::*;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const R: &str = "cn-hangzhou";
const A: &str = "acct1";
const MIB: u64 = 1 << 20;

/// NBD handshake (fixed newstyle, GO), then writes of several sizes, read back.
fn io(sock: &Path, export: &str) {
    let mut s = common::nbd_go(sock, export).unwrap_or_else(|t| panic!("GO {export}: {t:#x}"));
    // Writes of several sizes (the crypto layer's one-piece and split paths), then reads
    // of the same.
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let sizes = [4096usize, 65536, 256 * 1024, 8192];
    for (i, &n) in sizes.iter().enumerate() {
        let mut r = encode_request(&Request {
            flags: 0,
            cmd: CMD_WRITE,
            cookie: i as u64,
            offset: (i as u64) * MIB,
            len: n as u32,
        })
        .to_vec();
        r.extend_from_slice(&data[..n]);
        s.write_all(&r).unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0);
    }
    for (i, &n) in sizes.iter().enumerate() {
        let r = encode_request(&Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: i as u64,
            offset: (i as u64) * MIB,
            len: n as u32,
        });
        s.write_all(&r).unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0);
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, data[..n], "read back at {i} MiB");
    }
}

/// A core dump of `pid` (gdb's `gcore`, which the test needs: Debian's gdb package).
fn gcore(pid: u32, out: &Path) -> Vec<u8> {
    let st = Command::new("gcore")
        .arg("-o")
        .arg(out)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("gcore (apt-get install gdb; .ci/run does): {e}"));
    assert!(st.success(), "gcore failed: {st}");
    let path = PathBuf::from(format!("{}.{pid}", out.display()));
    let core = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        core.len() > 1 << 20,
        "a core dump of {} bytes is no core dump",
        core.len()
    );
    core
}

fn hkdf(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    Hkdf::<Sha256>::new(salt, ikm).expand(info, &mut out).unwrap();
    out
}

// ---- AES-256 key expansion (FIPS-197), independent of the crate under test ----------

fn sbox() -> [u8; 256] {
    // The S-box from the multiplicative inverse in GF(2^8) and the affine map.
    let mut s = [0u8; 256];
    let (mut p, mut q) = (1u8, 1u8);
    loop {
        p = p ^ (p << 1) ^ if p & 0x80 != 0 { 0x1b } else { 0 };
        q ^= q << 1;
        q ^= q << 2;
        q ^= q << 4;
        if q & 0x80 != 0 {
            q ^= 0x09;
        }
        let x = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
        s[p as usize] = x ^ 0x63;
        if p == 1 {
            break;
        }
    }
    s[0] = 0x63;
    s
}

/// The 15 round keys of AES-256 for `key`.
fn expand(key: &[u8]) -> Vec<[u8; 16]> {
    let s = sbox();
    let mut w: Vec<[u8; 4]> = key.chunks(4).map(|c| c.try_into().unwrap()).collect();
    let mut rcon = 1u8;
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = [
                s[t[1] as usize] ^ rcon,
                s[t[2] as usize],
                s[t[3] as usize],
                s[t[0] as usize],
            ];
            rcon = (rcon << 1) ^ if rcon & 0x80 != 0 { 0x1b } else { 0 };
        } else if i % 8 == 4 {
            t = t.map(|b| s[b as usize]);
        }
        let prev = w[i - 8];
        w.push([prev[0] ^ t[0], prev[1] ^ t[1], prev[2] ^ t[2], prev[3] ^ t[3]]);
    }
    w.chunks(4)
        .map(|c| {
            let mut k = [0u8; 16];
            for (j, word) in c.iter().enumerate() {
                k[4 * j..4 * j + 4].copy_from_slice(word);
            }
            k
        })
        .collect()
}

fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        a = (a << 1) ^ if a & 0x80 != 0 { 0x1b } else { 0 };
        b >>= 1;
    }
    p
}

/// InvMixColumns of a round key (the equivalent inverse cipher's decryption keys).
fn inv_mix(k: [u8; 16]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for c in 0..4 {
        let a = &k[4 * c..4 * c + 4];
        for r in 0..4 {
            o[4 * c + r] =
                gmul(a[r], 14) ^ gmul(a[(r + 1) % 4], 11) ^ gmul(a[(r + 2) % 4], 13) ^ gmul(a[(r + 3) % 4], 9);
        }
    }
    o
}

/// Every 16-byte secret the run created, named.
fn secrets(data: &Path) -> Vec<(String, Vec<u8>)> {
    let root = std::fs::read(data.join("kms/root.key")).unwrap();
    let root = if root.len() == 32 {
        root
    } else {
        hex::decode(String::from_utf8(root).unwrap().trim()).unwrap()
    };
    let ks_key = hkdf(None, &root, b"sealdisk/kms/v1/keystore-key", 32);
    let ks: Value = serde_json::from_slice(&std::fs::read(data.join("kms/keystore.json")).unwrap()).unwrap();
    let rec = &ks["cmks"][0];
    let id = rec["id"].as_str().unwrap();
    let mut aad = b"sealdisk/kms/v1/cmk".to_vec();
    for s in [id, A, R] {
        aad.extend_from_slice(&(s.len() as u16).to_be_bytes());
        aad.extend_from_slice(s.as_bytes());
    }
    let cmk = Aes256Gcm::new_from_slice(&ks_key)
        .unwrap()
        .decrypt(
            Nonce::from_slice(&hex::decode(rec["nonce"].as_str().unwrap()).unwrap()),
            Payload {
                msg: &hex::decode(rec["sealed"].as_str().unwrap()).unwrap(),
                aad: &aad,
            },
        )
        .unwrap();
    // The disk's key row and its data key (unwrapped in this process).
    let db = sealdisk::testing::catalog::open(&data.join(sealdisk::testing::catalog::CATALOG_FILE)).unwrap();
    let r = db.begin_read().unwrap();
    let keys: Vec<sealdisk::testing::catalog::KeyRecord> = sealdisk::testing::catalog::list_r(&r).unwrap();
    assert_eq!(keys.len(), 1, "one encrypted disk, one key");
    let k = &keys[0];
    let salt = &k.wrapped.blob[1..33];
    let wk = hkdf(Some(salt), &cmk, b"sealdisk/kms/v1/wrap-key", 32);
    let kms = sealdisk::Kms::open(sealdisk::KmsConfig::local(data)).unwrap();
    let dk = kms
        .unwrap_data_key(
            &sealdisk::KeyContext::new(&k.account, &k.region, &k.key_id),
            &k.wrapped,
            sealdisk::CallOpts::default(),
        )
        .unwrap();
    let dk = dk.as_bytes().to_vec();
    let mut out = vec![
        ("root key".to_string(), root),
        ("keystore key".to_string(), ks_key),
        ("CMK".to_string(), cmk),
        ("wrapping key".to_string(), wk),
        ("data key".to_string(), dk.clone()),
    ];
    let (k1, k2) = dk.split_at(32);
    let enc1 = expand(k1);
    let dec1: Vec<[u8; 16]> = (0..15)
        .map(|i| match i {
            0 => enc1[14],
            14 => enc1[0],
            _ => inv_mix(enc1[14 - i]),
        })
        .collect();
    for (name, sched) in [("k1 enc", enc1), ("k1 dec", dec1), ("k2 enc", expand(k2))] {
        for (i, rk) in sched.iter().enumerate() {
            out.push((format!("{name} round key {i}"), rk.to_vec()));
        }
    }
    out
}

/// Panics if `hay` (named `what`) holds any 16-byte window of a secret.
fn scan(what: &str, hay: &[u8], secrets: &[(String, Vec<u8>)]) {
    // Index every window by its first 8 bytes; one pass over the haystack.
    let mut first: HashSet<u64> = HashSet::new();
    let mut windows: Vec<(&str, &[u8])> = Vec::new();
    for (name, s) in secrets {
        for w in s.windows(16) {
            first.insert(u64::from_le_bytes(w[..8].try_into().unwrap()));
            windows.push((name, w));
        }
    }
    let zero_page = |p: usize| hay[p..(p + 4096 + 15).min(hay.len())].iter().all(|&b| b == 0);
    let mut i = 0;
    while i + 16 <= hay.len() {
        if i % 4096 == 0 && zero_page(i) {
            i += 4096;
            continue;
        }
        let h = u64::from_le_bytes(hay[i..i + 8].try_into().unwrap());
        if first.contains(&h) {
            if let Some((name, _)) = windows.iter().find(|(_, w)| *w == &hay[i..i + 16]) {
                panic!("{what} holds {name} bytes at offset {i:#x}");
            }
        }
        i += 1;
    }
}

#[test]
fn the_tests_own_key_expansion_matches_fips_197() {
    let s = sbox();
    assert_eq!((s[0x00], s[0x01], s[0x53], s[0xff]), (0x63, 0x7c, 0xed, 0x16));
    // FIPS-197 appendix A.3: the AES-256 key expansion example.
    let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").unwrap();
    let rk = expand(&key);
    assert_eq!(hex::encode(&rk[2][..4]), "9ba35411");
    assert_eq!(hex::encode(&rk[14][12..]), "706c631e");
}

/// The guest data `io` writes (a pattern of period 251): every 16-byte window of it.
fn guest_data() -> Vec<(String, Vec<u8>)> {
    vec![(
        "guest data".to_string(),
        (0..251 + 16).map(|i| (i * 7 % 251) as u8).collect(),
    )]
}

/// `log_args`: how the daemon logs (the log is scanned like every other file, and
/// for the guest's data as well).
fn run(kernel: &str, log_args: &[&str]) {
    let tag = if log_args.is_empty() { "human" } else { "json" };
    let dir = TempDir::new(&format!("core-{kernel}-{tag}"));
    let data = dir.0.join("data");
    let log = data.with_extension("log");
    let args = [&["--cores", "0", "--pool-size", "64M", "--no-qos"][..], log_args].concat();
    let mut dm = start_daemon_with(BIN, &data, &args, &log, |c| {
        c.env("SEALDISK_XTS_KERNEL", kernel).env_remove("SEALDISK_KMS_ROOT_KEY");
    });
    rpc(&data, "ActivateKms", json!({}));
    let inst = rpc(&data, "CreateInstance", json!({"SystemDisk.SizeBytes": 4 * MIB}));
    let iid = inst["InstanceId"].as_str().unwrap().to_owned();
    let disk = rpc(&data, "CreateDisk", json!({"SizeBytes": 16 * MIB, "Encrypted": true}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    rpc(&data, "AttachDisk", json!({"DiskId": disk, "InstanceId": iid}));
    io(&data.join("nbd.sock"), &disk);
    let attached = gcore(dm.0.id(), &dir.0.join("core"));
    rpc(&data, "DetachDisk", json!({"DiskId": disk, "InstanceId": iid}));
    let detached = gcore(dm.0.id(), &dir.0.join("core"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(dm.0.id() as i32, libc::SIGTERM) };
    let st = dm.0.wait().unwrap();
    assert!(st.success(), "{st}: {}", std::fs::read_to_string(&log).unwrap());
    let s = secrets(&data);
    scan(&format!("{kernel}: core dump with the disk attached"), &attached, &s);
    scan(&format!("{kernel}: core dump after detach"), &detached, &s);
    let mut files = Vec::new();
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(&data, &mut files);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("disk attached") && log_text.contains("NBD: connection closed"),
        "the log has the run's lines: {log_text}"
    );
    if tag == "json" {
        for l in log_text.lines().filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            assert!(v["level"].is_string(), "{l}");
        }
    }
    scan(
        &format!("{kernel}: the daemon's log"),
        log_text.as_bytes(),
        &guest_data(),
    );
    files.push(log);
    let others: Vec<(String, Vec<u8>)> = s.iter().filter(|(n, _)| n != "root key").cloned().collect();
    for f in files {
        if f.file_name()
            .is_some_and(|n| n == "root.key" || n == "sealdisk.sock" || n == "nbd.sock")
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(&f) else { continue };
        let hexed: Vec<(String, Vec<u8>)> = others
            .iter()
            .map(|(n, k)| (format!("{n} (hex)"), hex::encode(k).into_bytes()))
            .collect();
        scan(&format!("{kernel}: {}", f.display()), &bytes, &others);
        scan(&format!("{kernel}: {}", f.display()), &bytes, &hexed);
    }
    eprintln!(
        "{kernel}: {} secrets, core dumps of {} and {} MiB and every file: no key bytes",
        s.len(),
        attached.len() >> 20,
        detached.len() >> 20
    );
}

#[test]
fn no_key_bytes_in_core_dumps_files_or_logs_with_the_aesni_kernel() {
    run("aesni", &[]);
}

#[test]
fn no_key_bytes_in_core_dumps_files_or_logs_with_the_vaes_kernel() {
    run("vaes-avx2", &[]);
}

/// The JSON log at the most verbose level: every line the daemon can write for this
/// run, scanned for key bytes (raw and hex) and guest data.
#[test]
fn no_key_bytes_in_core_dumps_files_or_json_trace_logs() {
    run("aesni", &["--log-format", "json", "--log-level", "trace"]);
}
