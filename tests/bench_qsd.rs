//! `cryptblk bench` against qemu-storage-daemon, the reference
//! vhost-user-blk backend: data written is read back intact on one and two
//! queues, reports add up, and a wrong seed is caught.

mod support;
use std::process::Command;
use std::time::{Duration, Instant};

use cryptblk::bench::{run, BenchError, JobSpec, Report, RwMode};
use support::bench::{assert_clean, Qsd};

const MIB: u64 = 1 << 20;

fn spec(qsd: &Qsd, rw: RwMode, bs: u64, iodepth: u32, queues: u32) -> JobSpec {
    JobSpec {
        rw,
        bs,
        iodepth,
        queues,
        ..JobSpec::new(qsd.socket())
    }
}

#[test]
fn random_writes_verify_on_one_queue() {
    let qsd = Qsd::raw(16 * MIB, 2);
    let job = JobSpec {
        size: Some(4 * MIB),
        verify: true,
        ..spec(&qsd, RwMode::RandWrite, 4096, 16, 1)
    };
    let report = run(&job).expect("bench run");
    assert_clean(&report);
    assert_eq!(report.write.bytes, 4 * MIB);
    assert_eq!(report.write.ios, 1024);
    assert_eq!(report.read.ios, 0);
    let verify = report.verify.as_ref().expect("a verify section");
    // Random offsets repeat, so fewer distinct blocks than writes are checked.
    assert!(verify.checked_bytes > 0 && verify.checked_bytes <= 4 * MIB);
    assert!(report.elapsed_secs > 0.0);
}

#[test]
fn sequential_writes_verify_on_two_queues() {
    let qsd = Qsd::raw(16 * MIB, 2);
    let job = JobSpec {
        len: Some(8 * MIB),
        verify: true,
        ..spec(&qsd, RwMode::Write, MIB, 4, 2)
    };
    let report = run(&job).expect("bench run");
    assert_clean(&report);
    // One pass over the 8 MiB region, every byte read back.
    assert_eq!(report.write.bytes, 8 * MIB);
    assert_eq!(report.verify.as_ref().unwrap().checked_bytes, 8 * MIB);
    let image = std::fs::read(qsd.image()).unwrap();
    let mut bad = 0;
    cryptblk::bench::pattern::check(&image[..8 * MIB as usize], 1, 0, |_, _| bad += 1);
    assert_eq!(
        bad, 0,
        "the image itself holds the pattern at the right offsets"
    );
}

#[test]
fn mixed_random_verify_on_two_queues_with_region() {
    let qsd = Qsd::raw(16 * MIB, 2);
    let job = JobSpec {
        offset: MIB,
        len: Some(2 * MIB),
        size: Some(4 * MIB),
        rwmixread: 40,
        verify: true,
        seed: 99,
        ..spec(&qsd, RwMode::RandRw, 8192, 8, 2)
    };
    let report = run(&job).expect("bench run");
    assert_clean(&report);
    assert_eq!(report.read.bytes + report.write.bytes, 4 * MIB);
    assert!(report.read.ios > 0 && report.write.ios > 0);
    // Nothing outside the region was touched.
    let image = std::fs::read(qsd.image()).unwrap();
    assert!(image[..MIB as usize].iter().all(|&b| b == 0));
    assert!(image[3 * MIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn verify_only_with_another_seed_reports_mismatches() {
    let qsd = Qsd::raw(4 * MIB, 2);
    let write = JobSpec {
        len: Some(MIB),
        verify: true,
        seed: 7,
        ..spec(&qsd, RwMode::Write, 64 * 1024, 4, 2)
    };
    assert_clean(&run(&write).expect("write run"));

    let same_seed = JobSpec {
        verify_only: true,
        verify: false,
        ..write.clone()
    };
    let report = run(&same_seed).expect("verify-only run");
    assert_clean(&report);
    assert_eq!(report.verify.as_ref().unwrap().checked_bytes, MIB);

    let other_seed = JobSpec {
        seed: 8,
        ..same_seed
    };
    let report = run(&other_seed).expect("verify-only run");
    let verify = report.verify.as_ref().unwrap();
    assert_eq!(verify.mismatches, MIB / 512, "every unit mismatches");
    assert!(!report.is_clean());
    let first = &verify.first_mismatches[0];
    assert_eq!(first.offset, 0);
    let json = serde_json::to_value(first).unwrap();
    assert_eq!(json["found"]["kind"], "other_seed");
    assert_eq!(json["found"]["seed"], 7);
}

#[test]
fn unwritten_region_fails_verify_only() {
    let qsd = Qsd::raw(MIB, 1);
    let job = JobSpec {
        verify_only: true,
        ..spec(&qsd, RwMode::Read, 4096, 4, 1)
    };
    let report = run(&job).expect("verify-only run");
    assert_eq!(report.mismatches(), MIB / 512);
    assert_eq!(report.read.bytes, MIB);
}

#[test]
fn too_many_queues_and_missing_socket_are_errors() {
    let qsd = Qsd::raw(MIB, 2);
    let err = run(&spec(&qsd, RwMode::Read, 4096, 1, 4)).unwrap_err();
    assert!(matches!(err, BenchError::InvalidSpec(_)), "{err}");
    assert!(err.to_string().contains("--queues 2"), "{err}");

    let missing = JobSpec::new(qsd.dir.path().join("nope.sock"));
    let err = run(&missing).unwrap_err();
    assert!(matches!(err, BenchError::Connect { .. }), "{err}");
}

#[test]
fn cli_prints_json_and_daemon_cpu() {
    let qsd = Qsd::raw(8 * MIB, 2);
    let output = Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args(["bench", "--socket"])
        .arg(qsd.socket())
        .args([
            "--rw",
            "randwrite",
            "--bs",
            "4k",
            "--iodepth",
            "8",
            "--queues",
            "2",
        ])
        .args(["--size", "2m", "--verify", "--json", "--pid"])
        .arg(qsd.pid().to_string())
        .output()
        .expect("run cryptblk bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {}: {stderr}", output.status);
    assert!(stderr.is_empty(), "no progress line off a TTY: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(report["write"]["bytes"], 2 * MIB);
    assert_eq!(report["write"]["ios"], 512);
    assert!(report["total"]["iops"].as_f64().unwrap() > 0.0);
    assert!(report["write"]["latency_us"]["p99_9"].as_f64().unwrap() > 0.0);
    assert_eq!(report["verify"]["mismatches"], 0);
    assert_eq!(report["errors"], serde_json::json!({}));
    assert_eq!(report["daemon_cpu"]["pid"], qsd.pid());
    assert!(report["daemon_cpu"]["us_per_io"].as_f64().unwrap() >= 0.0);
    // The library's Report reads the same JSON back.
    let parsed: Report = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(parsed.job.queues, 2);

    let table = Command::new(env!("CARGO_BIN_EXE_cryptblk"))
        .args(["bench", "--socket"])
        .arg(qsd.socket())
        .args(["--verify-only", "--seed", "12345", "--len", "64k"])
        .output()
        .expect("run cryptblk bench");
    assert_eq!(table.status.code(), Some(1), "mismatches exit with 1");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("128 mismatching"), "{text}");
}

#[test]
fn verify_only_names_misplaced_blocks() {
    let qsd = Qsd::raw(4 * MIB, 1);
    let write = JobSpec {
        len: Some(64 * 1024),
        verify: true,
        ..spec(&qsd, RwMode::Write, 4096, 4, 1)
    };
    assert_clean(&run(&write).expect("write run"));
    // Swap blocks 1 and 2 behind the daemon's back (it reads through the
    // same page cache), as a backend with an offset bug would.
    let image = qsd.image();
    let mut data = std::fs::read(&image).unwrap();
    let (one, two) = data[4096..12288].split_at_mut(4096);
    one.swap_with_slice(two);
    std::fs::write(&image, &data).unwrap();

    let check = JobSpec {
        verify: false,
        verify_only: true,
        ..write
    };
    let report = run(&check).expect("verify-only run");
    let verify = report.verify.unwrap();
    assert_eq!(verify.mismatches, 16, "two 4 KiB blocks of 8 units");
    let first = serde_json::to_value(&verify.first_mismatches[0]).unwrap();
    assert_eq!(first["offset"], 4096);
    assert_eq!(first["found"]["kind"], "misplaced");
    assert_eq!(first["found"]["from_offset"], 8192);
}

#[test]
fn a_hung_daemon_is_reported_not_waited_for() {
    let qsd = Qsd::raw(16 * MIB, 1);
    let pid = qsd.pid() as i32;
    let job = JobSpec {
        runtime: Some(Duration::from_secs(30)),
        stall_timeout: Duration::from_millis(500),
        ..spec(&qsd, RwMode::RandRead, 4096, 8, 1)
    };
    let started = Instant::now();
    let running = std::thread::spawn(move || run(&job));
    // Let it connect and run, then freeze the daemon mid-flight.
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: plain syscalls on the pid of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let result = running.join().expect("bench thread");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    match result {
        Err(BenchError::Stalled { in_flight, .. }) => assert!(in_flight > 0),
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}
