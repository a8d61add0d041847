//! vhost-user-blk: the frontend VMs reach their disks through.
//!
//! Each disk attached to an instance gets a socket,
//! `DATA_DIR/instances/<InstanceId>/vhost/<DiskId>.sock` ([`socket_path`]),
//! owned like the instance's NBD socket (root and the VMM group, 0660 in
//! 0710 directories). One VMM connection at a time; its control messages
//! (parsed by the `vhost` crate) run on the disk's control thread
//! ([`device::BlkDevice`]). The data path is the reactors': every virtqueue
//! that becomes ready is handed to a reactor (queue `i` on reactor
//! `(first + i) % reactors`), which polls it while busy and waits on its kick eventfd in
//! its own io_uring when idle ([`queue`]). No thread sits between a queue
//! and its reactor.
//!
//! A VMM that disconnects gets a fresh device on its next connection (the
//! queues drain first); a detach stops the device the same way and removes
//! the socket, so the key goes once the last channel closes.

pub(crate) mod device;
pub(crate) mod inflight;
pub(crate) mod queue;
pub(crate) mod request;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::bdev::{IoError, IoOp};
use crate::export::Export;
use crate::logging::RateLimit;
use crate::reactor::Reactors;
use request::Malformed;

/// Virtqueues a disk offers by default: QEMU asks for one per vCPU unless told
/// otherwise and refuses a device that offers fewer, so this is not capped at
/// the reactor count (several queues then share a reactor).
pub(crate) const DEFAULT_QUEUES: u16 = 16;

pub(crate) use crate::layout::VHOST_DIR;

/// What the queues of one disk share: the disk and its settings.
pub(crate) struct DiskInfo {
    pub export: Export,
    pub capacity: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub num_queues: u16,
    /// Write-back cache mode (CONFIG_WCE); off: every write is FUA.
    pub writeback: AtomicBool,
    /// The disk's stack takes guest memory directly ([`crate::bdev::Lent`]:
    /// an encrypted disk encrypts from it and decrypts into it).
    pub lent: bool,
    /// The instance whose VMM this disk is served to (for log lines).
    pub instance: String,
    /// Rate limit of the data-path error lines (a guest can cause them at any rate).
    errors_log: RateLimit,
    /// Rate limit of the VMM's connects and disconnects.
    conns_log: RateLimit,
}

impl DiskInfo {
    fn new(instance: &str, export: Export, num_queues: u16) -> DiskInfo {
        DiskInfo {
            instance: instance.to_owned(),
            capacity: export.bdev.capacity(),
            block_size: export.bdev.block_size(),
            read_only: export.read_only,
            num_queues,
            writeback: AtomicBool::new(true),
            lent: export.bdev.takes_lent(),
            errors_log: RateLimit::standard(),
            conns_log: RateLimit::standard(),
            export,
        }
    }

    /// The GET_ID answer: the disk id, NUL-padded to 20 bytes.
    pub(crate) fn id_bytes(&self) -> [u8; 20] {
        let mut id = [0u8; 20];
        let b = self.export.name.as_bytes();
        let n = b.len().min(20);
        id[..n].copy_from_slice(&b[..n]);
        id
    }

    /// A descriptor chain refused as malformed (rate-limited per disk).
    pub(crate) fn note_malformed(&self, queue: u16, head: u16, why: Malformed) {
        crate::log_limited!(
            self.errors_log,
            warn,
            disk = %self.export.name,
            instance = %self.instance,
            queue,
            head,
            why = ?why,
            "vhost-user: refused a malformed descriptor chain"
        );
    }

    /// A request answered with an error status (rate-limited per disk).
    pub(crate) fn note_io_error(&self, queue: u16, op: IoOp, e: &IoError) {
        crate::log_limited!(
            self.errors_log,
            warn,
            disk = %self.export.name,
            instance = %self.instance,
            queue,
            op = ?op,
            error = %e,
            "vhost-user: request failed; the guest gets VIRTIO_BLK_S_IOERR"
        );
    }

    /// A chain that could not be put in the used ring (rate-limited per disk).
    pub(crate) fn note_used_ring_error(&self, queue: u16, head: u16, e: &dyn std::fmt::Display) {
        crate::log_limited!(
            self.errors_log,
            warn,
            disk = %self.export.name,
            instance = %self.instance,
            queue,
            head,
            error = %e,
            "vhost-user: a chain was not returned to the used ring"
        );
    }

    /// A VMM request refused (protocol error; rate-limited per disk).
    pub(crate) fn note_protocol_error(&self, e: &VuError) {
        crate::log_limited!(
            self.errors_log,
            warn,
            disk = %self.export.name,
            instance = %self.instance,
            error = %e,
            "vhost-user: VMM request refused"
        );
    }
}

/// Settings of the vhost-user frontend.
#[derive(Debug, Clone)]
pub struct VhostConfig {
    /// `DATA_DIR/instances`.
    pub instances_dir: PathBuf,
    /// Group of the sockets (the VMM's); None: root's.
    pub gid: Option<u32>,
    /// Virtqueues offered per disk (default: `DEFAULT_QUEUES`, or one per
    /// reactor if there are more reactors). Queues map onto the reactors
    /// round-robin.
    pub num_queues: Option<u16>,
}

struct Served {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The live VMM connection (to shut it down at detach).
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

/// The vhost-user-blk sockets of every attached disk.
pub struct VhostServer {
    cfg: VhostConfig,
    reactors: Arc<Reactors>,
    served: Mutex<BTreeMap<(String, String), Served>>,
    next_reactor: AtomicUsize,
}

impl VhostServer {
    pub fn new(cfg: VhostConfig, reactors: Arc<Reactors>) -> Arc<VhostServer> {
        Arc::new(VhostServer {
            cfg,
            reactors,
            served: Mutex::new(BTreeMap::new()),
            next_reactor: AtomicUsize::new(0),
        })
    }

    /// Serve `export` to `instance`'s VMM; returns the socket path.
    pub fn add(&self, instance: &str, export: Export) -> io::Result<PathBuf> {
        let key = (instance.to_owned(), export.name.clone());
        let mut served = self.served.lock().expect("vhost served");
        if let Some(s) = served.get(&key) {
            return Ok(s.path.clone());
        }
        let dir = self.cfg.instances_dir.join(instance).join(VHOST_DIR);
        let path = dir.join(format!("{}.sock", export.name));
        let listener = self.bind(&dir, &path)?;
        let n = self.reactors.len();
        let nq = self.cfg.num_queues.unwrap_or((n as u16).max(DEFAULT_QUEUES)).max(1);
        let disk = Arc::new(DiskInfo::new(instance, export, nq));
        let first = self.next_reactor.fetch_add(1, Ordering::Relaxed) % n;
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let reactors = self.reactors.clone();
        let (st, cn) = (stop.clone(), conn.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{}", disk.export.name))
            .spawn(move || serve(listener, disk, reactors, first, st, cn))?;
        served.insert(
            key,
            Served {
                path: path.clone(),
                stop,
                conn,
                thread: Some(thread),
            },
        );
        Ok(path)
    }

    /// Stop serving `disk` to `instance`: the VMM connection is closed, the
    /// queues drain, the socket goes.
    pub fn remove(&self, instance: &str, disk: &str) {
        let s = self
            .served
            .lock()
            .expect("vhost served")
            .remove(&(instance.to_owned(), disk.to_owned()));
        if let Some(s) = s {
            stop_served(s);
            let dir = self.cfg.instances_dir.join(instance).join(VHOST_DIR);
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// Stop everything (shutdown).
    pub fn remove_all(&self) {
        let all: Vec<(String, String)> = self.served.lock().expect("vhost served").keys().cloned().collect();
        for (i, d) in all {
            self.remove(&i, &d);
        }
    }

    fn bind(&self, dir: &Path, path: &Path) -> io::Result<UnixListener> {
        let gid = self.cfg.gid.unwrap_or(0);
        let own = |p: &Path, mode: u32| -> io::Result<()> {
            std::os::unix::fs::chown(p, Some(0), Some(gid))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        };
        let inst = dir.parent().expect("vhost dir has a parent");
        for d in [&self.cfg.instances_dir, &inst.to_path_buf(), &dir.to_path_buf()] {
            std::fs::create_dir_all(d)?;
            own(d, 0o710)?;
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        own(path, 0o660)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        self.remove_all();
    }
}

fn stop_served(mut s: Served) {
    s.stop.store(true, Ordering::SeqCst);
    if let Some(c) = s.conn.lock().expect("vhost conn").as_ref() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    if let Some(t) = s.thread.take() {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&s.path);
}

/// The pid of a unix socket's peer (SO_PEERCRED), if known.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    crate::sys::peer_cred(s).map(|(_, pid)| pid)
}

/// Whether an error from the message loop ends the connection.
fn fatal(e: &VuError) -> bool {
    matches!(
        e,
        VuError::Disconnected
            | VuError::PartialMessage
            | VuError::SocketBroken(_)
            | VuError::SocketError(_)
            | VuError::InvalidMessage
            | VuError::OversizedMsg
            | VuError::IncorrectFds
    )
}

/// The disk's control thread: accept a VMM, run its messages, and start over
/// when it goes.
fn serve(
    listener: UnixListener,
    disk: Arc<DiskInfo>,
    reactors: Arc<Reactors>,
    first: usize,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one live pollfd.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                continue;
            }
            Err(e) => {
                crate::log_limited!(disk.conns_log, error, disk = %disk.export.name, instance = %disk.instance, error = %e, "vhost-user: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let Ok(clone) = stream.try_clone() else { continue };
        *conn.lock().expect("vhost conn") = Some(clone);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let peer = peer_pid(&stream);
        crate::log_limited!(disk.conns_log, info, disk = %disk.export.name, instance = %disk.instance, vmm_pid = peer, "vhost-user: VMM connected");
        let dev = Arc::new(Mutex::new(device::BlkDevice::new(
            disk.clone(),
            reactors.clone(),
            first,
        )));
        let mut h = BackendReqHandler::from_stream(stream, dev.clone());
        let why = loop {
            match h.handle_request() {
                Ok(()) => {}
                Err(e) if fatal(&e) => break e,
                Err(e) => disk.note_protocol_error(&e),
            }
        };
        drop(h);
        // Drain and stop every queue before taking the next VMM.
        dev.lock().expect("vhost device").stop_all();
        drop(dev);
        *conn.lock().expect("vhost conn") = None;
        // A detach shuts the socket down under the handler: not the VMM's error.
        if matches!(why, VuError::Disconnected) || stop.load(Ordering::SeqCst) {
            crate::log_limited!(
                disk.conns_log,
                info,
                disk = %disk.export.name, instance = %disk.instance,
                vmm_pid = peer,
                "vhost-user: VMM disconnected"
            );
        } else {
            crate::log_limited!(
                disk.conns_log,
                warn,
                disk = %disk.export.name, instance = %disk.instance,
                vmm_pid = peer,
                error = %why,
                "vhost-user: VMM connection closed on a protocol error"
            );
        }
    }
}
