//! The example configs under configs/ parse and validate (paths aside).

use cryptblk::config::{ServeArgs, ServeConfig};

#[test]
fn every_example_config_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let merged = args
            .with_config_file()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        ServeConfig::from_args(merged).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected the QEMU, cloud-hypervisor and baseline examples"
    );
}
