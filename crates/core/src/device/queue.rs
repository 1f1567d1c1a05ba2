//! One virtqueue's loop: pop chains, parse, then run each request where it
//! belongs: inline on this vring thread, asynchronously through the store
//! (io_uring), or in the worker pool. Every request leaves through
//! `completion`. After a daemon restart, the chains the previous process
//! left in flight run first.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{GuestMemory, Vring};
use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::aio::{AsyncQueue, Done};
use super::blk::{BlkDevice, Workspace};
use super::completion::{self, Finished, Outcome, GUEST_ERRORS};
use super::guest_faults::{GuestFaults, UNWATCHED};
use super::inflight::InflightQueue;
use super::pool::{Accepted, Pool};
use super::stats::{QueueStats, Ticket};
use crate::virtio::{chain_at, parse, Parsed, Request};
use crate::volume::Volume;

/// Everything one queue owns. Its vring thread locks it for each event;
/// `stop_vring` and the end of a connection lock it to drain the queue.
pub struct QueueState {
    pub ws: Workspace,
    /// The asynchronous executor (io_uring), unless the volume is mapped,
    /// `--aio sync` was asked for, or the kernel has no io_uring.
    pub aio: Option<AsyncQueue>,
    /// The vring this queue's thread serves, kept to complete requests
    /// outside its events (draining).
    pub vring: Option<Vring>,
}

/// What one vring thread needs to serve its queue.
pub struct QueueCtx<'a> {
    pub dev: &'a BlkDevice,
    pub pool: Option<&'a Pool>,
    pub queue: usize,
    pub event_idx: bool,
    /// The connection is ending: complete what is in flight, pop nothing.
    pub stopping: bool,
    /// Where this queue tracks in-flight chains (SET_INFLIGHT_FD), if anywhere.
    pub inflight: Option<Arc<InflightQueue>>,
    /// The connection's guest memory: once the VMM truncated it under a
    /// copy, nothing succeeds.
    pub guest: &'a GuestFaults,
}

impl QueueCtx<'_> {
    fn stats(&self) -> &QueueStats {
        self.dev.stats().queue(self.queue)
    }
}

/// The guest memory map as of now (the frontend may add regions at any time).
pub type MemNow<'a> = &'a dyn Fn() -> Arc<GuestMemory>;

/// Why popping stopped.
#[derive(PartialEq, Eq)]
enum Stop {
    /// The avail ring is empty.
    Empty,
    /// The avail ring is broken: wait for the next kick.
    Broken,
    /// The asynchronous executor is full: its completions resume the queue.
    Full,
}

/// Serves the queue after a kick or a completion event: takes completed
/// I/O, pops and starts new requests until the ring is empty or the queue
/// is full, and interrupts the guest once if anything completed. With
/// EVENT_IDX the guest only kicks again after notifications are
/// re-enabled, so loop until the ring stays empty.
pub fn process_vring(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    mem: MemNow<'_>,
    qs: &mut QueueState,
) -> io::Result<()> {
    qs.vring.get_or_insert_with(|| vring.clone());
    let mut completed = false;
    progress(ctx, vring, qs, &mut completed)?;
    if ctx.stopping {
        return notify_if(completed, vring);
    }
    if let Some(tracker) = ctx.inflight.as_deref().filter(|t| t.claim_recovery()) {
        resubmit(ctx, tracker, vring, mem, qs, &mut completed)?;
    }
    loop {
        if ctx.event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        let stop = drain(ctx, vring, mem, qs, &mut completed)?;
        progress(ctx, vring, qs, &mut completed)?;
        // Tell the guest about this round's completions now: while it keeps
        // posting, this loop may go on for a while.
        notify_if(std::mem::take(&mut completed), vring)?;
        let again = match stop {
            // A broken avail ring always looks like "more work" to
            // enable_notification: looping on it would spin this thread
            // forever (and make GET_VRING_BASE wait forever).
            Stop::Broken => false,
            // Full with requests in flight: their completion event comes
            // back here. Room already (they completed meanwhile): go on,
            // as no event may be left to wake us.
            Stop::Full => qs.aio.as_ref().is_some_and(AsyncQueue::has_room),
            Stop::Empty => {
                ctx.event_idx && vring.enable_notification().map_err(io::Error::other)?
            }
        };
        if !again {
            if stop == Stop::Empty {
                finish_lone_request(ctx, vring, qs, &mut completed)?;
            }
            break;
        }
    }
    notify_if(completed, vring)
}

fn notify_if(completed: bool, vring: &Vring) -> io::Result<()> {
    if completed {
        completion::notify_guest(vring)?;
    }
    Ok(())
}

/// Takes what the asynchronous executor finished and completes it.
fn progress(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    qs: &mut QueueState,
    completed: &mut bool,
) -> io::Result<()> {
    on_executor(ctx, vring, qs, completed, AsyncQueue::progress)
}

/// See `AsyncQueue::finish_lone_request`.
fn finish_lone_request(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    qs: &mut QueueState,
    completed: &mut bool,
) -> io::Result<()> {
    on_executor(ctx, vring, qs, completed, AsyncQueue::finish_lone_request)
}

/// Runs `step` on the queue's asynchronous executor, if it has one, with
/// the completion path for what it finishes.
fn on_executor(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    qs: &mut QueueState,
    completed: &mut bool,
    step: impl FnOnce(&mut AsyncQueue, &Volume, &mut Done<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let Some(aio) = qs.aio.as_mut() else {
        return Ok(());
    };
    let tracker = ctx.inflight.as_deref();
    step(
        aio,
        ctx.dev.volume(),
        &mut completer(vring, tracker, ctx.stats(), ctx.guest, completed),
    )
}

/// The completion path for what the asynchronous executor finished; notes
/// that the guest is to be interrupted.
fn completer<'a>(
    vring: &'a Vring,
    tracker: Option<&'a InflightQueue>,
    stats: &'a QueueStats,
    guest: &'a GuestFaults,
    completed: &'a mut bool,
) -> impl FnMut(Finished, &GuestMemory) -> io::Result<()> + 'a {
    move |done, mem| {
        *completed = true;
        completion::finish(vring, tracker, stats, guest, mem, done)
    }
}

/// Completes everything the asynchronous executor has accepted, blocking
/// until the kernel is done (GET_VRING_BASE, disconnect, SIGTERM).
pub fn drain_async(
    dev: &BlkDevice,
    queue: usize,
    guest: &GuestFaults,
    tracker: Option<&InflightQueue>,
    qs: &mut QueueState,
) -> io::Result<()> {
    let (Some(aio), Some(vring)) = (qs.aio.as_mut(), qs.vring.as_ref()) else {
        return Ok(());
    };
    let mut completed = false;
    let stats = dev.stats().queue(queue);
    aio.drain(
        dev.volume(),
        &mut completer(vring, tracker, stats, guest, &mut completed),
    )?;
    notify_if(completed, vring)
}

/// Checks what `pop_descriptor_chain` would refuse: a queue that is not
/// ready, an avail ring outside guest memory, or an avail index more than a
/// ring ahead of ours. virtio-queue logs each of those at error level on
/// every pop, so a hostile guest kicking in a loop could flood the host's
/// log; here it is one rate-limited warning instead.
fn avail_ring_usable(queue: &Queue, mem: &GuestMemory) -> bool {
    if !queue.ready() || queue.avail_ring() == 0 {
        return false;
    }
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) if (idx - Wrapping(queue.next_avail())).0 <= queue.size() => true,
        Ok(idx) => {
            GUEST_ERRORS.warn(format_args!(
                "guest avail index {} is more than a ring ({}) ahead of {}; queue stalled",
                idx.0,
                queue.size(),
                queue.next_avail()
            ));
            false
        }
        Err(e) => {
            GUEST_ERRORS.warn(format_args!("guest avail ring unreadable: {e}"));
            false
        }
    }
}

/// Pops and serves chains until the ring is empty, broken, or the queue
/// cannot take more.
fn drain(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    mem_now: MemNow<'_>,
    qs: &mut QueueState,
    completed: &mut bool,
) -> io::Result<Stop> {
    loop {
        if qs.aio.as_ref().is_some_and(|aio| !aio.has_room()) {
            return Ok(Stop::Full);
        }
        let ring_mem = mem_now();
        let chain = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            if !avail_ring_usable(queue, &ring_mem) {
                return Ok(Stop::Broken);
            }
            queue.pop_descriptor_chain(&*ring_mem)
        };
        let Some(chain) = chain else {
            return Ok(Stop::Empty);
        };
        // The buffers may lie in a region added after `ring_mem` was taken
        // (a frontend adds a region, gets the ack, then posts a request that
        // uses it): look them up in a map taken after the pop saw the request.
        let mem = &mem_now();
        let head = chain.head_index();
        if head >= vring.get_ref().get_queue().size() {
            // Such a head cannot go back to the used ring (add_used refuses
            // it, and failing here would end this queue's thread): drop it.
            GUEST_ERRORS.warn(format_args!(
                "guest head index {head} is beyond the queue size; ignored"
            ));
            continue;
        }
        if let Some(tracker) = &ctx.inflight {
            tracker.begin(head);
        }
        let popped = Popped {
            head,
            at: ctx.stats().popped(),
        };
        dispatch_chain(ctx, vring, mem, qs, popped, chain, completed)?;
    }
}

/// Runs again what the previous daemon process popped but never completed
/// (see inflight.rs), oldest first, and moves the avail index past every
/// chain that process popped.
fn resubmit(
    ctx: &QueueCtx<'_>,
    tracker: &InflightQueue,
    vring: &Vring,
    mem_now: MemNow<'_>,
    qs: &mut QueueState,
    completed: &mut bool,
) -> io::Result<()> {
    let ring_mem = mem_now();
    let (recovery, table, size) = {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = match queue.used_idx(&*ring_mem, Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                GUEST_ERRORS.warn(format_args!(
                    "guest used ring unreadable ({e}); in-flight requests not resubmitted"
                ));
                return Ok(());
            }
        };
        let recovery = tracker.recover(used, queue.size());
        queue.set_next_avail(recovery.next_avail);
        (recovery, GuestAddress(queue.desc_table()), queue.size())
    };
    if recovery.heads.is_empty() {
        return Ok(());
    }
    log::info!(
        "queue {}: replaying {} requests the previous daemon left in flight",
        ctx.queue,
        recovery.heads.len()
    );
    for head in recovery.heads {
        // Every replayed chain must be accepted before new ones are popped.
        if let Some(aio) = qs.aio.as_mut().filter(|aio| !aio.has_room()) {
            let tracker = ctx.inflight.as_deref();
            aio.wait_for_room(
                ctx.dev.volume(),
                &mut completer(vring, tracker, ctx.stats(), ctx.guest, completed),
            )?;
        }
        let mem = &mem_now();
        let chain = chain_at(&**mem, table, size, head);
        ctx.stats().replayed();
        let popped = Popped {
            head,
            at: ctx.stats().popped(),
        };
        dispatch_chain(ctx, vring, mem, qs, popped, chain, completed)?;
    }
    Ok(())
}

/// Where a valid request runs.
enum Placement<'a> {
    Inline,
    Async,
    Pool(&'a Pool),
}

/// With a pool (`--crypto workers`), reads and writes of at least
/// `--split-threshold` bytes go to it and are split across workers: only
/// there does a hand-off pay. Everything else stays on this thread,
/// asynchronous when the executor takes it.
fn placement<'a>(ctx: &QueueCtx<'a>, qs: &QueueState, request: &Request) -> Placement<'a> {
    let large = match request {
        Request::Read { len, .. } | Request::Write { len, .. } => {
            *len >= ctx.dev.options().split_threshold as u64
        }
        _ => false,
    };
    match ctx.pool {
        Some(pool) if large => Placement::Pool(pool),
        _ if qs.aio.is_some() && AsyncQueue::takes(ctx.dev.volume(), request) => Placement::Async,
        _ => Placement::Inline,
    }
}

/// A chain's head and, if its latency is measured, when it was popped.
struct Popped {
    head: u16,
    at: Option<Instant>,
}

/// Parses one chain and runs it where it belongs.
fn dispatch_chain(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    mem: &Arc<GuestMemory>,
    qs: &mut QueueState,
    popped: Popped,
    descs: impl Iterator<Item = Descriptor>,
    completed: &mut bool,
) -> io::Result<()> {
    let head = popped.head;
    let parsed = parse(&**mem, head, descs, &ctx.dev.limits(), &mut qs.ws.segments);
    let ticket = Ticket::new(popped.at, &parsed.request);
    let (Some(status), Ok(request)) = (parsed.status, parsed.request.clone()) else {
        return complete_here(ctx, vring, mem, qs, (parsed, popped.at), completed);
    };
    if let Err(e) = ctx.dev.volume().ensure_active() {
        let failed = Finished {
            head,
            status_at: Some(status),
            outcome: Outcome::Failed(io::Error::other(e)),
            ticket,
        };
        let used = completion::write_status(&**mem, ctx.stats(), ctx.guest, failed);
        completion::put_used(vring, ctx.inflight.as_deref(), head, used)?;
        *completed = true;
        return Ok(());
    }
    match placement(ctx, qs, &request) {
        Placement::Pool(pool) => {
            let accepted = Accepted {
                queue: ctx.queue,
                head,
                status,
                request,
                inflight: ctx.inflight.clone(),
                ticket,
            };
            pool.submit(vring, mem, accepted, &qs.ws.segments);
            Ok(())
        }
        Placement::Async => {
            let aio = qs.aio.as_mut().expect("placed on the executor");
            aio.start(
                ctx.dev.volume(),
                (head, ticket),
                status,
                request,
                &qs.ws.segments,
                mem,
            );
            Ok(())
        }
        Placement::Inline => complete_here(ctx, vring, mem, qs, (parsed, popped.at), completed),
    }
}

fn complete_here(
    ctx: &QueueCtx<'_>,
    vring: &Vring,
    mem: &Arc<GuestMemory>,
    qs: &mut QueueState,
    (parsed, popped_at): (Parsed, Option<Instant>),
    completed: &mut bool,
) -> io::Result<()> {
    let head = parsed.head;
    let (stats, guest) = (ctx.stats(), ctx.guest);
    let used = complete_in(ctx.dev, stats, guest, popped_at, &**mem, parsed, &mut qs.ws);
    completion::put_used(vring, ctx.inflight.as_deref(), head, used)?;
    *completed = true;
    Ok(())
}

/// Executes a parsed chain (popped at `popped_at`, if timed) on this
/// thread, writes its status byte and counts it in `stats`. Returns the used length: bytes
/// written into guest memory, status included. Outside any connection (the
/// fuzz targets): no guest memory is watched for truncation.
pub fn complete<M: GuestMemoryBackend>(
    dev: &BlkDevice,
    stats: &QueueStats,
    popped_at: Option<Instant>,
    mem: &M,
    parsed: Parsed,
    ws: &mut Workspace,
) -> u32 {
    complete_in(dev, stats, &UNWATCHED, popped_at, mem, parsed, ws)
}

/// `complete` for a connection whose guest memory is `guest`.
fn complete_in<M: GuestMemoryBackend>(
    dev: &BlkDevice,
    stats: &QueueStats,
    guest: &GuestFaults,
    popped_at: Option<Instant>,
    mem: &M,
    parsed: Parsed,
    ws: &mut Workspace,
) -> u32 {
    let ticket = Ticket::new(popped_at, &parsed.request);
    let outcome = match parsed.request {
        Err(e) => Outcome::Refused(e),
        Ok(request) => match dev.execute(mem, request, ws) {
            Ok(n) => Outcome::Done(n),
            Err(e) => Outcome::Failed(io::Error::new(e.kind(), format!("{request:?}: {e}"))),
        },
    };
    completion::write_status(
        mem,
        stats,
        guest,
        Finished {
            head: parsed.head,
            status_at: parsed.status,
            outcome,
            ticket,
        },
    )
}
