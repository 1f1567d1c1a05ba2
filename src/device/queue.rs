//! One virtqueue's loop: pop chains, parse, then run each request inline
//! (on this vring thread) or hand it to the worker pool.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::blk::{BlkDevice, Workspace};
use super::config_space::CryptoMode;
use super::pool::{Accepted, Pool};
use super::ratelimit::RateLimited;
use crate::virtio::{parse, Parsed, Request, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub static GUEST_ERRORS: RateLimited = RateLimited::new(10);
pub static IO_ERRORS: RateLimited = RateLimited::new(10);

/// What one vring thread needs to serve its queue.
pub struct QueueCtx<'a> {
    pub dev: &'a BlkDevice,
    pub pool: Option<&'a Pool>,
    pub queue: usize,
    pub event_idx: bool,
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
        let parsed = parse(&**mem, head, chain, ctx.dev.limits(), &mut ws.segments);
        match (to_pool(ctx, &parsed), parsed.status) {
            (Some((pool, request)), Some(status)) => pool.submit(
                vring,
                mem,
                Accepted {
                    queue: ctx.queue,
                    head,
                    status,
                    request,
                },
                &ws.segments,
            ),
            _ => {
                let used = complete(ctx.dev, &**mem, parsed, ws);
                vring.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
        }
    }
    if completed && vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(ring_ok)
}

/// The placement decision: valid requests go to the pool in `workers`
/// mode; in `auto` only those the pool would split across workers do.
fn to_pool<'a>(ctx: &QueueCtx<'a>, parsed: &Parsed) -> Option<(&'a Pool, Request)> {
    let pool = ctx.pool?;
    let request = *parsed.request.as_ref().ok()?;
    match ctx.dev.options().crypto {
        CryptoMode::Inline => None,
        CryptoMode::Workers => Some((pool, request)),
        CryptoMode::Auto => pool.wants(&request).then_some((pool, request)),
    }
}

/// Returns a chain to the guest from any thread and interrupts it if the
/// event-index rules say so.
pub fn finish_chain(vring: &VringRwLock, head: u16, used: u32) -> io::Result<()> {
    vring.add_used(head, used).map_err(io::Error::other)?;
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
