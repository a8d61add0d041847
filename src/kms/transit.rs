//! OpenBao / Vault transit backend: one transit key per (account, region) is the CMK.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use super::error::KmsError;
use super::format::{self, DATA_KEY_LEN};
use super::{BackendKind, CmkInfo, DataKey, KeyContext, WrappedKey};
use crate::secmem::SecretMem;

/// Largest response body accepted from the server.
const MAX_BODY: usize = 64 * 1024;

/// Settings of the transit backend.
#[derive(Clone)]
pub struct TransitConfig {
    /// Server address, e.g. `http://127.0.0.1:8200` (no `/v1`).
    pub addr: String,
    /// Token sent as `X-Vault-Token`.
    pub token: Zeroizing<String>,
    /// Mount path of the transit engine (mounted on first use if absent). Default `transit`.
    pub mount: String,
    /// Transit key name prefix; the key of (account, region) is
    /// `<prefix>-<account>-<region>`. Default `sealdisk`.
    pub key_prefix: String,
    /// Timeout of each HTTP request. Default 10 s.
    pub timeout: Duration,
    /// Allow plain `http://` to a host that is not loopback. Default `false`: the token
    /// and unwrapped data keys would cross the network in clear.
    pub allow_insecure_http: bool,
}

impl fmt::Debug for TransitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitConfig")
            .field("addr", &self.addr)
            .field("token", &"<redacted>")
            .field("mount", &self.mount)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

impl TransitConfig {
    /// Settings for `addr` and `token` with every other field at its default.
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> TransitConfig {
        TransitConfig {
            addr: addr.into(),
            token: Zeroizing::new(token.into()),
            mount: "transit".into(),
            key_prefix: "sealdisk".into(),
            timeout: Duration::from_secs(10),
            allow_insecure_http: false,
        }
    }

    /// Applies the environment: `BAO_ADDR` (else `VAULT_ADDR`) replaces `addr`,
    /// `BAO_TOKEN` (else `VAULT_TOKEN`) replaces `token`.
    pub fn with_env_overrides(mut self) -> TransitConfig {
        if let Some(a) = env_first(&["BAO_ADDR", "VAULT_ADDR"]) {
            self.addr = a.to_string();
        }
        if let Some(t) = env_first(&["BAO_TOKEN", "VAULT_TOKEN"]) {
            self.token = t;
        }
        self
    }

    /// Settings from the environment alone (`BAO_ADDR`/`VAULT_ADDR`,
    /// `BAO_TOKEN`/`VAULT_TOKEN`); `InvalidParameter.KmsConfig` if either is missing.
    pub fn from_env() -> Result<TransitConfig, KmsError> {
        let addr = env_first(&["BAO_ADDR", "VAULT_ADDR"]).ok_or_else(|| KmsError::Config {
            detail: "the transit backend needs BAO_ADDR (or VAULT_ADDR)".into(),
        })?;
        let token = env_first(&["BAO_TOKEN", "VAULT_TOKEN"]).ok_or_else(|| KmsError::Config {
            detail: "the transit backend needs BAO_TOKEN (or VAULT_TOKEN)".into(),
        })?;
        let mut c = TransitConfig::new(addr.to_string(), String::new());
        c.token = token;
        Ok(c)
    }
}

fn env_first(names: &[&str]) -> Option<Zeroizing<String>> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()).map(Zeroizing::new))
}

/// What a key config must say for a transit key to serve as a CMK.
#[derive(Deserialize)]
struct KeyConfig {
    #[serde(rename = "type")]
    kind: String,
    derived: bool,
    exportable: bool,
    deletion_allowed: bool,
    #[serde(default)]
    allow_plaintext_backup: bool,
    #[serde(default)]
    convergent_encryption: bool,
    #[serde(default)]
    keys: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

#[derive(Deserialize)]
struct Ciphertext {
    ciphertext: String,
}

#[derive(Deserialize)]
struct Plaintext<'a> {
    /// Borrowed from the (zeroized) response buffer, so the base64 of the data key is
    /// never copied into another heap string.
    #[serde(borrow)]
    plaintext: &'a str,
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<String>,
}

struct Reply {
    status: u16,
    body: Zeroizing<Vec<u8>>,
}

impl Reply {
    fn errors(&self) -> String {
        let e = serde_json::from_slice::<Errors>(&self.body)
            .map(|e| e.errors.join("; "))
            .unwrap_or_default();
        let mut s: String = e.chars().take(300).collect();
        if s.is_empty() {
            s = "no error text".into();
        }
        format!("HTTP {}: {s}", self.status)
    }
}

/// The OpenBao / Vault transit backend.
pub struct TransitKms {
    cfg: TransitConfig,
    base: String,
    agent: ureq::Agent,
    mounted: Mutex<bool>,
    verified: Mutex<HashSet<String>>,
    /// Serialises key creation in this process (the server's create is an upsert).
    create_lock: Mutex<()>,
}

impl fmt::Debug for TransitKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitKms")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn host_is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

impl TransitKms {
    pub(crate) fn open(cfg: &TransitConfig) -> Result<TransitKms, KmsError> {
        let addr = cfg.addr.trim_end_matches('/').to_string();
        let (scheme, rest) = addr.split_once("://").ok_or_else(|| KmsError::Config {
            detail: format!("transit address {addr:?} must start with http:// or https://"),
        })?;
        let authority = rest.split('/').next().unwrap_or("");
        let host = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => &authority[..i],
            _ => authority,
        };
        match scheme {
            "https" => {}
            "http" if host_is_loopback(host) || cfg.allow_insecure_http => {}
            "http" => {
                return Err(KmsError::Config {
                    detail: format!(
                        "refusing plain http to non-loopback host {host:?}: the token and data keys would \
                         travel in clear; use https:// or set allow_insecure_http"
                    ),
                })
            }
            _ => {
                return Err(KmsError::Config {
                    detail: format!("transit address {addr:?} must start with http:// or https://"),
                })
            }
        }
        for (what, v) in [("mount", &cfg.mount), ("key_prefix", &cfg.key_prefix)] {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'/'))
                || v.starts_with('/')
                || v.ends_with('/')
            {
                return Err(KmsError::Config {
                    detail: format!("transit {what} {v:?} must be [A-Za-z0-9_-/], not starting or ending with /"),
                });
            }
        }
        if cfg.key_prefix.contains('/') {
            return Err(KmsError::Config {
                detail: "transit key_prefix must not contain /".into(),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent("sealdisk-kms")
            .build()
            .into();
        Ok(TransitKms {
            cfg: cfg.clone(),
            base: format!("{addr}/v1"),
            agent,
            mounted: Mutex::new(false),
            verified: Mutex::new(HashSet::new()),
            create_lock: Mutex::new(()),
        })
    }

    /// Transit key name of (account, region). Unambiguous: accounts contain no `-`.
    pub(crate) fn key_name(&self, account: &str, region: &str) -> String {
        format!("{}-{account}-{region}", self.cfg.key_prefix)
    }

    /// CMK id of (account, region): `transit:<mount>/<key name>` (deterministic).
    pub(crate) fn cmk_id(&self, account: &str, region: &str) -> String {
        format!("transit:{}/{}", self.cfg.mount, self.key_name(account, region))
    }

    fn request(&self, method: &str, path: &str, body: Option<&[u8]>, doing: &str) -> Result<Reply, KmsError> {
        let url = format!("{}/{path}", self.base);
        let token = self.cfg.token.as_str();
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("X-Vault-Token", token).call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("X-Vault-Token", token)
                .header("Content-Type", "application/json")
                .send(b),
            ("POST", None) => self.agent.post(&url).header("X-Vault-Token", token).send_empty(),
            _ => unreachable!("only GET and POST are used"),
        };
        let mut resp = res.map_err(|e| KmsError::BackendUnavailable {
            detail: format!("{doing}: {} {}: {e}", method, redact_url(&url)),
        })?;
        let status = resp.status().as_u16();
        let mut buf = Zeroizing::new(vec![0u8; MAX_BODY]);
        let mut n = 0;
        let mut reader = resp.body_mut().as_reader();
        loop {
            if n == buf.len() {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: response larger than {MAX_BODY} bytes"),
                });
            }
            match reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(KmsError::BackendUnavailable {
                        detail: format!("{doing}: reading the response: {e}"),
                    })
                }
            }
        }
        // Shrinking in place keeps the allocation (no copy); Zeroizing wipes it on drop.
        buf.truncate(n);
        let reply = Reply { status, body: buf };
        match status {
            200..=299 => Ok(reply),
            403 => Err(KmsError::BackendDenied {
                detail: format!("{doing} ({})", reply.errors()),
            }),
            429 | 500..=599 => Err(KmsError::BackendUnavailable {
                detail: format!("{doing}: {}", reply.errors()),
            }),
            300..=399 => Err(KmsError::BackendError {
                detail: format!("{doing}: the server redirected (HTTP {status}); point the address at the active node"),
            }),
            _ => Ok(reply), // 4xx other than 403: the caller decides
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, reply: &Reply, doing: &str) -> Result<T, KmsError> {
        serde_json::from_slice(&reply.body).map_err(|e| KmsError::BackendError {
            detail: format!("{doing}: cannot parse the answer: {e}"),
        })
    }

    fn ensure_mount(&self) -> Result<(), KmsError> {
        let mut mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        if *mounted {
            return Ok(());
        }
        let mount = &self.cfg.mount;
        let doing = format!("checking the transit mount {mount}/");
        match self.request("GET", &format!("sys/mounts/{mount}"), None, &doing) {
            Ok(r) if r.status == 200 => {
                #[derive(Deserialize)]
                struct Mount {
                    #[serde(rename = "type", default)]
                    kind: Option<String>,
                    data: Option<Box<Mount>>,
                }
                let m: Mount = self.parse(&r, &doing)?;
                let kind = m.kind.or_else(|| m.data.and_then(|d| d.kind)).unwrap_or_default();
                if kind != "transit" {
                    return Err(KmsError::Config {
                        detail: format!("the mount {mount}/ is a {kind:?} engine, not transit"),
                    });
                }
            }
            Ok(r) if r.status == 400 || r.status == 404 => {
                let doing = format!("mounting the transit engine at {mount}/");
                let r = self.request(
                    "POST",
                    &format!("sys/mounts/{mount}"),
                    Some(br#"{"type":"transit","description":"sealdisk KMS service keys"}"#),
                    &doing,
                )?;
                if !(200..300).contains(&r.status) {
                    return Err(KmsError::BackendError {
                        detail: format!("{doing}: {}", r.errors()),
                    });
                }
            }
            Ok(r) => {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: {}", r.errors()),
                })
            }
            // A narrow policy may not allow reading sys/mounts; assume the operator
            // mounted the engine (key operations fail clearly otherwise).
            Err(KmsError::BackendDenied { .. }) => {}
            Err(e) => return Err(e),
        }
        *mounted = true;
        Ok(())
    }

    /// Reads and checks the config of transit key `name`; `Ok(None)` if it does not exist.
    fn read_key(&self, account: &str, region: &str) -> Result<Option<CmkInfo>, KmsError> {
        let name = self.key_name(account, region);
        let doing = format!("reading transit key {name}");
        let r = self.request("GET", &format!("{}/keys/{name}", self.cfg.mount), None, &doing)?;
        match r.status {
            200 => {}
            404 => return Ok(None),
            _ => {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: {}", r.errors()),
                })
            }
        }
        let k: Envelope<KeyConfig> = self.parse(&r, &doing)?;
        let k = k.data;
        let violation = |detail: String| KmsError::CmkPolicyViolation {
            name: name.clone(),
            detail,
        };
        let fix = format!("bao write {}/keys/{name}/config", self.cfg.mount);
        if k.kind != "aes256-gcm96" {
            return Err(violation(format!("its type is {:?}, not aes256-gcm96", k.kind)));
        }
        if !k.derived {
            return Err(violation(
                "it is not a derived key, so it ignores the key context".into(),
            ));
        }
        if k.exportable || k.allow_plaintext_backup {
            return Err(violation(
                "it is exportable or allows plaintext backup, which cannot be undone; \
                 the service CMK must never leave the KMS"
                    .into(),
            ));
        }
        if k.convergent_encryption {
            return Err(violation("it uses convergent encryption".into()));
        }
        if k.deletion_allowed {
            return Err(violation(format!(
                "deletion is allowed; fix with `{fix} deletion_allowed=false`"
            )));
        }
        let created = k
            .keys
            .get("1")
            .and_then(|v| v.as_u64())
            .map(|s| super::fsutil::rfc3339(s, None))
            .unwrap_or_default();
        Ok(Some(CmkInfo {
            id: self.cmk_id(account, region),
            account: account.to_owned(),
            region: region.to_owned(),
            created_at: created,
            backend: BackendKind::Transit,
        }))
    }

    pub(crate) fn describe(&self, account: &str, region: &str) -> Result<Option<CmkInfo>, KmsError> {
        self.ensure_mount()?;
        self.read_key(account, region)
    }

    pub(crate) fn ensure(&self, account: &str, region: &str) -> Result<(CmkInfo, bool), KmsError> {
        self.ensure_mount()?;
        let _creating = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.key_name(account, region);
        let mut created = false;
        if self.read_key(account, region)?.is_none() {
            let doing = format!("creating transit key {name}");
            let r = self.request(
                "POST",
                &format!("{}/keys/{name}", self.cfg.mount),
                Some(br#"{"type":"aes256-gcm96","derived":true,"exportable":false,"allow_plaintext_backup":false}"#),
                &doing,
            )?;
            if !(200..300).contains(&r.status) {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: {}", r.errors()),
                });
            }
            let doing = format!("forbidding deletion of transit key {name}");
            let r = self.request(
                "POST",
                &format!("{}/keys/{name}/config", self.cfg.mount),
                Some(br#"{"deletion_allowed":false}"#),
                &doing,
            )?;
            if !(200..300).contains(&r.status) {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: {}", r.errors()),
                });
            }
            created = true;
        }
        // Verify what the server now says, whoever created the key.
        let info = self.read_key(account, region)?.ok_or_else(|| KmsError::BackendError {
            detail: format!("transit key {name} is missing right after creation"),
        })?;
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
        Ok((info, created))
    }

    fn is_verified(&self, account: &str, region: &str) -> bool {
        let name = self.key_name(account, region);
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).contains(&name)
    }

    pub(crate) fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey, Option<CmkInfo>), KmsError> {
        let mut created = None;
        if !self.is_verified(&ctx.account, &ctx.region) {
            let (info, c) = self.ensure(&ctx.account, &ctx.region)?;
            created = c.then_some(info);
        }
        let name = self.key_name(&ctx.account, &ctx.region);
        let context = B64.encode(format::transit_context(&ctx.account, &ctx.region, &ctx.key_id));
        let doing = format!("generating a data key under transit key {name}");
        let body = serde_json::to_vec(&serde_json::json!({ "context": context, "bits": DATA_KEY_LEN * 8 }))
            .expect("JSON of strings");
        let r = self.request(
            "POST",
            &format!("{}/datakey/wrapped/{name}", self.cfg.mount),
            Some(&body),
            &doing,
        )?;
        if r.status != 200 {
            return Err(KmsError::BackendError {
                detail: format!("{doing}: {}", r.errors()),
            });
        }
        let ct: Envelope<Ciphertext> = self.parse(&r, &doing)?;
        let (version, raw) = parse_vault_ciphertext(&ct.data.ciphertext).ok_or_else(|| KmsError::BackendError {
            detail: format!("{doing}: the ciphertext is not of the form vault:v<N>:<base64>"),
        })?;
        let mut blob = Vec::with_capacity(5 + raw.len());
        blob.push(format::WRAPPED_FORMAT);
        blob.extend_from_slice(&version.to_be_bytes());
        blob.extend_from_slice(&raw);
        let wrapped = WrappedKey {
            format: u32::from(format::WRAPPED_FORMAT),
            backend: BackendKind::Transit,
            cmk_id: self.cmk_id(&ctx.account, &ctx.region),
            blob,
        };
        // The plaintext comes from decrypt, exactly as at attach time: this also proves
        // the wrapped form opens before the catalog stores it.
        let key = self.decrypt(ctx, &wrapped)?;
        Ok((key, wrapped, created))
    }

    pub(crate) fn unwrap(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> Result<DataKey, KmsError> {
        if !self.is_verified(&ctx.account, &ctx.region) {
            self.ensure_mount()?;
            if self.read_key(&ctx.account, &ctx.region)?.is_none() {
                return Err(KmsError::ServiceKeyNotFound {
                    account: ctx.account.clone(),
                    region: ctx.region.clone(),
                });
            }
            let name = self.key_name(&ctx.account, &ctx.region);
            self.verified.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
        }
        self.decrypt(ctx, wrapped)
    }

    fn decrypt(&self, ctx: &KeyContext, wrapped: &WrappedKey) -> Result<DataKey, KmsError> {
        let failed = || KmsError::UnwrapFailed {
            account: ctx.account.clone(),
            region: ctx.region.clone(),
            key_id: ctx.key_id.clone(),
        };
        let b = &wrapped.blob;
        if wrapped.backend != BackendKind::Transit
            || wrapped.format != u32::from(format::WRAPPED_FORMAT)
            || wrapped.cmk_id != self.cmk_id(&ctx.account, &ctx.region)
            || b.len() < 5 + 12 + 16
            || b[0] != format::WRAPPED_FORMAT
        {
            return Err(failed());
        }
        let version = u32::from_be_bytes(b[1..5].try_into().expect("length checked"));
        // The server treats v0 as "latest"; a real record always names its version.
        if version == 0 {
            return Err(failed());
        }
        let name = self.key_name(&ctx.account, &ctx.region);
        let ciphertext = format!("vault:v{version}:{}", B64.encode(&b[5..]));
        let context = B64.encode(format::transit_context(&ctx.account, &ctx.region, &ctx.key_id));
        let doing = format!("unwrapping a data key under transit key {name}");
        let body = serde_json::to_vec(&serde_json::json!({ "ciphertext": ciphertext, "context": context }))
            .expect("JSON of strings");
        let r = self.request(
            "POST",
            &format!("{}/decrypt/{name}", self.cfg.mount),
            Some(&body),
            &doing,
        )?;
        match r.status {
            200 => {}
            // Wrong context, other key, tampered or malformed ciphertext: one answer.
            400 => return Err(failed()),
            404 => {
                return Err(KmsError::ServiceKeyNotFound {
                    account: ctx.account.clone(),
                    region: ctx.region.clone(),
                })
            }
            _ => {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: {}", r.errors()),
                })
            }
        }
        let pt: Envelope<Plaintext<'_>> = self.parse_borrowed(&r, &doing)?;
        // Decode straight into secret memory (base64 of 64 bytes is 88 characters).
        let mut scratch = SecretMem::new(96)?;
        let decoded = B64.decode_slice(pt.data.plaintext.as_bytes(), scratch.as_mut_slice());
        let key = match decoded {
            Ok(DATA_KEY_LEN) => SecretMem::from_slice(&scratch.as_slice()[..DATA_KEY_LEN])?,
            _ => {
                return Err(KmsError::BackendError {
                    detail: format!("{doing}: the server returned a plaintext that is not a 64-byte key"),
                })
            }
        };
        drop(scratch);
        drop(r); // wipes the response buffer
        if !format::halves_differ(key.as_slice()) {
            return Err(KmsError::WeakDataKey {
                key_id: ctx.key_id.clone(),
            });
        }
        Ok(DataKey::new(key))
    }

    fn parse_borrowed<'a, T: Deserialize<'a>>(&self, reply: &'a Reply, doing: &str) -> Result<T, KmsError> {
        serde_json::from_slice(&reply.body).map_err(|e| KmsError::BackendError {
            detail: format!("{doing}: cannot parse the answer: {e}"),
        })
    }
}

/// `vault:v<N>:<base64>` → (N, raw bytes).
fn parse_vault_ciphertext(s: &str) -> Option<(u32, Vec<u8>)> {
    let rest = s.strip_prefix("vault:v")?;
    let (v, b64) = rest.split_once(':')?;
    let version: u32 = v.parse().ok()?;
    if version == 0 {
        return None;
    }
    let raw = B64.decode(b64).ok()?;
    Some((version, raw))
}

/// The URL without any query string (there is none today; defensive for logs).
fn redact_url(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

impl Drop for TransitKms {
    fn drop(&mut self) {
        // The token is Zeroizing; nothing else secret is held between calls.
        self.cfg.token.zeroize();
    }
}
