//! Catalog records as ECS-shaped JSON (what Describe* returns). No key material exists
//! in the records, so none can appear here.

use serde_json::{json, Value};

use crate::catalog::{AttachmentRecord, DiskRecord, Encryption, ImageRecord, InstanceRecord, SnapshotRecord};

fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

fn enc_fields(e: &Option<Encryption>) -> (bool, String, String) {
    match e {
        Some(e) => (true, e.cmk_id.clone(), e.key_id.clone()),
        None => (false, String::new(), String::new()),
    }
}

pub(super) fn disk(d: &DiskRecord, atts: &[&AttachmentRecord], on_data_path: bool) -> Value {
    let (encrypted, cmk, key) = enc_fields(&d.encryption);
    json!({
        "DiskId": d.id,
        "DiskName": d.name,
        "Description": d.description,
        "RegionId": d.region,
        "AccountId": d.account,
        "Size": gib(d.size),
        "SizeBytes": d.size,
        "Category": d.category.as_str(),
        "DiskKind": d.kind.as_str(),
        "Type": d.role.as_str(),
        "Encrypted": encrypted,
        "KMSKeyId": cmk,
        "DataKeyId": key,
        "SourceSnapshotId": d.source_snapshot.clone().unwrap_or_default(),
        "ImageId": d.source_image.clone().unwrap_or_default(),
        "MultiAttach": if d.multi_attach { "Enabled" } else { "Disabled" },
        "Status": if atts.is_empty() { "Available" } else { "In_use" },
        "InstanceId": atts.first().map(|a| a.instance_id.clone()).unwrap_or_default(),
        "Attachments": { "Attachment": atts.iter().map(|a| json!({
            "InstanceId": a.instance_id, "AttachedTime": a.attached_at })).collect::<Vec<_>>() },
        "Exported": on_data_path,
        "QoS": d.qos.map(|q| json!({ "Iops": q.iops, "BandwidthBytesPerSec": q.bandwidth_bytes })),
        "CreationTime": d.created_at,
    })
}

pub(super) fn snapshot(s: &SnapshotRecord) -> Value {
    let (encrypted, cmk, key) = enc_fields(&s.encryption);
    json!({
        "SnapshotId": s.id,
        "SnapshotName": s.name,
        "RegionId": s.region,
        "AccountId": s.account,
        "SourceDiskId": s.source_disk,
        "SourceDiskSize": gib(s.source_disk_size),
        "SourceDiskCategory": s.category.as_str(),
        "SizeBytes": s.size,
        "Encrypted": encrypted,
        "KMSKeyId": cmk,
        "DataKeyId": key,
        "Status": "accomplished",
        "Progress": "100%",
        "CreationTime": s.created_at,
    })
}

pub(super) fn image(m: &ImageRecord, viewer: &str) -> Value {
    let (encrypted, cmk, key) = enc_fields(&m.encryption);
    json!({
        "ImageId": m.id,
        "ImageName": m.name,
        "RegionId": m.region,
        "AccountId": m.account,
        "ImageOwnerAlias": if m.account == viewer { "self" } else { "others" },
        "SourceSnapshotId": m.source_snapshot.clone().unwrap_or_default(),
        "SourceImageId": m.source_image.clone().unwrap_or_default(),
        "Size": gib(m.size),
        "SizeBytes": m.size,
        "Encrypted": encrypted,
        "KMSKeyId": cmk,
        "DataKeyId": key,
        "SharedWith": if m.account == viewer { json!(m.shared_with) } else { json!([]) },
        "Status": "Available",
        "CreationTime": m.created_at,
    })
}

pub(super) fn instance(i: &InstanceRecord, data_disks: &[String]) -> Value {
    json!({
        "InstanceId": i.id,
        "InstanceName": i.name,
        "RegionId": i.region,
        "AccountId": i.account,
        "ImageId": i.image_id.clone().unwrap_or_default(),
        "SystemDiskId": i.system_disk,
        "DataDiskIds": data_disks,
        "Status": "Running",
        "CreationTime": i.created_at,
    })
}
