//! Opening (or creating) the backing image and working out its capacity.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use super::mapping::Mapping;
use super::{IoMode, Volume, VolumeError};
use crate::crypto::SectorCipher;

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
    pub direct: bool,
    /// `Mmap` maps regular files; block devices and `direct` use pread.
    pub io: IoMode,
    pub cipher: SectorCipher,
}

pub fn open_image(opts: ImageOptions) -> Result<Volume, VolumeError> {
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
    let to_end = size.saturating_sub(opts.payload_offset);
    let payload = match opts.payload_size {
        Some(fixed) if fixed > to_end => {
            return Err(VolumeError::ShorterThanSegment {
                path,
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
            path,
            size,
            offset: opts.payload_offset,
            sector_size,
        });
    }
    if opts.direct {
        file = open_file(&opts, true).map_err(open_err)?;
    }
    super::lock::lock_image(&file, &path, opts.readonly)?;
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
        file,
        payload_offset: opts.payload_offset,
        capacity,
        cipher: opts.cipher,
        readonly: opts.readonly,
        direct: opts.direct,
        block_device,
        map,
        map_failed: Default::default(),
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
