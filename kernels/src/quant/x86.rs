//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd` on 16-row tiles) and AVX2 (`vpmaddubsw` +
//! `vpmaddwd`), both on the packed layout of [`super::layout`], plus an AVX-512 activation
//! quantizer that reproduces the portable one bit for bit.
//!
//! Micro-kernel `R × T`: `R` activation rows against `T` tiles of 16 weight rows. Each
//! 64-byte weight load is unpacked once and fed to all `R` rows; a row's 4 activation
//! bytes are broadcast once and fed to all `T` tiles. Per block, lane `j` of row `r`'s
//! integer accumulator ends with the exact block dot product, and the float update is the
//! portable kernel's (`((isum · dw) · dx) [+ mw · sx]`, then `acc +=`), lane-wise, so the
//! results equal [`super::scalar`]'s bit for bit.
//!
//! Unsigned × signed: 4/5-bit quants are unsigned (Q4_0's `-8` and Q5_0's `-16` are folded
//! into the accumulator's start value as `-z · Σx`; Q5's fifth bit is OR-ed in from a bit
//! plane); Q8_0 quants are flipped to `q + 128` for `vpdpbusd` (start value `-128 · Σx`)
//! and use the `sign` trick for `vpmaddubsw`.

use super::acts::{ActKind, ActRowsMut, QActs, q8_1_s};
use super::exec::{Blocking, OutPtr};
use super::layout::{Format, Packed, QK, QK_K, TILE};
use std::arch::x86_64::*;
use std::ops::Range;

const FMT_Q4_0: u8 = 0;
const FMT_Q4_1: u8 = 1;
const FMT_Q8_0: u8 = 2;
const FMT_Q5_0: u8 = 3;
const FMT_Q5_1: u8 = 4;

#[inline(always)]
fn fmt_of(id: u8) -> Format {
    match id {
        FMT_Q4_0 => Format::Q4_0,
        FMT_Q4_1 => Format::Q4_1,
        FMT_Q5_0 => Format::Q5_0,
        FMT_Q5_1 => Format::Q5_1,
        _ => Format::Q8_0,
    }
}

/// Moves bit `C` of every byte to bit 4 (the fifth bit of a 5-bit quant), zeroing the rest.
/// 16-bit shifts are fine: bit 4 of either byte only receives bits of the same byte.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn hbit512<const C: u32>(qh: __m512i) -> __m512i {
    let v = match C {
        0 => _mm512_slli_epi16::<4>(qh),
        1 => _mm512_slli_epi16::<3>(qh),
        2 => _mm512_slli_epi16::<2>(qh),
        3 => _mm512_slli_epi16::<1>(qh),
        4 => qh,
        5 => _mm512_srli_epi16::<1>(qh),
        6 => _mm512_srli_epi16::<2>(qh),
        _ => _mm512_srli_epi16::<3>(qh),
    };
    _mm512_and_si512(v, _mm512_set1_epi8(0x10))
}

/// The fifth bits of group `g`'s lo (`C = 2g`) and hi (`C = 2g + 1`) nibble vectors.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn hbits512(qh: __m512i, g: usize) -> (__m512i, __m512i) {
    match g {
        0 => (hbit512::<0>(qh), hbit512::<1>(qh)),
        1 => (hbit512::<2>(qh), hbit512::<3>(qh)),
        2 => (hbit512::<4>(qh), hbit512::<5>(qh)),
        _ => (hbit512::<6>(qh), hbit512::<7>(qh)),
    }
}

/// AVX2 version of [`hbit512`].
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hbit256<const C: u32>(qh: __m256i) -> __m256i {
    let v = match C {
        0 => _mm256_slli_epi16::<4>(qh),
        1 => _mm256_slli_epi16::<3>(qh),
        2 => _mm256_slli_epi16::<2>(qh),
        3 => _mm256_slli_epi16::<1>(qh),
        4 => qh,
        5 => _mm256_srli_epi16::<1>(qh),
        6 => _mm256_srli_epi16::<2>(qh),
        _ => _mm256_srli_epi16::<3>(qh),
    };
    _mm256_and_si256(v, _mm256_set1_epi8(0x10))
}

/// AVX2 version of [`hbits512`].
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hbits256(qh: __m256i, g: usize) -> (__m256i, __m256i) {
    match g {
        0 => (hbit256::<0>(qh), hbit256::<1>(qh)),
        1 => (hbit256::<2>(qh), hbit256::<3>(qh)),
        2 => (hbit256::<4>(qh), hbit256::<5>(qh)),
        _ => (hbit256::<6>(qh), hbit256::<7>(qh)),
    }
}

/// AVX2 + FMA + F16C.
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// AVX-512 F/BW/VL/VNNI (+ the AVX2 set).
pub(crate) fn has_avx512_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Byte offsets of block `b`'s scales and quants from its tile's start.
#[inline(always)]
fn block_offsets(f: Format, b: usize) -> (usize, usize) {
    let g = f.group_blocks();
    let group = (b / g) * f.group_bytes();
    (group + (b % g) * f.scale_bytes(), group + g * f.scale_bytes() + (b % g) * f.quant_bytes())
}

/// Reads 4 activation quant bytes as one i32 (for broadcasting).
///
/// # Safety
/// `p..p+4` is readable.
#[inline(always)]
unsafe fn load4(p: *const i8) -> i32 {
    // SAFETY: per the contract; unaligned reads are allowed.
    unsafe { p.cast::<i32>().read_unaligned() }
}

/// Writes a 16-lane f32 tile row, clipped to the matrix width.
///
/// # Safety
/// As [`OutPtr::write`] for row `row` and the columns of tile `t`.
#[inline(always)]
unsafe fn store_tile(y: &OutPtr, p: &Packed, row: usize, t: usize, vals: &[f32; TILE]) {
    let cols = TILE.min(p.n - t * TILE);
    // SAFETY: forwarded.
    unsafe { y.write(row, t * TILE, &vals[..cols]) };
}

// ---------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------

/// Pointers and per-block planes one micro-kernel call reads.
struct Ctx<'a> {
    /// Tile `t0`'s first byte.
    wbase: *const u8,
    /// Bytes per tile.
    tb: usize,
    /// Blocks per row.
    nb: usize,
    /// Row `r0`'s first quant.
    xbase: *const i8,
    /// Rows `r0..`'s block scales, `s` and sums.
    xd: &'a [f32],
    xs: &'a [f32],
    xsum: &'a [i32],
}

/// Block `b` of rows `r0..r0 + R` × `T` tiles: `acc[r][t] += ` the block's float
/// term, exactly as [`super::scalar`] computes it.
///
/// # Safety
/// AVX-512 F/BW/VNNI, F16C are available (the caller is compiled with them); `ctx` is
/// valid for rows `0..R` and tiles `0..T`; `b < ctx.nb`.
#[inline(always)]
unsafe fn block512<const FMT: u8, const R: usize, const T: usize>(ctx: &Ctx<'_>, b: usize, acc: &mut [[__m512; T]; R]) {
    // SAFETY: the intrinsics need the features of the (only) callers, `tile512`'s, into
    // which this is inlined; the memory accesses are in range by the contract.
    unsafe {
        let f = fmt_of(FMT);
        let split = R * T <= 2;
        let (nb, tb) = (ctx.nb, ctx.tb);
        let stride = nb * QK;
        let wbase = ctx.wbase;
        // SAFETY (pointer arithmetic below): every offset stays inside one tile-block (layout)
        // or one activation block.
        let xbase = ctx.xbase;
        let (xd, xs, xsum) = (ctx.xd, ctx.xs, ctx.xsum);
        let low4 = _mm512_set1_epi8(0x0F);
        let flip = _mm512_set1_epi8(i8::MIN);
        let zero = _mm512_setzero_si512();
        let (so, qo) = block_offsets(f, b);
        let mut isum = [[zero; T]; R];
        // Few accumulators: a second chain halves the dpbusd latency chain (exact: integers).
        let mut isum2 = [[zero; T]; R];
        // Zero points fold into the start value: Σ(q - z)·x = Σq·x - z·Σx.
        let zp = if FMT == FMT_Q8_0 { 128 } else { f.zero_point() };
        if zp != 0 {
            for (r, row) in isum.iter_mut().enumerate() {
                *row = [_mm512_set1_epi32(-zp * xsum[r * nb + b]); T];
            }
        }
        if FMT == FMT_Q8_0 {
            for g in 0..QK / 4 {
                let mut w = [zero; T];
                for (t, w) in w.iter_mut().enumerate() {
                    let v = _mm512_loadu_si512(wbase.add(t * tb + qo + g * 64).cast());
                    *w = _mm512_xor_si512(v, flip);
                }
                for (r, row) in isum.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32(load4(xbase.add(r * stride + b * QK + 4 * g)));
                    let acc = if split && g % 2 == 1 { &mut isum2[r] } else { row };
                    for (s, w) in acc.iter_mut().zip(&w) {
                        *s = _mm512_dpbusd_epi32(*s, *w, x);
                    }
                }
            }
        } else {
            let five = f.is_five();
            // 5-bit: the high-bit plane (64 B) precedes the nibbles.
            let nib = if five { 64 } else { 0 };
            let mut qh = [zero; T];
            if five {
                for (t, qh) in qh.iter_mut().enumerate() {
                    *qh = _mm512_loadu_si512(wbase.add(t * tb + qo).cast());
                }
            }
            for g in 0..QK / 8 {
                let mut lo = [zero; T];
                let mut hi = [zero; T];
                for t in 0..T {
                    let v = _mm512_loadu_si512(wbase.add(t * tb + qo + nib + g * 64).cast());
                    lo[t] = _mm512_and_si512(v, low4);
                    hi[t] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                    if five {
                        let (hl, hh) = hbits512(qh[t], g);
                        lo[t] = _mm512_or_si512(lo[t], hl);
                        hi[t] = _mm512_or_si512(hi[t], hh);
                    }
                }
                for r in 0..R {
                    let xp = xbase.add(r * stride + b * QK + 8 * g);
                    let xl = _mm512_set1_epi32(load4(xp));
                    let xh = _mm512_set1_epi32(load4(xp.add(4)));
                    for t in 0..T {
                        isum[r][t] = _mm512_dpbusd_epi32(isum[r][t], lo[t], xl);
                        if split {
                            isum2[r][t] = _mm512_dpbusd_epi32(isum2[r][t], hi[t], xh);
                        } else {
                            isum[r][t] = _mm512_dpbusd_epi32(isum[r][t], hi[t], xh);
                        }
                    }
                }
            }
        }
        if split {
            for r in 0..R {
                for t in 0..T {
                    isum[r][t] = _mm512_add_epi32(isum[r][t], isum2[r][t]);
                }
            }
        }
        let mut dw = [_mm512_setzero_ps(); T];
        let mut mw = [_mm512_setzero_ps(); T];
        for t in 0..T {
            dw[t] = _mm512_cvtph_ps(_mm256_loadu_si256(wbase.add(t * tb + so).cast()));
            if f.has_min() {
                mw[t] = _mm512_cvtph_ps(_mm256_loadu_si256(wbase.add(t * tb + so + 2 * TILE).cast()));
            }
        }
        for r in 0..R {
            let dx = _mm512_set1_ps(xd[r * nb + b]);
            let sx = _mm512_set1_ps(xs[r * nb + b]);
            for t in 0..T {
                let mut v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[r][t]), dw[t]), dx);
                if f.has_min() {
                    v = _mm512_add_ps(v, _mm512_mul_ps(mw[t], sx));
                }
                acc[r][t] = _mm512_add_ps(acc[r][t], v);
            }
        }
    }
}

/// `R` rows from `r0` × `T` tiles from `t0`: float accumulators stay in registers while the
/// blocks are walked once.
///
/// # Safety
/// AVX-512 F/BW/VNNI are available; `p.format` is `FMT`'s; `a.nb == p.nb`;
/// `r0 + R <= a.m`; `t0 + T <= p.n_tiles`; no other thread writes these outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const FMT: u8, const R: usize, const T: usize>(
    p: &Packed,
    a: &QActs,
    r0: usize,
    t0: usize,
    y: &OutPtr,
) {
    let nb = p.nb;
    // SAFETY (pointer arithmetic): tiles t0..t0+T and rows r0..r0+R exist.
    let ctx = Ctx {
        wbase: unsafe { p.data.as_slice().as_ptr().add(t0 * p.tile_bytes) },
        tb: p.tile_bytes,
        nb,
        xbase: unsafe { a.qs.as_ptr().add(r0 * nb * QK) },
        xd: &a.d[r0 * nb..],
        xs: &a.s[r0 * nb..],
        xsum: &a.sum[r0 * nb..],
    };
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        // SAFETY: forwarded from this function's contract.
        unsafe { block512::<FMT, R, T>(&ctx, b, &mut acc) };
    }
    for (r, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            let mut buf = [0f32; TILE];
            // SAFETY: row r0 + r and tile t0 + t are this call's.
            unsafe {
                _mm512_storeu_ps(buf.as_mut_ptr(), *v);
                store_tile(y, p, r0 + r, t0 + t, &buf);
            }
        }
    }
}

type TileFn = unsafe fn(&Packed, &QActs, usize, usize, &OutPtr);

/// Tiles per micro-kernel call supported for `rows` rows, at most `want`.
fn tiles512(rows: usize, want: usize) -> usize {
    match rows {
        1..=4 => want.min(4),
        _ => want.min(2),
    }
}

/// The `R × T` instantiation for `rows × tiles`, for `rows <= 8` and
/// `tiles == tiles512(rows, tiles)`.
fn pick512<const FMT: u8>(rows: usize, tiles: usize) -> TileFn {
    match (rows, tiles) {
        (1, 1) => tile512::<FMT, 1, 1>,
        (1, 2) => tile512::<FMT, 1, 2>,
        (1, 3) => tile512::<FMT, 1, 3>,
        (1, 4) => tile512::<FMT, 1, 4>,
        (2, 1) => tile512::<FMT, 2, 1>,
        (2, 2) => tile512::<FMT, 2, 2>,
        (2, 3) => tile512::<FMT, 2, 3>,
        (2, 4) => tile512::<FMT, 2, 4>,
        (3, 1) => tile512::<FMT, 3, 1>,
        (3, 2) => tile512::<FMT, 3, 2>,
        (3, 3) => tile512::<FMT, 3, 3>,
        (3, 4) => tile512::<FMT, 3, 4>,
        (4, 1) => tile512::<FMT, 4, 1>,
        (4, 2) => tile512::<FMT, 4, 2>,
        (4, 3) => tile512::<FMT, 4, 3>,
        (4, 4) => tile512::<FMT, 4, 4>,
        (5, 1) => tile512::<FMT, 5, 1>,
        (5, 2) => tile512::<FMT, 5, 2>,
        (6, 1) => tile512::<FMT, 6, 1>,
        (6, 2) => tile512::<FMT, 6, 2>,
        (7, 1) => tile512::<FMT, 7, 1>,
        (7, 2) => tile512::<FMT, 7, 2>,
        (8, 1) => tile512::<FMT, 8, 1>,
        (8, 2) => tile512::<FMT, 8, 2>,
        // Unreachable through `run_avx512`; the smallest kernel never writes out of range.
        _ => tile512::<FMT, 1, 1>,
    }
}

/// Runs `rows × tiles` of the output with the AVX-512 VNNI kernels.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are available; ranges lie inside the
/// matrices; no other thread writes the same outputs.
pub(crate) unsafe fn run_avx512(
    p: &Packed,
    a: &QActs,
    rows: Range<usize>,
    tiles: Range<usize>,
    y: &OutPtr,
    blocking: Blocking,
) {
    let pick: fn(usize, usize) -> TileFn = match p.format {
        Format::Q4_0 => pick512::<FMT_Q4_0>,
        Format::Q4_1 => pick512::<FMT_Q4_1>,
        Format::Q8_0 => pick512::<FMT_Q8_0>,
        Format::Q5_0 => pick512::<FMT_Q5_0>,
        Format::Q5_1 => pick512::<FMT_Q5_1>,
        // SAFETY: forwarded from this function's contract.
        Format::Q4K | Format::Q5K | Format::Q6K => {
            return unsafe { super::x86k::run_avx512(p, a, rows, tiles, y, blocking) };
        }
    };
    // SAFETY: forwarded from this function's contract; `walk` keeps every call's `rn`
    // rows from `r` and `tn = tiles512(rn, ..)` tiles from `t` in range.
    blocking.walk(rows, tiles, 8, tiles512, |rn, tn, r, t| unsafe { pick(rn, tn)(p, a, r, t, y) });
}

// ---------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------

/// `R` rows from `r0` × one tile `t0` (two 8-lane halves).
///
/// # Safety
/// AVX2, FMA, F16C are available; otherwise as [`tile512`] with `T = 1`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const FMT: u8, const R: usize>(p: &Packed, a: &QActs, r0: usize, t0: usize, y: &OutPtr) {
    let f = fmt_of(FMT);
    let nb = p.nb;
    let stride = nb * QK;
    let low4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    // SAFETY (pointer arithmetic below): as in `tile512`.
    let wbase = unsafe { p.data.as_slice().as_ptr().add(t0 * p.tile_bytes) };
    let xbase = unsafe { a.qs.as_ptr().add(r0 * stride) };
    let (xd, xs, xsum) = (&a.d[r0 * nb..], &a.s[r0 * nb..], &a.sum[r0 * nb..]);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        let (so, qo) = block_offsets(f, b);
        let mut isum = [[zero; 2]; R];
        if FMT == FMT_Q8_0 {
            for g in 0..QK / 4 {
                let mut aw = [zero; 2];
                let mut sw = [zero; 2];
                for h in 0..2 {
                    let v = unsafe { _mm256_loadu_si256(wbase.add(qo + g * 64 + h * 32).cast()) };
                    aw[h] = _mm256_abs_epi8(v);
                    sw[h] = v;
                }
                for (r, row) in isum.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(unsafe { load4(xbase.add(r * stride + b * QK + 4 * g)) });
                    for h in 0..2 {
                        // |w| · (x · sign w): pairs stay below 2·128·127, no i16 saturation.
                        let pr = _mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(x, sw[h]));
                        row[h] = _mm256_add_epi32(row[h], _mm256_madd_epi16(pr, ones));
                    }
                }
            }
        } else {
            // 4-bit pairs (u8 ≤ 15 times i8) are at most 2·15·127, so a whole block's 8 pair
            // sums fit in i16 (≤ 30480) and widen once per block; 5-bit pairs (≤ 2·31·127)
            // widen every 2 groups (≤ 31496).
            let five = f.is_five();
            let nib = if five { 64 } else { 0 };
            let mut qh = [zero; 2];
            if five {
                for (h, qh) in qh.iter_mut().enumerate() {
                    *qh = unsafe { _mm256_loadu_si256(wbase.add(qo + h * 32).cast()) };
                }
            }
            let zp = f.zero_point();
            for (r, row) in isum.iter_mut().enumerate() {
                *row = [_mm256_set1_epi32(-zp * xsum[r * nb + b]); 2];
            }
            let mut p16 = [[zero; 2]; R];
            for g in 0..QK / 8 {
                let mut lo = [zero; 2];
                let mut hi = [zero; 2];
                for h in 0..2 {
                    let v = unsafe { _mm256_loadu_si256(wbase.add(qo + nib + g * 64 + h * 32).cast()) };
                    lo[h] = _mm256_and_si256(v, low4);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                    if five {
                        let (hl, hh) = hbits256(qh[h], g);
                        lo[h] = _mm256_or_si256(lo[h], hl);
                        hi[h] = _mm256_or_si256(hi[h], hh);
                    }
                }
                for (r, row) in p16.iter_mut().enumerate() {
                    let xp = unsafe { xbase.add(r * stride + b * QK + 8 * g) };
                    let xl = _mm256_set1_epi32(unsafe { load4(xp) });
                    let xh = _mm256_set1_epi32(unsafe { load4(xp.add(4)) });
                    for h in 0..2 {
                        row[h] = _mm256_add_epi16(row[h], _mm256_maddubs_epi16(lo[h], xl));
                        row[h] = _mm256_add_epi16(row[h], _mm256_maddubs_epi16(hi[h], xh));
                    }
                }
                if g == QK / 8 - 1 || (five && g % 2 == 1) {
                    for r in 0..R {
                        for h in 0..2 {
                            let wide = _mm256_madd_epi16(p16[r][h], ones);
                            isum[r][h] = _mm256_add_epi32(isum[r][h], wide);
                            p16[r][h] = zero;
                        }
                    }
                }
            }
        }
        let mut dw = [_mm256_setzero_ps(); 2];
        let mut mw = [_mm256_setzero_ps(); 2];
        for h in 0..2 {
            dw[h] = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wbase.add(so + 16 * h).cast()) });
            if f.has_min() {
                mw[h] = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wbase.add(so + 2 * TILE + 16 * h).cast()) });
            }
        }
        for r in 0..R {
            let dx = _mm256_set1_ps(xd[r * nb + b]);
            let sx = _mm256_set1_ps(xs[r * nb + b]);
            for h in 0..2 {
                let mut v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum[r][h]), dw[h]), dx);
                if f.has_min() {
                    v = _mm256_add_ps(v, _mm256_mul_ps(mw[h], sx));
                }
                acc[r][h] = _mm256_add_ps(acc[r][h], v);
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

fn pick256<const FMT: u8>(rows: usize) -> TileFn {
    match rows {
        1 => tile256::<FMT, 1>,
        2 => tile256::<FMT, 2>,
        3 => tile256::<FMT, 3>,
        _ => tile256::<FMT, 4>,
    }
}

/// Runs `rows × tiles` of the output with the AVX2 kernels (up to 4 rows × 1 tile).
///
/// # Safety
/// AVX2, FMA and F16C are available; ranges lie inside the matrices; no other thread
/// writes the same outputs.
pub(crate) unsafe fn run_avx2(
    p: &Packed,
    a: &QActs,
    rows: Range<usize>,
    tiles: Range<usize>,
    y: &OutPtr,
    blocking: Blocking,
) {
    let pick: fn(usize) -> TileFn = match p.format {
        Format::Q4_0 => pick256::<FMT_Q4_0>,
        Format::Q4_1 => pick256::<FMT_Q4_1>,
        Format::Q8_0 => pick256::<FMT_Q8_0>,
        Format::Q5_0 => pick256::<FMT_Q5_0>,
        Format::Q5_1 => pick256::<FMT_Q5_1>,
        // SAFETY: forwarded from this function's contract.
        Format::Q4K | Format::Q5K | Format::Q6K => {
            return unsafe { super::x86k::run_avx2(p, a, rows, tiles, y, blocking) };
        }
    };
    // One tile per call; SAFETY: forwarded from this function's contract, `walk` keeps
    // every call's rows and tile in range.
    Blocking { rows: blocking.rows, tiles: 1 }.walk(
        rows,
        tiles,
        4,
        |_, _| 1,
        |rn, _, r, t| unsafe { pick(rn)(p, a, r, t, y) },
    );
}

// ---------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------

/// `round()` (half away from zero), exactly: `t = trunc(v)`; `v - t` is exact, so
/// `|v - t| >= 0.5` decides the step away from zero.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_away512(v: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    let step = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_set1_ps(1.0)), sign));
    _mm512_mask_add_ps(t, step, t, one)
}

/// AVX-512 version of [`super::acts::quantize_rows_scalar`], same bits for finite inputs.
///
/// # Safety
/// AVX-512 F and BW are available.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_rows_avx512(x: &[f32], kind: ActKind, mut out: ActRowsMut<'_>) {
    if kind == ActKind::Q8K {
        for (bi, xs) in x.chunks_exact(QK_K).enumerate() {
            quantize_q8k_avx512(xs, bi, &mut out);
        }
        return;
    }
    for (bi, xs) in x.chunks_exact(QK).enumerate() {
        // SAFETY: `xs` holds 32 floats.
        let (v0, v1) = unsafe { (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))) };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q0 = _mm512_cvttps_epi32(round_away512(_mm512_mul_ps(v0, id)));
        let q1 = _mm512_cvttps_epi32(round_away512(_mm512_mul_ps(v1, id)));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        let dst = &mut out.qs[bi * QK..(bi + 1) * QK];
        // SAFETY: `dst` holds 32 bytes; the stores are unaligned.
        unsafe {
            _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(dst.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(q1));
        }
        let dh = half::f16::from_f32(d);
        out.d[bi] = dh.to_f32();
        out.s[bi] = match kind {
            ActKind::Q8_1 => q8_1_s(sum, dh),
            ActKind::Q8_0 | ActKind::Q8K => 0.0,
        };
        out.sum[bi] = sum;
    }
}

/// [`super::acts::quantize_q8k_scalar`] with AVX-512: same bits for finite inputs.
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_q8k_avx512(xs: &[f32], bi: usize, out: &mut ActRowsMut<'_>) {
    let mut v = [_mm512_setzero_ps(); QK_K / 16];
    let mut amax = _mm512_setzero_ps();
    for (i, v) in v.iter_mut().enumerate() {
        // SAFETY: `xs` holds 256 floats.
        *v = unsafe { _mm512_loadu_ps(xs.as_ptr().add(16 * i)) };
        amax = _mm512_max_ps(amax, _mm512_abs_ps(*v));
    }
    let amax = _mm512_reduce_max_ps(amax);
    let qs = &mut out.qs[bi * QK_K..(bi + 1) * QK_K];
    let sub = &mut out.sub[bi * 16..(bi + 1) * 16];
    out.s[bi] = 0.0;
    if amax == 0.0 {
        qs.fill(0);
        sub.fill(0);
        out.d[bi] = 0.0;
        out.sum[bi] = 0;
        return;
    }
    // The first value of largest magnitude gives the scale its sign, as in candle.
    let first = v
        .iter()
        .enumerate()
        .find_map(|(i, v)| {
            let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(*v), _mm512_set1_ps(amax));
            (hit != 0).then(|| 16 * i + hit.trailing_zeros() as usize)
        })
        .unwrap_or(0);
    let iscale = -127f32 / xs[first];
    let is = _mm512_set1_ps(iscale);
    let mut total = 0;
    for (i, v) in v.iter().enumerate() {
        let q = _mm512_cvttps_epi32(round_away512(_mm512_mul_ps(*v, is)));
        // Saturating narrowing = candle's clamp to [-128, 127].
        // SAFETY: 16 bytes at `16 * i` lie inside `qs`.
        unsafe { _mm_storeu_si128(qs.as_mut_ptr().add(16 * i).cast(), _mm512_cvtsepi32_epi8(q)) };
        let q = _mm512_cvtepi8_epi32(_mm512_cvtsepi32_epi8(q));
        sub[i] = _mm512_reduce_add_epi32(q);
        total += sub[i];
    }
    out.d[bi] = 1.0 / iscale;
    out.sum[bi] = total;
}
