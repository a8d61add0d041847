//! The JSON-RPC server on a unix socket (mode 0600): one control-plane thread per
//! connection (at most [`MAX_CONNECTIONS`]), newline-delimited requests of at most
//! [`MAX_LINE`] bytes. Never runs on the reactors.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::rpc::{handle_line, Handler, LogLine};

/// Longest request line accepted.
pub(crate) const MAX_LINE: usize = 1 << 20;
/// Concurrent connections.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// A running server; [`RpcServer::stop`] (or drop) stops accepting and closes the
/// connections.
pub(crate) struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` (replacing a stale socket, refusing a live one) with mode 0600.
/// Binds the control socket at `path`, owner-only (0600) or, with `group`, root:group
/// 0660. The socket is made under a temporary name, given its mode and group, and only
/// then renamed into place, so no client ever finds it at `path` with other permissions.
fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon; stop it first", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let placed = (|| {
        match group {
            Some(g) => {
                std::os::unix::fs::chown(&tmp, Some(0), Some(g))?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
            }
            None => std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?,
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

impl RpcServer {
    /// Starts serving `handler` on `path` (mode 0600, or root:`group` 0660). `log`
    /// receives one line per request.
    pub(crate) fn start(
        path: &Path,
        group: Option<u32>,
        handler: Arc<dyn Handler + Send + Sync>,
        log: Arc<dyn Fn(LogLine) + Send + Sync>,
    ) -> std::io::Result<RpcServer> {
        let listener = bind(path, group)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rpc-accept".into())
            .spawn(move || accept_loop(listener, handler, log, st))?;
        Ok(RpcServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, waits for connection threads to notice, removes the socket.
    pub(crate) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler + Send + Sync>,
    log: Arc<dyn Fn(LogLine) + Send + Sync>,
    stop: Arc<AtomicBool>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut s, _)) => {
                threads.retain(|t| !t.is_finished());
                if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let _ = s.write_all(
                        b"{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32000,\"message\":\"too many connections; close idle ones and retry\",\"data\":{\"code\":\"Throttling.Connections\"}}}\n",
                    );
                    continue;
                }
                live.fetch_add(1, Ordering::SeqCst);
                let (h, l, st, lv) = (handler.clone(), log.clone(), stop.clone(), live.clone());
                let t = std::thread::Builder::new().name("rpc-conn".into()).spawn(move || {
                    serve_conn(s, &*h, &*l, &st);
                    lv.fetch_sub(1, Ordering::SeqCst);
                });
                match t {
                    Ok(t) => threads.push(t),
                    Err(_) => {
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// The peer of a unix socket connection (SO_PEERCRED).
fn peer(s: &UnixStream) -> Option<crate::kms::Caller> {
    crate::sys::peer_cred(s).map(|(uid, pid)| crate::kms::Caller { uid, pid })
}

fn serve_conn(s: UnixStream, h: &dyn Handler, log: &dyn Fn(LogLine), stop: &AtomicBool) {
    let caller = peer(&s);
    crate::kms::audit::with_caller(caller, || serve_lines(s, h, log, stop));
}

fn serve_lines(s: UnixStream, h: &dyn Handler, log: &dyn Fn(LogLine), stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let mut line: Vec<u8> = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let room = (MAX_LINE + 1).saturating_sub(line.len()) as u64;
        let res = (&mut r).take(room).read_until(b'\n', &mut line);
        match res {
            Ok(0) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    if line.len() > MAX_LINE {
                        let msg = format!(
                            "{{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{{\"code\":-32600,\"message\":\"request longer than {MAX_LINE} bytes; connection closed\",\"data\":{{\"code\":\"Rpc.RequestTooLarge\"}}}}}}\n"
                        );
                        let _ = w.write_all(msg.as_bytes());
                        return;
                    }
                    continue; // partial line (timeout split it); read on
                }
                let body = &line[..line.len() - 1];
                let body = body.strip_suffix(b"\r").unwrap_or(body);
                if !body.iter().all(u8::is_ascii_whitespace) {
                    let mut logf = |l: LogLine| log(l);
                    if let Some(mut out) = handle_line(h, body, &mut logf) {
                        out.push('\n');
                        if w.write_all(out.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}
