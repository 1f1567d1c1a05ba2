//! The one error type of the bench layer. Messages say what to try next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid bench job: {0}")]
    InvalidSpec(String),

    #[error(
        "cannot connect to the vhost-user-blk socket {socket}: {message} \
         (is the daemon running and serving this path?)"
    )]
    Connect { socket: PathBuf, message: String },

    #[error(
        "the vhost-user-blk backend on {socket} did not answer within {secs} s \
         (a backend serves one frontend at a time: is a VMM or another bench connected to it? \
         --stall-timeout sets the wait)"
    )]
    NoAnswer { socket: PathBuf, secs: f64 },

    #[error("device setup failed while {step}: {message}")]
    Setup { step: &'static str, message: String },

    #[error("the I/O engine failed on queue {queue}: {message} (did the daemon exit?)")]
    Io { queue: usize, message: String },

    #[error("cannot read the CPU time of pid {pid} from /proc: {message} (is --pid right?)")]
    ProcStat { pid: u32, message: String },

    #[error(
        "queue {queue}: no completion for {secs} s with {in_flight} request(s) in flight \
         (did the daemon die or hang?)"
    )]
    Stalled {
        queue: usize,
        secs: f64,
        in_flight: usize,
    },

    #[error("the worker thread of queue {0} panicked")]
    WorkerPanic(usize),
}

/// Renders a libblkio error with its errno, which is often the useful part.
pub(crate) fn blkio_message(err: &blkio::Error) -> String {
    format!("{} ({})", err.message(), err.errno())
}
