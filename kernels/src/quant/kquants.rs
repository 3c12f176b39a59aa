//! K-quants (Q4_K, Q6_K): packed layout, GGML conversion, dequantization and the portable
//! kernel (the reference for the SIMD ones).
//!
//! One tile-block = one 256-value super-block of 16 rows, 64-byte aligned, quants first:
//!
//! ```text
//! Q4_K (2368 B): qs [32 groups of 8][16 rows][4 B]  byte j = q[8g+j] | q[8g+4+j] << 4
//!                d [16] f16, dmin [16] f16
//!                sc [8 subs][16 rows] u8, mn [4 pairs][16 rows][2] u8   (6-bit, unpacked)
//! Q6_K (3392 B): ql [32 groups][16 rows][4 B]        low 4 bits, as Q4_K's qs
//!                qh [16 pairs of groups][16 rows][4 B] byte j = Σ_c (q[16h+4c+j] >> 4) << 2c
//!                sc [16 subs][16 rows] i8, d [16] f16, 32 B padding
//! ```
//!
//! Activations are Q8_K (candle's `BlockQ8K::from_float`). Per super-block and output the
//! integer parts are exact:
//! Q4_K `isum = Σ_s sc_s · Σ q·x`, `msum = Σ_s mn_s · Σx`; Q6_K `isum = Σ_s sc_s · Σ (q-32)·x`,
//! and the float update, in super-block order, is
//! `acc += isum as f32 * d * dx - msum as f32 * dmin * dx` (Q4_K) or
//! `acc += isum as f32 * d * dx` (Q6_K) — in every kernel.

use super::acts::QActs;
use super::exec::OutPtr;
use super::layout::{Format, Packed, QK_K, TILE};
use half::f16;
use std::ops::Range;

pub(crate) const Q4K_TILE_BLOCK: usize = 2368;
pub(crate) const Q4K_D: usize = 2048;
pub(crate) const Q4K_DMIN: usize = 2080;
pub(crate) const Q4K_SC: usize = 2112;
pub(crate) const Q4K_MN: usize = 2240;

pub(crate) const Q6K_TILE_BLOCK: usize = 3392;
pub(crate) const Q6K_QH: usize = 2048;
pub(crate) const Q6K_SC: usize = 3072;
pub(crate) const Q6K_D: usize = 3328;

/// ggml's 6-bit scale/min unpacking of a Q4_K super-block.
fn get_scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The inverse of [`get_scale_min_k4`] over all 8 sub-blocks.
fn put_scale_min_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    s
}

/// One row's Q4_K super-block, unpacked.
struct Q4KLane {
    d: [u8; 2],
    dmin: [u8; 2],
    sc: [u8; 8],
    mn: [u8; 8],
    q: [u8; QK_K],
}

/// One row's Q6_K super-block, unpacked (`q` in 0..64, the stored value before `- 32`).
struct Q6KLane {
    d: [u8; 2],
    sc: [i8; 16],
    q: [u8; QK_K],
}

fn decode_q4k(blk: &[u8]) -> Q4KLane {
    let mut l = Q4KLane { d: [blk[0], blk[1]], dmin: [blk[2], blk[3]], sc: [0; 8], mn: [0; 8], q: [0; QK_K] };
    for j in 0..8 {
        (l.sc[j], l.mn[j]) = get_scale_min_k4(j, &blk[4..16]);
    }
    let qs = &blk[16..144];
    for c in 0..4 {
        for i in 0..32 {
            l.q[64 * c + i] = qs[32 * c + i] & 0x0F;
            l.q[64 * c + 32 + i] = qs[32 * c + i] >> 4;
        }
    }
    l
}

fn encode_q4k(l: &Q4KLane, out: &mut Vec<u8>) {
    out.extend_from_slice(&l.d);
    out.extend_from_slice(&l.dmin);
    out.extend_from_slice(&put_scale_min_k4(&l.sc, &l.mn));
    for c in 0..4 {
        out.extend((0..32).map(|i| l.q[64 * c + i] | (l.q[64 * c + 32 + i] << 4)));
    }
}

fn decode_q6k(blk: &[u8]) -> Q6KLane {
    let (ql, qh) = (&blk[0..128], &blk[128..192]);
    let mut l = Q6KLane { d: [blk[208], blk[209]], sc: [0; 16], q: [0; QK_K] };
    for (s, &b) in l.sc.iter_mut().zip(&blk[192..208]) {
        *s = b as i8;
    }
    for h in 0..2 {
        let (ql, qh, q) = (&ql[64 * h..], &qh[32 * h..], &mut l.q[128 * h..]);
        for i in 0..32 {
            q[i] = (ql[i] & 0x0F) | ((qh[i] & 3) << 4);
            q[i + 32] = (ql[i + 32] & 0x0F) | (((qh[i] >> 2) & 3) << 4);
            q[i + 64] = (ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4);
            q[i + 96] = (ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4);
        }
    }
    l
}

fn encode_q6k(l: &Q6KLane, out: &mut Vec<u8>) {
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        let q = &l.q[128 * h..];
        for i in 0..32 {
            ql[64 * h + i] = (q[i] & 0x0F) | ((q[i + 64] & 0x0F) << 4);
            ql[64 * h + i + 32] = (q[i + 32] & 0x0F) | ((q[i + 96] & 0x0F) << 4);
            qh[32 * h + i] =
                (q[i] >> 4) | ((q[i + 32] >> 4) << 2) | ((q[i + 64] >> 4) << 4) | ((q[i + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(l.sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&l.d);
}

/// Writes the low nibbles of `q` in the 4-bit group layout of one lane.
fn put_nibbles(out: &mut [u8], lane: usize, q: &[u8; QK_K]) {
    for g in 0..QK_K / 8 {
        for j in 0..4 {
            out[g * 64 + lane * 4 + j] = (q[8 * g + j] & 0x0F) | ((q[8 * g + 4 + j] & 0x0F) << 4);
        }
    }
}

fn get_nibbles(data: &[u8], lane: usize) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for g in 0..QK_K / 8 {
        for j in 0..4 {
            let b = data[g * 64 + lane * 4 + j];
            q[8 * g + j] = b & 0x0F;
            q[8 * g + 4 + j] = b >> 4;
        }
    }
    q
}

fn read_q4k(p: &Packed, t: usize, b: usize, lane: usize) -> Q4KLane {
    let base = p.quant_offset(t, b);
    let data = &p.data.as_slice()[base..base + Q4K_TILE_BLOCK];
    let mut l = Q4KLane {
        d: [data[Q4K_D + 2 * lane], data[Q4K_D + 2 * lane + 1]],
        dmin: [data[Q4K_DMIN + 2 * lane], data[Q4K_DMIN + 2 * lane + 1]],
        sc: [0; 8],
        mn: [0; 8],
        q: get_nibbles(data, lane),
    };
    for s in 0..8 {
        l.sc[s] = data[Q4K_SC + s * TILE + lane];
        l.mn[s] = data[Q4K_MN + (s / 2) * 2 * TILE + lane * 2 + s % 2];
    }
    l
}

fn read_q6k(p: &Packed, t: usize, b: usize, lane: usize) -> Q6KLane {
    let base = p.quant_offset(t, b);
    let data = &p.data.as_slice()[base..base + Q6K_TILE_BLOCK];
    let mut l = Q6KLane { d: [data[Q6K_D + 2 * lane], data[Q6K_D + 2 * lane + 1]], sc: [0; 16], q: get_nibbles(data, lane) };
    for s in 0..16 {
        l.sc[s] = data[Q6K_SC + s * TILE + lane] as i8;
    }
    for h in 0..16 {
        for j in 0..4 {
            let byte = data[Q6K_QH + h * 64 + lane * 4 + j];
            for c in 0..4 {
                l.q[16 * h + 4 * c + j] |= ((byte >> (2 * c)) & 3) << 4;
            }
        }
    }
    l
}

/// Packs GGML row `r` (`nb` super-blocks) into its tile lane.
pub(crate) fn set_row(p: &mut Packed, r: usize, row: &[u8]) {
    let (t, lane) = (r / TILE, r % TILE);
    let bb = p.format.ggml_block_bytes();
    for b in 0..p.nb {
        let blk = &row[b * bb..(b + 1) * bb];
        let base = p.quant_offset(t, b);
        let out = &mut p.data.as_mut_slice()[base..base + p.format.quant_bytes()];
        match p.format {
            Format::Q4K => {
                let l = decode_q4k(blk);
                put_nibbles(out, lane, &l.q);
                out[Q4K_D + 2 * lane..Q4K_D + 2 * lane + 2].copy_from_slice(&l.d);
                out[Q4K_DMIN + 2 * lane..Q4K_DMIN + 2 * lane + 2].copy_from_slice(&l.dmin);
                for s in 0..8 {
                    out[Q4K_SC + s * TILE + lane] = l.sc[s];
                    out[Q4K_MN + (s / 2) * 2 * TILE + lane * 2 + s % 2] = l.mn[s];
                }
            }
            _ => {
                let l = decode_q6k(blk);
                put_nibbles(out, lane, &l.q);
                for h in 0..16 {
                    for j in 0..4 {
                        out[Q6K_QH + h * 64 + lane * 4 + j] =
                            (0..4).map(|c| (l.q[16 * h + 4 * c + j] >> 4) << (2 * c)).sum();
                    }
                }
                for s in 0..16 {
                    out[Q6K_SC + s * TILE + lane] = l.sc[s] as u8;
                }
                out[Q6K_D + 2 * lane..Q6K_D + 2 * lane + 2].copy_from_slice(&l.d);
            }
        }
    }
}

/// Row `r` back in GGML layout, appended to `out`.
pub(crate) fn push_ggml_row(p: &Packed, r: usize, out: &mut Vec<u8>) {
    let (t, lane) = (r / TILE, r % TILE);
    for b in 0..p.nb {
        match p.format {
            Format::Q4K => encode_q4k(&read_q4k(p, t, b, lane), out),
            _ => encode_q6k(&read_q6k(p, t, b, lane), out),
        }
    }
}

fn f16_of(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// Dequantizes row `r` exactly as candle's `to_float` does.
pub(crate) fn dequantize_row(p: &Packed, r: usize, out: &mut [f32]) {
    let (t, lane) = (r / TILE, r % TILE);
    for b in 0..p.nb {
        let y = &mut out[b * QK_K..(b + 1) * QK_K];
        match p.format {
            Format::Q4K => {
                let l = read_q4k(p, t, b, lane);
                let (d, dmin) = (f16_of(l.d), f16_of(l.dmin));
                for (v, y) in y.iter_mut().enumerate() {
                    let s = v / 32;
                    *y = d * l.sc[s] as f32 * l.q[v] as f32 - dmin * l.mn[s] as f32;
                }
            }
            _ => {
                let l = read_q6k(p, t, b, lane);
                let d = f16_of(l.d);
                for (v, y) in y.iter_mut().enumerate() {
                    *y = d * l.sc[v / 16] as f32 * (l.q[v] as i8 - 32) as f32;
                }
            }
        }
    }
}

/// Portable kernel: `y[r, t*16..]` for `r` in `rows`, `t` in `tiles`.
pub(crate) fn run(p: &Packed, a: &QActs, rows: Range<usize>, tiles: Range<usize>, y: &OutPtr) {
    let nb = p.nb;
    for t in tiles {
        let cols = TILE.min(p.n - t * TILE);
        // Unpack the tile once per tile, not once per activation row.
        let lanes: Vec<Vec<(f32, f32, [i32; 16], [u8; QK_K])>> = (0..cols)
            .map(|lane| {
                (0..nb)
                    .map(|b| match p.format {
                        Format::Q4K => {
                            let l = read_q4k(p, t, b, lane);
                            let mut sm = [0i32; 16];
                            for s in 0..8 {
                                sm[s] = l.sc[s] as i32;
                                sm[8 + s] = l.mn[s] as i32;
                            }
                            (f16_of(l.d), f16_of(l.dmin), sm, l.q)
                        }
                        _ => {
                            let l = read_q6k(p, t, b, lane);
                            (f16_of(l.d), 0.0, l.sc.map(|s| s as i32), l.q)
                        }
                    })
                    .collect()
            })
            .collect();
        for r in rows.clone() {
            let mut acc = [0f32; TILE];
            for b in 0..nb {
                let x = &a.qs[(r * nb + b) * QK_K..(r * nb + b + 1) * QK_K];
                let bs = &a.sub[(r * nb + b) * 16..(r * nb + b + 1) * 16];
                let dx = a.d[r * nb + b];
                for (lane, acc) in acc.iter_mut().enumerate().take(cols) {
                    let (d, dmin, sm, q) = &lanes[lane][b];
                    *acc += if p.format == Format::Q4K {
                        let mut isum = 0i32;
                        let mut msum = 0i32;
                        for s in 0..8 {
                            let dot: i32 =
                                (32 * s..32 * s + 32).map(|v| q[v] as i32 * x[v] as i32).sum();
                            isum += sm[s] * dot;
                            msum += sm[8 + s] * (bs[2 * s] + bs[2 * s + 1]);
                        }
                        isum as f32 * d * dx - msum as f32 * dmin * dx
                    } else {
                        let mut isum = 0i32;
                        for s in 0..16 {
                            let dot: i32 = (16 * s..16 * s + 16)
                                .map(|v| (q[v] as i32 - 32) * x[v] as i32)
                                .sum();
                            isum += sm[s] * dot;
                        }
                        isum as f32 * d * dx
                    };
                }
            }
            // SAFETY: `r < m`, the tile's `cols` columns lie inside `n`; each (row, tile)
            // pair belongs to one worker.
            unsafe { y.write(r, t * TILE, &acc[..cols]) };
        }
    }
}
