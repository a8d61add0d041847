//! The portable kernel: the `aes` crate's block cipher, tweaks in plain Rust.
//! Runs on any CPU; on x86 it is the reference the fast kernels are tested
//! against.

use aes::cipher::{BlockDecrypt, BlockEncrypt};
use aes::Block;

use super::gf128::mul_x;
use super::keys::SoftKeys;

/// Encrypt one tweak value under k2.
pub(crate) fn encrypt_tweak(keys: &SoftKeys, value: &[u8; 16]) -> [u8; 16] {
    let mut b = Block::clone_from_slice(value);
    keys.k2.encrypt_block(&mut b);
    let out: [u8; 16] = b.into();
    zeroize::Zeroize::zeroize(b.as_mut_slice());
    out
}

/// XTS over the whole blocks of `buf` in place, starting at encrypted tweak
/// `tweak`; returns the tweak after the last block.
pub(crate) fn xts_blocks<const DEC: bool>(keys: &SoftKeys, buf: &mut [u8], tweak: [u8; 16]) -> [u8; 16] {
    debug_assert!(buf.len().is_multiple_of(16));
    let mut t = u128::from_le_bytes(tweak);
    let mut blocks = [Block::default(); 8];
    let mut tw = [0u128; 8];
    for chunk in buf.chunks_mut(16 * 8) {
        let n = chunk.len() / 16;
        for i in 0..n {
            tw[i] = t;
            t = mul_x(t);
            let x = u128::from_le_bytes(chunk[16 * i..16 * i + 16].try_into().unwrap()) ^ tw[i];
            blocks[i].copy_from_slice(&x.to_le_bytes());
        }
        if DEC {
            keys.k1.decrypt_blocks(&mut blocks[..n]);
        } else {
            keys.k1.encrypt_blocks(&mut blocks[..n]);
        }
        for i in 0..n {
            let y = u128::from_le_bytes(blocks[i].into()) ^ tw[i];
            chunk[16 * i..16 * i + 16].copy_from_slice(&y.to_le_bytes());
        }
    }
    zeroize::Zeroize::zeroize(&mut tw[..]);
    t.to_le_bytes()
}
