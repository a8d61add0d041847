//! The vhost-user-blk device as the VMM sees it over the control socket:
//! feature and protocol negotiation, the config space, the memory table and
//! the vrings' set-up. It runs on the disk's control thread, one message at
//! a time, and never touches a running queue's ring: a queue that becomes
//! ready (addresses, kick and enable) is handed to its reactor
//! ([`super::queue::start`]) and reached afterwards only through its
//! [`QueueShared`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::inflight::{queue_region_size, InflightMap};
use super::queue::{self, QueueShared, QueueStart, MAX_RANGES, MAX_RANGE_SECTORS};
use super::request::SECTOR;
use super::DiskInfo;
use crate::reactor::Reactors;

/// Largest virtqueue the device takes.
pub(crate) const MAX_QUEUE_SIZE: u16 = 1024;
/// Data segments per request (SEG_MAX): the queue size less header and status.
pub(crate) const SEG_MAX: u32 = 126;
/// Largest data segment (SIZE_MAX).
pub(crate) const SIZE_MAX: u32 = 1 << 20;
/// Memory slots (CONFIGURE_MEM_SLOTS).
const MAX_MEM_SLOTS: u64 = 32;
/// How long a stop waits for a queue's requests to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One vring as the VMM configured it.
#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    running: Option<Arc<QueueShared>>,
}

/// A mapped region of the VMM's memory: where it is in the VMM's address
/// space (vring addresses arrive as VMM virtual addresses) and in the guest's.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

pub(super) struct BlkDevice {
    disk: Arc<DiskInfo>,
    reactors: Arc<Reactors>,
    /// Reactor of queue 0 (queue i runs on `first + i` modulo the reactors).
    first_reactor: usize,
    acked: u64,
    acked_protocol: u64,
    mem: Option<Arc<GuestMemoryMmap>>,
    /// The VMM's inflight area (INFLIGHT_SHMFD).
    inflight: Option<Arc<InflightMap>>,
    regions: Vec<(Arc<GuestRegionMmap>, Mapping)>,
    vrings: Vec<Vring>,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

fn internal(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

impl BlkDevice {
    pub(super) fn new(disk: Arc<DiskInfo>, reactors: Arc<Reactors>, first_reactor: usize) -> BlkDevice {
        let n = disk.num_queues as usize;
        BlkDevice {
            disk,
            reactors,
            first_reactor,
            acked: 0,
            acked_protocol: 0,
            mem: None,
            inflight: None,
            regions: Vec::new(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
        }
    }

    /// The virtio features offered.
    pub(super) fn features(disk: &DiskInfo) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if disk.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The config space (`struct virtio_blk_config`, little-endian).
    pub(super) fn config(disk: &DiskInfo) -> [u8; 60] {
        let mut c = [0u8; 60];
        let bs = disk.block_size;
        c[0..8].copy_from_slice(&(disk.capacity / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&bs.to_le_bytes());
        // Topology: one logical block per physical block, aligned, min I/O one block.
        c[24] = 0;
        c[25] = 0;
        c[26..28].copy_from_slice(&((bs / SECTOR as u32) as u16).to_le_bytes());
        c[28..32].copy_from_slice(&0u32.to_le_bytes());
        c[32] = disk.writeback.load(Ordering::Relaxed) as u8;
        c[34..36].copy_from_slice(&disk.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&(MAX_RANGES as u32).to_le_bytes());
        c[44..48].copy_from_slice(&(bs / SECTOR as u32).to_le_bytes());
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&(MAX_RANGES as u32).to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VuError::InvalidParam)
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn vmm_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.regions
            .iter()
            .map(|(_, m)| m)
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa)
            .ok_or(VuError::InvalidParam)
    }

    /// Rebuild the memory table from `regions` and give it to running queues.
    fn publish_mem(&mut self) -> VuResult<()> {
        // vm-memory wants its regions in address order; VMMs send them in any
        // order, and a hot-plugged one can land anywhere (overlaps stay errors).
        self.regions.sort_by_key(|(_, m)| m.gpa);
        let regions: Vec<Arc<GuestRegionMmap>> = self.regions.iter().map(|(r, _)| r.clone()).collect();
        let mem = if regions.is_empty() {
            None
        } else {
            Some(Arc::new(GuestMemoryMmap::from_arc_regions(regions).map_err(internal)?))
        };
        for v in &self.vrings {
            if let (Some(sh), Some(m)) = (&v.running, &mem) {
                sh.set_mem(m.clone());
            }
        }
        self.mem = mem;
        Ok(())
    }

    /// Start queue `i` on its reactor if it is fully set up, enabled and not running.
    fn maybe_start(&mut self, i: usize) -> VuResult<()> {
        let event_idx = self.acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let v = &mut self.vrings[i];
        if v.running.is_some() || !v.enabled || !v.addr_set || v.kick.is_none() {
            return Ok(());
        }
        let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(internal)?;
        q.set_size(if v.size == 0 { MAX_QUEUE_SIZE } else { v.size });
        q.set_desc_table_address(Some(v.desc as u32), Some((v.desc >> 32) as u32));
        q.set_avail_ring_address(Some(v.avail as u32), Some((v.avail >> 32) as u32));
        q.set_used_ring_address(Some(v.used as u32), Some((v.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_next_avail(v.base);
        // The used index continues from what the ring holds (a reconnect, or a
        // stop and start, leaves it where the last run put it).
        let used = q.used_idx(&*mem, Ordering::Acquire).map_err(internal)?.0;
        q.set_next_used(used);
        let size = q.size();
        let mut inflight = self.inflight.as_ref().and_then(|m| m.queue(i as u16, size));
        let resubmit = match &mut inflight {
            Some(f) => {
                let heads = f.recover(used);
                // Every chain taken is answered (in the used ring) or in flight.
                q.set_next_avail(used.wrapping_add(heads.len() as u16));
                heads
            }
            None => Vec::new(),
        };
        if !resubmit.is_empty() {
            tracing::info!(
                disk = %self.disk.export.name,
            instance = %self.disk.instance,
                queue = i,
                requests = resubmit.len(),
                "vhost-user: taking again the requests left in flight by the last run"
            );
        }
        q.set_ready(true);
        if !q.is_valid(&*mem) {
            return Err(VuError::InvalidParam);
        }
        let kick = v
            .kick
            .as_ref()
            .expect("checked")
            .try_clone()
            .map_err(VuError::ReqHandlerError)?;
        let call = v.call.as_ref().map_or(-1, |f| f.as_raw_fd());
        let shared = QueueShared::new(call);
        let start = QueueStart {
            index: i as u16,
            inflight,
            resubmit,
            queue: q,
            mem,
            kick,
            shared: shared.clone(),
            disk: self.disk.clone(),
        };
        let r = (self.first_reactor + i) % self.reactors.len();
        match self
            .reactors
            .call(r, Duration::from_secs(5), move |ctx| queue::start(ctx, start))
        {
            Ok(Ok(())) => {
                v.running = Some(shared);
                Ok(())
            }
            Ok(Err(e)) => Err(internal(e)),
            Err(e) => {
                // The reactor did not answer in time, but the message may still
                // run later: a poller that starts then sees the stop flag on its
                // first poll and ends without taking a chain.
                shared.request_stop();
                Err(internal(e))
            }
        }
    }

    /// Stop queue `i` (drain) and return where it stopped.
    fn stop(&mut self, i: usize) -> Option<queue::Stopped> {
        let sh = self.vrings[i].running.take()?;
        sh.request_stop();
        // Wake the reactor so it sees the flag even if parked.
        let r = (self.first_reactor + i) % self.reactors.len();
        let _ = self.reactors.send(r, Box::new(|_| {}));
        let st = sh.wait_stopped(DRAIN_TIMEOUT);
        match st {
            Some(s) => self.vrings[i].base = s.next_avail,
            None => tracing::error!(
                disk = %self.disk.export.name,
            instance = %self.disk.instance,
                queue = i,
                "vhost-user: the queue did not drain within {DRAIN_TIMEOUT:?}"
            ),
        }
        st
    }

    /// Stop every queue (disconnect, reset, detach).
    pub(super) fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Replace the call eventfd of queue `i`; a running queue switches to the
    /// new one before the old one is closed.
    fn set_call(&mut self, i: usize, f: Option<File>) {
        let fd = f.as_ref().map_or(-1, |f| f.as_raw_fd());
        let v = &mut self.vrings[i];
        let old = std::mem::replace(&mut v.call, f);
        if let Some(sh) = &v.running {
            sh.call.store(fd, Ordering::Release);
            // A round trip through the queue's reactor: after it, the poller no
            // longer uses the old descriptor.
            let r = (self.first_reactor + i) % self.reactors.len();
            let _ = self.reactors.call(r, Duration::from_secs(5), |_| ());
        }
        drop(old);
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in &mut self.vrings {
            *v = Vring::default();
        }
        self.acked = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(Self::features(&self.disk))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !Self::features(&self.disk) != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked = features;
        // Without PROTOCOL_FEATURES every ring is enabled from the start.
        if !self.protocol_features_acked() {
            for i in 0..self.vrings.len() {
                self.vrings[i].enabled = true;
                self.maybe_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::new();
        for (r, f) in ctx.iter().zip(files) {
            let g = GuestRegionMmap::new(r.mmap_region(f)?, GuestAddress(r.guest_phys_addr))
                .ok_or(VuError::InvalidParam)?;
            regions.push((
                Arc::new(g),
                Mapping {
                    vmm_addr: r.user_addr,
                    size: r.memory_size,
                    gpa: r.guest_phys_addr,
                },
            ));
        }
        self.regions = regions;
        self.publish_mem()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (d, u, a) = (
            self.vmm_to_gpa(descriptor)?,
            self.vmm_to_gpa(used)?,
            self.vmm_to_gpa(available)?,
        );
        let v = self.vring(index)?;
        (v.desc, v.used, v.avail, v.addr_set) = (d, u, a, true);
        self.maybe_start(index as usize)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop(i);
        let v = &mut self.vrings[i];
        v.kick = None;
        let base = v.base;
        self.set_call(i, None);
        Ok(VhostUserVringState::new(index, base as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let no_protocol = !self.protocol_features_acked();
        let v = self.vring(index as u32)?;
        v.kick = fd;
        if no_protocol {
            v.enabled = true;
        }
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        self.set_call(index as usize, fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_features_acked() {
            return Err(VuError::InvalidOperation("SET_VRING_ENABLE without PROTOCOL_FEATURES"));
        }
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop(index as usize);
            Ok(())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let c = Self::config(&self.disk);
        let (o, n) = (offset as usize, size as usize);
        let mut out = vec![0u8; n];
        if o < c.len() {
            let end = (o + n).min(c.len());
            out[..end - o].copy_from_slice(&c[o..end]);
        }
        Ok(out)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        // Only the write-cache mode (`wce`, CONFIG_WCE) is writable.
        if offset != 32 || buf.len() != 1 || buf[0] > 1 {
            return Err(VuError::InvalidParam);
        }
        self.disk.writeback.store(buf[0] == 1, Ordering::Relaxed);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues == 0 || inflight.queue_size == 0 || inflight.queue_size > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let (map, file) =
            InflightMap::create(inflight.num_queues, inflight.queue_size).map_err(VuError::ReqHandlerError)?;
        let size = (queue_region_size(inflight.queue_size) * inflight.num_queues as usize) as u64;
        self.inflight = Some(map);
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if inflight.queue_size > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let map = InflightMap::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size as usize,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(VuError::ReqHandlerError)?;
        tracing::info!(
            disk = %self.disk.export.name,
            instance = %self.disk.instance,
            queues = inflight.num_queues,
            queue_size = inflight.queue_size,
            "vhost-user: the VMM handed back its inflight area"
        );
        self.inflight = Some(map);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(VuError::InvalidParam);
        }
        let g = GuestRegionMmap::new(region.mmap_region(fd)?, GuestAddress(region.guest_phys_addr))
            .ok_or(VuError::InvalidParam)?;
        let g = Arc::new(g);
        self.regions.push((
            g.clone(),
            Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            },
        ));
        if let Err(e) = self.publish_mem() {
            // The table is sorted now: take out the region just added, by identity.
            self.regions.retain(|(r, _)| !Arc::ptr_eq(r, &g));
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let before = self.regions.len();
        self.regions
            .retain(|(_, m)| !(m.gpa == region.guest_phys_addr && m.size == region.memory_size));
        if self.regions.len() == before {
            return Err(VuError::InvalidParam);
        }
        self.publish_mem()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging is not supported"))
    }
}
