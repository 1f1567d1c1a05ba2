//! The ciphertext on a Ceph RBD image (`--image rbd:POOL/IMAGE`, issue #16):
//! the real daemon on the single-node cluster of integration/ceph.sh, driven
//! by libblkio; the image read back with `rbd export` holds dm-crypt's
//! ciphertext and no plaintext.

mod support;

use std::path::Path;

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::ceph::{cluster, serve_args};
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

/// Serves a new 16 MiB image encrypted (payload 8 sectors in, IVs + 16) on
/// `queues` queues with `extra` options; writes, reads back, zeroes,
/// flushes on every queue; then checks the exported image.
fn round_trip(queues: usize, extra: &[&str]) {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let (spec, name) = c.create("rt", 16);
    let (key_path, key) = write_key(dir.path(), 64);
    let q = queues.to_string();
    let mut args = serve_args(c, &spec);
    args.extend([
        "--key-file",
        key_path.to_str().unwrap(),
        "--queues",
        &q,
        "--offset",
        "8",
        "--skip",
        "16",
    ]);
    args.extend_from_slice(extra);
    let d = Daemon::start(dir.path(), &args);
    let mut cl = Client::connect(&d.socket, queues as i32);
    assert_eq!(cl.capacity(), (16 * MIB - 4096) as u64);
    let mut written = Vec::new();
    for (i, (offset, len)) in [(0u64, 4096), (65536, 3 * MIB), (8 * MIB as u64, 512)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, offset, len);
        assert_eq!(cl.write(i % queues, offset, &data), 0, "write at {offset}");
        written.push((offset, data));
    }
    assert_eq!(cl.flush(0), 0);
    for (i, (offset, data)) in written.iter().enumerate() {
        let back = cl.read((i + 1) % queues, *offset, data.len()).unwrap();
        assert!(back == *data, "read back at {offset}");
    }
    assert_eq!(cl.write_zeroes(queues - 1, 12 * MIB as u64, 65536), 0);
    assert_eq!(cl.read(0, 12 * MIB as u64, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(cl.flush(queues - 1), 0);
    drop(cl);
    assert!(d.terminate().success());

    let raw = c.export(&name, dir.path());
    assert_eq!(raw.len(), 16 * MIB);
    check_ciphertext(&raw[4096..], &raw, &cipher(&key, 16), &written);
    let mut zeros = vec![0u8; 65536];
    cipher(&key, 16).encrypt(12 * MIB as u64 / 512, &mut zeros);
    assert!(raw[4096 + 12 * MIB..4096 + 12 * MIB + 65536] == zeros[..]);
}

/// The payload holds the oracle's ciphertext of every write, and no
/// 512-byte block of plaintext is anywhere in the image.
fn check_ciphertext(payload: &[u8], raw: &[u8], cipher: &SectorCipher, written: &[(u64, Vec<u8>)]) {
    let stored: std::collections::HashSet<&[u8]> = raw.chunks(512).collect();
    for (offset, data) in written {
        let mut expect = data.clone();
        cipher.encrypt(offset / 512, &mut expect);
        let at = *offset as usize;
        assert!(
            payload[at..at + data.len()] == expect[..],
            "ciphertext at {offset}"
        );
        assert!(
            data.chunks(512).all(|block| !stored.contains(block)),
            "plaintext found in the cluster"
        );
    }
}

#[test]
fn one_queue_inline() {
    round_trip(1, &["--crypto", "inline"]);
}

#[test]
fn two_queues_inline() {
    round_trip(2, &["--crypto", "inline"]);
}

#[test]
fn two_queues_workers() {
    round_trip(2, &["--crypto", "workers", "--split-threshold", "64K"]);
}

#[allow(dead_code)]
fn unused(_: &Path) {}
