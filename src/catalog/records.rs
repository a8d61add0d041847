//! The records the catalog stores, one JSON value per row. None of them holds key
//! material: encrypted objects name their data key by id, and the key's row holds only
//! the wrapped form.

use serde::{Deserialize, Serialize};

use crate::kms::WrappedKey;

/// Disk performance category (ECS: `cloud`, `cloud_efficiency`, `cloud_ssd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Basic,
    Ultra,
    Ssd,
}

impl Category {
    /// `basic|ultra|ssd`, or the ECS spelling `cloud|cloud_efficiency|cloud_ssd`.
    pub fn parse(s: &str) -> Option<Category> {
        match s {
            "basic" | "cloud" => Some(Category::Basic),
            "ultra" | "cloud_efficiency" => Some(Category::Ultra),
            "ssd" | "cloud_ssd" => Some(Category::Ssd),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Basic => "basic",
            Category::Ultra => "ultra",
            Category::Ssd => "ssd",
        }
    }
    /// Shared block storage (MultiAttach) exists for these categories only.
    pub fn multi_attach_allowed(self) -> bool {
        matches!(self, Category::Ultra | Category::Ssd)
    }
}

/// Where a disk lives. Only `cloud` disks can be encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Cloud,
    Local,
    Ephemeral,
}

impl DiskKind {
    pub fn parse(s: &str) -> Option<DiskKind> {
        match s {
            "cloud" => Some(DiskKind::Cloud),
            "local" => Some(DiskKind::Local),
            "ephemeral" => Some(DiskKind::Ephemeral),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKind::Cloud => "cloud",
            DiskKind::Local => "local",
            DiskKind::Ephemeral => "ephemeral",
        }
    }
}

/// System or data disk. Only data disks can be encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    System,
    Data,
}

impl DiskRole {
    pub fn parse(s: &str) -> Option<DiskRole> {
        match s {
            "system" => Some(DiskRole::System),
            "data" => Some(DiskRole::Data),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DiskRole::System => "system",
            DiskRole::Data => "data",
        }
    }
}

/// Per-disk QoS caps, fixed at creation from the category table (see `control::qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosCaps {
    /// I/O operations per second.
    pub iops: u64,
    /// Bytes per second.
    pub bandwidth_bytes: u64,
}

/// The encryption attributes shared by disks, snapshots and images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// Data key id (row in the `keys` table).
    pub key_id: String,
    /// The service CMK the data key is wrapped under (never changes).
    pub cmk_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: String,
    pub account: String,
    pub region: String,
    pub name: String,
    pub description: String,
    /// Bytes (a multiple of 4096).
    pub size: u64,
    pub category: Category,
    pub kind: DiskKind,
    pub role: DiskRole,
    pub encryption: Option<Encryption>,
    /// The snapshot the disk was created from (kept after that snapshot is deleted).
    pub source_snapshot: Option<String>,
    /// The image a system disk was created from.
    #[serde(default)]
    pub source_image: Option<String>,
    pub multi_attach: bool,
    /// `None` when QoS was switched off when the disk was created.
    pub qos: Option<QosCaps>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub account: String,
    pub region: String,
    pub name: String,
    pub source_disk: String,
    pub source_disk_size: u64,
    pub size: u64,
    pub category: Category,
    pub encryption: Option<Encryption>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub account: String,
    pub region: String,
    pub name: String,
    pub source_snapshot: Option<String>,
    /// For copies: the image it was copied from.
    pub source_image: Option<String>,
    pub size: u64,
    pub encryption: Option<Encryption>,
    /// Accounts the image is shared with.
    pub shared_with: Vec<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub account: String,
    pub region: String,
    pub name: String,
    pub system_disk: String,
    pub image_id: Option<String>,
    pub created_at: String,
}

/// Instance ↔ disk. Keyed `disk_id/instance_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub disk_id: String,
    pub instance_id: String,
    pub attached_at: String,
}

/// A wrapped data key and how many disks, snapshots and images hold it. When the count
/// drops to zero the row is deleted: that is the crypto-shred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub account: String,
    pub region: String,
    pub wrapped: WrappedKey,
    pub refs: u64,
    /// The disk the key was generated for.
    pub origin_disk: String,
    pub created_at: String,
}

/// KMS activation as seen by the catalog (the KMS keeps its own authoritative state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRecord {
    pub account: String,
    pub region: String,
    pub activated_at: String,
}

/// A MigrateDisk in progress (or interrupted): what it copies where, and its checkpoint.
/// Keyed by [`MigrationRecord::key`] (account, region, source, target as the caller named
/// them), so running the same migration again finds it and resumes. While it exists, it
/// holds the target volume of a new disk (which has no disk row yet) and the source's
/// point-in-time clone, and one reference to each data key it uses: the new disk's
/// (`target_encryption` when `target_new`) and, for an encrypted source disk, the
/// source's (`source_encryption`), so neither is shredded under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub key: String,
    pub account: String,
    pub region: String,
    /// `disk`, `file` or `nbd`.
    pub source_kind: String,
    /// The source disk id, file path (beneath the import directory) or NBD URI.
    pub source: String,
    pub source_size: u64,
    /// For a file: its size and modification time when the migration began; a resume
    /// refuses a file that changed.
    pub source_stamp: Option<String>,
    /// The point-in-time clone of a source disk that is read instead of it.
    pub snapshot: Option<String>,
    pub source_encryption: Option<Encryption>,
    /// The target disk id.
    pub target: String,
    /// The migration made the target (no disk row until it finishes).
    pub target_new: bool,
    pub target_encryption: Option<Encryption>,
    /// Target size in bytes.
    pub size: u64,
    pub category: Category,
    pub name: String,
    pub description: String,
    /// Checkpoint: every source byte before this offset is durably on the target.
    pub offset: u64,
    /// Source bytes read and target bytes written up to `offset`.
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub created_at: String,
}

impl MigrationRecord {
    /// The key of a migration of `source` (as named) into `target` (`new` or a disk id).
    pub fn key_of(account: &str, region: &str, source: &str, target: &str) -> String {
        format!("{account}/{region}/{target}/{source}")
    }
}
