//! A Network Block Device server on the reactors.
//!
//! * An acceptor thread (control side) accepts connections on a unix socket
//!   and/or TCP, and runs each handshake on a short-lived thread with plain
//!   blocking I/O: fixed newstyle, `NBD_OPT_GO` / `NBD_OPT_INFO` /
//!   `NBD_OPT_LIST` / `NBD_OPT_ABORT` / `NBD_OPT_EXPORT_NAME`; every other
//!   option is answered `NBD_REP_ERR_UNSUP` and negotiation goes on.
//! * Once an export is chosen the socket moves to a reactor (round-robin,
//!   through [`Reactors::send`]); there a [`conn::Conn`] poller owns it and a
//!   bdev channel, receives requests and sends replies through the reactor's
//!   io_uring (several requests parsed per receive, replies coalesced into one
//!   `sendmsg`), and splits requests larger than the bdev's limit.
//! * Exports are looked up by name in [`Exports`] at handshake; a revoked
//!   (detached) export's connections are closed.
//!
//! See `docs/nbd.md` for what is advertised and why.

mod conn;
pub(crate) mod proto;
pub(crate) mod tls;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bdev::MAX_IO_BYTES;
use crate::export::{Export, Exports};
use crate::logging::RateLimit;
use crate::reactor::{Reactors, SendError};
use proto::*;

/// Largest payload advertised (the protocol's interoperable maximum).
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised.
pub(crate) const PREFERRED_BLOCK: u32 = 4096;
/// How long a client may take over one handshake read or write.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Handshakes running at once; further clients wait in the listen backlog.
const MAX_HANDSHAKES: usize = 64;
/// Option data longer than this ends the handshake (a client that sends
/// megabytes of option data is not negotiating in good faith).
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// How long a full reactor queue is retried before a client is refused.
const HANDOFF_RETRY: Duration = Duration::from_secs(1);

/// Where to listen.
#[derive(Debug, Clone, Default)]
pub struct NbdConfig {
    /// Unix socket path (a stale socket file there is replaced).
    pub unix_path: Option<PathBuf>,
    /// TCP address; callers should default to loopback (e.g. 127.0.0.1:10809).
    pub tcp: Option<SocketAddr>,
    /// Serve each instance's disks on `DIR/<InstanceId>/nbd.sock` (the registries in
    /// [`Exports::instances`]); `None`: no per-instance sockets.
    pub instances_dir: Option<PathBuf>,
    /// Group of the per-instance sockets and their directories (mode 0660 / 0710, so
    /// the VMM's user reaches its VMs' disks and nothing else); `None`: root's group.
    pub instance_gid: Option<u32>,
    /// TLS for the TCP listener: clients must `NBD_OPT_STARTTLS` first
    /// ([`tls::server_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// State shared by the acceptor, handshake threads and connections.
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    /// Live connections (on reactors).
    pub(crate) conns: AtomicUsize,
    /// Connections negotiated but not taken (logged each time).
    pub(crate) refused: AtomicUsize,
    handshakes: AtomicUsize,
    next_reactor: AtomicUsize,
    reactors: Arc<Reactors>,
    exports: Arc<Exports>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest payload we accept (≤ [`MAX_PAYLOAD`], bounded by the
    /// reactors' buffer arenas so one request always fits).
    pub(crate) max_payload: u32,
    /// Rate limits of the lines clients can cause: failed handshakes,
    /// connects and closes, requests answered with an error.
    pub(crate) log_handshakes: RateLimit,
    pub(crate) log_conns: RateLimit,
    pub(crate) log_io: RateLimit,
}

/// A running NBD server.
pub struct NbdServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    tcp_addr: Option<SocketAddr>,
}

impl NbdServer {
    /// Bind the listeners and start accepting.
    pub fn start(cfg: NbdConfig, reactors: Arc<Reactors>, exports: Arc<Exports>) -> io::Result<NbdServer> {
        if cfg.unix_path.is_none() && cfg.tcp.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NBD server needs a unix socket path or a TCP address",
            ));
        }
        if reactors.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no reactors"));
        }
        // One request's buffers must fit in a reactor's arena (with room for
        // others), or a large request could wait forever.
        let mut arena = usize::MAX;
        for i in 0..reactors.len() {
            let a = reactors
                .call(i, Duration::from_secs(5), |ctx| ctx.chan.pool.stats().arena_bytes)
                .map_err(io::Error::other)?;
            arena = arena.min(a);
        }
        let max_payload =
            ((arena / 4) as u64 / MAX_IO_BYTES * MAX_IO_BYTES).clamp(MAX_IO_BYTES, MAX_PAYLOAD as u64) as u32;

        let unix = match &cfg.unix_path {
            Some(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if m.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                let l = UnixListener::bind(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let tcp = match cfg.tcp {
            Some(a) => {
                let l = TcpListener::bind(a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            next_reactor: AtomicUsize::new(0),
            reactors,
            exports,
            tls: cfg.tls.clone(),
            max_payload,
            log_handshakes: RateLimit::standard(),
            log_conns: RateLimit::standard(),
            log_io: RateLimit::standard(),
        });
        let sh = shared.clone();
        let mut instances = cfg.instances_dir.clone().map(|dir| InstanceSockets {
            dir,
            gid: cfg.instance_gid.unwrap_or(0),
            bound: Default::default(),
            generation: None,
        });
        if let Some(i) = instances.as_mut() {
            // From now on the control plane waits for new instances' sockets.
            shared.exports.instances().set_bound(0, true);
            // The instances restored at start are served before this returns, so before
            // the control socket opens: a client never finds a previous run's stale socket.
            i.sync(&shared);
        }
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(sh, unix, tcp, instances))?;
        Ok(NbdServer {
            shared,
            acceptor: Some(acceptor),
            unix_path: cfg.unix_path,
            tcp_addr,
        })
    }

    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Largest request payload accepted (advertised as the maximum block
    /// size).
    pub fn max_payload(&self) -> u32 {
        self.shared.max_payload
    }

    /// Connections currently served.
    pub fn connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// Connections negotiated that no reactor could take (each was told, and logged).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Close the listeners and every connection (waits up to 5 s for the
    /// connections to finish their in-flight requests).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.shared.conns.load(Ordering::SeqCst) > 0 || self.shared.handshakes.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop();
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    fn dup(&self) -> io::Result<OwnedFd> {
        match self {
            Stream::Unix(s) => s.as_fd().try_clone_to_owned(),
            Stream::Tcp(s) => s.as_fd().try_clone_to_owned(),
        }
    }
    /// Who is at the other end, for log lines: `pid:N` (unix, SO_PEERCRED) or the
    /// address (TCP).
    fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp:?".into(), |a| a.to_string()),
            Stream::Unix(s) => {
                crate::sys::peer_cred(s).map_or_else(|| "unix:?".into(), |(_, pid)| format!("pid:{pid}"))
            }
        }
    }
}

/// A handshake that ends with the connection closed by us: the reason, for the log.
fn refusal(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// At most 64 characters of a client-chosen name, for a log line (Debug-quoted there).
fn client_name(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(64).collect()
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A listening socket and the registry its clients may open.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// The next waiting client; `Ok(None)` when none waits.
    fn accept(&self) -> io::Result<Option<Stream>> {
        let r = match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The per-instance sockets, kept in step with [`Exports::instances`].
struct InstanceSockets {
    dir: PathBuf,
    gid: u32,
    /// Instance id → (its socket, its registry).
    bound: std::collections::BTreeMap<String, (Listener, Arc<Exports>)>,
    generation: Option<u64>,
}

impl InstanceSockets {
    /// Binds sockets for new instances and removes those of deleted ones.
    fn sync(&mut self, sh: &Shared) {
        let inst = sh.exports.instances();
        if self.generation == Some(inst.generation()) {
            return;
        }
        let (gen, now) = inst.snapshot();
        let keep: std::collections::BTreeSet<&String> = now.iter().map(|(id, _)| id).collect();
        let gone: Vec<String> = self.bound.keys().filter(|k| !keep.contains(k)).cloned().collect();
        for id in gone {
            self.bound.remove(&id);
            let d = self.dir.join(&id);
            let _ = std::fs::remove_file(d.join(NBD_SOCKET));
            let _ = std::fs::remove_dir(&d);
        }
        for (id, exports) in now {
            if self.bound.contains_key(&id) {
                continue;
            }
            match self.bind(&id) {
                Ok(l) => {
                    self.bound.insert(id, (Listener::Unix(l), exports));
                }
                Err(e) => tracing::error!(instance = %id, error = %e, "NBD: cannot serve the instance's disks"),
            }
        }
        self.generation = Some(gen);
        inst.set_bound(gen, true);
    }

    fn bind(&self, id: &str) -> io::Result<UnixListener> {
        use std::os::unix::fs::PermissionsExt;
        let chown = |p: &std::path::Path| -> io::Result<()> { std::os::unix::fs::chown(p, Some(0), Some(self.gid)) };
        std::fs::create_dir_all(&self.dir)?;
        chown(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o710))?;
        let d = self.dir.join(id);
        std::fs::create_dir_all(&d)?;
        chown(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o710))?;
        let p = d.join(NBD_SOCKET);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(&p)?;
        }
        let l = UnixListener::bind(&p)?;
        chown(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o660))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }
}

use crate::export::INSTANCE_SOCKET as NBD_SOCKET;

fn accept_loop(
    sh: Arc<Shared>,
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    mut instances: Option<InstanceSockets>,
) {
    let admin: Vec<Listener> = unix
        .map(Listener::Unix)
        .into_iter()
        .chain(tcp.map(Listener::Tcp))
        .collect();
    let mut last_emfile_log: Option<Instant> = None;
    while !sh.stop.load(Ordering::SeqCst) {
        if let Some(i) = instances.as_mut() {
            i.sync(&sh);
        }
        // Back-pressure: with MAX_HANDSHAKES under way, leave new clients in
        // the listen backlog (they wait in connect) instead of dropping them.
        if sh.handshakes.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let all: Vec<(&Listener, &Arc<Exports>)> = admin
            .iter()
            .map(|l| (l, &sh.exports))
            .chain(instances.iter().flat_map(|i| i.bound.values().map(|(l, e)| (l, e))))
            .collect();
        let mut fds: Vec<libc::pollfd> = all
            .iter()
            .map(|(l, _)| libc::pollfd {
                fd: l.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Short waits while instance sockets may need binding.
        let timeout = if instances.is_some() { 20 } else { 100 };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            continue;
        }
        let mut out_of_fds = false;
        for ((l, exports), fd) in all.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            while sh.handshakes.load(Ordering::SeqCst) < MAX_HANDSHAKES {
                let s = match l.accept() {
                    Ok(Some(s)) => s,
                    Ok(None) => break,
                    Err(e) => {
                        out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                        if out_of_fds && last_emfile_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::error!(
                                error = %e,
                                "NBD: cannot accept connections; raise the open-files limit (LimitNOFILE)"
                            );
                            last_emfile_log = Some(Instant::now());
                        }
                        break;
                    }
                };
                sh.handshakes.fetch_add(1, Ordering::SeqCst);
                let (sh2, ex) = (sh.clone(), (*exports).clone());
                let spawned = std::thread::Builder::new().name("nbd-handshake".into()).spawn(move || {
                    let peer = s.peer();
                    if let Err(e) = handshake_and_hand_off(&sh2, &ex, s, &peer) {
                        crate::log_limited!(sh2.log_handshakes, warn, peer = %peer, error = %e, "NBD: handshake failed");
                    }
                    sh2.handshakes.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    sh.handshakes.fetch_sub(1, Ordering::SeqCst);
                    crate::log_limited!(
                        sh.log_handshakes,
                        error,
                        error = %e,
                        "NBD: connection closed: no thread for its handshake"
                    );
                }
            }
        }
        if out_of_fds {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(mut i) = instances {
        for (id, _) in std::mem::take(&mut i.bound) {
            let d = i.dir.join(&id);
            let _ = std::fs::remove_file(d.join(NBD_SOCKET));
            let _ = std::fs::remove_dir(&d);
        }
        sh.exports.instances().set_bound(u64::MAX, false);
    }
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if structured {
        // Reads are always answered in one chunk, so "don't fragment" holds.
        f |= TF_SEND_DF;
    }
    if e.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    f
}

fn read_u32(s: &mut dyn ReadWrite) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn lookup(exports: &Exports, name: &[u8]) -> Option<Export> {
    let name = std::str::from_utf8(name).ok()?;
    exports.get(name).filter(|e| !e.is_revoked())
}

/// What the connection sends first once on its reactor (the end of the
/// handshake), and the export.
struct Handoff {
    export: Export,
    tail: Vec<u8>,
    /// Option reply to send instead if the hand-off fails (GO only).
    refuse: Option<Vec<u8>>,
    /// The option (GO) whose final reply `tail` is: the reactor answers it with an
    /// error instead if it cannot take the connection.
    go: Option<u32>,
    /// What the transmission phase speaks.
    modes: conn::Modes,
}

/// The handshake of one client. `Err`: it failed (the reason is logged); `Ok`: handed
/// to a reactor, or ended by the client (NBD_OPT_ABORT) or the server stopping.
fn handshake_and_hand_off(sh: &Arc<Shared>, exports: &Exports, mut stream: Stream, peer: &str) -> io::Result<()> {
    stream.set_timeouts(Some(HANDSHAKE_TIMEOUT))?;
    let Some(no_zeroes) = greet(stream.io())? else {
        return Ok(());
    };
    let tls = match (&stream, &sh.tls) {
        (Stream::Tcp(_), Some(cfg)) => Some(cfg.clone()),
        _ => None,
    };
    let Some(cfg) = tls else {
        let Some(Negotiated::Handoff(h)) = negotiate(sh, exports, stream.io(), no_zeroes, Tls::Off)? else {
            return Ok(());
        };
        stream.set_timeouts(None)?;
        // The reactor gets its own descriptor of the socket; ours is closed when
        // `stream` drops. If the hand-off fails we still hold the socket to say so.
        let fd = stream.dup()?;
        return hand_off(sh, h, fd, stream.io(), peer);
    };
    // TLS first, then the rest of the haggling inside it.
    let Some(Negotiated::StartTls) = negotiate(sh, exports, stream.io(), no_zeroes, Tls::Required)? else {
        return Ok(());
    };
    let Stream::Tcp(tcp) = stream else {
        unreachable!("TLS is offered on TCP only")
    };
    let mut tls = match tls::accept(&cfg, tcp) {
        Ok(t) => t,
        Err(e) => return Err(refusal(format!("TLS handshake failed: {e}"))),
    };
    let Some(Negotiated::Handoff(h)) = negotiate(sh, exports, &mut tls, no_zeroes, Tls::Done)? else {
        return Ok(());
    };
    // The reactor serves plain NBD on one end of a socket pair; the pump carries the
    // other end through TLS.
    let (reactor_end, pump_end) = UnixStream::pair()?;
    let fd: OwnedFd = reactor_end.into();
    let refuse = h.refuse.clone();
    if let Err(e) = hand_off(sh, h, fd, &mut std::io::sink(), peer) {
        if let Some(b) = refuse {
            let _ = tls.write_all(&b);
        }
        return Err(e);
    }
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || tls::pump(tls, pump_end))?;
    Ok(())
}

/// Sends a negotiated connection `fd` to a reactor; if every queue stays full, writes
/// the refusal to `reply` (the client).
fn hand_off(sh: &Arc<Shared>, h: Handoff, fd: OwnedFd, reply: &mut dyn Write, peer: &str) -> io::Result<()> {
    let sh2 = sh.clone();
    let Handoff {
        export,
        tail,
        refuse,
        go,
        modes,
    } = h;
    let peer = peer.to_owned();
    let mut msg: crate::reactor::Msg = Box::new(move |ctx| conn::start(ctx, sh2, fd, export, tail, go, modes, peer));
    let deadline = Instant::now() + HANDOFF_RETRY;
    let n = sh.reactors.len();
    let mut r = sh.next_reactor.fetch_add(1, Ordering::Relaxed) % n;
    loop {
        match sh.reactors.send(r, msg) {
            Ok(()) => return Ok(()),
            Err(SendError::Full(m)) if Instant::now() < deadline && !sh.stop.load(Ordering::SeqCst) => {
                // Back-pressure: try the next reactor, then wait a little.
                msg = m;
                r = (r + 1) % n;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => {
                if let Some(b) = refuse {
                    let _ = reply.write_all(&b);
                }
                return Err(io::Error::other("every reactor queue is full; connection refused"));
            }
        }
    }
}

/// Run the option haggling. `Ok(None)`: the client is gone or aborted, or
/// asked for an export by `NBD_OPT_EXPORT_NAME` that does not exist.
/// Where a connection stands with TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Not offered (unix sockets, or no TLS configured).
    Off,
    /// Required before anything else.
    Required,
    /// In place.
    Done,
}

/// How the haggling ended.
enum Negotiated {
    Handoff(Handoff),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// The server's greeting and the client's flags: `Some(no_zeroes)`, or an error for
/// a client with flags we do not know (the spec says close).
fn greet(s: &mut dyn ReadWrite) -> io::Result<Option<bool>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = read_u32(s)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(refusal(format!("unknown client flags {cflags:#x}")));
    }
    Ok(Some(cflags & FLAG_C_NO_ZEROES != 0))
}

fn negotiate(
    sh: &Shared,
    exports: &Exports,
    s: &mut dyn ReadWrite,
    no_zeroes: bool,
    tls: Tls,
) -> io::Result<Option<Negotiated>> {
    let mut st = OptState::default();
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let (opt, data) = read_option(s)?;
        let step = if tls == Tls::Required {
            before_tls(s, opt, &data)?
        } else {
            match opt {
                OPT_STARTTLS => starttls_refused(s, opt, tls)?,
                OPT_EXPORT_NAME => export_name(exports, &data, no_zeroes, &st)?,
                OPT_ABORT => {
                    let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
                    Step::Done(None)
                }
                OPT_LIST => list(s, exports, opt, &data)?,
                OPT_INFO | OPT_GO => info_or_go(sh, exports, s, opt, &data, &st)?,
                OPT_STRUCTURED_REPLY => structured_reply(s, opt, &data, &mut st)?,
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(s, exports, opt, &data, &mut st)?,
                _ => {
                    // EXTENDED_HEADERS and anything newer: not supported, keep
                    // negotiating.
                    s.write_all(&option_reply(opt, REP_ERR_UNSUP, &[]))?;
                    Step::Continue
                }
            }
        };
        if let Step::Done(n) = step {
            return Ok(n);
        }
    }
}

/// What the options negotiated so far.
#[derive(Default)]
struct OptState {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// The export `base:allocation` was selected for (NBD_OPT_SET_META_CONTEXT).
    meta: Option<Vec<u8>>,
}

impl OptState {
    fn modes(&self, export: &Export) -> conn::Modes {
        conn::Modes {
            structured: self.structured,
            block_status: self.meta.as_deref() == Some(export.name.as_bytes()),
        }
    }
}

/// After one option: negotiate on, or the negotiation's outcome.
enum Step {
    Continue,
    Done(Option<Negotiated>),
}

/// The next option's code and data.
fn read_option(s: &mut dyn ReadWrite) -> io::Result<(u32, Vec<u8>)> {
    let mut hdr = [0u8; OPTION_HEADER_LEN];
    s.read_exact(&mut hdr)?;
    let Some(Ok((opt, len))) = parse_option_header(&hdr, MAX_OPTION_DATA) else {
        // Not IHAVEOPT, or more data than we accept.
        return Err(refusal(format!(
            "not an NBD option header, or option data over {MAX_OPTION_DATA} bytes"
        )));
    };
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((opt, data))
}

/// TLS is required and not in place yet: only NBD_OPT_STARTTLS (and ABORT) go on.
fn before_tls(s: &mut dyn ReadWrite, opt: u32, data: &[u8]) -> io::Result<Step> {
    match opt {
        OPT_STARTTLS if data.is_empty() => {
            s.write_all(&option_reply(opt, REP_ACK, &[]))?;
            Ok(Step::Done(Some(Negotiated::StartTls)))
        }
        OPT_ABORT => {
            let _ = s.write_all(&option_reply(opt, REP_ACK, &[]));
            Ok(Step::Done(None))
        }
        // NBD_OPT_EXPORT_NAME has no error reply: close.
        OPT_EXPORT_NAME => Err(refusal("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS".into())),
        _ => {
            s.write_all(&option_reply(
                opt,
                REP_ERR_TLS_REQD,
                b"this server requires TLS: send NBD_OPT_STARTTLS first",
            ))?;
            Ok(Step::Continue)
        }
    }
}

/// NBD_OPT_STARTTLS where TLS is already in place or not offered.
fn starttls_refused(s: &mut dyn ReadWrite, opt: u32, tls: Tls) -> io::Result<Step> {
    let why: &[u8] = if tls == Tls::Done {
        b"TLS is already in place"
    } else {
        b"TLS is not offered on this socket"
    };
    s.write_all(&option_reply(
        opt,
        if tls == Tls::Done {
            REP_ERR_INVALID
        } else {
            REP_ERR_UNSUP
        },
        why,
    ))?;
    Ok(Step::Continue)
}

/// NBD_OPT_EXPORT_NAME: the export, or a close (the option has no error reply).
fn export_name(exports: &Exports, data: &[u8], no_zeroes: bool, st: &OptState) -> io::Result<Step> {
    let Some(e) = lookup(exports, data) else {
        // No way to say "unknown" here but closing.
        return Err(refusal(format!(
            "NBD_OPT_EXPORT_NAME: no export named {:?}",
            client_name(data)
        )));
    };
    let mut tail = Vec::with_capacity(134);
    tail.extend_from_slice(&e.bdev.capacity().to_be_bytes());
    tail.extend_from_slice(&transmission_flags(&e, st.structured).to_be_bytes());
    if !no_zeroes {
        tail.extend_from_slice(&[0u8; 124]);
    }
    let modes = st.modes(&e);
    Ok(Step::Done(Some(Negotiated::Handoff(Handoff {
        export: e,
        tail,
        refuse: None,
        go: None,
        modes,
    }))))
}

/// NBD_OPT_LIST: every export's name.
fn list(s: &mut dyn ReadWrite, exports: &Exports, opt: u32, data: &[u8]) -> io::Result<Step> {
    if !data.is_empty() {
        s.write_all(&option_reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))?;
        return Ok(Step::Continue);
    }
    let mut out = Vec::new();
    for name in exports.names() {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&option_reply(opt, REP_SERVER, &d));
    }
    out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
    s.write_all(&out)?;
    Ok(Step::Continue)
}

/// NBD_OPT_INFO and NBD_OPT_GO: the export's information; GO then hands the
/// connection over.
fn info_or_go(
    sh: &Shared,
    exports: &Exports,
    s: &mut dyn ReadWrite,
    opt: u32,
    data: &[u8],
    st: &OptState,
) -> io::Result<Step> {
    let Some(req) = parse_info_request(data) else {
        s.write_all(&option_reply(opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data"))?;
        return Ok(Step::Continue);
    };
    let Some(e) = lookup(exports, &req.name) else {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(&req.name));
        s.write_all(&option_reply(opt, REP_ERR_UNKNOWN, msg.as_bytes()))?;
        return Ok(Step::Continue);
    };
    let mut out = Vec::new();
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.bdev.capacity().to_be_bytes());
    d.extend_from_slice(&transmission_flags(&e, st.structured).to_be_bytes());
    out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    if req.infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    }
    if req.infos.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(format!("sealdisk {}", e.bdev.name()).as_bytes());
        out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    }
    // Sent whether asked or not (the protocol allows it): requests
    // must be aligned to the bdev's block size.
    let min = e.bdev.block_size();
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.max(min).to_be_bytes());
    d.extend_from_slice(&sh.max_payload.to_be_bytes());
    out.extend_from_slice(&option_reply(opt, REP_INFO, &d));
    if opt == OPT_INFO {
        out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
        s.write_all(&out)?;
        return Ok(Step::Continue);
    }
    s.write_all(&out)?;
    let modes = st.modes(&e);
    Ok(Step::Done(Some(Negotiated::Handoff(Handoff {
        export: e,
        tail: option_reply(opt, REP_ACK, &[]),
        refuse: Some(option_reply(
            opt,
            REP_ERR_SHUTDOWN,
            b"server busy: every reactor queue is full",
        )),
        go: Some(opt),
        modes,
    }))))
}

/// NBD_OPT_STRUCTURED_REPLY: reads are answered in structured chunks from here on.
fn structured_reply(s: &mut dyn ReadWrite, opt: u32, data: &[u8], st: &mut OptState) -> io::Result<Step> {
    if !data.is_empty() {
        s.write_all(&option_reply(
            opt,
            REP_ERR_INVALID,
            b"NBD_OPT_STRUCTURED_REPLY takes no data",
        ))?;
    } else {
        st.structured = true;
        s.write_all(&option_reply(opt, REP_ACK, &[]))?;
    }
    Ok(Step::Continue)
}

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: `base:allocation` is
/// the one context.
fn meta_context(
    s: &mut dyn ReadWrite,
    exports: &Exports,
    opt: u32,
    data: &[u8],
    st: &mut OptState,
) -> io::Result<Step> {
    let set = opt == OPT_SET_META_CONTEXT;
    let Some(req) = parse_meta_request(data) else {
        s.write_all(&option_reply(opt, REP_ERR_INVALID, b"malformed meta context data"))?;
        return Ok(Step::Continue);
    };
    if !st.structured {
        s.write_all(&option_reply(
            opt,
            REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
        ))?;
        return Ok(Step::Continue);
    }
    if lookup(exports, &req.name).is_none() {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(&req.name));
        s.write_all(&option_reply(opt, REP_ERR_UNKNOWN, msg.as_bytes()))?;
        return Ok(Step::Continue);
    }
    // `base:allocation` is the one context: asked for by name, by its
    // namespace (`base:`, LIST only), or by an empty LIST.
    let wanted = req
        .queries
        .iter()
        .any(|q| q.as_slice() == META_BASE_ALLOCATION || (!set && q.as_slice() == b"base:"))
        || (!set && req.queries.is_empty());
    let mut out = Vec::new();
    if wanted {
        let mut d = META_ID_BASE_ALLOCATION.to_be_bytes().to_vec();
        d.extend_from_slice(META_BASE_ALLOCATION);
        out.extend_from_slice(&option_reply(opt, REP_META_CONTEXT, &d));
    }
    if set {
        st.meta = wanted.then(|| req.name.clone());
    }
    out.extend_from_slice(&option_reply(opt, REP_ACK, &[]));
    s.write_all(&out)?;
    Ok(Step::Continue)
}
