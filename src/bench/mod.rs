//! Benchmarks that ship in the binary (`sealdisk bench ...`): they report
//! figures as ratios against baselines measured in the same run.

pub mod crypto;
