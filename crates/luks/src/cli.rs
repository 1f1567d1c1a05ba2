//! Command-line arguments of `format`, `key` and `dump` (cryptsetup's
//! option names) and what each command does with them.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use super::format::{self, Kind};
use super::hash::HashAlg;
use super::kdf::{half_ram_kib, KdfChoice};
use super::passphrase::{read_interactive, read_passphrase};
use super::{dump, keyops, open_header, LuksError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TypeArg {
    Luks2,
    Luks1,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PbkdfArg {
    Argon2id,
    Argon2i,
    Pbkdf2,
}

/// Key derivation costs for new key slots (defaults as cryptsetup's).
#[derive(Debug, Clone, Args)]
pub struct KdfArgs {
    /// KDF for new key slots (LUKS2 default argon2id; LUKS1 only pbkdf2).
    #[arg(long, value_enum)]
    pub pbkdf: Option<PbkdfArg>,
    /// Milliseconds one unlock should take on this machine (default 2000).
    #[arg(long)]
    pub iter_time: Option<u32>,
    /// Argon2 memory in KiB (default 1 GiB, at most half the RAM).
    #[arg(long)]
    pub pbkdf_memory: Option<u32>,
    /// Argon2 threads (default min(4, CPUs)).
    #[arg(long)]
    pub pbkdf_parallel: Option<u32>,
    /// Fixed iterations (pbkdf2) or time cost (argon2), no benchmark.
    #[arg(long)]
    pub pbkdf_force_iterations: Option<u32>,
    /// Hash for pbkdf2, the AF splitter and the digest: sha1, sha256, sha512.
    #[arg(long, default_value = "sha256")]
    pub hash: String,
}

impl KdfArgs {
    fn choice(&self, version: u8) -> Result<KdfChoice, LuksError> {
        let pbkdf = match (self.pbkdf, version) {
            (None, 1) | (Some(PbkdfArg::Pbkdf2), _) => "pbkdf2",
            (None, _) | (Some(PbkdfArg::Argon2id), _) => "argon2id",
            (Some(PbkdfArg::Argon2i), _) => "argon2i",
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(KdfChoice {
            pbkdf: pbkdf.into(),
            hash: HashAlg::from_name(&self.hash)?,
            iter_time_ms: self.iter_time.unwrap_or(2000),
            memory_kib: self.pbkdf_memory.unwrap_or_else(default_memory_kib),
            parallel: self.pbkdf_parallel.unwrap_or(cpus.min(4)),
            forced_iterations: self.pbkdf_force_iterations,
        })
    }
}

/// cryptsetup's default: 1 GiB, at most half the RAM.
fn default_memory_kib() -> u32 {
    half_ram_kib().unwrap_or(0).clamp(32, 1 << 20) as u32
}

/// The help heading of `StorageArgs` in `format`, `key` and `dump`.
const NETWORK_IMAGES: &str = "Network images (NBD URIs, rbd:POOL/IMAGE)";

/// How to reach an image that is not a local file: TLS for NBD URIs, the
/// cluster for RBD images. `serve`, `format`, `key` and `dump` all take
/// these (the names of qemu-nbd's and the rbd tool's options). The LUKS
/// code never reads them: the binary turns them into the opener it
/// installs (`device::set_opener`) before a command runs.
#[derive(Debug, Clone, Default, Args, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StorageArgs {
    /// NBD over TLS (nbds://): directory of X.509 files (ca-cert.pem,
    /// client-cert.pem, client-key.pem), as nbdkit/qemu-nbd name it.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// NBD over TLS (nbds://): pre-shared keys file (psktool's
    /// username:hexkey lines), as libnbd's URI query calls it.
    #[arg(long, value_name = "FILE")]
    pub tls_psk_file: Option<PathBuf>,
    /// NBD over TLS: the username to authenticate as (PSK identity).
    #[arg(long, value_name = "NAME")]
    pub tls_username: Option<String>,
    /// RBD images (rbd:POOL/IMAGE): the Ceph configuration file (default:
    /// librados' search, $CEPH_CONF then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// RBD: the cephx user to connect as, without "client." (default admin).
    #[arg(long, value_name = "ID")]
    pub ceph_id: Option<String>,
    /// RBD: the cephx keyring (default: where the Ceph configuration says).
    #[arg(long, value_name = "FILE")]
    pub ceph_keyring: Option<PathBuf>,
    /// RBD: a request the cluster has not answered after this many seconds
    /// fails with an I/O error (librados' rados_osd_op_timeout; also
    /// client_mount_timeout for connecting). Default 0: wait for the
    /// cluster as long as it takes, as librbd and QEMU do.
    #[arg(long, value_name = "SECONDS")]
    pub rbd_timeout: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct FormatArgs {
    /// luks2, luks1 or plain (raw dm-crypt, no header).
    #[arg(long = "type", value_enum, default_value = "luks2")]
    pub kind: TypeArg,
    /// The image to create; an existing file is never overwritten.
    #[arg(long)]
    pub image: PathBuf,
    /// Payload size (the header comes on top): bytes or 64K, 10M, 2G, ...
    #[arg(long, value_parser = cryptblk_units::parse_bytes)]
    pub size: u64,
    /// LUKS: the passphrase file ("-" = stdin; none = prompt). Plain: the raw
    /// key, created with key-size/8 random bytes (mode 0600) if missing.
    #[arg(long)]
    pub key_file: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub keyfile_offset: u64,
    #[arg(long)]
    pub keyfile_size: Option<u64>,
    #[command(flatten)]
    pub kdf: KdfArgs,
    #[arg(long, default_value_t = 512)]
    pub sector_size: usize,
    /// Volume key bits: 512 = AES-256-XTS, 256 = AES-128-XTS.
    #[arg(long, default_value_t = 512)]
    pub key_size: usize,
    #[arg(long)]
    pub uuid: Option<String>,
    /// LUKS2 only.
    #[arg(long)]
    pub label: Option<String>,
    /// Only aes-xts-plain64 is supported.
    #[arg(long, default_value = "aes-xts-plain64")]
    pub cipher: String,
    #[command(flatten, next_help_heading = NETWORK_IMAGES)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeyAction {
    /// Add a passphrase (luksAddKey); --key-slot picks the new slot.
    Add(KeyOpArgs),
    /// Remove the slot the passphrase opens, or --key-slot (luksRemoveKey/luksKillSlot).
    Remove(KeyOpArgs),
    /// Replace a passphrase (luksChangeKey); --key-slot picks the slot to change.
    Change(KeyOpArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeyOpArgs {
    #[arg(long)]
    pub image: PathBuf,
    /// A current passphrase ("-" = stdin; none = prompt).
    #[arg(long)]
    pub key_file: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub keyfile_offset: u64,
    #[arg(long)]
    pub keyfile_size: Option<u64>,
    /// The new passphrase for add/change (none = prompt).
    #[arg(long)]
    pub new_key_file: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub new_keyfile_offset: u64,
    #[arg(long)]
    pub new_keyfile_size: Option<u64>,
    #[arg(long)]
    pub key_slot: Option<usize>,
    #[command(flatten)]
    pub kdf: KdfArgs,
    #[command(flatten, next_help_heading = NETWORK_IMAGES)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DumpArgs {
    #[arg(long)]
    pub image: PathBuf,
    /// A detached header to read instead of the image's own.
    #[arg(long)]
    pub header: Option<PathBuf>,
    #[command(flatten, next_help_heading = NETWORK_IMAGES)]
    pub storage: StorageArgs,
}

pub fn run_format(a: &FormatArgs) -> Result<(), LuksError> {
    if a.cipher != "aes-xts-plain64" {
        return Err(LuksError::Unsupported(format!(
            "cipher {:?}; only aes-xts-plain64 is supported",
            a.cipher
        )));
    }
    let (kind, version) = match a.kind {
        TypeArg::Luks1 => (Kind::Luks1, 1),
        TypeArg::Luks2 => (Kind::Luks2, 2),
        TypeArg::Plain => (Kind::Plain, 0),
    };
    let params = format::Params {
        kind,
        image: &a.image,
        size: a.size,
        key_bits: a.key_size,
        sector_size: a.sector_size,
        uuid: a.uuid.clone(),
        label: a.label.clone(),
        kdf: a.kdf.choice(version)?,
    };
    if kind == Kind::Plain {
        let key_file = a.key_file.as_deref().ok_or_else(|| {
            LuksError::Invalid(
                "--type plain needs --key-file (a raw key; created if missing)".into(),
            )
        })?;
        if key_file != "-" && format::ensure_plain_key(Path::new(key_file), a.key_size)? {
            eprintln!(
                "created the key file {key_file} ({} random bytes, mode 0600)",
                a.key_size / 8
            );
        }
        return format::format(&params, None);
    }
    let pass = match &a.key_file {
        Some(_) => read_passphrase(a.key_file.as_deref(), a.keyfile_offset, a.keyfile_size)?,
        None => new_passphrase_prompt()?,
    };
    format::format(&params, Some(&pass))
}

fn new_passphrase_prompt() -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let first = read_interactive("Enter new passphrase: ")?;
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let again = read_interactive("Verify passphrase: ")?;
        if *again != *first {
            return Err(LuksError::Invalid("the passphrases do not match".into()));
        }
    }
    if first.is_empty() {
        return Err(LuksError::Invalid("the passphrase is empty".into()));
    }
    Ok(first)
}

impl KeyArgs {
    /// The options of whichever action this is.
    pub fn op(&self) -> &KeyOpArgs {
        match &self.action {
            KeyAction::Add(op) | KeyAction::Remove(op) | KeyAction::Change(op) => op,
        }
    }
}

pub fn run_key(a: &KeyArgs) -> Result<(), LuksError> {
    let op = a.op();
    if op.key_file.as_deref() == Some("-") && op.new_key_file.as_deref() == Some("-") {
        return Err(LuksError::Invalid(
            "--key-file and --new-key-file cannot both be stdin".into(),
        ));
    }
    let current = read_passphrase(op.key_file.as_deref(), op.keyfile_offset, op.keyfile_size)?;
    let new = || match &op.new_key_file {
        Some(f) => read_passphrase(Some(f), op.new_keyfile_offset, op.new_keyfile_size),
        None => new_passphrase_prompt(),
    };
    let version = {
        let (_, h) = open_header(&op.image, false)?;
        h.version()
    };
    match &a.action {
        KeyAction::Add(_) => {
            let slot = keyops::add(
                &op.image,
                &current,
                &new()?,
                op.key_slot,
                &op.kdf.choice(version)?,
            )?;
            eprintln!("key slot {slot} added");
        }
        KeyAction::Remove(_) => {
            let slot = keyops::remove(&op.image, &current, op.key_slot)?;
            eprintln!("key slot {slot} removed");
        }
        KeyAction::Change(_) => {
            let slot = keyops::change(
                &op.image,
                &current,
                &new()?,
                op.key_slot,
                &op.kdf.choice(version)?,
            )?;
            eprintln!("key slot {slot} now holds the new passphrase");
        }
    }
    Ok(())
}

pub fn run_dump(a: &DumpArgs) -> Result<(), LuksError> {
    let path = a.header.as_deref().unwrap_or(&a.image);
    let (_, h) = open_header(path, false)?;
    print!("{}", dump::render(&h));
    Ok(())
}
