//! The whole request path: arbitrary guest memory and virtqueue, every
//! chain parsed and executed by `cryptblk::device::complete` against a real
//! encrypted image file. Afterwards the bytes before the payload and the
//! file's size must be unchanged, and no chain may report more bytes
//! written than it offered.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use cryptblk::device::{complete, AioMode, BlkDevice, CryptoMode, DeviceOptions, Workspace};
use cryptblk::volume::{open_image, ImageOptions, IoMode};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 4096;
const PAYLOAD: u64 = 64 << 10;

struct Disk {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<BlkDevice>,
}

static DISK: OnceLock<Disk> = OnceLock::new();

fn disk() -> &'static Disk {
    DISK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("image");
        std::fs::write(&path, vec![0x5a; HEADER + PAYLOAD as usize]).expect("image");
        let key = XtsKey::from_bytes(&[7u8; 64]).expect("key");
        let rule = IvRule {
            sector_size: 512,
            large_sectors: false,
            skip: 0,
        };
        let volume = open_image(ImageOptions {
            incoming: false,
            path: path.clone(),
            create_size: None,
            payload_offset: HEADER as u64,
            payload_size: None,
            readonly: false,
            direct: false,
            io: IoMode::Pread,
            cipher: SectorCipher::new(Some(&key), rule),
            nbd: Default::default(),
            export: None,
            rbd: Default::default(),
        })
        .expect("volume");
        let dev = BlkDevice::new(
            volume,
            DeviceOptions {
                queues: 1,
                queue_size: 64,
                readonly: false,
                allow_discards: true,
                serial: "fuzz".into(),
                crypto: CryptoMode::Inline,
                workers: 1,
                split_threshold: 1 << 17,
                aio: AioMode::Sync,
                inflight_tracking: true,
                dirty_logging: true,
            },
        );
        Disk {
            _dir: dir,
            path,
            dev,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let disk = disk();
    let Some(mut guest) = cryptblk_fuzz::Guest::new(data) else {
        return;
    };
    let limits = disk.dev.limits();
    let mut ws = Workspace::new(64);
    guest.run(&limits, |mem, parsed, segments| {
        let offered: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let has_status = parsed.status.is_some();
        ws.segments.clear();
        ws.segments.extend_from_slice(segments);
        let stats = disk.dev.stats().queue(0);
        let used = complete(&disk.dev, stats, None, mem, parsed, &mut ws);
        assert!(
            u64::from(used) <= offered + 1,
            "used {used} > offered {offered} + 1"
        );
        assert!(
            has_status || used == 0,
            "a status-less chain reported bytes"
        );
        used
    });
    let file = std::fs::File::open(&disk.path).expect("image");
    let len = file.metadata().expect("stat").len();
    assert_eq!(len, HEADER as u64 + PAYLOAD, "image size changed");
    let mut head = vec![0u8; HEADER];
    file.read_exact_at(&mut head, 0).expect("read header");
    assert!(
        head.iter().all(|&b| b == 0x5a),
        "bytes before the payload changed"
    );
});
