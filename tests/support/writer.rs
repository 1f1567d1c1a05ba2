//! A VMM stand-in in a child process, for tests that kill it or the daemon
//! mid-write: the test binary runs itself again as
//! `--exact writer_process --ignored` with `WRITER_ENV` set. The child
//! writes blocks in order at queue depth 1 and prints each write's number
//! and block after its completion, before submitting the next; whatever the
//! parent has read from its stdout was acknowledged.
//!
//! Each binary that uses it has
//! `#[test] #[ignore = "..."] fn writer_process() { common::writer::child_main() }`.
//! The child first prints `CHILD_RAN`; the parent refuses to count a run
//! without it, so a filter that stops matching (a renamed function, a
//! changed harness flag) fails the test instead of passing with no writes.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{pattern, Client};

pub const WRITER_ENV: &str = "CRYPTBLK_TEST_WRITER";
/// The child's first line of output.
pub const CHILD_RAN: &str = "CHILD-RAN writer_process";
/// The name of the ignored test each binary defines for the child.
const CHILD_TEST: &str = "writer_process";

/// What the writes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `pattern(seed, offset, len)`: the same bytes each time a block is
    /// written.
    Pattern,
    /// `marker(seed, i, len)`: a recognisable plaintext marker, different
    /// for every write.
    Marker,
}

/// One writer's job: `block`-byte writes cycling over `blocks` blocks.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub fill: Fill,
    pub seed: u64,
    pub block: usize,
    pub blocks: u64,
}

impl Job {
    /// What write number `i` puts into its block.
    pub fn data(&self, i: u64) -> Vec<u8> {
        let block = i % self.blocks;
        match self.fill {
            Fill::Pattern => pattern(self.seed, block * self.block as u64, self.block),
            Fill::Marker => marker(self.seed, i, self.block),
        }
    }

    pub fn offset(&self, i: u64) -> u64 {
        (i % self.blocks) * self.block as u64
    }

    fn encode(&self) -> String {
        let fill = match self.fill {
            Fill::Pattern => "pattern",
            Fill::Marker => "marker",
        };
        format!("{fill}|{}|{}|{}", self.seed, self.block, self.blocks)
    }

    fn decode(s: &str) -> Job {
        let f: Vec<&str> = s.split('|').collect();
        assert_eq!(f.len(), 4, "bad job {s}");
        Job {
            fill: match f[0] {
                "pattern" => Fill::Pattern,
                "marker" => Fill::Marker,
                other => panic!("bad fill {other}"),
            },
            seed: f[1].parse().unwrap(),
            block: f[2].parse().unwrap(),
            blocks: f[3].parse().unwrap(),
        }
    }
}

/// The 8 bytes every 16-byte unit of a marker write starts with.
pub const MARKER_TAG: &[u8; 8] = b"PLAIN!TX";

/// `len` bytes of 16-byte units: `MARKER_TAG`, then the write's id and the
/// unit's index (both u32, little endian), so that any 16 bytes of it say
/// which write they came from and where they belong.
pub fn marker(seed: u64, i: u64, len: usize) -> Vec<u8> {
    let id = (seed as u32).wrapping_mul(0x10001).wrapping_add(i as u32);
    let mut out = Vec::with_capacity(len + 16);
    let mut unit = 0u32;
    while out.len() < len {
        out.extend_from_slice(MARKER_TAG);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&unit.to_le_bytes());
        unit += 1;
    }
    out.truncate(len);
    out
}

/// Where `MARKER_TAG` first occurs in `bytes`, at any byte offset.
pub fn find_marker(bytes: &[u8]) -> Option<usize> {
    let first = MARKER_TAG[0];
    let last = bytes.len().checked_sub(MARKER_TAG.len())?;
    (0..=last).find(|&i| bytes[i] == first && &bytes[i..i + MARKER_TAG.len()] == MARKER_TAG)
}

/// The child's side: the body of each binary's `writer_process`.
pub fn child_main() {
    let spec = std::env::var(WRITER_ENV).unwrap_or_else(|_| {
        panic!("{CHILD_TEST} is not a test of its own: its parent runs it with {WRITER_ENV} set")
    });
    let (socket, job) = spec.split_once('|').expect("socket|job");
    let job = Job::decode(job);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{CHILD_RAN}").unwrap();
    out.flush().unwrap();
    let mut c = Client::connect(Path::new(socket), 1);
    for i in 0u64.. {
        let ret = c.write(0, job.offset(i), &job.data(i));
        if ret != 0 {
            writeln!(out, "ERR {ret}").unwrap();
            std::process::exit(3);
        }
        writeln!(out, "ACK {i}").unwrap();
        out.flush().unwrap();
    }
}

enum Line {
    Ran,
    Ack(u64),
}

/// The parent's side: a running writer child.
pub struct Writer {
    child: Child,
    lines: Receiver<Line>,
    ran: bool,
    /// The numbers of the writes acknowledged so far (0, 1, 2, ...).
    acked: Vec<u64>,
}

impl Writer {
    pub fn spawn(socket: &Path, job: Job) -> Writer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                CHILD_TEST,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, format!("{}|{}", socket.display(), job.encode()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // With --nocapture the harness's "test writer_process ... "
                // comes first, on the same line.
                let parsed = if line.ends_with(CHILD_RAN) {
                    Line::Ran
                } else if let Some(n) = line.strip_prefix("ACK ") {
                    Line::Ack(n.parse().unwrap())
                } else {
                    continue;
                };
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        Writer {
            child,
            lines,
            ran: false,
            acked: Vec::new(),
        }
    }

    fn take(&mut self, line: Line) {
        match line {
            Line::Ran => self.ran = true,
            Line::Ack(i) => {
                assert!(self.ran, "an ACK before {CHILD_RAN}");
                assert_eq!(
                    i,
                    self.acked.len() as u64,
                    "writes acknowledged out of order"
                );
                self.acked.push(i);
            }
        }
    }

    /// Waits until `n` writes were acknowledged.
    pub fn wait_acks(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.acked.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(e) => panic!(
                    "writer stalled after {} acks ({e:?}){}",
                    self.acked.len(),
                    if self.ran {
                        ""
                    } else {
                        "; the child never ran writer_process: does --exact still match it?"
                    }
                ),
            }
        }
    }

    /// SIGKILLs the writer (if still running) and returns the numbers of
    /// every write it reported as acknowledged, in order.
    pub fn kill(mut self) -> Vec<u64> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(5)) {
                Ok(line) => self.take(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("writer's stdout never closed"),
            }
        }
        assert!(
            self.ran,
            "the writer child never printed {CHILD_RAN}: does --exact still match it?"
        );
        std::mem::take(&mut self.acked)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
