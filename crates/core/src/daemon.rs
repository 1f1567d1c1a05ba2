//! The serve loop: accept a VMM, run the device until it disconnects, then
//! accept the next one; on SIGTERM/SIGINT finish in-flight requests, sync
//! the image, remove the socket (if cryptblk created it) and return.
//! SIGHUP is logged and ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::device::GuestMemory;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::control::ControlSocket;
use crate::device::{AioMode, BlkBackend, BlkDevice};
use crate::notify::Notifier;
use crate::sandbox::{NbdPeer, Network, Sandbox, SandboxError};
use crate::socket::{inherited, Gate, ListenOn, SocketAccess, SocketError, SocketFile, Stopper};
use crate::store::NbdExport;

/// STATUS= while no VMM is connected.
const WAITING: &str = "waiting for a VMM";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot set up the accept loop: {0}; raise the open file limit (ulimit -n)")]
    Accept(std::io::Error),
    #[error("cannot start the vhost-user device: {0}")]
    Device(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot start the control socket's thread: {0}")]
    Control(std::io::Error),
    #[error("fdatasync of the image failed at shutdown: {0}; the image may miss recent writes")]
    FinalSync(std::io::Error),
}

/// Shared between the serve loop and the signal thread.
struct Shutdown {
    requested: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    /// Ends a wait for the next connection.
    stopper: Stopper,
    /// An NBD export: its requests in flight are waited for only so long.
    nbd: Option<Arc<NbdExport>>,
}

impl Shutdown {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // Before anything waits for the requests in flight: a queue thread
        // blocked on a server that never answers gives up within the
        // export's grace (the reconnect timeout), so the drain below ends.
        if let Some(nbd) = &self.nbd {
            nbd.stop_within();
        }
        // Every accept from now on returns at once, so a connection that
        // ends after this point is the last one.
        self.stopper.stop();
        let handle = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            h.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// The listening socket and, when cryptblk created it, its file.
struct Listening {
    gate: Gate,
    /// None for an inherited socket: its file is not ours to remove.
    file: Option<SocketFile>,
    /// Where it listens, as the log says it.
    shown: String,
}

impl Listening {
    fn open(at: &ListenOn, access: &SocketAccess) -> Result<Self, DaemonError> {
        let (listener, file, shown) = match at {
            ListenOn::Path(path) => {
                let listener = crate::socket::listen(path, access)?;
                let file = SocketFile::open(path)?;
                (listener, Some(file), path.display().to_string())
            }
            ListenOn::Inherited { fd, origin } => {
                let listener = inherited::adopt(*fd, origin)?;
                let shown = match inherited::bound_path(&listener) {
                    Some(p) => format!("{} (fd {fd} from {origin})", p.display()),
                    None => format!("fd {fd} (from {origin})"),
                };
                (listener, None, shown)
            }
        };
        let gate = Gate::new(listener, access.allow.clone()).map_err(DaemonError::Accept)?;
        Ok(Listening { gate, file, shown })
    }

    /// Closes the socket and removes its file if cryptblk created it.
    fn close(self) {
        drop(self.gate);
        if let Some(file) = self.file {
            file.remove();
        }
    }
}

/// Serves `dev` on the socket `at` says (created and guarded as `access`
/// says, or inherited), until SIGTERM or SIGINT, confined by `sandbox` from
/// the moment the socket listens (before any thread starts). `notify` hears
/// READY=1 once the sandbox is in place, the connection state as STATUS=,
/// and STOPPING=1 at a signal. With `control`, a control socket answers
/// status and statistics there (see `control`).
pub fn serve(
    dev: Arc<BlkDevice>,
    at: &ListenOn,
    access: &SocketAccess,
    sandbox: &Sandbox,
    control: Option<&std::path::Path>,
    notify: &Notifier,
) -> Result<(), DaemonError> {
    // Before the socket listens: a VMM (or test) that sees it listening may
    // signal at once, and must not meet the default actions.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Signals)?;
    let mut listening = Listening::open(at, access)?;
    let shutdown = Arc::new(Shutdown {
        requested: AtomicBool::new(false),
        connection: Mutex::new(None),
        stopper: listening.gate.stopper(),
        nbd: dev.volume().nbd().cloned(),
    });
    let control = match control.map(ControlSocket::listen).transpose() {
        Ok(c) => c,
        Err(e) => {
            listening.close();
            return Err(e.into());
        }
    };
    let dirs: Vec<_> = (listening.file.as_ref().map(SocketFile::dir_fd).into_iter())
        .chain(control.as_ref().map(ControlSocket::dir_fd))
        .collect();
    let net = if dev.volume().rbd().is_some() {
        Some(Network::Rbd)
    } else {
        dev.volume().nbd().and_then(|e| e.redial()).map(|r| {
            Network::Nbd(NbdPeer {
                family: r.endpoint().family(),
                tcp_port: r.endpoint().tcp_port(),
                tls: r.endpoint().tls(),
            })
        })
    };
    if let Err(e) = sandbox.apply(&dirs, net) {
        listening.close();
        if let Some(c) = control {
            c.close();
        }
        return Err(e.into());
    }
    // After the sandbox: its threads are confined like every other.
    let control_file = match control.map(|c| c.start(dev.clone(), sandbox.image.clone())) {
        Some(Err(e)) => {
            listening.close();
            return Err(DaemonError::Control(e));
        }
        other => other.and_then(Result::ok),
    };
    let signal_handle = signals.handle();
    let for_signals = shutdown.clone();
    let notify_stop = notify.clone();
    let signal_thread = std::thread::spawn(move || {
        for sig in signals.forever() {
            // SIGHUP's default action would kill the daemon, and with it
            // the guest's disk, when the terminal or session it was started
            // from goes away; there is no configuration to reload either.
            if sig == SIGHUP {
                log::info!("SIGHUP ignored (SIGTERM or SIGINT stops cryptblk)");
                continue;
            }
            log::info!("signal {sig}: finishing requests in flight, then exiting");
            notify_stop.stopping("stopping: finishing requests in flight, syncing the image");
            for_signals.request();
            break;
        }
    });
    log::info!(
        "serving {} bytes on {} ({} queues, io {:?}{})",
        dev.volume().capacity_bytes(),
        listening.shown,
        dev.options().queues,
        dev.volume().io(),
        match (dev.volume().mapped(), dev.options().aio) {
            (true, _) => "",
            (false, AioMode::IoUring) => ", io_uring",
            (false, AioMode::Sync) => ", synchronous",
        }
    );
    notify.ready(WAITING);
    let result = serve_connections(&dev, &mut listening.gate, &shutdown, notify);
    signal_handle.close();
    let _ = signal_thread.join();
    let owned = listening.file.is_some();
    listening.close();
    if let Some(file) = control_file {
        file.remove();
    }
    result?;
    dev.volume()
        .flush_if_held()
        .map_err(DaemonError::FinalSync)?;
    if owned {
        log::info!("image synced, socket removed, exiting");
    } else {
        log::info!("image synced, exiting (the inherited socket stays with its owner)");
    }
    Ok(())
}

fn serve_connections(
    dev: &Arc<BlkDevice>,
    listener: &mut Gate,
    shutdown: &Shutdown,
    notify: &Notifier,
) -> Result<(), DaemonError> {
    let mut connections = 0u64;
    while !shutdown.requested() {
        let mem = GuestMemoryAtomic::new(GuestMemory::new());
        let backend = BlkBackend::new(dev.clone(), mem.clone())
            .map_err(|e| DaemonError::Device(format!("cannot start crypto workers: {e}")))?;
        let mut daemon = VhostUserDaemon::new("cryptblk".into(), backend.clone(), mem)
            .map_err(|e| DaemonError::Device(e.to_string()))?;
        backend
            .register_completion_fds(&daemon.get_epoll_handlers())
            .map_err(|e| DaemonError::Device(format!("cannot wait for I/O completions: {e}")))?;
        if let Err(e) = start_next(&mut daemon, listener, dev) {
            if !shutdown.requested() {
                log::warn!("accepting a connection failed: {e}");
            }
            continue;
        }
        *shutdown
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        backend.attach_connection(daemon.shutdown_handle());
        // A connection accepted after SIGTERM is our own wake-up call (or a
        // VMM arriving too late): close it without ceremony.
        let wake_up = shutdown.requested();
        if wake_up {
            daemon.request_shutdown();
        } else {
            connections += 1;
            log::info!("frontend connected (connection {connections})");
            notify.status(&format!("serving a VMM (connection {connections})"));
        }
        match daemon.wait() {
            _ if wake_up => {}
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended with an error: {e}"),
        }
        dev.stats().disconnected();
        // The requests in flight on an NBD export get its grace (the
        // reconnect timeout) to be answered, then fail (IOERR): a server
        // that never answers must not keep the next VMM out.
        let nbd = dev.volume().nbd();
        if let Some(nbd) = nbd {
            nbd.stop_within();
        }
        shutdown
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Dropping the daemon stops and joins the vring threads; each
        // finishes the batch it is in first, so no accepted request is cut.
        // Requests at the disk complete first: a vring thread's exit would
        // cancel them.
        backend.quiesce();
        backend.signal_exit();
        drop(daemon);
        backend.close_exit_fds();
        // The last reference: dropping it joins the worker pool, so every
        // accepted request is finished before the sync below.
        drop(backend);
        if let Err(e) = dev.volume().flush_if_held() {
            log::error!("fdatasync after disconnect failed: {e}");
        }
        if let (Some(nbd), false) = (nbd, shutdown.requested()) {
            nbd.resume();
        }
        if !wake_up && !shutdown.requested() {
            notify.status(WAITING);
        }
    }
    Ok(())
}

/// `VhostUserDaemon::start`, with the accept done by `gate` so that only
/// admitted peers reach the vhost-user handler. Errors are those `start`
/// gives for a failed accept.
fn start_next(
    daemon: &mut VhostUserDaemon<Arc<BlkBackend>>,
    gate: &mut Gate,
    dev: &BlkDevice,
) -> Result<(), vhost_user_backend::Error> {
    let stream = gate.accept().map_err(|e| {
        vhost_user_backend::Error::CreateBackendListener(VhostUserError::SocketError(e))
    })?;
    let peer = crate::socket::peer_of(&stream, false).ok();
    dev.stats().connected(peer.map(|p| (p.pid, p.uid)));
    daemon.start_with_stream(stream)
}
