//! Asynchronous image I/O on an NBD export: the same shape as `UringStore`
//! (push, submit, reap, wait, a pool of buffers), over one libnbd
//! connection owned by one queue's vring thread.
//!
//! The connection's socket takes the place of io_uring's eventfd: the vring
//! thread's epoll waits on it (readable) beside the kick fd, and `reap`
//! lets libnbd read the replies that arrived. Requests go out as they are
//! pushed; one that does not fit in the socket's send buffer is finished by
//! `submit`, which waits for the socket to drain (reading replies
//! meanwhile, so a server that is blocked sending us replies never
//! deadlocks against us). The vring thread therefore only ever waits for
//! readability, the one event vhost-user-backend's epoll registration can
//! express without re-registering, and a slow server slows its queue down
//! (backpressure) instead of growing a queue in memory.
//!
//! Buffers: libnbd reads into and writes from pool buffers, which stay
//! untouched until the command is retired; dropping the store closes the
//! connection (after which libnbd touches no buffer) before the pool is
//! freed.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use super::libnbd::{errno_of, Connection, ExportInfo, Tls};
use super::{Buffers, Op};

/// Whether an `--image` names an NBD export (an NBD URI) rather than a file.
pub fn is_uri(image: &Path) -> bool {
    image.to_str().is_some_and(|s| {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|scheme| s.starts_with(scheme))
    })
}

/// An NBD export as the daemon uses it, connected at start-up (before the
/// sandbox, which allows no new sockets): one connection for synchronous
/// commands (LUKS headers, the synchronous data path, the final flush) and,
/// when the server allows several connections (NBD_FLAG_CAN_MULTI_CONN),
/// one per queue for that queue's asynchronous store.
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
    sync: Connection,
    queues: Vec<Mutex<Option<Connection>>>,
}

impl NbdExport {
    /// Connects to `uri`, and with multi-conn `queues` more times.
    pub fn open(uri: &str, tls: &Tls, queues: usize) -> io::Result<Arc<Self>> {
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
        Ok(Arc::new(NbdExport {
            uri: uri.to_string(),
            info,
            sync,
            queues,
        }))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The connection for synchronous commands.
    pub fn sync(&self) -> &Connection {
        &self.sync
    }

    /// Whether queues get connections of their own (asynchronous I/O).
    pub fn per_queue(&self) -> bool {
        !self.queues.is_empty()
    }

    /// A store on queue `queue`'s connection; the connection comes back
    /// here when the store is dropped (the next vhost-user connection's
    /// queue uses it). None: no connection for it (no multi-conn, or it
    /// died).
    pub fn store(self: &Arc<Self>, queue: usize, buffers: Buffers) -> io::Result<Option<NbdStore>> {
        let Some(slot) = self.queues.get(queue) else {
            return Ok(None);
        };
        let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(conn) = taken.filter(|c| !c.is_dead()) else {
            return Ok(None);
        };
        let mut store = NbdStore::new(conn, buffers)?;
        store.can_flush = self.info.can_flush;
        store.home = Some((self.clone(), queue));
        Ok(Some(store))
    }
}

/// TLS settings for the connections the LUKS code opens (set by `serve`
/// from its options; `format`, `key` and `dump` use none).
static LUKS_TLS: OnceLock<Tls> = OnceLock::new();

/// Lets the LUKS code read and write headers on NBD URIs (through libnbd's
/// synchronous calls on a connection of their own): call once at start-up.
pub fn install_luks_opener(tls: Option<Tls>) {
    if let Some(tls) = tls {
        let _ = LUKS_TLS.set(tls);
    }
    crate::luks::device::set_opener(crate::luks::device::Opener {
        claims: is_uri,
        open: |path, _write| {
            let uri = path.to_str().unwrap_or_default();
            let tls = LUKS_TLS.get().cloned().unwrap_or_default();
            let conn = Connection::connect(uri, &tls, "cryptblk-luks")?;
            let info = conn.info()?;
            Ok(Box::new(HeaderDevice { conn, info }))
        },
    });
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

pub struct NbdStore {
    /// Declared before `buffers`: dropped (closed) first. Always Some but
    /// in Drop, which may hand it back to its export.
    conn: Option<Connection>,
    fd: RawFd,
    buffers: Buffers,
    /// Commands in flight: cookie → (tag, result on success).
    commands: HashMap<u64, (u64, i32)>,
    /// Completed without a command (FLUSH on a server that needs none).
    done: Vec<(u64, i32)>,
    /// The server takes NBD_CMD_FLUSH. One that does not has no volatile
    /// cache to flush (the NBD spec forbids sending it FLUSH): a FLUSH then
    /// completes at once, every acknowledged write already being stable.
    can_flush: bool,
    home: Option<(Arc<NbdExport>, usize)>,
}

impl NbdStore {
    /// A store on a connected `conn` with `buffers` as its I/O buffers.
    pub fn new(conn: Connection, buffers: Buffers) -> io::Result<Self> {
        let fd = conn.fd()?;
        Ok(NbdStore {
            conn: Some(conn),
            fd,
            buffers,
            commands: HashMap::with_capacity(256),
            done: Vec::new(),
            can_flush: true,
            home: None,
        })
    }

    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("connection taken outside Drop")
    }

    /// Readable when replies are waiting (or the server hung up): register
    /// it beside the kick fd.
    pub fn event_fd(&self) -> RawFd {
        self.fd
    }

    pub fn connection(&self) -> &Connection {
        self.conn()
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    /// Pushed and not yet reaped: libnbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.commands.len() + self.done.len()
    }

    /// Sends `op` (as far as the socket takes it; `submit` sends the rest).
    /// `tag` comes back with its result.
    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        let (cookie, ok) = match op {
            Op::Read { buf, len, offset } => {
                let ptr = self.buffers.ptr(buf);
                // SAFETY: the buffer run belongs to the pool, which outlives
                // the connection (field order); the caller does not touch it
                // between pushing and reaping, and `reap` retires the
                // command before reporting it.
                let cookie = unsafe { self.conn().aio_pread(ptr, len as usize, offset) }?;
                (cookie, len as i32)
            }
            Op::Write { buf, len, offset } => {
                let ptr = self.buffers.ptr(buf);
                // SAFETY: as for Read.
                let cookie = unsafe { self.conn().aio_pwrite(ptr, len as usize, offset) }?;
                (cookie, len as i32)
            }
            Op::Sync if !self.can_flush => {
                self.done.push((tag, 0));
                return Ok(());
            }
            Op::Sync => (self.conn().aio_flush()?, 0),
            Op::Discard { offset, len } => (self.conn().aio_trim(offset, len)?, 0),
        };
        self.commands.insert(cookie, (tag, ok));
        Ok(())
    }

    /// Finishes sending what `push` could not, without waiting for replies.
    pub fn submit(&mut self) -> io::Result<()> {
        self.drive(false)
    }

    /// Commands completed and not yet reaped. The socket does not announce
    /// them when `submit` read their replies while it waited to send.
    pub fn ready(&self) -> bool {
        !self.done.is_empty()
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
        while let Some(cookie) = conn.peek_completed() {
            let Some(result) = conn.command_completed(cookie) else {
                break;
            };
            let Some((tag, ok)) = self.commands.remove(&cookie) else {
                continue;
            };
            f(tag, result.map_or_else(|errno| -errno, |()| ok));
            n += 1;
        }
        n
    }

    /// Blocks until at least one command has completed (for draining a
    /// queue, and a lone request; the data path otherwise never blocks).
    pub fn wait(&mut self) -> io::Result<()> {
        if self.commands.is_empty() || !self.done.is_empty() {
            return Ok(());
        }
        self.drive(true)
    }

    /// Runs libnbd's state machine while the socket is ready: sends what is
    /// queued (waiting for room if need be) and reads what arrived. With
    /// `block`, also waits until some command has completed. A connection
    /// that dies completes every command with an error; nothing blocks on
    /// a dead one.
    fn drive(&mut self, block: bool) -> io::Result<()> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(());
        };
        loop {
            if conn.is_dead() {
                return Ok(());
            }
            let dir = conn.direction();
            let waiting = block && conn.peek_completed().is_none();
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
            // learn it through `reap`.
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

impl Drop for NbdStore {
    /// Waits for the commands in flight (libnbd may still fill or send
    /// their buffers; a dead connection has completed them all), then hands
    /// a live connection back to its export.
    fn drop(&mut self) {
        while !self.commands.is_empty() {
            let before = self.commands.len();
            if self.wait().is_err() {
                break;
            }
            self.retire(&mut |_, _| {});
            if self.commands.len() == before && self.conn().is_dead() {
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
        assert!(s.connection().is_dead());
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
