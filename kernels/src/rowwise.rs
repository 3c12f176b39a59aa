//! Row-wise ops of the decoder layer, fused and free of candle's rayon dispatch (which would
//! hand each small op to another thread): RMS norm, residual add, and the split of a fused
//! qkv projection with rotary embedding applied to q and k.
//!
//! Each row is computed the same way whatever the batch, so results never depend on it.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor, bail};

use crate::math::sum16;
use crate::par::{PARALLEL_MIN, SharedOut, for_rows, with_f32};

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("{what} must be contiguous"),
    }
}

/// `y = x · wᵀ` for `x: [T, k]` and a dense `w: [n, k]`, each output one fixed-order dot
/// product (so a row never depends on its batch, unlike a blocked GEMM that picks its
/// kernel by the batch size). For small dense layers whose outputs make discrete choices:
/// MoE routers. Off-CPU (or not f32), candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        bail!("matmul_t: x {:?} does not fit w {:?}", x.shape(), w.shape())
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return x.matmul(&w.t()?);
    }
    let mut out = vec![0f32; t * n];
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            for_rows(t, n, &mut out, |r, o| {
                let xr = &xs[r * k..(r + 1) * k];
                for (j, y) in o.iter_mut().enumerate() {
                    *y = crate::math::dot16(xr, &ws[j * k..(j + 1) * k]);
                }
            })
        })
    })??;
    Tensor::from_vec(out, (t, n), x.device())
}

/// `x / rms(x) * weight` over the last dimension of `x: [T, d]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })
    } else if x.device().is_cuda() && x.dtype() == weight.dtype() {
        // candle's fused CUDA kernel (one block per row).
        candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
    } else {
        rms_norm_reference(x, weight, eps)
    }
}

/// [`rms_norm`] with candle ops (device-generic).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps as f64)?.sqrt()?)?;
    y.broadcast_mul(&weight.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms_norm input")?;
        let w = f32_slice(ws, wl, "rms_norm weight")?;
        let d = w.len();
        if d == 0 || xl.shape().dims().last() != Some(&d) {
            bail!("rms_norm: input {:?} does not end in the weight's {d}", xl.shape())
        }
        let rows = x.len() / d;
        let mut out = vec![0f32; x.len()];
        let eps = self.eps;
        for_rows(rows, d, &mut out, |r, o| {
            let row = &x[r * d..(r + 1) * d];
            let mean_sq = sum_sq(row) / d as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                *o = v * inv * w;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Sum of squares with 16 partial sums and a fixed tree.
fn sum_sq(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l] * c[l];
        }
    }
    sum16(&acc) + tail
}

/// `a + b` for two tensors of the same shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 && a.shape() == b.shape() {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
    } else {
        a + b
    }
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(&self, a: &CpuStorage, al: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(a, al, "add lhs")?, f32_slice(b, bl, "add rhs")?);
        let width = al.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; a.len()];
        for_rows(a.len() / width, width, &mut out, |r, o| {
            for ((o, x), y) in o.iter_mut().zip(&a[r * width..]).zip(&b[r * width..]) {
                *o = x + y;
            }
        });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }
}

/// `sum = x + residual` and `normed = rms_norm(sum) * weight` in one pass over `[T, d]`
/// rows (the residual stream's add and the next sub-layer's norm). Returns
/// `(sum, normed)`, each `[T, d]` f32; the CPU result is bit-identical to [`add`] then
/// [`rms_norm`].
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (t, d) = x.dims2()?;
    if residual.dims() != [t, d] || weight.dims() != [d] {
        bail!("add_rms_norm: x {:?}, residual {:?}, weight {:?}", x.shape(), residual.shape(), weight.shape())
    }
    let f32s = [x, residual, weight].iter().all(|t| t.dtype() == DType::F32);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && f32s {
        let planar = x.contiguous()?.apply_op3_no_bwd(
            &residual.contiguous()?,
            &weight.contiguous()?,
            &crate::cuda::AddRmsNorm { eps },
        )?;
        return Ok((planar.narrow(0, 0, t * d)?.reshape((t, d))?, planar.narrow(0, t * d, t * d)?.reshape((t, d))?));
    }
    if x.device().is_cpu() && f32s {
        let planar =
            x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &weight.contiguous()?, &AddRmsNorm { eps })?;
        return Ok((planar.narrow(0, 0, t * d)?.reshape((t, d))?, planar.narrow(0, t * d, t * d)?.reshape((t, d))?));
    }
    add_rms_norm_reference(x, residual, weight, eps)
}

/// [`add_rms_norm`] with candle ops (device-generic).
pub fn add_rms_norm_reference(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let sum = (x.to_dtype(DType::F32)? + residual.to_dtype(DType::F32)?)?;
    let normed = rms_norm_reference(&sum, weight, eps)?;
    Ok((sum, normed))
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, r, w) = (f32_slice(xs, xl, "x")?, f32_slice(rs, rl, "residual")?, f32_slice(ws, wl, "weight")?);
        let d = w.len();
        let n = x.len();
        // Planar output: all sum rows, then all normed rows; each row is written by one
        // worker (row r owns out[r*d..] and out[n + r*d..]).
        let mut out = vec![0f32; 2 * n];
        let ptr = SharedOut::new(&mut out);
        let eps = self.eps;
        let row = |i: usize| {
            // SAFETY: row i's two slices are disjoint from every other row's.
            let (sum, normed) = unsafe {
                (
                    std::slice::from_raw_parts_mut(ptr.get().add(i * d), d),
                    std::slice::from_raw_parts_mut(ptr.get().add(n + i * d), d),
                )
            };
            for ((o, a), b) in sum.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(&r[i * d..(i + 1) * d]) {
                *o = a + b;
            }
            let inv = 1.0 / (sum_sq(sum) / d as f32 + eps).sqrt();
            for ((o, &v), &w) in normed.iter_mut().zip(sum.iter()).zip(w) {
                *o = v * inv * w;
            }
        };
        let t = n / d.max(1);
        if n < PARALLEL_MIN || t < 2 {
            (0..t).for_each(row);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(t, |range| range.for_each(row));
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// Half-split rotary embedding applied in place to `x: [T, n, d]` (f32, contiguous; every
/// one of the n vectors of row t rotated with `cos`/`sin: [T, d/2]`). `x` must own its
/// storage (not share it with another tensor), as the write is in place.
pub fn rope_inplace(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (t, _, d) = x.dims3()?;
    if !d.is_multiple_of(2) || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        bail!("rope_inplace: x {:?} with cos/sin {:?}/{:?}", x.shape(), cos.shape(), sin.shape())
    }
    if !x.is_contiguous() || x.dtype() != DType::F32 {
        bail!("rope_inplace: x must be contiguous f32")
    }
    let (cos, sin) = (cos.to_dtype(DType::F32)?.contiguous()?, sin.to_dtype(DType::F32)?.contiguous()?);
    match x.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => x.inplace_op3(&cos, &sin, &crate::cuda::RopeInplace),
        candle_core::Device::Cpu => x.inplace_op3(&cos, &sin, &RopeInplace),
        _ => {
            // Device-generic fallback: rotate out of place and copy back.
            let y = rope_reference(x, &cos, &sin)?;
            x.slice_set(&y, 0, 0)
        }
    }
}

/// [`rope_inplace`]'s result out of place, with candle's `rope_thd` (the reference).
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, cos, sin)?.squeeze(0)
}

struct RopeInplace;

impl InplaceOp3 for RopeInplace {
    fn name(&self) -> &'static str {
        "rope-inplace"
    }

    fn cpu_fwd(
        &self,
        xs: &mut CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (cos, sin) = (f32_slice(cs, cl, "cos")?, f32_slice(ss, sl, "sin")?);
        let (t, n, d) = xl.shape().dims3()?;
        let Some((a, b)) = xl.contiguous_offsets() else { bail!("rope_inplace: x must be contiguous") };
        let CpuStorage::F32(x) = xs else { bail!("rope_inplace: x must be f32") };
        let half = d / 2;
        let mut tmp = vec![0f32; d];
        for (i, v) in x[a..b].chunks_exact_mut(d).enumerate() {
            let r = i / n;
            rotate(v, &cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half], &mut tmp);
            v.copy_from_slice(&tmp);
        }
        debug_assert_eq!(x[a..b].len(), t * n * d);
        Ok(())
    }
}

/// Splits a fused projection `qkv: [T, (nh + 2 nkv) hd]` into `q: [T, nh, hd]`,
/// `k: [T, nkv, hd]` (both rotated by half-split rope with `cos`/`sin: [T, hd/2]`) and
/// `v: [T, nkv, hd]`, each contiguous.
pub fn rope_split_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (t, width) = qkv.dims2()?;
    if width != (heads + 2 * kv_heads) * head_dim || !head_dim.is_multiple_of(2) {
        bail!("rope_split_qkv: width {width} is not ({heads} + 2 x {kv_heads}) x {head_dim} (even)")
    }
    if cos.dims() != [t, head_dim / 2] || sin.dims() != [t, head_dim / 2] {
        bail!("rope_split_qkv: cos/sin {:?}/{:?}, expected [{t}, {}]", cos.dims(), sin.dims(), head_dim / 2)
    }
    let (nq, nk) = (t * heads * head_dim, t * kv_heads * head_dim);
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        // One planar buffer [q | k | v]; the three views are contiguous slices of it.
        let planar = qkv.contiguous()?.apply_op3_no_bwd(
            &cos.contiguous()?,
            &sin.contiguous()?,
            &RopeSplit { heads, kv_heads, head_dim },
        )?;
        let q = planar.narrow(0, 0, nq)?.reshape((t, heads, head_dim))?;
        let k = planar.narrow(0, nq, nk)?.reshape((t, kv_heads, head_dim))?;
        let v = planar.narrow(0, nq + nk, nk)?.reshape((t, kv_heads, head_dim))?;
        return Ok((q, k, v));
    }
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda() && qkv.dtype() == DType::F32 {
        let planar = qkv.contiguous()?.apply_op3_no_bwd(
            &cos.to_dtype(DType::F32)?.contiguous()?,
            &sin.to_dtype(DType::F32)?.contiguous()?,
            &crate::cuda::RopeSplitQkv { heads, kv_heads, head_dim },
        )?;
        let q = planar.narrow(0, 0, nq)?.reshape((t, heads, head_dim))?;
        let k = planar.narrow(0, nq, nk)?.reshape((t, kv_heads, head_dim))?;
        let v = planar.narrow(0, nq + nk, nk)?.reshape((t, kv_heads, head_dim))?;
        return Ok((q, k, v));
    }
    let q = qkv.narrow(1, 0, heads * head_dim)?.contiguous()?.reshape((1, t, heads, head_dim))?;
    let k = qkv.narrow(1, heads * head_dim, kv_heads * head_dim)?.contiguous()?.reshape((1, t, kv_heads, head_dim))?;
    let v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim)?.contiguous()?;
    let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
    let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
    Ok((q, k, v.reshape((t, kv_heads, head_dim))?))
}

struct RopeSplit {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CustomOp3 for RopeSplit {
    fn name(&self) -> &'static str {
        "rope-split-qkv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "qkv")?;
        let (cos, sin) = (f32_slice(cs, cl, "cos")?, f32_slice(ss, sl, "sin")?);
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let half = hd / 2;
        let width = (nh + 2 * nkv) * hd;
        let t = x.len() / width;
        let mut out = vec![0f32; x.len()];
        // Output rows are laid out planar: all q rows, then all k rows, then all v rows.
        let (q_end, k_end) = (t * nh * hd, t * (nh + nkv) * hd);
        let ptr = SharedOut::new(&mut out);
        let row = |r: usize| {
            let src = &x[r * width..(r + 1) * width];
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            // SAFETY: row r owns its slices of the three planes.
            let (q, k, v) = unsafe {
                (
                    std::slice::from_raw_parts_mut(ptr.get().add(r * nh * hd), nh * hd),
                    std::slice::from_raw_parts_mut(ptr.get().add(q_end + r * nkv * hd), nkv * hd),
                    std::slice::from_raw_parts_mut(ptr.get().add(k_end + r * nkv * hd), nkv * hd),
                )
            };
            for (h, dst) in q.chunks_exact_mut(hd).enumerate() {
                rotate(&src[h * hd..(h + 1) * hd], c, s, dst);
            }
            for (h, dst) in k.chunks_exact_mut(hd).enumerate() {
                rotate(&src[(nh + h) * hd..(nh + h + 1) * hd], c, s, dst);
            }
            v.copy_from_slice(&src[(nh + nkv) * hd..]);
        };
        if x.len() < PARALLEL_MIN || t < 2 {
            (0..t).for_each(row);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(t, |range| range.for_each(row));
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len())))
    }
}

/// Half-split rotation of one head (same arithmetic as candle's `rope_thd`).
#[inline]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn rms_norm_matches_candle() {
        for t in [1usize, 7, 300] {
            let x = Tensor::randn(0f32, 2.0, (t, 576), &Device::Cpu).unwrap();
            let w = Tensor::randn(1f32, 0.1, 576, &Device::Cpu).unwrap();
            let got = rms_norm(&x, &w, 1e-5).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
            assert!(max_diff(&got, &rms_norm_reference(&x, &w, 1e-5).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn add_matches_candle() {
        let a = Tensor::randn(0f32, 1.0, (70, 576), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (70, 576), &Device::Cpu).unwrap();
        assert_eq!(max_diff(&add(&a, &b).unwrap(), &(&a + &b).unwrap()), 0.0);
    }

    #[test]
    fn rope_split_matches_candle_rope_thd() {
        let (nh, nkv, hd) = (9, 3, 64);
        for t in [1usize, 5, 200] {
            let qkv = Tensor::randn(0f32, 1.0, (t, (nh + 2 * nkv) * hd), &Device::Cpu).unwrap();
            let cos = Tensor::randn(0f32, 1.0, (t, hd / 2), &Device::Cpu).unwrap();
            let sin = Tensor::randn(0f32, 1.0, (t, hd / 2), &Device::Cpu).unwrap();
            let (q, k, v) = rope_split_qkv(&qkv, &cos, &sin, nh, nkv, hd).unwrap();
            assert!(q.is_contiguous() && k.is_contiguous() && v.is_contiguous());
            let rq = candle_nn::rotary_emb::rope_thd(
                &qkv.narrow(1, 0, nh * hd).unwrap().contiguous().unwrap().reshape((1, t, nh, hd)).unwrap(),
                &cos,
                &sin,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
            let rk = candle_nn::rotary_emb::rope_thd(
                &qkv.narrow(1, nh * hd, nkv * hd).unwrap().contiguous().unwrap().reshape((1, t, nkv, hd)).unwrap(),
                &cos,
                &sin,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
            let rv = qkv.narrow(1, (nh + nkv) * hd, nkv * hd).unwrap().reshape((t, nkv, hd)).unwrap();
            assert_eq!(max_diff(&q, &rq), 0.0);
            assert_eq!(max_diff(&k, &rk), 0.0);
            assert_eq!(max_diff(&v, &rv), 0.0);
        }
        let bad = Tensor::zeros((2, 10), DType::F32, &Device::Cpu).unwrap();
        let cs = Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(rope_split_qkv(&bad, &cs, &cs, 1, 1, 2).is_err());
    }

    #[test]
    fn add_rms_norm_equals_add_then_rms_norm() {
        for t in [1usize, 3, 64] {
            let x = Tensor::randn(0f32, 1.0, (t, 576), &Device::Cpu).unwrap();
            let r = Tensor::randn(0f32, 3.0, (t, 576), &Device::Cpu).unwrap();
            let w = Tensor::randn(1f32, 0.1, 576, &Device::Cpu).unwrap();
            let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-6).unwrap();
            let want_sum = add(&x, &r).unwrap();
            // Bit-identical to the two separate CPU kernels the models used before.
            assert_eq!(max_diff(&sum, &want_sum), 0.0);
            assert_eq!(max_diff(&normed, &rms_norm(&want_sum, &w, 1e-6).unwrap()), 0.0);
            let (rs, rn) = add_rms_norm_reference(&x, &r, &w, 1e-6).unwrap();
            assert!(max_diff(&sum, &rs) < 1e-6 && max_diff(&normed, &rn) < 1e-5);
        }
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(7, DType::F32, &Device::Cpu).unwrap();
        assert!(add_rms_norm(&x, &x, &w, 1e-6).is_err());
    }

    #[test]
    fn rope_inplace_matches_candle_rope_thd() {
        for (t, n, d) in [(1usize, 1usize, 64usize), (7, 16, 64), (33, 1, 32)] {
            let x = Tensor::randn(0f32, 1.0, (t, n, d), &Device::Cpu).unwrap();
            let cos = Tensor::randn(0f32, 1.0, (t, d / 2), &Device::Cpu).unwrap();
            let sin = Tensor::randn(0f32, 1.0, (t, d / 2), &Device::Cpu).unwrap();
            let want = rope_reference(&x, &cos, &sin).unwrap();
            let y = x.copy().unwrap();
            rope_inplace(&y, &cos, &sin).unwrap();
            assert_eq!(max_diff(&y, &want), 0.0);
            // The input it was copied from is untouched.
            assert!(max_diff(&x, &want) > 0.0 || t == 0);
        }
        let x = Tensor::zeros((2, 1, 6), DType::F32, &Device::Cpu).unwrap();
        let cs = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(rope_inplace(&x, &cs, &cs).is_err());
    }
}
