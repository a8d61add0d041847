//! `sealdisk bench crypto | io | vhost`: the benchmarks shipped in the binary.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::bench::crypto::{self, CryptoBenchOpts};
use crate::bench::BenchError;

#[derive(Subcommand)]
pub(super) enum BenchCmd {
    /// XTS kernels vs the aes crate's ECB, the xts-mode crate and OpenSSL.
    Crypto {
        /// Print exactly one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Bytes per call.
        #[arg(long, default_value_t = 65536)]
        buffer: usize,
        /// Interleaved measurement rounds (each configuration reports its best).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Milliseconds per configuration per round.
        #[arg(long, default_value_t = 120)]
        slice_ms: u64,
        /// Skip the `openssl speed` baseline.
        #[arg(long)]
        no_openssl: bool,
    },
    /// fio-compatible I/O load on the reactor/bdev stack (like SPDK's bdevperf).
    Io(Box<IoArgs>),
    /// fio-style load through any vhost-user-blk backend's socket (this process is the VMM).
    Vhost(Box<crate::bench::vhost::VhostArgs>),
}

/// fio's options keep fio's spelling (`--rw=randread --bs=4k --iodepth=32`).
#[derive(clap::Args)]
pub(super) struct IoArgs {
    #[command(flatten)]
    fio: crate::bench::fio::FioArgs,
    /// crc32c: check every written block on read-back.
    #[arg(long)]
    verify: Option<String>,
    /// Only read back and check blocks written by an earlier verify run.
    #[arg(long = "verify_only", num_args = 0..=1, default_missing_value = "1")]
    verify_only: Option<String>,
    /// file:PATH, volume:POOL_PATH (a thin volume in a new pool there, written once first), malloc or null.
    #[arg(long)]
    backend: Option<String>,
    /// Stack the crypto layer (random per-run key) on the backend.
    #[arg(long)]
    encrypt: bool,
    /// Encryption sector size (512, 1024, 2048, 4096).
    #[arg(long = "sector_size")]
    sector_size: Option<String>,
    /// Run plain and encrypted on the same backend, alternating, and report ratios.
    #[arg(long)]
    compare: bool,
    /// Alternations per target with --compare.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Reactor cores, e.g. 0,1 or 0-3 (default: all).
    #[arg(long)]
    cores: Option<String>,
    /// Use a kernel SQ polling thread per reactor ring.
    #[arg(long)]
    sqpoll: bool,
    /// Polled completions (IOPOLL) for file backends: auto (where the device
    /// has poll queues), on (try, fall back on EOPNOTSUPP) or off.
    #[arg(long, default_value = "auto")]
    iopoll: String,
    /// The per-disk statistics layer (iostat, as on every attached disk) on
    /// top of each target: on or off.
    #[arg(long, default_value = "off")]
    iostat: String,
    /// Microseconds a reactor keeps spinning after its last work before it
    /// waits in its ring.
    #[arg(long = "spin-us")]
    spin_us: Option<u64>,
    /// normal or json (fio's field names).
    #[arg(long = "output-format", default_value = "normal")]
    output_format: String,
    /// Draw plain vs encrypted as an SVG chart.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Runs a `bench` subcommand.
pub(super) fn run(what: BenchCmd) -> ExitCode {
    match what {
        BenchCmd::Crypto {
            json,
            buffer,
            rounds,
            slice_ms,
            no_openssl,
        } => {
            if let Err(e) = crate::crypto::Kernel::selected() {
                eprintln!("sealdisk bench crypto: {e}");
                return ExitCode::from(2);
            }
            let opts = CryptoBenchOpts {
                buffer,
                rounds: rounds.max(1),
                slice: Duration::from_millis(slice_ms.max(1)),
                openssl: !no_openssl,
            };
            let report = crypto::run(&opts);
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serializes"));
            } else {
                print!("{}", crypto::render(&report));
            }
            ExitCode::SUCCESS
        }
        BenchCmd::Io(args) => match bench_io(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("sealdisk bench io: {e}");
                ExitCode::from(2)
            }
        },
        BenchCmd::Vhost(args) => match crate::bench::vhost::main(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("sealdisk bench vhost: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn bench_io(a: IoArgs) -> Result<ExitCode, BenchError> {
    use crate::bench::{io, report};
    let extra: [(&str, &Option<String>); 4] = [
        ("verify", &a.verify),
        ("verify_only", &a.verify_only),
        ("backend", &a.backend),
        ("sector_size", &a.sector_size),
    ];
    let encrypt = a.encrypt;
    let jobs = a.fio.jobs(&extra, |t| t.encrypt |= encrypt)?;
    if a.output_format != "normal" && a.output_format != "json" {
        return Err(BenchError::Refused(format!(
            "--output-format={}: use normal or json",
            a.output_format
        )));
    }
    if a.compare && jobs.iter().any(|j| j.target.encrypt) {
        return Err(BenchError::Refused(
            "--compare runs both plain and encrypted; drop --encrypt".into(),
        ));
    }
    let mut reactors = crate::reactor::ReactorConfig::default();
    if let Some(c) = &a.cores {
        reactors.cores = crate::reactor::parse_cores(c)?;
    }
    reactors.ring.sqpoll = a.sqpoll;
    if let Some(us) = a.spin_us {
        reactors.spin = std::time::Duration::from_micros(us);
    }
    let opts = io::IoBenchOpts {
        jobs,
        compare: a.compare,
        rounds: a.rounds,
        reactors,
        progress: !a.quiet,
        iopoll: a.iopoll.parse()?,
        iostat: match a.iostat.as_str() {
            "on" => true,
            "off" => false,
            other => return Err(BenchError::Refused(format!("--iostat {other}: use on or off"))),
        },
    };
    let rep = io::run(&opts)?;
    if a.output_format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::to_json(&rep)).expect("json")
        );
    } else {
        print!("{}", report::to_text(&rep));
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, report::to_svg(&rep)).map_err(|source| BenchError::Io {
            path: p.clone(),
            source,
        })?;
    }
    let failed = rep.groups.iter().any(|g| g.error.is_some() || g.verify_errors > 0);
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
