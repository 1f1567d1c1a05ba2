//! The ciphertext on an NBD server (`--image nbd://…`, issue #15): the real
//! daemon over nbdkit and qemu-nbd, unix socket and TCP, one and two
//! queues, driven by libblkio; the export read raw afterwards holds
//! dm-crypt's ciphertext and no plaintext.

mod support;

use std::path::Path;

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::nbd::{copy_raw, NbdServer, Transport};
use support::*;

const MIB: usize = 1 << 20;

fn cipher(key: &[u8], skip: u64) -> SectorCipher {
    let k = XtsKey::from_bytes(key).unwrap();
    SectorCipher::new(
        Some(&k),
        IvRule {
            sector_size: 512,
            large_sectors: false,
            skip,
        },
    )
}

/// Serves `uri` encrypted (payload 8 sectors in, IVs + 16) on `queues`
/// queues with `extra` options; writes, reads back, zeroes, flushes on
/// every queue; then checks the raw export.
fn round_trip(dir: &Path, uri: &str, queues: usize, extra: &[&str]) {
    let (key_path, key) = write_key(dir, 64);
    let q = queues.to_string();
    let mut args = vec![
        "--image",
        uri,
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        &q,
        "--offset",
        "8",
        "--skip",
        "16",
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, &args);
    let mut c = Client::connect(&d.socket, queues as i32);
    assert_eq!(c.capacity(), (16 * MIB - 4096) as u64);
    // A 3 MiB write: cut into pieces, several in flight at once.
    let mut written = Vec::new();
    for (i, (offset, len)) in [(0u64, 4096), (65536, 3 * MIB), (8 * MIB as u64, 512)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, offset, len);
        assert_eq!(c.write(i % queues, offset, &data), 0, "write at {offset}");
        written.push((offset, data));
    }
    assert_eq!(c.flush(0), 0);
    for (i, (offset, data)) in written.iter().enumerate() {
        let back = c.read((i + 1) % queues, *offset, data.len()).unwrap();
        assert!(back == *data, "read back at {offset}");
    }
    // WRITE_ZEROES stores the ciphertext of zeros: it reads back as zeros.
    assert_eq!(c.write_zeroes(queues - 1, 12 * MIB as u64, 65536), 0);
    assert_eq!(c.read(0, 12 * MIB as u64, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(c.flush(queues - 1), 0);
    drop(c);
    assert!(d.terminate().success());

    // dm-crypt's view of the export: payload after 8 sectors, IV = sector + 16.
    let raw = copy_raw(uri, dir);
    assert_eq!(raw.len(), 16 * MIB);
    let cipher = cipher(&key, 16);
    let payload = &raw[4096..];
    let stored: std::collections::HashSet<&[u8]> = raw.chunks(512).collect();
    for (offset, data) in &written {
        let mut expect = data.clone();
        cipher.encrypt(offset / 512, &mut expect);
        let at = *offset as usize;
        assert!(
            payload[at..at + data.len()] == expect[..],
            "ciphertext at {offset}"
        );
        assert!(
            data.chunks(512).all(|block| !stored.contains(block)),
            "plaintext found on the server"
        );
    }
    let mut zeros = vec![0u8; 65536];
    cipher.encrypt(12 * MIB as u64 / 512, &mut zeros);
    assert!(payload[12 * MIB..12 * MIB + 65536] == zeros[..]);
}

fn on_nbdkit_memory(transport: Transport, queues: usize) {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(dir.path(), transport, &["memory", "size=16M"]);
    round_trip(dir.path(), &server.uri, queues, &[]);
}

fn on_nbdkit_file(transport: Transport, queues: usize) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.img");
    std::fs::write(&file, vec![0xeeu8; 16 * MIB]).unwrap();
    let arg = format!("file={}", file.display());
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
    let cryptblk = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "cryptblk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let uri = server.uri.as_str();
    let pw_s = pw.to_str().unwrap();
    cryptblk(&[
        "format",
        "--type",
        kind,
        "--image",
        uri,
        "--size",
        "16M",
        "--key-file",
        pw_s,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ]);
    let dump = cryptblk(&["dump", "--image", uri]);
    assert!(
        dump.contains(&format!("Version:       \t{}", &kind[4..])) || dump.contains("Version"),
        "{dump}"
    );
    cryptblk(&[
        "key",
        "add",
        "--image",
        uri,
        "--key-file",
        pw_s,
        "--new-key-file",
        pw2.to_str().unwrap(),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ]);
    // Formatting again would destroy the volume: refused.
    let again = std::process::Command::new(BIN)
        .args([
            "format",
            "--type",
            kind,
            "--image",
            uri,
            "--size",
            "16M",
            "--key-file",
            pw_s,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));

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
    let stored: std::collections::HashSet<&[u8]> = raw.chunks(512).collect();
    assert!(
        data.chunks(512).all(|b| !stored.contains(b)),
        "plaintext on the server"
    );
    for key_file in [&pw, &pw2] {
        let ok = std::process::Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--batch-mode", "--key-file"])
            .arg(key_file)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(ok.success(), "cryptsetup refuses {}", key_file.display());
    }
    let vk = d.join("vk");
    let dumped = std::process::Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--volume-key-file",
        ])
        .arg(&vk)
        .arg("--key-file")
        .arg(&pw)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(dumped.status.success());
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
    let key = std::fs::read(&vk).unwrap();
    let mut plain = raw[offset + (1 << 20)..offset + (1 << 20) + data.len()].to_vec();
    cipher(&key, 0).decrypt((1 << 20) / 512, &mut plain);
    assert!(
        plain == data,
        "cryptsetup's volume key decrypts the guest's data"
    );
}

matrix! {
    luks2_formatted_served_and_opened_by_cryptsetup_unix: luks_on_the_export("luks2", Transport::Unix);
    luks1_formatted_served_and_opened_by_cryptsetup_tcp: luks_on_the_export("luks1", Transport::Tcp);
}
