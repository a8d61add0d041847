//! The embedded local KMS: CMKs in a keystore file, encrypted under a root key.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::error::{IdField, KmsError};
use super::format::{self, hex_serde, CMK_LEN, DATA_KEY_LEN, LOCAL_BLOB_LEN, NONCE_LEN, SALT_LEN, STORE_FORMAT};
use super::fsutil;
use super::{BackendKind, CmkInfo, DataKey, KeyContext, WrappedKey};
use crate::secmem::SecretMem;

/// Environment variable that may hold the root key (64 hex digits).
pub const ROOT_KEY_ENV: &str = "SEALDISK_KMS_ROOT_KEY";
/// Name of the systemd credential that may hold the root key.
pub const ROOT_KEY_CREDENTIAL: &str = "sealdisk-kms-root-key";
/// Default root key file name inside `DATA_DIR/kms/`.
pub(super) const ROOT_KEY_FILE: &str = "root.key";
/// Keystore file name inside `DATA_DIR/kms/`.
pub(super) const KEYSTORE_FILE: &str = "keystore.json";

/// Where the local KMS gets its 32-byte root key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RootKeySource {
    /// `$SEALDISK_KMS_ROOT_KEY` if set; else the systemd credential
    /// `$CREDENTIALS_DIRECTORY/sealdisk-kms-root-key` if it exists; else the file
    /// `DATA_DIR/kms/root.key`, created (0600, 32 random bytes) on first run.
    #[default]
    Auto,
    /// This file: owner-only (mode `0600` or `0400`), owned by this user. Created 0600
    /// with 32 random bytes if absent while the keystore holds no CMK.
    File(PathBuf),
    /// This environment variable, holding 64 hex digits.
    Env(String),
    /// The credential `sealdisk-kms-root-key` in this directory (`None`:
    /// `$CREDENTIALS_DIRECTORY`, as systemd's `LoadCredential=`/`LoadCredentialEncrypted=`
    /// sets it). Same ownership and mode rules as a file; never created.
    Credential(Option<PathBuf>),
}

/// Settings of the embedded local KMS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalConfig {
    /// Root key source.
    pub root_key: RootKeySource,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CmkRecord {
    id: String,
    account: String,
    region: String,
    created_at: String,
    created_unix: u64,
    alg: String,
    #[serde(with = "hex_serde")]
    nonce: Vec<u8>,
    /// `AES-256-GCM(keystore key, nonce, CMK, cmk_aad)`: ciphertext ‖ tag.
    #[serde(with = "hex_serde")]
    sealed: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct KeystoreFile {
    format: u32,
    kind: String,
    cmks: Vec<CmkRecord>,
}

const KEYSTORE_KIND: &str = "sealdisk-kms-keystore";
const CMK_ALG: &str = "AES-256-GCM";

/// The embedded local KMS backend.
#[derive(Debug)]
pub struct LocalKms {
    keystore_path: PathBuf,
    /// HKDF(root key) — the only long-lived secret; the root key itself is dropped.
    keystore_key: SecretMem,
    records: Mutex<Vec<CmkRecord>>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Opens a key file without following symlinks and checks it is a regular file owned by
/// this user and not accessible to group or others. `Ok(None)` if it does not exist.
fn open_key_file(path: &Path) -> Result<Option<File>, KmsError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(KmsError::RootKeyInsecure {
                path: path.to_owned(),
                detail: "it is a symbolic link; point the configuration at the real file".into(),
            })
        }
        Err(e) => return Err(KmsError::io("opening root key file", path, e)),
    };
    let md = file
        .metadata()
        .map_err(|e| KmsError::io("stat root key file", path, e))?;
    if !md.file_type().is_file() {
        return Err(KmsError::RootKeyInsecure {
            path: path.to_owned(),
            detail: "it is not a regular file".into(),
        });
    }
    if md.uid() != euid() {
        return Err(KmsError::RootKeyInsecure {
            path: path.to_owned(),
            detail: format!(
                "it is owned by uid {} but sealdisk runs as uid {}; fix with `chown {} {}`",
                md.uid(),
                euid(),
                euid(),
                path.display()
            ),
        });
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KmsError::RootKeyInsecure {
            path: path.to_owned(),
            detail: format!(
                "its mode is {mode:04o}, so group or others can access it; \
                 fix with `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(Some(file))
}

/// Parses key material: exactly 32 raw bytes, or 64 hex digits with optional surrounding
/// whitespace. Writes only into secret memory.
fn parse_key(bytes: &[u8], source: &str) -> Result<SecretMem, KmsError> {
    let mut key = SecretMem::new(CMK_LEN)?;
    if bytes.len() == CMK_LEN {
        key.as_mut_slice().copy_from_slice(bytes);
        return Ok(key);
    }
    let trimmed = bytes.trim_ascii();
    if format::hex_decode_into(trimmed, key.as_mut_slice()) {
        return Ok(key);
    }
    Err(KmsError::RootKeyInvalid {
        source: source.to_owned(),
        detail: format!(
            "expected 32 raw bytes or 64 hex digits, found {} bytes that are neither",
            bytes.len()
        ),
    })
}

fn read_key_file(mut file: File, path: &Path) -> Result<SecretMem, KmsError> {
    let mut buf = [0u8; 160];
    let mut n = 0;
    let res = loop {
        match file.read(&mut buf[n..]) {
            Ok(0) => break Ok(()),
            Ok(k) => {
                n += k;
                if n == buf.len() {
                    break Err(KmsError::RootKeyInvalid {
                        source: path.display().to_string(),
                        detail: "the file is too long to be a key".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(KmsError::io("reading root key file", path, e)),
        }
    };
    let out = res.and_then(|()| parse_key(&buf[..n], &path.display().to_string()));
    buf.zeroize();
    out
}

fn create_key_file(path: &Path) -> Result<SecretMem, KmsError> {
    let mut key = SecretMem::new(CMK_LEN)?;
    format::random_bytes(key.as_mut_slice())?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| KmsError::io("creating root key file", path, e))?;
    f.write_all(key.as_slice())
        .and_then(|()| f.sync_all())
        .map_err(|e| KmsError::io("writing root key file", path, e))?;
    fsutil::fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(key)
}

/// Loads (or, for a file source on first run, creates) the root key.
fn load_root_key(source: &RootKeySource, kms_dir: &Path, have_cmks: bool) -> Result<(SecretMem, String), KmsError> {
    let resolved = match source {
        RootKeySource::Auto => {
            if std::env::var_os(ROOT_KEY_ENV).is_some() {
                RootKeySource::Env(ROOT_KEY_ENV.into())
            } else if std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|d| Path::new(&d).join(ROOT_KEY_CREDENTIAL).exists())
                .unwrap_or(false)
            {
                RootKeySource::Credential(None)
            } else {
                RootKeySource::File(kms_dir.join(ROOT_KEY_FILE))
            }
        }
        other => other.clone(),
    };
    match resolved {
        RootKeySource::Env(var) => {
            let desc = format!("environment variable {var}");
            let Some(val) = std::env::var_os(&var) else {
                return Err(KmsError::RootKeyMissing {
                    source: format!("{desc} (not set)"),
                });
            };
            let mut bytes = val.into_encoded_bytes();
            let res = parse_key(&bytes, &desc);
            bytes.zeroize();
            Ok((res?, desc))
        }
        RootKeySource::Credential(dir) => {
            let dir = match dir {
                Some(d) => d,
                None => std::env::var_os("CREDENTIALS_DIRECTORY")
                    .map(PathBuf::from)
                    .ok_or_else(|| KmsError::Config {
                        detail: "root key source is a systemd credential but CREDENTIALS_DIRECTORY is not set \
                                 (add LoadCredential=sealdisk-kms-root-key:<file> to the unit)"
                            .into(),
                    })?,
            };
            let path = dir.join(ROOT_KEY_CREDENTIAL);
            let desc = format!("credential {}", path.display());
            match open_key_file(&path)? {
                Some(f) => Ok((read_key_file(f, &path)?, desc)),
                None => Err(KmsError::RootKeyMissing { source: desc }),
            }
        }
        RootKeySource::File(path) => {
            let desc = format!("file {}", path.display());
            match open_key_file(&path)? {
                Some(f) => Ok((read_key_file(f, &path)?, desc)),
                None if have_cmks => Err(KmsError::RootKeyMissing { source: desc }),
                None => Ok((create_key_file(&path)?, desc)),
            }
        }
        RootKeySource::Auto => unreachable!("resolved above"),
    }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> KmsError {
    KmsError::KeystoreCorrupt {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

impl LocalKms {
    /// Opens the keystore in `kms_dir` (`DATA_DIR/kms`), loading the root key.
    pub(crate) fn open(kms_dir: &Path, cfg: &LocalConfig) -> Result<LocalKms, KmsError> {
        let keystore_path = kms_dir.join(KEYSTORE_FILE);
        let records = match fsutil::read_optional(&keystore_path)? {
            None => Vec::new(),
            Some(bytes) => {
                let ks: KeystoreFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&keystore_path, e.to_string()))?;
                if ks.kind != KEYSTORE_KIND || ks.format != STORE_FORMAT {
                    return Err(corrupt(
                        &keystore_path,
                        format!("unsupported keystore kind/format {:?}/{}", ks.kind, ks.format),
                    ));
                }
                ks.cmks
            }
        };
        let (root, source) = load_root_key(&cfg.root_key, kms_dir, !records.is_empty())?;
        let keystore_key = format::hkdf_sha256(None, &root, format::LABEL_KEYSTORE_KEY, 32)?;
        drop(root);
        let kms = LocalKms {
            keystore_path,
            keystore_key,
            records: Mutex::new(Vec::new()),
        };
        for (i, r) in records.iter().enumerate() {
            for (field, v) in [
                (IdField::CmkId, &r.id),
                (IdField::Account, &r.account),
                (IdField::Region, &r.region),
            ] {
                format::validate_id(field, v).map_err(|e| corrupt(&kms.keystore_path, e.to_string()))?;
            }
            if records[..i]
                .iter()
                .any(|o| o.id == r.id || (o.account == r.account && o.region == r.region))
            {
                return Err(corrupt(&kms.keystore_path, format!("duplicate CMK record {}", r.id)));
            }
            if kms.decrypt_record(r)?.is_none() {
                return Err(if i == 0 {
                    KmsError::RootKeyMismatch {
                        source,
                        keystore: kms.keystore_path.clone(),
                    }
                } else {
                    corrupt(&kms.keystore_path, format!("CMK record {} does not decrypt", r.id))
                });
            }
        }
        *kms.records.lock().unwrap_or_else(|p| p.into_inner()) = records;
        Ok(kms)
    }

    fn decrypt_record(&self, r: &CmkRecord) -> Result<Option<SecretMem>, KmsError> {
        let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(r.nonce.as_slice()) else {
            return Ok(None);
        };
        if r.alg != CMK_ALG || r.sealed.len() != CMK_LEN + format::TAG_LEN {
            return Ok(None);
        }
        let aad = format::cmk_aad(&r.id, &r.account, &r.region);
        format::gcm_open(&self.keystore_key, &nonce, &aad, &r.sealed)
    }

    fn info(r: &CmkRecord) -> CmkInfo {
        CmkInfo {
            id: r.id.clone(),
            account: r.account.clone(),
            region: r.region.clone(),
            created_at: r.created_at.clone(),
            backend: BackendKind::Local,
        }
    }

    /// The CMK id of (account, region), if it exists (no decryption).
    pub(crate) fn cmk_id(&self, account: &str, region: &str) -> Option<String> {
        let recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
        recs.iter()
            .find(|r| r.account == account && r.region == region)
            .map(|r| r.id.clone())
    }

    pub(crate) fn describe(&self, account: &str, region: &str) -> Option<CmkInfo> {
        let recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
        recs.iter()
            .find(|r| r.account == account && r.region == region)
            .map(Self::info)
    }

    /// The CMK of (account, region), created if `create` and absent. Returns the CMK, its
    /// description, and whether it was created now.
    fn cmk(&self, account: &str, region: &str, create: bool) -> Result<Option<(SecretMem, CmkInfo, bool)>, KmsError> {
        let mut recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = recs.iter().find(|r| r.account == account && r.region == region) {
            let cmk = self
                .decrypt_record(r)?
                .ok_or_else(|| corrupt(&self.keystore_path, format!("CMK record {} no longer decrypts", r.id)))?;
            return Ok(Some((cmk, Self::info(r), false)));
        }
        if !create {
            return Ok(None);
        }
        let mut idb = [0u8; 16];
        format::random_bytes(&mut idb)?;
        idb[6] = (idb[6] & 0x0f) | 0x40; // UUID version 4
        idb[8] = (idb[8] & 0x3f) | 0x80; // RFC 4122 variant
        let h = format::hex_encode(&idb);
        let id = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
        let mut cmk = SecretMem::new(CMK_LEN)?;
        format::random_bytes(cmk.as_mut_slice())?;
        let mut nonce = [0u8; NONCE_LEN];
        format::random_bytes(&mut nonce)?;
        let aad = format::cmk_aad(&id, account, region);
        let sealed = format::gcm_seal(&self.keystore_key, &nonce, &aad, cmk.as_slice())?;
        let (secs, _) = fsutil::now_unix();
        let rec = CmkRecord {
            id,
            account: account.to_owned(),
            region: region.to_owned(),
            created_at: fsutil::rfc3339(secs, None),
            created_unix: secs,
            alg: CMK_ALG.into(),
            nonce: nonce.to_vec(),
            sealed,
        };
        let mut next = recs.clone();
        next.push(rec.clone());
        let file = KeystoreFile {
            format: STORE_FORMAT,
            kind: KEYSTORE_KIND.into(),
            cmks: next,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| corrupt(&self.keystore_path, e.to_string()))?;
        fsutil::write_atomic(&self.keystore_path, &bytes)?;
        recs.push(rec.clone());
        Ok(Some((cmk, Self::info(&rec), true)))
    }

    pub(crate) fn ensure(&self, account: &str, region: &str) -> Result<(CmkInfo, bool), KmsError> {
        let (_cmk, info, created) = self.cmk(account, region, true)?.expect("created on demand");
        Ok((info, created))
    }

    /// New data key for `ctx` (creating the CMK on first use). Returns the key, its
    /// wrapped form, and the CMK's description if it was created by this call.
    pub(crate) fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey, Option<CmkInfo>), KmsError> {
        let (cmk, info, created) = self.cmk(&ctx.account, &ctx.region, true)?.expect("created on demand");
        let mut salt = [0u8; SALT_LEN];
        format::random_bytes(&mut salt)?;
        let dk = format::hkdf_sha256(Some(&salt), &cmk, &format::data_key_info(&ctx.key_id), DATA_KEY_LEN)?;
        if !format::halves_differ(dk.as_slice()) {
            return Err(KmsError::WeakDataKey {
                key_id: ctx.key_id.clone(),
            });
        }
        let wk = format::hkdf_sha256(Some(&salt), &cmk, format::LABEL_WRAP_KEY, 32)?;
        drop(cmk);
        let mut nonce = [0u8; NONCE_LEN];
        format::random_bytes(&mut nonce)?;
        let aad = format::wrap_aad(&ctx.account, &ctx.region, &ctx.key_id, &info.id);
        let sealed = format::gcm_seal(&wk, &nonce, &aad, dk.as_slice())?;
        let mut blob = Vec::with_capacity(LOCAL_BLOB_LEN);
        blob.push(format::WRAPPED_FORMAT);
        blob.extend_from_slice(&salt);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        debug_assert_eq!(blob.len(), LOCAL_BLOB_LEN);
        let wrapped = WrappedKey {
            format: u32::from(format::WRAPPED_FORMAT),
            backend: BackendKind::Local,
            cmk_id: info.id.clone(),
            blob,
        };
        Ok((DataKey::new(dk), wrapped, created.then_some(info)))
    }

    pub(crate) fn unwrap(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> Result<DataKey, KmsError> {
        let failed = || KmsError::UnwrapFailed {
            account: ctx.account.clone(),
            region: ctx.region.clone(),
            key_id: ctx.key_id.clone(),
        };
        let Some((cmk, info, _)) = self.cmk(&ctx.account, &ctx.region, false)? else {
            return Err(KmsError::ServiceKeyNotFound {
                account: ctx.account.clone(),
                region: ctx.region.clone(),
            });
        };
        let b = &wrapped.blob;
        if wrapped.backend != BackendKind::Local
            || wrapped.format != u32::from(format::WRAPPED_FORMAT)
            || wrapped.cmk_id != info.id
            || b.len() != LOCAL_BLOB_LEN
            || b[0] != format::WRAPPED_FORMAT
        {
            return Err(failed());
        }
        let salt = &b[1..1 + SALT_LEN];
        let nonce: [u8; NONCE_LEN] = b[1 + SALT_LEN..1 + SALT_LEN + NONCE_LEN]
            .try_into()
            .expect("length checked");
        let sealed = &b[1 + SALT_LEN + NONCE_LEN..];
        let wk = format::hkdf_sha256(Some(salt), &cmk, format::LABEL_WRAP_KEY, 32)?;
        let aad = format::wrap_aad(&ctx.account, &ctx.region, &ctx.key_id, &info.id);
        let Some(dk) = format::gcm_open(&wk, &nonce, &aad, sealed)? else {
            return Err(failed());
        };
        // Defence in depth: the unwrapped key must be exactly the one the documented
        // derivation gives for this salt and key id.
        let again = format::hkdf_sha256(Some(salt), &cmk, &format::data_key_info(&ctx.key_id), DATA_KEY_LEN)?;
        if !format::ct_eq(dk.as_slice(), again.as_slice()) {
            return Err(failed());
        }
        if !format::halves_differ(dk.as_slice()) {
            return Err(KmsError::WeakDataKey {
                key_id: ctx.key_id.clone(),
            });
        }
        Ok(DataKey::new(dk))
    }
}
