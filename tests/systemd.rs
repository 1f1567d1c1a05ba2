//! Running under a service manager: a listening socket handed over with
//! `--fd` or by systemd socket activation (`systemd-socket-activate`, which
//! sets LISTEN_FDS as systemd does), readiness reported over NOTIFY_SOCKET
//! (READY=1, STATUS=, STOPPING=1) with the sandbox on, and the units in
//! configs/ (systemd-analyze verify and security, and the system calls the
//! daemon makes under strace against the unit's SystemCallFilter=).

mod support;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryptblk::bench::listening::is_listening;
use cryptblk::crypto::{IvRule, SectorCipher, XtsKey};
use support::*;

/// The descriptor number the parent hands the socket over as with --fd.
const FD: RawFd = 5;

/// A NOTIFY_SOCKET the test listens on: a path, or an abstract name.
struct NotifySocket {
    socket: UnixDatagram,
    /// The value of NOTIFY_SOCKET for the daemon.
    target: String,
    seen: Vec<String>,
    /// `expect` looks at messages from here on.
    next: usize,
}

impl NotifySocket {
    fn at_path(path: &Path) -> NotifySocket {
        NotifySocket::new(
            UnixDatagram::bind(path).unwrap(),
            path.to_str().unwrap().to_string(),
        )
    }

    fn abstract_name() -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "cryptblk-test-notify-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        NotifySocket::new(UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
    }

    fn new(socket: UnixDatagram, target: String) -> NotifySocket {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            target,
            seen: Vec::new(),
            next: 0,
        }
    }

    /// Waits up to 20 s for a message containing `needle` after the one
    /// the last `expect` found (so a sequence of calls checks the order);
    /// returns it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(i) = self.seen[self.next..]
                .iter()
                .position(|m| m.contains(needle))
            {
                self.next += i + 1;
                return self.seen[self.next - 1].clone();
            }
            if Instant::now() > deadline {
                // The daemon's log, when it writes one beside the socket: a
                // daemon that died says why there.
                let log = Path::new(&self.target)
                    .parent()
                    .map(|dir| read_log(&dir.join("daemon.log")))
                    .unwrap_or_default();
                panic!(
                    "no {needle:?} on NOTIFY_SOCKET; seen: {:?}; daemon log:\n{log}",
                    self.seen
                );
            }
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

/// What the daemon serves: a 16 MiB encrypted image and its key.
struct Disk {
    image: PathBuf,
    key_path: PathBuf,
    key: Vec<u8>,
}

impl Disk {
    fn new(dir: &Path) -> Disk {
        let (key_path, key) = write_key(dir, 64);
        Disk {
            image: dir.join("disk.img"),
            key_path,
            key,
        }
    }

    fn args(&self) -> Vec<String> {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            "--image".into(),
            s(&self.image),
            "--size".into(),
            "16M".into(),
            "--key-file".into(),
            s(&self.key_path),
            "--queues".into(),
            "1".into(),
        ]
    }

    /// The image holds `data` at `offset` as dm-crypt ciphertext.
    fn assert_holds(&self, offset: u64, data: &[u8]) {
        let raw = std::fs::read(&self.image).unwrap();
        let mut expect = data.to_vec();
        let key = XtsKey::from_bytes(&self.key).unwrap();
        SectorCipher::new(
            Some(&key),
            IvRule {
                sector_size: 512,
                large_sectors: false,
                skip: 0,
            },
        )
        .encrypt(offset / 512, &mut expect);
        let at = offset as usize;
        assert_eq!(&raw[at..at + data.len()], &expect[..], "not the ciphertext");
    }
}

/// Writes a pattern through the socket, reads it back, and checks the image.
fn round_trip(socket: &Path, disk: &Disk, seed: u64) {
    let mut c = Client::connect(socket, 1);
    let data = pattern(seed, 1 << 20, 128 * 1024);
    assert_eq!(c.write(0, 1 << 20, &data), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, 1 << 20, data.len()).unwrap(), data);
    drop(c);
    disk.assert_holds(1 << 20, &data);
}

/// `cryptblk serve ARGS` with `listener` handed over as fd FD (without
/// close-on-exec, as a parent passing a socket does), its log in DIR/daemon.log.
fn serve_on_fd(
    dir: &Path,
    listener: Option<RawFd>,
    args: &[String],
    notify: Option<&str>,
) -> Daemon {
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(target) = notify {
        cmd.env("NOTIFY_SOCKET", target);
    }
    if let Some(fd) = listener {
        pass_as_fd(&mut cmd, fd);
    }
    Daemon::spawn_unwaited(cmd, dir.join("s.sock"), "cryptblk")
}

/// Makes the child inherit `fd` as FD (without close-on-exec), as a
/// parent passing a socket does.
fn pass_as_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe. When `fd` already is FD
    // (fd numbers vary with the tests running beside this one), dup2 does
    // nothing and leaves close-on-exec set: clear it, or the daemon finds
    // FD closed (and may open something else there).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == FD {
                libc::fcntl(FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn log_of(dir: &Path) -> String {
    read_log(&dir.join("daemon.log"))
}

/// Waits for `d` to exit on its own and returns its log.
fn failure_of(mut d: Daemon, dir: &Path) -> String {
    let status = d.wait_exit(Duration::from_secs(20));
    let log = log_of(dir);
    assert!(!status.success(), "the daemon should have refused: {log}");
    log
}

#[test]
fn an_inherited_fd_is_served_and_left_listening_for_the_next_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path());
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut args = disk.args();
    args.extend(["--fd".into(), FD.to_string()]);
    let mut notify = NotifySocket::at_path(&dir.path().join("notify"));

    let d = serve_on_fd(
        dir.path(),
        Some(listener.as_raw_fd()),
        &args,
        Some(&notify.target),
    );
    let ready = notify.expect("READY=1");
    assert_eq!(ready, "READY=1\nSTATUS=waiting for a VMM");
    round_trip(&path, &disk, 1);
    notify.expect("STATUS=serving a VMM (connection 1)");
    // Back to waiting once the client is gone.
    assert_eq!(notify.expect("STATUS="), "STATUS=waiting for a VMM");
    assert!(d.terminate().success(), "{}", log_of(dir.path()));
    let stopping = notify.expect("STOPPING=1");
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=stopping"),
        "{stopping}"
    );
    let log = log_of(dir.path());
    assert!(
        log.contains(&format!("{} (fd {FD} from --fd)", path.display())),
        "{log}"
    );
    assert!(
        log.contains("the inherited socket stays with its owner"),
        "{log}"
    );

    // Not unlinked, and not shut down: a second daemon handed the same
    // socket (a restarted service) serves the same disk.
    assert!(
        path.exists(),
        "the daemon removed a socket it did not create"
    );
    let mut notify = NotifySocket::at_path(&dir.path().join("notify2"));
    let second = serve_on_fd(
        dir.path(),
        Some(listener.as_raw_fd()),
        &args,
        Some(&notify.target),
    );
    notify.expect("READY=1");
    let mut c = Client::connect(&path, 1);
    let earlier = pattern(1, 1 << 20, 128 * 1024);
    assert_eq!(c.read(0, 1 << 20, earlier.len()).unwrap(), earlier);
    drop(c);
    assert!(second.terminate().success());
}

#[test]
fn socket_activation_serves_notifies_and_stops_under_the_full_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path());
    let path = dir.path().join("s.sock");
    let mut notify = NotifySocket::abstract_name();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    // systemd-socket-activate listens, and on the first connection execs
    // the daemon in its own process with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES.
    let child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&path)
        .arg("--fdname=vm1.socket")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.target))
        .arg("--setenv=RUST_LOG=info")
        .arg(BIN)
        .arg("serve")
        .args(disk.args())
        .args(["--sandbox", "full"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let d = Daemon::adopt(child, path.clone());
    wait_until(
        || is_listening(&path).unwrap(),
        "systemd-socket-activate to listen",
    );

    // The connection starts the daemon, which serves it.
    round_trip(&path, &disk, 2);
    let ready = notify.expect("READY=1");
    assert_eq!(ready, "READY=1\nSTATUS=waiting for a VMM");
    notify.expect("STATUS=serving a VMM (connection 1)");
    let log = log_of(dir.path());
    assert!(
        log.contains("(fd 3 from systemd socket activation, vm1.socket)"),
        "{log}"
    );
    assert!(log.contains("sandbox: full"), "{log}");
    // A second VMM connection on the same activated socket.
    round_trip(&path, &disk, 3);
    notify.expect("STATUS=serving a VMM (connection 2)");
    assert!(d.terminate().success(), "{}", log_of(dir.path()));
    notify.expect("STOPPING=1");
    assert!(path.exists(), "the daemon removed systemd's socket");
}

#[test]
fn socket_activation_with_two_sockets_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path());
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&a)
        .arg("--listen")
        .arg(&b)
        .arg(BIN)
        .arg("serve")
        .args(disk.args())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon::adopt(child, a);
    wait_until(
        || is_listening(&b).unwrap(),
        "systemd-socket-activate to listen",
    );
    let _trigger = UnixStream::connect(&d.socket).unwrap();
    let log = failure_of(d, dir.path());
    assert!(
        log.contains("socket activation: 2 sockets were passed") && log.contains("exactly one"),
        "{log}"
    );
}

#[test]
fn an_fd_that_is_not_a_listening_unix_stream_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path());
    let with_fd = |fd: &str| {
        let mut args = disk.args();
        args.extend(["--fd".into(), fd.into()]);
        args
    };
    let refused = |listener: Option<RawFd>, args: &[String]| {
        let d = serve_on_fd(dir.path(), listener, args, None);
        failure_of(d, dir.path())
    };
    let file = std::fs::File::create(dir.path().join("plain-file")).unwrap();
    let log = refused(Some(file.as_raw_fd()), &with_fd("5"));
    assert!(
        log.contains("cannot serve on fd 5 (from --fd): it is not a socket"),
        "{log}"
    );
    let (datagram, _peer) = UnixDatagram::pair().unwrap();
    let log = refused(Some(datagram.as_raw_fd()), &with_fd("5"));
    assert!(log.contains("not a stream socket"), "{log}");
    let (stream, _peer) = UnixStream::pair().unwrap();
    let log = refused(Some(stream.as_raw_fd()), &with_fd("5"));
    assert!(log.contains("not listening"), "{log}");
    let log = refused(None, &with_fd("9"));
    assert!(log.contains("fd 9") && log.contains("not open"), "{log}");
    let mut both = with_fd("5");
    both.extend(["--socket".into(), "x.sock".into()]);
    let log = refused(None, &both);
    assert!(log.contains("--socket cannot be used with --fd"), "{log}");
    // Negative control: the same arguments with a listening socket serve.
    let listener = UnixListener::bind(dir.path().join("s.sock")).unwrap();
    let mut notify = NotifySocket::at_path(&dir.path().join("notify"));
    let d = serve_on_fd(
        dir.path(),
        Some(listener.as_raw_fd()),
        &with_fd("5"),
        Some(&notify.target),
    );
    notify.expect("READY=1");
    assert!(d.terminate().success());
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// configs/NAME with the installed binary's path replaced by this build's.
fn unit_text(name: &str) -> String {
    let path = format!("{}/configs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .replace("/usr/local/bin/cryptblk", BIN)
}

/// `systemd-analyze ARGS`: (success, stdout + stderr).
fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (package systemd)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Writes the two units into DIR (the service's text changed by `edit`)
/// and runs `systemd-analyze verify` on an instance of each.
fn verify_units(dir: &Path, edit: impl Fn(String) -> String) -> (bool, String) {
    let service = dir.join("cryptblk@.service");
    std::fs::write(&service, edit(unit_text("cryptblk@.service"))).unwrap();
    std::fs::write(dir.join("cryptblk@.socket"), unit_text("cryptblk@.socket")).unwrap();
    let instance = |unit: &str| dir.join(unit).to_str().unwrap().to_string();
    systemd_analyze(&[
        "verify",
        "--man=no",
        &instance("cryptblk@vm1.service"),
        &instance("cryptblk@vm1.socket"),
    ])
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = verify_units(dir.path(), |s| s);
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    // Negative controls: verify does see a mistyped setting and a missing
    // binary in these very files.
    let (_, typo) = verify_units(dir.path(), |s| {
        s.replace("ProtectSystem=strict", "ProtectSystem=strictly")
    });
    assert!(typo.contains("strictly"), "{typo}");
    let (ok, missing) = verify_units(dir.path(), |s| s.replace(BIN, "/nonexistent/cryptblk"));
    assert!(
        !ok && missing.contains("/nonexistent/cryptblk"),
        "{missing}"
    );
}

#[test]
fn the_units_have_the_asked_for_settings_and_an_exposure_below_one() {
    let socket = unit_text("cryptblk@.socket");
    for line in [
        "ListenStream=/run/cryptblk/%i.sock",
        "SocketMode=0600",
        "Accept=no",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "socket unit lacks {line}"
        );
    }
    let service = unit_text("cryptblk@.service");
    for line in [
        "Type=notify",
        "ExecStart=".to_string().as_str(),
        "ProtectSystem=strict",
        "StateDirectory=cryptblk",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "SystemCallArchitectures=native",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "RestrictNamespaces=yes",
        "LimitMEMLOCK=64M",
    ] {
        assert!(
            service.lines().any(|l| l.starts_with(line)),
            "service unit lacks {line}"
        );
    }
    assert!(service.contains(&format!(
        "ExecStart={BIN} serve --config /etc/cryptblk/%i.toml"
    )));
    // systemd's own offline rating of the hardening: 0 (safe) to 10.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("cryptblk@.service");
    std::fs::write(&unit, &service).unwrap();
    let rate = |path: &Path| {
        systemd_analyze(&[
            "security",
            "--offline=yes",
            "--no-pager",
            "--threshold=10",
            path.to_str().unwrap(),
        ])
    };
    let exposure = |out: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no rating: {out}"));
        let after = line.split(": ").nth(1).unwrap();
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (_, out) = rate(&unit);
    assert!(exposure(&out) < 1.0, "{out}");
    // Control: the same unit without its [Service] hardening rates unsafe.
    let bare: String = service
        .lines()
        .take_while(|l| !l.starts_with("LimitMEMLOCK"))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare_unit = dir.path().join("bare@.service");
    std::fs::write(&bare_unit, bare).unwrap();
    let (_, out) = rate(&bare_unit);
    assert!(exposure(&out) > 5.0, "{out}");
}

/// Every system call name that systemd's `@group` stands for, from
/// `systemd-analyze syscall-filter` (groups nest).
fn syscall_groups() -> std::collections::HashMap<String, Vec<String>> {
    let (ok, out) = systemd_analyze(&["syscall-filter", "--no-pager"]);
    assert!(ok, "{out}");
    let mut groups = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if line.starts_with('@') {
            let name = line.split_whitespace().next().unwrap().to_string();
            groups.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(group) = &current {
            let t = line.trim();
            if !t.is_empty() && !t.starts_with('#') {
                groups.get_mut(group).unwrap().push(t.to_string());
            }
        }
    }
    groups
}

fn expand(
    groups: &std::collections::HashMap<String, Vec<String>>,
    item: &str,
    into: &mut std::collections::HashSet<String>,
) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(groups, m, into)),
        None if item.starts_with('@') => panic!("unknown group {item}"),
        None => {
            into.insert(item.to_string());
        }
    }
}

/// What the service's SystemCallFilter= lines allow: the first lists what
/// is allowed, a `~` line takes calls away.
fn unit_filter() -> std::collections::HashSet<String> {
    let groups = syscall_groups();
    let mut allowed = std::collections::HashSet::new();
    for line in unit_text("cryptblk@.service").lines() {
        let Some(value) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        match value.strip_prefix('~') {
            Some(denied) => {
                let mut gone = std::collections::HashSet::new();
                denied
                    .split_whitespace()
                    .for_each(|i| expand(&groups, i, &mut gone));
                allowed.retain(|c| !gone.contains(c));
            }
            None => value
                .split_whitespace()
                .for_each(|i| expand(&groups, i, &mut allowed)),
        }
    }
    allowed
}

/// System calls that `strace -f -c` counted in FILE (its summary table).
fn traced_calls(summary: &str) -> Vec<String> {
    summary
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .filter_map(|l| l.split_whitespace().last().map(String::from))
        .filter(|name| name != "total")
        .collect()
}

#[test]
fn every_system_call_cryptblk_makes_is_in_the_units_filter() {
    let allowed = unit_filter();
    assert!(allowed.contains("read") && !allowed.contains("setuid"));
    let mut all = std::collections::BTreeSet::new();
    // The page-cache mapping, and io_uring with registered buffers.
    for io in ["mmap", "pread"] {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path());
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let notify = NotifySocket::at_path(&dir.path().join("notify"));
        let summary = dir.path().join("strace.txt");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-c", "-o"])
            .arg(&summary)
            .arg(BIN)
            .arg("serve")
            .args(disk.args())
            .args(["--io", io, "--fd", &FD.to_string()])
            .env("NOTIFY_SOCKET", &notify.target)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        pass_as_fd(&mut cmd, listener.as_raw_fd());
        let mut notify = notify;
        // The pid is strace's: this test never signals cryptblk by pid.
        let child = cmd.spawn().expect("strace (package strace)");
        let mut d = Daemon::adopt(child, path.clone());
        notify.expect("READY=1");
        round_trip(&path, &disk, 4);
        // SIGTERM goes to the daemon (strace would detach from it);
        // strace exits with the daemon's status.
        let strace_pid = d.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
                .unwrap();
        let daemon_pid: i32 = children.trim().parse().unwrap();
        // SAFETY: kill(2) on the daemon strace started for this test.
        unsafe { libc::kill(daemon_pid, libc::SIGTERM) };
        notify.expect("STOPPING=1");
        let status = d.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{}", log_of(dir.path()));
        all.extend(traced_calls(&std::fs::read_to_string(&summary).unwrap()));
    }
    // The trace saw the whole life: the sandbox, io_uring, the notify socket.
    for expected in ["seccomp", "io_uring_setup", "connect", "sendto", "mlock"] {
        assert!(all.contains(expected), "{expected} not traced: {all:?}");
    }
    // --key-keyring's calls (tests/keyring.rs runs them, not traced here).
    all.extend(["request_key".to_string(), "keyctl".to_string()]);
    let refused: Vec<&String> = all.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(
        refused.is_empty(),
        "the unit's SystemCallFilter= refuses calls cryptblk makes: {refused:?}"
    );
}
