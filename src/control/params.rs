//! Reading ECS-style parameters from a JSON-RPC `params` object.
//!
//! ECS sends everything as strings over HTTP; sealdisk accepts JSON types and the string
//! spellings (`"20"` for 20, `"true"` for true). Repeated and nested parameters may be
//! given flat, as ECS spells them (`DataDisk.1.Size`, `AddAccount.1`), or as JSON arrays
//! and objects (`"DataDisk": [{"Size": 20}]`, `"SystemDisk": {"Category": "ssd"}`).
//! Every parameter a method does not know is refused, so typos do not go unnoticed.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::error::ControlError;

/// Largest ECS disk size in GiB.
pub(crate) const MAX_SIZE_GIB: u64 = 32768;

/// The size of a new disk made from a source of `src_size` bytes (CreateEncryptedCopy,
/// MigrateDisk): `Size` if given (at least the source's), else the source rounded up
/// (`src_rounded`); at most the largest disk.
pub(super) fn size_from_source(size: Option<u64>, src_size: u64, src_rounded: u64) -> Result<u64, ControlError> {
    match size {
        Some(s) if s < src_size => Err(ControlError::param(
            "InvalidParameter.Size",
            format!("size {s} bytes is smaller than the source ({src_size} bytes); give at least that"),
        )),
        Some(s) => size_limit(s, src_size),
        None => size_limit(src_rounded, src_size),
    }
}

/// `new_size` if a disk may have it (a source of `src_size` bytes is copied into it).
pub(super) fn size_limit(new_size: u64, src_size: u64) -> Result<u64, ControlError> {
    if new_size > MAX_SIZE_GIB << 30 {
        return Err(ControlError::param(
            "InvalidParameter.Size",
            format!("the source is {src_size} bytes, more than the largest disk ({MAX_SIZE_GIB} GiB)"),
        ));
    }
    Ok(new_size)
}
/// Size granularity of `SizeBytes`.
pub(crate) const SIZE_ALIGN: u64 = 4096;

pub struct Params {
    prefix: String,
    map: Map<String, Value>,
    used: BTreeSet<String>,
}

fn missing(name: &str) -> ControlError {
    ControlError::param(
        format!("MissingParameter.{}", name.replace('.', "")),
        format!("parameter {name} is required"),
    )
}

fn invalid(name: &str, what: &str) -> ControlError {
    ControlError::param(
        format!("InvalidParameter.{}", name.split('.').next_back().unwrap_or(name)),
        format!("parameter {name}: {what}"),
    )
}

impl Params {
    /// From JSON-RPC `params`: an object, or absent/null for none.
    pub fn new(v: Value) -> Result<Params, ControlError> {
        match v {
            Value::Null => Ok(Params::from_map(String::new(), Map::new())),
            Value::Object(m) => Ok(Params::from_map(String::new(), m)),
            _ => Err(ControlError::param(
                "InvalidParameter.Params",
                "params must be a JSON object of ECS parameters (by name), e.g. {\"RegionId\": \"cn-hangzhou\"}",
            )),
        }
    }

    fn from_map(prefix: String, map: Map<String, Value>) -> Params {
        Params {
            prefix,
            map,
            used: BTreeSet::new(),
        }
    }

    fn full(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Whether `k` was given at all.
    pub fn present(&self, k: &str) -> bool {
        self.map.contains_key(k) || self.map.keys().any(|x| x.starts_with(&format!("{k}.")))
    }

    fn take(&mut self, k: &str) -> Option<Value> {
        self.used.insert(k.to_owned());
        match self.map.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.clone()),
        }
    }

    /// A required string.
    pub fn str(&mut self, k: &str) -> Result<String, ControlError> {
        self.opt_str(k)?.ok_or_else(|| missing(&self.full(k)))
    }

    pub fn opt_str(&mut self, k: &str) -> Result<Option<String>, ControlError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(&self.full(k), "must be a string")),
        }
    }

    pub fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, ControlError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(_) => Err(invalid(&self.full(k), "must be true or false")),
        }
    }

    pub fn opt_u64(&mut self, k: &str) -> Result<Option<u64>, ControlError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| invalid(&self.full(k), "must be a non-negative integer")),
            Some(Value::String(s)) => s
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| invalid(&self.full(k), "must be a non-negative integer")),
            Some(_) => Err(invalid(&self.full(k), "must be a non-negative integer")),
        }
    }

    /// A list of strings: a JSON array, a string holding a JSON array (ECS's `DiskIds`),
    /// a comma-separated string, or flat `K.1`, `K.2`, ...
    pub fn opt_str_list(&mut self, k: &str) -> Result<Option<Vec<String>>, ControlError> {
        let flat = self.flat_indexed(k);
        let direct = self.take(k);
        let name = self.full(k);
        let bad = || invalid(&name, "must be a list of strings");
        let mut out = match direct {
            None => None,
            Some(Value::Array(a)) => Some(
                a.into_iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s),
                        _ => Err(bad()),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(Value::String(s)) if s.trim_start().starts_with('[') => {
                Some(serde_json::from_str::<Vec<String>>(&s).map_err(|_| bad())?)
            }
            Some(Value::String(s)) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            Some(_) => return Err(bad()),
        };
        if !flat.is_empty() {
            let v = out.get_or_insert_with(Vec::new);
            for (_, val) in flat {
                match val {
                    Value::String(s) => v.push(s),
                    _ => return Err(bad()),
                }
            }
        }
        Ok(out)
    }

    /// Flat `K.<n>` keys (n = 1, 2, ...), in index order; marks them used.
    fn flat_indexed(&mut self, k: &str) -> Vec<(u64, Value)> {
        let pre = format!("{k}.");
        let mut out: Vec<(u64, Value)> = Vec::new();
        let keys: Vec<String> = self.map.keys().filter(|x| x.starts_with(&pre)).cloned().collect();
        for key in keys {
            let rest = &key[pre.len()..];
            if let Ok(n) = rest.parse::<u64>() {
                self.used.insert(key.clone());
                out.push((n, self.map[&key].clone()));
            }
        }
        out.sort_by_key(|(n, _)| *n);
        out
    }

    /// A nested group, as an object under `k` or flat `k.Name` keys.
    pub fn group(&mut self, k: &str) -> Result<Params, ControlError> {
        let pre = format!("{k}.");
        let mut m = Map::new();
        match self.take(k) {
            None => {}
            Some(Value::Object(o)) => m = o,
            Some(_) => return Err(invalid(&self.full(k), "must be an object")),
        }
        let keys: Vec<String> = self.map.keys().filter(|x| x.starts_with(&pre)).cloned().collect();
        for key in keys {
            self.used.insert(key.clone());
            m.insert(key[pre.len()..].to_owned(), self.map[&key].clone());
        }
        Ok(Params::from_map(format!("{}{pre}", self.prefix), m))
    }

    /// A repeated group: a JSON array of objects under `k`, or flat `k.<n>.Name` keys
    /// (n from 1; ECS allows up to 16 data disks).
    pub fn indexed(&mut self, k: &str) -> Result<Vec<Params>, ControlError> {
        let mut groups: std::collections::BTreeMap<u64, Map<String, Value>> = Default::default();
        match self.take(k) {
            None => {}
            Some(Value::Array(a)) => {
                for (i, v) in a.into_iter().enumerate() {
                    match v {
                        Value::Object(o) => {
                            groups.insert(i as u64 + 1, o);
                        }
                        _ => return Err(invalid(&self.full(k), "must be a list of objects")),
                    }
                }
            }
            Some(_) => return Err(invalid(&self.full(k), "must be a list of objects")),
        }
        let pre = format!("{k}.");
        let keys: Vec<String> = self.map.keys().filter(|x| x.starts_with(&pre)).cloned().collect();
        for key in keys {
            let rest = &key[pre.len()..];
            let Some((n, name)) = rest.split_once('.') else {
                return Err(invalid(&key, &format!("use {k}.<n>.<Name>, e.g. {k}.1.Size")));
            };
            let n: u64 = n
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| invalid(&key, &format!("the index in {k}.<n>.<Name> must be 1..64")))?;
            self.used.insert(key.clone());
            groups
                .entry(n)
                .or_default()
                .insert(name.to_owned(), self.map[&key].clone());
        }
        Ok(groups
            .into_iter()
            .map(|(n, m)| Params::from_map(format!("{}{k}.{n}.", self.prefix), m))
            .collect())
    }

    /// Refuses every parameter that was not read.
    pub fn finish(self) -> Result<(), ControlError> {
        let unknown: Vec<String> = self
            .map
            .keys()
            .filter(|k| !self.used.contains(*k))
            .map(|k| self.full(k))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ControlError::param(
                "InvalidParameter.Unrecognized",
                format!(
                    "unknown parameter(s) {}; check the spelling against the method's parameters",
                    unknown.join(", ")
                ),
            ))
        }
    }

    /// Refuses a `KMSKeyId`: the CMK is the account's service key and cannot be chosen.
    pub fn refuse_kms_key_id(&mut self) -> Result<(), ControlError> {
        if self.take("KMSKeyId").is_some() || self.take("KmsKeyId").is_some() {
            return Err(ControlError::param(
                "InvalidParameter.KMSKeyId",
                format!(
                    "{}KMSKeyId: the master key (CMK) cannot be chosen; encrypted disks always use the \
                     account's service key in their region. Remove KMSKeyId",
                    self.prefix
                ),
            ));
        }
        Ok(())
    }

    /// `AccountId`, checked against the identifier rules.
    pub fn account(&mut self) -> Result<String, ControlError> {
        let a = self.str("AccountId")?;
        check_account(&a)?;
        Ok(a)
    }

    /// `RegionId`, checked against the identifier rules.
    pub fn region(&mut self, k: &str) -> Result<String, ControlError> {
        let r = self.str(k)?;
        check_region(&r, k)?;
        Ok(r)
    }

    /// `Size` (GiB, ECS) or `SizeBytes` (sealdisk extension, multiple of 4096), in bytes.
    pub fn size(&mut self) -> Result<Option<u64>, ControlError> {
        let gib = self.opt_u64("Size")?;
        let bytes = self.opt_u64("SizeBytes")?;
        let name = self.full("Size");
        match (gib, bytes) {
            (Some(_), Some(_)) => Err(ControlError::param(
                "InvalidParameter.Size",
                format!("{name}: give Size (GiB) or SizeBytes, not both"),
            )),
            (Some(g), None) => {
                if g == 0 || g > MAX_SIZE_GIB {
                    return Err(ControlError::param(
                        "InvalidParameter.Size",
                        format!("{name}={g}: must be 1..{MAX_SIZE_GIB} GiB"),
                    ));
                }
                Ok(Some(g << 30))
            }
            (None, Some(b)) => {
                if b == 0 || b % SIZE_ALIGN != 0 || b > (MAX_SIZE_GIB << 30) {
                    return Err(ControlError::param(
                        "InvalidParameter.Size",
                        format!(
                            "{}={b}: must be a positive multiple of {SIZE_ALIGN} bytes, at most {MAX_SIZE_GIB} GiB",
                            self.full("SizeBytes")
                        ),
                    ));
                }
                Ok(Some(b))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Account id rule: 1–64 of `[A-Za-z0-9_]`.
pub(crate) fn check_account(a: &str) -> Result<(), ControlError> {
    if a.is_empty() || a.len() > 64 || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ControlError::param(
            "InvalidAccountId.Malformed",
            format!("AccountId {a:?}: use 1-64 characters of A-Z a-z 0-9 _"),
        ));
    }
    Ok(())
}

/// Region id rule: 1–64 of `[A-Za-z0-9-]`.
pub(crate) fn check_region(r: &str, name: &str) -> Result<(), ControlError> {
    if r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ControlError::param(
            "InvalidRegionId.Malformed",
            format!("{name} {r:?}: use 1-64 characters of A-Z a-z 0-9 -"),
        ));
    }
    Ok(())
}

/// A name or description: at most 256 printable characters.
pub(crate) fn check_text(name: &str, v: &str) -> Result<(), ControlError> {
    if v.chars().count() > 256 || v.chars().any(char::is_control) {
        return Err(ControlError::param(
            format!("InvalidParameter.{name}"),
            format!("{name}: at most 256 characters, no control characters"),
        ));
    }
    Ok(())
}
