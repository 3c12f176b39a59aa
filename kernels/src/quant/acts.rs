//! Activation quantization to Q8_0 / Q8_1, bit-identical to candle's (and ggml's)
//! `quantize_row_q8_0` / `quantize_row_q8_1` reference code: `d = amax / 127` rounded to
//! f16, `q = round(x / d)` (half away from zero, using the f32 `1 / d`), and for Q8_1
//! `s = f16(Σq) · d` rounded to f16; and Q8_K as candle's `BlockQ8K::from_float`.
//!
//! The result is kept split into planes (quants, scales, sums) so the kernels can broadcast
//! 4 quant bytes at a time and fold the block sums into the integer accumulator.

use super::layout::{QK, QK_K};
use half::f16;

/// Which ggml activation format a weight format pairs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    /// Q8_0: for Q4_0 and Q8_0 weights.
    Q8_0,
    /// Q8_1 (with `s = d·Σq`): for Q4_1 weights.
    Q8_1,
    /// Q8_K (256-value blocks, f32 `d`, sums per 16): for the K-quants.
    Q8K,
}

impl ActKind {
    /// Values per block.
    pub(crate) fn block_len(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_1 => QK,
            Self::Q8K => QK_K,
        }
    }

    /// Entries of the `sub` plane per block (Q8_K's `bsums`).
    pub(crate) fn subs(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_1 => 0,
            Self::Q8K => QK_K / 16,
        }
    }
}

/// `m` rows of quantized activations, `nb` blocks per row.
#[derive(Default)]
pub(crate) struct QActs {
    pub(crate) m: usize,
    pub(crate) nb: usize,
    /// Values per block.
    pub(crate) block: usize,
    /// `sub` entries per block.
    pub(crate) subs: usize,
    /// `[m][nb * block]` quants.
    pub(crate) qs: Vec<i8>,
    /// `[m][nb]` block scales `d` (widened from f16, or Q8_K's f32).
    pub(crate) d: Vec<f32>,
    /// `[m][nb]` Q8_1's `s` (the f16 value, widened); zero otherwise.
    pub(crate) s: Vec<f32>,
    /// `[m][nb]` exact `Σq` per block (folds the Q4_0 `-8` and the VNNI `+128` offsets).
    pub(crate) sum: Vec<i32>,
    /// `[m][nb * subs]` Q8_K's sums of 16 quants (`bsums`).
    pub(crate) sub: Vec<i32>,
}

impl QActs {
    /// Sizes the planes for `m` rows of `nb` blocks of `kind` (contents are overwritten
    /// by the quantizers).
    pub(crate) fn reset(&mut self, m: usize, nb: usize, kind: ActKind) {
        self.m = m;
        self.nb = nb;
        self.block = kind.block_len();
        self.subs = kind.subs();
        self.qs.resize(m * nb * self.block, 0);
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        self.sum.resize(m * nb, 0);
        self.sub.resize(m * nb * self.subs, 0);
    }

    /// The planes of rows `rows`, for filling in parallel.
    pub(crate) fn rows_mut(&mut self, rows: std::ops::Range<usize>) -> ActRowsMut<'_> {
        let (nb, qk, subs) = (self.nb, self.block, self.subs);
        ActRowsMut {
            qs: &mut self.qs[rows.start * nb * qk..rows.end * nb * qk],
            d: &mut self.d[rows.start * nb..rows.end * nb],
            s: &mut self.s[rows.start * nb..rows.end * nb],
            sum: &mut self.sum[rows.start * nb..rows.end * nb],
            sub: &mut self.sub[rows.start * nb * subs..rows.end * nb * subs],
            block: qk,
            subs,
        }
    }
}

/// Mutable planes of a contiguous range of rows.
pub(crate) struct ActRowsMut<'a> {
    pub(crate) qs: &'a mut [i8],
    pub(crate) d: &'a mut [f32],
    pub(crate) s: &'a mut [f32],
    pub(crate) sum: &'a mut [i32],
    pub(crate) sub: &'a mut [i32],
    block: usize,
    subs: usize,
}

impl<'a> ActRowsMut<'a> {
    /// Splits off the first `rows` rows (of `nb` blocks each).
    pub(crate) fn split_at(self, rows: usize, nb: usize) -> (Self, Self) {
        let (block, subs) = (self.block, self.subs);
        let (qs0, qs1) = self.qs.split_at_mut(rows * nb * block);
        let (d0, d1) = self.d.split_at_mut(rows * nb);
        let (s0, s1) = self.s.split_at_mut(rows * nb);
        let (sum0, sum1) = self.sum.split_at_mut(rows * nb);
        let (sub0, sub1) = self.sub.split_at_mut(rows * nb * subs);
        (
            Self { qs: qs0, d: d0, s: s0, sum: sum0, sub: sub0, block, subs },
            Self { qs: qs1, d: d1, s: s1, sum: sum1, sub: sub1, block, subs },
        )
    }
}

/// One quantized block.
pub(crate) struct QBlock {
    pub(crate) qs: [i8; QK],
    pub(crate) d: f16,
    pub(crate) sum: i32,
}

/// `Q8_1`'s `s`, computed as candle does: `f16::from_f32(Σq) * d` (an f16 product).
#[inline]
pub(crate) fn q8_1_s(sum: i32, d: f16) -> f32 {
    (f16::from_f32(sum as f32) * d).to_f32()
}

/// Portable reference quantizer of one block (candle's `BlockQ8_0::from_float`; Q8_1 only
/// adds `s`, computed from the same quants).
pub(crate) fn quantize_block_scalar(xs: &[f32]) -> QBlock {
    let mut amax = 0f32;
    for &x in xs {
        amax = amax.max(x.abs());
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &x) in qs.iter_mut().zip(xs) {
        *q = (x * id).round() as i8;
        sum += *q as i32;
    }
    QBlock { qs, d: f16::from_f32(d), sum }
}

/// Quantizes rows (row-major, whole blocks) into `out` with the portable quantizer.
pub(crate) fn quantize_rows_scalar(x: &[f32], kind: ActKind, mut out: ActRowsMut<'_>) {
    if kind == ActKind::Q8K {
        for (bi, xs) in x.chunks_exact(QK_K).enumerate() {
            quantize_q8k_scalar(xs, bi, &mut out);
        }
        return;
    }
    for (bi, xs) in x.chunks_exact(QK).enumerate() {
        store_block(&quantize_block_scalar(xs), bi, kind, &mut out);
    }
}

/// candle's `BlockQ8K::from_float`: `iscale = -127 / max` (the first value of largest
/// magnitude, with its sign), `q = clamp(round(iscale · x), -128, 127)`, `d = 1 / iscale`.
pub(crate) fn quantize_q8k_scalar(xs: &[f32], bi: usize, out: &mut ActRowsMut<'_>) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &x in xs {
        if amax < x.abs() {
            amax = x.abs();
            max = x;
        }
    }
    let qs = &mut out.qs[bi * QK_K..(bi + 1) * QK_K];
    let sub = &mut out.sub[bi * 16..(bi + 1) * 16];
    if amax == 0.0 {
        qs.fill(0);
        sub.fill(0);
        out.d[bi] = 0.0;
    } else {
        let iscale = -127f32 / max;
        for (q, &x) in qs.iter_mut().zip(xs) {
            *q = (iscale * x).round().clamp(-128.0, 127.0) as i8;
        }
        for (s, q16) in sub.iter_mut().zip(qs.chunks_exact(16)) {
            *s = q16.iter().map(|&q| q as i32).sum();
        }
        out.d[bi] = 1.0 / iscale;
    }
    out.s[bi] = 0.0;
    out.sum[bi] = sub.iter().sum();
}

#[inline]
pub(crate) fn store_block(blk: &QBlock, bi: usize, kind: ActKind, out: &mut ActRowsMut<'_>) {
    out.qs[bi * QK..(bi + 1) * QK].copy_from_slice(&blk.qs);
    out.d[bi] = blk.d.to_f32();
    out.s[bi] = match kind {
        ActKind::Q8_1 => q8_1_s(blk.sum, blk.d),
        ActKind::Q8_0 | ActKind::Q8K => 0.0,
    };
    out.sum[bi] = blk.sum;
}
