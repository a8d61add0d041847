//! Per-object operation locks: two operations that name the same disk, instance,
//! snapshot or image run one after the other; Describe calls never wait.

use std::sync::Mutex;

/// Parameters that name an existing object an operation works on: operations naming
/// the same object run one after the other.
pub(super) const LOCK_PARAMS: &[&str] = &[
    "DiskId",
    "InstanceId",
    "SnapshotId",
    "ImageId",
    "SourceDiskId",
    "TargetDiskId",
];

/// Objects some operation is working on.
#[derive(Default)]
pub(super) struct ObjectLocks {
    held: Mutex<std::collections::HashSet<String>>,
    freed: std::sync::Condvar,
}

/// The objects of one operation, released on drop.
pub(super) struct ObjectGuard<'a> {
    locks: &'a ObjectLocks,
    ids: Vec<String>,
}

impl ObjectLocks {
    /// Waits until none of `ids` is held, then holds them all (all at once: no order,
    /// no deadlock).
    pub(super) fn lock(&self, ids: Vec<String>) -> ObjectGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while ids.iter().any(|i| held.contains(i)) {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.extend(ids.iter().cloned());
        ObjectGuard { locks: self, ids }
    }
}

impl Drop for ObjectGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        for i in &self.ids {
            held.remove(i);
        }
        self.locks.freed.notify_all();
    }
}
