//! The bodies of sealdisk's fuzz targets: the parsers that face the network.
//!
//! Each function takes arbitrary bytes, runs them through a parser, and asserts the
//! parser's invariants (no panic is the first one). They are plain functions, so they
//! run both under libFuzzer (`fuzz_targets/*.rs`, `cargo fuzz run <name>`) and on the
//! stable toolchain from `tests/fuzz_smoke.rs`, which includes this file and drives it
//! with seeded random and mutated inputs in CI.
//!
//! * [`nbd_request`] checks `proto::parse_request` (transmission request headers) and the
//!   range check every request goes through (`proto::check_range`).
//! * [`nbd_option`] checks the handshake's option frames (`proto::parse_option_header` /
//!   `parse_option`, as `negotiate` reads them) and `NBD_OPT_INFO`/`GO` data
//!   (`proto::parse_info_request`) and meta context data (`proto::parse_meta_request`).
//! * [`vhost_chain`] checks the vhost-user-blk chain walker and parser
//!   (`frontend::vhost::request::{walk, parse}`) over a descriptor table the input
//!   writes into a guest memory with a hole in it.
//! * [`jsonrpc_line`] checks `control::rpc::handle_line` (JSON-RPC 2.0 framing of one line)
//!   with a handler that runs the ECS parameter readers (`control::Params`) the way the
//!   operations do, without a catalog, pool or KMS behind them.

use serde_json::{json, Value};

use sealdisk::testing::nbd::MAX_OPTION_DATA;
use sealdisk::testing::nbd::{
    check_range, encode_request, parse_info_request, parse_option, parse_option_header, parse_request, BadMagic,
    BadOption, OptionFrame, Request, EINVAL, ENOSPC, IHAVEOPT, OPTION_HEADER_LEN, OPT_GO, OPT_INFO,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, REQUEST_LEN, REQUEST_MAGIC,
};
use sealdisk::testing::rpc::Params;
use sealdisk::testing::rpc::{handle_line, Handler, LogLine};
use sealdisk::ControlError;

/// Device geometries the range check is exercised with: (block size, capacity).
const GEOMETRIES: [(u64, u64); 4] = [(512, 1 << 30), (4096, 8 << 20), (4096, !4095), (4096, 0)];

/// One NBD transmission request header.
pub fn nbd_request(data: &[u8]) {
    let parsed = parse_request(data);
    if data.len() < REQUEST_LEN {
        assert_eq!(parsed, None, "a short header must wait for more bytes");
        return;
    }
    // Never reads past the header: the bytes after it do not matter.
    assert_eq!(parsed, parse_request(&data[..REQUEST_LEN]));
    match parsed {
        None => panic!("{} bytes are a whole header", data.len()),
        Some(Err(BadMagic(m))) => {
            assert_ne!(m, REQUEST_MAGIC);
            assert_eq!(m.to_be_bytes(), data[..4]);
        }
        Some(Ok(r)) => {
            // An accepted request re-encodes to the same bytes.
            assert_eq!(encode_request(&r)[..], data[..REQUEST_LEN]);
            check_request(&r);
        }
    }
}

/// The range check against several geometries, against its specification.
fn check_request(r: &Request) {
    let len = r.len as u64;
    for (bs, cap) in GEOMETRIES {
        let aligned = r.offset.is_multiple_of(bs) && len.is_multiple_of(bs);
        let inside = r.offset.checked_add(len).is_some_and(|end| end <= cap);
        match check_range(r, bs, cap, ENOSPC) {
            Ok(()) => assert!(aligned && inside, "{r:?} accepted on ({bs}, {cap})"),
            Err(EINVAL) => assert!(!aligned, "{r:?} refused as misaligned on ({bs}, {cap})"),
            Err(e) => {
                assert_eq!(e, ENOSPC);
                assert!(aligned && !inside, "{r:?} refused as past the end on ({bs}, {cap})");
            }
        }
    }
    // A zero block size never divides by zero.
    assert_eq!(check_range(r, 0, u64::MAX, ENOSPC), Err(EINVAL));
}

/// A stream of NBD handshake option frames, each one's data also parsed as
/// `NBD_OPT_INFO`/`GO` data; then the whole input as such data.
pub fn nbd_option(data: &[u8]) {
    // The server's limit, and a small one so that "too long" is reached often.
    for max in [MAX_OPTION_DATA, 32] {
        let mut rest = data;
        loop {
            let hdr = parse_option_header(rest, max);
            match parse_option(rest, max) {
                None => {
                    // Incomplete: either the header or the data is still missing.
                    match hdr {
                        None => assert!(rest.len() < OPTION_HEADER_LEN),
                        Some(Ok((_, len))) => assert!(rest.len() < OPTION_HEADER_LEN + len as usize),
                        Some(Err(e)) => panic!("header refused ({e:?}) but frame incomplete"),
                    }
                    break;
                }
                Some(Err(e)) => {
                    assert_eq!(hdr, Some(Err(e)));
                    match e {
                        BadOption::Magic(m) => {
                            assert_ne!(m, IHAVEOPT);
                            assert_eq!(m.to_be_bytes(), rest[..8]);
                        }
                        BadOption::TooLong(n) => assert!(n > max),
                    }
                    break;
                }
                Some(Ok(OptionFrame { opt, data: d, used })) => {
                    assert_eq!(hdr, Some(Ok((opt, d.len() as u32))));
                    assert!(d.len() as u32 <= max);
                    assert_eq!(used, OPTION_HEADER_LEN + d.len());
                    assert_eq!(&rest[OPTION_HEADER_LEN..used], d);
                    if opt == OPT_INFO || opt == OPT_GO {
                        info_request(d);
                    }
                    if opt == OPT_LIST_META_CONTEXT || opt == OPT_SET_META_CONTEXT {
                        meta_request(d);
                    }
                    rest = &rest[used..];
                }
            }
        }
    }
    info_request(data);
    meta_request(data);
}

/// `NBD_OPT_LIST/SET_META_CONTEXT` data: accepted data re-encodes to exactly the input.
fn meta_request(d: &[u8]) {
    let Some(r) = sealdisk::testing::nbd::parse_meta_request(d) else {
        return;
    };
    let mut enc = Vec::with_capacity(d.len());
    enc.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    enc.extend_from_slice(&r.name);
    enc.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        enc.extend_from_slice(&(q.len() as u32).to_be_bytes());
        enc.extend_from_slice(q);
    }
    assert_eq!(enc, d, "accepted meta context data must account for every byte");
}

/// `NBD_OPT_INFO`/`GO` data: accepted data re-encodes to exactly the input.
fn info_request(d: &[u8]) {
    let Some(r) = parse_info_request(d) else {
        return;
    };
    let mut enc = Vec::with_capacity(d.len());
    enc.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    enc.extend_from_slice(&r.name);
    enc.extend_from_slice(&(r.infos.len() as u16).to_be_bytes());
    for i in &r.infos {
        enc.extend_from_slice(&i.to_be_bytes());
    }
    assert_eq!(enc, d, "accepted INFO/GO data must account for every byte");
}

/// A stand-in for the control plane: reads parameters the way the ECS operations do
/// (strings, booleans, sizes, lists, nested and repeated groups, unknown-parameter
/// refusal), so the fuzzer reaches `Params` without a catalog behind it.
pub struct ParamsOnly;

impl Handler for ParamsOnly {
    fn call(&self, method: &str, params: Value) -> Result<Value, ControlError> {
        let mut p = Params::new(params)?;
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let size = p.size()?;
        let ids = p.opt_str_list("DiskIds")?;
        let add = p.opt_str_list("AddAccount")?;
        let enc = p.opt_bool("Encrypted")?;
        let n = p.opt_u64("MaxResults")?;
        p.refuse_kms_key_id()?;
        let mut sys = p.group("SystemDisk")?;
        let sys_size = sys.size()?;
        let _ = sys.opt_str("Category")?;
        sys.finish()?;
        let mut disks = 0;
        for mut g in p.indexed("DataDisk")? {
            let _ = g.size()?;
            let _ = g.opt_bool("Encrypted")?;
            let _ = g.opt_str("SnapshotId")?;
            g.refuse_kms_key_id()?;
            g.finish()?;
            disks += 1;
        }
        p.finish()?;
        Ok(json!({
            "Method": method, "AccountId": account, "RegionId": region, "Size": size, "DiskIds": ids,
            "AddAccount": add, "Encrypted": enc, "MaxResults": n, "SystemDiskSize": sys_size, "DataDisks": disks,
        }))
    }
}

/// One line of JSON-RPC input: the reply (if any) is one line of JSON-RPC 2.0.
pub fn jsonrpc_line(data: &[u8]) {
    let mut logged = 0usize;
    let mut log = |l: LogLine| {
        assert!(!l.code.is_empty());
        logged += 1;
    };
    let Some(out) = handle_line(&ParamsOnly, data, &mut log) else {
        return; // notifications only
    };
    assert!(!out.contains('\n'), "a reply is one line");
    let v: Value = serde_json::from_str(&out).expect("the reply is JSON");
    match v {
        Value::Array(a) => {
            assert!(!a.is_empty(), "an empty batch reply is sent as nothing");
            assert!(
                a.len() <= logged.max(1) + count_requests(data),
                "more replies than requests"
            );
            a.iter().for_each(check_reply);
        }
        other => check_reply(&other),
    }
}

fn count_requests(data: &[u8]) -> usize {
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Array(a)) => a.len(),
        _ => 1,
    }
}

fn check_reply(v: &Value) {
    assert_eq!(v["jsonrpc"], "2.0", "{v}");
    assert!(v.get("id").is_some(), "{v}");
    match (v.get("result"), v.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            let code = e["code"].as_i64().expect("error.code is a number");
            assert!([-32700, -32600, -32601, -32602, -32603, -32000].contains(&code), "{v}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert!(e["data"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
        }
        _ => panic!("a reply has exactly one of result and error: {v}"),
    }
}

/// Guest memory for [`vhost_chain`]: two regions with a hole between them.
const VQ_REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];
/// Entries of the fuzzed descriptor table (at GPA 0).
const VQ_SIZE: u16 = 16;

fn vq_mem() -> vm_memory::GuestMemoryMmap {
    let ranges: Vec<_> = VQ_REGIONS
        .iter()
        .map(|&(a, l)| (vm_memory::GuestAddress(a), l))
        .collect();
    vm_memory::GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory")
}

/// One descriptor table: input bytes 0..2 are the head index, the next
/// `16 * VQ_SIZE` the table at GPA 0, the rest guest memory from GPA 4096 on
/// (headers the descriptors may point at). The chain is walked as a replayed
/// chain would be, then parsed.
pub fn vhost_chain(data: &[u8]) {
    let _ = vhost_chain_parsed(data);
}

/// [`vhost_chain`], returning what an accepted chain asks for: (kind, sector, data bytes).
pub fn vhost_chain_parsed(data: &[u8]) -> Option<(sealdisk::testing::vhost::Kind, u64, u64)> {
    use sealdisk::testing::vhost::{parse, walk, Kind};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    if data.len() < 2 {
        return None;
    }
    let mem = vq_mem();
    let head = u16::from_le_bytes([data[0], data[1]]);
    let table = &data[2..data.len().min(2 + 16 * VQ_SIZE as usize)];
    mem.write_slice(table, GuestAddress(0)).unwrap();
    if data.len() > 2 + table.len() {
        let rest = &data[2 + table.len()..];
        let n = rest.len().min(60 << 10);
        mem.write_slice(&rest[..n], GuestAddress(4096)).unwrap();
    }
    let (descs, ended) = walk(&mem, 0, VQ_SIZE, head);
    assert!(
        descs.len() <= 2 * VQ_SIZE as usize,
        "a walk is bounded by the table sizes"
    );
    if head >= VQ_SIZE {
        assert!(descs.is_empty() && !ended, "a head past the queue yields nothing");
    }
    // Host ranges of the mapped regions: every pointer the parser returns lies in one.
    let host: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| {
            let p = r.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap() as usize;
            (p, p + r.len() as usize)
        })
        .collect();
    let inside = |p: *mut u8, len: usize| host.iter().any(|&(a, b)| (p as usize) >= a && (p as usize) + len <= b);
    match parse(&mem, &descs, ended) {
        Ok(req) => {
            assert!(ended, "only a chain that ended is accepted");
            assert!(descs.len() >= 2);
            assert!(inside(req.status, 1), "the status byte lies in guest memory");
            let sum: u64 = req.data.iter().map(|s| s.len as u64).sum();
            assert_eq!(sum, req.data_len);
            for s in &req.data {
                assert!(
                    s.len > 0 && inside(s.ptr, s.len as usize),
                    "a data segment outside guest memory"
                );
            }
            let mut hdr = [0u8; 16];
            mem.read_slice(&mut hdr, descs[0].addr()).unwrap();
            let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            assert_eq!(req.sector, u64::from_le_bytes(hdr[8..16].try_into().unwrap()));
            match req.kind {
                Kind::Read | Kind::Write => assert!(req.data_len > 0 && req.data_len % 512 == 0),
                Kind::Unsupported(t) => assert_eq!(t, ty),
                _ => {}
            }
            assert!(!descs[0].is_write_only(), "the header is device-readable");
            assert!(descs.last().unwrap().is_write_only(), "the status is device-writable");
            Some((req.kind, req.sector, req.data_len))
        }
        Err(r) => {
            if let Some(p) = r.status {
                assert!(ended, "a chain that never ended gets no status byte");
                assert!(inside(p, 1));
            }
            None
        }
    }
}
