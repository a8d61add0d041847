//! Exports: the disks currently on the data path, by disk id. The control
//! plane adds one at attach and removes it at detach; frontends (NBD) look
//! exports up when a client connects and watch `revoked` to drop
//! connections of a detached disk.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::bdev::BdevRef;

/// One exported disk.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub bdev: BdevRef,
    pub read_only: bool,
    /// Set when the disk is detached: frontends close its connections.
    pub revoked: Arc<AtomicBool>,
}

impl Export {
    pub fn new(name: &str, bdev: BdevRef, read_only: bool) -> Export {
        Export {
            name: name.into(),
            bdev,
            read_only,
            revoked: Arc::new(AtomicBool::new(false)),
        }
    }
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

/// The registry (control path only; the data path holds `Export` clones).
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Export>>,
}

impl Exports {
    pub fn new() -> Arc<Exports> {
        Arc::new(Exports::default())
    }
    /// Add an export; refuses a duplicate name.
    pub fn add(&self, e: Export) -> Result<(), String> {
        let mut m = self.map.write().expect("exports lock");
        if m.contains_key(&e.name) {
            return Err(format!("export {} already exists", e.name));
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
}
