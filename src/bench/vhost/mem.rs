//! Guest memory of the VMM side: one memfd mapped `MAP_SHARED`, guest-physical
//! address 0..size mapped onto it, handed to the backend in `SET_MEM_TABLE`.
//!
//! An optional *hole* (a GPA range inside 0..size) is left out of the memory
//! table: the backend cannot reach it, so a descriptor that points there (or
//! at any GPA >= size) points outside the table. The allocator never hands
//! out memory in the hole.
//!
//! Buffers come from a first-fit allocator ([`GuestMem::alloc`]); a
//! [`GuestBuf`] owns its range exclusively and gives it back on drop.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use vhost::VhostUserMemoryRegionInfo;

/// One guest-physical segment of a request's data: `len` bytes at `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub gpa: u64,
    pub len: u32,
}

/// The guest's memory.
pub struct GuestMem {
    fd: OwnedFd,
    base: NonNull<u8>,
    size: u64,
    hole: Option<Range<u64>>,
    /// Free ranges: start -> length.
    free: Mutex<BTreeMap<u64, u64>>,
}

// SAFETY: `base` points at a MAP_SHARED mapping owned by this struct for its
// whole life; it is never handed out as a Rust reference that could outlive a
// borrow of `self`, all accesses go through raw-pointer copies or atomics, and
// the allocator state is behind a Mutex. The mapping itself is already shared
// with another process, so sharing it between threads adds nothing new.
unsafe impl Send for GuestMem {}
// SAFETY: see `Send`: `&GuestMem` only allows raw copies in and out of the
// mapping (data races on plain bytes are what shared guest memory is) and
// locked allocator operations.
unsafe impl Sync for GuestMem {}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem")
            .field("size", &self.size)
            .field("hole", &self.hole)
            .finish()
    }
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl GuestMem {
    /// `size` bytes of guest memory (rounded up to 4 KiB), GPA 0..size, with
    /// `hole` (page-aligned, inside 0..size) left out of the memory table.
    pub fn new(size: u64, hole: Option<Range<u64>>) -> io::Result<Arc<GuestMem>> {
        let size = size.max(4096).div_ceil(4096) * 4096;
        if let Some(h) = &hole {
            let aligned = h.start % 4096 == 0 && h.end % 4096 == 0;
            if !aligned || h.start >= h.end || h.end > size || h.start == 0 && h.end == size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("memory hole {h:?} must be page-aligned, non-empty and leave memory in 0..{size}"),
                ));
            }
        }
        // SAFETY: the name is a NUL-terminated string literal; memfd_create
        // has no other memory-safety preconditions.
        let raw = unsafe { libc::memfd_create(c"sealdisk-guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os_err("memfd_create"));
        }
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a descriptor we own; no pointers involved.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(os_err("ftruncate of the guest memory"));
        }
        // SAFETY: a new shared mapping of `size` bytes of our memfd at an
        // address the kernel picks; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap of the guest memory"));
        }
        let base = NonNull::new(p.cast::<u8>()).expect("mmap does not return NULL on success");
        let mut free = BTreeMap::new();
        match &hole {
            None => {
                free.insert(0, size);
            }
            Some(h) => {
                if h.start > 0 {
                    free.insert(0, h.start);
                }
                if h.end < size {
                    free.insert(h.end, size - h.end);
                }
            }
        }
        Ok(Arc::new(GuestMem {
            fd,
            base,
            size,
            hole,
            free: Mutex::new(free),
        }))
    }

    /// Bytes of guest memory (GPA 0..size; GPAs beyond are outside every region).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The GPA range left out of the memory table, if any.
    pub fn hole(&self) -> Option<Range<u64>> {
        self.hole.clone()
    }

    /// The memfd behind the memory.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Our (the VMM's) virtual address of `gpa`: what vhost-user's
    /// SET_VRING_ADDR and the memory table's `userspace_addr` use.
    pub fn hva(&self, gpa: u64) -> u64 {
        self.base.as_ptr() as u64 + gpa
    }

    /// Is `gpa..gpa+len` in the memory table (inside 0..size, not in the hole)?
    pub fn in_table(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        end <= self.size && self.hole.as_ref().is_none_or(|h| end <= h.start || gpa >= h.end)
    }

    /// The regions for SET_MEM_TABLE: one, or two around the hole.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        let region = |start: u64, end: u64| VhostUserMemoryRegionInfo {
            guest_phys_addr: start,
            memory_size: end - start,
            userspace_addr: self.hva(start),
            mmap_offset: start,
            mmap_handle: self.fd.as_raw_fd(),
        };
        match &self.hole {
            None => vec![region(0, self.size)],
            Some(h) => {
                let mut v = Vec::new();
                if h.start > 0 {
                    v.push(region(0, h.start));
                }
                if h.end < self.size {
                    v.push(region(h.end, self.size));
                }
                v
            }
        }
    }

    fn check(&self, gpa: u64, len: usize) -> io::Result<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GPA range {gpa:#x}+{len} is outside guest memory (0..{:#x})", self.size),
            )),
        }
    }

    /// A raw pointer to `gpa` (checked to be inside the mapping with `len`).
    pub(crate) fn ptr(&self, gpa: u64, len: usize) -> io::Result<*mut u8> {
        self.check(gpa, len)?;
        // SAFETY: gpa + len <= size (checked), so the offset stays inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(gpa as usize) })
    }

    /// Copy guest memory at `gpa` into `out`.
    pub fn read_at(&self, gpa: u64, out: &mut [u8]) -> io::Result<()> {
        let p = self.ptr(gpa, out.len())?;
        // SAFETY: p..p+len is inside our mapping (checked by `ptr`) and does
        // not overlap `out`, a Rust buffer outside the mapping. The device may
        // write the same bytes concurrently; copying plain bytes can then give
        // torn data, never an invalid value.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copy `data` into guest memory at `gpa`.
    pub fn write_at(&self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let p = self.ptr(gpa, data.len())?;
        // SAFETY: p..p+len is inside our mapping (checked) and `data` is a
        // Rust buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Set `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> io::Result<()> {
        let p = self.ptr(gpa, len)?;
        // SAFETY: p..p+len is inside our mapping (checked).
        unsafe { std::ptr::write_bytes(p, byte, len) };
        Ok(())
    }

    /// One byte at `gpa`, read volatile (the device writes status bytes).
    pub fn read_u8(&self, gpa: u64) -> io::Result<u8> {
        let p = self.ptr(gpa, 1)?;
        // SAFETY: p is inside our mapping (checked); a volatile read of a u8
        // has no alignment requirement.
        Ok(unsafe { std::ptr::read_volatile(p) })
    }

    /// `len` bytes aligned to `align` (a power of two), zeroed, from the free
    /// ranges inside the memory table.
    pub fn alloc(self: &Arc<Self>, len: u64, align: u64) -> io::Result<GuestBuf> {
        let len = len.max(1);
        let align = align.max(1);
        assert!(align.is_power_of_two(), "alignment {align} is not a power of two");
        let mut free = self.free.lock().expect("allocator lock");
        let found = free.iter().find_map(|(&start, &flen)| {
            let at = start.div_ceil(align) * align;
            (at + len <= start + flen).then_some((start, flen, at))
        });
        let Some((start, flen, at)) = found else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "guest memory ({} bytes) has no free {len} bytes aligned to {align}",
                    self.size
                ),
            ));
        };
        free.remove(&start);
        if at > start {
            free.insert(start, at - start);
        }
        if at + len < start + flen {
            free.insert(at + len, start + flen - at - len);
        }
        drop(free);
        self.fill(at, len as usize, 0)?;
        Ok(GuestBuf {
            mem: self.clone(),
            gpa: at,
            len,
        })
    }

    fn release(&self, gpa: u64, len: u64) {
        let mut free = self.free.lock().expect("allocator lock");
        let (mut start, mut len) = (gpa, len);
        if let Some((&ps, &pl)) = free.range(..start).next_back() {
            if ps + pl == start {
                free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = free.get(&(start + len)) {
            free.remove(&(start + len));
            len += nl;
        }
        free.insert(start, len);
    }

    /// Free bytes left for [`alloc`](Self::alloc).
    pub fn free_bytes(&self) -> u64 {
        self.free.lock().expect("allocator lock").values().sum()
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: base/size are the mapping made in `new`; every GuestBuf
        // holds an Arc to us, so nothing borrows the mapping any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) };
    }
}

/// A range of guest memory owned by one user (from [`GuestMem::alloc`]),
/// returned to the allocator on drop.
///
/// Its bytes are shared with the device: the accessors are meant for when no
/// request naming the buffer is in flight (fill before submitting, read after
/// completion). While one is in flight the device may change the bytes under
/// a `&[u8]`; they stay plain bytes, but the contents are then undefined.
pub struct GuestBuf {
    mem: Arc<GuestMem>,
    gpa: u64,
    len: u64,
}

impl std::fmt::Debug for GuestBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestBuf({:#x}+{})", self.gpa, self.len)
    }
}

impl GuestBuf {
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The whole buffer as one request segment.
    pub fn seg(&self) -> Seg {
        self.sub(0, self.len as u32)
    }
    /// `len` bytes at `off` of the buffer as a segment.
    pub fn sub(&self, off: u64, len: u32) -> Seg {
        assert!(
            off + len as u64 <= self.len,
            "segment {off}+{len} outside a {}-byte buffer",
            self.len
        );
        Seg {
            gpa: self.gpa + off,
            len,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is inside the mapping (alloc checked it), the
        // allocator gave it to this GuestBuf alone, and the mapping outlives
        // the borrow (we hold an Arc). The device may write it only while a
        // request naming it is in flight (see the type's documentation); u8
        // has no invalid values.
        unsafe { std::slice::from_raw_parts(self.mem.base.as_ptr().add(self.gpa as usize), self.len as usize) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only Rust
        // reference to the range.
        unsafe { std::slice::from_raw_parts_mut(self.mem.base.as_ptr().add(self.gpa as usize), self.len as usize) }
    }
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }
}

impl Drop for GuestBuf {
    fn drop(&mut self) {
        self.mem.release(self.gpa, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesce_and_hole() {
        let m = GuestMem::new(1 << 20, Some(0x40000..0x80000)).unwrap();
        assert_eq!(m.regions().len(), 2);
        assert_eq!(m.free_bytes(), (1 << 20) - 0x40000);
        let a = m.alloc(4096, 4096).unwrap();
        let b = m.alloc(0x3f000, 4096).unwrap();
        // The low part is full; the next one lands above the hole.
        let c = m.alloc(100, 64).unwrap();
        assert!(c.gpa() >= 0x80000, "{c:?}");
        assert!(!m.in_table(0x40000, 1) && m.in_table(0x3ffff, 1) && !m.in_table(1 << 20, 1));
        drop((a, b, c));
        assert_eq!(m.free_bytes(), (1 << 20) - 0x40000);
        let big = m.alloc(0x40000, 4096).unwrap();
        assert_eq!(big.gpa(), 0);
        let mut x = m.alloc(16, 8).unwrap();
        x.as_mut_slice().copy_from_slice(&[7; 16]);
        let mut back = [0u8; 16];
        m.read_at(x.gpa(), &mut back).unwrap();
        assert_eq!(back, [7; 16]);
        assert!(m.read_at(m.size() - 1, &mut back).is_err());
    }
}
