//! Keys and passphrases never leave the process: not in argv, the
//! environment, logs (even at trace level) or error messages; and exposed
//! key files are warned about.

mod support;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::luks::{cryptsetup_volume_key, ok};
use support::{pattern, Client, Daemon, BIN};

/// 64 recognisable key bytes.
const KEY: &[u8; 64] = b"KEYMARK-0123456789abcdefKEYMARK-fedcba9876543210KEYMARK-!@#$%^&*";
const PASS: &[u8] = b"PASSMARK-correct horse battery";

/// Every way `secret` could be spelled in a log: raw, hex (either case),
/// as Debug prints a byte slice, and its 8-byte pieces.
fn spellings(secret: &[u8]) -> Vec<Vec<u8>> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let debug = format!("{:?}", &secret[..8]);
    let debug = debug.trim_end_matches(']').to_string();
    let mut v = vec![
        secret.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        debug.into_bytes(),
    ];
    v.extend(secret.chunks(8).map(|c| c.to_vec()));
    v.extend(hex.as_bytes().chunks(16).map(|c| c.to_vec()));
    v
}

/// How `secret` shows in `haystack`, if it does in any of its spellings.
fn find_secret(secret: &[u8], haystack: &[u8]) -> Option<String> {
    spellings(secret)
        .into_iter()
        .find(|s| haystack.windows(s.len()).any(|w| w == s))
        .map(|s| String::from_utf8_lossy(&s).into_owned())
}

fn assert_absent(secret: &[u8], haystack: &[u8], where_: &str) {
    if let Some(spelling) = find_secret(secret, haystack) {
        panic!("{where_} contains the secret as {spelling:?}");
    }
}

/// The descriptors of process `pid` open on `file`.
fn descriptors_on(pid: u32, file: &Path) -> Vec<String> {
    let file = std::fs::canonicalize(file).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).ok().as_deref() == Some(file.as_path()))
        .map(|fd| fd.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The line the daemon logs at trace level once it holds the volume key:
/// the key's Debug, which must be redacted. Requiring it proves that trace
/// logging ran and that the key itself went through the logger.
fn logged_the_key_at_trace_level(logs: &[u8]) -> bool {
    String::from_utf8_lossy(logs)
        .lines()
        .any(|l| l.contains(" TRACE ") && l.contains("volume key Some(XtsKey("))
}

/// The daemon at trace level, its stdout and stderr kept in files.
struct Run {
    d: Daemon,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    fn start(dir: &Path, args: &[&str]) -> Run {
        Self::start_with_stdin(dir, args, None)
    }

    /// `start`, with `stdin` written to the daemon's standard input (then
    /// closed).
    fn start_with_stdin(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let socket = dir.join("s.sock");
        let (out, err) = (dir.join("stdout"), dir.join("stderr"));
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--log-level", "trace", "--socket"])
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "trace")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::from(File::create(&out).unwrap()))
            .stderr(Stdio::from(File::create(&err).unwrap()));
        let mut d = Daemon::spawn_unwaited(command, socket, "cryptblk");
        if let Some(bytes) = stdin {
            use std::io::Write;
            let mut pipe = d.child.stdin.take().unwrap();
            pipe.write_all(bytes).unwrap();
        }
        Run { d, out, err }
    }

    /// Waits for the socket (true) or the exit (false).
    fn serving(&mut self) -> bool {
        self.d.listening().is_ok()
    }

    /// Stops the daemon; returns stdout + stderr.
    fn finish(mut self) -> Vec<u8> {
        self.d.signal(libc::SIGTERM);
        self.d.wait_exit(Duration::from_secs(30));
        let mut all = std::fs::read(&self.out).unwrap();
        all.extend(std::fs::read(&self.err).unwrap());
        all
    }

    fn proc_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(format!("/proc/{}/{name}", self.d.pid)).unwrap()
    }
}

/// Kills the child if a check fails before it was stopped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_str().unwrap().to_string()
}

fn exercise(socket: &Path) {
    let mut c = Client::connect(socket, 1);
    let data = pattern(1, 0, 65536);
    assert_eq!(c.write(0, 0, &data), 0);
    assert_eq!(c.read(0, 0, data.len()).unwrap(), data);
}

/// From a key file and from standard input (`--key-file -`): the key is
/// in no log line (at trace level, where the key's Debug is logged), not in
/// argv or the environment, and no descriptor on the key file stays open.
#[test]
fn a_plain_key_never_shows_in_logs_argv_environment_or_descriptors() {
    for from_stdin in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "key", KEY, 0o600);
        let img = dir.path().join("disk.img");
        let mut r = Run::start_with_stdin(
            dir.path(),
            &[
                "--image",
                img.to_str().unwrap(),
                "--size",
                "4M",
                "--key-file",
                if from_stdin { "-" } else { &key },
                "--queues",
                "1",
            ],
            from_stdin.then_some(&KEY[..]),
        );
        assert!(r.serving(), "stdin {from_stdin}");
        exercise(&r.d.socket);
        assert_absent(KEY, &r.proc_file("cmdline"), "/proc/PID/cmdline");
        assert_absent(KEY, &r.proc_file("environ"), "/proc/PID/environ");
        let open = descriptors_on(r.d.pid, Path::new(&key));
        assert!(
            open.is_empty(),
            "the daemon keeps the key file open: fds {open:?}"
        );
        let logs = r.finish();
        assert_absent(KEY, &logs, "the logs");
        assert!(
            logged_the_key_at_trace_level(&logs),
            "stdin {from_stdin}: no trace-level line with the (redacted) key:\n{}",
            String::from_utf8_lossy(&logs)
        );
        // The image holds ciphertext only, never the key either.
        assert_absent(KEY, &std::fs::read(&img).unwrap(), "the image");
    }
}

/// The checks above can fail: a process that does hold the key in its
/// argv (hex), its environment (raw) and a descriptor (its stdin) is caught
/// by each of them, and a log without the trace line is told apart.
#[test]
fn the_checks_find_a_key_that_is_there() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY, 0o600);
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    let leaky = Command::new("sleep")
        .arg0(&hex)
        .arg("30")
        .env("LEAKED_KEY", std::ffi::OsStr::from_bytes(KEY))
        .stdin(File::open(&key).unwrap())
        .spawn()
        .unwrap();
    let leaky = Reap(leaky);
    let pid = leaky.0.id();
    let proc_file = |name: &str| std::fs::read(format!("/proc/{pid}/{name}")).unwrap();
    // Until it has exec'ed, /proc shows the test binary's argv.
    support::wait_until(Duration::from_secs(10), "sleep never started", || {
        proc_file("cmdline").starts_with(hex.as_bytes())
    });
    assert!(find_secret(KEY, &proc_file("cmdline")).is_some(), "argv");
    assert!(
        find_secret(KEY, &proc_file("environ")).is_some(),
        "environment"
    );
    assert_eq!(descriptors_on(pid, Path::new(&key)), ["0"], "descriptor");
    drop(leaky);
    let info_only = b"[2026-01-01T00:00:00Z INFO  cryptblk::daemon] serving 4194304 bytes";
    assert!(!logged_the_key_at_trace_level(info_only));
    let debug_leak = format!("[2026-01-01T00:00:00Z TRACE cryptblk::config] volume key {KEY:?}");
    assert!(!logged_the_key_at_trace_level(debug_leak.as_bytes()));
    assert!(
        find_secret(KEY, debug_leak.as_bytes()).is_some(),
        "a Debug-printed key"
    );
}

#[test]
fn a_key_of_the_wrong_length_is_refused_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", &KEY[..63], 0o600);
    let img = dir.path().join("disk.img");
    let mut r = Run::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--size",
            "4M",
            "--key-file",
            &key,
        ],
    );
    assert!(!r.serving(), "a 63-byte key was accepted");
    let logs = r.finish();
    assert!(String::from_utf8_lossy(&logs).contains("63 bytes"));
    assert_absent(&KEY[..63], &logs, "the error");
}

#[test]
fn luks_passphrases_and_volume_keys_never_show_even_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pass = key_file(dir.path(), "pass", PASS, 0o600);
    let img = dir.path().join("disk.luks");
    let out = ok(Command::new(BIN).args([
        "format",
        "--type",
        "luks2",
        "--image",
        img.to_str().unwrap(),
        "--size",
        "4M",
        "--key-file",
        &pass,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ]));
    let mut format_out = out.stdout;
    format_out.extend(out.stderr);
    assert_absent(PASS, &format_out, "format's output");
    let volume_key = cryptsetup_volume_key(&img, Path::new(&pass));
    assert_absent(&volume_key, &format_out, "format's output");

    let mut r = Run::start(
        dir.path(),
        &[
            "--image",
            img.to_str().unwrap(),
            "--key-file",
            &pass,
            "--queues",
            "1",
        ],
    );
    assert!(r.serving());
    exercise(&r.d.socket);
    assert_absent(PASS, &r.proc_file("cmdline"), "/proc/PID/cmdline");
    let open = descriptors_on(r.d.pid, Path::new(&pass));
    assert!(
        open.is_empty(),
        "the daemon keeps the passphrase file open: {open:?}"
    );
    let logs = r.finish();
    assert_absent(PASS, &logs, "the logs");
    assert_absent(&volume_key, &logs, "the logs");
    assert!(
        logged_the_key_at_trace_level(&logs),
        "no trace-level line with the (redacted) volume key:\n{}",
        String::from_utf8_lossy(&logs)
    );

    let wrong_pass = b"PASSMARK-wrong horse battery";
    let wrong = key_file(dir.path(), "wrong", wrong_pass, 0o600);
    let mut r = Run::start(
        dir.path(),
        &["--image", img.to_str().unwrap(), "--key-file", &wrong],
    );
    assert!(!r.serving(), "a wrong passphrase opened the image");
    let logs = r.finish();
    assert!(String::from_utf8_lossy(&logs).contains("passphrase"));
    assert_absent(wrong_pass, &logs, "the error");
    assert_absent(PASS, &logs, "the error");
    assert_absent(&volume_key, &logs, "the error");
}

#[test]
fn key_files_readable_by_others_get_a_warning() {
    for (mode, warned) in [(0o644, true), (0o640, true), (0o600, false), (0o400, false)] {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "key", KEY, mode);
        let img = dir.path().join("disk.img");
        let mut r = Run::start(
            dir.path(),
            &[
                "--image",
                img.to_str().unwrap(),
                "--size",
                "1M",
                "--key-file",
                &key,
            ],
        );
        assert!(r.serving());
        let logs = String::from_utf8_lossy(&r.finish()).into_owned();
        assert_eq!(
            logs.contains("readable by group or others"),
            warned,
            "mode {mode:o}: {logs}"
        );
    }
}

/// The owner of the files in /proc/PID: the process's uid while it is
/// dumpable, root once it is not (proc(5), PR_SET_DUMPABLE).
fn proc_owner(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid()
}

const NOBODY: u32 = 65534;

fn as_nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program);
    c
}

#[test]
fn the_daemon_is_not_dumpable_and_its_key_pages_are_locked() {
    // Run as an unprivileged user: a root process's /proc entries belong to
    // root either way.
    let dir = tempfile::tempdir().unwrap();
    // The daemon's user owns the directory it creates image and socket in
    // (a world-writable one without sticky bit is refused).
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let key = key_file(dir.path(), "key", KEY, 0o600);
    std::os::unix::fs::chown(&key, Some(NOBODY), Some(NOBODY)).unwrap();
    let img = dir.path().join("disk.img");
    let socket = dir.path().join("s.sock");
    let mut command = as_nobody(BIN);
    command
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--image", img.to_str().unwrap(), "--size", "1M"])
        .args(["--key-file", &key])
        .stderr(Stdio::null());
    let control = Reap(as_nobody("sleep").arg("30").spawn().unwrap());
    // setpriv (util-linux) execs the daemon: the pid is the daemon's. The
    // wait for its socket gives the control's setpriv time to exec too.
    let daemon = Daemon::spawn(command, socket, "setpriv cryptblk");
    // setpriv has exec'ed by now: both pids are the programs themselves.
    assert_eq!(proc_owner(control.0.id()), NOBODY, "control");
    assert_eq!(
        proc_owner(daemon.pid),
        0,
        "the daemon is dumpable: its memory is open to its user's other processes"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid)).unwrap();
    let locked = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse::<u64>()
        .unwrap();
    assert!(locked >= 4, "no key pages are mlock'ed: VmLck {locked} kB");
    drop(control);
    assert!(daemon.terminate().success());
}
