//! Where a LUKS header is read and written: a file (or block device) by
//! default, or whatever the daemon's crate opens for paths that are not
//! files (an NBD URI). The smallest interface the header code needs:
//! positioned reads and writes, a durability barrier, and the length.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

pub trait Device {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Everything written so far reaches stable storage.
    fn sync_data(&self) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// Makes the device `len` bytes long (a file grows or shrinks); one of
    /// fixed size must already have at least that many.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

impl Device for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn size(&self) -> io::Result<u64> {
        self.metadata().map(|m| m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Opens paths that are not files (an NBD URI).
#[derive(Clone, Copy)]
pub struct Opener {
    /// Whether `path` is one of them (no I/O).
    pub claims: fn(&Path) -> bool,
    /// Opens it for reading, and writing if asked.
    pub open: fn(&Path, bool) -> io::Result<Box<dyn Device>>,
}

static OPENER: OnceLock<Opener> = OnceLock::new();

/// Installs the opener for paths that are not files (once per process).
pub fn set_opener(opener: Opener) {
    let _ = OPENER.set(opener);
}

/// Whether the installed opener claims `path` (it is not a file).
pub fn is_foreign(path: &Path) -> bool {
    OPENER.get().is_some_and(|o| (o.claims)(path))
}

/// `path` through the opener if it claims it, else as a file.
pub fn open(path: &Path, write: bool) -> io::Result<Box<dyn Device>> {
    if let Some(o) = OPENER.get().filter(|o| (o.claims)(path)) {
        return (o.open)(path, write);
    }
    let file = OpenOptions::new().read(true).write(write).open(path)?;
    Ok(Box::new(file))
}
