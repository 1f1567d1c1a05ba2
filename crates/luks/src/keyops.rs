//! luksAddKey / luksRemoveKey / luksChangeKey on either header version.
//! Each operation writes new key material before the header that refers to
//! it, and drops a header reference before wiping what it referred to, so an
//! interruption never leaves the image without the keys it had before.

use crate::device::Device;
use std::path::Path;

use zeroize::Zeroizing;

use super::hash::HashAlg;
use super::header::Header;
use super::kdf::{Kdf, KdfChoice};
use super::{open_header, LuksError};

fn first_free(h: &Header) -> Result<usize, LuksError> {
    (0..h.slot_count())
        .find(|&i| !h.is_active(i))
        .ok_or(LuksError::NoFreeSlot)
}

fn luks1_iterations(choice: &KdfChoice, key_len: usize, hash: HashAlg) -> Result<u32, LuksError> {
    if choice.pbkdf != "pbkdf2" {
        return Err(LuksError::Invalid(format!(
            "LUKS1 key slots use pbkdf2 only, not {}",
            choice.pbkdf
        )));
    }
    match (KdfChoice {
        hash,
        ..choice.clone()
    })
    .resolve(key_len)?
    {
        Kdf::Pbkdf2 { iterations, .. } => Ok(iterations),
        Kdf::Argon2 { .. } => unreachable!("pbkdf2 was asked for"),
    }
}

fn put_slot(
    h: &mut Header,
    file: &dyn Device,
    slot: usize,
    new: &[u8],
    key: &[u8],
    choice: &KdfChoice,
) -> Result<(), LuksError> {
    match h {
        Header::V1(h1) => {
            let iterations = luks1_iterations(choice, key.len(), h1.hash)?;
            h1.add_slot(file, slot, new, key, iterations)
        }
        Header::V2(h2) => h2.add_slot(
            file,
            slot,
            new,
            key,
            choice.resolve(key.len())?,
            choice.hash,
        ),
    }
}

/// Adds `new` in `slot` (or the first free one); `current` must open a slot.
pub fn add(
    path: &Path,
    current: &[u8],
    new: &[u8],
    slot: Option<usize>,
    choice: &KdfChoice,
) -> Result<usize, LuksError> {
    let (file, mut h) = open_header(path, true)?;
    let (_, key) = h.unlock(&*file, current, None)?;
    let target = match slot {
        Some(s) if s >= h.slot_count() => {
            return Err(LuksError::SlotOutOfRange {
                slot: s,
                count: h.slot_count(),
            })
        }
        Some(s) if h.is_active(s) => return Err(LuksError::SlotInUse { slot: s }),
        Some(s) => s,
        None => first_free(&h)?,
    };
    put_slot(&mut h, &*file, target, new, &key, choice)?;
    Ok(target)
}

/// Removes `slot`, or without it the slot `pass` opens. `pass` must open a
/// slot either way; the last active slot is never removed.
pub fn remove(path: &Path, pass: &[u8], slot: Option<usize>) -> Result<usize, LuksError> {
    let (file, mut h) = open_header(path, true)?;
    let (opened, _key) = h.unlock(&*file, pass, None)?;
    let target = slot.unwrap_or(opened);
    if target >= h.slot_count() {
        return Err(LuksError::SlotOutOfRange {
            slot: target,
            count: h.slot_count(),
        });
    }
    if !h.is_active(target) {
        return Err(LuksError::SlotInactive { slot: target });
    }
    if h.active_slots().len() == 1 {
        return Err(LuksError::LastSlot { slot: target });
    }
    remove_slot(&mut h, &*file, target)?;
    Ok(target)
}

fn remove_slot(h: &mut Header, file: &dyn Device, slot: usize) -> Result<(), LuksError> {
    match h {
        Header::V1(h1) => h1.remove_slot(file, slot),
        Header::V2(h2) => h2.remove_slot(file, slot),
    }
}

/// Replaces the passphrase of the slot `current` opens (only `slot` if
/// given); returns the slot now holding `new`.
pub fn change(
    path: &Path,
    current: &[u8],
    new: &[u8],
    slot: Option<usize>,
    choice: &KdfChoice,
) -> Result<usize, LuksError> {
    let (file, mut h) = open_header(path, true)?;
    let (old, key): (usize, Zeroizing<Vec<u8>>) = h.unlock(&*file, current, slot)?;
    let free = first_free(&h).ok();
    match &mut h {
        Header::V2(h2) => {
            // Same id, new area: one header commit switches old → new.
            h2.change_slot(
                &*file,
                old,
                new,
                &key,
                choice.resolve(key.len())?,
                choice.hash,
            )?;
            Ok(old)
        }
        Header::V1(h1) => match free {
            // LUKS1 areas are fixed per slot: fill a free slot, then drop
            // the old one (cryptsetup does the same).
            Some(free) => {
                put_slot(&mut h, &*file, free, new, &key, choice)?;
                remove_slot(&mut h, &*file, old)?;
                Ok(free)
            }
            None => {
                log::warn!("no free LUKS1 key slot: changing slot {old} in place; an interruption now would lose it");
                let iterations = luks1_iterations(choice, key.len(), h1.hash)?;
                h1.slots[old].active = false;
                h1.add_slot(&*file, old, new, &key, iterations)?;
                Ok(old)
            }
        },
    }
}
