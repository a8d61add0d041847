//! Layout of expanded key material inside a [`SecretMem`] page.
//!
//! The `Xts` engine owns one secret-memory mapping. For the x86 kernels it
//! holds a [`RoundKeys`] (round keys expanded by our own AES-NI key schedule,
//! written straight into the mapping); for the portable kernel it holds a
//! [`SoftKeys`] (two `aes::Aes256` values moved into the mapping).

use aes::Aes256;

/// AES-256 has 14 rounds, so 15 round keys.
pub(crate) const ROUNDS: usize = 15;

/// Round keys for the x86 kernels. Every field is plain bytes, so an
/// all-zero mapping is a valid (if useless) value of this type.
#[repr(C, align(64))]
pub(crate) struct RoundKeys {
    /// k1 encryption schedule.
    pub enc1: [[u8; 16]; ROUNDS],
    /// k1 decryption schedule (equivalent inverse cipher: reversed, with
    /// InvMixColumns applied to rounds 1..=13).
    pub dec1: [[u8; 16]; ROUNDS],
    /// k2 encryption schedule (tweaks only ever use encryption).
    pub enc2: [[u8; 16]; ROUNDS],
    /// `enc1` with each round key duplicated into both 128-bit lanes, so the
    /// VAES kernel loads a YMM round key with one plain load.
    pub enc1_x2: [[u8; 32]; ROUNDS],
    /// `dec1`, duplicated likewise.
    pub dec1_x2: [[u8; 32]; ROUNDS],
}

/// The portable kernel's key state: the `aes` crate's ciphers, which zeroize
/// themselves on drop (crate feature `zeroize`).
pub(crate) struct SoftKeys {
    pub k1: Aes256,
    pub k2: Aes256,
}

impl RoundKeys {
    /// Fill the duplicated YMM copies from the 128-bit schedules.
    pub(crate) fn fill_x2(&mut self) {
        for r in 0..ROUNDS {
            self.enc1_x2[r][..16].copy_from_slice(&self.enc1[r]);
            self.enc1_x2[r][16..].copy_from_slice(&self.enc1[r]);
            self.dec1_x2[r][..16].copy_from_slice(&self.dec1[r]);
            self.dec1_x2[r][16..].copy_from_slice(&self.dec1[r]);
        }
    }
}
