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
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/ceph.sh");

/// The cluster of this test process, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("cryptblk-ceph-it.{pid}"));
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(&dir)
            .arg(pid.to_string())
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
        Cluster { conf, dir }
    })
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
