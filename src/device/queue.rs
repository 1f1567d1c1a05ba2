//! One virtqueue's loop: pop chains, parse, execute, complete, notify.

use std::io;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::blk::{BlkDevice, Workspace};
use super::ratelimit::RateLimited;
use crate::virtio::{parse, Parsed, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

static GUEST_ERRORS: RateLimited = RateLimited::new(10);
static IO_ERRORS: RateLimited = RateLimited::new(10);

/// Drains the available ring. With EVENT_IDX the guest is only kicked for
/// new work after notifications are re-enabled, so loop until it stays empty.
pub fn process_vring(
    dev: &BlkDevice,
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    event_idx: bool,
    ws: &mut Workspace,
) -> io::Result<()> {
    loop {
        if event_idx {
            vring.disable_notification().map_err(io::Error::other)?;
        }
        drain(dev, vring, mem, ws)?;
        if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
            return Ok(());
        }
    }
}

fn drain(
    dev: &BlkDevice,
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    ws: &mut Workspace,
) -> io::Result<()> {
    let mut completed = false;
    loop {
        let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let parsed = parse(mem, head, chain, dev.limits(), &mut ws.segments);
        let used = complete(dev, mem, parsed, ws);
        vring.add_used(head, used).map_err(io::Error::other)?;
        completed = true;
    }
    if completed && vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Executes a parsed chain and writes its status byte. Returns the used
/// length: bytes written into guest memory, status included.
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
