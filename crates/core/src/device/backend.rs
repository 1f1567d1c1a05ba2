//! `VhostUserBackend` for the block device: per-queue state, one vring
//! thread per queue, no lock shared between queues on the data path.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::{GuestMemory, Vring};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::aio::AsyncQueue;
use super::blk::{BlkDevice, Workspace};
use super::config_space::{config_window, protocol_features, virtio_features, VHOST_F_LOG_ALL};
use super::guest_faults::GuestFaults;
use super::inflight::{InflightQueue, InflightRegion};
use super::options::{AioMode, CryptoMode};
use super::pool::Pool;
use super::queue::{drain_async, process_vring, QueueCtx, QueueState};

type Mem = GuestMemoryAtomic<GuestMemory>;

/// The backend of one vhost-user connection. A new one is made for every
/// connection, so nothing a previous VMM negotiated leaks into the next.
pub struct BlkBackend {
    dev: Arc<BlkDevice>,
    /// The worker pool (`workers` mode).
    pool: Option<Pool>,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    /// The frontend acked VHOST_F_LOG_ALL: a live migration is running, and
    /// a queue it stops may be the last before the destination takes over.
    migrating: AtomicBool,
    /// The connection is ending: queues take no new requests.
    stopping: AtomicBool,
    /// One per queue; only that queue's vring thread (and stop_vring and
    /// the end of the connection, to drain it) ever locks it.
    queues: Vec<Mutex<QueueState>>,
    exit_events: Mutex<Vec<(EventNotifier, RawFd)>>,
    /// SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE.
    state: super::state::Transfer,
    /// The frontend's inflight region (SET_INFLIGHT_FD), if it sent one.
    inflight: RwLock<Option<InflightRegion>>,
    /// The guest memory regions, watched for truncation by the VMM. Last:
    /// it keeps regions mapped until the rest is gone.
    guest: Arc<GuestFaults>,
}

impl BlkBackend {
    pub fn new(dev: Arc<BlkDevice>, mem: Mem) -> io::Result<Arc<Self>> {
        let opts = dev.options();
        let queues = (0..opts.queues)
            .map(|queue| {
                Mutex::new(QueueState {
                    ws: Workspace::new(opts.queue_size),
                    aio: async_queue(&dev, queue),
                    vring: None,
                })
            })
            .collect();
        let guest = Arc::new(GuestFaults::new());
        let pool = match opts.crypto {
            CryptoMode::Inline => None,
            CryptoMode::Workers => Some(Pool::new(&dev, &guest)?),
        };
        Ok(Arc::new(BlkBackend {
            dev,
            pool,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            migrating: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            queues,
            exit_events: Mutex::new(Vec::new()),
            inflight: RwLock::new(None),
            guest,
            state: Default::default(),
        }))
    }

    /// The connection this backend serves, closed if the VMM truncates
    /// guest memory under a copy.
    pub fn attach_connection(&self, connection: Option<vhost_user_backend::ShutdownHandle>) {
        self.guest.attach(connection);
    }

    /// Tells every vring thread to finish its current batch and exit.
    pub fn signal_exit(&self) {
        for (notifier, _) in lock(&self.exit_events).iter() {
            let _ = notifier.notify();
        }
    }

    /// Has each vring thread's epoll wait on its queue's completion eventfd
    /// beside the kick fd. Call once the daemon has made the threads.
    pub fn register_completion_fds(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>],
    ) -> io::Result<()> {
        for (queue, handler) in self.queues.iter().zip(handlers) {
            if let Some(aio) = &lock(queue).aio {
                handler.register_listener(aio.event_fd(), EventSet::IN, self.completion_event())?;
            }
        }
        Ok(())
    }

    /// The epoll token of completion events: the values up to the number
    /// of queues are the crate's (kicks and its exit event).
    fn completion_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    fn tracker(&self, queue: usize) -> Option<Arc<InflightQueue>> {
        self.inflight
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|region| region.queue(queue))
    }

    /// Ends the connection's I/O (disconnect, SIGTERM): queues stop taking
    /// requests, and every request at the disk completes. This must happen
    /// before the vring threads exit: the kernel cancels a thread's
    /// io_uring operations when the thread exits. Guest memory stays mapped
    /// until then, as each request holds its memory map.
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.dev.set_frontend_channel(None);
        self.finish_in_flight();
    }

    fn finish_in_flight(&self) {
        for (index, queue) in self.queues.iter().enumerate() {
            if let Err(e) = drain_async(
                &self.dev,
                index,
                &self.guest,
                self.tracker(index).as_deref(),
                &mut lock(queue),
            ) {
                log::error!("queue {index}: cannot finish the requests in flight: {e}");
            }
        }
    }

    /// vhost-user-backend 0.24 never closes the exit-event consumer fds it
    /// registers (one per vring thread per connection, piling up in
    /// /proc/PID/fd across reconnects); close them once the connection's threads are gone.
    pub fn close_exit_fds(&self) {
        for (_, fd) in lock(&self.exit_events).drain(..) {
            // SAFETY: the fd came from into_raw_fd() inside the crate and
            // nothing uses it after the vring threads have been joined.
            unsafe { libc::close(fd) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.dev.options().queues
    }

    fn max_queue_size(&self) -> usize {
        self.dev.options().queue_size as usize
    }

    fn features(&self) -> u64 {
        virtio_features(self.dev.options())
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features(self.dev.options())
    }

    fn acked_features(&self, features: u64) {
        self.dev.stats().set_features(features);
        let logging = features & (1 << VHOST_F_LOG_ALL) != 0;
        if self.migrating.swap(logging, Ordering::AcqRel) != logging {
            log::info!(
                "dirty-page logging {} (live migration)",
                if logging { "on" } else { "off" }
            );
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn set_device_state_fd(
        &self,
        direction: vhost::vhost_user::message::VhostTransferStateDirection,
        phase: vhost::vhost_user::message::VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.state.start(&self.dev, direction, phase, file)?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        self.state.check()
    }

    /// SET_BACKEND_REQ_FD: the channel `resize` tells the VMM through.
    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        self.dev.set_frontend_channel(Some(backend));
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_window(&self.dev.config_space(), offset, size)
    }

    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let opts = self.dev.options();
        InflightRegion::create(asked, opts.queues, opts.queue_size).map_err(|e| {
            log::error!("GET_INFLIGHT_FD: {e}");
            io::Error::other(e)
        })
    }

    fn set_inflight_fd(&self, info: &VhostUserInflight, file: File) -> io::Result<()> {
        let opts = self.dev.options();
        let region =
            InflightRegion::open(info, file, opts.queues, opts.queue_size).map_err(|e| {
                log::error!("SET_INFLIGHT_FD: {e}");
                io::Error::other(e)
            })?;
        log::debug!(
            "tracking in-flight requests of {} queues of {} entries",
            info.num_queues,
            info.queue_size
        );
        *self.inflight.write().unwrap_or_else(|p| p.into_inner()) = Some(region);
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.guest.update(&mem.memory());
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    /// One thread per queue: bit i of entry i.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::CLOEXEC).ok()?;
        let keep = notifier.try_clone().ok()?;
        lock(&self.exit_events).push((keep, consumer.as_raw_fd()));
        Some((consumer, notifier))
    }

    /// GET_VRING_BASE: the ring is already marked not ready; wait until the
    /// queue's thread has finished (and completed) the batch it is in, so
    /// the reported base never includes a request we have not answered.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let index = queue_index as usize;
        if let Some(queue) = self.queues.get(index) {
            drain_async(
                &self.dev,
                index,
                &self.guest,
                self.tracker(index).as_deref(),
                &mut lock(queue),
            )?;
        }
        if let Some(pool) = &self.pool {
            pool.wait_idle(queue_index as usize);
        }
        // A migration source stopping its device: what this queue completed
        // is durable and the image free for the destination once the last
        // queue stops (volume/lock.rs). A queue still running takes the
        // image back with its next request.
        if self.migrating.load(Ordering::Acquire) {
            if let Err(e) = self.dev.volume().hand_over() {
                log::error!("queue {queue_index}: {e}");
                return Err(io::Error::other(e));
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // A kick names the thread's vring (one per thread); a completion
        // event comes from the queue's own executor. An NBD socket may also
        // report a hang-up or an error: the store reads it and fails what
        // was in flight.
        let completion = u64::from(device_event) == self.completion_event();
        let expected = if completion {
            EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP
        } else {
            EventSet::IN
        };
        if evset.is_empty() || !expected.contains(evset) {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let index = if completion { 0 } else { device_event as usize };
        let (Some(vring), Some(queue)) = (vrings.get(index), self.queues.get(thread_id)) else {
            return Err(io::Error::other(format!(
                "event for unknown queue {device_event}"
            )));
        };
        let mut qs = lock(queue);
        if let Some(aio) = qs.aio.as_ref().filter(|_| completion) {
            aio.clear_event();
        }
        let mem = || {
            self.mem
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .memory()
                .into_inner()
        };
        let ctx = QueueCtx {
            dev: &self.dev,
            pool: self.pool.as_ref(),
            queue: thread_id,
            event_idx: self.event_idx.load(Ordering::Acquire),
            // Guest memory the VMM truncated: no new request (the
            // connection is being closed).
            stopping: self.stopping.load(Ordering::SeqCst) || self.guest.broken(),
            inflight: self.tracker(thread_id),
            guest: &self.guest,
        };
        let result = process_vring(&ctx, vring, &mem, &mut qs);
        // A fault outside any request (the rings) ends the connection too.
        self.guest.broken();
        result
    }
}

/// The queue's asynchronous executor, when image I/O bypasses the mapping
/// and the kernel allows io_uring; otherwise the synchronous path, with one
/// warning per process.
fn async_queue(dev: &BlkDevice, queue: usize) -> Option<AsyncQueue> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let opts = dev.options();
    if opts.aio != AioMode::IoUring || dev.volume().mapped() {
        return None;
    }
    match AsyncQueue::new(dev.volume(), opts.queue_size, queue) {
        Ok(aio) => aio,
        Err(e) if dev.volume().nbd().is_some() => {
            log::warn!("queue {queue}: no asynchronous NBD connection ({e}): served synchronously");
            None
        }
        Err(e) if dev.volume().rbd().is_some() => {
            log::warn!("queue {queue}: no asynchronous RBD store ({e}): served synchronously");
            None
        }
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "io_uring is not available ({e}): serving one request at a time per queue \
                     (as --aio sync); check /proc/sys/kernel/io_uring_disabled and the \
                     container's seccomp profile"
                );
            }
            None
        }
    }
}
