//! Errors of the ECS operations: a stable ECS-style code (`data.code` in JSON-RPC) and a
//! message that says what to do.

use std::fmt;

use crate::catalog::CatalogError;
use crate::kms::KmsError;
use crate::volume::VolumeError;

/// JSON-RPC 2.0 error codes.
pub(crate) mod rpc_code {
    pub(crate) const PARSE_ERROR: i64 = -32700;
    pub(crate) const INVALID_REQUEST: i64 = -32600;
    pub(crate) const METHOD_NOT_FOUND: i64 = -32601;
    pub(crate) const INVALID_PARAMS: i64 = -32602;
    /// Application errors (limits, state, not found, KMS, pool).
    pub(crate) const OPERATION_FAILED: i64 = -32000;
}

/// Why an operation was refused or failed. Every variant has a stable code.
#[derive(Debug)]
pub enum ControlError {
    /// A parameter is missing, ill-typed, out of range, or not allowed
    /// (`MissingParameter.*`, `InvalidParameter.*`).
    Param { code: String, message: String },
    /// An object does not exist (`InvalidDiskId.NotFound`, ...).
    NotFound { code: &'static str, id: String },
    /// An object belongs to another account (`Forbidden.CrossAccount`).
    CrossAccount { what: &'static str, id: String },
    /// A limit of encrypted disks or shared storage (`InvalidOperation.*`).
    Limit { code: &'static str, message: String },
    /// The object is in the wrong state for the operation (`IncorrectDiskStatus`, ...).
    State { code: &'static str, message: String },
    /// The KMS refused or failed (its own codes: `Kms.NotActivated`, `Throttling.KmsQuota`, ...).
    Kms(KmsError),
    /// The volume pool refused or failed.
    Volume(VolumeError),
    /// The catalog database failed.
    Catalog(CatalogError),
    /// The data path could not be set up (`DataPath.Error`).
    DataPath(String),
    /// No such method (`InvalidAction.NotFound`).
    MethodNotFound(String),
}

impl ControlError {
    pub fn param(code: impl Into<String>, message: impl Into<String>) -> ControlError {
        ControlError::Param {
            code: code.into(),
            message: message.into(),
        }
    }
    pub fn limit(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError::Limit {
            code,
            message: message.into(),
        }
    }
    pub fn state(code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError::State {
            code,
            message: message.into(),
        }
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        match self {
            ControlError::Param { code, .. } => code,
            ControlError::NotFound { code, .. } => code,
            ControlError::CrossAccount { .. } => "Forbidden.CrossAccount",
            ControlError::Limit { code, .. } => code,
            ControlError::State { code, .. } => code,
            ControlError::Kms(e) => e.code(),
            ControlError::Volume(e) => e.code(),
            ControlError::Catalog(e) => e.code(),
            ControlError::DataPath(_) => "DataPath.Error",
            ControlError::MethodNotFound(_) => "InvalidAction.NotFound",
        }
    }

    /// The JSON-RPC error code this maps to.
    pub fn rpc_code(&self) -> i64 {
        match self {
            ControlError::Param { .. } => rpc_code::INVALID_PARAMS,
            ControlError::MethodNotFound(_) => rpc_code::METHOD_NOT_FOUND,
            // A malformed id is a bad parameter, whichever layer noticed it.
            ControlError::Kms(KmsError::InvalidId { .. }) => rpc_code::INVALID_PARAMS,
            _ => rpc_code::OPERATION_FAILED,
        }
    }

    /// For throttling: milliseconds until a retry can succeed.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            ControlError::Kms(e) => e.retry_after().map(|d| d.as_millis() as u64),
            _ => None,
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Param { message, .. } => f.write_str(message),
            ControlError::NotFound { code, id } => {
                let what = code.split('.').next().unwrap_or("Id").trim_start_matches("Invalid");
                write!(
                    f,
                    "{what} {id:?} does not exist in this account and region; check the id with the Describe call"
                )
            }
            ControlError::CrossAccount { what, id } => write!(
                f,
                "{what} {id} belongs to another account; use the account that owns it (only unencrypted images can be shared)"
            ),
            ControlError::Limit { message, .. } => f.write_str(message),
            ControlError::State { message, .. } => f.write_str(message),
            ControlError::Kms(e) => {
                write!(f, "{e}")?;
                if let Some(d) = e.retry_after() {
                    write!(f, " (retry after {} ms; nothing was changed)", d.as_millis())?;
                }
                Ok(())
            }
            ControlError::Volume(e) => write!(f, "{e}"),
            ControlError::Catalog(e) => write!(f, "{e}"),
            ControlError::DataPath(e) => write!(f, "data path: {e}"),
            ControlError::MethodNotFound(m) => write!(
                f,
                "unknown method {m:?}; methods are ECS action names such as CreateDisk or DescribeDisks \
                 (`sealdisk rpc --list` shows them all)"
            ),
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::Kms(e) => Some(e),
            ControlError::Volume(e) => Some(e),
            ControlError::Catalog(e) => Some(e),
            _ => None,
        }
    }
}

impl From<KmsError> for ControlError {
    fn from(e: KmsError) -> Self {
        ControlError::Kms(e)
    }
}
impl From<VolumeError> for ControlError {
    fn from(e: VolumeError) -> Self {
        ControlError::Volume(e)
    }
}
impl From<CatalogError> for ControlError {
    fn from(e: CatalogError) -> Self {
        ControlError::Catalog(e)
    }
}
impl From<redb::TransactionError> for ControlError {
    fn from(e: redb::TransactionError) -> Self {
        ControlError::Catalog(crate::catalog::db_err(e))
    }
}
impl From<redb::CommitError> for ControlError {
    fn from(e: redb::CommitError) -> Self {
        ControlError::Catalog(crate::catalog::db_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn io_and_database_failures_keep_their_cause_through_the_control_error() {
        let e = ControlError::Volume(VolumeError::io(
            "fdatasync of the pool",
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
        assert_eq!(e.code(), "Pool.IoError");
        assert_eq!(e.rpc_code(), rpc_code::OPERATION_FAILED);
        let vol = e.source().expect("the volume error");
        let io = vol
            .source()
            .expect("the I/O error")
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(io.raw_os_error(), Some(libc::EIO));
        assert!(e.to_string().contains("fdatasync of the pool"), "{e}");

        let db = crate::catalog::db_err(redb::StorageError::Corrupted("page 7".into()));
        let e = ControlError::Catalog(db);
        assert_eq!(e.code(), "Catalog.Error");
        let redb_err = e
            .source()
            .unwrap()
            .source()
            .unwrap()
            .downcast_ref::<Box<redb::Error>>()
            .unwrap();
        assert!(redb_err.to_string().contains("page 7"));
    }

    #[test]
    fn a_malformed_id_from_any_layer_is_invalid_params() {
        let e = ControlError::Kms(KmsError::InvalidId {
            field: crate::kms::IdField::DiskId,
            value: "d-\u{1}".into(),
            reason: "a control character",
        });
        assert_eq!(e.code(), "InvalidDiskId.Malformed");
        assert_eq!(e.rpc_code(), rpc_code::INVALID_PARAMS);
        let e = ControlError::Kms(KmsError::NotActivated {
            account: "a".into(),
            region: "r".into(),
        });
        assert_eq!(e.rpc_code(), rpc_code::OPERATION_FAILED);
    }
}
