//! The C functions of `librados.so.2` and `librbd.so.1` (Ceph Pacific 16.2,
//! librbd 1.16) that sealdisk uses, loaded at run time with `libloading`, so
//! a build and a daemon that never touch Ceph never need its libraries.
//!
//! Signatures follow `rados/librados.h` and `rbd/librbd.h` of 16.2.15. Every
//! handle is an opaque `void *`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

pub type Rados = *mut c_void;
pub type IoCtx = *mut c_void;
pub type Image = *mut c_void;
pub type Completion = *mut c_void;
pub type ImageOptions = *mut c_void;
pub type Callback = Option<unsafe extern "C" fn(Completion, *mut c_void)>;
/// The callback of `rbd_diff_iterate2`: (offset, length, exists, arg); non-zero stops.
pub type DiffCallback = Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>;

/// `EVENT_TYPE_EVENTFD` of `rbd_set_image_notification`.
pub const EVENT_TYPE_EVENTFD: c_int = 2;
/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_IMAGE_OPTION_FORMAT`, `_FEATURES`, `_ORDER`.
pub const OPT_FORMAT: c_int = 0;
pub const OPT_FEATURES: c_int = 1;
pub const OPT_ORDER: c_int = 2;
/// `rbd/features.h`.
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

const MAX_BLOCK_NAME_SIZE: usize = 24;
const MAX_IMAGE_NAME_SIZE: usize = 96;

/// `rbd_linked_image_spec_t` (strings owned by librbd until
/// `rbd_linked_image_spec_list_cleanup`).
#[repr(C)]
pub struct LinkedImageSpec {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_image_info_t`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; MAX_IMAGE_NAME_SIZE],
}

macro_rules! api {
    ($( $lib:ident { $( fn $name:ident( $($arg:ty),* ) $(-> $ret:ty)?; )* } )*) => {
        /// The loaded function table; the libraries stay loaded for the
        /// process's life.
        #[allow(non_snake_case)]
        pub struct Api {
            $( $( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )* )*
            _libs: Vec<libloading::Library>,
        }

        impl Api {
            fn load() -> Result<Api, LoadError> {
                let mut libs = Vec::new();
                $(
                    let $lib = {
                        let file = stringify!($lib).replace("_so_", ".so.");
                        // SAFETY: loading a Ceph client library runs its
                        // initialisers, which have no preconditions.
                        let lib = unsafe { libloading::Library::new(&file) }
                            .map_err(|e| LoadError { what: file.clone(), why: e.to_string() })?;
                        lib
                    };
                    $(
                        // SAFETY: the symbol is declared with the signature
                        // of the C prototype in the Ceph 16.2 headers; the
                        // pointer is used only while the library stays
                        // loaded (it is kept in `_libs` for the process's
                        // life).
                        let $name = unsafe {
                            *$lib
                                .get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                                    concat!(stringify!($name), "\0").as_bytes(),
                                )
                                .map_err(|e| LoadError { what: stringify!($name).into(), why: e.to_string() })?
                        };
                    )*
                    libs.push($lib);
                )*
                Ok(Api { $( $( $name, )* )* _libs: libs })
            }
        }
    };
}

api! {
    librados_so_2 {
        fn rados_create(*mut Rados, *const c_char) -> c_int;
        fn rados_conf_read_file(Rados, *const c_char) -> c_int;
        fn rados_conf_set(Rados, *const c_char, *const c_char) -> c_int;
        fn rados_conf_get(Rados, *const c_char, *mut c_char, usize) -> c_int;
        fn rados_connect(Rados) -> c_int;
        fn rados_shutdown(Rados);
        fn rados_ioctx_create(Rados, *const c_char, *mut IoCtx) -> c_int;
        fn rados_ioctx_destroy(IoCtx);
    }
    librbd_so_1 {
        fn rbd_image_options_create(*mut ImageOptions);
        fn rbd_image_options_destroy(ImageOptions);
        fn rbd_image_options_set_uint64(ImageOptions, c_int, u64) -> c_int;
        fn rbd_create4(IoCtx, *const c_char, u64, ImageOptions) -> c_int;
        fn rbd_clone3(IoCtx, *const c_char, *const c_char, IoCtx, *const c_char, ImageOptions) -> c_int;
        fn rbd_remove(IoCtx, *const c_char) -> c_int;
        fn rbd_open(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
        fn rbd_close(Image) -> c_int;
        fn rbd_stat(Image, *mut ImageInfo, usize) -> c_int;
        fn rbd_get_size(Image, *mut u64) -> c_int;
        fn rbd_get_features(Image, *mut u64) -> c_int;
        fn rbd_get_id(Image, *mut c_char, usize) -> c_int;
        fn rbd_resize(Image, u64) -> c_int;
        fn rbd_read(Image, u64, usize, *mut c_char) -> isize;
        fn rbd_write(Image, u64, usize, *const c_char) -> isize;
        fn rbd_flush(Image) -> c_int;
        fn rbd_aio_create_completion(*mut c_void, Callback, *mut Completion) -> c_int;
        fn rbd_aio_is_complete(Completion) -> c_int;
        fn rbd_aio_wait_for_complete(Completion) -> c_int;
        fn rbd_aio_get_return_value(Completion) -> isize;
        fn rbd_aio_get_arg(Completion) -> *mut c_void;
        fn rbd_aio_release(Completion);
        fn rbd_aio_read(Image, u64, usize, *mut c_char, Completion) -> c_int;
        fn rbd_aio_write(Image, u64, usize, *const c_char, Completion) -> c_int;
        fn rbd_aio_flush(Image, Completion) -> c_int;
        fn rbd_aio_discard(Image, u64, u64, Completion) -> c_int;
        fn rbd_aio_write_zeroes(Image, u64, usize, Completion, c_int, c_int) -> c_int;
        fn rbd_set_image_notification(Image, c_int, c_int) -> c_int;
        fn rbd_poll_io_events(Image, *mut Completion, c_int) -> c_int;
        fn rbd_snap_create(Image, *const c_char) -> c_int;
        fn rbd_snap_remove(Image, *const c_char) -> c_int;
        fn rbd_snap_rollback(Image, *const c_char) -> c_int;
        fn rbd_snap_protect(Image, *const c_char) -> c_int;
        fn rbd_snap_unprotect(Image, *const c_char) -> c_int;
        fn rbd_snap_is_protected(Image, *const c_char, *mut c_int) -> c_int;
        fn rbd_snap_exists(Image, *const c_char, *mut bool) -> c_int;
        fn rbd_flatten(Image) -> c_int;
        fn rbd_list_children3(Image, *mut LinkedImageSpec, *mut usize) -> c_int;
        fn rbd_linked_image_spec_list_cleanup(*mut LinkedImageSpec, usize);
        fn rbd_diff_iterate2(Image, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
        fn rbd_metadata_get(Image, *const c_char, *mut c_char, *mut usize) -> c_int;
        fn rbd_metadata_set(Image, *const c_char, *const c_char) -> c_int;
        fn rbd_metadata_remove(Image, *const c_char) -> c_int;
        fn rbd_lock_acquire(Image, c_int) -> c_int;
        fn rbd_lock_release(Image) -> c_int;
        fn rbd_is_exclusive_lock_owner(Image, *mut c_int) -> c_int;
    }
}

/// A Ceph client library, or one of its functions, that could not be loaded (kept, as
/// the first load's outcome is, for every later caller: hence plain text, not the
/// loader's error itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The library file or the function.
    pub what: String,
    /// The loader's message.
    pub why: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

/// The function table, loaded on first use; the error names the library or
/// symbol that is missing.
pub fn api() -> Result<&'static Api, LoadError> {
    static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(|e| e.clone())
}
