//! cloud-hypervisor's vhost-user-blk frontend, message for message, against
//! the real daemon. cloud-hypervisor cannot boot a guest on these machines
//! (it needs KVM), so this frontend replays what its code sends
//! (virtio-devices/src/vhost_user/blk.rs and vu_common_ctrl.rs):
//!
//! - creation: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
//!   SET_PROTOCOL_FEATURES (what both sides offer), GET_QUEUE_NUM, GET_CONFIG
//!   at VHOST_USER_CONFIG_OFFSET with the WRITABLE flag;
//! - activation: SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM for every queue,
//!   GET_INFLIGHT_FD (once per VM) and SET_INFLIGHT_FD, then per queue
//!   SET_VRING_ADDR, SET_VRING_BASE (the avail index), SET_VRING_CALL,
//!   SET_VRING_KICK, and SET_VRING_ENABLE for all queues at the end;
//! - memory hotplug: ADD_MEM_REG;
//! - reconnect: SET_OWNER, GET_FEATURES and SET_PROTOCOL_FEATURES with the
//!   features acked before, without asking GET_PROTOCOL_FEATURES, then the
//!   activation again with the inflight fd it cached;
//! - snapshot and restore: GET_VRING_BASE for every queue, then
//!   SET_DEVICE_STATE_FD (save) and CHECK_DEVICE_STATE; on a fresh daemon
//!   SET_DEVICE_STATE_FD (load), CHECK_DEVICE_STATE, and the activation.
//!
//! - live migration: SET_FEATURES with VHOST_F_LOG_ALL and SET_LOG_BASE with
//!   a new log memfd at every round (`start_dirty_log`, `dirty_log`), then
//!   GET_VRING_BASE when the VM stops; a destination daemon takes over.
//!
//! Its offer includes features cryptblk does not implement (IN_ORDER,
//! NOTIFICATION_DATA, ORDER_PLATFORM): the daemon must not offer them, so
//! they cannot be negotiated.

mod support;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use support::{pattern, write_key, Daemon};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VHOST_USER_CONFIG_OFFSET,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const QUEUES: usize = 2;
const QSIZE: u16 = 64;

// Feature bits as cloud-hypervisor names them (virtio 1.2, virtio-blk).
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_GEOMETRY: u64 = 1 << 4;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_CONFIG_WCE: u64 = 1 << 11;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const F_IN_ORDER: u64 = 1 << 35;
const F_ORDER_PLATFORM: u64 = 1 << 36;
const F_NOTIFICATION_DATA: u64 = 1 << 38;
/// VHOST_F_LOG_ALL: dirty-page logging for migration.
const F_LOG_ALL: u64 = 1 << 26;

/// What cloud-hypervisor offers a vhost-user-blk backend with more than one
/// queue (its block features, DEFAULT_VIRTIO_FEATURES and MQ).
fn ch_features() -> u64 {
    F_SIZE_MAX
        | F_SEG_MAX
        | F_GEOMETRY
        | F_RO
        | F_BLK_SIZE
        | F_FLUSH
        | F_TOPOLOGY
        | F_CONFIG_WCE
        | F_DISCARD
        | F_WRITE_ZEROES
        | F_MQ
        | F_INDIRECT_DESC
        | F_EVENT_IDX
        | F_VERSION_1
        | F_IN_ORDER
        | F_ORDER_PLATFORM
        | F_NOTIFICATION_DATA
        | F_LOG_ALL
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

fn ch_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// A guest RAM region: a memfd mapped shared, as cloud-hypervisor's
/// `shared=on` memory is.
struct Region {
    gpa: u64,
    len: usize,
    ptr: *mut u8,
    file: std::fs::File,
}

impl Region {
    fn new(gpa: u64, len: usize) -> Region {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(
                c"ch-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor this function owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        // SAFETY: maps the file just sized, at an address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Region {
            gpa,
            len,
            ptr: ptr.cast(),
            file,
        }
    }

    fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.len as u64,
            userspace_addr: self.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn contains(&self, gpa: u64, len: usize) -> bool {
        gpa >= self.gpa && gpa + len as u64 <= self.gpa + self.len as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The guest's RAM: the boot region, and a hotplugged one once added.
struct Ram {
    regions: Vec<Region>,
}

impl Ram {
    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .unwrap_or_else(|| panic!("test bug: {gpa:#x}+{len} is not guest RAM"));
        // SAFETY: inside that region's mapping, checked just above.
        unsafe { r.ptr.add((gpa - r.gpa) as usize) }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self.at(gpa, bytes.len());
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside guest RAM; volatile as the daemon shares it.
            unsafe { p.add(i).write_volatile(*b) };
        }
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.at(gpa, len);
        // SAFETY: inside guest RAM; volatile as the daemon shares it.
        (0..len)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect()
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn host_address(&self, gpa: u64) -> u64 {
        self.at(gpa, 1) as u64
    }
}

const BOOT_RAM: u64 = 0x10_0000;
const BOOT_LEN: usize = 8 << 20;
/// Hotplugged RAM, above 4 GiB as cloud-hypervisor places it.
const HOTPLUG_RAM: u64 = 0x1_0000_0000;
const HOTPLUG_LEN: usize = 2 << 20;

/// Queue q's split ring in boot RAM: descriptors, avail, used.
fn ring(q: usize) -> (u64, u64, u64) {
    let base = BOOT_RAM + q as u64 * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// Queue q's request header and status byte.
fn meta(q: usize) -> (u64, u64) {
    let base = BOOT_RAM + 0x10000 + q as u64 * 0x1000;
    (base, base + 0x800)
}

/// The driver side of one virtqueue: one request at a time.
struct Queue {
    index: usize,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

impl Queue {
    /// Posts a request whose data buffer is `data` (guest physical), kicks,
    /// and waits for its used entry; returns the status byte.
    fn request(&mut self, ram: &Ram, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
        let (_, _, used) = ring(self.index);
        let (_, status) = meta(self.index);
        let before = ram.read_u16(used + 2);
        self.post(ram, 0, kind, sector, data, len);
        self.kick.write(1).unwrap();
        wait_used(ram, self.index, before.wrapping_add(1));
        ram.read(status, 1)[0]
    }

    /// Lays a header/data/status chain in descriptors `head..head + 3` (its
    /// header and status in the queue's scratch area, at `head`'s place) and
    /// makes it available, without a kick.
    fn post(&mut self, ram: &Ram, head: u16, kind: u32, sector: u64, data: u64, len: u32) {
        let (desc, avail, _) = ring(self.index);
        let (header, status) = meta(self.index);
        let (header, status) = (header + 16 * u64::from(head), status + u64::from(head));
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        ram.write(header, &h);
        ram.write(status, &[0xff]);
        // IN (0) and GET_ID (8) write into the data buffer.
        let into_guest = if kind == 0 || kind == 8 { 2 } else { 0 };
        let chain = [
            (header, 16, 1, head + 1),
            (data, len, 1 | into_guest, head + 2),
            (status, 1, 2, 0),
        ];
        for (i, (addr, l, flags, next)) in chain.into_iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&u64::to_le_bytes(addr));
            raw[8..12].copy_from_slice(&u32::to_le_bytes(l));
            raw[12..14].copy_from_slice(&u16::to_le_bytes(flags));
            raw[14..].copy_from_slice(&u16::to_le_bytes(next));
            ram.write(desc + 16 * (u64::from(head) + i as u64), &raw);
        }
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        ram.write(slot, &head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.write(avail + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
    }
}

/// Waits until queue q's used index reaches `want`.
fn wait_used(ram: &Ram, q: usize, want: u16) {
    let (_, _, used) = ring(q);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ram.read_u16(used + 2) != want {
        assert!(Instant::now() < deadline, "queue {q}: no used entry");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One VMM connection, driven the way cloud-hypervisor drives it.
struct Ch {
    fe: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: Vec<Queue>,
}

impl Ch {
    /// `Blk::new`: connect and negotiate; returns the config space too.
    fn create(socket: &Path) -> (Ch, Vec<u8>) {
        let mut fe = Frontend::connect(socket, QUEUES as u64).expect("connect");
        fe.set_owner().unwrap();
        let backend = fe.get_features().unwrap();
        let features = ch_features() & backend;
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = ch_protocol_features() & fe.get_protocol_features().unwrap();
        fe.set_protocol_features(protocol).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let queues = fe.get_queue_num().unwrap();
        assert!(queues >= QUEUES as u64, "the backend has {queues} queues");
        let (_, config) = fe
            .get_config(
                VHOST_USER_CONFIG_OFFSET,
                60,
                VhostUserConfigFlags::WRITABLE,
                &[0; 60],
            )
            .expect("GET_CONFIG as cloud-hypervisor asks it");
        (Ch::with(fe, features, protocol), config)
    }

    fn with(fe: Frontend, features: u64, protocol: VhostUserProtocolFeatures) -> Ch {
        let queues = (0..QUEUES)
            .map(|index| Queue {
                index,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                avail_idx: 0,
            })
            .collect();
        Ch {
            fe,
            features,
            protocol,
            queues,
        }
    }

    /// `reinitialize_vhost_user` after the backend went away: no
    /// GET_PROTOCOL_FEATURES, the features acked before.
    fn reconnect(socket: &Path, before: &Ch) -> Ch {
        let mut fe = Frontend::connect(socket, QUEUES as u64).expect("reconnect");
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.set_protocol_features(before.protocol).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mut ch = Ch::with(fe, before.features, before.protocol);
        for (q, old) in ch.queues.iter_mut().zip(&before.queues) {
            q.avail_idx = old.avail_idx;
        }
        ch
    }

    /// `setup_vhost_user`: everything up to the enabled queues.
    fn activate(&mut self, ram: &Ram, inflight: &mut Option<(VhostUserInflight, std::fs::File)>) {
        // LOG_ALL only while a migration runs (`start_dirty_log`).
        self.fe.set_features(self.features & !F_LOG_ALL).unwrap();
        let regions: Vec<_> = ram.regions.iter().map(Region::info).collect();
        self.fe.set_mem_table(&regions).unwrap();
        for q in &self.queues {
            self.fe.set_vring_num(q.index, QSIZE).unwrap();
        }
        if inflight.is_none() {
            let asked = VhostUserInflight::new(0, 0, QUEUES as u16, QSIZE);
            *inflight = Some(self.fe.get_inflight_fd(&asked).expect("GET_INFLIGHT_FD"));
        }
        let (info, file) = inflight.as_ref().unwrap();
        self.fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        for q in &self.queues {
            let (desc, avail, used) = ring(q.index);
            let config = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: ram.host_address(desc),
                used_ring_addr: ram.host_address(used),
                avail_ring_addr: ram.host_address(avail),
                log_addr: None,
            };
            self.fe.set_vring_addr(q.index, &config).unwrap();
            self.fe.set_vring_base(q.index, q.avail_idx).unwrap();
            self.fe.set_vring_call(q.index, &q.call).unwrap();
            self.fe.set_vring_kick(q.index, &q.kick).unwrap();
        }
        for q in &self.queues {
            self.fe.set_vring_enable(q.index, true).unwrap();
        }
    }
}

/// Marks descriptor head `head` of queue 0 in flight in the inflight region
/// (vhost-user spec layout: a 16-byte queue header, then 16 bytes per
/// descriptor: `inflight` at 0, `counter` at 8), as a daemon does when it
/// takes the request from the ring.
fn mark_in_flight(region: &std::fs::File, head: u16) {
    use std::os::unix::fs::FileExt;
    let at = 16 + 16 * u64::from(head);
    region.write_all_at(&1u64.to_le_bytes(), at + 8).unwrap();
    region.write_all_at(&[1], at).unwrap();
}

fn start(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let image = dir.join("disk.img");
    (start_on(dir, &image, &[]), image)
}

/// A daemon on `image` (created with 16 MiB if missing) with its socket
/// in `dir`, and `extra` arguments.
fn start_on(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    let (key, _) = write_key(dir, 64);
    let mut args = vec![
        "--image",
        image.to_str().unwrap(),
        "--size",
        "16M",
        "--key-file",
        key.to_str().unwrap(),
        "--queues",
        "2",
        "--allow-discards",
    ];
    args.extend_from_slice(extra);
    Daemon::start(dir, &args)
}

/// Writes a pattern through queue q from guest RAM at `buf`, reads it back
/// into `buf + 64K`, and compares.
fn verify(ch: &mut Ch, ram: &Ram, q: usize, sector: u64, buf: u64, seed: u64) {
    let data = pattern(seed, sector * 512, 16 << 10);
    ram.write(buf, &data);
    let queue = &mut ch.queues[q];
    assert_eq!(queue.request(ram, 1, sector, buf, 16 << 10), 0, "write");
    assert_eq!(queue.request(ram, 4, 0, buf, 0), 0, "flush");
    let back = buf + (64 << 10);
    assert_eq!(queue.request(ram, 0, sector, back, 16 << 10), 0, "read");
    assert!(ram.read(back, 16 << 10) == data, "queue {q}: data differs");
}

#[test]
fn cloud_hypervisor_creation_activation_hotplug_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, image) = start(dir.path());
    let mut ram = Ram {
        regions: vec![Region::new(BOOT_RAM, BOOT_LEN)],
    };

    let (mut ch, config) = Ch::create(&daemon.socket);
    // Nothing cryptblk does not implement was negotiated, although
    // cloud-hypervisor offered it.
    for (bit, name) in [
        (F_IN_ORDER, "IN_ORDER"),
        (F_NOTIFICATION_DATA, "NOTIFICATION_DATA"),
        (F_ORDER_PLATFORM, "ORDER_PLATFORM"),
        (F_CONFIG_WCE, "CONFIG_WCE"),
    ] {
        assert_eq!(ch.features & bit, 0, "{name} was negotiated");
    }
    // ...while what it needs was.
    for (bit, name) in [
        (F_VERSION_1, "VERSION_1"),
        (F_FLUSH, "FLUSH"),
        (F_MQ, "MQ"),
        (F_DISCARD, "DISCARD"),
        (F_EVENT_IDX, "EVENT_IDX"),
        (F_LOG_ALL, "LOG_ALL"),
    ] {
        assert_ne!(ch.features & bit, 0, "{name} was not negotiated");
    }
    for p in [
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::REPLY_ACK,
    ] {
        assert!(ch.protocol.contains(p), "{p:?} was not negotiated");
    }
    // The config space: capacity in 512-byte sectors, num_queues.
    let capacity = u64::from_le_bytes(config[..8].try_into().unwrap());
    assert_eq!(capacity, (16 << 20) / 512);
    let num_queues = u16::from_le_bytes([config[34], config[35]]);
    assert_eq!(num_queues, QUEUES as u16);

    let mut inflight = None;
    ch.activate(&ram, &mut inflight);
    let data = BOOT_RAM + 0x10_0000;
    for q in 0..QUEUES {
        verify(
            &mut ch,
            &ram,
            q,
            8 + q as u64 * 64,
            data + q as u64 * 0x4_0000,
            1,
        );
    }

    // Memory hotplug: the next requests' buffers live in the new region.
    ram.regions.push(Region::new(HOTPLUG_RAM, HOTPLUG_LEN));
    ch.fe
        .add_mem_region(&ram.regions[1].info())
        .expect("ADD_MEM_REG");
    for q in 0..QUEUES {
        verify(
            &mut ch,
            &ram,
            q,
            1024 + q as u64 * 64,
            HOTPLUG_RAM + q as u64 * 0x4_0000,
            2,
        );
    }

    // The daemon is killed and started again on the same socket; the
    // VMM reconnects the way cloud-hypervisor does, with its cached
    // inflight fd, and the data written before is still there.
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    // It died holding a write on queue 0 (taken from the ring, marked in
    // the inflight region, not completed): the next daemon must run it,
    // although cloud-hypervisor restarts the ring at its avail index.
    let lost = pattern(9, 4096 * 512, 16 << 10);
    let lost_buf = BOOT_RAM + 0x30_0000;
    ram.write(lost_buf, &lost);
    let (_, _, used0) = ring(0);
    let used_before = ram.read_u16(used0 + 2);
    ch.queues[0].post(&ram, 30, 1, 4096, lost_buf, 16 << 10);
    mark_in_flight(&inflight.as_ref().unwrap().1, 30);
    let (restarted, _) = start(dir.path());
    let mut again = Ch::reconnect(&restarted.socket, &ch);
    drop(ch);
    again.activate(&ram, &mut inflight);
    wait_used(&ram, 0, used_before.wrapping_add(1));
    assert_eq!(
        ram.read(meta(0).1 + 30, 1)[0],
        0,
        "the replayed write failed"
    );
    for q in 0..QUEUES {
        let sector = 8 + q as u64 * 64;
        let buf = HOTPLUG_RAM + 0x10_0000 + q as u64 * 0x1_0000;
        let status = again.queues[q].request(&ram, 0, sector, buf, 16 << 10);
        assert_eq!(status, 0, "queue {q}: read after the reconnect");
        assert!(
            ram.read(buf, 16 << 10) == pattern(1, sector * 512, 16 << 10),
            "queue {q}: what was written before the daemon died is gone"
        );
        verify(
            &mut again,
            &ram,
            q,
            2048 + q as u64 * 64,
            BOOT_RAM + 0x20_0000,
            3,
        );
    }
    // The image holds ciphertext only.
    let raw = std::fs::read(&image).unwrap();
    let plain = pattern(1, 8 * 512, 16 << 10);
    assert!(
        raw[8 * 512..8 * 512 + (16 << 10)] != plain[..],
        "plaintext in the image"
    );
}

/// SET_DEVICE_STATE_FD in `direction` over a pipe: a save returns what the
/// daemon wrote, a load sends `state`; then CHECK_DEVICE_STATE.
fn transfer_state(
    ch: &mut Ch,
    direction: vhost::vhost_user::message::VhostTransferStateDirection,
    state: &[u8],
) -> (Vec<u8>, vhost::Result<()>) {
    use std::io::{Read, Write};
    use vhost::vhost_user::message::{VhostTransferStateDirection as D, VhostTransferStatePhase};
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let theirs: std::os::fd::OwnedFd = match direction {
        D::SAVE => writer.try_clone().unwrap().into(),
        _ => reader.try_clone().unwrap().into(),
    };
    let reply = ch
        .fe
        .set_device_state_fd(direction, VhostTransferStatePhase::STOPPED, theirs)
        .expect("SET_DEVICE_STATE_FD");
    assert!(reply.is_none(), "the daemon uses the VMM's pipe");
    let mut saved = Vec::new();
    if direction == D::SAVE {
        drop(writer);
        reader.read_to_end(&mut saved).unwrap();
    } else {
        drop(reader);
        writer.write_all(state).unwrap();
        drop(writer);
    }
    (saved, ch.fe.check_device_state())
}

#[test]
fn cloud_hypervisor_snapshot_and_restore_carry_the_device_state() {
    use vhost::vhost_user::message::VhostTransferStateDirection as D;
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _) = start(dir.path());
    let ram = Ram {
        regions: vec![Region::new(BOOT_RAM, BOOT_LEN)],
    };
    let (mut ch, _) = Ch::create(&daemon.socket);
    assert!(ch
        .protocol
        .contains(VhostUserProtocolFeatures::DEVICE_STATE));
    let mut inflight = None;
    ch.activate(&ram, &mut inflight);
    verify(&mut ch, &ram, 0, 64, BOOT_RAM + 0x10_0000, 5);

    // Snapshot: the rings stopped, then the state saved.
    for q in 0..QUEUES {
        ch.fe.get_vring_base(q).unwrap();
    }
    let (state, checked) = transfer_state(&mut ch, D::SAVE, &[]);
    checked.expect("CHECK_DEVICE_STATE after the save");
    assert!(!state.is_empty(), "an empty state");
    assert!(daemon.terminate().success());

    // Restore onto a fresh daemon, as cloud-hypervisor does: the features
    // it saved, no GET_PROTOCOL_FEATURES. A state of another disk is
    // refused (the control), the right one accepted, and the data is there.
    let (restored, _) = start(dir.path());
    let saved = ch;
    let mut ch = Ch::reconnect(&restored.socket, &saved);
    drop(saved);
    let mut other = state.clone();
    other[16] ^= 1;
    let (_, checked) = transfer_state(&mut ch, D::LOAD, &other);
    assert!(
        checked.is_err(),
        "a state of another disk size was accepted"
    );
    let (_, checked) = transfer_state(&mut ch, D::LOAD, &state);
    checked.expect("CHECK_DEVICE_STATE after the load");
    ch.activate(&ram, &mut inflight);
    let back = BOOT_RAM + 0x28_0000;
    assert_eq!(ch.queues[1].request(&ram, 0, 64, back, 16 << 10), 0);
    assert!(ram.read(back, 16 << 10) == pattern(5, 64 * 512, 16 << 10));
}

/// A dirty log as cloud-hypervisor makes one for each migration round: a
/// memfd with one bit per 4 KiB page of guest RAM, up to the end of RAM.
struct DirtyLog {
    file: std::fs::File,
}

impl DirtyLog {
    fn new(ram_end: u64) -> DirtyLog {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"ch-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor this function owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let pages = ram_end.div_ceil(4096);
        file.set_len(pages.div_ceil(64) * 8).unwrap();
        DirtyLog { file }
    }

    fn region(&self) -> vhost::VhostUserDirtyLogRegion {
        vhost::VhostUserDirtyLogRegion {
            mmap_size: self.file.metadata().unwrap().len(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Whether the page of `gpa` is marked (read through the file: the
    /// daemon's shared mapping of it writes the same pages).
    fn dirty(&self, gpa: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let page = gpa / 4096;
        let mut byte = [0u8];
        self.file.read_exact_at(&mut byte, page / 8).unwrap();
        byte[0] & (1 << (page % 8)) != 0
    }

    /// Pages of [gpa, gpa + len) that are not marked.
    fn clean_pages(&self, gpa: u64, len: u64) -> Vec<u64> {
        (gpa / 4096..(gpa + len).div_ceil(4096))
            .filter(|p| !self.dirty(p * 4096))
            .map(|p| p * 4096)
            .collect()
    }
}

/// A GET_ID request on queue q into `buf` (20 bytes).
fn get_id(ch: &mut Ch, ram: &Ram, q: usize, buf: u64) -> u8 {
    ch.queues[q].request(ram, 8, 0, buf, 20)
}

/// Two migration rounds with log rotation: every page the daemon writes
/// (read data, GET_ID, status bytes, the used ring) is marked in the log of
/// the round it was written in; pages it only reads are not (the control
/// that the log is not simply all ones), and an old log gets no new marks.
/// Run over the inline, worker-pool and asynchronous (--direct) paths.
#[test]
fn cloud_hypervisor_migration_rounds_log_every_page_the_daemon_writes() {
    for extra in [&[][..], &["--crypto", "workers"], &["--direct"]] {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_on(dir.path(), &dir.path().join("disk.img"), extra);
        let ram = Ram {
            regions: vec![Region::new(BOOT_RAM, BOOT_LEN)],
        };
        let (mut ch, _) = Ch::create(&daemon.socket);
        assert_ne!(ch.features & F_LOG_ALL, 0, "{extra:?}: LOG_ALL not offered");
        let mut inflight = None;
        ch.activate(&ram, &mut inflight);
        // Data on the disk before the migration starts.
        let source = BOOT_RAM + 0x10_0000;
        let data = pattern(11, 0, 32 << 10);
        ram.write(source, &data);
        assert_eq!(ch.queues[0].request(&ram, 1, 0, source, 32 << 10), 0);

        // start_dirty_log: LOG_ALL, and the first round's log.
        ch.fe.set_features(ch.features | F_LOG_ALL).unwrap();
        let end = BOOT_RAM + BOOT_LEN as u64;
        let round1 = DirtyLog::new(end);
        ch.fe.set_log_base(0, Some(round1.region())).unwrap();
        // A read into a buffer that straddles three pages, a write from
        // pages the daemon must only read, and a GET_ID.
        let read1 = BOOT_RAM + 0x20_0800;
        let written = BOOT_RAM + 0x30_0000;
        let id1 = BOOT_RAM + 0x38_0010;
        assert_eq!(ch.queues[0].request(&ram, 0, 0, read1, 8 << 10), 0);
        assert!(
            ram.read(read1, 8 << 10) == data[..8 << 10],
            "{extra:?}: read"
        );
        assert_eq!(ch.queues[0].request(&ram, 1, 64, written, 8 << 10), 0);
        assert_eq!(get_id(&mut ch, &ram, 0, id1), 0);
        let (_, _, used0) = ring(0);
        let (_, status0) = meta(0);
        for (what, gpa, len) in [
            ("read data", read1, 8 << 10),
            ("GET_ID", id1, 20),
            ("status byte", status0, 1),
            ("used ring", used0, 4),
        ] {
            let clean = round1.clean_pages(gpa, len);
            assert!(
                clean.is_empty(),
                "{extra:?}: {what} pages {clean:x?} not logged"
            );
        }
        assert_eq!(
            round1.clean_pages(written, 8 << 10).len(),
            2,
            "{extra:?}: pages the daemon only read were logged"
        );
        let (_, _, used1) = ring(1);
        assert!(
            !round1.dirty(used1),
            "{extra:?}: idle queue 1's ring logged"
        );

        // dirty_log: the next round has a new log; the old one is left alone.
        let round2 = DirtyLog::new(end);
        ch.fe.set_log_base(0, Some(round2.region())).unwrap();
        let read2 = BOOT_RAM + 0x40_0000;
        assert_eq!(ch.queues[1].request(&ram, 0, 16, read2, 16 << 10), 0);
        assert!(
            round2.clean_pages(read2, 16 << 10).is_empty(),
            "{extra:?}: round 2"
        );
        assert!(round2.dirty(used1) && round2.dirty(meta(1).1));
        assert!(
            !round2.dirty(read1),
            "{extra:?}: round 1's page in round 2's log"
        );
        assert!(
            round1.clean_pages(read2, 16 << 10).len() == 4,
            "{extra:?}: the rotated-out log was written"
        );
        // The migration ends: logging off, the disk goes on.
        ch.fe.set_features(ch.features & !F_LOG_ALL).unwrap();
        verify(&mut ch, &ram, 1, 256, BOOT_RAM + 0x50_0000, 12);
        drop(ch);
        daemon.stop();
    }
}

/// `--dirty-logging false` (the e2e migration test's negative control):
/// neither LOG_ALL nor LOG_SHMFD is offered, so a frontend cannot migrate.
#[test]
fn without_dirty_logging_no_migration_feature_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_on(
        dir.path(),
        &dir.path().join("disk.img"),
        &["--dirty-logging", "false"],
    );
    let (ch, _) = Ch::create(&daemon.socket);
    assert_eq!(ch.features & F_LOG_ALL, 0);
    assert!(!ch.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    drop(ch);
    daemon.stop();
}

/// The migration hand-over on one image: a destination daemon started with
/// --incoming runs beside the source that holds the image; its requests
/// fail while the source still holds it (the control: no two writers),
/// succeed once the source's frontend stopped the device during a
/// migration, and see everything the source acknowledged. Afterwards the
/// destination holds the image: a plain second daemon is refused.
#[test]
fn migration_hands_the_image_over_to_an_incoming_daemon() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let image = src_dir.path().join("disk.img");
    let source = start_on(src_dir.path(), &image, &[]);
    let destination = start_on(dst_dir.path(), &image, &["--incoming"]);
    let third = ["--image", image.to_str().unwrap()];
    hand_over(source, destination, &third);
}

/// The same on a Ceph RBD image: its exclusive lock goes from the source
/// daemon to the --incoming destination.
#[test]
fn migration_hands_an_rbd_image_over_to_an_incoming_daemon() {
    let cluster = support::ceph::cluster();
    let (spec, _) = cluster.create("migrate", 16);
    let on_rbd = |dir: &Path, extra: &[&str]| {
        let (key, _) = write_key(dir, 64);
        let mut args = support::ceph::serve_args(cluster, &spec);
        args.extend(["--key-file", key.to_str().unwrap(), "--queues", "2"]);
        args.extend_from_slice(extra);
        Daemon::start(dir, &args)
    };
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let source = on_rbd(src_dir.path(), &[]);
    let destination = on_rbd(dst_dir.path(), &["--incoming"]);
    hand_over(
        source,
        destination,
        &support::ceph::serve_args(cluster, &spec),
    );
}

/// Drives a migration from `source` to `destination` (see above); `third`
/// are the image arguments of a plain daemon that must then be refused.
fn hand_over(source: Daemon, destination: Daemon, third: &[&str]) {
    let src_ram = Ram {
        regions: vec![Region::new(BOOT_RAM, BOOT_LEN)],
    };
    let (mut src, _) = Ch::create(&source.socket);
    let mut inflight = None;
    src.activate(&src_ram, &mut inflight);
    verify(&mut src, &src_ram, 0, 32, BOOT_RAM + 0x10_0000, 21);

    // The destination VMM connects at once (QEMU -incoming does); a request
    // before the hand-over waits for the source, then fails.
    let dst_ram = Ram {
        regions: vec![Region::new(BOOT_RAM, BOOT_LEN)],
    };
    let (mut dst, _) = Ch::create(&destination.socket);
    let mut dst_inflight = None;
    dst.activate(&dst_ram, &mut dst_inflight);
    let early = BOOT_RAM + 0x20_0000;
    assert_ne!(
        dst.queues[0].request(&dst_ram, 0, 32, early, 4096),
        0,
        "the destination read the image while the source held it"
    );

    // The migration: logging on, a last write, the VM stops (GET_VRING_BASE).
    src.fe.set_features(src.features | F_LOG_ALL).unwrap();
    let log = DirtyLog::new(BOOT_RAM + BOOT_LEN as u64);
    src.fe.set_log_base(0, Some(log.region())).unwrap();
    verify(&mut src, &src_ram, 1, 96, BOOT_RAM + 0x30_0000, 22);
    for q in 0..QUEUES {
        src.fe.get_vring_base(q).unwrap();
    }

    // The destination now serves what the source acknowledged.
    for (q, sector, seed) in [(0, 32, 21), (1, 96, 22)] {
        let buf = BOOT_RAM + 0x40_0000 + q as u64 * 0x1_0000;
        assert_eq!(dst.queues[q].request(&dst_ram, 0, sector, buf, 16 << 10), 0);
        assert!(
            dst_ram.read(buf, 16 << 10) == pattern(seed, sector * 512, 16 << 10),
            "queue {q}: the destination does not see the source's write"
        );
    }
    verify(&mut dst, &dst_ram, 1, 512, BOOT_RAM + 0x50_0000, 23);

    // It holds the image now: a third daemon is refused.
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), 64);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .args(third)
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("in use"),
        "a third writer was not refused: {text}"
    );
    drop(src);
    drop(dst);
    // Both exit cleanly: the source does not flush an image it handed over
    // (an RBD image refuses that without its lock).
    assert!(source.terminate().success(), "the source's exit failed");
    assert!(
        destination.terminate().success(),
        "the destination's exit failed"
    );
}
