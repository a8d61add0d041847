//! The control-plane subcommands of the `sealdisk` binary: `serve`, `check`, `rpc`, and
//! one subcommand per ECS operation (`create-disk`, `attach-disk`, ...), which talk to the
//! daemon's socket.
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

use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use serde_json::{Map, Value};

use crate::control::client::{Client, RpcError};
use crate::control::{Method, METHODS};

pub(crate) use error::CliError;

/// The `sealdisk` command: the control-plane subcommands (serve, check, rpc, one per
/// method, ...) and the benchmarks (`bench`).
pub fn main() -> ExitCode {
    let matches = augment(bench::Cli::command()).get_matches();
    if let Some(code) = dispatch(&matches) {
        return code;
    }
    let cli = bench::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    bench::run(cli.cmd)
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

/// `--account` and `--region`, which fill AccountId and RegionId.
fn account_args(c: Command) -> Command {
    c.arg(
        Arg::new("account")
            .long("account")
            .value_name("ID")
            .help("AccountId (default $SEALDISK_ACCOUNT)"),
    )
    .arg(
        Arg::new("region")
            .long("region")
            .value_name("ID")
            .help("RegionId (default $SEALDISK_REGION)"),
    )
}

fn connection_args(c: Command) -> Command {
    c.arg(
        Arg::new("socket")
            .long("socket")
            .value_name("PATH")
            .value_parser(clap::value_parser!(PathBuf))
            .help("daemon socket (default DATA_DIR/sealdisk.sock)"),
    )
    .arg(
        Arg::new("data-dir")
            .long("data-dir")
            .value_name("DIR")
            .value_parser(clap::value_parser!(PathBuf))
            .help("daemon data directory (default $SEALDISK_DATA_DIR or /var/lib/sealdisk)"),
    )
    .arg(
        Arg::new("json")
            .long("json")
            .action(ArgAction::SetTrue)
            .help("print the raw JSON result"),
    )
}

/// Adds the control-plane subcommands to the binary's command.
fn augment(mut cmd: Command) -> Command {
    cmd = cmd
        .subcommand(serve::serve_command())
        .subcommand(serve::check_command())
        .subcommand(account_args(migrate::command()));
    cmd = cmd.subcommand(
        connection_args(Command::new("rpc"))
            .about("Call any JSON-RPC method: sealdisk rpc CreateDisk '{\"RegionId\":...}'")
            .arg(Arg::new("method").value_name("METHOD"))
            .arg(Arg::new("params").value_name("JSON").help("params object (default {})"))
            .arg(
                Arg::new("list")
                    .long("list")
                    .action(ArgAction::SetTrue)
                    .help("list the methods"),
            ),
    );
    cmd = cmd.subcommand(account_args(connection_args(disk_stats::command(Command::new(
        "disk-stats",
    )))));
    for m in METHODS {
        let name: &'static str = Box::leak(kebab(m.name).into_boxed_str());
        cmd = cmd.subcommand(
            account_args(connection_args(Command::new(name))).about(m.about).arg(
                Arg::new("params")
                    .value_name("Key=Value")
                    .num_args(0..)
                    .help("ECS parameters, e.g. Size=20 Encrypted=true DataDisk.1.Size=20; Key:=JSON for raw JSON"),
            ),
        );
    }
    cmd
}

/// Runs a control-plane subcommand; `None` if `m` is not one of them.
fn dispatch(m: &ArgMatches) -> Option<ExitCode> {
    let (name, sub) = m.subcommand()?;
    match name {
        "serve" => Some(serve::serve(sub)),
        "check" => Some(serve::check(sub)),
        "rpc" => Some(rpc(sub)),
        "disk-stats" => Some(disk_stats_cmd(sub)),
        "migrate" => Some(migrate::run(sub)),
        _ => {
            let method = METHODS.iter().find(|x| kebab(x.name) == name)?;
            Some(op(method, sub))
        }
    }
}

fn socket_path(m: &ArgMatches) -> PathBuf {
    if let Some(s) = m.get_one::<PathBuf>("socket") {
        return s.clone();
    }
    data_dir(m).join(crate::layout::SOCKET_FILE)
}

pub(crate) fn data_dir(m: &ArgMatches) -> PathBuf {
    m.get_one::<PathBuf>("data-dir")
        .cloned()
        .or_else(|| std::env::var_os("SEALDISK_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/sealdisk"))
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

fn call_and_print(m: &ArgMatches, method: &str, params: Value) -> ExitCode {
    let mut c = match Client::connect(&socket_path(m)) {
        Ok(c) => c,
        Err(e) => return fail(&e.code, &e.message, 2),
    };
    let account = params.get("AccountId").cloned();
    match c.call(method, params).and_then(|v| wait_for_task(&mut c, account, v)) {
        Ok(v) => {
            if m.get_flag("json") {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", output::human(method, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.rpc_code == 0 => fail(&e.code, &e.message, 2),
        Err(e) => {
            if m.get_flag("json") {
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
fn op_params(m: &ArgMatches, host: bool) -> Result<Map<String, Value>, CliError> {
    let args: Vec<String> = m.get_many::<String>("params").into_iter().flatten().cloned().collect();
    let mut params = parse_params(&args)?;
    if !host {
        let acc = m
            .get_one::<String>("account")
            .cloned()
            .or_else(|| std::env::var("SEALDISK_ACCOUNT").ok());
        let reg = m
            .get_one::<String>("region")
            .cloned()
            .or_else(|| std::env::var("SEALDISK_REGION").ok());
        if let Some(a) = acc {
            params.entry("AccountId").or_insert(Value::String(a));
        }
        if let Some(r) = reg {
            params.entry("RegionId").or_insert(Value::String(r));
        }
    }
    Ok(params)
}

fn op(method: &Method, m: &ArgMatches) -> ExitCode {
    match op_params(m, method.host) {
        Ok(params) => call_and_print(m, method.name, Value::Object(params)),
        Err(e) => fail("InvalidParameter", &e.to_string(), 2),
    }
}

fn disk_stats_cmd(m: &ArgMatches) -> ExitCode {
    let params = match op_params(m, false) {
        Ok(p) => p,
        Err(e) => return fail("InvalidParameter", &e.to_string(), 2),
    };
    let c = match Client::connect(&socket_path(m)) {
        Ok(c) => c,
        Err(e) => return fail(&e.code, &e.message, 2),
    };
    disk_stats::run(m, c, Value::Object(params))
}

fn rpc(m: &ArgMatches) -> ExitCode {
    if m.get_flag("list") {
        for x in METHODS {
            println!("{:<28} {}", x.name, x.about);
        }
        return ExitCode::SUCCESS;
    }
    let Some(method) = m.get_one::<String>("method") else {
        return fail(
            "MissingParameter.Method",
            "give a METHOD (see `sealdisk rpc --list`)",
            2,
        );
    };
    let params = match m.get_one::<String>("params") {
        None => Value::Object(Map::new()),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(v) => v,
            Err(e) => return fail("InvalidParameter.Params", &format!("params are not JSON: {e}"), 2),
        },
    };
    call_and_print(m, method, params)
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
