//! File seals on memory the frontend shares with the daemon (the inflight
//! region, guest memory). A file the frontend can shrink under the
//! daemon's mapping turns the daemon's next access into a SIGBUS outside
//! the image mapping, which ends the process and every later connection.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure `file` cannot shrink: it already has the seal, or gets it
/// now. Fails for files that cannot be sealed (not a memfd, a memfd made
/// without MFD_ALLOW_SEALING, or one sealed against new seals).
pub fn seal_against_shrinking(file: &File) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, no pointer argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    add_seals(file, libc::F_SEAL_SHRINK)
}
