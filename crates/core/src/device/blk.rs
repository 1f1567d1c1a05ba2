//! Executing validated requests against the volume. Knows requests and
//! buffers, not rings or sockets.

use std::io;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use vm_memory::{Bytes, GuestMemoryBackend};

use super::config_space;
use super::options::DeviceOptions;
use super::stats::Stats;
use crate::virtio::{GuestBufs, Limits, Request, Segment, VIRTIO_BLK_ID_BYTES};
use crate::volume::{AlignedBuf, Volume, CHUNK_BYTES};

/// Why the disk could not grow, or the guest could not be told.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the connected VMM did not open the vhost-user backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ; cloud-hypervisor never does), so its guest would not see a new size; the disk was not changed: resize while no VMM is connected, or from QEMU")]
    NoChannel,
    #[error(transparent)]
    Volume(crate::volume::ResizeError),
    #[error("the disk grew to {capacity} bytes but the VMM was not told ({reason}); the guest sees the new size after it reconnects")]
    Notify { capacity: u64, reason: String },
}

/// The device as the guest sees it, shared by all queues and connections.
pub struct BlkDevice {
    volume: Volume,
    opts: DeviceOptions,
    /// The limits at start-up; `limits()` adds the current capacity.
    limits: Limits,
    /// The config space as the guest reads it (rebuilt by `resize`).
    config: Mutex<Vec<u8>>,
    /// The connected VMM's backend request channel, if it opened one
    /// (QEMU does; cloud-hypervisor never does): how `resize` tells it.
    frontend: Mutex<Option<Backend>>,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: Stats,
}

/// Per-thread buffers: allocated once, reused for every request.
pub struct Workspace {
    pub segments: Vec<Segment>,
    pub bufs: GuestBufs,
    pub scratch: AlignedBuf,
}

impl Workspace {
    pub fn new(queue_size: u16) -> Self {
        Workspace {
            segments: Vec::with_capacity(queue_size as usize),
            bufs: GuestBufs::default(),
            scratch: AlignedBuf::new(CHUNK_BYTES),
        }
    }
}

impl BlkDevice {
    pub fn new(volume: Volume, mut opts: DeviceOptions) -> Arc<Self> {
        opts.readonly |= volume.readonly();
        if opts.allow_discards && !volume.can_discard() {
            log::warn!("--allow-discards: the NBD server cannot trim; DISCARD is not offered");
            opts.allow_discards = false;
        }
        let capacity = volume.capacity_bytes();
        let block = volume.sector_size();
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let id = opts.serial.as_bytes();
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id[..n]);
        Arc::new(BlkDevice {
            limits: config_space::limits(&opts, capacity, block),
            config: Mutex::new(config_space::config_space(&opts, capacity, block)),
            frontend: Mutex::new(None),
            stats: Stats::new(opts.queues),
            volume,
            opts,
            serial,
        })
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    pub fn options(&self) -> &DeviceOptions {
        &self.opts
    }

    /// What requests are checked against, with the capacity of now.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.volume.capacity_bytes(),
            ..self.limits
        }
    }

    /// Request counters and connection state (the control socket's).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config_space(&self) -> Vec<u8> {
        lock(&self.config).clone()
    }

    /// The VMM of this connection opened its backend request channel
    /// (Some), or the connection ended (None).
    pub fn set_frontend_channel(&self, channel: Option<Backend>) {
        *lock(&self.frontend) = channel;
    }

    /// Grows the disk (see `Volume::grow`) and tells the guest: the config
    /// space's capacity changes and the VMM gets CONFIG_CHANGE_MSG over
    /// its backend request channel. With a VMM connected that has no such
    /// channel the disk is left as it is, since its guest would never
    /// learn the new size. Returns the new capacity in bytes and whether a
    /// VMM was told.
    pub fn resize(&self, wanted: Option<u64>) -> Result<(u64, bool), ResizeError> {
        let frontend = lock(&self.frontend).clone();
        let (connected, ..) = self.stats.connection();
        if connected && frontend.is_none() {
            return Err(ResizeError::NoChannel);
        }
        let capacity = self.volume.grow(wanted).map_err(ResizeError::Volume)?;
        let block = self.volume.sector_size();
        *lock(&self.config) = config_space::config_space(&self.opts, capacity, block);
        let Some(channel) = frontend else {
            return Ok((capacity, false));
        };
        channel
            .handle_config_change()
            .map_err(|e| ResizeError::Notify {
                capacity,
                reason: e.to_string(),
            })?;
        Ok((capacity, true))
    }

    /// Runs one request; returns how many bytes it wrote into guest memory.
    pub fn execute<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        request: Request,
        ws: &mut Workspace,
    ) -> io::Result<u32> {
        let Workspace {
            segments,
            bufs,
            scratch,
        } = ws;
        let unmapped =
            |_| io::Error::new(io::ErrorKind::InvalidInput, "descriptor left guest memory");
        match request {
            Request::Read { pos, len } => {
                bufs.with_writable(mem, segments, |b| self.volume.read_into(pos, b, scratch))
                    .map_err(unmapped)??;
                Ok(len as u32)
            }
            Request::Write { pos, .. } => {
                bufs.with_readable(mem, segments, |b| self.volume.write_from(pos, b, scratch))
                    .map_err(unmapped)??;
                Ok(0)
            }
            Request::Flush => self.volume.flush().map(|_| 0),
            Request::GetId { len } => self.write_serial(mem, segments, len as usize),
            Request::Discard { pos, len } => self.volume.discard(pos, len).map(|_| 0),
            Request::WriteZeroes { pos, len } => {
                self.volume.write_zeroes(pos, len, scratch).map(|_| 0)
            }
        }
    }

    /// GET_ID: the serial, NUL-padded, truncated to the guest's buffer.
    fn write_serial<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        segments: &[Segment],
        len: usize,
    ) -> io::Result<u32> {
        let mut done = 0;
        for s in segments {
            let n = (s.len as usize).min(len - done);
            mem.write_slice(&self.serial[done..done + n], s.addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            done += n;
            if done == len {
                break;
            }
        }
        Ok(done as u32)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
