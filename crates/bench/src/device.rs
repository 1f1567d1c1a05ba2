//! The libblkio side: connect to the socket, size the queues, start them,
//! and share one memory region (memfd, mapped into the daemon) that holds
//! every request buffer.

use blkio::{Blkio, Blkioq, MemoryRegion};

use super::error::{blkio_message, BenchError};
use super::spec::JobSpec;

const DRIVER: &str = "virtio-blk-vhost-user";
const PAGE: usize = 4096;
/// libvhost-user's largest ring; larger rings are refused by QEMU backends.
const MAX_RING: usize = 1024;
const MIN_RING: usize = 256;

/// A started device. Its queues and buffers must not outlive it: the
/// queues use the connection that `blkio` owns.
pub(crate) struct Device {
    /// Owns the connection; only kept alive.
    _blkio: Blkio,
    pub capacity: u64,
    /// Descriptors a buffer of `bs` bytes is split into (the device's size_max).
    pub segment_len: usize,
    region: MemoryRegion,
    slot_len: usize,
}

/// The buffers of one queue: `slots` buffers of `slot_len` bytes at `base`.
pub(crate) struct QueueMemory {
    pub base: *mut u8,
    pub slot_len: usize,
    pub slots: usize,
}

// SAFETY: each queue gets a disjoint part of the region, which stays mapped
// while the `Device` lives; the worker that owns a `QueueMemory` is its only
// user on this side.
unsafe impl Send for QueueMemory {}

fn setup_err(step: &'static str) -> impl Fn(blkio::Error) -> BenchError {
    move |e| BenchError::Setup {
        step,
        message: blkio_message(&e),
    }
}

impl Device {
    /// Connects, checks the geometry and starts `spec.queues` queues.
    pub fn open(spec: &JobSpec) -> Result<(Self, Vec<Blkioq>), BenchError> {
        let mut blkio = Blkio::new(DRIVER).map_err(setup_err("loading the libblkio driver"))?;
        let socket = spec.socket.to_string_lossy();
        blkio
            .set_str("path", &socket)
            .map_err(setup_err("setting the socket path"))?;
        // A read-only job also works against a read-only export.
        blkio
            .set_bool("read-only", !spec.writes())
            .map_err(setup_err("setting read-only"))?;
        let mut blkio = connect_within(blkio, spec)?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(setup_err("reading the capacity"))?;
        let (segment_len, segments) = segment_plan(&blkio, spec.bs as usize)?;
        configure_queues(&mut blkio, spec, segments)?;
        let outcome = blkio.start().map_err(setup_err("starting the queues"))?;
        let slot_len = round_up(spec.bs as usize, PAGE);
        let total = slot_len * spec.iodepth as usize * spec.queues as usize;
        let region = blkio
            .alloc_mem_region(total)
            .map_err(setup_err("allocating the buffer memory"))?;
        blkio
            .map_mem_region(&region)
            .map_err(setup_err("mapping the buffer memory into the daemon"))?;
        let device = Self {
            _blkio: blkio,
            capacity,
            segment_len,
            region,
            slot_len,
        };
        Ok((device, outcome.queues))
    }

    /// The buffers of queue `index` (each queue gets `iodepth` slots).
    pub fn queue_memory(&self, index: usize, iodepth: usize) -> QueueMemory {
        let offset = index * iodepth * self.slot_len;
        assert!(offset + iodepth * self.slot_len <= self.region.len);
        QueueMemory {
            base: (self.region.addr + offset) as *mut u8,
            slot_len: self.slot_len,
            slots: iodepth,
        }
    }
}

/// libblkio's connect waits for the backend's answers, and a vhost-user
/// backend serves one frontend at a time: the socket of a backend busy with
/// a VMM accepts the connection and then says nothing. So connect on a
/// helper thread and give up after the stall timeout; the helper stays
/// blocked until the process exits or the backend answers.
fn connect_within(mut blkio: Blkio, spec: &JobSpec) -> Result<Blkio, BenchError> {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-connect".into())
        .spawn(move || {
            let connected = blkio.connect().map(|()| blkio);
            let _ = done.send(connected.map_err(|e| blkio_message(&e)));
        })
        .map_err(|e| BenchError::Setup {
            step: "starting the connect thread",
            message: e.to_string(),
        })?;
    match result.recv_timeout(spec.stall_timeout) {
        Ok(connected) => connected.map_err(|message| BenchError::Connect {
            socket: spec.socket.clone(),
            message,
        }),
        Err(_) => Err(BenchError::NoAnswer {
            socket: spec.socket.clone(),
            secs: spec.stall_timeout.as_secs_f64(),
        }),
    }
}

/// How a `bs` buffer is cut into descriptors: the device may cap a
/// descriptor's length (SIZE_MAX) and the number per request (SEG_MAX).
fn segment_plan(blkio: &Blkio, bs: usize) -> Result<(usize, usize), BenchError> {
    let max_len = blkio
        .get_i32("max-segment-len")
        .map_err(setup_err("reading max-segment-len"))?;
    let max_segments = blkio
        .get_i32("max-segments")
        .map_err(setup_err("reading max-segments"))?;
    let segment_len = if max_len > 0 {
        // Keep segments whole 512-byte units.
        (max_len as usize / 512 * 512).clamp(512, bs)
    } else {
        bs
    };
    let segments = bs.div_ceil(segment_len);
    if segments > max_segments.max(1) as usize {
        return Err(BenchError::InvalidSpec(format!(
            "--bs {bs} needs {segments} descriptors of at most {segment_len} bytes but the \
             device accepts {max_segments} per request; use a smaller --bs"
        )));
    }
    Ok((segment_len, segments))
}

fn configure_queues(blkio: &mut Blkio, spec: &JobSpec, segments: usize) -> Result<(), BenchError> {
    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(setup_err("reading max-queues"))?;
    if spec.queues as i64 > i64::from(max_queues) {
        return Err(BenchError::InvalidSpec(format!(
            "the device offers {max_queues} queue(s); use --queues {max_queues} or fewer"
        )));
    }
    blkio
        .set_i32("num-queues", spec.queues as i32)
        .map_err(setup_err("setting num-queues"))?;
    // Each request takes a header, its data and a status descriptor: size the
    // ring so that iodepth requests fit without libblkio's backlog.
    let wanted = (spec.iodepth as usize * (segments + 2)).next_power_of_two();
    let ring = wanted.clamp(MIN_RING, MAX_RING);
    blkio
        .set_i32("queue-size", ring as i32)
        .map_err(setup_err("setting queue-size"))
}

fn round_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}
