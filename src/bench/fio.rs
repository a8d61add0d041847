//! fio's job options, with fio's names and meanings, from the command line or
//! a fio job file (`[global]` plus job sections).
//!
//! Supported keys: `name`, `rw`/`readwrite`, `rwmixread`, `rwmixwrite`,
//! `bs`/`blocksize`, `iodepth`, `numjobs`, `size`, `offset`, `offset_increment`, `runtime`,
//! `time_based`, `ramp_time`, `verify`, `verify_only`, `scramble_buffers`, `refill_buffers`, `direct` (must be 1),
//! `group_reporting`, `ioengine` (ignored: the engine is sealdisk), and
//! sealdisk's own `backend`, `filename` (= `backend=file:PATH`), `encrypt`,
//! `sector_size`, `inplace` (write buffers are scratch: encrypted in place). Anything
//! else is an error naming the key.

use std::time::Duration;

/// fio's `rw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
}

/// A fio option, job file or time the benchmarks refuse; each says what they accept.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("option {0} needs a value ({0}=...)")]
    NeedsValue(String),
    #[error("{key}={value}: {hint}")]
    BadValue { key: String, value: String, hint: String },
    #[error("unknown job option {0:?}")]
    Unknown(String),
    #[error("bad time {0:?}: use e.g. 10, 10s, 500ms, 2m")]
    Time(String),
    #[error(transparent)]
    Size(#[from] crate::units::UnitError),
    #[error("job file line {line}: {source}")]
    Line {
        line: usize,
        #[source]
        source: Box<JobError>,
    },
    #[error("{0}")]
    Section(&'static str),
    #[error("unterminated section {0:?}")]
    Unterminated(String),
    #[error("job file defines no job section")]
    NoJobs,
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `key=value: hint`.
fn bad(key: &str, value: impl std::fmt::Display, hint: impl Into<String>) -> JobError {
    JobError::BadValue {
        key: key.to_owned(),
        value: value.to_string(),
        hint: hint.into(),
    }
}

impl Rw {
    pub fn parse(s: &str) -> Result<Rw, JobError> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "rw" | "readwrite" => Rw::Rw,
            "randrw" => Rw::RandRw,
            _ => return Err(bad("rw", s, "use read, write, randread, randwrite, rw or randrw")),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::Rw => "rw",
            Rw::RandRw => "randrw",
        }
    }
    pub fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }
    /// Percentage of reads.
    pub fn read_pct(self, rwmixread: u32) -> u32 {
        match self {
            Rw::Read | Rw::RandRead => 100,
            Rw::Write | Rw::RandWrite => 0,
            Rw::Rw | Rw::RandRw => rwmixread,
        }
    }
}

/// One job definition (before `numjobs` expands it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobSpec {
    pub name: String,
    pub rw: Rw,
    pub rwmixread: u32,
    pub bs: u64,
    pub iodepth: u32,
    pub numjobs: u32,
    /// Bytes of the device the job covers (None: all of it from `offset`).
    pub size: Option<u64>,
    pub offset: u64,
    /// fio's `offset_increment`: job n of `numjobs` starts at
    /// `offset + n * offset_increment` (disjoint regions for verify).
    pub offset_increment: u64,
    pub runtime: Option<Duration>,
    pub time_based: bool,
    pub ramp_time: Duration,
    pub verify: bool,
    pub verify_only: bool,
    /// fio's `scramble_buffers` (default on): before each write, stamp every
    /// 512-byte piece of the buffer with its offset and a counter, so no two
    /// writes carry the same bytes and the buffer is freshly written, as
    /// fio's buffers are. Off with `verify` (the pattern is the data).
    pub scramble_buffers: bool,
    /// fio's `refill_buffers` (default off): fill the whole buffer with fresh
    /// pseudo-random bytes before each write, so every write carries data
    /// the device has never seen (costs the job ~0.3 µs per 4 KiB). Takes
    /// the place of `scramble_buffers`; off with `verify`.
    pub refill_buffers: bool,
    /// Hand write buffers down as scratch (like the fio engine's `inplace=1`): the job
    /// refills or re-stamps a buffer before each write and never reads it after, so an
    /// encrypting layer may encrypt it in place instead of into a bounce buffer.
    pub inplace: bool,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: "job".into(),
            rw: Rw::Read,
            rwmixread: 50,
            bs: 4096,
            iodepth: 1,
            numjobs: 1,
            size: None,
            offset: 0,
            offset_increment: 0,
            runtime: None,
            time_based: false,
            ramp_time: Duration::ZERO,
            verify: false,
            verify_only: false,
            scramble_buffers: true,
            refill_buffers: false,
            inplace: false,
        }
    }
}

/// Where a job runs: settings that pick the bdev stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TargetSpec {
    /// `file:PATH`, `volume:POOL_PATH`, `malloc` or `null` (None: not given).
    pub backend: Option<String>,
    pub encrypt: bool,
    pub sector_size: Option<u32>,
}

pub(crate) use crate::units::parse_size;

/// fio time: seconds by default, or with a us/ms/s/m/h suffix.
pub(crate) fn parse_time(s: &str) -> Result<Duration, JobError> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || JobError::Time(s.to_owned());
    let (num, unit) = t
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((t.as_str(), ""), |i| t.split_at(i));
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let secs = match unit {
        "" | "s" | "sec" => n,
        "ms" | "msec" => n / 1e3,
        "us" | "usec" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, JobError> {
    match v.map(str::trim) {
        None | Some("1") | Some("true") | Some("yes") => Ok(true),
        Some("0") | Some("false") | Some("no") => Ok(false),
        Some(x) => Err(bad(key, x, "use 0 or 1")),
    }
}

fn parse_u32(key: &str, v: &str, min: u32, max: u32) -> Result<u32, JobError> {
    match v.trim().parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(key, v, format!("must be an integer from {min} to {max}"))),
    }
}

/// Apply one `key[=value]` to a job and target.
pub(crate) fn apply(
    job: &mut JobSpec,
    target: &mut TargetSpec,
    key: &str,
    value: Option<&str>,
) -> Result<(), JobError> {
    let key = key.trim();
    let need = || value.ok_or_else(|| JobError::NeedsValue(key.to_owned()));
    match key {
        "name" => job.name = need()?.trim().to_string(),
        "rw" | "readwrite" => job.rw = Rw::parse(need()?.trim())?,
        "rwmixread" => job.rwmixread = parse_u32(key, need()?, 0, 100)?,
        "rwmixwrite" => job.rwmixread = 100 - parse_u32(key, need()?, 0, 100)?,
        "bs" | "blocksize" => {
            let bs = parse_size(need()?)?;
            if bs == 0 || bs % 512 != 0 || bs > crate::bdev::MAX_IO_BYTES {
                return Err(bad("bs", need()?, "must be a multiple of 512 up to 512k"));
            }
            job.bs = bs;
        }
        "iodepth" => job.iodepth = parse_u32(key, need()?, 1, 4096)?,
        "numjobs" => job.numjobs = parse_u32(key, need()?, 1, 1024)?,
        "size" => {
            let s = parse_size(need()?)?;
            if s == 0 {
                return Err(bad("size", 0, "give the number of bytes the job covers"));
            }
            job.size = Some(s);
        }
        "offset" => job.offset = parse_size(need()?)?,
        "offset_increment" => job.offset_increment = parse_size(need()?)?,
        "runtime" => job.runtime = Some(parse_time(need()?)?),
        "time_based" => job.time_based = parse_bool(key, value)?,
        "ramp_time" => job.ramp_time = parse_time(need()?)?,
        "verify" => match need()?.trim() {
            "crc32c" | "crc32c-intel" => job.verify = true,
            "0" | "none" => job.verify = false,
            v => return Err(bad("verify", v, "sealdisk supports verify=crc32c")),
        },
        "verify_only" => job.verify_only = parse_bool(key, value)?,
        "scramble_buffers" => job.scramble_buffers = parse_bool(key, value)?,
        "refill_buffers" => job.refill_buffers = parse_bool(key, value)?,
        "inplace" => job.inplace = parse_bool(key, value)?,
        "direct" => {
            if !parse_bool(key, value)? {
                return Err(bad("direct", 0, "sealdisk always does direct I/O"));
            }
        }
        "group_reporting" | "ioengine" | "thread" | "norandommap" | "randrepeat" => {}
        "backend" => target.backend = Some(need()?.trim().to_string()),
        "filename" => target.backend = Some(format!("file:{}", need()?.trim())),
        "encrypt" => target.encrypt = parse_bool(key, value)?,
        "sector_size" => {
            let s = parse_u32(key, need()?, 512, 4096)?;
            if !crate::crypto::SECTOR_SIZES.contains(&(s as usize)) {
                return Err(bad("sector_size", s, "use 512, 1024, 2048 or 4096"));
            }
            target.sector_size = Some(s);
        }
        _ => return Err(JobError::Unknown(key.to_owned())),
    }
    Ok(())
}

/// A job from a job file, with the target settings it carries.
#[derive(Debug, Clone)]
pub struct FileJob {
    pub job: JobSpec,
    pub target: TargetSpec,
}

/// Parse a fio job file. `base` is applied first (command-line options),
/// then `[global]`, then the job's own section.
pub(crate) fn parse_job_file(text: &str, base: &JobSpec, base_target: &TargetSpec) -> Result<Vec<FileJob>, JobError> {
    let mut global = (base.clone(), base_target.clone());
    let mut jobs: Vec<FileJob> = Vec::new();
    let mut current: Option<usize> = None; // None = global section or before any
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split(['#', ';']).next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: JobError| JobError::Line {
            line: n + 1,
            source: Box::new(e),
        };
        if let Some(sec) = line.strip_prefix('[') {
            let name = sec
                .strip_suffix(']')
                .ok_or_else(|| at(JobError::Unterminated(line.to_owned())))?
                .trim();
            if name.is_empty() {
                return Err(at(JobError::Section("empty section name")));
            }
            if name == "global" {
                if !jobs.is_empty() {
                    return Err(at(JobError::Section("[global] after a job section is not supported")));
                }
                current = None;
            } else {
                let mut job = global.0.clone();
                job.name = name.to_string();
                jobs.push(FileJob {
                    job,
                    target: global.1.clone(),
                });
                current = Some(jobs.len() - 1);
            }
            continue;
        }
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        match current {
            None => apply(&mut global.0, &mut global.1, k, v).map_err(at)?,
            Some(i) => {
                let FileJob { job, target } = &mut jobs[i];
                apply(job, target, k, v).map_err(at)?;
            }
        }
    }
    if jobs.is_empty() {
        return Err(JobError::NoJobs);
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128KiB").unwrap(), 128 << 10);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4q").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_time("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_time("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_time("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_time("-1").is_err());
        assert!(parse_time("3 fortnights").is_err());
    }

    #[test]
    fn job_file_global_and_sections() {
        let text = "; comment\n[global]\nbs=4k\niodepth=32\nbackend=malloc\ntime_based\nruntime=2\n\n[rr]\nrw=randread\n[sw]\nrw=write\nbs=128k\nencrypt=1\n";
        let jobs = parse_job_file(text, &JobSpec::default(), &TargetSpec::default()).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].job.name, "rr");
        assert_eq!(jobs[0].job.rw, Rw::RandRead);
        assert_eq!(jobs[0].job.bs, 4096);
        assert_eq!(jobs[0].job.iodepth, 32);
        assert!(jobs[0].job.time_based);
        assert!(!jobs[0].target.encrypt);
        assert_eq!(jobs[1].job.bs, 128 << 10);
        assert!(jobs[1].target.encrypt);
        assert_eq!(jobs[1].target.backend.as_deref(), Some("malloc"));
        // fio's default scramble_buffers=1, switched off per section.
        assert!(jobs[0].job.scramble_buffers);
        let off = parse_job_file(
            "[a]\nrw=write\nscramble_buffers=0\n",
            &JobSpec::default(),
            &TargetSpec::default(),
        )
        .unwrap();
        assert!(!off[0].job.scramble_buffers);
        assert!(
            !off[0].job.refill_buffers,
            "refill_buffers is off by default, as in fio"
        );
        let refill = parse_job_file(
            "[a]\nrw=write\nrefill_buffers=1\n",
            &JobSpec::default(),
            &TargetSpec::default(),
        )
        .unwrap();
        assert!(refill[0].job.refill_buffers);
        assert!(parse_job_file(
            "[a]\nscramble_buffers=maybe\n",
            &JobSpec::default(),
            &TargetSpec::default()
        )
        .is_err());
    }

    #[test]
    fn bad_job_files_name_the_problem() {
        let d = JobSpec::default();
        let t = TargetSpec::default();
        let e = parse_job_file("[a]\nfrobnicate=3\n", &d, &t).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("frobnicate"), "{e}");
        assert!(parse_job_file("[global]\nbs=4k\n", &d, &t)
            .unwrap_err()
            .to_string()
            .contains("no job"));
        assert!(parse_job_file("[a]\nrw=sideways\n", &d, &t)
            .unwrap_err()
            .to_string()
            .contains("rw=sideways"));
        assert!(parse_job_file("[a]\nbs=1000\n", &d, &t)
            .unwrap_err()
            .to_string()
            .contains("multiple of 512"));
        assert!(parse_job_file("[a]\niodepth=0\n", &d, &t)
            .unwrap_err()
            .to_string()
            .contains("iodepth"));
        assert!(parse_job_file("[a\n", &d, &t)
            .unwrap_err()
            .to_string()
            .contains("unterminated"));
    }
}

/// The fio job options `bench io` and `bench vhost` both take on the command line,
/// in fio's spelling (`--rw=randread --bs=4k --iodepth=32`), and the job file they
/// apply to.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct FioArgs {
    /// A fio job file ([global] + job sections); command-line options apply first.
    pub job_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub rw: Option<String>,
    #[arg(long)]
    pub rwmixread: Option<String>,
    #[arg(long)]
    pub bs: Option<String>,
    #[arg(long)]
    pub iodepth: Option<String>,
    /// Jobs (bench vhost: one per virtqueue, at most the device's num_queues).
    #[arg(long)]
    pub numjobs: Option<String>,
    /// Bytes per job (default: the whole device from offset).
    #[arg(long)]
    pub size: Option<String>,
    #[arg(long)]
    pub offset: Option<String>,
    /// Job n starts at offset + n * offset_increment.
    #[arg(long = "offset_increment")]
    pub offset_increment: Option<String>,
    #[arg(long)]
    pub runtime: Option<String>,
    /// Run for --runtime regardless of --size (fio: time_based).
    #[arg(long = "time_based", num_args = 0..=1, default_missing_value = "1")]
    pub time_based: Option<String>,
    #[arg(long = "ramp_time")]
    pub ramp_time: Option<String>,
    /// Stamp each 512-byte piece of a write buffer with its offset and a
    /// counter before every write (fio's default: 1).
    #[arg(long = "scramble_buffers", num_args = 0..=1, default_missing_value = "1")]
    pub scramble_buffers: Option<String>,
    /// Fill each write buffer with fresh pseudo-random bytes before every
    /// write (fio's refill_buffers; default off).
    #[arg(long = "refill_buffers", num_args = 0..=1, default_missing_value = "1")]
    pub refill_buffers: Option<String>,
    /// Accepted for fio compatibility (requests always go straight to the device).
    #[arg(long, num_args = 0..=1, default_missing_value = "1")]
    pub direct: Option<String>,
    /// Write buffers are scratch: the crypto layer encrypts them in place, no bounce
    /// buffer (as NBD's receive buffers and the fio engine's inplace=1; default off).
    #[arg(long, num_args = 0..=1, default_missing_value = "1")]
    pub inplace: Option<String>,
}

impl FioArgs {
    /// The jobs: these options and a bench's own `extra` ones (key, value), applied
    /// to the defaults, then `target` adjusted by the caller, then the job file
    /// (if any) on top.
    pub(crate) fn jobs(
        &self,
        extra: &[(&str, &Option<String>)],
        adjust: impl FnOnce(&mut TargetSpec),
    ) -> Result<Vec<FileJob>, JobError> {
        let mut job = JobSpec::default();
        let mut target = TargetSpec::default();
        let own: [(&str, &Option<String>); 16] = [
            ("name", &self.name),
            ("rw", &self.rw),
            ("rwmixread", &self.rwmixread),
            ("bs", &self.bs),
            ("iodepth", &self.iodepth),
            ("numjobs", &self.numjobs),
            ("size", &self.size),
            ("offset", &self.offset),
            ("offset_increment", &self.offset_increment),
            ("runtime", &self.runtime),
            ("time_based", &self.time_based),
            ("ramp_time", &self.ramp_time),
            ("scramble_buffers", &self.scramble_buffers),
            ("refill_buffers", &self.refill_buffers),
            ("direct", &self.direct),
            ("inplace", &self.inplace),
        ];
        for (k, v) in own.iter().chain(extra) {
            if let Some(v) = v {
                apply(&mut job, &mut target, k, Some(v))?;
            }
        }
        adjust(&mut target);
        match &self.job_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| JobError::Read {
                    path: p.clone(),
                    source,
                })?;
                parse_job_file(&text, &job, &target)
            }
            None => Ok(vec![FileJob { job, target }]),
        }
    }
}
