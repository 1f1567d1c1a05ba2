//! Arbitrary bytes as a LUKS1/LUKS2 header file: parsing must fail cleanly
//! (no panic, no unbounded allocation, no hang).
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let path = dir.path().join("header");
    let mut f = std::fs::File::create(&path).expect("header file");
    // Most inputs should look like LUKS: prefix the magic unless the input
    // starts with a 0 byte.
    match data.split_first() {
        Some((0, rest)) => f.write_all(rest).unwrap(),
        _ => {
            f.write_all(cryptblk::luks::MAGIC).unwrap();
            f.write_all(data).unwrap();
        }
    }
    drop(f);
    let _ = cryptblk::luks::check_header(&path);
});
