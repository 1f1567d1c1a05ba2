//! The LUKS2 binary header: two copies (primary at 0, secondary at
//! `hdr_size`), each a 4 KiB big-endian header followed by the JSON area, each
//! protected by a sha256 over both with the checksum field zeroed.

use crate::device::Device;

use sha2::{Digest, Sha256};

use crate::header::{put_text, text};
use crate::{LuksError, MAGIC};

pub const BIN_SIZE: usize = 4096;
const MAGIC2: &[u8; 6] = b"SKUL\xba\xbe";
const CSUM_AT: usize = 448;
/// hdr_size values the spec allows; also where a secondary may sit when the
/// primary is too damaged to say.
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

/// One verified copy: binary fields plus the JSON text.
#[derive(Debug, Clone)]
pub struct Copy {
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    pub salt: [u8; 64],
    pub uuid: String,
    pub subsystem: String,
    pub json: String,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and verifies the copy at `offset`; `Err` says why it is unusable.
pub fn read_copy(file: &dyn Device, offset: u64) -> Result<Copy, String> {
    let mut bin = vec![0u8; BIN_SIZE];
    file.read_exact_at(&mut bin, offset)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let magic = if offset == 0 { MAGIC } else { MAGIC2 };
    if &bin[..6] != magic || u16::from_be_bytes([bin[6], bin[7]]) != 2 {
        return Err("bad magic or version".into());
    }
    let hdr_size = be64(&bin, 8);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(format!("invalid header size {hdr_size}"));
    }
    if be64(&bin, 256) != offset {
        return Err(format!("it claims to be at offset {}", be64(&bin, 256)));
    }
    if offset != 0 && offset != hdr_size {
        return Err("its size does not match its position".into());
    }
    let alg = text(&bin[72..104]);
    if alg != "sha256" {
        return Err(format!("unsupported checksum algorithm {alg:?}"));
    }
    let mut json = vec![0u8; hdr_size as usize - BIN_SIZE];
    file.read_exact_at(&mut json, offset + BIN_SIZE as u64)
        .map_err(|e| format!("cannot read its JSON area: {e}"))?;
    let stored: [u8; 32] = bin[CSUM_AT..CSUM_AT + 32].try_into().expect("32 bytes");
    if checksum(&bin, &json) != stored {
        return Err("checksum mismatch".into());
    }
    let end = json
        .iter()
        .position(|&c| c == 0)
        .ok_or("its JSON area is not NUL-terminated")?;
    let json = String::from_utf8(json[..end].to_vec()).map_err(|_| "its JSON is not UTF-8")?;
    Ok(Copy {
        hdr_size,
        seqid: be64(&bin, 16),
        label: text(&bin[24..72]),
        salt: bin[104..168].try_into().expect("64 bytes"),
        uuid: text(&bin[168..208]),
        subsystem: text(&bin[208..256]),
        json,
    })
}

fn checksum(bin: &[u8], json: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&bin[..CSUM_AT]);
    h.update([0u8; 64]);
    h.update(&bin[CSUM_AT + 64..]);
    h.update(json);
    h.finalize().into()
}

/// Reads both copies and returns the one to use: the newer of two good ones,
/// otherwise whichever is intact (with a warning: cryptsetup would repair it).
pub fn read_best(file: &dyn Device) -> Result<Copy, LuksError> {
    let primary = read_copy(file, 0);
    let secondary = match &primary {
        Ok(p) => read_copy(file, p.hdr_size),
        Err(_) => HDR_SIZES
            .iter()
            .map(|&o| read_copy(file, o))
            .find(|c| c.is_ok())
            .unwrap_or_else(|| Err("not found at any valid offset".into())),
    };
    match (primary, secondary) {
        (Ok(p), Ok(s)) if s.seqid > p.seqid => {
            log::warn!("LUKS2 primary header is older than the secondary (seqid {} < {}); using the secondary", p.seqid, s.seqid);
            Ok(s)
        }
        (Ok(p), Ok(_)) => Ok(p),
        (Ok(p), Err(e)) => {
            log::warn!("LUKS2 secondary header is unusable ({e}); using the primary");
            Ok(p)
        }
        (Err(e), Ok(s)) => {
            log::warn!("LUKS2 primary header is damaged ({e}); using the secondary copy");
            Ok(s)
        }
        (Err(p), Err(s)) => Err(LuksError::Corrupt(format!(
            "both LUKS2 header copies are unusable (primary: {p}; secondary: {s})"
        ))),
    }
}

fn serialize(c: &Copy, offset: u64) -> Result<Vec<u8>, LuksError> {
    let mut buf = vec![0u8; c.hdr_size as usize];
    let json_area = &mut buf[BIN_SIZE..];
    if c.json.len() >= json_area.len() {
        return Err(LuksError::Invalid(format!(
            "the LUKS2 metadata ({} bytes) no longer fits in its {}-byte JSON area",
            c.json.len(),
            json_area.len()
        )));
    }
    json_area[..c.json.len()].copy_from_slice(c.json.as_bytes());
    let bin = &mut buf[..BIN_SIZE];
    bin[..6].copy_from_slice(if offset == 0 { MAGIC } else { MAGIC2 });
    bin[6..8].copy_from_slice(&2u16.to_be_bytes());
    bin[8..16].copy_from_slice(&c.hdr_size.to_be_bytes());
    bin[16..24].copy_from_slice(&c.seqid.to_be_bytes());
    put_text(&mut bin[24..72], &c.label);
    put_text(&mut bin[72..104], "sha256");
    bin[104..168].copy_from_slice(&c.salt);
    put_text(&mut bin[168..208], &c.uuid);
    put_text(&mut bin[208..256], &c.subsystem);
    bin[256..264].copy_from_slice(&offset.to_be_bytes());
    let sum = checksum(&buf[..BIN_SIZE], &buf[BIN_SIZE..]);
    buf[CSUM_AT..CSUM_AT + 32].copy_from_slice(&sum);
    Ok(buf)
}

/// Writes both copies with `seqid` one higher than before.
///
/// Order, as cryptsetup (luks2_disk_metadata.c): primary, fsync, secondary,
/// fsync. Each copy has its own checksum and readers take the intact copy
/// with the higher seqid, so a crash at any point leaves one good copy: a
/// torn primary fails its checksum and the old secondary is used; a crash
/// after the primary leaves the new primary, which has the higher seqid.
pub fn write_both(file: &dyn Device, c: &mut Copy) -> Result<(), LuksError> {
    c.seqid += 1;
    for offset in [0, c.hdr_size] {
        let buf = serialize(c, offset)?;
        file.write_all_at(&buf, offset)
            .and_then(|_| file.sync_data())
            .map_err(LuksError::io("writing a LUKS2 header copy"))?;
    }
    Ok(())
}
