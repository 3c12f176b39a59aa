//! Portable kernels on the packed layout: the fallback on every target and the reference
//! the SIMD paths must match bit for bit.
//!
//! Per output element the float work is, block by block in `k` order, exactly candle's
//! `vec_dot_unopt`: `acc += isum as f32 * dw * dx` (Q4_0, Q8_0) or
//! `acc += isum as f32 * dw * dx + mw * sx` (Q4_1), where `isum` is the block's exact
//! integer dot product. The SIMD kernels do the same operations lane-wise, so every path
//! (and every batch size or tiling) gives the same bits.

use super::acts::QActs;
use super::exec::OutPtr;
use super::layout::{Format, Packed, QK, TILE};
use std::ops::Range;

/// Computes `y[r, t*16..]` for `r` in `rows` and `t` in `tiles`.
pub(crate) fn run(p: &Packed, a: &QActs, rows: Range<usize>, tiles: Range<usize>, y: &OutPtr) {
    if p.format.is_k() {
        return super::kquants::run(p, a, rows, tiles, y);
    }
    let nb = p.nb;
    for t in tiles {
        let cols = TILE.min(p.n - t * TILE);
        for r in rows.clone() {
            let mut acc = [0f32; TILE];
            for b in 0..nb {
                let so = p.scale_offset(t, b);
                let qo = p.quant_offset(t, b);
                let xq = &a.qs[(r * nb + b) * QK..(r * nb + b + 1) * QK];
                let dx = a.d[r * nb + b];
                let sx = a.s[r * nb + b];
                for (lane, acc) in acc.iter_mut().enumerate().take(cols) {
                    let (dw, mw) = p.lane_scales(so, lane);
                    *acc += match p.format {
                        Format::Q4_0 => {
                            let isum: i32 = p
                                .nibbles(qo, lane)
                                .iter()
                                .zip(xq)
                                .map(|(&q, &x)| (q as i32 - 8) * x as i32)
                                .sum();
                            isum as f32 * dw * dx
                        }
                        Format::Q4_1 => {
                            let isum: i32 = p
                                .nibbles(qo, lane)
                                .iter()
                                .zip(xq)
                                .map(|(&q, &x)| q as i32 * x as i32)
                                .sum();
                            isum as f32 * dw * dx + mw * sx
                        }
                        Format::Q8_0 => {
                            let isum: i32 = p
                                .bytes_i8(qo, lane)
                                .iter()
                                .zip(xq)
                                .map(|(&q, &x)| q as i32 * x as i32)
                                .sum();
                            isum as f32 * dw * dx
                        }
                        Format::Q4K | Format::Q6K => unreachable!("K-quants return above"),
                    };
                }
            }
            // SAFETY: `r < m` and the tile's `cols` columns lie inside `n`; the caller hands
            // each (row, tile) pair to exactly one worker.
            unsafe { y.write(r, t * TILE, &acc[..cols]) };
        }
    }
}
