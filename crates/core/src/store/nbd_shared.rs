//! The one connection of an NBD server without multi-conn, driven
//! asynchronously by every queue.
//!
//! Without multi-conn the NBD spec promises nothing across connections (a
//! FLUSH on one need not cover writes acknowledged on another), and
//! qemu-nbd's default serves a single client: every queue's commands, and
//! the daemon's synchronous ones (the final FLUSH), share one connection.
//! One `Link` (the same code a queue's own connection runs: timeouts,
//! reconnecting, resending) sits behind a mutex, and whichever thread
//! holds it drives the socket: it sends its own commands, reads every
//! reply that arrived, and routes each completion to the queue that issued
//! it (a mailbox and an eventfd per queue). No thread of its own and no
//! hand-off on the way out: a queue sends its commands itself, as with a
//! connection of its own; only a reply read by another queue's thread
//! costs a wake-up.
//!
//! Every queue thread waits on the link's epoll set (nested in its own,
//! beside its mailbox's eventfd), so whoever is free reads the replies; a
//! thread that finds them taken finds its mailbox instead. A reconnect
//! resends every queue's commands at once, since they are all the link's.
//!
//! Buffers stay each queue's own: a command carries its buffer's address,
//! and a queue's store waits for its commands before its pool goes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::nbd::{add_to, address, epoll_set, poll_timeout, Link};
use super::{Buffers, Op};

/// Tags carry their issuer above this bit: 0 for a synchronous command,
/// queue + 1 for a queue's (whose own tags stay below it).
const ISSUER_SHIFT: u32 = 48;
const TAG_MASK: u64 = (1 << ISSUER_SHIFT) - 1;

/// Completions read by one thread for another queue.
struct Mailbox {
    done: Mutex<Vec<(u64, i32)>>,
    /// Readable while `done` holds something its queue has not seen.
    wake: EventFd,
}

pub(super) struct Shared {
    link: Mutex<Link>,
    mailboxes: Vec<Mailbox>,
}

impl Shared {
    /// The link shared by `queues` queues (at most 64, as `--queues`).
    pub(super) fn new(link: Link, queues: usize) -> io::Result<Self> {
        if queues > 64 {
            return Err(io::Error::other(
                "a shared NBD connection serves at most 64 queues",
            ));
        }
        let mailboxes = (0..queues)
            .map(|_| {
                Ok(Mailbox {
                    done: Mutex::new(Vec::new()),
                    wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Shared {
            link: Mutex::new(link),
            mailboxes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the completions the link holds: `me`'s (a queue) into `mine`,
    /// a synchronous command's into `sync`, every other queue's into its
    /// mailbox, whose eventfd is then written once.
    fn route(
        &self,
        link: &mut Link,
        me: Option<usize>,
        mine: &mut Vec<(u64, i32)>,
        sync: &mut Option<i32>,
    ) {
        // Which mailboxes to wake: one write each, however many replies.
        let mut woken = 0u64;
        let mailboxes = &self.mailboxes;
        link.retire(&mut |tag, result| {
            let local = tag & TAG_MASK;
            match (tag >> ISSUER_SHIFT).checked_sub(1) {
                None => *sync = Some(result),
                Some(q) if Some(q as usize) == me => mine.push((local, result)),
                Some(q) => {
                    if let Some(mailbox) = mailboxes.get(q as usize) {
                        lock(&mailbox.done).push((local, result));
                        woken |= 1 << q;
                    }
                }
            }
        });
        for (q, mailbox) in mailboxes.iter().enumerate() {
            if woken & (1 << q) != 0 {
                let _ = mailbox.wake.write(1);
            }
        }
    }

    /// Sends `op` on the data at `addr` and waits for its answer, holding
    /// the link meanwhile (queues wait to send; replies to them are routed
    /// as they come). Rare: the daemon's final FLUSH, and image I/O outside
    /// the queues.
    pub(super) fn call(&self, op: Op, addr: *mut u8) -> io::Result<()> {
        let mut link = self.lock();
        link.sync_call(Some(std::time::Instant::now()));
        let result = self.call_locked(&mut link, op, addr);
        link.sync_call(None);
        result
    }

    fn call_locked(&self, link: &mut Link, op: Op, addr: *mut u8) -> io::Result<()> {
        link.push(op, 0, addr as usize)?;
        let mut answer = None;
        loop {
            if let Err(e) = link.drive(true) {
                // The buffer is the caller's, who gets it back now.
                link.disown(|tag| tag >> ISSUER_SHIFT == 0);
                return Err(e);
            }
            self.route(link, None, &mut Vec::new(), &mut answer);
            match answer {
                Some(r) if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
                Some(_) => return Ok(()),
                None => {}
            }
        }
    }
}

#[cfg(test)]
impl Shared {
    /// Commands sent (or queued to send) on the connection, every issuer's.
    pub(super) fn commands_in_flight(&self) -> usize {
        self.lock().in_flight()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One queue's store on the shared connection: the same shape as
/// `NbdStore`.
pub struct SharedStore {
    shared: Arc<Shared>,
    queue: usize,
    /// What the vring thread waits on: an epoll set of the link's (socket
    /// and timer) and this queue's mailbox eventfd.
    events: OwnedFd,
    /// Pushed and not yet reaped.
    in_flight: usize,
    /// This queue's completions taken from the link by this thread.
    mine: Vec<(u64, i32)>,
    /// Last: freed only once no command of this queue is in flight.
    buffers: Buffers,
}

impl SharedStore {
    pub(super) fn new(shared: Arc<Shared>, queue: usize, buffers: Buffers) -> io::Result<Self> {
        if queue >= shared.mailboxes.len() {
            return Err(io::Error::other(format!(
                "queue {queue}: the shared NBD connection serves {} queues",
                shared.mailboxes.len()
            )));
        }
        let events = epoll_set()?;
        add_to(&events, shared.lock().event_fd())?;
        add_to(&events, shared.mailboxes[queue].wake.as_raw_fd())?;
        Ok(SharedStore {
            shared,
            queue,
            events,
            in_flight: 0,
            mine: Vec::new(),
            buffers,
        })
    }

    pub fn event_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    /// Pushed and not yet reaped: libnbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn mailbox(&self) -> &Mailbox {
        &self.shared.mailboxes[self.queue]
    }

    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        debug_assert!(tag <= TAG_MASK);
        let addr = address(&mut self.buffers, op);
        let issuer = (self.queue as u64 + 1) << ISSUER_SHIFT;
        self.shared.lock().push(op, issuer | tag, addr)?;
        self.in_flight += 1;
        Ok(())
    }

    /// Sends what the socket did not take yet and takes the replies that
    /// arrived meanwhile (every queue's: others go to their mailboxes);
    /// then `then` looks at the link before it is let go.
    fn drive<T>(&mut self, then: impl FnOnce(&Link) -> T) -> io::Result<T> {
        let mut link = self.shared.lock();
        link.drive(false)?;
        self.shared
            .route(&mut link, Some(self.queue), &mut self.mine, &mut None);
        Ok(then(&link))
    }

    pub fn submit(&mut self) -> io::Result<()> {
        self.drive(|_| ())
    }

    /// Completions of this queue waiting to be reaped.
    pub fn ready(&self) -> bool {
        !self.mine.is_empty() || !lock(&self.mailbox().done).is_empty()
    }

    /// Clears the mailbox's eventfd before taking completions (one routed
    /// meanwhile sets it again).
    pub fn clear_event(&self) {
        let _ = self.mailbox().wake.read();
    }

    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> io::Result<()> {
        self.drive(|_| ())?;
        self.clear_event();
        let mailbox = &self.shared.mailboxes[self.queue];
        self.mine.append(&mut lock(&mailbox.done));
        // Each pushed command is retired once; saturating all the same, so
        // that a miscount can never make `drop` wait for ever.
        self.in_flight = self.in_flight.saturating_sub(self.mine.len());
        for (tag, result) in self.mine.drain(..) {
            f(tag, result);
        }
        Ok(())
    }

    /// Blocks until at least one of this queue's commands has completed,
    /// without holding the link while it waits: the other queues go on
    /// sending, and whichever thread reads this queue's reply routes it
    /// here.
    pub fn wait(&mut self) -> io::Result<()> {
        loop {
            // A wake-up for what `reap` took already would spin the poll.
            self.clear_event();
            if self.in_flight == 0 || self.ready() {
                return Ok(());
            }
            let (link_fd, (stop_fd, stop_at)) =
                self.drive(|link| (link.event_fd(), link.stop_wait()))?;
            if self.ready() {
                return Ok(());
            }
            let timeout = poll_timeout(stop_at);
            let mut pfds = [
                link_fd,
                self.mailbox().wake.as_raw_fd(),
                stop_fd.unwrap_or(-1),
            ]
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: three valid pollfds (a negative fd is ignored).
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Drop for SharedStore {
    /// Waits for this queue's commands (libnbd may still fill or send
    /// their buffers; the link answers or fails each within its timeouts).
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.wait().and_then(|()| self.reap(|_, _| {})).is_err() {
                let issuer = self.queue as u64 + 1;
                self.shared
                    .lock()
                    .disown(|tag| tag >> ISSUER_SHIFT == issuer);
                break;
            }
        }
    }
}
