//! The one error type of the KMS, with stable ECS-style codes.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::secmem::SecretMemError;

/// Which identifier was malformed (see [`KmsError::InvalidId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    /// The account id.
    Account,
    /// The region id.
    Region,
    /// The data key id.
    KeyId,
    /// The disk id passed for the audit log.
    DiskId,
    /// A CMK id.
    CmkId,
}

impl IdField {
    fn name(self) -> &'static str {
        match self {
            IdField::Account => "account id",
            IdField::Region => "region id",
            IdField::KeyId => "key id",
            IdField::DiskId => "disk id",
            IdField::CmkId => "CMK id",
        }
    }
}

/// Everything the KMS can refuse or fail with.
///
/// [`KmsError::code`] gives a stable, ECS-style code for the control plane; the `Display`
/// text is for people. No variant carries key material, and no message names which byte
/// of a wrapped key was wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum KmsError {
    /// `Kms.NotActivated`: KMS was never activated for this (account, region).
    NotActivated {
        /// Account id.
        account: String,
        /// Region id.
        region: String,
    },
    /// `Kms.ServiceKeyNotFound`: no service CMK exists yet for this (account, region).
    ServiceKeyNotFound {
        /// Account id.
        account: String,
        /// Region id.
        region: String,
    },
    /// `Throttling.KmsQuota`: the (account, region) KMS API quota is exhausted.
    Throttled {
        /// Account id.
        account: String,
        /// Region id.
        region: String,
        /// KMS calls that were asked for.
        needed: u32,
        /// When that many calls will be available again; `None` if never (more than the
        /// burst size, or a zero refill rate).
        retry_after: Option<Duration>,
    },
    /// `InvalidOperation.CmkDeletion`: the service CMK can never be deleted.
    CmkDeletion {
        /// Account id.
        account: String,
        /// Region id.
        region: String,
    },
    /// `InvalidOperation.CmkChange`: the service CMK can never be chosen, replaced or
    /// swapped, and the CMK of an existing key never changes.
    CmkChange {
        /// Account id.
        account: String,
        /// Region id.
        region: String,
    },
    /// `Kms.UnwrapFailed`: the wrapped key does not open under this context: wrong
    /// context, another CMK, or a damaged or tampered record. Deliberately says no more.
    UnwrapFailed {
        /// Account id of the context.
        account: String,
        /// Region id of the context.
        region: String,
        /// Key id of the context.
        key_id: String,
    },
    /// `Kms.WeakDataKey`: a derived/generated 512-bit data key had two equal halves,
    /// which XTS forbids. Astronomically unlikely; never silently retried.
    WeakDataKey {
        /// Key id.
        key_id: String,
    },
    /// `Kms.BackendUnavailable`: the external KMS could not be reached or answered with
    /// a server-side error.
    BackendUnavailable {
        /// What happened (no secrets).
        detail: String,
    },
    /// `Kms.BackendDenied`: the external KMS refused the token (HTTP 403).
    BackendDenied {
        /// What was being done.
        detail: String,
    },
    /// `Kms.BackendError`: the external KMS answered something unexpected.
    BackendError {
        /// What happened (no secrets).
        detail: String,
    },
    /// `Kms.CmkPolicyViolation`: an existing transit key does not have the properties a
    /// service CMK must have (not exportable, deletion not allowed, aes256-gcm96, derived).
    CmkPolicyViolation {
        /// Transit key name.
        name: String,
        /// Which property is wrong and how to fix it.
        detail: String,
    },
    /// `Kms.RootKeyInsecure`: the root key file is readable or writable by group/others,
    /// not owned by this user, or not a regular file.
    RootKeyInsecure {
        /// The file.
        path: PathBuf,
        /// What is wrong and the fix.
        detail: String,
    },
    /// `Kms.RootKeyInvalid`: the root key source holds something that is not a 32-byte key.
    RootKeyInvalid {
        /// Where it came from (file path, variable or credential name).
        source: String,
        /// What is wrong (never the bytes).
        detail: String,
    },
    /// `Kms.RootKeyMissing`: the keystore holds CMKs but the root key is gone.
    RootKeyMissing {
        /// Where it was looked for.
        source: String,
    },
    /// `Kms.RootKeyMismatch`: the root key does not open the keystore.
    RootKeyMismatch {
        /// Where the root key came from.
        source: String,
        /// The keystore file.
        keystore: PathBuf,
    },
    /// `Kms.KeystoreCorrupt`: the keystore or state file cannot be parsed.
    KeystoreCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// `Kms.StoreLocked`: another process (or another `Kms` in this one) has the KMS
    /// directory open.
    StoreLocked {
        /// The lock file.
        path: PathBuf,
    },
    /// `InvalidAccountId.Malformed`, `InvalidRegionId.Malformed`, `InvalidKeyId.Malformed`,
    /// `InvalidDiskId.Malformed`, `InvalidCmkId.Malformed`.
    InvalidId {
        /// Which identifier.
        field: IdField,
        /// The offending value (escaped, shortened).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// `InvalidOperation.QuotaReservation`: a quota reservation was used for another
    /// (account, region) than it was taken for.
    ReservationMismatch {
        /// What the reservation is for.
        reserved_for: String,
        /// What the call was for.
        used_for: String,
    },
    /// `InvalidParameter.KmsConfig`: the KMS configuration is unusable.
    Config {
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// `Kms.AuditFailed`: the audit record could not be written, so the operation's result
    /// is withheld (fail closed).
    AuditFailed {
        /// The audit log.
        path: PathBuf,
        /// What the kernel answered.
        source: io::Error,
    },
    /// `Kms.IoError`: reading or writing KMS state failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the kernel answered.
        source: io::Error,
    },
    /// `Kms.SecretMemory`: locked memory for key material could not be allocated.
    SecretMem(SecretMemError),
}

impl KmsError {
    /// The stable, ECS-style error code.
    pub fn code(&self) -> &'static str {
        match self {
            KmsError::NotActivated { .. } => "Kms.NotActivated",
            KmsError::ServiceKeyNotFound { .. } => "Kms.ServiceKeyNotFound",
            KmsError::Throttled { .. } => "Throttling.KmsQuota",
            KmsError::CmkDeletion { .. } => "InvalidOperation.CmkDeletion",
            KmsError::CmkChange { .. } => "InvalidOperation.CmkChange",
            KmsError::UnwrapFailed { .. } => "Kms.UnwrapFailed",
            KmsError::WeakDataKey { .. } => "Kms.WeakDataKey",
            KmsError::BackendUnavailable { .. } => "Kms.BackendUnavailable",
            KmsError::BackendDenied { .. } => "Kms.BackendDenied",
            KmsError::BackendError { .. } => "Kms.BackendError",
            KmsError::CmkPolicyViolation { .. } => "Kms.CmkPolicyViolation",
            KmsError::RootKeyInsecure { .. } => "Kms.RootKeyInsecure",
            KmsError::RootKeyInvalid { .. } => "Kms.RootKeyInvalid",
            KmsError::RootKeyMissing { .. } => "Kms.RootKeyMissing",
            KmsError::RootKeyMismatch { .. } => "Kms.RootKeyMismatch",
            KmsError::KeystoreCorrupt { .. } => "Kms.KeystoreCorrupt",
            KmsError::StoreLocked { .. } => "Kms.StoreLocked",
            KmsError::InvalidId { field, .. } => match field {
                IdField::Account => "InvalidAccountId.Malformed",
                IdField::Region => "InvalidRegionId.Malformed",
                IdField::KeyId => "InvalidKeyId.Malformed",
                IdField::DiskId => "InvalidDiskId.Malformed",
                IdField::CmkId => "InvalidCmkId.Malformed",
            },
            KmsError::ReservationMismatch { .. } => "InvalidOperation.QuotaReservation",
            KmsError::Config { .. } => "InvalidParameter.KmsConfig",
            KmsError::AuditFailed { .. } => "Kms.AuditFailed",
            KmsError::Io { .. } => "Kms.IoError",
            KmsError::SecretMem(_) => "Kms.SecretMemory",
        }
    }

    /// For `Throttling.KmsQuota`: how long to wait before retrying (`None` for every other
    /// error, and when waiting cannot help).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            KmsError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> KmsError {
        KmsError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.code())?;
        match self {
            KmsError::NotActivated { account, region } => write!(
                f,
                "KMS is not activated for account {account} in region {region}; \
                 call ActivateKms for account {account} and region {region} \
                 before creating or attaching encrypted disks there"
            ),
            KmsError::ServiceKeyNotFound { account, region } => write!(
                f,
                "account {account} has no service key (CMK) in region {region} yet; \
                 it is created with the first encrypted disk in that region"
            ),
            KmsError::Throttled {
                account,
                region,
                needed,
                retry_after,
            } => {
                write!(
                    f,
                    "the KMS API quota of account {account} in region {region} is exhausted \
                     ({needed} call(s) needed); nothing was changed"
                )?;
                match retry_after {
                    Some(d) => write!(f, "; retry after {} ms", d.as_millis().max(1)),
                    None => write!(
                        f,
                        "; this many calls can never be granted at once under the configured \
                         quota (burst size or refill rate too small)"
                    ),
                }
            }
            KmsError::CmkDeletion { account, region } => write!(
                f,
                "the service key (CMK) of account {account} in region {region} cannot be deleted: \
                 encrypted disks and snapshots depend on it for their whole life"
            ),
            KmsError::CmkChange { account, region } => write!(
                f,
                "the service key (CMK) of account {account} in region {region} cannot be chosen, \
                 replaced or swapped, and the CMK of an existing encrypted disk or snapshot never \
                 changes; to move data under a new key, copy it to a new encrypted disk"
            ),
            KmsError::UnwrapFailed {
                account,
                region,
                key_id,
            } => write!(
                f,
                "the wrapped data key {key_id} does not decrypt for account {account} in region \
                 {region}: wrong context, a different CMK, or a damaged or tampered record"
            ),
            KmsError::WeakDataKey { key_id } => write!(
                f,
                "the 512-bit data key for {key_id} has two equal halves, which XTS forbids \
                 (probability 2^-256: suspect the random source or the KMS); no key was issued"
            ),
            KmsError::BackendUnavailable { detail } => write!(f, "the KMS backend is unavailable: {detail}"),
            KmsError::BackendDenied { detail } => write!(
                f,
                "the KMS backend refused the request (permission denied) while {detail}; \
                 check the token and its policy"
            ),
            KmsError::BackendError { detail } => write!(f, "unexpected answer from the KMS backend: {detail}"),
            KmsError::CmkPolicyViolation { name, detail } => {
                write!(f, "transit key {name} cannot serve as a service CMK: {detail}")
            }
            KmsError::RootKeyInsecure { path, detail } => {
                write!(f, "refusing the KMS root key file {}: {detail}", path.display())
            }
            KmsError::RootKeyInvalid { source, detail } => {
                write!(f, "the KMS root key from {source} is unusable: {detail}")
            }
            KmsError::RootKeyMissing { source } => write!(
                f,
                "the keystore holds service keys but the KMS root key ({source}) is missing; \
                 restore the root key (a new one cannot open the existing keystore)"
            ),
            KmsError::RootKeyMismatch { source, keystore } => write!(
                f,
                "the KMS root key from {source} does not open the keystore {}; \
                 it was created with a different root key",
                keystore.display()
            ),
            KmsError::KeystoreCorrupt { path, detail } => {
                write!(f, "KMS state file {} is corrupt: {detail}", path.display())
            }
            KmsError::StoreLocked { path } => write!(
                f,
                "the KMS directory is in use by another sealdisk process (lock {} is held)",
                path.display()
            ),
            KmsError::InvalidId { field, value, reason } => {
                write!(f, "invalid {} {value}: {reason}", field.name())
            }
            KmsError::ReservationMismatch { reserved_for, used_for } => write!(
                f,
                "a KMS quota reservation for {reserved_for} was used for a call for {used_for}"
            ),
            KmsError::Config { detail } => write!(f, "invalid KMS configuration: {detail}"),
            KmsError::AuditFailed { path, source } => write!(
                f,
                "cannot write the KMS audit log {}: {source}; the operation's result was withheld",
                path.display()
            ),
            KmsError::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            KmsError::SecretMem(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for KmsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KmsError::AuditFailed { source, .. } | KmsError::Io { source, .. } => Some(source),
            KmsError::SecretMem(e) => Some(e),
            _ => None,
        }
    }
}

impl From<SecretMemError> for KmsError {
    fn from(e: SecretMemError) -> KmsError {
        KmsError::SecretMem(e)
    }
}
