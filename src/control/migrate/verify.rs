//! `Verify`: both sides of a migration read again and compared block by block.

use super::source::Source;
use super::{BLOCK, WINDOW};
use crate::bdev::BdevRef;
use crate::control::copy::io_error;
use crate::control::job::{read_ops, run_job};
use crate::control::ControlError;
use crate::reactor::Reactors;

/// Re-reads both sides through their data paths and compares CRC32C per 4 KiB block;
/// the first difference fails with its offset. Read are the source's data extents and
/// the target's allocated ranges (`target_ranges`); a block outside both is zero on both
/// sides by their maps. Each window done counts as progress of `task`.
#[allow(clippy::too_many_arguments)]
pub(super) fn verify_blocks(
    reactors: &Reactors,
    source: &mut Source,
    dst: &BdevRef,
    target_ranges: &[(u64, u64)],
    rounded: u64,
    size: u64,
    cancelled: &dyn Fn() -> bool,
    progress: &dyn Fn(u64),
) -> Result<(), ControlError> {
    let zero = crc32c::crc32c(&[0u8; BLOCK as usize]);
    let mut win = 0;
    while win < rounded {
        if cancelled() {
            return Err(ControlError::state("OperationCancelled", "verify cancelled"));
        }
        let wlen = WINDOW.min(rounded - win);
        let nblocks = (wlen / BLOCK) as usize;
        let mut want = vec![zero; nblocks];
        let mut read = vec![false; nblocks];
        for (o, n) in source.extents(win, wlen, size)? {
            let data = source.read(reactors, o, n, size)?;
            for (i, b) in data.chunks(BLOCK as usize).enumerate() {
                let k = ((o - win) / BLOCK) as usize + i;
                want[k] = crc32c::crc32c(b);
                read[k] = true;
            }
        }
        for &(o, n) in target_ranges {
            let (s, e) = (o.max(win), (o + n).min(win + wlen));
            for k in (s..e).step_by(BLOCK as usize) {
                read[((k - win) / BLOCK) as usize] = true;
            }
        }
        // Read the target where either side has something, in runs.
        let mut k = 0;
        while k < nblocks {
            if !read[k] {
                k += 1;
                continue;
            }
            let start = k;
            while k < nblocks && read[k] {
                k += 1;
            }
            let off = win + start as u64 * BLOCK;
            let len = (k - start) as u64 * BLOCK;
            let got = run_job(reactors, dst, read_ops(off, len), vec![0; len as usize])
                .map_err(|e| io_error(e, "reading the target to verify"))?;
            for (i, b) in got.chunks(BLOCK as usize).enumerate() {
                if crc32c::crc32c(b) != want[start + i] {
                    let at = off + i as u64 * BLOCK;
                    return Err(ControlError::state(
                        "Migration.VerifyFailed",
                        format!(
                            "verify: the target differs from the source at offset {at} (block of {BLOCK} bytes); \
                             the migration is kept: abandon it (Abandon=true) and start again"
                        ),
                    ));
                }
            }
        }
        progress(wlen);
        win += wlen;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::job::Op;
    use std::sync::Arc;

    fn write(reactors: &Reactors, b: &BdevRef, off: u64, data: Vec<u8>) {
        let len = data.len();
        run_job(
            reactors,
            b,
            vec![Op::Write {
                offset: off,
                at: 0,
                len,
            }],
            data,
        )
        .unwrap();
    }

    #[test]
    fn verify_names_the_first_differing_block() {
        use crate::bdev::malloc::MallocBdev;
        use crate::reactor::ReactorConfig;
        let reactors = Reactors::start(&ReactorConfig {
            cores: vec![0],
            pool_bytes: 16 << 20,
            ..ReactorConfig::default()
        })
        .unwrap();
        let size = 1u64 << 20;
        let src: BdevRef = Arc::new(MallocBdev::new("src", size, 512));
        let dst: BdevRef = Arc::new(MallocBdev::new("dst", size, 512));
        let pattern = |n: usize, seed: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
                .collect::<Vec<u8>>()
        };
        for b in [&src, &dst] {
            write(&reactors, b, 0, pattern(64 << 10, 3));
            write(&reactors, b, 512 << 10, pattern(8 << 10, 9));
        }
        let ranges = vec![(0, 64 << 10), (512 << 10, 8 << 10)];
        let mut source = Source::Disk {
            bdev: src.clone(),
            ranges: ranges.clone(),
        };
        let never = || false;
        let done = std::cell::Cell::new(0u64);
        let progress = |n: u64| done.set(done.get() + n);
        verify_blocks(&reactors, &mut source, &dst, &ranges, size, size, &never, &progress).unwrap();
        assert_eq!(done.get(), size);

        // One byte off inside the data: named by its block.
        let mut sector = pattern(64 << 10, 3)[12288..12288 + 512].to_vec();
        sector[57] ^= 0x40;
        write(&reactors, &dst, 12288, sector);
        let e = verify_blocks(&reactors, &mut source, &dst, &ranges, size, size, &never, &progress).unwrap_err();
        assert_eq!(e.code(), "Migration.VerifyFailed");
        assert!(e.to_string().contains("offset 12288 "), "{e}");

        // Repaired; then data on the target where the source has a hole (the target's
        // map says it is allocated there).
        write(
            &reactors,
            &dst,
            12288,
            pattern(64 << 10, 3)[12288..12288 + 4096].to_vec(),
        );
        verify_blocks(&reactors, &mut source, &dst, &ranges, size, size, &never, &progress).unwrap();
        write(&reactors, &dst, 900 << 10, vec![1u8; 4096]);
        let with_target = [ranges.clone(), vec![(768 << 10, 256 << 10)]].concat();
        let e = verify_blocks(
            &reactors,
            &mut source,
            &dst,
            &with_target,
            size,
            size,
            &never,
            &progress,
        )
        .unwrap_err();
        assert!(e.to_string().contains(&format!("offset {} ", 900 << 10)), "{e}");

        // Cancelled: stops.
        let e = verify_blocks(&reactors, &mut source, &dst, &ranges, size, size, &|| true, &progress).unwrap_err();
        assert_eq!(e.code(), "OperationCancelled");
    }
}
