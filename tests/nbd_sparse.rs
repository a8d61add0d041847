//! Sparse-aware NBD: structured replies (`NBD_OPT_STRUCTURED_REPLY`) and `base:allocation`
//! block status from the volume map. Real clients see the disk's holes: `nbdinfo --map`,
//! `qemu-img map`, and `qemu-img convert` / `nbdcopy` copy it into a sparse file with the
//! same bytes. A raw client checks the protocol: the meta-context options, one data chunk
//! per read (so `NBD_CMD_FLAG_DF` holds), structured errors for reads, block status with
//! and without `NBD_CMD_FLAG_REQ_ONE`, and block status refused where it was not negotiated.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use common::{Daemon, TempDir};
use sealdisk::testing::nbd::*;

const BIN: &str = env!("CARGO_BIN_EXE_sealdisk");
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A daemon with one attached encrypted disk of 64 MiB holding 1 MiB of 0xab at 1 MiB and
/// 64 KiB of 0xcd at 8 MiB; the rest never written.
fn setup(name: &str) -> (TempDir, Daemon, String) {
    let dir = TempDir::new(&format!("sparse-{name}"));
    let d = common::start_daemon(BIN, &dir.0, &["--cores", "0", "--pool-size", "256M", "--no-qos"], &[]);
    let (_inst, disk, _) = common::instance_with_disk(&dir.0, SIZE, true);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "write -P 0xcd 8M 64k"])
        .arg(uri(&dir.0, &disk))
        .output()
        .expect("qemu-io (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, d, disk)
}

fn uri(data: &Path, disk: &str) -> String {
    format!("nbd+unix:///{disk}?socket={}", data.join("nbd.sock").display())
}

/// Data extents (start, length) an allocation map must show: the written ranges rounded
/// out to whole clusters, and nothing else.
fn assert_data_extents(extents: &[(u64, u64)], what: &str) {
    assert!(!extents.is_empty(), "{what}: no data extents");
    let covers = |off: u64, len: u64| extents.iter().any(|&(s, l)| s <= off && off + len <= s + l);
    assert!(covers(MIB, MIB), "{what}: the 1 MiB at 1 MiB is data: {extents:?}");
    assert!(
        covers(8 * MIB, 64 << 10),
        "{what}: the 64 KiB at 8 MiB is data: {extents:?}"
    );
    let data: u64 = extents.iter().map(|e| e.1).sum();
    assert!(
        data <= 4 * MIB,
        "{what}: {data} bytes reported as data of 1.06 MiB written: {extents:?}"
    );
    assert!(
        !covers(16 * MIB, 4096) && !covers(0, 4096),
        "{what}: holes reported as data: {extents:?}"
    );
}

#[test]
fn nbdinfo_and_qemu_img_see_the_holes() {
    let (dir, _d, disk) = setup("map");
    let u = uri(&dir.0, &disk);
    // nbdinfo --map: "start length type description" lines.
    let out = Command::new("nbdinfo")
        .args(["--map", &u])
        .output()
        .expect("nbdinfo (libnbd-bin)");
    assert!(
        out.status.success(),
        "nbdinfo --map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut data = Vec::new();
    let mut total = 0;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (s, len, ty): (u64, u64, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        total += len;
        match ty {
            0 => data.push((s, len)),
            3 => assert!(l.contains("hole,zero"), "{l}"),
            t => panic!("unexpected extent type {t}: {l}"),
        }
    }
    assert_eq!(total, SIZE, "the map covers the disk:\n{text}");
    assert_data_extents(&data, "nbdinfo --map");

    // qemu-img map: the same through QEMU's block status.
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", &u])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == json!(true))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_data_extents(&data, "qemu-img map");
    let info = Command::new("nbdinfo").arg(&u).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("structured"), "{info}");
    assert!(info.contains("can_df: true"), "{info}");
}

#[test]
fn qemu_img_convert_and_nbdcopy_keep_the_copy_sparse() {
    let (dir, _d, disk) = setup("copy");
    let u = uri(&dir.0, &disk);
    for tool in ["qemu-img", "nbdcopy"] {
        let out = dir.0.join(format!("{tool}.raw"));
        let st = if tool == "qemu-img" {
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &u])
                .arg(&out)
                .status()
        } else {
            Command::new("nbdcopy").arg(&u).arg(&out).status()
        }
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(st.success(), "{tool} failed");
        let m = std::fs::metadata(&out).unwrap();
        assert_eq!(m.len(), SIZE, "{tool}: size");
        assert!(
            m.blocks() * 512 <= 4 * MIB,
            "{tool}: {} bytes allocated in the copy of a disk with 1.06 MiB of data",
            m.blocks() * 512
        );
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&out)
            .arg(&u)
            .output()
            .unwrap();
        assert!(cmp.status.success(), "{tool}: {}", String::from_utf8_lossy(&cmp.stdout));
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0xab));
        assert!(bytes[8 * MIB as usize..(8 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xcd));
    }
}

// ---- the protocol, by hand ----

fn export_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

fn meta_data(name: &str, queries: &[&[u8]]) -> Vec<u8> {
    let mut d = export_data(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

fn go(s: &mut UnixStream, name: &str) {
    let mut d = export_data(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    common::nbd_option(s, OPT_GO, &d);
    loop {
        match common::nbd_reply(s) {
            (REP_INFO, _) => continue,
            (REP_ACK, _) => return,
            (t, _) => panic!("GO: {t:#x}"),
        }
    }
}

fn request(s: &mut UnixStream, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
    s.write_all(&encode_request(&Request {
        flags,
        cmd,
        cookie,
        offset,
        len,
    }))
    .unwrap();
}

/// One structured chunk: (flags, type, cookie, payload).
fn chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC);
    let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut p).unwrap();
    (
        u16::from_be_bytes(h[4..6].try_into().unwrap()),
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        p,
    )
}

#[test]
fn structured_replies_and_block_status_on_the_wire() {
    let (dir, _d, disk) = setup("wire");
    let sock = dir.0.join("nbd.sock");

    // Meta contexts need structured replies first; unknown exports are refused.
    let mut s = common::nbd_hello(&sock);
    common::nbd_option(&mut s, OPT_SET_META_CONTEXT, &meta_data(&disk, &[META_BASE_ALLOCATION]));
    assert_eq!(common::nbd_reply(&mut s).0, REP_ERR_INVALID);
    common::nbd_option(&mut s, OPT_STRUCTURED_REPLY, &[1]);
    assert_eq!(
        common::nbd_reply(&mut s).0,
        REP_ERR_INVALID,
        "STRUCTURED_REPLY takes no data"
    );
    common::nbd_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(common::nbd_reply(&mut s).0, REP_ACK);
    common::nbd_option(&mut s, OPT_LIST_META_CONTEXT, &meta_data("d-nosuchdisk", &[]));
    assert_eq!(common::nbd_reply(&mut s).0, REP_ERR_UNKNOWN);
    common::nbd_option(&mut s, OPT_SET_META_CONTEXT, &[0, 0, 0, 9, 1]);
    assert_eq!(common::nbd_reply(&mut s).0, REP_ERR_INVALID, "malformed meta data");
    // LIST with no query lists the one context; SET of an unknown one selects nothing.
    common::nbd_option(&mut s, OPT_LIST_META_CONTEXT, &meta_data(&disk, &[]));
    let (t, d) = common::nbd_reply(&mut s);
    assert_eq!(t, REP_META_CONTEXT);
    assert_eq!(&d[4..], META_BASE_ALLOCATION);
    assert_eq!(common::nbd_reply(&mut s).0, REP_ACK);
    common::nbd_option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data(&disk, &[b"qemu:dirty-bitmap:x"]),
    );
    assert_eq!(common::nbd_reply(&mut s).0, REP_ACK);
    common::nbd_option(&mut s, OPT_SET_META_CONTEXT, &meta_data(&disk, &[META_BASE_ALLOCATION]));
    let (t, d) = common::nbd_reply(&mut s);
    assert_eq!(t, REP_META_CONTEXT);
    let id = u32::from_be_bytes(d[0..4].try_into().unwrap());
    assert_eq!(common::nbd_reply(&mut s).0, REP_ACK);
    go(&mut s, &disk);

    // A read: one OFFSET_DATA chunk, the last (DF is honoured by construction).
    request(&mut s, CMD_FLAG_DF, CMD_READ, 7, MIB, 128 << 10);
    let (f, ty, cookie, p) = chunk(&mut s);
    assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7));
    assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), MIB);
    assert!(p[8..].len() == 128 << 10 && p[8..].iter().all(|&b| b == 0xab));
    // A bad read: a structured error chunk, never a simple reply.
    request(&mut s, 0, CMD_READ, 8, SIZE, 4096);
    let (f, ty, cookie, p) = chunk(&mut s);
    assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 8));
    assert_ne!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 0);
    request(&mut s, 0, CMD_READ, 9, 0, 0);
    let (f, ty, _, p) = chunk(&mut s);
    assert_eq!((f, ty, p.len()), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0), "an empty read");

    // Block status of the first 16 MiB: hole, data, hole, data, hole.
    request(&mut s, 0, CMD_BLOCK_STATUS, 10, 0, 16 << 20);
    let (f, ty, cookie, p) = chunk(&mut s);
    assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 10));
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), id);
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[0..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext.iter().map(|e| e.0 as u64).sum::<u64>(), 16 * MIB, "{ext:?}");
    let flags: Vec<u32> = ext.iter().map(|e| e.1).collect();
    assert_eq!(
        flags,
        vec![
            STATE_HOLE | STATE_ZERO,
            0,
            STATE_HOLE | STATE_ZERO,
            0,
            STATE_HOLE | STATE_ZERO
        ],
        "{ext:?}"
    );
    assert_eq!(ext[0].0 as u64, MIB);
    // REQ_ONE: the first extent only.
    request(&mut s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 11, MIB, 8 << 20);
    let (_, ty, _, p) = chunk(&mut s);
    assert_eq!(ty, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(p.len(), 4 + 8);
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 0, "data at 1 MiB");
    // Past the end and zero length: errors.
    for (cookie, off, len) in [(12, SIZE, 4096u32), (13, 0, 0)] {
        request(&mut s, 0, CMD_BLOCK_STATUS, cookie, off, len);
        let (_, ty, c, _) = chunk(&mut s);
        assert_eq!((ty, c), (REPLY_TYPE_ERROR, cookie));
    }
    // Other commands may still get simple replies: a write and a flush.
    let mut w = encode_request(&Request {
        flags: 0,
        cmd: CMD_WRITE,
        cookie: 14,
        offset: 32 * MIB,
        len: 4096,
    })
    .to_vec();
    w.extend_from_slice(&[0x11; 4096]);
    s.write_all(&w).unwrap();
    let mut r = [0u8; REPLY_LEN];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, simple_reply(0, 14));
    drop(s);

    // Without the meta context, block status is refused; without structured replies
    // reads are simple replies as before.
    let mut s = common::nbd_hello(&sock);
    common::nbd_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(common::nbd_reply(&mut s).0, REP_ACK);
    go(&mut s, &disk);
    request(&mut s, 0, CMD_BLOCK_STATUS, 20, 0, 4096);
    let (_, ty, c, p) = chunk(&mut s);
    assert_eq!((ty, c), (REPLY_TYPE_ERROR, 20));
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), EINVAL);
    drop(s);
    let mut s = common::nbd_go(&sock, &disk).unwrap();
    request(&mut s, 0, CMD_READ, 21, MIB, 4096);
    let mut r = [0u8; REPLY_LEN + 4096];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[..REPLY_LEN], simple_reply(0, 21));
    assert!(r[REPLY_LEN..].iter().all(|&b| b == 0xab));
}
