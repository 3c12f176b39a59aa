//! Fused activations.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, bail};

use crate::math::exp_approx;
use crate::par::for_rows;

/// SwiGLU on a fused gate/up projection: `x: [T, 2n]` (gate first, then up) to
/// `silu(gate) * up: [T, n]`. One pass on CPU instead of candle's three strided ops.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let (_, two_n) = x.dims2()?;
    if two_n % 2 != 0 {
        bail!("swiglu: last dimension {two_n} is odd")
    }
    match x.device() {
        Device::Cpu if x.dtype() == candle_core::DType::F32 => x.contiguous()?.apply_op1_no_bwd(&CpuSwiglu),
        _ => candle_nn_swiglu(x),
    }
}

fn candle_nn_swiglu(x: &Tensor) -> Result<Tensor> {
    let chunks = x.chunk(2, 1)?;
    chunks[0].silu()? * &chunks[1]
}

struct CpuSwiglu;

impl CustomOp1 for CpuSwiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, two_n) = l.shape().dims2()?;
        let n = two_n / 2;
        let x = match l.contiguous_offsets() {
            Some((a, b)) => &s.as_slice::<f32>()?[a..b],
            None => bail!("swiglu: input must be contiguous"),
        };
        let mut out = vec![0f32; t * n];
        for_rows(t, n, &mut out, |r, o| {
            swiglu_row(&x[r * two_n..r * two_n + n], &x[r * two_n + n..(r + 1) * two_n], o)
        });
        Ok((CpuStorage::F32(out), Shape::from((t, n))))
    }
}

fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { swiglu_row_avx512(gate, up, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { swiglu_row_avx2(gate, up, out) };
        }
    }
    swiglu_row_impl(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn swiglu_row_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_row_impl(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_row_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_row_impl(gate, up, out)
}

#[inline(always)]
fn swiglu_row_impl(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_approx(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_silu_times_up() {
        for t in [1usize, 5, 40] {
            let x = Tensor::randn(0f32, 3.0, (t, 2 * 1536), &Device::Cpu).unwrap();
            let got = swiglu(&x).unwrap();
            let want = candle_nn_swiglu(&x).unwrap();
            assert_eq!(got.dims(), &[t, 1536]);
            let d: f32 =
                (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "t = {t}: max abs diff {d}");
        }
        assert!(swiglu(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let x = Tensor::new(&[[-1e4f32, 1e4, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]], &Device::Cpu).unwrap();
        let y: Vec<f32> = swiglu(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        assert!(y[0].abs() < 1e-30, "{y:?}");
        assert!((y[1] - 1e4 * 3.0).abs() < 1.0);
    }
}
