//! `uring`: a file or block device through the reactor's io_uring, opened
//! `O_DIRECT`, with the reactor's buffer arena as a registered (fixed) buffer
//! and the file in the ring's registered-file table.
//!
//! Polled completions (IOPOLL): when the file's block device has poll queues
//! (`/sys/dev/block/M:m/queue/io_poll` is 1), reads and writes go to the
//! reactor's IOPOLL ring and complete without an interrupt; flush, unmap,
//! write-zeroes (IOPOLL rings refuse them) and FUA writes (their completion
//! waits for a journal commit) stay on the interrupt ring. If the
//! kernel answers a polled request with `EOPNOTSUPP` (a loop device, a
//! filesystem without `iopoll`, a queue without poll support), that request
//! is resubmitted on the interrupt ring and the bdev stops using IOPOLL: a
//! clean fallback, never an error seen by the caller.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::slab::Slab;
use super::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest};
use crate::iobuf::IoBuf;
use crate::uring::{Ring, Route};

/// Whether to use polled completions (IORING_SETUP_IOPOLL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Iopoll {
    /// Where the device advertises poll queues (sysfs `queue/io_poll`).
    #[default]
    Auto,
    /// Try it on any file; fall back on the first `EOPNOTSUPP`.
    On,
    Off,
}

impl std::str::FromStr for Iopoll {
    type Err = super::IopollError;
    fn from_str(s: &str) -> Result<Iopoll, super::IopollError> {
        match s {
            "auto" => Ok(Iopoll::Auto),
            "on" => Ok(Iopoll::On),
            "off" => Ok(Iopoll::Off),
            o => Err(super::IopollError(o.to_owned())),
        }
    }
}

/// How to open the backing file.
#[derive(Debug, Clone, Default)]
pub struct UringOpts {
    /// Create (or grow) a regular file to this many bytes.
    pub create_size: Option<u64>,
    /// Open without O_DIRECT (page cache). For filesystems without it.
    pub buffered: bool,
    pub iopoll: Iopoll,
}

/// Does the block device holding (or being) this file have poll queues?
fn device_polls(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition has no queue of its own: its parent's is one level up.
    ["queue/io_poll", "../queue/io_poll"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{base}/{q}")).ok())
        .is_some_and(|v| v.trim() == "1")
}

pub struct UringBdev {
    name: String,
    path: PathBuf,
    /// Shared by every channel: each ring registers it once for all of them.
    file: Arc<File>,
    capacity: u64,
    block_size: u32,
    is_block_device: bool,
    /// Opened with O_DIRECT: writes go to the device by DMA.
    direct: bool,
    /// Still using IOPOLL (cleared, for every channel, on the first
    /// `EOPNOTSUPP` from a polled request).
    iopoll: Arc<AtomicBool>,
    /// Requests completed through the IOPOLL ring.
    polled_ios: Arc<AtomicU64>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl UringBdev {
    pub fn open(path: &Path, opts: &UringOpts) -> io::Result<UringBdev> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if !opts.buffered {
            oo.custom_flags(libc::O_DIRECT);
        }
        if opts.create_size.is_some() {
            oo.create(true);
        }
        let file = oo
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        UringBdev::from_file(file, path, opts)
    }

    /// A bdev over a file or block device already open (e.g. read-only, opened safely
    /// beneath a directory): `opts.buffered` must say how it was opened (O_DIRECT or
    /// not); `create_size` grows a regular file opened for writing.
    pub fn from_file(file: File, path: &Path, opts: &UringOpts) -> io::Result<UringBdev> {
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let iopoll = !opts.buffered
            && match opts.iopoll {
                Iopoll::Off => false,
                Iopoll::On => true,
                Iopoll::Auto => device_polls(&meta),
            };
        let (capacity, block_size) = if is_block_device {
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 0;
            // SAFETY: both ioctls write one integer of the given type through
            // the pointer, which points at a live local of that type.
            unsafe {
                if libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) != 0
                    || libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut ssz) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            (size, ssz as u32)
        } else {
            if let Some(want) = opts.create_size {
                if meta.len() < want {
                    file.set_len(want)?;
                }
            }
            (file.metadata()?.len(), 512)
        };
        let capacity = capacity / block_size as u64 * block_size as u64;
        if capacity == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: empty device; give a size to create it", path.display()),
            ));
        }
        Ok(UringBdev {
            name: format!("uring:{}", path.display()),
            path: path.to_path_buf(),
            file: Arc::new(file),
            capacity,
            block_size,
            is_block_device,
            direct: !opts.buffered,
            iopoll: Arc::new(AtomicBool::new(iopoll)),
            polled_ios: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads and writes still go through an IOPOLL ring.
    pub fn uses_iopoll(&self) -> bool {
        self.iopoll.load(Ordering::Relaxed)
    }

    /// Requests completed by polling (IOPOLL) so far.
    pub fn polled_ios(&self) -> u64 {
        self.polled_ios.load(Ordering::Relaxed)
    }
}

impl Bdev for UringBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn dma_writes(&self) -> bool {
        self.direct
    }
    fn open_channel(&self, ctx: &ChannelCtx) -> io::Result<Box<dyn Channel>> {
        // One registration of the file per ring, shared by its channels
        // (the channel keeps the file open); a full table means plain
        // descriptors, never a refused channel.
        let file = self.file.clone();
        let fd = file.as_raw_fd();
        let route = ctx
            .ring
            .route()
            .ok_or_else(|| io::Error::other("65536 channels on this reactor's ring"))?;
        let slot = ctx.ring.register_shared_file(fd).ok();
        let polled = if self.uses_iopoll() {
            ctx.iopoll.get_or_init(&ctx.pool).and_then(|ring| {
                let route = ring.route()?;
                let slot = ring.register_shared_file(fd).ok();
                Some(Polled { ring, route, slot })
            })
        } else {
            None
        };
        Ok(Box::new(UringChannel {
            ring: ctx.ring.clone(),
            route,
            polled,
            iopoll: self.iopoll.clone(),
            polled_ios: self.polled_ios.clone(),
            retry: VecDeque::new(),
            file,
            slot,
            is_block_device: self.is_block_device,
            block_size: self.block_size,
            capacity: self.capacity,
            max_io: self.max_io_bytes(),
            slab: Slab::default(),
            ready: VecDeque::new(),
        }))
    }
}

struct InFlight {
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    fua: bool,
    want: u64,
    buf: Option<IoBuf>,
}

/// A channel's place on the reactor's IOPOLL ring.
struct Polled {
    ring: Rc<Ring>,
    route: Route,
    slot: Option<u32>,
}

struct UringChannel {
    ring: Rc<Ring>,
    route: Route,
    polled: Option<Polled>,
    iopoll: Arc<AtomicBool>,
    polled_ios: Arc<AtomicU64>,
    /// Slab entries refused by the IOPOLL ring, waiting to be resubmitted on
    /// the interrupt ring.
    retry: VecDeque<usize>,
    file: Arc<File>,
    /// The file's registered slot on `ring`, if the table had room.
    slot: Option<u32>,
    is_block_device: bool,
    block_size: u32,
    capacity: u64,
    max_io: u64,
    slab: Slab<InFlight>,
    ready: VecDeque<IoCompletion>,
}

impl UringChannel {
    fn complete_now(&mut self, req: IoRequest, result: Result<(), IoError>) {
        self.ready.push_back(IoCompletion {
            tag: req.tag,
            op: req.op,
            result,
            buf: req.buf,
        });
    }

    /// Discard / zero a block-device range with the synchronous ioctls
    /// (rare operations; io_uring has no opcode for them before 6.x).
    fn blkdev_range(&self, op: IoOp, offset: u64, len: u64) -> Result<(), IoError> {
        let range: [u64; 2] = [offset, len];
        let req = if op == IoOp::Unmap { BLKDISCARD } else { BLKZEROOUT };
        // SAFETY: both ioctls read a [u64; 2] through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(IoError::Device {
                errno: io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
            })
        }
    }
}

impl Channel for UringChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if let Err(e) = validate(&req, self.block_size, self.capacity, self.max_io) {
            self.complete_now(req, Err(e));
            return Ok(());
        }
        if self.is_block_device && matches!(req.op, IoOp::Unmap | IoOp::WriteZeroes) {
            let r = self.blkdev_range(req.op, req.offset, req.len);
            self.complete_now(req, r);
            return Ok(());
        }
        let want = req.bytes();
        let idx = self.slab.insert_with(|| InFlight {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            fua: req.fua,
            want,
            buf: req.buf,
        });
        let f = self.slab.get_mut(idx).expect("just inserted");
        let polled = self
            .polled
            .as_ref()
            .filter(|_| matches!(f.op, IoOp::Read | IoOp::Write) && !f.fua && self.iopoll.load(Ordering::Relaxed));
        let pushed = match polled {
            // SAFETY: see `entry`; the slab keeps the buffer until reaped.
            Some(p) => unsafe {
                p.ring
                    .push(&p.route, idx as u64, entry(f, &p.ring, p.slot, self.file.as_raw_fd()))
            },
            // SAFETY: as above.
            None => unsafe {
                self.ring.push(
                    &self.route,
                    idx as u64,
                    entry(f, &self.ring, self.slot, self.file.as_raw_fd()),
                )
            },
        };
        if pushed && polled.is_none() {
            self.ring.note_payload(want as usize);
        }
        if !pushed {
            let f = self.slab.remove(idx).expect("just inserted");
            return Err(IoRequest {
                tag: f.tag,
                op: f.op,
                offset: f.offset,
                len: f.len,
                fua: f.fua,
                buf: f.buf,
                lent: None,
                scratch: false,
            });
        }
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        if !self.slab.is_empty() {
            // Requests queued since the reactor's last flush go to the kernel
            // now (one syscall for the batch), so a caller polling in a loop
            // always makes progress. On the IOPOLL ring this is also the poll.
            if let Some(p) = &self.polled {
                let _ = p.ring.flush();
                p.ring.reap();
            }
            let _ = self.ring.flush();
        }
        self.ring.reap();
        let mut n = self.ready.len();
        out.extend(self.ready.drain(..));
        loop {
            let (idx, res) = match self.route.pop() {
                Some(c) => c,
                None => match self.polled.as_ref().and_then(|p| p.route.pop()) {
                    Some((idx, res)) if res == -libc::EOPNOTSUPP => {
                        // This file cannot complete by polling: stop trying
                        // (for every channel of the bdev) and resubmit.
                        self.iopoll.store(false, Ordering::Relaxed);
                        self.retry.push_back(idx as usize);
                        continue;
                    }
                    Some(c) => {
                        self.polled_ios.fetch_add(1, Ordering::Relaxed);
                        c
                    }
                    None => break,
                },
            };
            let f = self.slab.remove(idx as usize).expect("completion for a live slot");
            let result = if res < 0 {
                Err(IoError::Device { errno: -res })
            } else if matches!(f.op, IoOp::Read | IoOp::Write) && (res as u64) < f.want {
                Err(IoError::Short {
                    want: f.want,
                    got: res as u64,
                })
            } else {
                Ok(())
            };
            out.push(IoCompletion {
                tag: f.tag,
                op: f.op,
                result,
                buf: f.buf,
            });
            n += 1;
        }
        while let Some(&idx) = self.retry.front() {
            let f = self.slab.get_mut(idx).expect("retry of a live slot");
            // SAFETY: the slab entry keeps the buffer until this new entry's
            // completion is reaped (the polled one has completed).
            if !unsafe {
                self.ring.push(
                    &self.route,
                    idx as u64,
                    entry(f, &self.ring, self.slot, self.file.as_raw_fd()),
                )
            } {
                break; // SQ full: try again on the next poll.
            }
            self.retry.pop_front();
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.slab.len() + self.ready.len()
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // Buffers of requests still in the kernel must not be handed back to
        // the pool while the kernel may write them: wait for them. Requests
        // waiting for a resubmission are not in the kernel.
        for idx in self.retry.drain(..) {
            self.slab.free(idx);
        }
        let mut spins = 0;
        while !self.slab.is_empty() && spins < 10_000 {
            if let Some(p) = &self.polled {
                let _ = p.ring.flush();
                p.ring.reap();
                while let Some((idx, _)) = p.route.pop() {
                    self.slab.free(idx as usize);
                }
            }
            let _ = self.ring.flush();
            if self.ring.in_flight() > 0 {
                let _ = self.ring.wait(std::time::Duration::from_millis(1));
            }
            self.ring.reap();
            while let Some((idx, _)) = self.route.pop() {
                self.slab.free(idx as usize);
            }
            spins += 1;
        }
        if !self.slab.is_empty() {
            // Leak rather than recycle memory the kernel may still write.
            for f in self.slab.drain() {
                std::mem::forget(f.buf);
            }
        }
        if let Some(p) = &self.polled {
            if p.slot.is_some() {
                p.ring.unregister_shared_file(self.file.as_raw_fd());
            }
        }
        if self.slot.is_some() {
            self.ring.unregister_shared_file(self.file.as_raw_fd());
        }
    }
}

/// The body of [`entry`] for one kind of file reference (the crate's
/// file-reference trait is sealed, so this is a macro, not a generic).
macro_rules! entry_on {
    ($f:expr, $ring:expr, $fd:expr) => {{
        let (f, ring, fd) = ($f, $ring, $fd);
        match f.op {
            IoOp::Read => {
                let buf = f.buf.as_mut().expect("validated");
                let (ptr, len) = (buf.as_mut_ptr(), buf.len());
                match ring.fixed_buf(ptr, len) {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len as u32, i).offset(f.offset).build(),
                    None => opcode::Read::new(fd, ptr, len as u32).offset(f.offset).build(),
                }
            }
            IoOp::Write => {
                let buf = f.buf.as_ref().expect("validated");
                let (ptr, len) = (buf.as_ptr(), buf.len());
                let flags = if f.fua { libc::RWF_DSYNC } else { 0 };
                match ring.fixed_buf(ptr, len) {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len as u32, i)
                        .offset(f.offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len as u32)
                        .offset(f.offset)
                        .rw_flags(flags)
                        .build(),
                }
            }
            IoOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Unmap => opcode::Fallocate::new(fd, f.len)
                .offset(f.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes => opcode::Fallocate::new(fd, f.len)
                .offset(f.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
    }};
}

/// The SQE for `f` on `ring`, whose registered-file slot for this file is
/// `slot` (else the plain descriptor `fd`). The entry points into `f.buf`:
/// the caller keeps `f` (in the slab) until the completion is reaped.
fn entry(f: &mut InFlight, ring: &Ring, slot: Option<u32>, fd: RawFd) -> io_uring::squeue::Entry {
    match slot {
        Some(s) => entry_on!(f, ring, types::Fixed(s)),
        None => entry_on!(f, ring, types::Fd(fd)),
    }
}
