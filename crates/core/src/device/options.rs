//! What the operator chose for the device: queues, placement, the I/O
//! engine. The config layer fills these in; features and limits follow.

/// Where a request's crypto (and I/O) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CryptoMode {
    /// On the vring thread that popped the request (no hand-off).
    Inline,
    /// On a bounded pool of worker threads; large requests are split.
    Workers,
}

/// How image I/O that does not go through the page-cache mapping runs
/// (QEMU's `aio=` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
pub enum AioMode {
    /// Many requests per queue in flight through io_uring (default);
    /// falls back to `sync` with a warning where the kernel refuses it.
    #[value(name = "io_uring")]
    #[serde(rename = "io_uring")]
    IoUring,
    /// One request at a time per queue, pread/pwrite on the vring thread.
    #[value(name = "sync")]
    #[serde(rename = "sync")]
    Sync,
}

/// What the operator chose for the device (not the image).
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub queues: usize,
    pub queue_size: u16,
    pub readonly: bool,
    pub allow_discards: bool,
    pub serial: String,
    pub crypto: CryptoMode,
    pub workers: usize,
    pub split_threshold: usize,
    pub aio: AioMode,
    /// Offer INFLIGHT_SHMFD (requests survive a daemon restart).
    pub inflight_tracking: bool,
    /// Offer VHOST_F_LOG_ALL and LOG_SHMFD (live migration).
    pub dirty_logging: bool,
}
