//! Who may connect to the daemon's socket: its mode whatever the umask,
//! `--socket-group`/`--socket-mode`, the directory check, `--allow-uid`/
//! `--allow-gid` (with clients forked as another user), and SIGHUP.
//!
//! Run as root (as ./test.sh does): the clients switch to uid 65534.

mod support;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const NOBODY: u32 = 65534;
/// A gid no account here uses; root may chown to any number.
const SPARE_GID: u32 = 4242;

/// Serve a plaintext 4M image, one queue.
fn args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let img = dir.join("disk.img");
    let mut v: Vec<String> = ["--image", img.to_str().unwrap(), "--size", "4M"]
        .into_iter()
        .chain(["--cipher", "none", "--queues", "1"])
        .map(String::from)
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Starts the daemon with its log in DIR/daemon.log and the given umask.
fn start(dir: &Path, extra: &[&str], umask: u32) -> Daemon {
    let log = File::create(dir.join("daemon.log")).unwrap();
    let args = args(dir, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_command(dir, &args, log.into(), |cmd| with_umask(cmd, umask))
}

fn with_umask(cmd: &mut Command, umask: u32) {
    // SAFETY: umask(2) is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
}

fn log_of(dir: &Path) -> String {
    read_log(&dir.join("daemon.log"))
}

/// Waits up to 10 s for `needle` in the daemon's log.
fn wait_for_log(dir: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = log_of(dir);
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode_and_gid(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.permissions().mode() & 0o7777, m.gid())
}

/// The daemon serves: a write reads back.
fn assert_serves(socket: &Path) {
    let mut c = Client::connect(socket, 1);
    let data = pattern(1, 0, 4096);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), data);
}

/// What a client forked as another user met.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// connect(2) failed with this errno.
    ConnectFailed(i32),
    /// Connected, then closed by the daemon without an answer.
    Closed,
    /// Connected and answered (VHOST_USER_GET_FEATURES got its reply).
    Served,
    /// Anything else, by the child's exit code.
    Other(i32),
}

/// Forks a child that takes uid/gid/groups, connects to `socket` and sends
/// GET_FEATURES; returns its pid and what happened. Only raw system calls
/// run in the child (the test process has threads).
fn connect_as(socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> (i32, Outcome) {
    let (addr, len) = sockaddr(socket);
    // SAFETY: fork(2); the child only makes system calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: addr and groups were prepared before fork and stay valid.
        let code = unsafe { client(&addr, len, uid, gid, groups) };
        // SAFETY: _exit is what a forked child of a threaded process may call.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "client died: {status:#x}");
    let outcome = match libc::WEXITSTATUS(status) {
        0 => Outcome::Closed,
        1 => Outcome::Served,
        c if c >= 100 => Outcome::ConnectFailed(c - 100),
        c => Outcome::Other(c),
    };
    (pid, outcome)
}

/// The forked client: exit 0 closed, 1 served, 100 + errno connect failed,
/// 2..=9 other failures.
unsafe fn client(
    addr: &libc::sockaddr_un,
    len: libc::socklen_t,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> i32 {
    // SAFETY: raw calls on this forked child's own fds and credentials,
    // with valid pointers to locals; the caller forked (see its doc).
    unsafe {
        // Raw calls set this process's credentials only, with no libc
        // machinery for other threads (there are none after fork).
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            return 2;
        }
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return 3;
        }
        if libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len) != 0 {
            return 100 + *libc::__errno_location();
        }
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        // VHOST_USER_GET_FEATURES (1), flags: version 1, no payload.
        let get_features: [u8; 12] = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        // A refused connection may already be closed: EPIPE, not SIGPIPE.
        libc::send(fd, get_features.as_ptr().cast(), 12, libc::MSG_NOSIGNAL);
        let mut reply = [0u8; 64];
        let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
        match n {
            0 => 0,
            n if n > 0 => 1,
            _ if *libc::__errno_location() == libc::ECONNRESET => 0,
            _ if *libc::__errno_location() == libc::EAGAIN => 4,
            _ => 5,
        }
    }
}

fn sockaddr(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    (addr, len as libc::socklen_t)
}

#[test]
fn socket_is_0600_whatever_the_umask_and_locks_out_other_users() {
    for umask in [0o000, 0o022, 0o077] {
        let dir = tempfile::tempdir().unwrap();
        // Control: the umask really reaches the child.
        let mut sh = Command::new("sh");
        sh.args(["-c", "umask"]);
        with_umask(&mut sh, umask);
        let shown = String::from_utf8(sh.output().unwrap().stdout).unwrap();
        assert_eq!(shown.trim(), format!("{umask:04o}"));

        let d = start(dir.path(), &[], umask);
        assert_eq!(mode_and_gid(&d.socket).0, 0o600, "umask {umask:03o}");
        assert_eq!(
            connect_as(&d.socket, NOBODY, NOBODY, &[]).1,
            Outcome::ConnectFailed(libc::EACCES),
            "another user connected under umask {umask:03o}"
        );
        assert_serves(&d.socket);
        assert!(d.terminate().success());
    }
}

#[test]
fn socket_group_and_mode_are_in_place_when_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    // By name, under a umask that would strip the group bits: 0660.
    let d = start(dir.path(), &["--socket-group", "daemon"], 0o077);
    let daemon_gid = cryptblk::socket::ids::IdSpec::Name("daemon".into())
        .resolve(cryptblk::socket::ids::Kind::Group)
        .unwrap()
        .expect("the daemon group (Debian base-passwd)");
    assert_eq!(mode_and_gid(&d.socket), (0o660, daemon_gid));
    // A member of the group connects (and is served), others do not.
    let member = connect_as(&d.socket, NOBODY, NOBODY, &[daemon_gid]).1;
    assert_eq!(member, Outcome::Served);
    let stranger = connect_as(&d.socket, NOBODY, NOBODY, &[]).1;
    assert_eq!(stranger, Outcome::ConnectFailed(libc::EACCES));
    assert!(d.terminate().success());

    let gid = SPARE_GID.to_string();
    let d = start(
        dir.path(),
        &["--socket-group", &gid, "--socket-mode", "0640"],
        0o022,
    );
    assert_eq!(mode_and_gid(&d.socket), (0o640, SPARE_GID));
    assert_serves(&d.socket);
    assert!(d.terminate().success());
}

#[test]
fn unknown_group_or_bad_mode_stops_start_up_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, expect) in [
        (["--socket-group", "no-such-group-cryptblk"], "getent group"),
        (["--socket-mode", "0999"], "--socket-mode"),
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .args(args(dir.path(), &flags))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{flags:?}: {err}");
        assert!(!dir.path().join("s.sock").exists());
    }
}

/// `cryptblk serve` with the socket in `dir`; its exit status and stderr
/// if it stops within 20 s, else the running daemon.
fn serve_in(dir: &Path) -> Result<Daemon, String> {
    let log = dir.join("daemon.log");
    let socket = dir.join("s.sock");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(args(dir, &[]))
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    use cryptblk::bench::listening::{wait_for_listener, Startup};
    match wait_for_listener(&socket, &mut child, Duration::from_secs(20)).unwrap() {
        Startup::Listening => Ok(Daemon::adopt(child, socket)),
        Startup::Exited(status) => Err(format!(
            "{status}: {}",
            std::fs::read_to_string(log).unwrap()
        )),
        Startup::TimedOut => panic!("neither listening nor exited"),
    }
}

#[test]
fn a_directory_anyone_may_write_needs_the_sticky_bit() {
    let top = tempfile::tempdir().unwrap();
    let dir: PathBuf = top.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = serve_in(&dir).err().expect("served from a 0777 directory");
    assert!(err.contains("not sticky"), "{err}");
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    assert!(err.contains("chmod +t"), "{err}");
    assert!(!dir.join("s.sock").exists());

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let d = serve_in(&dir).expect("refused a sticky directory");
    assert_eq!(mode_and_gid(&d.socket).0, 0o600);
    assert_serves(&d.socket);
    assert!(d.terminate().success());
}

#[test]
fn allow_uid_closes_other_users_and_serves_listed_ones() {
    // Control: with the same open mode and no list, another user is served,
    // so a close below is the list's doing.
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &["--socket-mode", "0666"], 0o022);
    assert_eq!(mode_and_gid(&d.socket).0, 0o666);
    assert_eq!(
        connect_as(&d.socket, NOBODY, NOBODY, &[]).1,
        Outcome::Served
    );
    let log = wait_for_log(dir.path(), "every user on this host may connect");
    assert!(log.contains("WARN"), "no warning for mode 0666: {log}");
    assert!(d.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    let list = ["--socket-mode", "0666", "--allow-uid", "4243,0"];
    let mut d = start(dir.path(), &list, 0o022);
    let (pid, outcome) = connect_as(&d.socket, NOBODY, NOBODY, &[]);
    assert_eq!(outcome, Outcome::Closed);
    let needle = format!("refused a connection from pid {pid} (uid {NOBODY}, gid {NOBODY})");
    let log = wait_for_log(dir.path(), &needle);
    assert!(log.contains(&needle), "{log}");
    assert!(d.alive());
    assert_serves(&d.socket);
    assert!(
        log_of(dir.path()).contains("(uid 0, gid 0)"),
        "admission not logged"
    );
    assert!(d.terminate().success());
}

#[test]
fn allow_gid_admits_a_primary_or_supplementary_group() {
    let dir = tempfile::tempdir().unwrap();
    let gid = SPARE_GID.to_string();
    let d = start(
        dir.path(),
        &["--socket-mode", "0666", "--allow-gid", &gid],
        0o022,
    );
    let primary = connect_as(&d.socket, NOBODY, SPARE_GID, &[]).1;
    assert_eq!(primary, Outcome::Served);
    let supplementary = connect_as(&d.socket, NOBODY, NOBODY, &[5, SPARE_GID]).1;
    assert_eq!(supplementary, Outcome::Served);
    let neither = connect_as(&d.socket, NOBODY, NOBODY, &[5]).1;
    assert_eq!(neither, Outcome::Closed);
    // root is not in the list either.
    assert_eq!(connect_as(&d.socket, 0, 0, &[]).1, Outcome::Closed);
    assert!(d.terminate().success());
}

#[test]
fn sighup_is_logged_and_ignored_while_idle_and_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), &[], 0o022);
    d.signal(libc::SIGHUP);
    let log = wait_for_log(dir.path(), "SIGHUP ignored");
    assert!(log.contains("SIGHUP ignored"), "{log}");
    assert!(d.alive(), "SIGHUP killed the idle daemon");

    let mut c = Client::connect(&d.socket, 1);
    let data = pattern(2, 8192, 8192);
    assert_eq!(c.write(0, 8192, &data), 0);
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.alive(), "SIGHUP killed the serving daemon");
    assert_eq!(c.read(0, 8192, 8192).unwrap(), data);
    drop(c);
    assert!(d.terminate().success(), "SIGTERM still stops it cleanly");
}
