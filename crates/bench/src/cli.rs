//! The `cryptblk bench` command line: a thin layer over [`super::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::spec::{JobSpec, RwMode};
use cryptblk_units::parse_bytes;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RwArg {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl From<RwArg> for RwMode {
    fn from(arg: RwArg) -> Self {
        match arg {
            RwArg::Read => Self::Read,
            RwArg::Write => Self::Write,
            RwArg::Randread => Self::RandRead,
            RwArg::Randwrite => Self::RandWrite,
            RwArg::Randrw => Self::RandRw,
        }
    }
}

/// Load-test any vhost-user-blk socket (cryptblk, qemu-storage-daemon,
/// cloud-hypervisor's vhost_user_block) like fio would.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 when every request succeeded and every check matched, \
1 when requests failed or data mismatched (the report says where), 2 when the job could not run."
)]
pub struct BenchArgs {
    /// The vhost-user-blk socket to connect to.
    #[arg(long)]
    socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: RwArg,
    /// Percentage of reads with --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Request size, 512 to 4m (suffixes k, m: powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_bytes)]
    bs: u64,
    /// Requests in flight on each queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u32,
    /// Virtqueues to use, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Stop after this many seconds (fractions allowed).
    #[arg(long, value_parser = parse_secs)]
    runtime: Option<Duration>,
    /// Stop after this many bytes over all queues (default without
    /// --runtime: one pass over the region).
    #[arg(long, value_parser = parse_bytes)]
    size: Option<u64>,
    /// Start of the region, in bytes.
    #[arg(long, default_value = "0", value_parser = parse_bytes)]
    offset: u64,
    /// Length of the region (default: to the end of the device).
    #[arg(long, value_parser = parse_bytes)]
    len: Option<u64>,
    /// Seeds offsets, the read/write mix and the verify pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a (seed, offset) pattern, read it back and compare.
    #[arg(long, conflicts_with = "verify_only")]
    verify: bool,
    /// Only check that the region holds the pattern of --seed.
    #[arg(long)]
    verify_only: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The target daemon's pid: report its CPU time per I/O.
    #[arg(long)]
    pid: Option<u32>,
    /// Fail when the backend does not answer the connection, or no request
    /// completes, for this many seconds.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    stall_timeout: Duration,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

impl BenchArgs {
    pub fn to_spec(&self) -> JobSpec {
        JobSpec {
            socket: self.socket.clone(),
            rw: self.rw.into(),
            rwmixread: self.rwmixread,
            bs: self.bs,
            iodepth: self.iodepth,
            queues: self.queues,
            runtime: self.runtime,
            size: self.size,
            offset: self.offset,
            len: self.len,
            seed: self.seed,
            verify: self.verify,
            verify_only: self.verify_only,
            pid: self.pid,
            progress: std::io::stderr().is_terminal(),
            stall_timeout: self.stall_timeout,
        }
    }
}

/// Runs the command; returns the process exit code: 0 clean, 1 when
/// requests failed or data mismatched, 2 when the job could not run.
pub fn main(args: BenchArgs) -> i32 {
    let report = match super::run(&args.to_spec()) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("cryptblk bench: {err}");
            return 2;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("cryptblk bench: cannot encode the report as JSON: {err}");
                return 2;
            }
        }
    } else {
        print!("{}", report.to_table());
    }
    if report.is_clean() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<JobSpec, clap::Error> {
        let argv = ["bench", "--socket", "/tmp/s"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| cli.args.to_spec())
    }

    #[test]
    fn parses_fio_style_options() {
        let spec = parse(&[
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "128K",
            "--iodepth",
            "32",
            "--queues",
            "2",
            "--runtime",
            "1.5",
            "--offset",
            "1m",
            "--len",
            "64m",
        ])
        .unwrap();
        assert_eq!(spec.rw, RwMode::RandRw);
        assert_eq!(
            (spec.rwmixread, spec.bs, spec.iodepth, spec.queues),
            (70, 128 << 10, 32, 2)
        );
        assert_eq!(spec.runtime, Some(Duration::from_millis(1500)));
        assert_eq!((spec.offset, spec.len), (1 << 20, Some(64 << 20)));
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn defaults_and_rejections() {
        let spec = parse(&[]).unwrap();
        assert_eq!(
            (spec.rw, spec.bs, spec.iodepth),
            (RwMode::RandRead, 4096, 1)
        );
        assert!(parse(&["--verify", "--verify-only"]).is_err());
        assert!(parse(&["--rwmixread", "101"]).is_err());
        assert!(parse(&["--bs", "4q"]).is_err());
        assert!(parse(&["--runtime", "-1"]).is_err());
    }
}
