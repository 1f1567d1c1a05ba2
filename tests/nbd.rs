//! The ciphertext on an NBD server (`--image nbd://…`, issue #15): the real
//! daemon over nbdkit and qemu-nbd, unix socket and TCP, one and two
//! queues, driven by libblkio; the export read raw afterwards holds
//! dm-crypt's ciphertext and no plaintext.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cryptblk::bench::{run, JobSpec, RwMode};
use support::luks::{cryptsetup_opens, cryptsetup_volume_key, format_dump_and_add_key};
use support::nbd::{copy_raw, NbdServer, Transport};
use support::*;

const MIB: usize = 1 << 20;

/// Serves `uri` encrypted (payload 8 sectors in, IVs + 16) on `queues`
/// queues with `extra` options; writes, reads back, zeroes, flushes on
/// every queue; then checks the raw export.
fn round_trip(dir: &Path, uri: &str, queues: usize, extra: &[&str]) {
    let (cipher, written) = serve_16m_round_trip(dir, &["--image", uri], queues, extra);
    check_16m_export(&copy_raw(uri, dir), &cipher, &written);
}

fn on_nbdkit_memory(transport: Transport, queues: usize) {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(dir.path(), transport, &["memory", "size=16M"]);
    round_trip(dir.path(), &server.uri, queues, &[]);
}

/// A 16 MiB file `dir/export.img` of `fill` bytes, as nbdkit's file
/// plugin's parameter (`file=PATH`).
fn export_file(dir: &Path, fill: u8) -> String {
    let file = dir.join("export.img");
    std::fs::write(&file, vec![fill; 16 * MIB]).unwrap();
    format!("file={}", file.display())
}

fn on_nbdkit_file(transport: Transport, queues: usize) {
    let dir = tempfile::tempdir().unwrap();
    let arg = export_file(dir.path(), 0xee);
    let server = NbdServer::nbdkit(dir.path(), transport, &["file", &arg]);
    round_trip(dir.path(), &server.uri, queues, &[]);
}

/// qemu-nbd for `clients` at once: more than one advertises multi-conn
/// (a connection per queue), one does not (one shared connection).
fn on_qemu_nbd(transport: Transport, queues: usize, clients: u32) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.img");
    std::fs::write(&file, vec![0u8; 16 * MIB]).unwrap();
    let server = NbdServer::qemu_nbd(dir.path(), transport, &file, clients);
    round_trip(dir.path(), &server.uri, queues, &[]);
}

macro_rules! matrix {
    ($($name:ident: $body:expr;)*) => {
        $(#[test]
        fn $name() {
            $body
        })*
    };
}

matrix! {
    nbdkit_memory_unix_1_queue: on_nbdkit_memory(Transport::Unix, 1);
    nbdkit_memory_unix_2_queues: on_nbdkit_memory(Transport::Unix, 2);
    nbdkit_memory_tcp_1_queue: on_nbdkit_memory(Transport::Tcp, 1);
    nbdkit_memory_tcp_2_queues: on_nbdkit_memory(Transport::Tcp, 2);
    nbdkit_file_unix_2_queues: on_nbdkit_file(Transport::Unix, 2);
    nbdkit_file_tcp_1_queue: on_nbdkit_file(Transport::Tcp, 1);
    qemu_nbd_unix_2_queues_multi_conn: on_qemu_nbd(Transport::Unix, 2, 4);
    qemu_nbd_tcp_1_queue_multi_conn: on_qemu_nbd(Transport::Tcp, 1, 4);
    qemu_nbd_unix_2_queues_one_connection: on_qemu_nbd(Transport::Unix, 2, 1);
    qemu_nbd_tcp_2_queues_one_connection: on_qemu_nbd(Transport::Tcp, 2, 1);
}

/// `cryptblk format` LUKS1/LUKS2 on an export, `dump` and `key add` through
/// it, then `serve` (the header found on the export), and cryptsetup on a
/// raw copy of the export: it opens with both passphrases, and its volume
/// key decrypts what the guest wrote.
fn luks_on_the_export(kind: &str, transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The header on top of the 16 MiB payload: 16 MiB (LUKS2), 2 MiB (LUKS1).
    let size = if kind == "luks2" {
        "size=32M"
    } else {
        "size=18M"
    };
    let server = NbdServer::nbdkit(d, transport, &["memory", size]);
    let pw = d.join("pw");
    std::fs::write(&pw, b"correct horse").unwrap();
    let pw2 = d.join("pw2");
    std::fs::write(&pw2, b"battery staple").unwrap();
    let uri = server.uri.as_str();
    let pw_s = pw.to_str().unwrap();
    let dump = format_dump_and_add_key(kind, uri, &pw, &pw2, |args| {
        std::process::Command::new(BIN).args(args).output().unwrap()
    });
    assert!(
        dump.contains(&format!("Version:       \t{}", &kind[4..])) || dump.contains("Version"),
        "{dump}"
    );

    let daemon = Daemon::start(d, &["--image", uri, "--key-file", pw_s, "--queues", "2"]);
    let mut c = Client::connect(&daemon.socket, 2);
    assert_eq!(c.capacity(), 16 << 20);
    let data = pattern(9, 1 << 20, 256 * 1024);
    assert_eq!(c.write(1, 1 << 20, &data), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, 1 << 20, data.len()).unwrap(), data);
    drop(c);
    assert!(daemon.terminate().success());

    let raw = copy_raw(uri, d);
    let copy = d.join("copy.img");
    std::fs::write(&copy, &raw).unwrap();
    assert!(no_plaintext_in(&raw, &data), "plaintext on the server");
    for key_file in [&pw, &pw2] {
        assert!(
            cryptsetup_opens(&copy, key_file),
            "cryptsetup refuses {}",
            key_file.display()
        );
    }
    let key = cryptsetup_volume_key(&copy, &pw);
    let offset = {
        let out = std::process::Command::new("cryptsetup")
            .args(["luksDump", "--batch-mode"])
            .arg(&copy)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // LUKS1: "Payload offset:\t4096" (sectors); LUKS2: "offset: 16777216 [bytes]".
        text.lines()
            .find_map(|l| {
                let l = l.trim();
                l.strip_prefix("Payload offset:")
                    .map(|v| v.trim().parse::<usize>().unwrap() * 512)
                    .or_else(|| {
                        l.strip_prefix("offset:")
                            .map(|v| v.trim().trim_end_matches("[bytes]").trim().parse().unwrap())
                    })
            })
            .expect("payload offset in luksDump")
    };
    let mut plain = raw[offset + (1 << 20)..offset + (1 << 20) + data.len()].to_vec();
    plain_cipher(&key, 512, 0).decrypt((1 << 20) / 512, &mut plain);
    assert!(
        plain == data,
        "cryptsetup's volume key decrypts the guest's data"
    );
}

matrix! {
    luks2_formatted_served_and_opened_by_cryptsetup_unix: luks_on_the_export("luks2", Transport::Unix);
    luks1_formatted_served_and_opened_by_cryptsetup_tcp: luks_on_the_export("luks1", Transport::Tcp);
}

// Faults: a server that fails requests, a slow one, one that dies (issue
// #15, "The network fails; the guest must not lose data").

/// Starts the daemon on `uri` (plain mode, key of `dir`) with `extra`
/// options, its log in `dir/daemon.log`.
fn serve_logged(dir: &Path, uri: &str, queues: usize, extra: &[&str]) -> Daemon {
    let (key_path, _) = write_key(dir, 64);
    let q = queues.to_string();
    let mut args = vec![
        "--image",
        uri,
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        &q,
    ];
    args.extend_from_slice(extra);
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    Daemon::start_with_stderr(dir, &args, log.into())
}

fn daemon_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap()
}

/// `cryptblk serve --image URI EXTRA... --key-file KEY` on `dir/s.sock`
/// that is expected not to start: its output.
fn serve_output(dir: &Path, uri: &str, extra: &[&str], key: &Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(dir.join("s.sock"))
        .args(["--image", uri])
        .args(extra)
        .arg("--key-file")
        .arg(key)
        .output()
        .unwrap()
}

/// nbdkit's file plugin on a 16 MiB file of `dir` behind `filters`
/// (`--filter=` flags, then their parameters).
fn file_export(dir: &Path, transport: Transport, filters: &[&str]) -> NbdServer {
    let arg = export_file(dir, 0xee);
    let (flags, params): (Vec<&str>, Vec<&str>) = filters.iter().partition(|a| a.starts_with("--"));
    let mut args = flags;
    args.extend(["file", &arg]);
    args.extend(params);
    NbdServer::nbdkit(dir, transport, &args)
}

const BLOCK: usize = 65536;
const BLOCKS: u64 = 64;

/// The server fails some reads (EIO) and some writes (ENOSPC), chosen at
/// random by nbdkit's error filter while a trigger file exists: the guest
/// gets IOERR for those requests and nothing else; every request that
/// succeeded moved the right data; the daemon stays up, serves the guest
/// once the errors stop, and serves the next VMM.
#[test]
fn server_errors_fail_those_requests_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fail_reads, fail_writes) = (d.join("fail-reads"), d.join("fail-writes"));
    let reads = format!("error-pread-file={}", fail_reads.display());
    let writes = format!("error-pwrite-file={}", fail_writes.display());
    let server = file_export(
        d,
        Transport::Unix,
        &[
            "--filter=error",
            // One line per injected error otherwise.
            "--log=null",
            "error-pread=EIO",
            "error-pread-rate=30%",
            &reads,
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=30%",
            &writes,
        ],
    );
    let mut daemon = serve_logged(d, &server.uri, 2, &[]);
    let mut c = Client::connect(&daemon.socket, 2);
    let old = |b: u64| pattern(1, b * BLOCK as u64, BLOCK);
    let new = |b: u64| pattern(2, b * BLOCK as u64, BLOCK);
    for b in 0..BLOCKS {
        assert_eq!(c.write((b % 2) as usize, b * BLOCK as u64, &old(b)), 0);
    }
    assert_eq!(c.flush(0), 0);

    // Writes fail at random: each either succeeds or reports an error.
    std::fs::write(&fail_writes, b"").unwrap();
    let mut written = Vec::new();
    for b in 0..BLOCKS {
        let ret = c.write((b % 2) as usize, b * BLOCK as u64, &new(b));
        assert!(ret <= 0, "write {b}: {ret}");
        written.push(ret == 0);
    }
    std::fs::remove_file(&fail_writes).unwrap();
    let failed = written.iter().filter(|ok| !**ok).count();
    assert!(
        failed > 0 && failed < BLOCKS as usize,
        "{failed} of {BLOCKS} writes failed"
    );
    let expect = |b: u64| if written[b as usize] { new(b) } else { old(b) };

    // Reads fail at random: a read that succeeds has the right data.
    std::fs::write(&fail_reads, b"").unwrap();
    let mut read_errors = 0;
    for round in 0..2 {
        for b in 0..BLOCKS {
            match c.read(((b + round) % 2) as usize, b * BLOCK as u64, BLOCK) {
                Ok(data) => assert!(data == expect(b), "block {b} reads back wrong"),
                Err(ret) => {
                    assert!(ret < 0, "read {b}: {ret}");
                    read_errors += 1;
                }
            }
        }
    }
    std::fs::remove_file(&fail_reads).unwrap();
    assert!(
        read_errors > 0 && read_errors < 2 * BLOCKS,
        "{read_errors} reads failed"
    );
    // No error any more: everything verifies, on both queues.
    for b in 0..BLOCKS {
        assert!(c.read((b % 2) as usize, b * BLOCK as u64, BLOCK).unwrap() == expect(b));
    }
    drop(c);
    assert!(daemon.alive());
    // The next VMM is served as well.
    let mut c = Client::connect(&daemon.socket, 2);
    for b in 0..BLOCKS {
        assert!(
            c.read(((b + 1) % 2) as usize, b * BLOCK as u64, BLOCK)
                .unwrap()
                == expect(b)
        );
    }
    drop(c);
    assert!(daemon.terminate().success());
    let log = daemon_log(d);
    assert!(!log.contains("panicked"), "{log}");
}

/// A slow server (nbdkit's delay filter: 10 ms a write, 5 ms a read): still
/// correct, and the requests are at the server at the same time, not one
/// after another (one at a time would give at most 100 writes a second a
/// queue).
#[test]
fn a_slow_server_is_correct_with_many_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = NbdServer::nbdkit(
        d,
        Transport::Tcp,
        &[
            "--filter=delay",
            "memory",
            "size=16M",
            "delay-write=10ms",
            "delay-read=5ms",
        ],
    );
    let daemon = serve_logged(d, &server.uri, 2, &[]);
    let job = JobSpec {
        rw: RwMode::RandWrite,
        bs: 4096,
        iodepth: 16,
        queues: 2,
        size: Some(4 * MIB as u64),
        verify: true,
        ..JobSpec::new(&daemon.socket)
    };
    let report = run(&job).expect("bench run");
    assert_eq!(report.error_count(), 0, "errors: {:?}", report.errors);
    assert_eq!(report.mismatches(), 0, "{}", report.to_table());
    assert!(report.verify.as_ref().unwrap().checked_bytes > 0);
    assert!(
        report.write.iops > 400.0,
        "{} writes a second: not many in flight",
        report.write.iops
    );
    assert!(daemon.terminate().success());
}

/// With reconnecting off, a server killed while requests wait at it: they
/// fail with IOERR (no hang), the daemon stays up, and the next VMM's
/// requests fail at once too instead of hanging.
#[test]
fn a_killed_server_fails_the_requests_in_flight_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = NbdServer::nbdkit(
        d,
        Transport::Unix,
        &["--filter=delay", "memory", "size=16M", "delay-read=3"],
    );
    let mut daemon = serve_logged(d, &server.uri, 2, &["--nbd-reconnect-timeout", "0"]);
    let mut c = Client::connect(&daemon.socket, 2);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        server.kill();
        server
    });
    let start = Instant::now();
    let ret = c
        .read(1, 0, 4096)
        .expect_err("a read from a killed server succeeded");
    assert!(ret < 0);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "waited for the delay"
    );
    let _server = killer.join().unwrap();
    assert!(daemon.alive());
    let start = Instant::now();
    assert!(c.read(0, 0, 4096).is_err());
    assert!(c.write(1, 0, &[1; 4096]) < 0);
    drop(c);
    let mut c = Client::connect(&daemon.socket, 2);
    assert!(c.read(0, 0, 4096).is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(c);
    assert!(daemon.alive());
    // SIGTERM still ends it (its final flush fails: there is no server).
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(Duration::from_secs(10));
}

/// nbdkit stopped under a verified write load (one sequential pass of 64
/// KiB writes, 8 in flight on each of 2 queues, each write held 30 ms at
/// the server so many are in flight when it stops) and started again on the
/// same socket or port 1 s later: the daemon reconnects, sends again what
/// had no answer, the guest sees no error, and every write reads back.
/// `graceful`: SIGTERM (nbdkit answers what it holds with ESHUTDOWN, which
/// is sent again too) rather than SIGKILL. `shared`: the server offers no
/// multi-conn (nbdkit serving one connection at a time), so both queues'
/// writes are in flight on one connection, and are all sent again on the
/// new one.
fn reconnects_under_verified_writes(transport: Transport, graceful: bool, shared: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut filters = vec!["--filter=delay", "delay-write=30ms"];
    if shared {
        filters.extend(["--filter=noparallel", "serialize=connections"]);
    }
    let mut server = file_export(d, transport, &filters);
    // Over TCP with Landlock too: it must allow the connect to the port.
    let sandbox = if transport == Transport::Tcp {
        "full"
    } else {
        "seccomp"
    };
    let mut daemon = serve_logged(
        d,
        &server.uri,
        2,
        &["--nbd-reconnect-timeout", "20", "--sandbox", sandbox],
    );
    let job = JobSpec {
        rw: RwMode::Write,
        bs: BLOCK as u64,
        iodepth: 8,
        queues: 2,
        len: Some(12 * MIB as u64),
        verify: true,
        ..JobSpec::new(&daemon.socket)
    };
    let started = Instant::now();
    let load = std::thread::spawn(move || run(&job));
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !load.is_finished(),
        "the load ended before the server was killed"
    );
    if graceful {
        server.terminate();
    } else {
        server.kill();
    }
    std::thread::sleep(Duration::from_secs(1));
    server.restart();
    let report = load.join().unwrap().expect("bench run");
    assert!(
        started.elapsed() > Duration::from_millis(1400),
        "the load did not wait for the server"
    );
    assert_eq!(report.error_count(), 0, "errors: {:?}", report.errors);
    assert_eq!(report.mismatches(), 0, "{}", report.to_table());
    assert_eq!(report.write.bytes, 12 * MIB as u64);
    assert_eq!(
        report.verify.as_ref().unwrap().checked_bytes,
        12 * MIB as u64
    );
    assert!(daemon.alive());
    let log = daemon_log(d);
    assert!(log.contains(&format!("sandbox: {sandbox}")), "{log}");
    assert!(log.contains("lost: reconnecting"), "{log}");
    assert!(log.contains("made again"), "{log}");
    assert_eq!(log.contains("share one connection"), shared, "{log}");
    assert!(daemon.terminate().success());
}

matrix! {
    reconnects_under_verified_writes_unix_sigterm: reconnects_under_verified_writes(Transport::Unix, true, false);
    reconnects_under_verified_writes_tcp_sigkill: reconnects_under_verified_writes(Transport::Tcp, false, false);
    reconnects_under_verified_writes_shared_connection: reconnects_under_verified_writes(Transport::Unix, false, true);
}

/// No server comes back: requests fail with IOERR once the timeout (2 s)
/// has passed, later ones at once; the daemon stays up, and serves again
/// (the same VMM, then the next) as soon as a server is back.
#[test]
fn without_a_server_requests_fail_after_the_timeout_and_serve_again_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut server = file_export(d, Transport::Tcp, &[]);
    let mut daemon = serve_logged(d, &server.uri, 2, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 2);
    let data = pattern(5, 0, 4 * BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.flush(1), 0);
    server.kill();

    let start = Instant::now();
    assert!(c.read(1, 0, BLOCK).is_err());
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "failed after {waited:?}"
    );
    let start = Instant::now();
    assert!(c.write(1, 0, &data[..BLOCK]) < 0);
    assert!(
        start.elapsed() < Duration::from_millis(1900),
        "a later request waited the timeout again"
    );
    assert!(daemon.alive());

    server.restart();
    let mut back = None;
    wait_until(
        Duration::from_secs(10),
        "the daemon never reached the server again",
        || {
            back = c.read(1, 0, data.len()).ok();
            back.is_some()
        },
    );
    assert!(back.unwrap() == data);
    assert!(c.read(0, 0, data.len()).unwrap() == data);
    drop(c);
    let mut c = Client::connect(&daemon.socket, 2);
    assert!(c.read(1, 0, data.len()).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    let log = daemon_log(d);
    assert!(
        log.contains("requests fail until") || log.contains("new ones fail until"),
        "{log}"
    );
}

/// A server that answers writes with NBD_ESHUTDOWN ("shutting down, try
/// elsewhere") while keeping the connection: with reconnecting on, those
/// writes are not failed but sent again on new connections, with a growing
/// pause, until the server takes them (here: once the error filter's
/// trigger file is gone, 1.5 s later). The guest sees no error.
#[test]
fn writes_refused_by_a_server_shutting_down_are_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let trigger = d.join("shutting-down");
    let file = format!("error-pwrite-file={}", trigger.display());
    let server = file_export(
        d,
        Transport::Unix,
        &[
            "--filter=error",
            "--log=null",
            "error-pwrite=ESHUTDOWN",
            "error-pwrite-rate=100%",
            &file,
        ],
    );
    let daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "10"]);
    let mut c = Client::connect(&daemon.socket, 1);
    std::fs::write(&trigger, b"").unwrap();
    let remover = {
        let trigger = trigger.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::remove_file(trigger).unwrap();
        })
    };
    let data = pattern(7, 0, BLOCK);
    let start = Instant::now();
    assert_eq!(c.write(0, 0, &data), 0);
    assert!(start.elapsed() >= Duration::from_millis(1400));
    remover.join().unwrap();
    assert!(c.read(0, 0, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    let log = daemon_log(d);
    assert!(
        log.contains("refused by the server as it shut down"),
        "{log}"
    );
    // A pause that grows: a handful of reconnects in 1.5 s, not hundreds.
    let reconnects = log.matches("made again").count();
    assert!(
        (2..=12).contains(&reconnects),
        "{reconnects} reconnects: {log}"
    );
}

// TLS with pre-shared keys: nbdkit --tls=require --tls-psk=FILE.

/// A PSK file as psktool writes it: `user:hexkey` (a 256-bit key).
fn psk_file(dir: &Path, name: &str, user: &str, seed: u8) -> String {
    let key: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(37).wrapping_add(seed)))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, format!("{user}:{key}\n")).unwrap();
    path.display().to_string()
}

/// nbdkit's `plugin` requiring TLS with the PSK of `psk`.
fn tls_export(dir: &Path, transport: Transport, psk: &str, plugin: &[&str]) -> (NbdServer, String) {
    let tls_psk = format!("--tls-psk={psk}");
    let mut args = vec!["--tls=require", &tls_psk];
    args.extend(plugin);
    tls_server(NbdServer::nbdkit(dir, transport, &args))
}

/// A server that requires TLS, and its URI for that.
fn tls_server(server: NbdServer) -> (NbdServer, String) {
    // nbd:// → nbds://, nbd+unix:// → nbds+unix://.
    let uri = server.uri.replacen("nbd", "nbds", 1);
    (server, uri)
}

/// Served over TLS (`tls`: the daemon's options) on two queues under the
/// default seccomp sandbox: 256 KiB of pattern `seed` written at 1 MiB
/// round-trip. Returns them and the daemon's log.
fn tls_data_round_trip(dir: &Path, uri: &str, tls: &[&str], seed: u64) -> (Vec<u8>, String) {
    let daemon = serve_logged(dir, uri, 2, tls);
    let mut c = Client::connect(&daemon.socket, 2);
    let data = pattern(seed, MIB as u64, 256 * 1024);
    assert_eq!(c.write(1, MIB as u64, &data), 0);
    assert_eq!(c.flush(0), 0);
    assert!(c.read(0, MIB as u64, data.len()).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    let log = daemon_log(dir);
    assert!(log.contains("sandbox: seccomp"), "{log}");
    (data, log)
}

/// The export read raw over TLS (nbdcopy on `uri` with the query
/// parameter `tls`, libnbd's URI syntax) holds no block of `data`, which
/// `tls_data_round_trip` wrote at 1 MiB, and not `data` where it was
/// written.
fn assert_tls_export_is_ciphertext(dir: &Path, uri: &str, tls: &str, data: &[u8]) {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let raw = copy_raw(&format!("{uri}{sep}{tls}"), dir);
    assert!(no_plaintext_in(&raw, data));
    assert!(raw[MIB..MIB + data.len()] != data[..]);
}

/// Served on one queue with `extra` options, the daemon reads back what it
/// wrote after `server` was killed and restarted, and says it made the
/// connection again.
fn survives_a_server_restart(
    dir: &Path,
    server: &mut NbdServer,
    uri: &str,
    extra: &[&str],
    seed: u64,
) {
    let daemon = serve_logged(dir, uri, 1, extra);
    let mut c = Client::connect(&daemon.socket, 1);
    let data = pattern(seed, 0, BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    server.kill();
    server.restart();
    assert!(c.read(0, 0, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    assert!(daemon_log(dir).contains("made again"));
}

/// Served over TLS (unix socket and TCP, under the default seccomp sandbox,
/// which the handshake precedes): the guest's data round-trips, and the
/// export holds its ciphertext, not its plaintext.
fn tls_psk_round_trip(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psk = psk_file(d, "keys.psk", "alice", 1);
    let (_server, uri) = tls_export(d, transport, &psk, &["memory", "size=16M"]);
    let tls = ["--tls-psk-file", psk.as_str(), "--tls-username", "alice"];
    let (data, _) = tls_data_round_trip(d, &uri, &tls, 11);
    // nbdcopy reads the export raw over TLS too: the user in the URI's
    // authority, the key file as a query parameter (libnbd's URI syntax).
    let raw_uri = uri.replacen("://", "://alice@", 1);
    assert_tls_export_is_ciphertext(d, &raw_uri, &format!("tls-psk-file={psk}"), &data);
}

matrix! {
    tls_psk_unix_round_trip: tls_psk_round_trip(Transport::Unix);
    tls_psk_tcp_round_trip: tls_psk_round_trip(Transport::Tcp);
}

/// The wrong key (same user, another key), or a user the server does not
/// know: the handshake is refused and the daemon exits at start-up with a
/// message that says so, without crashing and without showing the key.
#[test]
fn a_wrong_psk_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = psk_file(d, "good.psk", "alice", 1);
    let wrong = psk_file(d, "wrong.psk", "alice", 2);
    let stranger = psk_file(d, "stranger.psk", "mallory", 1);
    let (_server, uri) = tls_export(d, Transport::Tcp, &good, &["memory", "size=16M"]);
    let (key_path, _) = write_key(d, 64);
    for (psk, user) in [(&wrong, "alice"), (&stranger, "mallory")] {
        let tls = ["--tls-psk-file", psk.as_str(), "--tls-username", user];
        let out = serve_output(d, &uri, &tls, &key_path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&uri), "names the image: {err}");
        assert!(err.contains("the TLS handshake failed"), "{err}");
        assert!(err.contains("--tls-psk-file"), "says what to check: {err}");
        assert!(!err.contains("config file"), "{err}");
        let key = std::fs::read_to_string(psk).unwrap();
        let hex = key.trim().split(':').nth(1).unwrap();
        assert!(!err.contains(hex), "shows the key: {err}");
    }
}

/// `format`, `key` and `dump` take the TLS options too: LUKS2 formatted on
/// an export that requires TLS, a key added and the header dumped, then
/// served over TLS. The wrong key is refused with serve's message, and TLS
/// options with a file image are refused rather than ignored.
#[test]
fn luks_commands_reach_a_tls_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psk = psk_file(d, "keys.psk", "alice", 1);
    let wrong = psk_file(d, "wrong.psk", "alice", 2);
    let (_server, uri) = tls_export(d, Transport::Unix, &psk, &["memory", "size=32M"]);
    let pw = d.join("pw");
    std::fs::write(&pw, b"correct horse").unwrap();
    let pw2 = d.join("pw2");
    std::fs::write(&pw2, b"battery staple").unwrap();
    let with_psk = |psk: &str, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .args(["--tls-psk-file", psk, "--tls-username", "alice"])
            .output()
            .unwrap()
    };
    let dump = format_dump_and_add_key("luks2", &uri, &pw, &pw2, |args| with_psk(&psk, args));
    assert!(dump.contains("LUKS header information"), "{dump}");

    let refused = with_psk(&wrong, &["dump", "--image", &uri]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("the TLS handshake failed") && err.contains("--tls-psk-file"),
        "{err}"
    );

    let tls = ["--tls-psk-file", psk.as_str(), "--tls-username", "alice"];
    let pw_s = pw2.to_str().unwrap();
    let daemon = Daemon::start(
        d,
        &[&["--image", &uri, "--key-file", pw_s][..], &tls].concat(),
    );
    let mut c = Client::connect(&daemon.socket, 1);
    assert_eq!(c.capacity(), 16 << 20, "the payload behind the header");
    let data = pattern(13, 0, BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    assert!(c.read(0, 0, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());

    let file = d.join("file.img");
    let out = with_psk(&psk, &["dump", "--image", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--tls-psk-file") && err.contains("nbds://"),
        "{err}"
    );
}

/// A unix socket whose server accepts connections and never says a word.
fn silent_server(dir: &Path) -> String {
    let path = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        // Held open, never read or written, until the test process ends.
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    format!("nbd+unix:///?socket={}", path.display())
}

/// A server that accepts and never speaks NBD cannot hold serve's start-up
/// for ever: the handshake gives up after the request timeout, whether the
/// LUKS probe (auto) or the export's own connection (plain) meets it first.
#[test]
fn a_silent_server_ends_the_start_up_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uri = silent_server(d);
    let (key_path, _) = write_key(d, 64);
    for device_type in ["auto", "plain"] {
        let args = ["--type", device_type, "--nbd-reconnect-timeout", "2"];
        start_up_fails_soon(
            d,
            &uri,
            &args,
            &key_path,
            "handshake did not finish in time",
        );
    }
}

/// `serve` on `uri` with `extra` exits with status 1 within 20 s, saying
/// `why` (the request timeout, 2 s in these tests, ended its start-up).
fn start_up_fails_soon(dir: &Path, uri: &str, extra: &[&str], key: &Path, why: &str) {
    let t = Instant::now();
    let out = serve_output(dir, uri, extra, key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(why), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// `dump` on a server that never speaks gives up after 30 s (the default
/// request timeout) with the same message.
#[test]
fn dump_gives_up_on_a_silent_server() {
    let dir = tempfile::tempdir().unwrap();
    let uri = silent_server(dir.path());
    let t = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["dump", "--image", &uri])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("handshake did not finish in time"), "{err}");
    assert!(t.elapsed() >= Duration::from_secs(29), "{:?}", t.elapsed());
}

/// A server that completes the handshake and then sits on the LUKS probe's
/// read (nbdkit's delay filter): serve gives up after the request timeout
/// and says the server did not answer.
#[test]
fn an_unanswered_header_read_ends_the_start_up_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = NbdServer::nbdkit(
        d,
        Transport::Unix,
        &["--filter=delay", "memory", "size=16M", "rdelay=60"],
    );
    let (key_path, _) = write_key(d, 64);
    let args = ["--nbd-reconnect-timeout", "2"];
    start_up_fails_soon(
        d,
        &server.uri,
        &args,
        &key_path,
        "did not answer within 2000 ms",
    );
}

/// Over TLS, reconnecting under the default seccomp sandbox (the
/// handshake reads the PSK file anew, which the sandbox then allows
/// read-only): a restarted server is reached again and the data verifies.
#[test]
fn tls_reconnects_under_the_seccomp_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let psk = psk_file(d, "keys.psk", "alice", 1);
    let file_arg = export_file(d, 0);
    let (mut server, uri) = tls_export(d, Transport::Unix, &psk, &["file", &file_arg]);
    let args = [
        "--tls-psk-file",
        psk.as_str(),
        "--tls-username",
        "alice",
        "--nbd-reconnect-timeout",
        "10",
    ];
    survives_a_server_restart(d, &mut server, &uri, &args, 12);
    assert_sandboxed_for_tls(d, "seccomp");
}

/// The daemon's log says which sandbox served, with read-only opens for
/// the TLS handshake (so a test cannot pass with the sandbox off).
fn assert_sandboxed_for_tls(dir: &Path, mode: &str) {
    let log = daemon_log(dir);
    assert!(
        log.contains(&format!("sandbox: {mode} ("))
            && log.contains("read-only opens for NBD reconnects over TLS"),
        "{log}"
    );
}

/// qemu-nbd serving one client (no multi-conn): every queue shares the one
/// connection, which reconnects too when qemu-nbd is restarted.
#[test]
fn the_shared_connection_reconnects_when_qemu_nbd_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("export.img");
    std::fs::write(&file, vec![0u8; 16 * MIB]).unwrap();
    let mut server = NbdServer::qemu_nbd(d, Transport::Unix, &file, 1);
    let daemon = serve_logged(d, &server.uri, 2, &["--nbd-reconnect-timeout", "10"]);
    let mut c = Client::connect(&daemon.socket, 2);
    let data = pattern(13, 0, BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.flush(1), 0);
    server.kill();
    server.restart();
    assert!(c.read(1, 0, BLOCK).unwrap() == data);
    assert_eq!(c.write(0, BLOCK as u64, &data), 0);
    assert!(c.read(1, BLOCK as u64, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    let log = daemon_log(d);
    assert!(log.contains("one connection"), "{log}");
    assert!(log.contains("NBD connection cryptblk made again"), "{log}");
}

// A hostile server (issue #15: "a server that sends garbage is
// disconnected and reconnected; the daemon never trusts a length from the
// wire without checking it"): tests/support/hostile_nbd.py shakes hands
// correctly and serves a memory export, but breaks the protocol on the
// first read at or past 8 MiB (or on every one).

const TRIGGER: u64 = 8 * MIB as u64;

/// The daemon's resident memory (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// What the hostile server logged: how many connections it took, and how
/// often it misbehaved.
fn hostile_log(log: &Path) -> (usize, usize) {
    (logged(log, "connect "), logged(log, "misbehave "))
}

/// How many lines of the hostile server's log start with `word`.
fn logged(log: &Path, word: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.starts_with(word)).count()
}

/// What a mode must do to the guest's read and to the connection.
#[derive(PartialEq)]
enum Expect {
    /// The connection is dropped (with a log line that says why), made
    /// again, the read sent again: the guest gets the right data.
    Reconnect,
    /// A well-formed error reply: the guest gets IOERR for that read only,
    /// and the connection goes on.
    Ioerr,
    /// The well-behaved control: nothing happens.
    Nothing,
}

/// Serves the hostile server's export (plain mode, one queue, reconnect
/// timeout 2 s), writes a block below and one at the trigger, reads the
/// trigger block (the server misbehaves once) and checks what `expect`
/// says; then the daemon is alive, serves both blocks correctly (the
/// server behaves again) and its memory has not grown by the length the
/// server announced.
fn against_a_hostile_server(transport: Transport, mode: &str, structured: &str, expect: Expect) {
    against_a_hostile(transport, mode, structured, "yes", expect);
}

/// `multi_conn` "no": the daemon's one shared connection meets the garbage
/// instead of a queue's own.
fn against_a_hostile(
    transport: Transport,
    mode: &str,
    structured: &str,
    multi_conn: &str,
    expect: Expect,
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(
        d,
        transport,
        &log,
        &[
            "--mode",
            mode,
            "--structured",
            structured,
            "--multi-conn",
            multi_conn,
        ],
    );
    let mut daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let low = pattern(21, 0, BLOCK);
    let high = pattern(22, TRIGGER, BLOCK);
    assert_eq!(c.write(0, 0, &low), 0);
    assert_eq!(c.write(0, TRIGGER, &high), 0);
    assert_eq!(c.flush(0), 0);
    let before = rss(daemon.pid);
    let (connections, _) = hostile_log(&log);

    let start = Instant::now();
    let got = c.read(0, TRIGGER, BLOCK);
    let took = start.elapsed();
    let (connections_after, misbehaved) = hostile_log(&log);
    let daemon_said = daemon_log(d);
    match expect {
        Expect::Reconnect | Expect::Nothing => {
            let got = got.unwrap_or_else(|e| panic!("read: {e} after {took:?}: {daemon_said}"));
            assert!(got == high, "the read after the reconnect has wrong data");
        }
        Expect::Ioerr => assert!(got.is_err(), "an error reply was taken as data"),
    }
    assert!(
        took < Duration::from_secs(2),
        "took {took:?}: {daemon_said}"
    );
    if expect == Expect::Nothing {
        assert_eq!(misbehaved, 0);
    } else {
        assert_eq!(misbehaved, 1, "the server never misbehaved: vacuous");
    }
    let reconnected = connections_after > connections;
    assert_eq!(
        reconnected,
        expect == Expect::Reconnect,
        "{connections} → {connections_after} connections: {daemon_said}"
    );
    if expect == Expect::Reconnect {
        assert!(daemon_said.contains("reconnecting"), "{daemon_said}");
        // A reply cut short is a closed connection; the rest is garbage.
        let what = if mode == "short" {
            "the server closed the connection"
        } else {
            "the server broke the NBD protocol"
        };
        assert!(
            daemon_said.contains(what),
            "no line says what the server did ({what}): {daemon_said}"
        );
    } else {
        assert!(!daemon_said.contains("reconnecting"), "{daemon_said}");
    }

    // Alive, serving, the server's announced lengths never allocated.
    assert!(daemon.alive());
    assert!(c.read(0, 0, BLOCK).unwrap() == low);
    assert!(c.read(0, TRIGGER, BLOCK).unwrap() == high);
    assert_eq!(c.write(0, TRIGGER + BLOCK as u64, &low), 0);
    assert!(c.read(0, TRIGGER + BLOCK as u64, BLOCK).unwrap() == low);
    let after = rss(daemon.pid);
    assert!(
        after < before + 32 * MIB as u64,
        "VmRSS grew from {before} to {after}"
    );
    drop(c);
    assert!(daemon.terminate().success());
    let said = daemon_log(d);
    assert!(!said.contains("panicked"), "{said}");
}

matrix! {
    hostile_control_well_behaved: against_a_hostile_server(Transport::Unix, "good", "yes", Expect::Nothing);
    hostile_wrong_cookie: against_a_hostile_server(Transport::Unix, "wrong-cookie", "yes", Expect::Reconnect);
    hostile_short_reply: against_a_hostile_server(Transport::Unix, "short", "yes", Expect::Reconnect);
    hostile_overlong_reply: against_a_hostile_server(Transport::Unix, "overlong", "yes", Expect::Reconnect);
    hostile_trailing_garbage: against_a_hostile_server(Transport::Unix, "huge", "yes", Expect::Reconnect);
    hostile_trailing_garbage_tcp: against_a_hostile_server(Transport::Tcp, "huge", "yes", Expect::Reconnect);
    hostile_unknown_errno: against_a_hostile_server(Transport::Unix, "bad-errno", "yes", Expect::Ioerr);
    hostile_unsolicited_reply: against_a_hostile_server(Transport::Unix, "unsolicited", "yes", Expect::Reconnect);
    hostile_unasked_structured_reply: against_a_hostile_server(Transport::Unix, "unasked-structured", "yes", Expect::Reconnect);
    hostile_wrong_cookie_shared_connection: against_a_hostile(Transport::Unix, "wrong-cookie", "yes", "no", Expect::Reconnect);
    hostile_trailing_garbage_shared_connection: against_a_hostile(Transport::Unix, "huge", "yes", "no", Expect::Reconnect);
}

/// cryptblk asks for simple replies only (libnbd reads a structured read
/// reply in twice the system calls, see libnbd.rs), even from a server
/// that offers structured ones: the hostile server logs every client that
/// asks, and nbdinfo (libnbd's own tool, which asks by default) is the
/// control that the log would show it.
#[test]
fn the_daemon_never_asks_for_structured_replies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(d, Transport::Unix, &log, &["--structured", "yes"]);
    let asked = || logged(&log, "structured asked");
    let daemon = serve_logged(d, &server.uri, 2, &[]);
    let mut c = Client::connect(&daemon.socket, 2);
    let data = pattern(23, 0, BLOCK);
    assert_eq!(c.write(1, 0, &data), 0);
    assert!(c.read(0, 0, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    let (connections, _) = hostile_log(&log);
    assert!(
        connections >= 2,
        "{connections} connections: the daemon did not connect"
    );
    assert_eq!(asked(), 0, "cryptblk asked for structured replies");

    let out = std::process::Command::new("nbdinfo")
        .args(["--size", &server.uri])
        .output()
        .expect("nbdinfo (libnbd-bin) is installed by integration/install-deps.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        asked(),
        1,
        "the log does not show a client that asks: vacuous"
    );
}

/// A server that breaks the protocol on every read of the region: each
/// reconnect meets the same garbage, so the read fails with IOERR once the
/// 2 s timeout has passed (a handful of reconnects with a growing pause,
/// not a loop), the daemon stays up and goes on serving the rest.
#[test]
fn hostile_server_that_never_behaves_fails_the_request_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(
        d,
        Transport::Unix,
        &log,
        &["--mode", "short", "--times", "0"],
    );
    let mut daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let low = pattern(23, 0, BLOCK);
    assert_eq!(c.write(0, 0, &low), 0);
    let start = Instant::now();
    assert!(c.read(0, TRIGGER, BLOCK).is_err());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "failed after {took:?}"
    );
    let (connections, misbehaved) = hostile_log(&log);
    assert!(
        (3..=20).contains(&misbehaved),
        "{misbehaved} tries in {took:?}"
    );
    assert!(connections > misbehaved, "{connections} connections");
    assert!(daemon.alive());
    let mut back = None;
    wait_until(
        Duration::from_secs(5),
        "the rest is not served again",
        || {
            back = c.read(0, 0, BLOCK).ok();
            back.is_some()
        },
    );
    assert!(back.unwrap() == low);
    drop(c);
    assert!(daemon.terminate().success());
    let said = daemon_log(d);
    assert!(said.contains("the server closed the connection"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

// A server that breaks the handshake itself (hostile_nbd.py --handshake):
// at start-up that is an error that says what the server did; on a
// reconnect it is a failed attempt, tried again until the server behaves.

/// serve's start-up against a server breaking the handshake as `mode`
/// says: exit status 1 (not a panic, not a hang: within the 2 s request
/// timeout and a margin), with a message that contains `says`.
fn hostile_handshake_at_start_up(transport: Transport, mode: &str, says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(d, transport, &log, &["--handshake", mode]);
    let (key_path, _) = write_key(d, 64);
    let start = Instant::now();
    let out = serve_output(d, &server.uri, &["--nbd-reconnect-timeout", "2"], &key_path);
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(says), "expected {says:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(6), "took {took:?}: {err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("handshake-misbehave {mode}")),
        "the server never misbehaved: vacuous: {text}"
    );
}

matrix! {
    hostile_handshake_bad_magic: hostile_handshake_at_start_up(Transport::Unix, "bad-magic", "the NBD handshake failed: nbd_aio_notify_read: handshake: server did not send expected NBD magic");
    hostile_handshake_closed: hostile_handshake_at_start_up(Transport::Unix, "close", "the server closed the connection during the NBD handshake");
    hostile_handshake_garbage_reply: hostile_handshake_at_start_up(Transport::Unix, "garbage", "the NBD handshake failed: nbd_aio_notify_read: handshake: invalid option reply");
    hostile_handshake_4gib_option_reply_tcp: hostile_handshake_at_start_up(Transport::Tcp, "huge-reply", "the NBD handshake failed: nbd_aio_notify_read: handshake: invalid NBD_REP_ACK option reply length");
    hostile_handshake_export_size_beyond_2_63: hostile_handshake_at_start_up(Transport::Unix, "huge-size", "the server announced an export size of 9223372036854776320 bytes");
    hostile_handshake_closed_tcp: hostile_handshake_at_start_up(Transport::Tcp, "close", "the server closed the connection during the NBD handshake");
    hostile_handshake_minimum_block_above_every_sector_size: hostile_handshake_at_start_up(Transport::Unix, "big-block", "ask the server for a smaller minimum block size");
}

/// Handshakes that are odd but usable: an export whose size is not a
/// multiple of 512 (16 MiB + 100 bytes) is served with the whole sectors
/// it holds; block-size constraints that break the spec (a minimum of 3)
/// are ignored, as libnbd ignores them. Either way the guest sees 16 MiB,
/// its last sector verifies, and a request past it is refused.
fn an_odd_export_is_served_in_whole_sectors(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(d, Transport::Unix, &log, &["--handshake", mode]);
    let daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    assert_eq!(c.capacity(), 16 * MIB as u64);
    let last = 16 * MIB as u64 - BLOCK as u64;
    let data = pattern(24, last, BLOCK);
    assert_eq!(c.write(0, last, &data), 0);
    assert!(c.read(0, last, BLOCK).unwrap() == data);
    assert!(c.read(0, 16 * MIB as u64, 512).is_err());
    drop(c);
    assert!(daemon.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("handshake-misbehave {mode}")),
        "{text}"
    );
}

matrix! {
    an_export_of_odd_size_is_served_in_whole_sectors: an_odd_export_is_served_in_whole_sectors("odd-size");
    block_sizes_that_break_the_spec_are_ignored: an_odd_export_is_served_in_whole_sectors("bad-block");
}

/// The server restarts and breaks the handshake (as `mode` says) while a
/// flag file exists: the daemon's reconnect attempts fail (each logged
/// with what the server did), then the flag is removed and the next
/// attempt succeeds: the guest's read, waiting meanwhile, returns the
/// data written before the restart, and the daemon serves on.
fn hostile_handshake_on_reconnect(mode: &str, says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let flag = d.join("break-handshakes");
    let export = d.join("export.img");
    let mut server = NbdServer::hostile(
        d,
        Transport::Unix,
        &log,
        &[
            "--handshake",
            mode,
            "--handshake-while",
            flag.to_str().unwrap(),
            "--file",
            export.to_str().unwrap(),
        ],
    );
    let mut daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "10"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let data = pattern(25, 0, BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.flush(0), 0);
    std::fs::write(&flag, b"").unwrap();
    server.kill();
    server.restart();
    let unflag = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::remove_file(flag).unwrap();
        })
    };
    let got = c.read(0, 0, BLOCK);
    unflag.join().unwrap();
    let said = daemon_log(d);
    assert!(got.unwrap_or_else(|e| panic!("read: {e}: {said}")) == data);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("handshake-misbehave {mode}")),
        "no reconnect met the broken handshake: vacuous: {text}"
    );
    assert!(said.contains(says), "expected {says:?}: {said}");
    if says.starts_with("handshake: ") {
        // Within nbd_aio_connect_socket or a later nbd_aio_notify_read,
        // as the greeting's timing has it.
        assert!(
            said.contains("the NBD handshake failed: nbd_aio_"),
            "{said}"
        );
    }
    assert!(said.contains("made again"), "{said}");
    assert!(daemon.alive());
    assert_eq!(c.write(0, BLOCK as u64, &data), 0);
    assert!(c.read(0, BLOCK as u64, BLOCK).unwrap() == data);
    drop(c);
    assert!(daemon.terminate().success());
    assert!(!daemon_log(d).contains("panicked"));
}

matrix! {
    hostile_handshake_garbage_on_reconnect: hostile_handshake_on_reconnect("garbage", "handshake: invalid option reply");
    hostile_handshake_bad_magic_on_reconnect: hostile_handshake_on_reconnect("bad-magic", "handshake: server did not send expected NBD magic");
    hostile_handshake_smaller_export_on_reconnect: hostile_handshake_on_reconnect("odd-size", "the export changed");
    hostile_handshake_larger_minimum_block_on_reconnect: hostile_handshake_on_reconnect("block-4k", "the export changed");
    hostile_handshake_minimum_block_above_every_sector_on_reconnect: hostile_handshake_on_reconnect("big-block", "the export wants requests aligned to 65536 bytes");
}

// A server that keeps the connection open and never answers (or a network
// that silently drops everything): hostile_nbd.py --mode silent leaves the
// first read at or past the trigger (or every one, with --times 0)
// unanswered, and answers everything else.

/// A read sent again after the request timeout (2 s): `got`, answered
/// after `took`, is `want`, not before the timeout and not long after it.
/// Returns the daemon's log as it was then.
fn assert_sent_again_in_time(
    dir: &Path,
    got: Result<Vec<u8>, i32>,
    took: Duration,
    want: &[u8],
) -> String {
    let said = daemon_log(dir);
    let got = got.unwrap_or_else(|e| panic!("read: {e} after {took:?}: {said}"));
    assert!(got == want, "the read sent again has wrong data");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "answered after {took:?}: {said}"
    );
    said
}

/// A silent server under a serving daemon: the read it leaves unanswered
/// counts its connection as lost once the request timeout (the reconnect
/// timeout, 2 s) passes; the daemon says so, connects again, sends the read
/// again, and the server (behaving now) returns the right data. Meanwhile
/// the other queue, on its own connection, goes on serving.
#[test]
fn a_silent_server_is_detected_and_the_request_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(d, Transport::Tcp, &log, &["--mode", "silent"]);
    let daemon = serve_logged(d, &server.uri, 2, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 2);
    let high = pattern(31, TRIGGER, BLOCK);
    let other = pattern(32, 0, BLOCK);
    assert_eq!(c.write(0, TRIGGER, &high), 0);
    let (connections, _) = hostile_log(&log);

    let start = Instant::now();
    let at = 2 * MIB;
    c.start_read(0, TRIGGER, BLOCK, at);
    // Queue 1 is served while queue 0's read waits at the silent server.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.write(1, 0, &other), 0);
    assert!(c.read(1, 0, BLOCK).unwrap() == other);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "queue 1 waited for queue 0: {:?}",
        start.elapsed()
    );
    let got = c.finish_read(0, BLOCK, at);
    let said = assert_sent_again_in_time(d, got, start.elapsed(), &high);
    let (connections_after, misbehaved) = hostile_log(&log);
    assert_eq!(misbehaved, 1, "the server was never silent: vacuous");
    assert!(connections_after > connections, "no reconnect: {said}");
    assert!(said.contains("has not answered a command"), "{said}");
    assert!(said.contains("sending 1 commands again"), "{said}");
    assert!(daemon.terminate().success());
}

/// The same on the one shared connection (a server without multi-conn):
/// the read times out, the connection is shut down, and the read sent
/// again on a new one returns the right data.
#[test]
fn a_silent_server_on_the_shared_connection_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(
        d,
        Transport::Unix,
        &log,
        &["--mode", "silent", "--multi-conn", "no"],
    );
    let daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let high = pattern(35, TRIGGER, BLOCK);
    assert_eq!(c.write(0, TRIGGER, &high), 0);
    let start = Instant::now();
    let got = c.read(0, TRIGGER, BLOCK);
    let said = assert_sent_again_in_time(d, got, start.elapsed(), &high);
    assert_eq!(
        hostile_log(&log).1,
        1,
        "the server was never silent: vacuous"
    );
    assert!(said.contains("has not answered a command"), "{said}");
    assert!(said.contains("sending 1 commands again"), "{said}");
    assert!(daemon.terminate().success());
}

/// The control: a slow server that answers within the request timeout
/// (nbdkit's delay filter, 1.5 s a read, timeout 2 s) is not counted as
/// lost: no reconnect, the right data.
#[test]
fn a_slow_server_within_the_request_timeout_is_not_counted_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = NbdServer::nbdkit(
        d,
        Transport::Tcp,
        &["--filter=delay", "memory", "size=16M", "delay-read=1500ms"],
    );
    let daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let data = pattern(33, 0, BLOCK);
    assert_eq!(c.write(0, 0, &data), 0);
    let start = Instant::now();
    let got = c.read(0, 0, BLOCK);
    let took = start.elapsed();
    let said = daemon_log(d);
    assert!(got.unwrap() == data, "{said}");
    assert!(
        took >= Duration::from_millis(1400),
        "answered after {took:?}: the delay filter did not delay (vacuous)"
    );
    assert!(!said.contains("has not answered"), "{said}");
    assert!(!said.contains("reconnecting"), "{said}");
    assert!(daemon.terminate().success());
}

/// A VMM that leaves while a read waits at a server that never answers
/// it: the daemon waits at most its grace (2 s), fails the read, and
/// serves the next VMM, reconnecting for it.
#[test]
fn a_disconnect_with_a_request_stuck_on_a_silent_server_serves_the_next_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(
        d,
        Transport::Unix,
        &log,
        &["--mode", "silent", "--times", "0"],
    );
    let mut daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "2"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let low = pattern(36, 0, BLOCK);
    assert_eq!(c.write(0, 0, &low), 0);
    c.start_read(0, TRIGGER, BLOCK, 2 * MIB);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        hostile_log(&log).1,
        1,
        "the read never reached the server: vacuous"
    );
    let start = Instant::now();
    drop(c);
    let mut next = Client::connect(&daemon.socket, 1);
    let got = next.read(0, 0, BLOCK);
    let took = start.elapsed();
    let said = daemon_log(d);
    assert!(got.unwrap() == low, "{said}");
    // The grace, not the request timeout: that path (a timeout, a
    // reconnect, the read sent again and timed out again) takes 2 s more.
    eprintln!("the next VMM was served {took:?} after the disconnect");
    assert!(
        took < Duration::from_millis(3300),
        "served after {took:?}: {said}"
    );
    assert!(said.contains("still unanswered"), "{said}");
    assert!(daemon.alive());
    drop(next);
    assert!(daemon.terminate().success());
}

/// SIGTERM while a read waits at a server that never answers it (every
/// read of the region, on every connection): the daemon waits for it at
/// most its grace (the reconnect timeout, 3 s here), then closes the
/// connection; the read gets IOERR, the daemon exits 0, and the log says
/// what it gave up on.
#[test]
fn sigterm_with_a_request_stuck_on_a_silent_server_exits_within_the_bound() {
    sigterm_with_a_stuck_request("yes");
}

/// The same on the one shared connection (no multi-conn): the final FLUSH
/// after the grace gets at most 1 s more.
#[test]
fn sigterm_with_a_request_stuck_on_the_shared_connection_exits_within_the_bound() {
    sigterm_with_a_stuck_request("no");
}

fn sigterm_with_a_stuck_request(multi_conn: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("hostile.log");
    let server = NbdServer::hostile(
        d,
        Transport::Unix,
        &log,
        &[
            "--mode",
            "silent",
            "--times",
            "0",
            "--multi-conn",
            multi_conn,
        ],
    );
    let mut daemon = serve_logged(d, &server.uri, 1, &["--nbd-reconnect-timeout", "3"]);
    let mut c = Client::connect(&daemon.socket, 1);
    let low = pattern(34, 0, BLOCK);
    assert_eq!(c.write(0, 0, &low), 0);
    let at = 2 * MIB;
    c.start_read(0, TRIGGER, BLOCK, at);
    std::thread::sleep(Duration::from_millis(300));
    let (_, misbehaved) = hostile_log(&log);
    assert_eq!(misbehaved, 1, "the read never reached the server: vacuous");
    let start = Instant::now();
    daemon.signal(libc::SIGTERM);
    let got = c.finish_read(0, BLOCK, at);
    let status = daemon.wait_exit(Duration::from_secs(15));
    let took = start.elapsed();
    let said = daemon_log(d);
    assert!(got.is_err(), "the stuck read succeeded: {said}");
    assert!(status.success(), "{status}: {said}");
    // The grace, not the request timeout: that path (a timeout, a
    // reconnect, the read sent again and timed out again) takes 3 s more.
    eprintln!("exited {took:?} after SIGTERM");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_millis(4500),
        "exited {took:?} after SIGTERM: {said}"
    );
    assert!(said.contains("still unanswered"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

// TLS with X.509 certificates: a throwaway CA, server and client
// certificates made with openssl, nbdkit --tls=require --tls-certificates
// (and --tls-verify-peer: the client's certificate is checked too).

/// Runs openssl with `args` in `dir`; it must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl cannot run: integration/install-deps.sh installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` under `dir/name`, and two directories in the layout
/// nbdkit and libnbd read: `server/` (ca-cert.pem, server-cert.pem,
/// server-key.pem; the server certificate names localhost and 127.0.0.1)
/// and `client/` (ca-cert.pem, client-cert.pem, client-key.pem). The CA's
/// key stays in `dir/name`, in neither. Returns (server, client).
fn x509_dirs(dir: &Path, name: &str) -> (String, String) {
    x509_dirs_naming(dir, name, "DNS:localhost,IP:127.0.0.1")
}

/// As `x509_dirs`, the server certificate naming `san` (subjectAltName).
fn x509_dirs_naming(dir: &Path, name: &str, san: &str) -> (String, String) {
    let ca = dir.join(name);
    let (server, client) = (ca.join("server"), ca.join("client"));
    std::fs::create_dir_all(&server).unwrap();
    std::fs::create_dir_all(&client).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subject = format!("/CN=cryptblk test CA {name}");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca, &args);
    for (who, ext) in [
        (
            "server",
            &format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        ),
        ("client", &"extendedKeyUsage=clientAuth\n".to_string()),
    ] {
        std::fs::write(
            ca.join(format!("{who}.ext")),
            format!("{ext}keyUsage=critical,digitalSignature\n"),
        )
        .unwrap();
        let (key, csr) = (format!("{who}/{who}-key.pem"), format!("{who}.csr"));
        let subject = format!("/CN={who}");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(&ca, &args);
        let (cert, ext) = (format!("{who}/{who}-cert.pem"), format!("{who}.ext"));
        openssl(
            &ca,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                &ext,
            ],
        );
        std::fs::copy(ca.join("ca-cert.pem"), ca.join(who).join("ca-cert.pem")).unwrap();
    }
    (server.display().to_string(), client.display().to_string())
}

/// nbdkit's `plugin` requiring TLS with the certificates of `server_dir`
/// and a client certificate from the same CA.
fn x509_export(
    dir: &Path,
    transport: Transport,
    server_dir: &str,
    plugin: &[&str],
) -> (NbdServer, String) {
    let certs = format!("--tls-certificates={server_dir}");
    let mut args = vec!["--tls=require", &certs, "--tls-verify-peer"];
    args.extend(plugin);
    tls_server(NbdServer::nbdkit(dir, transport, &args))
}

/// Served over TLS with X.509 (the server's certificate checked against
/// the CA, over TCP its name too: 127.0.0.1; the client's certificate
/// checked by nbdkit), under the default seccomp sandbox: the data
/// round-trips and the export holds ciphertext only.
fn tls_x509_round_trip(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server_dir, client_dir) = x509_dirs(d, "ca");
    let (_server, uri) = x509_export(d, transport, &server_dir, &["memory", "size=16M"]);
    let (data, log) = tls_data_round_trip(d, &uri, &["--tls-certificates", &client_dir], 31);
    // A reconnect's handshake reads the certificates again: the sandbox
    // leaves that (and only that) to it.
    assert!(
        log.contains("read-only opens for NBD reconnects over TLS"),
        "{log}"
    );
    let tls = format!("tls-certificates={client_dir}");
    assert_tls_export_is_ciphertext(d, &uri, &tls, &data);
}

matrix! {
    tls_x509_unix_round_trip: tls_x509_round_trip(Transport::Unix);
    tls_x509_tcp_round_trip: tls_x509_round_trip(Transport::Tcp);
}

/// A client that trusts another CA (the server's certificate does not
/// verify), and one whose own certificate comes from another CA (nbdkit
/// refuses it): the handshake fails and the daemon exits at start-up with
/// status 1 and a message that says so and names the option, no crash.
/// Their control is `tls_x509_*_round_trip`: the same layout from the
/// server's own CA is served.
#[test]
fn a_certificate_from_another_ca_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server_dir, good_client) = x509_dirs(d, "ours");
    let (_, other_client) = x509_dirs(d, "theirs");
    // Trusts our CA, presents a certificate of theirs.
    let mixed = d.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(
        Path::new(&good_client).join("ca-cert.pem"),
        mixed.join("ca-cert.pem"),
    )
    .unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(Path::new(&other_client).join(f), mixed.join(f)).unwrap();
    }
    let (_server, uri) = x509_export(d, Transport::Tcp, &server_dir, &["memory", "size=16M"]);
    let (key_path, _) = write_key(d, 64);
    for client in [other_client.as_str(), mixed.to_str().unwrap()] {
        let start = Instant::now();
        let out = serve_output(d, &uri, &["--tls-certificates", client], &key_path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{client}: {err}");
        assert!(err.contains(&uri), "names the image: {err}");
        assert!(err.contains("the TLS handshake failed"), "{err}");
        assert!(
            err.contains(&format!("--tls-certificates {client}")),
            "says what to check: {err}"
        );
        if client == other_client {
            assert!(
                err.contains("the server's certificate did not verify"),
                "{err}"
            );
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!d.join("s.sock").exists(), "{client}: listened anyway");
    }
    // Signed by the CA the client trusts, but for another host: over TCP
    // libnbd checks the name too (the URI's 127.0.0.1).
    let (elsewhere, client) = x509_dirs_naming(d, "elsewhere", "DNS:nbd.example.org");
    let (_other, uri) = x509_export(d, Transport::Tcp, &elsewhere, &["memory", "size=1M"]);
    let out = serve_output(d, &uri, &["--tls-certificates", &client], &key_path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the server's certificate did not verify"),
        "{err}"
    );
    assert!(err.contains("name the host connected to"), "{err}");
}

/// X.509 and reconnecting under `--sandbox full` over TCP: the handshake
/// reads the certificates again, which Landlock leaves readable (and
/// nothing else), and connects to the server's port: a restarted server
/// is reached again and the data verifies.
#[test]
fn tls_x509_reconnects_under_landlock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server_dir, client_dir) = x509_dirs(d, "ca");
    let file_arg = export_file(d, 0);
    let (mut server, uri) = x509_export(d, Transport::Tcp, &server_dir, &["file", &file_arg]);
    let args = [
        "--tls-certificates",
        client_dir.as_str(),
        "--sandbox",
        "full",
        "--nbd-reconnect-timeout",
        "10",
    ];
    survives_a_server_restart(d, &mut server, &uri, &args, 32);
    assert_sandboxed_for_tls(d, "full");
}
