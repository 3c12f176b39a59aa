//! Small numeric helpers shared by the kernels.

/// `exp(x)`, Cephes-style: written so that it vectorises inside SIMD-enabled callers, with
/// a relative error of a few 1e-7 over the softmax and SiLU ranges. Inputs are clamped to
/// [-87, 88] (results stay finite and normal).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sums 16 lanes with a fixed tree (lanes l and l+8, then l and l+4, then pairs), the
/// order a SIMD horizontal reduction takes, so scalar and vector code agree bitwise.
#[inline(always)]
pub(crate) fn sum16(acc: &[f32; 16]) -> f32 {
    let mut s8 = [0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `Σ a[i]·b[i]` in 16 lanes of fused multiply-adds reduced by [`sum16`]: one fixed order,
/// so every SIMD path and the scalar one give the same bits. Inline it into callers that
/// are compiled with SIMD features; [`dot16`] dispatches for the others.
#[inline(always)]
pub(crate) fn dot16_inline(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let whole = a.len() / 16 * 16;
    for (ca, cb) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = ca[l].mul_add(cb[l], acc[l]);
        }
    }
    for i in whole..a.len() {
        acc[i - whole] = a[i].mul_add(b[i], acc[i - whole]);
    }
    sum16(&acc)
}

/// `y[i] += alpha · x[i]` with fused multiply-adds.
#[inline(always)]
pub(crate) fn axpy_inline(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = alpha.mul_add(v, *o);
    }
}

macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $inline:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $inline($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $inline($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inline($($arg),*)
        }
    };
}

simd_dispatch!(
    /// [`dot16_inline`] on the widest SIMD the CPU has.
    pub(crate) fn dot16(a: &[f32], b: &[f32]) -> f32 => dot16_inline
);
simd_dispatch!(
    /// [`axpy_inline`] on the widest SIMD the CPU has.
    pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) => axpy_inline
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_approx(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
    }
}
