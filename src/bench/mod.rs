//! Benchmarks that ship in the binary (`sealdisk bench ...`): they report
//! figures as ratios against baselines measured in the same run.

pub mod crypto;
pub mod fio;
pub mod io;
pub mod job;
pub mod report;
pub mod vhost;
