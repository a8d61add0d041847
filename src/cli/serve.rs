//! `sealdisk serve` and `sealdisk check`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::control::QosConfig;
use crate::daemon::{self, DaemonConfig};
use crate::kms::{KmsConfig, QuotaConfig, TransitConfig};

use crate::units::parse_size;

use super::CliError;

/// `sealdisk serve`.
#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// data directory (created on first run, mode 0700)
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: PathBuf,
    /// pool file or block device (default DATA_DIR/pool.img)
    #[arg(long, value_name = "PATH")]
    pool: Option<PathBuf>,
    /// size of a new pool file, e.g. 64G (default 64G, sparse)
    #[arg(long = "pool-size", value_name = "BYTES")]
    pool_size: Option<String>,
    /// where disks live: file (the pool, default) or rbd (Ceph RBD images; needs --ceph-conf and --rbd-pool)
    #[arg(long, value_name = "BACKEND", value_parser = ["file", "rbd"], default_value = "file")]
    backend: String,
    /// ceph.conf of the cluster (--backend rbd)
    #[arg(long = "ceph-conf", value_name = "PATH")]
    ceph_conf: Option<PathBuf>,
    /// RBD pool of the disks' images (--backend rbd)
    #[arg(long = "rbd-pool", value_name = "NAME")]
    rbd_pool: Option<String>,
    /// reactor cores, e.g. 0,1 or 0-3 (default: all)
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// microseconds a reactor spins after its last work
    #[arg(long = "spin-us", value_name = "US")]
    spin_us: Option<u64>,
    /// local (embedded, default) or transit (OpenBao/Vault: BAO_ADDR/BAO_TOKEN)
    #[arg(long, value_name = "BACKEND", value_parser = ["local", "transit"], default_value = "local")]
    kms: String,
    /// transit server address (else BAO_ADDR / VAULT_ADDR)
    #[arg(long = "transit-addr", value_name = "URL")]
    transit_addr: Option<String>,
    /// KMS calls per second per (account, region) (default 100)
    #[arg(long = "kms-quota-rate", value_name = "PER_SEC")]
    kms_quota_rate: Option<f64>,
    /// KMS call burst per (account, region) (default 200)
    #[arg(long = "kms-quota-burst", value_name = "N")]
    kms_quota_burst: Option<u32>,
    /// NBD unix socket (default DATA_DIR/nbd.sock)
    #[arg(long = "nbd-socket", value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// also serve NBD over TCP (e.g. 0.0.0.0:10809); needs --tls-dir, or --nbd-tcp-insecure on loopback
    #[arg(long = "nbd-tcp", value_name = "ADDR:PORT")]
    nbd_tcp: Option<std::net::SocketAddr>,
    /// TLS for NBD over TCP: DIR/server-cert.pem, server-key.pem, [ca-cert.pem: client certificates required]
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// allow --nbd-tcp without TLS, on a loopback address only
    #[arg(long = "nbd-tcp-insecure")]
    nbd_tcp_insecure: bool,
    /// group of the per-instance NBD sockets DATA_DIR/instances/<id>/nbd.sock (default root)
    #[arg(long = "vmm-group", value_name = "NAME")]
    vmm_group: Option<String>,
    /// group that may use the control socket DATA_DIR/sealdisk.sock (default: owner only)
    #[arg(long = "rpc-group", value_name = "NAME")]
    rpc_group: Option<String>,
    /// CreateEncryptedCopy SourcePath only beneath DIR (default: SourcePath refused)
    #[arg(long = "import-dir", value_name = "DIR")]
    import_dir: Option<PathBuf>,
    /// also block devices beneath --import-dir
    #[arg(long = "import-devices")]
    import_devices: bool,
    /// record no QoS caps on new disks (benchmarks)
    #[arg(long = "no-qos")]
    no_qos: bool,
    /// log lines on stderr: human (default) or json (one JSON object per line)
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "human")]
    log_format: String,
    /// error, warn, info, debug, trace or off; wins over RUST_LOG (default: RUST_LOG, else info)
    #[arg(long = "log-level", value_name = "LEVEL")]
    log_level: Option<String>,
    /// serve Prometheus metrics at http://ADDR/metrics: 127.0.0.1:PORT (loopback only) or unix:/PATH
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// QoS caps table as JSON (see docs/operations.md)
    #[arg(long = "qos-file", value_name = "FILE")]
    qos_file: Option<PathBuf>,
}

/// `sealdisk check`.
#[derive(clap::Args)]
pub(super) struct CheckArgs {
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: PathBuf,
    #[arg(long, value_name = "PATH")]
    pool: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// `--backend`, `--ceph-conf`, `--rbd-pool`.
fn backend(m: &ServeArgs) -> Result<crate::store::Backend, CliError> {
    match (m.backend.as_str(), &m.ceph_conf, &m.rbd_pool) {
        ("rbd", Some(c), Some(p)) if !p.is_empty() => Ok(crate::store::Backend::Rbd {
            ceph_conf: c.clone(),
            pool: p.clone(),
        }),
        ("rbd", _, _) => Err(CliError::RbdOptions),
        (_, None, None) => Ok(crate::store::Backend::File),
        _ => Err(CliError::RbdOptionsWithoutRbd),
    }
}

fn config(m: &ServeArgs) -> Result<DaemonConfig, CliError> {
    let dir = m.data_dir.clone();
    let mut cfg = DaemonConfig::new(&dir);
    cfg.pool_path = m.pool.clone();
    if let Some(s) = &m.pool_size {
        cfg.pool_size = parse_size(s)?;
    }
    cfg.backend = backend(m)?;
    if let Some(c) = &m.cores {
        cfg.reactors.cores = crate::reactor::parse_cores(c)?;
    }
    if let Some(us) = m.spin_us {
        cfg.reactors.spin = std::time::Duration::from_micros(us);
    }
    if m.kms == "transit" {
        let t = match &m.transit_addr {
            Some(a) => {
                let token = std::env::var("BAO_TOKEN")
                    .or_else(|_| std::env::var("VAULT_TOKEN"))
                    .map_err(|_| CliError::NoTransitToken)?;
                TransitConfig::new(a.clone(), token)
            }
            None => TransitConfig::from_env()?,
        };
        cfg.kms = KmsConfig::transit(&dir, t);
    }
    let mut q = QuotaConfig::default();
    if let Some(r) = m.kms_quota_rate {
        q.rate_per_sec = r;
    }
    if let Some(b) = m.kms_quota_burst {
        q.burst = b;
    }
    cfg.kms.quota = q;
    if let Some(f) = &m.qos_file {
        let text = std::fs::read_to_string(f).map_err(|source| CliError::Read {
            path: f.clone(),
            source,
        })?;
        cfg.qos = serde_json::from_str(&text).map_err(|source| CliError::QosFile {
            path: f.clone(),
            source,
        })?;
    }
    cfg.nbd_socket = m.nbd_socket.clone();
    cfg.nbd_tcp = m.nbd_tcp;
    cfg.tls_dir = m.tls_dir.clone();
    cfg.nbd_tcp_insecure = m.nbd_tcp_insecure;
    cfg.metrics = m
        .metrics
        .as_deref()
        .map(crate::control::metrics_http::MetricsAddr::parse)
        .transpose()?;
    if m.no_qos {
        cfg.qos = QosConfig::off();
    }
    cfg.vmm_gid = m.vmm_group.as_deref().map(|g| group_id("--vmm-group", g)).transpose()?;
    cfg.rpc_gid = m.rpc_group.as_deref().map(|g| group_id("--rpc-group", g)).transpose()?;
    cfg.import_dir = m.import_dir.clone();
    cfg.import_devices = m.import_devices;
    if cfg.import_devices && cfg.import_dir.is_none() {
        return Err(CliError::ImportDevicesWithoutDir);
    }
    if let Some(d) = &cfg.import_dir {
        if !d.is_absolute() || !d.is_dir() {
            return Err(CliError::ImportDir(d.clone()));
        }
    }
    Ok(cfg)
}

/// The id of group `name`, for a flag's error message.
fn group_id(flag: &'static str, name: &str) -> Result<u32, CliError> {
    match crate::sys::group_id(name) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(CliError::NoSuchGroup {
            flag,
            name: name.to_owned(),
        }),
        Err(source) => Err(CliError::GroupLookup {
            flag,
            name: name.to_owned(),
            source,
        }),
    }
}

/// Sets up the daemon's log from `--log-format`, `--log-level` and `RUST_LOG`.
fn logging(m: &ServeArgs) -> Result<(), crate::logging::LogError> {
    let format: crate::logging::LogFormat = m.log_format.parse()?;
    crate::logging::init(format, m.log_level.as_deref())
}

pub(super) fn serve(m: &ServeArgs) -> ExitCode {
    if let Err(e) = logging(m) {
        eprintln!("sealdisk serve: {e}");
        return ExitCode::from(2);
    }
    let r = config(m).and_then(|cfg| Ok(daemon::run(cfg)?));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve: {e}");
            ExitCode::from(2)
        }
    }
}

pub(super) fn check(m: &CheckArgs) -> ExitCode {
    match crate::control::check::check_data_dir(&m.data_dir, m.pool.as_deref()) {
        Err(e) => {
            eprintln!("sealdisk check: {e}");
            ExitCode::from(2)
        }
        Ok(rep) => {
            if m.json {
                println!("{}", serde_json::to_string_pretty(&rep).expect("json"));
            } else {
                println!(
                    "catalog schema {}: {} disk(s), {} snapshot(s), {} image(s)",
                    rep.schema_version, rep.disks, rep.snapshots, rep.images
                );
                if let Some(p) = &rep.pool {
                    println!(
                        "pool: {} volume(s), {} cluster(s) in use, {} free",
                        p.volumes, p.clusters_in_use, p.clusters_free
                    );
                }
                for p in &rep.problems {
                    println!("PROBLEM: {p}");
                }
                println!("{}", if rep.consistent() { "consistent" } else { "INCONSISTENT" });
            }
            if rep.consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
