//! NBD over TLS (`NBD_OPT_STARTTLS`, X.509, rustls).
//!
//! A TCP client must upgrade before any other option (`NBD_REP_ERR_TLS_REQD`
//! otherwise). The TLS handshake and the rest of the negotiation run on the handshake
//! thread; for the transmission phase the connection gets a socket pair: the reactor
//! serves plain NBD on one end, as for any connection, and [`pump`] moves bytes between
//! the other end and the TLS session on two threads of its own. TLS is for remote
//! hosts; VMs on this host use their instance's unix socket.
//!
//! Files in the TLS directory (`serve --tls-dir DIR`), PEM: `server-cert.pem` (the
//! chain), `server-key.pem`, and optionally `ca-cert.pem`: then every client must
//! present a certificate that chains to it (mutual authentication).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Why `--tls-dir` gave no TLS configuration: the directory, the file or step, and the
/// cause (a PEM file that does not read or parse, a certificate rustls refuses).
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {source}", dir.display())]
pub struct TlsError {
    pub dir: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The server's TLS configuration from `dir`.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |what: &'static str, source: Box<dyn std::error::Error + Send + Sync>| TlsError {
        dir: dir.to_path_buf(),
        what,
        source,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server-cert.pem"))
        .map_err(|e| err("server-cert.pem", e.into()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("server-cert.pem", e.into()))?;
    if certs.is_empty() {
        return Err(err("server-cert.pem", "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).map_err(|e| err("server-key.pem", e.into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("TLS versions", e.into()))?;
    let ca = dir.join("ca-cert.pem");
    let builder = if ca.exists() {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| err("ca-cert.pem", e.into()))? {
            roots
                .add(c.map_err(|e| err("ca-cert.pem", e.into()))?)
                .map_err(|e| err("ca-cert.pem", e.into()))?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| err("ca-cert.pem", e.into()))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("server certificate and key", e.into()))?;
    Ok(Arc::new(cfg))
}

/// The server side of a TLS session over `tcp`, handshake done.
pub(super) fn accept(cfg: &Arc<ServerConfig>, tcp: TcpStream) -> io::Result<StreamOwned<ServerConnection, TcpStream>> {
    let mut conn = ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
    // The pump writes whole 64 KiB chunks and flushes after each: no partial writes.
    conn.set_buffer_limit(None);
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// Moves bytes between the TLS session and `plain` (the other end of the reactor's
/// socket pair) until either side closes; then closes the other.
pub(super) fn pump(tls: StreamOwned<ServerConnection, TcpStream>, plain: UnixStream) -> io::Result<()> {
    let StreamOwned { conn, sock } = tls;
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    let conn = Arc::new(Mutex::new(conn));
    let (net_in, net_out) = (sock.try_clone()?, sock);
    let (plain_in, mut plain_out) = (plain.try_clone()?, plain);
    // Network → plain.
    let c = conn.clone();
    let mut net_w = net_out.try_clone()?;
    let rx = std::thread::Builder::new().name("nbd-tls-rx".into()).spawn(move || {
        let mut net_in = net_in;
        let mut buf = vec![0u8; 64 << 10];
        let mut out = vec![0u8; 64 << 10];
        'read: loop {
            let n = match net_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rd = &buf[..n];
            let mut plain = Vec::new();
            {
                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                while !rd.is_empty() {
                    if c.read_tls(&mut rd).is_err() || c.process_new_packets().is_err() {
                        break 'read;
                    }
                    loop {
                        match c.reader().read(&mut out) {
                            Ok(0) => break 'read, // close_notify
                            Ok(k) => plain.extend_from_slice(&out[..k]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => break 'read,
                        }
                    }
                }
                while c.wants_write() {
                    if c.write_tls(&mut net_w).is_err() {
                        break 'read;
                    }
                }
            }
            if plain_out.write_all(&plain).is_err() {
                break;
            }
        }
        let _ = plain_out.shutdown(std::net::Shutdown::Both);
    })?;
    // Plain → network.
    let mut plain_in = plain_in;
    let mut net_out = net_out;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match plain_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.writer().write_all(&buf[..n]).is_err() {
            break;
        }
        let mut failed = false;
        while c.wants_write() {
            if c.write_tls(&mut net_out).is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
    }
    {
        let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
        c.send_close_notify();
        while c.wants_write() {
            if c.write_tls(&mut net_out).is_err() {
                break;
            }
        }
    }
    let _ = net_out.shutdown(std::net::Shutdown::Both);
    let _ = rx.join();
    Ok(())
}
