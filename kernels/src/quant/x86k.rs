//! x86-64 K-quant kernels (Q4_K, Q5_K, Q6_K) on the `kquants` layout: AVX-512 VNNI and AVX2.
//!
//! Per 32-value (Q4_K, Q5_K) or 16-value (Q6_K) sub-block, the 16 rows' exact dot products are
//! built with `vpdpbusd` (unsigned quants × signed Q8_K activations; Q6_K's `-32` offset
//! starts the accumulator at `-32 · Σx`), multiplied by the sub-block scales with
//! `vpmulld`, and summed; Q4_K's mins use `vpdpwssd` on (min pair × activation-sum pair).
//! The float update is [`super::kquants`]'s, lane-wise, so results match it bit for bit.

use super::acts::QActs;
use super::exec::{Blocking, OutPtr};
use super::kquants::{
    K45_D, K45_DMIN, K45_HEAD, K45_MN, K45_SC, Q4K_SUB, Q4K_TILE_BLOCK, Q5K_SUB, Q5K_TILE_BLOCK, Q6K_D, Q6K_HEAD,
    Q6K_SC, Q6K_SUB, Q6K_TILE_BLOCK,
};
use super::x86::{hbits256, hbits512};

const K_Q4: u8 = 0;
const K_Q5: u8 = 1;
const K_Q6: u8 = 2;

/// (tile-block bytes, first sub-block, sub-block bytes, offset of the nibbles in a
/// sub-block after its high-bit plane).
#[inline(always)]
fn kind_geometry(kind: u8) -> (usize, usize, usize, usize) {
    match kind {
        K_Q4 => (Q4K_TILE_BLOCK, K45_HEAD, Q4K_SUB, 0),
        K_Q5 => (Q5K_TILE_BLOCK, K45_HEAD, Q5K_SUB, 64),
        _ => (Q6K_TILE_BLOCK, Q6K_HEAD, Q6K_SUB, 64),
    }
}

use super::layout::{Format, Packed, QK_K, TILE};
use std::arch::x86_64::*;
use std::ops::Range;

/// Reads 4 activation quant bytes as one i32 (for broadcasting).
///
/// # Safety
/// `p..p+4` is readable.
#[inline(always)]
unsafe fn load4(p: *const i8) -> i32 {
    // SAFETY: per the contract; unaligned reads are allowed.
    unsafe { p.cast::<i32>().read_unaligned() }
}

/// Q4_K's activation-sum pair for min pair `pp`: sums of sub-blocks `2pp`, `2pp + 1`
/// (each ≤ 32·128 in magnitude) as two i16 in one i32.
#[inline(always)]
fn q4k_sum_pair(bs: &[i32], pp: usize) -> i32 {
    let lo = bs[4 * pp] + bs[4 * pp + 1];
    let hi = bs[4 * pp + 2] + bs[4 * pp + 3];
    ((lo as u32 & 0xFFFF) | ((hi as u32) << 16)) as i32
}

/// Writes a 16-lane tile row clipped to the matrix width.
///
/// # Safety
/// As [`OutPtr::write`] for row `row` and the columns of tile `t`.
#[inline(always)]
unsafe fn store_tile(y: &OutPtr, p: &Packed, row: usize, t: usize, vals: &[f32; TILE]) {
    let cols = TILE.min(p.n - t * TILE);
    // SAFETY: forwarded.
    unsafe { y.write(row, t * TILE, &vals[..cols]) };
}

/// Q6_K high bits for crumb `c` of each byte, moved to bits 4..6.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn q6_high512(qh: __m512i, c: usize) -> __m512i {
    let m = _mm512_set1_epi8(0x30);
    match c {
        0 => _mm512_and_si512(_mm512_slli_epi16::<4>(qh), m),
        1 => _mm512_and_si512(_mm512_slli_epi16::<2>(qh), m),
        2 => _mm512_and_si512(qh, m),
        _ => _mm512_and_si512(_mm512_srli_epi16::<2>(qh), m),
    }
}

/// `R` rows from `r0` × `T` tiles from `t0` of a Q4_K or Q6_K matrix (`Q6` selects).
///
/// # Safety
/// AVX-512 F/BW/VNNI, AVX2, FMA, F16C are available; `p.format` matches `Q6`;
/// `a` holds Q8_K rows for `p`; `r0 + R <= a.m`; `t0 + T <= p.n_tiles`; no other thread
/// writes these outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn k512<const KIND: u8, const R: usize, const T: usize>(
    p: &Packed,
    a: &QActs,
    r0: usize,
    t0: usize,
    y: &OutPtr,
) {
    let nb = p.nb;
    let tb = p.tile_bytes;
    let stride = nb * QK_K;
    let low4 = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let (block_bytes, head, sub, nib) = kind_geometry(KIND);
    let q6 = KIND == K_Q6;
    // SAFETY (pointer arithmetic below): tiles t0..t0+T and rows r0..r0+R exist and every
    // offset stays inside one tile-block or one activation block.
    let wbase = unsafe { p.data.as_slice().as_ptr().add(t0 * tb) };
    let xbase = unsafe { a.qs.as_ptr().add(r0 * stride) };
    let (xd, xsub) = (&a.d[r0 * nb..], &a.sub[r0 * nb * 16..]);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        let wb = unsafe { wbase.add(b * block_bytes) };
        let mut isum = [[zero; T]; R];
        let mut msum = [[zero; T]; R];
        if q6 {
            for h in 0..16 {
                let mut qh = [zero; T];
                for (t, qh) in qh.iter_mut().enumerate() {
                    *qh = unsafe { _mm512_loadu_si512(wb.add(t * tb + head + h * sub).cast()) };
                }
                let mut isub = [[zero; T]; R];
                for (r, row) in isub.iter_mut().enumerate() {
                    *row = [_mm512_set1_epi32(-32 * xsub[(r * nb + b) * 16 + h]); T];
                }
                for gi in 0..2 {
                    let g = 2 * h + gi;
                    let mut lo = [zero; T];
                    let mut hi = [zero; T];
                    for t in 0..T {
                        let at = t * tb + head + h * sub + nib + gi * 64;
                        let v = unsafe { _mm512_loadu_si512(wb.add(at).cast()) };
                        lo[t] = _mm512_or_si512(_mm512_and_si512(v, low4), q6_high512(qh[t], 2 * gi));
                        hi[t] = _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4),
                            q6_high512(qh[t], 2 * gi + 1),
                        );
                    }
                    for (r, row) in isub.iter_mut().enumerate() {
                        let xp = unsafe { xbase.add(r * stride + b * QK_K + 8 * g) };
                        let xl = _mm512_set1_epi32(unsafe { load4(xp) });
                        let xh = _mm512_set1_epi32(unsafe { load4(xp.add(4)) });
                        for t in 0..T {
                            row[t] = _mm512_dpbusd_epi32(row[t], lo[t], xl);
                            row[t] = _mm512_dpbusd_epi32(row[t], hi[t], xh);
                        }
                    }
                }
                for t in 0..T {
                    let sc =
                        _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(wb.add(t * tb + Q6K_SC + h * TILE).cast()) });
                    for r in 0..R {
                        isum[r][t] = _mm512_add_epi32(isum[r][t], _mm512_mullo_epi32(isub[r][t], sc));
                    }
                }
            }
        } else {
            for s in 0..8 {
                let mut isub = [[zero; T]; R];
                let mut qh = [zero; T];
                if KIND == K_Q5 {
                    for (t, qh) in qh.iter_mut().enumerate() {
                        *qh = unsafe { _mm512_loadu_si512(wb.add(t * tb + head + s * sub).cast()) };
                    }
                }
                for gi in 0..4 {
                    let g = 4 * s + gi;
                    let mut lo = [zero; T];
                    let mut hi = [zero; T];
                    for t in 0..T {
                        let at = t * tb + head + s * sub + nib + gi * 64;
                        let v = unsafe { _mm512_loadu_si512(wb.add(at).cast()) };
                        lo[t] = _mm512_and_si512(v, low4);
                        hi[t] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                        if KIND == K_Q5 {
                            let (hl, hh) = hbits512(qh[t], gi);
                            lo[t] = _mm512_or_si512(lo[t], hl);
                            hi[t] = _mm512_or_si512(hi[t], hh);
                        }
                    }
                    for (r, row) in isub.iter_mut().enumerate() {
                        let xp = unsafe { xbase.add(r * stride + b * QK_K + 8 * g) };
                        let xl = _mm512_set1_epi32(unsafe { load4(xp) });
                        let xh = _mm512_set1_epi32(unsafe { load4(xp.add(4)) });
                        for t in 0..T {
                            row[t] = _mm512_dpbusd_epi32(row[t], lo[t], xl);
                            row[t] = _mm512_dpbusd_epi32(row[t], hi[t], xh);
                        }
                    }
                }
                for t in 0..T {
                    let sc =
                        _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(wb.add(t * tb + K45_SC + s * TILE).cast()) });
                    for r in 0..R {
                        isum[r][t] = _mm512_add_epi32(isum[r][t], _mm512_mullo_epi32(isub[r][t], sc));
                    }
                }
            }
            for pp in 0..4 {
                let mut mn = [zero; T];
                for (t, mn) in mn.iter_mut().enumerate() {
                    *mn = _mm512_cvtepu8_epi16(unsafe {
                        _mm256_loadu_si256(wb.add(t * tb + K45_MN + pp * 2 * TILE).cast())
                    });
                }
                for (r, row) in msum.iter_mut().enumerate() {
                    let bs = &xsub[(r * nb + b) * 16..(r * nb + b + 1) * 16];
                    let xs = _mm512_set1_epi32(q4k_sum_pair(bs, pp));
                    for t in 0..T {
                        row[t] = _mm512_dpwssd_epi32(row[t], mn[t], xs);
                    }
                }
            }
        }
        for t in 0..T {
            let dw =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.add(t * tb + if q6 { Q6K_D } else { K45_D }).cast()) });
            let dmin = if q6 {
                _mm512_setzero_ps()
            } else {
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.add(t * tb + K45_DMIN).cast()) })
            };
            for r in 0..R {
                let dx = _mm512_set1_ps(xd[r * nb + b]);
                let mut v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[r][t]), dw), dx);
                if !q6 {
                    let m = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(msum[r][t]), dmin), dx);
                    v = _mm512_sub_ps(v, m);
                }
                acc[r][t] = _mm512_add_ps(acc[r][t], v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            let mut buf = [0f32; TILE];
            unsafe {
                _mm512_storeu_ps(buf.as_mut_ptr(), *v);
                store_tile(y, p, r0 + r, t0 + t, &buf);
            }
        }
    }
}

type TileFn = unsafe fn(&Packed, &QActs, usize, usize, &OutPtr);

/// Tiles per call supported for `rows` rows, at most `want`.
fn tiles_k(rows: usize, want: usize) -> usize {
    if rows <= 2 { want.min(2) } else { 1 }
}

fn pick512<const KIND: u8>(rows: usize, tiles: usize) -> TileFn {
    match (rows, tiles) {
        (1, 2) => k512::<KIND, 1, 2>,
        (2, 1) => k512::<KIND, 2, 1>,
        (2, 2) => k512::<KIND, 2, 2>,
        (3, 1) => k512::<KIND, 3, 1>,
        (4, 1) => k512::<KIND, 4, 1>,
        _ => k512::<KIND, 1, 1>,
    }
}

/// Runs `rows × tiles` of a K-quant matmul with the AVX-512 VNNI kernels.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C are available; `a` holds Q8_K rows for `p`;
/// ranges lie inside the matrices; no other thread writes the same outputs.
pub(crate) unsafe fn run_avx512(
    p: &Packed,
    a: &QActs,
    rows: Range<usize>,
    tiles: Range<usize>,
    y: &OutPtr,
    blocking: Blocking,
) {
    let pick: fn(usize, usize) -> TileFn = match p.format {
        Format::Q4K => pick512::<K_Q4>,
        Format::Q5K => pick512::<K_Q5>,
        _ => pick512::<K_Q6>,
    };
    // SAFETY: forwarded from this function's contract; `walk` keeps (rn, tn) supported.
    blocking.walk(rows, tiles, 4, tiles_k, |rn, tn, r, t| unsafe { pick(rn, tn)(p, a, r, t, y) });
}

// ---------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2")]
fn q6_high256(qh: __m256i, c: usize) -> __m256i {
    let m = _mm256_set1_epi8(0x30);
    match c {
        0 => _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m),
        1 => _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m),
        2 => _mm256_and_si256(qh, m),
        _ => _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m),
    }
}

/// `R` rows × one tile (two 8-lane halves) of a Q4_K or Q6_K matrix.
///
/// # Safety
/// AVX2, FMA, F16C are available; otherwise as [`k512`] with `T = 1`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k256<const KIND: u8, const R: usize>(p: &Packed, a: &QActs, r0: usize, t0: usize, y: &OutPtr) {
    let nb = p.nb;
    let stride = nb * QK_K;
    let low4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let (block_bytes, head, sub, nib) = kind_geometry(KIND);
    let q6 = KIND == K_Q6;
    // SAFETY (pointer arithmetic below): as in `k512`.
    let wbase = unsafe { p.data.as_slice().as_ptr().add(t0 * p.tile_bytes) };
    let xbase = unsafe { a.qs.as_ptr().add(r0 * stride) };
    let (xd, xsub) = (&a.d[r0 * nb..], &a.sub[r0 * nb * 16..]);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        let wb = unsafe { wbase.add(b * block_bytes) };
        let mut isum = [[zero; 2]; R];
        let mut msum = [[zero; 2]; R];
        if q6 {
            for h in 0..16 {
                let mut qh = [zero; 2];
                for (hh, qh) in qh.iter_mut().enumerate() {
                    *qh = unsafe { _mm256_loadu_si256(wb.add(head + h * sub + hh * 32).cast()) };
                }
                let mut isub = [[zero; 2]; R];
                for (r, row) in isub.iter_mut().enumerate() {
                    *row = [_mm256_set1_epi32(-32 * xsub[(r * nb + b) * 16 + h]); 2];
                }
                for gi in 0..2 {
                    let g = 2 * h + gi;
                    let mut lo = [zero; 2];
                    let mut hi = [zero; 2];
                    for hh in 0..2 {
                        let at = head + h * sub + nib + gi * 64 + hh * 32;
                        let v = unsafe { _mm256_loadu_si256(wb.add(at).cast()) };
                        lo[hh] = _mm256_or_si256(_mm256_and_si256(v, low4), q6_high256(qh[hh], 2 * gi));
                        hi[hh] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4),
                            q6_high256(qh[hh], 2 * gi + 1),
                        );
                    }
                    for (r, row) in isub.iter_mut().enumerate() {
                        let xp = unsafe { xbase.add(r * stride + b * QK_K + 8 * g) };
                        let xl = _mm256_set1_epi32(unsafe { load4(xp) });
                        let xh = _mm256_set1_epi32(unsafe { load4(xp.add(4)) });
                        for hh in 0..2 {
                            // Pairs ≤ 2·63·128: two of them still fit in i16.
                            let pr =
                                _mm256_add_epi16(_mm256_maddubs_epi16(lo[hh], xl), _mm256_maddubs_epi16(hi[hh], xh));
                            row[hh] = _mm256_add_epi32(row[hh], _mm256_madd_epi16(pr, ones));
                        }
                    }
                }
                for hh in 0..2 {
                    let sc =
                        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(wb.add(Q6K_SC + h * TILE + hh * 8).cast()) });
                    for r in 0..R {
                        isum[r][hh] = _mm256_add_epi32(isum[r][hh], _mm256_mullo_epi32(isub[r][hh], sc));
                    }
                }
            }
        } else {
            for s in 0..8 {
                // 4-bit pairs ≤ 2·15·128: a sub-block's 8 of them fit in i16; 5-bit pairs
                // ≤ 2·31·128 are widened every 2 groups (≤ 31744).
                let mut p16 = [[zero; 2]; R];
                let mut isub = [[zero; 2]; R];
                let mut qh = [zero; 2];
                if KIND == K_Q5 {
                    for (hh, qh) in qh.iter_mut().enumerate() {
                        *qh = unsafe { _mm256_loadu_si256(wb.add(head + s * sub + hh * 32).cast()) };
                    }
                }
                for gi in 0..4 {
                    let g = 4 * s + gi;
                    let mut lo = [zero; 2];
                    let mut hi = [zero; 2];
                    for hh in 0..2 {
                        let at = head + s * sub + nib + gi * 64 + hh * 32;
                        let v = unsafe { _mm256_loadu_si256(wb.add(at).cast()) };
                        lo[hh] = _mm256_and_si256(v, low4);
                        hi[hh] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                        if KIND == K_Q5 {
                            let (hl, hb) = hbits256(qh[hh], gi);
                            lo[hh] = _mm256_or_si256(lo[hh], hl);
                            hi[hh] = _mm256_or_si256(hi[hh], hb);
                        }
                    }
                    for (r, row) in p16.iter_mut().enumerate() {
                        let xp = unsafe { xbase.add(r * stride + b * QK_K + 8 * g) };
                        let xl = _mm256_set1_epi32(unsafe { load4(xp) });
                        let xh = _mm256_set1_epi32(unsafe { load4(xp.add(4)) });
                        for hh in 0..2 {
                            row[hh] = _mm256_add_epi16(row[hh], _mm256_maddubs_epi16(lo[hh], xl));
                            row[hh] = _mm256_add_epi16(row[hh], _mm256_maddubs_epi16(hi[hh], xh));
                        }
                    }
                    if gi == 3 || (KIND == K_Q5 && gi == 1) {
                        for r in 0..R {
                            for hh in 0..2 {
                                let wide = _mm256_madd_epi16(p16[r][hh], ones);
                                isub[r][hh] = _mm256_add_epi32(isub[r][hh], wide);
                                p16[r][hh] = zero;
                            }
                        }
                    }
                }
                for hh in 0..2 {
                    let sc =
                        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(wb.add(K45_SC + s * TILE + hh * 8).cast()) });
                    for r in 0..R {
                        isum[r][hh] = _mm256_add_epi32(isum[r][hh], _mm256_mullo_epi32(isub[r][hh], sc));
                    }
                }
            }
            for pp in 0..4 {
                let mut mn = [zero; 2];
                for (hh, mn) in mn.iter_mut().enumerate() {
                    *mn = _mm256_cvtepu8_epi16(unsafe {
                        _mm_loadu_si128(wb.add(K45_MN + pp * 2 * TILE + hh * 16).cast())
                    });
                }
                for (r, row) in msum.iter_mut().enumerate() {
                    let bs = &xsub[(r * nb + b) * 16..(r * nb + b + 1) * 16];
                    let xs = _mm256_set1_epi32(q4k_sum_pair(bs, pp));
                    for hh in 0..2 {
                        row[hh] = _mm256_add_epi32(row[hh], _mm256_madd_epi16(mn[hh], xs));
                    }
                }
            }
        }
        for hh in 0..2 {
            let dw =
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.add(if q6 { Q6K_D } else { K45_D } + hh * 16).cast()) });
            let dmin = if q6 {
                _mm256_setzero_ps()
            } else {
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.add(K45_DMIN + hh * 16).cast()) })
            };
            for r in 0..R {
                let dx = _mm256_set1_ps(xd[r * nb + b]);
                let mut v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum[r][hh]), dw), dx);
                if !q6 {
                    let m = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(msum[r][hh]), dmin), dx);
                    v = _mm256_sub_ps(v, m);
                }
                acc[r][hh] = _mm256_add_ps(acc[r][hh], v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let mut buf = [0f32; TILE];
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(buf.as_mut_ptr().add(8), row[1]);
            store_tile(y, p, r0 + r, t0, &buf);
        }
    }
}

/// Runs `rows × tiles` of a K-quant matmul with the AVX2 kernels (up to 2 rows × 1 tile).
///
/// # Safety
/// AVX2, FMA, F16C are available; `a` holds Q8_K rows for `p`; ranges lie inside the
/// matrices; no other thread writes the same outputs.
pub(crate) unsafe fn run_avx2(
    p: &Packed,
    a: &QActs,
    rows: Range<usize>,
    tiles: Range<usize>,
    y: &OutPtr,
    blocking: Blocking,
) {
    let one_tile = Blocking { rows: blocking.rows, tiles: 1 };
    let call = |rn: usize, _tn: usize, r: usize, t: usize| {
        let f: TileFn = match (p.format, rn) {
            (Format::Q4K, 1) => k256::<K_Q4, 1>,
            (Format::Q4K, _) => k256::<K_Q4, 2>,
            (Format::Q5K, 1) => k256::<K_Q5, 1>,
            (Format::Q5K, _) => k256::<K_Q5, 2>,
            (_, 1) => k256::<K_Q6, 1>,
            (_, _) => k256::<K_Q6, 2>,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { f(p, a, r, t, y) };
    };
    // `call` runs 1 tile for rn ≤ 2 rows, as `walk` asks with `tiles = 1`.
    one_tile.walk(rows, tiles, 2, |_, _| 1, call);
}
