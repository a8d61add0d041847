//! The XTS-AES-256 engine: the public API, argument checks, ciphertext
//! stealing, and dispatch to the kernel chosen at construction.

use std::fmt;
use std::mem::size_of;
use std::ptr;

use aes::cipher::KeyInit;
use aes::Aes256;

use super::gf128::{mul_x, plain64};
use super::kernel::Kernel;
use super::keys::{RoundKeys, SoftKeys};
use super::portable;
#[cfg(target_arch = "x86_64")]
use super::{aesni, vaes};
use crate::secmem::{SecretMem, SecretMemError};

/// Length of an XTS-AES-256 key: k1 (data) ‖ k2 (tweak), 32 bytes each.
pub const KEY_LEN: usize = 64;

/// Encryption sector sizes the sector API accepts.
pub const SECTOR_SIZES: [usize; 4] = [512, 1024, 2048, 4096];

/// Why an XTS call was refused. Nothing is modified when one is returned.
#[derive(Debug)]
pub enum XtsError {
    /// k1 and k2 are equal; IEEE 1619 and FIPS forbid it.
    EqualKeyHalves,
    /// `SEALDISK_XTS_KERNEL` names no kernel.
    UnknownKernel(String),
    /// The kernel asked for needs CPU features this machine lacks.
    KernelUnsupported(Kernel),
    /// A sector size other than 512, 1024, 2048 or 4096.
    BadSectorSize(usize),
    /// The buffer is not a whole number of sectors.
    BadLength { len: usize, sector_size: usize },
    /// Out-of-place source and destination differ in length.
    LengthMismatch { src: usize, dst: usize },
    /// A data unit shorter than one AES block.
    DataUnitTooShort(usize),
    /// The sector numbers would run past 2^64 - 1.
    SectorOverflow { first_sector: u64, sectors: u64 },
    /// Secret memory for the round keys could not be had.
    SecretMem(SecretMemError),
}

impl fmt::Display for XtsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XtsError::EqualKeyHalves => write!(
                f,
                "XTS key rejected: the two 256-bit halves (k1, k2) are equal; generate a key whose halves differ"
            ),
            XtsError::UnknownKernel(s) => write!(
                f,
                "unknown XTS kernel {s:?} in SEALDISK_XTS_KERNEL; use portable, aesni or vaes-avx2"
            ),
            XtsError::KernelUnsupported(k) => write!(
                f,
                "XTS kernel {k} is not supported by this CPU; unset SEALDISK_XTS_KERNEL or pick one of: {}",
                Kernel::available()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            XtsError::BadSectorSize(s) => {
                write!(f, "sector size {s} not supported; use 512, 1024, 2048 or 4096")
            }
            XtsError::BadLength { len, sector_size } => write!(
                f,
                "buffer of {len} bytes is not a whole number of {sector_size}-byte sectors"
            ),
            XtsError::LengthMismatch { src, dst } => write!(
                f,
                "source ({src} bytes) and destination ({dst} bytes) must have the same length"
            ),
            XtsError::DataUnitTooShort(n) => {
                write!(f, "XTS data unit of {n} bytes is too short; the minimum is 16")
            }
            XtsError::SectorOverflow { first_sector, sectors } => write!(
                f,
                "{sectors} sectors starting at {first_sector} run past the last sector number (2^64 - 1)"
            ),
            XtsError::SecretMem(e) => write!(f, "no secret memory for the XTS key: {e}"),
        }
    }
}

impl std::error::Error for XtsError {}

impl From<SecretMemError> for XtsError {
    fn from(e: SecretMemError) -> Self {
        XtsError::SecretMem(e)
    }
}

/// An XTS-AES-256 engine holding one key.
///
/// Sector `n` of a buffer handed to the sector calls uses the tweak
/// `E_k2(LE64(first_sector + n) ‖ 0^64)` (dm-crypt `plain64`). The expanded
/// round keys live in secret memory and are wiped on drop. `Xts` is
/// `Send + Sync`; every call takes `&self`.
pub struct Xts {
    mem: SecretMem,
    kernel: Kernel,
}

impl Xts {
    /// A new engine for `key = k1 ‖ k2` on the kernel chosen for this
    /// process ([`Kernel::selected`]).
    pub fn new(key: &[u8; KEY_LEN]) -> Result<Xts, XtsError> {
        Xts::with_kernel(key, Kernel::selected()?)
    }

    /// A new engine on a specific kernel (tests and benchmarks).
    pub fn with_kernel(key: &[u8; KEY_LEN], kernel: Kernel) -> Result<Xts, XtsError> {
        let (k1, k2) = key.split_at(32);
        // Compare without an early exit: how far the halves agree is no one's
        // business.
        if k1.iter().zip(k2).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 {
            return Err(XtsError::EqualKeyHalves);
        }
        if !kernel.is_supported() {
            return Err(XtsError::KernelUnsupported(kernel));
        }
        let k1: &[u8; 32] = k1.try_into().expect("32 bytes");
        let k2: &[u8; 32] = k2.try_into().expect("32 bytes");
        match kernel {
            Kernel::Portable => {
                let mut mem = SecretMem::new(size_of::<SoftKeys>())?;
                let p = mem.as_mut_ptr() as *mut SoftKeys;
                // SAFETY: the mapping is page-aligned (≥ align_of SoftKeys)
                // and at least size_of::<SoftKeys>() long, and nothing has been
                // written there yet. `Drop` runs drop_in_place on it.
                unsafe {
                    ptr::write(
                        p,
                        SoftKeys {
                            k1: Aes256::new(k1.into()),
                            k2: Aes256::new(k2.into()),
                        },
                    )
                };
                super::wipe::clear_vector_registers();
                Ok(Xts { mem, kernel })
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Aesni | Kernel::VaesAvx2 => {
                let mut mem = SecretMem::new(size_of::<RoundKeys>())?;
                // SAFETY: the mapping is page-aligned, long enough, and zero
                // filled; all-zero bytes are a valid RoundKeys (plain arrays).
                let rk = unsafe { &mut *(mem.as_mut_ptr() as *mut RoundKeys) };
                let mut scratch = [[0u8; 16]; 15];
                // SAFETY: the kernel check above proved AES-NI is present.
                unsafe {
                    aesni::expand_key(k1, &mut rk.enc1, &mut rk.dec1);
                    aesni::expand_key(k2, &mut rk.enc2, &mut scratch);
                }
                zeroize::Zeroize::zeroize(&mut scratch);
                rk.fill_x2();
                // The expansion ran in XMM registers.
                super::wipe::clear_vector_registers();
                Ok(Xts { mem, kernel })
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => Err(XtsError::KernelUnsupported(kernel)),
        }
    }

    /// The kernel this engine runs.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// What protection the key memory got (memfd_secret or mlock).
    pub fn key_protection(&self) -> crate::secmem::Protection {
        self.mem.protection()
    }

    /// Encrypt whole sectors in place.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64, sector_size: usize) -> Result<(), XtsError> {
        self.sectors::<false>(None, buf, first_sector, sector_size, false)
    }

    /// Decrypt whole sectors in place.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64, sector_size: usize) -> Result<(), XtsError> {
        self.sectors::<true>(None, buf, first_sector, sector_size, false)
    }

    /// Encrypt whole sectors from `src` into `dst`; `src` is not modified.
    pub fn encrypt_sectors_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), XtsError> {
        self.sectors::<false>(Some(src), dst, first_sector, sector_size, false)
    }

    /// Like [`Xts::encrypt_sectors_to`], for a `dst` that a device reads
    /// next (by DMA), not the CPU: where the kernel has them (VAES) and `dst`
    /// is 32-byte aligned, the output goes out with streaming stores, which
    /// skip reading `dst`'s cache lines in first and leave the cache to the
    /// data the CPU still needs. The bytes written are the same.
    pub fn encrypt_sectors_for_device(
        &self,
        src: &[u8],
        dst: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), XtsError> {
        self.sectors::<false>(Some(src), dst, first_sector, sector_size, true)
    }

    /// Decrypt whole sectors from `src` into `dst`; `src` is not modified.
    pub fn decrypt_sectors_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        first_sector: u64,
        sector_size: usize,
    ) -> Result<(), XtsError> {
        self.sectors::<true>(Some(src), dst, first_sector, sector_size, false)
    }

    /// Encrypt one IEEE 1619 data unit of any length ≥ 16 in place, with
    /// ciphertext stealing for a partial last block. `tweak` is the 128-bit
    /// tweak value (the data unit number, little-endian) before encryption
    /// under k2.
    pub fn encrypt_data_unit(&self, buf: &mut [u8], tweak: &[u8; 16]) -> Result<(), XtsError> {
        self.data_unit::<false>(buf, tweak)
    }

    /// Decrypt one IEEE 1619 data unit in place; see [`Xts::encrypt_data_unit`].
    pub fn decrypt_data_unit(&self, buf: &mut [u8], tweak: &[u8; 16]) -> Result<(), XtsError> {
        self.data_unit::<true>(buf, tweak)
    }

    /// Whole sectors from `src` (or `dst` in place) into `dst`. `stream`:
    /// write `dst` with streaming stores where the kernel can (encrypt only;
    /// see [`Xts::encrypt_sectors_for_device`]).
    fn sectors<const DEC: bool>(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        first_sector: u64,
        sector_size: usize,
        stream: bool,
    ) -> Result<(), XtsError> {
        if !SECTOR_SIZES.contains(&sector_size) {
            return Err(XtsError::BadSectorSize(sector_size));
        }
        if let Some(s) = src {
            if s.len() != dst.len() {
                return Err(XtsError::LengthMismatch {
                    src: s.len(),
                    dst: dst.len(),
                });
            }
        }
        let len = dst.len();
        if !len.is_multiple_of(sector_size) {
            return Err(XtsError::BadLength { len, sector_size });
        }
        let count = (len / sector_size) as u64;
        if count > 0 && first_sector.checked_add(count - 1).is_none() {
            return Err(XtsError::SectorOverflow {
                first_sector,
                sectors: count,
            });
        }
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::VaesAvx2 => {
                let sp = src.map_or(dst.as_ptr(), |s| s.as_ptr());
                let mode = match (DEC, stream && (dst.as_ptr() as usize).is_multiple_of(32)) {
                    (true, _) => vaes::Mode::Decrypt,
                    (false, true) => vaes::Mode::EncryptStream,
                    (false, false) => vaes::Mode::Encrypt,
                };
                // SAFETY: src (or dst itself) is readable and dst writable for
                // `len` bytes, a whole number of sectors of a size that is a
                // multiple of 256; the kernel was checked at construction;
                // streaming only with a 32-byte aligned dst (checked above).
                unsafe {
                    vaes::sectors(
                        mode,
                        self.round_keys(),
                        sp,
                        dst.as_mut_ptr(),
                        len,
                        first_sector,
                        sector_size,
                    )
                };
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Aesni => {
                let rk = self.round_keys();
                let sched = if DEC { &rk.dec1 } else { &rk.enc1 };
                let sp = src.map_or(dst.as_ptr(), |s| s.as_ptr());
                let dp = dst.as_mut_ptr();
                let mut tweaks = [[0u8; 16]; 8];
                let mut i = 0usize;
                let count = count as usize;
                while i < count {
                    let batch = (count - i).min(8);
                    for (j, t) in tweaks[..batch].iter_mut().enumerate() {
                        *t = plain64(first_sector + (i + j) as u64);
                    }
                    // SAFETY: AES-NI checked at construction. All eight slots
                    // are encrypted; those past `batch` are not used.
                    unsafe { aesni::encrypt_tweaks(&rk.enc2, &mut tweaks) };
                    for (j, t) in tweaks[..batch].iter().enumerate() {
                        let off = (i + j) * sector_size;
                        // SAFETY: sector i+j lies within both buffers.
                        unsafe { aesni::xts_blocks::<DEC>(sched, sp.add(off), dp.add(off), sector_size / 16, *t) };
                    }
                    i += batch;
                }
                super::wipe::wipe(tweaks.as_flattened_mut());
            }
            _ => {
                if let Some(s) = src {
                    dst.copy_from_slice(s);
                }
                let keys = self.soft_keys();
                for (i, sector) in dst.chunks_exact_mut(sector_size).enumerate() {
                    let t = portable::encrypt_tweak(keys, &plain64(first_sector + i as u64));
                    portable::xts_blocks::<DEC>(keys, sector, t);
                }
            }
        }
        Ok(())
    }

    fn data_unit<const DEC: bool>(&self, buf: &mut [u8], tweak_value: &[u8; 16]) -> Result<(), XtsError> {
        let len = buf.len();
        if len < 16 {
            return Err(XtsError::DataUnitTooShort(len));
        }
        let t0 = self.encrypt_tweak(tweak_value);
        let (m, r) = (len / 16, len % 16);
        if r == 0 {
            self.blocks::<DEC>(buf, t0);
            return Ok(());
        }
        // Ciphertext stealing (IEEE 1619 section 5.3): the last whole block
        // (m-1) and the partial block m are processed together.
        let t = self.blocks::<DEC>(&mut buf[..16 * (m - 1)], t0); // T_{m-1}
        let t_next = mul_x(u128::from_le_bytes(t)).to_le_bytes(); // T_m
        let (head, tail) = buf[16 * (m - 1)..].split_at_mut(16);
        let mut x = [0u8; 16];
        x.copy_from_slice(head);
        // Encrypt: CC = E(P_{m-1}, T_{m-1}), tweak T_m for the stolen block.
        // Decrypt: PP = D(C_{m-1}, T_m),     tweak T_{m-1} for the stolen block.
        self.blocks::<DEC>(&mut x, if DEC { t_next } else { t });
        let mut y = [0u8; 16];
        y[..r].copy_from_slice(tail);
        y[r..].copy_from_slice(&x[r..]);
        tail.copy_from_slice(&x[..r]);
        self.blocks::<DEC>(&mut y, if DEC { t } else { t_next });
        head.copy_from_slice(&y);
        zeroize::Zeroize::zeroize(&mut x);
        zeroize::Zeroize::zeroize(&mut y);
        Ok(())
    }

    /// E_k2(value).
    fn encrypt_tweak(&self, value: &[u8; 16]) -> [u8; 16] {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Aesni | Kernel::VaesAvx2 => {
                let mut t = [*value];
                // SAFETY: AES-NI checked at construction.
                unsafe { aesni::encrypt_tweaks(&self.round_keys().enc2, &mut t) };
                t[0]
            }
            _ => portable::encrypt_tweak(self.soft_keys(), value),
        }
    }

    /// XTS over the whole blocks of `buf` in place from encrypted tweak `t`;
    /// returns the next tweak.
    fn blocks<const DEC: bool>(&self, buf: &mut [u8], t: [u8; 16]) -> [u8; 16] {
        debug_assert!(buf.len().is_multiple_of(16));
        let n = buf.len() / 16;
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: buf is readable and writable for 16*n bytes; the
            // kernel's CPU features were checked at construction.
            Kernel::VaesAvx2 => unsafe {
                vaes::xts_blocks::<DEC>(self.round_keys(), buf.as_ptr(), buf.as_mut_ptr(), n, t)
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Aesni => {
                let rk = self.round_keys();
                let sched = if DEC { &rk.dec1 } else { &rk.enc1 };
                // SAFETY: as above.
                unsafe { aesni::xts_blocks::<DEC>(sched, buf.as_ptr(), buf.as_mut_ptr(), n, t) }
            }
            _ => portable::xts_blocks::<DEC>(self.soft_keys(), buf, t),
        }
    }

    fn round_keys(&self) -> &RoundKeys {
        debug_assert!(self.kernel != Kernel::Portable);
        // SAFETY: for the x86 kernels the mapping holds a RoundKeys written in
        // `with_kernel`; it is aligned and lives as long as `self`.
        unsafe { &*(self.mem.as_ptr() as *const RoundKeys) }
    }

    fn soft_keys(&self) -> &SoftKeys {
        debug_assert!(self.kernel == Kernel::Portable);
        // SAFETY: for the portable kernel the mapping holds a SoftKeys written
        // in `with_kernel` and dropped only in `Drop`.
        unsafe { &*(self.mem.as_ptr() as *const SoftKeys) }
    }
}

impl Drop for Xts {
    fn drop(&mut self) {
        if self.kernel == Kernel::Portable {
            // SAFETY: the SoftKeys written in `with_kernel` is dropped exactly
            // once, here (the aes crate zeroizes its schedules on drop).
            unsafe { ptr::drop_in_place(self.mem.as_mut_ptr() as *mut SoftKeys) };
        }
        // `self.mem` wipes the whole mapping when it drops after this.
    }
}

impl fmt::Debug for Xts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Xts")
            .field("kernel", &self.kernel)
            .field("key_memory", &self.mem.protection())
            .finish_non_exhaustive()
    }
}
