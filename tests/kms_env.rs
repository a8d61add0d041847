//! Root key from the environment and from `$CREDENTIALS_DIRECTORY`, chosen by
//! `RootKeySource::Auto`. One test in its own binary, because it changes the process
//! environment (nothing else runs concurrently in this process).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use sealdisk::{CallOpts, KeyContext, Kms, KmsConfig, LocalConfig, RootKeySource, ROOT_KEY_CREDENTIAL, ROOT_KEY_ENV};

/// A temporary directory (`tempfile`), removed on drop.
struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let t = tempfile::Builder::new()
            .prefix(&format!("sealdisk-kmsenv-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(t.path().to_path_buf(), t)
    }
}

fn key() -> [u8; 32] {
    use rand::RngCore;
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

#[test]
fn root_key_from_environment_and_credentials_directory() {
    let ctx = KeyContext::new("42", "cn-hangzhou", "key-1");

    // 1. SEALDISK_KMS_ROOT_KEY wins under Auto; no root key file is created.
    let data = TempDir::new("data");
    let env_key = key();
    std::env::set_var(ROOT_KEY_ENV, hex::encode(env_key));
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let wrapped = {
        let kms = Kms::open(KmsConfig::local(&data.0)).unwrap();
        kms.activate("42", "cn-hangzhou").unwrap();
        kms.generate_data_key(&ctx, CallOpts::default()).unwrap().1
    };
    assert!(!data.0.join("kms/root.key").exists());
    // The same key given as a file opens the keystore: the env key was the one used.
    let secrets = TempDir::new("secrets");
    let file = secrets.0.join("root.key");
    fs::write(&file, env_key).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = KmsConfig::local(&data.0);
    cfg.backend = sealdisk::BackendConfig::Local(LocalConfig {
        root_key: RootKeySource::File(file.clone()),
    });
    let kms = Kms::open(cfg).unwrap();
    kms.unwrap_data_key(&ctx, &wrapped, CallOpts::default()).unwrap();
    drop(kms);

    // A malformed variable is refused without echoing it.
    std::env::set_var(ROOT_KEY_ENV, "zz-not-hex-zz");
    let e = Kms::open(KmsConfig::local(&data.0)).unwrap_err();
    assert_eq!(e.code(), "Kms.RootKeyInvalid");
    assert!(!e.to_string().contains("zz-not-hex-zz"));
    // An explicit Env source with the variable unset.
    let mut cfg = KmsConfig::local(&data.0);
    cfg.backend = sealdisk::BackendConfig::Local(LocalConfig {
        root_key: RootKeySource::Env("SEALDISK_TEST_UNSET_ROOT_KEY".into()),
    });
    assert_eq!(Kms::open(cfg).unwrap_err().code(), "Kms.RootKeyMissing");

    // 2. Without the variable, Auto uses $CREDENTIALS_DIRECTORY/sealdisk-kms-root-key.
    std::env::remove_var(ROOT_KEY_ENV);
    let creds = TempDir::new("creds");
    let cred = creds.0.join(ROOT_KEY_CREDENTIAL);
    fs::write(&cred, hex::encode(env_key)).unwrap();
    fs::set_permissions(&cred, fs::Permissions::from_mode(0o400)).unwrap();
    std::env::set_var("CREDENTIALS_DIRECTORY", &creds.0);
    let kms = Kms::open(KmsConfig::local(&data.0)).unwrap();
    kms.unwrap_data_key(&ctx, &wrapped, CallOpts::default()).unwrap();
    drop(kms);
    assert!(!data.0.join("kms/root.key").exists());

    // 3. With neither, Auto falls back to DATA_DIR/kms/root.key — which does not exist
    //    while the keystore holds CMKs, so it is refused rather than silently created.
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    assert_eq!(
        Kms::open(KmsConfig::local(&data.0)).unwrap_err().code(),
        "Kms.RootKeyMissing"
    );
    // A fresh data directory gets its root key file, 0600.
    let fresh = TempDir::new("fresh");
    Kms::open(KmsConfig::local(&fresh.0)).unwrap();
    let md = fs::metadata(fresh.0.join("kms/root.key")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(md.len(), 32);
}
