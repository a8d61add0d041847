//! Engine properties: every kernel agrees with the `xts-mode` crate (an
//! independent implementation), round trips, tweaks differ per sector, and
//! every bad argument is refused without touching the buffer.

use aes::cipher::KeyInit;
use aes::Aes256;
use rand::{Rng, RngCore, SeedableRng};
use sealdisk::{Kernel, Xts, XtsError, SECTOR_SIZES};
use xts_mode::{get_tweak_default, Xts128};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(0x5ea1d15c)
}

fn key(r: &mut impl RngCore) -> [u8; 64] {
    let mut k = [0u8; 64];
    r.fill_bytes(&mut k);
    k
}

fn reference(key: &[u8; 64], buf: &mut [u8], first: u64, ss: usize, decrypt: bool) {
    let x = Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    if decrypt {
        x.decrypt_area(buf, ss, first as u128, get_tweak_default);
    } else {
        x.encrypt_area(buf, ss, first as u128, get_tweak_default);
    }
}

/// The asm kernels are what production runs on; a CPU without them would leave them
/// untested while every `Kernel::available()` loop below stays green. So on x86-64 both
/// must be there, unless their absence is explicitly allowed
/// (`SEALDISK_ALLOW_NO_AESNI=1`, `SEALDISK_ALLOW_NO_VAES=1`).
#[test]
fn the_asm_kernels_are_tested_here_or_their_absence_is_allowed() {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let available = Kernel::available();
    for (kernel, env) in [
        (Kernel::Aesni, "SEALDISK_ALLOW_NO_AESNI"),
        (Kernel::VaesAvx2, "SEALDISK_ALLOW_NO_VAES"),
    ] {
        if available.contains(&kernel) {
            continue;
        }
        if std::env::var_os(env).is_some() {
            eprintln!("\n!!!!!!!! SKIPPED: this CPU lacks the {kernel} kernel ({env} is set) !!!!!!!!\n");
            continue;
        }
        panic!("this CPU lacks the {kernel} kernel, so its tests would not run; set {env}=1 to allow that");
    }
}

#[test]
fn every_kernel_matches_xts_mode_crate() {
    let mut r = rng();
    for kernel in Kernel::available() {
        for &ss in &SECTOR_SIZES {
            for &nsec in &[1usize, 2, 7, 9, 17] {
                let k = key(&mut r);
                let xts = Xts::with_kernel(&k, kernel).unwrap();
                let first = match r.gen_range(0..3) {
                    0 => r.gen::<u64>() >> r.gen_range(0..64),
                    1 => u64::MAX - nsec as u64 + 1,
                    _ => 0,
                };
                let mut plain = vec![0u8; ss * nsec];
                r.fill_bytes(&mut plain);
                let mut want = plain.clone();
                reference(&k, &mut want, first, ss, false);
                let mut got = plain.clone();
                xts.encrypt_sectors(&mut got, first, ss).unwrap();
                assert_eq!(got, want, "{kernel} encrypt ss={ss} n={nsec} first={first}");
                let mut oop = vec![0u8; plain.len()];
                xts.encrypt_sectors_to(&plain, &mut oop, first, ss).unwrap();
                assert_eq!(oop, want, "{kernel} encrypt_to");
                let mut back = vec![0u8; plain.len()];
                xts.decrypt_sectors_to(&oop, &mut back, first, ss).unwrap();
                assert_eq!(back, plain, "{kernel} decrypt_to");
                xts.decrypt_sectors(&mut got, first, ss).unwrap();
                assert_eq!(got, plain, "{kernel} decrypt");
            }
        }
    }
}

#[test]
fn data_units_of_every_length_round_trip_and_agree_across_kernels() {
    let mut r = rng();
    let k = key(&mut r);
    let kernels: Vec<Xts> = Kernel::available()
        .into_iter()
        .map(|kn| Xts::with_kernel(&k, kn).unwrap())
        .collect();
    for len in (16..=600).chain([4096, 4097, 4111]) {
        let mut pt = vec![0u8; len];
        r.fill_bytes(&mut pt);
        let tweak: [u8; 16] = r.gen();
        let mut outs = Vec::new();
        for x in &kernels {
            let mut b = pt.clone();
            x.encrypt_data_unit(&mut b, &tweak).unwrap();
            assert_ne!(b, pt);
            outs.push(b.clone());
            x.decrypt_data_unit(&mut b, &tweak).unwrap();
            assert_eq!(b, pt, "{:?} len {len}", x.kernel());
        }
        for o in &outs[1..] {
            assert_eq!(o, &outs[0], "kernels disagree at len {len}");
        }
        if len % 16 == 0 {
            // Whole blocks: a data unit with tweak value n is sector n.
            let mut b = pt.clone();
            let n = u64::from_le_bytes(tweak[..8].try_into().unwrap());
            if tweak[8..] == [0; 8] && len % 512 == 0 {
                kernels[0].encrypt_sectors(&mut b, n, len).unwrap();
                assert_eq!(b, outs[0]);
            }
        }
    }
}

/// `encrypt_sectors_for_device` (streaming stores on VAES when the output is
/// 32-byte aligned) writes exactly what `encrypt_sectors_to` does, aligned
/// or not, and leaves the bytes around the output alone.
#[test]
fn device_bound_encryption_matches_every_kernel_aligned_or_not() {
    let mut r = rng();
    for kernel in Kernel::available() {
        for &ss in &[512usize, 4096] {
            for &nsec in &[1usize, 3, 32] {
                let k = key(&mut r);
                let xts = Xts::with_kernel(&k, kernel).unwrap();
                let first = r.gen::<u32>() as u64;
                let mut plain = vec![0u8; ss * nsec];
                r.fill_bytes(&mut plain);
                let mut want = vec![0u8; plain.len()];
                xts.encrypt_sectors_to(&plain, &mut want, first, ss).unwrap();
                let mut check = plain.clone();
                reference(&k, &mut check, first, ss, false);
                assert_eq!(want, check, "{kernel} encrypt_to ss={ss}");
                let mut backing = vec![0xeeu8; plain.len() + 128];
                let aligned = backing.as_ptr().align_offset(32);
                for off in [aligned, aligned + 32, aligned + 8, aligned + 1] {
                    backing.fill(0xee);
                    let end = off + plain.len();
                    xts.encrypt_sectors_for_device(&plain, &mut backing[off..end], first, ss)
                        .unwrap();
                    assert_eq!(&backing[off..end], &want[..], "{kernel} ss={ss} n={nsec} off={off}");
                    assert!(backing[..off].iter().chain(&backing[end..]).all(|&b| b == 0xee));
                }
            }
        }
    }
}

#[test]
fn unaligned_buffers_work_on_every_kernel() {
    let mut r = rng();
    let k = key(&mut r);
    for kernel in Kernel::available() {
        let xts = Xts::with_kernel(&k, kernel).unwrap();
        for shift in [1usize, 3, 8, 15, 31] {
            let mut backing = vec![0u8; 4096 * 2 + 64];
            r.fill_bytes(&mut backing);
            let plain = backing[shift..shift + 8192].to_vec();
            let mut want = plain.clone();
            reference(&k, &mut want, 77, 4096, false);
            xts.encrypt_sectors(&mut backing[shift..shift + 8192], 77, 4096)
                .unwrap();
            assert_eq!(&backing[shift..shift + 8192], &want[..], "{kernel} shift {shift}");
        }
    }
}

#[test]
fn consecutive_sectors_get_different_ciphertext() {
    let k = key(&mut rng());
    for kernel in Kernel::available() {
        let xts = Xts::with_kernel(&k, kernel).unwrap();
        for &ss in &SECTOR_SIZES {
            let mut a = vec![0x42u8; ss];
            let mut b = a.clone();
            xts.encrypt_sectors(&mut a, 1000, ss).unwrap();
            xts.encrypt_sectors(&mut b, 1001, ss).unwrap();
            assert_ne!(a, b);
            // Same plaintext in two sectors of one call also differs.
            let mut two = vec![0x42u8; 2 * ss];
            xts.encrypt_sectors(&mut two, 1000, ss).unwrap();
            assert_eq!(&two[..ss], &a[..]);
            assert_eq!(&two[ss..], &b[..]);
        }
    }
}

#[test]
fn out_of_place_leaves_source_untouched() {
    let mut r = rng();
    let xts = Xts::new(&key(&mut r)).unwrap();
    let mut src = vec![0u8; 8192];
    r.fill_bytes(&mut src);
    let copy = src.clone();
    let mut dst = vec![0u8; 8192];
    xts.encrypt_sectors_to(&src, &mut dst, 5, 512).unwrap();
    assert_eq!(src, copy);
    assert_ne!(dst, src);
}

#[test]
fn equal_key_halves_are_refused() {
    let mut k = [7u8; 64];
    for kernel in Kernel::available() {
        let e = Xts::with_kernel(&k, kernel).unwrap_err();
        assert!(matches!(e, XtsError::EqualKeyHalves));
        assert!(e.to_string().contains("halves"));
    }
    k[63] = 8;
    assert!(Xts::new(&k).is_ok());
}

#[test]
fn bad_arguments_are_refused_and_change_nothing() {
    let mut r = rng();
    let xts = Xts::new(&key(&mut r)).unwrap();
    let mut buf = vec![0xa5u8; 4096];
    for ss in [0usize, 16, 256, 513, 8192] {
        assert!(matches!(xts.encrypt_sectors(&mut buf, 0, ss), Err(XtsError::BadSectorSize(s)) if s == ss));
    }
    assert!(matches!(
        xts.encrypt_sectors(&mut buf[..1000], 0, 512),
        Err(XtsError::BadLength {
            len: 1000,
            sector_size: 512
        })
    ));
    let src = vec![0u8; 1024];
    assert!(matches!(
        xts.encrypt_sectors_to(&src, &mut buf, 0, 512),
        Err(XtsError::LengthMismatch { src: 1024, dst: 4096 })
    ));
    assert!(matches!(
        xts.decrypt_sectors(&mut buf, u64::MAX - 2, 512),
        Err(XtsError::SectorOverflow { .. })
    ));
    assert!(matches!(
        xts.encrypt_data_unit(&mut buf[..15], &[0; 16]),
        Err(XtsError::DataUnitTooShort(15))
    ));
    assert!(buf.iter().all(|&b| b == 0xa5), "a refused call modified the buffer");
    // The last representable sectors are fine.
    xts.encrypt_sectors(&mut buf, u64::MAX - 7, 512).unwrap();
    // Empty buffers are a no-op.
    xts.encrypt_sectors(&mut [], 0, 512).unwrap();
}

#[test]
fn debug_output_shows_no_key_material() {
    let k: [u8; 64] = core::array::from_fn(|i| 0xc0 ^ i as u8);
    let xts = Xts::new(&k).unwrap();
    let d = format!("{xts:?}");
    assert!(d.contains("kernel"));
    for w in k.windows(4) {
        assert!(!d.contains(&hex::encode(w)));
        assert!(!d.contains(&format!("{}, {}, {}, {}", w[0], w[1], w[2], w[3])));
    }
}

/// Runs of 512-byte sectors long enough to cross the VAES kernel's chunks
/// (63 sectors per call of its sector loop, tweak values encrypted sixteen at
/// a time), odd and even counts, first sectors that cross 2^32 and 2^63 and
/// runs that end on the last sector number (2^64 − 1): in place, out of
/// place and device-bound (streaming stores), both directions, on every
/// kernel, against the `xts-mode` crate. Larger sector sizes at the chunk
/// edges too.
#[test]
fn long_sector_runs_across_batch_edges_match_xts_mode_crate() {
    let mut r = rng();
    let counts = [
        1usize, 2, 3, 5, 15, 16, 17, 31, 32, 33, 62, 63, 64, 65, 126, 127, 128, 129, 190, 257,
    ];
    for kernel in Kernel::available() {
        let k = key(&mut r);
        let xts = Xts::with_kernel(&k, kernel).unwrap();
        for (ss, counts) in [
            (512usize, &counts[..]),
            (1024, &[62, 63, 64, 65][..]),
            (4096, &[63, 64, 65][..]),
        ] {
            for &nsec in counts {
                for first in [0u64, 0xffff_ffc0, 0x7fff_ffff_ffff_ffe0, u64::MAX - nsec as u64 + 1] {
                    let what = format!("{kernel} ss={ss} n={nsec} first={first:#x}");
                    let mut plain = vec![0u8; ss * nsec];
                    r.fill_bytes(&mut plain);
                    let mut want = plain.clone();
                    reference(&k, &mut want, first, ss, false);

                    let mut got = plain.clone();
                    xts.encrypt_sectors(&mut got, first, ss).unwrap();
                    assert!(got == want, "{what}: encrypt in place");

                    let mut backing = vec![0xeeu8; plain.len() + 64];
                    let off = backing.as_ptr().align_offset(32);
                    let end = off + plain.len();
                    xts.encrypt_sectors_for_device(&plain, &mut backing[off..end], first, ss)
                        .unwrap();
                    assert!(backing[off..end] == want[..], "{what}: device-bound encrypt");
                    assert!(backing[..off].iter().chain(&backing[end..]).all(|&b| b == 0xee));

                    let mut back = vec![0u8; plain.len()];
                    xts.decrypt_sectors_to(&want, &mut back, first, ss).unwrap();
                    assert!(back == plain, "{what}: decrypt out of place");
                    let mut dec_ref = want.clone();
                    reference(&k, &mut dec_ref, first, ss, true);
                    assert!(dec_ref == plain, "{what}: reference round trip");
                    xts.decrypt_sectors(&mut got, first, ss).unwrap();
                    assert!(got == plain, "{what}: decrypt in place");
                }
            }
        }
    }
}
