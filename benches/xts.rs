//! `cargo bench --bench xts`: every XTS kernel × {512, 4096} × {encrypt,
//! decrypt}, side by side with the baselines: the `aes` crate's ECB over the
//! same buffer (the practical ceiling) and the `xts-mode` crate (the naive
//! choice). `sealdisk bench crypto` measures the same in one quick run.

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sealdisk::{Kernel, Xts};

const BUF: usize = 64 * 1024;

fn key() -> [u8; 64] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(3))
}

fn xts(c: &mut Criterion) {
    let key = key();
    let mut g = c.benchmark_group("xts-aes-256");
    g.throughput(Throughput::Bytes(BUF as u64));
    let mut buf = vec![0x5au8; BUF];

    let ecb = Aes256::new_from_slice(&key[..32]).unwrap();
    let mut blocks = vec![Block::default(); BUF / 16];
    g.bench_function("baseline/aes-ecb", |b| b.iter(|| ecb.encrypt_blocks(&mut blocks)));

    for kernel in Kernel::available() {
        let x = Xts::with_kernel(&key, kernel).unwrap();
        for ss in [512usize, 4096] {
            g.bench_with_input(BenchmarkId::new(format!("{kernel}/encrypt"), ss), &ss, |b, &ss| {
                b.iter(|| x.encrypt_sectors(&mut buf, 0, ss).unwrap())
            });
            g.bench_with_input(BenchmarkId::new(format!("{kernel}/decrypt"), ss), &ss, |b, &ss| {
                b.iter(|| x.decrypt_sectors(&mut buf, 0, ss).unwrap())
            });
        }
    }

    let naive = xts_mode::Xts128::new(
        Aes256::new_from_slice(&key[..32]).unwrap(),
        Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    for ss in [512usize, 4096] {
        g.bench_with_input(BenchmarkId::new("baseline/xts-mode/encrypt", ss), &ss, |b, &ss| {
            b.iter(|| naive.encrypt_area(&mut buf, ss, 0, xts_mode::get_tweak_default))
        });
        g.bench_with_input(BenchmarkId::new("baseline/xts-mode/decrypt", ss), &ss, |b, &ss| {
            b.iter(|| naive.decrypt_area(&mut buf, ss, 0, xts_mode::get_tweak_default))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = xts
}
criterion_main!(benches);
