//! The control plane: ECS operations over the catalog, the volume pool, the KMS and the
//! export registry, as JSON-RPC 2.0 methods.
//!
//! * Each operation runs as one catalog write transaction that also carries the pool's
//!   volume-map changes: an error aborts the transaction and nothing changes. Operations
//!   on different objects run concurrently; two that name the same disk, instance,
//!   snapshot or image run one after the other ([`ObjectLocks`]); Describe calls never
//!   wait.
//! * The pool's metadata thread (the data path's first writes and copy-on-writes) needs
//!   the same catalog writer, so nothing slow runs while an operation holds it: an
//!   operation that calls the KMS (unwrap, generate, metering, audit of a crypto-shred)
//!   first checks in a transaction it drops ([`Control::peek`]), makes its KMS calls,
//!   and then checks again and writes in a second one.
//! * On encrypted disks every operation that calls the KMS first reserves the quota it
//!   needs ([`Kms::reserve`]), so over quota it fails before changing anything.
//! * Nothing here ever returns or stores key material: data keys exist in plaintext only
//!   inside the KMS's `DataKey` and the data path's `Xts`.
//!
//! `impl Control` by object, one module each: `disks` (and `disks::attach`, the data
//! path), `snapshots`, `images`, `instances`, `kms_ops`, `tasks`, `copy`
//! (CreateEncryptedCopy), `migrate` (MigrateDisk, with its `nbd_client`), `monitor`
//! (DescribeDiskMonitorData and the sampler), `reactors` (DescribeReactors), `check`
//! (CheckPool: pool vs catalog). What they share is explicit: `shared` (transactions,
//! KMS metering and crypto-shred audits, lineage keys, lookups with the account check),
//! `locks` (per-object operation locks), `params` (reading ECS parameters), `view`
//! (ECS-shaped replies), `job` (I/O jobs on the reactors), `util` (ids, times), `error`.
//! Around them: the method table below ([`METHODS`]), `rpc` (JSON-RPC framing),
//! `server`/`client` (unix socket), `metrics` and `metrics_http` (Prometheus exposition on
//! `serve --metrics`).

#![forbid(unsafe_code)]

mod adopt;
pub(crate) mod check;
pub(crate) mod client;
mod copy;
mod disks;
pub(crate) mod error;
mod images;
mod instances;
mod job;
mod kms_ops;
mod locks;
pub(crate) mod metrics;
pub(crate) mod metrics_http;
mod migrate;
pub(crate) mod monitor;
pub(crate) mod nbd_client;
pub(crate) mod params;
pub(crate) mod qos;
mod reactors;
pub(crate) mod rpc;
pub(crate) mod server;
mod shared;
mod snapshots;
mod tasks;
pub(crate) mod util;
mod view;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use redb::Database;
use serde_json::Value;

use crate::export::Exports;
use crate::kms::Kms;
use crate::reactor::Reactors;
use crate::store::Store;

use crate::frontend::vhost::{VhostConfig, VhostServer};
pub use error::ControlError;
use locks::{ObjectLocks, LOCK_PARAMS};
pub use params::Params;
pub use qos::QosConfig;
use shared::same_region;

/// Encryption sector of encrypted disks (plain64 tweak = byte offset / 4096).
pub(crate) const ENCRYPTION_SECTOR: u32 = 4096;

/// Every JSON-RPC method, in the order `rpc --list` shows them.
/// One JSON-RPC method. This table is the one list of them: the server dispatches
/// through it, and the CLI makes its subcommands and help from it.
pub(crate) struct Method {
    /// The ECS action name (`CreateDisk`).
    pub name: &'static str,
    /// What it does, for the CLI's help.
    pub about: &'static str,
    handler: fn(&Control, Params) -> Result<Value, ControlError>,
    /// Changes nothing in the catalog (reads with read transactions, or only flags a
    /// task): never waits behind another operation on the same objects.
    pub concurrent: bool,
    /// About the host, not an account: the CLI adds no AccountId/RegionId.
    pub host: bool,
}

/// Every method, in the order `sealdisk rpc --list` shows them.
pub(crate) static METHODS: &[Method] = &[
    Method {
        name: "ActivateKms",
        about: "Activate (authorise) KMS for an account in a region",
        handler: Control::activate_kms,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DescribeKmsKey",
        about: "Describe the service key (CMK) of an account in a region",
        handler: Control::describe_kms_key,
        concurrent: true,
        host: false,
    },
    Method {
        name: "DescribeKmsUsage",
        about: "KMS calls, throttling and keys per region",
        handler: Control::describe_kms_usage,
        concurrent: true,
        host: false,
    },
    Method {
        name: "ScheduleKeyDeletion",
        about: "Try to delete the service key (always refused)",
        handler: Control::schedule_key_deletion,
        concurrent: false,
        host: false,
    },
    Method {
        name: "CreateInstance",
        about: "Create an instance with a system disk and DataDisk.n.* data disks, all attached",
        handler: Control::create_instance,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DescribeInstances",
        about: "List instances",
        handler: Control::describe_instances,
        concurrent: true,
        host: false,
    },
    Method {
        name: "DeleteInstance",
        about: "Delete an instance (detaches its disks, deletes its system disk)",
        handler: Control::delete_instance,
        concurrent: false,
        host: false,
    },
    Method {
        name: "AdoptDisk",
        about: "Register a disk image another host made in the shared RBD pool (DiskId; --backend rbd)",
        handler: Control::adopt_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "CreateDisk",
        about: "Create a disk (Size or SizeBytes, DiskCategory, Encrypted, SnapshotId, MultiAttach)",
        handler: Control::create_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "CreateEncryptedCopy",
        about: "Copy a plaintext disk (SourceDiskId) or a raw image/block device (SourcePath) into a new encrypted disk",
        handler: Control::create_encrypted_copy,
        concurrent: false,
        host: false,
    },
    Method {
        name: "MigrateDisk",
        about: "Encrypt a disk, image file or NBD export into a disk, or decrypt one back (see `migrate`)",
        handler: Control::migrate_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "AttachDisk",
        about: "Attach a disk to an instance (puts it on the data path)",
        handler: Control::attach_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DetachDisk",
        about: "Detach a disk from an instance (wipes its key from memory)",
        handler: Control::detach_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ResetDisk",
        about: "Roll a disk back to one of its snapshots",
        handler: Control::reset_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ReInitDisk",
        about: "Return a disk to its initial state (blank, or the snapshot it came from)",
        handler: Control::reinit_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ModifyDiskAttribute",
        about: "Rename a disk or change its description",
        handler: Control::modify_disk_attribute,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DeleteDisk",
        about: "Delete a disk (the last holder of a key shreds it)",
        handler: Control::delete_disk,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DescribeDisks",
        about: "List disks",
        handler: Control::describe_disks,
        concurrent: true,
        host: false,
    },
    Method {
        name: "DescribeDiskMonitorData",
        about: "I/O of an attached disk over time: IOPS, bandwidth, latency and p99 per Period (DiskId, StartTime, EndTime)",
        handler: Control::describe_disk_monitor_data,
        concurrent: true,
        host: false,
    },
    Method {
        name: "CreateSnapshot",
        about: "Snapshot a disk",
        handler: Control::create_snapshot,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ModifySnapshotAttribute",
        about: "Rename a snapshot",
        handler: Control::modify_snapshot_attribute,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DeleteSnapshot",
        about: "Delete a snapshot",
        handler: Control::delete_snapshot,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DescribeSnapshots",
        about: "List snapshots",
        handler: Control::describe_snapshots,
        concurrent: true,
        host: false,
    },
    Method {
        name: "CreateImage",
        about: "Create an image from a snapshot",
        handler: Control::create_image,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ModifyImageSharePermission",
        about: "Share an image with other accounts (AddAccount.n / RemoveAccount.n)",
        handler: Control::modify_image_share_permission,
        concurrent: false,
        host: false,
    },
    Method {
        name: "CopyImage",
        about: "Copy an image to another region",
        handler: Control::copy_image,
        concurrent: false,
        host: false,
    },
    Method {
        name: "ExportImage",
        about: "Export an image to a raw file under DATA_DIR/exports",
        handler: Control::export_image,
        concurrent: false,
        host: false,
    },
    Method {
        name: "DescribeImages",
        about: "List images",
        handler: Control::describe_images,
        concurrent: true,
        host: false,
    },
    Method {
        name: "DeleteImage",
        about: "Delete an image",
        handler: Control::delete_image,
        concurrent: false,
        host: false,
    },
    Method {
        name: "CheckPool",
        about: "Check the pool against the catalog (online)",
        handler: Control::check_pool,
        concurrent: true,
        host: true,
    },
    Method {
        name: "DescribeReactors",
        about: "Each reactor's core, busy/idle time, I/Os, bytes, queue-full events",
        handler: Control::describe_reactors,
        concurrent: true,
        host: true,
    },
    Method {
        name: "DescribeTasks",
        about: "Background tasks (CreateEncryptedCopy, ExportImage): state, bytes done, rate",
        handler: Control::describe_tasks,
        concurrent: true,
        host: false,
    },
    Method {
        name: "CancelTask",
        about: "Stop a background task (TaskId); it removes what it had made",
        handler: Control::cancel_task,
        concurrent: true,
        host: false,
    },
];

/// The method called `name`.
pub(crate) fn method(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The daemon's data directory (exports of images go under `exports/`).
    pub data_dir: PathBuf,
    /// QoS caps recorded on new disks.
    pub qos: QosConfig,
    /// The only directory CreateEncryptedCopy's SourcePath may name files under
    /// (`serve --import-dir`); `None`: SourcePath is refused.
    pub import_dir: Option<PathBuf>,
    /// Block devices under `import_dir` may be imported too (`serve --import-devices`).
    pub import_devices: bool,
    /// Group of the per-instance sockets (NBD and vhost-user; `serve --vmm-group`).
    pub vmm_gid: Option<u32>,
}

impl ControlConfig {
    /// Defaults: QoS from the category table, no import directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> ControlConfig {
        ControlConfig {
            data_dir: data_dir.into(),
            qos: QosConfig::default(),
            import_dir: None,
            import_devices: false,
            vmm_gid: None,
        }
    }
}

/// The ECS operations.
pub struct Control {
    db: Arc<Database>,
    pool: Store,
    kms: Arc<Kms>,
    exports: Arc<Exports>,
    reactors: Option<Arc<Reactors>>,
    /// The vhost-user-blk sockets of attached disks (with reactors only).
    vhost: Option<Arc<VhostServer>>,
    cfg: ControlConfig,
    /// Held by start-up work that must see no operation at all (restoring attachments).
    serial: Mutex<()>,
    objects: ObjectLocks,
    tasks: tasks::Tasks,
    /// Per-disk I/O samples (filled by the sampler thread, [`Control::start_sampler`]).
    monitor: Arc<monitor::Monitor>,
    /// This control plane, for background tasks to hold.
    me: std::sync::Weak<Control>,
}

impl Control {
    /// The control plane over an open catalog database, pool, KMS and export registry.
    /// `reactors` is needed only by ExportImage (it reads the image through the data path).
    pub fn new(
        db: Arc<Database>,
        pool: impl Into<Store>,
        kms: Arc<Kms>,
        exports: Arc<Exports>,
        reactors: Option<Arc<Reactors>>,
        cfg: ControlConfig,
    ) -> Arc<Control> {
        let vhost = reactors.as_ref().map(|r| {
            VhostServer::new(
                VhostConfig {
                    instances_dir: cfg.data_dir.join(crate::export::INSTANCES_DIR),
                    gid: cfg.vmm_gid,
                    num_queues: None,
                },
                r.clone(),
            )
        });
        let pool = pool.into();
        Arc::new_cyclic(|me| Control {
            db,
            pool,
            kms,
            exports,
            reactors,
            vhost,
            cfg,
            serial: Mutex::new(()),
            objects: ObjectLocks::default(),
            tasks: tasks::Tasks::default(),
            monitor: Arc::default(),
            me: me.clone(),
        })
    }

    pub fn db(&self) -> &Arc<Database> {
        &self.db
    }
    /// Where the volumes are: the file pool or an RBD pool.
    pub fn pool(&self) -> &Store {
        &self.pool
    }
    pub fn kms(&self) -> &Arc<Kms> {
        &self.kms
    }
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Runs one method. Errors carry a stable code ([`ControlError::code`]).
    pub fn call(&self, method: &str, params: Value) -> Result<Value, ControlError> {
        self.call_with_id(method, params, &util::new_id("req"))
    }

    /// [`Control::call`] as request `request_id` (the reply's `RequestId`).
    pub fn call_with_id(&self, method: &str, params: Value, request_id: &str) -> Result<Value, ControlError> {
        let Some(m) = self::method(method) else {
            return Err(ControlError::MethodNotFound(method.to_owned()));
        };
        let _objects = (!m.concurrent).then(|| {
            let ids = LOCK_PARAMS
                .iter()
                .filter_map(|k| params.get(*k).and_then(Value::as_str))
                .map(|id| id.to_owned())
                .collect();
            self.objects.lock(ids)
        });
        // Wait out start-up and shutdown work (restoring or dropping every export).
        drop(self.serial.lock().unwrap_or_else(|p| p.into_inner()));
        let p = Params::new(params)?;
        let mut v = (m.handler)(self, p)?;
        if let Value::Object(m) = &mut v {
            m.insert("RequestId".into(), Value::String(request_id.to_owned()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod method_table_tests {
    use super::{method, METHODS};

    #[test]
    fn one_entry_per_method_with_help_and_the_flags_where_they_belong() {
        let mut names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METHODS.len(), "a method is listed twice");
        for m in METHODS {
            assert!(!m.about.is_empty(), "{} has no help", m.name);
            assert!(std::ptr::eq(method(m.name).unwrap(), m));
            // Every Describe* only reads; nothing that creates, deletes or changes does.
            let reads = m.name.starts_with("Describe") || ["CheckPool", "CancelTask"].contains(&m.name);
            assert_eq!(m.concurrent, reads, "{}: concurrent", m.name);
        }
        let host: Vec<&str> = METHODS.iter().filter(|m| m.host).map(|m| m.name).collect();
        assert_eq!(host, ["CheckPool", "DescribeReactors"]);
        assert!(method("NoSuchAction").is_none());
    }
}
