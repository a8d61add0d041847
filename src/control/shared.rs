//! What the operations of every object (disks, snapshots, images, instances, KMS, tasks,
//! copies, migrations) share, in one place:
//!
//! * transactions: [`Control::begin`] (the one that writes) and [`Control::peek`] (checks
//!   in a transaction that is dropped, so slow work runs with the catalog writer free);
//! * the KMS: [`Control::kms_reserve`] (activation check and quota reservation),
//!   [`Control::meter_use`] (one metered use of a disk's key), [`Control::would_shred`] /
//!   [`Control::audit_shred`] (audit a crypto-shred before the transaction that does it);
//! * lineage keys: [`Control::key_record`], [`Control::key_ref`], [`Control::key_unref`];
//! * lookups with the account check: `find_disk`, `find_snapshot`, `find_image`,
//!   `find_instance` (over [`find_owned`]), and [`same_region`].

use redb::WriteTransaction;

use super::{Control, ControlError};
use crate::catalog::{self, DiskRecord, Encryption, ImageRecord, InstanceRecord, KeyRecord, SnapshotRecord};
use crate::kms::{CallOpts, KeyContext, KmsError, Reservation};

impl Control {
    pub(super) fn begin(&self) -> Result<WriteTransaction, ControlError> {
        Ok(self.db.begin_write()?)
    }

    /// Runs the checks `f` in a write transaction that is dropped (aborted) when it
    /// returns, so slow work that depends on them (KMS calls, audit fsyncs) runs after,
    /// with the catalog writer free for the data path. Operations on the same objects run
    /// one after the other (object locks), but others may commit in between, so the
    /// transaction that writes runs the same checks again.
    pub(super) fn peek<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let txn = self.begin()?;
        f(&txn)
    }

    /// One metered KMS use of an encrypted disk's service key (attaching a shared disk,
    /// detaching, resetting), from `res` or a reservation of its own. Never inside a
    /// write transaction. A no-op for unencrypted disks.
    pub(super) fn meter_use(&self, d: &DiskRecord, res: Option<&Reservation>) -> Result<(), ControlError> {
        if d.encryption.is_none() {
            return Ok(());
        }
        let own;
        let r = match res {
            Some(r) => r,
            None => {
                own = self.kms_reserve(&d.account, &d.region, 1)?;
                &own
            }
        };
        self.kms
            .ensure_service_key(&d.account, &d.region, CallOpts::disk(&d.id).reserved(r))?;
        Ok(())
    }

    /// If dropping one holder of `enc` will remove its wrapped key (crypto-shred), the
    /// key's context, to audit before the transaction that removes it.
    pub(super) fn would_shred(
        &self,
        txn: &WriteTransaction,
        enc: &Encryption,
    ) -> Result<Option<KeyContext>, ControlError> {
        let k = self.key_record(txn, enc)?;
        Ok((k.refs <= 1).then(|| KeyContext::new(&k.account, &k.region, &k.key_id)))
    }

    /// Audits a coming crypto-shred through the KMS (outside any write transaction);
    /// if the audit fails, the operation stops and nothing changes.
    pub(super) fn audit_shred(&self, ctx: Option<&KeyContext>, holder: &str) -> Result<(), ControlError> {
        if let Some(ctx) = ctx {
            self.kms.audit_crypto_shred(ctx, Some(holder))?;
        }
        Ok(())
    }

    /// KMS activated for (account, region)? Else `Kms.NotActivated`; then reserve `units`.
    pub(super) fn kms_reserve(&self, account: &str, region: &str, units: u32) -> Result<Reservation, ControlError> {
        if !self.kms.is_activated(account, region) {
            return Err(ControlError::Kms(KmsError::NotActivated {
                account: account.to_owned(),
                region: region.to_owned(),
            }));
        }
        Ok(self.kms.reserve(account, region, units)?)
    }

    /// The key row of an encrypted object (missing = catalog corruption).
    pub(super) fn key_record(&self, txn: &WriteTransaction, enc: &Encryption) -> Result<KeyRecord, ControlError> {
        catalog::get::<KeyRecord>(txn, &enc.key_id)?.ok_or_else(|| {
            ControlError::Catalog(catalog::CatalogError::Corrupt(format!(
                "wrapped key {} is missing; run `sealdisk check`",
                enc.key_id
            )))
        })
    }

    /// One more holder of a lineage key.
    pub(super) fn key_ref(&self, txn: &WriteTransaction, enc: &Encryption) -> Result<(), ControlError> {
        let mut k = self.key_record(txn, enc)?;
        k.refs += 1;
        catalog::put(txn, &k)?;
        Ok(())
    }

    /// One holder fewer; the last one removes the wrapped key (crypto-shred). The caller
    /// audited the shred before this transaction ([`Control::would_shred`],
    /// [`Control::audit_shred`]); `audited` says whether it did, and a shred that was not
    /// audited is refused (nothing changes).
    pub(super) fn key_unref(
        &self,
        txn: &WriteTransaction,
        enc: &Encryption,
        audited: bool,
    ) -> Result<bool, ControlError> {
        let mut k = self.key_record(txn, enc)?;
        k.refs = k.refs.saturating_sub(1);
        if k.refs == 0 {
            if !audited {
                // Another holder of the lineage went meanwhile (an operation on another
                // object of the same lineage): the shred was not audited, so refuse.
                return Err(ControlError::state(
                    "OperationConflict",
                    format!(
                        "key {} lost another holder while this operation ran; try again",
                        k.key_id
                    ),
                ));
            }
            catalog::remove::<KeyRecord>(txn, &k.key_id)?;
            Ok(true)
        } else {
            catalog::put(txn, &k)?;
            Ok(false)
        }
    }

    pub(super) fn find_disk(
        &self,
        txn: &WriteTransaction,
        id: &str,
        account: &str,
    ) -> Result<DiskRecord, ControlError> {
        find_owned(txn, id, "InvalidDiskId.NotFound", "disk", |d: &DiskRecord| {
            d.account == account
        })
    }

    pub(super) fn find_snapshot(
        &self,
        txn: &WriteTransaction,
        id: &str,
        account: &str,
    ) -> Result<SnapshotRecord, ControlError> {
        find_owned(
            txn,
            id,
            "InvalidSnapshotId.NotFound",
            "snapshot",
            |s: &SnapshotRecord| s.account == account,
        )
    }

    /// An image the account owns, or (with `shared_ok`) one shared with it.
    pub(super) fn find_image(
        &self,
        txn: &WriteTransaction,
        id: &str,
        account: &str,
        shared_ok: bool,
    ) -> Result<ImageRecord, ControlError> {
        find_owned(txn, id, "InvalidImageId.NotFound", "image", |m: &ImageRecord| {
            m.account == account || (shared_ok && m.shared_with.iter().any(|a| a == account))
        })
    }

    pub(super) fn find_instance(
        &self,
        txn: &WriteTransaction,
        id: &str,
        account: &str,
    ) -> Result<InstanceRecord, ControlError> {
        find_owned(
            txn,
            id,
            "InvalidInstanceId.NotFound",
            "instance",
            |i: &InstanceRecord| i.account == account,
        )
    }
}

/// The catalog row `id`: `not_found` if there is none, `CrossAccount` if
/// `visible` says the caller may not use it.
pub(super) fn find_owned<R: catalog::Record>(
    txn: &WriteTransaction,
    id: &str,
    not_found: &'static str,
    what: &'static str,
    visible: impl Fn(&R) -> bool,
) -> Result<R, ControlError> {
    let r = catalog::get::<R>(txn, id)?.ok_or_else(|| ControlError::NotFound {
        code: not_found,
        id: id.to_owned(),
    })?;
    if !visible(&r) {
        return Err(ControlError::CrossAccount {
            what,
            id: id.to_owned(),
        });
    }
    Ok(r)
}

/// An object in another region than the one the caller named is not found there.
pub(super) fn same_region(
    region: Option<&str>,
    obj_region: &str,
    code: &'static str,
    id: &str,
) -> Result<(), ControlError> {
    match region {
        Some(r) if r != obj_region => Err(ControlError::NotFound {
            code,
            id: id.to_owned(),
        }),
        _ => Ok(()),
    }
}
