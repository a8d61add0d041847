//! Cryptography for the data path: the XTS-AES-256 engine.
//!
//! One engine API ([`Xts`]) with kernels picked once at run time
//! ([`Kernel`]): a fused VAES + VPCLMULQDQ kernel on 256-bit registers, an
//! AES-NI kernel, and a portable fallback built on the `aes` crate. Expanded
//! round keys live in [`crate::secmem::SecretMem`] and are wiped when the
//! [`Xts`] drops.
//!
//! The tweak convention is dm-crypt's `plain64`: sector `n` of a disk uses the
//! 128-bit tweak value `LE64(n) ‖ 0^64`, encrypted under the second key half.
//! See `docs/format.md`.

mod gf128;
mod kernel;
mod keys;
mod portable;
mod wipe;
pub(crate) use wipe::clear_vector_registers;
mod xts;

#[cfg(target_arch = "x86_64")]
mod aesni;
#[cfg(target_arch = "x86_64")]
mod vaes;

pub use kernel::Kernel;
pub use xts::{Xts, XtsError, KEY_LEN, SECTOR_SIZES};
