//! The pool's redb tables (format version [`super::POOL_VERSION`]).

use redb::TableDefinition;

/// "version", "cluster" (bytes), "high" (first never-allocated cluster).
pub(crate) const POOL_META: TableDefinition<&str, u64> = TableDefinition::new("pool_meta");
/// Volume id → size in bytes.
pub(crate) const VOL_SIZE: TableDefinition<&str, u64> = TableDefinition::new("vol_size");
/// (volume id, cluster index) → physical cluster.
pub(crate) const VOL_MAP: TableDefinition<(&str, u64), u64> = TableDefinition::new("vol_map");
/// Physical cluster → number of map entries using it.
pub(crate) const REFS: TableDefinition<u64, u64> = TableDefinition::new("refs");
/// Released physical clusters below the high-water mark.
pub(crate) const FREE: TableDefinition<u64, ()> = TableDefinition::new("free");
