//! AES-XTS throughput on one core, same buffers for every implementation:
//! cryptblk's fused VAES kernel and its portable loop, OpenSSL EVP aes-xts
//! (IV reset per sector, as dm-crypt's plain64 needs) and xts-mode 0.6.
//! AES-128 and AES-256, 512-byte and 4 KiB sectors, 4 KiB / 64 KiB / 1 MiB
//! requests, encrypt and decrypt, all in place.
//!
//! One more row per key size, `ecb-ceiling`, is not XTS: it runs only the
//! AES rounds (VAES, 512-bit, 8 registers in flight) over the same 64 KiB,
//! the most any XTS kernel on this CPU could reach. The fused kernel's
//! figure reads best as a fraction of it, measured in the same run.
//!
//! The `copy` groups time the fused copy the daemon runs between its own
//! buffers and guest memory (AES-256, 4 KiB sectors): through Rust slices,
//! and through the `SharedRef`/`SharedMut` pointers guest memory is reached
//! by (crypto's `shared` module), on both kernels. The fused kernel takes
//! the pointers as they are; the portable one bounces each sector through
//! a stack buffer.
//!
//! `cargo bench --bench xts` (about 3 minutes plus the LTO build on a quiet
//! machine). Filter with criterion's usual argument, e.g.
//! `cargo bench --bench xts -- aes256/encrypt/4096`.
//!
//! Timing: each sample reports its fastest batch of requests (at least
//! 64 KiB per batch) scaled to the sample, not the sum of all of them. The
//! machines here share two cores among many processes, and the mean then
//! measures the neighbours rather than the code (means came out 1.2–7× below
//! the best batches, with ±50% spread). Every implementation is timed the
//! same way, so ratios hold. `XTS_BENCH_MEAN=1` restores criterion's plain
//! mean timing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cryptblk::crypto::{SharedMut, SharedRef, Xts, XtsKey};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

const SECTOR_SIZES: [usize; 2] = [512, 4096];
const REQUESTS: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];
/// Where the request starts on the "disk": a sector number well away from 0.
const FIRST_IV: u64 = 1 << 20;

/// Bytes per timed batch in best-batch timing (see the module comment).
const BATCH_BYTES: usize = 64 << 10;

/// One way to run XTS over a request, sector by sector, in place.
type Run = Box<dyn FnMut(&mut [u8])>;

fn key_bytes(bytes: usize) -> Vec<u8> {
    (0..bytes as u8)
        .map(|i| i.wrapping_mul(37) ^ 0xa5)
        .collect()
}

fn sectors(data: &mut [u8], size: usize) -> impl Iterator<Item = (u64, &mut [u8])> {
    data.chunks_mut(size)
        .enumerate()
        .map(|(i, s)| (FIRST_IV + i as u64, s))
}

/// The whole request in one call, as `SectorCipher` hands it over.
fn cryptblk(xts: Xts, encrypt: bool, size: usize) -> Run {
    Box::new(move |data| {
        if encrypt {
            xts.encrypt_sectors(FIRST_IV, 1, size, data)
        } else {
            xts.decrypt_sectors(FIRST_IV, 1, size, data)
        }
    })
}

fn openssl(key: &[u8], encrypt: bool, size: usize) -> Run {
    let cipher = if key.len() == 32 {
        Cipher::aes_128_xts()
    } else {
        Cipher::aes_256_xts()
    };
    let mut ctx = CipherCtx::new().expect("EVP_CIPHER_CTX");
    if encrypt {
        ctx.encrypt_init(Some(cipher), Some(key), None)
    } else {
        ctx.decrypt_init(Some(cipher), Some(key), None)
    }
    .expect("OpenSSL XTS key");
    Box::new(move |data| {
        for (iv, s) in sectors(data, size) {
            let iv = (iv as u128).to_le_bytes();
            if encrypt {
                ctx.encrypt_init(None, None, Some(&iv))
            } else {
                ctx.decrypt_init(None, None, Some(&iv))
            }
            .expect("OpenSSL XTS IV");
            let n = s.len();
            ctx.cipher_update_inplace(s, n).expect("OpenSSL XTS");
        }
    })
}

fn xts_mode(key: &[u8], encrypt: bool, size: usize) -> Run {
    use xts_mode::{get_tweak_default, Xts128};
    fn run<C>(x: Xts128<C>, encrypt: bool, size: usize) -> Run
    where
        C: aes::cipher::BlockCipherEncrypt
            + aes::cipher::BlockCipherDecrypt
            + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>
            + 'static,
    {
        Box::new(move |data| {
            for (iv, s) in sectors(data, size) {
                let tweak = get_tweak_default(iv as u128);
                if encrypt {
                    x.encrypt_sector(s, tweak)
                } else {
                    x.decrypt_sector(s, tweak)
                }
            }
        })
    }
    let (k1, k2) = key.split_at(key.len() / 2);
    if key.len() == 32 {
        let c = |k| aes::Aes128::new_from_slice(k).expect("16-byte key");
        run(Xts128::new(c(k1), c(k2)), encrypt, size)
    } else {
        let c = |k| aes::Aes256::new_from_slice(k).expect("32-byte key");
        run(Xts128::new(c(k1), c(k2)), encrypt, size)
    }
}

/// `iters` requests in batches of at least BATCH_BYTES; the fastest
/// batch's time per request, times `iters`.
fn best_batch(iters: u64, request: usize, mut one: impl FnMut()) -> Duration {
    let per_batch = (BATCH_BYTES / request).max(1) as u64;
    let mut best = Duration::MAX;
    let mut done = 0;
    while done < iters {
        let n = per_batch.min(iters - done);
        let start = Instant::now();
        for _ in 0..n {
            one();
        }
        best = best.min(start.elapsed().div_f64(n as f64));
        done += n;
    }
    best.mul_f64(iters as f64)
}

/// AES rounds alone, for the `ecb-ceiling` row.
mod ceiling {
    use core::arch::x86_64::*;

    /// `rounds` AES rounds on every 16-byte block of `data` (a multiple of
    /// 512 bytes), with arbitrary round keys: the speed does not depend on
    /// their values, and nothing checks the output.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VAES.
    #[target_feature(enable = "avx512f,vaes")]
    pub unsafe fn ecb(rounds: usize, data: &mut [u8]) {
        let keys: [__m512i; 15] = core::array::from_fn(|i| _mm512_set1_epi32(i as i32 * 0x0101));
        for chunk in data.chunks_exact_mut(512) {
            let p = chunk.as_mut_ptr();
            let mut x = [_mm512_setzero_si512(); 8];
            for (j, x) in x.iter_mut().enumerate() {
                // SAFETY: chunk holds 512 bytes, 64 per register.
                *x = _mm512_xor_si512(unsafe { _mm512_loadu_si512(p.add(64 * j).cast()) }, keys[0]);
            }
            for k in &keys[1..rounds] {
                for x in x.iter_mut() {
                    *x = _mm512_aesenc_epi128(*x, *k);
                }
            }
            for (j, x) in x.iter().enumerate() {
                let out = _mm512_aesenclast_epi128(*x, keys[rounds]);
                // SAFETY: as for the load.
                unsafe { _mm512_storeu_si512(p.add(64 * j).cast(), out) };
            }
        }
    }
}

fn bench_ceiling(c: &mut Criterion, bits: usize) {
    let rounds = if bits == 128 { 10 } else { 14 };
    let mut group = c.benchmark_group(format!("aes{bits}/ecb-ceiling"));
    group
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .sample_size(10)
        .throughput(Throughput::Bytes(BATCH_BYTES as u64));
    let mut data = vec![0x5a_u8; BATCH_BYTES];
    assert!(
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("vaes"),
        "this CPU lacks VAES/AVX-512"
    );
    // SAFETY: both features were just checked.
    let mut run = || unsafe { ceiling::ecb(rounds, black_box(&mut data)) };
    group.bench_function(BenchmarkId::new("vaes-ecb", BATCH_BYTES), |b| {
        b.iter_custom(|iters| best_batch(iters, BATCH_BYTES, &mut run))
    });
    group.finish();
}

fn bench_xts(c: &mut Criterion) {
    let mean = std::env::var_os("XTS_BENCH_MEAN").is_some();
    for bits in [128, 256] {
        let raw = key_bytes(bits / 4);
        let key = XtsKey::from_bytes(&raw).expect("XTS key");
        bench_ceiling(c, bits);
        for encrypt in [true, false] {
            let dir = if encrypt { "encrypt" } else { "decrypt" };
            for size in SECTOR_SIZES {
                let mut group = c.benchmark_group(format!("aes{bits}/{dir}/{size}"));
                group
                    .warm_up_time(Duration::from_millis(200))
                    .measurement_time(Duration::from_millis(600))
                    .sample_size(10);
                let fast = Xts::new_vaes(&key).expect("this CPU lacks VAES/AVX-512");
                let mut runs: Vec<(&str, Run)> = vec![
                    ("cryptblk-vaes", cryptblk(fast, encrypt, size)),
                    (
                        "cryptblk-portable",
                        cryptblk(Xts::new_portable(&key), encrypt, size),
                    ),
                    ("openssl", openssl(&raw, encrypt, size)),
                    ("xts-mode", xts_mode(&raw, encrypt, size)),
                ];
                for request in REQUESTS {
                    group.throughput(Throughput::Bytes(request as u64));
                    let mut data: Vec<u8> = (0..request).map(|i| (i * 7) as u8).collect();
                    for (name, run) in runs.iter_mut() {
                        group.bench_function(BenchmarkId::new(*name, request), |b| {
                            if mean {
                                b.iter(|| run(black_box(&mut data)))
                            } else {
                                b.iter_custom(|iters| {
                                    best_batch(iters, request, || run(black_box(&mut data)))
                                })
                            }
                        });
                    }
                }
                group.finish();
            }
        }
    }
}

/// One way to run the fused copy from `src` into `dst`.
type Copy = Box<dyn FnMut(&[u8], &mut [u8])>;

fn fused_copy(xts: Xts, encrypt: bool, shared: bool) -> Copy {
    const SECTOR: usize = 4096;
    Box::new(move |src, dst| match (encrypt, shared) {
        (true, false) => xts.encrypt_sectors_to(FIRST_IV, 8, SECTOR, src, dst),
        (false, false) => xts.decrypt_sectors_to(FIRST_IV, 8, SECTOR, src, dst),
        (true, true) => xts.encrypt_sectors_shared(
            FIRST_IV,
            8,
            SECTOR,
            SharedRef::from_ref(src),
            SharedMut::from_mut(dst),
        ),
        (false, true) => xts.decrypt_sectors_shared(
            FIRST_IV,
            8,
            SECTOR,
            SharedRef::from_ref(src),
            SharedMut::from_mut(dst),
        ),
    })
}

fn bench_copy(c: &mut Criterion) {
    let key = XtsKey::from_bytes(&key_bytes(64)).expect("XTS key");
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let mut group = c.benchmark_group(format!("aes256/copy-{dir}/4096"));
        group
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600))
            .sample_size(10);
        let vaes = || Xts::new_vaes(&key).expect("this CPU lacks VAES/AVX-512");
        let mut runs: Vec<(&str, Copy)> = vec![
            ("vaes-slices", fused_copy(vaes(), encrypt, false)),
            ("vaes-shared", fused_copy(vaes(), encrypt, true)),
            (
                "portable-slices",
                fused_copy(Xts::new_portable(&key), encrypt, false),
            ),
            (
                "portable-shared",
                fused_copy(Xts::new_portable(&key), encrypt, true),
            ),
        ];
        for request in REQUESTS {
            group.throughput(Throughput::Bytes(request as u64));
            let src: Vec<u8> = (0..request).map(|i| (i * 7) as u8).collect();
            let mut dst = vec![0u8; request];
            for (name, run) in runs.iter_mut() {
                group.bench_function(BenchmarkId::new(*name, request), |b| {
                    b.iter_custom(|iters| {
                        best_batch(iters, request, || run(black_box(&src), black_box(&mut dst)))
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    // No HTML plots: they take longer to draw than the measurements.
    config = Criterion::default().without_plots();
    targets = bench_xts, bench_copy
}
criterion_main!(benches);
