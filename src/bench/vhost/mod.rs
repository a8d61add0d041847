//! `sealdisk bench vhost`: fio-style load through any vhost-user-blk
//! backend's socket, from a VMM-side driver in this process.

pub mod driver;
pub mod mem;
pub mod virtq;

pub use driver::{BlkConfig, Driver, DriverOptions, Negotiated};
pub use mem::{GuestBuf, GuestMem, Seg};
pub use virtq::{BlkOp, BlkRange, Completion, QueueStats, RawDesc, Virtq};

/// Errors of the driver.
#[derive(Debug)]
pub enum Error {
    /// A vhost-user message failed (the step names it).
    Vhost {
        step: String,
        source: vhost::Error,
    },
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Not enough free descriptors for the request.
    QueueFull {
        need: usize,
        free: usize,
    },
    Timeout {
        what: String,
    },
    /// A request completed with a status other than VIRTIO_BLK_S_OK.
    Status {
        what: String,
        status: u8,
    },
    Invalid(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Vhost { step, source } => write!(f, "{step}: {source}"),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::QueueFull { need, free } => write!(f, "queue full: {need} descriptors needed, {free} free"),
            Error::Timeout { what } => write!(f, "timed out waiting for {what}"),
            Error::Status { what, status } => write!(f, "{what}: status {status}"),
            Error::Invalid(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Vhost { source, .. } => Some(source),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
