//! The ciphertext on an NBD server (`--image nbd://…`, issue #15): the real
//! daemon over nbdkit and qemu-nbd, unix socket and TCP, one and two
//! queues, driven by libblkio; the export read raw afterwards holds
//! dm-crypt's ciphertext and no plaintext.

mod common;

use std::path::Path;

use common::nbd::{copy_raw, NbdServer, Transport};
use common::*;
use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};

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
