//! Portable kernels on the packed layout: the fallback on every target and the reference
//! the SIMD paths must match bit for bit.
//!
//! Per output element the float work is, block by block in `k` order, exactly candle's
//! `vec_dot_unopt`: `acc += isum as f32 * dw * dx` (Q4_0, Q5_0, Q8_0) or
//! `acc += isum as f32 * dw * dx + mw * sx` (Q4_1, Q5_1), where `isum` is the block's exact
//! integer dot product. The SIMD kernels do the same operations lane-wise, so every path
//! (and every batch size or tiling) gives the same bits.

use super::acts::QActs;
use super::exec::OutPtr;
use super::layout::{Format, Packed, QK, TILE, f16_bits};
use std::ops::Range;

/// Computes `y[r, t*16..]` for `r` in `rows` and `t` in `tiles`.
pub(crate) fn run(p: &Packed, a: &QActs, rows: Range<usize>, tiles: Range<usize>, y: &OutPtr) {
    if p.format.is_k() {
        return super::kquants::run(p, a, rows, tiles, y);
    }
    let (f, nb) = (p.format, p.nb);
    for t in tiles {
        let cols = TILE.min(p.n - t * TILE);
        // Unpack the tile once, not once per activation row: `blocks[b][lane]`.
        let blocks: Vec<Vec<(f32, f32, [i32; QK])>> = (0..nb)
            .map(|b| {
                (0..cols)
                    .map(|lane| {
                        let blk = p.small_block(t, b, lane);
                        let q = blk.q.map(|q| match f {
                            Format::Q8_0 => q as i8 as i32,
                            _ => q as i32 - f.zero_point(),
                        });
                        (f16_bits(blk.d), f16_bits(blk.m), q)
                    })
                    .collect()
            })
            .collect();
        for r in rows.clone() {
            let mut acc = [0f32; TILE];
            for (b, lanes) in blocks.iter().enumerate() {
                let xq = &a.qs[(r * nb + b) * QK..(r * nb + b + 1) * QK];
                let (dx, sx) = (a.d[r * nb + b], a.s[r * nb + b]);
                for (acc, (dw, mw, q)) in acc.iter_mut().zip(lanes) {
                    let isum: i32 = q.iter().zip(xq).map(|(&q, &x)| q * x as i32).sum();
                    *acc += if f.has_min() { isum as f32 * dw * dx + mw * sx } else { isum as f32 * dw * dx };
                }
            }
            // SAFETY: `r < m` and the tile's `cols` columns lie inside `n`; the caller hands
            // each (row, tile) pair to exactly one worker.
            unsafe { y.write(r, t * TILE, &acc[..cols]) };
        }
    }
}
