//! The `sealdisk` command.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use sealdisk::bench::crypto::{self, CryptoBenchOpts};

#[derive(Parser)]
#[command(
    name = "sealdisk",
    version,
    about = "Encrypted cloud disks for VMs: per-disk AES-256-XTS block storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks that report figures against same-run baselines.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bench {
            what:
                BenchCmd::Crypto {
                    json,
                    buffer,
                    rounds,
                    slice_ms,
                    no_openssl,
                },
        } => {
            if let Err(e) = sealdisk::crypto::Kernel::selected() {
                eprintln!("sealdisk: {e}");
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
    }
}
