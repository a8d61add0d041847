//! `sealdisk migrate SOURCE [--to new|DiskId] [--category C] [--size S] [--verify] [--json]`:
//! MigrateDisk, followed to its end with a progress bar on a terminal (plain progress
//! lines otherwise) and a summary. Ctrl-C stops the migration at a checkpoint (CancelTask);
//! the same command again resumes it. Killing this command leaves the task running in
//! the daemon; the same command again follows it.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{fail, Account, CliError, Connection};
use crate::control::client::{Client, RpcError};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// `sealdisk migrate`.
#[derive(clap::Args)]
pub(super) struct MigrateArgs {
    #[command(flatten)]
    conn: Connection,
    /// a disk id (d-...), a raw image or block device beneath the daemon's import directory (relative paths
    /// are relative to it), or an NBD URI (nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT)
    #[arg(value_name = "SOURCE")]
    source: String,
    /// target: a new disk (default) or an existing, empty, detached disk
    #[arg(long, value_name = "new|DiskId", default_value = "new")]
    to: String,
    /// category of a new disk: basic, ultra, ssd (default: the source disk's, else ssd)
    #[arg(long, value_name = "C")]
    category: Option<String>,
    /// size of a new disk, at least the source's: 20 (GiB), 512M, 40G, 1T, 4096B (default: the source's)
    #[arg(long, value_name = "S")]
    size: Option<String>,
    /// re-read both sides and compare CRC32C per 4 KiB block
    #[arg(long)]
    verify: bool,
    /// remove an interrupted migration of SOURCE into --to instead of resuming it
    #[arg(long)]
    abandon: bool,
    /// name of a new disk
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    account: Account,
}

/// `20` → 20 GiB (ECS `Size`), `512M`, `40G`, `1T`, `4096B`, `64K` (binary units).
pub(super) fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    // ECS's Size: a bare number is GiB; anything with a unit is `units::parse_size`'s.
    let bytes = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << 30))
    } else {
        crate::units::parse_size(t).ok()
    };
    bytes
        .filter(|&b| b > 0)
        .ok_or_else(|| CliError::MigrateSize(s.to_owned()))
}

/// Which parameter names SOURCE.
pub(super) fn source_param(src: &str) -> &'static str {
    let is_disk = src
        .strip_prefix("d-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if src.starts_with("nbd://") || src.starts_with("nbd+unix://") || src.starts_with("nbds://") {
        "SourceNbdUri"
    } else if is_disk {
        "SourceDiskId"
    } else {
        "SourcePath"
    }
}

fn params(m: &MigrateArgs) -> Result<Value, CliError> {
    let mut p = Map::new();
    p.insert(source_param(&m.source).into(), m.source.clone().into());
    if m.to != "new" {
        p.insert("TargetDiskId".into(), m.to.clone().into());
    }
    if let Some(c) = &m.category {
        p.insert("DiskCategory".into(), c.clone().into());
    }
    if let Some(s) = &m.size {
        p.insert("SizeBytes".into(), parse_size(s)?.into());
    }
    if let Some(n) = &m.name {
        p.insert("DiskName".into(), n.clone().into());
    }
    if m.verify {
        p.insert("Verify".into(), true.into());
    }
    if m.abandon {
        p.insert("Abandon".into(), true.into());
    }
    m.account.fill(&mut p);
    Ok(Value::Object(p))
}

fn rpc_fail(m: &MigrateArgs, e: &RpcError) -> ExitCode {
    if e.rpc_code == 0 {
        return fail(&e.code, &e.message, 2);
    }
    if m.conn.json {
        let err = json!({ "code": e.rpc_code, "message": e.message, "data": e.data });
        println!("{}", serde_json::to_string_pretty(&err).expect("json"));
    }
    fail(&e.code, &e.message, 1)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Shows a task's progress: an indicatif bar on a terminal, a line every few seconds
/// otherwise.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { last: Instant },
}

impl Progress {
    fn new(total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            Progress::Bar(b)
        } else {
            Progress::Lines { last: Instant::now() }
        }
    }

    fn update(&mut self, id: &str, done: u64, total: u64, rate: u64) {
        match self {
            Progress::Bar(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            Progress::Lines { last } => {
                if last.elapsed() >= Duration::from_secs(2) {
                    let pct = if total > 0 {
                        done as f64 * 100.0 / total as f64
                    } else {
                        100.0
                    };
                    eprintln!(
                        "migrate {id}: {:.1} of {:.1} MiB ({pct:.0}%), {:.1} MiB/s",
                        mib(done),
                        mib(total),
                        mib(rate)
                    );
                    *last = Instant::now();
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

pub(super) fn run(m: &MigrateArgs) -> ExitCode {
    let p = match params(m) {
        Ok(p) => p,
        Err(e) => return fail("InvalidParameter.Size", &e.to_string(), 2),
    };
    let mut c = match Client::connect(&m.conn.socket_path()) {
        Ok(c) => c,
        Err(e) => return fail(&e.code, &e.message, 2),
    };
    let account = p.get("AccountId").cloned();
    let reply = match c.call("MigrateDisk", p) {
        Ok(v) => v,
        Err(e) => return rpc_fail(m, &e),
    };
    let Some(id) = reply["TaskId"].as_str().map(str::to_owned) else {
        // Abandon: no task.
        print_abandoned(m, &reply);
        return ExitCode::SUCCESS;
    };
    if reply["Resumed"] == true {
        note_resumed(&reply);
    }
    // The handler only stores to an atomic (async-signal-safe).
    crate::sys::on_sigint(on_sigint);
    let (result, cancel_sent) = match follow_task(&mut c, &id, account.as_ref()) {
        Ok(r) => r,
        Err(e) => return rpc_fail(m, &e),
    };
    match result {
        Ok(r) => {
            if m.conn.json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else {
                print!("{}", summary(&r));
            }
            ExitCode::SUCCESS
        }
        Err(e) if cancel_sent => {
            let _ = rpc_fail(m, &e);
            ExitCode::from(130)
        }
        Err(e) => rpc_fail(m, &e),
    }
}

/// The reply to `--abandon`.
fn print_abandoned(m: &MigrateArgs, reply: &Value) {
    if m.conn.json {
        println!("{}", serde_json::to_string_pretty(reply).expect("json"));
    } else {
        println!(
            "abandoned the migration of {} into {}: what it made is removed",
            reply["Source"].as_str().unwrap_or("?"),
            reply["DiskId"].as_str().unwrap_or("?")
        );
    }
}

/// Says on stderr that an interrupted migration goes on (its task followed, or resumed).
fn note_resumed(reply: &Value) {
    let how = if reply["Running"] == true {
        "following its task"
    } else {
        "resuming"
    };
    eprintln!(
        "migrate: an interrupted migration into {} exists; {how} from its checkpoint at {:.1} MiB",
        reply["DiskId"].as_str().unwrap_or("?"),
        mib(reply["ResumedFrom"].as_u64().unwrap_or(0))
    );
}

/// Polls task `id` until it ends, with a progress bar; after a Ctrl-C it is cancelled
/// (once). `Ok((the task's result or error, whether a cancel was sent))`; `Err`:
/// DescribeTasks failed.
fn follow_task(c: &mut Client, id: &str, account: Option<&Value>) -> Result<(Result<Value, RpcError>, bool), RpcError> {
    let mut prog = Progress::new(0);
    let mut cancel_sent = false;
    let result = loop {
        let mut q = json!({ "TaskIds": [id] });
        if let Some(a) = account {
            q["AccountId"] = a.clone();
        }
        if INTERRUPTED.load(Ordering::SeqCst) && !cancel_sent {
            let mut cq = json!({ "TaskId": id });
            if let Some(a) = account {
                cq["AccountId"] = a.clone();
            }
            let _ = c.call("CancelTask", cq);
            cancel_sent = true;
        }
        let d = match c.call("DescribeTasks", q) {
            Ok(d) => d,
            Err(e) => {
                prog.finish();
                return Err(e);
            }
        };
        let t = &d["TaskSet"]["Task"][0];
        match task_end(t) {
            Some(r) => break r,
            None => {
                let n = |k: &str| t[k].as_u64().unwrap_or(0);
                prog.update(id, n("BytesDone"), n("BytesTotal"), n("RateBytesPerSec"));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    prog.finish();
    Ok((result, cancel_sent))
}

/// How task `t` ended: its result, or the error to report; `None` while it runs.
fn task_end(t: &Value) -> Option<Result<Value, RpcError>> {
    match t["TaskStatus"].as_str() {
        Some("Processing") => None,
        Some("Finished") => Some(Ok(t["Result"].clone())),
        Some("Cancelled") => Some(Err(RpcError {
            rpc_code: -32000,
            code: "OperationCancelled".into(),
            message: "interrupted; the checkpoint is kept: run the same command again to resume (or add \
                      --abandon to remove what it made)"
                .into(),
            data: t.clone(),
        })),
        _ => Some(Err(RpcError {
            rpc_code: -32000,
            code: t["Error"]["Code"].as_str().unwrap_or("Migration.Failed").to_owned(),
            message: t["Error"]["Message"].as_str().unwrap_or("the task failed").to_owned(),
            data: t.clone(),
        })),
    }
}

/// The human summary of a finished migration.
fn summary(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let secs = r["Seconds"].as_f64().unwrap_or(0.0);
    let mut s = format!(
        "migrated {} into {} disk {} ({}, {} bytes)\n",
        r["Source"].as_str().unwrap_or("?"),
        if r["NewDisk"] == true { "new" } else { "existing" },
        r["DiskId"].as_str().unwrap_or("?"),
        if r["Encrypted"] == true {
            "encrypted"
        } else {
            "unencrypted"
        },
        n("SizeBytes"),
    );
    s += &format!(
        "  read {:.1} MiB, wrote {:.1} MiB, skipped {:.1} MiB (holes and zero blocks) in {secs:.2} s ({:.1} MiB/s)\n",
        mib(n("BytesRead")),
        mib(n("BytesWritten")),
        mib(n("BytesSkipped")),
        mib(n("SourceSizeBytes")) / secs.max(1e-3),
    );
    if r["Resumed"] == true {
        s += &format!("  resumed from the checkpoint at {:.1} MiB\n", mib(n("ResumedFrom")));
    }
    s += &format!("  verify: {}\n", r["Verify"].as_str().unwrap_or("off"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20").unwrap(), 20 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        for bad in ["", "0", "x", "12Q", "99999999999T", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources() {
        assert_eq!(source_param("d-0123456789abcdef"), "SourceDiskId");
        assert_eq!(source_param("d-notadisk"), "SourcePath");
        assert_eq!(source_param("/srv/import/vm.raw"), "SourcePath");
        assert_eq!(source_param("nbd+unix:///e?socket=/s"), "SourceNbdUri");
        assert_eq!(source_param("nbd://h:10809/e"), "SourceNbdUri");
    }
}
