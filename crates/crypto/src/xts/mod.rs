//! AES-XTS (IEEE 1619) over runs of whole sectors, with the kernel chosen
//! once per key.
//!
//! Two interchangeable kernels compute the same function:
//! - `vaes`: a fused AES-XTS loop on 512-bit registers (VAES, VPCLMULQDQ,
//!   AVX-512), picked at run time when the CPU has them. All of this layer's
//!   `unsafe` lives there.
//! - `portable`: a safe loop over the `aes` crate's multi-block calls; used
//!   everywhere else, and for sectors that are not a multiple of 512 bytes.

mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;

use super::XtsKey;
use crate::secrets::Locked;
use crate::shared::{SharedMut, SharedRef};

/// Largest sector the shared-memory path takes (every dm-crypt size).
const MAX_SECTOR: usize = 4096;

/// An expanded XTS key bound to the fastest kernel this CPU supports. The
/// round keys live on mlock'ed pages of their own, wiped on drop.
pub struct Xts(Locked<Kernel>);

// One per volume, on its own pages: the size gap between variants is harmless.
#[allow(clippy::large_enum_variant)]
enum Kernel {
    Portable(portable::Portable),
    #[cfg(target_arch = "x86_64")]
    Vaes {
        fast: vaes::Vaes,
        /// For sectors the fused kernel does not take (not a multiple of 512
        /// bytes): only IEEE test vectors and odd callers.
        fallback: portable::Portable,
    },
}

/// A run of consecutive sectors: sector i uses IV `first_iv + i·iv_step`
/// (wrapping, as dm-crypt's u64 arithmetic does).
#[derive(Clone, Copy, Debug)]
struct Run {
    first_iv: u64,
    iv_step: u64,
    sector_size: usize,
}

impl Run {
    fn new(first_iv: u64, iv_step: u64, sector_size: usize, len: usize) -> Self {
        assert!(
            sector_size != 0 && len.is_multiple_of(sector_size),
            "XTS on a partial sector"
        );
        Run {
            first_iv,
            iv_step,
            sector_size,
        }
    }

    fn iv(&self, i: usize) -> u64 {
        self.first_iv
            .wrapping_add((i as u64).wrapping_mul(self.iv_step))
    }
}

impl Xts {
    /// Expands `key` for the fastest kernel this CPU supports.
    pub fn new(key: &XtsKey) -> Self {
        Self::new_vaes(key).unwrap_or_else(|| Self::new_portable(key))
    }

    /// The portable kernel regardless of the CPU (tests and benchmarks).
    pub fn new_portable(key: &XtsKey) -> Self {
        Xts(Locked::new(Kernel::Portable(portable::Portable::new(
            key.bytes(),
        ))))
    }

    /// The fused VAES kernel, or `None` when this CPU lacks VAES/AVX-512.
    pub fn new_vaes(key: &XtsKey) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = vaes::Vaes::new(key.bytes()) {
            return Some(Xts(Locked::new(Kernel::Vaes {
                fast,
                fallback: portable::Portable::new(key.bytes()),
            })));
        }
        let _ = key;
        None
    }

    /// Which kernel runs: "vaes-avx512" or "portable" (for logs and benches).
    pub fn kernel_name(&self) -> &'static str {
        match &*self.0 {
            Kernel::Portable(_) => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { .. } => "vaes-avx512",
        }
    }

    pub fn encrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        self.inplace(false, Run::new(iv, 0, sector.len(), sector.len()), sector)
    }

    pub fn decrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        self.inplace(true, Run::new(iv, 0, sector.len(), sector.len()), sector)
    }

    pub fn encrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        self.copy(false, Run::new(iv, 0, src.len(), src.len()), src, dst)
    }

    pub fn decrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        self.copy(true, Run::new(iv, 0, src.len(), src.len()), src, dst)
    }

    /// Encrypts consecutive sectors of `sector_size` bytes in place; sector
    /// i uses IV `first_iv + i·iv_step` (wrapping). One call per request
    /// lets the fused kernel overlap the sectors' tweak computations.
    pub fn encrypt_sectors(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        data: &mut [u8],
    ) {
        self.inplace(
            false,
            Run::new(first_iv, iv_step, sector_size, data.len()),
            data,
        )
    }

    /// Decrypts in place (see [`Xts::encrypt_sectors`]).
    pub fn decrypt_sectors(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        data: &mut [u8],
    ) {
        self.inplace(
            true,
            Run::new(first_iv, iv_step, sector_size, data.len()),
            data,
        )
    }

    /// Encrypts `src` into `dst` (see [`Xts::encrypt_sectors`]).
    pub fn encrypt_sectors_to(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) {
        self.copy(
            false,
            Run::new(first_iv, iv_step, sector_size, src.len()),
            src,
            dst,
        )
    }

    /// Decrypts `src` into `dst` (see [`Xts::encrypt_sectors`]).
    pub fn decrypt_sectors_to(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: &[u8],
        dst: &mut [u8],
    ) {
        self.copy(
            true,
            Run::new(first_iv, iv_step, sector_size, src.len()),
            src,
            dst,
        )
    }

    /// Encrypts from shared memory (see `SharedRef`) into `dst`.
    pub fn encrypt_sectors_shared(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: SharedRef<'_>,
        dst: SharedMut<'_>,
    ) {
        let run = Run::new(first_iv, iv_step, sector_size, src.len());
        self.shared(false, run, src, dst)
    }

    /// Decrypts `src` into shared memory (see `SharedMut`).
    pub fn decrypt_sectors_shared(
        &self,
        first_iv: u64,
        iv_step: u64,
        sector_size: usize,
        src: SharedRef<'_>,
        dst: SharedMut<'_>,
    ) {
        let run = Run::new(first_iv, iv_step, sector_size, src.len());
        self.shared(true, run, src, dst)
    }

    /// The fused kernel works on raw pointers already: shared memory costs
    /// nothing there. The portable kernel needs slices, so each sector goes
    /// through a stack buffer (a copy in and a copy out: this path is for
    /// CPUs without VAES, where the cipher dominates anyway).
    fn shared(&self, decrypt: bool, run: Run, src: SharedRef<'_>, dst: SharedMut<'_>) {
        assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Vaes { fast, .. } = &*self.0 {
            if vaes::Vaes::takes(run.sector_size, src.len()) {
                return fast.shared(decrypt, run, src, dst);
            }
        }
        assert!(
            run.sector_size <= MAX_SECTOR,
            "sector of {} bytes",
            run.sector_size
        );
        let p = self.portable();
        let mut tmp = [0u8; MAX_SECTOR];
        let sector = &mut tmp[..run.sector_size];
        for i in 0..src.len() / run.sector_size {
            let at = i * run.sector_size;
            src.tail(at).read(sector);
            if decrypt {
                p.decrypt_sector(run.iv(i), sector)
            } else {
                p.encrypt_sector(run.iv(i), sector)
            }
            dst.tail(at).write(sector);
        }
    }

    fn inplace(&self, decrypt: bool, run: Run, data: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Vaes { fast, .. } = &*self.0 {
            if vaes::Vaes::takes(run.sector_size, data.len()) {
                return if decrypt {
                    fast.decrypt_inplace(run, data)
                } else {
                    fast.encrypt_inplace(run, data)
                };
            }
        }
        let p = self.portable();
        for (i, sector) in data.chunks_mut(run.sector_size).enumerate() {
            if decrypt {
                p.decrypt_sector(run.iv(i), sector)
            } else {
                p.encrypt_sector(run.iv(i), sector)
            }
        }
    }

    fn copy(&self, decrypt: bool, run: Run, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        if let Kernel::Vaes { fast, .. } = &*self.0 {
            if vaes::Vaes::takes(run.sector_size, src.len()) {
                return if decrypt {
                    fast.decrypt_to(run, src, dst)
                } else {
                    fast.encrypt_to(run, src, dst)
                };
            }
        }
        let p = self.portable();
        let sectors = src
            .chunks(run.sector_size)
            .zip(dst.chunks_mut(run.sector_size));
        for (i, (s, d)) in sectors.enumerate() {
            if decrypt {
                p.decrypt_sector_to(run.iv(i), s, d)
            } else {
                p.encrypt_sector_to(run.iv(i), s, d)
            }
        }
    }

    fn portable(&self) -> &portable::Portable {
        match &*self.0 {
            Kernel::Portable(p) => p,
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { fallback, .. } => fallback,
        }
    }
}
