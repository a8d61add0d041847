//! Known-answer tests for XTS-AES-256 from published vectors, read at run time
//! from `tests/data/` (sources and checksums in `tests/data/README.md`):
//!
//! * IEEE Std 1619-2007 Annex B, vectors 10–14 (512-byte data units);
//! * NIST CAVP `XTSGenAES256.rsp` (128-bit hex tweak form);
//! * Wycheproof `aes_xts_test.json`, the AES-256 groups.
//!
//! Every case runs on every kernel in [`Kernel::available`], in both
//! directions, through the data-unit API. A case that is also a whole sector
//! (length 512/1024/2048/4096, tweak value < 2^64) also runs through the
//! sector API, in place and out of place. A missing file, or fewer cases than
//! the files are known to hold, fails the test.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use sealdisk::{Kernel, Xts, XtsError, SECTOR_SIZES};
use serde_json::Value;

fn data_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "vector file {} cannot be read ({e}); see tests/data/README.md for where it comes from",
            path.display()
        )
    })
}

fn unhex(what: &str, s: &str) -> Vec<u8> {
    hex::decode(s.trim()).unwrap_or_else(|e| panic!("{what}: bad hex {s:?}: {e}"))
}

fn key64(what: &str, bytes: &[u8]) -> [u8; 64] {
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: key is {} bytes, not 64", bytes.len()))
}

/// One known answer: a data unit under a 512-bit XTS key (k1 ‖ k2) and a
/// 128-bit tweak value (before encryption under k2).
struct Case {
    label: String,
    key: [u8; 64],
    tweak: [u8; 16],
    pt: Vec<u8>,
    ct: Vec<u8>,
}

/// How many (case, kernel) pairs ran through each API.
#[derive(Default, Debug)]
struct Tally {
    data_unit: usize,
    sector: usize,
}

/// The sector number if `case` is exactly one sector of a supported size
/// with a tweak value below 2^64 (dm-crypt plain64: `LE64(n) ‖ 0^64`).
fn as_sector(case: &Case) -> Option<u64> {
    if SECTOR_SIZES.contains(&case.pt.len()) && case.tweak[8..] == [0u8; 8] {
        Some(u64::from_le_bytes(case.tweak[..8].try_into().unwrap()))
    } else {
        None
    }
}

fn expect_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(hex::encode(got), hex::encode(want), "{what}");
}

/// Runs `case` on every available kernel, both directions.
fn check(case: &Case, tally: &mut Tally) {
    assert_eq!(case.pt.len(), case.ct.len(), "{}: PT and CT lengths differ", case.label);
    let sector = as_sector(case);
    for kernel in Kernel::available() {
        let what = |op: &str| format!("{} [{kernel}] {op}", case.label);
        let xts = Xts::with_kernel(&case.key, kernel).unwrap_or_else(|e| panic!("{}: {e}", what("with_kernel")));

        let mut buf = case.pt.clone();
        xts.encrypt_data_unit(&mut buf, &case.tweak)
            .unwrap_or_else(|e| panic!("{}: {e}", what("encrypt_data_unit")));
        expect_eq(&buf, &case.ct, &what("encrypt_data_unit"));
        let mut buf = case.ct.clone();
        xts.decrypt_data_unit(&mut buf, &case.tweak)
            .unwrap_or_else(|e| panic!("{}: {e}", what("decrypt_data_unit")));
        expect_eq(&buf, &case.pt, &what("decrypt_data_unit"));
        tally.data_unit += 1;

        if let Some(n) = sector {
            let ss = case.pt.len();
            let mut buf = case.pt.clone();
            xts.encrypt_sectors(&mut buf, n, ss)
                .unwrap_or_else(|e| panic!("{}: {e}", what("encrypt_sectors")));
            expect_eq(&buf, &case.ct, &what("encrypt_sectors"));
            xts.decrypt_sectors(&mut buf, n, ss)
                .unwrap_or_else(|e| panic!("{}: {e}", what("decrypt_sectors")));
            expect_eq(&buf, &case.pt, &what("decrypt_sectors"));
            let mut out = vec![0u8; ss];
            xts.encrypt_sectors_to(&case.pt, &mut out, n, ss)
                .unwrap_or_else(|e| panic!("{}: {e}", what("encrypt_sectors_to")));
            expect_eq(&out, &case.ct, &what("encrypt_sectors_to"));
            xts.decrypt_sectors_to(&case.ct, &mut out, n, ss)
                .unwrap_or_else(|e| panic!("{}: {e}", what("decrypt_sectors_to")));
            expect_eq(&out, &case.pt, &what("decrypt_sectors_to"));
            tally.sector += 1;
        }
    }
}

fn kernels() -> usize {
    let k = Kernel::available();
    assert!(k.contains(&Kernel::Portable), "the portable kernel is always available");
    println!("kernels: {}", k.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "));
    k.len()
}

// ---------------------------------------------------------------------------
// IEEE Std 1619-2007 Annex B
// ---------------------------------------------------------------------------

/// Records of `Name = value` lines separated by blank lines; `#` comments.
fn ieee_records(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("IEEE 1619 file: unexpected line {line:?}"));
        assert!(
            cur.insert(k.to_string(), v.to_string()).is_none(),
            "IEEE 1619 file: field {k} twice in one record"
        );
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn ieee1619_2007_annex_b_vectors_10_to_14() {
    let nk = kernels();
    let records = ieee_records(&data_file("ieee1619-2007-xts-aes-256.txt"));
    let mut tally = Tally::default();
    let mut seen = Vec::new();
    for r in &records {
        let field = |k: &str| {
            r.get(k)
                .unwrap_or_else(|| panic!("IEEE 1619 record {r:?} lacks {k}"))
                .as_str()
        };
        let n: u32 = field("Vector").parse().expect("vector number");
        let label = format!("IEEE 1619-2007 vector {n}");
        let mut key = unhex(&label, field("Key1"));
        key.extend(unhex(&label, field("Key2")));
        // The data unit sequence number is printed as a number; the tweak
        // value is that number as a 128-bit little-endian integer.
        let dusn = u128::from_str_radix(field("DUSN"), 16).expect("DUSN");
        let case = Case {
            key: key64(&label, &key),
            tweak: dusn.to_le_bytes(),
            pt: unhex(&label, field("PTX")),
            ct: unhex(&label, field("CTX")),
            label,
        };
        assert_eq!(case.pt.len(), 512, "{}: Annex B uses 512-byte data units", case.label);
        if n == 10 {
            // DUSN ff is the tweak byte string ff 00 .. 00, i.e. sector 255.
            assert_eq!(hex::encode(case.tweak), "ff000000000000000000000000000000");
            assert_eq!(as_sector(&case), Some(255));
        }
        assert!(as_sector(&case).is_some(), "{} is a whole 512-byte sector", case.label);
        check(&case, &mut tally);
        seen.push(n);
    }
    assert_eq!(seen, [10, 11, 12, 13, 14], "vectors present in the file");
    assert_eq!(tally.data_unit, 5 * nk);
    assert_eq!(tally.sector, 5 * nk, "every Annex B vector also runs as a sector");
    println!("IEEE 1619-2007 Annex B: 5 vectors x {nk} kernels: {tally:?}");
}

// ---------------------------------------------------------------------------
// NIST CAVP XTSGenAES256.rsp
// ---------------------------------------------------------------------------

struct RspRecord {
    section: String,
    fields: BTreeMap<String, String>,
}

/// The records of a CAVP response file: `[SECTION]` headers, `COUNT = n`
/// starting each record, `Name = value` fields, `#` comments, CRLF or LF.
fn rsp_records(text: &str) -> Vec<RspRecord> {
    let mut out: Vec<RspRecord> = Vec::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line.to_string();
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("XTSGenAES256.rsp: unexpected line {line:?}"));
        if k == "COUNT" {
            out.push(RspRecord {
                section: section.clone(),
                fields: BTreeMap::new(),
            });
        }
        let rec = out
            .last_mut()
            .unwrap_or_else(|| panic!("XTSGenAES256.rsp: field {k} before the first COUNT"));
        assert!(
            rec.fields.insert(k.to_string(), v.to_string()).is_none(),
            "XTSGenAES256.rsp: field {k} twice in one record"
        );
    }
    out
}

#[test]
fn nist_cavp_xtsgenaes256() {
    let nk = kernels();
    let records = rsp_records(&data_file("XTSGenAES256.rsp"));
    let mut tally = Tally::default();
    let mut ran = 0usize;
    let mut skipped = 0usize;
    let mut per_len: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for r in &records {
        let f = |k: &str| {
            r.fields
                .get(k)
                .unwrap_or_else(|| panic!("{} record {:?} lacks {k}", r.section, r.fields))
                .as_str()
        };
        let label = format!("NIST XTSGenAES256 {} COUNT = {}", r.section, f("COUNT"));
        let bits: usize = f("DataUnitLen").parse().expect("DataUnitLen");
        *per_len.entry((r.section.clone(), bits)).or_default() += 1;
        let pt = unhex(&label, f("PT"));
        let ct = unhex(&label, f("CT"));
        assert_eq!(pt.len(), bits.div_ceil(8), "{label}: PT length vs DataUnitLen");
        assert_eq!(ct.len(), bits.div_ceil(8), "{label}: CT length vs DataUnitLen");
        if !bits.is_multiple_of(8) {
            // Data units that end inside a byte: the API is byte-granular.
            skipped += 1;
            continue;
        }
        let tweak: [u8; 16] = unhex(&label, f("i"))
            .try_into()
            .unwrap_or_else(|_| panic!("{label}: i is not 16 bytes"));
        let case = Case {
            key: key64(&label, &unhex(&label, f("Key"))),
            tweak,
            pt,
            ct,
            label,
        };
        // Both directions whichever section the record is in.
        check(&case, &mut tally);
        ran += 1;
    }
    println!("NIST XTSGenAES256.rsp: records by (section, DataUnitLen bits): {per_len:?}");
    println!("NIST XTSGenAES256.rsp: {ran} run, {skipped} skipped (DataUnitLen not a multiple of 8 bits)");
    let expected_lengths: BTreeMap<(String, usize), usize> = [
        ("[ENCRYPT]", 140, 100),
        ("[ENCRYPT]", 250, 100),
        ("[ENCRYPT]", 256, 100),
        ("[ENCRYPT]", 384, 200),
        ("[DECRYPT]", 140, 100),
        ("[DECRYPT]", 250, 100),
        ("[DECRYPT]", 256, 100),
        ("[DECRYPT]", 384, 200),
    ]
    .into_iter()
    .map(|(s, b, n)| ((s.to_string(), b), n))
    .collect();
    assert_eq!(per_len, expected_lengths, "the file was misread or is not NIST's");
    assert_eq!(records.len(), 1000);
    assert_eq!((ran, skipped), (600, 400));
    assert_eq!(tally.data_unit, 600 * nk);
}

// ---------------------------------------------------------------------------
// Wycheproof aes_xts_test.json
// ---------------------------------------------------------------------------

fn json_str<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("wycheproof: {k} missing or not a string in {v}"))
}

fn json_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("wycheproof: {k} missing or not a number"))
}

/// An invalid case must be refused, or at least not yield the listed answer.
fn check_invalid(label: &str, key: &[u8; 64], tweak: &[u8; 16], msg: &[u8], ct: &[u8]) {
    for kernel in Kernel::available() {
        let xts = Xts::with_kernel(key, kernel).unwrap_or_else(|e| panic!("{label} [{kernel}]: {e}"));
        if msg.len() < 16 {
            let mut buf = msg.to_vec();
            assert!(
                matches!(xts.encrypt_data_unit(&mut buf, tweak), Err(XtsError::DataUnitTooShort(n)) if n == msg.len()),
                "{label} [{kernel}]: a {}-byte data unit must be refused",
                msg.len()
            );
            assert_eq!(buf, msg, "{label} [{kernel}]: a refused call changed the buffer");
        } else {
            let mut buf = msg.to_vec();
            if xts.encrypt_data_unit(&mut buf, tweak).is_ok() {
                assert_ne!(buf, ct, "{label} [{kernel}]: invalid case encrypted to the listed CT");
            }
        }
        if ct.len() < 16 {
            let mut buf = ct.to_vec();
            assert!(
                matches!(
                    xts.decrypt_data_unit(&mut buf, tweak),
                    Err(XtsError::DataUnitTooShort(_))
                ),
                "{label} [{kernel}]: a {}-byte data unit must be refused",
                ct.len()
            );
        } else {
            let mut buf = ct.to_vec();
            if xts.decrypt_data_unit(&mut buf, tweak).is_ok() {
                assert_ne!(buf, msg, "{label} [{kernel}]: invalid case decrypted to the listed PT");
            }
        }
    }
}

#[test]
fn wycheproof_aes_xts_256() {
    let nk = kernels();
    let doc: Value = serde_json::from_str(&data_file("wycheproof_aes_xts_test.json"))
        .expect("wycheproof_aes_xts_test.json is not JSON");
    assert_eq!(json_str(&doc, "algorithm"), "AES-XTS");
    let groups = doc["testGroups"].as_array().expect("testGroups");
    let mut total = 0usize;
    let mut other_sizes = 0usize;
    let mut by_result: BTreeMap<String, usize> = BTreeMap::new();
    let mut equal_halves = 0usize;
    let mut tally = Tally::default();
    for g in groups {
        let tests = g["tests"].as_array().expect("tests");
        total += tests.len();
        // keySize is the whole XTS key in bits: 512 = 2 x AES-256.
        let key_bits = json_u64(g, "keySize");
        if key_bits != 512 {
            assert!(key_bits == 256 || key_bits == 384, "unexpected keySize {key_bits}");
            other_sizes += tests.len();
            continue;
        }
        let iv_bits = json_u64(g, "ivSize") as usize;
        for t in tests {
            let label = format!("wycheproof tcId {} ({})", t["tcId"], json_str(t, "comment"));
            let key = unhex(&label, json_str(t, "key"));
            assert_eq!(key.len() * 8, 512, "{label}: keySize 512 means a 64-byte key");
            let key = key64(&label, &key);
            let iv = unhex(&label, json_str(t, "iv"));
            assert_eq!(iv.len() * 8, iv_bits, "{label}: iv length vs ivSize");
            assert!(iv.len() <= 16, "{label}: iv longer than a tweak");
            // A short IV is the leading bytes of the tweak value; the rest
            // is zero (checked against pyca/cryptography, see the README).
            let mut tweak = [0u8; 16];
            tweak[..iv.len()].copy_from_slice(&iv);
            let msg = unhex(&label, json_str(t, "msg"));
            let ct = unhex(&label, json_str(t, "ct"));
            let result = json_str(t, "result");
            *by_result.entry(result.to_string()).or_default() += 1;

            if key[..32] == key[32..] {
                equal_halves += 1;
                for kernel in Kernel::available() {
                    assert!(
                        matches!(Xts::with_kernel(&key, kernel), Err(XtsError::EqualKeyHalves)),
                        "{label} [{kernel}]: a key with equal halves must be refused"
                    );
                }
                continue;
            }
            match result {
                "valid" => check(
                    &Case {
                        label,
                        key,
                        tweak,
                        pt: msg,
                        ct,
                    },
                    &mut tally,
                ),
                "invalid" => check_invalid(&label, &key, &tweak, &msg, &ct),
                "acceptable" => {
                    // Either refused, or the listed answer.
                    for kernel in Kernel::available() {
                        let xts = Xts::with_kernel(&key, kernel).unwrap();
                        let mut buf = msg.clone();
                        if xts.encrypt_data_unit(&mut buf, &tweak).is_ok() {
                            expect_eq(&buf, &ct, &format!("{label} [{kernel}] acceptable"));
                        }
                    }
                }
                other => panic!("{label}: unknown result {other:?}"),
            }
        }
    }
    println!(
        "wycheproof AES-XTS: {total} tests, {other_sizes} skipped (AES-128/192 keys), \
         AES-256 by result {by_result:?}, equal-halves keys {equal_halves}, runs {tally:?}"
    );
    assert_eq!(json_u64(&doc, "numberOfTests") as usize, total, "numberOfTests");
    assert_eq!(total, 123, "the file was misread or changed");
    assert_eq!(other_sizes, 82);
    let used: usize = by_result.values().sum();
    assert_eq!(used, 41, "AES-256 (keySize 512) tests");
    assert_eq!(by_result.get("valid"), Some(&41), "valid AES-256 tests");
    assert_eq!(tally.data_unit, 41 * nk);
}
