//! Passphrase → key derivation: PBKDF2 (LUKS1 and LUKS2) and Argon2i/id
//! (LUKS2), plus the cryptsetup-style choice of costs from `--iter-time`.

use std::time::Instant;

use super::hash::HashAlg;
use super::LuksError;

/// cryptsetup's minimums (lib/utils_pbkdf.c): fewer would be refused by it.
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;
pub const MIN_ARGON2_TIME: u32 = 4;
pub const MIN_ARGON2_MEMORY_KIB: u32 = 32;

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

impl Kdf {
    pub fn derive(&self, password: &[u8], salt: &[u8], out: &mut [u8]) -> Result<(), LuksError> {
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
                    Some(n) if n < MIN_PBKDF2_ITERATIONS => {
                        return Err(LuksError::Invalid(format!(
                            "--pbkdf-force-iterations for pbkdf2 must be at least {MIN_PBKDF2_ITERATIONS}"
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
        if self.memory_kib < MIN_ARGON2_MEMORY_KIB || self.memory_kib < 8 * self.parallel {
            return Err(LuksError::Invalid(format!(
                "--pbkdf-memory must be at least {MIN_ARGON2_MEMORY_KIB} KiB and 8 KiB per thread"
            )));
        }
        if self.parallel == 0 {
            return Err(LuksError::Invalid(
                "--pbkdf-parallel must be at least 1".into(),
            ));
        }
        let (time, memory_kib) = match self.forced_iterations {
            Some(n) if n < MIN_ARGON2_TIME => {
                return Err(LuksError::Invalid(format!(
                    "--pbkdf-force-iterations for argon2 must be at least {MIN_ARGON2_TIME}"
                )))
            }
            Some(n) => (n, self.memory_kib),
            None => self.argon2_costs_for_iter_time(kind, key_len)?,
        };
        Ok(Kdf::Argon2 {
            kind,
            time,
            memory_kib,
            cpus: self.parallel,
        })
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
        Ok((time.max(MIN_ARGON2_TIME), self.memory_kib))
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
            return (n.min(u32::MAX as f64) as u32).max(MIN_PBKDF2_ITERATIONS);
        }
        probe *= 2;
    }
}
