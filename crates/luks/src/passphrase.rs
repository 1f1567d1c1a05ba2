//! Passphrases the way cryptsetup reads them: a key file taken as raw bytes
//! (with --keyfile-offset/--keyfile-size), "-" for standard input, or a
//! prompt without echo when there is no key file and stdin is a terminal.

use std::io::{self, Read, Seek, SeekFrom, Write};

use zeroize::Zeroizing;

use super::LuksError;
use cryptblk_crypto::secrets::{read_secret, RawStdin};

/// cryptsetup's default --keyfile-size limit (8 MiB).
pub const MAX_KEYFILE: u64 = 8 << 20;

/// cryptsetup semantics: whole file, or --keyfile-offset / --keyfile-size;
/// "-" = stdin; None + TTY = prompt (no echo); None + pipe = first line.
pub fn read_passphrase(
    key_file: Option<&str>,
    keyfile_offset: u64,
    keyfile_size: Option<u64>,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let pass = match key_file {
        Some("-") => {
            // Unbuffered: std's stdin buffer would keep a copy, never wiped.
            let mut stdin = RawStdin;
            skip(&mut stdin, keyfile_offset)
                .map_err(LuksError::io("reading the key from standard input"))?;
            read_limited(stdin, keyfile_size, "standard input")?
        }
        Some(path) => {
            let what = format!("cannot read the key file {path}");
            let mut f = std::fs::File::open(path).map_err(LuksError::io(what.clone()))?;
            f.seek(SeekFrom::Start(keyfile_offset))
                .map_err(LuksError::io(what))?;
            read_limited(f, keyfile_size, path)?
        }
        None if keyfile_offset != 0 || keyfile_size.is_some() => {
            return Err(LuksError::Invalid(
                "--keyfile-offset/--keyfile-size need --key-file".into(),
            ))
        }
        None => read_interactive("Enter passphrase: ")?,
    };
    if let Some(n) = keyfile_size {
        if (pass.len() as u64) < n {
            return Err(LuksError::Invalid(format!(
                "the key file holds {} bytes after --keyfile-offset, fewer than --keyfile-size {n}",
                pass.len()
            )));
        }
    }
    if pass.is_empty() {
        return Err(LuksError::Invalid(
            "the passphrase is empty; check the key file".into(),
        ));
    }
    Ok(pass)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "shorter than --keyfile-offset",
        ));
    }
    Ok(())
}

/// Reads --keyfile-size bytes, or the whole key file up to 8 MiB (a larger
/// one is refused, as cryptsetup does).
fn read_limited(
    r: impl Read,
    size: Option<u64>,
    name: &str,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let limit = size.unwrap_or(MAX_KEYFILE);
    let mut buf = read_secret(r, limit + 1)
        .map_err(LuksError::io(format!("cannot read the key from {name}")))?;
    if buf.len() as u64 > limit {
        if size.is_none() {
            return Err(LuksError::Invalid(format!(
                "the key file {name} is larger than 8 MiB; pass --keyfile-size"
            )));
        }
        buf.truncate(limit as usize);
    }
    Ok(buf)
}

/// Prompts on stderr; echo is off while stdin is a terminal. Without a
/// terminal, reads the first line of stdin (cryptsetup does the same).
pub fn read_interactive(prompt: &str) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let _echo = if tty {
        eprint!("{prompt}");
        let _ = io::stderr().flush();
        EchoOff::new()
    } else {
        None
    };
    // Byte by byte, unbuffered (as cryptsetup does): nothing after the
    // newline is consumed and no copy stays in std's stdin buffer.
    let mut line = Zeroizing::new(Vec::with_capacity(512));
    let mut byte = [0u8; 1];
    while (line.len() as u64) < MAX_KEYFILE {
        match RawStdin.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() == line.capacity() {
                    let mut bigger = Zeroizing::new(Vec::with_capacity(line.capacity() * 2));
                    bigger.extend_from_slice(&line);
                    line = bigger;
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LuksError::io("cannot read the passphrase")(e)),
        }
    }
    byte.fill(0);
    if tty {
        eprintln!();
    }
    Ok(line)
}

/// Turns terminal echo off until dropped.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios for tcgetattr to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        // SAFETY: t is a valid termios obtained above.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        Some(EchoOff(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in new().
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}
