//! Consistency of the pool against the catalog: `CheckPool` online and
//! `sealdisk check` offline.

use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::{Control, ControlError, Params};
use crate::catalog::{self, DiskRecord, ImageRecord, MigrationRecord, SnapshotRecord};
use crate::store::Store;
use crate::volume::{CheckReport, Pool};

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub schema_version: u64,
    pub disks: usize,
    pub snapshots: usize,
    pub images: usize,
    /// Unfinished migrations (MigrateDisk rows).
    pub migrations: usize,
    pub pool: Option<CheckReport>,
    pub problems: Vec<String>,
}

impl Report {
    pub fn consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the catalog rows, the pool's own maps, and that every disk, snapshot and
/// image has its volume of the recorded size and the pool holds no other volumes.
pub fn check(db: &redb::Database, pool: &Store) -> Result<Report, ControlError> {
    let r = db.begin_read().map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
    let mut rep = Report {
        schema_version: catalog::schema_version(&r)?,
        ..Report::default()
    };
    rep.problems.extend(catalog::check_catalog(&r)?);
    let disks: Vec<DiskRecord> = catalog::list_r(&r)?;
    let snaps: Vec<SnapshotRecord> = catalog::list_r(&r)?;
    let images: Vec<ImageRecord> = catalog::list_r(&r)?;
    rep.disks = disks.len();
    rep.snapshots = snaps.len();
    rep.images = images.len();
    let migrations: Vec<MigrationRecord> = catalog::list_r(&r)?;
    rep.migrations = migrations.len();
    let objects = disks
        .iter()
        .map(|d| ("disk", &d.id, d.size))
        .chain(snaps.iter().map(|s| ("snapshot", &s.id, s.size)))
        .chain(images.iter().map(|m| ("image", &m.id, m.size)))
        .chain(
            migrations
                .iter()
                .filter(|m| m.target_new)
                .map(|m| ("migration target", &m.target, m.size)),
        )
        .chain(migrations.iter().filter_map(|m| {
            m.snapshot
                .as_ref()
                .map(|s| ("migration snapshot", s, m.source_size.div_ceil(4096) * 4096))
        }));
    let mut n = 0u64;
    for (what, id, size) in objects {
        n += 1;
        match pool.volume_size(id) {
            Ok(Some(s)) if s == size => {}
            Ok(Some(s)) => rep
                .problems
                .push(format!("{what} {id}: catalog size {size} but volume size {s}")),
            Ok(None) => rep.problems.push(format!("{what} {id} has no volume in the pool")),
            Err(e) => rep.problems.push(format!("{what} {id}: {e}")),
        }
    }
    drop(r);
    match unreferenced(pool, &disks, &snaps, &images, &migrations) {
        Ok(ids) => rep.problems.extend(
            ids.iter()
                .map(|id| format!("volume {id} is in the pool but no disk, snapshot or image refers to it")),
        ),
        Err(e) => rep.problems.push(format!("listing the pool's volumes: {e}")),
    }
    match pool.check() {
        Ok(pr) => {
            if pr.volumes != n {
                rep.problems.push(format!(
                    "the pool holds {} volumes but the catalog knows {n} disks, snapshots and images",
                    pr.volumes
                ));
            }
            rep.problems.extend(pr.problems.iter().map(|p| format!("pool: {p}")));
            rep.pool = Some(pr);
        }
        Err(e) => rep.problems.push(format!("pool check failed: {e}")),
    }
    Ok(rep)
}

/// Volumes in the pool that none of these disks, snapshots and images is.
fn unreferenced(
    pool: &Store,
    disks: &[DiskRecord],
    snaps: &[SnapshotRecord],
    images: &[ImageRecord],
    migrations: &[MigrationRecord],
) -> Result<Vec<String>, crate::volume::VolumeError> {
    let known: std::collections::HashSet<&str> = disks
        .iter()
        .map(|d| d.id.as_str())
        .chain(snaps.iter().map(|s| s.id.as_str()))
        .chain(images.iter().map(|m| m.id.as_str()))
        .chain(migrations.iter().filter(|m| m.target_new).map(|m| m.target.as_str()))
        .chain(migrations.iter().filter_map(|m| m.snapshot.as_deref()))
        .collect();
    Ok(pool
        .volume_ids()?
        .into_iter()
        .filter(|id| !known.contains(id.as_str()))
        .collect())
}

/// Deletes every volume that no disk, snapshot or image refers to, in one
/// transaction, and returns their ids. Only a copy interrupted by a crash
/// (CreateEncryptedCopy makes its volume before the catalog rows that name
/// it) leaves such a volume (an interrupted MigrateDisk's volumes are named by its
/// migration row and stay, to be resumed), so this is safe only while no operation runs:
/// the daemon calls it at start, before it serves anyone.
pub(crate) fn sweep_unreferenced(db: &redb::Database, pool: &Store) -> Result<Vec<String>, ControlError> {
    let r = db.begin_read().map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
    let disks: Vec<DiskRecord> = catalog::list_r(&r)?;
    let snaps: Vec<SnapshotRecord> = catalog::list_r(&r)?;
    let images: Vec<ImageRecord> = catalog::list_r(&r)?;
    let migrations: Vec<MigrationRecord> = catalog::list_r(&r)?;
    drop(r);
    let orphans = unreferenced(pool, &disks, &snaps, &images, &migrations)?;
    if orphans.is_empty() {
        return Ok(orphans);
    }
    let txn = db
        .begin_write()
        .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
    for id in &orphans {
        pool.delete_volume(&txn, id)?;
    }
    txn.commit().map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
    Ok(orphans)
}

/// `sealdisk check`: opens the catalog and pool of a data directory (the daemon must be
/// stopped) and checks them.
/// Why `sealdisk check` could not check a data directory.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("{} does not exist: not a sealdisk data directory", .0.display())]
    NotDataDir(std::path::PathBuf),
    #[error("pool {} does not exist (pass --pool PATH)", .0.display())]
    NoPool(std::path::PathBuf),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

pub(crate) fn check_data_dir(data_dir: &Path, pool_path: Option<&Path>) -> Result<Report, CheckError> {
    let cat = data_dir.join(catalog::CATALOG_FILE);
    if !cat.exists() {
        return Err(CheckError::NotDataDir(cat));
    }
    let db = catalog::open(&cat)?;
    let pool_path = pool_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join(crate::layout::POOL_FILE));
    if !pool_path.exists() {
        return Err(CheckError::NoPool(pool_path));
    }
    let pool = Pool::open(db.clone(), &pool_path, 0)?;
    Ok(check(&db, &Store::File(pool))?)
}

impl Control {
    pub(super) fn check_pool(&self, p: Params) -> Result<Value, ControlError> {
        p.finish()?;
        let rep = check(&self.db, &self.pool)?;
        Ok(json!({
            "Consistent": rep.consistent(),
            "Problems": rep.problems,
            "Disks": rep.disks,
            "Snapshots": rep.snapshots,
            "Images": rep.images,
            "Migrations": rep.migrations,
            "Pool": rep.pool,
            "SchemaVersion": rep.schema_version,
        }))
    }
}
