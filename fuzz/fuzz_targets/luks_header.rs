//! Arbitrary bytes as a LUKS1/LUKS2 header file: parsing, and the checks an
//! unlock makes before any KDF runs, must fail cleanly (no panic, no
//! unbounded allocation, no hang). `check_header` checks every active key
//! slot's KDF costs against the caps in src/luks/kdf.rs without deriving
//! anything, so a header that asks for gigabytes or years is refused at
//! once; had a KDF run, integration/fuzz.sh's -timeout and -rss_limit_mb
//! would report it.
//!
//! The first input byte picks the mode: 0 = the rest is the file, with the
//! sha256 of each LUKS2 header copy recomputed (otherwise almost no mutation
//! of the JSON metadata, where the costs are, would get past the checksum
//! to the parser and the caps); 1 = the rest is the file as is; anything
//! else = the whole input after the LUKS magic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

/// LUKS2 layout (src/luks/luks2/binary.rs): a 4 KiB binary header with the
/// version at 6, the header size at 8 and the checksum at 448..512, then
/// the JSON area; the secondary copy starts at the header size.
const BIN_SIZE: usize = 4096;
const CSUM: std::ops::Range<usize> = 448..512;

fn with_luks2_checksums(mut file: Vec<u8>) -> Vec<u8> {
    if file.len() < BIN_SIZE || file[6..8] != [0, 2] {
        return file;
    }
    let hdr_size = u64::from_be_bytes(file[8..16].try_into().unwrap());
    let Ok(size) = usize::try_from(hdr_size) else {
        return file;
    };
    if size <= BIN_SIZE {
        return file;
    }
    for at in [0, size] {
        let Some(copy) = file.get_mut(at..at.saturating_add(size)) else {
            break;
        };
        copy[CSUM].fill(0);
        let sum = Sha256::digest(&*copy);
        copy[CSUM.start..CSUM.start + 32].copy_from_slice(&sum);
    }
    file
}

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let path = dir.path().join("header");
    let file = match data.split_first() {
        Some((0, rest)) => with_luks2_checksums(rest.to_vec()),
        Some((1, rest)) => rest.to_vec(),
        _ => [&cryptblk::luks::MAGIC[..], data].concat(),
    };
    std::fs::write(&path, file).expect("header file");
    let _ = cryptblk::luks::check_header(&path);
});
