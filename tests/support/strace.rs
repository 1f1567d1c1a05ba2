//! Watching the real daemon's system calls from outside: run it under
//! `strace -f -y` (every thread, descriptors shown with their paths) and
//! read back the calls it made.
//!
//! strace prints a call when it returns, while the calling thread is still
//! stopped, and writes each line out before letting the thread go on; so
//! once the daemon has answered a request, every call it made before the
//! answer is already in the log.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// One finished system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The thread that made it.
    pub tid: u32,
    pub name: String,
    /// The arguments as strace prints them (with `-y`: `3</path/to/file>`).
    pub args: String,
    /// What it returned, as printed (`0`, `-1 EIO (...)`, `5</path>`).
    pub ret: String,
}

impl Call {
    pub fn ok(&self) -> bool {
        !self.ret.starts_with('-') && !self.ret.starts_with('?')
    }
}

/// A strace run's log file.
pub struct Strace {
    pub log: PathBuf,
}

impl Strace {
    /// The command prefix that traces `syscalls` into `log`.
    pub fn new(log: &Path) -> Strace {
        Strace {
            log: log.to_path_buf(),
        }
    }

    pub fn wrapper(&self, syscalls: &[&str]) -> Vec<OsString> {
        let mut w: Vec<OsString> = ["strace", "-f", "-y", "-qq", "-e", "signal=none", "-e"]
            .iter()
            .map(OsString::from)
            .collect();
        w.push(format!("trace={}", syscalls.join(",")).into());
        w.push("-o".into());
        w.push(self.log.clone().into());
        w
    }

    /// Every call logged so far, in log order (an interrupted call, which
    /// strace prints in two parts, is counted where it returned; one still
    /// running is left out).
    pub fn calls(&self) -> Vec<Call> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        parse(&text)
    }
}

/// Parses `strace -f` output (`TID name(args) = ret`, with
/// `<unfinished ...>` / `<... name resumed>` pairs).
pub fn parse(text: &str) -> Vec<Call> {
    let mut pending: HashMap<u32, String> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(tid) = tid.trim().parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        let whole = if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(tid, start.to_string());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = tail.split_once(" resumed>") else {
                continue;
            };
            let Some(start) = pending.remove(&tid) else {
                continue;
            };
            format!("{start}{tail}")
        } else {
            rest.to_string()
        };
        let Some(open) = whole.find('(') else {
            continue;
        };
        let Some(eq) = whole.rfind(") = ") else {
            continue;
        };
        if eq < open {
            continue;
        }
        calls.push(Call {
            tid,
            name: whole[..open].to_string(),
            args: whole[open + 1..eq].to_string(),
            ret: whole[eq + 4..].trim().to_string(),
        });
    }
    calls
}

/// The address ranges where `pid` maps `file` (from /proc/PID/maps).
pub fn mappings_of(pid: u32, file: &Path) -> Vec<(u64, u64)> {
    let file = std::fs::canonicalize(file).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|l| l.ends_with(file.to_str().unwrap()))
        .filter_map(|l| {
            let (start, end) = l.split(' ').next()?.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

/// Whether `call` is a successful sync of `image`: fsync or fdatasync on a
/// descriptor for it, or msync of a range inside one of `mapped` (its
/// mappings in the daemon).
pub fn syncs(call: &Call, image: &Path, mapped: &[(u64, u64)]) -> bool {
    if !call.ok() {
        return false;
    }
    let image = std::fs::canonicalize(image).unwrap();
    match call.name.as_str() {
        "fsync" | "fdatasync" => call.args.contains(&format!("<{}>", image.display())),
        "msync" => {
            let mut args = call.args.split(", ");
            let (Some(addr), Some(len)) = (args.next(), args.next()) else {
                return false;
            };
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap_or(0);
            let len: u64 = len.parse().unwrap_or(0);
            args.next().is_some_and(|f| f.contains("MS_SYNC"))
                && mapped
                    .iter()
                    .any(|&(start, end)| start <= addr && addr + len <= end && len > 0)
        }
        _ => false,
    }
}
