//! `sealdisk serve`: the daemon. On first run it creates everything it needs in the data
//! directory (catalog, pool, embedded KMS); then it starts the reactors, restores the
//! attachments the catalog records, and serves JSON-RPC on `DATA_DIR/sealdisk.sock`.
//! SIGTERM/SIGINT shut it down cleanly: stop the RPC server, take every disk off the data
//! path (keys are wiped as the exports drop), stop the reactors. Attachments stay in the
//! catalog, so the next start puts the same disks back on the data path.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog;
use crate::control::metrics::{self, Registry};
use crate::control::metrics_http::{MetricsAddr, MetricsServer};
use crate::control::monitor::Sampler;
use crate::control::rpc::LogLine;
use crate::control::server::RpcServer;
use crate::control::{Control, ControlConfig, QosConfig};
use crate::export::Exports;
use crate::frontend::nbd::{NbdConfig, NbdServer};
use crate::kms::{Kms, KmsConfig};
use crate::reactor::{ReactorConfig, Reactors};
use crate::store::{Backend, Store};
use crate::volume::{Faults, Pool};
use tracing::{error, info, warn};

pub(crate) use crate::layout::{NBD_SOCKET_FILE, POOL_FILE, SOCKET_FILE};

/// Why the daemon did not start. Each says what to change: a path it cannot use, a
/// flag combination it refuses, or the layer that failed with its cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DaemonError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--vmm-group and --rpc-group differ; the data directory can let only one group through")]
    GroupsDiffer,
    #[error("KMS ({}): {source}", source.code())]
    Kms {
        #[source]
        source: crate::kms::KmsError,
    },
    #[error("{source} ({})", source.code())]
    Catalog {
        #[source]
        source: crate::catalog::CatalogError,
    },
    #[error("SEALDISK_FAULTS: {0:?}: expected reactor:panic=Nms")]
    ReactorFault(String),
    #[error("SEALDISK_FAULTS: at most one reactor:panic item")]
    ReactorFaults,
    #[error("SEALDISK_FAULTS: {0}")]
    PoolFaults(#[source] crate::volume::FaultSpecError),
    #[error("pool {}: {source} ({})", path.display(), source.code())]
    Pool {
        path: PathBuf,
        #[source]
        source: crate::volume::VolumeError,
    },
    #[error("RBD pool {pool} ({}): {source} ({})", conf.display(), source.code())]
    RbdPool {
        pool: String,
        conf: PathBuf,
        #[source]
        source: crate::volume::VolumeError,
    },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("reactors: {0}")]
    Reactors(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::frontend::nbd::tls::TlsError),
    #[error(
        "--nbd-tcp {0}: NBD over TCP needs TLS (--tls-dir DIR); plain TCP only on a loopback address with \
         --nbd-tcp-insecure"
    )]
    TcpWithoutTls(std::net::SocketAddr),
    #[error("--tls-dir is for NBD over TCP: give --nbd-tcp ADDR too")]
    TlsWithoutTcp,
    #[error("NBD server on {}: {source}", path.display())]
    Nbd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("statistics sampler: {0}")]
    Sampler(#[source] std::io::Error),
    #[error("--metrics {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// `path` for [`DaemonError::Io`].
fn at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}
/// Default size of a new pool file (sparse).
pub(crate) const DEFAULT_POOL_SIZE: u64 = 64 << 30;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub(crate) struct DaemonConfig {
    pub data_dir: PathBuf,
    /// Pool file or block device (default `DATA_DIR/pool.img`).
    pub pool_path: Option<PathBuf>,
    /// Size of a new pool file.
    pub pool_size: u64,
    /// Where volumes live: the pool file (default) or an RBD pool (`--backend rbd`).
    pub backend: Backend,
    pub reactors: ReactorConfig,
    pub kms: KmsConfig,
    pub qos: QosConfig,
    /// RPC socket (default `DATA_DIR/sealdisk.sock`).
    pub socket: Option<PathBuf>,
    /// NBD unix socket (default `DATA_DIR/nbd.sock`).
    pub nbd_socket: Option<PathBuf>,
    /// NBD over TCP (off unless given; use a loopback address unless the
    /// network is trusted: NBD has no authentication).
    pub nbd_tcp: Option<std::net::SocketAddr>,
    /// CreateEncryptedCopy's SourcePath only beneath this directory (none: refused).
    pub import_dir: Option<PathBuf>,
    /// Block devices there too.
    pub import_devices: bool,
    /// Group of the per-instance NBD sockets (`serve --vmm-group`; None: root's).
    pub vmm_gid: Option<u32>,
    /// Group that may use the control socket (`serve --rpc-group`; None: owner only).
    pub rpc_gid: Option<u32>,
    /// TLS for NBD over TCP (`serve --tls-dir`): server-cert.pem, server-key.pem and
    /// optionally ca-cert.pem (client certificates required).
    pub tls_dir: Option<PathBuf>,
    /// Plain NBD over TCP, loopback only (`serve --nbd-tcp-insecure`).
    pub nbd_tcp_insecure: bool,
    /// Prometheus metrics endpoint (`serve --metrics ADDR`; none: off).
    pub metrics: Option<MetricsAddr>,
}

impl DaemonConfig {
    /// Embedded defaults: local KMS, pool file in the data directory, all cores.
    pub(crate) fn new(data_dir: impl Into<PathBuf>) -> DaemonConfig {
        let data_dir = data_dir.into();
        DaemonConfig {
            kms: KmsConfig::local(&data_dir),
            data_dir,
            pool_path: None,
            pool_size: DEFAULT_POOL_SIZE,
            backend: Backend::File,
            reactors: ReactorConfig::default(),
            qos: QosConfig::default(),
            socket: None,
            nbd_socket: None,
            nbd_tcp: None,
            import_dir: None,
            import_devices: false,
            vmm_gid: None,
            rpc_gid: None,
            tls_dir: None,
            nbd_tcp_insecure: false,
            metrics: None,
        }
    }

    pub(crate) fn nbd_socket_path(&self) -> PathBuf {
        self.nbd_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(NBD_SOCKET_FILE))
    }

    pub(crate) fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| self.data_dir.join(SOCKET_FILE))
    }

    pub(crate) fn pool_path(&self) -> PathBuf {
        self.pool_path.clone().unwrap_or_else(|| self.data_dir.join(POOL_FILE))
    }
}

/// A running daemon.
pub(crate) struct Daemon {
    control: Arc<Control>,
    server: Option<RpcServer>,
    reactors: Option<Arc<Reactors>>,
    /// The NBD frontend; stopped first at shutdown.
    nbd: Option<NbdServer>,
    /// The metrics endpoint, if `--metrics` was given.
    metrics_server: Option<MetricsServer>,
    /// The thread that samples per-disk statistics every second.
    sampler: Option<Sampler>,
}

/// The data directory, created if need be: owner-only, except that the VMM group may
/// pass through to its instances' sockets (DATA_DIR/instances/<id>/nbd.sock); every
/// file in here is 0600.
fn prepare_data_dir(cfg: &DaemonConfig) -> Result<(), DaemonError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    let gid = match (cfg.vmm_gid, cfg.rpc_gid) {
        (Some(v), Some(r)) if v != r => return Err(DaemonError::GroupsDiffer),
        (v, r) => v.or(r).unwrap_or(0),
    };
    std::os::unix::fs::chown(dir, None, Some(gid)).map_err(at(dir))?;
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode(if gid == 0 { 0o700 } else { 0o710 }),
    )
    .map_err(at(dir))?;
    Ok(())
}

/// The NBD server: its unix socket (and the instances' sockets), and TCP if asked for.
fn start_nbd(cfg: &DaemonConfig, reactors: &Arc<Reactors>, exports: &Arc<Exports>) -> Result<NbdServer, DaemonError> {
    let dir = &cfg.data_dir;
    let nbd_sock = cfg.nbd_socket_path();
    // NBD over TCP: TLS, or plain on loopback only when asked for in so many words.
    let tls = match (cfg.nbd_tcp, &cfg.tls_dir) {
        (Some(_), Some(d)) => Some(crate::frontend::nbd::tls::server_config(d)?),
        (Some(a), None) if cfg.nbd_tcp_insecure && a.ip().is_loopback() => {
            warn!(addr = %a, "NBD over TCP WITHOUT TLS (--nbd-tcp-insecure): loopback clients only");
            None
        }
        (Some(a), None) => return Err(DaemonError::TcpWithoutTls(a)),
        (None, Some(_)) => return Err(DaemonError::TlsWithoutTcp),
        (None, None) => None,
    };
    let nbd = NbdServer::start(
        NbdConfig {
            unix_path: Some(nbd_sock.clone()),
            tcp: cfg.nbd_tcp,
            instances_dir: Some(dir.join(crate::export::INSTANCES_DIR)),
            instance_gid: cfg.vmm_gid,
            tls,
        },
        reactors.clone(),
        exports.clone(),
    )
    .map_err(|source| DaemonError::Nbd {
        path: nbd_sock.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(&nbd_sock, std::fs::Permissions::from_mode(0o600));
    info!(
        socket = %nbd_sock.display(),
        tcp = nbd.tcp_addr().map(|a| a.to_string()),
        "NBD exports (attached disks, by disk id)"
    );
    Ok(nbd)
}

/// The metrics registry's sources (disks, reactors, the slow path) and, with
/// `--metrics`, its HTTP server.
fn start_metrics(
    cfg: &DaemonConfig,
    exports: &Arc<Exports>,
    reactors: &Arc<Reactors>,
    control: &Arc<Control>,
) -> Result<Option<MetricsServer>, DaemonError> {
    let registry = Arc::new(Registry::default());
    {
        let exports = exports.clone();
        registry.add_source(move |out| metrics::disk_families(&exports, out));
        let reactors = reactors.clone();
        registry.add_source(move |out| metrics::reactor_families(&reactors, out));
        let control = control.clone();
        registry.add_source(move |out| metrics::slow_path_families(&control.slow_path(), out));
    }
    Ok(match &cfg.metrics {
        Some(a) => {
            let m = MetricsServer::start(a, registry.clone()).map_err(|source| DaemonError::Metrics {
                addr: a.to_string(),
                source,
            })?;
            info!(addr = %m.addr(), "metrics (Prometheus text format)");
            Some(m)
        }
        None => None,
    })
}

impl Daemon {
    /// Opens or creates the data directory's state and starts serving.
    pub(crate) fn start(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        let dir = &cfg.data_dir;
        prepare_data_dir(&cfg)?;
        let kms = Arc::new(Kms::open(cfg.kms.clone()).map_err(|source| DaemonError::Kms { source })?);
        let db = catalog::open(&dir.join(catalog::CATALOG_FILE)).map_err(|source| DaemonError::Catalog { source })?;
        let pool_path = cfg.pool_path();
        // Fault injection for crash harnesses (never set in production):
        // `reactor:panic=Nms` items are the daemon's, the rest the pool's.
        let spec = std::env::var("SEALDISK_FAULTS").unwrap_or_default();
        let (reactor_faults, pool_faults): (Vec<&str>, Vec<&str>) = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .partition(|s| s.starts_with("reactor:"));
        let panic_after = match reactor_faults.as_slice() {
            [] => None,
            [one] => Some(
                one.strip_prefix("reactor:panic=")
                    .and_then(|v| v.strip_suffix("ms"))
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(std::time::Duration::from_millis)
                    .ok_or_else(|| DaemonError::ReactorFault((*one).to_owned()))?,
            ),
            _ => return Err(DaemonError::ReactorFaults),
        };
        let faults = Arc::new(Faults::parse(&pool_faults.join(",")).map_err(DaemonError::PoolFaults)?);
        if !spec.is_empty() {
            warn!(faults = %spec, "SEALDISK_FAULTS is set: injecting faults");
        }
        let pool: Store = match &cfg.backend {
            Backend::File => Store::File(
                Pool::open_with_faults(
                    db.clone(),
                    &pool_path,
                    cfg.pool_size,
                    crate::volume::DEFAULT_CLUSTER,
                    faults,
                )
                .map_err(|source| DaemonError::Pool {
                    path: pool_path.clone(),
                    source,
                })?,
            ),
            Backend::Rbd { ceph_conf, pool } => Store::Rbd(
                crate::store::rbd::RbdStore::open(
                    db.clone(),
                    ceph_conf,
                    pool,
                    &dir.join(crate::store::rbd::INTENTS_FILE),
                    faults,
                )
                .map_err(|source| DaemonError::RbdPool {
                    pool: pool.clone(),
                    conf: ceph_conf.clone(),
                    source,
                })?,
            ),
        };
        // Owner-only state files (the directory is 0700 as well).
        for f in [
            Some(dir.join(catalog::CATALOG_FILE)),
            Some(dir.join(crate::store::rbd::INTENTS_FILE)),
            pool.path().map(|p| p.to_path_buf()),
        ]
        .into_iter()
        .flatten()
        {
            if std::fs::metadata(&f).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600));
            }
        }
        // Volumes of a copy the last run did not finish (killed mid-copy).
        let swept = crate::control::check::sweep_unreferenced(&db, &pool)?;
        if !swept.is_empty() {
            warn!(
                volumes = %swept.join(","),
                "removed {} volume(s) no disk, snapshot or image refers to (an interrupted copy)",
                swept.len()
            );
        }
        let reactors = Arc::new(Reactors::start(&cfg.reactors).map_err(DaemonError::Reactors)?);
        if let Some(after) = panic_after {
            let r = reactors.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _ = r.send(0, Box::new(|_| panic!("injected by SEALDISK_FAULTS=reactor:panic")));
            });
        }
        let exports = Exports::new();
        let control = Control::new(
            db,
            pool,
            kms,
            exports.clone(),
            Some(reactors.clone()),
            ControlConfig {
                data_dir: dir.clone(),
                qos: cfg.qos,
                import_dir: cfg.import_dir.clone(),
                import_devices: cfg.import_devices,
                vmm_gid: cfg.vmm_gid,
            },
        );
        let (restored, failed) = control.restore_attachments()?;
        if !restored.is_empty() {
            info!(disks = %restored.join(","), "restored {} attached disk(s)", restored.len());
        }
        for (id, e) in &failed {
            error!(disk = %id, code = e.code(), error = %e, "could not restore the disk to the data path");
        }

        let nbd = start_nbd(&cfg, &reactors, &exports)?;

        let logf: Arc<dyn Fn(LogLine) + Send + Sync> = Arc::new(|l: LogLine| crate::control::rpc::log_line(&l));
        let sampler = control.start_sampler().map_err(DaemonError::Sampler)?;
        let metrics_server = start_metrics(&cfg, &exports, &reactors, &control)?;

        let sock = cfg.socket_path();
        // With --rpc-group the control socket is that group's too (0660); the data
        // directory lets the group pass through to it.
        let server = RpcServer::start(&sock, cfg.rpc_gid, control.clone(), logf).map_err(at(&sock))?;
        info!(
            socket = %sock.display(),
            data_dir = %dir.display(),
            pool = %pool_path.display(),
            reactors = reactors.len(),
            kms = %control.kms().backend_kind(),
            "serving"
        );
        Ok(Daemon {
            control,
            server: Some(server),
            reactors: Some(reactors),
            nbd: Some(nbd),
            metrics_server,
            sampler: Some(sampler),
        })
    }

    /// Clean shutdown: RPC off, every export removed (keys wiped), reactors stopped.
    pub(crate) fn shutdown(mut self) {
        // Background tasks first (a copy stops between batches and cleans up).
        let left = self.control.cancel_tasks(std::time::Duration::from_secs(3));
        if left > 0 {
            warn!("{left} background task(s) did not stop in 3 s; the next start removes what they made");
        }
        self.metrics_server.take();
        self.sampler.take();
        if let Some(n) = self.nbd.take() {
            n.shutdown();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
        let off = self.control.detach_all_exports();
        info!(disks = off.len(), "took the disks off the data path; keys wiped");
        self.reactors.take();
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts later) so that
/// [`wait_for_signal`] receives them.
pub(crate) fn block_signals() {
    // SAFETY: plain sigset manipulation on a local set; the results are checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGTERM or SIGINT (blocked with [`block_signals`]); returns its number.
pub(crate) fn wait_for_signal() -> i32 {
    // SAFETY: sigwait on a set of blocked signals; `sig` is written by the kernel.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut sig: libc::c_int = 0;
        loop {
            if libc::sigwait(&set, &mut sig) == 0 {
                return sig;
            }
        }
    }
}

/// Exit status of a daemon brought down by a panicking data-path thread.
pub const EXIT_DATA_PATH_PANIC: i32 = 70;

/// A panic on a data-path thread (a reactor or the pool's metadata thread)
/// takes the whole daemon down at once: a half-alive daemon that answers
/// RPCs while its disks are unreachable is the worst way to fail. The log
/// line says which thread and why; the exit status is non-zero so the
/// supervisor restarts the daemon and recovery runs (as after a kill).
pub(crate) fn exit_on_data_path_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let name = std::thread::current().name().unwrap_or("").to_string();
        if crate::logging::is_json() {
            // The log is JSON lines: the panic is one of them.
            error!(thread = %name, "thread panicked: {info}");
        } else {
            default(info);
        }
        if name.starts_with("reactor-") || name == "pool-meta" {
            error!(
                thread = %name,
                "{name} panicked ({info}); exiting with status {EXIT_DATA_PATH_PANIC} so a supervisor restarts sealdisk"
            );
            // SAFETY: _exit(2) ends the process at once; nothing runs after it.
            unsafe { libc::_exit(EXIT_DATA_PATH_PANIC) };
        }
    }));
}

/// Raises the soft open-files limit to the hard one (every NBD connection
/// takes a descriptor) and returns the limit in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// `sealdisk serve`: start, wait for SIGTERM/SIGINT, shut down.
pub(crate) fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    block_signals();
    exit_on_data_path_panic();
    let nofile = raise_nofile_limit();
    info!(nofile, "open-files limit");
    let d = Daemon::start(cfg)?;
    let sig = wait_for_signal();
    let signal = if sig == libc::SIGTERM { "SIGTERM" } else { "SIGINT" };
    info!(signal, "signal received; shutting down");
    d.shutdown();
    info!("stopped");
    Ok(())
}
