//! A raw vhost-user frontend for hostile tests: our own guest memory (a
//! memfd), a split virtqueue laid out by hand in it, and vhost's `Frontend`
//! for the control messages. Nothing here validates anything: the point is
//! to send the daemon whatever a hostile guest or VMM could.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
pub use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::{Frontend, VhostUserVirtioFeatures};
pub use vhost::VhostBackend;
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Guest physical address of our single memory region (not 0: virtio-queue
/// treats ring address 0 as "not set").
pub const GPA_BASE: u64 = 0x10_0000;
/// Size of the guest memory region.
pub const MEM_SIZE: usize = 4 << 20;
/// Ring layout (guest physical addresses).
pub const DESC: u64 = GPA_BASE;
pub const AVAIL: u64 = GPA_BASE + 0x1000;
pub const USED: u64 = GPA_BASE + 0x2000;
/// Scratch areas for headers, status bytes and indirect tables.
pub const HDR: u64 = GPA_BASE + 0x4000;
pub const STATUS: u64 = GPA_BASE + 0x4100;
pub const RANGE: u64 = GPA_BASE + 0x4200;
pub const INDIRECT: u64 = GPA_BASE + 0x8000;
pub const INDIRECT2: u64 = GPA_BASE + 0xc000;
/// Data buffers from here to the end of the region.
pub const DATA: u64 = GPA_BASE + 0x10000;
/// One past the last guest physical address.
pub const GPA_END: u64 = GPA_BASE + MEM_SIZE as u64;
/// Batches of requests (`post`): request `i` keeps its header, status byte
/// and indirect table in the 128 bytes at `batch_meta(i)`; their data
/// buffers lie between DATA and BATCH.
pub const BATCH: u64 = GPA_END - 0x10000;

pub fn batch_meta(i: u16) -> u64 {
    assert!(i < 512, "test bug: batch request {i} beyond the batch area");
    BATCH + 128 * u64::from(i)
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What the status byte holds before the daemon answers.
pub const UNTOUCHED: u8 = 0xa5;

/// One split-ring descriptor, written as-is into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }
}

/// The 16-byte payload of a DISCARD or WRITE_ZEROES request.
pub fn range_segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    raw
}

/// The usual three descriptors: header, data, status, at table slots 0..3.
pub fn chain3(data_addr: u64, data_len: u32, data_flags: u16) -> Vec<Desc> {
    vec![
        Desc::new(HDR, 16, F_NEXT, 1),
        Desc::new(data_addr, data_len, data_flags | F_NEXT, 2),
        Desc::new(STATUS, 1, F_WRITE, 0),
    ]
}

/// What came back for one submitted chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A used-ring entry arrived; `status` is the status byte afterwards
    /// (UNTOUCHED if the daemon did not write it).
    Used { id: u32, len: u32, status: u8 },
    /// Nothing arrived within the timeout (the daemon refused to touch the
    /// chain or the queue stopped), but the connection is still up.
    NoCompletion,
    /// The daemon closed the connection.
    Closed,
}

/// Connects to the daemon's socket (`Daemon::start` waited until it listens).
pub fn connect_stream(socket: &Path) -> UnixStream {
    UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to the daemon's socket {}: {e}", socket.display()))
}

/// A memfd mapped shared into this process: the guest's RAM.
pub struct GuestMem {
    ptr: *mut u8,
    fd: std::fs::File,
}

impl GuestMem {
    fn new() -> GuestMem {
        Self::with_flags(libc::MFD_CLOEXEC)
    }

    /// Guest memory as QEMU's memory-backend-memfd makes it: sealable.
    fn sealable() -> GuestMem {
        Self::with_flags(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    }

    fn with_flags(flags: libc::c_uint) -> GuestMem {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        fd.set_len(MEM_SIZE as u64).expect("ftruncate memfd");
        // SAFETY: mapping a file we own, fresh address chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap guest memory");
        GuestMem {
            ptr: ptr as *mut u8,
            fd,
        }
    }

    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa >= GPA_BASE && gpa + len as u64 <= GPA_END,
            "test bug: {gpa:#x}+{len} is outside the test's own guest memory"
        );
        // SAFETY: checked to lie inside our mapping just above.
        unsafe { self.ptr.add((gpa - GPA_BASE) as usize) }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self.at(gpa, bytes.len());
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside our mapping; volatile because the daemon shares it.
            unsafe { std::ptr::write_volatile(p.add(i), *b) };
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.at(gpa, len);
        // SAFETY: inside our mapping; volatile because the daemon shares it.
        (0..len)
            .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
            .collect()
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Writes descriptors as a table starting at `table`.
    pub fn write_descs(&self, table: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..].copy_from_slice(&d.next.to_le_bytes());
            self.write(table + 16 * i as u64, &raw);
        }
    }

    /// A virtio-blk request header at HDR.
    pub fn header(&self, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(HDR, &raw);
    }

    /// True if reading the byte at `gpa` through this mapping raises
    /// SIGBUS (the file was truncated below it): a forked child reads it
    /// and must die of SIGBUS. This process never touches it.
    pub fn read_faults(&self, gpa: u64) -> bool {
        let p = self.at(gpa, 1);
        // SAFETY: the child only reads one byte of the inherited mapping
        // and calls _exit (async-signal-safe), as fork in a threaded
        // process requires; the parent only waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                std::ptr::read_volatile(p);
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS
        }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA_BASE,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    /// Our own address of a guest physical address (what a VMM puts in
    /// SET_VRING_ADDR).
    pub fn va(&self, gpa: u64) -> u64 {
        self.ptr as u64 + (gpa - GPA_BASE)
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, MEM_SIZE) };
    }
}

/// A hostile guest/VMM on one vhost-user connection.
pub struct RawGuest {
    pub fe: Frontend,
    /// A second handle on the socket, for messages `Frontend` refuses to build.
    raw: UnixStream,
    pub mem: GuestMem,
    pub kick: EventFd,
    pub call: EventFd,
    pub qsize: u16,
    avail_idx: u16,
    used_seen: u16,
    event_idx: bool,
}

/// The inflight region a frontend got from GET_INFLIGHT_FD and keeps
/// across daemon restarts.
pub struct Inflight {
    pub info: VhostUserInflight,
    pub file: std::fs::File,
}

/// Connects, negotiates the device features (VERSION_1, INDIRECT_DESC,
/// optionally EVENT_IDX) and REPLY_ACK plus `protocol`.
fn open_frontend(
    socket: &Path,
    event_idx: bool,
    protocol: VhostUserProtocolFeatures,
) -> VResult<(Frontend, UnixStream)> {
    let stream = connect_stream(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("socket timeout");
    let raw = stream.try_clone().expect("clone socket");
    let mut fe = Frontend::from_stream(stream, FRONTEND_MAX_QUEUES);
    fe.set_owner()?;
    let offered = fe.get_features()?;
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let proto = fe.get_protocol_features()?;
    fe.set_protocol_features(proto & (VhostUserProtocolFeatures::REPLY_ACK | protocol))?;
    // Every later message waits for the daemon's ack, so each step is
    // known to be processed before the next.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // VERSION_1 | INDIRECT_DESC | PROTOCOL_FEATURES, no EVENT_IDX: the
    // daemon interrupts on every used entry.
    let mut want = (1u64 << 32) | (1 << 28) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if event_idx {
        want |= 1 << 29;
    }
    fe.set_features(offered & want)?;
    Ok((fe, raw))
}

/// Frontend's own queue-index check is set far above the daemon's queue
/// count so that out-of-range indices reach the daemon.
const FRONTEND_MAX_QUEUES: u64 = 1024;

pub type VResult<T> = Result<T, vhost::Error>;

impl RawGuest {
    /// Connects and negotiates features and the memory table; no vring yet.
    pub fn handshake(socket: &Path) -> VResult<RawGuest> {
        Self::handshake_with(socket, false)
    }

    /// `handshake` with guest memory in a sealable memfd.
    pub fn handshake_sealable(socket: &Path) -> VResult<RawGuest> {
        let (fe, raw) = open_frontend(socket, false, VhostUserProtocolFeatures::empty())?;
        Self::with_memory(fe, raw, GuestMem::sealable(), false)
    }

    /// Shrinks the guest memory file, as a hostile VMM could.
    pub fn truncate_memory(&self, len: u64) -> std::io::Result<()> {
        self.mem.fd.set_len(len)
    }

    /// The guest memory file's size now.
    pub fn memory_file_len(&self) -> u64 {
        self.mem.fd.metadata().expect("fstat guest memory").len()
    }

    /// `handshake`, optionally negotiating VIRTIO_RING_F_EVENT_IDX.
    pub fn handshake_with(socket: &Path, event_idx: bool) -> VResult<RawGuest> {
        let (fe, raw) = open_frontend(socket, event_idx, VhostUserProtocolFeatures::empty())?;
        Self::with_memory(fe, raw, GuestMem::new(), event_idx)
    }

    /// `handshake` with INFLIGHT_SHMFD: asks for a region for `queues`
    /// queues of `qsize` entries and hands it back, before the memory
    /// table, as QEMU does.
    pub fn handshake_inflight(
        socket: &Path,
        queues: u16,
        qsize: u16,
    ) -> VResult<(RawGuest, Inflight)> {
        let (mut fe, raw) =
            open_frontend(socket, false, VhostUserProtocolFeatures::INFLIGHT_SHMFD)?;
        let (info, file) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, queues, qsize))?;
        fe.set_inflight_fd(&info, file.as_raw_fd())?;
        let g = Self::with_memory(fe, raw, GuestMem::new(), false)?;
        Ok((g, Inflight { info, file }))
    }

    /// What QEMU does when its reconnecting chardev reaches a restarted
    /// daemon: the same guest memory and rings, the inflight region it
    /// kept, and queue 0 restarted at the ring's used index (its fallback
    /// when GET_VRING_BASE failed on the dead daemon). No kick: a guest
    /// waiting for its requests has nothing new to submit.
    pub fn reconnect(self, socket: &Path, inflight: &Inflight) -> VResult<RawGuest> {
        let (mut g, base) = self.reopen(socket, inflight)?;
        g.restart_queue(0, g.qsize, base)?;
        Ok(g)
    }

    /// `reconnect` in the order of QEMU's vhost-user-blk: the queue starts
    /// (kick, enable) before it has a call fd, which the caller sends later
    /// with `fe.set_vring_call`.
    pub fn reconnect_call_last(self, socket: &Path, inflight: &Inflight) -> VResult<RawGuest> {
        let (mut g, base) = self.reopen(socket, inflight)?;
        g.start_rings(0, g.qsize, base)?;
        g.fe.set_vring_enable(0, true)?;
        Ok(g)
    }

    /// A new connection that hands over the kept inflight region and memory;
    /// returns the used index, where the queue restarts.
    fn reopen(self, socket: &Path, inflight: &Inflight) -> VResult<(RawGuest, u16)> {
        let (mut fe, raw) = open_frontend(
            socket,
            self.event_idx,
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        )?;
        fe.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())?;
        fe.set_mem_table(&[self.mem.region()])?;
        let mut g = RawGuest { fe, raw, ..self };
        let base = g.mem.read_u16(USED + 2);
        g.used_seen = base;
        Ok((g, base))
    }

    fn with_memory(
        fe: Frontend,
        raw: UnixStream,
        mem: GuestMem,
        event_idx: bool,
    ) -> VResult<RawGuest> {
        fe.set_mem_table(&[mem.region()])?;
        Ok(RawGuest {
            fe,
            raw,
            mem,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            qsize: 0,
            avail_idx: 0,
            used_seen: 0,
            event_idx,
        })
    }

    /// Connects and starts queue 0 with `qsize` entries.
    pub fn connect(socket: &Path, qsize: u16) -> RawGuest {
        Self::connect_with(socket, qsize, false)
    }

    pub fn connect_with(socket: &Path, qsize: u16, event_idx: bool) -> RawGuest {
        let mut g = Self::handshake_with(socket, event_idx).expect("handshake");
        g.start_queue(0, qsize).expect("start queue 0");
        g
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE for one queue, rings at
    /// DESC/AVAIL/USED.
    pub fn start_queue(&mut self, index: usize, qsize: u16) -> VResult<()> {
        self.mem.write(AVAIL, &[0; 0x1000]);
        self.mem.write(USED, &[0; 0x1000]);
        self.restart_queue(index, qsize, 0)
    }

    /// `start_queue` on rings that already hold requests, from avail
    /// index `base` on.
    pub fn restart_queue(&mut self, index: usize, qsize: u16, base: u16) -> VResult<()> {
        self.start_rings(index, qsize, base)?;
        self.fe.set_vring_call(index, &self.call)?;
        self.fe.set_vring_enable(index, true)
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK.
    fn start_rings(&mut self, index: usize, qsize: u16, base: u16) -> VResult<()> {
        self.qsize = qsize;
        self.fe.set_vring_num(index, qsize)?;
        self.fe.set_vring_base(index, base)?;
        self.set_vring_addr(
            index,
            self.mem.va(DESC),
            self.mem.va(AVAIL),
            self.mem.va(USED),
        )?;
        self.fe.set_vring_kick(index, &self.kick)
    }

    pub fn set_vring_addr(&self, index: usize, desc: u64, avail: u64, used: u64) -> VResult<()> {
        let cfg = VringConfigData {
            queue_max_size: self.qsize.max(1),
            queue_size: self.qsize.max(1),
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        self.fe.set_vring_addr(index, &cfg)
    }

    /// Sends a vhost-user message byte for byte (no reply requested).
    pub fn send_raw(&mut self, request: u32, body: &[u8]) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes()); // version 1, no NEED_REPLY
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        self.raw.write_all(&msg)
    }

    /// True while the daemon still answers on this connection.
    pub fn connected(&self) -> bool {
        self.fe.get_features().is_ok()
    }

    /// Puts `head` in the avail ring, bumps the index by `bump` (1 for a
    /// normal submission) and kicks.
    pub fn publish(&mut self, head: u16, bump: u16) {
        if self.event_idx {
            // used_event: interrupt us for the next used entry.
            let used_event = AVAIL + 4 + 2 * u64::from(self.qsize);
            self.mem.write_u16(used_event, self.used_seen);
        }
        let slot = self.avail_idx % self.qsize.max(1);
        self.mem.write_u16(AVAIL + 4 + 2 * u64::from(slot), head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        self.mem.write_u16(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        // A closed connection makes the kick pointless, not an error.
        let _ = self.kick.write(1);
    }

    /// Waits for the next used-ring entry (at most `limit`).
    pub fn wait_used(&mut self, limit: Duration) -> Outcome {
        let deadline = Instant::now() + limit;
        loop {
            let idx = self.mem.read_u16(USED + 2);
            if idx != self.used_seen {
                let slot = u64::from(self.used_seen % self.qsize.max(1));
                self.used_seen = self.used_seen.wrapping_add(1);
                let id = self.mem.read_u32(USED + 4 + 8 * slot);
                let len = self.mem.read_u32(USED + 8 + 8 * slot);
                let status = self.mem.read(STATUS, 1)[0];
                return Outcome::Used { id, len, status };
            }
            let now = Instant::now();
            if now >= deadline {
                return if self.connected() {
                    Outcome::NoCompletion
                } else {
                    Outcome::Closed
                };
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = (deadline - now).as_millis().min(100) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }

    /// Posts request `i` of a batch as head `i`, through an indirect table
    /// (so hundreds fit in the ring): header, the data buffers `data`
    /// (device-writable if `into_guest`), status. No waiting: collect the
    /// completions with `used_entries`.
    pub fn post(&mut self, i: u16, kind: u32, sector: u64, data: &[(u64, u32)], into_guest: bool) {
        let meta = batch_meta(i);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(meta, &hdr);
        self.mem.write(meta + 16, &[UNTOUCHED]);
        let dir = if into_guest { F_WRITE } else { 0 };
        let n = data.len() as u16;
        let mut table = vec![Desc::new(meta, 16, F_NEXT, 1)];
        for (k, &(addr, len)) in data.iter().enumerate() {
            table.push(Desc::new(addr, len, dir | F_NEXT, k as u16 + 2));
        }
        table.push(Desc::new(meta + 16, 1, F_WRITE, 0));
        assert!(
            table.len() <= 6,
            "test bug: the indirect table has room for 4 buffers"
        );
        self.mem.write_descs(meta + 32, &table);
        let main = Desc::new(meta + 32, 16 * (u32::from(n) + 2), F_INDIRECT, 0);
        self.mem.write_descs(DESC + 16 * u64::from(i), &[main]);
        self.publish(i, 1);
    }

    /// Posts one request as batch request 0 (`post`), waits up to 10 s
    /// for it and returns its status byte.
    pub fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32)], into_guest: bool) -> u8 {
        self.post(0, kind, sector, data, into_guest);
        let used = self.used_entries(1, Duration::from_secs(10));
        assert_eq!(used.len(), 1, "request type {kind} was not completed");
        self.batch_status(0)
    }

    /// The status byte of batch request `i`.
    pub fn batch_status(&self, i: u16) -> u8 {
        self.mem.read(batch_meta(i) + 16, 1)[0]
    }

    /// Used-ring entries (head, length) that arrive within `limit`, up to `want`.
    pub fn used_entries(&mut self, want: usize, limit: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            let idx = self.mem.read_u16(USED + 2);
            while self.used_seen != idx && got.len() < want {
                let slot = u64::from(self.used_seen % self.qsize.max(1));
                self.used_seen = self.used_seen.wrapping_add(1);
                got.push((
                    self.mem.read_u32(USED + 4 + 8 * slot),
                    self.mem.read_u32(USED + 8 + 8 * slot),
                ));
            }
            if got.len() < want {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        got
    }

    /// How many used-ring entries the daemon has written so far.
    pub fn used_index(&self) -> u16 {
        self.mem.read_u16(USED + 2)
    }

    /// Writes `descs` at table slots 0.., resets the status byte, submits
    /// head 0 and waits up to 5 s.
    pub fn submit(&mut self, descs: &[Desc]) -> Outcome {
        self.submit_head(descs, 0)
    }

    pub fn submit_head(&mut self, descs: &[Desc], head: u16) -> Outcome {
        self.mem.write_descs(DESC, descs);
        self.mem.write(STATUS, &[UNTOUCHED]);
        self.publish(head, 1);
        self.wait_used(Duration::from_secs(5))
    }
}
