//! The fused VAES + VPCLMULQDQ kernel on 256-bit registers.
//!
//! The hot loop is inline assembly with an explicit register plan, because the
//! compiler, given intrinsics, spills round keys and tweaks (measured 25–40%
//! slower). One iteration handles 16 blocks (256 bytes): 8 YMM registers,
//! two blocks each, which keeps 8 independent VAESENCs in flight — what Zen 3
//! needs to cover a 4-cycle latency on two AES pipes.
//!
//! Register plan of `xts16`:
//!
//! | register      | holds                                                          |
//! |---------------|----------------------------------------------------------------|
//! | ymm0..ymm7    | data: blocks 2i and 2i+1 of the group in ymm i                 |
//! | ymm8          | the current round key, both lanes (one load per round)         |
//! | ymm9, ymm10   | scratch for the tweak update and the last-round key ⊕ tweak    |
//! | ymm13         | reduction constant: 0x87 in the low qword of each lane         |
//! | `{cur}`       | 256-byte buffer: the 16 tweaks of this group, same layout      |
//! | `{next}`      | 256-byte buffer: the 16 tweaks of the next group               |
//!
//! Tweak handling (the design of Linux's `aes-xts-avx-x86_64.S`, re-derived):
//! * round 0 is `data ⊕ tweak ⊕ rk0`, loading the tweak as a memory operand;
//! * the last round is `VAESENCLAST(x, rk14 ⊕ tweak)`, which equals
//!   `VAESENCLAST(x, rk14) ⊕ tweak`, so the output XOR is folded in;
//! * the next group's tweaks are this group's times x^16, computed in
//!   rounds 1..8 (one register per round) while the AES units are busy:
//!   `t·x^16 = (t ≪ 16) ⊕ clmul(t ≫ 112, 0x87)`, with byte shifts inside each
//!   128-bit lane (`VPSLLDQ`/`VPSRLDQ` are per-lane) and one `VPCLMULQDQ`;
//! * `{cur}` and `{next}` swap each iteration (`xchg`).
//!
//! Decryption is the same loop with `VAESDEC`/`VAESDECLAST` and the inverse
//! schedule. [`Mode::EncryptStream`] is the encrypt loop with `VMOVNTDQ`
//! stores, for output that a device reads next (bounce buffers).

use core::arch::asm;

use super::aesni;
use super::gf128::mul_x_pow;
use super::keys::RoundKeys;

macro_rules! aes_round {
    ($op:literal, $off:literal) => {
        concat!(
            "vmovdqu ymm8, ymmword ptr [{rk} + ",
            $off,
            "]\n",
            $op,
            " ymm0, ymm0, ymm8\n",
            $op,
            " ymm1, ymm1, ymm8\n",
            $op,
            " ymm2, ymm2, ymm8\n",
            $op,
            " ymm3, ymm3, ymm8\n",
            $op,
            " ymm4, ymm4, ymm8\n",
            $op,
            " ymm5, ymm5, ymm8\n",
            $op,
            " ymm6, ymm6, ymm8\n",
            $op,
            " ymm7, ymm7, ymm8\n",
        )
    };
}

macro_rules! next_tweak {
    ($off:literal) => {
        concat!(
            "vmovdqu ymm9, ymmword ptr [{cur} + ",
            $off,
            "]\n",
            "vpsrldq ymm10, ymm9, 14\n",
            "vpclmulqdq ymm10, ymm10, ymm13, 0\n",
            "vpslldq ymm9, ymm9, 2\n",
            "vpxor ymm9, ymm9, ymm10\n",
            "vmovdqu ymmword ptr [{next} + ",
            $off,
            "], ymm9\n",
        )
    };
}

macro_rules! round0 {
    ($reg:literal, $off:literal) => {
        concat!(
            "vpxor ",
            $reg,
            ", ymm8, ymmword ptr [{cur} + ",
            $off,
            "]\n",
            "vpxor ",
            $reg,
            ", ",
            $reg,
            ", ymmword ptr [{src} + ",
            $off,
            "]\n",
        )
    };
}

macro_rules! last_round {
    ($last:literal, $store:literal, $reg:literal, $off:literal) => {
        concat!(
            "vpxor ymm9, ymm8, ymmword ptr [{cur} + ",
            $off,
            "]\n",
            $last,
            " ",
            $reg,
            ", ",
            $reg,
            ", ymm9\n",
            $store,
            " ymmword ptr [{dst} + ",
            $off,
            "], ",
            $reg,
            "\n",
        )
    };
}

macro_rules! xts16_asm {
    ($op:literal, $last:literal, $store:literal) => {
        concat!(
            "mov {tmp:e}, 0x87\n",
            "vmovd xmm13, {tmp:e}\n",
            "vinserti128 ymm13, ymm13, xmm13, 1\n",
            "2:\n",
            "vmovdqu ymm8, ymmword ptr [{rk}]\n",
            round0!("ymm0", "0"),
            round0!("ymm1", "32"),
            round0!("ymm2", "64"),
            round0!("ymm3", "96"),
            round0!("ymm4", "128"),
            round0!("ymm5", "160"),
            round0!("ymm6", "192"),
            round0!("ymm7", "224"),
            aes_round!($op, "32"),
            next_tweak!("0"),
            aes_round!($op, "64"),
            next_tweak!("32"),
            aes_round!($op, "96"),
            next_tweak!("64"),
            aes_round!($op, "128"),
            next_tweak!("96"),
            aes_round!($op, "160"),
            next_tweak!("128"),
            aes_round!($op, "192"),
            next_tweak!("160"),
            aes_round!($op, "224"),
            next_tweak!("192"),
            aes_round!($op, "256"),
            next_tweak!("224"),
            aes_round!($op, "288"),
            aes_round!($op, "320"),
            aes_round!($op, "352"),
            aes_round!($op, "384"),
            aes_round!($op, "416"),
            "vmovdqu ymm8, ymmword ptr [{rk} + 448]\n",
            last_round!($last, $store, "ymm0", "0"),
            last_round!($last, $store, "ymm1", "32"),
            last_round!($last, $store, "ymm2", "64"),
            last_round!($last, $store, "ymm3", "96"),
            last_round!($last, $store, "ymm4", "128"),
            last_round!($last, $store, "ymm5", "160"),
            last_round!($last, $store, "ymm6", "192"),
            last_round!($last, $store, "ymm7", "224"),
            "add {src}, 256\n",
            "add {dst}, 256\n",
            "xchg {cur}, {next}\n",
            "dec {n}\n",
            "jnz 2b\n",
            // Leave no key or data in vector registers.
            "vzeroall\n",
        )
    };
}

/// How [`xts16`] runs: decrypt, encrypt, or encrypt with streaming stores.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Decrypt,
    Encrypt,
    /// Encrypt, writing the output with non-temporal stores (`vmovntdq`):
    /// no read-for-ownership of the destination's cache lines and no cache
    /// pollution. For bounce buffers the device reads next, not the CPU.
    /// `dst` must be 32-byte aligned; the caller fences afterwards.
    EncryptStream,
}

/// Run `groups` 16-block groups. On entry `cur` holds the 16 tweaks of the
/// first group; on return the tweaks of the group after the last one are in
/// the returned buffer (one of `cur`, `next`).
///
/// # Safety
/// `src` readable and `dst` writable for `256 * groups` bytes (they may be
/// equal); `cur` and `next` are distinct 256-byte buffers; `rk` points at 15
/// 32-byte round keys; `groups > 0`; the CPU has AVX2, VAES and VPCLMULQDQ;
/// with [`Mode::EncryptStream`], `dst` is 32-byte aligned.
#[target_feature(enable = "avx2,vaes,vpclmulqdq")]
unsafe fn xts16(
    mode: Mode,
    rk: *const [u8; 32],
    src: *const u8,
    dst: *mut u8,
    groups: usize,
    cur: *mut u8,
    next: *mut u8,
) -> *mut u8 {
    debug_assert!(groups > 0);
    debug_assert!(mode != Mode::EncryptStream || (dst as usize).is_multiple_of(32));
    let mut cur = cur;
    macro_rules! run {
        ($code:expr) => {
            asm!(
                $code,
                rk = in(reg) rk,
                src = inout(reg) src => _,
                dst = inout(reg) dst => _,
                n = inout(reg) groups => _,
                cur = inout(reg) cur,
                next = inout(reg) next => _,
                tmp = out(reg) _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                options(nostack),
            )
        };
    }
    // SAFETY: the caller guarantees the buffers, alignment and CPU features
    // above; the assembly reads `rk` (480 bytes), reads/writes 256 bytes per
    // group at src/dst, and reads `cur`/writes `next` (256 bytes each),
    // swapping them. It touches no stack and clobbers only the registers
    // listed.
    unsafe {
        match mode {
            Mode::Decrypt => run!(xts16_asm!("vaesdec", "vaesdeclast", "vmovdqu")),
            Mode::Encrypt => run!(xts16_asm!("vaesenc", "vaesenclast", "vmovdqu")),
            Mode::EncryptStream => run!(xts16_asm!("vaesenc", "vaesenclast", "vmovntdq")),
        }
    }
    cur
}

/// Scratch for the two tweak buffers, aligned for YMM stores. Wiped on drop:
/// tweaks are derived from k2.
#[repr(C, align(32))]
struct TweakScratch([[u8; 256]; 2]);

impl Drop for TweakScratch {
    fn drop(&mut self) {
        super::wipe::wipe(self.0.as_flattened_mut());
    }
}

/// The 16 tweaks of a group starting at tweak `t`. Each is computed straight
/// from `t` (no serial chain of doublings), so the next sector's tweaks are
/// ready while the previous sector is still in the AES units. (Storing them
/// as 32-byte pairs, to match the loop's 32-byte loads, measured slower: the
/// GPR-to-vector moves cost more than the missed store forwarding.)
#[inline(always)]
fn fill16(buf: &mut [u8; 256], t: u128) {
    buf[..16].copy_from_slice(&t.to_le_bytes());
    for (k, chunk) in buf.chunks_exact_mut(16).enumerate().skip(1) {
        chunk.copy_from_slice(&mul_x_pow(t, k as u32).to_le_bytes());
    }
}

/// [`fill16`] with AVX2: the sixteen `t·x^k` four at a time, as 64-bit halves
/// in vector lanes (`t·x^k = (t ≪ k) ⊕ reduce(t ≫ (128 − k))`, and for
/// `k < 16` the reduction of the top `k` bits stays in the low half). A
/// 512-byte sector is only two groups, so the scalar version's ~200
/// instructions per sector were a third of its cost.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
unsafe fn fill16_avx2(buf: &mut [u8; 256], t: u128) {
    use core::arch::x86_64::*;
    let (lo, hi) = (t as u64 as i64, (t >> 64) as u64 as i64);
    let vlo = _mm256_set1_epi64x(lo);
    let vhi = _mm256_set1_epi64x(hi);
    for q in 0..4 {
        let k0 = 4 * q as i64;
        let k = _mm256_setr_epi64x(k0, k0 + 1, k0 + 2, k0 + 3);
        let inv = _mm256_sub_epi64(_mm256_set1_epi64x(64), k);
        // Shifts by 64 give 0 (k = 0): no carry and no reduction.
        let new_hi = _mm256_or_si256(_mm256_sllv_epi64(vhi, k), _mm256_srlv_epi64(vlo, inv));
        let h = _mm256_srlv_epi64(vhi, inv);
        let red = _mm256_xor_si256(
            _mm256_xor_si256(h, _mm256_slli_epi64(h, 1)),
            _mm256_xor_si256(_mm256_slli_epi64(h, 2), _mm256_slli_epi64(h, 7)),
        );
        let new_lo = _mm256_xor_si256(_mm256_sllv_epi64(vlo, k), red);
        // Interleave into (lo, hi) pairs: tweaks k0, k0+1 | k0+2, k0+3.
        let a = _mm256_unpacklo_epi64(new_lo, new_hi); // k0, k0+2
        let b = _mm256_unpackhi_epi64(new_lo, new_hi); // k0+1, k0+3
        let first = _mm256_permute2x128_si256(a, b, 0x20); // k0, k0+1
        let second = _mm256_permute2x128_si256(a, b, 0x31); // k0+2, k0+3
                                                            // SAFETY: 64 bytes at 64 * q lie within the 256-byte buffer; unaligned stores.
        unsafe {
            _mm256_storeu_si256(buf.as_mut_ptr().add(64 * q).cast(), first);
            _mm256_storeu_si256(buf.as_mut_ptr().add(64 * q + 32).cast(), second);
        }
    }
}

/// XTS over `nblocks` whole blocks starting at encrypted tweak `tweak`;
/// returns the tweak after the last block. Groups of 16 go through the
/// assembly loop, the rest through the AES-NI kernel.
///
/// # Safety
/// `src` readable and `dst` writable for `16 * nblocks` bytes (may be equal);
/// the CPU supports [`super::Kernel::VaesAvx2`].
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,pclmulqdq,sse4.1")]
pub(crate) unsafe fn xts_blocks<const DEC: bool>(
    keys: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    nblocks: usize,
    tweak: [u8; 16],
) -> [u8; 16] {
    let groups = nblocks / 16;
    let mut tweak = tweak;
    let mut done = 0;
    if groups > 0 {
        let mut s = TweakScratch([[0; 256]; 2]);
        fill16(&mut s.0[0], u128::from_le_bytes(tweak));
        let rk = if DEC { &keys.dec1_x2 } else { &keys.enc1_x2 };
        let (a, b) = s.0.split_at_mut(1);
        let mode = if DEC { Mode::Decrypt } else { Mode::Encrypt };
        // SAFETY: the caller guarantees src/dst for 16*nblocks ≥ 256*groups
        // bytes; the scratch buffers are distinct and 256 bytes each.
        let last = unsafe {
            xts16(
                mode,
                rk.as_ptr(),
                src,
                dst,
                groups,
                a[0].as_mut_ptr(),
                b[0].as_mut_ptr(),
            )
        };
        // SAFETY: `last` points at one of the scratch buffers.
        tweak.copy_from_slice(unsafe { core::slice::from_raw_parts(last, 16) });
        done = groups * 16;
    }
    if done < nblocks {
        let rk = if DEC { &keys.dec1 } else { &keys.enc1 };
        // SAFETY: the remaining blocks lie within the caller's buffers; the
        // CPU has AES-NI (implied by the VAES kernel's requirements).
        tweak = unsafe { aesni::xts_blocks::<DEC>(rk, src.add(16 * done), dst.add(16 * done), nblocks - done, tweak) };
    }
    tweak
}

/// XTS over whole sectors of `sector_size` bytes (a multiple of 256),
/// `plain64` tweaks starting at `first_sector`. Tweaks of up to eight sectors
/// are encrypted together so the 14 serial AES rounds of each overlap.
///
/// With [`Mode::EncryptStream`] the output is written with streaming stores
/// and fenced (`sfence`) before returning.
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes (may be equal), `len` a
/// multiple of `sector_size`, `sector_size` a multiple of 256; the CPU
/// supports [`super::Kernel::VaesAvx2`]; with [`Mode::EncryptStream`], `dst`
/// is 32-byte aligned.
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes,pclmulqdq,sse4.1")]
pub(crate) unsafe fn sectors(
    mode: Mode,
    keys: &RoundKeys,
    src: *const u8,
    dst: *mut u8,
    len: usize,
    first_sector: u64,
    sector_size: usize,
) {
    debug_assert!(sector_size.is_multiple_of(256) && len.is_multiple_of(sector_size));
    let count = len / sector_size;
    let groups = sector_size / 256;
    let rk = if mode == Mode::Decrypt {
        &keys.dec1_x2
    } else {
        &keys.enc1_x2
    };
    let mut s = TweakScratch([[0; 256]; 2]);
    let mut tweaks = [[0u8; 16]; 8];
    let mut i = 0;
    while i < count {
        let batch = (count - i).min(8);
        for (j, t) in tweaks[..batch].iter_mut().enumerate() {
            *t = super::gf128::plain64(first_sector.wrapping_add((i + j) as u64));
        }
        // SAFETY: the CPU has AES-NI (implied by this kernel's features).
        // All eight slots are encrypted; those past `batch` are not used.
        unsafe { aesni::encrypt_tweaks(&keys.enc2, &mut tweaks) };
        for (j, t) in tweaks[..batch].iter().enumerate() {
            let off = (i + j) * sector_size;
            // SAFETY: this kernel's CPU has AVX2.
            unsafe { fill16_avx2(&mut s.0[0], u128::from_le_bytes(*t)) };
            let (a, b) = s.0.split_at_mut(1);
            // SAFETY: sector `i + j` lies within the caller's buffers; the
            // scratch buffers are distinct and 256 bytes each.
            unsafe {
                xts16(
                    mode,
                    rk.as_ptr(),
                    src.add(off),
                    dst.add(off),
                    groups,
                    a[0].as_mut_ptr(),
                    b[0].as_mut_ptr(),
                )
            };
        }
        i += batch;
    }
    if mode == Mode::EncryptStream {
        // Streaming stores are weakly ordered: make them visible before the
        // caller hands the buffer on.
        core::arch::x86_64::_mm_sfence();
    }
    super::wipe::wipe(tweaks.as_flattened_mut());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill16_avx2_matches_the_scalar_tweaks() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return; // nothing to compare on this CPU; the scalar version is the reference
        }
        let mut t = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        for i in 0..2000 {
            let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
            fill16(&mut a, t);
            // SAFETY: AVX2 checked above.
            unsafe { fill16_avx2(&mut b, t) };
            assert_eq!(a, b, "tweak {t:#x} (iteration {i})");
            t = t.rotate_left(29) ^ (t >> 3) ^ 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834;
            if i % 7 == 0 {
                t |= 1 << 127; // top bits set: every reduction path
            }
        }
    }
}
