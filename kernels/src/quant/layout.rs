//! GGML block formats and the repacked, row-interleaved layout the kernels read.
//!
//! A weight matrix `[n, k]` is cut into tiles of [`TILE`] = 16 consecutive rows. Inside a
//! tile, weights are stored block by block (32 values of `k` per block; K-quants: see
//! `kquants`), and each block holds the 16 rows' scales (f16) followed by their quants
//! interleaved so that one 64-byte load carries 4 (8-bit) or 8 (4/5-bit) consecutive `k`
//! values for each of the 16 rows:
//!
//! ```text
//! 4-bit (Q4_0, Q4_1): group g = k values 8g..8g+8, byte [g][row][j] = q[8g+j] | q[8g+4+j] << 4
//! 5-bit (Q5_0, Q5_1): a 64-byte plane of fifth bits (see `put_hbits`), then the 4-bit layout
//! 8-bit (Q8_0):       group g = k values 4g..4g+4, byte [g][row][j] = q[4g+j] (as i8)
//! ```
//!
//! so that one 32-bit lane of a vector holds one row's 4 consecutive values: a `vpdpbusd`
//! (or `vpmaddubsw` + `vpmaddwd`) against a broadcast of 4 activation bytes yields 16 rows'
//! partial dot products at once, with the activations kept in their natural order. Each
//! weight block is loaded and unpacked once and then used for every activation row of a tile.
//!
//! Blocks are grouped (two at a time for formats whose scales take 32 bytes) so that every
//! group, and therefore every 64-byte quant load, is 64-byte aligned. The bytes of one tile
//! are contiguous, so a decode step streams each tile as a single sequential run. The
//! packed matrix is the size of the GGML one (plus the zero rows that pad the last tile).

use super::QuantError;
use candle_core::quantized::GgmlDType;
use half::f16;

/// Rows per tile: one 512-bit vector of i32/f32 lanes.
pub(crate) const TILE: usize = 16;
/// Values per block for the 32-wide formats.
pub(crate) const QK: usize = 32;
/// Values per super-block for the K-quants.
pub(crate) const QK_K: usize = 256;

/// A GGML block format with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    pub(crate) fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether this is a 256-value K-quant (laid out by `kquants`).
    #[inline(always)]
    pub(crate) fn is_k(self) -> bool {
        matches!(self, Self::Q4K | Self::Q5K | Self::Q6K)
    }

    /// 32-value formats with a min (`y = q·d + m`), paired with Q8_1 activations.
    #[inline(always)]
    pub(crate) fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// 32-value formats with a fifth (high) bit plane.
    #[inline(always)]
    pub(crate) fn is_five(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }

    /// What symmetric 32-value formats subtract from their unsigned quants.
    #[inline(always)]
    pub(crate) fn zero_point(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
            _ => 0,
        }
    }

    /// Values per block.
    #[inline(always)]
    pub(crate) fn block_len(self) -> usize {
        if self.is_k() { QK_K } else { QK }
    }

    /// Bytes of one block in GGML's own layout.
    pub(crate) fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one tile-block's scales: 16 f16 `d` (and 16 f16 `m`); K-quants keep their
    /// scales inside their tile-block (see `kquants`).
    #[inline(always)]
    pub(crate) fn scale_bytes(self) -> usize {
        match self {
            Self::Q4_1 | Self::Q5_1 => 2 * TILE * 2,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => TILE * 2,
            Self::Q4K | Self::Q5K | Self::Q6K => 0,
        }
    }

    /// Bytes of one tile-block's quants (the whole tile-block for K-quants).
    #[inline(always)]
    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => TILE * QK / 2,
            Self::Q5_0 | Self::Q5_1 => TILE * QK / 8 + TILE * QK / 2,
            Self::Q8_0 => TILE * QK,
            Self::Q4K => super::kquants::Q4K_TILE_BLOCK,
            Self::Q5K => super::kquants::Q5K_TILE_BLOCK,
            Self::Q6K => super::kquants::Q6K_TILE_BLOCK,
        }
    }

    /// Blocks per aligned group (scales of a whole group come first, then its quants).
    #[inline(always)]
    pub(crate) fn group_blocks(self) -> usize {
        if self.is_k() { 1 } else { 64 / self.scale_bytes() }
    }

    /// Bytes of one group: a multiple of 64.
    #[inline(always)]
    pub(crate) fn group_bytes(self) -> usize {
        self.group_blocks() * (self.scale_bytes() + self.quant_bytes())
    }
}

/// Writes the low nibbles of `q` (a multiple of 8 values) for one lane in the 4-bit group
/// layout: 64 bytes per 8 values, byte `[g][lane][j] = q[8g+j] | q[8g+4+j] << 4`.
pub(crate) fn put_nibbles(out: &mut [u8], lane: usize, q: &[u8]) {
    for (g, q) in q.chunks_exact(8).enumerate() {
        for j in 0..4 {
            out[g * 64 + lane * 4 + j] = (q[j] & 0x0F) | ((q[4 + j] & 0x0F) << 4);
        }
    }
}

/// Reads one lane's nibbles (see [`put_nibbles`]) into `q`.
pub(crate) fn get_nibbles(data: &[u8], lane: usize, q: &mut [u8]) {
    for (g, q) in q.chunks_exact_mut(8).enumerate() {
        for j in 0..4 {
            let b = data[g * 64 + lane * 4 + j];
            q[j] = b & 0x0F;
            q[4 + j] = b >> 4;
        }
    }
}

/// Writes bit 4 of each of `q` (a multiple of 32 values) for one lane: 64 bytes per 32
/// values, bit `2i` of byte `[lane][j]` is `q[8i+j]`'s, bit `2i+1` is `q[8i+4+j]`'s — the
/// bits of the lo/hi nibble vectors of group `i` sit at fixed positions of the same byte.
pub(crate) fn put_hbits(out: &mut [u8], lane: usize, q: &[u8]) {
    for (c, q) in q.chunks_exact(32).enumerate() {
        for j in 0..4 {
            let mut byte = 0u8;
            for i in 0..4 {
                byte |= ((q[8 * i + j] >> 4) & 1) << (2 * i);
                byte |= ((q[8 * i + 4 + j] >> 4) & 1) << (2 * i + 1);
            }
            out[c * 64 + lane * 4 + j] = byte;
        }
    }
}

/// ORs one lane's high bits (see [`put_hbits`]) into bit 4 of `q`.
pub(crate) fn or_hbits(data: &[u8], lane: usize, q: &mut [u8]) {
    for (c, q) in q.chunks_exact_mut(32).enumerate() {
        for j in 0..4 {
            let byte = data[c * 64 + lane * 4 + j];
            for i in 0..4 {
                q[8 * i + j] |= ((byte >> (2 * i)) & 1) << 4;
                q[8 * i + 4 + j] |= ((byte >> (2 * i + 1)) & 1) << 4;
            }
        }
    }
}

/// One row's 32-value block, unpacked: f16 bits of `d` and `m`, and the quants (unsigned
/// 4/5-bit values, or Q8_0's i8 as bytes).
pub(crate) struct SmallBlock {
    pub(crate) d: [u8; 2],
    pub(crate) m: [u8; 2],
    pub(crate) q: [u8; QK],
}

fn decode_small(f: Format, blk: &[u8]) -> SmallBlock {
    let mut b = SmallBlock { d: [blk[0], blk[1]], m: [0; 2], q: [0; QK] };
    let (qh, qs) = match f {
        Format::Q4_0 => (0, &blk[2..18]),
        Format::Q4_1 => (0, &blk[4..20]),
        Format::Q5_0 => (u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]), &blk[6..22]),
        Format::Q5_1 => (u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]), &blk[8..24]),
        _ => {
            b.q.copy_from_slice(&blk[2..34]);
            return b;
        }
    };
    if f.has_min() {
        b.m = [blk[2], blk[3]];
    }
    // Value v's fifth bit is bit v of `qh` (zero for 4-bit formats).
    let high = |v: usize| (((qh >> v) & 1) as u8) << 4;
    for (j, &byte) in qs.iter().enumerate() {
        b.q[j] = (byte & 0x0F) | high(j);
        b.q[j + QK / 2] = (byte >> 4) | high(j + QK / 2);
    }
    b
}

fn encode_small(f: Format, b: &SmallBlock, out: &mut Vec<u8>) {
    out.extend_from_slice(&b.d);
    if f == Format::Q8_0 {
        out.extend_from_slice(&b.q);
        return;
    }
    if f.has_min() {
        out.extend_from_slice(&b.m);
    }
    if f.is_five() {
        let qh = (0..QK).fold(0u32, |h, v| h | (((b.q[v] >> 4) & 1) as u32) << v);
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..QK / 2).map(|j| (b.q[j] & 0x0F) | ((b.q[j + QK / 2] & 0x0F) << 4)));
}

/// A heap buffer aligned to 64 bytes (cache line and zmm width).
#[derive(Clone)]
pub(crate) struct AlignedBytes {
    chunks: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self { chunks: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `Line` is a plain byte array with no padding, the vector holds at least
        // `len` initialised bytes, and the borrow ties the slice to `self`.
        unsafe { std::slice::from_raw_parts(self.chunks.as_ptr().cast::<u8>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with the unique borrow of `self`.
        unsafe { std::slice::from_raw_parts_mut(self.chunks.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A repacked weight matrix (see the module docs for the layout).
#[derive(Clone)]
pub(crate) struct Packed {
    pub(crate) format: Format,
    /// Output features (rows of W).
    pub(crate) n: usize,
    /// Input features.
    pub(crate) k: usize,
    /// Blocks per row.
    pub(crate) nb: usize,
    /// Tiles of [`TILE`] rows (the last one zero-padded).
    pub(crate) n_tiles: usize,
    /// Bytes per tile (a multiple of 64).
    pub(crate) tile_bytes: usize,
    pub(crate) data: AlignedBytes,
}

/// An f16 given as little-endian bytes, widened.
pub(crate) fn f16_bits(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

impl Packed {
    fn empty(format: Format, n: usize, k: usize) -> Self {
        let nb = k / format.block_len();
        let n_tiles = n.div_ceil(TILE);
        let tile_bytes = nb.div_ceil(format.group_blocks()) * format.group_bytes();
        Self { format, n, k, nb, n_tiles, tile_bytes, data: AlignedBytes::zeroed(n_tiles * tile_bytes) }
    }

    /// Byte offset of block `b`'s scales in tile `t`.
    #[inline(always)]
    pub(crate) fn scale_offset(&self, t: usize, b: usize) -> usize {
        let f = self.format;
        let g = f.group_blocks();
        t * self.tile_bytes + (b / g) * f.group_bytes() + (b % g) * f.scale_bytes()
    }

    /// Byte offset of block `b`'s quants in tile `t`.
    #[inline(always)]
    pub(crate) fn quant_offset(&self, t: usize, b: usize) -> usize {
        let f = self.format;
        let g = f.group_blocks();
        t * self.tile_bytes + (b / g) * f.group_bytes() + g * f.scale_bytes() + (b % g) * f.quant_bytes()
    }

    /// Validates sizes and repacks GGML row-major blocks.
    pub(crate) fn from_ggml(format: Format, data: &[u8], n: usize, k: usize) -> Result<Self, QuantError> {
        let dtype = format.dtype();
        if n == 0 || k == 0 {
            return Err(QuantError::Empty { n, k });
        }
        if !k.is_multiple_of(format.block_len()) {
            return Err(QuantError::BadK { dtype, k, block: format.block_len() });
        }
        let expected = n
            .checked_mul(k / format.block_len())
            .and_then(|b| b.checked_mul(format.ggml_block_bytes()))
            .ok_or(QuantError::TooLarge { n, k })?;
        if data.len() != expected {
            return Err(QuantError::SizeMismatch { dtype, n, k, expected, got: data.len() });
        }
        let mut p = Self::empty(format, n, k);
        let row_bytes = p.nb * format.ggml_block_bytes();
        for (r, row) in data.chunks_exact(row_bytes).enumerate() {
            p.set_row(r, row);
        }
        Ok(p)
    }

    /// Writes one row given in GGML layout (`nb` blocks) into its tile lanes.
    fn set_row(&mut self, r: usize, row: &[u8]) {
        if self.format.is_k() {
            super::kquants::set_row(self, r, row);
            return;
        }
        let (t, lane) = (r / TILE, r % TILE);
        let f = self.format;
        let bb = f.ggml_block_bytes();
        for b in 0..self.nb {
            let blk = decode_small(f, &row[b * bb..(b + 1) * bb]);
            let so = self.scale_offset(t, b);
            let qo = self.quant_offset(t, b);
            let out = self.data.as_mut_slice();
            // f16 scales stay f16: the packed matrix is no larger than the GGML one.
            out[so + 2 * lane..so + 2 * lane + 2].copy_from_slice(&blk.d);
            if f.has_min() {
                out[so + 2 * TILE + 2 * lane..so + 2 * TILE + 2 * lane + 2].copy_from_slice(&blk.m);
            }
            let quants = &mut out[qo..qo + f.quant_bytes()];
            match f {
                Format::Q8_0 => {
                    for g in 0..QK / 4 {
                        quants[g * 64 + lane * 4..g * 64 + lane * 4 + 4].copy_from_slice(&blk.q[4 * g..4 * g + 4]);
                    }
                }
                _ if f.is_five() => {
                    put_hbits(&mut quants[..64], lane, &blk.q);
                    put_nibbles(&mut quants[64..], lane, &blk.q);
                }
                _ => put_nibbles(quants, lane, &blk.q),
            }
        }
    }

    /// Block `b` of row `t * 16 + lane`, unpacked.
    pub(crate) fn small_block(&self, t: usize, b: usize, lane: usize) -> SmallBlock {
        let f = self.format;
        let data = self.data.as_slice();
        let (so, qo) = (self.scale_offset(t, b), self.quant_offset(t, b));
        let mut blk = SmallBlock { d: [data[so + 2 * lane], data[so + 2 * lane + 1]], m: [0; 2], q: [0; QK] };
        if f.has_min() {
            blk.m = [data[so + 2 * TILE + 2 * lane], data[so + 2 * TILE + 2 * lane + 1]];
        }
        let quants = &data[qo..qo + f.quant_bytes()];
        match f {
            Format::Q8_0 => {
                for g in 0..QK / 4 {
                    blk.q[4 * g..4 * g + 4].copy_from_slice(&quants[g * 64 + lane * 4..g * 64 + lane * 4 + 4]);
                }
            }
            _ if f.is_five() => {
                get_nibbles(&quants[64..], lane, &mut blk.q);
                or_hbits(&quants[..64], lane, &mut blk.q);
            }
            _ => get_nibbles(quants, lane, &mut blk.q),
        }
        blk
    }

    /// Row `r` back in GGML layout, appended to `out`.
    pub(crate) fn push_ggml_row(&self, r: usize, out: &mut Vec<u8>) {
        if self.format.is_k() {
            super::kquants::push_ggml_row(self, r, out);
            return;
        }
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..self.nb {
            encode_small(self.format, &self.small_block(t, b, lane), out);
        }
    }

    /// Dequantizes row `r` exactly as candle's `to_float` does.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.format.is_k() {
            super::kquants::dequantize_row(self, r, out);
            return;
        }
        let (t, lane) = (r / TILE, r % TILE);
        let f = self.format;
        for b in 0..self.nb {
            let blk = self.small_block(t, b, lane);
            let d = f16_bits(blk.d);
            let dst = &mut out[b * QK..(b + 1) * QK];
            for (y, &q) in dst.iter_mut().zip(&blk.q) {
                *y = match f {
                    Format::Q8_0 => q as i8 as f32 * d,
                    _ if f.has_min() => q as f32 * d + f16_bits(blk.m),
                    _ => (q as i32 - f.zero_point()) as f32 * d,
                };
            }
        }
    }

    /// Bytes held by the packed matrix.
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.data.as_slice().len()
    }
}
