//! Key management: the per-(account, region) service CMK, per-disk data keys, KMS API
//! quota and the KMS audit log.
//!
//! [`Kms`] is the facade the control plane uses. It has two backends:
//! * [`LocalKms`], the embedded default: CMKs in `DATA_DIR/kms/keystore.json`, each
//!   AES-256-GCM-encrypted under a root key; data keys are *derived* from the CMK
//!   (HKDF-SHA256) and wrapped under a key derived from it (AES-256-GCM);
//! * [`TransitKms`], an OpenBao/Vault transit engine: one non-exportable, non-deletable,
//!   derived `aes256-gcm96` transit key per (account, region) is the CMK; data keys come
//!   from `datakey/wrapped` and are unwrapped with `decrypt`.
//!
//! Every metered call is checked in this order, and changes nothing when refused:
//! identifiers valid → KMS activated for (account, region) → quota (one unit per call,
//! taken from a [`Reservation`] when the caller passes one) → backend. Every call that
//! gets past the identifier check is written to the audit log, with its result; if the
//! audit record cannot be written the result is withheld (`Kms.AuditFailed`).
//!
//! Plaintext CMKs, the root key and data keys live only in [`SecretMem`]; see
//! `docs/kms.md` for the operator's view and `docs/format.md` ("Key derivation and
//! wrapping") for the exact bytes.

pub(crate) mod audit;
mod error;
mod format;
mod fsutil;
mod local;
mod quota;
mod stats;
mod transit;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::crypto::{Xts, XtsError};
use crate::secmem::SecretMem;

pub use audit::{AuditConfig, AuditEntry};
pub use error::KmsError;
pub use local::{LocalConfig, RootKeySource, ROOT_KEY_CREDENTIAL, ROOT_KEY_ENV};
pub use quota::{ManualClock, QuotaConfig};
pub use transit::TransitConfig;

pub(crate) use audit::Caller;
pub(crate) use error::IdField;
pub(crate) use format::DATA_KEY_LEN;
pub(crate) use local::LocalKms;
pub(crate) use quota::{Clock, RegionUsage, Reservation, SystemClock};
pub(crate) use stats::{KmsBackendSnapshot, KmsStats, KmsStatsSnapshot};
pub(crate) use transit::TransitKms;

use format::validate_id;
use quota::QuotaTable;

/// Sub-directory of the data directory that holds all KMS state.
pub(crate) use crate::layout::KMS_DIR;
/// Audit log file name inside `DATA_DIR/kms/`.
pub(crate) const AUDIT_FILE: &str = "audit.log";
/// Activation state file name inside `DATA_DIR/kms/`.
pub(crate) const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

/// Which backend holds the CMKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The embedded local KMS.
    Local,
    /// OpenBao / Vault transit.
    Transit,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Local => "local",
            BackendKind::Transit => "transit",
        })
    }
}

/// The identifiers a data key is bound to. All three are authenticated into the wrapped
/// form; unwrapping with any other value fails.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyContext {
    /// Account id: 1–64 of `[A-Za-z0-9_]`.
    pub account: String,
    /// Region id: 1–64 of `[A-Za-z0-9-]`.
    pub region: String,
    /// Data key id: 1–128 of `[A-Za-z0-9._:-]`.
    pub key_id: String,
}

impl KeyContext {
    /// A context from its three ids.
    pub fn new(account: impl Into<String>, region: impl Into<String>, key_id: impl Into<String>) -> KeyContext {
        KeyContext {
            account: account.into(),
            region: region.into(),
            key_id: key_id.into(),
        }
    }
}

/// A plaintext 64-byte XTS data key, in secret memory; wiped on drop. No `Clone`, no
/// `Display`; `Debug` shows nothing of the key.
pub struct DataKey {
    mem: SecretMem,
}

impl DataKey {
    fn new(mem: SecretMem) -> DataKey {
        debug_assert_eq!(mem.len(), DATA_KEY_LEN);
        DataKey { mem }
    }

    /// The key bytes (k1 ‖ k2), borrowed from secret memory.
    pub fn as_bytes(&self) -> &[u8; DATA_KEY_LEN] {
        self.mem.as_slice().try_into().expect("data keys are 64 bytes")
    }

    /// An XTS-AES-256 engine for this key.
    pub fn xts(&self) -> Result<Xts, XtsError> {
        Xts::new(self.as_bytes())
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("protection", &self.mem.protection())
            .finish_non_exhaustive()
    }
}

/// The wrapped form of a data key, for the catalog. Holds no secret: without the CMK it
/// is opaque. Serialises with `blob` as lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Record format version (`1`); also the blob's first byte.
    pub format: u32,
    /// Backend that wrapped it.
    pub backend: BackendKind,
    /// CMK it is wrapped under.
    pub cmk_id: String,
    /// The record; layout per backend in `docs/format.md`.
    #[serde(with = "format::hex_serde")]
    pub blob: Vec<u8>,
}

/// Description of a service CMK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmkInfo {
    /// CMK id (local: a UUID; transit: `transit:<mount>/<key name>`).
    pub id: String,
    /// RFC 3339 UTC creation time.
    pub created_at: String,
    /// Region id.
    pub region: String,
    /// Account id.
    pub account: String,
    /// Backend holding it.
    pub backend: BackendKind,
}

/// The backend behind a [`Kms`].
#[derive(Debug)]
pub enum Backend {
    /// Embedded local KMS.
    Local(LocalKms),
    /// OpenBao / Vault transit.
    Transit(TransitKms),
}

/// Which backend to open, with its settings.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// Embedded local KMS.
    Local(LocalConfig),
    /// OpenBao / Vault transit.
    Transit(TransitConfig),
}

/// Everything [`Kms::open`] needs.
#[derive(Debug, Clone)]
pub struct KmsConfig {
    /// The daemon's data directory; KMS state goes to `data_dir/kms/`.
    pub data_dir: PathBuf,
    /// Backend and its settings.
    pub backend: BackendConfig,
    /// Quota per (account, region).
    pub quota: QuotaConfig,
    /// Audit log rotation.
    pub audit: AuditConfig,
    /// Clock of the quota buckets.
    pub clock: Arc<dyn Clock>,
}

impl KmsConfig {
    /// The embedded local KMS in `data_dir`, root key from [`RootKeySource::Auto`],
    /// default quota and audit settings.
    pub fn local(data_dir: impl Into<PathBuf>) -> KmsConfig {
        KmsConfig::with_backend(data_dir, BackendConfig::Local(LocalConfig::default()))
    }

    /// The transit backend, state (activation, audit) in `data_dir`.
    pub fn transit(data_dir: impl Into<PathBuf>, transit: TransitConfig) -> KmsConfig {
        KmsConfig::with_backend(data_dir, BackendConfig::Transit(transit))
    }

    fn with_backend(data_dir: impl Into<PathBuf>, backend: BackendConfig) -> KmsConfig {
        KmsConfig {
            data_dir: data_dir.into(),
            backend,
            quota: QuotaConfig::default(),
            audit: AuditConfig::default(),
            clock: Arc::new(SystemClock::new()),
        }
    }
}

/// Per-call options of the metered operations.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallOpts<'a> {
    /// Disk the call is for, recorded in the audit log (not bound into any key).
    pub disk_id: Option<&'a str>,
    /// Quota reserved up front with [`Kms::reserve`]; one unit is used instead of the
    /// bucket. Must be for the same (account, region).
    pub reservation: Option<&'a Reservation>,
}

impl<'a> CallOpts<'a> {
    /// Options naming a disk for the audit log.
    pub fn disk(disk_id: &'a str) -> CallOpts<'a> {
        CallOpts {
            disk_id: Some(disk_id),
            reservation: None,
        }
    }

    /// These options, drawing quota from `r`.
    pub fn reserved(mut self, r: &'a Reservation) -> CallOpts<'a> {
        self.reservation = Some(r);
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Activation {
    account: String,
    region: String,
    activated_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    kind: String,
    activations: Vec<Activation>,
}

const STATE_KIND: &str = "sealdisk-kms-state";

/// The key management service.
pub struct Kms {
    _lock: fsutil::DirLock,
    state_path: PathBuf,
    backend: Backend,
    activations: Mutex<BTreeMap<(String, String), Activation>>,
    quota: Arc<QuotaTable>,
    audit: Mutex<audit::AuditLog>,
    stats: KmsStats,
}

impl fmt::Debug for Kms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kms")
            .field("backend", &self.backend)
            .field("state", &self.state_path)
            .finish_non_exhaustive()
    }
}

/// What [`Kms::metered`] needs to know about a call.
struct Call<'a> {
    op: &'static str,
    account: &'a str,
    region: &'a str,
    key_id: Option<&'a str>,
    opts: CallOpts<'a>,
}

impl Kms {
    /// Opens (creating on first use) the KMS state in `config.data_dir/kms/` and the
    /// backend. Takes an exclusive lock on the directory for the life of the `Kms`.
    pub fn open(config: KmsConfig) -> Result<Kms, KmsError> {
        config.quota.validate()?;
        let dir = config.data_dir.join(KMS_DIR);
        fsutil::private_dir(&dir)?;
        let lock = fsutil::DirLock::acquire(&dir.join(LOCK_FILE))?;
        let state_path = dir.join(STATE_FILE);
        let mut activations = BTreeMap::new();
        if let Some(bytes) = fsutil::read_optional(&state_path)? {
            let st: StateFile = serde_json::from_slice(&bytes).map_err(|e| KmsError::KeystoreCorrupt {
                path: state_path.clone(),
                detail: e.to_string(),
            })?;
            if st.kind != STATE_KIND || st.format != format::STORE_FORMAT {
                return Err(KmsError::KeystoreCorrupt {
                    path: state_path,
                    detail: format!("unsupported state kind/format {:?}/{}", st.kind, st.format),
                });
            }
            for a in st.activations {
                activations.insert((a.account.clone(), a.region.clone()), a);
            }
        }
        let audit = audit::AuditLog::open(dir.join(AUDIT_FILE), config.audit)?;
        let backend = match &config.backend {
            BackendConfig::Local(c) => Backend::Local(LocalKms::open(&dir, c)?),
            BackendConfig::Transit(c) => Backend::Transit(TransitKms::open(c)?),
        };
        Ok(Kms {
            _lock: lock,
            state_path,
            backend,
            activations: Mutex::new(activations),
            quota: Arc::new(QuotaTable::new(config.quota, config.clock)),
            audit: Mutex::new(audit),
            stats: KmsStats::default(),
        })
    }

    /// Which backend this KMS uses.
    pub fn backend_kind(&self) -> BackendKind {
        match self.backend {
            Backend::Local(_) => BackendKind::Local,
            Backend::Transit(_) => BackendKind::Transit,
        }
    }

    /// Call counters per backend.
    pub fn stats(&self) -> KmsStatsSnapshot {
        self.stats.snapshot()
    }

    /// The backend itself.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Path of the current audit log file.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).path().to_owned()
    }

    fn cmk_id_hint(&self, account: &str, region: &str) -> Option<String> {
        match &self.backend {
            Backend::Local(l) => l.cmk_id(account, region),
            Backend::Transit(t) => Some(t.cmk_id(account, region)),
        }
    }

    fn write_audit(
        &self,
        call: &Call<'_>,
        cmk_id: Option<String>,
        result: Result<(), &KmsError>,
    ) -> Result<(), KmsError> {
        let entry = AuditEntry {
            time: fsutil::rfc3339_now(),
            account: call.account.to_owned(),
            region: call.region.to_owned(),
            operation: call.op.to_owned(),
            disk_id: call.opts.disk_id.map(str::to_owned),
            key_id: call.key_id.map(str::to_owned),
            cmk_id,
            backend: self.backend_kind(),
            result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
            error_code: result.err().map(|e| e.code().to_owned()),
            caller: audit::caller(),
        };
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).append(&entry)
    }

    fn validate(&self, call: &Call<'_>) -> Result<(), KmsError> {
        validate_id(IdField::Account, call.account)?;
        validate_id(IdField::Region, call.region)?;
        if let Some(k) = call.key_id {
            validate_id(IdField::KeyId, k)?;
        }
        if let Some(d) = call.opts.disk_id {
            validate_id(IdField::DiskId, d)?;
        }
        Ok(())
    }

    fn meter(&self, call: &Call<'_>) -> Result<(), KmsError> {
        if let Some(r) = call.opts.reservation {
            if !r.same_table(&self.quota) || r.account() != call.account || r.region() != call.region {
                return Err(KmsError::ReservationMismatch {
                    reserved_for: format!("account {} region {}", r.account(), r.region()),
                    used_for: format!("account {} region {}", call.account, call.region),
                });
            }
            if r.use_one() {
                return Ok(());
            }
        }
        self.quota.take(call.account, call.region, 1, true)
    }

    /// The common path of every metered call: validate, check activation, meter, run,
    /// audit. `f` returns its value and the CMK id to record.
    fn metered<T>(
        &self,
        call: Call<'_>,
        f: impl FnOnce() -> Result<(T, Option<String>), KmsError>,
    ) -> Result<T, KmsError> {
        self.validate(&call)?;
        let res = if !self.is_activated(call.account, call.region) {
            Err(KmsError::NotActivated {
                account: call.account.to_owned(),
                region: call.region.to_owned(),
            })
        } else {
            match self.meter(&call) {
                Err(e) => {
                    if matches!(e, KmsError::Throttled { .. }) {
                        self.stats.throttled(self.backend_kind());
                    }
                    Err(e)
                }
                Ok(()) => {
                    let t = std::time::Instant::now();
                    let r = f();
                    self.stats.call(self.backend_kind(), t.elapsed(), r.is_ok());
                    if let Err(e) = &r {
                        tracing::warn!(
                            backend = %self.backend_kind(),
                            operation = call.op,
                            account = call.account,
                            region = call.region,
                            disk = call.opts.disk_id,
                            code = e.code(),
                            error = %e,
                            "KMS call failed"
                        );
                    }
                    r
                }
            }
        };
        match res {
            Ok((v, cmk_id)) => {
                self.write_audit(&call, cmk_id, Ok(()))?;
                Ok(v)
            }
            Err(e) => {
                self.write_audit(&call, self.cmk_id_hint(call.account, call.region), Err(&e))?;
                Err(e)
            }
        }
    }

    /// Activates (authorises) KMS for `account` in `region`. Idempotent; persisted.
    /// Not metered (no key operation happens); audited as `ActivateKms`.
    pub fn activate(&self, account: &str, region: &str) -> Result<(), KmsError> {
        let call = Call {
            op: "ActivateKms",
            account,
            region,
            key_id: None,
            opts: CallOpts::default(),
        };
        self.validate(&call)?;
        let res = (|| {
            let mut acts = self.activations.lock().unwrap_or_else(|p| p.into_inner());
            let k = (account.to_owned(), region.to_owned());
            if acts.contains_key(&k) {
                return Ok(());
            }
            let mut next: Vec<Activation> = acts.values().cloned().collect();
            let a = Activation {
                account: account.to_owned(),
                region: region.to_owned(),
                activated_at: fsutil::rfc3339_now(),
            };
            next.push(a.clone());
            let file = StateFile {
                format: format::STORE_FORMAT,
                kind: STATE_KIND.into(),
                activations: next,
            };
            let bytes = serde_json::to_vec_pretty(&file).expect("JSON of strings");
            fsutil::write_atomic(&self.state_path, &bytes)?;
            acts.insert(k, a);
            Ok(())
        })();
        self.write_audit(&call, None, res.as_ref().map(|_| ()))?;
        res
    }

    /// `true` if KMS is activated for `account` in `region`.
    pub fn is_activated(&self, account: &str, region: &str) -> bool {
        self.activations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(account.to_owned(), region.to_owned()))
    }

    /// Describes the service CMK of (account, region): `Kms.ServiceKeyNotFound` until
    /// the first encrypted disk there created it. Metered; audited as
    /// `DescribeServiceKey`.
    pub fn describe_service_key(&self, account: &str, region: &str) -> Result<CmkInfo, KmsError> {
        let call = Call {
            op: "DescribeServiceKey",
            account,
            region,
            key_id: None,
            opts: CallOpts::default(),
        };
        self.metered(call, || {
            let info = match &self.backend {
                Backend::Local(l) => l.describe(account, region),
                Backend::Transit(t) => t.describe(account, region)?,
            };
            let info = info.ok_or_else(|| KmsError::ServiceKeyNotFound {
                account: account.to_owned(),
                region: region.to_owned(),
            })?;
            let id = info.id.clone();
            Ok((info, Some(id)))
        })
    }

    fn audit_created(&self, info: &CmkInfo, opts: CallOpts<'_>) -> Result<(), KmsError> {
        let call = Call {
            op: "CreateServiceKey",
            account: &info.account,
            region: &info.region,
            key_id: None,
            opts: CallOpts {
                disk_id: opts.disk_id,
                reservation: None,
            },
        };
        self.write_audit(&call, Some(info.id.clone()), Ok(()))
    }

    /// Makes sure the service CMK of (account, region) exists, creating it if not
    /// (idempotent, also across processes and hosts). Metered; audited as
    /// `EnsureServiceKey`, plus `CreateServiceKey` when it was created.
    pub fn ensure_service_key(&self, account: &str, region: &str, opts: CallOpts<'_>) -> Result<CmkInfo, KmsError> {
        let call = Call {
            op: "EnsureServiceKey",
            account,
            region,
            key_id: None,
            opts,
        };
        self.metered(call, || {
            let (info, created) = match &self.backend {
                Backend::Local(l) => l.ensure(account, region)?,
                Backend::Transit(t) => t.ensure(account, region)?,
            };
            if created {
                self.audit_created(&info, opts)?;
            }
            let id = info.id.clone();
            Ok((info, Some(id)))
        })
    }

    /// A new data key for a new encrypted disk, under the service CMK of
    /// (`ctx.account`, `ctx.region`), which is created on first use. Returns the
    /// plaintext key (secret memory) and its wrapped form for the catalog. Metered (one
    /// call); audited as `GenerateDataKey`.
    pub fn generate_data_key(&self, ctx: &KeyContext, opts: CallOpts<'_>) -> Result<(DataKey, WrappedKey), KmsError> {
        let call = Call {
            op: "GenerateDataKey",
            account: &ctx.account,
            region: &ctx.region,
            key_id: Some(&ctx.key_id),
            opts,
        };
        self.metered(call, || {
            let (key, wrapped, created) = match &self.backend {
                Backend::Local(l) => l.generate(ctx)?,
                Backend::Transit(t) => t.generate(ctx)?,
            };
            if let Some(info) = created {
                self.audit_created(&info, opts)?;
            }
            let id = wrapped.cmk_id.clone();
            Ok(((key, wrapped), Some(id)))
        })
    }

    /// Decrypts a wrapped data key (at attach). Any mismatch of context, CMK, backend or
    /// bytes is `Kms.UnwrapFailed`, without saying which. Metered (one call); audited as
    /// `UnwrapDataKey`.
    pub fn unwrap_data_key(
        &self,
        ctx: &KeyContext,
        wrapped: &WrappedKey,
        opts: CallOpts<'_>,
    ) -> Result<DataKey, KmsError> {
        let call = Call {
            op: "UnwrapDataKey",
            account: &ctx.account,
            region: &ctx.region,
            key_id: Some(&ctx.key_id),
            opts,
        };
        self.metered(call, || {
            let key = match &self.backend {
                Backend::Local(l) => l.unwrap(ctx, wrapped)?,
                Backend::Transit(t) => t.unwrap(ctx, wrapped)?,
            };
            Ok((key, Some(wrapped.cmk_id.clone())))
        })
    }

    /// Always refused: the service CMK can never be deleted
    /// (`InvalidOperation.CmkDeletion`). The attempt is audited as `DeleteServiceKey`.
    pub fn delete_service_key(&self, account: &str, region: &str) -> Result<(), KmsError> {
        let call = Call {
            op: "DeleteServiceKey",
            account,
            region,
            key_id: None,
            opts: CallOpts::default(),
        };
        self.validate(&call)?;
        let e = KmsError::CmkDeletion {
            account: account.to_owned(),
            region: region.to_owned(),
        };
        self.write_audit(&call, self.cmk_id_hint(account, region), Err(&e))?;
        Err(e)
    }

    /// Always refused: the service CMK cannot be chosen, replaced or swapped, for the
    /// region or for any existing key (`InvalidOperation.CmkChange`). The attempt is
    /// audited as `ReplaceServiceKey`.
    pub fn replace_service_key(&self, account: &str, region: &str, new_cmk_id: &str) -> Result<(), KmsError> {
        let call = Call {
            op: "ReplaceServiceKey",
            account,
            region,
            key_id: None,
            opts: CallOpts::default(),
        };
        self.validate(&call)?;
        validate_id(IdField::CmkId, new_cmk_id)?;
        let e = KmsError::CmkChange {
            account: account.to_owned(),
            region: region.to_owned(),
        };
        self.write_audit(&call, self.cmk_id_hint(account, region), Err(&e))?;
        Err(e)
    }

    /// Takes quota for `n` KMS calls of (account, region) at once, or none
    /// (`Throttling.KmsQuota`, with a retry hint). An operation that needs several KMS
    /// calls reserves them first, so it can fail before changing anything. Throttled
    /// reservations are audited as `ReserveQuota`.
    pub fn reserve(&self, account: &str, region: &str, n: u32) -> Result<Reservation, KmsError> {
        let call = Call {
            op: "ReserveQuota",
            account,
            region,
            key_id: None,
            opts: CallOpts::default(),
        };
        self.validate(&call)?;
        match self.quota.take(account, region, n, false) {
            Ok(()) => Ok(Reservation::new(Arc::clone(&self.quota), account, region, n)),
            Err(e) => {
                self.write_audit(&call, None, Err(&e))?;
                Err(e)
            }
        }
    }

    /// KMS usage of `account`, per region (regions it used since this KMS was opened),
    /// sorted by region.
    pub fn usage(&self, account: &str) -> Vec<RegionUsage> {
        self.quota.usage(account)
    }

    /// Records in the audit log that the wrapped key `ctx.key_id` was destroyed
    /// (crypto-shredding: the catalog forgot the last copy). Not metered.
    pub fn audit_crypto_shred(&self, ctx: &KeyContext, disk_id: Option<&str>) -> Result<(), KmsError> {
        self.audit_unmetered("CryptoShred", ctx, disk_id)
    }

    /// Records in the audit log that the data encrypted under `ctx.key_id` (the disk
    /// `disk_id`) is being decrypted into plaintext elsewhere (MigrateDisk from an
    /// encrypted disk into an unencrypted one): operation `DecryptData`. Not metered (the
    /// unwrap that makes it possible is); a failed audit stops the operation.
    pub fn audit_decrypt_data(&self, ctx: &KeyContext, disk_id: Option<&str>) -> Result<(), KmsError> {
        self.audit_unmetered("DecryptData", ctx, disk_id)
    }

    /// An audit record of operation `op` on the key `ctx.key_id`, with no KMS call
    /// behind it and no metering.
    fn audit_unmetered(&self, op: &'static str, ctx: &KeyContext, disk_id: Option<&str>) -> Result<(), KmsError> {
        let call = Call {
            op,
            account: &ctx.account,
            region: &ctx.region,
            key_id: Some(&ctx.key_id),
            opts: CallOpts {
                disk_id,
                reservation: None,
            },
        };
        self.validate(&call)?;
        self.write_audit(&call, self.cmk_id_hint(&ctx.account, &ctx.region), Ok(()))
    }

    /// The KMS state directory (`data_dir/kms`).
    pub fn state_dir(&self) -> &Path {
        self.state_path.parent().expect("state file has a parent")
    }
}
