//! CPU time of a process: the total from its CPU-time clock
//! (`clock_getcpuclockid`, nanoseconds, threads that exited included), the
//! user/system split from `/proc/PID/stat` (clock ticks) and, per thread,
//! the scheduler's run time from `/proc/PID/task/TID/schedstat`.

use std::collections::BTreeMap;
use std::io;
use std::time::Instant;

/// One reading of a process's CPU time.
#[derive(Debug, Clone)]
pub(crate) struct CpuSample {
    pub at: Instant,
    /// User and system time of the whole process (ticks converted to ns).
    pub utime_ns: u64,
    pub stime_ns: u64,
    /// The process CPU-time clock (None if the kernel refused it).
    pub clock_ns: Option<u64>,
    /// Per live thread: (name, run time in ns) from schedstat; empty when the
    /// kernel has no schedstat.
    pub threads: BTreeMap<u32, (String, u64)>,
}

/// CPU used between two samples.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuDelta {
    pub wall_ns: u64,
    pub usr_ns: u64,
    pub sys_ns: u64,
    /// The figure to use: the process CPU clock; without it schedstat's sum
    /// when every thread of the first sample is still there, else usr + sys
    /// (ticks).
    pub cpu_ns: u64,
    /// `cpuclock`, `schedstat` or `stat`.
    pub source: &'static str,
    /// Threads of the first sample gone by the second.
    pub threads_exited: usize,
    /// (tid, name, ns), busiest first.
    pub threads: Vec<(u32, String, u64)>,
}

impl CpuDelta {
    /// Percent of one core over the interval.
    pub fn pct(&self) -> f64 {
        self.cpu_ns as f64 / self.wall_ns.max(1) as f64 * 100.0
    }
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// (utime, stime) in ticks from a `stat` line (fields 14 and 15, counted
/// after the parenthesised name, which may hold spaces).
fn parse_stat(s: &str) -> Option<(u64, u64)> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Nanoseconds of CPU process `pid` has used (all its threads, living and exited).
pub(crate) fn process_cpu_ns(pid: u32) -> io::Result<u64> {
    let mut clk: libc::clockid_t = 0;
    // SAFETY: clk is a valid out-pointer for the call.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clk) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer; clk came from clock_getcpuclockid.
    if unsafe { libc::clock_gettime(clk, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Sample process `pid`'s CPU time now.
pub(crate) fn sample(pid: u32) -> io::Result<CpuSample> {
    let at = Instant::now();
    let clock_ns = process_cpu_ns(pid).ok();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (u, s) = parse_stat(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/stat")))?;
    let ns_per_tick = 1_000_000_000 / clk_tck();
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(ss) = std::fs::read_to_string(e.path().join("schedstat")) else {
                continue;
            };
            let Some(ns) = ss.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            threads.insert(tid, (comm, ns));
        }
    }
    Ok(CpuSample {
        at,
        utime_ns: u * ns_per_tick,
        stime_ns: s * ns_per_tick,
        clock_ns,
        threads,
    })
}

/// What happened between `a` and `b` (b later).
pub(crate) fn delta(a: &CpuSample, b: &CpuSample) -> CpuDelta {
    let usr = b.utime_ns.saturating_sub(a.utime_ns);
    let sys = b.stime_ns.saturating_sub(a.stime_ns);
    let exited = a.threads.keys().filter(|t| !b.threads.contains_key(t)).count();
    let mut threads: Vec<(u32, String, u64)> = b
        .threads
        .iter()
        .map(|(tid, (comm, ns))| {
            let before = a.threads.get(tid).map_or(0, |x| x.1);
            (*tid, comm.clone(), ns.saturating_sub(before))
        })
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.2));
    let precise: u64 = threads.iter().map(|t| t.2).sum();
    let (cpu_ns, source) = match (a.clock_ns, b.clock_ns) {
        (Some(x), Some(y)) => (y.saturating_sub(x), "cpuclock"),
        _ if !b.threads.is_empty() && exited == 0 => (precise, "schedstat"),
        _ => (usr + sys, "stat"),
    };
    CpuDelta {
        wall_ns: b.at.duration_since(a.at).as_nanos() as u64,
        usr_ns: usr,
        sys_ns: sys,
        cpu_ns,
        source,
        threads_exited: exited,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat(line), Some((250, 75)));
    }

    /// This thread's CPU time (the kernel's per-thread clock: an independent reference).
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn own_cpu_grows_while_spinning() {
        let me = std::process::id();
        let a = sample(me).unwrap();
        // Spin until this thread has had 30 ms of CPU (however busy the machine is).
        let (c0, t) = (thread_cpu_ns(), Instant::now());
        let mut x = 0u64;
        while thread_cpu_ns() - c0 < 30_000_000 && t.elapsed().as_secs() < 10 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let spun = thread_cpu_ns() - c0;
        let b = sample(me).unwrap();
        let d = delta(&a, &b);
        assert!(x > 0);
        assert!(d.cpu_ns >= spun, "process CPU {d:?} below this thread's {spun} ns");
        assert_eq!(d.source, "cpuclock");
        assert!(d.pct() <= 100.0 * 64.0);
    }
}
