//! Byte-exact formats of the KMS: identifier rules, labels, associated data, record
//! layouts, and the few crypto primitives built on them. `docs/format.md`, section
//! "Key derivation and wrapping", describes exactly what this file does; change both
//! together and bump the version.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroize;

use super::error::{IdField, KmsError};
use crate::secmem::SecretMem;

/// Version of the wrapped-key record layout (first byte of every blob).
pub(super) const WRAPPED_FORMAT: u8 = 1;
/// Version of the keystore and state files.
pub(super) const STORE_FORMAT: u32 = 1;

/// Length of a CMK and of the root key, in bytes.
pub(super) const CMK_LEN: usize = 32;
/// Length of a data key (XTS-AES-256: two 256-bit keys).
pub(crate) const DATA_KEY_LEN: usize = 64;
/// Length of the random HKDF salt of each data key.
pub(super) const SALT_LEN: usize = 32;
/// AES-GCM nonce length.
pub(super) const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub(super) const TAG_LEN: usize = 16;
/// Length of a local wrapped-key blob: version, salt, nonce, ciphertext, tag.
pub(super) const LOCAL_BLOB_LEN: usize = 1 + SALT_LEN + NONCE_LEN + DATA_KEY_LEN + TAG_LEN;

/// HKDF info prefix of a data key; the key id (UTF-8) follows.
pub(super) const LABEL_DATA_KEY: &[u8] = b"sealdisk/kms/v1/data-key:";
/// HKDF info of the per-record wrapping key.
pub(super) const LABEL_WRAP_KEY: &[u8] = b"sealdisk/kms/v1/wrap-key";
/// HKDF info of the keystore key (derived from the root key).
pub(super) const LABEL_KEYSTORE_KEY: &[u8] = b"sealdisk/kms/v1/keystore-key";
/// Prefix of the associated data of an encrypted CMK in the keystore.
pub(super) const LABEL_CMK_AAD: &[u8] = b"sealdisk/kms/v1/cmk";
/// Prefix of the transit `context`.
pub(super) const LABEL_TRANSIT_CONTEXT: &[u8] = b"sealdisk/kms/v1/transit-context";

const MAX_ID: usize = 128;

/// Checks an identifier against the rules of its field.
///
/// * account: 1..=64 of `[A-Za-z0-9_]` (no `-`, so transit key names stay unambiguous);
/// * region: 1..=64 of `[A-Za-z0-9-]`, not starting or ending with `-`;
/// * key id, disk id, CMK id: 1..=128 of `[A-Za-z0-9._:-]`.
pub(super) fn validate_id(field: IdField, value: &str) -> Result<(), KmsError> {
    let (max, ok): (usize, fn(u8) -> bool) = match field {
        IdField::Account => (64, |c| c.is_ascii_alphanumeric() || c == b'_'),
        IdField::Region => (64, |c| c.is_ascii_alphanumeric() || c == b'-'),
        IdField::KeyId | IdField::DiskId | IdField::CmkId => (MAX_ID, |c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-')
        }),
    };
    let reason = if value.is_empty() || value.len() > max || !value.bytes().all(ok) {
        match field {
            IdField::Account => "must be 1 to 64 characters of A-Z a-z 0-9 _",
            IdField::Region => "must be 1 to 64 characters of A-Z a-z 0-9 -",
            _ => "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        }
    } else if field == IdField::Region && (value.starts_with('-') || value.ends_with('-')) {
        "must not start or end with -"
    } else {
        return Ok(());
    };
    let mut shown: String = value.chars().take(40).collect();
    if value.chars().count() > 40 {
        shown.push('…');
    }
    Err(KmsError::InvalidId {
        field,
        value: format!("{shown:?}"),
        reason,
    })
}

fn push_lp(out: &mut Vec<u8>, s: &str) {
    // Identifiers are validated (<= 128 bytes), so the length always fits in 16 bits.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Associated data of a local wrapped key:
/// `0x01 ‖ lp(account) ‖ lp(region) ‖ lp(key_id) ‖ lp(cmk_id)`, `lp(s) = BE16(len) ‖ s`.
pub(super) fn wrap_aad(account: &str, region: &str, key_id: &str, cmk_id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(1 + 8 + account.len() + region.len() + key_id.len() + cmk_id.len());
    a.push(WRAPPED_FORMAT);
    for s in [account, region, key_id, cmk_id] {
        push_lp(&mut a, s);
    }
    a
}

/// Associated data of an encrypted CMK in the keystore:
/// `"sealdisk/kms/v1/cmk" ‖ lp(cmk_id) ‖ lp(account) ‖ lp(region)`.
pub(super) fn cmk_aad(cmk_id: &str, account: &str, region: &str) -> Vec<u8> {
    let mut a = LABEL_CMK_AAD.to_vec();
    for s in [cmk_id, account, region] {
        push_lp(&mut a, s);
    }
    a
}

/// Raw bytes of the transit derivation context (sent base64-encoded):
/// `"sealdisk/kms/v1/transit-context" ‖ lp(account) ‖ lp(region) ‖ lp(key_id)`.
pub(super) fn transit_context(account: &str, region: &str, key_id: &str) -> Vec<u8> {
    let mut a = LABEL_TRANSIT_CONTEXT.to_vec();
    for s in [account, region, key_id] {
        push_lp(&mut a, s);
    }
    a
}

/// HKDF info of a data key: `LABEL_DATA_KEY ‖ key_id`.
pub(super) fn data_key_info(key_id: &str) -> Vec<u8> {
    let mut i = LABEL_DATA_KEY.to_vec();
    i.extend_from_slice(key_id.as_bytes());
    i
}

/// Fills `buf` from the operating system's CSPRNG.
pub(super) fn random_bytes(buf: &mut [u8]) -> Result<(), KmsError> {
    OsRng.try_fill_bytes(buf).map_err(|e| KmsError::Io {
        op: "reading the system random source for",
        path: "getrandom(2)".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// HKDF-SHA256 (RFC 5869) of `ikm` with `salt` (`None`: the RFC's all-zero salt) and
/// `info`, `len` bytes, straight into new secret memory.
#[inline(never)]
pub(super) fn hkdf_sha256(
    salt: Option<&[u8]>,
    ikm: &SecretMem,
    info: &[u8],
    len: usize,
) -> Result<SecretMem, KmsError> {
    let mut out = SecretMem::new(len)?;
    hkdf_into(salt, ikm.as_slice(), info, out.as_mut_slice());
    // The HKDF state (PRK, HMAC pads) lived in `hkdf_into`'s frame, below this one.
    scrub_stack();
    Ok(out)
}

/// The HKDF work, in a frame of its own that [`scrub_stack`] then overwrites.
#[inline(never)]
fn hkdf_into(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(salt, ikm);
    // `out` is at most 64 bytes here, far below HKDF's 255 * 32 limit.
    hk.expand(info, out).expect("HKDF output length within limit");
}

/// AES-256-GCM encryption of `plain` (secret) under `key` (secret, 32 bytes); returns
/// `ciphertext ‖ tag`. The plaintext is copied to secret scratch memory and encrypted
/// there, so it never lands in ordinary memory.
#[inline(never)]
pub(super) fn gcm_seal(
    key: &SecretMem,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, KmsError> {
    let mut scratch = SecretMem::from_slice(plain)?;
    let tag = gcm_seal_in_place(key.as_slice(), nonce, aad, scratch.as_mut_slice());
    // The cipher's round keys and GHASH key lived in that frame, below this one.
    scrub_stack();
    let tag = tag.ok_or_else(|| KmsError::BackendError {
        detail: "AES-GCM refused to encrypt".into(),
    })?;
    let mut out = Vec::with_capacity(plain.len() + TAG_LEN);
    out.extend_from_slice(scratch.as_slice()); // ciphertext now
    out.extend_from_slice(&tag);
    Ok(out)
}

/// AES-256-GCM decryption of `ciphertext ‖ tag` into new secret memory; `None` if the
/// tag does not verify.
#[inline(never)]
pub(super) fn gcm_open(
    key: &SecretMem,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Option<SecretMem>, KmsError> {
    let Some(ct_len) = sealed.len().checked_sub(TAG_LEN) else {
        return Ok(None);
    };
    let mut out = SecretMem::from_slice(&sealed[..ct_len])?;
    let ok = gcm_open_in_place(key.as_slice(), nonce, aad, out.as_mut_slice(), &sealed[ct_len..]);
    // As in `gcm_seal`.
    scrub_stack();
    Ok(ok.then_some(out))
}

/// AES-256-GCM sealing in a frame of its own (see [`scrub_stack`]); the tag.
#[inline(never)]
fn gcm_seal_in_place(key: &[u8], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> Option<[u8; TAG_LEN]> {
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte AES key");
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        .ok()?;
    Some(tag.into())
}

/// AES-256-GCM opening in a frame of its own (see [`scrub_stack`]); whether the tag
/// verified.
#[inline(never)]
fn gcm_open_in_place(key: &[u8], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte AES key");
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
        .is_ok()
}

/// `true` if the two halves of a 64-byte XTS key differ (constant time).
pub(super) fn halves_differ(key: &[u8]) -> bool {
    let (a, b) = key.split_at(key.len() / 2);
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff != 0
}

/// Constant-time equality of two byte strings of equal length.
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Best-effort wipe of the stack below the caller's frame.
///
/// The hash, HKDF and AES-GCM types of the RustCrypto crates keep key-equivalent state
/// (HMAC pads, AES round keys, the GHASH key) inside themselves, on the stack of the
/// function that uses them; the AES and GHASH ones zeroize on drop (crate features), the
/// HMAC ones do not. The helpers above therefore do that work in `#[inline(never)]`
/// worker functions and call this from their caller once the worker has returned: its
/// 16 KiB array then lies over the stack area the worker's frame used.
///
/// It also clears the vector registers ([`crate::crypto::clear_vector_registers`]): the AES and GHASH
/// code leaves round keys and the hash key in them, and a thread spawned afterwards
/// (clone copies the parent's register file) or a core dump (each thread's saved XSAVE
/// state) would carry them.
#[inline(never)]
pub(crate) fn scrub_stack() {
    let mut area = [0u8; 16 * 1024];
    area.zeroize();
    std::hint::black_box(&area);
    crate::crypto::clear_vector_registers();
}

/// Lower-case hex.
pub(super) fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex into `out` (which must be exactly half as long); `false` on any bad digit
/// or length. Writes nothing anywhere else, so it can decode secrets into secret memory.
pub(super) fn hex_decode_into(hex: &[u8], out: &mut [u8]) -> bool {
    if hex.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        match (hex_val(pair[0]), hex_val(pair[1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Decodes non-secret hex into a new vector.
pub(super) fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    let mut v = vec![0u8; hex.len() / 2];
    hex_decode_into(hex.as_bytes(), &mut v).then_some(v)
}

/// serde adapter: `Vec<u8>` as a lower-case hex string.
pub(super) mod hex_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as hex.
    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex_encode(bytes))
    }

    /// Deserializes from hex.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::hex_decode(&s).ok_or_else(|| serde::de::Error::custom("invalid hex string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id(IdField::Account, "1234567890").is_ok());
        assert!(validate_id(IdField::Account, "acc_1").is_ok());
        assert!(validate_id(IdField::Account, "a-b").is_err());
        assert!(validate_id(IdField::Account, "").is_err());
        assert!(validate_id(IdField::Region, "cn-hangzhou").is_ok());
        assert!(validate_id(IdField::Region, "-cn").is_err());
        assert!(validate_id(IdField::Region, "cn_x").is_err());
        assert!(validate_id(IdField::KeyId, "key-0001:a.b_c").is_ok());
        assert!(validate_id(IdField::KeyId, "a/b").is_err());
        assert!(validate_id(IdField::KeyId, &"k".repeat(129)).is_err());
        assert!(validate_id(IdField::KeyId, &"k".repeat(128)).is_ok());
    }

    #[test]
    fn hex() {
        assert_eq!(hex_encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex_decode("00AB10").unwrap(), vec![0, 0xab, 0x10]);
        assert!(hex_decode("0g").is_none());
        assert!(hex_decode("abc").is_none());
    }

    #[test]
    fn aad_layout() {
        assert_eq!(
            wrap_aad("a", "bc", "k", "c"),
            vec![1, 0, 1, b'a', 0, 2, b'b', b'c', 0, 1, b'k', 0, 1, b'c']
        );
    }

    #[test]
    fn halves() {
        let mut k = [7u8; 64];
        assert!(!halves_differ(&k));
        k[63] = 8;
        assert!(halves_differ(&k));
    }
}
