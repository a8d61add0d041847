//! The VMM side of vhost-user-blk: connects to a backend's socket,
//! negotiates like QEMU does, hands it the guest memory and the virtqueues,
//! and runs virtio-blk requests on them.
//!
//! ```no_run
//! use sealdisk::testing::vmm::{Driver, DriverOptions};
//! let mut d = Driver::connect("/tmp/x.sock", &DriverOptions::default()).unwrap();
//! println!("{} sectors, {} queues", d.config().capacity, d.num_queues());
//! assert_eq!(d.write(0, 8, &[0xab; 4096]).unwrap(), 0);
//! let (status, data) = d.read(1, 8, 4096).unwrap();
//! assert_eq!((status, data[0]), (0, 0xab));
//! ```
//!
//! Order of the messages (QEMU's): SET_OWNER, GET_FEATURES,
//! GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_CONFIG,
//! SET_FEATURES, SET_MEM_TABLE, then per queue SET_VRING_NUM, SET_VRING_ADDR,
//! SET_VRING_BASE, SET_VRING_CALL, SET_VRING_KICK, SET_VRING_ENABLE. With
//! REPLY_ACK every message without a reply of its own asks for an ack, so a
//! backend's refusal surfaces as an error of that step.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::mem::{GuestBuf, GuestMem, Seg};
use super::virtq::{BlkOp, BlkRange, Completion, Virtq};
use super::Error;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub(crate) const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Device features the driver acks when offered (VERSION_1 is required).
pub const DEFAULT_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    | bit(VIRTIO_BLK_F_SIZE_MAX)
    | bit(VIRTIO_BLK_F_SEG_MAX)
    | bit(VIRTIO_BLK_F_GEOMETRY)
    | bit(VIRTIO_BLK_F_RO)
    | bit(VIRTIO_BLK_F_BLK_SIZE)
    | bit(VIRTIO_BLK_F_FLUSH)
    | bit(VIRTIO_BLK_F_TOPOLOGY)
    | bit(VIRTIO_BLK_F_CONFIG_WCE)
    | bit(VIRTIO_BLK_F_MQ)
    | bit(VIRTIO_BLK_F_DISCARD)
    | bit(VIRTIO_BLK_F_WRITE_ZEROES);

/// Protocol features the driver acks when offered (CONFIG is required).
pub(crate) fn default_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Bytes of guest memory (GPA 0..mem_size).
    pub mem_size: u64,
    /// A GPA range inside guest memory left out of the memory table.
    pub mem_hole: Option<std::ops::Range<u64>>,
    /// Entries per virtqueue (a power of two).
    pub queue_size: u16,
    /// Queues to set up (None: all the device has).
    pub num_queues: Option<usize>,
    /// Device features to ack when offered.
    pub features: u64,
    /// Protocol features to ack when offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Ask for an ack of every message (when REPLY_ACK is negotiated).
    pub need_reply: bool,
    /// How long `connect` retries a missing or refusing socket.
    pub connect_timeout: Duration,
    /// How long the blocking helpers wait for a completion.
    pub io_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            mem_size: 64 << 20,
            mem_hole: None,
            queue_size: 256,
            num_queues: None,
            features: DEFAULT_FEATURES,
            protocol_features: default_protocol_features(),
            need_reply: true,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// What the two sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub device_features: u64,
    pub acked_features: u64,
    /// 0 when the device offers no VHOST_USER_F_PROTOCOL_FEATURES.
    pub protocol_offered: u64,
    pub protocol_acked: u64,
    /// GET_QUEUE_NUM's answer (with protocol MQ).
    pub queue_num: Option<u64>,
    /// GET_MAX_MEM_SLOTS' answer (with CONFIGURE_MEM_SLOTS).
    pub max_mem_slots: Option<u64>,
    /// Bytes of config space the device returned.
    pub config_len: usize,
}

impl Negotiated {
    pub fn has(&self, feature_bit: u32) -> bool {
        self.acked_features & bit(feature_bit) != 0
    }
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol_acked & f.bits() != 0
    }
    pub fn event_idx(&self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }
}

/// `struct virtio_blk_config`, little-endian fields decoded. Fields whose
/// feature was not negotiated are as the device sent them (often 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    /// As sent; [`Driver::device_queues`] applies VIRTIO_BLK_F_MQ.
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    /// The raw bytes.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Decode config space (at least the first 36 bytes, up to num_queues).
    pub fn parse(b: &[u8]) -> BlkConfig {
        let mut full = [0u8; 96];
        let n = b.len().min(96);
        full[..n].copy_from_slice(&b[..n]);
        let u16_ = |o: usize| u16::from_le_bytes([full[o], full[o + 1]]);
        let u32_ = |o: usize| u32::from_le_bytes(full[o..o + 4].try_into().expect("4 bytes"));
        BlkConfig {
            capacity: u64::from_le_bytes(full[0..8].try_into().expect("8 bytes")),
            size_max: u32_(8),
            seg_max: u32_(12),
            cylinders: u16_(16),
            heads: full[18],
            sectors: full[19],
            blk_size: u32_(20),
            physical_block_exp: full[24],
            alignment_offset: full[25],
            min_io_size: u16_(26),
            opt_io_size: u32_(28),
            wce: full[32],
            num_queues: u16_(34),
            max_discard_sectors: u32_(36),
            max_discard_seg: u32_(40),
            discard_sector_alignment: u32_(44),
            max_write_zeroes_sectors: u32_(48),
            max_write_zeroes_seg: u32_(52),
            write_zeroes_may_unmap: full[56],
            raw: b.to_vec(),
        }
    }
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * 512
    }
}

/// Config space sizes tried, largest first: with secure erase and zoned
/// fields (96), up to write zeroes (60), up to num_queues (36).
const CONFIG_SIZES: [u32; 3] = [96, 60, 36];

/// A connected, set-up vhost-user-blk device.
pub struct Driver {
    path: Option<PathBuf>,
    frontend: Frontend,
    mem: Arc<GuestMem>,
    opts: DriverOptions,
    negotiated: Negotiated,
    config: BlkConfig,
    queues: Vec<Virtq>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .field("negotiated", &self.negotiated)
            .field("queues", &self.queues)
            .finish()
    }
}

fn vh(step: &str) -> impl FnOnce(vhost::Error) -> Error + '_ {
    move |source| Error::Vhost {
        step: step.to_string(),
        source,
    }
}

fn connect_stream(path: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(Error::Io {
                    what: format!("connecting to {}", path.display()),
                    source: e,
                })
            }
        }
    }
}

/// The handshake up to GET_CONFIG (nothing handed to the device yet).
fn handshake(frontend: &mut Frontend, opts: &DriverOptions) -> Result<(Negotiated, BlkConfig), Error> {
    frontend.set_owner().map_err(vh("SET_OWNER"))?;
    let offered = frontend.get_features().map_err(vh("GET_FEATURES"))?;
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(Error::Invalid(format!(
            "the device offers features {offered:#x} without VIRTIO_F_VERSION_1"
        )));
    }
    let acked = offered & opts.features;
    let mut n = Negotiated {
        device_features: offered,
        acked_features: acked,
        protocol_offered: 0,
        protocol_acked: 0,
        queue_num: None,
        max_mem_slots: None,
        config_len: 0,
    };
    if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
        let p = frontend.get_protocol_features().map_err(vh("GET_PROTOCOL_FEATURES"))?;
        let want = p & opts.protocol_features;
        frontend
            .set_protocol_features(want)
            .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        n.protocol_offered = p.bits();
        n.protocol_acked = want.bits();
        if opts.need_reply && want.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if n.has_protocol(VhostUserProtocolFeatures::MQ) {
        n.queue_num = Some(frontend.get_queue_num().map_err(vh("GET_QUEUE_NUM"))?);
    }
    if n.has_protocol(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
        n.max_mem_slots = Some(frontend.get_max_mem_slots().map_err(vh("GET_MAX_MEM_SLOTS"))?);
    }
    if !n.has_protocol(VhostUserProtocolFeatures::CONFIG) {
        return Err(Error::Invalid(format!(
            "the device offers no VHOST_USER_PROTOCOL_F_CONFIG (protocol features {:#x}): no capacity to read",
            n.protocol_offered
        )));
    }
    let mut last = None;
    let mut config = None;
    for size in CONFIG_SIZES {
        let zero = vec![0u8; size as usize];
        match frontend.get_config(0, size, VhostUserConfigFlags::empty(), &zero) {
            Ok((_, payload)) => {
                config = Some(payload);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let raw = match (config, last) {
        (Some(c), _) => c,
        (None, Some(e)) => return Err(vh("GET_CONFIG")(e)),
        (None, None) => unreachable!("CONFIG_SIZES is not empty"),
    };
    n.config_len = raw.len();
    let config = BlkConfig::parse(&raw);
    frontend.set_features(acked).map_err(vh("SET_FEATURES"))?;
    Ok((n, config))
}

impl Driver {
    /// Connect to the backend at `path` (retrying up to
    /// `opts.connect_timeout` while it is not there yet) and set it up.
    pub fn connect(path: impl AsRef<Path>, opts: &DriverOptions) -> Result<Driver, Error> {
        let path = path.as_ref();
        let stream = connect_stream(path, opts.connect_timeout)?;
        let mut d = Driver::from_stream(stream, opts)?;
        d.path = Some(path.to_path_buf());
        Ok(d)
    }

    /// Set up the backend on an already connected stream.
    pub fn from_stream(stream: UnixStream, opts: &DriverOptions) -> Result<Driver, Error> {
        let mut frontend = Frontend::from_stream(stream, vhost::vhost_user::message::VHOST_USER_MAX_VRINGS);
        let (negotiated, config) = handshake(&mut frontend, opts)?;
        let device_queues = device_queues(&negotiated, &config);
        let nq = opts.num_queues.unwrap_or(device_queues);
        if nq == 0 || nq > device_queues {
            return Err(Error::Invalid(format!(
                "{nq} queues asked for; the device has {device_queues}"
            )));
        }
        let ring_bytes = nq as u64 * (opts.queue_size as u64 * (16 + 2 + 8 + super::virtq::SLOT_BYTES) + 4 * 4096);
        if ring_bytes > opts.mem_size / 2 {
            return Err(Error::Invalid(format!(
                "{nq} queues of {} entries need {ring_bytes} bytes of rings; mem_size {} is too small",
                opts.queue_size, opts.mem_size
            )));
        }
        let mem = GuestMem::new(opts.mem_size, opts.mem_hole.clone()).map_err(|e| Error::Io {
            what: "guest memory".into(),
            source: e,
        })?;
        let event_idx = negotiated.event_idx();
        let queues = (0..nq)
            .map(|i| Virtq::new(&mem, i as u16, opts.queue_size, event_idx))
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = Driver {
            path: None,
            frontend,
            mem,
            opts: opts.clone(),
            negotiated,
            config,
            queues,
        };
        d.start_rings()?;
        Ok(d)
    }

    /// SET_MEM_TABLE and every queue's rings, from each queue's current avail index.
    fn start_rings(&mut self) -> Result<(), Error> {
        self.frontend
            .set_mem_table(&self.mem.regions())
            .map_err(vh("SET_MEM_TABLE"))?;
        for q in &self.queues {
            let i = q.index() as usize;
            let step = |s: &str| format!("{s} (queue {i})");
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(|e| vh(&step("SET_VRING_NUM"))(e))?;
            self.frontend
                .set_vring_addr(i, &q.config_data())
                .map_err(|e| vh(&step("SET_VRING_ADDR"))(e))?;
            self.frontend
                .set_vring_base(i, q.avail_idx())
                .map_err(|e| vh(&step("SET_VRING_BASE"))(e))?;
            self.frontend
                .set_vring_call(i, q.call_fd())
                .map_err(|e| vh(&step("SET_VRING_CALL"))(e))?;
            self.frontend
                .set_vring_kick(i, q.kick_fd())
                .map_err(|e| vh(&step("SET_VRING_KICK"))(e))?;
            if self.negotiated.has(VHOST_USER_F_PROTOCOL_FEATURES) {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(|e| vh(&step("SET_VRING_ENABLE"))(e))?;
            }
        }
        Ok(())
    }

    /// Close this connection and set the same device up on a new one to the
    /// same socket, keeping the guest memory, the rings and their indexes
    /// (as QEMU does when a backend restarts). No request may be in flight.
    pub fn reconnect(&mut self) -> Result<(), Error> {
        let Some(path) = self.path.clone() else {
            return Err(Error::Invalid("reconnect needs a driver made by connect(path)".into()));
        };
        if let Some(q) = self.queues.iter().find(|q| q.in_flight() > 0) {
            return Err(Error::Invalid(format!(
                "queue {} has {} requests in flight",
                q.index(),
                q.in_flight()
            )));
        }
        // Close the old connection before the backend is asked to take a new
        // one (a backend may serve one client at a time): the placeholder is
        // one end of a fresh socket pair, never used.
        let (placeholder, _) = UnixStream::pair().map_err(|e| Error::Io {
            what: "socketpair".into(),
            source: e,
        })?;
        drop(std::mem::replace(
            &mut self.frontend,
            Frontend::from_stream(placeholder, 1),
        ));
        let stream = connect_stream(&path, self.opts.connect_timeout)?;
        let mut frontend = Frontend::from_stream(stream, vhost::vhost_user::message::VHOST_USER_MAX_VRINGS);
        let (negotiated, config) = handshake(&mut frontend, &self.opts)?;
        if negotiated.event_idx() != self.negotiated.event_idx() {
            return Err(Error::Invalid("EVENT_IDX changed across the reconnect".into()));
        }
        self.frontend = frontend;
        self.negotiated = negotiated;
        self.config = config;
        for q in &mut self.queues {
            q.renew_eventfds()?;
        }
        self.start_rings()
    }

    /// SET_VRING_ENABLE 0 and GET_VRING_BASE for queue `i`: the device stops
    /// the ring and says where it would resume (our avail index once it has
    /// consumed everything).
    pub fn stop_queue(&mut self, i: usize) -> Result<u32, Error> {
        if self.negotiated.has(VHOST_USER_F_PROTOCOL_FEATURES) {
            self.frontend
                .set_vring_enable(i, false)
                .map_err(vh("SET_VRING_ENABLE 0"))?;
        }
        self.frontend.get_vring_base(i).map_err(vh("GET_VRING_BASE"))
    }

    /// Stop every queue (clean shutdown); returns each GET_VRING_BASE.
    pub fn stop(&mut self) -> Result<Vec<u32>, Error> {
        (0..self.queues.len()).map(|i| self.stop_queue(i)).collect()
    }

    /// Close the connection (dropping the driver does the same).
    pub fn disconnect(self) {}

    /// The socket this driver connected to.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }
    /// Queues the device has (config num_queues with VIRTIO_BLK_F_MQ, else 1).
    pub fn device_queues(&self) -> usize {
        device_queues(&self.negotiated, &self.config)
    }
    /// Queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
    pub fn queue(&mut self, i: usize) -> &mut Virtq {
        &mut self.queues[i]
    }
    /// All queues (e.g. one per thread with `std::thread::scope`).
    pub fn queues_mut(&mut self) -> &mut [Virtq] {
        &mut self.queues
    }
    /// The vhost-user connection, for messages of a test's own.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }
    /// A zeroed guest buffer (4 KiB-aligned from 4 KiB up, else 64-byte aligned).
    pub fn alloc(&self, len: usize) -> Result<GuestBuf, Error> {
        let align = if len >= 4096 { 4096 } else { 64 };
        self.mem.alloc(len as u64, align).map_err(|e| Error::Io {
            what: "guest buffer".into(),
            source: e,
        })
    }

    /// Submit `op` on queue `q` and wait for it.
    pub fn run(&mut self, q: usize, op: &BlkOp<'_>) -> Result<Completion, Error> {
        let timeout = self.opts.io_timeout;
        let queue = &mut self.queues[q];
        let id = queue.submit(op)?;
        queue.wait_for(id, timeout)
    }

    /// Read `len` bytes at `sector`: (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: usize) -> Result<(u8, Vec<u8>), Error> {
        self.read_v(q, sector, &[len])
    }

    /// Read into one segment per entry of `lens` (a multi-segment request).
    pub fn read_v(&mut self, q: usize, sector: u64, lens: &[usize]) -> Result<(u8, Vec<u8>), Error> {
        let bufs = lens.iter().map(|&l| self.alloc(l)).collect::<Result<Vec<_>, _>>()?;
        let segs: Vec<Seg> = bufs.iter().map(GuestBuf::seg).collect();
        let c = self.run(q, &BlkOp::Read { sector, segs: &segs })?;
        let mut out = Vec::with_capacity(lens.iter().sum());
        for b in &bufs {
            out.extend_from_slice(b.as_slice());
        }
        Ok((c.status, out))
    }

    /// Write `data` at `sector`: the status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<u8, Error> {
        self.write_v(q, sector, &[data])
    }

    /// Write one segment per part (a multi-segment request).
    pub fn write_v(&mut self, q: usize, sector: u64, parts: &[&[u8]]) -> Result<u8, Error> {
        let mut bufs = Vec::with_capacity(parts.len());
        for p in parts {
            let mut b = self.alloc(p.len())?;
            b.as_mut_slice().copy_from_slice(p);
            bufs.push(b);
        }
        let segs: Vec<Seg> = bufs.iter().map(GuestBuf::seg).collect();
        Ok(self.run(q, &BlkOp::Write { sector, segs: &segs })?.status)
    }

    pub fn flush(&mut self, q: usize) -> Result<u8, Error> {
        Ok(self.run(q, &BlkOp::Flush)?.status)
    }

    pub fn discard(&mut self, q: usize, sector: u64, num_sectors: u32) -> Result<u8, Error> {
        let r = [BlkRange {
            sector,
            num_sectors,
            unmap: false,
        }];
        Ok(self.run(q, &BlkOp::Discard { ranges: &r })?.status)
    }

    pub fn write_zeroes(&mut self, q: usize, sector: u64, num_sectors: u32, unmap: bool) -> Result<u8, Error> {
        let r = [BlkRange {
            sector,
            num_sectors,
            unmap,
        }];
        Ok(self.run(q, &BlkOp::WriteZeroes { ranges: &r })?.status)
    }

    /// GET_ID on queue `q`: the serial (up to 20 bytes, NUL-terminated if shorter).
    pub fn get_id(&mut self, q: usize) -> Result<String, Error> {
        let b = self.alloc(VIRTIO_BLK_ID_BYTES as usize)?;
        let c = self.run(q, &BlkOp::GetId { seg: b.seg() })?;
        if c.status != VIRTIO_BLK_S_OK as u8 {
            return Err(Error::Status {
                what: "GET_ID".into(),
                status: c.status,
            });
        }
        let s = b.as_slice();
        let end = s.iter().position(|&x| x == 0).unwrap_or(s.len());
        Ok(String::from_utf8_lossy(&s[..end]).into_owned())
    }
}

fn device_queues(n: &Negotiated, c: &BlkConfig) -> usize {
    let mut q = if n.has(VIRTIO_BLK_F_MQ) {
        c.num_queues.max(1) as usize
    } else {
        1
    };
    if let Some(qn) = n.queue_num {
        q = q.min(qn.max(1) as usize);
    }
    q
}

/// Names of the feature bits set in `f` (virtio-blk, ring and vhost-user ones).
pub fn feature_names(f: u64) -> Vec<String> {
    let names: [(u32, &str); 21] = [
        (VIRTIO_BLK_F_BARRIER, "BARRIER"),
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_SCSI, "SCSI"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_BLK_F_SECURE_ERASE, "SECURE_ERASE"),
        (VIRTIO_BLK_F_ZONED, "ZONED"),
        (28, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (33, "ACCESS_PLATFORM"),
        (34, "RING_PACKED"),
    ];
    let mut out = Vec::new();
    let mut rest = f;
    for (b, name) in names {
        if f & bit(b) != 0 {
            out.push(name.to_string());
            rest &= !bit(b);
        }
    }
    for b in 0..64 {
        if rest & bit(b) != 0 {
            out.push(format!("bit{b}"));
        }
    }
    out
}

/// Names of the protocol feature bits set in `p`.
pub(crate) fn protocol_names(p: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (name, f) in VhostUserProtocolFeatures::from_bits_retain(p).iter_names() {
        let _ = f;
        out.push(name.to_string());
    }
    let rest = p & !VhostUserProtocolFeatures::all().bits();
    for b in 0..64 {
        if rest & bit(b) != 0 {
            out.push(format!("bit{b}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_reads_little_endian_fields_at_their_offsets() {
        let mut b = vec![0u8; 60];
        b[0..8].copy_from_slice(&(2048u64).to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        b[32] = 1;
        b[34..36].copy_from_slice(&2u16.to_le_bytes());
        b[36..40].copy_from_slice(&32768u32.to_le_bytes());
        b[56] = 1;
        let c = BlkConfig::parse(&b);
        assert_eq!(c.capacity_bytes(), 1 << 20);
        assert_eq!((c.seg_max, c.blk_size, c.wce, c.num_queues), (126, 512, 1, 2));
        assert_eq!((c.max_discard_sectors, c.write_zeroes_may_unmap), (32768, 1));
        assert!(feature_names(DEFAULT_FEATURES).contains(&"RING_EVENT_IDX".to_string()));
        assert_eq!(protocol_names(0x9), vec!["MQ", "REPLY_ACK"]);
    }
}
