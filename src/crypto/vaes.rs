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
//! | ymm11         | scratch for the sector loop's tweak fill                       |
//! | ymm13         | reduction constant: 0x87 in the low qword of each lane         |
//! | ymm14         | sector loop: the next sector's encrypted tweak, both lanes     |
//! | `{cur}`       | 256-byte buffer: the 16 tweaks of this group, same layout      |
//! | `{next}`      | 256-byte buffer: the 16 tweaks of the next group               |
//! | `{enc}`       | sector loop: this sector's encrypted tweak (16 bytes each)     |
//! | `{kt}`        | sector loop: the fill's shift counts (`FILL_SHIFTS`)           |
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
//!
//! Whole sectors (`xts_sectors`) run many sectors per call, the design of
//! Linux's `aes-xts-avx-x86_64.S` for short data units: a 512-byte sector is
//! only two groups, and per-sector set-up (a call, the constant, `vzeroall`,
//! a tweak fill in Rust, legacy-SSE tweak encryption) was a quarter of its
//! cost.
//! * the tweak values of up to `CHUNK` + 1 sectors are encrypted first,
//!   sixteen per pass with VAES (`encrypt_tweaks`, two sectors per YMM);
//! * the loop runs every group but a sector's last with the `x^16` update
//!   above; the last group instead derives the *next sector's* sixteen
//!   first-group tweaks from its encrypted tweak `T` (ymm14, both lanes),
//!   again one register per round in rounds 1..8:
//!   `T·x^k = (T ≪ k) ⊕ clmul(T ≫ (128 − k), 0x87)` with per-qword shift
//!   counts from the `FILL_SHIFTS` table (lane 0 gets `k = 2i`, lane 1
//!   `k = 2i + 1`), the carry between the qwords by a byte shift;
//! * so `{cur}`/`{next}` keep swapping across sector boundaries, and the
//!   constant, round-key pointer and `vzeroall` are paid once per call.
//!
//! Everything is VEX-encoded: no legacy-SSE code runs between the calls, so
//! there is no SSE/AVX transition penalty.

use core::arch::asm;
use core::mem::MaybeUninit;

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

/// Eight instructions of a sector's first-group tweak fill: the pair
/// `T·x^(2i) | T·x^(2i+1)` from `T` in both lanes of ymm14 into
/// `[$buf + $d]`; `$sl`/`$sr` are the offsets of the pair's left and right
/// shift counts in `{kt}` (`FILL_SHIFTS`). Uses ymm9..ymm11 and the 0x87
/// constant in ymm13.
macro_rules! fill_pair {
    ($buf:literal, $d:literal, $sl:literal, $sr:literal) => {
        concat!(
            "vpsllvq ymm9, ymm14, ymmword ptr [{kt} + ",
            $sl,
            "]\n",
            "vpsrlvq ymm10, ymm14, ymmword ptr [{kt} + ",
            $sr,
            "]\n",
            "vpslldq ymm11, ymm10, 8\n",
            "vpsrldq ymm10, ymm10, 8\n",
            "vpxor ymm9, ymm9, ymm11\n",
            "vpclmulqdq ymm10, ymm10, ymm13, 0\n",
            "vpxor ymm9, ymm9, ymm10\n",
            "vmovdqu ymmword ptr [",
            $buf,
            " + ",
            $d,
            "], ymm9\n",
        )
    };
}

/// The tweak work slotted after AES round `i + 1` of a group: `next` (the
/// next group's pair `i`, this one's times x^16) or `fill` (the next
/// sector's first-group pair `i`, from ymm14).
macro_rules! tweak_work {
    (next, $d:literal, $sl:literal, $sr:literal) => {
        next_tweak!($d)
    };
    (fill, $d:literal, $sl:literal, $sr:literal) => {
        fill_pair!("{next}", $d, $sl, $sr)
    };
}

/// What a group does before round 0: `fill` loads the next sector's
/// encrypted tweak into both lanes of ymm14 and advances `{enc}`.
macro_rules! group_prologue {
    (next) => {
        ""
    };
    (fill) => {
        concat!("vbroadcasti128 ymm14, xmmword ptr [{enc} + 16]\n", "add {enc}, 16\n",)
    };
}

/// One 16-block group: 256 bytes from `{src}` to `{dst}` with the tweaks in
/// `{cur}`, the `$kind` tweak work into `{next}` (see `tweak_work`);
/// advances `{src}`/`{dst}` and swaps `{cur}`/`{next}`.
macro_rules! group {
    ($kind:ident, $op:literal, $last:literal, $store:literal) => {
        concat!(
            group_prologue!($kind),
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
            tweak_work!($kind, "0", "0", "32"),
            aes_round!($op, "64"),
            tweak_work!($kind, "32", "64", "96"),
            aes_round!($op, "96"),
            tweak_work!($kind, "64", "128", "160"),
            aes_round!($op, "128"),
            tweak_work!($kind, "96", "192", "224"),
            aes_round!($op, "160"),
            tweak_work!($kind, "128", "256", "288"),
            aes_round!($op, "192"),
            tweak_work!($kind, "160", "320", "352"),
            aes_round!($op, "224"),
            tweak_work!($kind, "192", "384", "416"),
            aes_round!($op, "256"),
            tweak_work!($kind, "224", "448", "480"),
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
            group!(next, $op, $last, $store),
            "dec {n}\n",
            "jnz 2b\n",
            // Leave no key or data in vector registers.
            "vzeroall\n",
        )
    };
}

/// The sector loop (see the module header): fill the first sector's
/// first-group tweaks into `{cur}`, then per sector `{groups}` − 1 groups
/// with the x^16 update and one that fills the next sector's.
macro_rules! sectors_asm {
    ($op:literal, $last:literal, $store:literal) => {
        concat!(
            "mov {n:e}, 0x87\n",
            "vmovd xmm13, {n:e}\n",
            "vinserti128 ymm13, ymm13, xmm13, 1\n",
            "vbroadcasti128 ymm14, xmmword ptr [{enc}]\n",
            fill_pair!("{cur}", "0", "0", "32"),
            fill_pair!("{cur}", "32", "64", "96"),
            fill_pair!("{cur}", "64", "128", "160"),
            fill_pair!("{cur}", "96", "192", "224"),
            fill_pair!("{cur}", "128", "256", "288"),
            fill_pair!("{cur}", "160", "320", "352"),
            fill_pair!("{cur}", "192", "384", "416"),
            fill_pair!("{cur}", "224", "448", "480"),
            "3:\n",
            "mov {n}, {groups}\n",
            "test {n}, {n}\n",
            "jz 4f\n",
            "2:\n",
            group!(next, $op, $last, $store),
            "dec {n}\n",
            "jnz 2b\n",
            "4:\n",
            group!(fill, $op, $last, $store),
            "dec {nsec}\n",
            "jnz 3b\n",
            // Leave no key, tweak or data in vector registers.
            "vzeroall\n",
        )
    };
}

/// `vbroadcasti128` a k2 round key into ymm8 and run one round on ymm0..7.
macro_rules! tweak_round {
    ($op:literal, $off:literal) => {
        concat!(
            "vbroadcasti128 ymm8, xmmword ptr [{k2} + ",
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

/// How [`xts16`] and [`xts_sectors`] run: decrypt, encrypt, or encrypt with
/// streaming stores.
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

/// Shift counts for `fill_pair`: for pair `i` (bytes `64 i ..`), the left
/// counts `[2i, 2i, 2i+1, 2i+1]` (per qword: lane 0 lo/hi, lane 1 lo/hi),
/// then the right counts `64 −` those (a count of 64 gives 0: no carry, no
/// reduction for `k = 0`).
#[repr(C, align(32))]
struct FillShifts([u64; 64]);

static FILL_SHIFTS: FillShifts = FillShifts({
    let mut t = [0u64; 64];
    let mut i = 0;
    while i < 8 {
        let (k0, k1) = (2 * i as u64, 2 * i as u64 + 1);
        t[8 * i] = k0;
        t[8 * i + 1] = k0;
        t[8 * i + 2] = k1;
        t[8 * i + 3] = k1;
        t[8 * i + 4] = 64 - k0;
        t[8 * i + 5] = 64 - k0;
        t[8 * i + 6] = 64 - k1;
        t[8 * i + 7] = 64 - k1;
        i += 1;
    }
    t
});

/// Encrypt `16 * passes` tweak values in place under k2, sixteen per pass
/// (eight YMM registers, two per register) with VAES, round keys broadcast
/// from the 128-bit schedule in secret memory. Ends with `vzeroall`.
///
/// # Safety
/// `buf` readable and writable for `256 * passes` bytes; `passes > 0`; `k2`
/// is the 15-entry encryption schedule; the CPU has AVX2 and VAES.
#[target_feature(enable = "avx2,vaes")]
unsafe fn encrypt_tweaks(k2: &[[u8; 16]; 15], buf: *mut u8, passes: usize) {
    debug_assert!(passes > 0);
    // SAFETY: the caller guarantees `buf` for 256 bytes per pass and the CPU
    // features; the assembly reads 240 bytes at `k2`, reads and writes 256
    // bytes per pass at `buf`, uses no stack, clobbers only the listed
    // registers and clears every vector register at the end.
    unsafe {
        asm!(
            "2:",
            "vbroadcasti128 ymm8, xmmword ptr [{k2}]",
            "vpxor ymm0, ymm8, ymmword ptr [{buf}]",
            "vpxor ymm1, ymm8, ymmword ptr [{buf} + 32]",
            "vpxor ymm2, ymm8, ymmword ptr [{buf} + 64]",
            "vpxor ymm3, ymm8, ymmword ptr [{buf} + 96]",
            "vpxor ymm4, ymm8, ymmword ptr [{buf} + 128]",
            "vpxor ymm5, ymm8, ymmword ptr [{buf} + 160]",
            "vpxor ymm6, ymm8, ymmword ptr [{buf} + 192]",
            "vpxor ymm7, ymm8, ymmword ptr [{buf} + 224]",
            tweak_round!("vaesenc", "16"),
            tweak_round!("vaesenc", "32"),
            tweak_round!("vaesenc", "48"),
            tweak_round!("vaesenc", "64"),
            tweak_round!("vaesenc", "80"),
            tweak_round!("vaesenc", "96"),
            tweak_round!("vaesenc", "112"),
            tweak_round!("vaesenc", "128"),
            tweak_round!("vaesenc", "144"),
            tweak_round!("vaesenc", "160"),
            tweak_round!("vaesenc", "176"),
            tweak_round!("vaesenc", "192"),
            tweak_round!("vaesenc", "208"),
            tweak_round!("vaesenclast", "224"),
            "vmovdqu ymmword ptr [{buf}], ymm0",
            "vmovdqu ymmword ptr [{buf} + 32], ymm1",
            "vmovdqu ymmword ptr [{buf} + 64], ymm2",
            "vmovdqu ymmword ptr [{buf} + 96], ymm3",
            "vmovdqu ymmword ptr [{buf} + 128], ymm4",
            "vmovdqu ymmword ptr [{buf} + 160], ymm5",
            "vmovdqu ymmword ptr [{buf} + 192], ymm6",
            "vmovdqu ymmword ptr [{buf} + 224], ymm7",
            "add {buf}, 256",
            "dec {n}",
            "jnz 2b",
            "vzeroall",
            k2 = in(reg) k2.as_ptr(),
            buf = inout(reg) buf => _,
            n = inout(reg) passes => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        )
    }
}

/// Run `nsec` whole sectors of `groups` 16-block groups each (see the module
/// header). `enc` holds the encrypted tweaks of the `nsec` sectors *and one
/// more* (the last sector's fill derives that one's first-group tweaks,
/// which are then unused); `cur` and `next` are scratch.
///
/// # Safety
/// `src` readable and `dst` writable for `256 * groups * nsec` bytes (may be
/// equal); `enc` readable for `16 * (nsec + 1)` bytes; `cur` and `next`
/// distinct 256-byte buffers; `rk` points at 15 32-byte round keys;
/// `nsec > 0`, `groups > 0`; the CPU has AVX2, VAES and VPCLMULQDQ; with
/// [`Mode::EncryptStream`], `dst` is 32-byte aligned.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,vaes,vpclmulqdq")]
unsafe fn xts_sectors(
    mode: Mode,
    rk: *const [u8; 32],
    src: *const u8,
    dst: *mut u8,
    nsec: usize,
    groups: usize,
    enc: *const u8,
    cur: *mut u8,
    next: *mut u8,
) {
    debug_assert!(nsec > 0 && groups > 0);
    debug_assert!(mode != Mode::EncryptStream || (dst as usize).is_multiple_of(32));
    macro_rules! run {
        ($code:expr) => {
            asm!(
                $code,
                rk = in(reg) rk,
                src = inout(reg) src => _,
                dst = inout(reg) dst => _,
                nsec = inout(reg) nsec => _,
                groups = in(reg) groups - 1,
                n = out(reg) _,
                enc = inout(reg) enc => _,
                kt = in(reg) FILL_SHIFTS.0.as_ptr(),
                cur = inout(reg) cur => _,
                next = inout(reg) next => _,
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
    // group at src/dst, reads 16 bytes per sector plus one at `enc` and the
    // 512-byte shift table, and reads/writes `cur`/`next` (256 bytes each).
    // `n` is an early-clobber output, so it never shares a register with
    // `groups`. It touches no stack, clobbers only the registers listed, and
    // clears every vector register at the end.
    unsafe {
        match mode {
            Mode::Decrypt => run!(sectors_asm!("vaesdec", "vaesdeclast", "vmovdqu")),
            Mode::Encrypt => run!(sectors_asm!("vaesenc", "vaesenclast", "vmovdqu")),
            Mode::EncryptStream => run!(sectors_asm!("vaesenc", "vaesenclast", "vmovntdq")),
        }
    }
}

/// Sectors per [`xts_sectors`] call: their tweak values plus the one after
/// fill exactly [`TWEAK_SLOTS`] (four passes of [`encrypt_tweaks`]).
const CHUNK: usize = 63;
const TWEAK_SLOTS: usize = CHUNK + 1;

/// The encrypted tweaks of a chunk and the two group tweak buffers. Derived
/// from k2, so what was written is wiped on drop. Left uninitialised, not
/// zeroed, at creation (1.5 KiB of stores per call, about 3% of a lone
/// 4 KiB sector): only ever written through raw pointers, and read only by
/// the assembly, after it or the tweak fill wrote the bytes.
#[repr(C, align(32))]
struct SectorScratch {
    enc: MaybeUninit<[[u8; 16]; TWEAK_SLOTS]>,
    groups: MaybeUninit<[[u8; 256]; 2]>,
    /// Bytes of `enc` written so far (a multiple of 256).
    used: usize,
}

impl Drop for SectorScratch {
    fn drop(&mut self) {
        // SAFETY: both regions are 32-byte aligned (the struct is, `enc` is
        // its first field and 1024 bytes long) and `used` ≤ 1024 and 512 are
        // multiples of 32 within them; only the VAES kernel makes a
        // SectorScratch, so the CPU has AVX.
        unsafe {
            wipe32(self.enc.as_mut_ptr().cast(), self.used);
            wipe32(self.groups.as_mut_ptr().cast(), 512);
        }
    }
}

/// Zero `len` bytes at `p` with volatile 32-byte stores (a quarter of the
/// stores of `wipe::wipe`).
///
/// # Safety
/// `p` is 32-byte aligned and writable for `len` bytes, `len` a multiple of
/// 32; the CPU has AVX.
#[target_feature(enable = "avx")]
unsafe fn wipe32(p: *mut u8, len: usize) {
    use core::arch::x86_64::{__m256i, _mm256_setzero_si256};
    debug_assert!((p as usize).is_multiple_of(32) && len.is_multiple_of(32));
    let z = _mm256_setzero_si256();
    for i in 0..len / 32 {
        // SAFETY: the caller guarantees 32-byte alignment and `len` bytes.
        unsafe { core::ptr::write_volatile(p.add(32 * i).cast::<__m256i>(), z) };
    }
}

/// XTS over whole sectors of `sector_size` bytes (a multiple of 256),
/// `plain64` tweaks starting at `first_sector`: chunks of up to [`CHUNK`]
/// sectors, each one [`encrypt_tweaks`] call over their tweak values (one to
/// four passes) and one [`xts_sectors`] call.
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
    if count == 0 {
        return;
    }
    let groups = sector_size / 256;
    let rk = if mode == Mode::Decrypt {
        &keys.dec1_x2
    } else {
        &keys.enc1_x2
    };
    let mut s = SectorScratch {
        enc: MaybeUninit::uninit(),
        groups: MaybeUninit::uninit(),
        used: 0,
    };
    let enc = s.enc.as_mut_ptr().cast::<[u8; 16]>();
    let cur = s.groups.as_mut_ptr().cast::<u8>();
    let mut i = 0;
    while i < count {
        let batch = (count - i).min(CHUNK);
        // The batch's tweak values and the next one, rounded up to whole
        // passes of sixteen. Past the last sector the values wrap (they are
        // encrypted and never used).
        let slots = (batch + 1).next_multiple_of(16);
        for j in 0..slots {
            let t = super::gf128::plain64(first_sector.wrapping_add((i + j) as u64));
            // SAFETY: j < slots ≤ TWEAK_SLOTS: inside `s.enc`.
            unsafe { enc.add(j).write(t) };
        }
        s.used = s.used.max(16 * slots);
        let off = i * sector_size;
        // SAFETY: the first `slots` ≤ TWEAK_SLOTS values of `s.enc` were
        // written above; sectors i .. i + batch lie within the caller's
        // buffers; `s.enc` then holds batch + 1 encrypted tweaks; the two
        // group buffers are distinct and 256 bytes each (`xts_sectors` fills
        // `cur` before reading it, and writes `next` before reading it);
        // this kernel's CPU features are present (checked by the caller).
        unsafe {
            encrypt_tweaks(&keys.enc2, enc.cast(), slots / 16);
            xts_sectors(
                mode,
                rk.as_ptr(),
                src.add(off),
                dst.add(off),
                batch,
                groups,
                enc.cast(),
                cur,
                cur.add(256),
            );
        }
        i += batch;
    }
    if mode == Mode::EncryptStream {
        // Streaming stores are weakly ordered: make them visible before the
        // caller hands the buffer on.
        core::arch::x86_64::_mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether to run: VAES present, or absent and explicitly allowed to be
    /// (`SEALDISK_ALLOW_NO_VAES=1`); otherwise the test fails.
    fn vaes_supported() -> bool {
        if super::super::Kernel::VaesAvx2.is_supported() {
            return true;
        }
        if std::env::var_os("SEALDISK_ALLOW_NO_VAES").is_some() {
            eprintln!("no VAES on this CPU: skipped (SEALDISK_ALLOW_NO_VAES is set)");
            return false;
        }
        panic!("this CPU lacks VAES/VPCLMULQDQ; set SEALDISK_ALLOW_NO_VAES=1 to skip the VAES kernel's tests");
    }

    #[test]
    fn fill_shift_table_is_what_fill_pair_expects() {
        for i in 0..8 {
            let k = [2 * i as u64, 2 * i as u64, 2 * i as u64 + 1, 2 * i as u64 + 1];
            assert_eq!(FILL_SHIFTS.0[8 * i..8 * i + 4], k);
            assert_eq!(FILL_SHIFTS.0[8 * i + 4..8 * i + 8], k.map(|k| 64 - k));
        }
        assert!((FILL_SHIFTS.0.as_ptr() as usize).is_multiple_of(32));
    }

    /// The in-assembly fill (prologue and interleaved) against the scalar
    /// `fill16`: a one-sector run leaves the first sector's first-group
    /// tweaks in `cur` and, through the last group's fill, the next sector's
    /// in the buffer that group wrote.
    #[test]
    fn assembly_fill_matches_the_scalar_tweaks() {
        if !vaes_supported() {
            return;
        }
        // Any 15 round keys will do: the fill does not depend on them.
        let rk = [[0x3cu8; 32]; 15];
        let mut t = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        for i in 0..3000 {
            if i % 5 == 0 {
                t |= 0xffff << 112; // top bits set: every reduction path
            }
            let t_next = t.rotate_left(17) ^ 0xa5a5_5a5a_0f0f_f0f0_1234_5678_9abc_def0;
            let mut enc = [0u8; 32];
            enc[..16].copy_from_slice(&t.to_le_bytes());
            enc[16..].copy_from_slice(&t_next.to_le_bytes());
            for groups in [1usize, 2, 3] {
                #[repr(C, align(32))]
                struct Bufs([[u8; 256]; 2]);
                let mut b = Bufs([[0; 256]; 2]);
                let data = vec![0u8; 256 * groups];
                let mut out = vec![0u8; 256 * groups];
                let (x, y) = b.0.split_at_mut(1);
                // SAFETY: the buffers have the sizes xts_sectors needs; VAES
                // checked above.
                unsafe {
                    xts_sectors(
                        Mode::Encrypt,
                        rk.as_ptr(),
                        data.as_ptr(),
                        out.as_mut_ptr(),
                        1,
                        groups,
                        enc.as_ptr(),
                        x[0].as_mut_ptr(),
                        y[0].as_mut_ptr(),
                    )
                };
                let mut want = [0u8; 256];
                fill16(&mut want, t_next);
                // The last group wrote its fill into the buffer it did not
                // read: `next` after an even number of swaps before it.
                let filled = if groups % 2 == 1 { &b.0[1] } else { &b.0[0] };
                assert_eq!(filled, &want, "next sector's tweaks, T={t_next:#x} groups={groups}");
                if groups == 1 {
                    // The prologue's fill of the first sector is in `cur`.
                    let mut first = [0u8; 256];
                    fill16(&mut first, t);
                    assert_eq!(b.0[0], first, "first sector's tweaks, T={t:#x}");
                }
            }
            t = t.rotate_left(29) ^ (t >> 3) ^ 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834;
        }
    }

    /// The VAES sector path against the AES-NI kernel's blocks (the reference
    /// here; the integration tests compare every kernel with outside
    /// implementations): every count from 1 to past two chunks, so partial
    /// chunks and pass counts of every size run, both directions and modes,
    /// every sector size, first sectors near 0, 2^32 and 2^64 − 1, in place
    /// and out of place.
    #[test]
    fn sectors_match_aesni_for_every_count_and_mode() {
        if !vaes_supported() {
            return;
        }
        let mut key = [0u8; 64];
        for (i, b) in key.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        let mut mem = crate::secmem::SecretMem::new(core::mem::size_of::<RoundKeys>()).unwrap();
        // SAFETY: the mapping is page-aligned, zero-filled and large enough;
        // zero bytes are a valid RoundKeys.
        let rk = unsafe { &mut *(mem.as_mut_ptr() as *mut RoundKeys) };
        let mut scratch = [[0u8; 16]; 15];
        // SAFETY: VAES implies AES-NI.
        unsafe {
            aesni::expand_key(key[..32].try_into().unwrap(), &mut rk.enc1, &mut rk.dec1);
            aesni::expand_key(key[32..].try_into().unwrap(), &mut rk.enc2, &mut scratch);
        }
        rk.fill_x2();
        let rk: &RoundKeys = rk;
        let reference = |dec: bool, buf: &mut [u8], first: u64, ss: usize| {
            for (j, sector) in buf.chunks_exact_mut(ss).enumerate() {
                let mut t = [super::super::gf128::plain64(first.wrapping_add(j as u64))];
                // SAFETY: AES-NI present; the sector is readable and writable.
                unsafe {
                    aesni::encrypt_tweaks(&rk.enc2, &mut t);
                    let p = sector.as_mut_ptr();
                    if dec {
                        aesni::xts_blocks::<true>(&rk.dec1, p, p, ss / 16, t[0]);
                    } else {
                        aesni::xts_blocks::<false>(&rk.enc1, p, p, ss / 16, t[0]);
                    }
                }
            }
        };
        let mut seed = 0x243f_6a88_85a3_08d3u64;
        let mut fill = |buf: &mut [u8]| {
            for b in buf {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
        };
        let counts: Vec<usize> = (1..=130).collect();
        for &ss in &[512usize, 1024, 2048, 4096] {
            for &n in &counts {
                if ss > 512 && n > 20 && ![63, 64, 65, 127].contains(&n) {
                    continue; // bounded time: all counts at 512, chunk edges above
                }
                for first in [0u64, 0xffff_fff0, u64::MAX - n as u64 + 1, 0x7fff_ffff_ffff_ffc0] {
                    let mut plain = vec![0u8; ss * n];
                    fill(&mut plain);
                    for mode in [Mode::Encrypt, Mode::EncryptStream, Mode::Decrypt] {
                        let dec = mode == Mode::Decrypt;
                        let mut want = plain.clone();
                        reference(dec, &mut want, first, ss);
                        let what = format!("ss={ss} n={n} first={first:#x} dec={dec}");
                        // In place (unaligned for the non-streaming modes).
                        if mode != Mode::EncryptStream {
                            let mut backing = vec![0u8; plain.len() + 1];
                            backing[1..].copy_from_slice(&plain);
                            let p = backing[1..].as_mut_ptr();
                            // SAFETY: p is valid for plain.len() bytes; VAES present.
                            unsafe { sectors(mode, rk, p, p, plain.len(), first, ss) };
                            assert!(backing[1..] == want[..], "{what} in place");
                        }
                        // Out of place into a 32-byte aligned destination.
                        #[repr(C, align(32))]
                        struct Block([u8; 32]);
                        let mut out: Vec<Block> = (0..plain.len() / 32).map(|_| Block([0xee; 32])).collect();
                        let dp = out.as_mut_ptr().cast::<u8>();
                        // SAFETY: src and dst valid for plain.len() bytes, dst
                        // 32-byte aligned; VAES present.
                        unsafe { sectors(mode, rk, plain.as_ptr(), dp, plain.len(), first, ss) };
                        // SAFETY: `out` holds plain.len() initialised bytes.
                        let got = unsafe { core::slice::from_raw_parts(dp, plain.len()) };
                        assert!(got == &want[..], "{what} out of place");
                    }
                }
            }
        }
    }
}
