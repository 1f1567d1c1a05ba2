//! The `workers` crypto placement: vring threads parse chains and hand them
//! to a bounded pool of threads that decrypt/encrypt, do the I/O and
//! complete the request. Large reads and writes are cut into sector-aligned
//! parts that several workers run in parallel.
//!
//! Bounds (Broz: never unbounded memory, never deadlock): each queue owns a
//! fixed set of request slots. A vring thread that finds none free waits for
//! one (backpressure on the guest); workers never wait on vring threads, so
//! a slot always comes back. Slots and their segment vectors are reused:
//! no allocation per request once warm.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{GuestMemory, Vring};
use crossbeam_channel::{Receiver, Sender};
use vm_memory::GuestAddress;

use super::blk::{BlkDevice, Workspace};
use super::completion::{self, Finished, Outcome};
use super::guest_faults::GuestFaults;
use super::inflight::InflightQueue;
use super::stats::Ticket;
use crate::virtio::{sub_segments, Request, Segment};

/// Requests one queue may have in the pool at once.
pub const SLOTS_PER_QUEUE: usize = 128;

/// One accepted request on its way through the pool.
#[derive(Default)]
struct Slot {
    queue: usize,
    head: u16,
    status: GuestAddress,
    request: Option<Request>,
    segments: Vec<Segment>,
    vring: Option<Vring>,
    mem: Option<Arc<GuestMemory>>,
    inflight: Option<Arc<InflightQueue>>,
    parts: usize,
    parts_left: AtomicUsize,
    /// The errno of the first part that failed (0: none did).
    errno: AtomicI32,
    written: AtomicU32,
    ticket: Option<Ticket>,
}

/// A valid request from queue `queue`, whose status byte goes to `status`.
pub struct Accepted {
    pub queue: usize,
    pub head: u16,
    pub status: GuestAddress,
    pub request: Request,
    /// Where the queue tracks in-flight chains, if the frontend asked for it.
    pub inflight: Option<Arc<InflightQueue>>,
    pub ticket: Ticket,
}

struct Job {
    slot: Arc<Slot>,
    part: usize,
}

/// A queue's free slots.
struct Slots {
    free: Mutex<Vec<Arc<Slot>>>,
    returned: Condvar,
}

impl Slots {
    fn new() -> Self {
        Slots {
            free: Mutex::new(
                (0..SLOTS_PER_QUEUE)
                    .map(|_| Arc::new(Slot::default()))
                    .collect(),
            ),
            returned: Condvar::new(),
        }
    }

    /// Waits for a free slot and returns it unshared.
    fn take(&self) -> Arc<Slot> {
        let mut free = lock(&self.free);
        let mut slot = loop {
            match free.pop() {
                Some(s) => break s,
                None => free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner()),
            }
        };
        drop(free);
        // A worker that finished an earlier part may still be dropping its
        // reference: that takes nanoseconds.
        while Arc::get_mut(&mut slot).is_none() {
            std::thread::yield_now();
        }
        slot
    }

    fn put(&self, slot: Arc<Slot>) {
        lock(&self.free).push(slot);
        self.returned.notify_all();
    }

    /// Waits until every slot of the queue is back (nothing in flight).
    fn wait_idle(&self) {
        let mut free = lock(&self.free);
        while free.len() < SLOTS_PER_QUEUE {
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Pool {
    tx: Option<Sender<Job>>,
    slots: Arc<[Slots]>,
    threads: Vec<JoinHandle<()>>,
    workers: usize,
    split_threshold: u64,
}

impl Pool {
    /// Workers for `dev`, serving a connection whose guest memory is `guest`.
    pub fn new(dev: &Arc<BlkDevice>, guest: &Arc<GuestFaults>) -> std::io::Result<Pool> {
        let opts = dev.options();
        let slots: Arc<[Slots]> = (0..opts.queues).map(|_| Slots::new()).collect();
        // Every slot can be split into at most `workers` parts, so the
        // channel never blocks a vring thread.
        let (tx, rx) = crossbeam_channel::bounded(opts.queues * SLOTS_PER_QUEUE * opts.workers);
        let threads = (0..opts.workers)
            .map(|i| {
                let (dev, rx, slots) = (dev.clone(), rx.clone(), slots.clone());
                let guest = guest.clone();
                std::thread::Builder::new()
                    .name(format!("crypt-worker-{i}"))
                    .spawn(move || worker(&dev, &guest, &rx, &slots))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pool {
            tx: Some(tx),
            slots,
            threads,
            workers: opts.workers,
            split_threshold: opts.split_threshold as u64,
        })
    }

    /// Hands a parsed, valid request to the workers. Blocks while the
    /// queue has no free slot.
    pub fn submit(
        &self,
        vring: &Vring,
        mem: &Arc<GuestMemory>,
        accepted: Accepted,
        segments: &[Segment],
    ) {
        let Accepted {
            queue,
            head,
            status,
            request,
            inflight,
            ticket,
        } = accepted;
        let mut slot = self.slots[queue].take();
        let parts = self.parts_for(&request);
        {
            let s = Arc::get_mut(&mut slot).expect("take() returns unshared slots");
            s.queue = queue;
            s.head = head;
            s.status = status;
            s.request = Some(request);
            s.segments.clear();
            s.segments.extend_from_slice(segments);
            s.vring = Some(vring.clone());
            s.mem = Some(mem.clone());
            s.inflight = inflight;
            s.ticket = Some(ticket);
            s.parts = parts;
            *s.parts_left.get_mut() = parts;
            *s.errno.get_mut() = 0;
            *s.written.get_mut() = 0;
        }
        let tx = self.tx.as_ref().expect("pool is running");
        for part in 0..parts {
            let job = Job {
                slot: slot.clone(),
                part,
            };
            // The channel holds every part of every slot; it cannot be full.
            if tx.send(job).is_err() {
                log::error!("crypto workers are gone; request {head} dropped");
            }
        }
    }

    fn parts_for(&self, request: &Request) -> usize {
        match request {
            Request::Read { len, .. } | Request::Write { len, .. }
                if *len >= self.split_threshold =>
            {
                (len.div_ceil(self.split_threshold) as usize).clamp(1, self.workers)
            }
            _ => 1,
        }
    }

    /// stop_vring: wait until the queue has nothing in the pool.
    pub fn wait_idle(&self, queue: usize) {
        if let Some(s) = self.slots.get(queue) {
            s.wait_idle();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(dev: &BlkDevice, guest: &GuestFaults, rx: &Receiver<Job>, slots: &[Slots]) {
    let mut ws = Workspace::new(dev.options().queue_size);
    for job in rx.iter() {
        run_part(dev, &job, &mut ws);
        let slot = job.slot;
        if slot.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            finish_slot(dev, guest, &slot);
            let queue = slot.queue;
            slots[queue].put(slot);
        }
    }
}

fn run_part(dev: &BlkDevice, job: &Job, ws: &mut Workspace) {
    let slot = &job.slot;
    let (Some(request), Some(mem)) = (slot.request, slot.mem.as_deref()) else {
        return;
    };
    let block = dev.volume().sector_size() as u64;
    let request = part_of(
        request,
        job.part,
        slot.parts,
        block,
        &slot.segments,
        &mut ws.segments,
    );
    match dev.execute(mem, request, ws) {
        Ok(n) => {
            slot.written.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let _ = slot
                .errno
                .compare_exchange(0, errno, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Part `index` of `parts` of a request: a sector-aligned byte range and the
/// guest segments that hold it (written into `out`).
fn part_of(
    request: Request,
    index: usize,
    parts: usize,
    block: u64,
    segments: &[Segment],
    out: &mut Vec<Segment>,
) -> Request {
    out.clear();
    let (pos, len, rebuild): (u64, u64, fn(u64, u64) -> Request) = match request {
        Request::Read { pos, len } => (pos, len, |pos, len| Request::Read { pos, len }),
        Request::Write { pos, len } => (pos, len, |pos, len| Request::Write { pos, len }),
        other => {
            out.extend_from_slice(segments);
            return other;
        }
    };
    let chunk = len.div_ceil(parts as u64).div_ceil(block) * block;
    let start = (chunk * index as u64).min(len);
    let end = (start + chunk).min(len);
    sub_segments(segments, start, end - start, out);
    rebuild(pos + start, end - start)
}

fn finish_slot(dev: &BlkDevice, guest: &GuestFaults, slot: &Slot) {
    let (Some(vring), Some(mem), Some(request), Some(ticket)) = (
        slot.vring.as_ref(),
        slot.mem.as_deref(),
        slot.request,
        slot.ticket,
    ) else {
        return;
    };
    let outcome = match slot.errno.load(Ordering::Relaxed) {
        0 => Outcome::Done(slot.written.load(Ordering::Relaxed)),
        errno => {
            let e = std::io::Error::from_raw_os_error(errno);
            Outcome::Failed(std::io::Error::new(e.kind(), format!("{request:?}: {e}")))
        }
    };
    let done = Finished {
        head: slot.head,
        status_at: Some(slot.status),
        outcome,
        ticket,
    };
    let tracker = slot.inflight.as_deref();
    let stats = dev.stats().queue(slot.queue);
    if let Err(e) = completion::finish(vring, tracker, stats, guest, mem, done)
        .and_then(|()| completion::notify_guest(vring))
    {
        log::warn!("cannot complete request {}: {e}", slot.head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn parts_cover_the_request_exactly_on_sector_boundaries() {
        let segs = [seg(0x1000, 1000), seg(0x10000, 3096), seg(0x20000, 4096)];
        let req = Request::Read {
            pos: 8192,
            len: 8192,
        };
        let mut covered = 0;
        let mut out = Vec::new();
        for i in 0..3 {
            let r = part_of(req, i, 3, 512, &segs, &mut out);
            let Request::Read { pos, len } = r else {
                panic!()
            };
            assert_eq!(pos, 8192 + covered);
            assert_eq!(len % 512, 0);
            assert_eq!(out.iter().map(|s| u64::from(s.len)).sum::<u64>(), len);
            covered += len;
        }
        assert_eq!(covered, 8192);
        out.clear();
        sub_segments(&segs, 1500, 3000, &mut out);
        assert_eq!(out, vec![seg(0x10000 + 500, 2596), seg(0x20000, 404)]);
    }
}
