//! `ByteSize`: every size option of every cryptblk command (`serve --size`,
//! `--split-threshold`, `format --size`, `bench --bs`, ...) is parsed here, so
//! that they accept the same spellings and agree about zero.
//!
//! Units are binary, as qemu-img, cryptsetup and fio use them: `K`, `M`,
//! `G`, `T` (any case), optionally followed by `B` or `iB`. Zero parses;
//! an option for which zero makes no sense says so where it is checked.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// For clap's `value_parser` on options kept as plain `u64` bytes.
pub fn parse_bytes(text: &str) -> Result<u64, ParseSizeError> {
    text.parse::<ByteSize>().map(ByteSize::bytes)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSizeError(String);

impl fmt::Display for ParseSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseSizeError {}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let t = text.trim();
        let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(end);
        let fail = |why: &str| Err(ParseSizeError(format!("{text:?} {why}")));
        if digits.is_empty() {
            return fail("is not a size: use a number with an optional K, M, G or T suffix");
        }
        let Some(shift) = unit_shift(suffix) else {
            return fail("has an unknown unit: use K, M, G or T (powers of 1024)");
        };
        match digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << shift))
        {
            Some(n) => Ok(ByteSize(n)),
            None => fail("does not fit in 64 bits"),
        }
    }
}

/// The power of two a unit suffix stands for: `k`, `KiB`, `kb` → 10.
fn unit_shift(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    let stem = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    match stem {
        "" => Some(0),
        "k" => Some(10),
        "m" => Some(20),
        "g" => Some(30),
        "t" => Some(40),
        _ => None,
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly: `64M`, `4096`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A TOML value may be a string (`"64M"`) or a plain integer of bytes.
impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 4096, \"64K\" or \"10M\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative: a size cannot be")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::parse_bytes as parse;

    #[test]
    fn every_spelling_of_the_binary_units() {
        for (text, bytes) in [
            ("0", 0),
            ("512", 512),
            ("4k", 4096),
            ("64K", 64 << 10),
            ("10M", 10 << 20),
            ("10MiB", 10 << 20),
            ("10mb", 10 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            (" 8KiB ", 8192),
        ] {
            assert_eq!(parse(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn junk_units_and_overflow_are_errors() {
        for text in ["", "K", "12Q", "1.5G", "-1", "99999999999T", "4 K"] {
            assert!(parse(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for bytes in [0, 1, 4096, 64 << 20, 3 << 30, (1 << 40) + 512] {
            let shown = ByteSize(bytes).to_string();
            assert_eq!(parse(&shown), Ok(bytes), "{shown}");
        }
        assert_eq!(ByteSize(64 << 20).to_string(), "64M");
    }

    #[test]
    fn toml_takes_strings_and_integers_and_refuses_negatives() {
        #[derive(serde::Deserialize)]
        struct T {
            a: ByteSize,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = \"64K\"\nb = 4096\n").unwrap();
        assert_eq!((t.a.0, t.b.0), (64 << 10, 4096));
        assert!(toml::from_str::<T>("a = -1\nb = 1\n").is_err());
    }
}
