//! The catalog: sealdisk's control-plane state in one embedded ACID database (redb).
//!
//! One `redb::Database` at `DATA_DIR/catalog.redb` is shared with the volume pool, which
//! keeps its own tables in it, so an operation can change catalog rows and volume maps in
//! one write transaction. Catalog tables are named `catalog_*`; every row is a JSON
//! document (see `docs/format.md`, "Catalog schema"). No row ever holds plaintext key
//! material: data keys are stored only in their wrapped form.

#![forbid(unsafe_code)]

mod check;
mod records;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use check::check_catalog;
pub use records::{
    ActivationRecord, AttachmentRecord, Category, DiskKind, DiskRecord, DiskRole, Encryption, ImageRecord,
    InstanceRecord, KeyRecord, MigrationRecord, QosCaps, SnapshotRecord,
};

/// Catalog schema version written by this build. Opening a catalog with a newer version
/// is refused; older versions are migrated (none exist yet).
pub const SCHEMA_VERSION: u64 = 1;
/// File name of the database inside the data directory.
pub use crate::layout::CATALOG_FILE;

type Tbl = TableDefinition<'static, &'static str, &'static str>;

pub const META: Tbl = TableDefinition::new("catalog_meta");
pub const DISKS: Tbl = TableDefinition::new("catalog_disks");
pub const SNAPSHOTS: Tbl = TableDefinition::new("catalog_snapshots");
pub const IMAGES: Tbl = TableDefinition::new("catalog_images");
pub const INSTANCES: Tbl = TableDefinition::new("catalog_instances");
pub const ATTACHMENTS: Tbl = TableDefinition::new("catalog_attachments");
pub const KEYS: Tbl = TableDefinition::new("catalog_keys");
pub const ACTIVATIONS: Tbl = TableDefinition::new("catalog_activations");
pub const MIGRATIONS: Tbl = TableDefinition::new("catalog_migrations");

const ALL_TABLES: [Tbl; 9] = [
    META,
    DISKS,
    SNAPSHOTS,
    IMAGES,
    INSTANCES,
    ATTACHMENTS,
    KEYS,
    ACTIVATIONS,
    MIGRATIONS,
];

/// Why the catalog failed. Database failures keep their cause
/// (`std::error::Error::source`).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// `Catalog.Error`: the database failed (I/O, lock, ...).
    #[error("catalog database error: {source}")]
    Db {
        #[source]
        source: Box<redb::Error>,
    },
    /// `Catalog.Error`: the database file could not be opened.
    #[error("catalog database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// `Catalog.SchemaTooNew`: written by a newer sealdisk.
    #[error(
        "catalog schema version {found} is newer than this sealdisk supports ({supported}); \
         run the sealdisk version that wrote it, or a newer one"
    )]
    SchemaTooNew { found: u64, supported: u64 },
    /// `Catalog.Corrupt`: a row does not parse.
    #[error("catalog row unreadable: {0}; run `sealdisk check` and restore the data directory from backup")]
    Corrupt(String),
    /// `Catalog.Locked`: another process has the catalog open.
    #[error(
        "catalog {0} is in use by another sealdisk process; stop the daemon first (or talk to it over its socket)"
    )]
    Locked(String),
}

impl CatalogError {
    pub fn code(&self) -> &'static str {
        match self {
            CatalogError::Db { .. } | CatalogError::Open { .. } => "Catalog.Error",
            CatalogError::SchemaTooNew { .. } => "Catalog.SchemaTooNew",
            CatalogError::Corrupt(_) => "Catalog.Corrupt",
            CatalogError::Locked(_) => "Catalog.Locked",
        }
    }
}

pub(crate) fn db_err(e: impl Into<redb::Error>) -> CatalogError {
    CatalogError::Db {
        source: Box::new(e.into()),
    }
}

/// Opens (creating on first use) the database at `path` and makes sure the catalog
/// tables exist with a supported schema version.
pub fn open(path: &Path) -> Result<Arc<Database>, CatalogError> {
    let db = match Database::create(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(CatalogError::Locked(path.display().to_string())),
        Err(e) => {
            return Err(CatalogError::Open {
                path: path.display().to_string(),
                source: Box::new(e),
            })
        }
    };
    init(&db)?;
    Ok(Arc::new(db))
}

/// Creates missing tables and checks/sets the schema version.
pub fn init(db: &Database) -> Result<(), CatalogError> {
    let txn = db.begin_write().map_err(db_err)?;
    for t in ALL_TABLES {
        txn.open_table(t).map_err(db_err)?;
    }
    let found = schema_version_w(&txn)?;
    match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(CatalogError::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            })
        }
        Some(_) => {}
        None => {
            let mut t = txn.open_table(META).map_err(db_err)?;
            t.insert("schema_version", SCHEMA_VERSION.to_string().as_str())
                .map_err(db_err)?;
        }
    }
    txn.commit().map_err(db_err)
}

fn schema_version_w(txn: &WriteTransaction) -> Result<Option<u64>, CatalogError> {
    let t = txn.open_table(META).map_err(db_err)?;
    let v = t.get("schema_version").map_err(db_err)?;
    match v {
        None => Ok(None),
        Some(g) => g
            .value()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| CatalogError::Corrupt(format!("schema_version {:?}", g.value()))),
    }
}

/// The schema version recorded in an open catalog.
pub fn schema_version(txn: &ReadTransaction) -> Result<u64, CatalogError> {
    let t = txn.open_table(META).map_err(db_err)?;
    let v = t.get("schema_version").map_err(db_err)?;
    let s = v.map(|g| g.value().to_owned()).unwrap_or_default();
    s.parse()
        .map_err(|_| CatalogError::Corrupt(format!("schema_version {s:?}")))
}

/// A JSON row type and the table it lives in.
pub trait Record: Serialize + DeserializeOwned {
    const TABLE: Tbl;
    fn key(&self) -> String;
}

macro_rules! record {
    ($t:ty, $table:expr, |$s:ident| $key:expr) => {
        impl Record for $t {
            const TABLE: Tbl = $table;
            fn key(&self) -> String {
                let $s = self;
                $key
            }
        }
    };
}

record!(DiskRecord, DISKS, |r| r.id.clone());
record!(SnapshotRecord, SNAPSHOTS, |r| r.id.clone());
record!(ImageRecord, IMAGES, |r| r.id.clone());
record!(InstanceRecord, INSTANCES, |r| r.id.clone());
record!(KeyRecord, KEYS, |r| r.key_id.clone());
record!(AttachmentRecord, ATTACHMENTS, |r| attachment_key(
    &r.disk_id,
    &r.instance_id
));
record!(ActivationRecord, ACTIVATIONS, |r| format!("{}/{}", r.account, r.region));
record!(MigrationRecord, MIGRATIONS, |r| r.key.clone());

/// Row key of an attachment.
pub fn attachment_key(disk_id: &str, instance_id: &str) -> String {
    format!("{disk_id}/{instance_id}")
}

fn decode<R: Record>(key: &str, v: &str) -> Result<R, CatalogError> {
    serde_json::from_str(v).map_err(|e| CatalogError::Corrupt(format!("{} row {key:?}: {e}", R::TABLE.name())))
}

/// Inserts or replaces a row.
pub fn put<R: Record>(txn: &WriteTransaction, r: &R) -> Result<(), CatalogError> {
    let v = serde_json::to_string(r).expect("records serialize");
    let mut t = txn.open_table(R::TABLE).map_err(db_err)?;
    t.insert(r.key().as_str(), v.as_str()).map_err(db_err)?;
    Ok(())
}

/// Removes a row; `true` if it existed.
pub fn remove<R: Record>(txn: &WriteTransaction, key: &str) -> Result<bool, CatalogError> {
    let mut t = txn.open_table(R::TABLE).map_err(db_err)?;
    let old = t.remove(key).map_err(db_err)?;
    Ok(old.is_some())
}

fn get_in<R: Record>(t: &impl ReadableTable<&'static str, &'static str>, key: &str) -> Result<Option<R>, CatalogError> {
    match t.get(key).map_err(db_err)? {
        None => Ok(None),
        Some(g) => decode(key, g.value()).map(Some),
    }
}

fn list_in<R: Record>(t: &impl ReadableTable<&'static str, &'static str>) -> Result<Vec<R>, CatalogError> {
    let mut out = Vec::new();
    for row in t.iter().map_err(db_err)? {
        let (k, v) = row.map_err(db_err)?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// A row, read inside a write transaction.
pub fn get<R: Record>(txn: &WriteTransaction, key: &str) -> Result<Option<R>, CatalogError> {
    let t = txn.open_table(R::TABLE).map_err(db_err)?;
    get_in(&t, key)
}

/// Every row of a table, in key order, inside a write transaction.
pub fn list<R: Record>(txn: &WriteTransaction) -> Result<Vec<R>, CatalogError> {
    let t = txn.open_table(R::TABLE).map_err(db_err)?;
    list_in(&t)
}

/// A row, in a read transaction.
pub fn get_r<R: Record>(txn: &ReadTransaction, key: &str) -> Result<Option<R>, CatalogError> {
    let t = txn.open_table(R::TABLE).map_err(db_err)?;
    get_in(&t, key)
}

/// Every row of a table, in key order, in a read transaction.
pub fn list_r<R: Record>(txn: &ReadTransaction) -> Result<Vec<R>, CatalogError> {
    let t = txn.open_table(R::TABLE).map_err(db_err)?;
    list_in(&t)
}

/// A full, ordered dump of every catalog table as JSON (for tests and `check`):
/// `{table: {key: row}}`. Holds no key material (the catalog has none).
pub fn dump(txn: &ReadTransaction) -> Result<serde_json::Value, CatalogError> {
    let mut out = serde_json::Map::new();
    for def in ALL_TABLES {
        let t = txn.open_table(def).map_err(db_err)?;
        let mut rows = serde_json::Map::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let val = serde_json::from_str(v.value()).unwrap_or_else(|_| serde_json::Value::String(v.value().into()));
            rows.insert(k.value().to_owned(), val);
        }
        out.insert(def.name().to_owned(), serde_json::Value::Object(rows));
    }
    Ok(serde_json::Value::Object(out))
}
