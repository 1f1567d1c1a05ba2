//! Asynchronous image I/O on an NBD export: the same shape as `UringStore`
//! (push, submit, reap, wait, a pool of buffers), over one libnbd
//! connection owned by one queue's vring thread.
//!
//! The vring thread's epoll waits on an epoll fd of the store's own (its
//! "event fd") beside the kick fd; the connection's socket is in that inner
//! set, readable when replies arrived. The inner set is what keeps the fd
//! the vring thread waits on the same when a lost connection is replaced
//! by a new socket. `reap` lets libnbd read the replies that arrived.
//! Requests go out as they are pushed; one that does not fit in the
//! socket's send buffer is finished by `submit`, which waits for the socket
//! to drain (reading replies meanwhile, so a server that is blocked sending
//! us replies never deadlocks against us). The vring thread therefore only
//! ever waits for readability, and a slow server slows its queue down
//! (backpressure) instead of growing a queue in memory.
//!
//! A lost connection (server killed or restarted, connection cut, protocol
//! error): with reconnecting on (`--nbd-reconnect-timeout`), the commands
//! it had not answered stay in the store with their buffers, the store
//! connects again (with back-off, blocking this queue's thread, until the
//! timeout) and sends them again; only when the timeout passes are they
//! failed. A command the server answered is reported as answered, never
//! sent twice. After a timeout, new commands fail at once, with one attempt
//! to connect a second, until the server is back.
//!
//! Buffers: libnbd reads into and writes from pool buffers, which stay
//! untouched until the command is retired; dropping the store closes the
//! connection (after which libnbd touches no buffer) before the pool is
//! freed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use super::libnbd::{errno_of, Connection, Endpoint, ExportInfo, Tls};
use super::{Buffers, Op};

/// Whether an `--image` names an NBD export (an NBD URI) rather than a file.
pub fn is_uri(image: &Path) -> bool {
    image.to_str().is_some_and(|s| {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|scheme| s.starts_with(scheme))
    })
}

/// After a reconnect timed out: how often a new command may try once more.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long such a single attempt may take.
const ONE_ATTEMPT: Duration = Duration::from_secs(1);
/// Longest single attempt while reconnecting: a server that accepts the
/// connection and never finishes the handshake (one shutting down) is
/// left for a new attempt.
const ATTEMPT_MAX: Duration = Duration::from_secs(5);
/// Back-off between attempts while reconnecting: from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How to reach the export again once a connection is lost.
pub struct Redial {
    endpoint: Endpoint,
    /// TLS settings for new connections (only when they can be read: see
    /// `Connection::connect_to`).
    tls: Tls,
    /// How long the requests of a lost connection wait for a new one.
    pub timeout: Duration,
    /// What the first connection saw: a new one must see the same export.
    info: ExportInfo,
}

impl Redial {
    /// Connects, trying again with back-off until `deadline`; the new
    /// connection must lead to the same export (size, read-only flag,
    /// multi-conn), or it is refused as a failed attempt.
    pub fn connect(&self, name: &str, deadline: Instant) -> io::Result<Connection> {
        let mut pause = BACKOFF_FIRST;
        loop {
            let attempt = deadline.min(Instant::now() + ATTEMPT_MAX);
            let result = Connection::connect_to(&self.endpoint, &self.tls, name, attempt)
                .and_then(|conn| self.same_export(conn));
            let e = match result {
                Ok(conn) => return Ok(conn),
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(e);
            }
            log::debug!("NBD reconnect to {}: {e}", self.endpoint.describe());
            // The last attempt is made at the deadline.
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(BACKOFF_MAX);
        }
    }

    fn same_export(&self, conn: Connection) -> io::Result<Connection> {
        let info = conn.info()?;
        let was = &self.info;
        if info.size != was.size
            || info.read_only != was.read_only
            || info.can_multi_conn != was.can_multi_conn
        {
            return Err(io::Error::other(format!(
                "the export changed (size {} → {}, read-only {} → {}, multi-conn {} → {}); \
                 not using it",
                was.size,
                info.size,
                was.read_only,
                info.read_only,
                was.can_multi_conn,
                info.can_multi_conn
            )));
        }
        Ok(conn)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// An NBD export as the daemon uses it, connected at start-up: one
/// connection for synchronous commands (LUKS headers, the synchronous data
/// path, the final flush) and, when the server allows several connections
/// (NBD_FLAG_CAN_MULTI_CONN), one per queue for that queue's asynchronous
/// store. Lost connections are made again (after the sandbox too: to the
/// address found at start-up, see `Redial`) when reconnecting is on.
///
/// Without multi-conn the NBD spec promises nothing across connections (a
/// FLUSH on one need not cover writes acknowledged on another, nor a read on
/// one see them), and qemu-nbd serves one client at a time by default: then
/// there is exactly one connection, and every queue uses it synchronously.
/// libnbd serialises those calls on the handle's lock, so one request is at
/// the server at a time: correct, and slow; see README "Network storage".
pub struct NbdExport {
    uri: String,
    info: ExportInfo,
    /// The connection for synchronous commands, and how many times it was
    /// made again.
    sync: RwLock<(u64, Connection)>,
    queues: Vec<Mutex<Option<Connection>>>,
    redial: Option<Arc<Redial>>,
    /// When the synchronous connection last failed to come back within the
    /// timeout (then calls fail at once, with one attempt a second).
    sync_gave_up: Mutex<Option<Instant>>,
}

impl NbdExport {
    /// Connects to `uri`, and with multi-conn `queues` more times.
    /// `reconnect`: how long requests wait for a lost connection to be made
    /// again (zero: never reconnect).
    pub fn open(uri: &str, tls: &Tls, queues: usize, reconnect: Duration) -> io::Result<Arc<Self>> {
        let sync = Connection::connect(uri, tls, "cryptblk")?;
        let info = sync.info()?;
        let queues = if info.can_multi_conn {
            (0..queues)
                .map(|q| {
                    Connection::connect(uri, tls, &format!("cryptblk-q{q}"))
                        .map(|c| Mutex::new(Some(c)))
                })
                .collect::<io::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let redial = if reconnect.is_zero() {
            None
        } else {
            Some(Arc::new(Redial {
                endpoint: sync.endpoint()?,
                tls: tls.clone(),
                timeout: reconnect,
                info,
            }))
        };
        Ok(Arc::new(NbdExport {
            uri: uri.to_string(),
            info,
            sync: RwLock::new((0, sync)),
            queues,
            redial,
            sync_gave_up: Mutex::new(None),
        }))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// How lost connections are made again (None: reconnecting is off).
    pub fn redial(&self) -> Option<&Redial> {
        self.redial.as_deref()
    }

    /// Runs `f` on the connection for synchronous commands. A connection
    /// found lost is made again (reconnecting on) and `f` runs again on the
    /// new one: every command here is idempotent (read, write, flush, trim)
    /// and its caller has had no answer.
    pub fn with_sync<T>(&self, mut f: impl FnMut(&Connection) -> io::Result<T>) -> io::Result<T> {
        let mut deadline = None;
        loop {
            let guard = self.sync.read().unwrap_or_else(|p| p.into_inner());
            let (lost, conn) = (guard.0, &guard.1);
            let result = f(conn);
            let Some(redial) = self.redial.as_deref() else {
                return result;
            };
            let leaving = result.as_ref().err().is_some_and(server_leaving);
            if result.is_ok() || !(conn.is_dead() || leaving) {
                return result;
            }
            drop(guard);
            let mut sync = self.sync.write().unwrap_or_else(|p| p.into_inner());
            if sync.0 != lost {
                continue; // another thread made it again meanwhile
            }
            let now = Instant::now();
            let mut gave_up = self.sync_gave_up.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = *deadline.get_or_insert(match *gave_up {
                Some(last) if now < last + RETRY_EVERY => return result,
                Some(_) => now + ONE_ATTEMPT,
                None => {
                    log::warn!(
                        "{}: NBD connection lost; reconnecting for up to {:?}",
                        self.uri,
                        redial.timeout
                    );
                    now + redial.timeout
                }
            });
            match redial.connect("cryptblk", deadline) {
                Ok(new) => {
                    log::info!("{}: NBD connection made again", self.uri);
                    *sync = (lost + 1, new);
                    *gave_up = None;
                }
                Err(e) => {
                    if gave_up.is_none() {
                        log::error!(
                            "{}: no NBD connection within {:?} ({e}): requests fail until the \
                             server is back",
                            self.uri,
                            redial.timeout
                        );
                    }
                    *gave_up = Some(Instant::now());
                    return result;
                }
            }
        }
    }

    /// Whether queues get connections of their own (asynchronous I/O).
    pub fn per_queue(&self) -> bool {
        !self.queues.is_empty()
    }

    /// A store on queue `queue`'s connection; the connection comes back
    /// here when the store is dropped (the next vhost-user connection's
    /// queue uses it). None: no connection for it (no multi-conn, or it
    /// died and reconnecting is off).
    pub fn store(self: &Arc<Self>, queue: usize, buffers: Buffers) -> io::Result<Option<NbdStore>> {
        let Some(slot) = self.queues.get(queue) else {
            return Ok(None);
        };
        let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let conn = taken.filter(|c| !c.is_dead());
        if conn.is_none() && self.redial.is_none() {
            return Ok(None);
        }
        // Without a live connection, the store makes one at its first command.
        let mut store = NbdStore::with(conn, buffers, self.redial.clone())?;
        store.name = format!("cryptblk-q{queue}");
        store.can_flush = self.info.can_flush;
        store.home = Some((self.clone(), queue));
        Ok(Some(store))
    }
}

/// TLS settings for the connections the LUKS code opens (set by `serve`
/// from its options; `format`, `key` and `dump` use none).
static LUKS_TLS: OnceLock<Tls> = OnceLock::new();

/// Sets the TLS settings of the connections the LUKS code opens (once).
pub(super) fn set_luks_tls(tls: Tls) {
    let _ = LUKS_TLS.set(tls);
}

/// An NBD URI as the LUKS code sees it: a connection of its own, used with
/// libnbd's synchronous calls (see `super::install_luks_opener`).
pub(super) fn open_header(path: &Path) -> io::Result<Box<dyn crate::luks::device::Device>> {
    let uri = path.to_str().unwrap_or_default();
    let tls = LUKS_TLS.get().cloned().unwrap_or_default();
    let conn = Connection::connect(uri, &tls, "cryptblk-luks")?;
    let info = conn.info()?;
    Ok(Box::new(HeaderDevice { conn, info }))
}

/// An export as the LUKS code sees it: synchronous reads and writes, cut
/// to the server's maximum block size.
struct HeaderDevice {
    conn: Connection,
    info: ExportInfo,
}

impl HeaderDevice {
    fn chunks(&self, len: usize, offset: u64) -> impl Iterator<Item = (usize, usize, u64)> {
        let max = (self.info.max_block as usize).max(4096);
        (0..len)
            .step_by(max)
            .map(move |at| (at, (len - at).min(max), offset + at as u64))
    }
}

impl crate::luks::device::Device for HeaderDevice {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (at, n, off) in self.chunks(buf.len(), offset) {
            self.conn.pread(&mut buf[at..at + n], off)?;
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (at, n, off) in self.chunks(buf.len(), offset) {
            self.conn.pwrite(&buf[at..at + n], off)?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        if self.info.can_flush {
            self.conn.flush()
        } else {
            Ok(())
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.info.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len <= self.info.size {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "the export has {} bytes, fewer than the {len} asked for (an export is never resized)",
            self.info.size
        )))
    }
}

/// A command sent and not yet reported: enough to send it again.
#[derive(Clone, Copy)]
struct Command {
    tag: u64,
    /// Its result on success.
    ok: i32,
    op: Op,
}

pub struct NbdStore {
    /// Declared before `buffers`: dropped (closed) first. None: lost, and
    /// not made again yet (reconnecting on).
    conn: Option<Connection>,
    /// The connection's socket (meaningless while `conn` is None or dead:
    /// libnbd closes the socket of a dead connection).
    fd: RawFd,
    /// What the vring thread waits on: an epoll set holding the socket.
    events: OwnedFd,
    buffers: Buffers,
    /// Commands in flight: cookie → command.
    commands: HashMap<u64, Command>,
    /// Completed outside the connection: FLUSH on a server that needs none,
    /// commands answered before their connection was lost, commands failed
    /// because no connection came back.
    done: Vec<(u64, i32)>,
    /// The server takes NBD_CMD_FLUSH. One that does not has no volatile
    /// cache to flush (the NBD spec forbids sending it FLUSH): a FLUSH then
    /// completes at once, every acknowledged write already being stable.
    can_flush: bool,
    home: Option<(Arc<NbdExport>, usize)>,
    redial: Option<Arc<Redial>>,
    /// When reconnecting last timed out (or a single later attempt failed).
    gave_up: Option<Instant>,
    /// Since when commands have waited for a connection that answers them
    /// (cleared by the first success), and the pause before the next
    /// attempt.
    lost_since: Option<(Instant, Duration)>,
    /// Commands the server refused because it is shutting down
    /// (NBD_ESHUTDOWN, reconnecting on): sent again on a new connection,
    /// which the store makes at once.
    refused: Vec<Command>,
    name: String,
}

impl NbdStore {
    /// A store on a connected `conn` with `buffers` as its I/O buffers
    /// (never reconnecting).
    pub fn new(conn: Connection, buffers: Buffers) -> io::Result<Self> {
        Self::with(Some(conn), buffers, None)
    }

    fn with(
        conn: Option<Connection>,
        buffers: Buffers,
        redial: Option<Arc<Redial>>,
    ) -> io::Result<Self> {
        // SAFETY: plain system call; the fd is owned right below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut store = NbdStore {
            conn: None,
            fd: -1,
            // SAFETY: a new fd nothing else owns.
            events: unsafe { OwnedFd::from_raw_fd(ep) },
            buffers,
            commands: HashMap::with_capacity(256),
            done: Vec::new(),
            can_flush: true,
            home: None,
            redial,
            gave_up: None,
            lost_since: None,
            refused: Vec::new(),
            name: "cryptblk".into(),
        };
        if let Some(conn) = conn {
            store.attach(conn)?;
        }
        Ok(store)
    }

    /// Makes `conn` the store's connection: its socket joins the epoll set.
    fn attach(&mut self, conn: Connection) -> io::Result<()> {
        let fd = conn.fd()?;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: both fds are open; `ev` is a valid epoll_event. A closed
        // socket leaves the set by itself.
        let rc =
            unsafe { libc::epoll_ctl(self.events.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.fd = fd;
        self.conn = Some(conn);
        Ok(())
    }

    /// Readable when replies are waiting (or the server hung up): register
    /// it beside the kick fd. The same fd for the store's whole life.
    pub fn event_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    /// The current connection (None: lost, and not made again yet).
    pub fn connection(&self) -> Option<&Connection> {
        self.conn.as_ref()
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    /// Pushed and not yet reaped: libnbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.commands.len() + self.done.len() + self.refused.len()
    }

    /// A connection that takes commands: there, not dead, and its server
    /// not shutting down.
    fn live(&self) -> bool {
        self.refused.is_empty() && self.conn.as_ref().is_some_and(|c| !c.is_dead())
    }

    /// Sends `op` (as far as the socket takes it; `submit` sends the rest).
    /// `tag` comes back with its result.
    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        let ok = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len as i32,
            Op::Sync if !self.can_flush => {
                self.done.push((tag, 0));
                return Ok(());
            }
            Op::Sync | Op::Discard { .. } => 0,
        };
        let command = Command { tag, ok, op };
        if !self.live() && self.redial.is_some() {
            self.recover();
            if !self.live() {
                return Err(not_connected());
            }
        }
        let cookie = match self.issue(op) {
            Ok(cookie) => cookie,
            // Lost right now: a new connection takes it.
            Err(_) if !self.live() && self.redial.is_some() => {
                self.recover();
                if !self.live() {
                    return Err(not_connected());
                }
                self.issue(op)?
            }
            Err(e) => return Err(e),
        };
        self.commands.insert(cookie, command);
        Ok(())
    }

    /// Hands `op` to libnbd; its cookie.
    fn issue(&mut self, op: Op) -> io::Result<u64> {
        let ptr = match op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => self.buffers.ptr(buf),
            Op::Sync | Op::Discard { .. } => std::ptr::null_mut(),
        };
        let Some(conn) = self.conn.as_ref() else {
            return Err(not_connected());
        };
        match op {
            Op::Read { len, offset, .. } => {
                // SAFETY: the buffer run belongs to the pool, which outlives
                // the connection (field order); the caller does not touch it
                // between pushing and reaping, and `reap` retires the
                // command before reporting it (a command sent again after a
                // reconnect is retired by its new connection, the old one
                // having been closed).
                unsafe { conn.aio_pread(ptr, len as usize, offset) }
            }
            Op::Write { len, offset, .. } => {
                // SAFETY: as for Read.
                unsafe { conn.aio_pwrite(ptr, len as usize, offset) }
            }
            Op::Sync => conn.aio_flush(),
            Op::Discard { offset, len } => conn.aio_trim(offset, len),
        }
    }

    /// Finishes sending what `push` could not, without waiting for replies.
    pub fn submit(&mut self) -> io::Result<()> {
        self.drive(false)
    }

    /// Commands completed and not yet reaped. The socket does not announce
    /// them when `submit` read their replies while it waited to send.
    pub fn ready(&self) -> bool {
        !self.done.is_empty()
            || !self.refused.is_empty()
            || self
                .conn
                .as_ref()
                .is_some_and(|c| c.peek_completed().is_some())
    }

    /// Nothing to clear: the socket is level-triggered.
    pub fn clear_event(&self) {}

    /// Reads the replies that arrived and calls `f(tag, result)` for every
    /// command they complete (result: bytes moved, or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> io::Result<()> {
        self.drive(false)?;
        self.retire(&mut f);
        Ok(())
    }

    fn retire(&mut self, f: &mut impl FnMut(u64, i32)) -> usize {
        let mut n = self.done.len();
        for (tag, result) in self.done.drain(..) {
            f(tag, result);
        }
        let Some(conn) = self.conn.as_ref() else {
            return n;
        };
        // A lost connection fails its unanswered commands: with
        // reconnecting on they are not reported here but sent again
        // (`recover`, which `drive` runs before this).
        if conn.is_dead() && self.redial.is_some() {
            return n;
        }
        let redial = self.redial.is_some();
        while let Some(cookie) = conn.peek_completed() {
            let Some(result) = conn.command_completed(cookie) else {
                break;
            };
            let Some(c) = self.commands.remove(&cookie) else {
                continue;
            };
            if redial && result == Err(libc::ESHUTDOWN) {
                self.refused.push(c);
                continue;
            }
            if result.is_ok() {
                self.lost_since = None;
            }
            f(c.tag, result.map_or_else(|errno| -errno, |()| c.ok));
            n += 1;
        }
        n
    }

    /// Blocks until at least one command has completed (for draining a
    /// queue, and a lone request; the data path otherwise never blocks).
    pub fn wait(&mut self) -> io::Result<()> {
        if (self.commands.is_empty() && self.refused.is_empty()) || !self.done.is_empty() {
            return Ok(());
        }
        self.drive(true)
    }

    /// The connection was lost (or is missing): keeps what it answered,
    /// connects again and sends the rest again. If no connection comes back
    /// in time, the rest fails (EIO). Blocks the queue's thread meanwhile:
    /// its requests are waiting for this anyway.
    fn recover(&mut self) {
        let Some(redial) = self.redial.clone() else {
            return;
        };
        let mut again = std::mem::take(&mut self.refused);
        let refused = match again.len() {
            0 => String::new(),
            n => format!(", {n} of them refused by the server as it shut down"),
        };
        if let Some(conn) = self.conn.take() {
            // Answered before the loss: those answers stand (an
            // acknowledged write is done; it is never sent twice).
            while let Some(cookie) = conn.peek_completed() {
                let Some(result) = conn.command_completed(cookie) else {
                    break;
                };
                if let Some(c) = self.commands.remove(&cookie) {
                    match result {
                        Ok(()) => self.done.push((c.tag, c.ok)),
                        // Failed by the loss, or refused by a server
                        // shutting down; a real error (EIO) just before
                        // the loss is tried once more, which reads and
                        // writes allow.
                        Err(_) => again.push(c),
                    }
                }
            }
            // Closing it ends libnbd's use of every buffer; its socket
            // leaves the epoll set as it closes.
            drop(conn);
        }
        again.extend(self.commands.drain().map(|(_, c)| c));
        self.fd = -1;
        let now = Instant::now();
        let deadline = match (self.gave_up, self.lost_since) {
            (Some(last), _) if now < last + RETRY_EVERY => {
                self.fail(again);
                return;
            }
            (Some(_), _) => now + ONE_ATTEMPT,
            // Lost again before any command succeeded on the new
            // connection (a server that refuses everything as it shuts
            // down, or drops each connection): the same deadline, and a
            // pause that grows, never a loop of reconnects.
            (None, Some((since, pause))) => {
                std::thread::sleep(pause);
                self.lost_since = Some((since, (pause * 2).min(BACKOFF_MAX)));
                since + redial.timeout
            }
            (None, None) => {
                self.lost_since = Some((now, BACKOFF_FIRST));
                log::warn!(
                    "NBD connection {} lost: reconnecting to {} for up to {:?} ({} commands \
                     waiting{refused})",
                    self.name,
                    redial.endpoint.describe(),
                    redial.timeout,
                    again.len()
                );
                now + redial.timeout
            }
        };
        let conn = match redial.connect(&self.name, deadline) {
            Ok(conn) => conn,
            Err(e) => {
                if self.gave_up.is_none() {
                    log::error!(
                        "NBD connection {}: no connection to {} within {:?} ({e}): {} commands \
                         fail, and new ones fail until the server is back",
                        self.name,
                        redial.endpoint.describe(),
                        redial.timeout,
                        again.len()
                    );
                }
                self.gave_up = Some(Instant::now());
                self.lost_since = None;
                self.fail(again);
                return;
            }
        };
        if let Err(e) = self.attach(conn) {
            log::error!("NBD connection {}: {e}", self.name);
            self.gave_up = Some(Instant::now());
            self.fail(again);
            return;
        }
        log::info!(
            "NBD connection {} made again after {:.1} s; sending {} commands again",
            self.name,
            now.elapsed().as_secs_f64(),
            again.len()
        );
        self.gave_up = None;
        for c in again {
            match self.issue(c.op) {
                Ok(cookie) => {
                    self.commands.insert(cookie, c);
                }
                Err(e) => self.done.push((c.tag, -errno_of(&e))),
            }
        }
    }

    fn fail(&mut self, commands: Vec<Command>) {
        self.done
            .extend(commands.into_iter().map(|c| (c.tag, -libc::EIO)));
    }

    /// Runs libnbd's state machine while the socket is ready: sends what is
    /// queued (waiting for room if need be) and reads what arrived. With
    /// `block`, also waits until some command has completed. A connection
    /// that dies completes every command with an error (or, reconnecting,
    /// is made again and its commands sent again); nothing blocks on a dead
    /// one.
    fn drive(&mut self, block: bool) -> io::Result<()> {
        loop {
            if !self.live() {
                if self.redial.is_none() {
                    return Ok(());
                }
                if self.commands.is_empty() && self.refused.is_empty() {
                    // Nothing waits: the next command reconnects.
                    self.conn = None;
                    self.fd = -1;
                    return Ok(());
                }
                self.recover();
                if block && !self.done.is_empty() {
                    return Ok(());
                }
                continue;
            }
            let Some(conn) = self.conn.as_ref() else {
                return Ok(());
            };
            let dir = conn.direction();
            let waiting = block && self.done.is_empty() && conn.peek_completed().is_none();
            let mut events = 0;
            if dir.read {
                events |= libc::POLLIN;
            }
            if dir.write {
                events |= libc::POLLOUT;
            }
            if events == 0 {
                return Ok(());
            }
            let timeout = if dir.write || waiting { -1 } else { 0 };
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Ok(());
            }
            // Both ready: read first (libnbd(3): a reply may change what is
            // to be written). An error here kills the connection, which
            // completes the commands in flight with errors: their owners
            // learn it through `reap` (or they are sent again).
            let r = if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                conn.notify_read()
            } else {
                conn.notify_write()
            };
            if let Err(e) = r {
                log::debug!("NBD connection: {e} (errno {})", errno_of(&e));
            }
        }
    }
}

/// NBD_ESHUTDOWN: the server is shutting down and answers no more; the
/// command was not done, and another server (the same one restarted) may
/// take it: with reconnecting on, a lost connection.
fn server_leaving(e: &io::Error) -> bool {
    errno_of(e) == libc::ESHUTDOWN
}

fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "no connection to the NBD server",
    )
}

impl Drop for NbdStore {
    /// Waits for the commands in flight (libnbd may still fill or send
    /// their buffers; a dead connection has completed them all), then hands
    /// the connection back to its export.
    fn drop(&mut self) {
        while !self.commands.is_empty() {
            let before = self.commands.len();
            if self.wait().is_err() {
                break;
            }
            self.retire(&mut |_, _| {});
            if self.commands.len() == before && !self.live() {
                break;
            }
        }
        let conn = self.conn.take();
        if let (Some(conn), Some((export, queue))) = (conn, self.home.take()) {
            if self.commands.is_empty() && !conn.is_dead() {
                *export.queues[queue]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(conn);
            }
        }
        // Otherwise the connection is closed here, before the buffers go.
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::libnbd::Tls;
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// An nbdkit server started for one test, killed when dropped.
    pub struct Nbdkit {
        child: Child,
        pub uri: String,
        _dir: tempfile::TempDir,
    }

    pub enum Transport {
        Unix,
        Tcp,
    }

    impl Nbdkit {
        /// `nbdkit ARGS` (plugin, filters, parameters) on a new unix socket
        /// or TCP port of 127.0.0.1. nbdkit must be installed: a missing
        /// one fails the test.
        pub fn start(transport: Transport, args: &[&str]) -> Nbdkit {
            let dir = tempfile::tempdir().unwrap();
            for _ in 0..5 {
                let mut cmd = Command::new("nbdkit");
                cmd.args(["--foreground", "--exit-with-parent"]);
                let (uri, ready): (String, Box<dyn Fn() -> bool>) = match transport {
                    Transport::Unix => {
                        let sock = dir.path().join("nbd.sock");
                        cmd.arg("--unix").arg(&sock);
                        let uri = format!("nbd+unix:///?socket={}", sock.display());
                        let s = sock.clone();
                        (
                            uri,
                            Box::new(move || std::os::unix::net::UnixStream::connect(&s).is_ok()),
                        )
                    }
                    Transport::Tcp => {
                        let port = free_port();
                        cmd.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]);
                        let uri = format!("nbd://127.0.0.1:{port}/");
                        (
                            uri,
                            Box::new(move || {
                                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                            }),
                        )
                    }
                };
                cmd.args(args).stdin(Stdio::null());
                let mut child = cmd
                    .spawn()
                    .expect("nbdkit is not installed (integration/install-deps.sh installs it)");
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(Some(status)) = child.try_wait() {
                        // A port taken meanwhile: try another.
                        eprintln!("nbdkit exited early: {status}");
                        break;
                    }
                    if ready() {
                        return Nbdkit {
                            child,
                            uri,
                            _dir: dir,
                        };
                    }
                    assert!(Instant::now() < deadline, "nbdkit did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            panic!("nbdkit did not start");
        }

        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Nbdkit {
        fn drop(&mut self) {
            self.kill();
        }
    }

    pub fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn connect(server: &Nbdkit) -> Connection {
        Connection::connect(&server.uri, &Tls::default(), "test").expect("connect")
    }

    fn store(server: &Nbdkit) -> NbdStore {
        NbdStore::new(connect(server), Buffers::new(16, 65536)).unwrap()
    }

    fn run(s: &mut NbdStore, op: Op, tag: u64) -> i32 {
        s.push(op, tag).unwrap();
        s.submit().unwrap();
        let mut got = None;
        while got.is_none() {
            s.wait().unwrap();
            s.reap(|t, r| {
                assert_eq!(t, tag);
                got = Some(r);
            })
            .unwrap();
        }
        got.unwrap()
    }

    fn writes_reads_flushes_and_trims(transport: Transport) {
        let server = Nbdkit::start(transport, &["memory", "size=16M"]);
        let conn = connect(&server);
        let info = conn.info().unwrap();
        assert_eq!(info.size, 16 << 20);
        assert!(!info.read_only && info.can_flush && info.can_trim && info.can_multi_conn);
        drop(conn);

        let mut s = store(&server);
        let b = s.buffers().take().unwrap();
        s.buffers().bytes_mut(b, 65536).fill(0x5c);
        let write = Op::Write {
            buf: b,
            len: 65536,
            offset: 8192,
        };
        assert_eq!(run(&mut s, write, 7), 65536);
        assert_eq!(run(&mut s, Op::Sync, 8), 0);
        s.buffers().bytes_mut(b, 65536).fill(0);
        let read = Op::Read {
            buf: b,
            len: 4096,
            offset: 8192 + 4096,
        };
        assert_eq!(run(&mut s, read, 9), 4096);
        assert!(s.buffers().bytes_mut(b, 4096).iter().all(|&x| x == 0x5c));

        let trim = Op::Discard {
            offset: 8192,
            len: 65536,
        };
        assert_eq!(run(&mut s, trim, 10), 0);
        assert_eq!(run(&mut s, read, 11), 4096);
        assert!(
            s.buffers().bytes_mut(b, 4096).iter().all(|&x| x == 0),
            "memory plugin: a trimmed range reads as zeros"
        );
        assert_eq!(s.in_flight(), 0);

        // The synchronous calls (LUKS headers) see the same export.
        let sync = connect(&server);
        let mut back = [0u8; 512];
        sync.pwrite(&[0xa5; 512], 1 << 20).unwrap();
        sync.flush().unwrap();
        sync.pread(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [0xa5; 512]);
    }

    #[test]
    fn unix_socket_writes_reads_flushes_and_trims() {
        writes_reads_flushes_and_trims(Transport::Unix);
    }

    #[test]
    fn tcp_writes_reads_flushes_and_trims() {
        writes_reads_flushes_and_trims(Transport::Tcp);
    }

    #[test]
    fn many_commands_in_flight_complete_and_data_verifies() {
        let server = Nbdkit::start(Transport::Tcp, &["memory", "size=64M"]);
        let mut s = NbdStore::new(connect(&server), Buffers::new(64, 65536)).unwrap();
        // 64 writes of 64 KiB in flight at once: more than a socket buffer
        // holds, so `submit` has to wait for room.
        for i in 0..64u16 {
            let b = s.buffers().take().unwrap();
            assert_eq!(b, i);
            s.buffers().bytes_mut(b, 65536).fill(i as u8 + 1);
            let op = Op::Write {
                buf: b,
                len: 65536,
                offset: u64::from(i) * 65536,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        s.submit().unwrap();
        assert!(s.in_flight() > 0);
        let mut seen = Vec::new();
        while seen.len() < 64 {
            s.wait().unwrap();
            s.reap(|t, r| {
                assert_eq!(r, 65536);
                seen.push(t)
            })
            .unwrap();
        }
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
        for i in 0..64u16 {
            s.buffers().bytes_mut(i, 65536).fill(0);
            let op = Op::Read {
                buf: i,
                len: 65536,
                offset: u64::from(63 - i) * 65536,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        s.submit().unwrap();
        let mut n = 0;
        while n < 64 {
            s.wait().unwrap();
            s.reap(|_, r| {
                assert_eq!(r, 65536);
                n += 1;
            })
            .unwrap();
        }
        for i in 0..64u16 {
            let want = (63 - i) as u8 + 1;
            assert!(s.buffers().bytes_mut(i, 65536).iter().all(|&x| x == want));
        }
        // Leave commands in flight: dropping the store must not hang or
        // touch freed buffers.
        for i in 0..8u16 {
            let op = Op::Read {
                buf: i,
                len: 65536,
                offset: 0,
            };
            s.push(op, 0).unwrap();
        }
        drop(s);
    }

    #[test]
    fn server_errors_come_back_as_negative_errno() {
        let server = Nbdkit::start(
            Transport::Unix,
            &[
                "--filter=error",
                "memory",
                "size=1M",
                "error=ENOSPC",
                "error-pwrite-rate=100%",
                "error-pread=EIO",
                "error-pread-rate=100%",
            ],
        );
        let mut s = store(&server);
        let b = s.buffers().take().unwrap();
        let write = Op::Write {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, write, 1), -libc::ENOSPC);
        let read = Op::Read {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, read, 2), -libc::EIO);
        // The connection survives a failed command.
        assert_eq!(run(&mut s, Op::Sync, 3), 0);
    }

    #[test]
    fn a_killed_server_fails_the_commands_in_flight() {
        // Every command waits 2 s at the server: they are in flight when
        // it dies.
        let mut server = Nbdkit::start(
            Transport::Tcp,
            &["--filter=delay", "memory", "size=1M", "delay-read=2"],
        );
        let mut s = store(&server);
        for i in 0..4u16 {
            let b = s.buffers().take().unwrap();
            let op = Op::Read {
                buf: b,
                len: 4096,
                offset: u64::from(i) * 4096,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        s.submit().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        server.kill();
        let start = Instant::now();
        let mut results = Vec::new();
        while results.len() < 4 {
            s.wait().unwrap();
            s.reap(|_, r| results.push(r)).unwrap();
            assert!(start.elapsed() < Duration::from_secs(5), "hangs");
        }
        assert!(results.iter().all(|&r| r < 0), "{results:?}");
        assert!(s.connection().unwrap().is_dead());
        // Later commands fail at once.
        let b = s.buffers().take().unwrap();
        let op = Op::Read {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert!(s.push(op, 9).is_err());
    }
}
