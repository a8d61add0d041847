//! Catalog-level consistency checks (the pool is checked by the volume layer; the two
//! are put together by `control::check`).

use std::collections::BTreeMap;

use redb::ReadTransaction;

use super::{
    list_r, AttachmentRecord, CatalogError, DiskRecord, Encryption, ImageRecord, InstanceRecord, KeyRecord,
    MigrationRecord, SnapshotRecord,
};

/// Every problem found in the catalog rows themselves: encrypted objects without their
/// wrapped key, key reference counts that do not match the holders, keys nobody holds,
/// attachments to unknown disks or instances, a non-shareable disk attached twice,
/// instances without their system disk.
pub fn check_catalog(txn: &ReadTransaction) -> Result<Vec<String>, CatalogError> {
    let disks: Vec<DiskRecord> = list_r(txn)?;
    let snaps: Vec<SnapshotRecord> = list_r(txn)?;
    let images: Vec<ImageRecord> = list_r(txn)?;
    let instances: Vec<InstanceRecord> = list_r(txn)?;
    let atts: Vec<AttachmentRecord> = list_r(txn)?;
    let keys: Vec<KeyRecord> = list_r(txn)?;
    let migrations: Vec<MigrationRecord> = list_r(txn)?;
    let mut problems = Vec::new();
    check_keys(&mut problems, &disks, &snaps, &images, &migrations, &keys);
    check_attachments(&mut problems, &disks, &instances, &atts);
    Ok(problems)
}

/// Encrypted objects without their wrapped key (or with another account's, or another
/// CMK's), and key reference counts that do not match the holders.
fn check_keys(
    problems: &mut Vec<String>,
    disks: &[DiskRecord],
    snaps: &[SnapshotRecord],
    images: &[ImageRecord],
    migrations: &[MigrationRecord],
    keys: &[KeyRecord],
) {
    let keys_by_id: BTreeMap<&str, &KeyRecord> = keys.iter().map(|k| (k.key_id.as_str(), k)).collect();
    let mut holders: BTreeMap<String, u64> = BTreeMap::new();
    let mut holder = |what: &str, id: &str, account: &str, region: &str, enc: &Option<Encryption>| {
        let Some(e) = enc else { return };
        *holders.entry(e.key_id.clone()).or_default() += 1;
        match keys_by_id.get(e.key_id.as_str()) {
            None => problems.push(format!(
                "{what} {id} is encrypted but its wrapped key {} is missing",
                e.key_id
            )),
            Some(k) => {
                if k.account != account || k.region != region {
                    problems.push(format!(
                        "{what} {id} ({account}/{region}) uses key {} of {}/{}",
                        e.key_id, k.account, k.region
                    ));
                }
                if k.wrapped.cmk_id != e.cmk_id {
                    problems.push(format!(
                        "{what} {id} records CMK {} but key {} is wrapped under {}",
                        e.cmk_id, e.key_id, k.wrapped.cmk_id
                    ));
                }
            }
        }
    };
    for d in disks {
        holder("disk", &d.id, &d.account, &d.region, &d.encryption);
    }
    for s in snaps {
        holder("snapshot", &s.id, &s.account, &s.region, &s.encryption);
    }
    for m in images {
        holder("image", &m.id, &m.account, &m.region, &m.encryption);
    }
    // A migration holds the key of the disk it makes and of the source it decrypts.
    for m in migrations {
        if m.target_new {
            holder("migration", &m.key, &m.account, &m.region, &m.target_encryption);
        }
        if m.snapshot.is_some() {
            holder("migration", &m.key, &m.account, &m.region, &m.source_encryption);
        }
    }
    for k in keys {
        let n = holders.get(&k.key_id).copied().unwrap_or(0);
        if n == 0 {
            problems.push(format!(
                "wrapped key {} is held by nothing (should have been shredded)",
                k.key_id
            ));
        }
        if k.refs != n {
            problems.push(format!(
                "wrapped key {} has reference count {} but {} holders",
                k.key_id, k.refs, n
            ));
        }
    }
}

/// Attachments to unknown disks or instances, a non-shareable disk attached twice,
/// instances without their system disk.
fn check_attachments(
    problems: &mut Vec<String>,
    disks: &[DiskRecord],
    instances: &[InstanceRecord],
    atts: &[AttachmentRecord],
) {
    let disk_ids: BTreeMap<&str, &DiskRecord> = disks.iter().map(|d| (d.id.as_str(), d)).collect();
    let inst_ids: BTreeMap<&str, &InstanceRecord> = instances.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut per_disk: BTreeMap<&str, u64> = BTreeMap::new();
    for a in atts {
        *per_disk.entry(a.disk_id.as_str()).or_default() += 1;
        if !disk_ids.contains_key(a.disk_id.as_str()) {
            problems.push(format!(
                "attachment {}→{}: disk does not exist",
                a.disk_id, a.instance_id
            ));
        }
        if !inst_ids.contains_key(a.instance_id.as_str()) {
            problems.push(format!(
                "attachment {}→{}: instance does not exist",
                a.disk_id, a.instance_id
            ));
        }
    }
    for (d, n) in per_disk {
        if let Some(rec) = disk_ids.get(d) {
            if n > 1 && !rec.multi_attach {
                problems.push(format!("disk {d} is not shareable but attached {n} times"));
            }
        }
    }
    for i in instances {
        if !disk_ids.contains_key(i.system_disk.as_str()) {
            problems.push(format!("instance {} has no system disk {}", i.id, i.system_disk));
        }
    }
}
