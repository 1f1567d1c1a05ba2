//! One error type for the LUKS layer. Messages never contain a secret and say
//! what to check next.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0} is not a LUKS image (no \"LUKS\\xba\\xbe\" magic); check --image/--header, or use --type plain")]
    NotLuks(String),
    #[error("the LUKS header is truncated: {0}; the image or header file is incomplete")]
    Truncated(String),
    #[error("the LUKS header is damaged: {0}")]
    Corrupt(String),
    #[error("unsupported LUKS feature: {0}")]
    Unsupported(String),
    #[error("no key slot opens with this passphrase; check the key file, --keyfile-offset and --keyfile-size")]
    WrongPassphrase,
    #[error(
        "key slot {slot} does not open with this passphrase; check the key file or --key-slot"
    )]
    WrongPassphraseForSlot { slot: usize },
    #[error("key slot {slot} is not in use; `cryptblk dump` lists the active slots")]
    SlotInactive { slot: usize },
    #[error("key slot {slot} does not exist; this header has slots 0..{count}")]
    SlotOutOfRange { slot: usize, count: usize },
    #[error("key slot {slot} is already in use; pick a free slot or remove it first")]
    SlotInUse { slot: usize },
    #[error("no free key slot (or keyslot area space) left; remove a key first")]
    NoFreeSlot,
    #[error("refusing to remove key slot {slot}: it is the last one and the image would become unopenable")]
    LastSlot { slot: usize },
    #[error("{0}")]
    Invalid(String),
    /// A header asks for more KDF memory or time than any unlock may take
    /// (the caps in kdf.rs); the message names the slot and the cost.
    #[error("{0}")]
    OverLimit(String),
    /// The data area would include the LUKS header or key slots.
    #[error("the LUKS data area starts at byte {offset}, inside the LUKS header and key slots (bytes 0..{header_end} of the image): serving it would let the guest read and overwrite them. A data offset this low is only valid with a detached header: pass the header file with --header, or restore the header from a backup (cryptsetup luksHeaderRestore)")]
    PayloadOverlapsHeader { offset: u64, header_end: u64 },
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("the OS random source failed: {0}")]
    Random(String),
    #[error(transparent)]
    Key(#[from] cryptblk_crypto::KeyError),
}

impl LuksError {
    /// Wraps an I/O error with what we were doing and on which file.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> LuksError {
        let what = what.into();
        move |source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                LuksError::Truncated(what)
            } else {
                LuksError::Io { what, source }
            }
        }
    }
}
