//! Opening (or creating) the backing image and working out its capacity.

use super::lock::Handover;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use super::mapping::Mapping;
use super::{Backing, IoMode, Volume, VolumeError};
use crate::crypto::SectorCipher;
use crate::store::libnbd::Tls;
use crate::store::librbd::ClusterOptions;
use crate::store::{is_nbd_uri, is_rbd_spec, NbdExport, RbdDisk, RbdSpec};

pub struct ImageOptions {
    pub path: PathBuf,
    /// Create a sparse image whose payload has this many bytes if the path
    /// does not exist yet; an existing image must already have that size.
    pub create_size: Option<u64>,
    /// Where the payload starts, in bytes (cryptsetup's --offset × 512).
    pub payload_offset: u64,
    /// A fixed payload length (a LUKS2 segment with a size); None means
    /// "to the end of the image".
    pub payload_size: Option<u64>,
    pub readonly: bool,
    /// A migration destination: take no lock until the first request (the
    /// source still holds the image; see volume/lock.rs).
    pub incoming: bool,
    pub direct: bool,
    /// `Mmap` maps regular files; block devices and `direct` use pread.
    pub io: IoMode,
    pub cipher: SectorCipher,
    /// NBD images: TLS settings and how many queues want a connection.
    pub nbd: NbdOptions,
    /// An NBD export already connected (LUKS read its header through it).
    pub export: Option<std::sync::Arc<NbdExport>>,
    /// RBD images: how to reach the cluster.
    pub rbd: RbdOptions,
}

#[derive(Debug, Clone, Default)]
pub struct RbdOptions {
    /// `--ceph-conf`, `--ceph-id`, `--ceph-keyring` and the timeouts.
    pub cluster: ClusterOptions,
    /// How many queues will ask for a store.
    pub queues: usize,
}

#[derive(Debug, Clone, Default)]
pub struct NbdOptions {
    pub tls: Tls,
    pub queues: usize,
    /// How long requests wait for a lost connection to come back (zero:
    /// never reconnect).
    pub reconnect: std::time::Duration,
}

pub fn open_image(opts: ImageOptions) -> Result<Volume, VolumeError> {
    if is_nbd_uri(&opts.path) {
        return open_nbd(opts);
    }
    if is_rbd_spec(&opts.path) {
        return open_rbd(opts);
    }
    let path = opts.path.display().to_string();
    let open_err = |source| VolumeError::Open {
        path: path.clone(),
        source,
    };
    let sector_size = opts.cipher.sector_size();
    if opts.direct && !opts.payload_offset.is_multiple_of(sector_size as u64) {
        return Err(VolumeError::UnalignedDirectOffset { sector_size });
    }
    let wanted = opts.create_size.map(|s| s + opts.payload_offset);
    if !opts.path.exists() {
        let Some(wanted) = wanted else {
            return Err(VolumeError::Missing { path });
        };
        create_sparse(&opts.path, wanted).map_err(open_err)?;
    }
    let mut file = open_file(&opts, false).map_err(open_err)?;
    let block_device = file
        .metadata()
        .map_err(open_err)?
        .file_type()
        .is_block_device();
    let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    if let Some(wanted) = wanted.filter(|w| *w != size && !block_device) {
        return Err(VolumeError::SizeMismatch {
            path,
            actual: size,
            wanted,
        });
    }
    let capacity = capacity(&opts, &path, size)?;
    if opts.direct {
        file = open_file(&opts, true).map_err(open_err)?;
    }
    if !opts.incoming {
        super::lock::lock_image(&file, &path, opts.readonly)?;
    }
    let handover = Handover::new(path.clone(), opts.readonly, !opts.incoming);
    let map = if opts.io == IoMode::Mmap && !opts.direct && !block_device {
        let mapped = Mapping::new(&file, opts.payload_offset, capacity, opts.readonly);
        Some(mapped.map_err(|source| VolumeError::Map {
            path: path.clone(),
            source,
        })?)
    } else {
        None
    };
    Ok(Volume {
        backing: Backing::File(file),
        handover: Some(handover),
        payload_offset: opts.payload_offset,
        capacity: capacity.into(),
        fixed_size: opts.payload_size.is_some(),
        cipher: opts.cipher,
        readonly: opts.readonly,
        direct: opts.direct,
        block_device,
        map,
        map_failed: Default::default(),
        map_retired: Default::default(),
        resize_lock: Default::default(),
    })
}

fn open_file(opts: &ImageOptions, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!opts.readonly);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(&opts.path)
}

fn create_sparse(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(size)?;
    file.sync_all()
}

/// Payload bytes of an image of `size` bytes: from the payload offset to
/// the end (or the LUKS2 segment's size), in whole sectors.
fn capacity(opts: &ImageOptions, path: &str, size: u64) -> Result<u64, VolumeError> {
    let sector_size = opts.cipher.sector_size();
    let to_end = size.saturating_sub(opts.payload_offset);
    let payload = match opts.payload_size {
        Some(fixed) if fixed > to_end => {
            return Err(VolumeError::ShorterThanSegment {
                path: path.to_string(),
                size: to_end,
                segment: fixed,
            })
        }
        Some(fixed) => fixed,
        None => to_end,
    };
    let capacity = payload / sector_size as u64 * sector_size as u64;
    if capacity == 0 {
        return Err(VolumeError::TooSmall {
            path: path.to_string(),
            size,
            offset: opts.payload_offset,
            sector_size,
        });
    }
    Ok(capacity)
}

/// An NBD export: the capacity comes from the server, nothing is created,
/// and the export's own read-only flag makes the disk read-only.
fn open_nbd(opts: ImageOptions) -> Result<Volume, VolumeError> {
    let path = opts.path.display().to_string();
    let export = match opts.export.clone() {
        Some(e) => e,
        None => NbdExport::open(&path, &opts.nbd.tls, opts.nbd.queues, opts.nbd.reconnect)
            .map_err(|source| VolumeError::Open {
                path: path.clone(),
                source,
            })?,
    };
    let info = *export.info();
    let sector_size = opts.cipher.sector_size();
    let min = u64::from(info.min_block);
    if !(sector_size as u64).is_multiple_of(min) || !opts.payload_offset.is_multiple_of(min) {
        return Err(VolumeError::NbdAlignment {
            path,
            min_block: info.min_block,
            sector_size,
            offset: opts.payload_offset,
        });
    }
    let capacity = capacity(&opts, &path, info.size)?;
    if info.read_only && !opts.readonly {
        log::info!("{path}: the export is read-only, so is the disk");
    }
    if !export.per_queue() {
        log::info!(
            "{path}: the server does not allow several connections (no NBD multi-conn): all \
             queues share one connection"
        );
    }
    Ok(Volume {
        handover: Some(Handover::new(path.clone(), opts.readonly, true)),
        backing: Backing::Nbd(export),
        payload_offset: opts.payload_offset,
        capacity: capacity.into(),
        fixed_size: true,
        cipher: opts.cipher,
        readonly: opts.readonly || info.read_only,
        direct: false,
        block_device: false,
        map: None,
        map_failed: Default::default(),
        map_retired: Default::default(),
        resize_lock: Default::default(),
    })
}

/// A Ceph RBD image: the capacity comes from the image (or snapshot),
/// nothing is created; snapshots and `readonly` give a read-only disk,
/// otherwise the image's exclusive lock is taken (see `RbdDisk::open`).
fn open_rbd(opts: ImageOptions) -> Result<Volume, VolumeError> {
    let path = opts.path.display().to_string();
    let spec = RbdSpec::parse(&path).map_err(|why| VolumeError::Open {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    })?;
    let disk = RbdDisk::open(
        &spec,
        &opts.rbd.cluster,
        opts.readonly,
        opts.rbd.queues,
        opts.incoming,
    )?;
    let size = disk.size().map_err(|source| VolumeError::Open {
        path: path.clone(),
        source,
    })?;
    let capacity = capacity(&opts, &path, size)?;
    if disk.read_only() && !opts.readonly {
        log::info!("{path}: a snapshot is read-only, so is the disk");
    }
    Ok(Volume {
        readonly: opts.readonly || disk.read_only(),
        handover: Some(Handover::new(path.clone(), opts.readonly, !opts.incoming)),
        backing: Backing::Rbd(disk),
        payload_offset: opts.payload_offset,
        capacity: capacity.into(),
        fixed_size: true,
        cipher: opts.cipher,
        direct: false,
        block_device: false,
        map: None,
        map_failed: Default::default(),
        map_retired: Default::default(),
        resize_lock: Default::default(),
    })
}
