//! A single-node Ceph cluster for the integration tests: integration/ceph.sh
//! (one monitor on 127.0.0.1, one memstore OSD, pool `rbd`, cephx) started
//! once per test process in a directory of its own; the script's watcher
//! stops it and removes the directory once the test process has exited
//! (after every daemon the tests started, which are librbd clients, is
//! gone). A missing Ceph fails the test: integration/install-deps.sh
//! installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub struct Cluster {
    /// DIR/ceph.conf: the configuration every client is given (-c).
    pub conf: PathBuf,
    pub dir: PathBuf,
    /// Stopped when dropped (the shared one stops when the process ends).
    private: bool,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/ceph.sh");

/// The cluster of this test process, started on first use (memstore).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| start("shared", "memstore"))
}

/// A cluster of the caller's own (for tests that stop it or kill its
/// OSD), stopped when dropped; `objectstore` "memstore" or "bluestore"
/// (an OSD that must keep its data across a restart).
pub fn private(what: &str, objectstore: &str) -> Cluster {
    let mut c = start(what, objectstore);
    c.private = true;
    c
}

fn start(what: &str, objectstore: &str) -> Cluster {
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("cryptblk-ceph-it.{pid}.{what}"));
    let out = Command::new("bash")
        .arg(SCRIPT)
        .arg("start")
        .arg(&dir)
        .arg(pid.to_string())
        .env("CEPH_OBJECTSTORE", objectstore)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "integration/ceph.sh could not start a Ceph cluster (ceph-mon, ceph-osd, \
         ceph-common: run integration/install-deps.sh)"
    );
    let conf = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let dir = conf.parent().unwrap().to_path_buf();
    Cluster {
        conf,
        dir,
        private: false,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.private && self.dir.exists() {
            self.script("stop");
        }
    }
}

impl Cluster {
    pub fn conf_str(&self) -> &str {
        self.conf.to_str().unwrap()
    }

    /// A name no other test of this process uses.
    pub fn image_name(&self, what: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed))
    }

    /// Creates image `rbd/NAME` of `mib` MiB; returns its `rbd:` spec.
    pub fn create(&self, what: &str, mib: u64) -> (String, String) {
        let name = self.image_name(what);
        self.rbd(&[
            "create",
            "--size",
            &format!("{mib}M"),
            &format!("rbd/{name}"),
        ]);
        (format!("rbd:rbd/{name}"), name)
    }

    /// Runs `rbd -c CONF ARGS`, which must succeed; its stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = self.rbd_output(args);
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `rbd -c CONF ARGS`, whatever it returns.
    pub fn rbd_output(&self, args: &[&str]) -> Output {
        Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rbd (ceph-common) is not installed: integration/install-deps.sh")
    }

    /// `rbd export` of image NAME to a file in `dir`; its bytes.
    pub fn export(&self, name: &str, dir: &Path) -> Vec<u8> {
        let file = dir.join(format!("{name}.export"));
        let _ = std::fs::remove_file(&file);
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{name}"),
            file.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        bytes
    }

    /// The OSD's pid (from its pid file).
    pub fn osd_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.dir.join("osd.0.pid")).expect("osd.0.pid");
        text.trim().parse().unwrap()
    }

    /// Runs `bash integration/ceph.sh VERB DIR` (osd-kill, osd-start,
    /// pause, resume…), which must succeed.
    pub fn script(&self, verb: &str) {
        let st = Command::new("bash")
            .arg(SCRIPT)
            .arg(verb)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status()
            .expect("bash");
        assert!(st.success(), "integration/ceph.sh {verb} failed");
    }

    /// Runs python3 CODE with CEPH_CONF set (python3-rbd's bindings).
    pub fn python(&self, code: &str, args: &[&str]) -> Output {
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(code)
            .args(args)
            .env("CEPH_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .expect("/usr/bin/python3")
    }
}

/// `--image SPEC --ceph-conf CONF` for a daemon on this cluster.
pub fn serve_args<'a>(c: &'a Cluster, spec: &'a str) -> Vec<&'a str> {
    vec!["--image", spec, "--ceph-conf", c.conf_str()]
}

/// librbd's own encryption (python3-rbd's `encryption_load`) on image
/// `rbd/NAME`: `format` "luks1" or "luks2", the passphrase from
/// `passphrase`. The script reads or writes the payload as librbd's
/// encryption layer presents it (the header hidden, offset 0 = first
/// payload byte).
const LIBRBD_IO: &str = r#"
import os, sys, rados, rbd
name, fmt, pw, op, offset, length = sys.argv[1:7]
formats = {"luks1": rbd.RBD_ENCRYPTION_FORMAT_LUKS1, "luks2": rbd.RBD_ENCRYPTION_FORMAT_LUKS2}
with open(pw, "rb") as f:
    passphrase = f.read()
cluster = rados.Rados(conffile=os.environ["CEPH_CONF"])
cluster.conf_set("admin_socket", "")
cluster.connect()
try:
    io = cluster.open_ioctx("rbd")
    with rbd.Image(io, name) as img:
        img.encryption_load(formats[fmt], passphrase)
        if op == "read":
            sys.stdout.buffer.write(img.read(int(offset), int(length)))
        else:
            data = sys.stdin.buffer.read()
            assert len(data) == int(length)
            img.write(data, int(offset))
            img.flush()
    io.close()
finally:
    cluster.shutdown()
"#;

impl Cluster {
    /// Reads `len` payload bytes at `offset` through librbd's encryption.
    pub fn librbd_read(
        &self,
        name: &str,
        format: &str,
        pw: &Path,
        offset: u64,
        len: usize,
    ) -> Vec<u8> {
        let out = self.python(
            LIBRBD_IO,
            &[
                name,
                format,
                pw.to_str().unwrap(),
                "read",
                &offset.to_string(),
                &len.to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "librbd encryption_load/read: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), len);
        out.stdout
    }

    /// Writes `data` at payload `offset` through librbd's encryption.
    pub fn librbd_write(&self, name: &str, format: &str, pw: &Path, offset: u64, data: &[u8]) {
        use std::io::Write;
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(LIBRBD_IO)
            .args([
                name,
                format,
                pw.to_str().unwrap(),
                "write",
                &offset.to_string(),
                &data.len().to_string(),
            ])
            .env("CEPH_CONF", &self.conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3");
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "librbd encryption_load/write: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
