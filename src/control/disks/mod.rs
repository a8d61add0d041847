//! Disks: CreateDisk, DeleteDisk, ResetDisk, ReInitDisk, ModifyDiskAttribute,
//! DescribeDisks, and the disk planning shared with CreateInstance; [`attach`]:
//! AttachDisk and DetachDisk (putting a disk on the data path and taking it off).

pub(super) mod attach;

use redb::WriteTransaction;
use serde_json::{json, Value};

use crate::catalog::{
    self, AttachmentRecord, Category, DiskKind, DiskRecord, DiskRole, Encryption, ImageRecord, KeyRecord,
    SnapshotRecord,
};
use crate::control::params::check_text;
use crate::control::{same_region, view, Control, ControlError, Params};
use crate::kms::{CallOpts, DataKey, KeyContext, Reservation};

/// What the caller asked for.
#[derive(Debug, Clone)]
pub(super) struct DiskSpec {
    pub account: String,
    pub region: String,
    pub name: String,
    pub description: String,
    pub size: Option<u64>,
    pub category: Category,
    pub kind: DiskKind,
    pub role: DiskRole,
    pub encrypted: Option<bool>,
    pub snapshot_id: Option<String>,
    pub image_id: Option<String>,
    pub multi_attach: bool,
}

/// Where the disk's initial contents come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    Blank,
    Snapshot(SnapshotRecord),
    Image(ImageRecord),
}

/// A checked spec: every limit passed, nothing changed yet.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub spec: DiskSpec,
    pub size: u64,
    pub source: Source,
    pub encrypted: bool,
    /// The lineage key of the source, if it is encrypted.
    pub lineage: Option<Encryption>,
}

/// The key side of a new disk, obtained from the KMS before the transaction.
pub(super) struct KeyPlan {
    pub enc: Option<Encryption>,
    /// A freshly generated key's row (refs 1), for a disk with a new key.
    pub new_row: Option<KeyRecord>,
    /// The plaintext key (secret memory) when the caller will attach the disk right away.
    pub key: Option<DataKey>,
}

/// `DiskCategory` values: basic|ultra|ssd, the ECS names, and the ECS local-disk names.
pub(super) fn parse_category(s: &str, name: &str) -> Result<(Category, Option<DiskKind>), ControlError> {
    if let Some(c) = Category::parse(s) {
        return Ok((c, None));
    }
    match s {
        "ephemeral_ssd" => Ok((Category::Ssd, Some(DiskKind::Ephemeral))),
        "local_ssd_pro" => Ok((Category::Ssd, Some(DiskKind::Local))),
        "local_hdd_pro" => Ok((Category::Basic, Some(DiskKind::Local))),
        _ => Err(ControlError::param(
            format!("InvalidParameter.{name}"),
            format!(
                "{name}={s:?}: use basic, ultra or ssd (ECS: cloud, cloud_efficiency, cloud_ssd; local: \
                 ephemeral_ssd, local_ssd_pro, local_hdd_pro)"
            ),
        )),
    }
}

/// An optional `DiskCategory` for a cloud disk made from other data (CreateEncryptedCopy,
/// MigrateDisk): a local kind is refused with `code` and "{s} is a {kind} disk{why}".
pub(super) fn parse_cloud_category(
    s: Option<&str>,
    code: &'static str,
    why: &str,
) -> Result<Option<Category>, ControlError> {
    let Some(s) = s else { return Ok(None) };
    match parse_category(s, "DiskCategory")? {
        (c, None) => Ok(Some(c)),
        (_, Some(kind)) => Err(ControlError::limit(
            code,
            format!("{s} is a {} disk{why}", kind.as_str()),
        )),
    }
}

fn parse_multi_attach(p: &mut Params) -> Result<bool, ControlError> {
    if let Ok(Some(b)) = p.opt_bool("MultiAttach") {
        return Ok(b);
    }
    match p.opt_str("MultiAttach") {
        Ok(None) => Ok(false),
        Ok(Some(s)) if s.eq_ignore_ascii_case("enabled") => Ok(true),
        Ok(Some(s)) if s.eq_ignore_ascii_case("disabled") => Ok(false),
        _ => Err(ControlError::param(
            "InvalidParameter.MultiAttach",
            "MultiAttach: use Enabled or Disabled (or true/false)",
        )),
    }
}

/// Reads a disk's parameters (CreateDisk, or one `DataDisk.n` / `SystemDisk` group).
pub(super) fn parse_spec(
    p: &mut Params,
    account: &str,
    region: &str,
    category_param: &str,
    role: Option<DiskRole>,
) -> Result<DiskSpec, ControlError> {
    p.refuse_kms_key_id()?;
    let name = p.opt_str("DiskName")?.unwrap_or_default();
    check_text("DiskName", &name)?;
    let description = p.opt_str("Description")?.unwrap_or_default();
    check_text("Description", &description)?;
    let size = p.size()?;
    let (category, kind_from_cat) = match p.opt_str(category_param)? {
        None => (Category::Basic, None),
        Some(s) => parse_category(&s, category_param)?,
    };
    let kind = match (p.opt_str("DiskKind")?, kind_from_cat) {
        (None, k) => k.unwrap_or(DiskKind::Cloud),
        (Some(s), k) => {
            let parsed = DiskKind::parse(&s).ok_or_else(|| {
                ControlError::param(
                    "InvalidParameter.DiskKind",
                    format!("DiskKind={s:?}: use cloud, local or ephemeral"),
                )
            })?;
            if k.is_some_and(|k| k != parsed) {
                return Err(ControlError::param(
                    "InvalidParameter.DiskKind",
                    format!("DiskKind={s} contradicts {category_param}"),
                ));
            }
            parsed
        }
    };
    let role = match role {
        Some(r) => r,
        None => match p.opt_str("DiskRole")? {
            None => DiskRole::Data,
            Some(s) => DiskRole::parse(&s).ok_or_else(|| {
                ControlError::param(
                    "InvalidParameter.DiskRole",
                    format!("DiskRole={s:?}: use data or system"),
                )
            })?,
        },
    };
    let encrypted = p.opt_bool("Encrypted")?;
    let snapshot_id = p.opt_str("SnapshotId")?;
    let multi_attach = parse_multi_attach(p)?;
    Ok(DiskSpec {
        account: account.to_owned(),
        region: region.to_owned(),
        name,
        description,
        size,
        category,
        kind,
        role,
        encrypted,
        snapshot_id,
        image_id: None,
        multi_attach,
    })
}

impl Control {
    /// Checks every limit for a new disk; changes nothing.
    pub(super) fn plan_disk(&self, txn: &WriteTransaction, spec: DiskSpec) -> Result<Plan, ControlError> {
        let source = match (&spec.snapshot_id, &spec.image_id) {
            (Some(s), _) => {
                let snap = self.find_snapshot(txn, s, &spec.account)?;
                same_region(Some(&spec.region), &snap.region, "InvalidSnapshotId.NotFound", s)?;
                Source::Snapshot(snap)
            }
            (None, Some(m)) => {
                let img = self.find_image(txn, m, &spec.account, true)?;
                same_region(Some(&spec.region), &img.region, "InvalidImageId.NotFound", m)?;
                Source::Image(img)
            }
            (None, None) => Source::Blank,
        };
        let (lineage, src_size) = match &source {
            Source::Blank => (None, 0),
            Source::Snapshot(s) => (s.encryption.clone(), s.size),
            Source::Image(m) => (m.encryption.clone(), m.size),
        };
        // No conversion in either direction: the source decides.
        if !matches!(source, Source::Blank) {
            match (spec.encrypted, lineage.is_some()) {
                (Some(true), false) => {
                    return Err(ControlError::limit(
                        "InvalidOperation.EncryptionConversion",
                        "an unencrypted snapshot cannot become an encrypted disk; create an encrypted disk \
                         and copy the data into it (sealdisk copies with `rsync`/`dd` over the attached disks)",
                    ))
                }
                (Some(false), true) => {
                    return Err(ControlError::limit(
                        "InvalidOperation.EncryptionConversion",
                        "a disk created from an encrypted snapshot is always encrypted with the snapshot's key; \
                         omit Encrypted or set it to true",
                    ))
                }
                _ => {}
            }
        }
        let encrypted = lineage.is_some() || spec.encrypted.unwrap_or(false);
        if encrypted && spec.role == DiskRole::System {
            let why = if matches!(source, Source::Image(_)) {
                "the image comes from an encrypted snapshot and a system disk cannot be encrypted; use an unencrypted image"
            } else {
                "system disks cannot be encrypted; encrypt a data disk instead (set Encrypted only on DataDisk.n)"
            };
            return Err(ControlError::limit("InvalidOperation.EncryptedSystemDisk", why));
        }
        if encrypted && spec.kind != DiskKind::Cloud {
            return Err(ControlError::limit(
                "InvalidOperation.EncryptedLocalDisk",
                format!(
                    "{} disks cannot be encrypted; only cloud disks (basic, ultra, ssd) can",
                    spec.kind.as_str()
                ),
            ));
        }
        if spec.multi_attach {
            if !spec.category.multi_attach_allowed() {
                return Err(ControlError::limit(
                    "InvalidOperation.MultiAttachCategory",
                    format!(
                        "shared block storage (MultiAttach) needs category ultra or ssd, not {}",
                        spec.category.as_str()
                    ),
                ));
            }
            if spec.role == DiskRole::System || spec.kind != DiskKind::Cloud {
                return Err(ControlError::limit(
                    "InvalidOperation.MultiAttachDiskType",
                    "only cloud data disks can be shared (MultiAttach)",
                ));
            }
        }
        let size = match spec.size {
            Some(s) if s < src_size => {
                return Err(ControlError::param(
                    "InvalidParameter.Size",
                    format!("size {s} bytes is smaller than the source ({src_size} bytes); give at least that"),
                ))
            }
            Some(s) => s,
            None if src_size > 0 => src_size,
            None => {
                return Err(ControlError::param(
                    "MissingParameter.Size",
                    "Size (GiB) or SizeBytes is required for a disk without SnapshotId",
                ))
            }
        };
        Ok(Plan {
            spec,
            size,
            source,
            encrypted,
            lineage,
        })
    }

    /// The KMS side of a new disk (one metered call, from `res`): a new data key, or
    /// the lineage key unwrapped once to prove it opens. `keep` keeps the plaintext key for
    /// an immediate attach.
    pub(super) fn plan_key(
        &self,
        plan: &Plan,
        disk_id: &str,
        res: &Reservation,
        keep: bool,
    ) -> Result<KeyPlan, ControlError> {
        if !plan.encrypted {
            return Ok(KeyPlan {
                enc: None,
                new_row: None,
                key: None,
            });
        }
        let opts = CallOpts::disk(disk_id).reserved(res);
        match &plan.lineage {
            Some(enc) => {
                let row = self.peek(|txn| self.key_record(txn, enc))?;
                let ctx = KeyContext::new(&row.account, &row.region, &row.key_id);
                let key = self.kms.unwrap_data_key(&ctx, &row.wrapped, opts)?;
                Ok(KeyPlan {
                    enc: Some(enc.clone()),
                    new_row: None,
                    key: keep.then_some(key),
                })
            }
            None => {
                let key_id = crate::control::util::new_id("k");
                let ctx = KeyContext::new(&plan.spec.account, &plan.spec.region, &key_id);
                let (key, wrapped) = self.kms.generate_data_key(&ctx, opts)?;
                let enc = Encryption {
                    key_id: key_id.clone(),
                    cmk_id: wrapped.cmk_id.clone(),
                };
                let row = KeyRecord {
                    key_id,
                    account: plan.spec.account.clone(),
                    region: plan.spec.region.clone(),
                    wrapped,
                    refs: 0,
                    origin_disk: disk_id.to_owned(),
                    created_at: crate::control::util::now_rfc3339(),
                };
                Ok(KeyPlan {
                    enc: Some(enc),
                    new_row: Some(row),
                    key: keep.then_some(key),
                })
            }
        }
    }

    /// `first` again, in the transaction that writes: the same plan (operations are
    /// serialised), or an error if its key lineage changed meanwhile.
    pub(super) fn replan(&self, txn: &WriteTransaction, spec: DiskSpec, first: &Plan) -> Result<Plan, ControlError> {
        let plan = self.plan_disk(txn, spec)?;
        if plan.lineage != first.lineage || plan.encrypted != first.encrypted {
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                "the disk's source changed while its key was being prepared; try again",
            ));
        }
        Ok(plan)
    }

    /// Creates the volume and the catalog rows of a planned disk, in `txn`.
    pub(super) fn apply_disk(
        &self,
        txn: &WriteTransaction,
        plan: &Plan,
        disk_id: &str,
        keys: &KeyPlan,
    ) -> Result<DiskRecord, ControlError> {
        match &plan.source {
            Source::Blank => self.pool.create_volume(txn, disk_id, plan.size)?,
            Source::Snapshot(s) => self.pool.clone_volume(txn, &s.id, disk_id, plan.size)?,
            Source::Image(m) => self.pool.clone_volume(txn, &m.id, disk_id, plan.size)?,
        }
        if let Some(row) = &keys.new_row {
            catalog::put(txn, row)?;
        }
        if let Some(enc) = &keys.enc {
            self.key_ref(txn, enc)?;
        }
        let s = &plan.spec;
        let rec = DiskRecord {
            id: disk_id.to_owned(),
            account: s.account.clone(),
            region: s.region.clone(),
            name: s.name.clone(),
            description: s.description.clone(),
            size: plan.size,
            category: s.category,
            kind: s.kind,
            role: s.role,
            encryption: keys.enc.clone(),
            source_snapshot: match &plan.source {
                Source::Snapshot(x) => Some(x.id.clone()),
                _ => None,
            },
            source_image: match &plan.source {
                Source::Image(x) => Some(x.id.clone()),
                _ => None,
            },
            multi_attach: s.multi_attach,
            qos: self.cfg.qos.caps(s.category, plan.size),
            created_at: crate::control::util::now_rfc3339(),
        };
        catalog::put(txn, &rec)?;
        if self.pool.file().is_none() {
            self.describe_disk(txn, &rec, keys)?;
        }
        Ok(rec)
    }

    /// Writes what another host needs to adopt the disk (account, region, category, size,
    /// key id, wrapped key and its format version) with its volume (RBD image metadata).
    fn describe_disk(&self, txn: &WriteTransaction, rec: &DiskRecord, keys: &KeyPlan) -> Result<(), ControlError> {
        let mut meta = vec![
            ("account", rec.account.clone()),
            ("region", rec.region.clone()),
            (
                "category",
                serde_json::to_value(rec.category)
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .unwrap_or_default(),
            ),
            ("size", rec.size.to_string()),
        ];
        if let Some(enc) = &keys.enc {
            let row = match &keys.new_row {
                Some(r) => r.clone(),
                None => self.key_record(txn, enc)?,
            };
            meta.push(("key_id", enc.key_id.clone()));
            meta.push(("cmk_id", enc.cmk_id.clone()));
            meta.push(("key_format", row.wrapped.format.to_string()));
            meta.push((
                "wrapped_key",
                serde_json::to_string(&row.wrapped).map_err(|e| ControlError::DataPath(format!("wrapped key: {e}")))?,
            ));
        }
        self.pool.describe_volume(txn, &rec.id, &meta)?;
        Ok(())
    }

    pub(super) fn create_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let region = p.region("RegionId")?;
        let account = p.account()?;
        let spec = parse_spec(&mut p, &account, &region, "DiskCategory", None)?;
        p.finish()?;
        let plan = self.peek(|txn| self.plan_disk(txn, spec.clone()))?;
        let disk_id = crate::control::util::new_id("d");
        let res = if plan.encrypted {
            Some(self.kms_reserve(&account, &region, 1)?)
        } else {
            None
        };
        let keys = match &res {
            Some(r) => self.plan_key(&plan, &disk_id, r, false)?,
            None => KeyPlan {
                enc: None,
                new_row: None,
                key: None,
            },
        };
        let txn = self.begin()?;
        let plan = self.replan(&txn, spec, &plan)?;
        self.apply_disk(&txn, &plan, &disk_id, &keys)?;
        txn.commit()?;
        Ok(json!({ "DiskId": disk_id, "Encrypted": plan.encrypted }))
    }

    pub(super) fn attachments_of(
        &self,
        txn: &WriteTransaction,
        disk_id: &str,
    ) -> Result<Vec<AttachmentRecord>, ControlError> {
        Ok(catalog::list::<AttachmentRecord>(txn)?
            .into_iter()
            .filter(|a| a.disk_id == disk_id)
            .collect())
    }

    /// Refuses a disk that is attached, or that an unfinished migration writes into.
    fn require_detached(&self, txn: &WriteTransaction, d: &DiskRecord, what: &str) -> Result<(), ControlError> {
        if let Some(m) = self.migration_target_of(txn, &d.id)? {
            return Err(ControlError::state(
                "IncorrectDiskStatus.Migrating",
                format!(
                    "disk {} is the target of a migration ({m}) that has not finished; {what} needs it finished \
                     (run the migration again to resume it) or abandoned (MigrateDisk with Abandon=true)",
                    d.id
                ),
            ));
        }
        let atts = self.attachments_of(txn, &d.id)?;
        if !atts.is_empty() || self.exports.get(&d.id).is_some() {
            let to: Vec<&str> = atts.iter().map(|a| a.instance_id.as_str()).collect();
            return Err(ControlError::state(
                "IncorrectDiskStatus",
                format!(
                    "disk {} is attached to {}; {what} needs it detached: call DetachDisk first",
                    d.id,
                    to.join(", ")
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn delete_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("DiskId")?;
        p.finish()?;
        let check = |txn: &WriteTransaction| {
            let d = self.find_disk(txn, &id, &account)?;
            same_region(region.as_deref(), &d.region, "InvalidDiskId.NotFound", &id)?;
            self.require_detached(txn, &d, "DeleteDisk")?;
            if let Some(i) = catalog::list::<catalog::InstanceRecord>(txn)?
                .into_iter()
                .find(|i| i.system_disk == id)
            {
                return Err(ControlError::state(
                    "IncorrectDiskStatus",
                    format!(
                        "disk {id} is the system disk of instance {}; delete the instance instead",
                        i.id
                    ),
                ));
            }
            let shred = match &d.encryption {
                Some(enc) => self.would_shred(txn, enc)?,
                None => None,
            };
            Ok((d, shred))
        };
        let (_, shred) = self.peek(check)?;
        self.audit_shred(shred.as_ref(), &id)?;
        let txn = self.begin()?;
        let (d, _) = check(&txn)?;
        self.pool.delete_volume(&txn, &id)?;
        catalog::remove::<DiskRecord>(&txn, &id)?;
        let shredded = match &d.encryption {
            Some(enc) => self.key_unref(&txn, enc, shred.is_some())?,
            None => false,
        };
        txn.commit()?;
        Ok(json!({ "DiskId": id, "KeyShredded": shredded }))
    }

    /// Shared by ResetDisk and ReInitDisk: `check` finds the disk and the state to go
    /// back to (volume id, or None for blank); the KMS use is metered outside the write
    /// transaction; then the disk's volume becomes a copy of that state.
    fn reset_to(
        &self,
        op: &str,
        check: impl Fn(&WriteTransaction) -> Result<(DiskRecord, Option<String>), ControlError>,
    ) -> Result<Option<String>, ControlError> {
        let (d, _) = self.peek(|txn| {
            let (d, from) = check(txn)?;
            self.require_detached(txn, &d, op)?;
            Ok((d, from))
        })?;
        self.meter_use(&d, None)?;
        let txn = self.begin()?;
        let (d, from) = check(&txn)?;
        self.require_detached(&txn, &d, op)?;
        self.pool.reset_volume(&txn, &d.id, from.as_deref())?;
        txn.commit()?;
        Ok(from)
    }

    pub(super) fn reset_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("DiskId")?;
        let snap_id = p.str("SnapshotId")?;
        p.finish()?;
        self.reset_to("ResetDisk", |txn| {
            let d = self.find_disk(txn, &id, &account)?;
            same_region(region.as_deref(), &d.region, "InvalidDiskId.NotFound", &id)?;
            let s = self.find_snapshot(txn, &snap_id, &account)?;
            if s.source_disk != d.id {
                return Err(ControlError::param(
                    "InvalidParameter.SnapshotNotOfDisk",
                    format!(
                        "snapshot {snap_id} was taken of disk {}, not {id}; ResetDisk only rolls a disk back to its \
                         own snapshots (create a new disk from that snapshot instead)",
                        s.source_disk
                    ),
                ));
            }
            Ok((d, Some(snap_id.clone())))
        })?;
        Ok(json!({ "DiskId": id, "SnapshotId": snap_id }))
    }

    pub(super) fn reinit_disk(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let id = p.str("DiskId")?;
        p.finish()?;
        let from = self.reset_to("ReInitDisk", |txn| {
            let d = self.find_disk(txn, &id, &account)?;
            same_region(region.as_deref(), &d.region, "InvalidDiskId.NotFound", &id)?;
            let from = match (&d.source_snapshot, &d.source_image) {
                (Some(s), _) => {
                    if catalog::get::<SnapshotRecord>(txn, s)?.is_none() {
                        return Err(ControlError::state(
                            "InvalidOperation.SourceSnapshotDeleted",
                            format!(
                                "disk {id} was created from snapshot {s}, which has been deleted, so its initial \
                             state is gone; use ResetDisk with another of its snapshots"
                            ),
                        ));
                    }
                    Some(s.clone())
                }
                (None, Some(m)) => {
                    if catalog::get::<ImageRecord>(txn, m)?.is_none() {
                        return Err(ControlError::state(
                            "InvalidOperation.SourceImageDeleted",
                            format!("disk {id} was created from image {m}, which no longer exists"),
                        ));
                    }
                    Some(m.clone())
                }
                (None, None) => None,
            };
            Ok((d, from))
        })?;
        Ok(json!({ "DiskId": id, "InitialState": from.unwrap_or_else(|| "blank".into()) }))
    }

    pub(super) fn modify_disk_attribute(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let id = p.str("DiskId")?;
        let name = p.opt_str("DiskName")?;
        let desc = p.opt_str("Description")?;
        let encrypted = p.opt_bool("Encrypted")?;
        let cmk = p.opt_str("KMSKeyId")?;
        p.finish()?;
        if let Some(n) = &name {
            check_text("DiskName", n)?;
        }
        if let Some(n) = &desc {
            check_text("Description", n)?;
        }
        let d = self.peek(|txn| self.find_disk(txn, &id, &account))?;
        self.refuse_conversion_or_cmk_change("disk", &id, &d.account, &d.region, &d.encryption, encrypted, cmk)?;
        let txn = self.begin()?;
        let mut d = self.find_disk(&txn, &id, &account)?;
        if let Some(n) = name {
            d.name = n;
        }
        if let Some(n) = desc {
            d.description = n;
        }
        catalog::put(&txn, &d)?;
        txn.commit()?;
        Ok(json!({ "DiskId": id }))
    }

    /// `Encrypted` different from the object's state → EncryptionConversion; any
    /// `KMSKeyId` → CmkChange (audited by the KMS) or, on an unencrypted object,
    /// EncryptionConversion.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refuse_conversion_or_cmk_change(
        &self,
        what: &str,
        id: &str,
        account: &str,
        region: &str,
        enc: &Option<Encryption>,
        encrypted: Option<bool>,
        cmk: Option<String>,
    ) -> Result<(), ControlError> {
        if let Some(want) = encrypted {
            if want != enc.is_some() {
                return Err(ControlError::limit(
                    "InvalidOperation.EncryptionConversion",
                    format!(
                        "{what} {id} is {}; encryption cannot be switched {} an existing {what}. Copy the data \
                         to a new {} disk instead",
                        if enc.is_some() { "encrypted" } else { "not encrypted" },
                        if want { "on for" } else { "off for" },
                        if want { "encrypted" } else { "unencrypted" },
                    ),
                ));
            }
        }
        if let Some(c) = cmk {
            if enc.is_none() {
                return Err(ControlError::limit(
                    "InvalidOperation.EncryptionConversion",
                    format!("{what} {id} is not encrypted; a master key cannot be set on it"),
                ));
            }
            // The KMS refuses and audits the attempt.
            let cmk_id = if c.is_empty() { "none".to_owned() } else { c };
            self.kms.replace_service_key(account, region, &cmk_id)?;
        }
        Ok(())
    }

    pub(super) fn describe_disks(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let region = p.opt_str("RegionId")?;
        let ids = p.opt_str_list("DiskIds")?;
        let instance = p.opt_str("InstanceId")?;
        let encrypted = p.opt_bool("Encrypted")?;
        let category = p.opt_str("Category")?;
        let disk_type = p.opt_str("DiskType")?;
        let snapshot = p.opt_str("SnapshotId")?;
        p.finish()?;
        let cat = match category {
            None => None,
            Some(c) => Some(parse_category(&c, "Category")?.0),
        };
        let r = self
            .db
            .begin_read()
            .map_err(|e| ControlError::Catalog(catalog::db_err(e)))?;
        let disks: Vec<DiskRecord> = catalog::list_r(&r)?;
        let atts: Vec<AttachmentRecord> = catalog::list_r(&r)?;
        let mut out = Vec::new();
        for d in disks {
            let mine: Vec<&AttachmentRecord> = atts.iter().filter(|a| a.disk_id == d.id).collect();
            let keep = d.account == account
                && region.as_ref().is_none_or(|r| *r == d.region)
                && ids.as_ref().is_none_or(|l| l.contains(&d.id))
                && instance
                    .as_ref()
                    .is_none_or(|i| mine.iter().any(|a| &a.instance_id == i))
                && encrypted.is_none_or(|e| e == d.encryption.is_some())
                && cat.is_none_or(|c| c == d.category)
                && disk_type.as_ref().is_none_or(|t| t == "all" || t == d.role.as_str())
                && snapshot.as_ref().is_none_or(|s| d.source_snapshot.as_ref() == Some(s));
            if keep {
                out.push(view::disk(&d, &mine, self.exports.get(&d.id).is_some()));
            }
        }
        Ok(json!({ "TotalCount": out.len(), "Disks": { "Disk": out } }))
    }
}
