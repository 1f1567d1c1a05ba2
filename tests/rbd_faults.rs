//! Faults under a daemon serving a Ceph RBD image: the cluster stopped
//! (requests fail with IOERR after --rbd-timeout, the daemon lives on and
//! still exits on SIGTERM) and the OSD killed and restarted under load (no
//! acknowledged write lost). Each test starts a cluster of its own
//! (integration/ceph.sh), since it breaks it.

mod support;

use std::time::{Duration, Instant};

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::ceph::{private, serve_args};
use support::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_stopped_cluster_fails_requests_after_the_timeout_and_the_daemon_lives() {
    let c = private("stopped", "memstore");
    let dir = tempfile::tempdir().unwrap();
    let (spec, name) = c.create("stopped", 64);
    // Data another client wrote: not in this daemon's librbd cache, so
    // reading it must ask the OSD.
    c.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-total",
        "16M",
        "--io-pattern",
        "seq",
        &format!("rbd/{name}"),
    ]);
    let mut args = serve_args(&c, &spec);
    args.extend([
        "--type",
        "plain",
        "--cipher",
        "none",
        "--rbd-timeout",
        "3",
        "--queues",
        "2",
    ]);
    let mut d = Daemon::start(dir.path(), &args);
    let mut cl = Client::connect(&d.socket, 2);
    // Control: the same requests succeed while the cluster runs.
    assert!(cl.read(0, 0, 65536).is_ok());
    assert_eq!(cl.write(1, 32 * MIB, &pattern(1, 32 * MIB, 65536)), 0);
    assert_eq!(cl.flush(1), 0);

    c.script("stop");
    let t = Instant::now();
    let read = cl.read(0, 8 * MIB, 65536);
    let took = t.elapsed();
    assert!(read.is_err(), "a read from a stopped cluster succeeded");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "IOERR after {took:?}, not after --rbd-timeout 3"
    );
    eprintln!("read failed after {:.1} s: {read:?}", took.as_secs_f64());
    let t = Instant::now();
    let write = cl.write(1, 40 * MIB, &pattern(2, 40 * MIB, 65536));
    let flush = cl.flush(1);
    assert!(
        write != 0 || flush != 0,
        "a write and flush to a stopped cluster both succeeded"
    );
    eprintln!(
        "write {write}, flush {flush} after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(d.alive(), "the daemon died with its cluster");
    // Another request after the failures: failed, not hung.
    assert!(cl.read(1, 12 * MIB, 4096).is_err());
    drop(cl);
    assert!(d.alive());
    // SIGTERM still ends it (the final flush fails after the timeout).
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(60));
    eprintln!(
        "exited {status:?} {:.1} s after SIGTERM",
        t.elapsed().as_secs_f64()
    );
}

/// SIGKILL of the (bluestore) OSD under a verified write load on two
/// queues (daemon under --sandbox full), restarted two seconds later: every request completes (librbd
/// resends what the OSD had not answered), and every write acknowledged
/// before, during and after is in the image afterwards.
#[test]
fn an_osd_killed_and_restarted_under_load_loses_no_acknowledged_write() {
    let c = private("osd", "bluestore");
    let dir = tempfile::tempdir().unwrap();
    let (spec, name) = c.create("osd", 64);
    let (key_path, key) = write_key(dir.path(), 64);
    let mut args = serve_args(&c, &spec);
    // Under the full sandbox: librados reconnects to the restarted OSD
    // (a new TCP socket, connect) with seccomp and Landlock on.
    args.extend([
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        "2",
        "--sandbox",
        "full",
    ]);
    let d = Daemon::start(dir.path(), &args);
    let mut cl = Client::connect(&d.socket, 2);

    const RECORD: usize = 65536;
    const SLOTS: u64 = 512; // 32 MiB
    let mut latest = vec![None; SLOTS as usize];
    let dir_path = c.dir.clone();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/ceph.sh");
    let fault = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let run = |verb: &str| {
            let st = std::process::Command::new("bash")
                .arg(script)
                .arg(verb)
                .arg(&dir_path)
                .status()
                .unwrap();
            assert!(st.success(), "ceph.sh {verb}");
        };
        run("osd-kill");
        let killed = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        run("osd-start");
        killed.elapsed()
    });
    let mut i = 0u64;
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    let mut done_at = None;
    loop {
        if done_at.is_none() && fault.is_finished() {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        let slot = (i * 7919) % SLOTS;
        let q = (i % 2) as usize;
        let t = Instant::now();
        let data = pattern(1000 + i, slot * RECORD as u64, RECORD);
        assert_eq!(cl.write(q, slot * RECORD as u64, &data), 0, "write {i}");
        if i % 4 == 3 {
            assert_eq!(cl.flush(q), 0, "flush after write {i}");
        }
        slowest = slowest.max(t.elapsed());
        latest[slot as usize] = Some(1000 + i);
        i += 1;
    }
    let outage = fault.join().unwrap();
    assert_eq!(cl.flush(0), 0);
    eprintln!(
        "{i} writes, OSD down {:.1} s, slowest request {:.1} s",
        outage.as_secs_f64(),
        slowest.as_secs_f64()
    );
    // Negative control: the kill landed under load (some request waited
    // for the OSD), else this test proves nothing.
    assert!(
        slowest >= Duration::from_secs(1),
        "no request waited for the OSD ({slowest:?}): the kill missed the load"
    );
    drop(cl);
    assert!(d.terminate().success());

    // Every acknowledged write, as the cluster holds it (rbd export),
    // decrypted by the oracle.
    let raw = c.export(&name, dir.path());
    let k = XtsKey::from_bytes(&key).unwrap();
    let cipher = SectorCipher::new(
        Some(&k),
        IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        },
    );
    let mut checked = 0;
    for (slot, seed) in latest.iter().enumerate() {
        let Some(seed) = seed else { continue };
        let at = slot * RECORD;
        let mut plain = raw[at..at + RECORD].to_vec();
        cipher.decrypt((at / 512) as u64, &mut plain);
        assert!(
            plain == pattern(*seed, at as u64, RECORD),
            "slot {slot}: write {seed} lost"
        );
        checked += 1;
    }
    assert!(checked > 0);
    eprintln!("{checked} slots hold their last acknowledged write");
}
