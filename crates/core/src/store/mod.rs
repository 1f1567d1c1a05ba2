//! Where ciphertext lives: byte ranges of the image file or block device,
//! read, written, synced and discarded. Nothing here knows about encryption
//! or virtio; the volume layer puts ciphertext in and takes it out.
//!
//! `uring` submits those operations asynchronously through io_uring, from
//! buffers of a pool allocated once per queue: many operations per queue
//! are at the disk at once and complete in any order.
//!
//! `nbd` does the same on an NBD export, through libnbd (`libnbd`, the one
//! module that knows its C API; loaded at run time): a connection per queue,
//! or with a server that allows only one, `nbd_shared`'s, which every queue
//! drives.
//!
//! `rbd` does the same on a Ceph RBD image, through librbd (`librbd`, the
//! one module that knows librados' and librbd's C API; loaded at run time).

mod aligned;
mod buffers;
mod dl;
pub mod libnbd;
pub mod librbd;
mod nbd;
mod nbd_shared;
mod rbd;
#[cfg(test)]
mod testkit;
mod uring;

pub use aligned::AlignedBuf;
pub use buffers::{BufId, Buffers};
pub use nbd::{is_uri as is_nbd_uri, NbdExport, NbdStore};
pub use nbd_shared::SharedStore;
pub use rbd::{is_spec as is_rbd_spec, RbdDisk, RbdError, RbdSpec, RbdStore};
pub use uring::{Op, UringStore};

use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;

use libnbd::Tls;
use librbd::ClusterOptions;

/// Lets the LUKS code read and write headers on images that are not files:
/// NBD URIs (a libnbd connection of their own, with `tls`, whose handshake
/// and commands give up after the request timeout that `nbd_reconnect`
/// implies, 30 s when zero) and RBD images (a cluster connection and image
/// handle of their own, reached as `ceph` says; None: Ceph's defaults,
/// $CEPH_CONF and $CEPH_ARGS). Call once at start-up.
pub fn install_luks_opener(
    tls: Option<Tls>,
    nbd_reconnect: std::time::Duration,
    ceph: Option<ClusterOptions>,
) {
    nbd::set_luks_connection(
        tls.unwrap_or_default(),
        nbd::request_timeout_for(nbd_reconnect),
    );
    if let Some(ceph) = ceph {
        rbd::set_luks_cluster(ceph);
    }
    crate::luks::device::set_opener(crate::luks::device::Opener {
        claims: |path| is_nbd_uri(path) || is_rbd_spec(path),
        open: |path: &Path, write| {
            if is_rbd_spec(path) {
                rbd::open_header(path, write)
            } else {
                nbd::open_header(path)
            }
        },
    });
}

/// A queue's store, whichever kind holds the image: the asynchronous
/// executor (device/aio.rs) and its one completion path see only this.
pub enum Store {
    Uring(UringStore),
    Nbd(NbdStore),
    /// A queue's share of the one connection of an NBD server without
    /// multi-conn.
    NbdShared(SharedStore),
    Rbd(RbdStore),
}

/// Calls the same method on whichever store this is.
macro_rules! either {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Store::Uring($s) => $e,
            Store::Nbd($s) => $e,
            Store::NbdShared($s) => $e,
            Store::Rbd($s) => $e,
        }
    };
}

impl Store {
    /// Readable when completions are waiting: the vring thread's epoll
    /// waits on it beside the kick fd (io_uring's eventfd, NBD's socket,
    /// the eventfd librbd's completion callback writes).
    pub fn event_fd(&self) -> RawFd {
        either!(self, s => s.event_fd())
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        either!(self, s => s.buffers())
    }

    pub fn in_flight(&self) -> usize {
        either!(self, s => s.in_flight())
    }

    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        either!(self, s => s.push(op, tag))
    }

    pub fn submit(&mut self) -> io::Result<()> {
        either!(self, s => s.submit())
    }

    pub fn clear_event(&self) {
        either!(self, s => s.clear_event())
    }

    pub fn reap(&mut self, f: impl FnMut(u64, i32)) -> io::Result<()> {
        either!(self, s => s.reap(f))
    }

    pub fn wait(&mut self) -> io::Result<()> {
        either!(self, s => s.wait())
    }

    /// Completions are waiting that the event fd may not announce (an NBD
    /// store that read replies while it sent): reap again.
    pub fn ready(&self) -> bool {
        match self {
            Store::Uring(_) | Store::Rbd(_) => false,
            Store::Nbd(s) => s.ready(),
            Store::NbdShared(s) => s.ready(),
        }
    }
}
