//! The clusters one metadata batch fills (first writes and copy-on-writes), staged in
//! memory and written out together before the batch's fdatasync: adjacent clusters in
//! one `pwritev`, each cluster once, whole. A later request of the same batch into a
//! staged cluster merges into its buffer; the parts of a new cluster no request wrote
//! are zeroed only at write-out, so a cluster the batch fills completely is never
//! zeroed first.

use std::fs::File;

/// Bytes per "written" bit: requests are whole 512-byte sectors.
const SECTOR: usize = 512;
/// Buffers kept between batches, in bytes.
const SPARE_BYTES: usize = 32 << 20;
/// Buffers per `pwritev` (well below IOV_MAX).
const RUN_BUFFERS: usize = 64;

/// A page-aligned heap buffer for O_DIRECT I/O of one cluster.
pub(super) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; moving it to the
// metadata thread moves ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, 4096).expect("cluster layout")
    }
    pub(super) fn new(len: usize) -> AlignedBuf {
        // SAFETY: the layout has a non-zero size (a cluster is ≥ 64 KiB).
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        AlignedBuf {
            ptr: std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len))),
            len,
        }
    }
    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our allocation, initialised (zeroed) when made.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub(super) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our allocation; &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

/// One staged cluster.
struct Cluster {
    phys: u64,
    buf: AlignedBuf,
    /// One bit per sector that holds its final bytes; the rest is zeroed at write-out.
    written: Vec<u64>,
}

impl Cluster {
    fn mark(&mut self, off: usize, len: usize) {
        debug_assert!(off.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR));
        for s in off / SECTOR..(off + len) / SECTOR {
            self.written[s / 64] |= 1 << (s % 64);
        }
    }

    /// Zero every sector no request wrote.
    fn zero_unwritten(&mut self) {
        let b = self.buf.as_mut();
        let sectors = b.len() / SECTOR;
        let mut s = 0;
        while s < sectors {
            if self.written[s / 64] == u64::MAX && s % 64 == 0 {
                s += 64;
                continue;
            }
            if self.written[s / 64] & (1 << (s % 64)) == 0 {
                let start = s;
                while s < sectors && self.written[s / 64] & (1 << (s % 64)) == 0 {
                    s += 1;
                }
                b[start * SECTOR..s * SECTOR].fill(0);
            } else {
                s += 1;
            }
        }
    }
}

/// The staged clusters of the batch being prepared.
pub(super) struct Staged {
    cluster: usize,
    clusters: Vec<Cluster>,
    spare: Vec<AlignedBuf>,
}

impl Staged {
    pub(super) fn new(cluster: usize) -> Staged {
        assert!(cluster.is_multiple_of(SECTOR * 64), "cluster size");
        Staged {
            cluster,
            clusters: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Stage physical cluster `phys` as new: all zeros but for what is written into it.
    pub(super) fn take_zeroed(&mut self, phys: u64) -> &mut [u8] {
        self.take(phys, false)
    }

    /// Stage physical cluster `phys` whose every byte the caller fills now (a copy).
    pub(super) fn take_filled(&mut self, phys: u64) -> &mut [u8] {
        self.take(phys, true)
    }

    fn take(&mut self, phys: u64, filled: bool) -> &mut [u8] {
        let buf = self.spare.pop().unwrap_or_else(|| AlignedBuf::new(self.cluster));
        let words = self.cluster / SECTOR / 64;
        self.clusters.push(Cluster {
            phys,
            buf,
            written: vec![if filled { u64::MAX } else { 0 }; words],
        });
        self.clusters.last_mut().expect("just pushed").buf.as_mut()
    }

    /// Put `data` (or zeros, for `None`) at `off` of staged cluster `phys`; false if
    /// `phys` is not staged.
    pub(super) fn merge(&mut self, phys: u64, off: usize, len: usize, data: Option<&[u8]>) -> bool {
        let Some(c) = self.clusters.iter_mut().rev().find(|c| c.phys == phys) else {
            return false;
        };
        let dst = &mut c.buf.as_mut()[off..off + len];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        c.mark(off, len);
        true
    }

    /// Forget what was staged (the batch failed or was written).
    pub(super) fn clear(&mut self) {
        for c in self.clusters.drain(..) {
            if (self.spare.len() + 1) * self.cluster <= SPARE_BYTES {
                self.spare.push(c.buf);
            }
        }
    }

    /// Whether no cluster is staged.
    pub(super) fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Write every staged cluster, runs of adjacent ones as one `pwritev` each.
    pub(super) fn write_out(&mut self, file: &File) -> std::io::Result<()> {
        for c in &mut self.clusters {
            c.zero_unwritten();
        }
        self.clusters.sort_by_key(|c| c.phys);
        let mut i = 0;
        while i < self.clusters.len() {
            let start = self.clusters[i].phys;
            let mut j = i + 1;
            while j < self.clusters.len() && j - i < RUN_BUFFERS && self.clusters[j].phys == start + (j - i) as u64 {
                j += 1;
            }
            let bufs: Vec<&[u8]> = self.clusters[i..j].iter().map(|c| c.buf.as_slice()).collect();
            crate::sys::pwritev_all(file, start * self.cluster as u64, &bufs)?;
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_sectors_of_a_reused_buffer_are_zeroed_and_written_ones_kept() {
        let cl = 64 << 10;
        let mut s = Staged::new(cl);
        // Dirty a buffer, then give it back for reuse.
        s.take_filled(1).fill(0xAB);
        s.clear();
        s.take_zeroed(7);
        assert!(s.merge(7, 512, 1024, Some(&[1u8; 1024])));
        assert!(s.merge(7, 40 * 512, 512, None));
        assert!(s.merge(7, 1024, 512, Some(&[2u8; 512])), "later wins");
        assert!(!s.merge(8, 0, 512, None), "not staged");
        s.take_filled(9).fill(3);
        for c in &mut s.clusters {
            c.zero_unwritten();
        }
        let b = s.clusters[0].buf.as_slice();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(b[512..1024].iter().all(|&x| x == 1));
        assert!(b[1024..1536].iter().all(|&x| x == 2));
        assert!(
            b[1536..].iter().all(|&x| x == 0),
            "the reused buffer's old bytes are gone"
        );
        assert!(
            s.clusters[1].buf.as_slice().iter().all(|&x| x == 3),
            "a copy is kept whole"
        );
    }
}
