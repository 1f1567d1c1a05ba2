//! The fused AES-XTS kernel: VAES on 512-bit registers (4 blocks each),
//! 8 registers (512 bytes) in flight, tweaks advanced with VPCLMULQDQ.
//!
//! This is the only module of the crypto layer with `unsafe`. The unsafety
//! is of two kinds, each argued where it happens:
//! - calling `#[target_feature]` functions: sound because a [`Vaes`] value is
//!   only ever built by [`Vaes::new`] after it saw every feature those
//!   functions are compiled for ([`cpu_supported`]);
//! - unaligned 64-byte loads and stores through raw pointers: sound because
//!   the safe wrappers check that the slices hold whole sectors of whole
//!   512-byte chunks.
//!
//! Why the structure: AES-256 on one block takes ~14 dependent rounds, so a
//! naive XTS waits on latency; here every round is issued on 32 blocks at
//! once. The tweak for block j of a sector is T·α^j. Register r (r = 0..8)
//! holds the tweaks of blocks 4r..4r+3 of the current 512-byte chunk, and the
//! next chunk's tweaks are the same registers times α^32: a byte shift plus a
//! carry-less multiply by the reduction constant, independent for all 8.
//! The final tweak XOR rides in the last round key (`aesenclast(x, k ^ t)` =
//! `aesenclast(x, k) ^ t`), the first one in a three-way XOR with round key 0.
//! A request is one call: the sectors' T values are computed four at a time
//! in one 512-bit AES pass, one group ahead of the data.
//!
//! Where the time goes, on the Zen 4 EPYC of these machines: a 512-bit AES
//! round issues once per cycle, so AES-256 with nothing else to do (the
//! bench's `ecb-ceiling` row) tops out near 16.7 GB/s, and each register's
//! VPCLMULQDQ takes a cycle of the same units (ECB plus one per register:
//! 15.6 GB/s). This kernel runs at 0.84–0.87× the ECB figure. Tried on
//! 2026-11-21 and dropped: 16 registers in flight (tweaks in memory) and a
//! CLMUL-free tweak update (seven shifts and XORs) were slower even alone;
//! carrying `k ^ t` instead of `t` (one XOR less per register) plus a
//! software prefetch 2 KiB ahead won 4–5% in a standalone loop over a
//! mapped image but cost 4–6% (reads) and 5–10% (writes) more CPU per
//! 1 MiB request inside the daemon, in three alternating runs. Prefetching
//! a decryption's source (first sector, or one sector ahead) looked 5–10%
//! cheaper for 4 KiB random reads in two daemon runs and no better in a
//! third: inside the ±8% those runs vary by, so not kept.
//!
//! Not covered by the zeroizing: round keys that the compiler keeps in
//! registers or spills to the stack during a call.

// The AVX-512/VAES intrinsics are stable since Rust 1.89, later than the
// crate's declared rust-version (which its dependencies already exceed).

use crate::shared::{SharedMut, SharedRef};
use core::arch::x86_64::*;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::Run;

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

    /// Runs the kernel takes: sectors of whole 512-byte chunks (every
    /// dm-crypt sector size), and whole sectors.
    pub(super) fn takes(sector_size: usize, len: usize) -> bool {
        sector_size != 0 && sector_size.is_multiple_of(CHUNK) && len.is_multiple_of(sector_size)
    }

    /// Encrypts the sectors of `data` in place; sector i uses the IV
    /// `first_iv + i·iv_step` (wrapping).
    pub(super) fn encrypt_inplace(&self, run: Run, data: &mut [u8]) {
        assert!(Self::takes(run.sector_size, data.len()));
        let p = data.as_mut_ptr();
        // SAFETY: `self` exists only if cpu_supported() held; `p` is valid for
        // reads and writes of data.len() bytes, whole sectors of whole
        // chunks. Reading and writing the same buffer is fine: each chunk is
        // loaded whole before it is stored.
        unsafe { self.run::<false>(run, p, p, data.len()) }
    }

    pub(super) fn decrypt_inplace(&self, run: Run, data: &mut [u8]) {
        assert!(Self::takes(run.sector_size, data.len()));
        let p = data.as_mut_ptr();
        // SAFETY: as in encrypt_inplace.
        unsafe { self.run::<true>(run, p, p, data.len()) }
    }

    pub(super) fn encrypt_to(&self, run: Run, src: &[u8], dst: &mut [u8]) {
        assert!(Self::takes(run.sector_size, src.len()) && src.len() == dst.len());
        // SAFETY: `self` exists only if cpu_supported() held; both pointers
        // are valid for src.len() bytes, whole sectors of whole chunks, and
        // (a & and a &mut) do not overlap.
        unsafe { self.run::<false>(run, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    pub(super) fn decrypt_to(&self, run: Run, src: &[u8], dst: &mut [u8]) {
        assert!(Self::takes(run.sector_size, src.len()) && src.len() == dst.len());
        // SAFETY: as in encrypt_to.
        unsafe { self.run::<true>(run, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    /// From or into memory someone else may change meanwhile (see
    /// `SharedRef`): the kernel only ever touches it through these pointers.
    pub(super) fn shared(&self, decrypt: bool, run: Run, src: SharedRef<'_>, dst: SharedMut<'_>) {
        let len = src.len();
        assert!(Self::takes(run.sector_size, len) && len == dst.len());
        let (s, d) = (src.as_ptr(), dst.as_ptr());
        // SAFETY: `self` exists only if cpu_supported() held; SharedRef and
        // SharedMut vouch that their pointers are valid for len bytes; the
        // two do not overlap (one side is always the daemon's own buffer or
        // the image mapping, the other a guest's buffer).
        unsafe {
            if decrypt {
                self.run::<true>(run, s, d, len)
            } else {
                self.run::<false>(run, s, d, len)
            }
        }
    }

    /// # Safety
    /// The CPU has the kernel's features; `src` and `dst` are valid for `len`
    /// bytes, `Vaes::takes(run.sector_size, len)`, and the two are either
    /// equal or non-overlapping.
    unsafe fn run<const DECRYPT: bool>(&self, run: Run, src: *const u8, dst: *mut u8, len: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.rounds == 10 {
                xts::<10, DECRYPT>(self, run, src, dst, len)
            } else {
                xts::<14, DECRYPT>(self, run, src, dst, len)
            }
        }
    }
}

/// Repeats a statement for each of the LANES registers with a constant
/// index, so the arrays below live in registers rather than on the stack.
macro_rules! lanes {
    ($j:ident => $body:block) => {{
        {
            let $j = 0usize;
            $body
        }
        {
            let $j = 1usize;
            $body
        }
        {
            let $j = 2usize;
            $body
        }
        {
            let $j = 3usize;
            $body
        }
        {
            let $j = 4usize;
            $body
        }
        {
            let $j = 5usize;
            $body
        }
        {
            let $j = 6usize;
            $body
        }
        {
            let $j = 7usize;
            $body
        }
    }};
}

/// A run of sectors. `NR` is the number of AES rounds (10 or 14).
///
/// The first tweaks of four sectors come out of one 512-bit AES pass, and
/// the next four are started before the current four are processed, so the
/// tweak cipher's latency hides behind the data (it matters for 512-byte
/// sectors, where it would otherwise be a third of the time).
///
/// # Safety
/// As [`Vaes::run`].
#[target_feature(enable = "aes,sse4.1,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn xts<const NR: usize, const DECRYPT: bool>(
    keys: &Vaes,
    run: Run,
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
    let sectors = len / run.sector_size;

    let mut next = four_tweaks::<NR>(&keys.tweak, run, 0);
    let mut first = 0;
    while first < sectors {
        let group = next;
        if first + 4 < sectors {
            next = four_tweaks::<NR>(&keys.tweak, run, first as u64 + 4);
        }
        for lane in 0..(sectors - first).min(4) {
            let mut tw = sector_tweaks(group, lane, poly);
            let start = (first + lane) * run.sector_size;
            let mut off = start;
            while off < start + run.sector_size {
                let mut x = [_mm512_setzero_si512(); LANES];
                lanes!(j => {
                    // SAFETY: off + 64·(j+1) <= len, and src is valid for len bytes.
                    let block = unsafe { _mm512_loadu_si512(src.add(off + 64 * j).cast()) };
                    x[j] = xor3(block, tw[j], rk[0]);
                });
                for k in &rk[1..NR] {
                    lanes!(j => {
                        x[j] = if DECRYPT {
                            _mm512_aesdec_epi128(x[j], *k)
                        } else {
                            _mm512_aesenc_epi128(x[j], *k)
                        };
                    });
                }
                lanes!(j => {
                    let last = _mm512_xor_si512(rk[NR], tw[j]);
                    let out = if DECRYPT {
                        _mm512_aesdeclast_epi128(x[j], last)
                    } else {
                        _mm512_aesenclast_epi128(x[j], last)
                    };
                    // SAFETY: as for the load; dst is valid for len bytes.
                    unsafe { _mm512_storeu_si512(dst.add(off + 64 * j).cast(), out) };
                    tw[j] = mul_x8n::<4, 12>(tw[j], poly);
                });
                off += CHUNK;
            }
        }
        first += 4;
    }
}

/// The encrypted IVs (plain64: little-endian sector number, zero-padded) of
/// sectors `first..first + 4` of the run, one per 128-bit lane.
#[target_feature(enable = "avx512f,vaes")]
fn four_tweaks<const NR: usize>(tweak: &Schedule, run: Run, first: u64) -> __m512i {
    let iv = |i: u64| {
        run.first_iv
            .wrapping_add(first.wrapping_add(i).wrapping_mul(run.iv_step)) as i64
    };
    let ivs = _mm512_setr_epi64(iv(0), 0, iv(1), 0, iv(2), 0, iv(3), 0);
    let mut t = _mm512_xor_si512(ivs, _mm512_broadcast_i32x4(load(&tweak[0])));
    for k in &tweak[1..NR] {
        t = _mm512_aesenc_epi128(t, _mm512_broadcast_i32x4(load(k)));
    }
    _mm512_aesenclast_epi128(t, _mm512_broadcast_i32x4(load(&tweak[NR])))
}

/// The tweaks of blocks 0..32 of the sector whose encrypted IV T is lane
/// `lane` of `group`: register r holds T·α^(4r..4r+4).
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn sector_tweaks(group: __m512i, lane: usize, poly: __m512i) -> [__m512i; LANES] {
    let t = match lane {
        0 => _mm512_shuffle_i64x2::<0x00>(group, group),
        1 => _mm512_shuffle_i64x2::<0x55>(group, group),
        2 => _mm512_shuffle_i64x2::<0xaa>(group, group),
        _ => _mm512_shuffle_i64x2::<0xff>(group, group),
    };
    // Registers 0 and 1 by per-lane shifts (x^0..x^3, x^4..x^7), the rest
    // from them by whole-byte multiples, which are cheaper.
    let r0 = mul_x_var(t, _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3), poly);
    let r1 = mul_x_var(t, _mm512_setr_epi64(4, 4, 5, 5, 6, 6, 7, 7), poly);
    [
        r0,
        r1,
        mul_x8n::<1, 15>(r0, poly),
        mul_x8n::<1, 15>(r1, poly),
        mul_x8n::<2, 14>(r0, poly),
        mul_x8n::<2, 14>(r1, poly),
        mul_x8n::<3, 13>(r0, poly),
        mul_x8n::<3, 13>(r1, poly),
    ]
}

/// Each 128-bit lane times x^k, with k (0..64) given per qword (equal in
/// both qwords of a lane).
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x_var(v: __m512i, k: __m512i, poly: __m512i) -> __m512i {
    let left = _mm512_sllv_epi64(v, k);
    // Shift counts of 64 (k = 0) give 0, as needed.
    let out = _mm512_srlv_epi64(v, _mm512_sub_epi64(_mm512_set1_epi64(64), k));
    // Bits leaving the low qword enter the high one; bits leaving the lane
    // come back reduced (x^128 = x^7 + x^2 + x + 1).
    let into_high = _mm512_bslli_epi128::<8>(out);
    let off_top = _mm512_bsrli_epi128::<8>(out);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(off_top, poly);
    xor3(left, into_high, reduced)
}

/// Each 128-bit lane times x^(8·N) in GF(2^128) (XTS bit order:
/// little-endian), 1 <= N <= 4; `R` must be 16 - N.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_x8n<const N: i32, const R: i32>(v: __m512i, poly: __m512i) -> __m512i {
    let shifted = _mm512_bslli_epi128::<N>(v);
    let carry = _mm512_bsrli_epi128::<R>(v);
    // carry (< 2^32) times x^128 = carry · 0x87: below 2^40, no second carry.
    _mm512_xor_si512(shifted, _mm512_clmulepi64_epi128::<0x00>(carry, poly))
}

#[target_feature(enable = "avx512f")]
fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi64::<0x96>(a, b, c)
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
