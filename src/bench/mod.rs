//! Benchmarks that ship in the binary (`sealdisk bench ...`): they report
//! figures as ratios against baselines measured in the same run.

pub(crate) mod crypto;
pub(crate) mod fio;
pub(crate) mod io;
pub(crate) mod job;
pub(crate) mod report;
pub(crate) mod vhost;

use std::path::PathBuf;

/// Why a benchmark did not run. (A job that fails while running reports its error in
/// the report instead: the other jobs' figures stay.)
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A fio option or job file it refuses.
    #[error(transparent)]
    Job(#[from] fio::JobError),
    /// A flag, job geometry or device limit it refuses; the message names it and what
    /// to use instead.
    #[error("{0}")]
    Refused(String),
    /// A target it could not set up, with the layer's error.
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file or `/proc` entry it could not read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cores(#[from] crate::reactor::CoresError),
    #[error(transparent)]
    Reactor(#[from] crate::reactor::CallError),
    #[error(transparent)]
    Iopoll(#[from] crate::bdev::IopollError),
}

impl BenchError {
    /// `what` failed because of `source`.
    pub(crate) fn setup(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BenchError::Setup {
            what: what.into(),
            source: source.into(),
        }
    }
}
