//! sealdisk: encrypted cloud disks for virtual machines, served from the hypervisor host.
//!
//! One library crate and one binary (`src/main.rs`, which only calls [`cli_main`]). The
//! modules are private and layered; read them top-down (see `docs/architecture.md`):
//!
//! * frontends: `frontend::vhost` (vhost-user-blk for VMs), `frontend::nbd` (NBD server),
//!   and the benchmarks in `bench`, each a poller on a reactor;
//! * `reactor`: one pinned, polling thread per core with its io_uring (`uring`) and
//!   buffer pool (`iobuf`);
//! * `bdev`: the block device stack a disk's I/O goes through, crypto (XTS) over
//!   volume (`volume`: thin, copy-on-write, with its metadata thread) over uring, malloc
//!   or null;
//! * `crypto` (the XTS-AES-256 kernels) and `secmem` (locked, non-dumpable memory for
//!   key material) at the bottom;
//! * off the data path: the control plane (`control`, JSON-RPC on a unix socket), its
//!   catalog (`catalog`, redb), the key service (`kms`), the daemon (`daemon`), the data
//!   directory's layout (`layout`) and the command line (`cli`).
//!
//! The public surface below is what the binary, the fio engine (`fio-engine/`), the fuzz
//! crate (`fuzz/`) and the integration tests (`tests/`) use, grouped by purpose.
//! [`testing`] holds the internals that tests and fuzzers reach into; it is not an API.

#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unreachable_pub)]

mod bdev;
mod bench;
mod catalog;
mod cli;
mod control;
mod counters;
mod crypto;
mod daemon;
mod export;
mod frontend;
mod iobuf;
mod kms;
mod layout;
mod logging;
mod rbd;
mod reactor;
mod secmem;
mod store;
mod sys;
mod units;
mod uring;
mod volume;

/// The `sealdisk` command: parses the arguments and runs the subcommand.
pub use cli::main as cli_main;

// Block devices: the stack a disk's I/O goes through, and the requests it carries.
pub use bdev::crypto::CryptoBdev;
pub use bdev::iostat::{DiskStats, StatsBdev};
pub use bdev::malloc::MallocBdev;
pub use bdev::null::NullBdev;
pub use bdev::qos::{QosBdev, QosLimits};
pub use bdev::uring::{Iopoll, UringBdev, UringOpts};
pub use bdev::{
    Bdev, BdevRef, Channel, ChannelCtx, DrainTimeout, IoCompletion, IoError, IoOp, IoQueue, IoRequest, IopollError,
    StackError, MAX_IO_BYTES,
};

// Reactors: the polling threads, their rings and buffer pools.
pub use iobuf::BufPool;
pub use reactor::{
    all_cores, parse_cores, CallError, CoresError, Poll, Poller, ReactorConfig, ReactorCtx, Reactors, SendError,
    StatsSnapshot,
};
pub use uring::{Ring, RingOpts};

// Encryption and key memory.
pub use crypto::{Kernel, Xts, XtsError, KEY_LEN, SECTOR_SIZES};
pub use secmem::{Protection, SecretMem, SecretMemError};

// Volumes: the thin, copy-on-write pool and its fault injection.
pub use volume::{FaultPoint, FaultSpecError, Faults, Pool, VolumeError};

// Frontends and the exports they serve.
pub use export::{DuplicateExport, Export, Exports};
pub use frontend::nbd::{NbdConfig, NbdServer};
pub use frontend::vhost::{VhostConfig, VhostServer};

// The control plane, its client and the daemon.
pub use control::check::check;
pub use control::client::{Client, RpcError};
pub use control::{Control, ControlConfig, ControlError, QosConfig};
pub use daemon::EXIT_DATA_PATH_PANIC;

// The key service.
pub use kms::{
    AuditConfig, AuditEntry, BackendConfig, BackendKind, CallOpts, KeyContext, Kms, KmsConfig, KmsError, LocalConfig,
    ManualClock, QuotaConfig, RootKeySource, TransitConfig, WrappedKey, ROOT_KEY_CREDENTIAL, ROOT_KEY_ENV,
};

// Sizes and times as people write them.
pub use control::util::rfc3339;
pub use units::{parse_rfc3339, parse_size, UnitError};

/// Internals that the integration tests, the fuzz crate and benchmarks reach into:
/// wire formats, parsers, the catalog's records, the benchmarks' VMM driver. Not an API:
/// nothing here is stable.
#[doc(hidden)]
pub mod testing {
    pub use crate::bdev::crypto::DECRYPT_BUDGET;
    pub use crate::bdev::iostat::Dir;
    pub use crate::control::metrics::LATENCY_BUCKETS;

    /// The NBD wire protocol, its limits and the TLS setup.
    pub mod nbd {
        pub use crate::frontend::nbd::proto::*;
        pub use crate::frontend::nbd::tls::server_config;
        pub use crate::frontend::nbd::MAX_OPTION_DATA;
    }

    /// The vhost-user-blk descriptor chain walker and request parser.
    pub mod vhost {
        pub use crate::frontend::vhost::request::{parse, walk, Kind};
    }

    /// The Ceph RBD binding (librbd/librados loaded at run time) and the RBD bdev.
    pub mod rbd {
        pub use crate::bdev::rbd::RbdBdev;
        pub use crate::rbd::*;
    }

    /// The benchmarks' vhost-user VMM: a driver, its virtqueues and guest memory.
    pub mod vmm {
        pub use crate::bench::vhost::driver::{feature_names, Driver, DriverOptions, DEFAULT_FEATURES};
        pub use crate::bench::vhost::mem::{GuestMem, Seg};
        pub use crate::bench::vhost::virtq::{blk_header, BlkOp, RawDesc, Virtq, STATUS_UNWRITTEN};
    }

    /// The benchmarks' job specifications, runners and verify blocks.
    pub mod bench {
        pub use crate::bench::fio::JobError;
        pub use crate::bench::fio::{FileJob, JobSpec, Rw, TargetSpec};
        pub use crate::bench::job::{check_verify_block, fill_verify_block, VerifyError};
        pub use crate::bench::BenchError;
        /// `bench io`.
        pub mod io {
            pub use crate::bench::io::{run, IoBenchOpts};
        }
        /// `bench vhost`.
        pub mod vhost {
            pub use crate::bench::vhost::bench::{run, to_json, to_text, VhostBenchOpts};
        }
    }

    /// The catalog's tables and records.
    pub mod catalog {
        pub use crate::catalog::*;
    }

    /// One JSON-RPC line and the parameter readers the operations use.
    pub mod rpc {
        pub use crate::control::rpc::{handle_line, Handler, LogLine};
        pub use crate::control::Params;
    }
}
