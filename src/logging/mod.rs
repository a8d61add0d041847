//! The daemon's log: `tracing` events written by `tracing-subscriber` to stderr.
//!
//! * one target per module (the module path: `sealdisk::frontend::nbd`, ...);
//! * fields for what an event is about: `disk`, `instance`, `account`, `request_id`,
//!   `caller` (the control socket's peer, `uid:U,pid:P`), `reactor`, ...;
//! * human-readable lines by default, JSON lines (one object per line) with
//!   `serve --log-format json`;
//! * the level from `serve --log-level LEVEL` if given, else from `RUST_LOG`
//!   (directives such as `info` or `warn,sealdisk::frontend=debug`), else `info`.
//!
//! Events a client can cause at any rate (malformed requests, failed handshakes,
//! connects) go through a [`RateLimit`] ([`log_limited!`](crate::log_limited)).
//! No key material and no guest data is ever a field or a message.

mod limit;

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub(crate) use limit::RateLimit;

/// The environment variable read when `--log-level` is not given.
pub(crate) const LOG_ENV: &str = "RUST_LOG";

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LogFormat {
    /// `2026-12-06T13:38:56.123456Z  INFO sealdisk::daemon: message field=value`
    #[default]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, the
    /// event's fields, and `span` (the RPC the event belongs to) when there is one.
    Json,
}

impl FromStr for LogFormat {
    type Err = LogError;
    fn from_str(s: &str) -> Result<LogFormat, LogError> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(LogError::Format(s.to_owned())),
        }
    }
}

/// A refused logging setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogError {
    /// `--log-format` is neither `human` nor `json`.
    Format(String),
    /// `--log-level` is not a level.
    Level(String),
    /// `RUST_LOG` does not parse as directives.
    Env { value: String, why: String },
    /// A global subscriber is already installed (a second `init` in one process).
    AlreadySet(String),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Format(s) => write!(f, "--log-format {s:?}: use human or json"),
            LogError::Level(s) => write!(f, "--log-level {s:?}: use one of error, warn, info, debug, trace, off"),
            LogError::Env { value, why } => write!(
                f,
                "{LOG_ENV}={value:?}: {why}; use a level (error, warn, info, debug, trace, off) or directives \
                 like warn,sealdisk::frontend=debug, or give --log-level"
            ),
            LogError::AlreadySet(why) => write!(f, "logging is already set up: {why}"),
        }
    }
}

impl std::error::Error for LogError {}

/// A level as `--log-level` takes it.
pub(crate) fn parse_level(s: &str) -> Result<LevelFilter, LogError> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::ERROR),
        "warn" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        "off" => Ok(LevelFilter::OFF),
        _ => Err(LogError::Level(s.to_owned())),
    }
}

/// Which events are written. Precedence: an explicit `--log-level` (`flag`) wins and
/// applies to every target; else `RUST_LOG` (`env`, when set and not empty); else
/// `info`. A bad value of whichever is used is an error, never silently ignored.
pub(crate) fn filter(flag: Option<&str>, env: Option<&str>) -> Result<Targets, LogError> {
    if let Some(l) = flag {
        return Ok(Targets::new().with_default(parse_level(l)?));
    }
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => {
            let t: Targets = v
                .parse()
                .map_err(|e: tracing_subscriber::filter::ParseError| LogError::Env {
                    value: v.to_owned(),
                    why: e.to_string(),
                })?;
            Ok(t)
        }
        None => Ok(Targets::new().with_default(LevelFilter::INFO)),
    }
}

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the installed logger writes JSON lines (then nothing else may write a
/// line to stderr: the panic hook logs panics as events instead).
pub(crate) fn is_json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the process's logger: `format` lines on stderr, filtered by
/// [`filter`]`(level, RUST_LOG)`.
pub(crate) fn init(format: LogFormat, level: Option<&str>) -> Result<(), LogError> {
    let env = std::env::var(LOG_ENV).ok();
    let targets = filter(level, env.as_deref())?;
    let base = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(true)
        .with_thread_names(true);
    let reg = tracing_subscriber::registry().with(targets);
    let r = match format {
        LogFormat::Human => reg.with(base).try_init(),
        LogFormat::Json => reg
            .with(
                base.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    r.map_err(|e| LogError::AlreadySet(e.to_string()))?;
    JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `uid:U,pid:P` of a control socket peer, or `-`.
pub(crate) fn caller_field(c: Option<crate::kms::Caller>) -> String {
    match c {
        Some(c) => format!("uid:{},pid:{}", c.uid, c.pid),
        None => "-".into(),
    }
}

/// Logs an event through a `RateLimit`: at most the limit's burst of lines per
/// window, each carrying `suppressed` = how many events the limit dropped since the
/// last line it let through.
///
/// `log_limited!(LIMIT, warn, disk = %id, "message {}", x)`; the level may depend on
/// the event (one line, two levels):
/// `log_limited!(LIMIT, if failed => warn else info, disk = %id, "message")`.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, if $cond:expr => $level:ident else $otherwise:ident, $($rest:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            if $cond {
                ::tracing::$level!(suppressed, $($rest)+);
            } else {
                ::tracing::$otherwise!(suppressed, $($rest)+);
            }
        }
    };
    ($limit:expr, $level:ident, $($rest:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            ::tracing::$level!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment() {
        let t = filter(Some("warn"), Some("debug")).unwrap();
        assert!(t.would_enable("sealdisk::daemon", &tracing::Level::WARN));
        assert!(!t.would_enable("sealdisk::daemon", &tracing::Level::INFO));
        // Even a bad RUST_LOG does not matter once --log-level is given.
        assert!(filter(Some("info"), Some("=!bad")).is_ok());
    }

    #[test]
    fn the_environment_takes_directives() {
        let t = filter(None, Some("warn,sealdisk::frontend=debug")).unwrap();
        assert!(t.would_enable("sealdisk::frontend::nbd", &tracing::Level::DEBUG));
        assert!(!t.would_enable("sealdisk::daemon", &tracing::Level::INFO));
        assert!(t.would_enable("sealdisk::daemon", &tracing::Level::WARN));
    }

    #[test]
    fn info_by_default() {
        for env in [None, Some(""), Some("  ")] {
            let t = filter(None, env).unwrap();
            assert!(t.would_enable("sealdisk::daemon", &tracing::Level::INFO));
            assert!(!t.would_enable("sealdisk::daemon", &tracing::Level::DEBUG));
        }
    }

    #[test]
    fn bad_values_are_refused_with_what_to_do() {
        let e = filter(Some("verbose"), None).unwrap_err();
        assert_eq!(e, LogError::Level("verbose".into()));
        assert!(e.to_string().contains("error, warn, info, debug, trace, off"), "{e}");
        let e = filter(None, Some("sealdisk=loud")).unwrap_err();
        assert!(matches!(e, LogError::Env { .. }), "{e:?}");
        assert!(e.to_string().contains("RUST_LOG=\"sealdisk=loud\""), "{e}");
        let e = "xml".parse::<LogFormat>().unwrap_err();
        assert!(e.to_string().contains("use human or json"), "{e}");
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("human".parse::<LogFormat>().unwrap(), LogFormat::Human);
    }

    #[test]
    fn levels_are_case_insensitive() {
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::WARN);
        assert_eq!(parse_level("off").unwrap(), LevelFilter::OFF);
    }
}
