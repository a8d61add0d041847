//! Benchmarks that ship in the binary (`sealdisk bench ...`): they report
//! figures as ratios against baselines measured in the same run.

pub(crate) mod crypto;
pub(crate) mod fio;
pub(crate) mod io;
pub(crate) mod job;
pub(crate) mod report;
pub(crate) mod vhost;
