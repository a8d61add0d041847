//! The AES-NI kernel: XTS on 128-bit registers, eight blocks in flight
//! (enough to cover the 4-cycle AESENC latency on two pipes), plus the AES-256
//! key schedule that both x86 kernels use.
//!
//! Every function here is `unsafe` only because it needs the `aes` and
//! `sse4.1` CPU features; callers check [`super::Kernel::is_supported`] first.

use core::arch::x86_64::*;

use super::keys::ROUNDS;

type Schedule = [[u8; 16]; ROUNDS];

#[inline(always)]
unsafe fn load(p: *const u8) -> __m128i {
    // SAFETY: callers pass pointers to at least 16 readable bytes; the load
    // is unaligned.
    unsafe { _mm_loadu_si128(p as *const __m128i) }
}

#[inline(always)]
unsafe fn store(p: *mut u8, v: __m128i) {
    // SAFETY: callers pass pointers to at least 16 writable bytes.
    unsafe { _mm_storeu_si128(p as *mut __m128i, v) }
}

macro_rules! expand_round {
    ($t1:ident, $t3:ident, $rcon:literal, $out:ident, $i:expr, $second:expr) => {{
        let mut t2 = _mm_aeskeygenassist_si128::<$rcon>($t3);
        t2 = _mm_shuffle_epi32::<0xff>(t2);
        let mut t4 = _mm_slli_si128::<4>($t1);
        $t1 = _mm_xor_si128($t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        $t1 = _mm_xor_si128($t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        $t1 = _mm_xor_si128($t1, t4);
        $t1 = _mm_xor_si128($t1, t2);
        $out[$i] = $t1;
        if $second {
            let t4 = _mm_aeskeygenassist_si128::<0>($t1);
            let t2 = _mm_shuffle_epi32::<0xaa>(t4);
            let mut t4 = _mm_slli_si128::<4>($t3);
            $t3 = _mm_xor_si128($t3, t4);
            t4 = _mm_slli_si128::<4>(t4);
            $t3 = _mm_xor_si128($t3, t4);
            t4 = _mm_slli_si128::<4>(t4);
            $t3 = _mm_xor_si128($t3, t4);
            $t3 = _mm_xor_si128($t3, t2);
            $out[$i + 1] = $t3;
        }
    }};
}

/// Expand an AES-256 key into encryption and decryption schedules, written
/// directly into `enc` and `dec` (which live in secret memory).
#[target_feature(enable = "aes,sse2")]
pub(crate) unsafe fn expand_key(key: &[u8; 32], enc: &mut Schedule, dec: &mut Schedule) {
    // SAFETY: `key` is 32 readable bytes.
    let (mut t1, mut t3) = unsafe { (load(key.as_ptr()), load(key.as_ptr().add(16))) };
    let mut rk = [_mm_setzero_si128(); ROUNDS];
    rk[0] = t1;
    rk[1] = t3;
    expand_round!(t1, t3, 0x01, rk, 2, true);
    expand_round!(t1, t3, 0x02, rk, 4, true);
    expand_round!(t1, t3, 0x04, rk, 6, true);
    expand_round!(t1, t3, 0x08, rk, 8, true);
    expand_round!(t1, t3, 0x10, rk, 10, true);
    expand_round!(t1, t3, 0x20, rk, 12, true);
    expand_round!(t1, t3, 0x40, rk, 14, false);
    for i in 0..ROUNDS {
        // SAFETY: each schedule entry is 16 writable bytes.
        unsafe { store(enc[i].as_mut_ptr(), rk[i]) };
        let d = match i {
            0 => rk[14],
            14 => rk[0],
            _ => _mm_aesimc_si128(rk[14 - i]),
        };
        // SAFETY: as above.
        unsafe { store(dec[i].as_mut_ptr(), d) };
    }
    // Wipe the stack copies of the schedule.
    for r in rk.iter_mut() {
        // SAFETY: `r` is a valid, aligned __m128i on our stack.
        unsafe { core::ptr::write_volatile(r, _mm_setzero_si128()) };
    }
}

/// `t · x` in GF(2^128) on a register (XTS byte order).
#[inline(always)]
fn mul_x(t: __m128i) -> __m128i {
    // SAFETY: SSE2 is baseline on x86_64.
    unsafe {
        // Sign bits of dword 3 (bit 127) and dword 1 (bit 63) spread to full
        // dwords, moved to dword 0 (reduction) and dword 2 (carry into the
        // high qword).
        let m = _mm_shuffle_epi32::<0x13>(_mm_srai_epi32::<31>(t));
        let m = _mm_and_si128(m, _mm_set_epi32(0, 1, 0, 0x87));
        _mm_xor_si128(_mm_add_epi64(t, t), m)
    }
}

macro_rules! sse_round {
    ($op:literal, $off:literal) => {
        concat!(
            "movdqa xmm8, xmmword ptr [{rk} + ",
            $off,
            "]\n",
            $op,
            " xmm0, xmm8\n",
            $op,
            " xmm1, xmm8\n",
            $op,
            " xmm2, xmm8\n",
            $op,
            " xmm3, xmm8\n",
            $op,
            " xmm4, xmm8\n",
            $op,
            " xmm5, xmm8\n",
            $op,
            " xmm6, xmm8\n",
            $op,
            " xmm7, xmm8\n",
        )
    };
}

/// Encrypt up to eight 16-byte tweak values under `k2`, in place. The round
/// keys go from secret memory through xmm8 only (memory operands in the asm):
/// no copy of the schedule is made on the stack, and xmm8 is cleared after.
#[target_feature(enable = "aes,sse2,sse4.1")]
pub(crate) unsafe fn encrypt_tweaks<const N: usize>(k2: &Schedule, tweaks: &mut [[u8; 16]; N]) {
    const { assert!(N <= 8) };
    let mut b = [_mm_setzero_si128(); 8];
    for (x, t) in b.iter_mut().zip(tweaks.iter()) {
        // SAFETY: each tweak is 16 readable bytes.
        *x = unsafe { load(t.as_ptr()) };
    }
    let [mut b0, mut b1, mut b2, mut b3, mut b4, mut b5, mut b6, mut b7] = b;
    // SAFETY: `k2` is 15 round keys of 16 bytes in the 64-byte-aligned
    // RoundKeys (so every `[rk + 16*i]` operand is aligned, as the legacy SSE
    // encoding needs); the asm reads only them and writes only registers.
    unsafe {
        core::arch::asm!(
            "movdqa xmm8, xmmword ptr [{rk}]",
            "pxor xmm0, xmm8", "pxor xmm1, xmm8", "pxor xmm2, xmm8", "pxor xmm3, xmm8",
            "pxor xmm4, xmm8", "pxor xmm5, xmm8", "pxor xmm6, xmm8", "pxor xmm7, xmm8",
            sse_round!("aesenc", "16"),
            sse_round!("aesenc", "32"),
            sse_round!("aesenc", "48"),
            sse_round!("aesenc", "64"),
            sse_round!("aesenc", "80"),
            sse_round!("aesenc", "96"),
            sse_round!("aesenc", "112"),
            sse_round!("aesenc", "128"),
            sse_round!("aesenc", "144"),
            sse_round!("aesenc", "160"),
            sse_round!("aesenc", "176"),
            sse_round!("aesenc", "192"),
            sse_round!("aesenc", "208"),
            sse_round!("aesenclast", "224"),
            "pxor xmm8, xmm8",
            rk = in(reg) k2.as_ptr(),
            inout("xmm0") b0, inout("xmm1") b1, inout("xmm2") b2, inout("xmm3") b3,
            inout("xmm4") b4, inout("xmm5") b5, inout("xmm6") b6, inout("xmm7") b7,
            out("xmm8") _,
            options(nostack, readonly, preserves_flags),
        );
    }
    let b = [b0, b1, b2, b3, b4, b5, b6, b7];
    for (x, t) in b.iter().zip(tweaks.iter_mut()) {
        // SAFETY: each tweak is 16 writable bytes.
        unsafe { store(t.as_mut_ptr(), *x) };
    }
}

/// One block through the cipher (`aesenc`/`aesenclast`, or the `aesdec`
/// pair with a decryption schedule); round keys as memory operands straight
/// from secret memory, as in [`encrypt_tweaks`].
#[inline(always)]
unsafe fn cipher1<const DEC: bool>(mut x: __m128i, rk: &Schedule) -> __m128i {
    macro_rules! one {
        ($op:literal, $last:literal) => {
            // SAFETY: as in `encrypt_tweaks`: aligned round keys in secret
            // memory, read-only; only `x` is written.
            unsafe {
                core::arch::asm!(
                    "pxor {x}, xmmword ptr [{rk}]",
                    concat!($op, " {x}, xmmword ptr [{rk} + 16]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 32]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 48]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 64]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 80]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 96]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 112]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 128]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 144]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 160]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 176]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 192]"),
                    concat!($op, " {x}, xmmword ptr [{rk} + 208]"),
                    concat!($last, " {x}, xmmword ptr [{rk} + 224]"),
                    x = inout(xmm_reg) x,
                    rk = in(reg) rk.as_ptr(),
                    options(nostack, readonly, preserves_flags),
                )
            }
        };
    }
    if DEC {
        one!("aesdec", "aesdeclast");
    } else {
        one!("aesenc", "aesenclast");
    }
    x
}

macro_rules! sse_next_tweak {
    ($off:literal) => {
        concat!(
            "movdqa xmm9, xmmword ptr [{cur} + ",
            $off,
            "]\n",
            "movdqa xmm10, xmm9\n",
            "psrldq xmm10, 15\n",
            "pclmulqdq xmm10, xmm13, 0\n",
            "pslldq xmm9, 1\n",
            "pxor xmm9, xmm10\n",
            "movdqa xmmword ptr [{next} + ",
            $off,
            "], xmm9\n",
        )
    };
}

macro_rules! sse_round0 {
    ($reg:literal, $off:literal) => {
        concat!(
            "movdqu ",
            $reg,
            ", xmmword ptr [{src} + ",
            $off,
            "]\n",
            "pxor ",
            $reg,
            ", xmmword ptr [{cur} + ",
            $off,
            "]\n",
            "pxor ",
            $reg,
            ", xmm8\n",
        )
    };
}

macro_rules! sse_last {
    ($last:literal, $reg:literal, $off:literal) => {
        concat!(
            "movdqa xmm9, xmm8\n",
            "pxor xmm9, xmmword ptr [{cur} + ",
            $off,
            "]\n",
            $last,
            " ",
            $reg,
            ", xmm9\n",
            "movdqu xmmword ptr [{dst} + ",
            $off,
            "], ",
            $reg,
            "\n",
        )
    };
}

/// The AES-NI loop: 8 blocks per iteration in xmm0..xmm7 (legacy SSE
/// encoding, so it runs on CPUs without AVX). Same plan as the VAES kernel
/// (see `vaes.rs`): round key in xmm8, tweaks in the 16-byte-aligned `{cur}`
/// buffer folded into round 0 and the last round key, next group's tweaks
/// (× x^8: a byte shift and one PCLMULQDQ) computed between rounds 1..8 into
/// `{next}`, reduction constant 0x87 in xmm13.
macro_rules! xts8_asm {
    ($op:literal, $last:literal) => {
        concat!(
            "mov {tmp:e}, 0x87\n",
            "movd xmm13, {tmp:e}\n",
            "2:\n",
            "movdqa xmm8, xmmword ptr [{rk}]\n",
            sse_round0!("xmm0", "0"),
            sse_round0!("xmm1", "16"),
            sse_round0!("xmm2", "32"),
            sse_round0!("xmm3", "48"),
            sse_round0!("xmm4", "64"),
            sse_round0!("xmm5", "80"),
            sse_round0!("xmm6", "96"),
            sse_round0!("xmm7", "112"),
            sse_round!($op, "16"),
            sse_next_tweak!("0"),
            sse_round!($op, "32"),
            sse_next_tweak!("16"),
            sse_round!($op, "48"),
            sse_next_tweak!("32"),
            sse_round!($op, "64"),
            sse_next_tweak!("48"),
            sse_round!($op, "80"),
            sse_next_tweak!("64"),
            sse_round!($op, "96"),
            sse_next_tweak!("80"),
            sse_round!($op, "112"),
            sse_next_tweak!("96"),
            sse_round!($op, "128"),
            sse_next_tweak!("112"),
            sse_round!($op, "144"),
            sse_round!($op, "160"),
            sse_round!($op, "176"),
            sse_round!($op, "192"),
            sse_round!($op, "208"),
            "movdqa xmm8, xmmword ptr [{rk} + 224]\n",
            sse_last!($last, "xmm0", "0"),
            sse_last!($last, "xmm1", "16"),
            sse_last!($last, "xmm2", "32"),
            sse_last!($last, "xmm3", "48"),
            sse_last!($last, "xmm4", "64"),
            sse_last!($last, "xmm5", "80"),
            sse_last!($last, "xmm6", "96"),
            sse_last!($last, "xmm7", "112"),
            "add {src}, 128\n",
            "add {dst}, 128\n",
            "xchg {cur}, {next}\n",
            "dec {n}\n",
            "jnz 2b\n",
            // Leave no key or data in vector registers.
            "pxor xmm0, xmm0\n",
            "pxor xmm1, xmm1\n",
            "pxor xmm2, xmm2\n",
            "pxor xmm3, xmm3\n",
            "pxor xmm4, xmm4\n",
            "pxor xmm5, xmm5\n",
            "pxor xmm6, xmm6\n",
            "pxor xmm7, xmm7\n",
            "pxor xmm8, xmm8\n",
            "pxor xmm9, xmm9\n",
            "pxor xmm10, xmm10\n",
        )
    };
}

/// Tweak scratch for `xts8`: two 128-byte buffers, 16-byte aligned (legacy
/// SSE memory operands need it). Wiped on drop.
#[repr(C, align(16))]
struct Scratch8([[u8; 128]; 2]);

impl Drop for Scratch8 {
    fn drop(&mut self) {
        super::wipe::wipe(self.0.as_flattened_mut());
    }
}

/// Run `groups` 8-block groups; `cur` holds the first group's tweaks; returns
/// the buffer holding the next group's.
///
/// # Safety
/// `rk` is a 16-byte-aligned schedule; `src` readable and `dst` writable for
/// `128 * groups` bytes (may be equal); `cur`/`next` distinct, 16-byte aligned,
/// 128 bytes each; `groups > 0`; the CPU has AES-NI and PCLMULQDQ.
#[target_feature(enable = "aes,sse2,sse4.1,pclmulqdq")]
unsafe fn xts8<const DEC: bool>(
    rk: &Schedule,
    src: *const u8,
    dst: *mut u8,
    groups: usize,
    cur: *mut u8,
    next: *mut u8,
) -> *mut u8 {
    debug_assert!(groups > 0 && (rk.as_ptr() as usize).is_multiple_of(16));
    let mut cur = cur;
    // SAFETY: the caller guarantees buffers, alignment and CPU features; the
    // assembly reads 240 bytes at rk, 128 bytes per group at src, writes 128
    // per group at dst, reads `cur` and writes `next` (swapping them), uses
    // no stack and clobbers only the listed registers.
    unsafe {
        if DEC {
            core::arch::asm!(
                xts8_asm!("aesdec", "aesdeclast"),
                rk = in(reg) rk.as_ptr(),
                src = inout(reg) src => _,
                dst = inout(reg) dst => _,
                n = inout(reg) groups => _,
                cur = inout(reg) cur,
                next = inout(reg) next => _,
                tmp = out(reg) _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm13") _,
                options(nostack),
            );
        } else {
            core::arch::asm!(
                xts8_asm!("aesenc", "aesenclast"),
                rk = in(reg) rk.as_ptr(),
                src = inout(reg) src => _,
                dst = inout(reg) dst => _,
                n = inout(reg) groups => _,
                cur = inout(reg) cur,
                next = inout(reg) next => _,
                tmp = out(reg) _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm13") _,
                options(nostack),
            );
        }
    }
    cur
}

/// XTS over `nblocks` whole blocks from `src` to `dst` (which may be the same
/// pointer), starting at encrypted tweak `tweak`. Returns the tweak of the
/// block after the last one.
///
/// # Safety
/// `src` must be readable and `dst` writable for `16 * nblocks` bytes, and the
/// CPU must have AES-NI and SSE4.1.
#[target_feature(enable = "aes,sse2,sse4.1,pclmulqdq")]
pub(crate) unsafe fn xts_blocks<const DEC: bool>(
    rk: &Schedule,
    mut src: *const u8,
    mut dst: *mut u8,
    mut nblocks: usize,
    tweak: [u8; 16],
) -> [u8; 16] {
    let rk_bytes = rk;
    // SAFETY: the tweak is 16 readable bytes.
    let mut t = unsafe { load(tweak.as_ptr()) };
    if nblocks >= 8 {
        let groups = nblocks / 8;
        let mut sc = Scratch8([[0; 128]; 2]);
        let t0 = u128::from_le_bytes(tweak);
        for (k, chunk) in sc.0[0].chunks_exact_mut(16).enumerate() {
            let tk = if k == 0 {
                t0
            } else {
                super::gf128::mul_x_pow(t0, k as u32)
            };
            chunk.copy_from_slice(&tk.to_le_bytes());
        }
        let (a, b) = sc.0.split_at_mut(1);
        // SAFETY: the caller guarantees src/dst for 16*nblocks >= 128*groups
        // bytes; the scratch halves are distinct, aligned, 128 bytes each;
        // the schedule lives in the 64-byte-aligned RoundKeys.
        let last = unsafe { xts8::<DEC>(rk_bytes, src, dst, groups, a[0].as_mut_ptr(), b[0].as_mut_ptr()) };
        // SAFETY: `last` points at one of the scratch buffers (16 bytes read).
        t = unsafe { load(last) };
        // SAFETY: advancing within (or one past) the caller's buffers.
        unsafe {
            src = src.add(128 * groups);
            dst = dst.add(128 * groups);
        }
        nblocks -= 8 * groups;
    }
    for _ in 0..nblocks {
        // SAFETY: one block remains readable at `src`.
        let x = _mm_xor_si128(unsafe { load(src) }, t);
        // SAFETY: the schedule is RoundKeys' (aligned, in secret memory).
        let y = unsafe { cipher1::<DEC>(x, rk_bytes) };
        // SAFETY: one block remains writable at `dst`.
        unsafe { store(dst, _mm_xor_si128(y, t)) };
        t = mul_x(t);
        // SAFETY: advancing within (or one past) the caller's buffers.
        unsafe {
            src = src.add(16);
            dst = dst.add(16);
        }
    }
    let mut out = [0u8; 16];
    // SAFETY: `out` is 16 writable bytes.
    unsafe { store(out.as_mut_ptr(), t) };
    out
}
