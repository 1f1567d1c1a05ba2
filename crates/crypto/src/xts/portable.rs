//! The portable AES-XTS kernel: safe code over `aes`'s multi-block calls.
//!
//! A naive XTS spends its time on the tweak sequence and the XORs, not in AES
//! (profiled when this kernel was written). This kernel computes a sector's tweaks once, XORs
//! them in, hands the whole sector to `encrypt_blocks` (which `aes` runs with
//! VAES/AES-NI chosen at run time, several blocks in parallel), and XORs again.

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256};

type Block = Array<u8, aes::cipher::consts::U16>;

/// Largest sector we handle: 4096 bytes = 256 blocks.
const MAX_BLOCKS: usize = 256;

// One per volume, never moved in a hot path: the size gap is harmless.
#[allow(clippy::large_enum_variant)]
enum Pair {
    Aes128 { data: Aes128, tweak: Aes128 },
    Aes256 { data: Aes256, tweak: Aes256 },
}

/// An expanded XTS key. The round keys are zeroized by `aes` on drop (its
/// `zeroize` feature).
pub(super) struct Portable(Pair);

impl Portable {
    /// `key` is 32 or 64 bytes (checked by `XtsKey`).
    pub(super) fn new(key: &[u8]) -> Self {
        let (k1, k2) = key.split_at(key.len() / 2);
        let pair = if k1.len() == 16 {
            Pair::Aes128 {
                data: Aes128::new_from_slice(k1).expect("16-byte key"),
                tweak: Aes128::new_from_slice(k2).expect("16-byte key"),
            }
        } else {
            Pair::Aes256 {
                data: Aes256::new_from_slice(k1).expect("32-byte key"),
                tweak: Aes256::new_from_slice(k2).expect("32-byte key"),
            }
        };
        Portable(pair)
    }

    pub(super) fn encrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        match &self.0 {
            Pair::Aes128 { data, tweak } => sector_inplace(data, tweak, iv, sector, encrypt),
            Pair::Aes256 { data, tweak } => sector_inplace(data, tweak, iv, sector, encrypt),
        }
    }

    pub(super) fn decrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        match &self.0 {
            Pair::Aes128 { data, tweak } => sector_inplace(data, tweak, iv, sector, decrypt),
            Pair::Aes256 { data, tweak } => sector_inplace(data, tweak, iv, sector, decrypt),
        }
    }

    pub(super) fn encrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        match &self.0 {
            Pair::Aes128 { data, tweak } => sector_copy(data, tweak, iv, src, dst, encrypt),
            Pair::Aes256 { data, tweak } => sector_copy(data, tweak, iv, src, dst, encrypt),
        }
    }

    pub(super) fn decrypt_sector_to(&self, iv: u64, src: &[u8], dst: &mut [u8]) {
        match &self.0 {
            Pair::Aes128 { data, tweak } => sector_copy(data, tweak, iv, src, dst, decrypt),
            Pair::Aes256 { data, tweak } => sector_copy(data, tweak, iv, src, dst, decrypt),
        }
    }
}

fn encrypt<C>(c: &C, blocks: &mut [Block])
where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    c.encrypt_blocks(blocks)
}

fn decrypt<C>(c: &C, blocks: &mut [Block])
where
    C: BlockCipherDecrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    c.decrypt_blocks(blocks)
}

/// plain64: the IV is the little-endian sector number, zero-padded to 16 bytes.
fn first_tweak<C>(tweak: &C, iv: u64) -> u128
where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let mut block = Block::from((iv as u128).to_le_bytes());
    tweak.encrypt_block(&mut block);
    u128::from_le_bytes(block.into())
}

/// Multiplication by x in GF(2^128) with XTS's little-endian convention.
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

#[inline(always)]
fn xor_block(b: &mut Block, t: u128) {
    *b = Block::from((u128::from_le_bytes((*b).into()) ^ t).to_le_bytes());
}

/// A data unit the kernel would otherwise silently mangle (a partial block
/// left out, or blocks beyond the tweak table) is a caller bug.
fn check_len(blocks: usize, rest: usize) {
    assert!(
        rest == 0 && (1..=MAX_BLOCKS).contains(&blocks),
        "XTS data unit must be 16..=4096 bytes in whole blocks"
    );
}

fn sector_inplace<C>(data: &C, tweak: &C, iv: u64, sector: &mut [u8], op: fn(&C, &mut [Block]))
where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let (blocks, rest) = Array::slice_as_chunks_mut(sector);
    check_len(blocks.len(), rest.len());
    let mut tweaks = [0u128; MAX_BLOCKS];
    let mut t = first_tweak(tweak, iv);
    for (b, slot) in blocks.iter_mut().zip(tweaks.iter_mut()) {
        *slot = t;
        xor_block(b, t);
        t = mul_alpha(t);
    }
    op(data, blocks);
    for (b, t) in blocks.iter_mut().zip(tweaks.iter()) {
        xor_block(b, *t);
    }
}

/// `dst` receives only the finished output: the whitened intermediate
/// (data XOR tweak) stays in a stack buffer. `dst` may be a shared mapping of
/// the image, where another process could watch every store.
fn sector_copy<C>(
    data: &C,
    tweak: &C,
    iv: u64,
    src: &[u8],
    dst: &mut [u8],
    op: fn(&C, &mut [Block]),
) where
    C: BlockCipherEncrypt + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    assert_eq!(src.len(), dst.len());
    let (src_blocks, rest) = Array::<u8, aes::cipher::consts::U16>::slice_as_chunks(src);
    check_len(src_blocks.len(), rest.len());
    let mut work = [Block::default(); MAX_BLOCKS];
    let blocks = &mut work[..src_blocks.len()];
    let mut tweaks = [0u128; MAX_BLOCKS];
    let mut t = first_tweak(tweak, iv);
    for ((b, s), slot) in blocks.iter_mut().zip(src_blocks).zip(tweaks.iter_mut()) {
        *slot = t;
        *b = Block::from((u128::from_le_bytes((*s).into()) ^ t).to_le_bytes());
        t = mul_alpha(t);
    }
    op(data, blocks);
    for ((b, t), out) in blocks
        .iter_mut()
        .zip(tweaks.iter())
        .zip(dst.chunks_exact_mut(16))
    {
        xor_block(b, *t);
        out.copy_from_slice(b);
    }
}
