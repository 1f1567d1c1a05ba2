//! One virtqueue's loop: pop chains, parse, then run each request inline
//! (on this vring thread) or hand it to the worker pool. After a daemon
//! restart, the chains the previous process left in flight run first.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::blk::{BlkDevice, Workspace};
use super::inflight::InflightQueue;
use super::pool::{Accepted, Pool};
use super::ratelimit::RateLimited;
use crate::virtio::{chain_at, parse, Parsed, Request, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub static GUEST_ERRORS: RateLimited = RateLimited::new(10);
pub static IO_ERRORS: RateLimited = RateLimited::new(10);

/// What one vring thread needs to serve its queue.
pub struct QueueCtx<'a> {
    pub dev: &'a BlkDevice,
    pub pool: Option<&'a Pool>,
    pub queue: usize,
    pub event_idx: bool,
    /// Where this queue tracks in-flight chains (SET_INFLIGHT_FD), if anywhere.
    pub inflight: Option<Arc<InflightQueue>>,
}

/// The guest memory map as of now (the frontend may add regions at any time).
pub type MemNow<'a> = &'a dyn Fn() -> Arc<GuestMemoryMmap>;

/// Drains the available ring. With EVENT_IDX the guest is only kicked for
/// new work after notifications are re-enabled, so loop until it stays empty.
pub fn process_vring(
    ctx: &QueueCtx<'_>,
    vring: &VringRwLock,
    mem: MemNow<'_>,
    ws: &mut Workspace,
) -> io::Result<()> {
    if let Some(tracker) = ctx.inflight.as_deref().filter(|t| t.claim_recovery()) {
        resubmit(ctx, tracker, vring, mem, ws)?;
    }
    loop {
        if ctx.event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        let ring_ok = drain(ctx, vring, mem, ws)?;
        // A broken avail ring always looks like "more work" to
        // enable_notification: looping on it would spin this thread forever
        // (and make GET_VRING_BASE wait forever). Wait for the next kick.
        if !ring_ok || !ctx.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
            return Ok(());
        }
    }
}

/// Checks what `pop_descriptor_chain` would refuse: a queue that is not
/// ready, an avail ring outside guest memory, or an avail index more than a
/// ring ahead of ours. virtio-queue logs each of those at error level on
/// every pop, so a hostile guest kicking in a loop could flood the host's
/// log; here it is one rate-limited warning instead.
fn avail_ring_usable(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
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

/// Pops and serves chains until the ring is empty. Returns false if it
/// stopped on a broken avail ring.
fn drain(
    ctx: &QueueCtx<'_>,
    vring: &VringRwLock,
    mem_now: MemNow<'_>,
    ws: &mut Workspace,
) -> io::Result<bool> {
    let mut completed = false;
    let mut ring_ok = true;
    loop {
        let ring_mem = mem_now();
        let chain = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            if !avail_ring_usable(queue, &ring_mem) {
                ring_ok = false;
                break;
            }
            queue.pop_descriptor_chain(&*ring_mem)
        };
        let Some(chain) = chain else { break };
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
        completed |= serve(ctx, vring, mem, ws, head, chain)?;
    }
    if completed {
        notify_guest(vring)?;
    }
    Ok(ring_ok)
}

/// Runs again what the previous daemon process popped but never completed
/// (see inflight.rs), oldest first, and moves the avail index past every
/// chain that process popped.
fn resubmit(
    ctx: &QueueCtx<'_>,
    tracker: &InflightQueue,
    vring: &VringRwLock,
    mem_now: MemNow<'_>,
    ws: &mut Workspace,
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
    let mut completed = false;
    for head in recovery.heads {
        let mem = &mem_now();
        completed |= serve(
            ctx,
            vring,
            mem,
            ws,
            head,
            chain_at(&**mem, table, size, head),
        )?;
    }
    if completed {
        notify_guest(vring)?;
    }
    Ok(())
}

/// Parses one chain and runs it, in the pool or here. Returns whether it
/// was completed here (the caller interrupts the guest once per batch).
fn serve(
    ctx: &QueueCtx<'_>,
    vring: &VringRwLock,
    mem: &Arc<GuestMemoryMmap>,
    ws: &mut Workspace,
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
) -> io::Result<bool> {
    let parsed = parse(&**mem, head, descs, ctx.dev.limits(), &mut ws.segments);
    match (to_pool(ctx, &parsed), parsed.status) {
        (Some((pool, request)), Some(status)) => {
            let accepted = Accepted {
                queue: ctx.queue,
                head,
                status,
                request,
                inflight: ctx.inflight.clone(),
            };
            pool.submit(vring, mem, accepted, &ws.segments);
            Ok(false)
        }
        _ => {
            let used = complete(ctx.dev, &**mem, parsed, ws);
            put_used(vring, ctx.inflight.as_deref(), head, used)?;
            Ok(true)
        }
    }
}

/// The placement decision: with a pool (`--crypto workers`) every valid
/// request goes to it; errors are answered here, without a hand-off.
fn to_pool<'a>(ctx: &QueueCtx<'a>, parsed: &Parsed) -> Option<(&'a Pool, Request)> {
    Some((ctx.pool?, *parsed.request.as_ref().ok()?))
}

/// Returns a chain to the guest from any thread and interrupts it if the
/// event-index rules say so.
pub fn finish_chain(
    vring: &VringRwLock,
    tracker: Option<&InflightQueue>,
    head: u16,
    used: u32,
) -> io::Result<()> {
    put_used(vring, tracker, head, used)?;
    notify_guest(vring)
}

/// Puts a chain in the used ring. With inflight tracking its mark is
/// cleared around the used-ring update in the order inflight.rs relies on,
/// all under the vring lock so that completions from several threads
/// cannot interleave their steps.
fn put_used(
    vring: &VringRwLock,
    tracker: Option<&InflightQueue>,
    head: u16,
    used: u32,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    let Some(tracker) = tracker else {
        return state.add_used(head, used).map_err(io::Error::other);
    };
    tracker.before_used(head);
    state.add_used(head, used).map_err(io::Error::other)?;
    tracker.after_used(head, state.get_queue().next_used());
    Ok(())
}

fn notify_guest(vring: &VringRwLock) -> io::Result<()> {
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Executes a parsed chain on this thread and writes its status byte.
/// Returns the used length: bytes written into guest memory, status included.
pub fn complete<M: GuestMemoryBackend>(
    dev: &BlkDevice,
    mem: &M,
    parsed: Parsed,
    ws: &mut Workspace,
) -> u32 {
    let Some(status_addr) = parsed.status else {
        GUEST_ERRORS.warn(format_args!(
            "guest request (head {}) has no usable status descriptor: {:?}",
            parsed.head, parsed.request
        ));
        return 0;
    };
    let (status, written) = match parsed.request {
        Err(e) => {
            GUEST_ERRORS.warn(format_args!("refused guest request: {e}"));
            (e.status(), 0)
        }
        Ok(request) => match dev.execute(mem, request, ws) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                IO_ERRORS.warn(format_args!("I/O error on {request:?}: {e}"));
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        },
    };
    if mem.write_obj(status, status_addr).is_err() {
        return 0;
    }
    written + 1
}
