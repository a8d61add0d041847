//! `sealdisk serve` and `sealdisk check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::control::QosConfig;
use crate::daemon::{self, DaemonConfig};
use crate::kms::{KmsConfig, QuotaConfig, TransitConfig};

use crate::units::parse_size;

pub fn serve_command() -> Command {
    Command::new("serve")
        .about("Run the daemon: catalog, pool, KMS, reactors and the JSON-RPC socket DATA_DIR/sealdisk.sock")
        .arg(
            Arg::new("data-dir")
                .long("data-dir")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("data directory (created on first run, mode 0700)"),
        )
        .arg(
            Arg::new("pool")
                .long("pool")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .help("pool file or block device (default DATA_DIR/pool.img)"),
        )
        .arg(
            Arg::new("pool-size")
                .long("pool-size")
                .value_name("BYTES")
                .help("size of a new pool file, e.g. 64G (default 64G, sparse)"),
        )
        .arg(
            Arg::new("backend")
                .long("backend")
                .value_name("BACKEND")
                .value_parser(["file", "rbd"])
                .default_value("file")
                .help("where disks live: file (the pool, default) or rbd (Ceph RBD images; needs --ceph-conf and --rbd-pool)"),
        )
        .arg(
            Arg::new("ceph-conf")
                .long("ceph-conf")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .help("ceph.conf of the cluster (--backend rbd)"),
        )
        .arg(
            Arg::new("rbd-pool")
                .long("rbd-pool")
                .value_name("NAME")
                .help("RBD pool of the disks' images (--backend rbd)"),
        )
        .arg(
            Arg::new("cores")
                .long("cores")
                .value_name("LIST")
                .help("reactor cores, e.g. 0,1 or 0-3 (default: all)"),
        )
        .arg(
            Arg::new("spin-us")
                .long("spin-us")
                .value_name("US")
                .value_parser(clap::value_parser!(u64))
                .help("microseconds a reactor spins after its last work"),
        )
        .arg(
            Arg::new("kms")
                .long("kms")
                .value_name("BACKEND")
                .value_parser(["local", "transit"])
                .default_value("local")
                .help("local (embedded, default) or transit (OpenBao/Vault: BAO_ADDR/BAO_TOKEN)"),
        )
        .arg(
            Arg::new("transit-addr")
                .long("transit-addr")
                .value_name("URL")
                .help("transit server address (else BAO_ADDR / VAULT_ADDR)"),
        )
        .arg(
            Arg::new("kms-quota-rate")
                .long("kms-quota-rate")
                .value_name("PER_SEC")
                .value_parser(clap::value_parser!(f64))
                .help("KMS calls per second per (account, region) (default 100)"),
        )
        .arg(
            Arg::new("kms-quota-burst")
                .long("kms-quota-burst")
                .value_name("N")
                .value_parser(clap::value_parser!(u32))
                .help("KMS call burst per (account, region) (default 200)"),
        )
        .arg(
            Arg::new("nbd-socket")
                .long("nbd-socket")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .help("NBD unix socket (default DATA_DIR/nbd.sock)"),
        )
        .arg(
            Arg::new("nbd-tcp")
                .long("nbd-tcp")
                .value_name("ADDR:PORT")
                .value_parser(clap::value_parser!(std::net::SocketAddr))
                .help("also serve NBD over TCP (e.g. 0.0.0.0:10809); needs --tls-dir, or --nbd-tcp-insecure on loopback"),
        )
        .arg(
            Arg::new("tls-dir")
                .long("tls-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TLS for NBD over TCP: DIR/server-cert.pem, server-key.pem, [ca-cert.pem: client certificates required]"),
        )
        .arg(
            Arg::new("nbd-tcp-insecure")
                .long("nbd-tcp-insecure")
                .action(ArgAction::SetTrue)
                .help("allow --nbd-tcp without TLS, on a loopback address only"),
        )
        .arg(
            Arg::new("vmm-group")
                .long("vmm-group")
                .value_name("NAME")
                .help("group of the per-instance NBD sockets DATA_DIR/instances/<id>/nbd.sock (default root)"),
        )
        .arg(
            Arg::new("rpc-group")
                .long("rpc-group")
                .value_name("NAME")
                .help("group that may use the control socket DATA_DIR/sealdisk.sock (default: owner only)"),
        )
        .arg(
            Arg::new("import-dir")
                .long("import-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("CreateEncryptedCopy SourcePath only beneath DIR (default: SourcePath refused)"),
        )
        .arg(
            Arg::new("import-devices")
                .long("import-devices")
                .action(ArgAction::SetTrue)
                .help("also block devices beneath --import-dir"),
        )
        .arg(
            Arg::new("no-qos")
                .long("no-qos")
                .action(ArgAction::SetTrue)
                .help("record no QoS caps on new disks (benchmarks)"),
        )
        .arg(
            Arg::new("log-format")
                .long("log-format")
                .value_name("FORMAT")
                .default_value("human")
                .help("log lines on stderr: human (default) or json (one JSON object per line)"),
        )
        .arg(
            Arg::new("log-level")
                .long("log-level")
                .value_name("LEVEL")
                .help("error, warn, info, debug, trace or off; wins over RUST_LOG (default: RUST_LOG, else info)"),
        )
        .arg(
            Arg::new("metrics")
                .long("metrics")
                .value_name("ADDR")
                .help("serve Prometheus metrics at http://ADDR/metrics: 127.0.0.1:PORT (loopback only) or unix:/PATH"),
        )
        .arg(
            Arg::new("qos-file")
                .long("qos-file")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("QoS caps table as JSON (see docs/operations.md)"),
        )
}

pub fn check_command() -> Command {
    Command::new("check")
        .about("Check pool against catalog offline (daemon stopped); exits 1 on any inconsistency")
        .arg(
            Arg::new("data-dir")
                .long("data-dir")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("pool")
                .long("pool")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
}

/// `--backend`, `--ceph-conf`, `--rbd-pool`.
fn backend(m: &ArgMatches) -> Result<crate::store::Backend, String> {
    let conf = m.get_one::<PathBuf>("ceph-conf");
    let pool = m.get_one::<String>("rbd-pool");
    match m.get_one::<String>("backend").map(String::as_str) {
        Some("rbd") => match (conf, pool) {
            (Some(c), Some(p)) if !p.is_empty() => Ok(crate::store::Backend::Rbd {
                ceph_conf: c.clone(),
                pool: p.clone(),
            }),
            _ => Err("--backend rbd needs --ceph-conf PATH and --rbd-pool NAME".into()),
        },
        _ if conf.is_some() || pool.is_some() => Err("--ceph-conf and --rbd-pool apply to --backend rbd only".into()),
        _ => Ok(crate::store::Backend::File),
    }
}

fn config(m: &ArgMatches) -> Result<DaemonConfig, String> {
    let dir = m.get_one::<PathBuf>("data-dir").expect("required").clone();
    let mut cfg = DaemonConfig::new(&dir);
    cfg.pool_path = m.get_one::<PathBuf>("pool").cloned();
    if let Some(s) = m.get_one::<String>("pool-size") {
        cfg.pool_size = parse_size(s)?;
    }
    cfg.backend = backend(m)?;
    if let Some(c) = m.get_one::<String>("cores") {
        cfg.reactors.cores = crate::reactor::parse_cores(c)?;
    }
    if let Some(us) = m.get_one::<u64>("spin-us") {
        cfg.reactors.spin = std::time::Duration::from_micros(*us);
    }
    if m.get_one::<String>("kms").map(String::as_str) == Some("transit") {
        let t = match m.get_one::<String>("transit-addr") {
            Some(a) => {
                let token = std::env::var("BAO_TOKEN")
                    .or_else(|_| std::env::var("VAULT_TOKEN"))
                    .map_err(|_| "set BAO_TOKEN (or VAULT_TOKEN) for the transit KMS".to_string())?;
                TransitConfig::new(a.clone(), token)
            }
            None => TransitConfig::from_env().map_err(|e| e.to_string())?,
        };
        cfg.kms = KmsConfig::transit(&dir, t);
    }
    let mut q = QuotaConfig::default();
    if let Some(r) = m.get_one::<f64>("kms-quota-rate") {
        q.rate_per_sec = *r;
    }
    if let Some(b) = m.get_one::<u32>("kms-quota-burst") {
        q.burst = *b;
    }
    cfg.kms.quota = q;
    if let Some(f) = m.get_one::<PathBuf>("qos-file") {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        cfg.qos = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    cfg.nbd_socket = m.get_one::<PathBuf>("nbd-socket").cloned();
    cfg.nbd_tcp = m.get_one::<std::net::SocketAddr>("nbd-tcp").copied();
    cfg.tls_dir = m.get_one::<PathBuf>("tls-dir").cloned();
    cfg.nbd_tcp_insecure = m.get_flag("nbd-tcp-insecure");
    cfg.metrics = m
        .get_one::<String>("metrics")
        .map(|a| crate::control::metrics_http::MetricsAddr::parse(a))
        .transpose()?;
    if m.get_flag("no-qos") {
        cfg.qos = QosConfig::off();
    }
    cfg.vmm_gid = m
        .get_one::<String>("vmm-group")
        .map(|g| group_id("--vmm-group", g))
        .transpose()?;
    cfg.rpc_gid = m
        .get_one::<String>("rpc-group")
        .map(|g| group_id("--rpc-group", g))
        .transpose()?;
    cfg.import_dir = m.get_one::<PathBuf>("import-dir").cloned();
    cfg.import_devices = m.get_flag("import-devices");
    if cfg.import_devices && cfg.import_dir.is_none() {
        return Err("--import-devices needs --import-dir".into());
    }
    if let Some(d) = &cfg.import_dir {
        if !d.is_absolute() || !d.is_dir() {
            return Err(format!(
                "--import-dir {}: must be an existing directory, given as an absolute path",
                d.display()
            ));
        }
    }
    Ok(cfg)
}

/// The id of group `name`, for a flag's error message.
fn group_id(flag: &str, name: &str) -> Result<u32, String> {
    match crate::sys::group_id(name) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(format!("{flag} {name}: no such group")),
        Err(e) => Err(format!("{flag} {name:?}: cannot look the group up: {e}")),
    }
}

/// Sets up the daemon's log from `--log-format`, `--log-level` and `RUST_LOG`.
fn logging(m: &ArgMatches) -> Result<(), crate::logging::LogError> {
    let format: crate::logging::LogFormat = m
        .get_one::<String>("log-format")
        .map_or(Ok(Default::default()), |f| f.parse())?;
    crate::logging::init(format, m.get_one::<String>("log-level").map(String::as_str))
}

pub fn serve(m: &ArgMatches) -> ExitCode {
    if let Err(e) = logging(m) {
        eprintln!("sealdisk serve: {e}");
        return ExitCode::from(2);
    }
    let r = config(m).and_then(daemon::run);
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve: {e}");
            ExitCode::from(2)
        }
    }
}

pub fn check(m: &ArgMatches) -> ExitCode {
    let dir = m.get_one::<PathBuf>("data-dir").expect("required");
    let pool = m.get_one::<PathBuf>("pool");
    match crate::control::check::check_data_dir(dir, pool.map(PathBuf::as_path)) {
        Err(e) => {
            eprintln!("sealdisk check: {e}");
            ExitCode::from(2)
        }
        Ok(rep) => {
            if m.get_flag("json") {
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
