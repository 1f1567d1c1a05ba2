//! `cryptblk dump`: what a header says, never a secret (salts and digests
//! are not printed either: they are of no use to a reader).

use std::fmt::Write;

use super::header::Header;
use super::luks2::meta::Keyslot;

pub fn render(h: &Header) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "LUKS header information");
    let _ = writeln!(o, "Version:        {}", h.version());
    let _ = writeln!(o, "UUID:           {}", h.uuid());
    match h {
        Header::V1(h1) => {
            let _ = writeln!(o, "Cipher:         {}", h1.cipher());
            let _ = writeln!(o, "Key size:       {} bits", h1.key_bytes * 8);
            let _ = writeln!(o, "Hash:           {}", h1.hash.name());
            let _ = writeln!(o, "Sector size:    512");
            let _ = writeln!(o, "Payload offset: {} bytes", h.payload_offset());
            let _ = writeln!(o, "MK iterations:  {}", h1.mk_digest_iterations);
            let _ = writeln!(o, "Keyslots:");
            for (i, s) in h1.slots.iter().enumerate() {
                if s.active {
                    let _ = writeln!(
                        o,
                        "  {i}: ENABLED  pbkdf2 (hash {}, {} iterations), AF stripes {}, area at {} bytes",
                        h1.hash.name(),
                        s.iterations,
                        s.stripes,
                        s.offset as u64 * 512
                    );
                } else {
                    let _ = writeln!(o, "  {i}: DISABLED");
                }
            }
        }
        Header::V2(h2) => {
            let seg = &h2.meta.segment;
            let _ = writeln!(o, "Label:          {}", h2.copy.label);
            let _ = writeln!(o, "Subsystem:      {}", h2.copy.subsystem);
            let _ = writeln!(
                o,
                "Header size:    {} bytes (x2), seqid {}",
                h2.copy.hdr_size, h2.copy.seqid
            );
            let _ = writeln!(o, "Cipher:         {}", seg.encryption);
            let _ = writeln!(o, "Sector size:    {}", seg.sector_size);
            let _ = writeln!(o, "Payload offset: {} bytes", seg.offset);
            let size = seg
                .size
                .map_or("dynamic".to_string(), |s| format!("{s} bytes"));
            let _ = writeln!(o, "Payload size:   {size}");
            let _ = writeln!(o, "Keyslots:");
            for (id, ks) in &h2.meta.keyslots {
                let _ = match ks {
                    Ok(ks) => writeln!(o, "  {id}: {}", keyslot_line(ks)),
                    Err(why) => writeln!(o, "  {id}: not usable here: {why}"),
                };
            }
            for d in &h2.meta.digests {
                let _ = writeln!(
                    o,
                    "Digest:         pbkdf2 {} ({} iterations), keyslots {:?}",
                    d.hash.name(),
                    d.iterations,
                    d.keyslots
                );
            }
        }
    }
    o
}

fn keyslot_line(ks: &Keyslot) -> String {
    format!(
        "luks2, {} bits, {}, AF {} stripes {}, area {}+{} bytes{}",
        ks.key_size * 8,
        ks.kdf.describe(),
        ks.af_hash.name(),
        ks.stripes,
        ks.area_offset,
        ks.area_size,
        if ks.priority != 1 {
            format!(", priority {}", ks.priority)
        } else {
            String::new()
        }
    )
}
