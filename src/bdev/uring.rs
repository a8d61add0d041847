//! `uring`: a file or block device through the reactor's io_uring, opened
//! `O_DIRECT`, with the reactor's buffer arena as a registered (fixed) buffer
//! and the file in the ring's registered-file table.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use io_uring::{opcode, types};

use super::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest};
use crate::iobuf::IoBuf;
use crate::uring::{Ring, Route};

/// How to open the backing file.
#[derive(Debug, Clone, Default)]
pub struct UringOpts {
    /// Create (or grow) a regular file to this many bytes.
    pub create_size: Option<u64>,
    /// Open without O_DIRECT (page cache). For filesystems without it.
    pub buffered: bool,
}

pub struct UringBdev {
    name: String,
    path: PathBuf,
    file: File,
    capacity: u64,
    block_size: u32,
    is_block_device: bool,
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
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
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
            file,
            capacity,
            block_size,
            is_block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
    fn open_channel(&self, ctx: &ChannelCtx) -> io::Result<Box<dyn Channel>> {
        // Each channel gets its own descriptor so its registered-file slot
        // lives and dies with the channel.
        let file = self.file.try_clone()?;
        let slot = ctx.ring.register_file(file.as_raw_fd())?;
        Ok(Box::new(UringChannel {
            ring: ctx.ring.clone(),
            route: ctx.ring.route(),
            file,
            slot,
            is_block_device: self.is_block_device,
            block_size: self.block_size,
            capacity: self.capacity,
            max_io: self.max_io_bytes(),
            slab: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: VecDeque::new(),
        }))
    }
}

struct InFlight {
    tag: u64,
    op: IoOp,
    want: u64,
    buf: Option<IoBuf>,
}

struct UringChannel {
    ring: Rc<Ring>,
    route: Route,
    file: File,
    slot: u32,
    is_block_device: bool,
    block_size: u32,
    capacity: u64,
    max_io: u64,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    live: usize,
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
    fn submit(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if let Err(e) = validate(&req, self.block_size, self.capacity, self.max_io) {
            self.complete_now(req, Err(e));
            return Ok(());
        }
        if self.is_block_device && matches!(req.op, IoOp::Unmap | IoOp::WriteZeroes) {
            let r = self.blkdev_range(req.op, req.offset, req.len);
            self.complete_now(req, r);
            return Ok(());
        }
        let fd = types::Fixed(self.slot);
        let entry = match req.op {
            IoOp::Read => {
                let buf = req.buf.as_mut().expect("validated");
                let (ptr, len) = (buf.as_mut_ptr(), buf.len());
                match self.ring.fixed_buf(ptr, len) {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len as u32, i)
                        .offset(req.offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len as u32).offset(req.offset).build(),
                }
            }
            IoOp::Write => {
                let buf = req.buf.as_ref().expect("validated");
                let (ptr, len) = (buf.as_ptr(), buf.len());
                let flags = if req.fua { libc::RWF_DSYNC } else { 0 };
                match self.ring.fixed_buf(ptr, len) {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len as u32, i)
                        .offset(req.offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len as u32)
                        .offset(req.offset)
                        .rw_flags(flags)
                        .build(),
                }
            }
            IoOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Unmap => opcode::Fallocate::new(fd, req.len)
                .offset(req.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes => opcode::Fallocate::new(fd, req.len)
                .offset(req.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        // SAFETY: the buffer the entry points at is moved into the slab entry
        // below and stays there (not dropped, not moved out) until `poll`
        // reaps this entry's completion. IoBuf memory is in the arena, whose
        // address does not change when the IoBuf value moves.
        let pushed = unsafe { self.ring.push(&self.route, idx as u64, entry) };
        if !pushed {
            self.free.push(idx);
            return Err(req);
        }
        let want = req.bytes();
        self.slab[idx] = Some(InFlight {
            tag: req.tag,
            op: req.op,
            want,
            buf: req.buf,
        });
        self.live += 1;
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        if self.live > 0 {
            // Requests queued since the reactor's last flush go to the kernel
            // now (one syscall for the batch), so a caller polling in a loop
            // always makes progress.
            let _ = self.ring.flush();
        }
        self.ring.reap();
        let mut n = self.ready.len();
        out.extend(self.ready.drain(..));
        while let Some((idx, res)) = self.route.pop() {
            let f = self.slab[idx as usize].take().expect("completion for a live slot");
            self.free.push(idx as usize);
            self.live -= 1;
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
        n
    }

    fn in_flight(&self) -> usize {
        self.live + self.ready.len()
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // Buffers of requests still in the kernel must not be handed back to
        // the pool while the kernel may write them: wait for them.
        let mut spins = 0;
        while self.live > 0 && spins < 10_000 {
            let _ = self.ring.flush();
            let _ = self.ring.wait(std::time::Duration::from_millis(1));
            self.ring.reap();
            while let Some((idx, _)) = self.route.pop() {
                if self.slab[idx as usize].take().is_some() {
                    self.live -= 1;
                }
            }
            spins += 1;
        }
        if self.live > 0 {
            // Leak rather than recycle memory the kernel may still write.
            for f in self.slab.drain(..).flatten() {
                std::mem::forget(f.buf);
            }
        }
        self.ring.unregister_file(self.slot);
    }
}
