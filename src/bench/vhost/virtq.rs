//! A split virtqueue (VIRTIO 1.x §2.7) in guest memory, driver side, with
//! virtio-blk requests on it.
//!
//! Layout (each part on its own 4 KiB-aligned allocation):
//! * descriptor table: `size` x 16 bytes (`addr: le64, len: le32, flags: le16, next: le16`);
//! * avail ring: `flags: le16, idx: le16, ring[size]: le16, used_event: le16`;
//! * used ring: `flags: le16, idx: le16, ring[size]: {id: le32, len: le32}, avail_event: le16`;
//! * request slots: `size` x [`SLOT_BYTES`], one per possible head index,
//!   holding a request's 16-byte header, its status byte and inline payload
//!   (discard / write-zeroes ranges).
//!
//! Ordering (the spec's barriers, with Rust atomics on the shared memory):
//! descriptors and the avail entry are written, then a release fence, then
//! `avail.idx`; a full fence before reading `avail_event` (or nothing without
//! EVENT_IDX: we kick always) to decide on a kick; `used.idx` is loaded with
//! acquire before its entries are read; before sleeping on the call eventfd
//! the driver stores `used_event`, issues a full fence and looks at
//! `used.idx` once more.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::VringConfigData;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mem::{GuestBuf, GuestMem, Seg};
use super::Error;

/// Bytes of guest memory per request slot: header at 0, status at 16,
/// inline payload from 32.
pub(crate) const SLOT_BYTES: u64 = 128;
const SLOT_STATUS: u64 = 16;
const SLOT_PAYLOAD: u64 = 32;
/// Discard / write-zeroes ranges that fit in a slot's inline payload.
pub(crate) const MAX_INLINE_RANGES: usize = ((SLOT_BYTES - SLOT_PAYLOAD) / 16) as usize;
/// What the driver writes into a status byte before submitting: a device
/// that never writes the status leaves it.
pub const STATUS_UNWRITTEN: u8 = 0xff;
const NO_STATUS: u64 = u64::MAX;

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (write-zeroes only).
    pub unmap: bool,
}

/// A virtio-blk request.
#[derive(Debug, Clone, Copy)]
pub enum BlkOp<'a> {
    /// VIRTIO_BLK_T_IN into the segments (device-writable).
    Read {
        sector: u64,
        segs: &'a [Seg],
    },
    /// VIRTIO_BLK_T_OUT from the segments (device-readable).
    Write {
        sector: u64,
        segs: &'a [Seg],
    },
    Flush,
    /// VIRTIO_BLK_T_GET_ID into `seg` (20 bytes, VIRTIO_BLK_ID_BYTES).
    GetId {
        seg: Seg,
    },
    Discard {
        ranges: &'a [BlkRange],
    },
    WriteZeroes {
        ranges: &'a [BlkRange],
    },
    /// Any request type (unknown ones included) with the given segments,
    /// device-writable if `device_writes`.
    Other {
        type_: u32,
        sector: u64,
        segs: &'a [Seg],
        device_writes: bool,
    },
}

/// A virtio-blk request header (`struct virtio_blk_outhdr`): type, ioprio 0, sector.
pub fn blk_header(type_: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&type_.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A descriptor written verbatim by [`Virtq::push_raw`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// VRING_DESC_F_NEXT (1), VRING_DESC_F_WRITE (2), VRING_DESC_F_INDIRECT (4).
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// A device-readable descriptor chained to `next`.
    pub fn read(addr: u64, len: u32, next: Option<u16>) -> RawDesc {
        RawDesc {
            addr,
            len,
            flags: if next.is_some() { VRING_DESC_F_NEXT as u16 } else { 0 },
            next: next.unwrap_or(0),
        }
    }
    /// A device-writable descriptor chained to `next`.
    pub fn write(addr: u64, len: u32, next: Option<u16>) -> RawDesc {
        let mut d = RawDesc::read(addr, len, next);
        d.flags |= VRING_DESC_F_WRITE as u16;
        d
    }
}

/// A used-ring entry matched to the request it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// What `push`/`submit`/`push_raw` returned.
    pub id: u64,
    /// The head descriptor index (the used entry's id).
    pub head: u16,
    /// The status byte the device wrote ([`STATUS_UNWRITTEN`] if it did not;
    /// for raw chains without a status address, also that).
    pub status: u8,
    /// The used entry's len: bytes the device says it wrote.
    pub len: u32,
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    /// Times avail.idx was published.
    pub publishes: u64,
    /// Kicks written to the kick eventfd.
    pub kicks: u64,
    /// Publishes that EVENT_IDX let us skip the kick for.
    pub kicks_suppressed: u64,
    /// Times `wait` slept on the call eventfd.
    pub sleeps: u64,
    /// Call eventfd reads that found a signal.
    pub calls: u64,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    /// Descriptors of a normal chain (walked through `next`); raw chains list theirs.
    ndesc: u16,
    raw: Option<Vec<u16>>,
    status_gpa: u64,
}

/// One virtqueue, driver side. `Send`: a bench thread can own it.
pub struct Virtq {
    index: u16,
    size: u16,
    mem: Arc<GuestMem>,
    desc: u64,
    avail: u64,
    used: u64,
    slots: u64,
    _rings: [GuestBuf; 4],
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    /// Our copy of each descriptor's `next` (so freeing never reads the table).
    next: Vec<u16>,
    inflight: Vec<Option<InFlight>>,
    /// Raw chains whose head is >= size.
    inflight_odd: Vec<(u32, InFlight)>,
    /// Next avail index to fill (shadow) and the last one published.
    avail_idx: u16,
    published: u16,
    last_used: u16,
    next_id: u64,
    last_head: u16,
    stash: VecDeque<Completion>,
    stats: QueueStats,
    errors: Vec<String>,
}

impl std::fmt::Debug for Virtq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virtq")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("in_flight", &self.in_flight())
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish()
    }
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::Io {
        what: what.into(),
        source: e,
    }
}

/// VIRTIO's `vring_need_event`: should the other side be notified, given
/// its event index and the move of our index from `old` to `new`?
pub(crate) fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Virtq {
    /// Queue `index` of `size` entries (a power of two up to 32768) in `mem`.
    pub fn new(mem: &Arc<GuestMem>, index: u16, size: u16, event_idx: bool) -> Result<Virtq, Error> {
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::Invalid(format!("queue size {size} is not a power of two")));
        }
        let n = size as u64;
        let alloc = |len: u64| mem.alloc(len, 4096).map_err(|e| io_err("allocating a virtqueue", e));
        let desc = alloc(16 * n)?;
        let avail = alloc(6 + 2 * n)?;
        let used = alloc(6 + 8 * n)?;
        let slots = alloc(SLOT_BYTES * n)?;
        let ev = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| io_err(what, e));
        Ok(Virtq {
            index,
            size,
            mem: mem.clone(),
            desc: desc.gpa(),
            avail: avail.gpa(),
            used: used.gpa(),
            slots: slots.gpa(),
            _rings: [desc, avail, used, slots],
            event_idx,
            kick: ev("kick eventfd")?,
            call: ev("call eventfd")?,
            free: (0..size).rev().collect(),
            next: vec![0; size as usize],
            inflight: (0..size).map(|_| None).collect(),
            inflight_odd: Vec::new(),
            avail_idx: 0,
            published: 0,
            last_used: 0,
            next_id: 1,
            last_head: 0,
            stash: VecDeque::new(),
            stats: QueueStats::default(),
            errors: Vec::new(),
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }
    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// Replace the eventfds (a reconnect hands new ones to the new backend).
    pub(crate) fn renew_eventfds(&mut self) -> Result<(), Error> {
        self.kick = EventFd::new(EFD_NONBLOCK).map_err(|e| io_err("kick eventfd", e))?;
        self.call = EventFd::new(EFD_NONBLOCK).map_err(|e| io_err("call eventfd", e))?;
        Ok(())
    }
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }
    pub fn stats(&self) -> QueueStats {
        self.stats
    }
    /// Protocol violations seen from the device (bad used ids, used.idx
    /// running ahead). A correct backend leaves this empty.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }
    /// Requests pushed and not completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.iter().filter(|x| x.is_some()).count() + self.inflight_odd.len()
    }
    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }
    /// The next avail index (what GET_VRING_BASE should return once all
    /// pushed requests are published and consumed).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    pub fn last_used(&self) -> u16 {
        self.last_used
    }
    /// GPAs of the descriptor table, avail ring and used ring.
    pub fn ring_gpas(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }
    /// GPA of the request slot of head `head` (header at +0, status at +16).
    pub fn slot_gpa(&self, head: u16) -> u64 {
        self.slots + SLOT_BYTES * head as u64
    }

    /// SET_VRING_ADDR's addresses (our virtual addresses, as QEMU sends).
    pub fn config_data(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.mem.hva(self.desc),
            used_ring_addr: self.mem.hva(self.used),
            avail_ring_addr: self.mem.hva(self.avail),
            log_addr: None,
        }
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        let p = self
            .mem
            .ptr(gpa, 2)
            .expect("ring fields are inside our ring allocations");
        assert!(
            (p as usize).is_multiple_of(2),
            "ring field at {gpa:#x} is not 2-byte aligned"
        );
        // SAFETY: p is a 2-aligned address inside the mapping, which lives as
        // long as `self` (we hold an Arc). AtomicU16 has the layout of u16 and
        // interior mutability, so the device writing the same word from its
        // process is an ordinary concurrent atomic access.
        unsafe { &*(p as *const AtomicU16) }
    }

    fn write_desc(&self, i: u16, d: RawDesc) {
        let at = self.desc + 16 * i as u64;
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_at(at, &b).expect("descriptor inside the table");
    }

    fn avail_entry(&mut self, head: u16) {
        let at = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        self.u16_at(at).store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn take_descs(&mut self, n: usize) -> Result<Vec<u16>, Error> {
        if self.free.len() < n {
            return Err(Error::QueueFull {
                need: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        Ok(self.free.split_off(at))
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Put a request on the queue without publishing it (see [`publish`](Self::publish)).
    pub fn push(&mut self, op: &BlkOp<'_>) -> Result<u64, Error> {
        let (type_, sector, segs, dev_writes): (u32, u64, &[Seg], bool) = match *op {
            BlkOp::Read { sector, segs } => (VIRTIO_BLK_T_IN, sector, segs, true),
            BlkOp::Write { sector, segs } => (VIRTIO_BLK_T_OUT, sector, segs, false),
            BlkOp::Flush => (VIRTIO_BLK_T_FLUSH, 0, &[], false),
            BlkOp::GetId { ref seg } => (VIRTIO_BLK_T_GET_ID, 0, std::slice::from_ref(seg), true),
            BlkOp::Discard { ranges } | BlkOp::WriteZeroes { ranges } => {
                if ranges.is_empty() || ranges.len() > MAX_INLINE_RANGES {
                    return Err(Error::Invalid(format!(
                        "{} ranges: give 1 to {MAX_INLINE_RANGES}",
                        ranges.len()
                    )));
                }
                let t = if matches!(op, BlkOp::Discard { .. }) {
                    VIRTIO_BLK_T_DISCARD
                } else {
                    VIRTIO_BLK_T_WRITE_ZEROES
                };
                (t, 0, &[], false)
            }
            BlkOp::Other {
                type_,
                sector,
                segs,
                device_writes,
            } => (type_, sector, segs, device_writes),
        };
        let ranges = match *op {
            BlkOp::Discard { ranges } | BlkOp::WriteZeroes { ranges } => ranges,
            _ => &[],
        };
        let ndata = segs.len() + (!ranges.is_empty()) as usize;
        let descs = self.take_descs(ndata + 2)?;
        let head = descs[0];
        let slot = self.slot_gpa(head);
        self.mem
            .write_at(slot, &blk_header(type_, sector))
            .expect("slot inside its allocation");
        self.mem
            .write_at(slot + SLOT_STATUS, &[STATUS_UNWRITTEN])
            .expect("slot inside its allocation");
        let mut chain: Vec<RawDesc> = Vec::with_capacity(descs.len());
        chain.push(RawDesc::read(slot, 16, None));
        for s in segs {
            chain.push(if dev_writes {
                RawDesc::write(s.gpa, s.len, None)
            } else {
                RawDesc::read(s.gpa, s.len, None)
            });
        }
        if !ranges.is_empty() {
            let mut p = Vec::with_capacity(16 * ranges.len());
            for r in ranges {
                p.extend_from_slice(&r.sector.to_le_bytes());
                p.extend_from_slice(&r.num_sectors.to_le_bytes());
                let flags = if r.unmap { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
                p.extend_from_slice(&flags.to_le_bytes());
            }
            self.mem
                .write_at(slot + SLOT_PAYLOAD, &p)
                .expect("slot inside its allocation");
            chain.push(RawDesc::read(slot + SLOT_PAYLOAD, p.len() as u32, None));
        }
        chain.push(RawDesc::write(slot + SLOT_STATUS, 1, None));
        let last = chain.len() - 1;
        for (k, d) in chain.iter_mut().enumerate() {
            if k < last {
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = descs[k + 1];
            }
            self.next[descs[k] as usize] = d.next;
            self.write_desc(descs[k], *d);
        }
        let id = self.new_id();
        self.inflight[head as usize] = Some(InFlight {
            id,
            ndesc: descs.len() as u16,
            raw: None,
            status_gpa: slot + SLOT_STATUS,
        });
        self.avail_entry(head);
        self.last_head = head;
        self.stats.submitted += 1;
        Ok(id)
    }

    /// The head descriptor of the last request `push` put on the queue
    /// (what its [`Completion::head`] will be).
    pub fn last_pushed_head(&self) -> u16 {
        self.last_head
    }

    /// Push and publish (kicking if the device wants it).
    pub fn submit(&mut self, op: &BlkOp<'_>) -> Result<u64, Error> {
        let id = self.push(op)?;
        self.publish();
        Ok(id)
    }

    /// Write `descs` verbatim into the table (`(index, descriptor)`), put
    /// `head` into the avail ring and publish. The indexes (and `head`, if
    /// below the queue size) must be free; they stay reserved until the
    /// device returns `head`. `status_gpa`: where the device should write the
    /// status (set to [`STATUS_UNWRITTEN`] first, read on completion).
    pub fn push_raw(&mut self, descs: &[(u16, RawDesc)], head: u16, status_gpa: Option<u64>) -> Result<u64, Error> {
        let mut idx: Vec<u16> = descs.iter().map(|d| d.0).collect();
        if head < self.size {
            idx.push(head);
        }
        idx.sort_unstable();
        idx.dedup();
        for &i in &idx {
            if i >= self.size {
                return Err(Error::Invalid(format!(
                    "descriptor index {i} >= queue size {}",
                    self.size
                )));
            }
            if !self.free.contains(&i) {
                return Err(Error::Invalid(format!("descriptor {i} is in use")));
            }
        }
        self.free.retain(|f| !idx.contains(f));
        for &(i, d) in descs {
            self.write_desc(i, d);
        }
        if let Some(s) = status_gpa {
            let _ = self.mem.write_at(s, &[STATUS_UNWRITTEN]);
        }
        let id = self.new_id();
        let f = InFlight {
            id,
            ndesc: 0,
            raw: Some(idx),
            status_gpa: status_gpa.unwrap_or(NO_STATUS),
        };
        if head < self.size {
            self.inflight[head as usize] = Some(f);
        } else {
            self.inflight_odd.push((head as u32, f));
        }
        self.avail_entry(head);
        self.stats.submitted += 1;
        self.publish();
        Ok(id)
    }

    /// Make pushed requests visible to the device and kick it if needed.
    /// Returns whether it kicked.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published {
            return false;
        }
        let old = self.published;
        let new = self.avail_idx;
        if self.event_idx {
            // Ask for a call when the next request completes.
            self.u16_at(self.avail + 4 + 2 * self.size as u64)
                .store(self.last_used.to_le(), Ordering::Relaxed);
        }
        // Descriptors and avail entries before the index (virtio_wmb).
        fence(Ordering::Release);
        self.u16_at(self.avail + 2).store(new.to_le(), Ordering::Relaxed);
        self.published = new;
        self.stats.publishes += 1;
        let kick = if self.event_idx {
            // The index store before reading the device's avail_event (virtio_mb).
            fence(Ordering::SeqCst);
            let ev = u16::from_le(
                self.u16_at(self.used + 4 + 8 * self.size as u64)
                    .load(Ordering::Relaxed),
            );
            vring_need_event(ev, new, old)
        } else {
            true
        };
        if kick {
            self.kick();
        } else {
            self.stats.kicks_suppressed += 1;
        }
        kick
    }

    /// Write the kick eventfd.
    pub fn kick(&mut self) {
        let _ = self.kick.write(1);
        self.stats.kicks += 1;
    }

    /// Store `idx` into avail.idx verbatim (after a release fence) and kick:
    /// for tests of a device facing a bogus index. The shadow index follows.
    pub fn publish_raw_idx(&mut self, idx: u16) {
        fence(Ordering::Release);
        self.u16_at(self.avail + 2).store(idx.to_le(), Ordering::Relaxed);
        self.avail_idx = idx;
        self.published = idx;
        self.kick();
    }

    /// Set avail.flags (VRING_AVAIL_F_NO_INTERRUPT = 1 asks for no calls without EVENT_IDX).
    pub fn set_avail_flags(&mut self, flags: u16) {
        self.u16_at(self.avail).store(flags.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The device's used.idx as it is now.
    pub fn device_used_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.used + 2).load(Ordering::Acquire))
    }

    fn free_chain(&mut self, head: u16, f: &InFlight) {
        match &f.raw {
            Some(v) => self.free.extend_from_slice(v),
            None => {
                let mut i = head;
                for _ in 0..f.ndesc {
                    self.free.push(i);
                    i = self.next[i as usize];
                }
            }
        }
    }

    /// Completions available now (non-blocking), appended to `out`.
    pub fn poll_into(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.extend(self.stash.drain(..));
        self.reap(out);
        out.len() - before
    }

    /// Completions available now.
    pub fn poll(&mut self) -> Vec<Completion> {
        let mut v = Vec::new();
        self.poll_into(&mut v);
        v
    }

    /// Wait up to `timeout` for at least one completion (sleeping on the
    /// call eventfd); 0 on timeout.
    pub fn wait_into(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize, Error> {
        let before = out.len();
        out.extend(self.stash.drain(..));
        if out.len() > before {
            self.reap(out);
            return Ok(out.len() - before);
        }
        self.wait_new(out, Instant::now() + timeout)?;
        Ok(out.len() - before)
    }

    /// Wait up to `timeout` for completions.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Completion>, Error> {
        let mut v = Vec::new();
        self.wait_into(&mut v, timeout)?;
        Ok(v)
    }

    /// Wait for request `id`; other completions seen meanwhile are kept for
    /// the next `poll`/`wait`.
    pub fn wait_for(&mut self, id: u64, timeout: Duration) -> Result<Completion, Error> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            if let Some(p) = self.stash.iter().position(|c| c.id == id) {
                return Ok(self.stash.remove(p).expect("position is in range"));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("request {id} on queue {}", self.index),
                });
            }
            self.wait_new(&mut got, deadline)?;
            self.stash.extend(got.drain(..));
        }
    }

    /// Read new used entries (not the stash) into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        // used.idx (acquire) before the entries it covers.
        let used_idx = self.device_used_idx();
        let mut n = used_idx.wrapping_sub(self.last_used);
        if n > self.size {
            self.errors.push(format!(
                "queue {}: used.idx {used_idx} is {n} entries past our last seen {} (queue size {})",
                self.index, self.last_used, self.size
            ));
            n = 0;
            self.last_used = used_idx;
        }
        let before = out.len();
        for _ in 0..n {
            let at = self.used + 4 + 8 * (self.last_used % self.size) as u64;
            let mut e = [0u8; 8];
            self.mem.read_at(at, &mut e).expect("used ring inside its allocation");
            self.last_used = self.last_used.wrapping_add(1);
            let id = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(e[4..8].try_into().expect("4 bytes"));
            let f = if id < self.size as u32 {
                self.inflight[id as usize].take()
            } else {
                let pos = self.inflight_odd.iter().position(|x| x.0 == id);
                pos.map(|p| self.inflight_odd.remove(p).1)
            };
            let Some(f) = f else {
                self.errors.push(format!(
                    "queue {}: used entry for head {id} (len {len}) that is not in flight",
                    self.index
                ));
                continue;
            };
            let status = if f.status_gpa == NO_STATUS {
                STATUS_UNWRITTEN
            } else {
                self.mem.read_u8(f.status_gpa).unwrap_or(STATUS_UNWRITTEN)
            };
            self.free_chain(id as u16, &f);
            self.stats.completed += 1;
            out.push(Completion {
                id: f.id,
                head: id as u16,
                status,
                len,
            });
        }
        out.len() - before
    }

    /// Reap new used entries, sleeping on the call eventfd until there is at
    /// least one or `deadline` passes.
    fn wait_new(&mut self, out: &mut Vec<Completion>, deadline: Instant) -> Result<usize, Error> {
        loop {
            let n = self.reap(out);
            if n > 0 {
                return Ok(n);
            }
            if self.event_idx {
                self.u16_at(self.avail + 4 + 2 * self.size as u64)
                    .store(self.last_used.to_le(), Ordering::Relaxed);
                // used_event before looking at used.idx again (virtio_mb):
                // either we see the new entry or the device sees our event.
                fence(Ordering::SeqCst);
                if self.device_used_idx() != self.last_used {
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            self.stats.sleeps += 1;
            // SAFETY: one valid pollfd on the stack, count 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(io_err("poll on the call eventfd", e));
                }
            }
            if r > 0 && self.call.read().is_ok() {
                self.stats.calls += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Event at 5, index moved 3 -> 6: entry 5 is among the new ones.
        assert!(vring_need_event(5, 6, 3));
        assert!(!vring_need_event(6, 6, 3));
        assert!(!vring_need_event(2, 6, 3));
        // Wrap-around.
        assert!(vring_need_event(0xffff, 1, 0xfffe));
        assert!(!vring_need_event(1, 1, 0xfffe));
    }

    /// A fake device in the same process: consume avail, write used.
    fn complete_all(q: &Virtq, status: u8, next_avail: &mut u16, used_idx: &mut u16) {
        let avail_idx = u16::from_le(q.u16_at(q.avail + 2).load(Ordering::Acquire));
        while *next_avail != avail_idx {
            let head = u16::from_le(
                q.u16_at(q.avail + 4 + 2 * (*next_avail % q.size) as u64)
                    .load(Ordering::Relaxed),
            );
            // Walk the chain to the last (status) descriptor.
            let mut i = head;
            loop {
                let mut d = [0u8; 16];
                q.mem.read_at(q.desc + 16 * i as u64, &mut d).unwrap();
                let flags = u16::from_le_bytes([d[12], d[13]]);
                if flags & VRING_DESC_F_NEXT as u16 == 0 {
                    let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
                    q.mem.write_at(addr, &[status]).unwrap();
                    break;
                }
                i = u16::from_le_bytes([d[14], d[15]]);
            }
            let at = q.used + 4 + 8 * (*used_idx % q.size) as u64;
            let mut e = [0u8; 8];
            e[0..4].copy_from_slice(&(head as u32).to_le_bytes());
            e[4..8].copy_from_slice(&1u32.to_le_bytes());
            q.mem.write_at(at, &e).unwrap();
            *used_idx = used_idx.wrapping_add(1);
            *next_avail = next_avail.wrapping_add(1);
        }
        q.u16_at(q.used + 2).store(used_idx.to_le(), Ordering::Release);
    }

    #[test]
    fn chains_wrap_around_and_descriptors_come_back() {
        let mem = GuestMem::new(1 << 20, None).unwrap();
        let mut q = Virtq::new(&mem, 0, 8, true).unwrap();
        let buf = mem.alloc(4096, 4096).unwrap();
        let (mut na, mut ui) = (0u16, 0u16);
        let mut ids = Vec::new();
        for round in 0..50u64 {
            // 2 requests of 3 descriptors each fit in 8; a third does not.
            ids.clear();
            for _ in 0..2 {
                ids.push(
                    q.push(&BlkOp::Read {
                        sector: round,
                        segs: &[buf.seg()],
                    })
                    .unwrap(),
                );
            }
            assert!(matches!(
                q.push(&BlkOp::Write {
                    sector: 0,
                    segs: &[buf.seg()]
                }),
                Err(Error::QueueFull { need: 3, free: 2 })
            ));
            q.publish();
            complete_all(&q, 0, &mut na, &mut ui);
            let got = q.wait(Duration::from_secs(1)).unwrap();
            assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
            assert!(got.iter().all(|c| c.status == 0));
            assert_eq!(q.free_descs(), 8);
        }
        assert!(q.errors().is_empty());
        // A bogus used entry is reported, not trusted.
        let at = q.used + 4 + 8 * (ui % q.size) as u64;
        q.mem.write_at(at, &[3, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        q.u16_at(q.used + 2).store(ui.wrapping_add(1), Ordering::Release);
        assert!(q.poll().is_empty());
        assert_eq!(q.errors().len(), 1, "{:?}", q.errors());
    }
}
