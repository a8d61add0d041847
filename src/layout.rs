//! The data directory's layout: every file and directory name the daemon, the control
//! plane, the frontends and the CLI agree on, in one place below all of them.
//!
//! ```text
//! DATA_DIR/
//!   catalog.redb                      the catalog (redb), shared with the volume pool
//!   pool.img                          the default pool file (or `serve --pool PATH`)
//!   sealdisk.sock                     the JSON-RPC control socket
//!   nbd.sock                          the admin NBD socket (every attached disk)
//!   kms/                              embedded KMS state, audit log
//!   exports/<bucket>/                 ExportImage's image files
//!   instances/<InstanceId>/nbd.sock   the NBD socket of one instance's disks
//!   instances/<InstanceId>/vhost/<DiskId>.sock   one disk's vhost-user-blk socket
//! ```

use std::path::{Path, PathBuf};

/// The catalog database.
pub const CATALOG_FILE: &str = "catalog.redb";
/// Default pool file name.
pub(crate) const POOL_FILE: &str = "pool.img";
/// The RPC socket.
pub(crate) const SOCKET_FILE: &str = "sealdisk.sock";
/// The admin NBD socket.
pub(crate) const NBD_SOCKET_FILE: &str = "nbd.sock";
/// All KMS state.
pub(crate) const KMS_DIR: &str = "kms";
/// ExportImage's output, one directory per bucket.
pub(crate) const EXPORTS_DIR: &str = "exports";
/// The per-instance directories.
pub(crate) const INSTANCES_DIR: &str = "instances";
/// An instance's NBD socket, in its directory.
pub(crate) const INSTANCE_SOCKET: &str = "nbd.sock";
/// An instance's vhost-user sockets, in its directory.
pub(crate) const VHOST_DIR: &str = "vhost";

/// `DATA_DIR/instances/<InstanceId>`.
pub(crate) fn instance_dir(data_dir: &Path, instance: &str) -> PathBuf {
    data_dir.join(INSTANCES_DIR).join(instance)
}

/// `DATA_DIR/instances/<InstanceId>/nbd.sock`.
pub(crate) fn instance_socket(data_dir: &Path, instance: &str) -> PathBuf {
    instance_dir(data_dir, instance).join(INSTANCE_SOCKET)
}
