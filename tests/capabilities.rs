//! The vhost-user backend program conventions (QEMU's
//! docs/interop/vhost-user.rst): `--print-capabilities` prints what QEMU's
//! docs/interop/vhost-user.json describes, configs/50-cryptblk.json is a
//! valid backend description, and the options the capabilities advertise
//! work on the program itself, without a subcommand.

mod support;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

/// VHostUserBackendBlockFeature in QEMU's docs/interop/vhost-user.json:
/// every block feature the schema defines.
const SCHEMA_BLOCK_FEATURES: [&str; 2] = ["read-only", "blk-file"];
/// VhostUserBackend's members in the same schema ("tags" is optional).
const DESCRIPTION_KEYS: [&str; 4] = ["description", "type", "binary", "tags"];

fn capabilities(args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON: {e}"))
}

#[test]
fn print_capabilities_is_block_json_with_schema_features_only() {
    let caps = capabilities(&["--print-capabilities"]);
    assert_eq!(caps["type"], "block", "{caps}");
    let features = caps["features"].as_array().expect("a features list");
    assert!(!features.is_empty());
    for f in features {
        let f = f.as_str().expect("features are strings");
        assert!(
            SCHEMA_BLOCK_FEATURES.contains(&f),
            "{f} is no block feature"
        );
    }
    let keys: Vec<&String> = caps.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["features", "type"]);
    // The conventions: other options and arguments are ignored.
    assert_eq!(capabilities(&["serve", "--print-capabilities"]), caps);
    assert_eq!(
        capabilities(&["--print-capabilities", "--no-such-option", "x"]),
        caps
    );
    // Control: without the flag, an unknown option is an error.
    let out = Command::new(BIN).arg("--no-such-option").output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_description_file_names_this_program_as_a_block_backend() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{dir}/configs/50-cryptblk.json")).unwrap();
    let desc: Value = serde_json::from_str(&text).unwrap();
    let members = desc.as_object().unwrap();
    for key in members.keys() {
        assert!(DESCRIPTION_KEYS.contains(&key.as_str()), "{key}");
    }
    assert_eq!(desc["type"], "block");
    assert!(desc["description"].as_str().is_some_and(|d| !d.is_empty()));
    let binary = desc["binary"].as_str().unwrap();
    assert!(binary.starts_with('/') && binary.ends_with("/cryptblk"));
    // The same program the systemd unit starts.
    let unit = std::fs::read_to_string(format!("{dir}/configs/cryptblk@.service")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={binary} serve")),
        "{binary}"
    );
}

/// `cryptblk ARGS` (no subcommand) on DIR/s.sock with a 4M plaintext image.
fn serve_by_convention(dir: &Path, extra: &[&str]) -> Daemon {
    let socket = dir.join("s.sock");
    let image = dir.join("disk.img");
    let mut command = Command::new(BIN);
    command
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--blk-file={}", image.display()))
        .args(["--size", "4M", "--cipher", "none", "--queues", "1"])
        .args(extra)
        .stdout(Stdio::null());
    Daemon::spawn(command, socket, "cryptblk")
}

#[test]
fn the_advertised_options_work_without_a_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(9, 0, 4096);
    // Control: read-write without --read-only.
    let d = serve_by_convention(dir.path(), &[]);
    let mut c = Client::connect(&d.socket, 1);
    assert!(!c.blkio_read_only());
    assert_eq!(c.write(0, 0, &data), 0);
    drop(c);
    assert!(d.terminate().success());

    let d = serve_by_convention(dir.path(), &["--read-only"]);
    let mut c = Client::connect_with(&d.socket, 1, true);
    assert!(
        c.blkio_read_only(),
        "--read-only did not offer a read-only disk"
    );
    assert_eq!(
        c.read(0, 0, 4096).unwrap(),
        data,
        "--blk-file is another image"
    );
    drop(c);
    assert!(d.terminate().success());
}
