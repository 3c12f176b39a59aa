//! Paged attention over a block-structured KV cache.
//!
//! Cache layout, per layer:
//! - keys `[num_blocks, num_kv_heads, head_dim, block_size]`: transposed within a block, so
//!   the scores of a whole block are `head_dim` vector FMAs with no horizontal sums;
//! - values `[num_blocks, num_kv_heads, block_size, head_dim]`: one contiguous row per
//!   token, accumulated with vector FMAs.
//!
//! A sequence's context lives in the blocks of its block table, in order, so token `j` of a
//! sequence sits at slot `table[j / block_size] * block_size + j % block_size`.
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
use candle_core::{CpuStorage, CustomOp3, DType, Device, InplaceOp3, Layout, Result, Shape, Tensor, bail};
use half::{bf16, f16};

use crate::math::{exp_approx, sum16};
use crate::par::SharedOut;

/// Shape of one layer's key cache.
pub fn key_cache_shape(num_blocks: usize, kv_heads: usize, block_size: usize, head_dim: usize) -> Shape {
    Shape::from((num_blocks, kv_heads, head_dim, block_size))
}

/// Shape of one layer's value cache.
pub fn value_cache_shape(num_blocks: usize, kv_heads: usize, block_size: usize, head_dim: usize) -> Shape {
    Shape::from((num_blocks, kv_heads, block_size, head_dim))
}

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
            bail!("paged attention: {} heads are not a multiple of {} kv heads", self.num_heads, self.num_kv_heads)
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
    let nb = k_cache.dim(0)?;
    let (kshape, vshape) = (
        key_cache_shape(nb, params.num_kv_heads, params.block_size, hd),
        value_cache_shape(nb, params.num_kv_heads, params.block_size, hd),
    );
    if k_cache.shape() != &kshape || v_cache.shape() != &vshape {
        bail!("paged attention: caches {:?}/{:?}, expected {kshape:?}/{vshape:?}", k_cache.shape(), v_cache.shape())
    }
    params.validate(rows, nb)?;
    let out = match q.device() {
        Device::Cpu => q.apply_op3_no_bwd(k_cache, v_cache, &CpuPagedAttention(params.clone()))?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if crate::cuda::paged_attention_supported(params) && q.dtype() == DType::F32 => {
            q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &crate::cuda::PagedAttention(params.clone()))?
        }
        _ => paged_attention_reference(q, k_cache, v_cache, params)?,
    };
    out.reshape((rows, heads * hd))
}

/// The same maths as the kernel, written with candle ops: device-generic, used off-CPU
/// and as the test reference. Returns `[T, num_heads, head_dim]`.
pub fn paged_attention_reference(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    p: &PagedAttentionParams,
) -> Result<Tensor> {
    let (nb, nkv, hd, bs) = k_cache.dims4()?;
    // Both caches to one row per slot: [nb * bs, nkv, hd].
    let k_flat = k_cache.permute((0, 3, 1, 2))?.contiguous()?.reshape((nb * bs, nkv, hd))?;
    let v_flat = v_cache.transpose(1, 2)?.contiguous()?.reshape((nb * bs, nkv, hd))?;
    let group = p.num_heads / nkv;
    let mut outs = Vec::with_capacity(p.seqs.len());
    for s in p.seqs.iter() {
        let slots: Vec<u32> = (0..s.ctx_len).map(|j| s.block_table[j / bs] * bs as u32 + (j % bs) as u32).collect();
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
            .flat_map(|i| (0..s.ctx_len).map(move |j| if j <= first_pos + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, s.q_len, s.ctx_len), q.device())?;
        let probs = softmax_last_dim(&scores.broadcast_add(&mask)?)?;
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

/// Block size with a register-resident fast path (one AVX-512 vector of scores).
const LANES: usize = 16;

/// Value dimensions accumulated in registers at a time (four AVX-512 vectors).
const VCHUNK: usize = 64;

/// Query rows handled together by one work item.
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
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?)
            }
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?)
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.run(q, contiguous_slice(k, kl, "k")?, contiguous_slice(v, vl, "v")?)
            }
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
    /// The elements as f32: in place for f32, converted into `buf` otherwise. (No closures
    /// here: they would not inherit the caller's SIMD target features.)
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}
impl CacheElem for f32 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _buf: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}
impl CacheElem for f16 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        buf.resize(src.len(), 0.0);
        src.convert_to_f32_slice(buf);
        buf
    }
}
impl CacheElem for bf16 {
    #[inline(always)]
    fn as_f32<'a>(src: &'a [bf16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(src.len(), 0.0);
        // bf16 is the top half of an f32: a shift, which vectorises.
        for (o, x) in buf.iter_mut().zip(src) {
            *o = f32::from_bits(u32::from(x.to_bits()) << 16);
        }
        buf
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
        let out_ptr = SharedOut::new(&mut out);
        let work = |range: std::ops::Range<usize>| {
            let mut scratch = Scratch::default();
            for &(si, kvh, t0) in &items[range] {
                let s = &p.seqs[si];
                for t in t0..(t0 + QUERY_TILE).min(s.q_len) {
                    let row = s.q_start + t;
                    let qh0 = kvh * group;
                    // SAFETY: (row, heads qh0..qh0+group) belongs to this item only.
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((row * nh + qh0) * hd), group * hd) };
                    let task = RowTask {
                        q: &q[(row * nh + qh0) * hd..(row * nh + qh0 + group) * hd],
                        group,
                        hd,
                        // Causal: the row at position ctx_len - q_len + t sees keys up to itself.
                        n_keys: s.ctx_len - s.q_len + t + 1,
                        table: &s.block_table,
                        kvh,
                        nkv,
                        bs,
                        scale: p.scale,
                    };
                    attend_row(&task, k, v, o, &mut scratch);
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
    max: Vec<f32>,
    sums: Vec<f32>,
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
}

/// One query row's attention: `group` query heads sharing kv head `kvh`, over the first
/// `n_keys` keys of the sequence whose blocks are `table`.
struct RowTask<'a> {
    q: &'a [f32],
    group: usize,
    hd: usize,
    n_keys: usize,
    table: &'a [u32],
    kvh: usize,
    nkv: usize,
    bs: usize,
    scale: f32,
}

impl RowTask<'_> {
    /// Element offset of block `b` for this kv head (same in both caches) and its keys.
    #[inline(always)]
    fn block(&self, b: usize) -> (usize, usize) {
        let off = (self.table[b] as usize * self.nkv + self.kvh) * self.bs * self.hd;
        (off, self.bs.min(self.n_keys - b * self.bs))
    }
}

/// Softmax attention of one row on the widest SIMD the CPU has. Every path runs the same
/// scalar operations in the same order (fused multiply-adds, one fixed reduction tree),
/// so the result is the same on all of them and never depends on the row's batch.
#[inline]
fn attend_row<T: CacheElem>(task: &RowTask, k: &[T], v: &[T], out: &mut [f32], scratch: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { attend_row_avx512(task, k, v, out, scratch) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { attend_row_avx2(task, k, v, out, scratch) };
        }
    }
    attend_row_impl(task, k, v, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_row_avx512<T: CacheElem>(task: &RowTask, k: &[T], v: &[T], out: &mut [f32], scratch: &mut Scratch) {
    attend_row_impl(task, k, v, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_row_avx2<T: CacheElem>(task: &RowTask, k: &[T], v: &[T], out: &mut [f32], scratch: &mut Scratch) {
    attend_row_impl(task, k, v, out, scratch)
}

#[inline(always)]
fn attend_row_impl<T: CacheElem>(task: &RowTask, k: &[T], v: &[T], out: &mut [f32], scratch: &mut Scratch) {
    let RowTask { q, group, hd, n_keys, bs, scale, .. } = *task;
    let Scratch { scores, max, sums, kbuf, vbuf } = scratch;
    scores.clear();
    scores.resize(group * n_keys, 0.0);
    max.clear();
    max.resize(group, f32::NEG_INFINITY);
    sums.clear();
    sums.resize(group, 0.0);
    let n_blocks = n_keys.div_ceil(bs);

    // Scores: per block, keys are [hd, bs], so each dimension adds q[d] × a key column to
    // all of the block's scores at once.
    for b in 0..n_blocks {
        let (base, len) = task.block(b);
        let kt = T::as_f32(&k[base..base + hd * bs], kbuf);
        if bs == LANES {
            // The common block size: each head's 16 scores live in registers across `d`,
            // and up to four heads share each loaded key column.
            let mut g = 0;
            while g < group {
                let n = (group - g).min(4);
                let q = &q[g * hd..(g + n) * hd];
                let mut out = [[0f32; LANES]; 4];
                match n {
                    1 => block_scores::<1>(q, kt, hd, &mut out),
                    2 => block_scores::<2>(q, kt, hd, &mut out),
                    3 => block_scores::<3>(q, kt, hd, &mut out),
                    _ => block_scores::<4>(q, kt, hd, &mut out),
                }
                for (j, row) in out.iter().take(n).enumerate() {
                    let sc = &mut scores[(g + j) * n_keys + b * bs..(g + j) * n_keys + b * bs + len];
                    sc.copy_from_slice(&row[..len]);
                }
                g += n;
            }
        } else {
            for g in 0..group {
                let qg = &q[g * hd..(g + 1) * hd];
                let sc = &mut scores[g * n_keys + b * bs..g * n_keys + b * bs + len];
                for (d, &qd) in qg.iter().enumerate() {
                    let col = &kt[d * bs..d * bs + len];
                    for (s, &kv) in sc.iter_mut().zip(col) {
                        *s = qd.mul_add(kv, *s);
                    }
                }
            }
        }
        for g in 0..group {
            let sc = &mut scores[g * n_keys + b * bs..g * n_keys + b * bs + len];
            for s in sc.iter_mut() {
                *s *= scale;
            }
            max[g] = max[g].max(max_lanes(sc));
        }
    }
    for g in 0..group {
        let sc = &mut scores[g * n_keys..(g + 1) * n_keys];
        let m = max[g];
        for s in sc.iter_mut() {
            *s = exp_approx(*s - m);
        }
        sums[g] = sum_lanes(sc);
    }
    // Weighted values: each block's sum is built in registers (64 dims at a time), then
    // added to the output, in a fixed order.
    out.fill(0.0);
    for b in 0..n_blocks {
        let (base, len) = task.block(b);
        let vb = T::as_f32(&v[base..base + len * hd], vbuf);
        let mut g = 0;
        while g < group {
            // Up to four heads share each loaded value row.
            let n = (group - g).min(4);
            let w = |j: usize| &scores[(g + j) * n_keys + b * bs..(g + j) * n_keys + b * bs + len];
            let ws = [w(0), w(n.min(2) - 1), w(n.min(3) - 1), w(n - 1)];
            let og = &mut out[g * hd..(g + n) * hd];
            match n {
                1 => block_values::<1>(ws, vb, hd, og),
                2 => block_values::<2>(ws, vb, hd, og),
                3 => block_values::<3>(ws, vb, hd, og),
                _ => block_values::<4>(ws, vb, hd, og),
            }
            g += n;
        }
    }
    for g in 0..group {
        let inv = 1.0 / sums[g];
        for o in &mut out[g * hd..(g + 1) * hd] {
            *o *= inv;
        }
    }
}

/// Scores of one 16-key block (`kt`: `[hd, 16]`) for the `G` query heads in `q`
/// (`[G, hd]`), into `out[..G]`. Per head: four accumulators (d mod 4) hide the FMA
/// latency and are summed in a fixed order, whatever `G` is.
#[inline(always)]
fn block_scores<const G: usize>(q: &[f32], kt: &[f32], hd: usize, out: &mut [[f32; LANES]; 4]) {
    let mut acc = [[[0f32; LANES]; 4]; G];
    let col = |d: usize| -> &[f32; LANES] { kt[d * LANES..(d + 1) * LANES].try_into().expect("16 columns") };
    let quads = hd / 4;
    for d4 in 0..quads {
        let d = d4 * 4;
        let c = [col(d), col(d + 1), col(d + 2), col(d + 3)];
        for (h, acc) in acc.iter_mut().enumerate() {
            let qh = &q[h * hd + d..h * hd + d + 4];
            for j in 0..4 {
                for l in 0..LANES {
                    acc[j][l] = qh[j].mul_add(c[j][l], acc[j][l]);
                }
            }
        }
    }
    for d in quads * 4..hd {
        let c = col(d);
        for (h, acc) in acc.iter_mut().enumerate() {
            let qd = q[h * hd + d];
            for l in 0..LANES {
                acc[0][l] = qd.mul_add(c[l], acc[0][l]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        for l in 0..LANES {
            o[l] = (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]);
        }
    }
}

/// Adds the weighted value rows of one block (`vb`: `[len, hd]`, weights `ws[h]`) to the
/// outputs of `G` heads (`og`: `[G, hd]`). Per head: the block's sum is built in registers
/// (64 dims at a time) in key order, then added to the output.
#[inline(always)]
fn block_values<const G: usize>(ws: [&[f32]; 4], vb: &[f32], hd: usize, og: &mut [f32]) {
    let len = ws[0].len();
    let mut c0 = 0;
    while c0 + VCHUNK <= hd {
        let mut acc = [[0f32; VCHUNK]; G];
        for i in 0..len {
            let row: &[f32; VCHUNK] = vb[i * hd + c0..i * hd + c0 + VCHUNK].try_into().expect("chunk");
            for (h, acc) in acc.iter_mut().enumerate() {
                let wi = ws[h][i];
                for l in 0..VCHUNK {
                    acc[l] = row[l].mul_add(wi, acc[l]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (o, a) in og[h * hd + c0..h * hd + c0 + VCHUNK].iter_mut().zip(acc) {
                *o += a;
            }
        }
        c0 += VCHUNK;
    }
    for h in 0..G {
        for (i, &wi) in ws[h].iter().enumerate() {
            for (o, &x) in og[h * hd + c0..(h + 1) * hd].iter_mut().zip(&vb[i * hd + c0..(i + 1) * hd]) {
                *o = x.mul_add(wi, *o);
            }
        }
    }
}

/// Largest element (exact in any order, so 16 lanes let it vectorise).
#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for l in 0..16 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// Sum with 16 independent partial sums, then the fixed tree (vectorises).
#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    sum16(&acc) + tail
}

/// Writes a step's new keys and values (`[T, num_kv_heads, head_dim]` each) into the layer's
/// caches at the given slots (u32 `[T]`).
pub fn write_kv(k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor) -> Result<()> {
    let (nb, nkv, hd, bs) = k_cache.dims4()?;
    let (t, snkv, shd) = k.dims3()?;
    if (snkv, shd) != (nkv, hd) || v.shape() != k.shape() || slots.dims1()? != t {
        bail!(
            "write_kv: k {:?} / v {:?} / slots {:?} do not fit the cache {:?}",
            k.shape(),
            v.shape(),
            slots.shape(),
            k_cache.shape()
        )
    }
    if v_cache.shape() != &value_cache_shape(nb, nkv, bs, hd) {
        bail!("write_kv: value cache {:?} does not match key cache {:?}", v_cache.shape(), k_cache.shape())
    }
    if !k_cache.is_contiguous() || !v_cache.is_contiguous() {
        bail!("write_kv: the caches must be contiguous")
    }
    if t == 0 {
        return Ok(());
    }
    let geometry = CacheGeometry { num_blocks: nb, kv_heads: nkv, block_size: bs, head_dim: hd };
    match k_cache.device() {
        Device::Cpu => {
            k_cache.inplace_op3(k, slots, &CpuWriteCache { geometry, keys: true })?;
            v_cache.inplace_op3(v, slots, &CpuWriteCache { geometry, keys: false })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let slots = slots.to_dtype(DType::U32)?.contiguous()?;
            let (k, v) = (k.to_dtype(DType::F32)?.contiguous()?, v.to_dtype(DType::F32)?.contiguous()?);
            k_cache.inplace_op3(&k, &slots, &crate::cuda::WriteCache::Kv { keys: true })?;
            v_cache.inplace_op3(&v, &slots, &crate::cuda::WriteCache::Kv { keys: false })
        }
        _ => write_kv_reference(k_cache, v_cache, k, v, slots),
    }
}

/// [`write_kv`] with candle ops (an element scatter): device-generic, used off-CPU.
pub fn write_kv_reference(k_cache: &Tensor, v_cache: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor) -> Result<()> {
    let (nb, nkv, hd, bs) = k_cache.dims4()?;
    let g = CacheGeometry { num_blocks: nb, kv_heads: nkv, block_size: bs, head_dim: hd };
    let slots: Vec<u32> = slots.to_dtype(DType::U32)?.to_vec1()?;
    for (cache, src, keys) in [(k_cache, k, true), (v_cache, v, false)] {
        let mut idx = Vec::with_capacity(slots.len() * nkv * hd);
        for &s in &slots {
            for h in 0..nkv {
                for d in 0..hd {
                    idx.push(g.offset(s as usize, h, d, keys)? as u32);
                }
            }
        }
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, cache.device())?;
        let flat = cache.flatten_all()?;
        flat.scatter_set(&idx, &src.to_dtype(cache.dtype())?.flatten_all()?, 0)?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct CacheGeometry {
    num_blocks: usize,
    kv_heads: usize,
    block_size: usize,
    head_dim: usize,
}

impl CacheGeometry {
    /// Element offset of (slot, head, dim) in the key (transposed) or value cache.
    #[inline]
    fn offset(&self, slot: usize, h: usize, d: usize, keys: bool) -> Result<usize> {
        let (bs, hd) = (self.block_size, self.head_dim);
        if slot >= self.num_blocks * bs {
            bail!("write_kv: slot {slot} out of range ({} slots)", self.num_blocks * bs)
        }
        let head_base = ((slot / bs) * self.kv_heads + h) * bs * hd;
        Ok(if keys { head_base + d * bs + slot % bs } else { head_base + (slot % bs) * hd + d })
    }
}

struct CpuWriteCache {
    geometry: CacheGeometry,
    keys: bool,
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
        let (start, _) =
            cl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cache not contiguous".into()))?;
        fn scatter<E: Copy>(
            dst: &mut [E],
            src: &[f32],
            slots: &[u32],
            g: CacheGeometry,
            keys: bool,
            conv: impl Fn(f32) -> E,
        ) -> Result<()> {
            let (nkv, hd) = (g.kv_heads, g.head_dim);
            for (t, &slot) in slots.iter().enumerate() {
                for h in 0..nkv {
                    let row = &src[(t * nkv + h) * hd..(t * nkv + h + 1) * hd];
                    if keys {
                        let base = g.offset(slot as usize, h, 0, true)?;
                        for (d, &x) in row.iter().enumerate() {
                            dst[base + d * g.block_size] = conv(x);
                        }
                    } else {
                        let base = g.offset(slot as usize, h, 0, false)?;
                        for (o, &x) in dst[base..base + hd].iter_mut().zip(row) {
                            *o = conv(x);
                        }
                    }
                }
            }
            Ok(())
        }
        let (g, keys) = (self.geometry, self.keys);
        match cache {
            CpuStorage::F32(c) => scatter(&mut c[start..], src, slots, g, keys, |x| x),
            CpuStorage::F16(c) => scatter(&mut c[start..], src, slots, g, keys, f16::from_f32),
            CpuStorage::BF16(c) => scatter(&mut c[start..], src, slots, g, keys, bf16::from_f32),
            other => bail!("write_kv: unsupported cache dtype {:?}", other.dtype()),
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

    fn caches(nb: usize, nkv: usize, bs: usize, hd: usize, dtype: DType) -> (Tensor, Tensor) {
        (
            Tensor::zeros(key_cache_shape(nb, nkv, bs, hd), dtype, &Device::Cpu).unwrap(),
            Tensor::zeros(value_cache_shape(nb, nkv, bs, hd), dtype, &Device::Cpu).unwrap(),
        )
    }

    /// Builds caches holding `ctx` random tokens for each sequence, with shuffled blocks.
    #[allow(clippy::too_many_arguments)]
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
        let (k_cache, v_cache) = caches(nb, nkv, bs, hd, dtype);
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
            write_kv(
                &k_cache,
                &v_cache,
                &rand_tensor(rng, &[ctx, nkv, hd]),
                &rand_tensor(rng, &[ctx, nkv, hd]),
                &slots,
            )
            .unwrap();
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
            for bs in [16, 5] {
                // decode rows, a prefill chunk on top of context, a fresh prompt longer than a tile
                let (q, k, v, p) = setup(&mut rng, &[5, 40, 37, 1], &[1, 9, 37, 1], 6, 2, 32, bs, dtype);
                let got = paged_attention(&q, &k, &v, &p).unwrap();
                let want = paged_attention_reference(&q, &k, &v, &p).unwrap().reshape(got.shape()).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-5, "{dtype:?}, block size {bs}: max abs diff {d}");
            }
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
    fn cache_write_kernel_matches_scatter() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in [DType::F32, DType::F16] {
            let (ka, va) = caches(5, 2, 4, 8, dtype);
            let (kb, vb) = caches(5, 2, 4, 8, dtype);
            let (k, v) = (rand_tensor(&mut rng, &[6, 2, 8]), rand_tensor(&mut rng, &[6, 2, 8]));
            let slots = Tensor::new(&[0u32, 7, 4, 19, 8, 13], &Device::Cpu).unwrap();
            write_kv(&ka, &va, &k, &v, &slots).unwrap();
            write_kv_reference(&kb, &vb, &k, &v, &slots).unwrap();
            for (a, b) in [(ka.clone(), kb.clone()), (va.clone(), vb.clone())] {
                let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a, b);
            }
        }
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
        assert!(write_kv(&k, &v, &src, &src, &slots).is_err());
    }

    /// Timing aid (not a pass/fail test): `cargo test --release -p ragnode-kernels
    /// decode_attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decode_attention_timing() {
        let (nh, nkv, hd, bs, nseq, ctx) = (9usize, 3usize, 64usize, 16usize, 16usize, 100usize);
        let per = ctx.div_ceil(bs);
        // KV_COLD=1: 40 disjoint block sets (~100 MB of f32 cache), one per call, so the
        // cache streams from memory as in a real decode step across 30 layers.
        let sets = if std::env::var("KV_COLD").is_ok() { 40 } else { 1 };
        let nb = sets * nseq * per + 1;
        let dtype = match std::env::var("KV_DTYPE").as_deref() {
            Ok("f16") => DType::F16,
            Ok("bf16") => DType::BF16,
            _ => DType::F32,
        };
        let fill = |shape: Shape| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let k = fill(key_cache_shape(nb, nkv, bs, hd));
        let v = fill(value_cache_shape(nb, nkv, bs, hd));
        let params: Vec<PagedAttentionParams> = (0..sets)
            .map(|set| PagedAttentionParams {
                seqs: (0..nseq)
                    .map(|i| SeqSpan {
                        q_start: i,
                        q_len: 1,
                        ctx_len: ctx,
                        block_table: (0..per).map(|b| ((set * nseq + i) * per + b) as u32).collect(),
                    })
                    .collect::<Vec<_>>()
                    .into(),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                block_size: bs,
                scale: 0.125,
            })
            .collect();
        let q = Tensor::randn(0f32, 1.0, (nseq, nh, hd), &Device::Cpu).unwrap();
        for p in params.iter().cycle().take(sets.max(10)) {
            paged_attention(&q, &k, &v, p).unwrap();
        }
        let n = 300;
        let t = std::time::Instant::now();
        for p in params.iter().cycle().take(n) {
            paged_attention(&q, &k, &v, p).unwrap();
        }
        eprintln!(
            "decode attention, {dtype:?} cache{}, {nseq} seqs x {ctx} keys: {:.1} us/call",
            if sets > 1 { " (cold)" } else { "" },
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
