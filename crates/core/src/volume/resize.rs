//! Growing a volume online (the control socket's `resize`).
//!
//! Only growth: shrinking a disk under a running guest loses whatever its
//! filesystem kept at the end. A file image is extended (a sparse tail: the
//! guest's reads of it decrypt to garbage, as on any fresh dm-crypt space);
//! a block device is re-measured after the operator grew it. The payload
//! runs to the end of the image for plain dm-crypt, LUKS1 and LUKS2 with a
//! dynamic segment, so nothing in a header changes (as `cryptsetup resize`);
//! a LUKS2 segment of fixed size would need its header rewritten.

use std::io::{self, Seek, SeekFrom};
use std::sync::atomic::Ordering;

use super::{Backing, Volume};

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("the disk is read-only")]
    Readonly,
    #[error("an NBD export's size is the server's: grow the export there, then restart cryptblk")]
    Nbd,
    #[error("growing an RBD image through cryptblk is not supported: `rbd resize` it, then restart cryptblk")]
    Rbd,
    #[error("the LUKS2 data segment has a fixed size in the header; cryptblk does not rewrite headers: stop the daemon and use cryptsetup resize")]
    FixedSegment,
    #[error("shrinking from {current} to {wanted} bytes would cut off the end of the guest's disk; only growing is supported")]
    Shrink { current: u64, wanted: u64 },
    #[error("{wanted} bytes is not a whole number of {sector_size}-byte sectors")]
    Unaligned { wanted: u64, sector_size: u64 },
    #[error("give the new size in bytes: a file image grows to what you ask")]
    SizeRequired,
    #[error("the block device holds {available} payload bytes, fewer than the {wanted} asked for; grow the device first")]
    DeviceTooSmall { available: u64, wanted: u64 },
    #[error("cannot grow the image: {0}")]
    Io(#[from] io::Error),
}

impl Volume {
    /// Grows the payload to `wanted` bytes (for a block device, by default
    /// to what the device now holds); returns the new capacity. The caller
    /// publishes it to the guest only after this returns, so no request
    /// can reach past the image before it has grown.
    pub fn grow(&self, wanted: Option<u64>) -> Result<u64, ResizeError> {
        let _one_at_a_time = self.resize_lock.lock().unwrap_or_else(|p| p.into_inner());
        let file = match &self.backing {
            Backing::File(file) => file,
            Backing::Nbd(_) => return Err(ResizeError::Nbd),
            Backing::Rbd(_) => return Err(ResizeError::Rbd),
        };
        if self.readonly {
            return Err(ResizeError::Readonly);
        }
        if self.fixed_size {
            return Err(ResizeError::FixedSegment);
        }
        let sector_size = self.sector_size() as u64;
        let new = if self.block_device {
            let end = (&*file).seek(SeekFrom::End(0))?;
            let available = end.saturating_sub(self.payload_offset) / sector_size * sector_size;
            match wanted {
                None => available,
                Some(w) if w > available => {
                    return Err(ResizeError::DeviceTooSmall {
                        available,
                        wanted: w,
                    })
                }
                Some(w) => w,
            }
        } else {
            wanted.ok_or(ResizeError::SizeRequired)?
        };
        if !new.is_multiple_of(sector_size) {
            return Err(ResizeError::Unaligned {
                wanted: new,
                sector_size,
            });
        }
        let current = self.capacity_bytes();
        if new < current {
            return Err(ResizeError::Shrink {
                current,
                wanted: new,
            });
        }
        if new == current {
            return Ok(current);
        }
        if !self.block_device {
            file.set_len(self.payload_offset + new)?;
            // The new size is metadata a crash must not lose.
            file.sync_data()?;
        }
        if self.map.is_some() && !self.map_retired.swap(true, Ordering::AcqRel) {
            log::info!(
                "the image mapping covers the old size: this volume serves through pread \
                 from now on (a restart maps it again, whole)"
            );
        }
        self.capacity.store(new, Ordering::Release);
        log::info!("volume grown from {current} to {new} bytes");
        Ok(new)
    }
}
