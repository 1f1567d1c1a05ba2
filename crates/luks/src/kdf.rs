//! Passphrase → key derivation: PBKDF2 (LUKS1 and LUKS2) and Argon2i/id
//! (LUKS2), plus the cryptsetup-style choice of costs from `--iter-time`.

use std::time::Instant;

use super::hash::HashAlg;
use super::LuksError;

/// cryptsetup's minimums (lib/utils_pbkdf.c): fewer would be refused by it.
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;
pub const MIN_ARGON2_TIME: u32 = 4;
pub const MIN_ARGON2_MEMORY_KIB: u32 = 32;

// Caps on what one header may make an unlock spend. A header is untrusted
// input (an image from someone else, or one tampered with), and its KDF
// costs otherwise decide our memory and CPU time. Each cap is at or above
// what cryptsetup writes, so that headers it made still open.

/// cryptsetup's own hard limit (lib/crypto_backend/pbkdf_check.c); it is
/// further lowered to half the RAM, see `argon2_memory_cap_kib`.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 4 << 20;
/// cryptsetup's limit on Argon2 lanes (`--pbkdf-parallel`).
pub const MAX_ARGON2_LANES: u32 = 4;
/// cryptsetup allows 2^32 - 1 passes, which never ends. Its benchmark picks
/// a few passes over 64 MiB..1 GiB; even at the 32 KiB minimum, a one-minute
/// `--iter-time` stays under 2^22 passes here. 2^24 leaves room for faster
/// machines and bounds a forged header to minutes, not years.
pub const MAX_ARGON2_TIME: u32 = 1 << 24;
/// Passes × KiB: the memory Argon2 walks through, which is what its run time
/// follows (about 1 GiB/s on one core here). 2^30 KiB-passes (1 TiB, a
/// quarter of an hour) is 4x a one-minute `--iter-time` at 1 GiB on a fast
/// machine; without it 2^24 passes over 4 GiB would still run for years.
pub const MAX_ARGON2_WORK: u64 = 1 << 30;
/// cryptsetup allows 2^32 - 1. Its benchmark gives a few million for 2 s
/// (2.6 million per second for sha256 here), so 10^8 is 40 s of `--iter-time`
/// on this machine and still over 10 s on the fastest ones, while a forged
/// header costs minutes at most.
pub const MAX_PBKDF2_ITERATIONS: u32 = 100_000_000;

/// Half the physical RAM in KiB, like cryptsetup's ceiling for new key slots
/// (lib/utils_pbkdf.c); None when the OS does not say.
pub fn half_ram_kib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page > 0).then(|| pages as u64 * page as u64 / 2048)
}

/// The most Argon2 memory one unlock may take: cryptsetup's 4 GiB, and no
/// more than half the RAM (`half_ram`), so a header cannot make the daemon
/// the OOM killer's target. cryptsetup never formats above half the RAM of
/// the machine it runs on.
pub fn argon2_memory_cap_kib(half_ram: Option<u64>) -> u32 {
    let ram = half_ram.unwrap_or(u64::MAX);
    ram.min(MAX_ARGON2_MEMORY_KIB as u64) as u32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Argon2Type {
    I,
    Id,
}

impl Argon2Type {
    pub fn name(self) -> &'static str {
        match self {
            Argon2Type::I => "argon2i",
            Argon2Type::Id => "argon2id",
        }
    }
}

/// A fully specified KDF, as stored in a keyslot (the salt is kept apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    Pbkdf2 {
        hash: HashAlg,
        iterations: u32,
    },
    Argon2 {
        kind: Argon2Type,
        time: u32,
        memory_kib: u32,
        cpus: u32,
    },
}

/// The hint for costs that only a forged header explains.
const FORGED: &str =
    "cryptsetup never writes this: the header was made by another tool or tampered with";

/// A cost over a cap: what was asked, and what to do about it.
type OverCap = (String, &'static str);

fn argon2_over_cap(time: u32, memory_kib: u32, lanes: u32, memory_cap_kib: u32) -> Option<OverCap> {
    let work = time as u64 * memory_kib as u64;
    let what = if memory_kib > MAX_ARGON2_MEMORY_KIB {
        format!(
            "{memory_kib} KiB of Argon2 memory, above the 4 GiB cap ({MAX_ARGON2_MEMORY_KIB} KiB)"
        )
    } else if memory_kib > memory_cap_kib {
        let what = format!(
            "{memory_kib} KiB of Argon2 memory, more than half of this machine's RAM ({memory_cap_kib} KiB)"
        );
        return Some((what, "open the image on a machine with more memory, or there add a key slot with a lower --pbkdf-memory"));
    } else if lanes > MAX_ARGON2_LANES {
        format!("{lanes} Argon2 lanes, above the cap of {MAX_ARGON2_LANES}")
    } else if time > MAX_ARGON2_TIME {
        format!("an Argon2 time cost of {time}, above the cap of {MAX_ARGON2_TIME}")
    } else if work > MAX_ARGON2_WORK {
        let what = format!(
            "an Argon2 time cost of {time} over {memory_kib} KiB, above the cap of {MAX_ARGON2_WORK} KiB-passes (a quarter of an hour of work)"
        );
        return Some((what, "the header was tampered with, or made with an --iter-time of many minutes: replace that key slot with a faster one"));
    } else {
        return None;
    };
    Some((what, FORGED))
}

impl Kdf {
    /// Refuses costs over the caps above, before anything is allocated or
    /// computed; `who` names the asker in the message ("key slot 3").
    pub fn check_costs(&self, who: &str) -> Result<(), LuksError> {
        match self.over_cap(argon2_memory_cap_kib(half_ram_kib())) {
            None => Ok(()),
            Some((what, hint)) => Err(LuksError::OverLimit(format!(
                "{who} asks for {what}; {hint}"
            ))),
        }
    }

    /// What goes over a cap, if anything.
    fn over_cap(&self, memory_cap_kib: u32) -> Option<OverCap> {
        match *self {
            Kdf::Pbkdf2 { iterations, .. } if iterations > MAX_PBKDF2_ITERATIONS => Some((
                format!("{iterations} PBKDF2 iterations, above the cap of {MAX_PBKDF2_ITERATIONS}"),
                FORGED,
            )),
            Kdf::Pbkdf2 { .. } => None,
            Kdf::Argon2 {
                time,
                memory_kib,
                cpus,
                ..
            } => argon2_over_cap(time, memory_kib, cpus, memory_cap_kib),
        }
    }

    /// Derives `out` from `password`. The caps are checked here too, so no
    /// caller can run an uncapped KDF; callers with a better name for the
    /// asker check first.
    pub fn derive(&self, password: &[u8], salt: &[u8], out: &mut [u8]) -> Result<(), LuksError> {
        self.check_costs("the key derivation")?;
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                if iterations == 0 {
                    return Err(LuksError::Corrupt("PBKDF2 with 0 iterations".into()));
                }
                hash.pbkdf2(password, salt, iterations, out);
                Ok(())
            }
            Kdf::Argon2 {
                kind,
                time,
                memory_kib,
                cpus,
            } => {
                let alg = match kind {
                    Argon2Type::I => argon2::Algorithm::Argon2i,
                    Argon2Type::Id => argon2::Algorithm::Argon2id,
                };
                let params = argon2::Params::new(memory_kib, time, cpus, Some(out.len()))
                    .map_err(|e| LuksError::Kdf(format!("argon2 parameters: {e}")))?;
                argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                    .hash_password_into(password, salt, out)
                    .map_err(|e| LuksError::Kdf(format!("argon2: {e}")))
            }
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                format!("pbkdf2 (hash {}, {iterations} iterations)", hash.name())
            }
            Kdf::Argon2 {
                kind,
                time,
                memory_kib,
                cpus,
            } => format!(
                "{} (time {time}, memory {memory_kib} KiB, {cpus} threads)",
                kind.name()
            ),
        }
    }
}

/// What the user asked for (`--pbkdf`, `--iter-time`, …), before benchmarking.
#[derive(Debug, Clone)]
pub struct KdfChoice {
    /// "pbkdf2", "argon2i" or "argon2id".
    pub pbkdf: String,
    pub hash: HashAlg,
    pub iter_time_ms: u32,
    pub memory_kib: u32,
    pub parallel: u32,
    pub forced_iterations: Option<u32>,
}

impl KdfChoice {
    /// Picks the costs: forced ones as given, otherwise measured so that one
    /// unlock takes about `iter_time_ms` on this machine, like cryptsetup.
    pub fn resolve(&self, key_len: usize) -> Result<Kdf, LuksError> {
        match self.pbkdf.as_str() {
            "pbkdf2" => {
                let iterations = match self.forced_iterations {
                    Some(n) if !(MIN_PBKDF2_ITERATIONS..=MAX_PBKDF2_ITERATIONS).contains(&n) => {
                        return Err(LuksError::Invalid(format!(
                            "--pbkdf-force-iterations for pbkdf2 must be from {MIN_PBKDF2_ITERATIONS} \
                             to {MAX_PBKDF2_ITERATIONS} (cryptblk opens no key slot above that)"
                        )))
                    }
                    Some(n) => n,
                    None => pbkdf2_iterations_for(self.hash, key_len, self.iter_time_ms),
                };
                Ok(Kdf::Pbkdf2 {
                    hash: self.hash,
                    iterations,
                })
            }
            "argon2i" | "argon2id" => self.resolve_argon2(key_len),
            other => Err(LuksError::Invalid(format!(
                "--pbkdf {other:?}: use argon2id, argon2i or pbkdf2"
            ))),
        }
    }

    fn resolve_argon2(&self, key_len: usize) -> Result<Kdf, LuksError> {
        let kind = if self.pbkdf == "argon2i" {
            Argon2Type::I
        } else {
            Argon2Type::Id
        };
        self.check_argon2_memory()?;
        let (time, memory_kib) = match self.forced_iterations {
            Some(n) => (n, self.memory_kib),
            None => self.argon2_costs_for_iter_time(kind, key_len)?,
        };
        let kdf = Kdf::Argon2 {
            kind,
            time,
            memory_kib,
            cpus: self.parallel,
        };
        // Only forced time costs can be out of range: measured ones are
        // clamped by argon2_costs_for_iter_time.
        if time < MIN_ARGON2_TIME {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-force-iterations for argon2 must be at least {MIN_ARGON2_TIME}"
            )));
        }
        if let Some((what, _)) = kdf.over_cap(u32::MAX) {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-force-iterations with --pbkdf-memory asks for {what}, and cryptblk opens no key slot above that"
            )));
        }
        Ok(kdf)
    }

    /// Lanes and memory within what cryptsetup accepts and what cryptblk
    /// will open on this machine (see argon2_memory_cap_kib).
    fn check_argon2_memory(&self) -> Result<(), LuksError> {
        if !(1..=MAX_ARGON2_LANES).contains(&self.parallel) {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-parallel must be from 1 to {MAX_ARGON2_LANES}, as in cryptsetup"
            )));
        }
        if self.memory_kib < MIN_ARGON2_MEMORY_KIB || self.memory_kib < 8 * self.parallel {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-memory must be at least {MIN_ARGON2_MEMORY_KIB} KiB and 8 KiB per thread"
            )));
        }
        let cap = argon2_memory_cap_kib(half_ram_kib());
        if self.memory_kib > cap {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-memory must be at most {cap} KiB (4 GiB, and half of this machine's RAM): \
                 cryptblk opens no key slot above that"
            )));
        }
        Ok(())
    }

    /// Like cryptsetup: the time cost that makes one unlock take
    /// --iter-time with the asked memory, or, if even the minimum time cost
    /// is too slow, less memory. Measured on a small probe (cost grows
    /// linearly with memory × passes), so the benchmark itself is quick.
    fn argon2_costs_for_iter_time(
        &self,
        kind: Argon2Type,
        key_len: usize,
    ) -> Result<(u32, u32), LuksError> {
        let probe_kib = self.memory_kib.min(64 << 10);
        let probe = Kdf::Argon2 {
            kind,
            time: MIN_ARGON2_TIME,
            memory_kib: probe_kib,
            cpus: self.parallel,
        };
        let start = Instant::now();
        let mut out = zeroize::Zeroizing::new(vec![0u8; key_len]);
        probe.derive(b"benchmark", &[0u8; 32], &mut out)?;
        let ms_per_kib_pass = (start.elapsed().as_secs_f64() * 1000.0
            / (MIN_ARGON2_TIME as f64 * probe_kib as f64))
            .max(1e-9);
        let target = self.iter_time_ms as f64;
        let at_min_time = ms_per_kib_pass * MIN_ARGON2_TIME as f64 * self.memory_kib as f64;
        if at_min_time > target {
            let kib = target / (ms_per_kib_pass * MIN_ARGON2_TIME as f64);
            let floor = MIN_ARGON2_MEMORY_KIB.max(8 * self.parallel);
            return Ok((MIN_ARGON2_TIME, (kib as u32).max(floor)));
        }
        let time = (target / (ms_per_kib_pass * self.memory_kib as f64)) as u32;
        let most = MAX_ARGON2_TIME.min((MAX_ARGON2_WORK / self.memory_kib as u64) as u32);
        Ok((time.clamp(MIN_ARGON2_TIME, most), self.memory_kib))
    }
}

/// Iterations of PBKDF2 that take about `ms` milliseconds here.
pub fn pbkdf2_iterations_for(hash: HashAlg, key_len: usize, ms: u32) -> u32 {
    let mut probe = 1u32 << 12;
    let mut out = zeroize::Zeroizing::new(vec![0u8; key_len]);
    loop {
        let start = Instant::now();
        hash.pbkdf2(b"benchmark", &[0u8; 32], probe, &mut out);
        let took = start.elapsed().as_secs_f64() * 1000.0;
        // Measure for at least 50 ms so the estimate is not noise.
        if took >= 50.0 || probe >= 1 << 26 {
            let n = probe as f64 * ms as f64 / took.max(0.001);
            let n = n.min(MAX_PBKDF2_ITERATIONS as f64) as u32;
            return n.max(MIN_PBKDF2_ITERATIONS);
        }
        probe *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argon2(time: u32, memory_kib: u32, cpus: u32) -> Kdf {
        Kdf::Argon2 {
            kind: Argon2Type::Id,
            time,
            memory_kib,
            cpus,
        }
    }

    fn pbkdf2(iterations: u32) -> Kdf {
        Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations,
        }
    }

    #[test]
    fn each_cap_admits_its_limit_and_refuses_one_more() {
        let ram = u32::MAX;
        let gib4 = MAX_ARGON2_MEMORY_KIB;
        // Largest memory × the most passes the work cap leaves it: 2^30.
        assert!(argon2(256, gib4, MAX_ARGON2_LANES).over_cap(ram).is_none());
        assert!(argon2(257, gib4, 1).over_cap(ram).is_some());
        assert!(argon2(4, gib4 + 1, 1).over_cap(ram).is_some());
        assert!(argon2(4, 64, MAX_ARGON2_LANES + 1).over_cap(ram).is_some());
        assert!(argon2(MAX_ARGON2_TIME, 32, 1).over_cap(ram).is_none());
        assert!(argon2(MAX_ARGON2_TIME + 1, 32, 1).over_cap(ram).is_some());
        assert!(pbkdf2(MAX_PBKDF2_ITERATIONS).over_cap(ram).is_none());
        assert!(pbkdf2(MAX_PBKDF2_ITERATIONS + 1).over_cap(ram).is_some());
        let err = pbkdf2(u32::MAX).check_costs("key slot 7").unwrap_err();
        assert!(matches!(err, LuksError::OverLimit(_)));
        let msg = err.to_string();
        assert!(
            msg.starts_with("key slot 7 asks for 4294967295 PBKDF2"),
            "{msg}"
        );
    }

    #[test]
    fn argon2_memory_is_capped_at_half_the_ram() {
        assert_eq!(argon2_memory_cap_kib(None), MAX_ARGON2_MEMORY_KIB);
        assert_eq!(argon2_memory_cap_kib(Some(1 << 40)), MAX_ARGON2_MEMORY_KIB);
        assert_eq!(argon2_memory_cap_kib(Some(1 << 20)), 1 << 20);
        assert!(half_ram_kib().is_some_and(|kib| kib > 0));
        // A machine with 2 GiB of RAM: a 1 GiB header opens, more does not,
        // and the message points at the machine, not at the header.
        assert!(argon2(4, 1 << 20, 4).over_cap(1 << 20).is_none());
        let (what, hint) = argon2(4, (1 << 20) + 1, 4).over_cap(1 << 20).unwrap();
        assert!(what.contains("half of this machine's RAM"), "{what}");
        assert!(hint.contains("more memory"), "{hint}");
    }

    fn choice(pbkdf: &str, memory_kib: u32, parallel: u32, forced: u32) -> KdfChoice {
        KdfChoice {
            pbkdf: pbkdf.into(),
            hash: HashAlg::Sha256,
            iter_time_ms: 10,
            memory_kib,
            parallel,
            forced_iterations: Some(forced),
        }
    }

    /// cryptblk never writes a key slot that it would refuse to open.
    #[test]
    fn new_key_slots_stay_within_the_caps() {
        let refused = |c: KdfChoice, option: &str| match c.resolve(64) {
            Err(LuksError::Invalid(msg)) => assert!(msg.contains(option), "{msg}"),
            other => panic!("{option}: {other:?}"),
        };
        let over = MAX_PBKDF2_ITERATIONS + 1;
        refused(choice("pbkdf2", 0, 0, over), "--pbkdf-force-iterations");
        refused(
            choice("argon2id", MAX_ARGON2_MEMORY_KIB + 1, 1, 4),
            "--pbkdf-memory",
        );
        refused(choice("argon2id", 1024, 5, 4), "--pbkdf-parallel");
        refused(choice("argon2id", 1024, u32::MAX, 4), "--pbkdf-parallel");
        refused(choice("argon2id", 32, 1, MAX_ARGON2_TIME + 1), "time cost");
        // Each cost alone within its cap, 2^32 KiB-passes together.
        refused(choice("argon2id", 4096, 1, 1 << 20), "KiB-passes");
        assert!(choice("argon2id", 32, 1, 4).resolve(64).is_ok());
        assert!(choice("pbkdf2", 0, 0, 1000).resolve(64).is_ok());
    }
}
