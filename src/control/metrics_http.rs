//! The metrics endpoint: a tiny HTTP/1.1 responder for `serve --metrics ADDR`.
//!
//! One control-plane thread accepts connections one at a time on a loopback TCP address
//! or a unix socket and answers one request per connection: `GET /metrics` gets `200`
//! with the [`Registry`]'s exposition text (`text/plain; version=0.0.4`), any other
//! request `404`, a malformed one `400`; then the connection closes. A client gets 2 s
//! to send its request head (at most 8 KiB) and 5 s to take the answer, so a stalled
//! client delays other scrapes by at most that. Metrics are not authenticated, hence
//! loopback or a unix socket (mode 0600) only.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::metrics::Registry;

/// Largest request head read.
pub(crate) const MAX_REQUEST: usize = 8 << 10;
/// Time a client has to send its request head.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Content type of the exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MetricsAddr {
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (absolute).
    Unix(PathBuf),
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A `--metrics` address the endpoint refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MetricsAddrError {
    #[error("--metrics {0}: a unix socket must be an absolute path (unix:/run/sealdisk/metrics.sock)")]
    RelativePath(String),
    #[error("--metrics {0}: give a loopback address 127.0.0.1:PORT, or a unix socket unix:/PATH")]
    Unparsable(String),
    #[error(
        "--metrics {0}: not a loopback address; the metrics endpoint has no authentication, so it listens on \
         127.0.0.1:PORT, [::1]:PORT or a unix socket (unix:/PATH) only"
    )]
    NotLoopback(String),
}

impl MetricsAddr {
    /// `127.0.0.1:PORT` (or `[::1]:PORT`), `unix:/path`, or an absolute path. Any other
    /// TCP address is refused: the endpoint has no authentication.
    pub(crate) fn parse(s: &str) -> Result<MetricsAddr, MetricsAddrError> {
        let path = s.strip_prefix("unix:").or_else(|| s.starts_with('/').then_some(s));
        if let Some(p) = path {
            if !p.starts_with('/') {
                return Err(MetricsAddrError::RelativePath(s.to_owned()));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        let a: SocketAddr = s.parse().map_err(|_| MetricsAddrError::Unparsable(s.to_owned()))?;
        if !a.ip().is_loopback() {
            return Err(MetricsAddrError::NotLoopback(s.to_owned()));
        }
        Ok(MetricsAddr::Tcp(a))
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The running endpoint; stops on drop.
pub(crate) struct MetricsServer {
    addr: MetricsAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `registry` on a thread of its own.
    pub(crate) fn start(addr: &MetricsAddr, registry: Arc<Registry>) -> io::Result<MetricsServer> {
        let (listener, bound) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?;
                let b = MetricsAddr::Tcp(l.local_addr()?);
                (Listener::Tcp(l), b)
            }
            MetricsAddr::Unix(p) => {
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                (Listener::Unix(l), addr.clone())
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || run(listener, &registry, &stop2))?;
        Ok(MetricsServer {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port the kernel chose for port 0).
    pub(crate) fn addr(&self) -> &MetricsAddr {
        &self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        match &self.addr {
            MetricsAddr::Tcp(a) => drop(TcpStream::connect_timeout(a, Duration::from_secs(1))),
            MetricsAddr::Unix(p) => drop(UnixStream::connect(p)),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn run(listener: Listener, registry: &Registry, stop: &AtomicBool) {
    loop {
        let r = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        match r {
            Ok(mut s) => {
                let _ = serve(&mut *s, registry);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Metrics,
    NotFound,
    Bad(&'static str),
}

/// Reads a request head from `r`: up to the blank line, at most [`MAX_REQUEST`] bytes.
pub(crate) fn read_head(r: &mut dyn Read) -> io::Result<Result<Vec<u8>, &'static str>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(Ok(head));
        }
        if head.len() >= MAX_REQUEST {
            return Ok(Err("request head over 8 KiB"));
        }
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(Err("connection closed before the end of the request head"));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// Classifies a request head.
pub(crate) fn route(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Bad("request head is not UTF-8");
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad("request line is not METHOD TARGET HTTP/1.x");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Request::Bad("request line is not METHOD TARGET HTTP/1.x");
    }
    let path = target.split('?').next().unwrap_or("");
    if method == "GET" && path == "/metrics" {
        Request::Metrics
    } else {
        Request::NotFound
    }
}

fn respond(w: &mut dyn Write, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(body.as_bytes())?;
    w.flush()
}

fn serve(s: &mut dyn ReadWrite, registry: &Registry) -> io::Result<()> {
    let req = match read_head(s)? {
        Ok(h) => route(&h),
        Err(why) => Request::Bad(why),
    };
    match req {
        Request::Metrics => respond(s, "200 OK", CONTENT_TYPE, &registry.render()),
        Request::NotFound => respond(
            s,
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n",
        ),
        Request::Bad(why) => respond(s, "400 Bad Request", "text/plain; charset=utf-8", &format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            MetricsAddr::parse("127.0.0.1:9100"),
            Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert!(MetricsAddr::parse("[::1]:9100").is_ok());
        assert_eq!(
            MetricsAddr::parse("unix:/run/m.sock"),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            MetricsAddr::parse("/run/m.sock"),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        for bad in [
            "0.0.0.0:9100",
            "10.1.2.3:9100",
            "[::]:9100",
            "localhost:9100",
            "unix:rel.sock",
            "9100",
            "",
        ] {
            let e = MetricsAddr::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("--metrics"), "{e}");
        }
        assert!(MetricsAddr::parse("0.0.0.0:9100")
            .unwrap_err()
            .to_string()
            .contains("not a loopback address"));
    }

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), Request::Metrics);
        assert_eq!(route(b"GET /metrics?name[]=x HTTP/1.0"), Request::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Request::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1"), Request::NotFound);
        assert!(matches!(route(b"GET /metrics"), Request::Bad(_)));
        assert!(matches!(route(b"GET /metrics SPDY/3"), Request::Bad(_)));
        assert!(matches!(route(b"\xff\xfe"), Request::Bad(_)));
    }

    #[test]
    fn heads_are_bounded() {
        let mut r: &[u8] = b"GET /metrics HTTP/1.1\r\nA: b\r\n\r\nrest";
        assert_eq!(read_head(&mut r).unwrap().unwrap(), b"GET /metrics HTTP/1.1\r\nA: b");
        let big = vec![b'a'; MAX_REQUEST + 10];
        assert!(read_head(&mut &big[..]).unwrap().is_err());
        assert!(read_head(&mut &b"GET /metrics HTTP/1.1\r\n"[..]).unwrap().is_err());
    }
}
