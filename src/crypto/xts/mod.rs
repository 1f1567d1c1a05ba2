//! AES-XTS (IEEE 1619) over whole sectors, with the kernel chosen once per key.
//!
//! Two interchangeable kernels compute the same function:
//! - `vaes`: a fused AES-XTS loop on 512-bit registers (VAES, VPCLMULQDQ,
//!   AVX-512), picked at run time when the CPU has them. All of the crate's
//!   `unsafe` lives there.
//! - `portable`: a safe loop over the `aes` crate's multi-block calls; used
//!   everywhere else, and for data units that are not a multiple of 512 bytes.

mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;

use super::XtsKey;

/// An expanded XTS key bound to the fastest kernel this CPU supports.
pub struct Xts(Kernel);

enum Kernel {
    Portable(portable::Portable),
    #[cfg(target_arch = "x86_64")]
    Vaes {
        fast: Box<vaes::Vaes>,
        /// For data units the fused kernel does not take (not a multiple of
        /// 512 bytes): only IEEE test vectors and odd callers.
        fallback: portable::Portable,
    },
}

impl Xts {
    /// Expands `key` for the fastest kernel this CPU supports.
    pub fn new(key: &XtsKey) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = vaes::Vaes::new(key.bytes()) {
            return Xts(Kernel::Vaes {
                fast: Box::new(fast),
                fallback: portable::Portable::new(key.bytes()),
            });
        }
        Self::new_portable(key)
    }

    /// The portable kernel regardless of the CPU (tests and benchmarks).
    pub fn new_portable(key: &XtsKey) -> Self {
        Xts(Kernel::Portable(portable::Portable::new(key.bytes())))
    }

    /// The fused VAES kernel, or `None` when this CPU lacks VAES/AVX-512.
    pub fn new_vaes(key: &XtsKey) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = vaes::Vaes::new(key.bytes()) {
            return Some(Xts(Kernel::Vaes {
                fast: Box::new(fast),
                fallback: portable::Portable::new(key.bytes()),
            }));
        }
        let _ = key;
        None
    }

    /// Which kernel runs: "vaes-avx512" or "portable" (for logs and benches).
    pub fn kernel_name(&self) -> &'static str {
        match &self.0 {
            Kernel::Portable(_) => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { .. } => "vaes-avx512",
        }
    }

    pub fn encrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        match &self.0 {
            Kernel::Portable(p) => p.encrypt_sector(iv, sector),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { fast, fallback } => {
                if vaes::Vaes::takes(sector.len()) {
                    fast.encrypt_inplace(iv, sector)
                } else {
                    fallback.encrypt_sector(iv, sector)
                }
            }
        }
    }

    pub fn decrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        match &self.0 {
            Kernel::Portable(p) => p.decrypt_sector(iv, sector),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { fast, fallback } => {
                if vaes::Vaes::takes(sector.len()) {
                    fast.decrypt_inplace(iv, sector)
                } else {
                    fallback.decrypt_sector(iv, sector)
                }
            }
        }
    }

    pub fn encrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        match &self.0 {
            Kernel::Portable(p) => p.encrypt_sector_to(iv, src, dst),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { fast, fallback } => {
                if vaes::Vaes::takes(src.len()) {
                    fast.encrypt_to(iv, src, dst)
                } else {
                    fallback.encrypt_sector_to(iv, src, dst)
                }
            }
        }
    }

    pub fn decrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        match &self.0 {
            Kernel::Portable(p) => p.decrypt_sector_to(iv, src, dst),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vaes { fast, fallback } => {
                if vaes::Vaes::takes(src.len()) {
                    fast.decrypt_to(iv, src, dst)
                } else {
                    fallback.decrypt_sector_to(iv, src, dst)
                }
            }
        }
    }
}
