//! Parsing a virtio-blk request out of a descriptor chain the guest wrote.
//!
//! Everything here comes from untrusted guest memory. The chain's shape is
//! checked before anything is trusted:
//! * the first descriptor is device-readable and holds the 16-byte header;
//! * the last descriptor is device-writable and holds the status byte;
//! * data descriptors in between are device-writable for reads and GET_ID,
//!   device-readable for writes, discards and write-zeroes;
//! * every buffer lies inside the memory table (a buffer crossing two
//!   regions becomes two segments);
//! * the chain ended (a loop or a chain longer than the queue is cut off by
//!   the iterator with its NEXT flag still set: refused).
//!
//! A refused chain whose status byte could be located is answered with
//! `VIRTIO_BLK_S_IOERR`; one without a usable status descriptor (or that
//! never ended) is only returned to the guest as used (length 0), nothing
//! written. Range and alignment against the
//! disk are checked by the caller, which knows the disk.

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes of `struct virtio_blk_outhdr`.
pub(crate) const HEADER_LEN: u32 = 16;
/// Bytes of one `struct virtio_blk_discard_write_zeroes` segment.
pub(crate) const RANGE_LEN: u32 = 16;
/// virtio-blk's sector unit, whatever the disk's block size.
pub(crate) const SECTOR: u64 = 512;

/// What the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A request type this device does not implement (answered UNSUPP).
    Unsupported(u32),
}

/// A piece of guest memory, as a host address in the mapped memory table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: u32,
}

/// Segments of one request; four inline cover most requests.
pub(crate) type Segs = SmallVec<[Seg; 4]>;

/// A well-formed request.
#[derive(Debug)]
pub struct BlkRequest {
    pub kind: Kind,
    /// First 512-byte sector.
    pub sector: u64,
    /// Data buffers in chain order (host addresses).
    pub data: Segs,
    /// Sum of the data buffers' lengths.
    pub data_len: u64,
    /// The status byte.
    pub status: *mut u8,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// No descriptors, or the chain did not end (a loop, a chain longer than
    /// the queue, a descriptor index or table outside guest memory).
    BadChain,
    /// The first descriptor is not a readable 16-byte (or longer) header.
    BadHeader,
    /// The last descriptor is not a writable buffer of at least one byte.
    BadStatus,
    /// A buffer outside the memory table.
    OutOfMemory,
    /// A data buffer with the wrong direction for the request type.
    WrongDirection,
    /// A data length the request type does not allow.
    BadLength,
}

/// A refused chain, with its status byte if one could be located.
#[derive(Debug)]
pub struct Refused {
    pub why: Malformed,
    pub status: Option<*mut u8>,
}

/// Whether a descriptor is device-writable.
fn writable(d: &Descriptor) -> bool {
    d.is_write_only()
}

/// Host segments of `len` bytes of guest memory at `addr`, appended to `out`.
fn segments(mem: &GuestMemoryMmap, addr: u64, len: u32, out: &mut Segs) -> Result<(), Malformed> {
    if len == 0 {
        return Ok(());
    }
    addr.checked_add(len as u64).ok_or(Malformed::OutOfMemory)?;
    let mut covered = 0usize;
    for s in mem.get_slices(GuestAddress(addr), len as usize) {
        let s = s.map_err(|_| Malformed::OutOfMemory)?;
        covered += s.len();
        out.push(Seg {
            ptr: s.ptr_guard_mut().as_ptr(),
            len: s.len() as u32,
        });
    }
    if covered != len as usize {
        return Err(Malformed::OutOfMemory);
    }
    Ok(())
}

/// Parse one chain. `descs` are the descriptors the chain iterator gave;
/// `ended` is false when the last of them still had its NEXT flag (the
/// iterator stopped on a loop, a bad index or an unreadable descriptor).
pub fn parse(mem: &GuestMemoryMmap, descs: &[Descriptor], ended: bool) -> Result<BlkRequest, Refused> {
    let refuse = |why, status| Err(Refused { why, status });
    let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
        return refuse(Malformed::BadChain, None);
    };
    // A chain that never ended has no last descriptor to trust as its status:
    // nothing is written.
    if !ended {
        return refuse(Malformed::BadChain, None);
    }
    // The status byte first: with it, every other refusal can be answered.
    let status = if descs.len() >= 2 && writable(last) && last.len() >= 1 {
        mem.get_slice(last.addr(), 1).ok().map(|s| s.ptr_guard_mut().as_ptr())
    } else {
        None
    };
    let Some(status) = status else {
        return refuse(Malformed::BadStatus, None);
    };
    if writable(first) || first.len() < HEADER_LEN {
        return refuse(Malformed::BadHeader, Some(status));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut hdr, first.addr()).is_err() {
        return refuse(Malformed::OutOfMemory, Some(status));
    }
    let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let kind = match ty {
        VIRTIO_BLK_T_IN => Kind::Read,
        VIRTIO_BLK_T_OUT => Kind::Write,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
        other => Kind::Unsupported(other),
    };
    let device_writes = matches!(kind, Kind::Read | Kind::GetId);
    let mut data = Segs::new();
    let mut data_len = 0u64;
    // The status byte may share its descriptor with data only in a framing
    // no driver uses; data descriptors are the ones strictly in between.
    for d in &descs[1..descs.len() - 1] {
        if let Kind::Unsupported(_) = kind {
            break;
        }
        if writable(d) != device_writes {
            return refuse(Malformed::WrongDirection, Some(status));
        }
        if let Err(why) = segments(mem, d.addr().0, d.len(), &mut data) {
            return refuse(why, Some(status));
        }
        data_len += d.len() as u64;
    }
    let ok_len = match kind {
        Kind::Read | Kind::Write => data_len > 0 && data_len.is_multiple_of(SECTOR),
        Kind::Flush => true,
        Kind::GetId => data_len > 0,
        Kind::Discard | Kind::WriteZeroes => data_len > 0 && data_len.is_multiple_of(RANGE_LEN as u64),
        Kind::Unsupported(_) => true,
    };
    if !ok_len {
        return refuse(Malformed::BadLength, Some(status));
    }
    Ok(BlkRequest {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

/// The descriptors of the chain starting at `head` in the table at
/// `desc_table` (of `queue_size` entries), for chains not taken through the
/// avail ring (replayed from the inflight area). Same rules as the queue's
/// own iterator: at most `queue_size` descriptors, one level of indirect
/// table; `ended` is false if the chain was cut off.
pub fn walk(mem: &GuestMemoryMmap, desc_table: u64, queue_size: u16, head: u16) -> (Vec<Descriptor>, bool) {
    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    let read = |table: u64, i: u16| -> Option<Descriptor> {
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(table.checked_add(16 * i as u64)?))
            .ok()?;
        Some(Descriptor::new(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16::from_le_bytes(b[12..14].try_into().unwrap()),
            u16::from_le_bytes(b[14..16].try_into().unwrap()),
        ))
    };
    let mut out = Vec::new();
    let (mut table, mut size, mut i, mut ttl, mut indirect) = (desc_table, queue_size, head, queue_size, false);
    loop {
        if ttl == 0 || i >= size {
            return (out, false);
        }
        ttl -= 1;
        let Some(d) = read(table, i) else {
            return (out, false);
        };
        if d.flags() & F_INDIRECT != 0 {
            if indirect || d.len() % 16 != 0 || d.len() / 16 == 0 || d.len() / 16 > u16::MAX as u32 {
                return (out, false);
            }
            (table, size, i, indirect) = (d.addr().0, (d.len() / 16) as u16, 0, true);
            ttl = size;
            continue;
        }
        let next = d.flags() & F_NEXT != 0;
        let n = d.next();
        out.push(d);
        if !next {
            return (out, true);
        }
        i = n;
    }
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

/// The pieces of `segs` covering `len` bytes from byte `from`, as
/// (pointer, length) pairs.
pub(crate) fn slice(segs: &[Seg], mut from: usize, len: usize) -> crate::bdev::LentSegs {
    let mut out = crate::bdev::LentSegs::new();
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let slen = s.len as usize;
        if from >= slen {
            from -= slen;
            continue;
        }
        let n = (slen - from).min(left);
        // Stays inside the segment: `from < slen`.
        out.push((s.ptr.wrapping_add(from), n));
        left -= n;
        from = 0;
    }
    out
}

/// Copy `len` bytes of the request's guest segments, starting `from` bytes
/// into them, into `dst`.
///
/// # Safety
/// Every segment must point into guest memory that stays mapped for the
/// call (the caller holds the memory table).
pub(crate) unsafe fn gather(segs: &[Seg], mut from: usize, dst: &mut [u8]) {
    let mut at = 0;
    for s in segs {
        let len = s.len as usize;
        if from >= len {
            from -= len;
            continue;
        }
        let n = (len - from).min(dst.len() - at);
        // SAFETY: the segment is `len` mapped bytes (caller's contract) and
        // `from + n <= len`; `dst[at..at + n]` is ours. The guest may write
        // the source concurrently; the bytes are copied, never trusted.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr.add(from), dst.as_mut_ptr().add(at), n) };
        at += n;
        from = 0;
        if at == dst.len() {
            return;
        }
    }
}

/// Copy `src` into the request's guest segments, starting `from` bytes into
/// them.
///
/// # Safety
/// As for [`gather`].
pub(crate) unsafe fn scatter(segs: &[Seg], mut from: usize, src: &[u8]) {
    let mut at = 0;
    for s in segs {
        let len = s.len as usize;
        if from >= len {
            from -= len;
            continue;
        }
        let n = (len - from).min(src.len() - at);
        // SAFETY: as in `gather`, with the roles swapped; the guest reads
        // what we write when the request completes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), s.ptr.add(from), n) };
        at += n;
        from = 0;
        if at == src.len() {
            return;
        }
    }
}

/// The ranges of a discard or write-zeroes request (at most `max` of them;
/// `None` if there are more).
///
/// # Safety
/// As for [`gather`].
pub(crate) unsafe fn ranges(req: &BlkRequest, max: usize) -> Option<SmallVec<[Range; 1]>> {
    let n = (req.data_len / RANGE_LEN as u64) as usize;
    if n > max {
        return None;
    }
    let mut out = SmallVec::new();
    for i in 0..n {
        let mut b = [0u8; RANGE_LEN as usize];
        // SAFETY: the caller's contract, passed on.
        unsafe { gather(&req.data, i * RANGE_LEN as usize, &mut b) };
        out.push(Range {
            sector: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            sectors: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        });
    }
    Some(out)
}
