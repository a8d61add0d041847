//! sealdisk: encrypted cloud disks for virtual machines, served from the
//! hypervisor host.
//!
//! Layers, top-down (see `docs/architecture.md`):
//! * [`crypto`]: the XTS-AES-256 engine every encrypted byte goes through;
//! * [`secmem`]: locked, non-dumpable, zeroized memory for key material;
//! * [`bench`]: the benchmarks shipped in the `sealdisk` binary.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bdev;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod counters;
pub mod crypto;
pub mod daemon;
pub mod export;
pub mod frontend;
pub mod iobuf;
pub mod kms;
pub mod layout;
pub mod logging;
pub mod rbd;
pub mod reactor;
pub mod secmem;
pub mod store;
mod sys;
pub mod units;
pub mod uring;
pub mod volume;
