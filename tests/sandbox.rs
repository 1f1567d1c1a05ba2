//! `--sandbox`: every mode serves, and what the filter forbids really is
//! forbidden (checked in child processes that install the same filter the
//! daemon installs, then try exec, fork, open, ...).

mod support;
use std::path::Path;
use std::process::Command;

use cryptblk::sandbox::seccomp::{self, OnViolation, TRAPPED_EXIT};
use support::*;

fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[test]
fn every_mode_serves_verified_writes_and_reconnects() {
    for (mode, seccomp_mode) in [
        ("none", "0"),
        ("seccomp", "2"),
        ("full", "2"),
        ("seccomp-log", "2"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let img = dir.path().join("disk.img");
        let mut d = Daemon::start(
            dir.path(),
            &[
                "--image",
                img.to_str().unwrap(),
                "--size",
                "8M",
                "--key-file",
                key.to_str().unwrap(),
                "--queues",
                "2",
                "--crypto",
                "workers",
                "--allow-discards",
                // The peer check (getsockopt SO_PEERCRED/SO_PEERGROUPS)
                // runs confined, on every accept.
                "--allow-uid",
                "0",
                "--allow-gid",
                "0",
                "--sandbox",
                mode,
            ],
        );
        let mut c = Client::connect(&d.socket, 2);
        let data = pattern(3, 1 << 20, 512 << 10);
        assert_eq!(c.write(0, 1 << 20, &data), 0, "{mode}");
        assert_eq!(c.flush(1), 0, "{mode}");
        assert_eq!(c.discard(0, 4 << 20, 65536), 0, "{mode}");
        assert_eq!(c.write_zeroes(1, 5 << 20, 65536), 0, "{mode}");
        // Confinement is in place once a connection has been accepted.
        assert_eq!(
            proc_status(d.child.id(), "Seccomp:"),
            seccomp_mode,
            "{mode}"
        );
        drop(c);
        let mut c = Client::connect(&d.socket, 2);
        assert_eq!(c.read(1, 1 << 20, data.len()).unwrap(), data, "{mode}");
        drop(c);
        assert!(d.alive(), "{mode}: daemon died");
        let socket = d.socket.clone();
        assert!(d.terminate().success(), "{mode}: unclean exit");
        assert!(!socket.exists(), "{mode}: socket not removed");
    }
}

/// The `access` flags strace printed for `field` in `args`
/// (`allowed_access=A|B`, `handled_access_fs=A|B|0xc000`).
fn access_flags(args: &str, field: &str) -> Vec<String> {
    let Some(at) = args.find(&format!("{field}=")) else {
        return Vec::new();
    };
    let rest = &args[at + field.len() + 1..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    let mut flags: Vec<String> = rest[..end].split('|').map(str::to_string).collect();
    flags.sort();
    flags
}

/// Landlock leaves no mark in /proc (Seccomp: 2 is seccomp's, and NoNewPrivs
/// is set for seccomp anyway), and nothing the daemon does once serving
/// touches a path Landlock would refuse, so its domain can be probed from
/// outside only through a test hook (the next test). What can be watched is
/// the daemon setting it up:
/// under `strace -f -y`, `--sandbox full` must create a ruleset that
/// handles file access, allow exactly the image (read and write; read only
/// with --readonly) and removing files in the socket's directory, and
/// enforce it (landlock_restrict_self = 0) in the main thread before any
/// thread is created (a thread from before would stay unconfined). The
/// default `--sandbox seccomp` must make no Landlock call at all.
#[test]
fn full_mode_sets_up_landlock_in_the_real_daemon_before_any_thread() {
    use support::strace::Strace;
    for (mode, readonly) in [("full", false), ("full", true), ("seccomp", false)] {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let trace = Strace::new(&dir.path().join("strace.log"));
        let wrapper = trace.wrapper(&[
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "clone",
            "clone3",
        ]);
        let mut args = vec![
            "--image",
            img.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
            "--queues",
            "1",
            "--sandbox",
            mode,
        ];
        if readonly {
            args.push("--readonly");
        }
        let d = Daemon::start_wrapped(dir.path(), &wrapper, &args, std::process::Stdio::inherit());
        // A connection: the vring threads start.
        let mut c = Client::connect_with(&d.socket, 1, readonly);
        c.read(0, 0, 4096).unwrap();
        drop(c);
        let pid = d.pid;
        assert!(d.terminate().success(), "{mode}");
        let calls = trace.calls();
        let log = std::fs::read_to_string(&trace.log).unwrap();
        let what = format!("--sandbox {mode} readonly {readonly}:\n{log}");
        let landlock: Vec<_> = calls
            .iter()
            .filter(|c| c.name.starts_with("landlock"))
            .collect();
        if mode == "seccomp" {
            assert!(landlock.is_empty(), "{what}");
            continue;
        }
        let at = calls
            .iter()
            .position(|c| c.name == "landlock_restrict_self")
            .unwrap_or_else(|| panic!("no landlock_restrict_self: {what}"));
        assert!(calls[at].ok() && calls[at].tid == pid, "{what}");
        assert!(
            !calls[..at].iter().any(|c| c.name.starts_with("clone")),
            "a thread was created before Landlock was enforced: {what}"
        );
        assert!(
            calls[at..]
                .iter()
                .any(|c| c.name.starts_with("clone") && c.ok()),
            "no thread seen at all (is clone traced?): {what}"
        );
        let ruleset = calls[..at]
            .iter()
            .find(|c| c.name == "landlock_create_ruleset" && c.args.contains("handled_access_fs="))
            .unwrap_or_else(|| panic!("no ruleset: {what}"));
        let handled = access_flags(&ruleset.args, "handled_access_fs");
        for right in [
            "EXECUTE",
            "READ_FILE",
            "WRITE_FILE",
            "READ_DIR",
            "REMOVE_FILE",
            "MAKE_REG",
            "MAKE_SOCK",
        ] {
            let right = format!("LANDLOCK_ACCESS_FS_{right}");
            assert!(handled.contains(&right), "{right} is not handled: {what}");
        }
        let rules: Vec<_> = calls[..at]
            .iter()
            .filter(|c| c.name == "landlock_add_rule")
            .collect();
        assert_eq!(rules.len(), 2, "{what}");
        assert!(rules.iter().all(|r| r.ok()), "{what}");
        let image = std::fs::canonicalize(&img).unwrap();
        let socket_dir = std::fs::canonicalize(dir.path()).unwrap();
        let rule_for = |path: &Path| {
            let fd = format!("<{}>}}", path.display());
            let rule = rules
                .iter()
                .find(|r| r.args.contains(&fd))
                .unwrap_or_else(|| panic!("no rule for {}: {what}", path.display()));
            access_flags(&rule.args, "allowed_access")
        };
        let mut image_access = vec!["LANDLOCK_ACCESS_FS_READ_FILE".to_string()];
        if !readonly {
            image_access.push("LANDLOCK_ACCESS_FS_WRITE_FILE".to_string());
        }
        assert_eq!(rule_for(&image), image_access, "{what}");
        assert_eq!(
            rule_for(&socket_dir),
            ["LANDLOCK_ACCESS_FS_REMOVE_FILE"],
            "{what}"
        );
    }
}

/// Landlock seen from outside the real daemon: the debug-build test hook
/// `CRYPTBLK_TEST_PROBE_OPEN` makes the daemon open a file once its sandbox
/// binds it (before seccomp, which would trap open itself) and log the
/// outcome. With `--sandbox full` a readable file outside the image and
/// the socket's directory is refused with EACCES, and the daemon goes on
/// serving; the control, the same probe under `--sandbox seccomp` (no
/// Landlock), opens it. /proc shows the rest: NoNewPrivs and seccomp's
/// filter mode in both.
#[test]
fn full_mode_landlock_refuses_an_open_seen_from_outside_the_daemon() {
    // Fails rather than skips in a release build, which has no probe.
    if !cfg!(debug_assertions) {
        panic!("the probe is a debug-build hook: run this test without --release");
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("readable.txt");
    std::fs::write(&outside, b"not the daemon's").unwrap();
    for (mode, outcome) in [
        ("full", "Permission denied (os error 13)"),
        ("seccomp", "ok"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key(dir.path(), 64);
        let img = dir.path().join("disk.img");
        let log = dir.path().join("daemon.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let mut d = Daemon::start_command(
            dir.path(),
            &[
                "--image",
                img.to_str().unwrap(),
                "--size",
                "8M",
                "--key-file",
                key.to_str().unwrap(),
                "--sandbox",
                mode,
            ],
            stderr.into(),
            |c| {
                c.env("CRYPTBLK_TEST_PROBE_OPEN", &outside);
            },
        );
        let probe = format!("sandbox probe: open {}: ", outside.display());
        let text = || std::fs::read_to_string(&log).unwrap();
        wait_until(
            std::time::Duration::from_secs(10),
            "the probe's line",
            || text().contains(&probe),
        );
        let line = text()
            .lines()
            .find_map(|l| l.split_once(&probe).map(|(_, rest)| rest.to_string()))
            .unwrap();
        assert_eq!(line, outcome, "--sandbox {mode}:\n{}", text());
        // Confined, and still serving.
        let mut c = Client::connect(&d.socket, 1);
        let data = pattern(5, 0, 64 << 10);
        assert_eq!(c.write(0, 0, &data), 0, "{mode}");
        assert_eq!(c.read(0, 0, data.len()).unwrap(), data, "{mode}");
        drop(c);
        assert_eq!(proc_status(d.pid, "NoNewPrivs:"), "1", "{mode}");
        assert_eq!(proc_status(d.pid, "Seccomp:"), "2", "{mode}");
        assert!(d.alive(), "--sandbox {mode}: the daemon died:\n{}", text());
        assert!(d.terminate().success(), "--sandbox {mode}:\n{}", text());
    }
}

#[test]
fn sigterm_before_any_connection_exits_cleanly_when_confined() {
    // The shutdown path wakes accept() by shutting the listener down.
    for mode in ["seccomp", "full"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let mut d = Daemon::start(
            dir.path(),
            &[
                "--image",
                img.to_str().unwrap(),
                "--size",
                "1M",
                "--cipher",
                "none",
                "--sandbox",
                mode,
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(d.alive());
        let socket = d.socket.clone();
        assert!(d.terminate().success(), "{mode}");
        assert!(!socket.exists(), "{mode}: socket not removed");
    }
}

#[test]
fn the_allowlist_has_no_exec_fork_open_or_network_setup() {
    let names: Vec<&str> = seccomp::allowed().iter().map(|(n, _)| *n).collect();
    for call in [
        "SYS_execve",
        "SYS_execveat",
        "SYS_fork",
        "SYS_vfork",
        "SYS_open",
        "SYS_openat",
        "SYS_openat2",
        "SYS_socket",
        "SYS_connect",
        "SYS_bind",
        "SYS_listen",
        "SYS_ptrace",
        "SYS_process_vm_readv",
        "SYS_kill",
        "SYS_setns",
        "SYS_unshare",
        "SYS_mount",
        "SYS_init_module",
    ] {
        assert!(!names.contains(&call), "{call} is allowed");
    }
    assert!(
        seccomp::allowed_count(None) < 80,
        "{} calls",
        seccomp::allowed_count(None)
    );
}

const CHILD_ENV: &str = "CRYPTBLK_SANDBOX_CHILD";

/// Not a test on its own: run by `run_child` with CHILD_ENV set, it
/// confines this process and does what the variable says; the parent
/// checks how it ended. It prints `CHILD-RAN action` once confined, just
/// before the action, and `CHILD-DONE action` if the action returned: the
/// parent requires the first (a harness filter that stopped matching would
/// otherwise exit 0 having run nothing) and checks the second.
#[test]
#[ignore = "the child process of the sandbox tests, run by them"]
fn confined_child() {
    let action = std::env::var(CHILD_ENV).unwrap_or_else(|_| {
        panic!("confined_child is not a test of its own: run_child runs it with {CHILD_ENV} set")
    });
    if let Some(rest) = action.strip_prefix("landlock:") {
        return landlock_child(Path::new(rest));
    }
    seccomp::install(OnViolation::Trap, &[], None).expect("install the filter");
    eprintln!("CHILD-RAN {action}");
    // SAFETY (all blocks below): plain libc calls with valid C strings; the
    // lint wants a comment per block, and this one covers them all.
    #[allow(clippy::undocumented_unsafe_blocks)]
    match action.as_str() {
        "thread" => {
            let t = std::thread::spawn(|| 6 * 7);
            assert_eq!(t.join().unwrap(), 42);
        }
        "execve" => unsafe {
            let path = c"/bin/true".as_ptr();
            let argv = [path, std::ptr::null()];
            libc::execve(path, argv.as_ptr(), [std::ptr::null()].as_ptr());
        },
        "fork" => unsafe {
            libc::fork();
        },
        "open" => unsafe {
            libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
        },
        "spawn" => {
            let _ = Command::new("/bin/true").status();
        }
        "mmap-exec" => unsafe {
            let prot = libc::PROT_READ | libc::PROT_EXEC;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0);
        },
        "mmap-data" => unsafe {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let p = libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
        },
        "fcntl-setown" => unsafe {
            libc::fcntl(2, libc::F_SETOWN, 1);
        },
        "fcntl-getfl" => unsafe {
            assert!(libc::fcntl(2, libc::F_GETFL) >= 0);
        },
        "abort" => std::process::abort(),
        "unlink" => unsafe {
            libc::unlinkat(libc::AT_FDCWD, c"/tmp/cryptblk-no-such-file".as_ptr(), 0);
        },
        other => panic!("unknown action {other}"),
    }
    eprintln!("CHILD-DONE {action}");
    // SAFETY: ends the process without running the harness further.
    unsafe { libc::_exit(0) };
}

fn landlock_child(dir: &Path) {
    use std::io::ErrorKind::PermissionDenied;
    let image = dir.join("disk.img");
    let socket = dir.join("s.sock");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    std::fs::write(&socket, b"").unwrap();
    let outside = dir.parent().unwrap().join(format!(
        "outside-{}",
        dir.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&outside, b"x").unwrap();
    // A TLS credential file stays readable, not its neighbour.
    let psk = dir.join("keys.psk");
    let beside = dir.join("beside.psk");
    std::fs::write(&psk, b"alice:00").unwrap();
    std::fs::write(&beside, b"bob:00").unwrap();
    // An abstract unix socket bound outside the domain (by this process,
    // before it confines itself).
    use std::os::linux::net::SocketAddrExt;
    let name = format!("cryptblk-landlock-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let status = cryptblk::sandbox::landlock::restrict(
        &image,
        &[socket.as_path()],
        false,
        cryptblk::sandbox::landlock::TcpConnect::None,
        &[psk.as_path()],
    )
    .expect("landlock");
    assert_eq!(status, landlock::RulesetStatus::FullyEnforced);
    eprintln!("CHILD-RAN landlock");
    // The image: read and write.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .expect("the image stays reachable");
    // Anything else: no.
    let denied = |r: std::io::Result<()>, what: &str| {
        assert_eq!(r.map_err(|e| e.kind()), Err(PermissionDenied), "{what}");
    };
    assert_eq!(
        std::fs::read(&psk).expect("the TLS file stays readable"),
        b"alice:00"
    );
    denied(std::fs::write(&psk, b"x"), "write the TLS file");
    denied(
        std::fs::read(&beside).map(drop),
        "read the TLS file's neighbour",
    );
    denied(std::fs::read(&outside).map(drop), "read a file outside");
    denied(std::fs::read("/etc/hostname").map(drop), "read /etc");
    denied(std::fs::write(dir.join("new"), b"x"), "create a file");
    denied(
        std::net::TcpStream::connect("127.0.0.1:9").map(drop),
        "TCP connect",
    );
    denied(
        std::os::unix::net::UnixStream::connect_addr(&addr).map(drop),
        "connect to an abstract unix socket from outside the domain",
    );
    // Signals: to itself yes, to the parent (outside the domain) no.
    // SAFETY: kill(2) with signal 0 only checks permission.
    assert_eq!(unsafe { libc::kill(std::process::id() as i32, 0) }, 0);
    // SAFETY: as above.
    let rc = unsafe { libc::kill(libc::getppid(), 0) };
    let err = std::io::Error::last_os_error();
    assert!(
        rc == -1 && err.raw_os_error() == Some(libc::EPERM),
        "signal to the parent: {rc} {err}"
    );
    // Removing the socket at exit still works.
    std::fs::remove_file(&socket).expect("remove the socket");
    eprintln!("CHILD-DONE landlock");
    // SAFETY: ends the process without running the harness further.
    unsafe { libc::_exit(0) };
}

/// How a confined child ended.
#[derive(Debug, PartialEq)]
enum End {
    Exit(i32),
    /// SIGSYS with the default action: the trap hit while SIGSYS was
    /// blocked (glibc's posix_spawn blocks every signal), so the kernel
    /// killed the process instead of running the handler.
    KilledBySigsys,
    Other(std::process::ExitStatus),
}

/// Runs `confined_child` with `action`; returns how it ended and stderr.
/// The child must have reached the action (its `CHILD-RAN` line); an
/// action that returned must say so (`CHILD-DONE`), one that was stopped
/// must not.
fn run_child(action: &str) -> (End, String) {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "confined_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, action)
        .output()
        .unwrap();
    let end = match (out.status.code(), out.status.signal()) {
        (Some(code), _) => End::Exit(code),
        (None, Some(libc::SIGSYS)) => End::KilledBySigsys,
        _ => End::Other(out.status),
    };
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let what = action.split(':').next().unwrap();
    assert!(
        err.contains(&format!("CHILD-RAN {what}\n")),
        "the child never reached {what} (does --exact still match confined_child?): \
         {end:?}\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    let done = err.contains(&format!("CHILD-DONE {what}\n"));
    assert_eq!(
        done,
        end == End::Exit(0),
        "{what}: CHILD-DONE printed {done}, but the child ended {end:?}: {err}"
    );
    (end, err)
}

/// Review findings: executable memory, fcntl commands that can signal
/// other processes, unlinking any path, and abort() (tgkill) showing up as
/// a trapped call.
/// Runs `confined_child` with `action` and requires the filter to have
/// stopped system call `nr` (and named it).
fn assert_trapped(action: &str, nr: i64) {
    let (end, err) = run_child(action);
    assert_eq!(
        end,
        End::Exit(TRAPPED_EXIT),
        "{action} was not stopped: {err}"
    );
    assert!(
        err.contains(&format!("stopped system call {nr} ")),
        "{action}: {err}"
    );
}

#[test]
fn no_executable_memory_no_fcntl_signalling_and_abort_aborts() {
    for action in ["mmap-data", "fcntl-getfl"] {
        let (end, err) = run_child(action);
        assert_eq!(end, End::Exit(0), "{action} must work: {err}");
    }
    for (action, nr) in [
        ("mmap-exec", libc::SYS_mmap),
        ("fcntl-setown", libc::SYS_fcntl),
        // The daemon unlinks only its socket, through its directory's fd.
        ("unlink", libc::SYS_unlinkat),
    ] {
        assert_trapped(action, nr);
    }
    let (end, err) = run_child("abort");
    assert!(
        matches!(end, End::Other(s) if std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGABRT)),
        "abort() must end in SIGABRT: {end:?} {err}"
    );
}

#[test]
fn the_filter_stops_exec_fork_and_open_but_not_threads() {
    let (end, err) = run_child("thread");
    assert_eq!(end, End::Exit(0), "threads must work: {err}");
    for (action, nr) in [
        ("execve", libc::SYS_execve),
        ("fork", libc::SYS_clone),
        ("open", libc::SYS_openat),
    ] {
        assert_trapped(action, nr);
    }
    // std's Command (posix_spawn, all signals blocked): stopped too.
    let (end, err) = run_child("spawn");
    assert!(
        matches!(end, End::Exit(TRAPPED_EXIT) | End::KilledBySigsys),
        "spawn was not stopped: {end:?} {err}"
    );
}

#[test]
fn landlock_limits_files_to_the_image_and_the_socket_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let (code, err) = run_child(&format!("landlock:{}", dir.display()));
    assert_eq!(code, End::Exit(0), "{err}");
}

#[test]
fn the_mode_comes_from_the_flag_or_the_config_file_and_defaults_to_seccomp() {
    use cryptblk::config::{ServeArgs, ServeConfig};
    use cryptblk::sandbox::SandboxMode;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "socket = \"/tmp/x.sock\"\nimage = \"/tmp/x.img\"\ncipher = \"none\"\nsandbox = \"full\"\n",
    )
    .unwrap();
    let mode = |flag: Option<&str>, config: bool| {
        let mut argv = vec![
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x.img",
            "--cipher",
            "none",
        ];
        if let Some(flag) = flag {
            argv.extend(["--sandbox", flag]);
        }
        if config {
            argv.extend(["--config", file.to_str().unwrap()]);
        }
        ServeConfig::from_args(ServeArgs::from_command_line(argv).unwrap())
            .unwrap()
            .sandbox
            .mode
    };
    assert_eq!(mode(None, false), SandboxMode::Seccomp);
    assert_eq!(mode(None, true), SandboxMode::Full);
    assert_eq!(mode(Some("none"), true), SandboxMode::None);
}
