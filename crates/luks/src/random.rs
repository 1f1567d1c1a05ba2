//! The OS random source (getrandom(2)); the only source of keys and salts.

use super::LuksError;

pub fn fill(buf: &mut [u8]) -> Result<(), LuksError> {
    getrandom::fill(buf).map_err(|e| LuksError::Random(e.to_string()))
}

/// A random RFC 4122 version-4 UUID in its lowercase text form.
pub fn uuid_v4() -> Result<String, LuksError> {
    let mut b = [0u8; 16];
    fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}
