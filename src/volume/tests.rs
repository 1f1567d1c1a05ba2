use super::*;
use crate::crypto::{IvRule, SectorCipher, XtsKey};
use std::io::{IoSlice, IoSliceMut};
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

fn open(path: &Path, size: Option<u64>, offset: u64, sector_size: usize, direct: bool) -> Volume {
    open_image(ImageOptions {
        path: path.to_path_buf(),
        create_size: size,
        payload_offset: offset,
        readonly: false,
        direct,
        cipher: cipher(sector_size),
    })
    .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 9) as u8)
        .collect()
}

/// Splits `data` at the given byte positions, as a guest's descriptors might.
fn split_mut<'a>(mut data: &'a mut [u8], cuts: &[usize]) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts {
        let (a, b) = data.split_at_mut(c - last);
        out.push(IoSliceMut::new(a));
        data = b;
        last = c;
    }
    out.push(IoSliceMut::new(data));
    out
}

#[test]
fn write_then_read_round_trips_with_odd_buffer_splits() {
    let dir = tempfile::tempdir().unwrap();
    for (sector_size, direct) in [(512, false), (4096, false), (512, true), (4096, true)] {
        let path = dir.path().join(format!("img-{sector_size}-{direct}"));
        let vol = open(&path, Some(1 << 20), 4096, sector_size, direct);
        let mut scratch = AlignedBuf::new(8192); // smaller than the request: chunking
        let data = pattern(5 * 4096, 3);
        let cuts = [100, 4096, 4097, 9000, 16384];
        let bufs: Vec<IoSlice> = {
            let mut v = Vec::new();
            let mut last = 0;
            for &c in cuts.iter().chain(std::iter::once(&data.len())) {
                v.push(IoSlice::new(&data[last..c]));
                last = c;
            }
            v
        };
        vol.write_from(8192, &bufs, &mut scratch).unwrap();
        let mut back = vec![0u8; data.len()];
        vol.read_into(
            8192,
            &mut split_mut(&mut back, &[1, 511, 7000]),
            &mut scratch,
        )
        .unwrap();
        assert_eq!(back, data, "sector {sector_size} direct {direct}");

        // The file holds the ciphertext dm-crypt would produce: sector n of
        // the payload encrypted with IV n (512-byte units), after the offset.
        let raw = std::fs::read(&path).unwrap();
        let mut expect = data.clone();
        cipher(sector_size).encrypt(8192 / sector_size as u64, &mut expect);
        assert_eq!(&raw[4096 + 8192..4096 + 8192 + data.len()], &expect[..]);
        assert!(raw.windows(64).all(|w| w != &data[..64]));
    }
}

#[test]
fn write_zeroes_reads_back_zeros_and_discard_punches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let vol = open(&path, Some(1 << 20), 0, 512, false);
    let mut scratch = AlignedBuf::new(4096);
    vol.write_from(0, &[IoSlice::new(&pattern(8192, 1))], &mut scratch)
        .unwrap();
    vol.write_zeroes(1024, 5000 / 512 * 512, &mut scratch)
        .unwrap();
    let mut back = vec![1u8; 8192];
    vol.read_into(0, &mut [IoSliceMut::new(&mut back)], &mut scratch)
        .unwrap();
    assert!(back[1024..1024 + 4608].iter().all(|b| *b == 0));
    assert_eq!(back[..1024], pattern(8192, 1)[..1024]);
    let raw = std::fs::read(&path).unwrap();
    assert!(
        raw[1024..2048].iter().any(|b| *b != 0),
        "zeros must be stored encrypted"
    );
    vol.discard(0, 4096).unwrap();
    vol.flush().unwrap();
}

#[test]
fn capacity_excludes_offset_and_partial_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![0u8; 3 * 4096 + 100]).unwrap();
    let vol = open(&path, None, 1024, 4096, false);
    assert_eq!(vol.capacity_bytes(), 2 * 4096);
}

#[test]
fn refuses_missing_image_and_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let opts = |size| ImageOptions {
        path: path.clone(),
        create_size: size,
        payload_offset: 0,
        readonly: false,
        direct: false,
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
