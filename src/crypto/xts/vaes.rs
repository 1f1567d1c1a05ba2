//! The fused AES-XTS kernel: VAES on 512-bit registers (4 blocks each),
//! 8 registers (512 bytes) in flight, tweaks advanced with VPCLMULQDQ.
//!
//! This is the only module of the crypto layer with `unsafe`. The unsafety is of two
//! kinds, each argued where it happens:
//! - calling `#[target_feature]` functions: sound because a [`Vaes`] value is
//!   only ever built by [`Vaes::new`] after it saw every feature those
//!   functions are compiled for ([`cpu_supported`]);
//! - unaligned 64-byte loads and stores through raw pointers: sound because
//!   the safe wrappers check that the slices hold whole 512-byte chunks.
//!
//! Why the structure: AES-256 on one block takes ~14 dependent rounds, so a
//! naive XTS waits on latency; here every round is issued on 32 blocks at
//! once. The tweak for block j of a sector is T·α^j. Register r (r = 0..8)
//! holds the tweaks of blocks 4r..4r+3 of the current 512-byte chunk, and the
//! next chunk's tweaks are the same registers times α^32: a byte shift plus a
//! carry-less multiply by the reduction constant, independent for all 8.
//! The final tweak XOR rides in the last round key (`aesenclast(x, k ^ t)` =
//! `aesenclast(x, k) ^ t`), the first one in a three-way XOR with round key 0.

// The AVX-512/VAES intrinsics are stable since Rust 1.89, later than the
// crate's declared rust-version (which its dependencies already exceed).
#![allow(clippy::incompatible_msrv)]

use core::arch::x86_64::*;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes per loop iteration: 8 registers × 4 blocks × 16 bytes.
const CHUNK: usize = 512;
/// Registers in flight.
const LANES: usize = 8;
/// Round keys of AES-256 (14 rounds + 1); AES-128 uses the first 11.
const MAX_KEYS: usize = 15;

type Schedule = [[u8; 16]; MAX_KEYS];

/// Expanded XTS keys for the fused kernel. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct Vaes {
    /// 10 (AES-128) or 14 (AES-256).
    rounds: usize,
    /// Data key, encryption schedule.
    enc: Schedule,
    /// Data key, equivalent inverse cipher schedule (for AESDEC), in the
    /// order the rounds use it.
    dec: Schedule,
    /// Tweak key, encryption schedule.
    tweak: Schedule,
}

/// Every CPU feature the `#[target_feature]` functions below are compiled for.
fn cpu_supported() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

impl Vaes {
    /// Expands a 32- or 64-byte XTS key; `None` if this CPU cannot run the
    /// kernel.
    pub(super) fn new(key: &[u8]) -> Option<Self> {
        if !cpu_supported() || !matches!(key.len(), 32 | 64) {
            return None;
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        let mut v = Vaes {
            rounds: if k1.len() == 16 { 10 } else { 14 },
            enc: [[0; 16]; MAX_KEYS],
            dec: [[0; 16]; MAX_KEYS],
            tweak: [[0; 16]; MAX_KEYS],
        };
        // SAFETY: cpu_supported() saw aes and sse4.1 just above.
        unsafe {
            expand(k1, &mut v.enc);
            expand(k2, &mut v.tweak);
            invert(&v.enc, v.rounds, &mut v.dec);
        }
        Some(v)
    }

    /// Data units the kernel takes: whole 512-byte chunks (every dm-crypt
    /// sector size).
    pub(super) fn takes(len: usize) -> bool {
        len != 0 && len % CHUNK == 0
    }

    pub(super) fn encrypt_inplace(&self, iv: u64, data: &mut [u8]) {
        assert!(Self::takes(data.len()));
        let p = data.as_mut_ptr();
        // SAFETY: `self` exists only if cpu_supported() held; `p` is valid for
        // reads and writes of data.len() bytes, a multiple of CHUNK. Reading
        // and writing the same buffer is fine: each chunk is loaded whole
        // before it is stored.
        unsafe { self.run::<false>(iv, p, p, data.len()) }
    }

    pub(super) fn decrypt_inplace(&self, iv: u64, data: &mut [u8]) {
        assert!(Self::takes(data.len()));
        let p = data.as_mut_ptr();
        // SAFETY: as in encrypt_inplace.
        unsafe { self.run::<true>(iv, p, p, data.len()) }
    }

    pub(super) fn encrypt_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        assert!(Self::takes(src.len()) && src.len() == dst.len());
        // SAFETY: `self` exists only if cpu_supported() held; both pointers
        // are valid for src.len() bytes, a multiple of CHUNK.
        unsafe { self.run::<false>(iv, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    pub(super) fn decrypt_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        assert!(Self::takes(src.len()) && src.len() == dst.len());
        // SAFETY: as in encrypt_to.
        unsafe { self.run::<true>(iv, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    /// # Safety
    /// The CPU has the kernel's features; `src` and `dst` are valid for `len`
    /// bytes (a multiple of CHUNK) and either equal or non-overlapping.
    unsafe fn run<const DECRYPT: bool>(&self, iv: u64, src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.rounds == 10 {
                xts::<10, DECRYPT>(self, iv, src, dst, len)
            } else {
                xts::<14, DECRYPT>(self, iv, src, dst, len)
            }
        }
    }
}

/// One data unit. `NR` is the number of AES rounds (10 or 14).
///
/// # Safety
/// As [`Vaes::run`].
#[target_feature(enable = "aes,sse4.1,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn xts<const NR: usize, const DECRYPT: bool>(
    keys: &Vaes,
    iv: u64,
    src: *const u8,
    dst: *mut u8,
    len: usize,
) {
    let schedule = if DECRYPT { &keys.dec } else { &keys.enc };
    let mut rk = [_mm512_setzero_si512(); MAX_KEYS];
    for (r, k) in rk.iter_mut().zip(schedule).take(NR + 1) {
        *r = _mm512_broadcast_i32x4(load(k));
    }
    let poly = _mm512_set1_epi64(0x87);
    let mut tw = first_tweaks::<NR>(&keys.tweak, iv, poly);

    let mut off = 0;
    while off < len {
        let mut x = [_mm512_setzero_si512(); LANES];
        for (j, x) in x.iter_mut().enumerate() {
            // SAFETY: off + 64·(j+1) <= len, and src is valid for len bytes.
            let block = unsafe { _mm512_loadu_si512(src.add(off + 64 * j).cast()) };
            *x = xor3(block, tw[j], rk[0]);
        }
        for k in &rk[1..NR] {
            for x in x.iter_mut() {
                *x = if DECRYPT {
                    _mm512_aesdec_epi128(*x, *k)
                } else {
                    _mm512_aesenc_epi128(*x, *k)
                };
            }
        }
        for (j, x) in x.iter().enumerate() {
            let last = _mm512_xor_si512(rk[NR], tw[j]);
            let out = if DECRYPT {
                _mm512_aesdeclast_epi128(*x, last)
            } else {
                _mm512_aesenclast_epi128(*x, last)
            };
            // SAFETY: as for the load; dst is valid for len bytes.
            unsafe { _mm512_storeu_si512(dst.add(off + 64 * j).cast(), out) };
        }
        for t in tw.iter_mut() {
            *t = mul_x32(*t, poly);
        }
        off += CHUNK;
    }
}

/// The tweaks of blocks 0..32: register r holds T·α^(4r..4r+4), where T is
/// the encrypted IV (plain64: little-endian sector number, zero-padded).
#[target_feature(enable = "aes,sse4.1,avx512f,avx512bw,vpclmulqdq")]
fn first_tweaks<const NR: usize>(tweak: &Schedule, iv: u64, poly: __m512i) -> [__m512i; LANES] {
    let mut t = _mm_xor_si128(_mm_set_epi64x(0, iv as i64), load(&tweak[0]));
    for k in &tweak[1..NR] {
        t = _mm_aesenc_si128(t, load(k));
    }
    t = _mm_aesenclast_si128(t, load(&tweak[NR]));

    let t0 = to_u128(t);
    let t1 = mul_alpha(t0);
    let t2 = mul_alpha(t1);
    let t3 = mul_alpha(t2);
    let halves = |t: u128| (t as u64 as i64, (t >> 64) as u64 as i64);
    let ((a0, a1), (b0, b1), (c0, c1), (d0, d1)) = (halves(t0), halves(t1), halves(t2), halves(t3));
    let first = _mm512_setr_epi64(a0, a1, b0, b1, c0, c1, d0, d1);

    let mut tw = [first; LANES];
    for (r, t) in tw.iter_mut().enumerate().skip(1) {
        *t = mul_xk(first, 4 * r as i64, poly);
    }
    tw
}

/// Each 128-bit lane times x^32 in GF(2^128) (XTS bit order: little-endian).
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x32(v: __m512i, poly: __m512i) -> __m512i {
    let shifted = _mm512_bslli_epi128::<4>(v);
    let carry = _mm512_bsrli_epi128::<12>(v);
    // carry (< 2^32) times x^128 = carry · 0x87: below 2^40, no second carry.
    _mm512_xor_si512(shifted, _mm512_clmulepi64_epi128::<0x00>(carry, poly))
}

/// Each 128-bit lane times x^k, 0 < k < 64.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_xk(v: __m512i, k: i64, poly: __m512i) -> __m512i {
    let left = _mm512_sll_epi64(v, _mm_set_epi64x(0, k));
    let out = _mm512_srl_epi64(v, _mm_set_epi64x(0, 64 - k));
    // Bits leaving the low qword enter the high one; bits leaving the lane
    // come back reduced (x^128 = x^7 + x^2 + x + 1).
    let into_high = _mm512_bslli_epi128::<8>(out);
    let off_top = _mm512_bsrli_epi128::<8>(out);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(off_top, poly);
    xor3(left, into_high, reduced)
}

#[target_feature(enable = "avx512f")]
fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi64::<0x96>(a, b, c)
}

/// Multiplication by α (= x) in GF(2^128), XTS's little-endian convention.
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[target_feature(enable = "sse2")]
fn load(b: &[u8; 16]) -> __m128i {
    let lo = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    _mm_set_epi64x(hi as i64, lo as i64)
}

#[target_feature(enable = "sse4.1")]
fn to_u128(v: __m128i) -> u128 {
    let lo = _mm_cvtsi128_si64(v) as u64 as u128;
    let hi = _mm_extract_epi64::<1>(v) as u64 as u128;
    lo | (hi << 64)
}

#[target_feature(enable = "sse4.1")]
fn store(v: __m128i) -> [u8; 16] {
    to_u128(v).to_le_bytes()
}

/// AES key expansion (FIPS-197 §5.2) with AESKEYGENASSIST, for 16- and
/// 32-byte keys.
#[target_feature(enable = "aes,sse4.1")]
fn expand(key: &[u8], out: &mut Schedule) {
    let half = |b: &[u8]| -> [u8; 16] { b.try_into().expect("16 bytes") };
    if key.len() == 16 {
        let mut k = load(&half(key));
        out[0] = store(k);
        macro_rules! round {
            ($i:expr, $rcon:expr) => {
                k = mix(
                    k,
                    _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k)),
                );
                out[$i] = store(k);
            };
        }
        round!(1, 0x01);
        round!(2, 0x02);
        round!(3, 0x04);
        round!(4, 0x08);
        round!(5, 0x10);
        round!(6, 0x20);
        round!(7, 0x40);
        round!(8, 0x80);
        round!(9, 0x1b);
        round!(10, 0x36);
    } else {
        let mut a = load(&half(&key[..16]));
        let mut b = load(&half(&key[16..]));
        out[0] = store(a);
        out[1] = store(b);
        // Words 8i: SubWord(RotWord(w-1)) ^ rcon (dword 3 of the assist);
        // words 8i+4: SubWord(w-1) (dword 2).
        macro_rules! even {
            ($i:expr, $rcon:expr) => {
                let t = _mm_aeskeygenassist_si128::<$rcon>(b);
                a = mix(a, _mm_shuffle_epi32::<0xff>(t));
                out[$i] = store(a);
            };
        }
        macro_rules! odd {
            ($i:expr) => {
                let t = _mm_aeskeygenassist_si128::<0>(a);
                b = mix(b, _mm_shuffle_epi32::<0xaa>(t));
                out[$i] = store(b);
            };
        }
        even!(2, 0x01);
        odd!(3);
        even!(4, 0x02);
        odd!(5);
        even!(6, 0x04);
        odd!(7);
        even!(8, 0x08);
        odd!(9);
        even!(10, 0x10);
        odd!(11);
        even!(12, 0x20);
        odd!(13);
        even!(14, 0x40);
    }
}

/// w0' = w0 ^ t, w1' = w1 ^ w0', w2' = w2 ^ w1', w3' = w3 ^ w2'.
#[target_feature(enable = "sse2")]
fn mix(k: __m128i, t: __m128i) -> __m128i {
    let mut k = k;
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
    _mm_xor_si128(k, t)
}

/// The equivalent inverse cipher's schedule (FIPS-197 §5.3.5): the
/// encryption keys in reverse order, the inner ones through InvMixColumns.
#[target_feature(enable = "aes,sse4.1")]
fn invert(enc: &Schedule, rounds: usize, dec: &mut Schedule) {
    dec[0] = enc[rounds];
    for i in 1..rounds {
        dec[i] = store(_mm_aesimc_si128(load(&enc[rounds - i])));
    }
    dec[rounds] = enc[0];
}
