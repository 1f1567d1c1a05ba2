//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) through
//! the real daemon and a raw frontend that behaves like QEMU's reconnecting
//! vhost-user-blk: the region layout the daemon keeps, and what a restarted
//! daemon does with the requests its killed predecessor left unanswered.
//! (integration/e2e-reconnect.sh does the same with QEMU and a Linux guest.)

mod support;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use support::hostile::*;
use support::{pattern, write_key, Daemon};

const QSIZE: u16 = 16;
/// Per-queue region stride for 16 entries: 16 + 16 * 16, rounded to 64.
const STRIDE: u64 = 320;

/// The frontend's view of queue 0's part of the inflight region.
struct Region<'a>(&'a File);

impl Region<'_> {
    fn read(&self, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact_at(&mut b, at).unwrap();
        b
    }
    fn u16(&self, at: u64) -> u16 {
        let b = self.read(at, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn version(&self) -> u16 {
        self.u16(8)
    }
    fn desc_num(&self, queue: u64) -> u16 {
        self.u16(queue * STRIDE + 10)
    }
    fn last_batch_head(&self) -> u16 {
        self.u16(12)
    }
    fn used_idx(&self) -> u16 {
        self.u16(14)
    }
    fn inflight(&self, head: u16) -> u8 {
        self.read(16 + 16 * u64::from(head), 1)[0]
    }
    fn counter(&self, head: u16) -> u64 {
        let b = self.read(16 + 16 * u64::from(head) + 8, 8);
        u64::from_le_bytes(b.try_into().unwrap())
    }
    /// Marks `head` in flight with `counter`, as a daemon does at pop.
    fn mark(&self, head: u16, counter: u64) {
        let at = 16 + 16 * u64::from(head);
        self.0.write_all_at(&counter.to_le_bytes(), at + 8).unwrap();
        self.0.write_all_at(&[1], at).unwrap();
    }
    fn set_header(&self, last_batch_head: u16, used_idx: u16) {
        self.0
            .write_all_at(&last_batch_head.to_le_bytes(), 12)
            .unwrap();
        self.0.write_all_at(&used_idx.to_le_bytes(), 14).unwrap();
    }
}

/// A request in table slots `head..head+3`, with its own header, data
/// buffer and status byte, so several can be in flight at once.
struct Chain {
    head: u16,
}

impl Chain {
    const DATA_LEN: u32 = 4096;

    fn hdr(&self) -> u64 {
        HDR + 16 * u64::from(self.head)
    }
    fn status(&self) -> u64 {
        STATUS + u64::from(self.head)
    }
    fn data(&self) -> u64 {
        DATA + u64::from(Self::DATA_LEN) * u64::from(self.head)
    }

    /// Writes the request into guest memory (not yet published).
    fn prepare(g: &RawGuest, head: u16, kind: u32, sector: u64, data: Option<&[u8]>) -> Chain {
        let c = Chain { head };
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        g.mem.write(c.hdr(), &hdr);
        if let Some(d) = data {
            g.mem.write(c.data(), d);
        }
        let dir = if kind == T_IN { F_WRITE } else { 0 };
        g.mem.write_descs(
            DESC + 16 * u64::from(head),
            &[
                Desc::new(c.hdr(), 16, F_NEXT, head + 1),
                Desc::new(c.data(), Self::DATA_LEN, dir | F_NEXT, head + 2),
                Desc::new(c.status(), 1, F_WRITE, 0),
            ],
        );
        g.mem.write(c.status(), &[UNTOUCHED]);
        c
    }

    fn status_byte(&self, g: &RawGuest) -> u8 {
        g.mem.read(self.status(), 1)[0]
    }
}

/// Waits until the used index reaches `want`; returns the used entries
/// from `from` on as (id, len).
fn used_entries(g: &RawGuest, from: u16, want: u16) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.mem.read_u16(USED + 2) != want {
        assert!(
            Instant::now() < deadline,
            "used index stuck at {} (want {want})",
            g.mem.read_u16(USED + 2)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (from..want)
        .map(|pos| {
            let slot = u64::from(pos % QSIZE);
            let id = g.mem.read_u32(USED + 4 + 8 * slot);
            let len = g.mem.read_u32(USED + 8 + 8 * slot);
            (id, len)
        })
        .collect()
}

/// Publishes `chain`, waits for it, and returns its status byte.
fn run(g: &mut RawGuest, chain: &Chain) -> u8 {
    let before = g.mem.read_u16(USED + 2);
    g.publish(chain.head, 1);
    let used = used_entries(g, before, before.wrapping_add(1));
    assert_eq!(used[0].0, u32::from(chain.head));
    chain.status_byte(g)
}

fn start(dir: &Path, image: &Path, key: &Path) -> Daemon {
    start_with(dir, image, key, &[])
}

fn start_with(dir: &Path, image: &Path, key: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--image",
        image.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--queues",
        "2",
        "--queue-size",
        "16",
    ];
    args.extend_from_slice(extra);
    Daemon::start(dir, &args)
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(0x1f1, 0, 1 << 20)).unwrap();
    let (key, _) = write_key(dir.path(), 64);
    (dir, image, key)
}

#[test]
fn the_daemon_keeps_the_spec_layout_in_the_region() {
    let (dir, image, key) = setup();
    let daemon = start(dir.path(), &image, &key);
    let (mut g, inflight) = RawGuest::handshake_inflight(&daemon.socket, 2, QSIZE).unwrap();
    assert_eq!(inflight.info.num_queues, 2);
    assert_eq!(inflight.info.queue_size, QSIZE);
    assert_eq!(inflight.info.mmap_size, 2 * STRIDE);
    let region = Region(&inflight.file);
    assert_eq!((region.desc_num(0), region.desc_num(1)), (QSIZE, QSIZE));
    g.start_queue(0, QSIZE).unwrap();

    let data = pattern(7, 0, 4096);
    let w = Chain::prepare(&g, 0, T_OUT, 8, Some(&data));
    assert_eq!(run(&mut g, &w), S_OK);
    assert_eq!(region.version(), 1);
    assert_eq!(region.used_idx(), 1);
    assert_eq!(region.last_batch_head(), 0);
    assert_eq!(region.inflight(0), 0);
    assert_eq!(region.counter(0), 0);

    let r = Chain::prepare(&g, 3, T_IN, 8, None);
    assert_eq!(run(&mut g, &r), S_OK);
    assert_eq!(g.mem.read(r.data(), 4096), data);
    assert_eq!(region.used_idx(), 2);
    assert_eq!(region.last_batch_head(), 3);
    assert_eq!(region.inflight(3), 0);
    assert_eq!(region.counter(3), 1, "pops are stamped in order");
    drop(daemon);
}

/// The state a daemon leaves when it dies with two requests in flight and
/// a later one already completed (the worker pool completes out of order):
/// QEMU then restarts the queue at the used index, where the avail ring
/// holds the completed request, not the lost ones. Only the inflight
/// region tells the next daemon which requests to run: running what the
/// avail ring holds there would write B twice and never answer A.
#[test]
fn a_restarted_daemon_answers_what_its_killed_predecessor_left_in_flight() {
    let (dir, image, key) = setup();
    let mut first = start(dir.path(), &image, &key);
    let (mut g, inflight) = RawGuest::handshake_inflight(&first.socket, 1, QSIZE).unwrap();
    g.start_queue(0, QSIZE).unwrap();
    let old_b = Chain::prepare(&g, 0, T_IN, 32, None);
    assert_eq!(run(&mut g, &old_b), S_OK);
    let before_b = g.mem.read(old_b.data(), 4096);

    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10));

    // What the dead daemon had popped: A2 (older) and A (newer) both write
    // sector 16; B wrote sector 32 and completed.
    let (pa, pa2, pb) = (
        pattern(1, 0, 4096),
        pattern(2, 0, 4096),
        pattern(3, 0, 4096),
    );
    let a2 = Chain::prepare(&g, 9, T_OUT, 16, Some(&pa2));
    let a = Chain::prepare(&g, 3, T_OUT, 16, Some(&pa));
    let b = Chain::prepare(&g, 6, T_OUT, 32, Some(&pb));
    for c in [&a2, &a, &b] {
        g.publish(c.head, 1); // avail positions 1, 2, 3
    }
    g.mem.write(USED + 4 + 8, &[6, 0, 0, 0, 1, 0, 0, 0]); // used[1] = (B, 1)
    g.mem.write_u16(USED + 2, 2);
    g.mem.write(b.status(), &[S_OK]);
    let region = Region(&inflight.file);
    region.mark(9, 40);
    region.mark(3, 41);
    region.set_header(6, 2);
    // The kicks went to the dead daemon: the next one gets none.
    let _ = g.kick.read();

    let control = dir.path().join("c.sock");
    let second = start_with(
        dir.path(),
        &image,
        &key,
        &["--control", control.to_str().unwrap()],
    );
    let mut g = g.reconnect(&second.socket, &inflight).unwrap();
    assert_eq!(
        used_entries(&g, 2, 4),
        vec![(9, 1), (3, 1)],
        "the lost requests, oldest first"
    );
    assert_eq!((a2.status_byte(&g), a.status_byte(&g)), (S_OK, S_OK));
    assert_eq!(region.inflight(9) + region.inflight(3), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(g.mem.read_u16(USED + 2), 4, "B must not run again");

    // The next request comes from avail position 4, after everything the
    // dead daemon popped.
    let read_a = Chain::prepare(&g, 12, T_IN, 16, None);
    assert_eq!(run(&mut g, &read_a), S_OK);
    assert_eq!(g.mem.read(read_a.data(), 4096), pa, "newest write wins");
    let read_b = Chain::prepare(&g, 0, T_IN, 32, None);
    assert_eq!(run(&mut g, &read_b), S_OK);
    assert_eq!(g.mem.read(read_b.data(), 4096), before_b, "B ran again");
    assert_eq!(
        region.counter(12),
        42,
        "new pops are stamped after the recovered ones"
    );
    // The control socket counts the replayed requests as such.
    let stats = cryptblk::control::client::execute(&control, "query-stats", None).unwrap();
    let total = &stats["total"];
    assert_eq!(total["replayed"], 2, "{total}");
    assert_eq!(total["requests"]["write"], 2, "{total}");
    assert_eq!(total["requests"]["read"], 2, "{total}");
    assert_eq!(total["in-flight"], 0, "{total}");
    drop(second);
}

/// QEMU's vhost-user-blk starts a reconnected device's queues (kick,
/// enable) and only then sends their call fds. A daemon that replays its
/// predecessor's requests in between completes them with nobody to
/// interrupt: the guest, woken by nothing, waits forever (with EVENT_IDX
/// every later completion is suppressed too). So a new call fd is
/// signalled once on arrival, as libvhost-user does.
#[test]
fn replays_completed_before_the_call_fd_arrives_still_interrupt_the_guest() {
    let (dir, image, key) = setup();
    let mut first = start(dir.path(), &image, &key);
    let (mut g, inflight) = RawGuest::handshake_inflight(&first.socket, 1, QSIZE).unwrap();
    g.start_queue(0, QSIZE).unwrap();
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10));

    // The dead daemon had popped one write and not completed it.
    let data = pattern(4, 0, 4096);
    let lost = Chain::prepare(&g, 5, T_OUT, 8, Some(&data));
    g.publish(lost.head, 1);
    Region(&inflight.file).mark(5, 0);
    let _ = g.kick.read();

    let second = start(dir.path(), &image, &key);
    let mut g = g.reconnect_call_last(&second.socket, &inflight).unwrap();
    assert_eq!(used_entries(&g, 0, 1), vec![(5, 1)], "replayed before CALL");
    let _ = g.call.read();
    g.fe.set_vring_call(0, &g.call).unwrap();
    assert!(
        interrupted(&g, Duration::from_secs(5)),
        "no interrupt for a completion the guest has not seen"
    );

    let read = Chain::prepare(&g, 7, T_IN, 8, None);
    assert_eq!(run(&mut g, &read), S_OK);
    assert_eq!(g.mem.read(read.data(), 4096), data);
    drop(second);
}

/// Whether the guest's call eventfd fires within `limit`.
fn interrupted(g: &RawGuest, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if g.call.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
