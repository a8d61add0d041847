//! I/O buffers: page-aligned chunks of one per-reactor arena.
//!
//! Each reactor owns a [`BufPool`]: one anonymous mapping, registered with the
//! reactor's io_uring as fixed buffer 0, managed as a buddy allocator of
//! power-of-two chunks (4 KiB .. 1 MiB): a free chunk splits to serve a
//! smaller request and merges with its free buddy on release, so any mix of
//! sizes can reuse the whole arena. An [`IoBuf`] owns its chunk and gives it
//! back on drop. The pool is single-threaded (`Rc`): buffers never leave
//! their reactor.
//!
//! An empty pool is back-pressure, not an error: [`BufPool::alloc`] returns
//! `None` and the caller retries after completions free buffers.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;

/// Smallest chunk: one page (O_DIRECT needs 512- or 4096-byte alignment).
pub(crate) const MIN_BUF: usize = 4096;
/// Largest chunk.
pub(crate) const MAX_BUF: usize = 1 << 20;
const CLASSES: usize = 9; // 4 KiB << 0..=8
const CACHE_PER_CLASS: usize = 64;

struct Arena {
    base: NonNull<u8>,
    size: usize,
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` came from the mmap in `BufPool::new` and are
        // unmapped once, here. No IoBuf outlives the arena (each holds an Rc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}

struct PoolState {
    /// Free chunk offsets per order (chunk size = MIN_BUF << order).
    free: [BTreeSet<usize>; CLASSES],
    /// Recently freed chunks per order, reused first without touching the
    /// buddy tree (the data path frees and takes the same sizes over and
    /// over). Bounded, and drained back into the tree when a larger size
    /// cannot be found.
    cache: [Vec<usize>; CLASSES],
    in_use: usize,
    high_water: usize,
}

impl PoolState {
    fn take(&mut self, order: usize) -> Option<usize> {
        if let Some(off) = self.cache[order].pop() {
            return Some(off);
        }
        if !(order..CLASSES).any(|o| !self.free[o].is_empty()) {
            // Cached chunks may merge into what is asked for.
            for o in 0..CLASSES {
                for off in std::mem::take(&mut self.cache[o]) {
                    self.merge(off, o);
                }
            }
        }
        let from = (order..CLASSES).find(|&o| !self.free[o].is_empty())?;
        let off = self.free[from].pop_first().expect("non-empty");
        // Split down to the wanted order, freeing the upper halves.
        for o in (order..from).rev() {
            self.free[o].insert(off + (MIN_BUF << o));
        }
        Some(off)
    }

    fn give(&mut self, off: usize, order: usize) {
        if self.cache[order].len() < CACHE_PER_CLASS {
            self.cache[order].push(off);
        } else {
            self.merge(off, order);
        }
    }

    fn merge(&mut self, mut off: usize, mut order: usize) {
        while order + 1 < CLASSES {
            let buddy = off ^ (MIN_BUF << order);
            if !self.free[order].remove(&buddy) {
                break;
            }
            off = off.min(buddy);
            order += 1;
        }
        self.free[order].insert(off);
    }
}

struct PoolInner {
    arena: Arena,
    state: RefCell<PoolState>,
}

/// A per-reactor pool of aligned I/O buffers. Cloning shares the pool.
#[derive(Clone)]
pub struct BufPool {
    inner: Rc<PoolInner>,
}

/// Statistics of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub arena_bytes: usize,
    pub in_use_bytes: usize,
    pub high_water_bytes: usize,
}

fn class_of(len: usize) -> Option<usize> {
    if len > MAX_BUF {
        return None;
    }
    let size = len.max(MIN_BUF).next_power_of_two();
    Some(size.trailing_zeros() as usize - MIN_BUF.trailing_zeros() as usize)
}

impl BufPool {
    /// A pool over a fresh `size`-byte arena (rounded up to 1 MiB).
    pub fn new(size: usize) -> std::io::Result<BufPool> {
        let size = size.max(MAX_BUF).div_ceil(MAX_BUF) * MAX_BUF;
        // SAFETY: anonymous private mapping; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Buffers hold plaintext of encrypted disks: keep them out of core dumps.
        // SAFETY: madvise on the mapping just made, over its whole length.
        if unsafe { libc::madvise(p, size, libc::MADV_DONTDUMP) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping what we mapped above; nothing refers to it yet.
            unsafe { libc::munmap(p, size) };
            return Err(e);
        }
        let base = NonNull::new(p.cast::<u8>()).expect("mmap returned null");
        Ok(BufPool {
            inner: Rc::new(PoolInner {
                arena: Arena { base, size },
                state: RefCell::new(PoolState {
                    free: {
                        let mut f: [BTreeSet<usize>; CLASSES] = Default::default();
                        f[CLASSES - 1] = (0..size).step_by(MAX_BUF).collect();
                        f
                    },
                    cache: Default::default(),
                    in_use: 0,
                    high_water: 0,
                }),
            }),
        })
    }

    /// The arena as one iovec, for `io_uring_register_buffers`.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.inner.arena.base.as_ptr().cast(),
            iov_len: self.inner.arena.size,
        }
    }

    /// A buffer of `len` bytes (contents unspecified), or `None` when the pool
    /// is exhausted or `len` exceeds `MAX_BUF`.
    // Always inlined: a buffer returned through memory and copied at once
    // stalls the copy (its fields were just written one by one).
    #[inline(always)]
    pub fn alloc(&self, len: usize) -> Option<IoBuf> {
        let class = class_of(len)?;
        let cap = MIN_BUF << class;
        let mut st = self.inner.state.borrow_mut();
        let off = st.take(class)?;
        st.in_use += cap;
        st.high_water = st.high_water.max(st.in_use);
        drop(st);
        Some(IoBuf {
            // SAFETY: off + cap <= arena size, so the pointer is in bounds.
            ptr: unsafe { NonNull::new_unchecked(self.inner.arena.base.as_ptr().add(off)) },
            len_class: pack(len, class),
            pool: self.inner.clone(),
        })
    }

    /// A zero-filled buffer.
    pub fn alloc_zeroed(&self, len: usize) -> Option<IoBuf> {
        let mut b = self.alloc(len)?;
        b.fill(0);
        Some(b)
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.borrow();
        PoolStats {
            arena_bytes: self.inner.arena.size,
            in_use_bytes: st.in_use,
            high_water_bytes: st.high_water,
        }
    }

    /// Whether `buf` came from this pool (and so is in registered buffer 0).
    pub fn owns(&self, buf: &IoBuf) -> bool {
        Rc::ptr_eq(&self.inner, &buf.pool)
    }
}

/// An aligned I/O buffer owned by one request at a time.
///
/// Three words (it travels in every request and completion): the capacity
/// follows from the size class and the arena offset from the pointer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    /// Usable length (at most [`MAX_BUF`], the low 32 bits) and size class
    /// (capacity `MIN_BUF << class`, the high bits) in one word: written with
    /// one store, so copying a buffer just made never waits on two (a stall
    /// of ~5 ns a request on the data path).
    len_class: u64,
    pool: Rc<PoolInner>,
}

/// [`IoBuf::len_class`] of a buffer of `len` bytes in size class `class`.
#[inline]
fn pack(len: usize, class: usize) -> u64 {
    len as u64 | (class as u64) << 32
}

impl IoBuf {
    /// Size class: capacity is `MIN_BUF << class`.
    #[inline]
    fn class(&self) -> usize {
        (self.len_class >> 32) as usize
    }

    /// Usable length (≤ capacity).
    #[inline]
    pub fn len(&self) -> usize {
        self.len_class as u32 as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        MIN_BUF << self.class()
    }

    /// Change the usable length (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        let cap = self.capacity();
        assert!(len <= cap, "IoBuf::set_len({len}) beyond capacity {cap}");
        self.len_class = pack(len, self.class());
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is inside the arena chunk this IoBuf owns
        // exclusively; the arena lives while `pool` (an Rc) does.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let off = self.ptr.as_ptr() as usize - self.pool.arena.base.as_ptr() as usize;
        let mut st = self.pool.state.borrow_mut();
        st.in_use -= self.capacity();
        st.give(off, self.class());
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len())
            .field("cap", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arena's mapping is marked "do not dump" (VmFlags `dd` in smaps): buffers
    /// hold plaintext of encrypted disks and must not reach a core dump.
    #[test]
    fn the_arena_is_excluded_from_core_dumps() {
        let pool = BufPool::new(4 << 20).unwrap();
        let base = pool.iovec().iov_base as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_arena = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                        in_arena = a <= base && base < b;
                        continue;
                    }
                }
            }
            if in_arena {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.to_string());
                }
            }
        }
        let flags = flags.expect("the arena's mapping is in smaps");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "VmFlags:{flags}");
    }

    #[test]
    fn a_buffer_is_three_words() {
        assert_eq!(std::mem::size_of::<IoBuf>(), 24);
        assert_eq!(std::mem::size_of::<Option<IoBuf>>(), 24);
    }

    #[test]
    fn alloc_free_reuse_and_exhaustion() {
        let pool = BufPool::new(2 << 20).unwrap();
        let a = pool.alloc(4096).unwrap();
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        let b = pool.alloc(5000).unwrap();
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % 8192, 0);
        let pa = a.as_ptr();
        drop(a);
        let c = pool.alloc(100).unwrap();
        assert_eq!(c.as_ptr(), pa, "freed chunk is reused");
        assert!(pool.alloc(MAX_BUF + 1).is_none());
        let big = pool.alloc(MAX_BUF).unwrap();
        assert!(pool.alloc(MAX_BUF).is_none(), "arena exhausted is back-pressure");
        drop(big);
        assert!(pool.alloc(MAX_BUF).is_some());
        assert!(pool.owns(&c));
    }

    #[test]
    fn buddies_merge_so_any_size_can_reuse_the_arena() {
        let pool = BufPool::new(1 << 20).unwrap();
        let smalls: Vec<_> = std::iter::from_fn(|| pool.alloc(4096)).collect();
        assert_eq!(smalls.len(), 256);
        assert!(pool.alloc(8192).is_none());
        drop(smalls);
        let big = pool.alloc(1 << 20).expect("freed 4 KiB chunks merge back into 1 MiB");
        drop(big);
        let quarters: Vec<_> = std::iter::from_fn(|| pool.alloc(256 << 10)).collect();
        assert_eq!(quarters.len(), 4);
        drop(quarters);
        assert_eq!(pool.stats().in_use_bytes, 0);
        assert!(pool.alloc(4096).is_some());
    }
}
