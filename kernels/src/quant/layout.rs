//! GGML block formats and the repacked, row-interleaved layout the kernels read.
//!
//! A weight matrix `[n, k]` is cut into tiles of [`TILE`] = 16 consecutive rows. Inside a
//! tile, weights are stored block by block (32 values of `k` per block), and each block
//! holds the 16 rows' scales (f16) followed by their quants interleaved so that one 64-byte
//! load carries 4 (8-bit) or 8 (4-bit) consecutive `k` values for each of the 16 rows:
//!
//! ```text
//! 4-bit (Q4_0, Q4_1): group g = k values 8g..8g+8, byte [g][row][j] = q[8g+j] | q[8g+4+j] << 4
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
//! are contiguous, so a decode step streams each tile as a single sequential run.

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
    Q8_0,
    Q4K,
    Q6K,
}

impl Format {
    pub(crate) fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether this is a 256-value K-quant (laid out by `kquants`).
    pub(crate) fn is_k(self) -> bool {
        matches!(self, Self::Q4K | Self::Q6K)
    }

    /// Values per block.
    pub(crate) fn block_len(self) -> usize {
        if self.is_k() { QK_K } else { QK }
    }

    /// Bytes of one block in GGML's own layout.
    pub(crate) fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one tile-block's scales: 16 f16 `d` (and 16 f16 `m` for Q4_1); K-quants
    /// keep their scales inside their tile-block (see `kquants`).
    #[inline(always)]
    pub(crate) fn scale_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 2 * TILE * 2,
            Self::Q4_0 | Self::Q8_0 => TILE * 2,
            Self::Q4K | Self::Q6K => 0,
        }
    }

    /// Bytes of one tile-block's quants (the whole tile-block for K-quants).
    #[inline(always)]
    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => TILE * QK / 2,
            Self::Q8_0 => TILE * QK,
            Self::Q4K => super::kquants::Q4K_TILE_BLOCK,
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

fn read_f16(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

impl Packed {
    fn empty(format: Format, n: usize, k: usize) -> Self {
        let nb = k / format.block_len();
        let n_tiles = n.div_ceil(TILE);
        let tile_bytes = nb.div_ceil(format.group_blocks()) * format.group_bytes();
        Self {
            format,
            n,
            k,
            nb,
            n_tiles,
            tile_bytes,
            data: AlignedBytes::zeroed(n_tiles * tile_bytes),
        }
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
        t * self.tile_bytes
            + (b / g) * f.group_bytes()
            + g * f.scale_bytes()
            + (b % g) * f.quant_bytes()
    }

    /// Validates sizes and repacks GGML row-major blocks.
    pub(crate) fn from_ggml(
        format: Format,
        data: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, QuantError> {
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
        let format = self.format;
        let bb = format.ggml_block_bytes();
        for b in 0..self.nb {
            let blk = &row[b * bb..(b + 1) * bb];
            let so = self.scale_offset(t, b);
            let qo = self.quant_offset(t, b);
            let out = self.data.as_mut_slice();
            // f16 scales stay f16: the packed matrix is no larger than the GGML one.
            out[so + 2 * lane..so + 2 * lane + 2].copy_from_slice(&blk[0..2]);
            match format {
                Format::Q4_0 | Format::Q4_1 => {
                    let qs = if format == Format::Q4_1 {
                        out[so + 2 * TILE + 2 * lane..so + 2 * TILE + 2 * lane + 2]
                            .copy_from_slice(&blk[2..4]);
                        &blk[4..20]
                    } else {
                        &blk[2..18]
                    };
                    let mut q = [0u8; QK];
                    for j in 0..QK / 2 {
                        q[j] = qs[j] & 0x0F;
                        q[j + QK / 2] = qs[j] >> 4;
                    }
                    for g in 0..QK / 8 {
                        for j in 0..4 {
                            out[qo + g * 64 + lane * 4 + j] = q[8 * g + j] | (q[8 * g + 4 + j] << 4);
                        }
                    }
                }
                Format::Q8_0 => {
                    for g in 0..QK / 4 {
                        out[qo + g * 64 + lane * 4..qo + g * 64 + lane * 4 + 4]
                            .copy_from_slice(&blk[2 + 4 * g..2 + 4 * g + 4]);
                    }
                }
                Format::Q4K | Format::Q6K => unreachable!("K-quants are packed by kquants"),
            }
        }
    }

    /// Row `r` back in GGML layout, appended to `out`.
    pub(crate) fn push_ggml_row(&self, r: usize, out: &mut Vec<u8>) {
        if self.format.is_k() {
            super::kquants::push_ggml_row(self, r, out);
            return;
        }
        let (t, lane) = (r / TILE, r % TILE);
        let data = self.data.as_slice();
        for b in 0..self.nb {
            let so = self.scale_offset(t, b);
            let qo = self.quant_offset(t, b);
            out.extend_from_slice(&data[so + 2 * lane..so + 2 * lane + 2]);
            match self.format {
                Format::Q4_0 | Format::Q4_1 => {
                    if self.format == Format::Q4_1 {
                        out.extend_from_slice(
                            &data[so + 2 * TILE + 2 * lane..so + 2 * TILE + 2 * lane + 2],
                        );
                    }
                    let q = self.nibbles(qo, lane);
                    out.extend((0..QK / 2).map(|j| q[j] | (q[j + QK / 2] << 4)));
                }
                Format::Q8_0 => {
                    for g in 0..QK / 4 {
                        out.extend_from_slice(&data[qo + g * 64 + lane * 4..qo + g * 64 + lane * 4 + 4]);
                    }
                }
                Format::Q4K | Format::Q6K => unreachable!("K-quants are unpacked by kquants"),
            }
        }
    }

    /// The 32 unsigned 4-bit quants of one lane of a 4-bit tile-block, in `k` order.
    #[inline]
    pub(crate) fn nibbles(&self, qo: usize, lane: usize) -> [u8; QK] {
        let data = self.data.as_slice();
        let mut q = [0u8; QK];
        for g in 0..QK / 8 {
            for j in 0..4 {
                let byte = data[qo + g * 64 + lane * 4 + j];
                q[8 * g + j] = byte & 0x0F;
                q[8 * g + 4 + j] = byte >> 4;
            }
        }
        q
    }

    /// The 32 signed 8-bit quants of one lane of a Q8_0 tile-block, in `k` order.
    #[inline]
    pub(crate) fn bytes_i8(&self, qo: usize, lane: usize) -> [i8; QK] {
        let data = self.data.as_slice();
        let mut q = [0i8; QK];
        for g in 0..QK / 4 {
            for j in 0..4 {
                q[4 * g + j] = data[qo + g * 64 + lane * 4 + j] as i8;
            }
        }
        q
    }

    /// `d` (and `m`) of one lane of a tile-block, as f32.
    #[inline]
    pub(crate) fn lane_scales(&self, so: usize, lane: usize) -> (f32, f32) {
        let data = self.data.as_slice();
        let d = read_f16(data, so + 2 * lane).to_f32();
        let m = match self.format {
            Format::Q4_1 => read_f16(data, so + 2 * TILE + 2 * lane).to_f32(),
            _ => 0.0,
        };
        (d, m)
    }

    /// Dequantizes row `r` exactly as candle's `to_float` does.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.format.is_k() {
            super::kquants::dequantize_row(self, r, out);
            return;
        }
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..self.nb {
            let (d, m) = self.lane_scales(self.scale_offset(t, b), lane);
            let qo = self.quant_offset(t, b);
            let dst = &mut out[b * QK..(b + 1) * QK];
            match self.format {
                Format::Q4_0 => {
                    for (y, q) in dst.iter_mut().zip(self.nibbles(qo, lane)) {
                        *y = (q as i16 - 8) as f32 * d;
                    }
                }
                Format::Q4_1 => {
                    for (y, q) in dst.iter_mut().zip(self.nibbles(qo, lane)) {
                        *y = q as f32 * d + m;
                    }
                }
                Format::Q8_0 => {
                    for (y, q) in dst.iter_mut().zip(self.bytes_i8(qo, lane)) {
                        *y = q as f32 * d;
                    }
                }
                Format::Q4K | Format::Q6K => unreachable!("K-quants are dequantized by kquants"),
            }
        }
    }

    /// Bytes held by the packed matrix.
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.data.as_slice().len()
    }
}
