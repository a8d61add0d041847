//! Tweak arithmetic in GF(2^128) with the XTS convention: the 16 tweak bytes
//! are a little-endian 128-bit integer, and multiplying by the primitive
//! element α (= x) is a left shift by one with the carry folded back as 0x87.

/// `t · x` in GF(2^128) (IEEE 1619, section 5.2).
#[inline(always)]
pub(crate) fn mul_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// `t · x^k` for `1 <= k <= 56`, without a serial chain of doublings: the
/// bits shifted out at the top come back reduced by x^128 = x^7 + x^2 + x + 1.
/// Independent calls for different `k` run in parallel in the CPU.
#[inline(always)]
pub(crate) fn mul_x_pow(t: u128, k: u32) -> u128 {
    debug_assert!((1..=56).contains(&k));
    let h = t >> (128 - k);
    (t << k) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)
}

/// The tweak value of sector `n` under `plain64`: `LE64(n) ‖ 0^64`.
#[inline(always)]
pub(crate) fn plain64(n: u64) -> [u8; 16] {
    (n as u128).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_x_shifts_and_reduces() {
        assert_eq!(mul_x(1), 2);
        assert_eq!(mul_x(1 << 127), 0x87);
        assert_eq!(mul_x((1 << 127) | 1), 0x87 ^ 2);
    }

    #[test]
    fn mul_x_pow_equals_repeated_doubling() {
        let mut t = 0xfedc_ba98_7654_3210_0123_4567_89ab_cdefu128;
        for _ in 0..50 {
            let mut r = t;
            for k in 1..=56 {
                r = mul_x(r);
                assert_eq!(mul_x_pow(t, k), r, "k={k}");
            }
            t = t.rotate_left(13) ^ 0x9e37_79b9_7f4a_7c15;
        }
    }

    #[test]
    fn plain64_is_little_endian_low_half() {
        let t = plain64(0x0102_0304_0506_0708);
        assert_eq!(&t[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&t[8..], &[0; 8]);
    }
}
