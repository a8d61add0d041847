//! Errors of setting up the bdev stack (as opposed to an I/O's [`super::IoError`]).

/// Why a layer could not be stacked on a lower one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error("encryption sector size {0} not supported; use 512, 1024, 2048 or 4096")]
    SectorSize(u32),
    #[error("encryption sector size {sector_size} is not a multiple of {lower}'s block size {block_size}")]
    NotMultiple {
        sector_size: u32,
        lower: String,
        block_size: u32,
    },
}

/// An `--iopoll` value other than auto, on or off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iopoll {0:?}: use auto, on or off")]
pub struct IopollError(pub String);
