//! Wiping scratch that held tweaks or key-derived values.
//!
//! `zeroize` clears a byte slice with one volatile store per byte: 512 bytes
//! of tweak scratch cost about as much as a quarter of a 4 KiB sector's
//! cipher. [`wipe`] clears the aligned middle with volatile 8-byte stores
//! instead (still volatile, so the compiler cannot drop them).
//!
//! [`clear_vector_registers`] zeroes the calling thread's vector registers after
//! key work: AES code leaves round keys in them, and a thread spawned afterwards
//! (clone copies the register file) or a core dump (each thread's saved XSAVE
//! state) would carry them.

use zeroize::Zeroize;

/// Zero `bytes` with volatile stores, 8 bytes at a time where aligned.
pub(crate) fn wipe(bytes: &mut [u8]) {
    // SAFETY: `align_to_mut` only hands out `u64`s that lie wholly inside the
    // slice and are 8-aligned; every bit pattern is a valid `u64` and a valid
    // `u8`, so viewing the bytes either way is sound.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    head.zeroize();
    words.zeroize();
    tail.zeroize();
}

/// Zero every vector register of the calling thread (x86-64: `vzeroall` with AVX,
/// else the sixteen XMM registers).
#[inline(never)]
pub(crate) fn clear_vector_registers() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: `vzeroall` only zeroes ymm0-15, all declared clobbered; it touches
            // no memory and needs AVX, checked above.
            unsafe {
                std::arch::asm!(
                    "vzeroall",
                    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                    out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                    options(nostack, nomem, preserves_flags),
                )
            };
        } else {
            // SAFETY: SSE2 is part of x86-64; the XORs only zero xmm0-15, all declared
            // clobbered, and touch no memory.
            unsafe {
                std::arch::asm!(
                    "xorps xmm0, xmm0", "xorps xmm1, xmm1", "xorps xmm2, xmm2", "xorps xmm3, xmm3",
                    "xorps xmm4, xmm4", "xorps xmm5, xmm5", "xorps xmm6, xmm6", "xorps xmm7, xmm7",
                    "xorps xmm8, xmm8", "xorps xmm9, xmm9", "xorps xmm10, xmm10", "xorps xmm11, xmm11",
                    "xorps xmm12, xmm12", "xorps xmm13, xmm13", "xorps xmm14, xmm14", "xorps xmm15, xmm15",
                    out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                    out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                    out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                    options(nostack, nomem, preserves_flags),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wipe;

    #[test]
    fn wipes_every_byte_whatever_the_alignment() {
        let mut buf = [0xa5u8; 203];
        for start in 0..9 {
            buf.fill(0xa5);
            wipe(&mut buf[start..start + 187]);
            assert!(buf[start..start + 187].iter().all(|&b| b == 0));
            assert!(buf[..start].iter().all(|&b| b == 0xa5));
            assert!(buf[start + 187..].iter().all(|&b| b == 0xa5));
        }
    }
}
