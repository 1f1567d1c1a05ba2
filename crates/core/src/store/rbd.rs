//! Asynchronous image I/O on a Ceph RBD image: the same shape as
//! `UringStore` (push, submit, reap, wait, a pool of buffers, an event fd),
//! over librbd's `rbd_aio_*` calls (`librbd`, the one module that knows
//! librados' and librbd's C API).
//!
//! librbd sends an operation when it is pushed and completes it on one of
//! its own threads; the completion callback queues the result and writes
//! an eventfd, which takes io_uring's place in the vring thread's epoll.
//! `submit` therefore has nothing left to do, and `reap` runs on the vring
//! thread only.
//!
//! Buffers: librbd reads into and writes from pool buffers, which stay
//! untouched until the operation is reaped; dropping the store first waits
//! for every operation in flight, then closes its reference to the image,
//! then frees the pool.
//!
//! Discards follow librbd's configuration: with the defaults
//! (`rbd_skip_partial_discard`, `rbd_discard_granularity_bytes` = 64 KiB)
//! the parts of a range that do not cover whole 64 KiB units keep their
//! data, which virtio-blk's DISCARD allows (it promises no zeros).
//!
//! Results follow `UringStore`: a read or write reports the bytes moved,
//! a flush or discard 0, a failure a negative errno (librbd's: -EROFS for a
//! write to a snapshot or a read-only image, -EINVAL for a range that
//! starts past the end). librbd reports 0 for every successful write, even
//! one it cut short at the end of the image: the store reports such a write
//! as short, as a file would.

use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use super::librbd::{Completions, Image};
use super::{Buffers, Op};

/// Whether an `--image` names an RBD image (`rbd:…`) rather than a file.
pub fn is_spec(image: &Path) -> bool {
    image.to_str().is_some_and(|s| s.starts_with("rbd:"))
}

/// An RBD image as `--image` names it: `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]`,
/// QEMU's spelling (without its `:key=value` options, which are cryptblk's
/// `--ceph-*` options instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    /// A RADOS namespace inside the pool.
    pub namespace: Option<String>,
    pub image: String,
    /// A snapshot: always served read-only.
    pub snap: Option<String>,
}

impl RbdSpec {
    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]`; the error says what is
    /// wrong with it.
    pub fn parse(spec: &str) -> Result<RbdSpec, &'static str> {
        let rest = spec
            .strip_prefix("rbd:")
            .ok_or("an RBD image is rbd:POOL/IMAGE[@SNAP]")?;
        if rest.contains(':') {
            return Err("QEMU's :key=value options are not taken here: use --ceph-conf, --ceph-id and --ceph-keyring");
        }
        if rest.contains('\\') || rest.contains('\0') {
            return Err("backslashes and NUL are not allowed in pool, image or snapshot names");
        }
        let (path, snap) = match rest.split_once('@') {
            Some((path, snap)) => (path, Some(snap)),
            None => (rest, None),
        };
        if snap.is_some_and(|s| s.is_empty() || s.contains(['@', '/'])) {
            return Err("the snapshot name after @ must be non-empty and contain no @ or /");
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err("pool, namespace and image names must not be empty: rbd:POOL/IMAGE[@SNAP]");
        }
        let (pool, namespace, image) = match parts[..] {
            [pool, image] => (pool, None, image),
            [pool, ns, image] => (pool, Some(ns), image),
            _ => return Err("an RBD image is rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE, with an optional @SNAP"),
        };
        Ok(RbdSpec {
            pool: pool.to_string(),
            namespace: namespace.map(str::to_string),
            image: image.to_string(),
            snap: snap.map(str::to_string),
        })
    }
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

/// What an operation in flight reports on success.
#[derive(Debug, Clone, Copy)]
struct Pending {
    tag: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// librbd's count of bytes read.
    Read,
    /// librbd says 0: report the bytes that fit in the image.
    Write { fits: u32 },
    /// 0.
    Other,
}

pub struct RbdStore {
    /// Declared first, so dropped first: its Drop waits for every
    /// operation, which may still use `image` and `buffers`.
    completions: Completions<Pending>,
    image: Arc<Image>,
    /// The image's size as last read; a write that reaches past it reads
    /// it again (the image may have grown) before it is cut.
    size: u64,
    buffers: Buffers,
}

impl RbdStore {
    /// A store on the open `image` (shared with other queues' stores) with
    /// `buffers` as its I/O buffers.
    pub fn new(image: Arc<Image>, buffers: Buffers) -> io::Result<Self> {
        let size = image.size()?;
        Ok(RbdStore {
            completions: Completions::new()?,
            image,
            size,
            buffers,
        })
    }

    /// Readable when completions are waiting: register it beside the kick fd.
    pub fn event_fd(&self) -> RawFd {
        self.completions.event_fd()
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    /// Pushed and not yet reaped: librbd may still use their buffers.
    pub fn in_flight(&self) -> usize {
        self.completions.in_flight()
    }

    /// Starts `op`; `tag` comes back with its result.
    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        let image = &*self.image;
        match op {
            Op::Read { buf, len, offset } => {
                let ptr = self.buffers.ptr(buf);
                let pending = Pending {
                    tag,
                    kind: Kind::Read,
                };
                // SAFETY: the buffer run belongs to the pool, which outlives
                // every operation (Drop waits for them before the pool is
                // freed); the caller does not touch it between pushing and
                // reaping; the image is held by this store.
                unsafe {
                    self.completions
                        .read(image, ptr, len as usize, offset, pending)
                }
            }
            Op::Write { buf, len, offset } => {
                let end = offset.saturating_add(u64::from(len));
                if end > self.size {
                    self.size = image.size()?;
                }
                let fits = self.size.saturating_sub(offset).min(u64::from(len)) as u32;
                let ptr = self.buffers.ptr(buf);
                let pending = Pending {
                    tag,
                    kind: Kind::Write { fits },
                };
                // SAFETY: as for Read.
                unsafe {
                    self.completions
                        .write(image, ptr, len as usize, offset, pending)
                }
            }
            Op::Sync => self.completions.flush(
                image,
                Pending {
                    tag,
                    kind: Kind::Other,
                },
            ),
            Op::Discard { offset, len } => self.completions.discard(
                image,
                offset,
                len,
                Pending {
                    tag,
                    kind: Kind::Other,
                },
            ),
        }
    }

    /// Nothing to do: librbd sent every operation when it was pushed.
    pub fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Clears the eventfd: call it before `reap` when the eventfd woke the
    /// caller, so that a completion landing during the reap sets it again.
    pub fn clear_event(&self) {
        self.completions.clear_event();
    }

    /// Calls `f(tag, result)` for every operation that completed (result:
    /// bytes moved, or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> io::Result<()> {
        self.completions.reap(|p, r| {
            let result = if r < 0 {
                i32::try_from(r).unwrap_or(-libc::EIO)
            } else {
                match p.kind {
                    Kind::Read => i32::try_from(r).unwrap_or(i32::MAX),
                    Kind::Write { fits } => fits as i32,
                    Kind::Other => 0,
                }
            };
            f(p.tag, result)
        });
        Ok(())
    }

    /// Blocks until at least one operation has completed (for draining a
    /// queue, and a lone request; the data path otherwise never blocks).
    pub fn wait(&mut self) -> io::Result<()> {
        if self.in_flight() > 0 {
            self.completions.wait(None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::librbd::tests::cluster;
    use super::super::librbd::Pool;
    use super::*;
    use std::time::{Duration, Instant};

    fn image(pool: &Arc<Pool>, what: &str, size: u64) -> (Arc<Image>, String) {
        let name = cluster().image_name(what);
        pool.create_image(&name, size).unwrap();
        let image = Image::open(pool, &name, None, false).unwrap();
        (Arc::new(image), name)
    }

    fn run(s: &mut RbdStore, op: Op, tag: u64) -> i32 {
        s.push(op, tag).unwrap();
        s.submit().unwrap();
        let mut got = None;
        let start = Instant::now();
        while got.is_none() {
            s.wait().unwrap();
            s.clear_event();
            s.reap(|t, r| {
                assert_eq!(t, tag);
                got = Some(r);
            })
            .unwrap();
            assert!(start.elapsed() < Duration::from_secs(60), "no completion");
        }
        got.unwrap()
    }

    #[test]
    fn specs_parse_as_qemu_spells_them() {
        let spec = |s: &str| RbdSpec::parse(s);
        let img = |pool: &str, ns: Option<&str>, image: &str, snap: Option<&str>| RbdSpec {
            pool: pool.into(),
            namespace: ns.map(Into::into),
            image: image.into(),
            snap: snap.map(Into::into),
        };
        assert_eq!(spec("rbd:rbd/vm1"), Ok(img("rbd", None, "vm1", None)));
        assert_eq!(
            spec("rbd:pool/vm1@before-upgrade"),
            Ok(img("pool", None, "vm1", Some("before-upgrade")))
        );
        assert_eq!(
            spec("rbd:pool/tenant1/vm1@s"),
            Ok(img("pool", Some("tenant1"), "vm1", Some("s")))
        );
        for s in ["rbd:rbd/vm1", "rbd:p/ns/i@s", "rbd:p/i@s"] {
            assert_eq!(spec(s).unwrap().to_string(), s);
        }
        assert!(is_spec(Path::new("rbd:p/i")));
        assert!(!is_spec(Path::new("/var/lib/rbd:p/i")));
        for bad in [
            "rbd:",
            "rbd:vm1",
            "rbd:/vm1",
            "rbd:pool/",
            "rbd:a/b/c/d",
            "rbd:pool/vm1@",
            "rbd:pool/vm1@a@b",
            "rbd:pool/vm1@a/b",
            "rbd:pool/vm1:conf=/etc/ceph/ceph.conf",
            "rbd:pool\\/vm1",
            "nbd://h/e",
        ] {
            assert!(spec(bad).is_err(), "{bad} parsed");
        }
        assert!(spec("rbd:p/i:id=admin").unwrap_err().contains("--ceph-id"));
    }

    #[test]
    fn writes_reads_flushes_and_discards() {
        let pool = cluster().pool();
        let (img, name) = image(&pool, "store", 16 << 20);
        let mut s = RbdStore::new(img, Buffers::new(4, 65536)).unwrap();
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

        // Another client (the rbd tool) sees the data.
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let export_s = export.to_str().unwrap();
        cluster().rbd(&["export", &format!("rbd/{name}"), export_s]);
        let raw = std::fs::read(&export).unwrap();
        assert_eq!(raw.len(), 16 << 20);
        assert!(raw[..8192].iter().all(|&x| x == 0));
        assert!(raw[8192..8192 + 65536].iter().all(|&x| x == 0x5c));

        // librbd skips the parts of a discard that do not cover whole
        // `rbd_discard_granularity_bytes` (64 KiB) units, as a disk may:
        // only an aligned discard is sure to read back as zeros.
        let discard = Op::Discard {
            offset: 0,
            len: 128 << 10,
        };
        assert_eq!(run(&mut s, discard, 10), 0);
        s.buffers().bytes_mut(b, 4096).fill(0xff);
        assert_eq!(run(&mut s, read, 11), 4096);
        assert!(
            s.buffers().bytes_mut(b, 4096).iter().all(|&x| x == 0),
            "a discarded range reads as zeros"
        );
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn many_operations_in_flight_complete_in_any_order_and_verify() {
        let pool = cluster().pool();
        let (img, _) = image(&pool, "many", 64 << 20);
        let mut s = RbdStore::new(img, Buffers::new(64, 65536)).unwrap();
        // 64 writes of 64 KiB in flight at once, spread over 16 objects
        // (4 MiB each): the OSD answers them in its own order.
        for i in 0..64u16 {
            let b = s.buffers().take().unwrap();
            assert_eq!(b, i);
            s.buffers().bytes_mut(b, 65536).fill(i as u8 + 1);
            let op = Op::Write {
                buf: b,
                len: 65536,
                offset: u64::from(i % 16) * (4 << 20) + u64::from(i / 16) * 65536,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        s.submit().unwrap();
        assert!(s.in_flight() > 0);
        let mut seen = Vec::new();
        while seen.len() < 64 {
            s.wait().unwrap();
            s.clear_event();
            s.reap(|t, r| {
                assert_eq!(r, 65536, "tag {t}");
                seen.push(t)
            })
            .unwrap();
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>());
        eprintln!(
            "completion order of 64 writes: {}",
            if seen == sorted {
                "submission order"
            } else {
                "reordered"
            }
        );
        // Read each back into another buffer (reversed), all in flight.
        for i in 0..64u16 {
            s.buffers().bytes_mut(i, 65536).fill(0);
            let j = 63 - i;
            let op = Op::Read {
                buf: i,
                len: 65536,
                offset: u64::from(j % 16) * (4 << 20) + u64::from(j / 16) * 65536,
            };
            s.push(op, u64::from(i)).unwrap();
        }
        s.submit().unwrap();
        let mut n = 0;
        while n < 64 {
            s.wait().unwrap();
            s.clear_event();
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
        // Leave operations in flight: dropping the store must wait for
        // them (librbd still fills these buffers), not hang or free them.
        for i in 0..16u16 {
            let op = Op::Read {
                buf: i,
                len: 65536,
                offset: 0,
            };
            s.push(op, 0).unwrap();
        }
        assert!(s.in_flight() > 0);
        drop(s);
    }

    #[test]
    fn errors_come_back_as_negative_errno() {
        let c = cluster();
        let pool = c.pool();
        let (img, name) = image(&pool, "errors", 1 << 20);
        let mut s = RbdStore::new(img, Buffers::new(4, 8192)).unwrap();
        let b = s.buffers().take().unwrap();
        // A range that starts at the end of the image.
        let past = Op::Read {
            buf: b,
            len: 4096,
            offset: 1 << 20,
        };
        assert_eq!(run(&mut s, past, 1), -libc::EINVAL);
        // One that crosses it: short, as on a file.
        let across = Op::Read {
            buf: b,
            len: 8192,
            offset: (1 << 20) - 4096,
        };
        assert_eq!(run(&mut s, across, 2), 4096);
        let across = Op::Write {
            buf: b,
            len: 8192,
            offset: (1 << 20) - 4096,
        };
        assert_eq!(
            run(&mut s, across, 3),
            4096,
            "librbd says 0: the store says short"
        );
        let past = Op::Write {
            buf: b,
            len: 4096,
            offset: 1 << 20,
        };
        assert_eq!(run(&mut s, past, 4), -libc::EINVAL);
        // The store goes on after failures.
        assert_eq!(run(&mut s, Op::Sync, 5), 0);
        drop(s);

        // Snapshots are read-only: writes and discards fail with EROFS.
        c.rbd(&["snap", "create", &format!("rbd/{name}@s1")]);
        let snap = Arc::new(Image::open(&pool, &name, Some("s1"), false).unwrap());
        assert!(snap.read_only());
        let mut s = RbdStore::new(snap, Buffers::new(4, 8192)).unwrap();
        let b = s.buffers().take().unwrap();
        let write = Op::Write {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, write, 6), -libc::EROFS);
        let discard = Op::Discard {
            offset: 0,
            len: 4096,
        };
        assert_eq!(run(&mut s, discard, 7), -libc::EROFS);
        let read = Op::Read {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, read, 8), 4096);
        assert_eq!(run(&mut s, Op::Sync, 9), 0);
        drop(s);

        // So is the head opened read-only.
        let ro = Arc::new(Image::open(&pool, &name, None, true).unwrap());
        let mut s = RbdStore::new(ro, Buffers::new(4, 8192)).unwrap();
        let b = s.buffers().take().unwrap();
        let write = Op::Write {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, write, 10), -libc::EROFS);
    }

    #[test]
    fn queues_share_one_image_handle() {
        let pool = cluster().pool();
        let (img, _) = image(&pool, "shared", 8 << 20);
        let stores: Vec<_> = (0..2)
            .map(|_| RbdStore::new(img.clone(), Buffers::new(8, 65536)).unwrap())
            .collect();
        let threads: Vec<_> = stores
            .into_iter()
            .enumerate()
            .map(|(q, mut s)| {
                std::thread::spawn(move || {
                    for round in 0..8u64 {
                        for i in 0..8u16 {
                            s.buffers()
                                .bytes_mut(i, 65536)
                                .fill((q * 16 + i as usize) as u8);
                            let op = Op::Write {
                                buf: i,
                                len: 65536,
                                offset: (q as u64) * (4 << 20) + u64::from(i) * 65536,
                            };
                            s.push(op, round * 8 + u64::from(i)).unwrap();
                        }
                        let mut n = 0;
                        while n < 8 {
                            s.wait().unwrap();
                            s.clear_event();
                            s.reap(|_, r| {
                                assert_eq!(r, 65536);
                                n += 1
                            })
                            .unwrap();
                        }
                    }
                    s
                })
            })
            .collect();
        for t in threads {
            let mut s = t.join().unwrap();
            assert_eq!(run(&mut s, Op::Sync, 99), 0);
        }
    }
}
