//! `cryptblk bench` against `cryptblk serve`: verify runs on one and two
//! queues, data surviving a daemon restart, and interoperability with
//! qemu-storage-daemon's luks driver on one qemu-img LUKS1 image (each
//! reads back what the other wrote).

mod support;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use cryptblk::bench::{run, BenchError, JobSpec, RwMode};
use support::bench::{assert_clean, serve, Luks, Target};

const MIB: u64 = 1 << 20;

fn job(target: &Target, rw: RwMode, bs: u64, iodepth: u32, queues: u32) -> JobSpec {
    JobSpec {
        rw,
        bs,
        iodepth,
        queues,
        ..JobSpec::new(&target.socket)
    }
}

fn key_file(dir: &Path) -> String {
    let path = dir.join("key");
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    std::fs::write(&path, key).unwrap();
    path.to_str().unwrap().to_string()
}

fn serve_fresh(dir: &Path, name: &str, cipher: &str, queues: u32) -> Target {
    serve_fresh_with(dir, name, cipher, queues, &[])
}

fn serve_fresh_with(dir: &Path, name: &str, cipher: &str, queues: u32, extra: &[&str]) -> Target {
    let image = dir.join(format!("{name}.img"));
    let key = key_file(dir);
    let queues = queues.to_string();
    let mut args = vec![
        "--image",
        image.to_str().unwrap(),
        "--size",
        "16M",
        "--key-file",
        &key,
        "--cipher",
        cipher,
        "--queues",
        &queues,
    ];
    args.extend_from_slice(extra);
    serve(dir, name, &args)
}

/// Every crypto placement and I/O path passes the same verify runs under
/// load (QD16 random writes, 256K sequential writes that the workers split,
/// a random read/write mix), on one and on two queues: the page-cache
/// mapping, io_uring (buffered and O_DIRECT) and the synchronous path.
#[test]
fn verify_on_one_and_two_queues_in_every_mode() {
    let modes: [&[&str]; 8] = [
        &["--crypto", "inline", "--direct"],
        &["--crypto", "inline", "--direct", "--aio", "sync"],
        &[
            "--crypto",
            "workers",
            "--split-threshold",
            "64K",
            "--direct",
        ],
        &["--crypto", "inline", "--io", "pread", "--aio", "sync"],
        &["--crypto", "inline"],
        &["--crypto", "inline", "--io", "pread"],
        &[
            "--crypto",
            "workers",
            "--workers",
            "2",
            "--split-threshold",
            "64K",
        ],
        &["--crypto", "workers", "--workers", "1", "--io", "pread"],
    ];
    for (i, mode) in modes.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let target = serve_fresh_with(dir.path(), &format!("m{i}"), "aes-xts-plain64", 2, mode);
        verify_runs(&target);
    }
}

fn verify_runs(target: &Target) {
    for queues in [1, 2] {
        let random = JobSpec {
            size: Some(4 * MIB),
            verify: true,
            seed: u64::from(queues),
            ..job(target, RwMode::RandWrite, 4096, 32, queues)
        };
        let report = run(&random).expect("randwrite verify");
        assert_clean(&report);
        assert_eq!(report.write.bytes, 4 * MIB);

        let sequential = JobSpec {
            len: Some(8 * MIB),
            verify: true,
            ..job(target, RwMode::Write, 256 * 1024, 4, queues)
        };
        let report = run(&sequential).expect("write verify");
        assert_clean(&report);
        assert_eq!(report.verify.as_ref().unwrap().checked_bytes, 8 * MIB);

        let mixed = JobSpec {
            size: Some(2 * MIB),
            verify: true,
            ..job(target, RwMode::RandRw, 8192, 8, queues)
        };
        assert_clean(&run(&mixed).expect("randrw verify"));
    }
}

#[test]
fn plaintext_baseline_verifies_too() {
    let dir = tempfile::tempdir().unwrap();
    let target = serve_fresh(dir.path(), "none", "none", 2);
    let spec = JobSpec {
        len: Some(4 * MIB),
        verify: true,
        ..job(&target, RwMode::Write, 64 * 1024, 8, 2)
    };
    assert_clean(&run(&spec).expect("write verify"));
    // With no cipher the image holds the pattern itself.
    let image = std::fs::read(dir.path().join("none.img")).unwrap();
    let mut bad = 0u64;
    cryptblk::bench::pattern::check(&image[..4 * MIB as usize], 1, 0, |_, _| bad += 1);
    assert_eq!(bad, 0);
}

/// A vhost-user backend serves one frontend at a time; the socket of a busy
/// one still accepts, then answers nothing. The bench must say so and end.
#[test]
fn a_backend_busy_with_another_frontend_is_reported_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let target = serve_fresh(dir.path(), "busy", "aes-xts-plain64", 1);
    let _vmm = UnixStream::connect(&target.socket).unwrap();
    let spec = JobSpec {
        stall_timeout: Duration::from_secs(1),
        ..job(&target, RwMode::Read, 4096, 1, 1)
    };
    let err = run(&spec).unwrap_err();
    assert!(matches!(err, BenchError::NoAnswer { .. }), "{err}");
    assert!(err.to_string().contains("another bench"), "{err}");
}

#[test]
fn written_data_survives_a_restart_and_a_wrong_seed_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let target = serve_fresh(dir.path(), "restart", "aes-xts-plain64", 2);
    let write = JobSpec {
        len: Some(4 * MIB),
        verify: true,
        seed: 31,
        ..job(&target, RwMode::Write, 128 * 1024, 4, 2)
    };
    assert_clean(&run(&write).expect("write verify"));
    target.stop();

    let target = serve_fresh(dir.path(), "restart", "aes-xts-plain64", 2);
    let check = JobSpec {
        verify: false,
        verify_only: true,
        socket: target.socket.clone(),
        ..write
    };
    let report = run(&check).expect("verify-only after restart");
    assert_clean(&report);
    assert_eq!(report.verify.as_ref().unwrap().checked_bytes, 4 * MIB);

    let wrong = JobSpec { seed: 32, ..check };
    let report = run(&wrong).expect("verify-only with another seed");
    assert_eq!(report.mismatches(), 4 * MIB / 512);
}

#[test]
fn cryptblk_and_qsd_luks_read_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let luks = Luks::create(dir.path(), "8M");

    let qsd = luks.qsd(dir.path(), 2);
    let qsd_write = JobSpec {
        verify: true,
        seed: 5,
        ..job(&qsd, RwMode::Write, 64 * 1024, 4, 2)
    };
    let report = run(&qsd_write).expect("write through QSD luks");
    assert_clean(&report);
    let capacity = report.job.len;
    assert!(capacity > 7 * MIB, "the LUKS payload is the device");
    qsd.stop();

    let ours = luks.cryptblk(dir.path(), 2);
    let check = JobSpec {
        verify: false,
        verify_only: true,
        ..job(&ours, RwMode::Read, 64 * 1024, 4, 2)
    };
    let report = run(&JobSpec {
        seed: 5,
        ..check.clone()
    })
    .expect("verify-only on cryptblk");
    assert_clean(&report);
    assert_eq!(report.job.len, capacity, "same device size as QSD");
    assert_eq!(report.verify.as_ref().unwrap().checked_bytes, capacity);

    let our_write = JobSpec {
        len: Some(2 * MIB),
        offset: MIB,
        verify: true,
        seed: 6,
        ..job(&ours, RwMode::RandWrite, 4096, 16, 2)
    };
    assert_clean(&run(&our_write).expect("randwrite through cryptblk"));
    let full_pass = JobSpec {
        rw: RwMode::Write,
        size: None,
        ..our_write
    };
    assert_clean(&run(&full_pass).expect("write through cryptblk"));
    ours.stop();

    let qsd = luks.qsd(dir.path(), 2);
    let back = JobSpec {
        socket: qsd.socket.clone(),
        verify_only: true,
        verify: false,
        seed: 6,
        ..full_pass
    };
    assert_clean(&run(&back).expect("verify-only on QSD luks"));
    // Outside what cryptblk rewrote, QSD still sees its own first pattern.
    let head = JobSpec {
        socket: qsd.socket.clone(),
        len: Some(MIB),
        offset: 0,
        seed: 5,
        ..back
    };
    assert_clean(&run(&head).expect("verify-only of the untouched head"));
}
