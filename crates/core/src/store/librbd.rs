//! The Ceph RBD client: librados (the cluster connection) and librbd (the
//! images), Ceph's own C libraries, behind a safe interface. This module is
//! the only place that knows their C API.
//!
//! Both are loaded at run time with dlopen(3), not linked: `cargo build`
//! needs no C library, and only a daemon asked for an `rbd:` image needs
//! `librados.so.2` and `librbd.so.1` (Debian: librados2, librbd1). Every
//! signature below is copied from /usr/include/rados/librados.h and
//! /usr/include/rbd/librbd.h of Ceph 16.2 (Debian bookworm, librbd 1.16) and
//! checked against them by a test; every call used here is much older than
//! that (the rbd_aio_* family exists since librbd 0.1.x).
//!
//! Threads: librados and librbd handles may be used from any thread and
//! from several at once. Asynchronous calls complete on librbd's own
//! threads, through a C callback: here it only pushes (slot, result) onto a
//! lock-protected queue and writes an eventfd, which the vring thread waits
//! on beside its kick fd; everything else happens on the vring thread
//! (`Completions::reap`). This is QEMU's scheme too (block/rbd.c: get the
//! return value, release, hand over to the event loop).
//!
//! Errors: librados and librbd return negative errno values and keep no
//! message; the errors here say which call failed on what.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The libraries' file names (sonames), and the Debian packages that have them.
const RADOS_SONAME: &CStr = c"librados.so.2";
const RBD_SONAME: &CStr = c"librbd.so.1";
pub const RADOS_PACKAGE: &str = "librados2";
pub const RBD_PACKAGE: &str = "librbd1";

/// `rados_t`, `rados_ioctx_t`, `rbd_image_t`, `rbd_completion_t`: opaque
/// pointers (`typedef void *…` in the headers).
type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
/// `rbd_lock_mode_t`: a C enum (int-sized).
type LockMode = c_int;
const RBD_LOCK_MODE_EXCLUSIVE: LockMode = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (rbd/features.h).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `rbd_callback_t`: `void (*)(rbd_completion_t cb, void *arg)`.
type Callback = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;

/// Declares a table of C functions of one library: one field per function,
/// with the C signature, looked up by name when the library is loaded.
macro_rules! api {
    ($table:ident, $sigs:ident, $soname:expr, $package:expr,
     $( fn $name:ident ( $($arg:ty),* ) -> $ret:ty; )*) => {
        #[allow(non_snake_case)]
        struct $table {
            $( $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        /// Each function's Rust signature, for the test that compares them
        /// with the C header.
        #[cfg(test)]
        const $sigs: &[(&str, &str)] = &[
            $( (stringify!($name), stringify!(($($arg),*) -> $ret)), )*
        ];

        impl $table {
            /// Loads the library (once per process: later calls return the
            /// same table).
            fn get() -> Result<&'static $table, Missing> {
                static TABLE: OnceLock<Result<$table, Missing>> = OnceLock::new();
                TABLE
                    .get_or_init(|| $table::load($soname))
                    .as_ref()
                    .map_err(Clone::clone)
            }

            fn load(soname: &CStr) -> Result<$table, Missing> {
                let missing = |reason| Missing { reason, package: $package };
                let lib = super::dl::open(soname).map_err(missing)?;
                Ok($table {
                    $( $name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: `lib` is a live dlopen handle, never
                        // closed, and `name` a NUL-terminated string.
                        let sym = unsafe { libc::dlsym(lib, name.as_ptr().cast()) };
                        if sym.is_null() {
                            return Err(missing(format!(
                                "{} has no {}", soname.to_string_lossy(), stringify!($name)
                            )));
                        }
                        // SAFETY: the symbol is the library's function of
                        // that name, whose C signature (its header, checked
                        // by a test) is the one declared here.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(sym) }
                    }, )*
                })
            }
        }
    };
}

api! {
    Rados, RADOS_SIGNATURES, RADOS_SONAME, RADOS_PACKAGE,
    fn rados_create2(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    fn rados_conf_read_file(RadosT, *const c_char) -> c_int;
    fn rados_conf_set(RadosT, *const c_char, *const c_char) -> c_int;
    fn rados_conf_parse_env(RadosT, *const c_char) -> c_int;
    fn rados_connect(RadosT) -> c_int;
    fn rados_shutdown(RadosT) -> ();
    fn rados_ioctx_create(RadosT, *const c_char, *mut IoctxT) -> c_int;
    fn rados_ioctx_set_namespace(IoctxT, *const c_char) -> ();
    fn rados_ioctx_destroy(IoctxT) -> ();
}

api! {
    Rbd, RBD_SIGNATURES, RBD_SONAME, RBD_PACKAGE,
    fn rbd_version(*mut c_int, *mut c_int, *mut c_int) -> ();
    fn rbd_create(IoctxT, *const c_char, u64, *mut c_int) -> c_int;
    fn rbd_open(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    fn rbd_open_read_only(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    fn rbd_close(ImageT) -> c_int;
    fn rbd_get_size(ImageT, *mut u64) -> c_int;
    fn rbd_aio_create_completion(*mut c_void, Callback, *mut CompletionT) -> c_int;
    fn rbd_aio_read(ImageT, u64, usize, *mut c_char, CompletionT) -> c_int;
    fn rbd_aio_write(ImageT, u64, usize, *const c_char, CompletionT) -> c_int;
    fn rbd_aio_flush(ImageT, CompletionT) -> c_int;
    fn rbd_aio_discard(ImageT, u64, u64, CompletionT) -> c_int;
    fn rbd_aio_get_return_value(CompletionT) -> isize;
    fn rbd_aio_release(CompletionT) -> ();
    fn rbd_read(ImageT, u64, usize, *mut c_char) -> isize;
    fn rbd_write(ImageT, u64, usize, *const c_char) -> isize;
    fn rbd_flush(ImageT) -> c_int;
    fn rbd_discard(ImageT, u64, u64) -> c_int;
    fn rbd_get_features(ImageT, *mut u64) -> c_int;
    fn rbd_lock_acquire(ImageT, LockMode) -> c_int;
    fn rbd_lock_release(ImageT) -> c_int;
    fn rbd_lock_get_owners(ImageT, *mut LockMode, *mut *mut c_char, *mut usize) -> c_int;
    fn rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
}

/// librados or librbd could not be loaded (or lacks a function): the
/// message says which package to install.
#[derive(Debug, Clone, thiserror::Error)]
#[error("RBD images need librados and librbd, which cannot be loaded ({reason}); install the Debian package {package} (apt-get install {package})")]
pub struct Missing {
    reason: String,
    package: &'static str,
}

/// Both libraries, loaded.
fn apis() -> Result<(&'static Rados, &'static Rbd), Missing> {
    Ok((Rados::get()?, Rbd::get()?))
}

/// Whether librados and librbd can be loaded here (tests, and checks
/// before start-up).
pub fn available() -> Result<(), Missing> {
    apis().map(drop)
}

/// librbd's version (major, minor, extra): 1.16.0 on Debian bookworm.
pub fn version() -> Result<(i32, i32, i32), Missing> {
    let rbd = Rbd::get()?;
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { (rbd.rbd_version)(&mut major, &mut minor, &mut extra) };
    Ok((major, minor, extra))
}

/// A negative errno from `what` as an io::Error that keeps the errno.
fn failed(rc: i64, what: impl std::fmt::Display) -> io::Error {
    let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

fn check(rc: c_int, what: impl std::fmt::Display) -> io::Result<()> {
    if rc < 0 {
        Err(failed(rc.into(), what))
    } else {
        Ok(())
    }
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in the {what}")))
}

/// How to reach a cluster: the ceph.conf options of the `rbd` tool.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `--ceph-conf`: the configuration file; None reads Ceph's default
    /// search path ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
    pub conf: Option<String>,
    /// `--ceph-id`: the client's name without `client.` (default admin).
    pub id: Option<String>,
    /// `--ceph-keyring`: the cephx keyring, if not where ceph.conf says.
    pub keyring: Option<String>,
    /// Other options, as `rados_conf_set` takes them (after the file).
    pub set: Vec<(String, String)>,
}

/// librados starts a score of threads. Once a process has more than 8
/// threads that allocate, glibc works out how many malloc arenas it may
/// create (8 per CPU) from get_nprocs(), which reads
/// /sys/devices/system/cpu/online: a daemon whose sandbox is already on
/// (no open(2)) is stopped there, in whichever thread allocates first.
/// Setting that limit now, to glibc's own default, spares it the file.
fn fix_malloc_arena_limit() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = c_int::try_from(cpus.saturating_mul(8)).unwrap_or(c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX
        // takes any positive count.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
            log::warn!("mallopt(M_ARENA_MAX) failed: the sandbox may stop a thread that allocates");
        }
    });
}

/// A connected cluster handle (`rados_t`).
pub struct Cluster {
    rados: &'static Rados,
    rbd: &'static Rbd,
    h: RadosT,
}

// SAFETY: a connected rados_t may be used from any thread and from several
// at once (librados is thread-safe; QEMU and the rbd tool share one handle
// between threads).
unsafe impl Send for Cluster {}
// SAFETY: as for Send.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Reads the configuration, then connects (blocks until the monitors
    /// answered and cephx authenticated, or `client_mount_timeout`).
    pub fn connect(opts: &ClusterOptions) -> io::Result<Arc<Cluster>> {
        let (rados, rbd) = apis().map_err(io::Error::other)?;
        fix_malloc_arena_limit();
        let id = opts.id.as_deref().unwrap_or("admin");
        let name = cstring("client id", &format!("client.{id}"))?;
        let mut h: RadosT = std::ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings, copied by
        // librados.
        let rc = unsafe { (rados.rados_create2)(&mut h, c"ceph".as_ptr(), name.as_ptr(), 0) };
        check(rc, "rados_create2")?;
        // From here on Drop shuts the handle down.
        let cluster = Cluster { rados, rbd, h };
        let conf = opts
            .conf
            .as_deref()
            .map(|c| cstring("--ceph-conf", c))
            .transpose()?;
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: live handle; NULL (the default search path) or a
        // NUL-terminated path.
        let rc = unsafe { (rados.rados_conf_read_file)(cluster.h, conf_ptr) };
        check(
            rc,
            format_args!(
                "reading the Ceph configuration {}",
                opts.conf.as_deref().unwrap_or("(default search path)")
            ),
        )?;
        // $CEPH_ARGS, as the rbd tool reads it (e.g. "--keyring FILE"):
        // after the file, before the options given here, which win.
        // SAFETY: live handle; NULL names the default variable, CEPH_ARGS.
        let rc = unsafe { (rados.rados_conf_parse_env)(cluster.h, std::ptr::null()) };
        check(rc, "parsing $CEPH_ARGS")?;
        if let Some(keyring) = &opts.keyring {
            cluster.set("keyring", keyring)?;
        }
        for (k, v) in &opts.set {
            cluster.set(k, v)?;
        }
        // SAFETY: live handle, configured, not yet connected.
        let rc = unsafe { (rados.rados_connect)(cluster.h) };
        check(
            rc,
            format_args!("connecting to the Ceph cluster as client.{id}"),
        )?;
        Ok(Arc::new(cluster))
    }

    fn set(&self, key: &str, value: &str) -> io::Result<()> {
        let k = cstring("Ceph option name", key)?;
        let v = cstring("Ceph option value", value)?;
        // SAFETY: live handle, NUL-terminated strings copied by librados.
        let rc = unsafe { (self.rados.rados_conf_set)(self.h, k.as_ptr(), v.as_ptr()) };
        check(rc, format_args!("Ceph option {key} = {value}"))
    }

    /// An I/O context on pool `pool` (and RADOS namespace `namespace`).
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> io::Result<Arc<Pool>> {
        let name = cstring("pool name", pool)?;
        let mut io: IoctxT = std::ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated name, valid out-pointer.
        let rc = unsafe { (self.rados.rados_ioctx_create)(self.h, name.as_ptr(), &mut io) };
        check(rc, format_args!("opening pool {pool}"))?;
        let pool = Pool {
            cluster: self.clone(),
            io,
        };
        if let Some(ns) = namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: live ioctx, not yet shared with anyone; librados
            // copies the string.
            unsafe { (self.rados.rados_ioctx_set_namespace)(pool.io, ns.as_ptr()) };
        }
        Ok(Arc::new(pool))
    }
}

impl Drop for Cluster {
    /// Every Pool (and so every Image) holds an Arc of the cluster: none is
    /// left when this runs.
    fn drop(&mut self) {
        // SAFETY: the handle is live and no longer used by anyone.
        unsafe { (self.rados.rados_shutdown)(self.h) };
    }
}

/// An I/O context (`rados_ioctx_t`): one pool (and namespace) of a cluster.
pub struct Pool {
    cluster: Arc<Cluster>,
    io: IoctxT,
}

// SAFETY: as for Cluster: librados I/O contexts may be used from several
// threads at once (the namespace is set before the Pool is shared).
unsafe impl Send for Pool {}
// SAFETY: as for Send.
unsafe impl Sync for Pool {}

impl Pool {
    /// Creates image `name` of `size` bytes with the cluster's default
    /// features and object size.
    pub fn create_image(&self, name: &str, size: u64) -> io::Result<()> {
        let cname = cstring("image name", name)?;
        let mut order: c_int = 0;
        // SAFETY: live ioctx, NUL-terminated name, valid out-pointer
        // (order 0: the default object size).
        let rc =
            unsafe { (self.cluster.rbd.rbd_create)(self.io, cname.as_ptr(), size, &mut order) };
        check(rc, format_args!("creating RBD image {name}"))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the ioctx is live and no Image uses it any more (each
        // holds an Arc of its Pool).
        unsafe { (self.cluster.rados.rados_ioctx_destroy)(self.io) };
    }
}

/// An open RBD image (`rbd_image_t`), at its head or at a snapshot.
pub struct Image {
    pool: Arc<Pool>,
    h: ImageT,
    name: String,
    read_only: bool,
}

// SAFETY: librbd image handles take their own locks; QEMU issues aio calls
// on one handle from several threads (iothreads), and completions come
// from librbd's threads anyway.
unsafe impl Send for Image {}
// SAFETY: as for Send.
unsafe impl Sync for Image {}

impl Image {
    /// Opens image `name` of `pool`, at snapshot `snap` if given.
    /// Snapshots are always opened read-only (`rbd_open_read_only`, which
    /// takes no exclusive lock); so is the head with `read_only`.
    pub fn open(
        pool: &Arc<Pool>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> io::Result<Image> {
        let cname = cstring("image name", name)?;
        let csnap = snap.map(|s| cstring("snapshot name", s)).transpose()?;
        let snap_ptr = csnap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let read_only = read_only || snap.is_some();
        let rbd = pool.cluster.rbd;
        let open = if read_only {
            rbd.rbd_open_read_only
        } else {
            rbd.rbd_open
        };
        let mut h: ImageT = std::ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated strings (or NULL for the
        // head), valid out-pointer.
        let rc = unsafe { open(pool.io, cname.as_ptr(), &mut h, snap_ptr) };
        let shown = match snap {
            Some(s) => format!("{name}@{s}"),
            None => name.to_string(),
        };
        check(rc, format_args!("opening RBD image {shown}"))?;
        Ok(Image {
            pool: pool.clone(),
            h,
            name: shown,
            read_only,
        })
    }

    fn rbd(&self) -> &'static Rbd {
        self.pool.cluster.rbd
    }

    /// `image` or `image@snap`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image's (or snapshot's) size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0;
        // SAFETY: live image, valid out-pointer.
        let rc = unsafe { (self.rbd().rbd_get_size)(self.h, &mut size) };
        check(rc, format_args!("rbd_get_size {}", self.name))?;
        Ok(size)
    }
}

impl Image {
    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> io::Result<u64> {
        let mut f = 0;
        // SAFETY: live image, valid out-pointer.
        let rc = unsafe { (self.rbd().rbd_get_features)(self.h, &mut f) };
        check(rc, format_args!("rbd_get_features {}", self.name))?;
        Ok(f)
    }

    /// Reads `buf.len()` bytes at `offset`, synchronously (librbd's own
    /// thread does the work; this one waits). Fewer only at the end of the
    /// image, which is an error here.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: live image; `rest` is valid for writes of its length
            // for the whole (synchronous) call.
            let rc = unsafe {
                (self.rbd().rbd_read)(
                    self.h,
                    offset + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                return Err(failed(rc as i64, format_args!("rbd_read {}", self.name)));
            }
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("rbd_read {}: past the end of the image", self.name),
                ));
            }
            done += rc as usize;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, synchronously.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // SAFETY: live image; `buf` is valid for reads of its length for
        // the whole (synchronous) call.
        let rc = unsafe { (self.rbd().rbd_write)(self.h, offset, buf.len(), buf.as_ptr().cast()) };
        if rc < 0 {
            return Err(failed(rc as i64, format_args!("rbd_write {}", self.name)));
        }
        if (rc as usize) < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "rbd_write {}: {rc} of {} bytes written (past the end of the image)",
                    self.name,
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Makes every completed write durable, synchronously.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.rbd().rbd_flush)(self.h) };
        check(rc, format_args!("rbd_flush {}", self.name))
    }

    /// Discards `len` bytes at `offset`, synchronously.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.rbd().rbd_discard)(self.h, offset, len) };
        check(rc, format_args!("rbd_discard {}", self.name))
    }

    /// Takes the image's exclusive lock and keeps it: librbd then refuses
    /// to hand it to another client that asks (their writes fail), until
    /// this handle is closed or `unlock`ed. Needs the exclusive-lock image
    /// feature (-EINVAL without it). Another client holding it: -EROFS or
    /// -EBUSY.
    pub fn lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.rbd().rbd_lock_acquire)(self.h, RBD_LOCK_MODE_EXCLUSIVE) };
        check(
            rc,
            format_args!("taking the exclusive lock of {}", self.name),
        )
    }

    /// Releases the lock `lock_exclusive` took.
    pub fn unlock(&self) -> io::Result<()> {
        // SAFETY: live image.
        let rc = unsafe { (self.rbd().rbd_lock_release)(self.h) };
        check(
            rc,
            format_args!("releasing the exclusive lock of {}", self.name),
        )
    }

    /// Who holds the image's lock now (librbd's owner strings: the
    /// client's address and id), for error messages.
    pub fn lock_owners(&self) -> io::Result<Vec<String>> {
        let mut mode: LockMode = 0;
        let mut owners: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
        let mut n: usize = owners.len();
        // SAFETY: live image; `owners` has room for `n` pointers, which
        // librbd fills and sets `n` to the count (-ERANGE if too few).
        let rc = unsafe {
            (self.rbd().rbd_lock_get_owners)(self.h, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(rc, format_args!("rbd_lock_get_owners {}", self.name))?;
        let n = n.min(owners.len());
        let names = owners[..n]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled the first `n` entries with
            // NUL-terminated strings it allocated.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: the `n` strings librbd allocated, freed once.
        unsafe { (self.rbd().rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(names)
    }
}

impl Drop for Image {
    /// Completions hold no reference to the Image: whoever started
    /// operations (a `Completions`) waits for them before dropping it.
    fn drop(&mut self) {
        // SAFETY: the handle is live and no operation on it is in flight.
        let rc = unsafe { (self.rbd().rbd_close)(self.h) };
        if rc < 0 {
            log::warn!(
                "{}",
                failed(rc.into(), format_args!("closing RBD image {}", self.name))
            );
        }
    }
}

/// What the completion callback shares with the thread that reaps: the
/// finished operations and the eventfd that announces them. Each operation
/// in flight holds a strong reference (taken at start, dropped by the
/// callback), so it outlives the last callback whatever the reaper does.
struct Shared {
    done: Mutex<Vec<(u32, isize)>>,
    event: EventFd,
}

/// One operation's callback argument: allocated once, reused. While the
/// operation is in flight only the callback touches it.
struct Slot {
    shared: Option<Arc<Shared>>,
    index: u32,
}

/// librbd's completion callback (`rbd_callback_t`), on one of librbd's
/// threads: take the result, release the completion (as QEMU does in its
/// callback), queue (slot, result) and wake the reaper. Nothing else.
unsafe extern "C" fn on_complete(c: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the Slot given to rbd_aio_create_completion; the
    // Slot is boxed (stable address) and owned by a Completions that does
    // not touch or free it until this callback has queued its index (Drop
    // waits for every slot in flight).
    let slot = unsafe { &mut *arg.cast::<Slot>() };
    let (Some(shared), index) = (slot.shared.take(), slot.index) else {
        // Each completion fires once and every slot in flight holds its
        // reference: unreachable, but never unwind into C.
        return;
    };
    let Ok(rbd) = Rbd::get() else { return };
    // SAFETY: `c` is the live completion this callback is for; it is
    // released exactly once, here, after its value is read.
    let result = unsafe {
        let r = (rbd.rbd_aio_get_return_value)(c);
        (rbd.rbd_aio_release)(c);
        r
    };
    // From here on `slot` may be reused by the reaper: only `shared` is used.
    shared
        .done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((index, result));
    let _ = shared.event.write(1);
}

/// Asynchronous operations on images, started by one thread (a queue's
/// vring thread) and completed by librbd's threads: `read`, `write`,
/// `flush`, `discard` with a tag (any `Copy` value: the caller's), then
/// `reap` on that thread when `event_fd` is readable.
///
/// librbd's results, as measured on librbd 1.16: a read returns the bytes
/// read (fewer when the range crosses the end of the image, -EINVAL when it
/// starts at or past it; holes read as zeros); a write, a flush and a
/// discard return 0, even for a write that librbd cut at the end of the
/// image; a write or discard on a snapshot or a read-only handle -EROFS.
pub struct Completions<T: Copy = u64> {
    shared: Arc<Shared>,
    /// Boxed: a slot's address is its callback's argument, and must not
    /// move when the vector grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    /// Free slot indices.
    free: Vec<u32>,
    /// Tag of the operation each slot holds.
    tags: Vec<T>,
    in_flight: usize,
    /// Reused to swap the done queue out without allocating.
    spare: Vec<(u32, isize)>,
}

impl<T: Copy> Completions<T> {
    pub fn new() -> io::Result<Completions<T>> {
        apis().map_err(io::Error::other)?;
        Ok(Completions {
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::with_capacity(256)),
                event: EventFd::new(EFD_NONBLOCK)?,
            }),
            slots: Vec::new(),
            free: Vec::new(),
            tags: Vec::new(),
            in_flight: 0,
            spare: Vec::with_capacity(256),
        })
    }

    /// Readable when completions wait: register it beside the kick fd.
    pub fn event_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    /// Clears the eventfd: call it before `reap` when the eventfd woke the
    /// caller, so that a completion landing during the reap sets it again.
    pub fn clear_event(&self) {
        let _ = self.shared.event.read();
    }

    /// Started and not yet reaped: librbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A completion whose callback will report `tag`.
    fn completion(&mut self, rbd: &Rbd, tag: T) -> io::Result<(CompletionT, u32)> {
        let index = match self.free.pop() {
            Some(i) => {
                self.tags[i as usize] = tag;
                i
            }
            None => {
                let i = u32::try_from(self.slots.len()).map_err(io::Error::other)?;
                self.slots.push(Box::new(Slot {
                    shared: None,
                    index: i,
                }));
                self.tags.push(tag);
                i
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.shared = Some(self.shared.clone());
        let arg: *mut Slot = &mut **slot;
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: `arg` is a boxed Slot that stays allocated until its
        // completion is reaped (or forever, see Drop); `on_complete` has
        // the rbd_callback_t signature; valid out-pointer.
        let rc = unsafe { (rbd.rbd_aio_create_completion)(arg.cast(), Some(on_complete), &mut c) };
        if rc < 0 {
            self.abandon(index);
            return Err(failed(rc.into(), "rbd_aio_create_completion"));
        }
        Ok((c, index))
    }

    /// The operation in `index` never started: free its slot.
    fn abandon(&mut self, index: u32) {
        self.slots[index as usize].shared = None;
        self.free.push(index);
    }

    /// Starts an operation with `start(completion)`; on a synchronous
    /// failure the completion is released and the slot freed.
    fn start(
        &mut self,
        image: &Image,
        tag: T,
        what: &str,
        start: impl FnOnce(&Rbd, CompletionT) -> c_int,
    ) -> io::Result<()> {
        let rbd = image.rbd();
        let (c, index) = self.completion(rbd, tag)?;
        let rc = start(rbd, c);
        if rc < 0 {
            // SAFETY: the completion was not handed to librbd (the call
            // failed), so its callback never runs: release it here.
            unsafe { (rbd.rbd_aio_release)(c) };
            self.abandon(index);
            return Err(failed(rc.into(), format_args!("{what} on {}", image.name)));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `image` into `buf`.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes, and neither read nor
    /// written by anyone else, until this operation is reaped; `image` must
    /// stay open until then.
    pub unsafe fn read(
        &mut self,
        image: &Image,
        buf: *mut u8,
        len: usize,
        offset: u64,
        tag: T,
    ) -> io::Result<()> {
        self.start(image, tag, "rbd_aio_read", |rbd, c| {
            // SAFETY: live image and completion; the buffer contract is
            // the caller's.
            unsafe { (rbd.rbd_aio_read)(image.h, offset, len, buf.cast(), c) }
        })
    }

    /// Writes `len` bytes from `buf` at `offset` of `image`.
    ///
    /// # Safety
    /// `buf` must be valid for reads of `len` bytes, and not written, until
    /// this operation is reaped; `image` must stay open until then.
    pub unsafe fn write(
        &mut self,
        image: &Image,
        buf: *const u8,
        len: usize,
        offset: u64,
        tag: T,
    ) -> io::Result<()> {
        self.start(image, tag, "rbd_aio_write", |rbd, c| {
            // SAFETY: as for read.
            unsafe { (rbd.rbd_aio_write)(image.h, offset, len, buf.cast(), c) }
        })
    }

    /// Makes every write completed before it durable. `image` must stay
    /// open until this operation is reaped (Drop of the owner waits).
    pub fn flush(&mut self, image: &Image, tag: T) -> io::Result<()> {
        self.start(image, tag, "rbd_aio_flush", |rbd, c| {
            // SAFETY: live image and completion.
            unsafe { (rbd.rbd_aio_flush)(image.h, c) }
        })
    }

    /// Discards `len` bytes at `offset` (they read back as zeros).
    pub fn discard(&mut self, image: &Image, offset: u64, len: u64, tag: T) -> io::Result<()> {
        self.start(image, tag, "rbd_aio_discard", |rbd, c| {
            // SAFETY: live image and completion.
            unsafe { (rbd.rbd_aio_discard)(image.h, offset, len, c) }
        })
    }

    /// Calls `f(tag, result)` for every operation that completed, with
    /// librbd's return value (see above). Returns how many.
    pub fn reap(&mut self, mut f: impl FnMut(T, isize)) -> usize {
        let mut done = std::mem::take(&mut self.spare);
        std::mem::swap(
            &mut done,
            &mut self.shared.done.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let n = done.len();
        for &(index, result) in &done {
            // The callback has let go of the slot (it took `shared` before
            // queueing the index).
            self.free.push(index);
            f(self.tags[index as usize], result);
        }
        self.in_flight -= n;
        done.clear();
        self.spare = done;
        n
    }

    /// Blocks until some completion is waiting or `timeout` passed (None:
    /// no limit). Returns whether one is waiting.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        if !self
            .shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(true);
        }
        let ms = timeout.map_or(-1, |t| c_int::try_from(t.as_millis()).unwrap_or(c_int::MAX));
        let mut pfd = libc::pollfd {
            fd: self.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl<T: Copy> Drop for Completions<T> {
    /// librbd may still fill or send the buffers of operations in flight,
    /// and its callbacks still use their slots: wait for every one. If the
    /// wait fails, leak the slots rather than free what a callback uses.
    fn drop(&mut self) {
        let mut waited = 0u32;
        while self.in_flight > 0 {
            match self.wait(Some(Duration::from_secs(10))) {
                Ok(_) => {
                    self.clear_event();
                    if self.reap(|_, _| {}) == 0 {
                        waited += 1;
                        if waited % 6 == 1 {
                            log::warn!(
                                "waiting for {} RBD operations to complete (is the cluster reachable?)",
                                self.in_flight
                            );
                        }
                    }
                }
                Err(e) => {
                    log::error!("cannot wait for {} RBD operations: {e}", self.in_flight);
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testkit::check_header;
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The single-node cluster of integration/ceph.sh, started once per
    /// test process and shared by its tests (each uses images of its own).
    /// The script's watcher stops it once this process has exited, after
    /// every librbd client in it is gone. Ceph must be installed: a
    /// missing one fails the test.
    pub struct TestCluster {
        pub conf: String,
    }

    pub fn cluster() -> &'static TestCluster {
        static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../integration/ceph.sh");
            let pid = std::process::id();
            let dir = std::env::temp_dir().join(format!("cryptblk-ceph-test.{pid}"));
            let out = Command::new("bash")
                .arg(script)
                .arg("start")
                .arg(&dir)
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "integration/ceph.sh could not start a Ceph cluster (ceph-mon, ceph-osd, \
                 ceph-common: run integration/install-deps.sh)"
            );
            let conf = String::from_utf8(out.stdout).unwrap().trim().to_string();
            TestCluster { conf }
        })
    }

    impl TestCluster {
        pub fn options(&self) -> ClusterOptions {
            ClusterOptions {
                conf: Some(self.conf.clone()),
                ..Default::default()
            }
        }

        /// The test pool of a new connection.
        pub fn pool(&self) -> Arc<Pool> {
            let cluster = Cluster::connect(&self.options()).expect("connect to the test cluster");
            cluster.pool("rbd", None).expect("pool rbd")
        }

        /// A name no other test of this process uses.
        pub fn image_name(&self, what: &str) -> String {
            static N: AtomicU32 = AtomicU32::new(0);
            format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed))
        }

        /// Runs the `rbd` tool on this cluster.
        pub fn rbd(&self, args: &[&str]) -> String {
            let out = Command::new("rbd")
                .arg("-c")
                .arg(&self.conf)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("rbd (ceph-common) is not installed: integration/install-deps.sh");
            assert!(
                out.status.success(),
                "rbd {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn images_are_created_opened_and_sized_through_cephx() {
        let c = cluster();
        let pool = c.pool();
        let name = c.image_name("open");
        pool.create_image(&name, 8 << 20).unwrap();
        let image = Image::open(&pool, &name, None, false).unwrap();
        assert_eq!(image.size().unwrap(), 8 << 20);
        assert!(!image.read_only());
        assert!(c
            .rbd(&["info", &format!("rbd/{name}")])
            .contains("size 8 MiB"));
        let e = pool
            .create_image(&name, 1 << 20)
            .expect_err("created twice");
        assert_eq!(e.raw_os_error(), None);
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");

        let e = Image::open(&pool, "no-such-image", None, false)
            .err()
            .expect("opened an image that does not exist");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("no-such-image"), "{e}");
        let e = Image::open(&pool, &name, Some("no-such-snap"), false)
            .err()
            .expect("opened a snapshot that does not exist");
        assert!(
            e.to_string().contains(&format!("{name}@no-such-snap")),
            "{e}"
        );

        let cluster = Cluster::connect(&c.options()).unwrap();
        let e = cluster
            .pool("no-such-pool", None)
            .err()
            .expect("opened a missing pool");
        assert!(e.to_string().contains("no-such-pool"), "{e}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn a_wrong_cephx_key_is_refused() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        // A well-formed key the cluster does not know.
        std::fs::write(
            &keyring,
            "[client.admin]\n\tkey = AQBRfVNnAAAAABAAq0T3A0Yk2D0cX3QJxJ0V9A==\n",
        )
        .unwrap();
        let opts = ClusterOptions {
            keyring: Some(keyring.display().to_string()),
            set: vec![("client_mount_timeout".into(), "10".into())],
            ..c.options()
        };
        let start = std::time::Instant::now();
        let e = Cluster::connect(&opts)
            .err()
            .expect("connected with a wrong key");
        assert!(e.to_string().contains("client.admin"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(20), "{e}");
        let opts = ClusterOptions {
            id: Some("nobody".into()),
            set: vec![("client_mount_timeout".into(), "10".into())],
            ..c.options()
        };
        let e = Cluster::connect(&opts)
            .err()
            .expect("connected as an unknown client");
        assert!(e.to_string().contains("client.nobody"), "{e}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn completions_arrive_on_the_eventfd_with_their_tags() {
        let c = cluster();
        let pool = c.pool();
        let name = c.image_name("completions");
        pool.create_image(&name, 4 << 20).unwrap();
        let image = Image::open(&pool, &name, None, false).unwrap();
        let mut q = Completions::<u64>::new().unwrap();
        let mut data = vec![0x3cu8; 8192];
        // SAFETY: `data` outlives the operation, which is reaped below.
        unsafe { q.write(&image, data.as_ptr(), 8192, 4096, 11) }.unwrap();
        q.flush(&image, 12).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(
                q.wait(Some(Duration::from_secs(30))).unwrap(),
                "no completion"
            );
            q.clear_event();
            q.reap(|tag, r| got.push((tag, r)));
        }
        got.sort();
        assert_eq!(got[0].0, 11);
        assert!(got[0].1 >= 0, "{got:?}");
        assert_eq!(got[1], (12, 0));
        data.fill(0);
        // SAFETY: as above.
        unsafe { q.read(&image, data.as_mut_ptr(), 8192, 4096, 13) }.unwrap();
        assert!(
            q.wait(Some(Duration::from_secs(30))).unwrap(),
            "no completion"
        );
        assert_eq!(q.reap(|tag, r| assert_eq!((tag, r), (13, 8192))), 1);
        assert!(data.iter().all(|&b| b == 0x3c));
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn a_missing_library_names_the_debian_package() {
        let Err(e) = Rbd::load(c"librbd-not-here.so.1") else {
            panic!("loaded a library that does not exist");
        };
        let msg = e.to_string();
        assert!(msg.contains("librbd-not-here.so.1"), "{msg}");
        assert!(msg.contains("install the Debian package librbd1"), "{msg}");
        let Err(e) = Rados::load(c"librados-not-here.so.2") else {
            panic!("loaded a library that does not exist");
        };
        assert!(
            e.to_string()
                .contains("install the Debian package librados2"),
            "{e}"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn the_installed_libraries_have_every_function() {
        available().expect("librbd1 and librados2 are installed by integration/install-deps.sh");
        let (major, minor, _) = version().unwrap();
        assert!((major, minor) >= (1, 12), "librbd {major}.{minor}");
    }

    /// The C type of a parameter or return value as the tables spell it.
    fn rust_type(c: &str) -> &'static str {
        match c {
            "rados_t" => "RadosT",
            "rados_t*" => "*mut RadosT",
            "rados_ioctx_t" => "IoctxT",
            "rados_ioctx_t*" => "*mut IoctxT",
            "rbd_image_t" => "ImageT",
            "rbd_image_t*" => "*mut ImageT",
            "rbd_completion_t" => "CompletionT",
            "rbd_completion_t*" => "*mut CompletionT",
            "rbd_callback_t" => "Callback",
            "rbd_lock_mode_t" => "LockMode",
            "rbd_lock_mode_t*" => "*mut LockMode",
            "char**" => "*mut *mut c_char",
            "size_t*" => "*mut usize",
            "void*" => "*mut c_void",
            "char*" => "*mut c_char",
            "const char*" => "*const c_char",
            "int*" => "*mut c_int",
            "uint64_t*" => "*mut u64",
            "size_t" => "usize",
            "ssize_t" => "isize",
            "uint64_t" => "u64",
            "int" => "c_int",
            "void" => "()",
            other => panic!("a C type the tables do not map: {other:?}"),
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn the_tables_match_librados_h_and_librbd_h() {
        check_header(
            "/usr/include/rados/librados.h",
            "librbd-dev",
            "CEPH_RADOS_API",
            RADOS_SIGNATURES,
            rust_type,
        );
        check_header(
            "/usr/include/rbd/librbd.h",
            "librbd-dev",
            "CEPH_RBD_API",
            RBD_SIGNATURES,
            rust_type,
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "external-tools"),
        ignore = "needs librados/librbd or a Ceph cluster: ./test.sh runs it"
    )]
    fn an_unreadable_configuration_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("none.conf").display().to_string();
        let opts = ClusterOptions {
            conf: Some(conf.clone()),
            ..Default::default()
        };
        let e = Cluster::connect(&opts)
            .err()
            .expect("connected without a configuration");
        assert!(e.to_string().contains(&conf), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
