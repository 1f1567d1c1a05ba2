//! `cryptblk serve` options: command-line flags, a TOML file with the same
//! keys (`--config`), and the checks that turn them into a device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};
use cryptblk_units::ByteSize;
use serde::Deserialize;

use crate::crypto::{IvRule, KeyError, SectorCipher, XtsKey, SECTOR_SIZES};
use crate::device::{AioMode, CryptoMode, DeviceOptions};
use crate::keyring::{KeySpec, KeyringError};
use crate::luks;
use crate::luks::cli::StorageArgs;
use crate::sandbox::{Sandbox, SandboxMode};
use crate::socket::ids::{IdSpec, Kind};
use crate::socket::{Activation, Allowlist, ListenOn, Origin, SocketAccess};

/// Where splitting a request across workers starts to pay (see README).
const DEFAULT_SPLIT_THRESHOLD: u64 = 512 << 10;
/// The fused copy roughly halves the daemon's CPU time per I/O here
/// (integration/placement.sh, inline AES-XTS: 4K random read 2.3 -> 1.2 us,
/// 1M read 190 -> 108 us, 1M write 277 -> 122..179 us).
const DEFAULT_IO: IoMode = IoMode::Mmap;
use crate::store::is_nbd_uri;
use crate::store::libnbd::Tls;
use crate::store::librbd::ClusterOptions;
use crate::store::{is_rbd_spec, RbdSpec};
use crate::volume::{
    open_image, ImageOptions, IoMode, NbdOptions, RbdOptions, Volume, VolumeError,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    CommandLine(String),
    #[error("{0} is required (on the command line or in the --config file)")]
    Missing(&'static str),
    #[error("invalid {flag} {value:?}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "cannot read {path} to look for a LUKS header (--type plain or luks skips this): {source}"
    )]
    Probe {
        path: String,
        source: std::io::Error,
    },
    /// The probe could not reach a network image (NBD, RBD): its server,
    /// not the header, is what to look at.
    #[error("cannot reach {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{0} conflicts with the image's LUKS header, which decides it: drop {0}, or add --type plain to serve the payload as plain dm-crypt (as cryptsetup open --type plain)")]
    LuksDecides(&'static str),
    #[error("{option} cannot be used with {from}: the socket is inherited, so its path, group and mode are set by whoever created it (SocketMode=/SocketGroup= in a .socket unit); drop {option}")]
    InheritedSocket {
        option: &'static str,
        from: &'static str,
    },
    #[error("--key-file and --key-keyring both name a key; keep one")]
    TwoKeySources,
    #[error(
        "key {spec} holds {got} bytes but --key-size {bits} needs {}; add the raw key of that \
         length (keyctl padd user NAME @u < keyfile) or fix --key-size", bits / 8
    )]
    KeyringLength {
        spec: String,
        got: usize,
        bits: usize,
    },
    #[error("key {0} is empty; a LUKS passphrase needs at least one byte")]
    EmptyKeyringPassphrase(String),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Luks(#[from] crate::luks::LuksError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    #[value(name = "aes-xts-plain64")]
    #[serde(rename = "aes-xts-plain64")]
    AesXtsPlain64,
    /// No encryption: a plaintext baseline for benchmarks and tests.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceType {
    /// A LUKS header if there is one, else plain.
    Auto,
    /// dm-crypt plain mode: raw key, layout from the flags.
    Plain,
    /// LUKS1 or LUKS2: passphrase in --key-file, layout from the header.
    Luks,
    /// Like luks, but refuse a header of the other version.
    Luks1,
    Luks2,
}

/// Every option of `cryptblk serve`. All are optional here so that a
/// config file can supply what the command line leaves out.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file whose keys are these options' long names; flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on (the VMM connects to it). Not needed with
    /// --fd or systemd socket activation.
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    #[serde(alias = "socket-path")]
    pub socket: Option<PathBuf>,
    /// Serve on this inherited, already listening unix socket instead of
    /// creating one (the vhost-user backend convention; qemu-storage-daemon's
    /// addr.type=fd). Never removed at exit.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<i32>,
    /// Group (name or gid) that owns the socket, so a VMM running as another
    /// user in that group can connect; the mode becomes 0660.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<IdSpec>,
    /// Socket file mode in octal (default 0600, or 0660 with --socket-group).
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Serve only peers running as one of these users (names or uids).
    #[arg(long, value_name = "UID[,UID...]", value_delimiter = ',')]
    pub allow_uid: Option<Vec<IdSpec>>,
    /// Serve only peers in one of these groups, primary or supplementary.
    #[arg(long, value_name = "GID[,GID...]", value_delimiter = ',')]
    pub allow_gid: Option<Vec<IdSpec>>,
    /// Image file or block device holding the ciphertext.
    #[arg(long, visible_alias = "blk-file", value_name = "PATH")]
    #[serde(alias = "blk-file")]
    pub image: Option<PathBuf>,
    /// Create a sparse image with this much payload (e.g. 10G) if none exists.
    #[arg(long, value_name = "BYTES")]
    pub size: Option<ByteSize>,
    /// NBD TLS and Ceph options: parsed from the command line as if they
    /// were written here; from a --config file by `from_config_file`
    /// (serde cannot flatten a struct that denies unknown fields).
    #[command(flatten)]
    #[serde(skip)]
    pub storage: StorageArgs,
    /// NBD: how long requests wait for a lost connection to come back
    /// (reconnecting with back-off) before they fail; 0 never reconnects.
    /// Default 30 (QEMU's nbd driver calls it reconnect-delay).
    #[arg(long, value_name = "SECONDS")]
    pub nbd_reconnect_timeout: Option<u64>,
    /// File holding the raw key (key-size/8 bytes); "-" reads standard input.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<String>,
    /// The key (plain) or passphrase (LUKS) from the kernel keyring instead
    /// of a file: %user:DESCRIPTION, or DESCRIPTION (a user key).
    #[arg(long, value_name = "%user:NAME")]
    pub key_keyring: Option<String>,
    /// Unlink the --key-keyring key from this process's keyrings once read.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub key_keyring_unlink: Option<bool>,
    /// Key size in bits: 256 (AES-128-XTS) or 512 (AES-256-XTS). Default 512.
    #[arg(long, value_name = "BITS")]
    pub key_size: Option<usize>,
    /// aes-xts-plain64 (default) or none.
    #[arg(long, value_enum)]
    pub cipher: Option<Cipher>,
    /// Encryption sector size and the guest's logical block size: 512 (default), 1024, 2048, 4096.
    #[arg(long, value_name = "BYTES")]
    pub sector_size: Option<usize>,
    /// IVs count sector-size units instead of 512-byte units.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub iv_large_sectors: Option<bool>,
    /// Start of the payload in the image, in 512-byte sectors.
    #[arg(long, value_name = "SECTORS")]
    pub offset: Option<u64>,
    /// Added to every IV, in 512-byte sectors.
    #[arg(long, value_name = "SECTORS")]
    pub skip: Option<u64>,
    /// Number of virtqueues (default: host CPUs, at least 4).
    #[arg(long)]
    pub queues: Option<usize>,
    /// Maximum virtqueue size, a power of two up to 32768 (default 256).
    #[arg(long)]
    pub queue_size: Option<u32>,
    /// Offer a read-only disk.
    #[arg(long, visible_alias = "read-only", num_args = 0..=1, default_missing_value = "true")]
    #[serde(alias = "read-only")]
    pub readonly: Option<bool>,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub direct: Option<bool>,
    /// Live-migration destination (as QEMU's -incoming): start while the
    /// source's daemon still holds the image, and lock it at the first
    /// request, once the source has handed it over.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub incoming: Option<bool>,
    /// Offer dirty-page logging (VHOST_F_LOG_ALL, LOG_SHMFD), which live
    /// migration needs (default true; false makes QEMU refuse to migrate).
    #[arg(long, value_name = "BOOL")]
    pub dirty_logging: Option<bool>,
    /// mmap: the cipher copies between guest memory and a shared mapping of
    /// the image (one pass); pread: read/write then crypt (two passes).
    /// Default mmap; block devices and --direct always use pread.
    #[arg(long, value_enum)]
    pub io: Option<IoMode>,
    /// io_uring (default): many requests per queue at the disk at once,
    /// for --direct, --io pread and block devices; sync: one at a time.
    #[arg(long, value_enum)]
    pub aio: Option<AioMode>,
    /// Offer DISCARD and punch holes (reveals which blocks are unused).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub allow_discards: Option<bool>,
    /// Offer INFLIGHT_SHMFD so that requests in flight survive a daemon
    /// restart (default true; false only shows what it protects against).
    #[arg(long, value_name = "BOOL")]
    pub inflight_tracking: Option<bool>,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// auto (default: luks if the image or --header has a LUKS header), plain, luks, luks1 or luks2.
    #[arg(long = "type", value_enum)]
    #[serde(rename = "type")]
    pub device_type: Option<DeviceType>,
    /// Detached LUKS header file (the image then holds only the payload).
    #[arg(long, value_name = "FILE")]
    pub header: Option<PathBuf>,
    /// LUKS: try only this key slot.
    #[arg(long, value_name = "N")]
    pub key_slot: Option<usize>,
    /// LUKS: read at most this many bytes of the key file as the passphrase.
    #[arg(long, value_name = "BYTES")]
    pub keyfile_size: Option<u64>,
    /// LUKS: skip this many bytes at the start of the key file.
    #[arg(long, value_name = "BYTES")]
    pub keyfile_offset: Option<u64>,
    /// Where crypto runs: inline (vring thread) or workers (pool).
    #[arg(long, value_enum)]
    pub crypto: Option<CryptoMode>,
    /// Worker threads for --crypto workers (default: one per queue).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Reads/writes at least this large are split across workers (default 512K).
    #[arg(long, value_name = "BYTES")]
    pub split_threshold: Option<ByteSize>,
    /// error, warn, info, debug or trace (default: RUST_LOG, else info).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Confinement once serving: none, seccomp (default), full (seccomp +
    /// Landlock) or seccomp-log (allow all, log what seccomp would stop).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxMode>,
    /// Control socket (mode 0600) answering JSON commands: query-status,
    /// query-stats (see `cryptblk ctl`). None by default.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

impl ServeArgs {
    /// The options on `cryptblk serve`'s command line (`argv` without the
    /// program and subcommand), merged with the `--config` file it names.
    pub fn from_command_line<I, T>(argv: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = Self::augment_args(clap::Command::new("serve").no_binary_name(true));
        let matches = command
            .try_get_matches_from(argv)
            .map_err(|e| ConfigError::CommandLine(e.to_string()))?;
        let cli = Self::from_arg_matches(&matches)
            .map_err(|e| ConfigError::CommandLine(e.to_string()))?;
        cli.with_config_file(&matches)
    }

    /// Reads a `--config` file alone: every key is an option's long name.
    pub fn from_config_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: shown.clone(),
            source,
        })?;
        let parse = |e| ConfigError::Parse {
            path: shown.clone(),
            source: Box::new(e),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(parse)?;
        let storage = take_storage_keys(&mut table);
        let mut file: ServeArgs = toml::Value::Table(table).try_into().map_err(parse)?;
        file.storage = toml::Value::Table(storage).try_into().map_err(parse)?;
        file.config = Some(path.to_path_buf());
        Ok(file)
    }

    /// With `--config`, the file's options overridden by those `cli` (the
    /// command line these options were parsed from) gives. clap updates
    /// exactly the options present on the command line, whatever they are,
    /// so an option added to `ServeArgs` is a TOML key and a flag at once:
    /// there is no list of fields to forget.
    pub fn with_config_file(self, cli: &clap::ArgMatches) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut merged = Self::from_config_file(&path)?;
        merged
            .update_from_arg_matches(cli)
            .map_err(|e| ConfigError::CommandLine(e.to_string()))?;
        Ok(merged)
    }
}

/// Moves the keys of `StorageArgs`' options out of a config file's table:
/// the flattened struct is read from them alone, the rest is `ServeArgs`'.
/// Its option names come from clap, so an option added there is a key too.
fn take_storage_keys(table: &mut toml::Table) -> toml::Table {
    let command = StorageArgs::augment_args(clap::Command::new("storage"));
    command
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter_map(|long| table.remove_entry(long))
        .collect()
}

/// Validated options, ready to open the volume and start serving.
pub struct ServeConfig {
    pub listen: ListenOn,
    pub access: SocketAccess,
    pub device: DeviceOptions,
    pub log_level: Option<String>,
    pub sandbox: Sandbox,
    /// `--control`: where the control socket is created, if anywhere.
    pub control: Option<PathBuf>,
    image: ImageSpec,
}

struct ImageSpec {
    path: PathBuf,
    /// An NBD URI's TLS settings (None: a file or block device).
    nbd: Option<Tls>,
    /// An RBD image's cluster (None: not an RBD image).
    rbd: Option<ClusterOptions>,
    /// NBD: how long requests wait for a lost connection (zero: forever lost).
    reconnect: Duration,
    create_size: Option<u64>,
    readonly: bool,
    incoming: bool,
    direct: bool,
    io: IoMode,
    layout: Layout,
}

/// Where a key (plain) or passphrase (LUKS) is read from.
enum KeySource {
    /// A file, or "-" for standard input.
    File(String),
    /// The kernel keyring, unlinked after reading if `unlink`.
    Keyring { spec: KeySpec, unlink: bool },
}

/// Where the key and the payload layout come from.
enum Layout {
    Plain {
        cipher: Cipher,
        key: Option<KeySource>,
        key_size: usize,
        rule: IvRule,
        payload_offset: u64,
    },
    Luks(LuksSpec),
}

struct LuksSpec {
    /// --type luks1/luks2 insists on that version.
    version: Option<u8>,
    /// Detached header; None means the header is at the start of the image.
    header: Option<PathBuf>,
    /// Passphrase file or key; None prompts on a TTY.
    key: Option<KeySource>,
    keyfile_offset: u64,
    keyfile_size: Option<u64>,
    key_slot: Option<usize>,
}

impl ServeConfig {
    /// The options alone, as when the daemon was not socket-activated.
    pub fn from_args(a: ServeArgs) -> Result<Self, ConfigError> {
        Self::from_args_and_activation(a, None)
    }

    /// The options, and the socket systemd passed if the daemon was
    /// socket-activated ([`crate::socket::activation_from_env`]).
    pub fn from_args_and_activation(
        a: ServeArgs,
        activation: Option<Activation>,
    ) -> Result<Self, ConfigError> {
        let listen = listen_on(&a, activation)?;
        let path = a.image.clone().ok_or(ConfigError::Missing("--image"))?;
        let queue_size = a.queue_size.unwrap_or(256);
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return invalid(
                "--queue-size",
                queue_size,
                "use a power of two from 2 to 32768",
            );
        }
        let queues = a.queues.unwrap_or_else(default_queues);
        if !(1..=64).contains(&queues) {
            return invalid("--queues", queues, "use 1 to 64");
        }
        let serial = a.serial.clone().unwrap_or_else(|| default_serial(&path));
        if serial.len() > 20 {
            return invalid("--serial", serial, "at most 20 bytes (virtio-blk GET_ID)");
        }
        let workers = a.workers.unwrap_or(queues);
        if !(1..=256).contains(&workers) {
            return invalid("--workers", workers, "use 1 to 256");
        }
        let split_threshold = match a.split_threshold {
            Some(s) => positive("--split-threshold", s)?,
            None => DEFAULT_SPLIT_THRESHOLD,
        };
        let readonly = a.readonly.unwrap_or(false);
        let direct = a.direct.unwrap_or(false);
        let nbd = nbd_tls(&a.storage, &path)?;
        let reconnect = nbd_reconnect(&a, nbd.is_some())?;
        let rbd = rbd_image(&a.storage, &path)?.map(|(_, cluster)| cluster);
        if rbd.is_some() {
            if a.size.is_some() {
                return invalid(
                    "--size",
                    "with an RBD image",
                    "an RBD image has the size it was created with; cryptblk neither creates nor resizes one (`rbd create --size` or `rbd resize` it, and drop --size)",
                );
            }
            if direct {
                return invalid(
                    "--direct",
                    "with an RBD image",
                    "O_DIRECT bypasses this host's page cache, which RBD I/O never uses (librbd talks to the cluster over the network; its own cache follows rbd_cache in ceph.conf); drop --direct",
                );
            }
            if a.io == Some(IoMode::Mmap) {
                return invalid(
                    "--io",
                    "mmap",
                    "an RBD image cannot be mapped into memory; drop --io",
                );
            }
        }
        if nbd.is_some() {
            if a.size.is_some() {
                return invalid(
                    "--size",
                    "with an NBD image",
                    "an NBD export has the size its server gives it; cryptblk neither creates nor resizes one (drop --size)",
                );
            }
            if direct {
                return invalid(
                    "--direct",
                    "with an NBD image",
                    "O_DIRECT bypasses this host's page cache, which NBD I/O never uses; the server decides its own caching (drop --direct)",
                );
            }
            if a.io == Some(IoMode::Mmap) {
                return invalid(
                    "--io",
                    "mmap",
                    "an NBD export cannot be mapped into memory; drop --io",
                );
            }
        }
        if direct && a.io == Some(IoMode::Mmap) {
            return invalid(
                "--io",
                "mmap",
                "--direct bypasses the page cache a mapping lives in; use --io pread or drop --direct",
            );
        }
        let io = if direct || nbd.is_some() || rbd.is_some() {
            IoMode::Pread
        } else {
            a.io.unwrap_or(DEFAULT_IO)
        };
        if nbd.is_some() || rbd.is_some() {
            // The LUKS code reads the header through libnbd or librbd.
            crate::store::install_luks_opener(nbd.clone(), reconnect, rbd.clone());
        }
        let layout = if is_luks_device(&a)? {
            Layout::Luks(luks_spec(&a)?)
        } else {
            plain_layout(&a)?
        };
        let socket_file = match &listen {
            ListenOn::Path(p) => Some(p.clone()),
            ListenOn::Inherited { .. } => None,
        };
        Ok(ServeConfig {
            listen,
            access: socket_access(&a)?,
            device: DeviceOptions {
                queues,
                queue_size: queue_size as u16,
                readonly,
                allow_discards: a.allow_discards.unwrap_or(false),
                inflight_tracking: a.inflight_tracking.unwrap_or(true),
                dirty_logging: a.dirty_logging.unwrap_or(true),
                serial,
                crypto: a.crypto.unwrap_or(CryptoMode::Inline),
                workers,
                split_threshold: split_threshold as usize,
                aio: a.aio.unwrap_or(AioMode::IoUring),
            },
            log_level: a.log_level,
            sandbox: Sandbox {
                mode: a.sandbox.unwrap_or_default(),
                image: path.clone(),
                socket: socket_file,
                control: a.control.clone(),
                readonly,
                tls_files: tls_files(nbd.as_ref()),
            },
            control: a.control,
            image: ImageSpec {
                path,
                nbd,
                rbd,
                reconnect,
                create_size: a.size.map(|s| positive("--size", s)).transpose()?,
                readonly,
                incoming: a.incoming.unwrap_or(false),
                direct,
                io,
                layout,
            },
        })
    }

    /// Reads the key (unlocking LUKS if needed) and opens (or creates) the image.
    pub fn open_volume(&self) -> Result<Volume, ConfigError> {
        let s = &self.image;
        let (key, rule, payload_offset, payload_size) = match &s.layout {
            Layout::Plain {
                cipher,
                key,
                key_size,
                rule,
                payload_offset,
            } => {
                let key = match (cipher, key) {
                    (Cipher::AesXtsPlain64, Some(KeySource::File(path))) => {
                        warn_if_key_file_is_exposed(path);
                        Some(XtsKey::from_key_file(path, *key_size)?)
                    }
                    (Cipher::AesXtsPlain64, Some(KeySource::Keyring { spec, unlink })) => {
                        Some(key_from_keyring(spec, *unlink, *key_size)?)
                    }
                    _ => None,
                };
                (key, *rule, *payload_offset, None)
            }
            Layout::Luks(l) => {
                let pass = match &l.key {
                    Some(KeySource::Keyring { spec, unlink }) => {
                        passphrase_from_keyring(spec, *unlink)?
                    }
                    Some(KeySource::File(path)) => {
                        warn_if_key_file_is_exposed(path);
                        luks::read_passphrase(Some(path), l.keyfile_offset, l.keyfile_size)?
                    }
                    None => luks::read_passphrase(None, l.keyfile_offset, l.keyfile_size)?,
                };
                let u = luks::unlock_image(&s.path, l.header.as_deref(), &pass, l.key_slot)?;
                if let Some(v) = l.version.filter(|v| *v != u.version) {
                    let found = format!("luks{v}, but the header is LUKS{}", u.version);
                    return invalid("--type", found, "use --type luks to accept either version");
                }
                let rule = IvRule {
                    sector_size: u.sector_size,
                    large_sectors: u.iv_large_sectors,
                    skip: 0,
                };
                (Some(u.key), rule, u.payload_offset, u.payload_size)
            }
        };
        // The key's Debug is redacted; tests/secrets.rs requires this line
        // at trace level and the key's bytes nowhere in the log.
        log::trace!("volume key {key:?}, {rule:?}, payload at byte {payload_offset}");
        Ok(open_image(ImageOptions {
            incoming: s.incoming,
            nbd: NbdOptions {
                tls: s.nbd.clone().unwrap_or_default(),
                queues: self.device.queues,
                reconnect: s.reconnect,
            },
            export: None,
            rbd: RbdOptions {
                cluster: s.rbd.clone().unwrap_or_default(),
                queues: self.device.queues,
            },
            path: s.path.clone(),
            create_size: s.create_size,
            payload_offset,
            payload_size,
            readonly: s.readonly,
            direct: s.direct,
            io: s.io,
            cipher: SectorCipher::new(key.as_ref(), rule),
        })?)
    }
}

/// `--socket`, `--fd` or socket activation: exactly one. The file mode and
/// group of an inherited socket are its creator's to set.
fn listen_on(a: &ServeArgs, activation: Option<Activation>) -> Result<ListenOn, ConfigError> {
    let inherited = match (a.fd, activation) {
        (Some(fd), _) if fd < 0 => return invalid("--fd", fd, "a descriptor number is 0 or more"),
        (Some(fd), Some(_)) => {
            log::warn!("--fd {fd} given: the socket systemd passed (LISTEN_FDS) is not used");
            Some((fd, Origin::Flag))
        }
        (Some(fd), None) => Some((fd, Origin::Flag)),
        (None, Some(act)) => Some((act.fd, Origin::Systemd { name: act.name })),
        (None, None) => None,
    };
    let Some((fd, origin)) = inherited else {
        return a
            .socket
            .clone()
            .map(ListenOn::Path)
            .ok_or(ConfigError::Missing(
                "--socket (or --fd, or a socket passed by systemd socket activation)",
            ));
    };
    let flag = match origin {
        Origin::Flag => "--fd",
        Origin::Systemd { .. } => "socket activation",
    };
    let conflicts = [
        ("--socket", a.socket.is_some()),
        ("--socket-group", a.socket_group.is_some()),
        ("--socket-mode", a.socket_mode.is_some()),
    ];
    if let Some((option, _)) = conflicts.iter().find(|(_, set)| *set) {
        return Err(ConfigError::InheritedSocket { option, from: flag });
    }
    Ok(ListenOn::Inherited { fd, origin })
}

/// Who may connect: the socket file's group and mode, and the peers served.
fn socket_access(a: &ServeArgs) -> Result<SocketAccess, ConfigError> {
    let group = a
        .socket_group
        .as_ref()
        .map(|g| resolve_id("--socket-group", g, Kind::Group))
        .transpose()?;
    let mode = match (&a.socket_mode, group) {
        (Some(m), _) => parse_mode(m)?,
        (None, Some(_)) => crate::socket::GROUP_MODE,
        (None, None) => crate::socket::DEFAULT_MODE,
    };
    let ids = |flag, list: &Option<Vec<IdSpec>>, kind| {
        list.iter()
            .flatten()
            .map(|id| resolve_id(flag, id, kind))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(SocketAccess {
        mode,
        group,
        allow: Allowlist {
            uids: ids("--allow-uid", &a.allow_uid, Kind::User)?,
            gids: ids("--allow-gid", &a.allow_gid, Kind::Group)?,
        },
    })
}

fn resolve_id(flag: &'static str, id: &IdSpec, kind: Kind) -> Result<u32, ConfigError> {
    let why = match id.resolve(kind) {
        Ok(Some(n)) => return Ok(n),
        Ok(None) => match kind {
            Kind::User => "no such user here (getent passwd NAME); give a uid or an existing name",
            Kind::Group => "no such group here (getent group NAME); give a gid or an existing name",
        },
        Err(_) => "the user/group database cannot be read; give a number instead",
    };
    invalid(flag, id, why)
}

/// `0660`, `660` or `0o660`: permission bits only (setuid, setgid and
/// sticky mean nothing on a socket).
fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let octal = (1..=4).contains(&digits.len()) && digits.bytes().all(|b| matches!(b, b'0'..=b'7'));
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if octal && mode <= 0o777 => Ok(mode),
        _ => invalid(
            "--socket-mode",
            s,
            "use octal permission bits up to 0777, e.g. 0660",
        ),
    }
}

/// Default of `--nbd-reconnect-timeout`, in seconds.
pub const DEFAULT_NBD_RECONNECT: u64 = 30;

/// `--nbd-reconnect-timeout` for an NBD image (`nbd`); other images refuse
/// the option.
fn nbd_reconnect(a: &ServeArgs, nbd: bool) -> Result<Duration, ConfigError> {
    if !nbd {
        return match a.nbd_reconnect_timeout {
            Some(s) => invalid(
                "--nbd-reconnect-timeout",
                s,
                "it applies to NBD images (nbd://, nbd+unix://, ...) only",
            ),
            None => Ok(Duration::ZERO),
        };
    }
    let secs = a.nbd_reconnect_timeout.unwrap_or(DEFAULT_NBD_RECONNECT);
    if secs > 24 * 3600 {
        return invalid("--nbd-reconnect-timeout", secs, "use 0 to 86400 seconds");
    }
    Ok(Duration::from_secs(secs))
}

/// What a TLS handshake with the NBD server reads, for the sandbox to
/// leave readable: the PSK file and the certificates directory.
fn tls_files(tls: Option<&Tls>) -> Vec<PathBuf> {
    tls.into_iter()
        .flat_map(|t| [&t.psk_file, &t.certificates])
        .flatten()
        .map(PathBuf::from)
        .collect()
}

/// An NBD URI's TLS settings; TLS options with anything but an nbds://
/// URI are refused (libnbd would connect without TLS and ignore them).
fn nbd_tls(a: &StorageArgs, image: &std::path::Path) -> Result<Option<Tls>, ConfigError> {
    let tls_options = [
        ("--tls-certificates", a.tls_certificates.is_some()),
        ("--tls-psk-file", a.tls_psk_file.is_some()),
        ("--tls-username", a.tls_username.is_some()),
    ];
    let given = tls_options.iter().find(|(_, set)| *set).map(|(f, _)| *f);
    if !is_nbd_uri(image) {
        return match given {
            Some(flag) => invalid(
                flag,
                "with a file image",
                "TLS options apply to nbds:// images only",
            ),
            None => Ok(None),
        };
    }
    let tls_uri = image.to_str().is_some_and(|s| s.starts_with("nbds"));
    if let (Some(flag), false) = (given, tls_uri) {
        return invalid(
            flag,
            "with an nbd:// URI",
            "use nbds:// or nbds+unix:// (TLS required); with nbd:// the connection would not use TLS",
        );
    }
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    Ok(Some(Tls {
        certificates: path(&a.tls_certificates),
        psk_file: path(&a.tls_psk_file),
        username: a.tls_username.clone(),
        verify_peer: true,
    }))
}

/// An `rbd:` image's spec and how to reach its cluster; the `--ceph-*`
/// options with any other image are refused (they would go unused).
fn rbd_image(
    a: &StorageArgs,
    image: &Path,
) -> Result<Option<(RbdSpec, ClusterOptions)>, ConfigError> {
    let ceph_options = [
        ("--ceph-conf", a.ceph_conf.is_some()),
        ("--ceph-id", a.ceph_id.is_some()),
        ("--ceph-keyring", a.ceph_keyring.is_some()),
        ("--rbd-timeout", a.rbd_timeout.is_some()),
    ];
    let given = ceph_options.iter().find(|(_, set)| *set).map(|(f, _)| *f);
    let Some(text) = image.to_str().filter(|_| is_rbd_spec(image)) else {
        return match given {
            Some(flag) => invalid(
                flag,
                image.display(),
                "Ceph options apply to rbd:POOL/IMAGE images only",
            ),
            None => Ok(None),
        };
    };
    let spec = RbdSpec::parse(text).map_err(|why| ConfigError::Invalid {
        flag: "--image",
        value: text.to_string(),
        why,
    })?;
    // The rbd tool's --id takes the name without "client."; accept both.
    let id = a
        .ceph_id
        .as_deref()
        .map(|id| id.strip_prefix("client.").unwrap_or(id));
    if id.is_some_and(|id| id.is_empty() || id.contains(char::is_whitespace)) {
        return invalid(
            "--ceph-id",
            a.ceph_id.as_deref().unwrap_or_default(),
            "the cephx user's name without client., e.g. admin or libvirt",
        );
    }
    let mut set = Vec::new();
    match a.rbd_timeout {
        Some(secs) if secs > 24 * 3600 => {
            return invalid("--rbd-timeout", secs, "use 0 to 86400 seconds")
        }
        // 0: librados' defaults (OSD requests wait for ever, connecting
        // gives up after client_mount_timeout, 300 s).
        Some(0) | None => {}
        Some(secs) => {
            for option in [
                "rados_osd_op_timeout",
                "rados_mon_op_timeout",
                "client_mount_timeout",
            ] {
                set.push((option.to_string(), secs.to_string()));
            }
        }
    }
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    Ok(Some((
        spec,
        ClusterOptions {
            conf: path(&a.ceph_conf),
            id: id.map(str::to_string),
            keyring: path(&a.ceph_keyring),
            set,
        },
    )))
}

/// Lets `format`, `key` and `dump` reach `image` when it is an NBD URI or
/// an RBD image: `storage` (their TLS and Ceph options), checked as serve
/// checks them, becomes the LUKS code's way to open it. NBD connections
/// give up after 30 s without an answer (serve's default request timeout).
pub fn reach_luks_image(image: &Path, storage: &StorageArgs) -> Result<(), ConfigError> {
    let tls = nbd_tls(storage, image)?;
    let cluster = rbd_image(storage, image)?.map(|(_, cluster)| cluster);
    crate::store::install_luks_opener(tls, Duration::ZERO, cluster);
    Ok(())
}

/// `--type auto` (the default) looks for the LUKS magic in --header, else
/// in the image; a missing image is plain (it may be created with --size).
fn is_luks_device(a: &ServeArgs) -> Result<bool, ConfigError> {
    let header = a.header.as_ref().or(a.image.as_ref());
    match (a.device_type.unwrap_or(DeviceType::Auto), header) {
        (DeviceType::Plain, _) => Ok(false),
        (DeviceType::Luks | DeviceType::Luks1 | DeviceType::Luks2, _) => Ok(true),
        (DeviceType::Auto, Some(h)) if h.exists() || is_nbd_uri(h) || is_rbd_spec(h) => {
            luks::is_luks(h).map_err(|source| {
                let path = h.display().to_string();
                if is_nbd_uri(h) || is_rbd_spec(h) {
                    ConfigError::Unreachable { path, source }
                } else {
                    ConfigError::Probe { path, source }
                }
            })
        }
        (DeviceType::Auto, _) => Ok(false),
    }
}

fn luks_spec(a: &ServeArgs) -> Result<LuksSpec, ConfigError> {
    // cryptsetup refuses these for LUKS too: the header decides them.
    let from_header = [
        ("--cipher", a.cipher.is_some()),
        ("--key-size", a.key_size.is_some()),
        ("--sector-size", a.sector_size.is_some()),
        ("--iv-large-sectors", a.iv_large_sectors.is_some()),
        ("--offset", a.offset.is_some()),
        ("--skip", a.skip.is_some()),
        ("--size", a.size.is_some()),
    ];
    if let Some((flag, _)) = from_header.iter().find(|(_, set)| *set) {
        return invalid(
            flag,
            "set",
            "a LUKS header decides this; drop the option or use --type plain",
        );
    }
    Ok(LuksSpec {
        version: match a.device_type {
            Some(DeviceType::Luks1) => Some(1),
            Some(DeviceType::Luks2) => Some(2),
            _ => None,
        },
        header: a.header.clone(),
        key: key_source(a)?,
        keyfile_offset: a.keyfile_offset.unwrap_or(0),
        keyfile_size: a.keyfile_size,
        key_slot: a.key_slot,
    })
}

/// `--key-file` or `--key-keyring` (with `--key-keyring-unlink`): one at most.
fn key_source(a: &ServeArgs) -> Result<Option<KeySource>, ConfigError> {
    let unlink = a.key_keyring_unlink.unwrap_or(false);
    match (&a.key_file, &a.key_keyring) {
        (Some(_), Some(_)) => Err(ConfigError::TwoKeySources),
        (_, None) if unlink => invalid(
            "--key-keyring-unlink",
            "set",
            "it unlinks the --key-keyring key; add --key-keyring or drop it",
        ),
        (Some(path), None) => Ok(Some(KeySource::File(path.clone()))),
        (None, Some(spec)) => {
            let offsets = [
                ("--keyfile-offset", a.keyfile_offset.is_some()),
                ("--keyfile-size", a.keyfile_size.is_some()),
            ];
            if let Some((flag, _)) = offsets.iter().find(|(_, set)| *set) {
                return invalid(
                    flag,
                    "set",
                    "it applies to --key-file only; a keyring key is used whole",
                );
            }
            Ok(Some(KeySource::Keyring {
                spec: spec.parse()?,
                unlink,
            }))
        }
        (None, None) => Ok(None),
    }
}

/// The plain-mode key, read by the kernel straight into its locked page.
fn key_from_keyring(spec: &KeySpec, unlink: bool, bits: usize) -> Result<XtsKey, ConfigError> {
    let serial = spec.find()?;
    let key = XtsKey::filled_by(bits, |buf| {
        spec.read_into(&serial, buf).map_err(ConfigError::from)
    });
    if unlink {
        spec.unlink(&serial);
    }
    key.map_err(|e| match e {
        ConfigError::Key(KeyError::WrongLength { got, bits }) => ConfigError::KeyringLength {
            spec: spec.to_string(),
            got,
            bits,
        },
        e => e,
    })
}

/// A LUKS passphrase: the key's whole payload.
fn passphrase_from_keyring(
    spec: &KeySpec,
    unlink: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ConfigError> {
    let serial = spec.find()?;
    let pass = spec.read(&serial);
    if unlink {
        spec.unlink(&serial);
    }
    let pass = pass?;
    if pass.is_empty() {
        return Err(ConfigError::EmptyKeyringPassphrase(spec.to_string()));
    }
    Ok(pass)
}

fn plain_layout(a: &ServeArgs) -> Result<Layout, ConfigError> {
    let luks_only = [
        ("--header", a.header.is_some()),
        ("--key-slot", a.key_slot.is_some()),
        ("--keyfile-size", a.keyfile_size.is_some()),
        ("--keyfile-offset", a.keyfile_offset.is_some()),
    ];
    if let Some((flag, _)) = luks_only.iter().find(|(_, set)| *set) {
        return invalid(
            flag,
            "set",
            "only LUKS images use it; the image has no LUKS header (or --type plain was given)",
        );
    }
    let sector_size = a.sector_size.unwrap_or(512);
    if !SECTOR_SIZES.contains(&sector_size) {
        return invalid("--sector-size", sector_size, "use 512, 1024, 2048 or 4096");
    }
    let skip = a.skip.unwrap_or(0);
    let large = a.iv_large_sectors.unwrap_or(false);
    if large && !skip.is_multiple_of(sector_size as u64 / 512) {
        return invalid("--skip", skip, "with --iv-large-sectors it must be a multiple of sector-size/512 (dm-crypt refuses it too)");
    }
    let cipher = a.cipher.unwrap_or(Cipher::AesXtsPlain64);
    let key = key_source(a)?;
    if cipher == Cipher::AesXtsPlain64 && key.is_none() {
        return Err(ConfigError::Missing(
            "--key-file or --key-keyring (or --cipher none)",
        ));
    }
    let payload_offset = a
        .offset
        .unwrap_or(0)
        .checked_mul(512)
        .ok_or(ConfigError::Invalid {
            flag: "--offset",
            value: "too large".into(),
            why: "the offset is in 512-byte sectors",
        })?;
    Ok(Layout::Plain {
        cipher,
        key,
        key_size: a.key_size.unwrap_or(512),
        rule: IvRule {
            sector_size,
            large_sectors: large,
            skip,
        },
        payload_offset,
    })
}

fn invalid<T>(
    flag: &'static str,
    value: impl ToString,
    why: &'static str,
) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        flag,
        value: value.to_string(),
        why,
    })
}

/// QEMU asks for one queue per vCPU and refuses a backend with fewer.
fn default_queues() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(4)
}

/// A stable serial per image path, so a guest's /dev/disk/by-id survives
/// daemon restarts.
fn default_serial(path: &Path) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let hash = canonical
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("cryptblk-{:011x}", hash >> 20)
}

/// A size option for which zero means nothing (an empty image, splitting
/// at zero bytes).
fn positive(flag: &'static str, size: ByteSize) -> Result<u64, ConfigError> {
    match size.bytes() {
        0 => invalid(flag, size, "must be more than 0"),
        n => Ok(n),
    }
}

/// cryptsetup warns about key files others can read; so do we.
fn warn_if_key_file_is_exposed(path: &str) {
    use std::os::unix::fs::PermissionsExt;
    if path == "-" {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!("key file {path} is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The least a plaintext serve needs.
    fn base() -> ServeArgs {
        ServeArgs {
            socket: Some("/s".into()),
            image: Some("/i".into()),
            cipher: Some(Cipher::None),
            ..Default::default()
        }
    }

    #[test]
    fn nbd_images_refuse_size_direct_mmap_and_tls_without_nbds() {
        // --type plain: `auto` would connect to look for a LUKS header.
        let nbd = |uri: &str, adjust: fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                image: Some(uri.into()),
                device_type: Some(DeviceType::Plain),
                ..base()
            };
            adjust(&mut a);
            ServeConfig::from_args(a).err().map(|e| e.to_string())
        };
        let unix = "nbd+unix:///?socket=/run/n.sock";
        assert_eq!(nbd(unix, |_| {}), None);
        let cfg = ServeConfig::from_args(ServeArgs {
            image: Some(unix.into()),
            device_type: Some(DeviceType::Plain),
            ..base()
        })
        .unwrap();
        assert_eq!(cfg.image.io, IoMode::Pread, "an export cannot be mapped");
        let size = nbd(unix, |a| a.size = Some(ByteSize(1 << 20))).unwrap();
        assert!(size.contains("--size") && size.contains("server"), "{size}");
        let direct = nbd(unix, |a| a.direct = Some(true)).unwrap();
        assert!(
            direct.contains("--direct") && direct.contains("page cache"),
            "{direct}"
        );
        let mmap = nbd(unix, |a| a.io = Some(IoMode::Mmap)).unwrap();
        assert!(mmap.contains("--io"), "{mmap}");
        let psk = |a: &mut ServeArgs| a.storage.tls_psk_file = Some("/k.psk".into());
        let plain = nbd("nbd://host/e", psk).unwrap();
        assert!(
            plain.contains("--tls-psk-file") && plain.contains("nbds://"),
            "{plain}"
        );
        assert_eq!(nbd("nbds://host/e", psk), None);
        let file = nbd("/i", psk).unwrap();
        assert!(file.contains("nbds:// images only"), "{file}");
    }

    #[test]
    fn rbd_images_parse_with_their_ceph_options_and_refuse_size_direct_mmap() {
        // --type plain: `auto` would connect to look for a LUKS header.
        let rbd = |image: &str, adjust: fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                image: Some(image.into()),
                device_type: Some(DeviceType::Plain),
                ..base()
            };
            adjust(&mut a);
            let parsed = rbd_image(&a.storage, a.image.as_deref().unwrap());
            let served = ServeConfig::from_args(a).err().map(|e| e.to_string());
            (parsed, served)
        };
        let ceph = |a: &mut ServeArgs| {
            a.storage.ceph_conf = Some("/etc/ceph/c.conf".into());
            a.storage.ceph_id = Some("client.libvirt".into());
            a.storage.ceph_keyring = Some("/etc/ceph/k".into());
        };
        let (parsed, served) = rbd("rbd:vms/ns/vm1@snap", ceph);
        let (spec, cluster) = parsed.unwrap().unwrap();
        assert_eq!(spec.to_string(), "rbd:vms/ns/vm1@snap");
        assert_eq!(cluster.conf.as_deref(), Some("/etc/ceph/c.conf"));
        assert_eq!(cluster.id.as_deref(), Some("libvirt"), "client. is dropped");
        assert_eq!(cluster.keyring.as_deref(), Some("/etc/ceph/k"));
        assert!(
            cluster.set.is_empty(),
            "no --rbd-timeout: librados' defaults"
        );
        // Served: nothing connects until the volume is opened.
        assert_eq!(served, None);
        let (parsed, served) = rbd("rbd:vms/vm1", |_| {});
        assert_eq!(served, None);
        let (_, cluster) = parsed.unwrap().unwrap();
        assert!(cluster.conf.is_none() && cluster.id.is_none() && cluster.keyring.is_none());
        let cfg = ServeConfig::from_args(ServeArgs {
            image: Some("rbd:vms/vm1".into()),
            device_type: Some(DeviceType::Plain),
            ..base()
        })
        .unwrap();
        assert_eq!(cfg.image.io, IoMode::Pread);
        assert!(cfg.image.rbd.is_some() && cfg.image.nbd.is_none());

        // --size, --direct and --io mmap are refused with the reason.
        let (_, size) = rbd("rbd:vms/vm1", |a| a.size = Some(ByteSize(1 << 30)));
        let size = size.unwrap();
        assert!(
            size.contains("--size") && size.contains("rbd resize"),
            "{size}"
        );
        let (_, direct) = rbd("rbd:vms/vm1", |a| a.direct = Some(true));
        let direct = direct.unwrap();
        assert!(
            direct.contains("--direct") && direct.contains("RBD"),
            "{direct}"
        );
        let (_, mmap) = rbd("rbd:vms/vm1", |a| a.io = Some(IoMode::Mmap));
        assert!(mmap.unwrap().contains("cannot be mapped"));

        // --rbd-timeout sets librados' timeouts; 0 leaves its defaults.
        let (parsed, served) = rbd("rbd:vms/vm1", |a| a.storage.rbd_timeout = Some(7));
        assert_eq!(served, None);
        let set = parsed.unwrap().unwrap().1.set;
        for option in ["rados_osd_op_timeout", "client_mount_timeout"] {
            assert!(
                set.contains(&(option.to_string(), "7".to_string())),
                "{set:?}"
            );
        }
        let (parsed, _) = rbd("rbd:vms/vm1", |a| a.storage.rbd_timeout = Some(0));
        assert!(parsed.unwrap().unwrap().1.set.is_empty());
        let (_, long) = rbd("rbd:vms/vm1", |a| a.storage.rbd_timeout = Some(100_000));
        assert!(long.unwrap().contains("--rbd-timeout"));
        let (_, file) = rbd("/i", |a| a.storage.rbd_timeout = Some(7));
        assert!(file.unwrap().contains("--rbd-timeout"));

        let (_, bad) = rbd("rbd:vm1", |_| {});
        let bad = bad.unwrap();
        assert!(
            bad.contains("--image") && bad.contains("rbd:POOL/IMAGE"),
            "{bad}"
        );
        let (_, qemu) = rbd("rbd:vms/vm1:id=admin", |_| {});
        assert!(qemu.unwrap().contains("--ceph-id"));
        let (_, empty) = rbd("rbd:vms/vm1", |a| {
            a.storage.ceph_id = Some("client.".into())
        });
        assert!(empty.unwrap().contains("--ceph-id"));
        // Ceph options with a file or an NBD image would go unused.
        for image in ["/i", "nbd+unix:///?socket=/run/n.sock"] {
            let (_, file) = rbd(image, |a| a.storage.ceph_keyring = Some("/k".into()));
            let file = file.unwrap();
            assert!(
                file.contains("--ceph-keyring") && file.contains("rbd:POOL/IMAGE images only"),
                "{file}"
            );
        }
    }

    #[test]
    fn ceph_options_are_config_file_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "ceph-conf = \"/etc/ceph/c.conf\"\nceph-id = \"libvirt\"\nceph-keyring = \"/k\"\n\
             rbd-timeout = 20\n",
        )
        .unwrap();
        let a = ServeArgs::from_config_file(&path).unwrap();
        assert_eq!(
            a.storage.ceph_conf.as_deref(),
            Some(Path::new("/etc/ceph/c.conf"))
        );
        assert_eq!(a.storage.ceph_id.as_deref(), Some("libvirt"));
        assert_eq!(a.storage.ceph_keyring.as_deref(), Some(Path::new("/k")));
        assert_eq!(a.storage.rbd_timeout, Some(20));
        let cli = ServeArgs::from_command_line([
            "--config",
            path.to_str().unwrap(),
            "--ceph-id",
            "admin",
        ])
        .unwrap();
        assert_eq!(
            cli.storage.ceph_id.as_deref(),
            Some("admin"),
            "the flag wins"
        );
        assert_eq!(cli.storage.ceph_keyring.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn nbd_reconnect_timeout_defaults_and_refusals() {
        let cfg = |uri: &str, adjust: fn(&mut ServeArgs)| {
            let mut a = ServeArgs {
                image: Some(uri.into()),
                device_type: Some(DeviceType::Plain),
                ..base()
            };
            adjust(&mut a);
            ServeConfig::from_args(a).map_err(|e| e.to_string())
        };
        let unix = "nbd+unix:///?socket=/run/n.sock";
        let secs = |r: Result<ServeConfig, String>| r.unwrap().image.reconnect.as_secs();
        assert_eq!(secs(cfg(unix, |_| {})), DEFAULT_NBD_RECONNECT);
        assert_eq!(secs(cfg(unix, |a| a.nbd_reconnect_timeout = Some(0))), 0);
        assert_eq!(secs(cfg(unix, |a| a.nbd_reconnect_timeout = Some(5))), 5);
        let file = cfg("/i", |a| a.nbd_reconnect_timeout = Some(5))
            .err()
            .unwrap();
        assert!(file.contains("--nbd-reconnect-timeout"), "{file}");
        // Over TLS too, under the sandbox (which then leaves the key files
        // readable: a handshake reads them).
        let tls = cfg("nbds://h/e", |a| {
            a.storage.tls_psk_file = Some("/k.psk".into());
            a.storage.tls_certificates = Some("/pki".into());
        })
        .unwrap();
        assert_eq!(tls.image.reconnect.as_secs(), DEFAULT_NBD_RECONNECT);
        assert_eq!(
            tls.sandbox.tls_files,
            [PathBuf::from("/k.psk"), PathBuf::from("/pki")]
        );
        assert!(cfg(unix, |_| {}).unwrap().sandbox.tls_files.is_empty());
    }

    #[test]
    fn zero_sizes_are_refused_by_name() {
        for (args, flag) in [
            (
                ServeArgs {
                    size: Some(ByteSize(0)),
                    ..base()
                },
                "--size",
            ),
            (
                ServeArgs {
                    split_threshold: Some(ByteSize(0)),
                    ..base()
                },
                "--split-threshold",
            ),
        ] {
            let err = match ServeConfig::from_args(args) {
                Ok(_) => panic!("{flag} 0 was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(flag), "{err}");
        }
    }

    /// `args` merged with a config file holding `toml`.
    /// The command line `cli` with `--config` naming a file holding `toml`.
    fn with_file(toml: &str, cli: &[&str]) -> Result<ServeArgs, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, toml).unwrap();
        let mut argv = vec!["--config", file.to_str().unwrap()];
        argv.extend_from_slice(cli);
        ServeArgs::from_command_line(argv)
    }

    #[test]
    fn flags_override_the_config_file() {
        let toml = "socket = \"/tmp/a.sock\"\nimage = \"/tmp/a.img\"\nqueues = 2\nreadonly = true\ncipher = \"none\"\n";
        let merged = with_file(toml, &["--queues", "3"]).unwrap();
        assert_eq!(merged.queues, Some(3));
        assert_eq!(merged.readonly, Some(true));
        assert_eq!(merged.cipher, Some(Cipher::None));
        let cfg = ServeConfig::from_args(merged).unwrap();
        assert_eq!(cfg.device.queues, 3);
    }

    #[test]
    fn the_control_socket_comes_from_the_config_file_and_is_removable() {
        let toml =
            "socket = \"/run/a/s\"\nimage = \"/i\"\ncipher = \"none\"\ncontrol = \"/run/b/c\"\n";
        let cfg = ServeConfig::from_args(with_file(toml, &[]).unwrap()).unwrap();
        assert_eq!(cfg.control, Some(PathBuf::from("/run/b/c")));
        // The sandbox must let the daemon remove it at exit.
        assert_eq!(cfg.sandbox.control, cfg.control);
        assert_eq!(ServeConfig::from_args(base()).unwrap().control, None);
    }

    #[test]
    fn io_crypto_and_workers_come_from_the_config_file() {
        let toml = "socket = \"/s\"\nimage = \"/i\"\ncipher = \"none\"\nio = \"pread\"\ncrypto = \"workers\"\nworkers = 3\nsplit-threshold = \"64K\"\n";
        let cfg = ServeConfig::from_args(with_file(toml, &[]).unwrap()).unwrap();
        assert_eq!(cfg.image.io, IoMode::Pread);
        assert_eq!(cfg.device.crypto, CryptoMode::Workers);
        assert_eq!(cfg.device.workers, 3);
        assert_eq!(cfg.device.split_threshold, 64 << 10);
        assert_eq!(ServeConfig::from_args(base()).unwrap().image.io, DEFAULT_IO);
        let direct = ServeConfig::from_args(ServeArgs {
            direct: Some(true),
            ..base()
        });
        assert_eq!(direct.unwrap().image.io, IoMode::Pread);
        assert!(ServeConfig::from_args(ServeArgs {
            direct: Some(true),
            io: Some(IoMode::Mmap),
            ..base()
        })
        .is_err());
    }

    #[test]
    fn socket_mode_is_octal_permission_bits_only() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        for bad in ["", "0999", "1777", "4755", "+660", "rw-rw----", "06600"] {
            assert!(parse_mode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn socket_access_defaults_to_0600_and_0660_with_a_group() {
        let access = |args| ServeConfig::from_args(args).unwrap().access;
        assert_eq!(access(base()), SocketAccess::default());
        let grouped = access(ServeArgs {
            socket_group: Some("root".parse().unwrap()),
            ..base()
        });
        assert_eq!((grouped.mode, grouped.group), (0o660, Some(0)));
        let explicit = access(ServeArgs {
            socket_group: Some("5".parse().unwrap()),
            socket_mode: Some("0640".into()),
            ..base()
        });
        assert_eq!((explicit.mode, explicit.group), (0o640, Some(5)));
    }

    #[test]
    fn socket_keys_come_from_the_config_file_with_names_or_numbers() {
        let toml = "socket = \"/s\"\nimage = \"/i\"\ncipher = \"none\"\nsocket-group = \"root\"\nsocket-mode = \"0620\"\nallow-uid = [107, \"root\"]\nallow-gid = [\"36\"]\n";
        let cfg = ServeConfig::from_args(with_file(toml, &[]).unwrap()).unwrap();
        assert_eq!(cfg.access.mode, 0o620);
        assert_eq!(cfg.access.group, Some(0));
        assert_eq!(cfg.access.allow.uids, vec![107, 0]);
        assert_eq!(cfg.access.allow.gids, vec![36]);
    }

    #[test]
    fn unknown_users_and_groups_are_refused_by_flag_name() {
        let no_group = ServeConfig::from_args(ServeArgs {
            socket_group: Some("no-such-group-cryptblk".parse().unwrap()),
            ..base()
        });
        let err = no_group.err().unwrap().to_string();
        assert!(
            err.contains("--socket-group") && err.contains("no-such-group-cryptblk"),
            "{err}"
        );
        let no_user = ServeConfig::from_args(ServeArgs {
            allow_uid: Some(vec!["no-such-user-cryptblk".parse().unwrap()]),
            ..base()
        });
        assert!(no_user.err().unwrap().to_string().contains("--allow-uid"));
    }

    #[test]
    fn a_keyring_key_excludes_a_key_file_and_key_file_offsets() {
        let keyring = |extra: ServeArgs| {
            ServeConfig::from_args(ServeArgs {
                cipher: None,
                key_keyring: Some("%user:vm1".into()),
                ..extra
            })
        };
        assert!(keyring(base()).is_ok());
        let two = keyring(ServeArgs {
            key_file: Some("/k".into()),
            ..base()
        });
        assert!(matches!(two, Err(ConfigError::TwoKeySources)));
        let luks_offset = keyring(ServeArgs {
            device_type: Some(DeviceType::Luks),
            keyfile_offset: Some(4),
            ..base()
        });
        let err = luks_offset.err().unwrap().to_string();
        assert!(err.contains("--keyfile-offset"), "{err}");
        let bad = ServeConfig::from_args(ServeArgs {
            cipher: None,
            key_keyring: Some("%trusted:x".into()),
            ..base()
        });
        assert!(matches!(bad, Err(ConfigError::Keyring(_))));
        let unlink_alone = ServeConfig::from_args(ServeArgs {
            key_keyring_unlink: Some(true),
            ..base()
        });
        let err = unlink_alone.err().unwrap().to_string();
        assert!(err.contains("--key-keyring-unlink"), "{err}");
        let toml = "socket = \"/s\"\nimage = \"/i\"\nkey-keyring = \"%user:vm1\"\nkey-keyring-unlink = true\n";
        let merged = with_file(toml, &[]).unwrap();
        assert_eq!(merged.key_keyring.as_deref(), Some("%user:vm1"));
        assert_eq!(merged.key_keyring_unlink, Some(true));
        assert!(ServeConfig::from_args(merged).is_ok());
    }

    #[test]
    fn the_vhost_user_convention_names_are_config_keys_too() {
        let toml = "socket-path = \"/s\"\nblk-file = \"/i\"\nread-only = true\ncipher = \"none\"\n";
        let merged = with_file(toml, &[]).unwrap();
        assert_eq!(merged.socket, Some("/s".into()));
        assert_eq!(merged.image, Some("/i".into()));
        assert_eq!(merged.readonly, Some(true));
    }

    #[test]
    fn the_socket_is_a_path_an_fd_or_systemds_and_only_one() {
        let no_socket = || ServeArgs {
            socket: None,
            ..base()
        };
        let activated = || {
            Some(Activation {
                fd: 3,
                name: Some("vm1.socket".into()),
            })
        };
        let listen = |a, act| ServeConfig::from_args_and_activation(a, act).map(|c| c.listen);
        assert_eq!(listen(base(), None).unwrap(), ListenOn::Path("/s".into()));
        let fd = listen(
            ServeArgs {
                fd: Some(5),
                ..no_socket()
            },
            None,
        );
        assert_eq!(
            fd.unwrap(),
            ListenOn::Inherited {
                fd: 5,
                origin: Origin::Flag
            }
        );
        let systemd = listen(no_socket(), activated()).unwrap();
        assert!(matches!(
            systemd,
            ListenOn::Inherited {
                fd: 3,
                origin: Origin::Systemd { name: Some(_) }
            }
        ));
        // An explicit --fd wins over the environment.
        let both = listen(
            ServeArgs {
                fd: Some(7),
                ..no_socket()
            },
            activated(),
        );
        assert!(matches!(both.unwrap(), ListenOn::Inherited { fd: 7, .. }));
        assert!(matches!(
            listen(no_socket(), None),
            Err(ConfigError::Missing(_))
        ));
        let err = |a, act| listen(a, act).err().unwrap().to_string();
        let fd_and_path = err(
            ServeArgs {
                fd: Some(5),
                ..base()
            },
            None,
        );
        assert!(
            fd_and_path.contains("--socket cannot be used with --fd"),
            "{fd_and_path}"
        );
        let mode = err(
            ServeArgs {
                socket_mode: Some("0660".into()),
                ..no_socket()
            },
            activated(),
        );
        assert!(
            mode.contains("--socket-mode") && mode.contains("SocketMode="),
            "{mode}"
        );
        assert!(err(
            ServeArgs {
                fd: Some(-1),
                ..no_socket()
            },
            None
        )
        .contains("--fd"));
        // The sandbox gets no socket to remove when it is inherited.
        let cfg = ServeConfig::from_args_and_activation(no_socket(), activated()).unwrap();
        assert_eq!(cfg.sandbox.socket, None);
        assert_eq!(
            ServeConfig::from_args(base()).unwrap().sandbox.socket,
            Some("/s".into())
        );
    }

    #[test]
    fn unknown_config_keys_and_bad_values_are_refused() {
        assert!(matches!(
            with_file("sockett = \"/tmp/a.sock\"\n", &[]),
            Err(ConfigError::Parse { .. })
        ));
        assert!(ServeConfig::from_args(ServeArgs {
            sector_size: Some(8192),
            ..base()
        })
        .is_err());
        assert!(ServeConfig::from_args(ServeArgs {
            queue_size: Some(100),
            ..base()
        })
        .is_err());
        assert!(ServeConfig::from_args(ServeArgs {
            serial: Some("x".repeat(21)),
            ..base()
        })
        .is_err());
        let no_key = ServeArgs {
            cipher: None,
            ..base()
        };
        assert!(matches!(
            ServeConfig::from_args(no_key),
            Err(ConfigError::Missing(_))
        ));
        let default_serial = ServeConfig::from_args(base()).unwrap().device.serial;
        assert!(default_serial.len() <= 20);
    }
}
