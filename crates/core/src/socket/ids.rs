//! User and group ids given by number or by name (`--socket-group kvm`,
//! `--allow-uid 107,qemu`). Names are looked up once, at start-up: the
//! sandbox later forbids opening /etc/passwd, and a rename while serving
//! should not change who may connect.

use std::ffi::{CStr, CString};
use std::io;
use std::str::FromStr;

use serde::Deserialize;

/// A uid or gid as the operator wrote it. In TOML either `107` or `"qemu"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdSpec {
    Number(u32),
    Name(String),
}

impl FromStr for IdSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty user or group: give a name or a number".into());
        }
        Ok(match s.parse() {
            Ok(n) => IdSpec::Number(n),
            Err(_) => IdSpec::Name(s.into()),
        })
    }
}

impl std::fmt::Display for IdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdSpec::Number(n) => write!(f, "{n}"),
            IdSpec::Name(s) => f.write_str(s),
        }
    }
}

/// Which database a name is looked up in.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    User,
    Group,
}

impl IdSpec {
    /// The id, looking a name up in the user or group database. `Ok(None)`:
    /// no such name. A number is taken as is, as chown(1) does: an id
    /// need not have a name.
    pub fn resolve(&self, kind: Kind) -> io::Result<Option<u32>> {
        let name = match self {
            IdSpec::Number(n) => return Ok(Some(*n)),
            // A TOML string of digits ("107") is a number too.
            IdSpec::Name(s) => match s.parse() {
                Ok(n) => return Ok(Some(n)),
                Err(_) => s,
            },
        };
        let Ok(name) = CString::new(name.as_str()) else {
            return Ok(None);
        };
        match kind {
            Kind::User => lookup_user(&name),
            Kind::Group => lookup_group(&name),
        }
    }
}

/// Start size of the getpwnam_r/getgrnam_r string buffer; it doubles on
/// ERANGE (a group with many members needs more).
const FIRST_BUFFER: usize = 1024;
const LARGEST_BUFFER: usize = 1 << 20;

fn lookup_user(name: &CStr) -> io::Result<Option<u32>> {
    // SAFETY: passwd is plain data, filled by getpwnam_r.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    with_buffer(|buf, found: &mut *mut libc::passwd| {
        // SAFETY: every pointer is valid for the call; buf.len() is its size.
        unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                found,
            )
        }
    })
    .map(|found| found.then_some(entry.pw_uid))
}

fn lookup_group(name: &CStr) -> io::Result<Option<u32>> {
    // SAFETY: group is plain data, filled by getgrnam_r.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    with_buffer(|buf, found: &mut *mut libc::group| {
        // SAFETY: every pointer is valid for the call; buf.len() is its size.
        unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                found,
            )
        }
    })
    .map(|found| found.then_some(entry.gr_gid))
}

/// Runs a `get*nam_r` call with a growing buffer; true if it found the name.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char], &mut *mut T) -> libc::c_int,
) -> io::Result<bool> {
    let mut buf = vec![0 as libc::c_char; FIRST_BUFFER];
    loop {
        let mut found: *mut T = std::ptr::null_mut();
        match call(&mut buf, &mut found) {
            0 => return Ok(!found.is_null()),
            libc::ERANGE if buf.len() < LARGEST_BUFFER => buf.resize(buf.len() * 2, 0),
            // "Not found" as glibc reports it with some NSS modules.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(false),
            err => return Err(io::Error::from_raw_os_error(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_resolve() {
        let spec = |s: &str| s.parse::<IdSpec>().unwrap();
        assert_eq!(spec("107"), IdSpec::Number(107));
        assert_eq!(spec("107").resolve(Kind::User).unwrap(), Some(107));
        assert_eq!(spec("root").resolve(Kind::User).unwrap(), Some(0));
        assert_eq!(spec("root").resolve(Kind::Group).unwrap(), Some(0));
        let digits = IdSpec::Name("36".into());
        assert_eq!(digits.resolve(Kind::Group).unwrap(), Some(36));
        let missing = spec("no-such-group-cryptblk");
        assert_eq!(missing.resolve(Kind::Group).unwrap(), None);
        assert!("".parse::<IdSpec>().is_err());
    }
}
