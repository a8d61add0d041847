//! Ceph RBD client: a safe API over the few librados/librbd calls sealdisk
//! needs ([`ffi`], loaded at run time). [`Cluster`] is a connected librados
//! handle, [`IoCtx`] a pool, [`Image`] an open RBD image; [`Completion`] an
//! AIO completion without a callback, found again by polling the image
//! ([`Image::poll_io_events`]) after its eventfd fires.
//!
//! Handles keep what they were made from alive (an image its pool, a pool its
//! cluster), so dropping them in any order is safe. Errors keep librbd's
//! negative errno ([`RbdError::Call`]).

pub mod ffi;

use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt;
use std::os::fd::RawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

/// Why a Ceph call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RbdError {
    /// `librados.so.2` / `librbd.so.1` (or one of their symbols) is missing.
    Load(ffi::LoadError),
    /// A name given to Ceph holds a NUL byte.
    BadName(String),
    /// A call returned a negative errno (kept as returned, e.g. -2).
    Call { call: &'static str, errno: i32 },
    /// A value read back (metadata) is not UTF-8.
    NotUtf8 { key: String },
}

impl RbdError {
    /// The positive errno of a failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { errno, .. } => Some(-errno),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
    pub fn is_busy(&self) -> bool {
        self.errno() == Some(libc::EBUSY)
    }
}

impl fmt::Display for RbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RbdError::Load(e) => write!(
                f,
                "Ceph client libraries not available ({e}); install librbd1 and librados2"
            ),
            RbdError::BadName(n) => write!(f, "name {n:?} holds a NUL byte"),
            RbdError::Call { call, errno } => {
                write!(f, "{call}: {} ({errno})", std::io::Error::from_raw_os_error(-errno))
            }
            RbdError::NotUtf8 { key } => write!(f, "image metadata {key:?} is not UTF-8"),
        }
    }
}

impl std::error::Error for RbdError {}

pub type Result<T> = std::result::Result<T, RbdError>;

fn api() -> Result<&'static ffi::Api> {
    ffi::api().map_err(RbdError::Load)
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| RbdError::BadName(s.to_string()))
}

fn check(call: &'static str, rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(RbdError::Call { call, errno: rc })
    } else {
        Ok(rc)
    }
}

/// Client settings sealdisk connects with, over the cluster's ceph.conf:
/// a discard of part of an object zeroes that part (the bdev contract: a
/// discarded range reads as zeros), and a request to an unreachable cluster
/// fails after 30 s instead of waiting forever. An option whose value starts
/// with `?` is a default: it applies only where ceph.conf leaves the option at
/// librados' own default (`0`: wait forever), so a ceph.conf may set its own
/// timeouts.
///
/// Options whose value starts with `~` trim librbd's work per I/O and apply only
/// where ceph.conf does not name the option at all (in any section), so a
/// ceph.conf that sets one keeps its value: no librbd cache (sealdisk flushes
/// and encrypts above it; the guest has its own), no per-object I/O scheduler,
/// requests handed to librbd's dispatch in the calling (reactor) thread rather
/// than queued for its op thread, and no objecter throttle (one that is full
/// would block that thread; sealdisk bounds what is in flight itself).
pub const DISK_OPTIONS: &[(&str, &str)] = &[
    ("rbd_skip_partial_discard", "false"),
    ("rados_osd_op_timeout", "?30"),
    ("rados_mon_op_timeout", "?30"),
    ("rbd_cache", "~false"),
    ("rbd_io_scheduler", "~none"),
    ("rbd_non_blocking_aio", "~false"),
    ("objecter_inflight_ops", "~0"),
    ("objecter_inflight_op_bytes", "~0"),
];

/// The option names a ceph.conf's text sets (any section), spelled as librados
/// spells them (`rbd cache` and `rbd-cache` are `rbd_cache`).
fn conf_names(text: &str) -> std::collections::HashSet<String> {
    text.lines()
        .map(|l| l.trim())
        .filter(|l| !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| {
            k.trim()
                .to_ascii_lowercase()
                .split([' ', '\t', '-', '_'])
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join("_")
        })
        .filter(|k| !k.is_empty())
        .collect()
}

/// Whether the Ceph client libraries can be loaded here.
pub fn available() -> Result<()> {
    api().map(|_| ())
}

struct ClusterInner {
    api: &'static ffi::Api,
    h: ffi::Rados,
}

// SAFETY: a connected `rados_t` may be used from any thread (librados is
// thread-safe); the handle is only shut down in Drop, when no clone is left.
unsafe impl Send for ClusterInner {}
// SAFETY: as above.
unsafe impl Sync for ClusterInner {}

impl Drop for ClusterInner {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every IoCtx/Image
        // made from it holds this Arc, so none is left.
        unsafe { (self.api.rados_shutdown)(self.h) }
    }
}

/// A connected librados client.
#[derive(Clone)]
pub struct Cluster(Arc<ClusterInner>);

impl Cluster {
    /// Connect as `client.admin` with the settings of `conf` (a ceph.conf),
    /// then `options` on top (name, value).
    pub fn connect(conf: &Path, options: &[(&str, &str)]) -> Result<Cluster> {
        let api = api()?;
        let mut h: ffi::Rados = std::ptr::null_mut();
        // SAFETY: rados_create writes a handle into `h`; a NULL id means
        // client.admin.
        check("rados_create", unsafe { (api.rados_create)(&mut h, std::ptr::null()) })?;
        // From here Drop shuts the handle down on every error path.
        let inner = ClusterInner { api, h };
        let path = cstr(&conf.to_string_lossy())?;
        // SAFETY: a live handle and a NUL-terminated path.
        check("rados_conf_read_file", unsafe {
            (api.rados_conf_read_file)(inner.h, path.as_ptr())
        })?;
        // Unreadable here: librados read it above, so it is only the names that are
        // unknown; then no `~` option applies.
        let named = std::fs::read_to_string(conf).ok().map(|t| conf_names(&t));
        for (k, v) in options {
            if let Some(tuned) = v.strip_prefix('~') {
                if named.as_ref().is_none_or(|n| n.contains(*k)) {
                    continue;
                }
                let (kc, vc) = (cstr(k)?, cstr(tuned)?);
                // SAFETY: a live handle and two NUL-terminated strings.
                check("rados_conf_set", unsafe {
                    (api.rados_conf_set)(inner.h, kc.as_ptr(), vc.as_ptr())
                })?;
                continue;
            }
            let v = match v.strip_prefix('?') {
                Some(default) => {
                    let kc = cstr(k)?;
                    let mut buf = [0 as c_char; 64];
                    // SAFETY: a live handle, a NUL-terminated name; librados
                    // writes at most `buf.len()` bytes, NUL-terminated.
                    let rc = unsafe { (api.rados_conf_get)(inner.h, kc.as_ptr(), buf.as_mut_ptr(), buf.len()) };
                    check("rados_conf_get", rc)?;
                    let cur: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                    if cur != b"0" {
                        continue;
                    }
                    default
                }
                None => v,
            };
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: a live handle and two NUL-terminated strings.
            check("rados_conf_set", unsafe {
                (api.rados_conf_set)(inner.h, k.as_ptr(), v.as_ptr())
            })?;
        }
        // SAFETY: a configured, not yet connected handle.
        check("rados_connect", unsafe { (api.rados_connect)(inner.h) })?;
        Ok(Cluster(Arc::new(inner)))
    }

    /// The value of client option `key` as this connection uses it.
    pub fn conf_get(&self, key: &str) -> Result<String> {
        let k = cstr(key)?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: a live handle, a NUL-terminated name; librados writes at most
        // `buf.len()` bytes, NUL-terminated.
        check("rados_conf_get", unsafe {
            (self.0.api.rados_conf_get)(self.0.h, k.as_ptr(), buf.as_mut_ptr(), buf.len())
        })?;
        let v: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Open pool `name`.
    pub fn ioctx(&self, pool: &str) -> Result<IoCtx> {
        let name = cstr(pool)?;
        let mut io: ffi::IoCtx = std::ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name, and `io` to
        // write the new context into.
        check("rados_ioctx_create", unsafe {
            (self.0.api.rados_ioctx_create)(self.0.h, name.as_ptr(), &mut io)
        })?;
        Ok(IoCtx(Arc::new(IoCtxInner {
            cluster: self.clone(),
            h: io,
            pool: pool.to_string(),
        })))
    }
}

struct IoCtxInner {
    cluster: Cluster,
    h: ffi::IoCtx,
    pool: String,
}

// SAFETY: a `rados_ioctx_t` is thread-safe for the calls used here (image
// create/open/remove/clone); it is destroyed only in Drop, when no clone and
// no image made from it is left.
unsafe impl Send for IoCtxInner {}
// SAFETY: as above.
unsafe impl Sync for IoCtxInner {}

impl Drop for IoCtxInner {
    fn drop(&mut self) {
        // SAFETY: the context came from rados_ioctx_create; nothing else
        // holds it (images hold this Arc).
        unsafe { (self.cluster.0.api.rados_ioctx_destroy)(self.h) }
    }
}

/// Options of a new image (or clone).
#[derive(Debug, Clone, Copy)]
pub struct CreateOpts {
    /// RBD features (`ffi::FEATURE_*`); format 2 is always used.
    pub features: u64,
    /// Object size as a power of two (22 = 4 MiB); `None`: the default.
    pub order: Option<u64>,
}

impl Default for CreateOpts {
    fn default() -> CreateOpts {
        CreateOpts {
            features: ffi::FEATURE_LAYERING | ffi::FEATURE_EXCLUSIVE_LOCK,
            order: None,
        }
    }
}

/// `rbd_image_options_t`, destroyed on drop.
struct Opts {
    api: &'static ffi::Api,
    h: ffi::ImageOptions,
}

impl Opts {
    fn new(api: &'static ffi::Api, o: &CreateOpts) -> Result<Opts> {
        let mut h: ffi::ImageOptions = std::ptr::null_mut();
        // SAFETY: writes a new options handle into `h`.
        unsafe { (api.rbd_image_options_create)(&mut h) };
        let opts = Opts { api, h };
        let set = |k, v| {
            // SAFETY: a live options handle; the option takes a u64.
            check("rbd_image_options_set_uint64", unsafe {
                (api.rbd_image_options_set_uint64)(opts.h, k, v)
            })
        };
        set(ffi::OPT_FORMAT, 2)?;
        set(ffi::OPT_FEATURES, o.features)?;
        if let Some(order) = o.order {
            set(ffi::OPT_ORDER, order)?;
        }
        Ok(opts)
    }
}

impl Drop for Opts {
    fn drop(&mut self) {
        // SAFETY: made by rbd_image_options_create, destroyed once.
        unsafe { (self.api.rbd_image_options_destroy)(self.h) }
    }
}

/// An open pool.
#[derive(Clone)]
pub struct IoCtx(Arc<IoCtxInner>);

impl IoCtx {
    fn api(&self) -> &'static ffi::Api {
        self.0.cluster.0.api
    }

    pub fn pool(&self) -> &str {
        &self.0.pool
    }

    /// Create image `name` of `size` bytes (format 2).
    pub fn create(&self, name: &str, size: u64, opts: &CreateOpts) -> Result<()> {
        let api = self.api();
        let n = cstr(name)?;
        let o = Opts::new(api, opts)?;
        // SAFETY: live context and options, NUL-terminated name.
        check("rbd_create4", unsafe {
            (api.rbd_create4)(self.0.h, n.as_ptr(), size, o.h)
        })?;
        Ok(())
    }

    /// Clone `parent@snap` (a protected snapshot in this pool) as `child`.
    pub fn clone_image(&self, parent: &str, snap: &str, child: &str, opts: &CreateOpts) -> Result<()> {
        let api = self.api();
        let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let o = Opts::new(api, opts)?;
        // SAFETY: live contexts and options, NUL-terminated names.
        check("rbd_clone3", unsafe {
            (api.rbd_clone3)(self.0.h, p.as_ptr(), s.as_ptr(), self.0.h, c.as_ptr(), o.h)
        })?;
        Ok(())
    }

    /// Remove image `name` (fails with EBUSY while it has snapshots or is
    /// open elsewhere, ENOENT when it does not exist).
    pub fn remove(&self, name: &str) -> Result<()> {
        let n = cstr(name)?;
        // SAFETY: live context, NUL-terminated name.
        check("rbd_remove", unsafe { (self.api().rbd_remove)(self.0.h, n.as_ptr()) })?;
        Ok(())
    }

    /// Open image `name` (its head, writable).
    pub fn open(&self, name: &str) -> Result<Image> {
        self.open_at(name, None)
    }

    /// Open image `name` at snapshot `snap` (read-only), or its head.
    pub fn open_at(&self, name: &str, snap: Option<&str>) -> Result<Image> {
        let n = cstr(name)?;
        let s = snap.map(cstr).transpose()?;
        let mut h: ffi::Image = std::ptr::null_mut();
        // SAFETY: live context, NUL-terminated names (a NULL snapshot name:
        // the head), `h` to write the handle into.
        check("rbd_open", unsafe {
            (self.api().rbd_open)(
                self.0.h,
                n.as_ptr(),
                &mut h,
                s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            )
        })?;
        Ok(Image {
            io: self.clone(),
            h,
            name: match snap {
                Some(s) => format!("{name}@{s}"),
                None => name.to_string(),
            },
        })
    }
}

/// An open RBD image. librbd's image calls are thread-safe, so one image is
/// shared by every reactor's channel.
pub struct Image {
    io: IoCtx,
    h: ffi::Image,
    name: String,
}

// SAFETY: librbd serialises access to an image handle internally; every call
// made here is documented as safe from any thread. The handle is closed only
// in Drop (&mut self: no other user left).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image({}/{})", self.io.pool(), self.name)
    }
}

/// What `rbd_stat` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStat {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: i32,
    /// `rbd_data.<id>`: the RADOS objects' name prefix.
    pub block_name_prefix: String,
}

impl Image {
    fn api(&self) -> &'static ffi::Api {
        self.io.api()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stat(&self) -> Result<ImageStat> {
        let mut info = std::mem::MaybeUninit::<ffi::ImageInfo>::zeroed();
        // SAFETY: live image; librbd fills the struct of the given size.
        check("rbd_stat", unsafe {
            (self.api().rbd_stat)(self.h, info.as_mut_ptr(), std::mem::size_of::<ffi::ImageInfo>())
        })?;
        // SAFETY: zero-initialised then filled by rbd_stat: every field is
        // an integer or a char array, valid for any bytes.
        let info = unsafe { info.assume_init() };
        let prefix: Vec<u8> = info
            .block_name_prefix
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(ImageStat {
            size: info.size,
            obj_size: info.obj_size,
            num_objs: info.num_objs,
            order: info.order,
            block_name_prefix: String::from_utf8_lossy(&prefix).into_owned(),
        })
    }

    pub fn size(&self) -> Result<u64> {
        let mut s = 0u64;
        // SAFETY: live image, `s` to write into.
        check("rbd_get_size", unsafe { (self.api().rbd_get_size)(self.h, &mut s) })?;
        Ok(s)
    }

    pub fn features(&self) -> Result<u64> {
        let mut s = 0u64;
        // SAFETY: live image, `s` to write into.
        check("rbd_get_features", unsafe {
            (self.api().rbd_get_features)(self.h, &mut s)
        })?;
        Ok(s)
    }

    /// The image's id (RADOS objects are `rbd_data.<id>.<object no, 16 hex>`).
    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: live image; librbd writes at most `buf.len()` bytes,
        // NUL-terminated.
        check("rbd_get_id", unsafe {
            (self.api().rbd_get_id)(self.h, buf.as_mut_ptr(), buf.len())
        })?;
        let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: live image.
        check("rbd_resize", unsafe { (self.api().rbd_resize)(self.h, size) })?;
        Ok(())
    }

    /// Synchronous read of `buf.len()` bytes at `off` (control plane only).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: live image; librbd writes at most `buf.len()` bytes into
        // `buf` before returning.
        let n = unsafe { (self.api().rbd_read)(self.h, off, buf.len(), buf.as_mut_ptr().cast()) };
        check("rbd_read", n.clamp(i32::MIN as isize, i32::MAX as isize) as c_int).map(|n| n as usize)
    }

    /// Synchronous write of `buf` at `off` (control plane only).
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<usize> {
        // SAFETY: live image; librbd reads `buf.len()` bytes from `buf`
        // before returning.
        let n = unsafe { (self.api().rbd_write)(self.h, off, buf.len(), buf.as_ptr().cast()) };
        check("rbd_write", n.clamp(i32::MIN as isize, i32::MAX as isize) as c_int).map(|n| n as usize)
    }

    pub fn flush(&self) -> Result<()> {
        // SAFETY: live image.
        check("rbd_flush", unsafe { (self.api().rbd_flush)(self.h) })?;
        Ok(())
    }

    /// Have librbd write `fd` (an eventfd) whenever an AIO completes; the
    /// completions are then taken with [`Image::poll_io_events`].
    pub fn set_notification_eventfd(&self, fd: RawFd) -> Result<()> {
        // SAFETY: live image; librbd writes to the descriptor, which the
        // caller keeps open as long as the image.
        check("rbd_set_image_notification", unsafe {
            (self.api().rbd_set_image_notification)(self.h, fd, ffi::EVENT_TYPE_EVENTFD)
        })?;
        Ok(())
    }

    /// Completed AIOs (of every thread's requests on this image), at most
    /// `max` of them, appended to `out`. Returns how many.
    pub fn poll_io_events(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        const BATCH: usize = 32;
        let mut raw = [std::ptr::null_mut::<c_void>(); BATCH];
        let want = max.min(BATCH);
        // SAFETY: live image; librbd writes up to `want` completion pointers
        // into `raw`. Each returned completion is one we created and handed
        // to an AIO call, now finished: ownership comes back to us.
        let n = check("rbd_poll_io_events", unsafe {
            (self.api().rbd_poll_io_events)(self.h, raw.as_mut_ptr(), want as c_int)
        })? as usize;
        for &c in &raw[..n.min(want)] {
            if let Some(p) = NonNull::new(c) {
                out.push(Completion { api: self.api(), c: p });
            }
        }
        Ok(n)
    }

    /// Start a read of `len` bytes at `off` into `buf`.
    ///
    /// # Safety
    /// `buf..buf + len` must stay valid and unused by anyone else until the
    /// completion is returned by [`Image::poll_io_events`] or waited for.
    pub unsafe fn aio_read(&self, off: u64, buf: *mut u8, len: usize, c: Completion) -> Result<()> {
        let raw = c.into_raw();
        // SAFETY: the caller keeps the buffer valid; `raw` is a fresh
        // completion that librbd now owns until it completes.
        let rc = unsafe { (self.api().rbd_aio_read)(self.h, off, len, buf.cast(), raw) };
        self.started("rbd_aio_read", rc, raw)
    }

    /// Start a write of `len` bytes from `buf` at `off`.
    ///
    /// # Safety
    /// As [`Image::aio_read`]; librbd may read `buf` until completion.
    pub unsafe fn aio_write(&self, off: u64, buf: *const u8, len: usize, c: Completion) -> Result<()> {
        let raw = c.into_raw();
        // SAFETY: as in aio_read.
        let rc = unsafe { (self.api().rbd_aio_write)(self.h, off, len, buf.cast(), raw) };
        self.started("rbd_aio_write", rc, raw)
    }

    pub fn aio_flush(&self, c: Completion) -> Result<()> {
        let raw = c.into_raw();
        // SAFETY: live image, fresh completion; no buffer.
        let rc = unsafe { (self.api().rbd_aio_flush)(self.h, raw) };
        self.started("rbd_aio_flush", rc, raw)
    }

    pub fn aio_discard(&self, off: u64, len: u64, c: Completion) -> Result<()> {
        let raw = c.into_raw();
        // SAFETY: live image, fresh completion; no buffer.
        let rc = unsafe { (self.api().rbd_aio_discard)(self.h, off, len, raw) };
        self.started("rbd_aio_discard", rc, raw)
    }

    pub fn aio_write_zeroes(&self, off: u64, len: u64, c: Completion) -> Result<()> {
        let raw = c.into_raw();
        // SAFETY: live image, fresh completion; no buffer.
        let rc = unsafe { (self.api().rbd_aio_write_zeroes)(self.h, off, len as usize, raw, 0, 0) };
        self.started("rbd_aio_write_zeroes", rc, raw)
    }

    /// Zero `len` bytes at `off` and wait (control plane only; on an image
    /// without an eventfd: the completion is waited for, not polled).
    pub fn write_zeroes_sync(&self, off: u64, len: u64) -> Result<()> {
        let c = Completion::new(0)?;
        let raw = c.c.as_ptr();
        // SAFETY: live image; `c` stays ours (we wait for it below and then
        // release it by dropping `c`), librbd holds its own reference while
        // the request runs.
        let rc = unsafe { (self.api().rbd_aio_write_zeroes)(self.h, off, len as usize, raw, 0, 0) };
        check("rbd_aio_write_zeroes", rc)?;
        // SAFETY: a live completion handed to a request that was accepted.
        unsafe { (self.api().rbd_aio_wait_for_complete)(raw) };
        let ret = c.return_value();
        if ret < 0 {
            return Err(RbdError::Call {
                call: "rbd_aio_write_zeroes",
                errno: ret as i32,
            });
        }
        Ok(())
    }

    /// After an AIO call: on failure the completion was not taken by librbd
    /// and is released here.
    fn started(&self, call: &'static str, rc: c_int, raw: ffi::Completion) -> Result<()> {
        if rc < 0 {
            // SAFETY: librbd refused the request, so `raw` is still ours.
            drop(unsafe { Completion::from_raw(self.api(), raw) });
            return Err(RbdError::Call { call, errno: rc });
        }
        Ok(())
    }

    fn with_name(&self, call: &'static str, name: &str, f: NameFn) -> Result<c_int> {
        let n = cstr(name)?;
        // SAFETY: live image, NUL-terminated name.
        check(call, unsafe { f(self.h, n.as_ptr()) })
    }

    pub fn snap_create(&self, snap: &str) -> Result<()> {
        self.with_name("rbd_snap_create", snap, self.api().rbd_snap_create)
            .map(drop)
    }
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        self.with_name("rbd_snap_remove", snap, self.api().rbd_snap_remove)
            .map(drop)
    }
    pub fn snap_rollback(&self, snap: &str) -> Result<()> {
        self.with_name("rbd_snap_rollback", snap, self.api().rbd_snap_rollback)
            .map(drop)
    }
    pub fn snap_protect(&self, snap: &str) -> Result<()> {
        self.with_name("rbd_snap_protect", snap, self.api().rbd_snap_protect)
            .map(drop)
    }
    pub fn snap_unprotect(&self, snap: &str) -> Result<()> {
        self.with_name("rbd_snap_unprotect", snap, self.api().rbd_snap_unprotect)
            .map(drop)
    }

    pub fn snap_exists(&self, snap: &str) -> Result<bool> {
        let n = cstr(snap)?;
        let mut e = false;
        // SAFETY: live image, NUL-terminated name, `e` to write into.
        check("rbd_snap_exists", unsafe {
            (self.api().rbd_snap_exists)(self.h, n.as_ptr(), &mut e)
        })?;
        Ok(e)
    }

    pub fn snap_is_protected(&self, snap: &str) -> Result<bool> {
        let n = cstr(snap)?;
        let mut p: c_int = 0;
        // SAFETY: live image, NUL-terminated name, `p` to write into.
        check("rbd_snap_is_protected", unsafe {
            (self.api().rbd_snap_is_protected)(self.h, n.as_ptr(), &mut p)
        })?;
        Ok(p != 0)
    }

    /// Copy the parent's data into this clone and detach it.
    pub fn flatten(&self) -> Result<()> {
        // SAFETY: live image.
        check("rbd_flatten", unsafe { (self.api().rbd_flatten)(self.h) })?;
        Ok(())
    }

    /// The clones of this image's snapshot (the image must be open at it; at its head:
    /// the clones of every snapshot), as (pool, image name); clones in the RBD trash are
    /// left out.
    pub fn children(&self) -> Result<Vec<(String, String)>> {
        let api = self.api();
        let mut cap = 16usize;
        loop {
            let mut specs: Vec<ffi::LinkedImageSpec> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: live image; librbd fills at most `n` specs of the buffer (room for
            // `cap`) and writes how many there are (or are needed, with -ERANGE) into `n`.
            let rc = unsafe { (api.rbd_list_children3)(self.h, specs.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE && n > cap {
                cap = n;
                continue;
            }
            check("rbd_list_children3", rc)?;
            // SAFETY: on success librbd initialised the first `n` (<= cap) specs.
            unsafe { specs.set_len(n.min(cap)) };
            let text = |p: *mut c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: a NUL-terminated string librbd allocated for this spec,
                    // alive until the cleanup below.
                    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
                }
            };
            let out = specs
                .iter()
                .filter(|s| !s.trash)
                .map(|s| (text(s.pool_name), text(s.image_name)))
                .collect();
            // SAFETY: the specs librbd filled, cleaned up once (their strings are
            // freed; the Vec's own memory is freed by Rust).
            unsafe { (api.rbd_linked_image_spec_list_cleanup)(specs.as_mut_ptr(), specs.len()) };
            return Ok(out);
        }
    }

    /// The parts of `off..off + len` that hold data (here or, for a clone, in its
    /// parent), as (offset, length), whole RBD objects at a time and in order.
    pub fn allocated(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        unsafe extern "C" fn one(ofs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            if exists != 0 {
                // SAFETY: `arg` is the `&mut Vec` passed below, alive and not aliased
                // during the synchronous rbd_diff_iterate2 call that runs this.
                let v = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
                match v.last_mut() {
                    Some((o, l)) if *o + *l == ofs => *l += len as u64,
                    _ => v.push((ofs, len as u64)),
                }
            }
            0
        }
        let mut v: Vec<(u64, u64)> = Vec::new();
        // SAFETY: live image; a NULL snapshot name (from the beginning); the callback
        // only touches `v`, which outlives this synchronous call.
        check("rbd_diff_iterate2", unsafe {
            (self.api().rbd_diff_iterate2)(
                self.h,
                std::ptr::null(),
                off,
                len,
                1,
                1,
                Some(one),
                (&mut v as *mut Vec<(u64, u64)>).cast(),
            )
        })?;
        Ok(v)
    }

    /// `rbd image-meta get`: `None` when the key is not set.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let k = cstr(key)?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: live image, NUL-terminated key; librbd writes at most
            // `len` bytes into `buf` and the needed length into `len`.
            let rc = unsafe { (self.api().rbd_metadata_get)(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), &mut len) };
            if rc == -libc::ERANGE && len > buf.len() {
                buf.resize(len, 0);
                continue;
            }
            if rc == -libc::ENOENT {
                return Ok(None);
            }
            check("rbd_metadata_get", rc)?;
            let end = buf[..len.min(buf.len())]
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(len.min(buf.len()));
            buf.truncate(end);
            return String::from_utf8(buf)
                .map(Some)
                .map_err(|_| RbdError::NotUtf8 { key: key.to_string() });
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: live image, NUL-terminated strings.
        check("rbd_metadata_set", unsafe {
            (self.api().rbd_metadata_set)(self.h, k.as_ptr(), v.as_ptr())
        })?;
        Ok(())
    }

    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        self.with_name("rbd_metadata_remove", key, self.api().rbd_metadata_remove)
            .map(drop)
    }

    /// Take the image's exclusive lock and keep it: other clients' writes
    /// are refused until it is released (or this client is blocklisted).
    pub fn lock_acquire_exclusive(&self) -> Result<()> {
        // SAFETY: live image.
        check("rbd_lock_acquire", unsafe {
            (self.api().rbd_lock_acquire)(self.h, ffi::LOCK_MODE_EXCLUSIVE)
        })?;
        Ok(())
    }

    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: live image.
        check("rbd_lock_release", unsafe { (self.api().rbd_lock_release)(self.h) })?;
        Ok(())
    }

    pub fn is_exclusive_lock_owner(&self) -> Result<bool> {
        let mut o: c_int = 0;
        // SAFETY: live image, `o` to write into.
        check("rbd_is_exclusive_lock_owner", unsafe {
            (self.api().rbd_is_exclusive_lock_owner)(self.h, &mut o)
        })?;
        Ok(o != 0)
    }
}

type NameFn = unsafe extern "C" fn(ffi::Image, *const c_char) -> c_int;

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open, closed once; `&mut self`: no other
        // user. librbd waits for the image's AIOs in flight before it closes.
        unsafe { (self.api().rbd_close)(self.h) };
    }
}

/// An AIO completion made without a callback, carrying a caller's word
/// (`arg`). Released on drop.
pub struct Completion {
    api: &'static ffi::Api,
    c: NonNull<c_void>,
}

impl Completion {
    /// A new completion carrying `arg` (returned by [`Completion::arg`]).
    pub fn new(arg: usize) -> Result<Completion> {
        let api = api()?;
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: writes a new completion into `c`; no callback, so `arg` is
        // never dereferenced by librbd.
        check("rbd_aio_create_completion", unsafe {
            (api.rbd_aio_create_completion)(arg as *mut c_void, None, &mut c)
        })?;
        let c = NonNull::new(c).ok_or(RbdError::Call {
            call: "rbd_aio_create_completion",
            errno: -libc::ENOMEM,
        })?;
        Ok(Completion { api, c })
    }

    fn into_raw(self) -> ffi::Completion {
        let c = self.c.as_ptr();
        std::mem::forget(self);
        c
    }

    /// # Safety
    /// `c` must be a live completion that nobody else owns.
    unsafe fn from_raw(api: &'static ffi::Api, c: ffi::Completion) -> Completion {
        Completion {
            api,
            c: NonNull::new(c).expect("non-null completion"),
        }
    }

    pub fn arg(&self) -> usize {
        // SAFETY: live completion.
        unsafe { (self.api.rbd_aio_get_arg)(self.c.as_ptr()) as usize }
    }

    /// The request's result: bytes for a read, 0 for others, or -errno.
    pub fn return_value(&self) -> isize {
        // SAFETY: live completion.
        unsafe { (self.api.rbd_aio_get_return_value)(self.c.as_ptr()) }
    }

    pub fn is_complete(&self) -> bool {
        // SAFETY: live completion.
        unsafe { (self.api.rbd_aio_is_complete)(self.c.as_ptr()) != 0 }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: a completion we own (never handed to librbd, or handed
        // back by poll_io_events after it completed): released once.
        unsafe { (self.api.rbd_aio_release)(self.c.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_names_are_normalised_and_comments_skipped() {
        let n = conf_names(
            "[global]\n  rbd cache = true\n# rbd_io_scheduler = none\n; objecter-inflight-ops = 5\n\
             [client]\nrbd-non-blocking-aio=false\nRBD_Sparse_Read_Threshold_Bytes = 1\nnot an option\n",
        );
        let mut v: Vec<&str> = n.iter().map(String::as_str).collect();
        v.sort();
        assert_eq!(
            v,
            ["rbd_cache", "rbd_non_blocking_aio", "rbd_sparse_read_threshold_bytes"]
        );
    }
}
