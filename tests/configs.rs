//! The example configs under configs/ parse and validate (paths aside).

use cryptblk::config::{ServeArgs, ServeConfig};
use cryptblk::socket::Activation;

#[test]
fn every_example_config_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let merged = ServeArgs::from_config_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A config without a socket is a systemd instance's: the socket
        // comes from socket activation.
        let activation = (merged.socket.is_none() && merged.fd.is_none())
            .then_some(Activation { fd: 3, name: None });
        ServeConfig::from_args_and_activation(merged, activation)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(
        seen >= 4,
        "expected the QEMU, cloud-hypervisor, baseline and systemd instance examples"
    );
}
