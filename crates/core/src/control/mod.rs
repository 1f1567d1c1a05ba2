//! The control socket (`--control PATH`): JSON lines in QMP's spirit.
//! A request `{"execute": "NAME", "arguments": {...}}` gets one line back,
//! `{"return": ...}` or `{"error": {"class": "...", "desc": "..."}}`.
//!
//! It runs on a thread of its own, never on a vring thread, serving at most
//! [`MAX_CLIENTS`] clients at once through poll(2). A client must finish
//! each line within [`READ_TIMEOUT`] and keep it under [`MAX_LINE`] bytes,
//! or it is told why and disconnected; one that does not read its answers
//! is disconnected too (its socket is non-blocking). Only accept4, read,
//! write, poll, ioctl(FIONBIO), shutdown and close run here, all in the
//! seccomp allowlist already.

pub mod client;
mod commands;
pub mod prometheus;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::device::BlkDevice;
use crate::socket::{self, SocketAccess, SocketError, SocketFile};

/// Longest request line accepted, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send a line (or stay idle between lines).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are told so and disconnected.
pub const MAX_CLIENTS: usize = 4;

/// The listening control socket and its file (removed at exit).
pub struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl ControlSocket {
    /// Creates the socket at `path`, mode 0600 whatever the umask (only the
    /// daemon's user may ask it anything).
    pub fn listen(path: &Path) -> Result<Self, SocketError> {
        let listener = socket::listen(path, &SocketAccess::default())?;
        let file = SocketFile::open(path)?;
        Ok(ControlSocket { listener, file })
    }

    /// The directory fd the socket is removed through (for the sandbox).
    pub fn dir_fd(&self) -> std::os::fd::RawFd {
        self.file.dir_fd()
    }

    /// Serves commands about `dev` on a thread of its own; returns the
    /// socket file, which the caller removes at exit (removed here if the
    /// thread cannot start).
    pub fn start(self, dev: Arc<BlkDevice>, image: PathBuf) -> io::Result<SocketFile> {
        let ControlSocket { listener, file } = self;
        let ctx = Context { dev, image };
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &ctx));
        if let Err(e) = spawned {
            file.remove();
            return Err(e);
        }
        Ok(file)
    }

    /// Closes the socket and removes its file (start-up failed).
    pub fn close(self) {
        drop(self.listener);
        self.file.remove();
    }
}

/// What commands answer from.
pub(crate) struct Context {
    pub dev: Arc<BlkDevice>,
    pub image: PathBuf,
}

/// One client: its unanswered input and when its next line is due.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

/// What reading a client's input left it as.
enum State {
    Open,
    /// Hang up, after this reply if any.
    Close(Option<Value>),
}

/// The control thread: poll(2) over the listener and at most
/// `MAX_CLIENTS` non-blocking clients. One thread whatever the number of
/// clients (a thread per client would also make glibc's allocator look
/// for the CPU count in /sys, which the sandbox forbids).
fn accept_loop(listener: &UnixListener, ctx: &Context) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CLIENTS);
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let now = Instant::now();
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        poll(&mut fds, wait);
        let ready: Vec<bool> = fds[1..].iter().map(|f| f.revents != 0).collect();
        let mut kept = Vec::with_capacity(MAX_CLIENTS);
        for (mut conn, ready) in conns.drain(..).zip(ready) {
            let state = if ready {
                read_and_answer(&mut conn, ctx)
            } else if Instant::now() >= conn.deadline {
                State::Close(Some(timeout()))
            } else {
                State::Open
            };
            match state {
                State::Open => kept.push(conn),
                State::Close(reply) => {
                    if let Some(reply) = reply {
                        let _ = send(&mut conn.stream, &reply);
                    }
                    hang_up(&mut conn.stream);
                }
            }
        }
        conns = kept;
        if fds[0].revents != 0 {
            accept_one(listener, &mut conns);
        }
    }
}

fn accept_one(listener: &UnixListener, conns: &mut Vec<Conn>) {
    let mut stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e) => {
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
    };
    if conns.len() >= MAX_CLIENTS {
        let busy = error(
            "TooManyClients",
            &format!("{MAX_CLIENTS} control clients are connected already; try again later"),
        );
        let _ = stream.set_nonblocking(true);
        let _ = send(&mut stream, &busy);
        return;
    }
    if stream.set_nonblocking(true).is_ok() {
        conns.push(Conn {
            stream,
            buf: Vec::with_capacity(1024),
            deadline: Instant::now() + READ_TIMEOUT,
        });
    }
}

/// Reads what the client sent and answers every complete line.
fn read_and_answer(conn: &mut Conn, ctx: &Context) -> State {
    let mut chunk = [0u8; 4096];
    loop {
        let room = (MAX_LINE - conn.buf.len()).min(chunk.len());
        if room == 0 {
            break;
        }
        match conn.stream.read(&mut chunk[..room]) {
            Ok(0) => return State::Close(None),
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return State::Close(None),
        }
    }
    while let Some(end) = conn.buf.iter().position(|&b| b == b'\n') {
        let reply = commands::execute(ctx, &conn.buf[..end]);
        conn.buf.drain(..=end);
        conn.deadline = Instant::now() + READ_TIMEOUT;
        // A client that does not read its answers is not waited for.
        if send(&mut conn.stream, &reply).is_err() {
            return State::Close(None);
        }
    }
    if conn.buf.len() >= MAX_LINE {
        return State::Close(Some(error(
            "LineTooLong",
            &format!("requests are at most {MAX_LINE} bytes per line; disconnecting"),
        )));
    }
    State::Open
}

fn timeout() -> Value {
    error(
        "Timeout",
        &format!(
            "no complete line within {} s; disconnecting (send whole lines ending in \\n)",
            READ_TIMEOUT.as_secs()
        ),
    )
}

/// poll(2), retried when a signal interrupts it.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> usize {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return n as usize;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

/// Ends a connection the client may still be writing to: closing with
/// unread input would reset it and lose the reply just sent, so the input
/// already there is read and dropped first (at most 1 MiB, no waiting).
fn hang_up(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    let mut left = 1usize << 20;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

fn send(stream: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// `{"error": {"class": CLASS, "desc": DESC}}`
pub(crate) fn error(class: &str, desc: &str) -> Value {
    json!({ "error": { "class": class, "desc": desc } })
}
