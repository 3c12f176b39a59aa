//! Multi-head latent attention (DeepSeek-V2/V3 MLA) over a paged latent cache.
//!
//! MLA compresses each token's keys and values into one latent row: the normalised
//! `kv_lora_rank` vector `c` followed by the rotary part of the key `k_pe`
//! (`qk_rope_head_dim`), shared by every head. With the up-projections absorbed into the
//! queries and the output (`q_lat = W_UK^T q_nope`, `out = W_UV o_lat`), attention runs
//! directly on the cached rows: a head's score is `q_h · row` (its absorbed no-rope part
//! against `c`, its rope part against `k_pe`), and its output is the softmax-weighted sum of
//! the rows' first `value_dim` (= `kv_lora_rank`) elements. All heads read the same rows,
//! so the cache holds `kv_lora_rank + qk_rope_head_dim` numbers per token and layer instead
//! of `heads × (qk_head_dim + v_head_dim)`.
//!
//! Cache layout, per layer: `[num_blocks, block_size, latent_dim]`, one contiguous row per
//! token; token `j` of a sequence sits at slot `table[j / block_size] * block_size + j %
//! block_size` (the same slots as [`crate::attention`]).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, InplaceOp2, Layout, Result, Shape, Tensor, bail};
use half::{bf16, f16};

use crate::attention::SeqSpan;
use crate::math::{axpy, dot16_inline, exp_approx};
use crate::par::{SharedOut, with_f32};

/// Shape of one layer's latent cache.
pub fn latent_cache_shape(num_blocks: usize, block_size: usize, latent_dim: usize) -> Shape {
    Shape::from((num_blocks, block_size, latent_dim))
}

/// Shape and batch description of a latent attention call.
#[derive(Clone, Debug)]
pub struct LatentAttentionParams {
    pub seqs: Arc<[SeqSpan]>,
    pub num_heads: usize,
    /// Numbers per cached row (`kv_lora_rank + qk_rope_head_dim`); also the query width.
    pub latent_dim: usize,
    /// Leading numbers of a row that are the value (`kv_lora_rank`).
    pub value_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

impl LatentAttentionParams {
    fn validate(&self, q: &Tensor, cache: &Tensor) -> Result<()> {
        let (rows, heads, d) = q.dims3()?;
        if heads != self.num_heads || d != self.latent_dim {
            bail!("latent attention: q is {:?}, expected [T, {}, {}]", q.shape(), self.num_heads, self.latent_dim)
        }
        if self.value_dim > self.latent_dim {
            bail!("latent attention: value_dim {} exceeds latent_dim {}", self.value_dim, self.latent_dim)
        }
        let nb = cache.dim(0)?;
        if cache.shape() != &latent_cache_shape(nb, self.block_size, self.latent_dim) {
            bail!(
                "latent attention: cache {:?}, expected [{nb}, {}, {}]",
                cache.shape(),
                self.block_size,
                self.latent_dim
            )
        }
        let mut expected_start = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.q_start != expected_start || s.q_len > s.ctx_len {
                bail!("latent attention: sequence {i} has a bad span {s:?}")
            }
            expected_start += s.q_len;
            if s.block_table.len() * self.block_size < s.ctx_len {
                bail!("latent attention: sequence {i} needs {} tokens but has too few blocks", s.ctx_len)
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= nb) {
                bail!("latent attention: block {b} out of range ({nb} blocks)")
            }
        }
        if expected_start != rows {
            bail!("latent attention: sequences cover {expected_start} rows, batch has {rows}")
        }
        Ok(())
    }
}

/// Attention of the stacked absorbed queries `q` (`[T, num_heads, latent_dim]`, f32) over
/// the latent cache. Returns `[T, num_heads, value_dim]` (f32).
pub fn latent_attention(q: &Tensor, cache: &Tensor, params: &LatentAttentionParams) -> Result<Tensor> {
    params.validate(q, cache)?;
    match q.device() {
        Device::Cpu => q.apply_op2_no_bwd(cache, &CpuLatentAttention(params.clone())),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if crate::cuda::latent_attention_supported(params) && q.dtype() == DType::F32 => {
            q.contiguous()?.apply_op2_no_bwd(cache, &crate::cuda::LatentAttention(params.clone()))
        }
        _ => latent_attention_reference(q, cache, params),
    }
}

/// The same maths with candle ops: device-generic, used off-CPU and as the test reference.
pub fn latent_attention_reference(q: &Tensor, cache: &Tensor, p: &LatentAttentionParams) -> Result<Tensor> {
    let (nb, bs, d) = cache.dims3()?;
    let flat = cache.reshape((nb * bs, d))?;
    let heads = p.num_heads;
    let mut outs = Vec::with_capacity(p.seqs.len());
    for s in p.seqs.iter() {
        let slots: Vec<u32> = (0..s.ctx_len).map(|j| s.block_table[j / bs] * bs as u32 + (j % bs) as u32).collect();
        let slots = Tensor::new(slots.as_slice(), q.device())?;
        let ctx = flat.index_select(&slots, 0)?.to_dtype(DType::F32)?; // [ctx, d]
        let qs = q.narrow(0, s.q_start, s.q_len)?.reshape((s.q_len * heads, d))?;
        let scores = (qs.matmul(&ctx.t()?)? * p.scale as f64)?.reshape((s.q_len, heads, s.ctx_len))?;
        let first_pos = s.ctx_len - s.q_len;
        let mask: Vec<f32> = (0..s.q_len)
            .flat_map(|i| (0..s.ctx_len).map(move |j| if j <= first_pos + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (s.q_len, 1, s.ctx_len), q.device())?;
        let scores = scores.broadcast_add(&mask)?;
        let max = scores.max_keepdim(candle_core::D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
        let values = ctx.narrow(1, 0, p.value_dim)?.contiguous()?;
        let o = probs.reshape((s.q_len * heads, s.ctx_len))?.matmul(&values)?;
        outs.push(o.reshape((s.q_len, heads, p.value_dim))?);
    }
    if outs.is_empty() {
        return Tensor::zeros((0, heads, p.value_dim), DType::F32, q.device());
    }
    Tensor::cat(&outs, 0)
}

/// Writes a step's latent rows (`[T, latent_dim]`) into the layer's cache at `slots` (u32 `[T]`).
pub fn write_latent(cache: &Tensor, rows: &Tensor, slots: &Tensor) -> Result<()> {
    let (nb, bs, d) = cache.dims3()?;
    let (t, rd) = rows.dims2()?;
    if rd != d || slots.dims1()? != t {
        bail!(
            "write_latent: rows {:?} / slots {:?} do not fit the cache {:?}",
            rows.shape(),
            slots.shape(),
            cache.shape()
        )
    }
    if !cache.is_contiguous() {
        bail!("write_latent: the cache must be contiguous")
    }
    if t == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if cache.device().is_cuda() {
        // No copy of the slots back to the host: the kernel skips slots past the cache.
        let (rows, slots) = (rows.to_dtype(DType::F32)?.contiguous()?, slots.to_dtype(DType::U32)?.contiguous()?);
        return cache.inplace_op3(&rows, &slots, &crate::cuda::WriteCache::Latent);
    }
    let slot_vec: Vec<u32> = slots.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(s) = slot_vec.iter().find(|&&s| s as usize >= nb * bs) {
        bail!("write_latent: slot {s} out of range ({} slots)", nb * bs)
    }
    match cache.device() {
        Device::Cpu => cache.inplace_op2(&rows.to_dtype(DType::F32)?.contiguous()?, &CpuWriteLatent(slot_vec)),
        _ => {
            let idx: Vec<u32> = slot_vec.iter().flat_map(|&s| (0..d as u32).map(move |i| s * d as u32 + i)).collect();
            let n = idx.len();
            let idx = Tensor::from_vec(idx, n, cache.device())?;
            cache.flatten_all()?.scatter_set(&idx, &rows.to_dtype(cache.dtype())?.flatten_all()?, 0)
        }
    }
}

/// Per-head products `y[t, h] = x[t, h] · w[h]` for `x: [T, H, K]` (f32) and `w: [H, K, N]`:
/// the weight absorption of MLA (`W_UK` into the queries, `W_UV` into the output). On CPU
/// every output row is summed over `k` in order, whatever `T` is, so a row never depends
/// on its batch; elsewhere a batched matmul.
pub fn head_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (t, h, k) = x.dims3()?;
    let (wh, wk, n) = w.dims3()?;
    if (wh, wk) != (h, k) {
        bail!("head_matmul: x {:?} does not fit w {:?}", x.shape(), w.shape())
    }
    if !x.device().is_cpu() {
        // In the weight's dtype (bf16 off-CPU): converting the activations is far cheaper
        // than converting the weights every step.
        let y = x.transpose(0, 1)?.to_dtype(w.dtype())?.contiguous()?.matmul(w)?;
        return y.transpose(0, 1)?.to_dtype(x.dtype())?.contiguous();
    }
    let mut out = vec![0f32; t * h * n];
    with_f32(&x.to_dtype(DType::F32)?, |xs| {
        with_f32(&w.to_dtype(DType::F32)?, |ws| {
            crate::par::for_rows(t * h, n, &mut out, |r, o| {
                let head = r % h;
                let xr = &xs[r * k..(r + 1) * k];
                let wh = &ws[head * k * n..(head + 1) * k * n];
                for (kk, &xv) in xr.iter().enumerate() {
                    axpy(xv, &wh[kk * n..(kk + 1) * n], o);
                }
            })
        })
    })??;
    Tensor::from_vec(out, (t, h, n), &Device::Cpu)
}

struct CpuWriteLatent(Vec<u32>);

impl InplaceOp2 for CpuWriteLatent {
    fn name(&self) -> &'static str {
        "write-latent-cache"
    }

    fn cpu_fwd(&self, cache: &mut CpuStorage, cl: &Layout, rows: &CpuStorage, rl: &Layout) -> Result<()> {
        let d = *cl.dims().last().unwrap_or(&0);
        let rows = match rl.contiguous_offsets() {
            Some((a, b)) => &rows.as_slice::<f32>()?[a..b],
            None => bail!("write_latent: rows must be contiguous"),
        };
        let off = cl.start_offset();
        fn put<T: Copy>(dst: &mut [T], off: usize, d: usize, slots: &[u32], rows: &[f32], conv: impl Fn(f32) -> T) {
            for (i, &s) in slots.iter().enumerate() {
                let dst = &mut dst[off + s as usize * d..off + (s as usize + 1) * d];
                for (o, &x) in dst.iter_mut().zip(&rows[i * d..(i + 1) * d]) {
                    *o = conv(x);
                }
            }
        }
        match cache {
            CpuStorage::F32(c) => put(c, off, d, &self.0, rows, |x| x),
            CpuStorage::F16(c) => put(c, off, d, &self.0, rows, f16::from_f32),
            CpuStorage::BF16(c) => put(c, off, d, &self.0, rows, bf16::from_f32),
            other => bail!("write_latent: unsupported cache dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

struct CpuLatentAttention(LatentAttentionParams);

/// Query heads handled by one work item: they share every loaded cache row.
const HEAD_TILE: usize = 4;

impl CustomOp2 for CpuLatentAttention {
    fn name(&self) -> &'static str {
        "latent-attention"
    }

    fn cpu_fwd(&self, q: &CpuStorage, ql: &Layout, c: &CpuStorage, cl: &Layout) -> Result<(CpuStorage, Shape)> {
        let slice = |l: &Layout, what: &str| match l.contiguous_offsets() {
            Some(r) => Ok(r),
            None => bail!("latent attention: {what} must be contiguous"),
        };
        let (qa, qb) = slice(ql, "q")?;
        let q = &q.as_slice::<f32>()?[qa..qb];
        let (ca, cb) = slice(cl, "cache")?;
        let out = match c {
            CpuStorage::F32(c) => self.run(q, &c[ca..cb]),
            CpuStorage::F16(c) => self.run(q, &c[ca..cb]),
            CpuStorage::BF16(c) => self.run(q, &c[ca..cb]),
            other => bail!("latent attention: unsupported cache dtype {:?}", other.dtype()),
        };
        let (t, h, _) = ql.shape().dims3()?;
        Ok((CpuStorage::F32(out), Shape::from((t, h, self.0.value_dim))))
    }
}

/// Cache element types the CPU kernel reads.
trait LatentElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}
impl LatentElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl LatentElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl LatentElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// One work item: heads `h0..h0 + n` of query row `row`, attending to `n_keys` keys.
struct Item<'a> {
    q: &'a [f32],
    n: usize,
    n_keys: usize,
    table: &'a [u32],
}

impl CpuLatentAttention {
    fn run<T: LatentElem>(&self, q: &[f32], cache: &[T]) -> Vec<f32> {
        let p = &self.0;
        let (nh, d, dv) = (p.num_heads, p.latent_dim, p.value_dim);
        let rows: usize = p.seqs.iter().map(|s| s.q_len).sum();
        let mut out = vec![0f32; rows * nh * dv];
        let mut items = Vec::new();
        for (si, s) in p.seqs.iter().enumerate() {
            for t in 0..s.q_len {
                for h0 in (0..nh).step_by(HEAD_TILE) {
                    items.push((si, t, h0));
                }
            }
        }
        let out_ptr = SharedOut::new(&mut out);
        let work = |range: std::ops::Range<usize>| {
            let mut scratch = (Vec::new(), Vec::new());
            for &(si, t, h0) in &items[range] {
                let s = &p.seqs[si];
                let row = s.q_start + t;
                let n = (nh - h0).min(HEAD_TILE);
                // SAFETY: (row, heads h0..h0+n) belongs to this item only.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((row * nh + h0) * dv), n * dv) };
                let item = Item {
                    q: &q[(row * nh + h0) * d..(row * nh + h0 + n) * d],
                    n,
                    n_keys: s.ctx_len - s.q_len + t + 1,
                    table: &s.block_table,
                };
                attend(p, &item, cache, o, &mut scratch);
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(items.len(), work);
        out
    }
}

#[inline]
fn attend<T: LatentElem>(
    p: &LatentAttentionParams,
    item: &Item,
    cache: &[T],
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { attend_avx512(p, item, cache, out, scratch) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { attend_avx2(p, item, cache, out, scratch) };
        }
    }
    attend_impl(p, item, cache, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_avx512<T: LatentElem>(
    p: &LatentAttentionParams,
    item: &Item,
    cache: &[T],
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
) {
    attend_impl(p, item, cache, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: LatentElem>(
    p: &LatentAttentionParams,
    item: &Item,
    cache: &[T],
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
) {
    attend_impl(p, item, cache, out, scratch)
}

/// Scores, softmax and value sum for one item. Each score is a 16-lane dot product with
/// one fixed reduction tree, keys are visited in order, so the result never depends on
/// the rest of the batch.
#[inline(always)]
fn attend_impl<T: LatentElem>(
    p: &LatentAttentionParams,
    item: &Item,
    cache: &[T],
    out: &mut [f32],
    (scores, row): &mut (Vec<f32>, Vec<f32>),
) {
    let (d, dv, bs) = (p.latent_dim, p.value_dim, p.block_size);
    let (n, n_keys) = (item.n, item.n_keys);
    scores.clear();
    scores.resize(n * n_keys, 0.0);
    row.resize(d, 0.0);
    let slot = |j: usize| (item.table[j / bs] as usize * bs + j % bs) * d;
    for j in 0..n_keys {
        let base = slot(j);
        for (o, x) in row.iter_mut().zip(&cache[base..base + d]) {
            *o = x.to_f32();
        }
        for h in 0..n {
            scores[h * n_keys + j] = dot16_inline(&item.q[h * d..(h + 1) * d], row) * p.scale;
        }
    }
    for h in 0..n {
        let sc = &mut scores[h * n_keys..(h + 1) * n_keys];
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = exp_approx(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        sc.iter_mut().for_each(|s| *s *= inv);
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for j in 0..n_keys {
        let base = slot(j);
        for (o, x) in row.iter_mut().zip(&cache[base..base + dv]) {
            *o = x.to_f32();
        }
        for h in 0..n {
            let w = scores[h * n_keys + j];
            for (o, &v) in out[h * dv..(h + 1) * dv].iter_mut().zip(&row[..dv]) {
                *o = w.mul_add(v, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], rng: &mut rand::rngs::StdRng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Two sequences (one prefill chunk after context, one decode) over shuffled blocks.
    fn setup(dtype: DType) -> (Tensor, Tensor, LatentAttentionParams) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (nb, bs, d, dv, heads) = (12, 4, 40, 32, 6);
        let cache = random(&[nb, bs, d], &mut rng).to_dtype(dtype).unwrap();
        let seqs = vec![
            SeqSpan { q_start: 0, q_len: 3, ctx_len: 10, block_table: vec![5, 1, 9] },
            SeqSpan { q_start: 3, q_len: 1, ctx_len: 7, block_table: vec![0, 11] },
        ];
        let q = random(&[4, heads, d], &mut rng);
        let params = LatentAttentionParams {
            seqs: seqs.into(),
            num_heads: heads,
            latent_dim: d,
            value_dim: dv,
            block_size: bs,
            scale: 0.3,
        };
        (q, cache, params)
    }

    #[test]
    fn kernel_matches_reference() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (q, cache, p) = setup(dtype);
            let got = latent_attention(&q, &cache, &p).unwrap();
            let want = latent_attention_reference(&q, &cache, &p).unwrap();
            assert_eq!(got.dims(), &[4, 6, 32]);
            assert!(max_diff(&got, &want) < 1e-5, "{dtype:?}: {}", max_diff(&got, &want));
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let (q, cache, p) = setup(DType::F32);
        let both = latent_attention(&q, &cache, &p).unwrap();
        let alone_p = LatentAttentionParams {
            seqs: vec![SeqSpan { q_start: 0, q_len: 1, ctx_len: 7, block_table: vec![0, 11] }].into(),
            ..p.clone()
        };
        let alone = latent_attention(&q.narrow(0, 3, 1).unwrap(), &cache, &alone_p).unwrap();
        assert_eq!(max_diff(&both.narrow(0, 3, 1).unwrap(), &alone), 0.0);
    }

    #[test]
    fn head_matmul_is_a_per_head_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let x = random(&[5, 3, 8], &mut rng);
        let w = random(&[3, 8, 6], &mut rng);
        let got = head_matmul(&x, &w).unwrap();
        let want = x.transpose(0, 1).unwrap().contiguous().unwrap().matmul(&w).unwrap().transpose(0, 1).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let one = head_matmul(&x.narrow(0, 2, 1).unwrap(), &w).unwrap();
        assert_eq!(max_diff(&one, &got.narrow(0, 2, 1).unwrap()), 0.0);
    }

    #[test]
    fn write_puts_rows_at_their_slots() {
        let cache = Tensor::zeros((3, 2, 4), DType::BF16, &Device::Cpu).unwrap();
        let rows = Tensor::new(&[[1f32, 2., 3., 4.], [5., 6., 7., 8.]], &Device::Cpu).unwrap();
        write_latent(&cache, &rows, &Tensor::new(&[5u32, 0], &Device::Cpu).unwrap()).unwrap();
        let c = cache.to_dtype(DType::F32).unwrap().reshape((6, 4)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(c[5], vec![1., 2., 3., 4.]);
        assert_eq!(c[0], vec![5., 6., 7., 8.]);
        assert_eq!(c[1], vec![0.; 4]);
        let bad = write_latent(&cache, &rows, &Tensor::new(&[6u32, 0], &Device::Cpu).unwrap());
        assert!(bad.is_err());
    }
}
