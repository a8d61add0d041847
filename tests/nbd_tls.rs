//! NBD over TLS with real clients: `nbdinfo` (libnbd, `nbds://…?tls-certificates=DIR`) and
//! `qemu-io` (`tls-creds-x509`), with mutual authentication (client certificates checked
//! against the CA); a plaintext client is refused with `NBD_REP_ERR_TLS_REQD`, and so is a
//! client without a certificate. `serve` refuses NBD over TCP without TLS, except on
//! loopback with `--nbd-tcp-insecure`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sealdisk::testing::nbd::*;
use sealdisk::BdevRef;
use sealdisk::MallocBdev;
use sealdisk::{Export, Exports};
use sealdisk::{NbdConfig, NbdServer};
use sealdisk::{ReactorConfig, Reactors};

const MIB: u64 = 1 << 20;

/// A temporary directory (`tempfile`), removed on drop.
struct Dir(PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl Dir {
    fn new(tag: &str) -> Dir {
        let t = tempfile::Builder::new()
            .prefix(&format!("sealdisk-{tag}-"))
            .tempdir()
            .unwrap();
        Dir(t.path().to_path_buf(), t)
    }
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (openssl), laid out
/// as the server (`server/`), a client with a certificate (`client/`, GnuTLS names as
/// libnbd and QEMU read them) and a client without one (`anon/`) expect.
fn pki(dir: &Path) {
    for d in ["server", "client", "anon"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    sh(
        dir,
        r#"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 \
            -subj /CN=sealdisk-test-ca 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server/server-key.pem -out server.csr \
            -subj /CN=localhost 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
        openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out server/server-cert.pem -days 2 -extfile server.ext 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout client/client-key.pem -out client.csr \
            -subj /CN=sealdisk-test-client 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\n' > client.ext
        openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out client/client-cert.pem -days 2 -extfile client.ext 2>/dev/null
        cp ca-cert.pem server/ && cp ca-cert.pem client/ && cp ca-cert.pem anon/
        "#,
    );
}

fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install it (.ci/run does)"))
}

#[test]
fn nbd_over_tls_with_nbdinfo_and_qemu_io_and_plaintext_refused() {
    let dir = Dir::new("tls");
    pki(&dir.0);
    let cfg = sealdisk::testing::nbd::server_config(&dir.0.join("server")).unwrap();
    let reactors = Arc::new(
        Reactors::start(&ReactorConfig {
            cores: vec![0],
            pool_bytes: 64 << 20,
            ..ReactorConfig::default()
        })
        .unwrap(),
    );
    let exports = Exports::new();
    let disk: BdevRef = Arc::new(MallocBdev::new("tls", 16 * MIB, 512));
    exports.add(Export::new("disk", disk, false)).unwrap();
    let server = NbdServer::start(
        NbdConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            tls: Some(cfg),
            ..Default::default()
        },
        reactors,
        exports,
    )
    .unwrap();
    let port = server.tcp_addr().unwrap().port();
    let client = dir.0.join("client");
    // nbdinfo over TLS, with the client's certificate.
    let uri = format!("nbds://127.0.0.1:{port}/disk?tls-certificates={}", client.display());
    let out = run("nbdinfo", &["--size", &uri]);
    assert!(
        out.status.success(),
        "nbdinfo over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (16 * MIB).to_string());
    // qemu-io over TLS: write a pattern, read it back.
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", client.display());
    let img =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0");
    let out = run(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &img,
            "-c",
            "write -P 0x5a 1M 4M",
            "-c",
            "read -P 0x5a 1M 4M",
        ],
    );
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !o.contains("Pattern verification failed"),
        "qemu-io over TLS: {o}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain NBD (nbd://) and TLS without a client certificate: refused.
    let out = run("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}/disk")]);
    assert!(!out.status.success(), "a plaintext nbdinfo got in");
    let anon = format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        dir.0.join("anon").display()
    );
    let out = run("nbdinfo", &["--size", &anon]);
    assert!(!out.status.success(), "a client without a certificate got in");
    // A raw plaintext client: every option but STARTTLS gets NBD_REP_ERR_TLS_REQD.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = [0u8; 18];
    s.read_exact(&mut h).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_GO, {
            let mut d = 4u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend_from_slice(&0u16.to_be_bytes());
            d
        }),
    ] {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        s.write_all(&m).unwrap();
        let mut r = [0u8; 20];
        s.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[12..16].try_into().unwrap()),
            REP_ERR_TLS_REQD,
            "option {opt}"
        );
        let mut body = vec![0u8; u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut body).unwrap();
    }
    assert_eq!(server.connections(), 0, "the refused clients never reached a reactor");
    server.shutdown();
}

#[test]
fn serve_refuses_nbd_over_tcp_without_tls_except_insecure_loopback() {
    let dir = Dir::new("tls-flags");
    let bin = env!("CARGO_BIN_EXE_sealdisk");
    for (args, why) in [
        (&["--nbd-tcp", "0.0.0.0:0"][..], "needs TLS"),
        (&["--nbd-tcp", "0.0.0.0:0", "--nbd-tcp-insecure"][..], "needs TLS"),
        (&["--tls-dir", "/nonexistent"][..], "--nbd-tcp"),
        (
            &["--nbd-tcp", "127.0.0.1:0", "--tls-dir", "/nonexistent"][..],
            "server-cert.pem",
        ),
    ] {
        let out = Command::new(bin)
            .args(["serve", "--data-dir"])
            .arg(dir.0.join("data"))
            .args(["--cores", "0", "--pool-size", "64M"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // And the two that start: plain on loopback when asked for, and TLS.
    std::fs::create_dir_all(&dir.0).unwrap();
    pki(&dir.0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_dir = dir.0.join("server");
    for (i, args) in [
        vec![
            "--nbd-tcp".to_string(),
            "127.0.0.1:0".into(),
            "--nbd-tcp-insecure".into(),
        ],
        vec![
            "--nbd-tcp".to_string(),
            format!("127.0.0.1:{port}"),
            "--tls-dir".into(),
            server_dir.display().to_string(),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let data = dir.0.join(format!("data{i}"));
        let mut child = Command::new(bin)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--cores", "0", "--pool-size", "64M"])
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !data.join("sealdisk.sock").exists() {
            assert!(child.try_wait().unwrap().is_none(), "{args:?}: serve exited");
            assert!(t.elapsed() < Duration::from_secs(30), "{args:?}: serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        if i == 1 {
            // The daemon speaks TLS: LIST over nbds:// works (no export attached, so
            // `nbdinfo --list` shows none), plain nbd:// is refused.
            let client = dir.0.join("client");
            let ok = run(
                "nbdinfo",
                &[
                    "--list",
                    &format!("nbds://127.0.0.1:{port}?tls-certificates={}", client.display()),
                ],
            );
            assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
            let plain = run("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
            assert!(!plain.status.success(), "plain NBD reached a TLS daemon");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
