//! `cryptblk demo` runs end to end and leaves nothing behind.

#[test]
fn demo_succeeds_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args(["demo", "--runtime", "1", "--size", "64M", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 mismatching"), "{stdout}");
    assert!(stdout.contains("holds no plaintext"), "{stdout}");
    assert!(stdout.contains("vhost-user-blk-pci"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "demo left {left:?}");
}

#[test]
fn demo_keep_leaves_the_image_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args(["demo", "--keep", "--runtime", "1", "--size", "64M", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(kept.join("demo.img").exists() && kept.join("demo.key").exists());
    assert!(
        !kept.join("demo.sock").exists(),
        "socket must be removed on daemon exit"
    );
}
