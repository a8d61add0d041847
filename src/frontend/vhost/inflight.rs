//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a shared
//! memory area the VMM keeps across a backend restart, in which each queue
//! records which chains it has taken and not yet answered. After a crash the
//! next backend takes the chains marked in flight again, in the order they
//! were taken, so no request the guest issued is lost or answered twice.
//!
//! Layout per queue (split rings, the vhost-user specification's
//! `QueueRegionSplit`): a 16-byte header (`features` u64, `version` u16,
//! `desc_num` u16, `last_batch_head` u16, `used_idx` u16) and one 16-byte
//! `DescStateSplit` per descriptor (`inflight` u8, 5 bytes padding, `next`
//! u16, `counter` u64), each queue's region rounded up to 64 bytes.
//!
//! Protocol (batches of one): taking head `h` sets `counter` then
//! `inflight = 1`; answering it sets `next = last_batch_head`,
//! `last_batch_head = h`, then the used ring moves, then `inflight = 0` and
//! `used_idx` follows the used ring. A crash between the used ring and the
//! last two stores leaves `used_idx` behind the ring: recovery clears
//! `last_batch_head`'s flag.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

const HEADER: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;

/// Bytes of one queue's region.
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).div_ceil(64) * 64
}

/// A mapped inflight area.
pub(crate) struct InflightMap {
    ptr: *mut u8,
    len: usize,
    pub num_queues: u16,
    pub queue_size: u16,
}

// SAFETY: the mapping is plain shared memory; every access goes through the
// volatile accessors below, and each queue's region is used by one poller at
// a time (the control thread only before the queue starts).
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// A new zeroed area in a memfd (GET_INFLIGHT_FD); returns the map and the
    /// file to hand the VMM.
    pub(crate) fn create(num_queues: u16, queue_size: u16) -> io::Result<(Arc<InflightMap>, File)> {
        let len = queue_region_size(queue_size) * num_queues as usize;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no queues"));
        }
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"sealdisk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let map = Self::map(&file, 0, len, num_queues, queue_size)?;
        Ok((map, file))
    }

    /// Map an area the VMM hands back (SET_INFLIGHT_FD).
    pub(crate) fn map(
        file: &File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<InflightMap>> {
        if num_queues == 0 || len < queue_region_size(queue_size) * num_queues as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight area of {len} bytes is too small for {num_queues} queues of {queue_size}"),
            ));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of the file; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(InflightMap {
            ptr: p.cast(),
            len,
            num_queues,
            queue_size,
        }))
    }

    /// Queue `i`'s region (`None` past the area).
    pub(crate) fn queue(self: &Arc<Self>, i: u16, queue_size: u16) -> Option<QueueInflight> {
        if i >= self.num_queues || queue_size > self.queue_size {
            return None;
        }
        let off = queue_region_size(self.queue_size) * i as usize;
        Some(QueueInflight {
            // The offset lies inside the mapping (checked in `map`).
            base: self.ptr.wrapping_add(off),
            size: queue_size,
            _map: self.clone(),
            counter: 0,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once; no region outlives the map
        // (each holds an `Arc` to it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's inflight region.
pub(crate) struct QueueInflight {
    base: *mut u8,
    size: u16,
    _map: Arc<InflightMap>,
    counter: u64,
}

// SAFETY: see `InflightMap`; the region moves to the queue's reactor once.
unsafe impl Send for QueueInflight {}

impl QueueInflight {
    fn u16_at(&self, off: usize) -> u16 {
        // SAFETY: `off + 2` lies inside this queue's region (offsets below
        // come from the layout for descriptors `< size`); volatile because the
        // area is shared with the VMM.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) }
    }
    fn set_u16(&self, off: usize, v: u16) {
        // SAFETY: as in `u16_at`.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v) }
    }
    fn desc(&self, head: u16) -> usize {
        HEADER + DESC * head as usize
    }
    fn inflight(&self, head: u16) -> bool {
        // SAFETY: as in `u16_at`.
        unsafe { std::ptr::read_volatile(self.base.add(self.desc(head))) == 1 }
    }
    fn set_inflight(&self, head: u16, v: bool) {
        // SAFETY: as in `u16_at`.
        unsafe { std::ptr::write_volatile(self.base.add(self.desc(head)), v as u8) }
    }
    fn counter_of(&self, head: u16) -> u64 {
        // SAFETY: as in `u16_at`; 8-byte aligned (16-byte entries after a
        // 16-byte header in a page-aligned mapping).
        unsafe { std::ptr::read_volatile(self.base.add(self.desc(head) + 8).cast::<u64>()) }
    }

    /// Recover after a (re)connect: returns the heads still in flight, oldest
    /// first. The used ring's index is `used_idx`; the next chain to take is
    /// `used_idx + returned.len()`.
    pub(crate) fn recover(&mut self, used_idx: u16) -> Vec<u16> {
        if self.u16_at(8) != VERSION {
            // A fresh area: nothing was in flight.
            for h in 0..self.size {
                self.set_inflight(h, false);
            }
            self.set_u16(8, VERSION);
            self.set_u16(10, self.size);
            self.set_u16(14, used_idx);
            self.counter = 0;
            return Vec::new();
        }
        if self.u16_at(14) != used_idx {
            // The last answer reached the used ring but not this record.
            let last = self.u16_at(12);
            if last < self.size {
                self.set_inflight(last, false);
            }
            self.set_u16(14, used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h))
            .map(|h| (self.counter_of(h), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c + 1);
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// A chain was taken from the avail ring.
    pub(crate) fn taken(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let c = self.counter;
        self.counter += 1;
        // SAFETY: as in `counter_of`.
        unsafe { std::ptr::write_volatile(self.base.add(self.desc(head) + 8).cast::<u64>(), c) };
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        self.set_inflight(head, true);
    }

    /// Before `head` goes into the used ring.
    pub(crate) fn answering(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.set_u16(self.desc(head) + 6, self.u16_at(12));
        self.set_u16(12, head);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// After `head` went into the used ring, whose index is now `used_idx`.
    pub(crate) fn answered(&mut self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        self.set_inflight(head, false);
        self.set_u16(14, used_idx);
    }
}
