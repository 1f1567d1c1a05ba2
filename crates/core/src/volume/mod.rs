//! An encrypted image: the backing file, where its payload starts, its
//! capacity and its cipher. Everything above this layer sees plain sectors;
//! everything below it (the file) only ever receives ciphertext.

mod image;
mod lock;
mod mapping;
mod resize;
mod sectors;

pub use crate::store::AlignedBuf;
pub use image::{open_image, ImageOptions, NbdOptions, RbdOptions};
pub use resize::ResizeError;

use lock::Handover;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::crypto::SectorCipher;
use crate::crypto::{SharedMut, SharedRef};
use crate::store::{NbdExport, RbdDisk, RbdError};
use mapping::Mapping;
use sectors::{Gather, Scatter};

/// How the volume moves data between the image and guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// A shared mapping of the image: the cipher does the copy (one pass).
    /// Regular files without --direct only; others fall back to pread.
    Mmap,
    /// pread/pwrite, then decrypt in place / encrypt into a scratch buffer.
    Pread,
}

/// The largest chunk the write path encrypts before handing it to the file:
/// it bounds each thread's scratch buffer (and so the daemon's memory).
pub const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot open image {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("image {path} does not exist; pass --size to create it")]
    Missing { path: String },
    #[error("image {path} exists with {actual} bytes but --size asks for {wanted}; cryptblk never resizes or overwrites an image, drop --size or pick another path")]
    SizeMismatch {
        path: String,
        actual: u64,
        wanted: u64,
    },
    #[error("image {path} has {size} bytes, too small for --offset {offset} bytes plus one {sector_size}-byte sector")]
    TooSmall {
        path: String,
        size: u64,
        offset: u64,
        sector_size: usize,
    },
    #[error("cannot map image {path} into memory: {source}; use --io pread")]
    Map { path: String, source: io::Error },
    #[error("image {path} has {size} payload bytes, fewer than the {segment} its LUKS2 segment declares; is it truncated?")]
    ShorterThanSegment {
        path: String,
        size: u64,
        segment: u64,
    },
    #[error(
        "cannot make the image durable before handing it over to a migration destination: {source}"
    )]
    Sync { source: io::Error },
    #[error("cannot lock image {path}: {source}")]
    Lock { path: String, source: io::Error },
    #[error("image {path} is in use: {conflict}{}; two writers would corrupt it: stop the other user (another cryptblk, a VM, qemu-img) first, or open it --readonly everywhere", holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    InUse {
        path: String,
        conflict: String,
        holder: Option<String>,
    },
    #[error("--offset must be a multiple of the sector size ({sector_size} bytes) when --direct is used")]
    UnalignedDirectOffset { sector_size: usize },
    #[error("NBD export {path} wants requests aligned to {min_block} bytes, which the {sector_size}-byte sectors at payload offset {offset} are not; use --sector-size {min_block} (or larger) with an --offset that is a multiple of it, or ask the server for a smaller minimum block size")]
    NbdAlignment {
        path: String,
        min_block: u32,
        sector_size: usize,
        offset: u64,
    },
    #[error(transparent)]
    Rbd(#[from] RbdError),
}

impl VolumeError {
    /// Another user holds the image (its lock bytes, its RBD exclusive
    /// lock): worth waiting for during a migration hand-over.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            VolumeError::InUse { .. } | VolumeError::Rbd(RbdError::Locked { .. })
        )
    }
}

/// What holds the ciphertext.
enum Backing {
    /// A regular file or a block device.
    File(File),
    /// An NBD export: synchronous commands go over its first connection.
    Nbd(Arc<NbdExport>),
    /// A Ceph RBD image: synchronous calls on the daemon's one handle.
    Rbd(Arc<RbdDisk>),
}

impl Backing {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.read_exact_at(buf, offset),
            Backing::Nbd(e) => e.pread(buf, offset),
            Backing::Rbd(r) => r.read_exact_at(buf, offset),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.write_all_at(buf, offset),
            Backing::Nbd(e) => e.pwrite(buf, offset),
            Backing::Rbd(r) => r.write_all_at(buf, offset),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        match self {
            Backing::File(f) => f.sync_data(),
            // A server without FLUSH has no volatile cache: see `Link::push`.
            Backing::Nbd(e) if !e.info().can_flush => Ok(()),
            Backing::Nbd(e) => e.flush(),
            Backing::Rbd(r) => r.flush(),
        }
    }
}

/// A contiguous run of payload sectors plus the file behind it.
pub struct Volume {
    backing: Backing,
    /// The image's locks during a migration hand-over (None: nothing to
    /// lock, as on an NBD export).
    handover: Option<Handover>,
    payload_offset: u64,
    /// Grows (never shrinks) with `grow`; requests are checked against the
    /// device's copy, published after this one.
    capacity: AtomicU64,
    /// The payload's size is fixed (a LUKS2 segment with a size): it cannot
    /// grow without rewriting the header.
    fixed_size: bool,
    cipher: SectorCipher,
    readonly: bool,
    direct: bool,
    block_device: bool,
    /// The payload mapped MAP_SHARED (`--io mmap`); unused once a SIGBUS hit it.
    map: Option<Mapping>,
    map_failed: AtomicBool,
    /// The mapping covers the size before a `grow`: no longer used.
    map_retired: AtomicBool,
    /// One `grow` at a time.
    resize_lock: std::sync::Mutex<()>,
}

impl Volume {
    /// Takes the image's locks if this daemon does not hold them (a
    /// migration destination's first request, or a source whose migration
    /// failed): nothing may be read or written without them.
    pub fn ensure_active(&self) -> Result<(), VolumeError> {
        let Some(h) = self.handover.as_ref().filter(|h| !h.is_active()) else {
            return Ok(());
        };
        match &self.backing {
            Backing::File(f) => h.take(|| lock::lock_image_quietly(f, h.path(), h.readonly())),
            Backing::Rbd(r) => h.take(|| Ok(r.take_lock()?)),
            // An NBD export has no lock: the hand-over is the flush.
            Backing::Nbd(_) => h.take(|| Ok(())),
        }
    }

    /// A migration source stopped the device: make everything written so
    /// far durable (the destination may run on another host's view of
    /// shared storage), then let the destination take the image.
    pub fn hand_over(&self) -> Result<(), VolumeError> {
        let Some(h) = self.handover.as_ref().filter(|h| h.is_active()) else {
            return Ok(());
        };
        if !self.readonly {
            self.backing
                .sync_data()
                .map_err(|source| VolumeError::Sync { source })?;
        }
        match &self.backing {
            Backing::File(f) => h.release(|| lock::unlock_image(f)),
            Backing::Rbd(r) => h.release(|| r.release_lock()),
            Backing::Nbd(_) => h.release(|| Ok(())),
        }
    }

    /// Payload size in bytes, a whole number of sectors.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    pub fn sector_size(&self) -> usize {
        self.cipher.sector_size()
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }

    /// The I/O path in use now: `Mmap` only while the mapping is healthy.
    pub fn io(&self) -> IoMode {
        match self.healthy_map() {
            Some(_) => IoMode::Mmap,
            None => IoMode::Pread,
        }
    }

    fn healthy_map(&self) -> Option<&Mapping> {
        self.map
            .as_ref()
            .filter(|m| m.faults() == 0 && !self.map_retired.load(Ordering::Acquire))
    }

    /// A SIGBUS hit the mapping during a copy: the caller redoes the request
    /// with pread/pwrite, and so does every later request.
    fn mapping_failed(&self) {
        if !self.map_failed.swap(true, Ordering::Relaxed) {
            log::error!(
                "an access to the image mapping failed (disk error, full filesystem or \
                 truncated image); this request and all later ones use pread/pwrite"
            );
        }
    }

    /// Reads `bufs.len()` bytes of plaintext starting at byte `pos` of the
    /// payload. With the mapping, the cipher decrypts from the page cache
    /// into the caller's buffers (one pass); otherwise ciphertext is read
    /// into `scratch` and decrypted from there into the caller's buffers.
    /// Ciphertext never lands in the caller's buffers: a guest racing the
    /// daemon on its own read buffers must not see it (or swap in its own
    /// and get it decrypted: a decryption oracle under the volume key).
    pub fn read_into(
        &self,
        pos: u64,
        bufs: &[SharedMut<'_>],
        scratch: &mut AlignedBuf,
    ) -> io::Result<()> {
        if let Some(map) = self.healthy_map() {
            if self.read_mapped(map, pos, bufs)? {
                return Ok(());
            }
        }
        self.read_via(pos, bufs, scratch)
    }

    /// Decrypts from the mapping straight into the caller's buffers (the
    /// cipher is the copy). Ok(false): a SIGBUS spoiled it, redo with pread.
    fn read_mapped(&self, map: &Mapping, pos: u64, bufs: &[SharedMut<'_>]) -> io::Result<bool> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let src = map.bytes(pos, total)?;
        self.decrypt_into(self.first_sector(pos), src, &mut Scatter::new(bufs));
        Ok(self.copy_survived(map))
    }

    /// Decrypts the whole sectors of `src` (ciphertext of payload sectors
    /// from `first` on) into the buffers at the cursor: the cipher is the
    /// copy, and plaintext lands only in the caller's buffers.
    fn decrypt_into(&self, first: u64, src: &[u8], segs: &mut Scatter<'_, '_>) {
        segs.fill_sectors(src, self.sector_size(), |index, src, dst| {
            self.cipher.decrypt_to_shared(first + index, src, dst)
        });
    }

    /// Encrypts from the caller's buffers straight into the mapping: only
    /// ciphertext is ever stored there (`SectorCipher::encrypt_to`).
    fn write_mapped(&self, map: &Mapping, pos: u64, bufs: &[SharedRef<'_>]) -> io::Result<bool> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let dst = map.bytes_mut(pos, total)?;
        self.encrypt_to(pos, bufs, dst);
        Ok(self.copy_survived(map))
    }

    /// Whether a copy through the mapping met no SIGBUS. The copy started
    /// only on a healthy mapping (no fault ever), so any fault counted now,
    /// ours or another queue's during our copy, spoils it: comparing with
    /// a count read after the health check would miss a fault that landed
    /// between the two reads (its page may then be anonymous memory).
    fn copy_survived(&self, map: &Mapping) -> bool {
        let ok = map.faults() == 0;
        if !ok {
            self.mapping_failed();
        }
        ok
    }

    /// Reads ciphertext into the aligned scratch (O_DIRECT needs aligned
    /// memory) chunk by chunk and decrypts from there into the caller's
    /// buffers: the cipher is the copy, one pass.
    fn read_via(
        &self,
        pos: u64,
        bufs: &[SharedMut<'_>],
        scratch: &mut AlignedBuf,
    ) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut segs = Scatter::new(bufs);
        let mut done = 0;
        while done < total {
            let len = (total - done).min(scratch.capacity());
            let chunk = scratch.slice_mut(len);
            self.backing
                .read_exact_at(chunk, self.payload_offset + pos + done as u64)?;
            self.decrypt_into(self.first_sector(pos + done as u64), chunk, &mut segs);
            done += len;
        }
        Ok(())
    }

    /// Writes plaintext from `bufs` at byte `pos` of the payload. With the
    /// mapping, the cipher encrypts straight into it. With pwrite, each chunk
    /// is encrypted from the caller's buffers into `scratch` (reused, never
    /// the caller's memory), then written: plaintext never reaches the file.
    pub fn write_from(
        &self,
        pos: u64,
        bufs: &[SharedRef<'_>],
        scratch: &mut AlignedBuf,
    ) -> io::Result<()> {
        if let Some(map) = self.healthy_map() {
            if self.write_mapped(map, pos, bufs)? {
                return Ok(());
            }
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut reader = Gather::new(bufs, self.sector_size());
        let first = self.first_sector(pos);
        let mut done = 0;
        while done < total {
            let len = (total - done).min(scratch.capacity());
            let chunk = scratch.slice_mut(len);
            reader.encrypt_into(chunk, |index, src, dst| {
                self.cipher.encrypt_from_shared(first + index, src, dst)
            });
            self.backing
                .write_all_at(chunk, self.payload_offset + pos + done as u64)?;
            done += len;
        }
        Ok(())
    }

    /// Writes the ciphertext of zeros: a hole or literal zeros in the file
    /// would decrypt to garbage. Always pwrite (rare request): the page
    /// cache keeps it coherent with the mapping.
    pub fn write_zeroes(&self, pos: u64, len: u64, scratch: &mut AlignedBuf) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(scratch.capacity() as u64) as usize;
            let chunk = scratch.slice_mut(n);
            self.encrypt_zeroes(pos + done, chunk);
            self.backing
                .write_all_at(chunk, self.payload_offset + pos + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Deallocates a range (DISCARD). The range then reads back as garbage,
    /// which the virtio spec allows after a discard.
    pub fn discard(&self, pos: u64, len: u64) -> io::Result<()> {
        let start = self.payload_offset + pos;
        let file = match &self.backing {
            Backing::File(file) => file,
            Backing::Nbd(export) => return export.trim(start, len),
            Backing::Rbd(r) => return r.discard(start, len),
        };
        if self.block_device {
            let range = [start, len];
            // SAFETY: BLKDISCARD reads two u64s from the pointer, which
            // points to a live array of two u64s.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
            return if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
        }
        // SAFETY: plain syscall on an fd we own; no pointers involved.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The flush at disconnect and exit: none while the image is handed
    /// over to a migration destination, which synced it already and may be
    /// writing it now (an RBD image refuses a flush without its lock).
    pub fn flush_if_held(&self) -> io::Result<()> {
        match &self.handover {
            Some(h) if !h.is_active() => Ok(()),
            _ => self.flush(),
        }
    }

    /// FLUSH: everything completed so far reaches stable storage (see
    /// `Mapping::sync` for why msync on the mapped path).
    pub fn flush(&self) -> io::Result<()> {
        match self.healthy_map() {
            Some(map) => map.sync(),
            None => self.backing.sync_data(),
        }
    }

    /// The asynchronous path (`device::aio`) moves ciphertext itself,
    /// through a store: where byte `pos` of the payload is in the image.
    pub fn image_offset(&self, pos: u64) -> u64 {
        self.payload_offset + pos
    }

    /// The image's fd, for a store that submits I/O on it (None: the image
    /// is an NBD export or an RBD image).
    pub fn image_fd(&self) -> Option<RawFd> {
        match &self.backing {
            Backing::File(f) => Some(f.as_raw_fd()),
            Backing::Nbd(_) | Backing::Rbd(_) => None,
        }
    }

    /// The NBD export holding the image, if it is one.
    pub fn nbd(&self) -> Option<&Arc<NbdExport>> {
        match &self.backing {
            Backing::Nbd(e) => Some(e),
            Backing::File(_) | Backing::Rbd(_) => None,
        }
    }

    /// The RBD image holding the ciphertext, if it is one.
    pub fn rbd(&self) -> Option<&Arc<RbdDisk>> {
        match &self.backing {
            Backing::Rbd(r) => Some(r),
            Backing::File(_) | Backing::Nbd(_) => None,
        }
    }

    /// The largest single read or write the image takes (an NBD server's
    /// maximum block size, in whole sectors); None: no limit.
    pub fn max_io(&self) -> Option<u64> {
        let e = self.nbd()?;
        let sector = self.sector_size() as u64;
        Some((u64::from(e.info().max_block) / sector * sector).max(sector))
    }

    /// Whether DISCARD can reach the image (an NBD server must offer TRIM).
    pub fn can_discard(&self) -> bool {
        self.nbd().is_none_or(|e| e.info().can_trim)
    }

    /// Whether requests go through the page-cache mapping (synchronous:
    /// there the cipher is the copy and nothing waits for a disk).
    pub fn mapped(&self) -> bool {
        self.healthy_map().is_some()
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Decrypts `src`, the ciphertext of the payload from byte `pos`, into
    /// the caller's buffers (one pass).
    pub fn decrypt_to(&self, pos: u64, src: &[u8], bufs: &[SharedMut<'_>]) {
        self.decrypt_into(self.first_sector(pos), src, &mut Scatter::new(bufs));
    }

    /// Encrypts the caller's buffers, plaintext of the payload from byte
    /// `pos`, into `dst` (one pass; `dst` is as long as the buffers).
    pub fn encrypt_to(&self, pos: u64, bufs: &[SharedRef<'_>], dst: &mut [u8]) {
        let first = self.first_sector(pos);
        Gather::new(bufs, self.sector_size()).encrypt_into(dst, |index, src, dst| {
            self.cipher.encrypt_from_shared(first + index, src, dst)
        });
    }

    /// Fills `dst` with the ciphertext of zeros at byte `pos` (WRITE_ZEROES:
    /// a hole or literal zeros in the image would decrypt to garbage).
    pub fn encrypt_zeroes(&self, pos: u64, dst: &mut [u8]) {
        dst.fill(0);
        self.cipher.encrypt(self.first_sector(pos), dst);
    }

    fn first_sector(&self, pos: u64) -> u64 {
        pos / self.sector_size() as u64
    }
}

/// _IO(0x12, 119)
const BLKDISCARD: libc::c_ulong = 0x1277;

#[cfg(test)]
mod tests;
