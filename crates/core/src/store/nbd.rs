//! Asynchronous image I/O on an NBD export: the same shape as `UringStore`
//! (push, submit, reap, wait, a pool of buffers), over one libnbd
//! connection owned by one queue's vring thread (a `Link`). A server
//! without multi-conn gets one connection that every queue drives: see
//! `nbd_shared`.
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
//! A silent server (the connection open, no answers): a command unanswered
//! for the request timeout shuts the socket down, and then it is a lost
//! connection (`Link::expire` says why resending is sound). A timer in
//! the epoll set wakes the vring thread for it. A disconnect or SIGTERM
//! (`Stop`) waits for the commands in flight only for a grace period, then
//! closes their connections and fails them.
//!
//! Buffers: libnbd reads into and writes from pool buffers, which stay
//! untouched until the command is retired; dropping the store closes the
//! connection (after which libnbd touches no buffer) before the pool is
//! freed.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::libnbd::{errno_of, Connection, Endpoint, ExportInfo, Tls};
use super::nbd_shared::{Shared, SharedStore};
use super::{Buffers, Op, Store};

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

/// How long a command may go unanswered before its connection counts as
/// lost, when reconnecting is off (with it on, the reconnect timeout is
/// that bound too: see `NbdExport::request_timeout`).
const REQUEST_TIMEOUT_NO_RECONNECT: Duration = Duration::from_secs(30);
/// How long a VMM disconnect or SIGTERM waits for the commands in flight
/// when reconnecting is off (with it on: the reconnect timeout; see
/// `NbdExport::grace`).
const STOP_GRACE_NO_RECONNECT: Duration = Duration::from_secs(5);

/// The end of a VMM connection (a disconnect) or of the daemon (SIGTERM),
/// shared by an export and its stores: from `at` on, stores stop waiting
/// for their server. Their commands still unanswered then fail (IOERR)
/// once their connection is closed, and no connection is made again until
/// `resume`. `wake` is readable while a stop is on, so that a queue thread
/// blocked on its server sees it at once.
pub struct Stop {
    at: Mutex<Option<Instant>>,
    wake: EventFd,
}

impl Stop {
    fn new() -> io::Result<Self> {
        Ok(Stop {
            at: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// When waiting ends, if a stop is on.
    fn deadline(&self) -> Option<Instant> {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn passed(&self) -> bool {
        self.deadline().is_some_and(|at| Instant::now() >= at)
    }

    /// Starts a stop ending at `at` (an earlier one stands).
    fn begin(&self, at: Instant) {
        let mut was = self.at.lock().unwrap_or_else(|p| p.into_inner());
        *was = Some(was.map_or(at, |w| w.min(at)));
        let _ = self.wake.write(1);
    }

    fn end(&self) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = self.wake.read();
    }
}

/// `deadline`, or earlier if a stop ends before it.
fn until(deadline: Instant, stop: Option<&Stop>) -> Instant {
    stop.and_then(Stop::deadline)
        .map_or(deadline, |at| deadline.min(at))
}

/// How to reach the export again once a connection is lost.
pub struct Redial {
    endpoint: Endpoint,
    /// TLS settings for new connections (their files stay readable under
    /// the sandbox: see `Connection::connect_to`).
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
    /// A stop (`stop`) that begins meanwhile ends the attempts at its own
    /// deadline.
    pub fn connect(
        &self,
        name: &str,
        deadline: Instant,
        stop: Option<&Stop>,
    ) -> io::Result<Connection> {
        let mut pause = BACKOFF_FIRST;
        let mut said = String::new();
        loop {
            let deadline = until(deadline, stop);
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
            // Why an attempt failed says what to fix: said once per
            // reason (a refused connection, then a broken handshake), at
            // most once per back-off step.
            let why = e.to_string();
            if why != said {
                log::warn!(
                    "NBD reconnect to {} failed: {why}; trying again for up to {left:?}",
                    self.endpoint.describe()
                );
                said = why;
            } else {
                log::debug!("NBD reconnect to {}: {why}", self.endpoint.describe());
            }
            // The last attempt is made at the deadline.
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(BACKOFF_MAX);
        }
    }

    /// The new connection's export must be the one served since start-up:
    /// same size, read-only flag and multi-conn, and block sizes that take
    /// every request the first connection's did (requests are aligned and
    /// split by those), or it is not used.
    fn same_export(&self, conn: Connection) -> io::Result<Connection> {
        let info = conn.info()?;
        let was = &self.info;
        if info.size != was.size
            || info.read_only != was.read_only
            || info.can_multi_conn != was.can_multi_conn
            || info.min_block > was.min_block
            || info.max_block < was.max_block
        {
            return Err(io::Error::other(format!(
                "the export changed (size {} → {}, read-only {} → {}, multi-conn {} → {}, \
                 block sizes {}-{} → {}-{}); not using it",
                was.size,
                info.size,
                was.read_only,
                info.read_only,
                was.can_multi_conn,
                info.can_multi_conn,
                was.min_block,
                was.max_block,
                info.min_block,
                info.max_block
            )));
        }
        Ok(conn)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// How long a command may go unanswered before its connection counts
/// as lost: the reconnect timeout (30 s unless set otherwise), or 30 s
/// with reconnecting off. A server that keeps the connection open and
/// never answers, or a network that silently drops everything, is
/// otherwise never seen as lost (TCP alone retransmits for about 15
/// minutes, and a live server's kernel acknowledges keep-alive probes
/// while the server itself is stuck). One knob: a server silent for as
/// long as we would wait for a lost one to come back is no better than
/// a lost one, and the operator who shortens one wants the other short
/// too. A slow server is not a silent one as long as it answers each
/// command within that time (tests/nbd.rs checks both sides).
pub(super) fn request_timeout_for(reconnect: Duration) -> Duration {
    if reconnect.is_zero() {
        REQUEST_TIMEOUT_NO_RECONNECT
    } else {
        reconnect
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
/// there is exactly one connection, which every queue and the synchronous
/// commands share, asynchronously (`nbd_shared`).
pub struct NbdExport {
    uri: String,
    info: ExportInfo,
    /// With multi-conn: the connection for synchronous commands, and how
    /// many times it was made again.
    sync: Option<RwLock<(u64, Connection)>>,
    /// With multi-conn: each queue's connection, while no store has it.
    queues: Vec<Mutex<Option<Connection>>>,
    /// Without multi-conn: the one connection, every queue's and every
    /// synchronous command's.
    shared: Option<Arc<Shared>>,
    redial: Option<Arc<Redial>>,
    /// When the synchronous connection last failed to come back within the
    /// timeout (then calls fail at once, with one attempt a second).
    sync_gave_up: Mutex<Option<Instant>>,
    /// A disconnect or SIGTERM in progress (see `stop_within`).
    stop: Arc<Stop>,
    /// How long a command may go unanswered before its connection counts
    /// as lost (see `request_timeout`).
    request_timeout: Duration,
}

impl NbdExport {
    /// Connects to `uri`, and with multi-conn `queues` more times.
    /// `reconnect`: how long requests wait for a lost connection to be made
    /// again (zero: never reconnect).
    pub fn open(uri: &str, tls: &Tls, queues: usize, reconnect: Duration) -> io::Result<Arc<Self>> {
        let request_timeout = request_timeout_for(reconnect);
        let first = Connection::connect(uri, tls, "cryptblk", request_timeout)?;
        let info = first.info()?;
        let redial = if reconnect.is_zero() {
            None
        } else {
            Some(Arc::new(Redial {
                endpoint: first.endpoint()?,
                tls: tls.clone(),
                timeout: reconnect,
                info,
            }))
        };
        let mut export = NbdExport {
            uri: uri.to_string(),
            info,
            sync: None,
            queues: Vec::new(),
            shared: None,
            redial,
            sync_gave_up: Mutex::new(None),
            stop: Arc::new(Stop::new()?),
            request_timeout,
        };
        if info.can_multi_conn {
            export.queues = (0..queues)
                .map(|q| {
                    Connection::connect(uri, tls, &format!("cryptblk-q{q}"), request_timeout)
                        .map(|c| Mutex::new(Some(c)))
                })
                .collect::<io::Result<Vec<_>>>()?;
            export.sync = Some(RwLock::new((0, first)));
        } else {
            let link = export.link(Some(first), "cryptblk".into())?;
            export.shared = Some(Arc::new(Shared::new(link, queues)?));
        }
        Ok(Arc::new(export))
    }

    /// A link on `conn` (None: it connects at its first command) that
    /// reconnects, times out and stops as the export says.
    fn link(&self, conn: Option<Connection>, name: String) -> io::Result<Link> {
        let mut link = Link::with(conn, self.redial.clone())?;
        link.name = name;
        link.stop = Some(self.stop.clone());
        link.request_timeout = Some(self.request_timeout);
        link.can_flush = self.info.can_flush;
        Ok(link)
    }

    /// How long the next synchronous call may wait for its answer: the
    /// request timeout, and during a stop no longer than the stop's
    /// deadline, but at least `ONE_ATTEMPT` (the final FLUSH after a stop
    /// that gave up still gets a moment on a server that answers).
    fn sync_timeout(&self) -> Duration {
        match self.stop.deadline() {
            None => self.request_timeout,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                self.request_timeout.min(left.max(ONE_ATTEMPT))
            }
        }
    }

    /// How long a VMM disconnect or SIGTERM waits for the commands in
    /// flight before closing their connections and failing them (IOERR):
    /// the reconnect timeout, which is how long those commands could wait
    /// for a lost connection anyway (so a stop never cuts short what a
    /// reconnect would have finished in time); with reconnecting off, a
    /// fixed 5 s (the operator asked not to wait for a server at all, and
    /// a server that answers needs far less). With the default 30 s, a
    /// stop with a silent server stays well inside systemd's 90 s
    /// TimeoutStopSec.
    pub fn grace(&self) -> Duration {
        self.redial
            .as_ref()
            .map_or(STOP_GRACE_NO_RECONNECT, |r| r.timeout)
    }

    /// A disconnect or SIGTERM began: commands in flight on any queue's
    /// connection get `grace()` more to be answered, then their
    /// connections are shut down and they fail (IOERR); nothing is
    /// reconnected until `resume`. Wakes queue threads blocked on their
    /// server. A stop already on keeps its earlier deadline.
    pub fn stop_within(&self) {
        self.stop.begin(Instant::now() + self.grace());
    }

    /// The stop is over (the next VMM is served): back to waiting for the
    /// server as long as the timeouts say.
    pub fn resume(&self) {
        self.stop.end();
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

    /// Reads `buf.len()` bytes at `offset`, waiting for the answer.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.shared {
            Some(shared) => shared.call(data_op(true, buf.len(), offset)?, buf.as_mut_ptr()),
            None => self.with_sync(|c| c.pread(buf, offset)),
        }
    }

    /// Writes `buf` at `offset`, waiting for the server's acknowledgement.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.shared {
            // libnbd only reads from a write's buffer.
            Some(shared) => {
                shared.call(data_op(false, buf.len(), offset)?, buf.as_ptr().cast_mut())
            }
            None => self.with_sync(|c| c.pwrite(buf, offset)),
        }
    }

    /// NBD_CMD_FLUSH, waiting for the answer.
    pub fn flush(&self) -> io::Result<()> {
        match &self.shared {
            Some(shared) => shared.call(Op::Sync, std::ptr::null_mut()),
            None => self.with_sync(|c| c.flush()),
        }
    }

    /// NBD_CMD_TRIM, waiting for the answer.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.shared {
            Some(shared) => shared.call(Op::Discard { offset, len }, std::ptr::null_mut()),
            None => self.with_sync(|c| c.trim(offset, len)),
        }
    }

    /// Runs `f` on the connection for synchronous commands. A connection
    /// found lost is made again (reconnecting on) and `f` runs again on the
    /// new one: every command here is idempotent (read, write, flush, trim)
    /// and its caller has had no answer.
    ///
    /// During a stop (`stop_within`) a call that was waiting when the
    /// grace ran out gives up; a call made after it (the FLUSH after a
    /// disconnect or at exit) gets one quick attempt at a new connection.
    fn with_sync<T>(&self, mut f: impl FnMut(&Connection) -> io::Result<T>) -> io::Result<T> {
        let Some(sync) = self.sync.as_ref() else {
            return Err(not_connected());
        };
        let mut deadline = None;
        let began_stopped = self.stop.passed();
        let mut tried_stopped = false;
        loop {
            let guard = sync.read().unwrap_or_else(|p| p.into_inner());
            let (lost, conn) = (guard.0, &guard.1);
            conn.set_sync_timeout(self.sync_timeout());
            let result = f(conn);
            let Some(redial) = self.redial.as_deref() else {
                return result;
            };
            let leaving = result.as_ref().err().is_some_and(server_leaving);
            if result.is_ok() || !(conn.is_dead() || leaving) {
                return result;
            }
            drop(guard);
            let stopped = self.stop.passed();
            if stopped && (!began_stopped || tried_stopped) {
                return result; // the grace is over: no more waiting
            }
            let mut sync = sync.write().unwrap_or_else(|p| p.into_inner());
            if sync.0 != lost {
                continue; // another thread made it again meanwhile
            }
            let now = Instant::now();
            let mut gave_up = self.sync_gave_up.lock().unwrap_or_else(|p| p.into_inner());
            let attempt = if stopped {
                tried_stopped = true;
                log::warn!(
                    "{}: NBD connection lost, one attempt to connect again",
                    self.uri
                );
                Some((now + ONE_ATTEMPT, None))
            } else {
                None
            };
            let (deadline, stop) = match attempt {
                Some(a) => a,
                None => {
                    let d = *deadline.get_or_insert(match *gave_up {
                        Some(last) if now < last + RETRY_EVERY => return result,
                        Some(_) => now + ONE_ATTEMPT,
                        None => {
                            let why = result.as_ref().err().map(why_lost).unwrap_or_default();
                            log::warn!(
                                "{}: NBD connection lost: {why}; reconnecting for up to {:?}",
                                self.uri,
                                redial.timeout
                            );
                            now + redial.timeout
                        }
                    });
                    (d, Some(&*self.stop))
                }
            };
            match redial.connect("cryptblk", deadline, stop) {
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

    /// Whether queues get connections of their own (multi-conn), rather
    /// than sharing one.
    pub fn per_queue(&self) -> bool {
        self.shared.is_none()
    }

    /// Queue `queue`'s store: on its own connection, which comes back here
    /// when the store is dropped (the next vhost-user connection's queue
    /// uses it), or on the one shared connection. None: no connection for
    /// it (it died and reconnecting is off).
    pub fn store(self: &Arc<Self>, queue: usize, buffers: Buffers) -> io::Result<Option<Store>> {
        if let Some(shared) = &self.shared {
            return Ok(Some(Store::NbdShared(SharedStore::new(
                shared.clone(),
                queue,
                buffers,
            )?)));
        }
        let Some(slot) = self.queues.get(queue) else {
            return Ok(None);
        };
        let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let conn = taken.filter(|c| !c.is_dead());
        if conn.is_none() && self.redial.is_none() {
            return Ok(None);
        }
        // Without a live connection, the store makes one at its first command.
        Ok(Some(Store::Nbd(NbdStore {
            link: self.link(conn, format!("cryptblk-q{queue}"))?,
            buffers,
            home: Some((self.clone(), queue)),
        })))
    }
}

/// How the connections the LUKS code opens reach the server: TLS, and how
/// long a handshake or a command may take (serve's request timeout; 30 s
/// for `format`, `key` and `dump`). Set once, at start-up.
static LUKS_CONNECTION: OnceLock<(Tls, Duration)> = OnceLock::new();

pub(super) fn set_luks_connection(tls: Tls, timeout: Duration) {
    let _ = LUKS_CONNECTION.set((tls, timeout));
}

/// An NBD URI as the LUKS code sees it: a connection of its own, used with
/// synchronous calls that give up after the timeout (see
/// `super::install_luks_opener`).
pub(super) fn open_header(path: &Path) -> io::Result<Box<dyn crate::luks::device::Device>> {
    let uri = path.to_str().unwrap_or_default();
    let (tls, timeout) = LUKS_CONNECTION
        .get()
        .cloned()
        .unwrap_or((Tls::default(), REQUEST_TIMEOUT_NO_RECONNECT));
    let conn = Connection::connect(uri, &tls, "cryptblk-luks", timeout)?;
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

/// Op for a synchronous read (`read`) or write of `len` bytes at `offset`
/// (its buffer is given by address; the id is unused).
fn data_op(read: bool, len: usize, offset: u64) -> io::Result<Op> {
    let len = u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an NBD command of 4 GiB or more (split it)",
        )
    })?;
    Ok(if read {
        Op::Read {
            buf: 0,
            len,
            offset,
        }
    } else {
        Op::Write {
            buf: 0,
            len,
            offset,
        }
    })
}

/// A command sent and not yet reported: enough to send it again.
#[derive(Clone, Copy)]
struct Command {
    tag: u64,
    /// Its result on success.
    ok: i32,
    op: Op,
    /// Where its data is (see `Link::issue`).
    addr: usize,
    /// When it was sent (again: a command sent on a new connection gets a
    /// new time).
    sent: Instant,
    /// When a connection was first lost with it unanswered: it fails once
    /// the reconnect timeout has passed since then without an answer,
    /// even if the server answers other commands meanwhile (a server
    /// silent on one region only would otherwise have it sent again
    /// forever).
    lost_at: Option<Instant>,
}

/// One libnbd connection and the commands in flight on it: sending,
/// reaping, timing out, reconnecting. Its commands name their buffers by
/// address; whoever owns those buffers keeps them until the command is
/// retired (`NbdStore` for a queue's own connection, `nbd_shared::SharedStore`
/// for the one connection of a server without multi-conn).
pub(super) struct Link {
    /// None: lost, and not made again yet (reconnecting on).
    conn: Option<Connection>,
    /// The connection's socket (meaningless while `conn` is None or dead:
    /// libnbd closes the socket of a dead connection).
    fd: RawFd,
    /// What the vring thread waits on: an epoll set holding the socket.
    events: OwnedFd,
    /// Commands in flight: cookie → command. libnbd's cookies grow with
    /// every command on a connection, so the first is the oldest.
    commands: BTreeMap<u64, Command>,
    /// Completed outside the connection: FLUSH on a server that needs none,
    /// commands answered before their connection was lost, commands failed
    /// because no connection came back.
    done: Vec<(u64, i32)>,
    /// The server takes NBD_CMD_FLUSH. One that does not has no volatile
    /// cache to flush (the NBD spec forbids sending it FLUSH): a FLUSH then
    /// completes at once, every acknowledged write already being stable.
    can_flush: bool,
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
    /// A disconnect or SIGTERM (the export's): see `Stop`.
    stop: Option<Arc<Stop>>,
    /// How long a command may go unanswered before the connection counts
    /// as lost (None: forever; see `NbdExport::request_timeout`).
    request_timeout: Option<Duration>,
    /// In the epoll set: fires when the oldest command's time is up, so
    /// the vring thread learns of a silent server while it waits in epoll
    /// for the socket (which then never becomes readable).
    timer: TimerFd,
    /// When `timer` fires (None: disarmed).
    armed: Option<Instant>,
    /// The current connection was shut down because the server did not
    /// answer in time (its death says so already).
    timed_out: bool,
    /// A synchronous command's own stop deadline (see `sync_call`).
    sync_grace: Option<Instant>,
}

/// One queue's asynchronous store on a connection of its own (a server
/// with multi-conn).
pub struct NbdStore {
    /// Declared before `buffers`: closed first.
    link: Link,
    buffers: Buffers,
    /// Where the connection goes back when the store is dropped.
    home: Option<(Arc<NbdExport>, usize)>,
}

impl NbdStore {
    /// A store on a connected `conn` with `buffers` as its I/O buffers
    /// (never reconnecting).
    pub fn new(conn: Connection, buffers: Buffers) -> io::Result<Self> {
        Ok(NbdStore {
            link: Link::with(Some(conn), None)?,
            buffers,
            home: None,
        })
    }

    /// Readable when replies are waiting (or the server hung up): register
    /// it beside the kick fd. The same fd for the store's whole life.
    pub fn event_fd(&self) -> RawFd {
        self.link.event_fd()
    }

    /// The current connection (None: lost, and not made again yet).
    pub fn connection(&self) -> Option<&Connection> {
        self.link.conn.as_ref()
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    /// Pushed and not yet reaped: libnbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.link.in_flight()
    }

    /// Sends `op` (as far as the socket takes it; `submit` sends the rest).
    /// `tag` comes back with its result.
    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        let addr = address(&mut self.buffers, op);
        self.link.push(op, tag, addr)
    }

    /// Finishes sending what `push` could not, without waiting for replies.
    pub fn submit(&mut self) -> io::Result<()> {
        self.link.drive(false)
    }

    /// Commands completed and not yet reaped. The socket does not announce
    /// them when `submit` read their replies while it waited to send.
    pub fn ready(&self) -> bool {
        self.link.ready()
    }

    /// Nothing to clear: the socket is level-triggered.
    pub fn clear_event(&self) {}

    /// Reads the replies that arrived and calls `f(tag, result)` for every
    /// command they complete (result: bytes moved, or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> io::Result<()> {
        self.link.drive(false)?;
        self.link.retire(&mut f);
        Ok(())
    }

    /// Blocks until at least one command has completed (for draining a
    /// queue, and a lone request; the data path otherwise never blocks).
    pub fn wait(&mut self) -> io::Result<()> {
        self.link.wait()
    }
}

/// Where libnbd reads into or writes from for `op`: its pool buffer (0 for
/// commands without data).
pub(super) fn address(buffers: &mut Buffers, op: Op) -> usize {
    match op {
        Op::Read { buf, .. } | Op::Write { buf, .. } => buffers.ptr(buf) as usize,
        Op::Sync | Op::Discard { .. } => 0,
    }
}

impl Link {
    pub(super) fn with(conn: Option<Connection>, redial: Option<Arc<Redial>>) -> io::Result<Self> {
        let events = epoll_set()?;
        let timer = TimerFd::new()?;
        add_to(&events, timer.as_raw_fd())?;
        let mut link = Link {
            conn: None,
            fd: -1,
            events,
            commands: BTreeMap::new(),
            done: Vec::new(),
            can_flush: true,
            redial,
            gave_up: None,
            lost_since: None,
            refused: Vec::new(),
            name: "cryptblk".into(),
            stop: None,
            request_timeout: None,
            timer,
            armed: None,
            timed_out: false,
            sync_grace: None,
        };
        if let Some(conn) = conn {
            link.attach(conn)?;
        }
        Ok(link)
    }

    /// Makes `conn` the link's connection: its socket joins the epoll set.
    fn attach(&mut self, conn: Connection) -> io::Result<()> {
        let fd = conn.fd()?;
        add_to(&self.events, fd)?;
        self.fd = fd;
        self.conn = Some(conn);
        self.timed_out = false;
        Ok(())
    }

    /// Readable when replies are waiting, the server hung up, or the
    /// oldest command's time is up. The same fd for the link's whole life.
    pub(super) fn event_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    /// Pushed and not yet retired: libnbd may still use their buffers.
    pub(super) fn in_flight(&self) -> usize {
        self.commands.len() + self.done.len() + self.refused.len()
    }

    /// A connection that takes commands: there, not dead, and its server
    /// not shutting down.
    pub(super) fn live(&self) -> bool {
        self.refused.is_empty() && self.conn.as_ref().is_some_and(|c| !c.is_dead())
    }

    /// When a disconnect or SIGTERM in progress stops waiting for the
    /// server (None: no stop is on): the stop's deadline, or later for a
    /// synchronous command made near or after it (`sync_grace`).
    fn stop_deadline(&self) -> Option<Instant> {
        let at = self.stop.as_deref()?.deadline()?;
        Some(self.sync_grace.map_or(at, |grace| at.max(grace)))
    }

    /// The stop's deadline has passed: nothing waits any longer.
    fn stopped(&self) -> bool {
        self.stop_deadline().is_some_and(|at| Instant::now() >= at)
    }

    /// A synchronous command is about to be sent (on the shared connection
    /// of a server without multi-conn; None: it is over). During a stop it
    /// gets at least `ONE_ATTEMPT` from `now` (the FLUSH after a disconnect
    /// or at exit still gets a moment on a server that answers, on a new
    /// connection if the stop closed the old one), as `NbdExport::with_sync`
    /// gives the synchronous connection of a server with multi-conn.
    pub(super) fn sync_call(&mut self, now: Option<Instant>) {
        self.sync_grace = now.map(|now| now + ONE_ATTEMPT);
    }

    /// What a thread waiting for this link's commands polls besides
    /// `event_fd` (the socket and the timer): the stop's eventfd, readable
    /// once a stop begins, and while one is on its deadline instead.
    pub(super) fn stop_wait(&self) -> (Option<RawFd>, Option<Instant>) {
        match (self.stop.as_deref(), self.stop_deadline()) {
            (Some(stop), None) => (Some(stop.wake.as_raw_fd()), None),
            (_, at) => (None, at),
        }
    }

    /// Forgets the commands whose tags `theirs` names, whose buffers are
    /// about to go unanswered (an error while waiting for them): closes the
    /// connection first, so that libnbd no longer touches them; every other
    /// command is sent again on a new connection.
    pub(super) fn disown(&mut self, theirs: impl Fn(u64) -> bool) {
        let mut again = self.salvage();
        again.retain(|c| !theirs(c.tag));
        self.done.retain(|&(tag, _)| !theirs(tag));
        // Sent again at the next `push` or `drive` (see `live`).
        self.refused = again;
    }

    /// Sends `op` on data at `addr` (as far as the socket takes it;
    /// `drive` sends the rest). `tag` comes back with its result.
    pub(super) fn push(&mut self, op: Op, tag: u64, addr: usize) -> io::Result<()> {
        let ok = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len as i32,
            Op::Sync if !self.can_flush => {
                self.done.push((tag, 0));
                return Ok(());
            }
            Op::Sync | Op::Discard { .. } => 0,
        };
        let command = Command {
            tag,
            ok,
            op,
            addr,
            sent: Instant::now(),
            lost_at: None,
        };
        if !self.live() && self.redial.is_some() {
            self.recover();
            if !self.live() {
                return Err(not_connected());
            }
        }
        let cookie = match self.issue(op, addr) {
            Ok(cookie) => cookie,
            // Lost right now: a new connection takes it.
            Err(_) if !self.live() && self.redial.is_some() => {
                self.recover();
                if !self.live() {
                    return Err(not_connected());
                }
                self.issue(op, addr)?
            }
            Err(e) => return Err(e),
        };
        self.commands.insert(cookie, command);
        self.arm();
        Ok(())
    }

    /// Hands `op` on the data at `addr` to libnbd; its cookie.
    fn issue(&mut self, op: Op, addr: usize) -> io::Result<u64> {
        let ptr = addr as *mut u8;
        let Some(conn) = self.conn.as_ref() else {
            return Err(not_connected());
        };
        match op {
            Op::Read { len, offset, .. } => {
                // SAFETY: `addr` is a buffer of the pusher's, which keeps
                // it, untouched, until the command is retired (`NbdStore`
                // and `SharedStore` wait for their commands before their
                // pools go); `retire` reports a command only once libnbd is
                // done with it (a command sent again after a reconnect is
                // retired by its new connection, the old one having been
                // closed).
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

    /// Commands completed and not yet retired. The socket does not announce
    /// them when `drive` read their replies while it waited to send.
    pub(super) fn ready(&self) -> bool {
        !self.done.is_empty()
            || !self.refused.is_empty()
            || self
                .conn
                .as_ref()
                .is_some_and(|c| c.peek_completed().is_some())
    }

    /// Calls `f(tag, result)` for every command completed (result: bytes
    /// moved, or a negative errno); the number reported.
    pub(super) fn retire(&mut self, f: &mut impl FnMut(u64, i32)) -> usize {
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
    pub(super) fn wait(&mut self) -> io::Result<()> {
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
        let refused = match self.refused.len() {
            0 => String::new(),
            n => format!(", {n} of them refused by the server as it shut down"),
        };
        let mut again = self.salvage();
        let now = Instant::now();
        let mut expired = Vec::new();
        again.retain_mut(|c| {
            let since = *c.lost_at.get_or_insert(now);
            let keep = now < since + redial.timeout;
            if !keep {
                expired.push(*c);
            }
            keep
        });
        if !expired.is_empty() {
            log::error!(
                "NBD connection {}: {} commands unanswered for {:?} across reconnects fail \
                 (IOERR)",
                self.name,
                expired.len(),
                redial.timeout
            );
            self.fail(expired);
            if again.is_empty() {
                return; // nothing waits: the next command connects
            }
        }
        if self.stopped() {
            // A disconnect or SIGTERM that waited long enough: no new
            // connection for commands it gave up on.
            self.fail(again);
            return;
        }
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
        // A synchronous command's extension of a stop (`sync_grace`) is
        // not the stop's: the attempts end at the link's own stop deadline.
        let (deadline, stop) = match (self.sync_grace, self.stop_deadline()) {
            (Some(_), Some(at)) => (deadline.min(at), None),
            _ => (deadline, self.stop.as_deref()),
        };
        let conn = match redial.connect(&self.name, deadline, stop) {
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
        for mut c in again {
            match self.issue(c.op, c.addr) {
                Ok(cookie) => {
                    c.sent = Instant::now();
                    self.commands.insert(cookie, c);
                }
                Err(e) => self.done.push((c.tag, -errno_of(&e))),
            }
        }
        self.arm();
    }

    /// Closes the connection (if any) and returns the commands it did not
    /// answer (with those its server refused as it shut down); the answers
    /// it gave stand (an acknowledged write is done and never sent twice).
    fn salvage(&mut self) -> Vec<Command> {
        let mut again = std::mem::take(&mut self.refused);
        if let Some(conn) = self.conn.take() {
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
            // leaves the epoll set as it closes. A connection shut down
            // unanswered (see `expire`) closes at once.
            conn.shutdown_socket();
            drop(conn);
        }
        again.extend(std::mem::take(&mut self.commands).into_values());
        self.fd = -1;
        again
    }

    /// When the oldest unanswered command's time is up (None: no command
    /// waits, or no timeout).
    fn due(&self) -> Option<Instant> {
        let timeout = self.request_timeout?;
        let (_, oldest) = self.commands.first_key_value()?;
        Some(oldest.sent + timeout)
    }

    /// Keeps the timer set for the oldest command. Lazily: a timer that
    /// fires early (the command it was set for was answered) is set again
    /// for the oldest one then, so a busy queue sets it about once per
    /// timeout, not at every reply. Setting it also clears a firing.
    fn arm(&mut self) {
        let now = Instant::now();
        let due = self.due();
        if self.armed.is_some_and(|at| now < at) {
            return; // fires before anything can be due
        }
        let r = match due {
            Some(at) => self.timer.reset(
                at.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None if self.armed.is_some() => self.timer.clear(),
            None => return,
        };
        self.armed = if r.is_ok() { due } else { None };
    }

    /// Acts on the clock: a stop past its deadline abandons every command;
    /// a command unanswered past the request timeout shuts the connection
    /// down, which then counts as lost (`recover` sends the rest again on
    /// a new connection, or fails them).
    ///
    /// Why sending again is sound: once the socket is shut down the
    /// server can send no reply on it, so the command was never
    /// acknowledged and is never reported as done from there. A write the
    /// server had received may still land later, or not: a write in flight
    /// when a disk loses power, which the guest's file system survives (it
    /// relies only on acknowledged writes and FLUSH). Sent again on the new
    /// connection, the same bytes go to the same place, and the guest's
    /// answer comes from there. The window left: a server whose storage
    /// stalled longer than the timeout and that carries out the old
    /// connection's copy after the guest has overwritten the same blocks
    /// through the new connection brings the older data back. That needs a
    /// server that keeps executing a closed connection's commands for
    /// longer than the timeout; QEMU's NBD client has the same window when
    /// it reconnects. README "Network storage (NBD)" says so.
    fn expire(&mut self) {
        let now = Instant::now();
        if self.stopped() {
            self.abandon();
            return;
        }
        if let Some(at) = self.armed {
            if now >= at {
                self.armed = None;
                self.arm();
            }
        }
        let late = self.due().is_some_and(|at| now >= at);
        if late && !self.timed_out {
            if let Some(conn) = self.conn.as_ref() {
                log::warn!(
                    "NBD connection {}: the server has not answered a command for {:?} \
                     (a silent server or network); shutting the connection down and counting \
                     it as lost",
                    self.name,
                    self.request_timeout.unwrap_or_default()
                );
                self.timed_out = true;
                // Its next read sees the end: libnbd declares it dead.
                conn.shutdown_socket();
            }
        }
    }

    /// A stop waited long enough: closes the connection and fails every
    /// command it had not answered (IOERR), once; the log says how many.
    fn abandon(&mut self) {
        if self.commands.is_empty() && self.refused.is_empty() {
            return;
        }
        let unanswered = self.salvage();
        log::error!(
            "NBD connection {}: {} commands still unanswered at the end of the wait for them \
             (the VMM left, or cryptblk is stopping); connection closed, they fail (IOERR)",
            self.name,
            unanswered.len(),
        );
        self.fail(unanswered);
        self.arm();
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
    pub(super) fn drive(&mut self, block: bool) -> io::Result<()> {
        loop {
            self.expire();
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
            // Blocking, but never past the oldest command's time nor a
            // stop's deadline; a stop that begins meanwhile wakes us
            // (its eventfd stays readable while it is on, so it is
            // polled only until its deadline is known).
            let stop_at = self.stop_deadline();
            let timeout = if dir.write || waiting {
                poll_timeout([self.due(), stop_at].into_iter().flatten().min())
            } else {
                0
            };
            let mut pfds = [
                libc::pollfd {
                    fd: self.fd,
                    events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: -1, // ignored by poll(2)
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let (Some(stop), None, true) = (self.stop.as_deref(), stop_at, timeout != 0) {
                pfds[1].fd = stop.wake.as_raw_fd();
            }
            // SAFETY: two valid pollfds.
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let revents = pfds[0].revents;
            if revents == 0 {
                if timeout == 0 {
                    return Ok(());
                }
                continue; // a deadline or a stop: `expire` acts on it
            }
            // Both ready: read first (libnbd(3): a reply may change what is
            // to be written). An error here kills the connection, which
            // completes the commands in flight with errors: their owners
            // learn it through `reap` (or they are sent again).
            let r = if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                conn.notify_read()
            } else {
                conn.notify_write()
            };
            if let Err(e) = r {
                if self.timed_out {
                    // `expire` said why already.
                } else if conn.is_dead() {
                    log::warn!("NBD connection {}: {}", self.name, why_lost(&e));
                } else {
                    log::debug!("NBD connection: {e} (errno {})", errno_of(&e));
                }
            }
        }
    }
}

/// Why libnbd gave a connection up, for the log line that says so: the
/// server closed it, or broke the protocol (libnbd checks every reply's
/// magic, cookie, length and range against the command it answers, and
/// moves the connection to its dead state on the first that does not fit,
/// reading no further: a length from the wire is never used unchecked).
fn why_lost(e: &io::Error) -> String {
    let msg = e.to_string();
    let errno = errno_of(e);
    if msg.contains("disconnected") || msg.contains("recv:") || msg.contains("send:") {
        format!("the server closed the connection or it broke ({msg})")
    } else if errno == libc::EIO || errno == libc::EPROTO || errno == libc::EINVAL {
        format!("the server broke the NBD protocol ({msg}); dropping the connection")
    } else {
        format!("the connection failed ({msg})")
    }
}

/// NBD_ESHUTDOWN: the server is shutting down and answers no more; the
/// command was not done, and another server (the same one restarted) may
/// take it: with reconnecting on, a lost connection.
fn server_leaving(e: &io::Error) -> bool {
    errno_of(e) == libc::ESHUTDOWN
}

/// A new, empty epoll set.
pub(super) fn epoll_set() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the fd is owned right below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ep) })
}

/// poll(2)'s timeout until `at` (None: -1, no timeout), in milliseconds
/// rounded up: waking a little late is harmless, waking early spins.
pub(super) fn poll_timeout(at: Option<Instant>) -> i32 {
    at.map_or(-1, |at| {
        let left = at.saturating_duration_since(Instant::now());
        i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    })
}

/// Adds `fd` to the epoll set `events` (readable). A closed fd leaves the
/// set by itself.
pub(super) fn add_to(events: &OwnedFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: both fds are open; `ev` is a valid epoll_event.
    let rc = unsafe { libc::epoll_ctl(events.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "no connection to the NBD server",
    )
}

impl Link {
    /// Waits until no command is in flight: libnbd may fill or send their
    /// buffers until then (a dead connection has completed them all).
    fn settle(&mut self) {
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
    }
}

impl Drop for NbdStore {
    /// Waits for the commands in flight, then hands the connection back to
    /// its export (closing it instead if it still has any).
    fn drop(&mut self) {
        self.link.settle();
        let conn = self.link.conn.take();
        if let (Some(conn), Some((export, queue))) = (conn, self.home.take()) {
            if self.link.commands.is_empty() && !conn.is_dead() {
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
    use super::super::testkit::{
        read_back_64_reversed, reap_n, run, write_64_at_once, write_sync_read,
    };
    use super::super::Store;
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
        Connection::connect(
            &server.uri,
            &Tls::default(),
            "test",
            REQUEST_TIMEOUT_NO_RECONNECT,
        )
        .expect("connect")
    }

    fn store(server: &Nbdkit) -> NbdStore {
        NbdStore::new(connect(server), Buffers::new(16, 65536)).unwrap()
    }

    fn writes_reads_flushes_and_trims(transport: Transport) {
        let server = Nbdkit::start(transport, &["memory", "size=16M"]);
        let conn = connect(&server);
        let info = conn.info().unwrap();
        assert_eq!(info.size, 16 << 20);
        assert!(!info.read_only && info.can_flush && info.can_trim && info.can_multi_conn);
        drop(conn);

        let mut s = Store::Nbd(store(&server));
        let (b, read) = write_sync_read(&mut s);

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
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn unix_socket_writes_reads_flushes_and_trims() {
        writes_reads_flushes_and_trims(Transport::Unix);
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn tcp_writes_reads_flushes_and_trims() {
        writes_reads_flushes_and_trims(Transport::Tcp);
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn many_commands_in_flight_complete_and_data_verifies() {
        let server = Nbdkit::start(Transport::Tcp, &["memory", "size=64M"]);
        let mut s = Store::Nbd(NbdStore::new(connect(&server), Buffers::new(64, 65536)).unwrap());
        // 64 writes of 64 KiB in flight at once: more than a socket buffer
        // holds, so `submit` has to wait for room.
        let at = |i: u16| u64::from(i) * 65536;
        let mut seen = write_64_at_once(&mut s, at);
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
        read_back_64_reversed(&mut s, at);
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

    /// A server without multi-conn (nbdkit serving one connection at a
    /// time): two queues on two threads and synchronous commands share one
    /// connection, each queue with 64 writes in flight at once, and every
    /// byte verifies; then 32 commands of one queue are on the connection
    /// at once (a synchronous connection would hold one). nbdkit's log
    /// shows one connection.
    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn queues_share_one_connection_with_many_commands_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("nbdkit.log");
        let logfile = format!("logfile={}", log.display());
        let server = Nbdkit::start(
            Transport::Unix,
            &[
                "--filter=log",
                "--filter=noparallel",
                "memory",
                "size=64M",
                "serialize=connections",
                &logfile,
            ],
        );
        let export =
            NbdExport::open(&server.uri, &Tls::default(), 2, Duration::from_secs(5)).unwrap();
        assert!(!export.per_queue());
        let queues: Vec<_> = (0..2u64)
            .map(|q| {
                let export = export.clone();
                std::thread::spawn(move || {
                    let buffers = Buffers::new(128, 65536);
                    let mut s = export.store(q as usize, buffers).unwrap().unwrap();
                    assert!(matches!(s, Store::NbdShared(_)));
                    let at = move |i: u16| (q * 64 + u64::from(i)) * 65536;
                    let mut seen = write_64_at_once(&mut s, at);
                    seen.sort();
                    assert_eq!(seen, (0..64).collect::<Vec<_>>());
                    read_back_64_reversed(&mut s, at);
                })
            })
            .collect();
        // Synchronous commands meanwhile, on the same connection.
        let far = 200 * 65536;
        export.pwrite(&[0x77; 65536], far).unwrap();
        export.flush().unwrap();
        let mut back = vec![0u8; 65536];
        export.pread(&mut back, far).unwrap();
        assert!(back.iter().all(|&b| b == 0x77));
        for q in queues {
            q.join().unwrap();
        }
        // Queue 1's write from buffer 5 (filled with 6), read synchronously.
        export.pread(&mut back, (64 + 5) * 65536).unwrap();
        assert!(back.iter().all(|&b| b == 6));
        let mut s = export.store(0, Buffers::new(32, 4096)).unwrap().unwrap();
        for i in 0..32u16 {
            let op = Op::Read {
                buf: i,
                len: 4096,
                offset: u64::from(i) * 4096,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        let on_the_connection = export.shared.as_ref().unwrap().commands_in_flight();
        assert_eq!(on_the_connection, 32);
        reap_n(&mut s, 32, |_, r| assert_eq!(r, 4096));
        drop(s);
        drop(export);
        let said = std::fs::read_to_string(&log).unwrap();
        assert_eq!(said.matches(" Connect ").count(), 1, "{said}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn a_lost_connection_says_what_the_server_did() {
        let libnbd = |msg: &str, errno| {
            io::Error::other(super::super::libnbd::ErrnoError::for_test(errno, msg))
        };
        let garbage = libnbd(
            "nbd_aio_notify_read: invalid server reply length",
            libc::EIO,
        );
        let why = why_lost(&garbage);
        assert!(
            why.starts_with("the server broke the NBD protocol"),
            "{why}"
        );
        assert!(why.contains("invalid server reply length"), "{why}");
        let gone = libnbd(
            "nbd_aio_notify_read: recv: server disconnected unexpectedly",
            libc::EIO,
        );
        assert!(why_lost(&gone).starts_with("the server closed the connection"));
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
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
        let mut s = Store::Nbd(store(&server));
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

    /// A command the server leaves unanswered (nbdkit's delay filter
    /// holding reads for 20 s) wakes the event fd the vring thread waits
    /// on at its timeout, not before, with no call into the store
    /// meanwhile (the queue's timer); reaping then finds the connection
    /// shut down and the command failed (reconnecting off).
    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn an_unanswered_command_wakes_the_event_fd_at_its_timeout() {
        let server = Nbdkit::start(
            Transport::Unix,
            &["--filter=delay", "memory", "size=1M", "delay-read=20"],
        );
        let mut s = store(&server);
        s.link.request_timeout = Some(Duration::from_millis(600));
        let b = s.buffers().take().unwrap();
        let op = Op::Read {
            buf: b,
            len: 4096,
            offset: 0,
        };
        let start = Instant::now();
        s.push(op, 1).unwrap();
        s.submit().unwrap();
        let fd = s.event_fd();
        let poll = super::super::libnbd::poll_fd;
        assert_eq!(
            poll(fd, libc::POLLIN, Duration::from_millis(300)).unwrap(),
            0
        );
        assert_ne!(poll(fd, libc::POLLIN, Duration::from_secs(5)).unwrap(), 0);
        let woke = start.elapsed();
        assert!(
            woke >= Duration::from_millis(550) && woke < Duration::from_secs(3),
            "woke after {woke:?}"
        );
        let mut results = Vec::new();
        while results.is_empty() {
            s.reap(|t, r| results.push((t, r))).unwrap();
            if results.is_empty() {
                s.wait().unwrap();
            }
            assert!(start.elapsed() < Duration::from_secs(5), "hangs");
        }
        assert_eq!(results.len(), 1);
        assert!(results[0].1 < 0, "{results:?}");
        assert!(s.connection().unwrap().is_dead());
    }

    /// A server that never answers one command but answers the others
    /// (nbdkit's delay filter holding reads for 20 s, writes at once):
    /// the read times out, is sent again on a new connection, times out
    /// again, and fails once the reconnect timeout has passed since it was
    /// first lost, although writes succeed on the new connections
    /// meanwhile. Without that rule it would be sent again forever. (nbdkit
    /// sometimes stalls a moment after a connection with delayed reads is
    /// closed, refusing connections and leaving a write unanswered: such a
    /// write may fail too; the test needs enough that succeed.)
    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
    fn a_command_silent_on_every_connection_fails_after_the_reconnect_timeout() {
        let server = Nbdkit::start(
            Transport::Unix,
            &["--filter=delay", "memory", "size=1M", "delay-read=20"],
        );
        let timeout = Duration::from_secs(1);
        let export = NbdExport::open(&server.uri, &Tls::default(), 1, timeout).unwrap();
        let mut s = export.store(0, Buffers::new(4, 4096)).unwrap().unwrap();
        let (r, w) = (s.buffers().take().unwrap(), s.buffers().take().unwrap());
        let read = Op::Read {
            buf: r,
            len: 4096,
            offset: 0,
        };
        let write = Op::Write {
            buf: w,
            len: 4096,
            offset: 8192,
        };
        let start = Instant::now();
        s.push(read, 1).unwrap();
        s.submit().unwrap();
        let mut read_result = None;
        let (mut writes, mut failed) = (0, 0);
        while read_result.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(8),
                "sent again forever"
            );
            s.push(write, 2).unwrap();
            s.submit().unwrap();
            let mut written = false;
            while !written && read_result.is_none() {
                s.wait().unwrap();
                s.reap(|tag, r| match tag {
                    1 => read_result = Some(r),
                    _ => {
                        written = true;
                        if r == 4096 {
                            writes += 1;
                        } else {
                            failed += 1;
                        }
                    }
                })
                .unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = start.elapsed();
        assert!(read_result.unwrap() < 0);
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
            "failed after {took:?}"
        );
        assert!(
            writes > 5 && failed <= 2,
            "{writes} writes answered, {failed} failed: the server answered too few"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs nbdkit and libnbd: ./test.sh runs it"
    )]
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
