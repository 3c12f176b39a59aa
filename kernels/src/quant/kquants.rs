//! K-quants (Q4_K, Q5_K, Q6_K): packed layout, GGML conversion, dequantization and the
//! portable kernel (the reference for the SIMD ones).
//!
//! One tile-block = one 256-value super-block of 16 rows, 64-byte aligned: a 320-byte
//! header of scales, then the quants sub-block by sub-block, so that a kernel reads each
//! tile-block front to back as one sequential stream (an earlier layout with the scales
//! at the end and the Q6_K/Q5_K high bits in a separate plane was ~2× slower at m = 1 for
//! Q6_K, 127 → 63 µs on 1536 × 1536, and 1.3-2× for Q5_K):
//!
//! ```text
//! Q4_K (2368 B): d [16] f16, dmin [16] f16, sc [8 subs][16 rows] u8,
//!                mn [4 pairs][16 rows][2] u8 (6-bit, unpacked), then per 32-value sub-block
//!                4 nibble groups [16 rows][4 B], byte j = q[8g+j] | q[8g+4+j] << 4
//! Q5_K (2880 B): as Q4_K, each sub-block led by its fifth-bit plane (`layout::put_hbits`)
//! Q6_K (3392 B): sc [16 subs][16 rows] i8, d [16] f16, 32 B padding, then per 16-value
//!                sub-block h a 2-bit plane [16 rows][4 B], byte j = Σ_c (q[16h+4c+j] >> 4) << 2c,
//!                and 2 nibble groups of the low 4 bits
//! ```
//!
//! Activations are Q8_K (candle's `BlockQ8K::from_float`). Per super-block and output the
//! integer parts are exact:
//! Q4_K/Q5_K `isum = Σ_s sc_s · Σ q·x`, `msum = Σ_s mn_s · Σx`; Q6_K
//! `isum = Σ_s sc_s · Σ (q-32)·x`; and the float update, in super-block order, is
//! `acc += isum as f32 * d * dx - msum as f32 * dmin * dx` (Q4_K, Q5_K) or
//! `acc += isum as f32 * d * dx` (Q6_K) — in every kernel.

use super::acts::QActs;
use super::exec::OutPtr;
use super::layout::{Format, Packed, QK_K, TILE, get_nibbles, or_hbits, put_hbits, put_nibbles};
use half::f16;
use std::ops::Range;

// Q4_K / Q5_K tile-block: a 320-byte header, then 8 sub-blocks of 32 values, each
// [fifth-bit plane, 64 B (Q5_K only)][4 nibble groups × 64 B].
pub(crate) const K45_D: usize = 0;
pub(crate) const K45_DMIN: usize = 32;
pub(crate) const K45_SC: usize = 64;
pub(crate) const K45_MN: usize = 192;
pub(crate) const K45_HEAD: usize = 320;
pub(crate) const Q4K_SUB: usize = 256;
pub(crate) const Q5K_SUB: usize = 320;
pub(crate) const Q4K_TILE_BLOCK: usize = K45_HEAD + 8 * Q4K_SUB;
pub(crate) const Q5K_TILE_BLOCK: usize = K45_HEAD + 8 * Q5K_SUB;

// Q6_K tile-block: a 320-byte header, then 16 sub-blocks of 16 values, each
// [2-bit high plane, 64 B][2 nibble groups × 64 B].
pub(crate) const Q6K_SC: usize = 0;
pub(crate) const Q6K_D: usize = 256;
pub(crate) const Q6K_HEAD: usize = 320;
pub(crate) const Q6K_SUB: usize = 192;
pub(crate) const Q6K_TILE_BLOCK: usize = Q6K_HEAD + 16 * Q6K_SUB;

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

/// One row's Q4_K / Q5_K super-block, unpacked (`q` in 0..16 or 0..32).
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

/// Decodes a GGML Q4_K (144 B) or, with `five`, Q5_K (176 B: `qh` before `qs`) block.
fn decode_q4k(blk: &[u8], five: bool) -> Q4KLane {
    let mut l = Q4KLane { d: [blk[0], blk[1]], dmin: [blk[2], blk[3]], sc: [0; 8], mn: [0; 8], q: [0; QK_K] };
    for j in 0..8 {
        (l.sc[j], l.mn[j]) = get_scale_min_k4(j, &blk[4..16]);
    }
    let (qh, qs) = if five { (&blk[16..48], &blk[48..176]) } else { (&blk[16..16], &blk[16..144]) };
    for c in 0..4 {
        for i in 0..32 {
            l.q[64 * c + i] = qs[32 * c + i] & 0x0F;
            l.q[64 * c + 32 + i] = qs[32 * c + i] >> 4;
            if five {
                l.q[64 * c + i] |= ((qh[i] >> (2 * c)) & 1) << 4;
                l.q[64 * c + 32 + i] |= ((qh[i] >> (2 * c + 1)) & 1) << 4;
            }
        }
    }
    l
}

fn encode_q4k(l: &Q4KLane, five: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&l.d);
    out.extend_from_slice(&l.dmin);
    out.extend_from_slice(&put_scale_min_k4(&l.sc, &l.mn));
    if five {
        out.extend((0..32).map(|i| {
            (0..4).fold(0u8, |h, c| {
                h | (((l.q[64 * c + i] >> 4) & 1) << (2 * c)) | (((l.q[64 * c + 32 + i] >> 4) & 1) << (2 * c + 1))
            })
        }));
    }
    for c in 0..4 {
        out.extend((0..32).map(|i| (l.q[64 * c + i] & 0x0F) | ((l.q[64 * c + 32 + i] & 0x0F) << 4)));
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
            qh[32 * h + i] = (q[i] >> 4) | ((q[i + 32] >> 4) << 2) | ((q[i + 64] >> 4) << 4) | ((q[i + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(l.sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&l.d);
}

fn read_q4k(p: &Packed, t: usize, b: usize, lane: usize) -> Q4KLane {
    let base = p.quant_offset(t, b);
    let data = &p.data.as_slice()[base..base + p.format.quant_bytes()];
    let five = p.format == Format::Q5K;
    let (sub, nib) = if five { (Q5K_SUB, 64) } else { (Q4K_SUB, 0) };
    let at = |o: usize| [data[o + 2 * lane], data[o + 2 * lane + 1]];
    let mut l = Q4KLane { d: at(K45_D), dmin: at(K45_DMIN), sc: [0; 8], mn: [0; 8], q: [0; QK_K] };
    for (s, q) in l.q.chunks_exact_mut(32).enumerate() {
        let so = K45_HEAD + s * sub;
        get_nibbles(&data[so + nib..so + sub], lane, q);
        if five {
            or_hbits(&data[so..so + 64], lane, q);
        }
        l.sc[s] = data[K45_SC + s * TILE + lane];
        l.mn[s] = data[K45_MN + (s / 2) * 2 * TILE + lane * 2 + s % 2];
    }
    l
}

fn read_q6k(p: &Packed, t: usize, b: usize, lane: usize) -> Q6KLane {
    let base = p.quant_offset(t, b);
    let data = &p.data.as_slice()[base..base + Q6K_TILE_BLOCK];
    let mut l = Q6KLane { d: [data[Q6K_D + 2 * lane], data[Q6K_D + 2 * lane + 1]], sc: [0; 16], q: [0; QK_K] };
    for (h, q) in l.q.chunks_exact_mut(16).enumerate() {
        let so = Q6K_HEAD + h * Q6K_SUB;
        get_nibbles(&data[so + 64..so + Q6K_SUB], lane, q);
        for j in 0..4 {
            let byte = data[so + lane * 4 + j];
            for c in 0..4 {
                q[4 * c + j] |= ((byte >> (2 * c)) & 3) << 4;
            }
        }
        l.sc[h] = data[Q6K_SC + h * TILE + lane] as i8;
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
            Format::Q4K | Format::Q5K => {
                let five = p.format == Format::Q5K;
                let (sub, nib) = if five { (Q5K_SUB, 64) } else { (Q4K_SUB, 0) };
                let l = decode_q4k(blk, five);
                for (s, q) in l.q.chunks_exact(32).enumerate() {
                    let so = K45_HEAD + s * sub;
                    put_nibbles(&mut out[so + nib..so + sub], lane, q);
                    if five {
                        put_hbits(&mut out[so..so + 64], lane, q);
                    }
                    out[K45_SC + s * TILE + lane] = l.sc[s];
                    out[K45_MN + (s / 2) * 2 * TILE + lane * 2 + s % 2] = l.mn[s];
                }
                out[K45_D + 2 * lane..K45_D + 2 * lane + 2].copy_from_slice(&l.d);
                out[K45_DMIN + 2 * lane..K45_DMIN + 2 * lane + 2].copy_from_slice(&l.dmin);
            }
            _ => {
                let l = decode_q6k(blk);
                for (h, q) in l.q.chunks_exact(16).enumerate() {
                    let so = Q6K_HEAD + h * Q6K_SUB;
                    put_nibbles(&mut out[so + 64..so + Q6K_SUB], lane, q);
                    for j in 0..4 {
                        out[so + lane * 4 + j] = (0..4).map(|c| (q[4 * c + j] >> 4) << (2 * c)).sum();
                    }
                    out[Q6K_SC + h * TILE + lane] = l.sc[h] as u8;
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
            Format::Q4K | Format::Q5K => encode_q4k(&read_q4k(p, t, b, lane), p.format == Format::Q5K, out),
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
            Format::Q4K | Format::Q5K => {
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

/// One row's super-block, unpacked for the portable kernel.
struct LaneBlock {
    d: f32,
    dmin: f32,
    /// Sub-block scales (8 for Q4_K, 16 for Q6_K).
    sc: Vec<i32>,
    /// Q4_K's sub-block mins.
    mn: Vec<i32>,
    q: [u8; QK_K],
}

fn lane_block(p: &Packed, t: usize, b: usize, lane: usize) -> LaneBlock {
    match p.format {
        Format::Q4K | Format::Q5K => {
            let l = read_q4k(p, t, b, lane);
            LaneBlock {
                d: f16_of(l.d),
                dmin: f16_of(l.dmin),
                sc: l.sc.iter().map(|&s| s as i32).collect(),
                mn: l.mn.iter().map(|&m| m as i32).collect(),
                q: l.q,
            }
        }
        _ => {
            let l = read_q6k(p, t, b, lane);
            LaneBlock {
                d: f16_of(l.d),
                dmin: 0.0,
                sc: l.sc.iter().map(|&s| s as i32).collect(),
                mn: Vec::new(),
                q: l.q,
            }
        }
    }
}

/// Portable kernel: `y[r, t*16..]` for `r` in `rows`, `t` in `tiles`.
pub(crate) fn run(p: &Packed, a: &QActs, rows: Range<usize>, tiles: Range<usize>, y: &OutPtr) {
    let nb = p.nb;
    for t in tiles {
        let cols = TILE.min(p.n - t * TILE);
        // Unpack the tile once, not once per activation row: `blocks[b][lane]`.
        let blocks: Vec<Vec<LaneBlock>> =
            (0..nb).map(|b| (0..cols).map(|lane| lane_block(p, t, b, lane)).collect()).collect();
        for r in rows.clone() {
            let mut acc = [0f32; TILE];
            for (b, lanes) in blocks.iter().enumerate() {
                let x = &a.qs[(r * nb + b) * QK_K..(r * nb + b + 1) * QK_K];
                let bs = &a.sub[(r * nb + b) * 16..(r * nb + b + 1) * 16];
                let dx = a.d[r * nb + b];
                for (acc, l) in acc.iter_mut().zip(lanes) {
                    let width = QK_K / l.sc.len();
                    let offset = if p.format == Format::Q6K { 32 } else { 0 };
                    let isum: i32 =
                        l.sc.iter()
                            .zip(l.q.chunks_exact(width).zip(x.chunks_exact(width)))
                            .map(|(&sc, (q, x))| {
                                sc * q.iter().zip(x).map(|(&q, &x)| (q as i32 - offset) * x as i32).sum::<i32>()
                            })
                            .sum();
                    *acc += if p.format != Format::Q6K {
                        let msum: i32 = l.mn.iter().zip(bs.chunks_exact(2)).map(|(&m, s)| m * (s[0] + s[1])).sum();
                        isum as f32 * l.d * dx - msum as f32 * l.dmin * dx
                    } else {
                        isum as f32 * l.d * dx
                    };
                }
            }
            // SAFETY: `r < m`, the tile's `cols` columns lie inside `n`; each (row, tile)
            // pair belongs to one worker.
            unsafe { y.write(r, t * TILE, &acc[..cols]) };
        }
    }
}
