//! The one way out for every request, however it was executed (inline on
//! the vring thread, by the worker pool, or asynchronously through the
//! store): the status byte, the used ring with its in-flight region marks,
//! and the guest interrupt under the EVENT_IDX rules. Errors are logged
//! here too, rate-limited, so a guest cannot flood the host's log.

use super::Vring;
use std::io;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::guest_faults::GuestFaults;
use super::inflight::InflightQueue;
use super::ratelimit::RateLimited;
use super::stats::{QueueStats, Ticket};
use crate::virtio::{RequestError, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub static GUEST_ERRORS: RateLimited = RateLimited::new(10);
pub static IO_ERRORS: RateLimited = RateLimited::new(10);

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// Done; this many bytes were written into guest memory (the status
    /// byte not included).
    Done(u32),
    /// Refused before any I/O: the guest's request was invalid.
    Refused(RequestError),
    /// The image (disk, filesystem, server) failed the I/O.
    Failed(io::Error),
}

impl Outcome {
    fn status(&self) -> u8 {
        match self {
            Outcome::Done(_) => VIRTIO_BLK_S_OK as u8,
            Outcome::Refused(e) => e.status(),
            Outcome::Failed(_) => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request ready to leave: its chain head, where its status byte goes
/// (None when the status descriptor itself was unusable), its outcome, and
/// what the statistics need (kind, size, when it was popped).
#[derive(Debug)]
pub struct Finished {
    pub head: u16,
    pub status_at: Option<GuestAddress>,
    pub outcome: Outcome,
    pub ticket: Ticket,
}

/// Counts the request in `stats`, writes the status byte (logging
/// failures) and returns the used length: bytes written into guest memory,
/// status included; 0 if no status could be written. Nothing succeeds once
/// the VMM truncated guest memory under a copy (`guest`).
pub fn write_status<M: GuestMemoryBackend>(
    mem: &M,
    stats: &QueueStats,
    guest: &GuestFaults,
    done: Finished,
) -> u32 {
    let Finished {
        head,
        status_at,
        mut outcome,
        ticket,
    } = done;
    if matches!(outcome, Outcome::Done(_)) && guest.broken() {
        outcome = Outcome::Failed(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the VMM truncated guest memory under this request",
        ));
    }
    stats.record(&ticket, &outcome);
    match &outcome {
        Outcome::Done(_) => {}
        Outcome::Refused(e) => GUEST_ERRORS.warn(format_args!("refused guest request: {e}")),
        Outcome::Failed(e) => {
            IO_ERRORS.warn(format_args!("I/O error on request (head {head}): {e}"))
        }
    }
    let Some(at) = status_at else {
        GUEST_ERRORS.warn(format_args!(
            "guest request (head {head}) has no usable status descriptor: {outcome:?}"
        ));
        return 0;
    };
    if mem.write_obj(outcome.status(), at).is_err() {
        return 0;
    }
    match outcome {
        Outcome::Done(written) => written + 1,
        _ => 1,
    }
}

/// Writes the status and puts the chain in the used ring. The caller
/// interrupts the guest once per batch (`notify_guest`).
pub fn finish<M: GuestMemoryBackend>(
    vring: &Vring,
    tracker: Option<&InflightQueue>,
    stats: &QueueStats,
    guest: &GuestFaults,
    mem: &M,
    done: Finished,
) -> io::Result<()> {
    let head = done.head;
    let used = write_status(mem, stats, guest, done);
    put_used(vring, tracker, head, used)
}

/// Puts a chain in the used ring. With inflight tracking its mark is
/// cleared around the used-ring update in the order inflight.rs relies on,
/// all under the vring lock so that completions from several threads
/// cannot interleave their steps.
pub fn put_used(
    vring: &Vring,
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

/// Interrupts the guest if the event-index rules say it wants to know.
pub fn notify_guest(vring: &Vring) -> io::Result<()> {
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}
