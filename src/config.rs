//! `cryptblk serve` options: command-line flags, a TOML file with the same
//! keys (`--config`), and the checks that turn them into a device.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::crypto::{IvRule, KeyError, SectorCipher, XtsKey, SECTOR_SIZES};
use crate::device::{CryptoMode, DeviceOptions};

/// Where splitting a request across workers starts to pay (see README).
const DEFAULT_SPLIT_THRESHOLD: u64 = 128 << 10;
use crate::volume::{open_image, ImageOptions, Volume, VolumeError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required (on the command line or in the --config file)")]
    Missing(&'static str),
    #[error("invalid {flag} {value:?}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: &'static str,
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
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Luks(#[from] crate::luks::LuksError),
}

/// How the image is opened, as cryptsetup's `open --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeType {
    /// A raw key (--key-file) and the layout from the flags (default).
    Plain,
    /// A LUKS1 or LUKS2 header: passphrase, key, layout from the header.
    Luks,
    Luks1,
    Luks2,
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

/// Every option of `cryptblk serve`. All are optional here so that a
/// config file can supply what the command line leaves out.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file whose keys are these options' long names; flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on (the VMM connects to it).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Image file or block device holding the ciphertext.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Create a sparse image with this much payload (e.g. 10G) if none exists.
    #[arg(long, value_name = "BYTES")]
    pub size: Option<String>,
    /// File holding the raw key (key-size/8 bytes); "-" reads standard input.
    /// With --type luks*: the passphrase (whole file; none = prompt).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<String>,
    /// plain (default) or luks, luks1, luks2: unlock a LUKS header.
    #[arg(long = "type", value_enum)]
    #[serde(rename = "type")]
    pub volume_type: Option<VolumeType>,
    /// LUKS: a detached header file (the image then holds only the payload).
    #[arg(long, value_name = "PATH")]
    pub header: Option<PathBuf>,
    /// LUKS: try only this key slot.
    #[arg(long, value_name = "N")]
    pub key_slot: Option<usize>,
    /// LUKS: skip this many bytes of the key file.
    #[arg(long, value_name = "BYTES")]
    pub keyfile_offset: Option<u64>,
    /// LUKS: read only this many bytes of the key file.
    #[arg(long, value_name = "BYTES")]
    pub keyfile_size: Option<u64>,
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
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub readonly: Option<bool>,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub direct: Option<bool>,
    /// Offer DISCARD and punch holes (reveals which blocks are unused).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub allow_discards: Option<bool>,
    /// Serial number returned by GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Where crypto runs: inline (vring thread), workers (pool) or auto.
    #[arg(long, value_enum)]
    pub crypto: Option<CryptoMode>,
    /// Worker threads for --crypto workers/auto (default: one per queue).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Reads/writes at least this large are split across workers (default 128K).
    #[arg(long, value_name = "BYTES")]
    pub split_threshold: Option<String>,
    /// error, warn, info, debug or trace (default: RUST_LOG, else info).
    #[arg(long)]
    pub log_level: Option<String>,
}

macro_rules! take_missing {
    ($into:ident, $from:ident, $($field:ident),* $(,)?) => {
        $( if $into.$field.is_none() { $into.$field = $from.$field.take(); } )*
    };
}

impl ServeArgs {
    /// Fills options the command line left out from `--config`, if given.
    pub fn with_config_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
            path: shown.clone(),
            source,
        })?;
        let mut file: ServeArgs = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown,
            source: Box::new(e),
        })?;
        take_missing!(
            self,
            file,
            socket,
            image,
            size,
            key_file,
            volume_type,
            header,
            key_slot,
            keyfile_offset,
            keyfile_size,
            key_size,
            cipher,
            sector_size,
            iv_large_sectors,
            offset,
            skip,
            queues,
            queue_size,
            readonly,
            direct,
            allow_discards,
            serial,
            log_level
        );
        Ok(self)
    }
}

/// Validated options, ready to open the volume and start serving.
pub struct ServeConfig {
    pub socket: PathBuf,
    pub device: DeviceOptions,
    pub log_level: Option<String>,
    image: ImageSpec,
}

struct ImageSpec {
    path: PathBuf,
    create_size: Option<u64>,
    payload_offset: u64,
    readonly: bool,
    direct: bool,
    cipher: Cipher,
    key_file: Option<String>,
    key_size: usize,
    rule: IvRule,
    luks: Option<LuksSpec>,
}

/// What unlocking a LUKS header needs; the layout comes from the header.
struct LuksSpec {
    version: Option<u8>,
    header: Option<PathBuf>,
    key_slot: Option<usize>,
    keyfile_offset: u64,
    keyfile_size: Option<u64>,
}

impl ServeConfig {
    pub fn from_args(a: ServeArgs) -> Result<Self, ConfigError> {
        let luks = luks_spec(&a)?;
        let socket = a.socket.ok_or(ConfigError::Missing("--socket"))?;
        let path = a.image.ok_or(ConfigError::Missing("--image"))?;
        let sector_size = a.sector_size.unwrap_or(512);
        if !SECTOR_SIZES.contains(&sector_size) {
            return invalid("--sector-size", sector_size, "use 512, 1024, 2048 or 4096");
        }
        let skip = a.skip.unwrap_or(0);
        let large = a.iv_large_sectors.unwrap_or(false);
        if large && skip % (sector_size as u64 / 512) != 0 {
            return invalid("--skip", skip, "with --iv-large-sectors it must be a multiple of sector-size/512 (dm-crypt refuses it too)");
        }
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
        let readonly = a.readonly.unwrap_or(false);
        let serial = a.serial.unwrap_or_else(|| default_serial(&path));
        if serial.len() > 20 {
            return invalid("--serial", serial, "at most 20 bytes (virtio-blk GET_ID)");
        }
        let cipher = a.cipher.unwrap_or(Cipher::AesXtsPlain64);
        let key_size = a.key_size.unwrap_or(512);
        if cipher == Cipher::AesXtsPlain64 && a.key_file.is_none() && luks.is_none() {
            return Err(ConfigError::Missing("--key-file (or --cipher none)"));
        }
        let create_size = a.size.as_deref().map(parse_size).transpose()?;
        let workers = a.workers.unwrap_or(queues);
        if !(1..=256).contains(&workers) {
            return invalid("--workers", workers, "use 1 to 256");
        }
        let split_threshold = match a.split_threshold.as_deref() {
            Some(s) => parse_size(s)?,
            None => DEFAULT_SPLIT_THRESHOLD,
        };
        if split_threshold % sector_size as u64 != 0 {
            return invalid(
                "--split-threshold",
                split_threshold,
                "must be a multiple of the sector size",
            );
        }
        Ok(ServeConfig {
            socket,
            device: DeviceOptions {
                queues,
                queue_size: queue_size as u16,
                readonly,
                allow_discards: a.allow_discards.unwrap_or(false),
                serial,
                crypto: a.crypto.unwrap_or(CryptoMode::Inline),
                workers,
                split_threshold: split_threshold as usize,
            },
            log_level: a.log_level,
            image: ImageSpec {
                path,
                create_size,
                payload_offset: a.offset.unwrap_or(0).checked_mul(512).ok_or(
                    ConfigError::Invalid {
                        flag: "--offset",
                        value: "too large".into(),
                        why: "the offset is in 512-byte sectors",
                    },
                )?,
                readonly,
                direct: a.direct.unwrap_or(false),
                cipher,
                key_file: a.key_file,
                key_size,
                rule: IvRule {
                    sector_size,
                    large_sectors: large,
                    skip,
                },
                luks,
            },
        })
    }

    /// Reads the key and opens (or creates) the image.
    pub fn open_volume(&self) -> Result<Volume, ConfigError> {
        let s = &self.image;
        if let Some(l) = &s.luks {
            return self.open_luks_volume(l);
        }
        let key = match (s.cipher, &s.key_file) {
            (Cipher::AesXtsPlain64, Some(path)) => {
                warn_if_key_file_is_exposed(path);
                Some(XtsKey::from_key_file(path, s.key_size)?)
            }
            _ => None,
        };
        Ok(open_image(ImageOptions {
            path: s.path.clone(),
            create_size: s.create_size,
            payload_offset: s.payload_offset,
            readonly: s.readonly,
            direct: s.direct,
            cipher: SectorCipher::new(key.as_ref(), s.rule),
        })?)
    }
}

impl ServeConfig {
    /// Unlocks the header (the image's own or --header) and opens the
    /// payload with the key, offset and sector size it gives.
    fn open_luks_volume(&self, l: &LuksSpec) -> Result<Volume, ConfigError> {
        let s = &self.image;
        if let Some(path) = &s.key_file {
            warn_if_key_file_is_exposed(path);
        }
        let pass =
            crate::luks::read_passphrase(s.key_file.as_deref(), l.keyfile_offset, l.keyfile_size)?;
        let header = l.header.as_deref().unwrap_or(&s.path);
        let u = crate::luks::unlock(header, &pass, l.key_slot)?;
        if let Some(v) = l.version.filter(|v| *v != u.version) {
            let value = format!("luks{v} (the header is LUKS{})", u.version);
            return invalid("--type", value, "use --type luks to accept either version");
        }
        if self.device.split_threshold % u.sector_size != 0 {
            return invalid(
                "--split-threshold",
                self.device.split_threshold,
                "must be a multiple of the LUKS sector size",
            );
        }
        check_payload_size(&s.path, u.payload_offset, u.payload_size)?;
        let rule = IvRule {
            sector_size: u.sector_size,
            large_sectors: u.iv_large_sectors,
            skip: 0,
        };
        Ok(open_image(ImageOptions {
            path: s.path.clone(),
            create_size: None,
            payload_offset: u.payload_offset,
            readonly: s.readonly,
            direct: s.direct,
            cipher: SectorCipher::new(Some(&u.key), rule),
        })?)
    }
}

/// A LUKS2 segment of fixed size must be exactly what the image holds after
/// the offset: serving more would expose bytes the header does not cover.
fn check_payload_size(path: &Path, offset: u64, size: Option<u64>) -> Result<(), ConfigError> {
    use std::io::{Seek, SeekFrom};
    let Some(size) = size else { return Ok(()) };
    let len = std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|source| VolumeError::Open {
            path: path.display().to_string(),
            source,
        })?;
    if len.checked_sub(offset) != Some(size) {
        let value = format!("{size} bytes at offset {offset}, image {len} bytes");
        return invalid(
            "LUKS2 segment size",
            value,
            "only a segment reaching the end of the image is supported",
        );
    }
    Ok(())
}

/// The LUKS part of the options; flags that the header decides are refused.
fn luks_spec(a: &ServeArgs) -> Result<Option<LuksSpec>, ConfigError> {
    let version = match a.volume_type.unwrap_or(VolumeType::Plain) {
        VolumeType::Plain => {
            let luks_only = [
                ("--header", a.header.is_some()),
                ("--key-slot", a.key_slot.is_some()),
                ("--keyfile-offset", a.keyfile_offset.is_some()),
                ("--keyfile-size", a.keyfile_size.is_some()),
            ];
            if let Some((flag, _)) = luks_only.iter().find(|(_, set)| *set) {
                return invalid(flag, "set", "needs --type luks (or luks1/luks2)");
            }
            return Ok(None);
        }
        VolumeType::Luks => None,
        VolumeType::Luks1 => Some(1),
        VolumeType::Luks2 => Some(2),
    };
    let from_header = [
        ("--size", a.size.is_some()),
        ("--key-size", a.key_size.is_some()),
        ("--cipher", a.cipher.is_some()),
        ("--sector-size", a.sector_size.is_some()),
        ("--iv-large-sectors", a.iv_large_sectors.is_some()),
        ("--offset", a.offset.is_some()),
        ("--skip", a.skip.is_some()),
    ];
    if let Some((flag, _)) = from_header.iter().find(|(_, set)| *set) {
        return invalid(
            flag,
            "set",
            "the LUKS header decides it; drop the flag (use `cryptblk format` to make an image)",
        );
    }
    Ok(Some(LuksSpec {
        version,
        header: a.header.clone(),
        key_slot: a.key_slot,
        keyfile_offset: a.keyfile_offset.unwrap_or(0),
        keyfile_size: a.keyfile_size,
    }))
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

/// "64M", "10G", "4096", "1T" (binary units, as qemu-img and cryptsetup use).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return invalid(
                "size",
                s,
                "use a number with an optional K, M, G or T suffix",
            )
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n > 0)
        .map_or_else(|| invalid("size", s, "not a positive size"), Ok)
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

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "socket = \"/tmp/a.sock\"\nimage = \"/tmp/a.img\"\nqueues = 2\nreadonly = true\ncipher = \"none\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            queues: Some(3),
            ..Default::default()
        };
        let merged = args.with_config_file().unwrap();
        assert_eq!(merged.queues, Some(3));
        assert_eq!(merged.readonly, Some(true));
        assert_eq!(merged.cipher, Some(Cipher::None));
        let cfg = ServeConfig::from_args(merged).unwrap();
        assert_eq!(cfg.device.queues, 3);
    }

    #[test]
    fn luks_options_come_from_the_config_file_and_exclude_layout_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "socket = \"/s\"\nimage = \"/i\"\ntype = \"luks2\"\nheader = \"/h\"\nkey-slot = 1\nkeyfile-size = 8\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        }
        .with_config_file()
        .unwrap();
        assert_eq!(args.volume_type, Some(VolumeType::Luks2));
        assert_eq!((args.key_slot, args.keyfile_size), (Some(1), Some(8)));
        let cfg = ServeConfig::from_args(args).unwrap();
        let l = cfg.image.luks.as_ref().unwrap();
        assert_eq!(
            (l.version, l.header.as_deref()),
            (Some(2), Some(Path::new("/h")))
        );
        let luks = || ServeArgs {
            socket: Some("/s".into()),
            image: Some("/i".into()),
            volume_type: Some(VolumeType::Luks),
            ..Default::default()
        };
        for bad in [
            ServeArgs {
                offset: Some(8),
                ..luks()
            },
            ServeArgs {
                sector_size: Some(4096),
                ..luks()
            },
            ServeArgs {
                size: Some("1M".into()),
                ..luks()
            },
            ServeArgs {
                cipher: Some(Cipher::None),
                ..luks()
            },
        ] {
            assert!(matches!(
                ServeConfig::from_args(bad),
                Err(ConfigError::Invalid { .. })
            ));
        }
        let plain_with_slot = ServeArgs {
            volume_type: None,
            key_file: Some("/k".into()),
            key_slot: Some(0),
            ..luks()
        };
        assert!(ServeConfig::from_args(plain_with_slot).is_err());
    }

    #[test]
    fn unknown_config_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "sockett = \"/tmp/a.sock\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
        };
        assert!(matches!(
            args.with_config_file(),
            Err(ConfigError::Parse { .. })
        ));
        let base = || ServeArgs {
            socket: Some("/s".into()),
            image: Some("/i".into()),
            cipher: Some(Cipher::None),
            ..Default::default()
        };
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
