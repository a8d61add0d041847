//! The fuzz targets of `fuzz/` on the stable toolchain: each target function is driven
//! with a few hundred thousand seeded (deterministic) random and mutated inputs, built
//! from valid seeds, so CI exercises the same invariants libFuzzer checks. A failure
//! prints the input (hex) and the seed to replay it.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use sealdisk::testing::nbd::*;

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Interesting values for integers in headers.
const EDGES: [u64; 10] = [0, 1, 511, 512, 4095, 4096, 1 << 20, u32::MAX as u64, 1 << 63, u64::MAX];

/// One libFuzzer-style mutation of `v`.
fn mutate(r: &mut Rng, v: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    match r.below(9) {
        0 if !v.is_empty() => {
            let i = r.below(v.len());
            v[i] ^= 1 << r.below(8);
        }
        1 if !v.is_empty() => {
            let i = r.below(v.len());
            v[i] = r.next() as u8;
        }
        2 => {
            let i = r.below(v.len() + 1);
            let n = 1 + r.below(8);
            let ins = r.bytes(n);
            v.splice(i..i, ins);
        }
        3 if !v.is_empty() => {
            let i = r.below(v.len());
            let n = 1 + r.below(v.len() - i);
            v.drain(i..i + n);
        }
        4 => v.truncate(r.below(v.len() + 1)),
        5 if v.len() >= 8 => {
            // An edge value, big-endian, at a random place.
            let e = EDGES[r.below(EDGES.len())].to_be_bytes();
            let w = [1usize, 2, 4, 8][r.below(4)];
            let i = r.below(v.len() - w + 1);
            v[i..i + w].copy_from_slice(&e[8 - w..]);
        }
        6 => {
            // Splice with another seed.
            let o = &seeds[r.below(seeds.len())];
            let cut = r.below(v.len() + 1);
            let from = r.below(o.len() + 1);
            v.truncate(cut);
            v.extend_from_slice(&o[from..]);
        }
        7 if !v.is_empty() => {
            // Duplicate a chunk (repeated frames, batches).
            let i = r.below(v.len());
            let n = 1 + r.below((v.len() - i).min(64));
            let c = v[i..i + n].to_vec();
            v.extend_from_slice(&c);
        }
        _ => {
            let n = r.below(64);
            *v = r.bytes(n);
        }
    }
}

/// Runs `target` on `n` inputs: the seeds, then mutants (1-4 mutations each).
fn drive(name: &str, seed: u64, n: usize, seeds: &[Vec<u8>], target: fn(&[u8])) {
    let mut r = Rng(seed);
    let run = |input: &[u8], i: usize| {
        let res = std::panic::catch_unwind(|| target(input));
        if res.is_err() {
            panic!(
                "{name}: input #{i} (seed {seed:#x}) failed: {}",
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
    };
    for (i, s) in seeds.iter().enumerate() {
        run(s, i);
    }
    for i in 0..n {
        let mut v = seeds[r.below(seeds.len())].clone();
        for _ in 0..1 + r.below(4) {
            mutate(&mut r, &mut v, seeds);
        }
        run(&v, i);
    }
}

fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    encode_request(&Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    })
    .to_vec()
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

#[test]
fn nbd_request_survives_random_and_mutated_headers() {
    let seeds = vec![
        request(0, CMD_READ, 1, 0, 4096),
        request(CMD_FLAG_FUA, CMD_WRITE, u64::MAX, 4096, 512 << 10),
        request(0, CMD_FLUSH, 7, 0, 0),
        request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 9, 1 << 20, 1 << 20),
        request(0, CMD_TRIM, 3, (8 << 20) - 4096, 4096),
        request(0, CMD_DISC, 0, 0, 0),
        request(0, CMD_READ, 2, u64::MAX - 4095, u32::MAX),
        [request(0, CMD_READ, 1, 0, 4096), request(0, CMD_WRITE, 2, 0, 8)].concat(),
        vec![0x25, 0x60, 0x95],
    ];
    drive("nbd_request", 0x5eed_0001, 300_000, &seeds, targets::nbd_request);
}

/// Meta context option data: export name and queries.
fn meta(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

#[test]
fn nbd_option_survives_random_and_mutated_frames() {
    let go = info(b"d-0123456789abcdef", &[INFO_BLOCK_SIZE, INFO_NAME]);
    let seeds = vec![
        option(OPT_GO, &go),
        option(OPT_INFO, &info(b"", &[])),
        [
            option(OPT_LIST, &[]),
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_GO, &go),
        ]
        .concat(),
        option(OPT_EXPORT_NAME, b"disk"),
        option(OPT_ABORT, &[]),
        option(OPT_INFO, &info(&[0xff; 40], &[INFO_DESCRIPTION; 3])),
        go.clone(),
        info(b"x", &[0, 1, 2, 3]),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec(),
        option(
            OPT_SET_META_CONTEXT,
            &meta(b"d-0123456789abcdef", &[META_BASE_ALLOCATION]),
        ),
        option(OPT_LIST_META_CONTEXT, &meta(b"d", &[b"base:", b"qemu:dirty-bitmap:b"])),
    ];
    drive("nbd_option", 0x5eed_0002, 200_000, &seeds, targets::nbd_option);
}

#[test]
fn jsonrpc_line_survives_random_and_mutated_lines() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"jsonrpc":"2.0","id":1,"method":"DescribeDisks","params":{"AccountId":"acct1"}}"#,
        r#"{"jsonrpc":"2.0","id":"x","method":"CreateDisk","params":{"AccountId":"a","RegionId":"r","Size":"20","Encrypted":"true"}}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"CreateInstance","params":{"AccountId":"a","SystemDisk.SizeBytes":4096,"DataDisk.1.Size":20,"DataDisk.2.Encrypted":true}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"M","params":{"AccountId":"a","DataDisk":[{"Size":1}],"SystemDisk":{"Category":"ssd"},"DiskIds":"[\"d-1\",\"d-2\"]"}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"M","params":{"AccountId":"a","AddAccount.1":"b","AddAccount.2":"c","KMSKeyId":"k"}}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"A","params":{"AccountId":"a"}},{"jsonrpc":"2.0","method":"N"}]"#,
        r#"{"jsonrpc":"2.0","method":"Notify","params":{"AccountId":"a"}}"#,
        r#"{"jsonrpc":"2.0","id":null,"method":"M","params":[1,2]}"#,
        r#"{"jsonrpc":"1.0","id":{},"method":5}"#,
        r#"[]"#,
        r#"{"jsonrpc":"2.0","id":5,"method":"M","params":{"AccountId":"a","SizeBytes":"18446744073709551615","DiskIds":"a,,b"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    drive("jsonrpc_line", 0x5eed_0003, 100_000, &seeds, targets::jsonrpc_line);
}

/// A descriptor, little-endian, as it sits in a table.
fn vq_desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&next.to_le_bytes());
    v
}

/// A vhost_chain input: head 0, a valid read chain (header at 4096, data in the second
/// region, status at 4200), the rest of the table zero, then the header bytes.
fn vq_seed(ty: u32, data_flags: u16) -> Vec<u8> {
    let mut v = vec![0u8, 0];
    v.extend(vq_desc(4096, 16, 1, 1));
    v.extend(vq_desc(128 << 10, 4096, 1 | data_flags, 2));
    v.extend(vq_desc(4200, 1, 2, 0));
    v.resize(2 + 16 * 16, 0);
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&8u64.to_le_bytes());
    v
}

#[test]
fn vhost_chain_survives_random_and_mutated_tables() {
    let seeds = vec![
        vq_seed(0, 2),
        vq_seed(1, 0),
        vq_seed(4, 0),
        vq_seed(8, 2),
        vq_seed(11, 0),
        vq_seed(99, 0),
    ];
    drive("vhost_chain", 0x7607, 60_000, &seeds, targets::vhost_chain);
}

#[test]
fn targets_accept_their_own_seeds_as_valid() {
    // The invariants are not vacuous: valid inputs take the "accepted" branches.
    assert!(matches!(parse_request(&request(0, CMD_READ, 1, 0, 4096)), Some(Ok(_))));
    let f = option(OPT_GO, &info(b"d", &[INFO_NAME]));
    let fr = parse_option(&f, 1024).unwrap().unwrap();
    assert_eq!((fr.opt, fr.used), (OPT_GO, f.len()));
    assert!(parse_info_request(fr.data).is_some());
    let m = parse_meta_request(&meta(b"d", &[META_BASE_ALLOCATION])).unwrap();
    assert_eq!(
        (m.name, m.queries),
        (b"d".to_vec(), vec![META_BASE_ALLOCATION.to_vec()])
    );
    assert_eq!(parse_option(&f[..f.len() - 1], 1024), None);
    assert!(matches!(parse_option(&f, 2), Some(Err(BadOption::TooLong(_)))));
    let out = sealdisk::testing::rpc::handle_line(
        &targets::ParamsOnly,
        br#"{"jsonrpc":"2.0","id":1,"method":"M","params":{"AccountId":"a","DataDisk.1.Size":20}}"#,
        &mut |_| {},
    )
    .unwrap();
    assert!(out.contains(r#""DataDisks":1"#), "{out}");
    // A valid read chain parses as a read of 4096 bytes at sector 8; the same chain
    // with a device-readable data buffer (a write) is a write; a read-only data buffer
    // under a read header is refused.
    use sealdisk::testing::vhost::Kind;
    assert_eq!(targets::vhost_chain_parsed(&vq_seed(0, 2)), Some((Kind::Read, 8, 4096)));
    assert_eq!(
        targets::vhost_chain_parsed(&vq_seed(1, 0)),
        Some((Kind::Write, 8, 4096))
    );
    assert_eq!(targets::vhost_chain_parsed(&vq_seed(0, 0)), None);
    assert_eq!(
        targets::vhost_chain_parsed(&vq_seed(99, 0)),
        Some((Kind::Unsupported(99), 8, 0))
    );
}
