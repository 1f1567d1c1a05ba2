use super::*;
use crate::crypto::{IvRule, SectorCipher, XtsKey};
use crate::crypto::{SharedMut, SharedRef};
use std::path::Path;

fn cipher(sector_size: usize) -> SectorCipher {
    let key = XtsKey::from_bytes(&[7u8; 64]).unwrap();
    SectorCipher::new(
        Some(&key),
        IvRule {
            sector_size,
            large_sectors: false,
            skip: 0,
        },
    )
}

/// Every test runs on both I/O paths.
const IO_MODES: [IoMode; 2] = [IoMode::Mmap, IoMode::Pread];

fn open_with(
    path: &Path,
    size: Option<u64>,
    offset: u64,
    sector_size: usize,
    direct: bool,
    io: IoMode,
) -> Volume {
    let vol = open_image(ImageOptions {
        incoming: false,
        nbd: Default::default(),
        export: None,
        rbd: Default::default(),
        path: path.to_path_buf(),
        create_size: size,
        payload_offset: offset,
        payload_size: None,
        readonly: false,
        direct,
        io,
        cipher: cipher(sector_size),
    })
    .unwrap();
    let expect = if direct { IoMode::Pread } else { io };
    assert_eq!(vol.io(), expect, "direct {direct}");
    vol
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 9) as u8)
        .collect()
}

/// Splits `data` at the given byte positions, as a guest's descriptors might.
fn split_mut<'a>(mut data: &'a mut [u8], cuts: &[usize]) -> Vec<SharedMut<'a>> {
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts {
        let (a, b) = data.split_at_mut(c - last);
        out.push(SharedMut::from_mut(a));
        data = b;
        last = c;
    }
    out.push(SharedMut::from_mut(data));
    out
}

#[test]
fn write_then_read_round_trips_with_odd_buffer_splits() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [(512, false), (4096, false), (512, true), (4096, true)];
    for ((sector_size, direct), io) in cases.into_iter().flat_map(|c| IO_MODES.map(|io| (c, io))) {
        // An offset that is not a page multiple: the mapping starts mid-page.
        let offset = if direct { 4096 } else { 1536 };
        let path = dir
            .path()
            .join(format!("img-{sector_size}-{direct}-{io:?}"));
        let vol = open_with(&path, Some(1 << 20), offset, sector_size, direct, io);
        let mut scratch = AlignedBuf::new(8192); // smaller than the request: chunking
        let data = pattern(5 * 4096, 3);
        let cuts = [100, 4096, 4097, 9000, 16384];
        let bufs: Vec<SharedRef> = {
            let mut v = Vec::new();
            let mut last = 0;
            for &c in cuts.iter().chain(std::iter::once(&data.len())) {
                v.push(SharedRef::from_ref(&data[last..c]));
                last = c;
            }
            v
        };
        vol.write_from(8192, &bufs, &mut scratch).unwrap();
        let mut back = vec![0u8; data.len()];
        vol.read_into(8192, &split_mut(&mut back, &[1, 511, 7000]), &mut scratch)
            .unwrap();
        assert_eq!(back, data, "sector {sector_size} direct {direct} {io:?}");

        // The file holds the ciphertext dm-crypt would produce: sector n of
        // the payload encrypted with IV n (512-byte units), after the offset.
        let raw = std::fs::read(&path).unwrap();
        let mut expect = data.clone();
        cipher(sector_size).encrypt(8192 / sector_size as u64, &mut expect);
        let at = offset as usize + 8192;
        assert_eq!(&raw[at..at + data.len()], &expect[..]);
        assert!(raw.windows(64).all(|w| w != &data[..64]));
        vol.flush().unwrap();
    }
}

#[test]
fn write_zeroes_reads_back_zeros_and_discard_punches() {
    for io in IO_MODES {
        write_zeroes_and_discard(io);
    }
}

fn write_zeroes_and_discard(io: IoMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let vol = open_with(&path, Some(1 << 20), 0, 512, false, io);
    let mut scratch = AlignedBuf::new(4096);
    vol.write_from(0, &[SharedRef::from_ref(&pattern(8192, 1))], &mut scratch)
        .unwrap();
    vol.write_zeroes(1024, 5000 / 512 * 512, &mut scratch)
        .unwrap();
    let mut back = vec![1u8; 8192];
    vol.read_into(0, &[SharedMut::from_mut(&mut back)], &mut scratch)
        .unwrap();
    assert!(back[1024..1024 + 4608].iter().all(|b| *b == 0));
    assert_eq!(back[..1024], pattern(8192, 1)[..1024]);
    let raw = std::fs::read(&path).unwrap();
    assert!(
        raw[1024..2048].iter().any(|b| *b != 0),
        "zeros must be stored encrypted"
    );
    vol.discard(0, 4096).unwrap();
    let mut back = vec![1u8; 4096];
    vol.read_into(0, &[SharedMut::from_mut(&mut back)], &mut scratch)
        .unwrap();
    assert_ne!(back, pattern(4096, 1), "discard left the data ({io:?})");
    vol.flush().unwrap();
}

#[test]
fn capacity_excludes_offset_and_partial_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![0u8; 3 * 4096 + 100]).unwrap();
    for io in IO_MODES {
        let vol = open_with(&path, None, 1024, 4096, false, io);
        assert_eq!(vol.capacity_bytes(), 2 * 4096);
        // The last payload byte is reachable, one more is refused.
        let mut scratch = AlignedBuf::new(4096);
        let mut buf = vec![0u8; 4096];
        vol.read_into(4096, &[SharedMut::from_mut(&mut buf)], &mut scratch)
            .unwrap();
    }
}

#[test]
fn refuses_missing_image_and_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let opts = |size| ImageOptions {
        incoming: false,
        nbd: Default::default(),
        export: None,
        rbd: Default::default(),
        path: path.clone(),
        create_size: size,
        payload_offset: 0,
        payload_size: None,
        readonly: false,
        direct: false,
        io: IoMode::Mmap,
        cipher: cipher(512),
    };
    assert!(matches!(
        open_image(opts(None)),
        Err(VolumeError::Missing { .. })
    ));
    open_image(opts(Some(65536))).unwrap();
    assert!(open_image(opts(Some(65536))).is_ok(), "same size reopens");
    assert!(matches!(
        open_image(opts(Some(131072))),
        Err(VolumeError::SizeMismatch { .. })
    ));
}

/// One-buffer write and read, for tests that do not care about splits.
fn write_at(vol: &Volume, pos: u64, data: &[u8]) -> std::io::Result<()> {
    vol.write_from(
        pos,
        &[SharedRef::from_ref(data)],
        &mut AlignedBuf::new(1 << 16),
    )
}

fn read_at(vol: &Volume, pos: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut back = vec![0u8; len];
    vol.read_into(
        pos,
        &[SharedMut::from_mut(&mut back)],
        &mut AlignedBuf::new(1 << 16),
    )?;
    Ok(back)
}

#[test]
fn both_paths_see_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    // One after the other: the image lock admits one writer at a time.
    let mapped = open_with(&path, Some(1 << 20), 512, 512, false, IoMode::Mmap);
    let a = pattern(65536, 5);
    write_at(&mapped, 4096, &a).unwrap();
    drop(mapped);
    let plain = open_with(&path, None, 512, 512, false, IoMode::Pread);
    assert_eq!(read_at(&plain, 4096, a.len()).unwrap(), a);
    let b = pattern(8192, 6);
    write_at(&plain, 0, &b).unwrap();
    drop(plain);
    let mapped = open_with(&path, None, 512, 512, false, IoMode::Mmap);
    assert_eq!(read_at(&mapped, 0, b.len()).unwrap(), b);
}

#[test]
fn a_readonly_mapping_refuses_writes_without_faulting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
    let vol = open_image(ImageOptions {
        incoming: false,
        nbd: Default::default(),
        export: None,
        rbd: Default::default(),
        path: path.clone(),
        create_size: None,
        payload_offset: 0,
        payload_size: None,
        readonly: true,
        direct: false,
        io: IoMode::Mmap,
        cipher: cipher(512),
    })
    .unwrap();
    assert_eq!(vol.io(), IoMode::Mmap);
    assert!(write_at(&vol, 0, &pattern(4096, 2)).is_err());
    assert!(read_at(&vol, 1 << 16, 512).is_err(), "past the end");
    assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 1 << 16]);
}

fn truncate(path: &Path, len: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(len).unwrap();
}

/// Someone truncates the image under the mapping: the next access raises
/// SIGBUS. The daemon must report an I/O error (and keep running on
/// pread/pwrite), not die.
#[test]
fn truncation_under_the_mapping_is_an_io_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let vol = open_with(&path, Some(1 << 20), 0, 512, false, IoMode::Mmap);
    let data = pattern(65536, 9);
    write_at(&vol, 0, &data).unwrap();
    write_at(&vol, 512 << 10, &data).unwrap();
    truncate(&path, 256 << 10);
    let err = read_at(&vol, 512 << 10, data.len());
    assert!(err.is_err(), "a read past the truncated end succeeded");
    assert_eq!(
        vol.io(),
        IoMode::Pread,
        "the volume must leave the broken mapping"
    );
    // What is still in the file reads back, through pread now.
    assert_eq!(read_at(&vol, 0, data.len()).unwrap(), data);
    vol.flush().unwrap();
}

#[test]
fn a_write_that_faults_is_redone_with_pwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let vol = open_with(&path, Some(1 << 20), 0, 4096, false, IoMode::Mmap);
    truncate(&path, 4096);
    let data = pattern(65536, 4);
    // The store into the mapping past the end faults; pwrite then extends
    // the file and the write lands where it should.
    write_at(&vol, 65536, &data).unwrap();
    assert_eq!(vol.io(), IoMode::Pread);
    assert_eq!(read_at(&vol, 65536, data.len()).unwrap(), data);
    let raw = std::fs::read(&path).unwrap();
    let mut expect = data.clone();
    cipher(4096).encrypt(16, &mut expect);
    assert_eq!(&raw[65536..], &expect[..]);
}

/// Another queue's SIGBUS that lands after this request found the mapping
/// healthy, but before its copy, must spoil the copy too: the faulting page
/// may now be anonymous memory, and a copy judged against a fault count
/// read after the fault would report success (a write that never reached
/// the file, or a read of bytes that exist only in memory).
#[test]
fn a_fault_between_the_health_check_and_the_copy_spoils_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let vol = open_with(&path, Some(1 << 20), 0, 512, false, IoMode::Mmap);
    let map = vol.healthy_map().expect("a fresh mapping is healthy");
    map.count_fault();
    let mut buf = vec![0u8; 4096];
    let spoiled_read = !vol
        .read_mapped(map, 0, &[SharedMut::from_mut(&mut buf)])
        .unwrap();
    let data = pattern(4096, 9);
    let spoiled_write = !vol
        .write_mapped(map, 0, &[SharedRef::from_ref(&data)])
        .unwrap();
    assert!(
        spoiled_read,
        "a read after another queue's fault counted as good"
    );
    assert!(
        spoiled_write,
        "a write after another queue's fault counted as good"
    );
    assert_eq!(vol.io(), IoMode::Pread);
}
