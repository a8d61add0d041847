//! `libsealdisk_fio.so`: a fio external I/O engine that runs sealdisk's bdev
//! stack (malloc / null / file backend, plain or under the XTS crypto layer)
//! inside fio, like SPDK's fio plugin. Load it with
//! `ioengine=external:/path/to/libsealdisk_fio.so` (fio 3.33, ioengine_ops
//! version 31).
//!
//! Threading model: every fio job thread (or process) owns a private
//! reactor-like loop: its own io_uring, buffer pool and bdev channels,
//! driven inline from fio's `queue` / `commit` / `getevents` callbacks. No
//! request crosses a thread, nothing locks on the I/O path, and the bdev
//! code runs exactly as on a reactor. Bdevs (the disks) are shared by every
//! job of a process that names the same target (use `thread=1` for jobs to
//! share a RAM disk).
//!
//! Target syntax (the job's `filename`, comma-separated `key=value`):
//! `backend=malloc|null|file`, `size=64M` (malloc/null; file: create/grow),
//! `path=/x` (file; escape `:` as `\:` for fio), `bs=512|4096` (backend
//! block size, malloc/null), `encrypt=512|4096` (stack the crypto layer with
//! that sector size and a fresh random key), `buffered=1` (file without
//! O_DIRECT), `inplace=1` (the crypto layer encrypts each write in the engine's
//! own copy of fio's buffer, which nothing reads again, instead of into a bounce
//! buffer: what an NBD server does with its receive buffers).
//! Example: `filename=backend=malloc,size=256M,encrypt=4096`.
//! See `docs/nbd.md`.
//!
//! fio's structs are used through a handful of field offsets of fio 3.33 on
//! x86-64 (checked against fio's headers; see `docs/nbd.md`), never through
//! `thread_data`, whose layout depends on fio's build configuration.

#![warn(clippy::undocumented_unsafe_blocks)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};

use sealdisk::BufPool;
use sealdisk::CryptoBdev;
use sealdisk::MallocBdev;
use sealdisk::NullBdev;
use sealdisk::Xts;
use sealdisk::{BdevRef, ChannelCtx, IoCompletion, IoError, IoOp, IoQueue, IoRequest, MAX_IO_BYTES};
use sealdisk::{Ring, RingOpts};
use sealdisk::{UringBdev, UringOpts};

/// `FIO_IOOPS_VERSION` of fio 3.33.
pub const FIO_IOOPS_VERSION: c_int = 31;

const FIO_Q_COMPLETED: c_int = 0;
const FIO_Q_QUEUED: c_int = 1;
const FIO_Q_BUSY: c_int = 2;

const FIO_DISKLESSIO: c_int = 1 << 2;
const FIO_NOEXTEND: c_int = 1 << 3;
const FIO_NODISKUTIL: c_int = 1 << 4;
const FIO_NO_OFFLOAD: c_int = 1 << 15;

// enum fio_ddir
const DDIR_READ: c_int = 0;
const DDIR_WRITE: c_int = 1;
const DDIR_TRIM: c_int = 2;
const DDIR_SYNC: c_int = 3;
const DDIR_DATASYNC: c_int = 4;

// Field offsets, fio 3.33, x86-64 (see module docs).
mod off {
    pub const IO_U_FILE: usize = 32;
    pub const IO_U_DDIR: usize = 44;
    pub const IO_U_OFFSET: usize = 72;
    pub const IO_U_XFER_BUF: usize = 104;
    pub const IO_U_XFER_BUFLEN: usize = 112;
    pub const IO_U_RESID: usize = 136;
    pub const IO_U_ERROR: usize = 144;
    pub const FILE_NAME: usize = 40;
    pub const FILE_REAL_SIZE: usize = 48;
    pub const FILE_ENGINE_POS: usize = 168;
}

/// Opaque fio types.
#[repr(C)]
pub struct ThreadData {
    _p: [u8; 0],
}
#[repr(C)]
pub struct IoU {
    _p: [u8; 0],
}
#[repr(C)]
pub struct FioFile {
    _p: [u8; 0],
}

#[repr(C)]
pub struct FlistHead {
    next: *mut FlistHead,
    prev: *mut FlistHead,
}

type TdFn = Option<unsafe extern "C" fn(*mut ThreadData) -> c_int>;
type TdIoUFn = Option<unsafe extern "C" fn(*mut ThreadData, *mut IoU) -> c_int>;
type TdFileFn = Option<unsafe extern "C" fn(*mut ThreadData, *mut FioFile) -> c_int>;
type TdVoidFn = Option<unsafe extern "C" fn(*mut ThreadData)>;

/// `struct ioengine_ops` of fio 3.33 (`ioengines.h`), field for field.
#[repr(C)]
pub struct IoengineOps {
    list: FlistHead,
    name: *const c_char,
    version: c_int,
    flags: c_int,
    dlhandle: *mut c_void,
    setup: TdFn,
    init: TdFn,
    post_init: TdFn,
    prep: TdIoUFn,
    queue: TdIoUFn,
    commit: TdFn,
    getevents: Option<unsafe extern "C" fn(*mut ThreadData, c_uint, c_uint, *const libc::timespec) -> c_int>,
    event: Option<unsafe extern "C" fn(*mut ThreadData, c_int) -> *mut IoU>,
    errdetails: Option<unsafe extern "C" fn(*mut IoU) -> *mut c_char>,
    cancel: TdIoUFn,
    cleanup: TdVoidFn,
    open_file: TdFileFn,
    close_file: TdFileFn,
    invalidate: TdFileFn,
    unlink_file: TdFileFn,
    get_file_size: TdFileFn,
    prepopulate_file: TdFileFn,
    terminate: TdVoidFn,
    iomem_alloc: Option<unsafe extern "C" fn(*mut ThreadData, usize) -> c_int>,
    iomem_free: TdVoidFn,
    io_u_init: TdIoUFn,
    io_u_free: Option<unsafe extern "C" fn(*mut ThreadData, *mut IoU)>,
    get_zoned_model: Option<unsafe extern "C" fn(*mut ThreadData, *mut FioFile, *mut c_int) -> c_int>,
    report_zones: Option<unsafe extern "C" fn(*mut ThreadData, *mut FioFile, u64, *mut c_void, c_uint) -> c_int>,
    reset_wp: Option<unsafe extern "C" fn(*mut ThreadData, *mut FioFile, u64, u64) -> c_int>,
    get_max_open_zones: Option<unsafe extern "C" fn(*mut ThreadData, *mut FioFile, *mut c_uint) -> c_int>,
    option_struct_size: c_int,
    options: *mut c_void,
}

// The layout fio 3.33 expects (sizeof 264, options at 256, dlhandle at 32).
const _: () = assert!(std::mem::size_of::<IoengineOps>() == 264);
const _: () = assert!(std::mem::offset_of!(IoengineOps, options) == 256);
const _: () = assert!(std::mem::offset_of!(IoengineOps, dlhandle) == 32);

struct OpsPtr(*mut IoengineOps);
// SAFETY: the ops table is written once before it is published and then
// only by fio's loader (the dlhandle field), as fio does for its own engines.
unsafe impl Send for OpsPtr {}
// SAFETY: as above.
unsafe impl Sync for OpsPtr {}

static OPS: OnceLock<OpsPtr> = OnceLock::new();

/// The symbol fio's loader looks up (`get_ioengine`, after `ioengine`).
///
/// # Safety
/// `ops` must point to writable storage for one pointer (fio's loader).
#[no_mangle]
pub unsafe extern "C" fn get_ioengine(ops: *mut *mut IoengineOps) {
    let p = OPS.get_or_init(|| {
        OpsPtr(Box::into_raw(Box::new(IoengineOps {
            list: FlistHead {
                next: std::ptr::null_mut(),
                prev: std::ptr::null_mut(),
            },
            name: c"sealdisk".as_ptr(),
            version: FIO_IOOPS_VERSION,
            flags: FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_NO_OFFLOAD,
            dlhandle: std::ptr::null_mut(),
            setup: None,
            init: Some(sd_init),
            post_init: None,
            prep: None,
            queue: Some(sd_queue),
            commit: Some(sd_commit),
            getevents: Some(sd_getevents),
            event: Some(sd_event),
            errdetails: None,
            cancel: None,
            cleanup: Some(sd_cleanup),
            open_file: Some(sd_open_file),
            close_file: Some(sd_close_file),
            invalidate: None,
            unlink_file: None,
            get_file_size: Some(sd_get_file_size),
            prepopulate_file: None,
            terminate: None,
            iomem_alloc: None,
            iomem_free: None,
            io_u_init: None,
            io_u_free: None,
            get_zoned_model: None,
            report_zones: None,
            reset_wp: None,
            get_max_open_zones: None,
            option_struct_size: 0,
            options: std::ptr::null_mut(),
        })))
    });
    // SAFETY: the caller passes a valid out-pointer.
    unsafe { *ops = p.0 };
}

// ---- fio struct access ---------------------------------------------------

/// Read a field of type `T` at byte offset `off` of a fio struct.
///
/// # Safety
/// `base` must point to a live fio struct that has a `T` at `off`.
unsafe fn get<T: Copy>(base: *const c_void, off: usize) -> T {
    // SAFETY: per the function contract.
    unsafe { std::ptr::read_unaligned(base.cast::<u8>().add(off).cast::<T>()) }
}

/// Write a field of type `T` at byte offset `off` of a fio struct.
///
/// # Safety
/// As for [`get`], and the struct must be writable by the engine.
unsafe fn set<T>(base: *mut c_void, off: usize, v: T) {
    // SAFETY: per the function contract.
    unsafe { std::ptr::write_unaligned(base.cast::<u8>().add(off).cast::<T>(), v) }
}

// ---- targets -------------------------------------------------------------

/// A parsed `filename`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub backend: Backend,
    pub size: Option<u64>,
    pub block_size: u32,
    pub encrypt: Option<u32>,
    pub buffered: bool,
    /// Writes are `scratch`: encrypted in place (see the module docs).
    pub inplace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Malloc,
    Null,
    File(String),
}

use sealdisk::parse_size;

/// Parse a target spec (see the module docs).
pub fn parse_target(spec: &str) -> Result<Target, String> {
    let mut backend = "malloc".to_string();
    let mut path = None;
    let mut t = Target {
        backend: Backend::Malloc,
        size: None,
        block_size: 512,
        encrypt: None,
        buffered: false,
        inplace: false,
    };
    for kv in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("sealdisk target {spec:?}: expected key=value, got {kv:?}"))?;
        match k {
            "backend" => backend = v.to_string(),
            "size" => t.size = Some(parse_size(v).map_err(|e| e.to_string())?),
            "path" => path = Some(v.to_string()),
            "bs" => t.block_size = v.parse().map_err(|_| format!("bad bs {v:?}"))?,
            "encrypt" => {
                let ss: u32 = v.parse().map_err(|_| format!("bad encrypt sector size {v:?}"))?;
                t.encrypt = (ss != 0).then_some(ss);
            }
            "buffered" => t.buffered = v == "1" || v == "true",
            "inplace" => t.inplace = v == "1" || v == "true",
            _ => return Err(format!("sealdisk target {spec:?}: unknown key {k:?}")),
        }
    }
    t.backend = match backend.as_str() {
        "malloc" => Backend::Malloc,
        "null" => Backend::Null,
        "file" => Backend::File(path.ok_or("backend=file needs path=")?),
        b => return Err(format!("unknown backend {b:?}: use malloc, null or file")),
    };
    if matches!(t.backend, Backend::Malloc | Backend::Null) && t.size.is_none() {
        return Err(format!("backend={backend} needs size="));
    }
    if ![512, 4096].contains(&t.block_size) {
        return Err(format!("bs={} not supported: use 512 or 4096", t.block_size));
    }
    Ok(t)
}

fn open_target(t: &Target) -> Result<BdevRef, String> {
    let base: BdevRef = match &t.backend {
        Backend::Malloc => Arc::new(MallocBdev::new("fio-malloc", t.size.unwrap_or(0), t.block_size)),
        Backend::Null => Arc::new(NullBdev::new("fio-null", t.size.unwrap_or(0), t.block_size)),
        Backend::File(p) => Arc::new(
            UringBdev::open(
                std::path::Path::new(p),
                &UringOpts {
                    create_size: t.size,
                    buffered: t.buffered,
                    ..UringOpts::default()
                },
            )
            .map_err(|e| e.to_string())?,
        ),
    };
    match t.encrypt {
        None => Ok(base),
        Some(ss) => {
            let key: [u8; sealdisk::KEY_LEN] = loop {
                let mut k = [0u8; sealdisk::KEY_LEN];
                rand::Rng::fill(&mut rand::thread_rng(), &mut k[..]);
                if k[..32] != k[32..] {
                    break k;
                }
            };
            let xts = Xts::new(&key).map_err(|e| format!("{e:?}"))?;
            Ok(Arc::new(
                CryptoBdev::new(base, Arc::new(xts), ss).map_err(|e| e.to_string())?,
            ))
        }
    }
}

/// The capacity a target will have, without opening it.
fn target_size(t: &Target) -> Result<u64, String> {
    let raw = match &t.backend {
        Backend::Malloc | Backend::Null => t.size.unwrap_or(0) / t.block_size as u64 * t.block_size as u64,
        Backend::File(p) => match std::fs::metadata(p) {
            Ok(m) if m.len() > 0 => t.size.map_or(m.len(), |s| s.max(m.len())),
            _ => t
                .size
                .ok_or_else(|| format!("{p}: missing or empty; give size= to create it"))?,
        },
    };
    let ss = t.encrypt.unwrap_or(1) as u64;
    Ok(raw / ss * ss)
}

/// Disks of this process, by target spec.
fn registry() -> &'static Mutex<HashMap<String, BdevRef>> {
    static R: OnceLock<Mutex<HashMap<String, BdevRef>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn bdev_for(spec: &str) -> Result<BdevRef, String> {
    let mut r = registry().lock().map_err(|_| "registry poisoned".to_string())?;
    if let Some(b) = r.get(spec) {
        return Ok(b.clone());
    }
    let b = open_target(&parse_target(spec)?)?;
    r.insert(spec.to_string(), b.clone());
    Ok(b)
}

// ---- per-thread engine -----------------------------------------------------

struct Engine {
    ctx: ChannelCtx,
    /// One per open file (`engine_pos`): its channel, driven by `IoQueue`.
    queues: Vec<Option<IoQueue>>,
    /// Per channel: its writes may be encrypted in place (`inplace=1`).
    inplace: Vec<bool>,
    tags: Tags,
    events: Vec<*mut IoU>,
}

/// The io_us the engine holds: in flight by tag, and completed ones not yet
/// handed to fio.
struct Tags {
    /// io_u of each tag in flight.
    slots: Vec<*mut IoU>,
    free: Vec<usize>,
    live: usize,
    ready: VecDeque<*mut IoU>,
}

thread_local! {
    /// Engines of the fio jobs running on this thread, by `thread_data`
    /// address (one per fio thread in practice).
    static ENGINES: RefCell<HashMap<usize, Engine>> = RefCell::new(HashMap::new());
}

fn pool_bytes() -> usize {
    std::env::var("SEALDISK_FIO_POOL_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64)
        << 20
}

fn new_engine() -> Result<Engine, String> {
    let pool = BufPool::new(pool_bytes()).map_err(|e| format!("buffer pool: {e}"))?;
    let ring = Ring::new(
        RingOpts {
            entries: 1024,
            ..RingOpts::default()
        },
        &pool,
    )
    .map_err(|e| format!("io_uring: {e}"))?;
    Ok(Engine {
        ctx: ChannelCtx {
            ring: Rc::new(ring),
            iopoll: Default::default(),
            pool,
            // The engine polls from fio's getevents; nothing to wake.
            waker: std::sync::Arc::new(|| {}),
        },
        queues: Vec::new(),
        inplace: Vec::new(),
        tags: Tags {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: VecDeque::new(),
        },
        events: Vec::new(),
    })
}

fn with_engine<R>(td: *mut ThreadData, f: impl FnOnce(&mut Engine) -> R) -> Result<R, String> {
    ENGINES.with(|m| {
        let mut m = m.borrow_mut();
        let e = match m.entry(td as usize) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(new_engine()?),
        };
        Ok(f(e))
    })
}

fn guard<R>(fallback: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn errno_of(e: &IoError) -> u32 {
    match e {
        IoError::Device { errno } => *errno as u32,
        IoError::TooLarge { .. } => libc::EOVERFLOW as u32,
        IoError::Unsupported(_) => libc::EOPNOTSUPP as u32,
        IoError::Short { .. } => libc::EIO as u32,
        _ => libc::EINVAL as u32,
    }
}

impl Tags {
    /// Hand a completion's result (and a read's data) to its io_u and queue it
    /// for `event`.
    fn complete(&mut self, c: IoCompletion) {
        let idx = c.tag as usize;
        let io_u = self.slots[idx];
        self.free.push(idx);
        self.live -= 1;
        let err = match &c.result {
            Ok(()) => 0,
            Err(e) => errno_of(e),
        };
        if let (IoOp::Read, Ok(()), Some(b)) = (c.op, &c.result, &c.buf) {
            // SAFETY: io_u is a live fio io_u in flight (fio keeps it
            // until we return it from `event`); xfer_buf holds
            // xfer_buflen bytes, the length of this read buffer.
            unsafe {
                let dst: *mut u8 = get(io_u.cast(), off::IO_U_XFER_BUF);
                std::ptr::copy_nonoverlapping(b.as_ptr(), dst, b.len());
            }
        }
        // SAFETY: as above; error and resid are engine-writable fields.
        unsafe {
            set::<c_uint>(io_u.cast(), off::IO_U_ERROR, err);
            set::<u64>(io_u.cast(), off::IO_U_RESID, 0);
        }
        self.ready.push_back(io_u);
    }

    /// Complete everything in `v` and give the vector back to `q`.
    fn complete_all(&mut self, q: &mut IoQueue, mut v: Vec<IoCompletion>) {
        for c in v.drain(..) {
            self.complete(c);
        }
        q.recycle(v);
    }
}

impl Engine {
    /// Reap every channel without blocking.
    fn reap(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            let v = q.reap();
            self.tags.complete_all(q, v);
        }
    }
}

// ---- callbacks -------------------------------------------------------------

unsafe extern "C" fn sd_init(td: *mut ThreadData) -> c_int {
    guard(1, || match with_engine(td, |_| ()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sealdisk fio engine: {e}");
            1
        }
    })
}

unsafe extern "C" fn sd_cleanup(td: *mut ThreadData) {
    guard((), || {
        let e = ENGINES.with(|m| m.borrow_mut().remove(&(td as usize)));
        if let Some(mut e) = e {
            // Channels first (a uring channel waits for its requests), then
            // the ring and pool.
            e.queues.clear();
            drop(e);
        }
    })
}

/// The file's target spec.
///
/// # Safety
/// `f` must be a live fio_file.
unsafe fn file_spec(f: *mut FioFile) -> String {
    // SAFETY: file_name is a NUL-terminated string owned by fio.
    unsafe {
        let p: *const c_char = get(f.cast(), off::FILE_NAME);
        if p.is_null() {
            return String::new();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

unsafe extern "C" fn sd_get_file_size(_td: *mut ThreadData, f: *mut FioFile) -> c_int {
    guard(1, || {
        // SAFETY: fio passes a live fio_file.
        let spec = unsafe { file_spec(f) };
        match parse_target(&spec).and_then(|t| target_size(&t)) {
            Ok(size) => {
                // SAFETY: real_file_size is the engine's to set here.
                unsafe { set::<u64>(f.cast(), off::FILE_REAL_SIZE, size) };
                0
            }
            Err(e) => {
                eprintln!("sealdisk fio engine: {e}");
                1
            }
        }
    })
}

unsafe extern "C" fn sd_open_file(td: *mut ThreadData, f: *mut FioFile) -> c_int {
    guard(1, || {
        // SAFETY: fio passes a live fio_file.
        let spec = unsafe { file_spec(f) };
        let inplace = parse_target(&spec).is_ok_and(|t| t.inplace);
        let r = bdev_for(&spec).and_then(|bdev| {
            with_engine(td, |e| -> Result<usize, String> {
                let ch = bdev.open_channel(&e.ctx).map_err(|x| x.to_string())?;
                e.queues.push(Some(IoQueue::new(ch)));
                e.inplace.push(inplace);
                Ok(e.queues.len() - 1)
            })?
        });
        match r {
            Ok(i) => {
                // SAFETY: engine_pos is reserved for the engine.
                unsafe { set::<u64>(f.cast(), off::FILE_ENGINE_POS, i as u64) };
                0
            }
            Err(e) => {
                eprintln!("sealdisk fio engine: {spec}: {e}");
                1
            }
        }
    })
}

unsafe extern "C" fn sd_close_file(td: *mut ThreadData, f: *mut FioFile) -> c_int {
    guard(0, || {
        // SAFETY: engine_pos was set by `sd_open_file`.
        let i: u64 = unsafe { get(f.cast(), off::FILE_ENGINE_POS) };
        let _ = with_engine(td, |e| {
            // Finish what is in flight on this channel before dropping it.
            if let Some(slot) = e.queues.get_mut(i as usize) {
                if let Some(q) = slot.as_mut() {
                    // No deadline: it cannot time out.
                    if let Ok(v) = q.drain(std::time::Duration::MAX, Some(&e.ctx.ring)) {
                        e.tags.complete_all(q, v);
                    }
                }
                *slot = None;
            }
        });
        0
    })
}

fn complete_now(io_u: *mut IoU, err: i32) -> c_int {
    // SAFETY: io_u is the live io_u fio just handed to `queue`.
    unsafe { set::<c_uint>(io_u.cast(), off::IO_U_ERROR, err as c_uint) };
    FIO_Q_COMPLETED
}

unsafe extern "C" fn sd_queue(td: *mut ThreadData, io_u: *mut IoU) -> c_int {
    guard(FIO_Q_COMPLETED, || {
        // SAFETY: fio passes a live io_u with its file set; the fields read
        // are the ones fio fills in before `queue`.
        let (f, ddir, offset, xbuf, xlen) = unsafe {
            (
                get::<*mut FioFile>(io_u.cast(), off::IO_U_FILE),
                get::<c_int>(io_u.cast(), off::IO_U_DDIR),
                get::<u64>(io_u.cast(), off::IO_U_OFFSET),
                get::<*const u8>(io_u.cast(), off::IO_U_XFER_BUF),
                get::<u64>(io_u.cast(), off::IO_U_XFER_BUFLEN),
            )
        };
        // SAFETY: engine_pos was set by `sd_open_file`.
        let chan_idx = unsafe { get::<u64>(f.cast(), off::FILE_ENGINE_POS) } as usize;
        let r = with_engine(td, |e| {
            let Engine {
                ctx,
                queues,
                tags,
                inplace,
                ..
            } = e;
            let Some(Some(q)) = queues.get_mut(chan_idx) else {
                return complete_now(io_u, libc::EBADF);
            };
            let idx = match tags.free.pop() {
                Some(i) => i,
                None => {
                    tags.slots.push(std::ptr::null_mut());
                    tags.slots.len() - 1
                }
            };
            let tag = idx as u64;
            let req = match ddir {
                DDIR_READ | DDIR_WRITE => {
                    if xlen > MAX_IO_BYTES {
                        tags.free.push(idx);
                        return complete_now(io_u, libc::EINVAL);
                    }
                    let Some(mut b) = ctx.pool.alloc(xlen as usize) else {
                        tags.free.push(idx);
                        return if tags.live > 0 {
                            FIO_Q_BUSY
                        } else {
                            complete_now(io_u, libc::ENOMEM)
                        };
                    };
                    b.set_len(xlen as usize);
                    if ddir == DDIR_WRITE {
                        // SAFETY: xfer_buf holds xfer_buflen bytes of data.
                        b.copy_from_slice(unsafe { std::slice::from_raw_parts(xbuf, xlen as usize) });
                        let mut w = IoRequest::write(offset, b, tag);
                        // The copy is ours and never read again.
                        w.scratch = inplace[chan_idx];
                        w
                    } else {
                        IoRequest::read(offset, b, tag)
                    }
                }
                DDIR_TRIM => IoRequest::unmap(offset, xlen, tag),
                DDIR_SYNC | DDIR_DATASYNC => IoRequest::flush(tag),
                _ => {
                    tags.free.push(idx);
                    return complete_now(io_u, libc::EINVAL);
                }
            };
            // Refused with nothing else in flight: it may never go through.
            let refused = match q.submit(req) {
                Ok(()) if q.is_blocked() && tags.live == 0 => q.take_held().is_some(),
                // Taken, or held by the queue and sent first on the next reap.
                Ok(()) => false,
                // The queue already holds one: fio retries after getevents.
                Err(_) => true,
            };
            if refused {
                tags.free.push(idx);
                return if tags.live > 0 {
                    FIO_Q_BUSY
                } else {
                    complete_now(io_u, libc::EAGAIN)
                };
            }
            tags.slots[idx] = io_u;
            tags.live += 1;
            FIO_Q_QUEUED
        });
        r.unwrap_or_else(|_| complete_now(io_u, libc::ENOMEM))
    })
}

unsafe extern "C" fn sd_commit(td: *mut ThreadData) -> c_int {
    guard(0, || {
        let _ = with_engine(td, |e| e.ctx.ring.flush());
        0
    })
}

unsafe extern "C" fn sd_getevents(td: *mut ThreadData, min: c_uint, max: c_uint, t: *const libc::timespec) -> c_int {
    guard(-1, || {
        let deadline = if t.is_null() {
            None
        } else {
            // SAFETY: fio passes a valid timespec when non-null.
            let ts = unsafe { *t };
            Some(std::time::Instant::now() + std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
        };
        with_engine(td, |e| {
            e.events.clear();
            e.reap();
            let min = min as usize;
            // Then wait on each channel in turn (sleeping in the ring while
            // kernel I/O is outstanding) until `min` are ready, nothing is in
            // flight, or the deadline passes.
            for q in e.queues.iter_mut().flatten() {
                let ready = e.tags.ready.len();
                if ready >= min {
                    break;
                }
                let left = deadline.map_or(std::time::Duration::MAX, |d| {
                    d.saturating_duration_since(std::time::Instant::now())
                });
                let v = q.wait(min - ready, left, Some(&e.ctx.ring));
                e.tags.complete_all(q, v);
            }
            let take = e.tags.ready.len().min(max as usize);
            e.events.extend(e.tags.ready.drain(..take));
            e.events.len() as c_int
        })
        .unwrap_or(-1)
    })
}

unsafe extern "C" fn sd_event(td: *mut ThreadData, i: c_int) -> *mut IoU {
    guard(std::ptr::null_mut(), || {
        with_engine(td, |e| {
            e.events.get(i as usize).copied().unwrap_or(std::ptr::null_mut())
        })
        .unwrap_or(std::ptr::null_mut())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs() {
        let t = parse_target("backend=malloc,size=64M,encrypt=4096").unwrap();
        assert_eq!(t.backend, Backend::Malloc);
        assert_eq!(t.size, Some(64 << 20));
        assert_eq!(t.encrypt, Some(4096));
        assert_eq!(target_size(&t).unwrap(), 64 << 20);
        assert!(!t.inplace);
        let t = parse_target("backend=file,path=/tmp/x,size=1g,buffered=1,inplace=1").unwrap();
        assert_eq!(t.backend, Backend::File("/tmp/x".into()));
        assert!(t.buffered);
        assert!(t.inplace);
        assert!(parse_target("backend=malloc").is_err());
        assert!(parse_target("backend=tape,size=1M").is_err());
        assert!(parse_target("size=1M,colour=blue").is_err());
        assert!(parse_target("size=1M,bs=1000").is_err());
    }
}
