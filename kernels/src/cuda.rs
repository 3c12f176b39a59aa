//! The CUDA side of the kernels (feature `cuda`): candle custom ops whose `cuda_fwd`
//! launches `cuda/ragnode.cu` (compiled to PTX by build.rs, loaded once per device)
//! through cudarc on the device's stream. The public functions of [`crate::attention`],
//! [`crate::mla`], [`crate::rowwise`] and [`crate::sampling`] route CUDA tensors here;
//! each op's CPU twin is the kernel or reference the CPU path runs.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape,
    bail,
};

use crate::attention::{PagedAttentionParams, SeqSpan};
use crate::mla::LatentAttentionParams;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ragnode.ptx"));
const MODULE: &str = "ragnode";

/// Mirrors of the limits in ragnode.cu.
const PA_WARPS: u32 = 4;
const PA_MAX_HEAD_DIM: usize = 32 * 8;
const ML_WARPS: u32 = 4;
const ML_MAX_VALUE_DIM: usize = 32 * 16;
const SAMPLE_THREADS: u32 = 1024;

/// The kernel `name` (the module is loaded once per device) and the device's stream.
fn func(dev: &CudaDevice, name: &str) -> Result<(CudaFunction, Arc<CudaStream>)> {
    Ok((dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function(), dev.cuda_stream()))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("ragnode cuda kernels: unsupported dtype {d:?}"),
    })
}

fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{what} must be contiguous"),
    }
}

fn grid_for(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Runs `$body` with `$t` naming the element type of a cache dtype (the kernels' f32 /
/// f16 / bf16 variants); other dtypes are an error naming `$what`.
macro_rules! with_cache_type {
    ($dtype:expr, $what:expr, $t:ident => $body:block) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            d => bail!("{}: unsupported cache dtype {d:?}", $what),
        }
    };
}

/// Whether the attention kernel covers this shape (else the candle-ops reference runs).
pub(crate) fn paged_attention_supported(p: &PagedAttentionParams) -> bool {
    p.head_dim <= PA_MAX_HEAD_DIM && p.block_size.is_power_of_two()
}

pub(crate) fn latent_attention_supported(p: &LatentAttentionParams) -> bool {
    // Dynamic shared memory (scaled query + per-warp state) within the default 48 KiB.
    let shared = (p.latent_dim + ML_WARPS as usize * (2 + p.value_dim)) * 4;
    p.value_dim <= ML_MAX_VALUE_DIM && shared <= 48 << 10
}

/// Per-row sequence index and position, and the block tables padded to one width: what
/// the attention kernels read instead of the host-side spans. One upload per step: every
/// layer's attention call gets the same `Arc<[SeqSpan]>`, and [`row_map`] hands them the
/// copy already on the device.
struct RowMap {
    /// `[row_seq (rows) | row_pos (rows) | tables (seqs × max_blocks)]` in one buffer.
    data: CudaSlice<u32>,
    rows: usize,
    max_blocks: usize,
}

impl RowMap {
    fn upload(seqs: &[SeqSpan], dev: &CudaDevice) -> Result<Self> {
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let rows: usize = seqs.iter().map(|s| s.q_len).sum();
        let mut data = vec![0u32; 2 * rows + seqs.len().max(1) * max_blocks];
        let (mut r, tables) = (0, 2 * rows);
        for (i, s) in seqs.iter().enumerate() {
            let at = tables + i * max_blocks;
            data[at..at + s.block_table.len()].copy_from_slice(&s.block_table);
            for j in 0..s.q_len {
                data[r] = i as u32;
                data[rows + r] = (s.ctx_len - s.q_len + j) as u32;
                r += 1;
            }
        }
        Ok(Self { data: dev.clone_htod(&data)?, rows, max_blocks })
    }

    fn row_seq(&self) -> CudaView<'_, u32> {
        self.data.slice(0..self.rows)
    }

    fn row_pos(&self) -> CudaView<'_, u32> {
        self.data.slice(self.rows..2 * self.rows)
    }

    fn tables(&self) -> CudaView<'_, u32> {
        self.data.slice(2 * self.rows..)
    }
}

/// The last step's row map: (its spans, weakly held so the address cannot be reused while
/// cached; the device; the upload).
type CachedRowMap = (std::sync::Weak<[SeqSpan]>, candle_core::cuda_backend::DeviceId, Arc<RowMap>);
static LAST_ROW_MAP: std::sync::Mutex<Option<CachedRowMap>> = std::sync::Mutex::new(None);

/// The device copy of `seqs`' row map, uploaded on the first call of a step.
fn row_map(seqs: &Arc<[SeqSpan]>, dev: &CudaDevice) -> Result<Arc<RowMap>> {
    let mut last = LAST_ROW_MAP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((spans, id, map)) = last.as_ref()
        && spans.strong_count() > 0
        && std::ptr::addr_eq(spans.as_ptr(), Arc::as_ptr(seqs))
        && *id == dev.id()
    {
        return Ok(map.clone());
    }
    let map = Arc::new(RowMap::upload(seqs, dev)?);
    *last = Some((Arc::downgrade(seqs), dev.id(), map.clone()));
    Ok(map)
}

/// [`crate::attention::paged_attention`] on CUDA: `q [T, heads, head_dim]` f32 with the two
/// caches; returns `[T, heads, head_dim]` f32.
pub(crate) struct PagedAttention(pub PagedAttentionParams);

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "ragnode-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("ragnode-paged-attention: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let dev = qs.device().clone();
        let rows = ql.shape().dims()[0];
        let q = view::<f32>(qs, ql, "attention q")?;
        let n = rows * p.num_heads * p.head_dim;
        let out = unsafe { dev.alloc::<f32>(n.max(1))? };
        // No launch (and no zero-byte uploads, which the driver rejects) for an empty batch.
        if rows > 0 {
            let map = row_map(&p.seqs, &dev)?;
            let (row_seq, row_pos, tables) = (map.row_seq(), map.row_pos(), map.tables());
            let (max_blocks, heads, kvh, hd, bs) = (
                map.max_blocks as u32,
                p.num_heads as u32,
                p.num_kv_heads as u32,
                p.head_dim as u32,
                p.block_size as u32,
            );
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, heads, 1),
                block_dim: (PA_WARPS * 32, 1, 1),
                shared_mem_bytes: (hd + PA_WARPS * (2 + hd)) * 4,
            };
            let (f, stream) = func(&dev, &format!("paged_attention_{}", suffix(ks.dtype())?))?;
            with_cache_type!(ks.dtype(), "paged attention", T => {
                let (k, v) = (view::<T>(ks, kl, "key cache")?, view::<T>(vs, vl, "value cache")?);
                let mut b = stream.launch_builder(&f);
                b.arg(&out).arg(&q).arg(&k).arg(&v).arg(&row_seq).arg(&row_pos).arg(&tables);
                b.arg(&max_blocks).arg(&heads).arg(&kvh).arg(&hd).arg(&bs).arg(&p.scale);
                // SAFETY: arguments match the kernel; spans validated on the host.
                unsafe { b.launch(cfg) }.w()?;
            });
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, p.num_heads, p.head_dim))))
    }
}

/// [`crate::mla::latent_attention`] on CUDA: `q [T, heads, latent_dim]` f32 over the latent
/// cache; returns `[T, heads, value_dim]` f32.
pub(crate) struct LatentAttention(pub LatentAttentionParams);

impl CustomOp2 for LatentAttention {
    fn name(&self) -> &'static str {
        "ragnode-latent-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ragnode-latent-attention: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, cs: &CudaStorage, cl: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.0;
        let dev = qs.device().clone();
        let rows = ql.shape().dims()[0];
        let q = view::<f32>(qs, ql, "latent attention q")?;
        let out = unsafe { dev.alloc::<f32>((rows * p.num_heads * p.value_dim).max(1))? };
        if rows > 0 {
            let map = row_map(&p.seqs, &dev)?;
            let (row_seq, row_pos, tables) = (map.row_seq(), map.row_pos(), map.tables());
            let (ld, vd) = (p.latent_dim as u32, p.value_dim as u32);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, p.num_heads as u32, 1),
                block_dim: (ML_WARPS * 32, 1, 1),
                shared_mem_bytes: (ld + ML_WARPS * (2 + vd)) * 4,
            };
            let (f, stream) = func(&dev, &format!("latent_attention_{}", suffix(cs.dtype())?))?;
            let (max_blocks, heads, bs) = (map.max_blocks as u32, p.num_heads as u32, p.block_size as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&out).arg(&q);
            with_cache_type!(cs.dtype(), "latent attention", T => {
                let c = view::<T>(cs, cl, "latent cache")?;
                b.arg(&c).arg(&row_seq).arg(&row_pos).arg(&tables);
                b.arg(&max_blocks).arg(&heads).arg(&ld).arg(&vd).arg(&bs).arg(&p.scale);
                // SAFETY: arguments match the kernel; spans validated on the host.
                unsafe { b.launch(cfg) }.w()?;
            });
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, p.num_heads, p.value_dim))))
    }
}

/// Scatter of f32 rows into a paged cache in place: `Kv { keys }` for one of the two
/// per-head caches (`src [T, kv_heads, head_dim]`), `Latent` for the MLA cache
/// (`src [T, latent_dim]`). Slots are u32 `[T]`.
pub(crate) enum WriteCache {
    Kv { keys: bool },
    Latent,
}

impl InplaceOp3 for WriteCache {
    fn name(&self) -> &'static str {
        "ragnode-write-cache"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("ragnode-write-cache: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        cs: &mut CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        let dev = cs.device().clone();
        let src = view::<f32>(ss, sl, "cache rows")?;
        let slots = view::<u32>(is, il, "slots")?;
        let t = il.shape().elem_count() as u32;
        let n = sl.shape().elem_count();
        if n == 0 {
            return Ok(());
        }
        let Some((start, end)) = cl.contiguous_offsets() else { bail!("the cache must be contiguous") };
        let dims = cl.shape().dims().to_vec();
        let dtype = cs.dtype();
        let name = match self {
            Self::Kv { .. } => format!("write_cache_{}", suffix(dtype)?),
            Self::Latent => format!("write_latent_{}", suffix(dtype)?),
        };
        let (f, stream) = func(&dev, &name)?;
        let cfg = grid_for(n, 256);
        let args = match self {
            // dims: [blocks, kv_heads, head_dim, block_size] (keys) or
            // [blocks, kv_heads, block_size, head_dim] (values).
            Self::Kv { keys } => {
                let (nb, kvh) = (dims[0] as u32, dims[1] as u32);
                let (hd, bs) = if *keys { (dims[2] as u32, dims[3] as u32) } else { (dims[3] as u32, dims[2] as u32) };
                vec![kvh, hd, bs, nb, u32::from(*keys)]
            }
            // dims: [blocks, block_size, latent_dim]
            Self::Latent => vec![dims[2] as u32, (dims[0] * dims[1]) as u32],
        };
        with_cache_type!(dtype, "cache write", T => {
            let mut cache = cs.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            let mut b = stream.launch_builder(&f);
            b.arg(&mut cache).arg(&src).arg(&slots).arg(&t);
            for a in &args {
                b.arg(a);
            }
            // SAFETY: arguments match the kernel; out-of-range slots are skipped there.
            unsafe { b.launch(cfg) }.w()?;
        });
        Ok(())
    }
}

/// Fused residual add + RMS norm (f32): returns planar `[2 * T * d]` = sum, then normed.
pub(crate) struct AddRmsNorm {
    pub eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "ragnode-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("ragnode-add-rms-norm: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let (x, r, w) = (view::<f32>(xs, xl, "x")?, view::<f32>(rs, rl, "residual")?, view::<f32>(ws, wl, "weight")?);
        let d = wl.shape().elem_count();
        let t = xl.shape().elem_count() / d.max(1);
        let out = unsafe { dev.alloc::<f32>((2 * t * d).max(1))? };
        if t > 0 {
            let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (f, stream) = func(&dev, "add_rms_norm_f32")?;
            let (tu, du) = (t as u32, d as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&out).arg(&x).arg(&r).arg(&w).arg(&tu).arg(&du).arg(&self.eps);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * t * d)))
    }
}

/// Half-split rope in place on `x [T, n, d]` (f32, rotating all d) with `cos/sin [T, d/2]`.
pub(crate) struct RopeInplace;

impl InplaceOp3 for RopeInplace {
    fn name(&self) -> &'static str {
        "ragnode-rope-inplace"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("ragnode-rope-inplace: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        xs: &mut CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let dev = xs.device().clone();
        let (t, n, d) = xl.shape().dims3()?;
        let (cos, sin) = (view::<f32>(cs, cl, "cos")?, view::<f32>(ss, sl, "sin")?);
        let Some((a, b_end)) = xl.contiguous_offsets() else { bail!("rope: x must be contiguous") };
        let x = xs.as_cuda_slice_mut::<f32>()?;
        let mut x = x.slice_mut(a..b_end);
        if t * n * d == 0 {
            return Ok(());
        }
        let (f, stream) = func(&dev, "rope_inplace_f32")?;
        let (tu, nu, stride, half) = (t as u32, n as u32, d as u32, (d / 2) as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut x).arg(&cos).arg(&sin).arg(&tu).arg(&nu).arg(&stride).arg(&half);
        // SAFETY: arguments match the kernel.
        unsafe { b.launch(grid_for(t * n * d / 2, 256)) }.w()?;
        Ok(())
    }
}

/// Fused qkv split + rope (f32): returns planar `[q | k | v]` like the CPU kernel.
pub(crate) struct RopeSplitQkv {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CustomOp3 for RopeSplitQkv {
    fn name(&self) -> &'static str {
        "ragnode-rope-split-qkv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("ragnode-rope-split-qkv: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let (x, cos, sin) = (view::<f32>(xs, xl, "qkv")?, view::<f32>(cs, cl, "cos")?, view::<f32>(ss, sl, "sin")?);
        let n = xl.shape().elem_count();
        let out = unsafe { dev.alloc::<f32>(n.max(1))? };
        let t = xl.shape().dims()[0];
        if n > 0 {
            let (f, stream) = func(&dev, "rope_split_qkv_f32")?;
            let (tu, nh, nkv, hd) = (t as u32, self.heads as u32, self.kv_heads as u32, self.head_dim as u32);
            let mut b = stream.launch_builder(&f);
            b.arg(&out).arg(&x).arg(&cos).arg(&sin).arg(&tu).arg(&nh).arg(&nkv).arg(&hd);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(grid_for(n / 2, 256)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
    }
}

/// On-device sampling of logits `[R, V]` (f32) with per-row settings; returns ids `[R]`
/// (u32). See [`crate::sampling::sample_rows_reference`] for the rule.
pub(crate) struct SampleRows {
    pub rows: Vec<crate::sampling::RowSampling>,
}

impl CustomOp1 for SampleRows {
    fn name(&self) -> &'static str {
        "ragnode-sample-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("ragnode-sample-rows: CUDA op called on CPU tensors")
    }

    fn cuda_fwd(&self, ls: &CudaStorage, ll: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = ls.device().clone();
        let (r, v) = ll.shape().dims2()?;
        let logits = view::<f32>(ls, ll, "logits")?;
        let ids = unsafe { dev.alloc::<u32>(r.max(1))? };
        if r > 0 {
            let scratch = unsafe { dev.alloc::<f32>(r * v)? };
            let col = |f: fn(&crate::sampling::RowSampling) -> f32| -> Vec<f32> { self.rows.iter().map(f).collect() };
            let temp = dev.clone_htod(&col(|s| s.temperature))?;
            let top_p = dev.clone_htod(&col(|s| s.top_p))?;
            let min_p = dev.clone_htod(&col(|s| s.min_p))?;
            let u = dev.clone_htod(&col(|s| s.u))?;
            let top_k: Vec<u32> = self.rows.iter().map(|s| s.top_k.min(u32::MAX as usize) as u32).collect();
            let top_k = dev.clone_htod(&top_k)?;
            let (f, stream) = func(&dev, "sample_rows_f32")?;
            let vu = v as u32;
            let mut b = stream.launch_builder(&f);
            b.arg(&ids).arg(&logits).arg(&scratch).arg(&temp).arg(&top_k).arg(&top_p).arg(&min_p).arg(&u).arg(&vu);
            let cfg =
                LaunchConfig { grid_dim: (r as u32, 1, 1), block_dim: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(ids, dev), Shape::from(r)))
    }
}

/// Free and total memory of the device, in bytes.
pub fn memory_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream().context().mem_get_info().w()
}
