//! The verification pattern. Every 512-byte unit carries its own header
//! (magic, seed, byte offset) and a body derived from (seed, offset), so a
//! read-back tells apart a misplaced write (right seed, other offset), an
//! earlier run (other seed), a never-written unit (zeroes) and garbage
//! (e.g. ciphertext decrypted with the wrong key).

use serde::{Deserialize, Serialize};

use super::rng::mix;

/// The pattern's granularity: the smallest unit a block device addresses.
pub const UNIT: usize = 512;
const WORDS: usize = UNIT / 8;
const MAGIC: u64 = u64::from_le_bytes(*b"CBLKVRFY");

/// What a mismatching unit held instead of the expected pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// Our pattern with the right seed but written for another offset.
    Misplaced { from_offset: u64 },
    /// Our pattern from a run with another seed.
    OtherSeed { seed: u64, offset: u64 },
    /// The right header over a damaged body.
    DamagedBody,
    /// All zeroes: never written, or discarded.
    Zeroes,
    /// Anything else.
    Garbage,
}

/// Expected word `index` (0..64) of the unit at byte `offset`.
fn word(seed: u64, offset: u64, body_key: u64, index: usize) -> u64 {
    match index {
        0 => MAGIC,
        1 => seed,
        2 => offset,
        _ => mix(body_key.wrapping_add(index as u64)),
    }
}

fn body_key(seed: u64, offset: u64) -> u64 {
    mix(seed ^ mix(offset))
}

/// Fills `buf` (a multiple of 512 bytes) with the pattern of the device
/// bytes starting at `offset`.
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, unit) in buf.chunks_exact_mut(UNIT).enumerate() {
        let unit_offset = offset + (i * UNIT) as u64;
        let key = body_key(seed, unit_offset);
        for (w, bytes) in unit.chunks_exact_mut(8).enumerate() {
            bytes.copy_from_slice(&word(seed, unit_offset, key, w).to_le_bytes());
        }
    }
}

/// Checks one 512-byte unit; `None` when it holds the expected pattern.
pub fn check_unit(unit: &[u8], seed: u64, offset: u64) -> Option<Found> {
    let key = body_key(seed, offset);
    let intact = unit
        .chunks_exact(8)
        .enumerate()
        .all(|(w, bytes)| read_word(bytes) == word(seed, offset, key, w));
    if intact && unit.len() == UNIT {
        None
    } else {
        Some(classify(unit, seed, offset))
    }
}

/// Calls `on_mismatch(unit_offset, found)` for every unit of `buf` (read
/// from device byte `offset`) that does not hold the pattern.
pub fn check(buf: &[u8], seed: u64, offset: u64, mut on_mismatch: impl FnMut(u64, Found)) {
    for (i, unit) in buf.chunks_exact(UNIT).enumerate() {
        let unit_offset = offset + (i * UNIT) as u64;
        if let Some(found) = check_unit(unit, seed, unit_offset) {
            on_mismatch(unit_offset, found);
        }
    }
}

fn read_word(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

fn classify(unit: &[u8], seed: u64, offset: u64) -> Found {
    let header = |w: usize| read_word(&unit[w * 8..w * 8 + 8]);
    if unit.len() < WORDS * 8 {
        return Found::Garbage;
    }
    if header(0) == MAGIC {
        let (found_seed, found_offset) = (header(1), header(2));
        if found_seed != seed {
            return Found::OtherSeed {
                seed: found_seed,
                offset: found_offset,
            };
        }
        if found_offset != offset {
            return Found::Misplaced {
                from_offset: found_offset,
            };
        }
        return Found::DamagedBody;
    }
    if unit.iter().all(|&b| b == 0) {
        Found::Zeroes
    } else {
        Found::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_is_clean() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 42, 8192);
        let mut bad = Vec::new();
        check(&buf, 42, 8192, |o, f| bad.push((o, f)));
        assert!(bad.is_empty());
    }

    #[test]
    fn every_unit_differs() {
        let mut buf = vec![0u8; 1024];
        fill(&mut buf, 1, 0);
        assert_ne!(buf[..512], buf[512..]);
        assert_ne!(buf[100..200], buf[612..712]);
    }

    #[test]
    fn classifies_misplaced_other_seed_zero_and_garbage() {
        let mut buf = vec![0u8; 512 * 5];
        fill(&mut buf[..512], 3, 4096); // belongs elsewhere
        fill(&mut buf[512..1024], 9, 512); // another run
        fill(&mut buf[1024..1536], 3, 1024);
        buf[1024 + 300] ^= 1; // a flipped bit in the body
        buf[2048..].fill(0xa5);
        // units 3 (zeroes) and 4 (garbage) as they are
        buf[1536..2048].fill(0);
        let mut found = Vec::new();
        check(&buf, 3, 0, |o, f| found.push((o, f)));
        assert_eq!(
            found,
            vec![
                (0, Found::Misplaced { from_offset: 4096 }),
                (
                    512,
                    Found::OtherSeed {
                        seed: 9,
                        offset: 512
                    }
                ),
                (1024, Found::DamagedBody),
                (1536, Found::Zeroes),
                (2048, Found::Garbage),
            ]
        );
    }
}
