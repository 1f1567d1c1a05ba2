//! The NBD client: libnbd (the NBD project's own C library) behind a safe
//! interface. This module is the only place that knows libnbd's C API.
//!
//! libnbd is loaded at run time with dlopen(3), not linked: `cargo build`
//! needs no C library, and only a daemon that is asked for an `nbd://` image
//! needs `libnbd.so.0` (Debian: libnbd0). Every signature below is copied
//! from /usr/include/libnbd.h of libnbd 1.14 (Debian bookworm); every call
//! used here exists since libnbd 1.0 except `nbd_get_block_size` (1.4) and
//! `nbd_aio_connect_socket` (1.2).
//!
//! Threads: libnbd locks each handle inside every call, so a `Connection`
//! may be shared between threads; the error of a failed call is kept per
//! thread (nbd_get_error / nbd_get_errno), read right after the call.
//!
//! Asynchronous commands (`aio_*`) take no completion callback (the
//! NBD_NULL_COMPLETION of the C API): the command stays in the handle until
//! `command_completed` retires it. Their buffers are the caller's until then,
//! which is why those calls are `unsafe`.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The library's file name (its soname), and the Debian package that has it.
const SONAME: &CStr = c"libnbd.so.0";
pub const PACKAGE: &str = "libnbd0";

#[repr(C)]
struct Handle {
    _opaque: [u8; 0],
}

/// `nbd_completion_callback`, passed by value. Only ever passed empty
/// (NBD_NULL_COMPLETION: `{ .callback = NULL }`, the rest zero).
#[repr(C)]
struct CompletionCallback {
    callback: Option<unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int>,
    user_data: *mut c_void,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
}

const NULL_COMPLETION: CompletionCallback = CompletionCallback {
    callback: None,
    user_data: std::ptr::null_mut(),
    free: None,
};

const LIBNBD_TLS_DISABLE: c_int = 0;
const LIBNBD_TLS_REQUIRE: c_int = 2;
const LIBNBD_SIZE_MINIMUM: c_int = 0;
const LIBNBD_SIZE_PREFERRED: c_int = 1;
const LIBNBD_SIZE_MAXIMUM: c_int = 2;
const LIBNBD_AIO_DIRECTION_READ: c_uint = 1;
const LIBNBD_AIO_DIRECTION_WRITE: c_uint = 2;

/// Declares the table of libnbd functions: one field per C function, with
/// the C signature, looked up by name when the library is loaded.
macro_rules! api {
    ($( fn $name:ident ( $($arg:ty),* ) -> $ret:ty; )*) => {
        #[allow(non_snake_case)]
        struct Api {
            $( $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        /// Each function's Rust signature, for the test that compares them
        /// with libnbd.h.
        #[cfg(test)]
        const SIGNATURES: &[(&str, &str)] = &[
            $( (stringify!($name), stringify!(($($arg),*) -> $ret)), )*
        ];

        impl Api {
            /// # Safety
            /// `lib` is a handle from dlopen of libnbd.so.0, never closed.
            unsafe fn resolve(lib: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: `lib` is a live dlopen handle and `name`
                        // a NUL-terminated string.
                        let sym = unsafe { libc::dlsym(lib, name.as_ptr().cast()) };
                        if sym.is_null() {
                            return Err(format!("{} has no {}", SONAME.to_string_lossy(), stringify!($name)));
                        }
                        // SAFETY: the symbol is libnbd's function of that
                        // name, whose C signature (libnbd.h) is the one
                        // declared here.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(sym) }
                    }, )*
                })
            }
        }
    };
}

api! {
    fn nbd_create() -> *mut Handle;
    fn nbd_close(*mut Handle) -> ();
    fn nbd_get_error() -> *const c_char;
    fn nbd_get_errno() -> c_int;
    fn nbd_set_handle_name(*mut Handle, *const c_char) -> c_int;
    fn nbd_set_export_name(*mut Handle, *const c_char) -> c_int;
    fn nbd_get_export_name(*mut Handle) -> *mut c_char;
    fn nbd_set_tls(*mut Handle, c_int) -> c_int;
    fn nbd_get_tls(*mut Handle) -> c_int;
    fn nbd_set_tls_certificates(*mut Handle, *const c_char) -> c_int;
    fn nbd_set_tls_verify_peer(*mut Handle, bool) -> c_int;
    fn nbd_set_request_structured_replies(*mut Handle, bool) -> c_int;
    fn nbd_set_tls_username(*mut Handle, *const c_char) -> c_int;
    fn nbd_set_tls_psk_file(*mut Handle, *const c_char) -> c_int;
    fn nbd_supports_tls(*mut Handle) -> c_int;
    fn nbd_aio_connect_uri(*mut Handle, *const c_char) -> c_int;
    fn nbd_aio_connect_socket(*mut Handle, c_int) -> c_int;
    fn nbd_aio_is_ready(*mut Handle) -> c_int;
    fn nbd_is_read_only(*mut Handle) -> c_int;
    fn nbd_can_flush(*mut Handle) -> c_int;
    fn nbd_can_trim(*mut Handle) -> c_int;
    fn nbd_can_multi_conn(*mut Handle) -> c_int;
    fn nbd_get_size(*mut Handle) -> i64;
    fn nbd_get_block_size(*mut Handle, c_int) -> i64;
    fn nbd_shutdown(*mut Handle, u32) -> c_int;
    fn nbd_aio_pread(*mut Handle, *mut c_void, usize, u64, CompletionCallback, u32) -> i64;
    fn nbd_aio_pwrite(*mut Handle, *const c_void, usize, u64, CompletionCallback, u32) -> i64;
    fn nbd_aio_flush(*mut Handle, CompletionCallback, u32) -> i64;
    fn nbd_aio_trim(*mut Handle, u64, u64, CompletionCallback, u32) -> i64;
    fn nbd_aio_get_fd(*mut Handle) -> c_int;
    fn nbd_aio_get_direction(*mut Handle) -> c_uint;
    fn nbd_aio_notify_read(*mut Handle) -> c_int;
    fn nbd_aio_notify_write(*mut Handle) -> c_int;
    fn nbd_aio_is_dead(*mut Handle) -> c_int;
    fn nbd_aio_is_closed(*mut Handle) -> c_int;
    fn nbd_aio_in_flight(*mut Handle) -> c_int;
    fn nbd_aio_peek_command_completed(*mut Handle) -> i64;
    fn nbd_aio_command_completed(*mut Handle, u64) -> c_int;
}

/// libnbd could not be loaded (or lacks a function): the message says
/// which package to install.
#[derive(Debug, Clone, thiserror::Error)]
#[error("NBD images need libnbd, which cannot be loaded ({reason}); install the Debian package {PACKAGE} (apt-get install {PACKAGE})")]
pub struct Missing {
    reason: String,
}

/// Loads libnbd once per process; later calls return the same table.
fn api() -> Result<&'static Api, Missing> {
    static API: OnceLock<Result<Api, Missing>> = OnceLock::new();
    API.get_or_init(|| load(SONAME))
        .as_ref()
        .map_err(Clone::clone)
}

fn load(soname: &CStr) -> Result<Api, Missing> {
    let lib = super::dl::open(soname).map_err(|reason| Missing { reason })?;
    // SAFETY: `lib` is the live handle just opened.
    unsafe { Api::resolve(lib) }.map_err(|reason| Missing { reason })
}

/// Whether libnbd can be loaded here (tests, and checks before start-up).
pub fn available() -> Result<(), Missing> {
    api().map(|_| ())
}

/// TLS settings beyond what the URI says (`nbds://` requires TLS).
#[derive(Debug, Clone)]
pub struct Tls {
    /// A directory of X.509 files (ca-cert.pem, client-cert.pem,
    /// client-key.pem), as qemu-nbd's and nbdkit's `--tls-certificates`.
    pub certificates: Option<String>,
    /// A PSK file in GnuTLS psktool's `username:hexkey` format.
    pub psk_file: Option<String>,
    /// The username to pick from the PSK file (or to present with X.509).
    pub username: Option<String>,
    /// Check the server's certificate (X.509 only); on by default.
    pub verify_peer: bool,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certificates: None,
            psk_file: None,
            username: None,
            verify_peer: true,
        }
    }
}

/// What the server said about the export during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_multi_conn: bool,
    /// Block size constraints (NBD_INFO_BLOCK_SIZE); 1, 4096 and 32 MiB
    /// (the NBD spec's defaults) when the server sends none.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// Which way the connection's fd must be ready for the state machine to go
/// on (nbd_aio_get_direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Direction {
    pub read: bool,
    pub write: bool,
}

/// Calls libnbd function `$f` on the connection's handle.
macro_rules! call {
    ($conn:expr, $f:ident $(, $arg:expr)*) => {{
        let (api, h) = ($conn.api, $conn.h);
        // SAFETY: `h` is the live handle the Connection owns (closed only
        // by Drop); the signature is libnbd.h's (checked by a test); every
        // pointer argument is valid for the call, as its caller states, and
        // libnbd copies the strings it keeps.
        unsafe { (api.$f)(h $(, $arg)*) }
    }};
}

/// One connection (one libnbd handle) to an NBD export.
pub struct Connection {
    api: &'static Api,
    h: *mut Handle,
    /// How long a synchronous call (`pread`, `pwrite`, `flush`, `trim`)
    /// waits for its answer, in milliseconds (0: forever). A call that
    /// times out shuts the socket down: see `finish`.
    sync_timeout_ms: AtomicU64,
    /// One synchronous call at a time drives the connection (libnbd's own
    /// synchronous calls hold the handle's lock for the whole call, so this
    /// is what they did too); two threads polling one socket could each
    /// consume the wake-up meant for the other.
    sync_calls: Mutex<()>,
}

// SAFETY: libnbd handles may be used from any thread and from several at
// once: every libnbd call takes the handle's own lock (libnbd(3),
// "MULTI-THREADING"); errors are reported through thread-local storage,
// read on the thread that made the failed call.
unsafe impl Send for Connection {}
// SAFETY: as for Send.
unsafe impl Sync for Connection {}

impl Connection {
    /// Connects to `uri` (nbd://, nbd+unix://, nbds://, nbds+unix://) and
    /// completes the handshake within `timeout`: a server that accepts the
    /// connection and never speaks cannot hold the caller (serve's start-up,
    /// `format`, `key`, `dump`) for ever. The synchronous calls then wait
    /// as long for each answer (`set_sync_timeout` changes that).
    pub fn connect(uri: &str, tls: &Tls, name: &str, timeout: Duration) -> io::Result<Connection> {
        let deadline = Instant::now() + timeout;
        let conn = Self::create(name)?;
        conn.configure_tls(tls, uri.starts_with("nbds"))?;
        let curi = cstring(uri)?;
        // Libnbd copies the URI.
        let rc = call!(conn, nbd_aio_connect_uri, curi.as_ptr());
        conn.check(rc, "connect")
            .and_then(|_| conn.wait_until_ready(deadline))
            .map_err(|e| {
                if e.to_string().contains("gnutls") {
                    // GnuTLS says how the handshake broke, not why.
                    io::Error::new(e.kind(), format!("{e}: {}", tls_hint(tls, &e)))
                } else {
                    e
                }
            })?;
        conn.set_sync_timeout(timeout);
        Ok(conn)
    }

    /// Connects again to where `endpoint` says, as another connection made
    /// by `connect` did: a socket of our own connected to the address that
    /// connection reached (no URI parsing, no name lookup: nothing opens a
    /// file, so it works under the sandbox), the same export name and TLS
    /// settings, and the handshake. Gives up at `deadline`.
    ///
    /// TLS reads its credentials (the PSK file, certificates) from files
    /// during the handshake: the sandbox leaves those readable (see
    /// `sandbox::NbdPeer::tls`).
    pub fn connect_to(
        endpoint: &Endpoint,
        tls: &Tls,
        name: &str,
        deadline: Instant,
    ) -> io::Result<Connection> {
        let conn = Self::create(name)?;
        conn.configure_tls(tls, endpoint.tls)?;
        // The string is copied by libnbd.
        conn.check(
            call!(conn, nbd_set_export_name, endpoint.export.as_ptr()),
            "nbd_set_export_name",
        )?;
        conn.handshake_on(endpoint.connect_socket(deadline)?, deadline)?;
        Ok(conn)
    }

    /// Gives the connected `sock` to libnbd and drives the handshake on
    /// it until it is done, giving up at `deadline`.
    fn handshake_on(&self, sock: OwnedFd, deadline: Instant) -> io::Result<()> {
        // The handle owns the socket from the call on, also when the call
        // fails: libnbd closes it on every failure path there, including
        // a handshake that breaks within the call (a fast server's bad
        // greeting). Letting it go only after a successful call closed it
        // twice then, and the second close could hit another thread's
        // new fd. (The one failure that leaves it open, a handle in the
        // wrong state, cannot happen to a handle just created.)
        let rc = call!(self, nbd_aio_connect_socket, sock.into_raw_fd());
        self.check(rc, "nbd_aio_connect_socket")
            .map_err(handshake_error)?;
        self.wait_until_ready(deadline)
    }

    /// Drives a connection being made until its handshake is done, giving
    /// up at `deadline`.
    fn wait_until_ready(&self, deadline: Instant) -> io::Result<()> {
        let fd = self.fd()?;
        loop {
            if call!(self, nbd_aio_is_ready) == 1 {
                return Ok(());
            }
            if self.is_dead() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server ended the NBD handshake",
                ));
            }
            let dir = self.direction();
            let mut events = 0;
            if dir.read {
                events |= libc::POLLIN;
            }
            if dir.write {
                events |= libc::POLLOUT;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the NBD handshake did not finish in time (a server that accepted the \
                     connection and does not speak NBD, or a stuck one)",
                ));
            }
            let ready = poll_fd(fd, events, left)?;
            // A hang-up goes to the side libnbd waits on (while it
            // connects, that is writing: it then finds the error itself).
            let hangup = ready & (libc::POLLHUP | libc::POLLERR) != 0;
            let moved = if dir.read && (hangup || ready & libc::POLLIN != 0) {
                self.notify_read()
            } else if dir.write && (hangup || ready & libc::POLLOUT != 0) {
                self.notify_write()
            } else if hangup {
                Err(io::Error::from(io::ErrorKind::ConnectionAborted))
            } else {
                Ok(())
            };
            moved.map_err(handshake_error)?;
        }
    }

    /// Where this connection went, to connect there again later.
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        let fd = self.fd()?;
        // SAFETY: an all-zero sockaddr_storage is a valid value.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `addr` has room for `len` bytes, which the kernel updates.
        let rc = unsafe { libc::getpeername(fd, std::ptr::addr_of_mut!(addr).cast(), &mut len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let name = call!(self, nbd_get_export_name);
        if name.is_null() {
            return Err(last_error(self.api, "nbd_get_export_name"));
        }
        // SAFETY: a NUL-terminated string malloc'ed by libnbd, copied here
        // and then freed once (its documented deallocator is free).
        let export = unsafe {
            let copy = CStr::from_ptr(name).to_owned();
            libc::free(name.cast());
            copy
        };
        let tls = call!(self, nbd_get_tls) != LIBNBD_TLS_DISABLE;
        Ok(Endpoint {
            addr,
            len,
            export,
            tls,
        })
    }

    fn create(name: &str) -> io::Result<Connection> {
        let api = api().map_err(io::Error::other)?;
        // SAFETY: nbd_create has no preconditions.
        let h = unsafe { (api.nbd_create)() };
        if h.is_null() {
            return Err(last_error(api, "nbd_create"));
        }
        let conn = Connection {
            api,
            h,
            sync_timeout_ms: AtomicU64::new(0),
            sync_calls: Mutex::new(()),
        };
        let cname = cstring(name)?;
        // NUL-terminated string copied by libnbd.
        conn.check(
            call!(conn, nbd_set_handle_name, cname.as_ptr()),
            "nbd_set_handle_name",
        )?;
        // Simple replies only. libnbd reads a structured reply to a read in
        // four recv(2) calls (the first 16 bytes of its header, the other
        // 4, the 8-byte offset, the data) against two for a simple one,
        // and at 4K that is most of what a read costs the daemon; nothing
        // structured replies add (holes, block status, several chunks per
        // read) is of use for ciphertext read whole.
        conn.check(
            call!(conn, nbd_set_request_structured_replies, false),
            "nbd_set_request_structured_replies",
        )?;
        Ok(conn)
    }

    /// TLS as `tls` and the URI (`wants_tls`: nbds://) say.
    fn configure_tls(&self, tls: &Tls, wants_tls: bool) -> io::Result<()> {
        let conn = self;
        if !(wants_tls || tls.psk_file.is_some() || tls.certificates.is_some()) {
            conn.check(call!(conn, nbd_set_tls, LIBNBD_TLS_DISABLE), "nbd_set_tls")?;
            return Ok(());
        }
        if call!(conn, nbd_supports_tls) != 1 {
            return Err(io::Error::other(
                "this libnbd was built without TLS support",
            ));
        }
        if let Some(dir) = &tls.certificates {
            let dir = cstring(dir)?;
            // Libnbd copies the string.
            conn.check(
                call!(conn, nbd_set_tls_certificates, dir.as_ptr()),
                "nbd_set_tls_certificates",
            )?;
        }
        if let Some(file) = &tls.psk_file {
            let file = cstring(file)?;
            // Libnbd copies the string.
            conn.check(
                call!(conn, nbd_set_tls_psk_file, file.as_ptr()),
                "nbd_set_tls_psk_file",
            )?;
        }
        if let Some(user) = &tls.username {
            let user = cstring(user)?;
            // Libnbd copies the string.
            conn.check(
                call!(conn, nbd_set_tls_username, user.as_ptr()),
                "nbd_set_tls_username",
            )?;
        }
        conn.check(
            call!(conn, nbd_set_tls_verify_peer, tls.verify_peer),
            "nbd_set_tls_verify_peer",
        )?;
        // TLS options without an nbds:// URI still mean "TLS or
        // nothing": never fall back to plaintext silently.
        conn.check(call!(conn, nbd_set_tls, LIBNBD_TLS_REQUIRE), "nbd_set_tls")?;
        Ok(())
    }

    /// Turns a C status (-1: error) into an io::Result with libnbd's message.
    fn check(&self, rc: c_int, what: &str) -> io::Result<c_int> {
        if rc < 0 {
            Err(last_error(self.api, what))
        } else {
            Ok(rc)
        }
    }

    fn check64(&self, rc: i64, what: &str) -> io::Result<u64> {
        if rc < 0 {
            Err(last_error(self.api, what))
        } else {
            Ok(rc as u64)
        }
    }

    fn flag(&self, rc: c_int, what: &str) -> io::Result<bool> {
        self.check(rc, what).map(|v| v != 0)
    }

    /// Size, flags and block sizes of the export (after `connect`), as
    /// far as cryptblk can use them: a size of 2^63 bytes or more (which
    /// libnbd hands on as a negative number) and a minimum block size above
    /// the largest sector are refused here, before anything is read.
    pub fn info(&self) -> io::Result<ExportInfo> {
        let conn = self;
        let size = call!(conn, nbd_get_size);
        if size < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the server announced an export size of {} bytes, which no disk has; \
                     not using it",
                    size as u64
                ),
            ));
        }
        let size = size as u64;
        let block = |which, default: u32| -> io::Result<u32> {
            let v = self.check64(call!(conn, nbd_get_block_size, which), "nbd_get_block_size")?;
            Ok(if v == 0 {
                default
            } else {
                u32::try_from(v).unwrap_or(u32::MAX)
            })
        };
        let min_block = block(LIBNBD_SIZE_MINIMUM, 1)?;
        if min_block as usize > LARGEST_SECTOR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the export wants requests aligned to {min_block} bytes, more than the \
                     largest sector ({LARGEST_SECTOR} bytes) an encrypted disk can have; ask \
                     the server for a smaller minimum block size"
                ),
            ));
        }
        Ok(ExportInfo {
            size,
            read_only: self.flag(call!(conn, nbd_is_read_only), "nbd_is_read_only")?,
            can_flush: self.flag(call!(conn, nbd_can_flush), "nbd_can_flush")?,
            can_trim: self.flag(call!(conn, nbd_can_trim), "nbd_can_trim")?,
            can_multi_conn: self.flag(call!(conn, nbd_can_multi_conn), "nbd_can_multi_conn")?,
            min_block,
            preferred_block: block(LIBNBD_SIZE_PREFERRED, 4096)?,
            max_block: block(LIBNBD_SIZE_MAXIMUM, 32 << 20)?,
        })
    }

    /// Bounds the synchronous calls below: one the server has not
    /// answered within `timeout` shuts the connection down and fails
    /// (zero: wait forever, as libnbd's own synchronous calls do).
    pub fn set_sync_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.sync_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Reads `buf.len()` bytes at `offset`, waiting for the answer.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _one = self.sync_calls.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `buf` is valid for writes of its length, and borrowed
        // mutably, until `finish` returns, which it does only once the
        // command is retired (or was never issued).
        let cookie = unsafe { self.aio_pread(buf.as_mut_ptr(), buf.len(), offset) };
        self.finish(cookie, "nbd_pread")
    }

    /// Writes `buf` at `offset`, waiting for the server's acknowledgement.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _one = self.sync_calls.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `buf` is valid for reads of its length until `finish`
        // returns, which it does only once the command is retired.
        let cookie = unsafe { self.aio_pwrite(buf.as_ptr(), buf.len(), offset) };
        self.finish(cookie, "nbd_pwrite")
    }

    /// NBD_CMD_FLUSH, waiting for the answer.
    pub fn flush(&self) -> io::Result<()> {
        let _one = self.sync_calls.lock().unwrap_or_else(|p| p.into_inner());
        let cookie = self.aio_flush();
        self.finish(cookie, "nbd_flush")
    }

    /// NBD_CMD_TRIM, waiting for the answer.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _one = self.sync_calls.lock().unwrap_or_else(|p| p.into_inner());
        let cookie = self.aio_trim(offset, len);
        self.finish(cookie, "nbd_trim")
    }

    /// Drives the connection until command `cookie` is answered and
    /// retires it: the synchronous calls, made of the asynchronous ones so
    /// that a server that keeps the connection open and never answers
    /// cannot hold the caller forever. At the timeout the socket is shut
    /// down (shutdown(2)): from then on the server can send us nothing, the
    /// connection dies, libnbd completes the command with an error, and we
    /// return only then, so the caller's buffer is never used after this
    /// returns. A write it had not acknowledged may or may not have landed,
    /// as on a disk that lost power; the caller (`NbdExport::with_sync`)
    /// sends it again on a new connection.
    fn finish(&self, cookie: io::Result<u64>, what: &str) -> io::Result<()> {
        let cookie = cookie?;
        let ms = self.sync_timeout_ms.load(Ordering::Relaxed);
        let deadline = (ms > 0).then(|| Instant::now() + Duration::from_millis(ms));
        let mut timed_out = false;
        // What killed the connection, if a read or write did: says more
        // (a protocol error, the server leaving) than the command's error.
        let mut killed = None;
        let fd = self.fd().ok();
        loop {
            match self.command_completed(cookie) {
                Some(Ok(())) => return Ok(()),
                Some(Err(errno)) if timed_out => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        ErrnoError {
                            errno: libc::ETIMEDOUT,
                            inner: io::Error::other(format!(
                                "{what}: the server did not answer within {ms} ms \
                                 (errno {errno} once the connection was shut down)"
                            )),
                        },
                    ))
                }
                Some(Err(_)) => {
                    let said = last_error(self.api, what);
                    return Err(killed.unwrap_or(said));
                }
                None => {}
            }
            let (Some(fd), false) = (fd, self.is_dead()) else {
                // Dead: libnbd completes every command (with an error), so
                // this is not reached; never spin on it.
                return Err(killed.unwrap_or_else(|| last_error(self.api, what)));
            };
            let dir = self.direction();
            let mut events = 0;
            if dir.read {
                events |= libc::POLLIN;
            }
            if dir.write {
                events |= libc::POLLOUT;
            }
            let left = match deadline {
                Some(d) if !timed_out => d.saturating_duration_since(Instant::now()),
                _ => Duration::from_secs(3600),
            };
            if left.is_zero() {
                timed_out = true;
                self.shutdown_socket();
                continue;
            }
            let ready = poll_fd(fd, events, left)?;
            let r = if ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.notify_read()
            } else if ready & libc::POLLOUT != 0 {
                self.notify_write()
            } else {
                Ok(())
            };
            if let Err(e) = r {
                if !self.is_dead() {
                    return Err(e);
                }
                killed = Some(e);
            }
        }
    }

    /// Starts NBD_CMD_READ of `len` bytes at `offset` into `buf`; returns
    /// the command's cookie.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes, and neither read nor
    /// written by anyone else, until the command is retired
    /// (`command_completed` returned Some) or the connection is dropped.
    pub unsafe fn aio_pread(&self, buf: *mut u8, len: usize, offset: u64) -> io::Result<u64> {
        // SAFETY: live handle; the buffer contract is the caller's.
        let rc = unsafe {
            (self.api.nbd_aio_pread)(self.h, buf.cast(), len, offset, NULL_COMPLETION, 0)
        };
        self.check64(rc, "nbd_aio_pread")
    }

    /// Starts NBD_CMD_WRITE of `len` bytes from `buf` at `offset`.
    ///
    /// # Safety
    /// `buf` must be valid for reads of `len` bytes, and not written, until
    /// the command is retired or the connection is dropped.
    pub unsafe fn aio_pwrite(&self, buf: *const u8, len: usize, offset: u64) -> io::Result<u64> {
        // SAFETY: live handle; the buffer contract is the caller's.
        let rc = unsafe {
            (self.api.nbd_aio_pwrite)(self.h, buf.cast(), len, offset, NULL_COMPLETION, 0)
        };
        self.check64(rc, "nbd_aio_pwrite")
    }

    /// Starts NBD_CMD_FLUSH.
    pub fn aio_flush(&self) -> io::Result<u64> {
        let rc = call!(self, nbd_aio_flush, NULL_COMPLETION, 0);
        self.check64(rc, "nbd_aio_flush")
    }

    /// Starts NBD_CMD_TRIM of `len` bytes at `offset`.
    pub fn aio_trim(&self, offset: u64, len: u64) -> io::Result<u64> {
        let rc = call!(self, nbd_aio_trim, len, offset, NULL_COMPLETION, 0);
        self.check64(rc, "nbd_aio_trim")
    }

    /// The socket to poll (it changes only on a new connection).
    pub fn fd(&self) -> io::Result<RawFd> {
        self.check(call!(self, nbd_aio_get_fd), "nbd_aio_get_fd")
    }

    pub fn direction(&self) -> Direction {
        // This call cannot fail.
        let d = call!(self, nbd_aio_get_direction);
        Direction {
            read: d & LIBNBD_AIO_DIRECTION_READ != 0,
            write: d & LIBNBD_AIO_DIRECTION_WRITE != 0,
        }
    }

    /// The fd is readable (or hung up): let the state machine read.
    pub fn notify_read(&self) -> io::Result<()> {
        self.check(call!(self, nbd_aio_notify_read), "nbd_aio_notify_read")
            .map(drop)
    }

    /// The fd is writable: let the state machine send what it holds.
    pub fn notify_write(&self) -> io::Result<()> {
        self.check(call!(self, nbd_aio_notify_write), "nbd_aio_notify_write")
            .map(drop)
    }

    /// The connection failed (server gone, protocol error): every command
    /// not yet answered has completed with an error, and nothing new can
    /// be sent on this handle.
    pub fn is_dead(&self) -> bool {
        // SAFETY: live handle.
        unsafe {
            (self.api.nbd_aio_is_dead)(self.h) == 1 || (self.api.nbd_aio_is_closed)(self.h) == 1
        }
    }

    /// Commands issued and not yet retired.
    pub fn in_flight(&self) -> usize {
        let n = call!(self, nbd_aio_in_flight);
        usize::try_from(n).unwrap_or(0)
    }

    /// The cookie of a command that completed and is waiting to be
    /// retired, if any.
    pub fn peek_completed(&self) -> Option<u64> {
        // -1 ("no command in flight") and 0 ("none
        // completed yet") both mean none.
        let c = call!(self, nbd_aio_peek_command_completed);
        (c > 0).then_some(c as u64)
    }

    /// Retires command `cookie` if it completed: Some(Ok) on success,
    /// Some(Err(errno)) if the server (or the connection) failed it, None if
    /// it is still in flight.
    pub fn command_completed(&self, cookie: u64) -> Option<Result<(), i32>> {
        match call!(self, nbd_aio_command_completed, cookie) {
            0 => None,
            1 => Some(Ok(())),
            _ => {
                // SAFETY: reads this thread's error of the call just made.
                let errno = unsafe { (self.api.nbd_get_errno)() };
                Some(Err(if errno > 0 { errno } else { libc::EIO }))
            }
        }
    }

    /// Shuts the connection's socket down both ways (shutdown(2)), at
    /// once: the server can no longer send a reply nor receive a command;
    /// libnbd's next read sees the end of the stream and moves the
    /// connection to its dead state, completing every command in flight
    /// with an error. For a server that stopped answering (libnbd's own
    /// `nbd_shutdown` would wait for it).
    pub fn shutdown_socket(&self) {
        if self.is_dead() {
            return; // libnbd may have closed the socket: the fd is not ours
        }
        if let Ok(fd) = self.fd() {
            // SAFETY: `fd` is the live connection's socket, owned by the
            // handle and closed only when the connection dies or is
            // dropped: not dead (checked above), and this connection is
            // borrowed, so not dropped. shutdown(2) changes no memory.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// Tells the server we are leaving (NBD_CMD_DISC once the commands in
    /// flight are answered).
    pub fn shutdown(&self) {
        call!(self, nbd_shutdown, 0);
    }
}

impl Drop for Connection {
    /// Closes the socket and frees the handle: from here on libnbd touches
    /// no buffer of a command it was given.
    fn drop(&mut self) {
        // SAFETY: the handle is live and used by no one else (we own it).
        call!(self, nbd_close);
    }
}

/// Where a connection went, resolved at start-up: the server's socket
/// address (from getpeername: the unix socket's path, or the IP address and
/// port a name resolved to), the export name and whether TLS is on. Enough
/// to connect again without parsing a URI or looking a name up.
#[derive(Clone)]
pub struct Endpoint {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    export: CString,
    tls: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Endpoint {
    /// AF_UNIX, AF_INET or AF_INET6.
    pub fn family(&self) -> i32 {
        i32::from(self.addr.ss_family)
    }

    /// The TCP port, for TCP endpoints.
    pub fn tcp_port(&self) -> Option<u16> {
        let p = std::ptr::addr_of!(self.addr);
        match self.family() {
            // SAFETY: the family says which sockaddr the storage holds.
            libc::AF_INET => Some(u16::from_be(unsafe {
                (*p.cast::<libc::sockaddr_in>()).sin_port
            })),
            // SAFETY: as above.
            libc::AF_INET6 => Some(u16::from_be(unsafe {
                (*p.cast::<libc::sockaddr_in6>()).sin6_port
            })),
            _ => None,
        }
    }

    /// Whether the connection uses TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The address, for messages.
    pub fn describe(&self) -> String {
        let p = std::ptr::addr_of!(self.addr);
        match self.family() {
            libc::AF_INET => {
                // SAFETY: the family says which sockaddr the storage holds.
                let a = unsafe { *p.cast::<libc::sockaddr_in>() };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                format!("{ip}:{}", u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                // SAFETY: as above.
                let a = unsafe { *p.cast::<libc::sockaddr_in6>() };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                format!("[{ip}]:{}", u16::from_be(a.sin6_port))
            }
            libc::AF_UNIX => {
                // SAFETY: as above.
                let a = unsafe { &*p.cast::<libc::sockaddr_un>() };
                let path: Vec<u8> = a
                    .sun_path
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                format!("unix:{}", String::from_utf8_lossy(&path))
            }
            other => format!("address family {other}"),
        }
    }

    /// A stream socket connected to the address, non-blocking; gives up
    /// at `deadline`.
    fn connect_socket(&self, deadline: Instant) -> io::Result<OwnedFd> {
        let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        // SAFETY: plain system call; the fd is owned right below.
        let fd = unsafe { libc::socket(self.family(), flags, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` holds `len` valid bytes of a sockaddr.
        let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(self.addr).cast(), self.len) };
        if rc == 0 {
            return Ok(sock);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if poll_fd(fd, libc::POLLOUT, left)? == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` has room for the int SO_ERROR returns.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::addr_of_mut!(err).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        Ok(sock)
    }
}

/// poll(2) on one fd for `events`, at most `timeout`; the events that
/// occurred (0: timed out). Retries on EINTR.
pub(super) fn poll_fd(
    fd: RawFd,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<libc::c_short> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(if rc == 0 { 0 } else { pfd.revents });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What a failed TLS handshake asks the user to check, for the
/// credentials given.
fn tls_hint(tls: &Tls, e: &io::Error) -> String {
    let said = e.to_string();
    match (&tls.certificates, &tls.psk_file) {
        (Some(dir), _) => {
            let side = if said.contains("certificate verification") {
                "the server's certificate did not verify; "
            } else {
                ""
            };
            format!(
                "the TLS handshake failed; {side}check the certificates (--tls-certificates \
                 {dir}): the server's certificate must be signed by {dir}/ca-cert.pem and \
                 name the host connected to, and the server must accept \
                 {dir}/client-cert.pem"
            )
        }
        (None, Some(_)) => "the TLS handshake failed; check the key and user name \
                            (--tls-psk-file, --tls-username) against the server's"
            .to_string(),
        (None, None) => "the TLS handshake failed; give the key (--tls-psk-file, \
                         --tls-username) or the certificates (--tls-certificates) the \
                         server expects"
            .to_string(),
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a string"))
}

/// The largest sector an encrypted disk can have (cryptsetup's limit).
const LARGEST_SECTOR: usize = crate::crypto::SECTOR_SIZES[crate::crypto::SECTOR_SIZES.len() - 1];

/// What broke a handshake, in words that say it was the handshake: the
/// server hanging up mid-way shows as a failed send or receive (or, for an
/// end of stream libnbd reads, only as its message: it sets no errno).
fn handshake_error(e: io::Error) -> io::Error {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let closed = matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    ) || e.to_string().contains("server disconnected unexpectedly");
    if closed {
        io::Error::new(
            e.kind(),
            format!("the server closed the connection during the NBD handshake ({e})"),
        )
    } else {
        io::Error::new(e.kind(), format!("the NBD handshake failed: {e}"))
    }
}

/// The error of the last failed libnbd call on this thread.
fn last_error(api: &Api, what: &str) -> io::Error {
    // SAFETY: both read this thread's libnbd error state; the message is a
    // NUL-terminated string (or NULL) valid until the next libnbd call.
    let (msg, errno) = unsafe {
        let m = (api.nbd_get_error)();
        let msg = if m.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        (msg, (api.nbd_get_errno)())
    };
    let kind = if errno > 0 {
        io::Error::from_raw_os_error(errno).kind()
    } else {
        io::ErrorKind::Other
    };
    // libnbd's messages of its own calls start with the call's name.
    let err = if msg.starts_with(&format!("{what}: ")) {
        io::Error::new(kind, msg)
    } else {
        io::Error::new(kind, format!("{what}: {msg}"))
    };
    if errno > 0 {
        // Keep the errno for callers that pass it on (the guest's status).
        io::Error::new(kind, ErrnoError { errno, inner: err })
    } else {
        err
    }
}

/// An error that carries libnbd's errno.
#[derive(Debug)]
pub struct ErrnoError {
    pub errno: i32,
    inner: io::Error,
}

impl std::fmt::Display for ErrnoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for ErrnoError {}

#[cfg(test)]
impl ErrnoError {
    /// The error libnbd would report with `msg` and `errno`.
    pub fn for_test(errno: i32, msg: &str) -> Self {
        ErrnoError {
            errno,
            inner: io::Error::other(msg.to_string()),
        }
    }
}

/// The errno an error from this module carries (EIO if none).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .or_else(|| {
            e.get_ref()
                .and_then(|inner| inner.downcast_ref::<ErrnoError>())
                .map(|x| x.errno)
        })
        .unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::check_header;
    use super::*;

    #[test]
    fn a_missing_library_names_the_debian_package() {
        let Err(e) = load(c"libnbd-not-here.so.0") else {
            panic!("loaded a library that does not exist");
        };
        let msg = e.to_string();
        assert!(msg.contains("libnbd-not-here.so.0"), "{msg}");
        assert!(msg.contains("install the Debian package libnbd0"), "{msg}");
    }

    /// The C type of a parameter or return value as the table spells it.
    fn rust_type(c: &str) -> &'static str {
        match c {
            "struct nbd_handle*" => "*mut Handle",
            "void*" => "*mut c_void",
            "const void*" => "*const c_void",
            "const char*" => "*const c_char",
            "char*" => "*mut c_char",
            "size_t" => "usize",
            "uint64_t" => "u64",
            "uint32_t" => "u32",
            "int64_t" => "i64",
            "int" => "c_int",
            "unsigned" => "c_uint",
            "bool" => "bool",
            "nbd_completion_callback" => "CompletionCallback",
            "void" => "()",
            other => panic!("a C type the table does not map: {other:?}"),
        }
    }

    /// Every function in the table has, in /usr/include/libnbd.h (Debian's
    /// libnbd-dev), exactly the signature the table declares: the ABI is
    /// read from the header, never guessed.
    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs libnbd: ./test.sh runs it"
    )]
    fn the_table_matches_libnbd_h() {
        check_header(
            "/usr/include/libnbd.h",
            "libnbd-dev",
            "extern",
            SIGNATURES,
            rust_type,
        );
    }

    /// A greeting with a wrong magic that is there before libnbd gets the
    /// socket: the handshake breaks within nbd_aio_connect_socket, which
    /// closes the socket. Nothing may close it again (a debug build
    /// aborts on closing an owned fd twice: "IO Safety violation"; before
    /// the fix this test did, and the reconnect test on a bad greeting
    /// did so about one run in twenty).
    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs libnbd: ./test.sh runs it"
    )]
    fn a_handshake_broken_within_the_connect_call_closes_the_socket_once() {
        use std::io::Write;
        let (mut server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        server
            .write_all(b"NBDMAGIX\x49\x48\x41\x56\x45\x4f\x50\x54\x00\x03")
            .unwrap();
        let conn = Connection::create("t").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = conn
            .handshake_on(OwnedFd::from(client), deadline)
            .expect_err("a wrong magic was accepted");
        let msg = e.to_string();
        assert!(
            msg.contains("nbd_aio_connect_socket") && msg.contains("expected NBD magic"),
            "not broken within the call: {msg}"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs libnbd: ./test.sh runs it"
    )]
    fn the_installed_library_has_every_function() {
        available().expect("libnbd0 is installed by integration/install-deps.sh");
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs libnbd: ./test.sh runs it"
    )]
    fn a_refused_connection_is_an_error_with_libnbd_message() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("nbd+unix:///?socket={}/none.sock", dir.path().display());
        let e = Connection::connect(&uri, &Tls::default(), "t", Duration::from_secs(30))
            .err()
            .expect("connected to nothing");
        assert!(e.to_string().starts_with("connect: "), "{e}");
        assert_eq!(errno_of(&e), libc::ENOENT, "{e}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs libnbd: ./test.sh runs it"
    )]
    fn a_call_is_named_once_in_its_error() {
        let conn = Connection::create("t").unwrap();
        let e = conn.notify_read().expect_err("read on no connection");
        let said = e.to_string();
        assert!(said.starts_with("nbd_aio_notify_read: "), "{said}");
        assert!(!said[1..].contains("nbd_aio_notify_read"), "{said}");
    }
}
