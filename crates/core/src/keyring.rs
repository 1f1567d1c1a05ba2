//! Keys from the kernel keyring (`--key-keyring`), in cryptsetup's
//! `%type:description` notation: `%user:NAME`, or a bare `NAME` for a user
//! key. Read once at start-up, before the sandbox, straight into the
//! caller's buffer (the mlock'ed key page, or a zeroizing passphrase
//! buffer): the kernel copies the payload there and nowhere else.
//!
//! `%logon:NAME` is understood but cannot work: the kernel never lets user
//! space read a logon key (its key type has no read operation; KEYCTL_READ
//! answers EOPNOTSUPP). cryptsetup uses logon keys by handing their
//! description to dm-crypt, which fetches them inside the kernel; a
//! user-space daemon doing its own AES has no such path. The error says so.
//!
//! Where a key is looked for: request_key(2) searches the thread, process
//! and session keyrings (the user-session keyring when there is no session
//! keyring). A systemd service gets a private session keyring that does not
//! link the user keyring `@u` (KeyringMode=private, the default), so when
//! that search fails cryptblk links `@u` into its own process keyring for
//! the moment of the read and searches again. Searching `@u` directly
//! would find the key but not possess it, and `keyctl padd` gives the
//! user itself only the right to view a key, not to read it.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::str::FromStr;

use zeroize::Zeroizing;

/// linux/keyctl.h (stable kernel ABI).
const KEYCTL_LINK: libc::c_long = 8;
const KEYCTL_UNLINK: libc::c_long = 9;
const KEYCTL_READ: libc::c_long = 11;
const KEY_SPEC_THREAD_KEYRING: i32 = -1;
const KEY_SPEC_PROCESS_KEYRING: i32 = -2;
const KEY_SPEC_SESSION_KEYRING: i32 = -3;
const KEY_SPEC_USER_KEYRING: i32 = -4;
const KEY_SPEC_USER_SESSION_KEYRING: i32 = -5;

/// The largest payload a user or logon key can have.
const MAX_PAYLOAD: usize = 32767;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(
        "--key-keyring {spec:?}: {why}; write %user:DESCRIPTION (or just DESCRIPTION for a user key)"
    )]
    BadSpec { spec: String, why: &'static str },
    #[error(
        "no key {spec} in the thread, process or session keyrings, nor in the user keyring @u, \
         of uid {uid}; add it as that user before starting cryptblk, e.g. `keyctl padd {kind} \
         {description} @u < keyfile`"
    )]
    NotFound {
        spec: KeySpec,
        kind: &'static str,
        description: String,
        uid: u32,
    },
    #[error(
        "key {spec} is a logon key, and the kernel never lets user space read one (KEYCTL_READ: \
         EOPNOTSUPP): cryptsetup hands logon keys to dm-crypt by description, inside the kernel, \
         which a user-space daemon cannot do. Add the key as a user key instead: \
         `keyctl padd user {description} @u < keyfile` and --key-keyring %user:{description}"
    )]
    Logon { spec: KeySpec, description: String },
    #[error("key {spec}: {source}{hint}")]
    Unusable {
        spec: KeySpec,
        source: io::Error,
        hint: &'static str,
    },
}

/// The key types `--key-keyring` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    User,
    Logon,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::User => "user",
            KeyType::Logon => "logon",
        }
    }
}

/// `%type:description`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub kind: KeyType,
    pub description: String,
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}:{}", self.kind.name(), self.description)
    }
}

impl FromStr for KeySpec {
    type Err = KeyringError;

    /// `%user:NAME`, `%logon:NAME`, or `NAME` (a user key). The
    /// description itself may hold colons (`%user:cryptblk:vm1`).
    fn from_str(s: &str) -> Result<Self, KeyringError> {
        let bad = |why| KeyringError::BadSpec {
            spec: s.to_string(),
            why,
        };
        let (kind, description) = match s.strip_prefix('%') {
            None => (KeyType::User, s),
            Some(rest) => {
                let (kind, description) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("a %type needs a ':' before the description"))?;
                let kind = match kind {
                    "user" => KeyType::User,
                    "logon" => KeyType::Logon,
                    _ => return Err(bad("only user (and logon, to be told why not) keys")),
                };
                (kind, description)
            }
        };
        if description.is_empty() {
            return Err(bad("the description is empty"));
        }
        if description.contains('\0') {
            return Err(bad("the description holds a NUL byte"));
        }
        Ok(KeySpec {
            kind,
            description: description.to_string(),
        })
    }
}

/// A key found in a keyring, possessed by this process until dropped.
#[derive(Debug)]
pub struct Found {
    serial: i32,
    /// The user keyring was linked into the process keyring to find it;
    /// the link goes when this is dropped.
    through_user_keyring: bool,
}

impl Drop for Found {
    fn drop(&mut self) {
        if self.through_user_keyring {
            let _ = keyctl2(
                KEYCTL_UNLINK,
                KEY_SPEC_USER_KEYRING,
                KEY_SPEC_PROCESS_KEYRING,
            );
        }
    }
}

/// keyctl(2) with two integer arguments.
fn keyctl2(op: libc::c_long, a: i32, b: i32) -> io::Result<libc::c_long> {
    // SAFETY: keyctl with integer arguments only (key serials or special
    // keyring ids); no memory is passed.
    check(unsafe { libc::syscall(libc::SYS_keyctl, op, a as libc::c_long, b as libc::c_long) })
}

impl KeySpec {
    fn c_strings(&self) -> (CString, CString) {
        // Neither holds a NUL: the type is a constant, the description was
        // checked when parsed.
        let kind = CString::new(self.kind.name()).expect("no NUL");
        let description = CString::new(self.description.as_str()).expect("no NUL");
        (kind, description)
    }

    /// Looks the key up: request_key(2)'s search (thread, process,
    /// session keyrings), then again with the user keyring linked into the
    /// process keyring (see the module's documentation).
    pub fn find(&self) -> Result<Found, KeyringError> {
        let first = match self.request_key() {
            Ok(serial) => {
                return Ok(Found {
                    serial,
                    through_user_keyring: false,
                })
            }
            Err(e) => e,
        };
        if first.raw_os_error() != Some(libc::ENOKEY) {
            return Err(self.unusable(first));
        }
        // Creates the process keyring if needed; it dies with the process.
        if keyctl2(KEYCTL_LINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_PROCESS_KEYRING).is_err() {
            return Err(self.not_found());
        }
        // Holds the link while the key is searched, read and unlinked.
        let mut found = Found {
            serial: 0,
            through_user_keyring: true,
        };
        match self.request_key() {
            Ok(serial) => {
                found.serial = serial;
                Ok(found)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOKEY) => Err(self.not_found()),
            Err(e) => Err(self.unusable(e)),
        }
    }

    /// request_key(2) without a callout: a search only, nothing is
    /// constructed or linked.
    fn request_key(&self) -> io::Result<i32> {
        let (kind, description) = self.c_strings();
        // SAFETY: two valid C strings, NULL callout info, no destination.
        let found = unsafe {
            libc::syscall(
                libc::SYS_request_key,
                kind.as_ptr(),
                description.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0 as libc::c_int,
            )
        };
        check(found).map(|id| id as i32)
    }

    /// Copies the key's payload into `buf` and returns the payload's full
    /// length, which may be more than `buf` holds (then only `buf.len()`
    /// bytes were copied).
    pub fn read_into(&self, key: &Found, buf: &mut [u8]) -> Result<usize, KeyringError> {
        // SAFETY: KEYCTL_READ writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_READ,
                key.serial as libc::c_long,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        match check(n) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Err(KeyringError::Logon {
                spec: self.clone(),
                description: self.description.clone(),
            }),
            Err(e) => Err(self.unusable(e)),
        }
    }

    /// The whole payload, in zeroizing memory (for a LUKS passphrase).
    pub fn read(&self, key: &Found) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
        let mut buf = Zeroizing::new(vec![0u8; MAX_PAYLOAD]);
        let n = self.read_into(key, &mut buf)?;
        if n > buf.len() {
            // Not a user or logon key after all; never expected.
            return Err(self.unusable(io::Error::other("the payload is larger than 32 KiB")));
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// `--key-keyring-unlink`: unlinks the key from each of this process's
    /// standard keyrings that links it (thread, process, session,
    /// user-session and user keyrings). Once nothing links it, the kernel
    /// destroys it. Returns how many links were removed; a key still found
    /// afterwards (linked from a keyring nested in one of those) is
    /// reported as a warning.
    pub fn unlink(&self, key: &Found) -> usize {
        let rings = [
            KEY_SPEC_THREAD_KEYRING,
            KEY_SPEC_PROCESS_KEYRING,
            KEY_SPEC_SESSION_KEYRING,
            KEY_SPEC_USER_SESSION_KEYRING,
            KEY_SPEC_USER_KEYRING,
        ];
        // A keyring that does not exist or does not link the key only fails.
        let removed = rings
            .iter()
            .filter(|&&ring| keyctl2(KEYCTL_UNLINK, key.serial, ring).is_ok())
            .count();
        match self.request_key() {
            Ok(still) => log::warn!(
                "--key-keyring-unlink: key {self} is still reachable (serial {still}) from a \
                 keyring linked inside this process's keyrings; unlink it there: keyctl unlink \
                 {still}"
            ),
            Err(_) => log::info!("key {self} unlinked from the keyring ({removed} links)"),
        }
        removed
    }

    fn not_found(&self) -> KeyringError {
        KeyringError::NotFound {
            spec: self.clone(),
            kind: self.kind.name(),
            description: self.description.clone(),
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
        }
    }

    fn unusable(&self, source: io::Error) -> KeyringError {
        let hint = match source.raw_os_error() {
            Some(libc::EACCES) => {
                "; the key does not grant this user search and read (keyctl setperm)"
            }
            Some(libc::EKEYEXPIRED) => "; the key has expired: add it again",
            Some(libc::EKEYREVOKED) => "; the key was revoked: add it again",
            Some(libc::ENOSYS) => "; this kernel has no keyring support (CONFIG_KEYS)",
            _ => "",
        };
        KeyringError::Unusable {
            spec: self.clone(),
            source,
            hint,
        }
    }
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_cryptsetups_notation() {
        let spec = |s: &str| s.parse::<KeySpec>();
        let user = spec("%user:cryptblk:vm1").unwrap();
        assert_eq!(user.kind, KeyType::User);
        assert_eq!(user.description, "cryptblk:vm1");
        assert_eq!(user.to_string(), "%user:cryptblk:vm1");
        assert_eq!(spec("vm1").unwrap().to_string(), "%user:vm1");
        assert_eq!(spec("%logon:cryptsetup:x").unwrap().kind, KeyType::Logon);
        for bad in ["", "%user:", "%user", "%big_key:x", "%:x", "a\0b"] {
            assert!(spec(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_missing_key_is_named_with_what_to_do() {
        let spec: KeySpec = "%user:cryptblk-unit-test-no-such-key".parse().unwrap();
        let err = spec.find().unwrap_err().to_string();
        assert!(
            err.contains("no key %user:cryptblk-unit-test-no-such-key")
                && err.contains("keyctl padd user cryptblk-unit-test-no-such-key @u"),
            "{err}"
        );
    }
}
