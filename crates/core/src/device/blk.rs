//! Executing validated requests against the volume. Knows requests and
//! buffers, not rings or sockets.

use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, GuestMemoryBackend};

use super::config_space;
use super::options::DeviceOptions;
use super::stats::Stats;
use crate::virtio::{GuestBufs, Limits, Request, Segment, VIRTIO_BLK_ID_BYTES};
use crate::volume::{AlignedBuf, Volume, CHUNK_BYTES};

/// The device as the guest sees it, shared by all queues and connections.
pub struct BlkDevice {
    volume: Volume,
    opts: DeviceOptions,
    limits: Limits,
    config: Vec<u8>,
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
            config: config_space::config_space(&opts, capacity, block),
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

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Request counters and connection state (the control socket's).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config_space(&self) -> &[u8] {
        &self.config
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
