//! The `sealdisk` command line, all clap derive: `bench` (benchmarks), `serve`, `check`,
//! `migrate`, `disk-stats`, `rpc`, and one subcommand per ECS operation (`create-disk`,
//! `attach-disk`, ...) generated from the method table, which talk to the daemon's socket.
//!
//! Conventions: results on stdout (human-readable, or the raw JSON with `--json`), errors
//! on stderr as `sealdisk[ <command>]: <error>`; exit 0 on success, 1 when the command
//! ran and the answer is a failure (an RPC error, an inconsistent check, a failed
//! benchmark job), 2 when it could not run (bad arguments, no daemon, setup failed).
//!
//! Operation parameters use ECS's names as `Key=Value` (`Size=20 DiskCategory=ssd
//! Encrypted=true`, `DataDisk.1.Size=20`), or `Key:=<JSON>` for a raw JSON value;
//! `--account` and `--region` (or `SEALDISK_ACCOUNT` / `SEALDISK_REGION`) fill
//! `AccountId` and `RegionId`. Output is human-readable unless `--json`.

#![forbid(unsafe_code)]

mod bench;
mod disk_stats;
mod error;
mod migrate;
mod output;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgMatches, Args, Command, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Map, Value};

use crate::control::client::{Client, RpcError};
use crate::control::{Method, METHODS};

pub(crate) use error::CliError;

/// The `sealdisk` command. Its subcommands are clap derive types, and one more per
/// method of [`METHODS`] (`create-disk`, `attach-disk`, ...), made from that table by
/// [`method_command`] with the same derive types ([`OpArgs`]).
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
        what: bench::BenchCmd,
    },
    /// Run the daemon: catalog, pool, KMS, reactors and the JSON-RPC socket DATA_DIR/sealdisk.sock
    Serve(Box<serve::ServeArgs>),
    /// Check pool against catalog offline (daemon stopped); exits 1 on any inconsistency
    Check(serve::CheckArgs),
    /// Encrypt existing data (a disk, a raw image/block device, an NBD export) into an encrypted disk, or an
    /// encrypted disk back into a new unencrypted one: sparse, resumable, --verify
    Migrate(migrate::MigrateArgs),
    /// Call any JSON-RPC method: sealdisk rpc CreateDisk '{"RegionId":...}'
    Rpc(RpcArgs),
    /// A disk's I/O like iostat: r/s w/s rMB/s wMB/s r_await w_await p99s errors (--watch [SECONDS] refreshes)
    DiskStats(disk_stats::DiskStatsArgs),
}

/// Where the daemon is, and how to print its answer.
#[derive(Args)]
struct Connection {
    /// daemon socket (default DATA_DIR/sealdisk.sock)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// daemon data directory (default $SEALDISK_DATA_DIR or /var/lib/sealdisk)
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// print the raw JSON result
    #[arg(long)]
    json: bool,
}

impl Connection {
    /// `--socket`, else `DATA_DIR/sealdisk.sock`.
    fn socket_path(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        self.data_dir().join(crate::layout::SOCKET_FILE)
    }

    /// `--data-dir`, else `$SEALDISK_DATA_DIR`, else `/var/lib/sealdisk`.
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| std::env::var_os("SEALDISK_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/lib/sealdisk"))
    }
}

/// `--account` and `--region`, which fill AccountId and RegionId.
#[derive(Args)]
struct Account {
    /// AccountId (default $SEALDISK_ACCOUNT)
    #[arg(long, value_name = "ID")]
    account: Option<String>,
    /// RegionId (default $SEALDISK_REGION)
    #[arg(long, value_name = "ID")]
    region: Option<String>,
}

impl Account {
    /// Sets `AccountId`/`RegionId` from the flags or the environment, unless given.
    fn fill(&self, params: &mut Map<String, Value>) {
        let acc = self.account.clone().or_else(|| std::env::var("SEALDISK_ACCOUNT").ok());
        let reg = self.region.clone().or_else(|| std::env::var("SEALDISK_REGION").ok());
        if let Some(a) = acc {
            params.entry("AccountId").or_insert(Value::String(a));
        }
        if let Some(r) = reg {
            params.entry("RegionId").or_insert(Value::String(r));
        }
    }
}

/// The arguments of a method subcommand (`create-disk Size=20 ...`).
#[derive(Args)]
struct OpArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    account: Account,
    /// ECS parameters, e.g. Size=20 Encrypted=true DataDisk.1.Size=20; Key:=JSON for raw JSON
    #[arg(value_name = "Key=Value", num_args = 0..)]
    params: Vec<String>,
}

/// `sealdisk rpc METHOD [JSON]`.
#[derive(Args)]
struct RpcArgs {
    #[command(flatten)]
    conn: Connection,
    #[arg(value_name = "METHOD")]
    method: Option<String>,
    /// params object (default {})
    #[arg(value_name = "JSON")]
    params: Option<String>,
    /// list the methods
    #[arg(long)]
    list: bool,
}

/// The `sealdisk` command: parses the arguments and runs the subcommand.
pub fn main() -> ExitCode {
    let mut cmd = Cli::command();
    for m in METHODS {
        cmd = cmd.subcommand(method_command(m));
    }
    let matches = cmd.get_matches();
    if let Some((name, sub)) = matches.subcommand() {
        if let Some(method) = METHODS.iter().find(|x| kebab(x.name) == name) {
            return op(method, &parsed::<OpArgs>(sub));
        }
    }
    match parsed::<Cli>(&matches).cmd {
        Cmd::Bench { what } => bench::run(what),
        Cmd::Serve(a) => serve::serve(&a),
        Cmd::Check(a) => serve::check(&a),
        Cmd::Migrate(a) => migrate::run(&a),
        Cmd::Rpc(a) => rpc(&a),
        Cmd::DiskStats(a) => disk_stats_cmd(&a),
    }
}

/// The subcommand of `method`: its kebab-case name, its help, [`OpArgs`].
fn method_command(m: &Method) -> Command {
    let name: &'static str = Box::leak(kebab(m.name).into_boxed_str());
    OpArgs::augment_args(Command::new(name)).about(m.about)
}

/// The typed arguments of matches clap has already checked against `T`'s command.
fn parsed<T: FromArgMatches>(m: &ArgMatches) -> T {
    T::from_arg_matches(m).unwrap_or_else(|e| e.exit())
}

/// `CreateDisk` → `create-disk`.
pub(crate) fn kebab(method: &str) -> String {
    let mut s = String::new();
    let b = method.as_bytes();
    for (i, c) in method.char_indices() {
        if c.is_ascii_uppercase() && i > 0 {
            let prev_lower = b[i - 1].is_ascii_lowercase();
            let next_lower = b.get(i + 1).is_some_and(u8::is_ascii_lowercase);
            if prev_lower || (next_lower && b[i - 1].is_ascii_uppercase()) {
                s.push('-');
            }
        }
        s.push(c.to_ascii_lowercase());
    }
    s.replace("re-init-", "reinit-")
}

fn fail(code: &str, msg: &str, exit: u8) -> ExitCode {
    eprintln!("sealdisk: {code}: {msg}");
    ExitCode::from(exit)
}

/// Parses `Key=Value` / `Key:=JSON` pairs.
pub(crate) fn parse_params(args: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut out = Map::new();
    for a in args {
        if let Some((k, v)) = a.split_once(":=") {
            if !k.contains('=') {
                let j: Value =
                    serde_json::from_str(v).map_err(|source| CliError::NotJson { arg: a.clone(), source })?;
                out.insert(k.to_owned(), j);
                continue;
            }
        }
        let (k, v) = a.split_once('=').ok_or_else(|| CliError::NotKeyValue(a.clone()))?;
        if k.is_empty() {
            return Err(CliError::EmptyName(a.clone()));
        }
        out.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(out)
}

fn call_and_print(conn: &Connection, method: &str, params: Value) -> ExitCode {
    let mut c = match Client::connect(&conn.socket_path()) {
        Ok(c) => c,
        Err(e) => return fail(&e.code, &e.message, 2),
    };
    let account = params.get("AccountId").cloned();
    match c.call(method, params).and_then(|v| wait_for_task(&mut c, account, v)) {
        Ok(v) => {
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", output::human(method, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.rpc_code == 0 => fail(&e.code, &e.message, 2),
        Err(e) => {
            if conn.json {
                let err = serde_json::json!({ "code": e.rpc_code, "message": e.message, "data": e.data });
                println!("{}", serde_json::to_string_pretty(&err).expect("json"));
            }
            fail(&e.code, &e.message, 1)
        }
    }
}

/// A reply naming a background task: show its progress on stderr until it ends, and
/// return its result (or its error). Other replies come back as they are.
fn wait_for_task(c: &mut Client, account: Option<Value>, v: Value) -> Result<Value, RpcError> {
    let Some(id) = v.get("TaskId").and_then(Value::as_str).map(str::to_owned) else {
        return Ok(v);
    };
    let mut last = std::time::Instant::now();
    loop {
        let mut q = serde_json::json!({ "TaskIds": [id] });
        if let Some(a) = &account {
            q["AccountId"] = a.clone();
        }
        let d = c.call("DescribeTasks", q)?;
        let t = &d["TaskSet"]["Task"][0];
        let mib = |k: &str| t[k].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
        match t["TaskStatus"].as_str() {
            Some("Finished") => return Ok(t["Result"].clone()),
            Some("Processing") => {
                if last.elapsed() >= std::time::Duration::from_secs(1) {
                    eprintln!(
                        "task {id}: {:.1} of {:.1} MiB, {:.1} MiB/s",
                        mib("BytesDone"),
                        mib("BytesTotal"),
                        mib("RateBytesPerSec")
                    );
                    last = std::time::Instant::now();
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            _ => {
                return Err(RpcError {
                    rpc_code: -32000,
                    code: t["Error"]["Code"].as_str().unwrap_or("OperationCancelled").to_owned(),
                    message: t["Error"]["Message"]
                        .as_str()
                        .unwrap_or("the task was cancelled")
                        .to_owned(),
                    data: t.clone(),
                })
            }
        }
    }
}

/// The `Key=Value` parameters of a subcommand, with `AccountId`/`RegionId` from
/// `--account`/`--region` or the environment unless `host` (a host method).
fn op_params(params: &[String], account: &Account, host: bool) -> Result<Map<String, Value>, CliError> {
    let mut params = parse_params(params)?;
    if !host {
        account.fill(&mut params);
    }
    Ok(params)
}

fn op(method: &Method, a: &OpArgs) -> ExitCode {
    match op_params(&a.params, &a.account, method.host) {
        Ok(params) => call_and_print(&a.conn, method.name, Value::Object(params)),
        Err(e) => fail("InvalidParameter", &e.to_string(), 2),
    }
}

fn disk_stats_cmd(a: &disk_stats::DiskStatsArgs) -> ExitCode {
    let params = match op_params(&a.params, &a.account, false) {
        Ok(p) => p,
        Err(e) => return fail("InvalidParameter", &e.to_string(), 2),
    };
    let c = match Client::connect(&a.conn.socket_path()) {
        Ok(c) => c,
        Err(e) => return fail(&e.code, &e.message, 2),
    };
    disk_stats::run(a, c, Value::Object(params))
}

fn rpc(a: &RpcArgs) -> ExitCode {
    if a.list {
        for x in METHODS {
            println!("{:<28} {}", x.name, x.about);
        }
        return ExitCode::SUCCESS;
    }
    let Some(method) = &a.method else {
        return fail(
            "MissingParameter.Method",
            "give a METHOD (see `sealdisk rpc --list`)",
            2,
        );
    };
    let params = match &a.params {
        None => Value::Object(Map::new()),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(v) => v,
            Err(e) => return fail("InvalidParameter.Params", &format!("params are not JSON: {e}"), 2),
        },
    };
    call_and_print(&a.conn, method, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_names() {
        assert_eq!(kebab("CreateDisk"), "create-disk");
        assert_eq!(kebab("ReInitDisk"), "reinit-disk");
        assert_eq!(kebab("DescribeKmsKey"), "describe-kms-key");
        assert_eq!(kebab("CheckPool"), "check-pool");
        assert_eq!(kebab("CreateEncryptedCopy"), "create-encrypted-copy");
    }

    #[test]
    fn params_parse() {
        let p = parse_params(&[
            "Size=20".into(),
            "DataDisk.1.Encrypted=true".into(),
            "DiskIds:=[\"a\"]".into(),
        ])
        .unwrap();
        assert_eq!(p["Size"], "20");
        assert_eq!(p["DataDisk.1.Encrypted"], "true");
        assert_eq!(p["DiskIds"], serde_json::json!(["a"]));
        assert!(parse_params(&["novalue".into()]).is_err());
    }
}
