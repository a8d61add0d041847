//! `sealdisk bench vhost`: fio-style load through any vhost-user-blk
//! backend's socket, from a VMM-side driver in this process.

pub(crate) mod bench;
pub(crate) mod cpu;
pub(crate) mod driver;
pub(crate) mod mem;
pub(crate) mod virtq;

pub(crate) use driver::{BlkConfig, Negotiated};

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

/// `sealdisk bench vhost`'s options; fio's keep fio's spelling
/// (`--rw=randread --bs=4k --iodepth=32`), as in `bench io`.
#[derive(Debug, clap::Args)]
pub(crate) struct VhostArgs {
    #[command(flatten)]
    pub fio: crate::bench::fio::FioArgs,
    /// The backend's vhost-user-blk socket.
    #[arg(long)]
    pub socket: std::path::PathBuf,
    /// The backend's pid: report its CPU time and cpu_ns_per_io.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Entries per virtqueue (default: enough for the deepest job, at least 256).
    #[arg(long = "queue-size")]
    pub queue_size: Option<u16>,
    /// Do not ack VIRTIO_RING_F_EVENT_IDX (kick and get called on every request).
    #[arg(long = "no-event-idx")]
    pub no_event_idx: bool,
    /// Busy-poll the used rings instead of sleeping on the call eventfds
    /// (costs a core per job).
    #[arg(long)]
    pub spin: bool,
    /// normal or json (fio's field names).
    #[arg(long = "output-format", default_value = "normal")]
    pub output_format: String,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Run `sealdisk bench vhost`: the report on stdout; Ok(false) when a job
/// failed.
pub(crate) fn main(a: &VhostArgs) -> Result<bool, super::BenchError> {
    let jobs = a.fio.jobs(&[], |_| {})?;
    if a.output_format != "normal" && a.output_format != "json" {
        return Err(super::BenchError::Refused(format!(
            "--output-format={}: use normal or json",
            a.output_format
        )));
    }
    let opts = bench::VhostBenchOpts {
        socket: a.socket.clone(),
        jobs,
        pid: a.pid,
        queue_size: a.queue_size,
        event_idx: !a.no_event_idx,
        spin: a.spin,
        progress: !a.quiet,
    };
    let rep = bench::run(&opts)?;
    if a.output_format == "json" {
        println!("{}", serde_json::to_string_pretty(&bench::to_json(&rep)).expect("json"));
    } else {
        print!("{}", bench::to_text(&rep));
    }
    Ok(rep.groups.iter().all(|g| g.group.error.is_none()))
}
