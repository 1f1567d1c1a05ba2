//! Asynchronous image I/O through io_uring: one ring per queue, owned by
//! that queue's vring thread.
//!
//! Why io_uring (the `io-uring` crate, tokio-rs's maintained binding of the
//! raw interface; no runtime): it batches many operations into one system
//! call, completes them in any order, signals completions on an eventfd that
//! the vring thread waits on beside its kick fd, and does O_DIRECT, buffered
//! I/O, fdatasync and hole punching alike. Linux AIO does only O_DIRECT, and
//! a thread pool keeps only as many operations in flight as it has threads.
//!
//! The ring is created disabled and restricted to the operations below
//! before it is enabled (IORING_REGISTER_RESTRICTIONS): operations submitted
//! through a ring bypass seccomp, so a compromised daemon must not be able
//! to open files or sockets through it.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BufId, Buffers};

/// One operation on the image, at byte offsets of the file or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Fill `len` bytes of buffer `buf` from `offset`.
    Read { buf: BufId, len: u32, offset: u64 },
    /// Store the first `len` bytes of buffer `buf` at `offset`.
    Write { buf: BufId, len: u32, offset: u64 },
    /// fdatasync: every write completed before it reaches stable storage.
    Sync,
    /// Punch a hole (regular files) or discard (block devices).
    Discard { offset: u64, len: u64 },
}

/// How often, and how long apart, a ring that says EAGAIN (no kernel memory
/// for the request right now) is retried before the submission fails.
const EAGAIN_RETRIES: u32 = 1000;
const EAGAIN_PAUSE: Duration = Duration::from_micros(100);

pub struct UringStore {
    ring: IoUring,
    event: EventFd,
    fd: RawFd,
    buffers: Buffers,
    /// The pool is registered with the kernel (READ/WRITE_FIXED: no page
    /// pinning per operation).
    fixed: bool,
    /// Pushed and not yet reaped: the kernel may still use their buffers.
    in_flight: usize,
    /// The last submit met a full completion queue (EBUSY): submit again
    /// after the next reap.
    resubmit: bool,
}

impl UringStore {
    /// A ring of `entries` submission slots on the image `fd` (which must
    /// outlive the store), with `buffers` as its I/O buffers.
    pub fn new(fd: RawFd, entries: u32, mut buffers: Buffers) -> io::Result<Self> {
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let (base, len) = buffers.arena();
        let arena = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the arena stays allocated, at this address, for as long
        // as the ring exists: `buffers` is owned by the store, and Drop
        // waits for the kernel before either goes away.
        let fixed = unsafe { ring.submitter().register_buffers(&[arena]) }.is_ok();
        let mut allowed = [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::ReadFixed::CODE,
            opcode::WriteFixed::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ]
        .map(Restriction::sqe_op);
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        Ok(UringStore {
            ring,
            event,
            fd,
            buffers,
            fixed,
            in_flight: 0,
            resubmit: false,
        })
    }

    /// Readable when completions are waiting: register it beside the kick fd.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    pub fn buffers(&mut self) -> &mut Buffers {
        &mut self.buffers
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `op`; the kernel sees it at the next `submit`. `tag` comes
    /// back with its result.
    pub fn push(&mut self, op: Op, tag: u64) -> io::Result<()> {
        let entry = self.entry(op).user_data(tag);
        loop {
            // SAFETY: every buffer an entry names belongs to the pool, which
            // outlives the ring; the caller does not touch a buffer between
            // pushing it and reaping its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel.
            self.submit_now()?;
        }
    }

    fn entry(&mut self, op: Op) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        match op {
            Op::Read { buf, len, offset } => {
                let ptr = self.buffers.ptr(buf);
                if self.fixed {
                    opcode::ReadFixed::new(fd, ptr, len, 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len).offset(offset).build()
                }
            }
            Op::Write { buf, len, offset } => {
                let ptr = self.buffers.ptr(buf);
                if self.fixed {
                    opcode::WriteFixed::new(fd, ptr, len, 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(fd, ptr, len).offset(offset).build()
                }
            }
            Op::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard { offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
    }

    /// Hands everything pushed so far to the kernel, without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.submit_now()
    }

    fn submit_now(&mut self) -> io::Result<()> {
        let mut eagain = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.resubmit = false;
                    return Ok(());
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Completions are waiting (and their eventfd is set):
                    // the next reap makes room, then submits again.
                    Some(libc::EBUSY) => {
                        self.resubmit = true;
                        return Ok(());
                    }
                    Some(libc::EAGAIN) if eagain < EAGAIN_RETRIES => {
                        eagain += 1;
                        std::thread::sleep(EAGAIN_PAUSE);
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    /// Clears the eventfd: call it before `reap` when the eventfd woke the
    /// caller, so that a completion landing during the reap sets it again.
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Calls `f(tag, result)` for every operation that completed (result:
    /// bytes moved, or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> io::Result<()> {
        loop {
            let mut reaped = 0;
            for c in self.ring.completion() {
                f(c.user_data(), c.result());
                reaped += 1;
            }
            self.in_flight -= reaped;
            if self.resubmit {
                self.submit_now()?;
            }
            if reaped == 0 {
                return Ok(());
            }
        }
    }

    /// Submits and blocks until at least one operation has completed (for
    /// draining a queue; the data path never blocks).
    pub fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for UringStore {
    /// The kernel may still be reading or writing pool buffers: wait for
    /// every operation before the pool is freed. If the ring cannot be
    /// waited on, leak the pool rather than free memory the kernel uses.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.wait() {
                log::error!("cannot wait for {} image operations: {e}", self.in_flight);
                let leaked = std::mem::replace(&mut self.buffers, Buffers::new(1, 0));
                std::mem::forget(leaked);
                return;
            }
            let done = self.ring.completion().count();
            self.in_flight -= done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{reap_n, run};
    use super::super::Store;
    use super::*;
    use std::os::unix::fs::FileExt;

    fn uring(file: &std::fs::File) -> UringStore {
        UringStore::new(file.as_raw_fd(), 8, Buffers::new(4, 4096)).expect("io_uring")
    }

    fn store(file: &std::fs::File) -> Store {
        Store::Uring(uring(file))
    }

    #[test]
    fn reads_writes_syncs_and_punches_holes() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[0xaa; 16384], 0).unwrap();
        let mut s = store(&file);
        let b = s.buffers().take().unwrap();
        s.buffers().bytes_mut(b, 4096).fill(0x5c);
        let op = Op::Write {
            buf: b,
            len: 4096,
            offset: 8192,
        };
        assert_eq!(run(&mut s, op, 7), 4096);
        assert_eq!(run(&mut s, Op::Sync, 8), 0);
        let mut back = [0u8; 4096];
        file.read_exact_at(&mut back, 8192).unwrap();
        assert!(back.iter().all(|&x| x == 0x5c));

        let op = Op::Read {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, op, 9), 4096);
        assert!(s.buffers().bytes_mut(b, 4096).iter().all(|&x| x == 0xaa));

        let punch = Op::Discard {
            offset: 0,
            len: 4096,
        };
        assert_eq!(run(&mut s, punch, 10), 0);
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&x| x == 0), "the hole reads as zeros");
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn errors_come_back_as_negative_errno() {
        // A read-only fd: the write must fail with EBADF, not vanish.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut s = store(&file);
        let b = s.buffers().take().unwrap();
        let op = Op::Write {
            buf: b,
            len: 4096,
            offset: 0,
        };
        assert_eq!(run(&mut s, op, 1), -libc::EBADF);
    }

    #[test]
    fn many_operations_in_flight_complete_in_any_order_and_drop_waits() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut s = store(&file);
        // More operations than submission slots: push submits as it goes.
        for i in 0..32u64 {
            s.push(Op::Sync, i).unwrap();
        }
        s.submit().unwrap();
        let mut seen = Vec::new();
        reap_n(&mut s, 32, |t, r| {
            assert_eq!(r, 0);
            seen.push(t)
        });
        seen.sort();
        assert_eq!(seen, (0..32).collect::<Vec<_>>());
        // Leave some in flight: Drop must wait for them.
        for i in 0..4 {
            s.push(Op::Sync, i).unwrap();
        }
        s.submit().unwrap();
        drop(s);
    }

    #[test]
    fn the_ring_refuses_operations_outside_its_restrictions() {
        let file = tempfile::tempfile().unwrap();
        let mut s = uring(&file);
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);
        // SAFETY: the path is a static C string.
        unsafe { s.ring.submission().push(&open).unwrap() };
        s.in_flight += 1;
        s.submit().unwrap();
        let mut s = Store::Uring(s);
        let mut result = None;
        reap_n(&mut s, 1, |_, r| result = Some(r));
        assert_eq!(result, Some(-libc::EACCES), "openat through the ring");
    }
}
