//! Paged attention over a block-structured KV cache.
//!
//! Cache layout, per layer and for K and V alike: `[num_blocks, block_size, num_kv_heads,
//! head_dim]`. A sequence's context lives in the blocks of its block table, in order, so
//! token `j` of a sequence sits at slot `table[j / block_size] * block_size + j % block_size`.
//!
//! A batch is "varlen": the query rows of all sequences are stacked (`[T, num_heads,
//! head_dim]`), and [`SeqSpan`] says which rows belong to which sequence. Each query row
//! attends causally to its own sequence's context. Decode rows (one per sequence) and
//! prefill chunks (many rows per sequence) mix freely in one call.
//!
//! On CPU a dedicated kernel runs; elsewhere a composition of candle ops (gather the
//! context, matmul, masked softmax) gives the same maths until a device kernel lands.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, InplaceOp3, Layout, Result, Shape, Tensor, bail,
};
use half::{bf16, f16};

/// One sequence's share of a varlen attention batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First query row of this sequence in the batch.
    pub q_start: usize,
    /// Number of query rows (tokens computed this step).
    pub q_len: usize,
    /// Tokens in the cache once this step's keys are written (context + new tokens).
    pub ctx_len: usize,
    /// Cache blocks holding the context, in order.
    pub block_table: Vec<u32>,
}

/// Shape and batch description of a paged attention call.
#[derive(Clone, Debug)]
pub struct PagedAttentionParams {
    pub seqs: Arc<[SeqSpan]>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

impl PagedAttentionParams {
    fn validate(&self, q_rows: usize, num_blocks: usize) -> Result<()> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "paged attention: {} heads are not a multiple of {} kv heads",
                self.num_heads,
                self.num_kv_heads
            )
        }
        let mut expected_start = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.q_start != expected_start {
                bail!("paged attention: sequence {i} starts at row {} not {expected_start}", s.q_start)
            }
            expected_start += s.q_len;
            if s.q_len > s.ctx_len {
                bail!("paged attention: sequence {i} has {} queries for {} keys", s.q_len, s.ctx_len)
            }
            if s.block_table.len() * self.block_size < s.ctx_len {
                bail!(
                    "paged attention: sequence {i} needs {} tokens but has {} blocks of {}",
                    s.ctx_len,
                    s.block_table.len(),
                    self.block_size
                )
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                bail!("paged attention: block {b} out of range ({num_blocks} blocks)")
            }
        }
        if expected_start != q_rows {
            bail!("paged attention: sequences cover {expected_start} rows, batch has {q_rows}")
        }
        Ok(())
    }
}

/// Attention of the stacked queries `q` (`[T, num_heads, head_dim]`, f32) over the paged
/// caches. Returns `[T, num_heads * head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    params: &PagedAttentionParams,
) -> Result<Tensor> {
    let (rows, heads, hd) = q.dims3()?;
    if heads != params.num_heads || hd != params.head_dim {
        bail!("paged attention: q is {:?}, expected [T, {}, {}]", q.shape(), params.num_heads, params.head_dim)
    }
    let cache_shape = (k_cache.dim(0)?, params.block_size, params.num_kv_heads, params.head_dim);
    if k_cache.dims() != [cache_shape.0, cache_shape.1, cache_shape.2, cache_shape.3]
        || v_cache.shape() != k_cache.shape()
    {
        bail!("paged attention: caches {:?}/{:?} do not match {cache_shape:?}", k_cache.shape(), v_cache.shape())
    }
    params.validate(rows, cache_shape.0)?;
    let out = match q.device() {
        Device::Cpu => q.apply_op3_no_bwd(k_cache, v_cache, &CpuPagedAttention(params.clone()))?,
        _ => paged_attention_reference(q, k_cache, v_cache, params)?,
    };
    out.reshape((rows, heads * hd))
}

/// The same maths as the kernel, written with candle ops: device-generic, used off-CPU
/// and as the test reference.
pub fn paged_attention_reference(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    p: &PagedAttentionParams,
) -> Result<Tensor> {
    let (nb, bs, nkv, hd) = k_cache.dims4()?;
    let k_flat = k_cache.reshape((nb * bs, nkv, hd))?;
    let v_flat = v_cache.reshape((nb * bs, nkv, hd))?;
    let group = p.num_heads / nkv;
    let mut outs = Vec::with_capacity(p.seqs.len());
    for s in p.seqs.iter() {
        let slots: Vec<u32> = (0..s.ctx_len)
            .map(|j| s.block_table[j / bs] * bs as u32 + (j % bs) as u32)
            .collect();
        let slots = Tensor::new(slots.as_slice(), q.device())?;
        // [ctx, nkv, hd] -> [nkv, ctx, hd] -> repeat for the query heads of each group.
        let expand = |t: &Tensor| -> Result<Tensor> {
            let t = t.index_select(&slots, 0)?.to_dtype(DType::F32)?.transpose(0, 1)?;
            let t = t.unsqueeze(1)?.expand((nkv, group, s.ctx_len, hd))?;
            t.reshape((nkv * group, s.ctx_len, hd))
        };
        let k = expand(&k_flat)?;
        let v = expand(&v_flat)?;
        let qs = q.narrow(0, s.q_start, s.q_len)?.transpose(0, 1)?.contiguous()?;
        let scores = (qs.matmul(&k.t()?)? * p.scale as f64)?;
        let first_pos = s.ctx_len - s.q_len;
        let mask: Vec<f32> = (0..s.q_len)
            .flat_map(|i| {
                (0..s.ctx_len).map(move |j| if j <= first_pos + i { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, s.q_len, s.ctx_len), q.device())?;
        let probs = candle_core::Tensor::broadcast_add(&scores, &mask)?;
        let probs = softmax_last_dim(&probs)?;
        outs.push(probs.matmul(&v)?.transpose(0, 1)?);
    }
    if outs.is_empty() {
        return Tensor::zeros((0, p.num_heads, p.head_dim), DType::F32, q.device());
    }
    Tensor::cat(&outs, 0)
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(candle_core::D::Minus1)?;
    e.broadcast_div(&sum)
}

struct CpuPagedAttention(PagedAttentionParams);

/// Query rows handled together by one work item: they share the key/value reads.
const QUERY_TILE: usize = 16;

impl CustomOp3 for CpuPagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_slice(q.as_slice::<f32>()?, ql, "q")?;
        match (k, v) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?),
            (CpuStorage::F16(k), CpuStorage::F16(v)) => self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?),
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?),
            _ => bail!("paged attention: unsupported cache dtypes {:?}/{:?}", k.dtype(), v.dtype()),
        }
        .map(|out| (CpuStorage::F32(out), ql.shape().clone()))
    }
}

fn contiguous_slice<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("paged attention: {what} must be contiguous"),
    }
}

/// Cache element types the CPU kernel reads.
trait CacheElem: Copy + Send + Sync {
    fn load_row(src: &[Self], dst: &mut [f32]);
}
impl CacheElem for f32 {
    #[inline]
    fn load_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}
impl CacheElem for f16 {
    #[inline]
    fn load_row(src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32()
        }
    }
}
impl CacheElem for bf16 {
    #[inline]
    fn load_row(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32()
        }
    }
}

/// A raw output pointer shared by workers that write disjoint rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    // A method (not `.0`) so closures capture the Sync wrapper, not the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl CpuPagedAttention {
    fn run<T: CacheElem>(&self, q: &[f32], k: &[T], v: &[T]) -> Result<Vec<f32>> {
        let p = &self.0;
        let (nh, nkv, hd, bs) = (p.num_heads, p.num_kv_heads, p.head_dim, p.block_size);
        let group = nh / nkv;
        let mut out = vec![0f32; q.len()];
        // Work items: (sequence, kv head, tile of query rows).
        let mut items = Vec::new();
        for (si, s) in p.seqs.iter().enumerate() {
            for kvh in 0..nkv {
                for t0 in (0..s.q_len).step_by(QUERY_TILE) {
                    items.push((si, kvh, t0));
                }
            }
        }
        let out_ptr = SharedOut(out.as_mut_ptr());
        let work = |range: std::ops::Range<usize>| {
            let mut scratch = Scratch::default();
            for &(si, kvh, t0) in &items[range] {
                let s = &p.seqs[si];
                let rows = t0..(t0 + QUERY_TILE).min(s.q_len);
                for t in rows {
                    let row = s.q_start + t;
                    let last_key = s.ctx_len - s.q_len + t; // causal: keys 0..=last_key
                    let qh0 = kvh * group;
                    let q_rows = &q[(row * nh + qh0) * hd..(row * nh + qh0 + group) * hd];
                    // SAFETY: (row, heads qh0..qh0+group) belongs to this item only.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.get().add((row * nh + qh0) * hd), group * hd)
                    };
                    let key_at = |j: usize| {
                        let slot = s.block_table[j / bs] as usize * bs + j % bs;
                        (slot * nkv + kvh) * hd
                    };
                    attend_row(q_rows, group, hd, last_key + 1, key_at, k, v, p.scale, o, &mut scratch);
                }
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(items.len(), work);
        Ok(out)
    }
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    row: Vec<f32>,
}

/// Softmax attention of `group` query heads (sharing one kv head) over `n_keys` keys.
/// The per-head arithmetic is fixed, so a row's result never depends on its batch.
#[allow(clippy::too_many_arguments)]
#[inline]
fn attend_row<T: CacheElem>(
    q: &[f32],
    group: usize,
    hd: usize,
    n_keys: usize,
    key_at: impl Fn(usize) -> usize,
    k: &[T],
    v: &[T],
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    scratch.scores.clear();
    scratch.scores.resize(group * n_keys, 0.0);
    scratch.row.resize(hd, 0.0);
    let mut max = vec![f32::NEG_INFINITY; group];
    for j in 0..n_keys {
        let off = key_at(j);
        T::load_row(&k[off..off + hd], &mut scratch.row);
        for g in 0..group {
            let s = dot(&q[g * hd..(g + 1) * hd], &scratch.row) * scale;
            scratch.scores[g * n_keys + j] = s;
            if s > max[g] {
                max[g] = s;
            }
        }
    }
    let mut sums = vec![0f32; group];
    for g in 0..group {
        let scores = &mut scratch.scores[g * n_keys..(g + 1) * n_keys];
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max[g]).exp();
            sum += *s;
        }
        sums[g] = sum;
    }
    out.fill(0.0);
    for j in 0..n_keys {
        let off = key_at(j);
        T::load_row(&v[off..off + hd], &mut scratch.row);
        for g in 0..group {
            let w = scratch.scores[g * n_keys + j];
            axpy(w, &scratch.row, &mut out[g * hd..(g + 1) * hd]);
        }
    }
    for g in 0..group {
        let inv = 1.0 / sums[g];
        for o in &mut out[g * hd..(g + 1) * hd] {
            *o *= inv;
        }
    }
}

/// Dot product with 16 independent partial sums (vectorises without fast-math).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0f32;
    for i in chunks * 16..a.len() {
        tail = a[i].mul_add(b[i], tail);
    }
    let mut s8 = [0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail
}

#[inline]
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = x.mul_add(w, *y);
    }
}

/// Writes the new keys or values (`[T, num_kv_heads, head_dim]`) into the cache
/// (`[num_blocks, block_size, num_kv_heads, head_dim]`) at the given slots (u32 `[T]`).
pub fn write_cache(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    let (nb, bs, nkv, hd) = cache.dims4()?;
    let (t, snkv, shd) = src.dims3()?;
    if (snkv, shd) != (nkv, hd) || slots.dims1()? != t {
        bail!("write_cache: src {:?} / slots {:?} do not fit cache {:?}", src.shape(), slots.shape(), cache.shape())
    }
    if !cache.is_contiguous() {
        bail!("write_cache: the cache must be contiguous")
    }
    if t == 0 {
        return Ok(());
    }
    match cache.device() {
        Device::Cpu => cache.inplace_op3(src, slots, &CpuWriteCache { slots_total: nb * bs }),
        _ => {
            // Generic path: a scatter along the slot dimension of the flattened cache.
            let row = nkv * hd;
            let flat = cache.reshape((nb * bs, row))?;
            let idx = slots.to_dtype(DType::U32)?.unsqueeze(1)?.broadcast_as((t, row))?.contiguous()?;
            let src = src.to_dtype(cache.dtype())?.reshape((t, row))?;
            flat.scatter_set(&idx, &src, 0)
        }
    }
}

struct CpuWriteCache {
    slots_total: usize,
}

impl InplaceOp3 for CpuWriteCache {
    fn name(&self) -> &'static str {
        "write-kv-cache"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
        slots: &CpuStorage,
        ll: &Layout,
    ) -> Result<()> {
        let slots = contiguous_slice(slots.as_slice::<u32>()?, ll, "slots")?;
        let src = contiguous_slice(src.as_slice::<f32>()?, sl, "src")?;
        let row = src.len() / slots.len().max(1);
        let (start, _) = cl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cache not contiguous".into()))?;
        fn scatter<T: Copy>(dst: &mut [T], src: &[f32], slots: &[u32], row: usize, total: usize, conv: impl Fn(f32) -> T) -> Result<()> {
            for (t, &slot) in slots.iter().enumerate() {
                let slot = slot as usize;
                if slot >= total {
                    bail!("write_cache: slot {slot} out of range ({total} slots)")
                }
                for (d, s) in dst[slot * row..(slot + 1) * row].iter_mut().zip(&src[t * row..(t + 1) * row]) {
                    *d = conv(*s)
                }
            }
            Ok(())
        }
        match cache {
            CpuStorage::F32(c) => scatter(&mut c[start..], src, slots, row, self.slots_total, |x| x),
            CpuStorage::F16(c) => scatter(&mut c[start..], src, slots, row, self.slots_total, f16::from_f32),
            CpuStorage::BF16(c) => scatter(&mut c[start..], src, slots, row, self.slots_total, bf16::from_f32),
            other => bail!("write_cache: unsupported cache dtype {:?}", other.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn rand_tensor(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Builds a cache holding `ctx` random tokens for each sequence, with shuffled blocks.
    fn setup(
        rng: &mut StdRng,
        ctx_lens: &[usize],
        q_lens: &[usize],
        nh: usize,
        nkv: usize,
        hd: usize,
        bs: usize,
        dtype: DType,
    ) -> (Tensor, Tensor, Tensor, PagedAttentionParams) {
        let blocks_needed: usize = ctx_lens.iter().map(|c| c.div_ceil(bs)).sum();
        let nb = blocks_needed + 3;
        let k_cache = Tensor::zeros((nb, bs, nkv, hd), dtype, &Device::Cpu).unwrap();
        let v_cache = Tensor::zeros((nb, bs, nkv, hd), dtype, &Device::Cpu).unwrap();
        let mut free: Vec<u32> = (0..nb as u32).collect();
        // Deterministic shuffle so tables are not in order.
        for i in (1..free.len()).rev() {
            let j = rng.random_range(0..=i);
            free.swap(i, j);
        }
        let mut seqs = Vec::new();
        let mut q_start = 0;
        for (&ctx, &ql) in ctx_lens.iter().zip(q_lens) {
            let table: Vec<u32> = (0..ctx.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
            let slots: Vec<u32> = (0..ctx).map(|j| table[j / bs] * bs as u32 + (j % bs) as u32).collect();
            let slots = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
            write_cache(&k_cache, &rand_tensor(rng, &[ctx, nkv, hd]), &slots).unwrap();
            write_cache(&v_cache, &rand_tensor(rng, &[ctx, nkv, hd]), &slots).unwrap();
            seqs.push(SeqSpan { q_start, q_len: ql, ctx_len: ctx, block_table: table });
            q_start += ql;
        }
        let q = rand_tensor(rng, &[q_start, nh, hd]);
        let params = PagedAttentionParams {
            seqs: seqs.into(),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        (q, k_cache, v_cache, params)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn kernel_matches_reference_mixed_batch() {
        let mut rng = StdRng::seed_from_u64(7);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // decode rows, a prefill chunk on top of context, a fresh prompt longer than a tile
            let (q, k, v, p) = setup(&mut rng, &[5, 40, 37, 1], &[1, 9, 37, 1], 6, 2, 32, 16, dtype);
            let got = paged_attention(&q, &k, &v, &p).unwrap();
            let want = paged_attention_reference(&q, &k, &v, &p).unwrap().reshape(got.shape()).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{dtype:?}: max abs diff {d}");
        }
    }

    #[test]
    fn rows_do_not_depend_on_batch() {
        let mut rng = StdRng::seed_from_u64(3);
        let (q, k, v, p) = setup(&mut rng, &[20, 33], &[4, 33], 4, 4, 16, 8, DType::F32);
        let both = paged_attention(&q, &k, &v, &p).unwrap();
        // The second sequence alone.
        let mut alone = p.clone();
        alone.seqs = vec![SeqSpan { q_start: 0, ..p.seqs[1].clone() }].into();
        let q2 = q.narrow(0, 4, 33).unwrap();
        let got = paged_attention(&q2, &k, &v, &alone).unwrap();
        let want = both.narrow(0, 4, 33).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn bad_tables_are_errors() {
        let mut rng = StdRng::seed_from_u64(1);
        let (q, k, v, mut p) = setup(&mut rng, &[10], &[2], 2, 1, 8, 4, DType::F32);
        let mut s = p.seqs[0].clone();
        s.block_table[0] = 999;
        p.seqs = vec![s].into();
        assert!(paged_attention(&q, &k, &v, &p).is_err());
        let slots = Tensor::new(&[999u32], &Device::Cpu).unwrap();
        let src = Tensor::zeros((1, 1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(write_cache(&k, &src, &slots).is_err());
    }
}
