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

#[inline(always)]
unsafe fn schedule(rk: &Schedule) -> [__m128i; ROUNDS] {
    // SAFETY: each round key is 16 readable bytes.
    core::array::from_fn(|i| unsafe { load(rk[i].as_ptr()) })
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

#[inline(always)]
fn enc8(b: &mut [__m128i; 8], rk: &[__m128i; ROUNDS]) {
    // SAFETY (whole fn): only reached from `#[target_feature(enable = "aes")]`
    // functions, inlined into them.
    unsafe {
        for x in b.iter_mut() {
            *x = _mm_xor_si128(*x, rk[0]);
        }
        for k in &rk[1..14] {
            for x in b.iter_mut() {
                *x = _mm_aesenc_si128(*x, *k);
            }
        }
        for x in b.iter_mut() {
            *x = _mm_aesenclast_si128(*x, rk[14]);
        }
    }
}

#[inline(always)]
fn enc1(mut x: __m128i, rk: &[__m128i; ROUNDS]) -> __m128i {
    // SAFETY: as in `enc8`.
    unsafe {
        x = _mm_xor_si128(x, rk[0]);
        for k in &rk[1..14] {
            x = _mm_aesenc_si128(x, *k);
        }
        _mm_aesenclast_si128(x, rk[14])
    }
}

#[inline(always)]
fn dec1(mut x: __m128i, rk: &[__m128i; ROUNDS]) -> __m128i {
    // SAFETY: as in `enc8`.
    unsafe {
        x = _mm_xor_si128(x, rk[0]);
        for k in &rk[1..14] {
            x = _mm_aesdec_si128(x, *k);
        }
        _mm_aesdeclast_si128(x, rk[14])
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

/// `t · x^8`: shift left one byte, fold the byte shifted out back in as
/// `byte · 0x87` (carry-less).
#[inline(always)]
fn mul_x8(t: __m128i) -> __m128i {
    // SAFETY: only inlined into functions that enable `pclmulqdq`.
    unsafe {
        let top = _mm_srli_si128::<15>(t);
        let red = _mm_clmulepi64_si128::<0x00>(top, _mm_set_epi64x(0, 0x87));
        _mm_xor_si128(_mm_slli_si128::<1>(t), red)
    }
}

/// Encrypt up to eight 16-byte tweak values under `k2`, in place.
#[target_feature(enable = "aes,sse2,sse4.1")]
pub(crate) unsafe fn encrypt_tweaks(k2: &Schedule, tweaks: &mut [[u8; 16]]) {
    debug_assert!(tweaks.len() <= 8);
    // SAFETY: round keys are 16 readable bytes each.
    let rk = unsafe { schedule(k2) };
    let mut b = [_mm_setzero_si128(); 8];
    for (x, t) in b.iter_mut().zip(tweaks.iter()) {
        // SAFETY: each tweak is 16 readable bytes.
        *x = unsafe { load(t.as_ptr()) };
    }
    enc8(&mut b, &rk);
    for (x, t) in b.iter().zip(tweaks.iter_mut()) {
        // SAFETY: each tweak is 16 writable bytes.
        unsafe { store(t.as_mut_ptr(), *x) };
    }
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
    // SAFETY: round keys and the tweak are 16 readable bytes each.
    let rk = unsafe { schedule(rk) };
    // SAFETY: as above.
    let mut t = unsafe { load(tweak.as_ptr()) };
    if nblocks >= 8 {
        // Eight tweaks in flight; each group's tweaks are the previous
        // group's times x^8 (a byte shift plus one carry-less multiply), so
        // the eight updates are independent of each other.
        let mut tw = [t; 8];
        for i in 1..8 {
            tw[i] = mul_x(tw[i - 1]);
        }
        while nblocks >= 8 {
            let mut b = [_mm_setzero_si128(); 8];
            for i in 0..8 {
                // SAFETY: 8 blocks remain readable at `src`.
                b[i] = _mm_xor_si128(unsafe { load(src.add(16 * i)) }, _mm_xor_si128(tw[i], rk[0]));
            }
            for k in &rk[1..14] {
                for x in b.iter_mut() {
                    *x = if DEC {
                        _mm_aesdec_si128(*x, *k)
                    } else {
                        _mm_aesenc_si128(*x, *k)
                    };
                }
            }
            for i in 0..8 {
                // The output XOR with the tweak is folded into the last round
                // key: AESENCLAST(x, k ^ t) = AESENCLAST(x, k) ^ t.
                let k = _mm_xor_si128(rk[14], tw[i]);
                let y = if DEC {
                    _mm_aesdeclast_si128(b[i], k)
                } else {
                    _mm_aesenclast_si128(b[i], k)
                };
                // SAFETY: 8 blocks remain writable at `dst`.
                unsafe { store(dst.add(16 * i), y) };
                tw[i] = mul_x8(tw[i]);
            }
            // SAFETY: advancing within (or one past) the caller's buffers.
            unsafe {
                src = src.add(128);
                dst = dst.add(128);
            }
            nblocks -= 8;
        }
        t = tw[0];
    }
    for _ in 0..nblocks {
        // SAFETY: one block remains readable at `src`.
        let x = _mm_xor_si128(unsafe { load(src) }, t);
        let y = if DEC { dec1(x, &rk) } else { enc1(x, &rk) };
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
