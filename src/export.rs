//! Exports: the disks currently on the data path, by disk id. The control
//! plane adds one at attach and removes it at detach; frontends (NBD) look
//! exports up when a client connects and watch `revoked` to drop
//! connections of a detached disk.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::bdev::iostat::DiskStats;
use crate::bdev::BdevRef;

/// One exported disk.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub bdev: BdevRef,
    pub read_only: bool,
    /// Set when the disk is detached: frontends close its connections.
    pub revoked: Arc<AtomicBool>,
    /// The disk's I/O statistics (the `iostat` layer at the top of `bdev`).
    pub stats: Option<Arc<DiskStats>>,
}

impl Export {
    pub fn new(name: &str, bdev: BdevRef, read_only: bool) -> Export {
        Export {
            name: name.into(),
            bdev,
            read_only,
            revoked: Arc::new(AtomicBool::new(false)),
            stats: None,
        }
    }
    /// The same, with the statistics its stack keeps.
    pub fn with_stats(mut self, stats: Arc<DiskStats>) -> Export {
        self.stats = Some(stats);
        self
    }
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

/// [`Exports::add`] of a name that is exported already.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("export {0} already exists")]
pub struct DuplicateExport(pub String);

/// The registry (control path only; the data path holds `Export` clones). The
/// daemon's registry (every attached disk, for the administrator's socket) also holds
/// the per-instance ones.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Export>>,
    instances: InstanceExports,
}

impl Exports {
    pub fn new() -> Arc<Exports> {
        Arc::new(Exports::default())
    }
    /// Add an export; refuses a duplicate name.
    pub fn add(&self, e: Export) -> Result<(), DuplicateExport> {
        let mut m = self.map.write().expect("exports lock");
        if m.contains_key(&e.name) {
            return Err(DuplicateExport(e.name.clone()));
        }
        m.insert(e.name.clone(), e);
        Ok(())
    }
    /// Remove an export and revoke it (live connections see `revoked`).
    pub fn remove(&self, name: &str) -> Option<Export> {
        let e = self.map.write().expect("exports lock").remove(name)?;
        e.revoked.store(true, Ordering::Release);
        Some(e)
    }
    pub fn get(&self, name: &str) -> Option<Export> {
        self.map.read().expect("exports lock").get(name).cloned()
    }
    pub fn names(&self) -> Vec<String> {
        self.map.read().expect("exports lock").keys().cloned().collect()
    }
    /// The per-instance registries.
    pub fn instances(&self) -> &InstanceExports {
        &self.instances
    }
}

pub(crate) use crate::layout::{instance_socket, INSTANCES_DIR, INSTANCE_SOCKET};

/// Per-instance export registries: an instance's NBD socket
/// (`DATA_DIR/instances/<InstanceId>/nbd.sock`) serves exactly the disks attached to
/// it, each as an [`Export`] of its own, so detaching a shared disk from one instance
/// ends only that instance's connections. The control plane adds and removes; the NBD
/// server binds and removes the sockets, and reports when it has caught up.
#[derive(Default)]
pub struct InstanceExports {
    state: std::sync::Mutex<InstState>,
    synced: std::sync::Condvar,
}

#[derive(Default)]
struct InstState {
    map: BTreeMap<String, Arc<Exports>>,
    /// Bumped by every change of the instance set.
    gen: u64,
    /// The generation the NBD server has bound sockets for.
    bound: u64,
    /// Whether an NBD server serves these (else nobody waits for sockets).
    served: bool,
}

impl InstanceExports {
    fn state(&self) -> std::sync::MutexGuard<'_, InstState> {
        self.state.lock().expect("instance exports")
    }

    /// The registry of `instance`, made (and its socket requested) if new.
    pub fn get_or_create(&self, instance: &str) -> Arc<Exports> {
        let mut s = self.state();
        if let Some(e) = s.map.get(instance) {
            return e.clone();
        }
        let e = Exports::new();
        s.map.insert(instance.to_owned(), e.clone());
        s.gen += 1;
        e
    }

    /// The registry of `instance`, if it has one.
    pub fn get(&self, instance: &str) -> Option<Arc<Exports>> {
        self.state().map.get(instance).cloned()
    }

    /// Drops `instance`'s registry (revoking every export in it); its socket goes.
    pub fn remove(&self, instance: &str) {
        let mut s = self.state();
        if let Some(e) = s.map.remove(instance) {
            for n in e.names() {
                e.remove(&n);
            }
            s.gen += 1;
        }
    }

    /// Drops every registry (shutdown).
    pub fn clear(&self) {
        let ids: Vec<String> = self.state().map.keys().cloned().collect();
        for i in ids {
            self.remove(&i);
        }
    }

    /// For the NBD server: the generation and the instances with their registries.
    pub fn snapshot(&self) -> (u64, Vec<(String, Arc<Exports>)>) {
        let s = self.state();
        (s.gen, s.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// The current generation (cheap, for the NBD server's loop).
    pub fn generation(&self) -> u64 {
        self.state().gen
    }

    /// For the NBD server: sockets for generation `gen` are bound (or `serving`
    /// stopped).
    pub fn set_bound(&self, gen: u64, serving: bool) {
        let mut s = self.state();
        s.bound = gen;
        s.served = serving;
        self.synced.notify_all();
    }

    /// Waits (at most `timeout`) until the NBD server has bound the sockets of every
    /// instance created so far, if a server serves them.
    pub fn wait_bound(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.state();
        while s.served && s.bound < s.gen {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            s = self.synced.wait_timeout(s, left).expect("instance exports").0;
        }
    }
}
