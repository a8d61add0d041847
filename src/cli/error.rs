//! What the command line refuses before it talks to a daemon or starts one. Printed
//! on stderr as `sealdisk <command>: <error>`; the exit code is 2.

use std::path::PathBuf;

/// A flag, parameter or file the command line refuses, or the daemon that did not
/// start; each says what to give instead.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("--backend rbd needs --ceph-conf PATH and --rbd-pool NAME")]
    RbdOptions,
    #[error("--ceph-conf and --rbd-pool apply to --backend rbd only")]
    RbdOptionsWithoutRbd,
    #[error("{arg}: not JSON after := ({source})")]
    NotJson {
        arg: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: parameters are Key=Value (e.g. Size=20), or Key:=JSON")]
    NotKeyValue(String),
    #[error("{0}: empty parameter name")]
    EmptyName(String),
    #[error("--size {0:?}: use a number with B, K, M, G or T (bare numbers are GiB)")]
    MigrateSize(String),
    #[error(transparent)]
    Size(#[from] crate::units::UnitError),
    #[error(transparent)]
    Cores(#[from] crate::reactor::CoresError),
    #[error("set BAO_TOKEN (or VAULT_TOKEN) for the transit KMS")]
    NoTransitToken,
    #[error(transparent)]
    Kms(#[from] crate::kms::KmsError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    QosFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::control::metrics_http::MetricsAddrError),
    #[error("{flag} {name}: no such group")]
    NoSuchGroup { flag: &'static str, name: String },
    #[error("{flag} {name:?}: cannot look the group up: {source}")]
    GroupLookup {
        flag: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--import-devices needs --import-dir")]
    ImportDevicesWithoutDir,
    #[error("--import-dir {}: must be an existing directory, given as an absolute path", .0.display())]
    ImportDir(PathBuf),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
}
