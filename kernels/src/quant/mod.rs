//! Quantized matrices and their CPU matmul kernels.
//!
//! [`QuantMatrix`] holds a GGML-quantized weight matrix `W[n, k]` repacked into 16-row
//! tiles (see `layout`, `kquants`), and computes `y = x · Wᵀ` for a batch of `m` f32 rows:
//! the activations are quantized exactly as ggml/candle do (Q8_1 for Q4_1/Q5_1 weights,
//! Q8_0 for Q4_0/Q5_0/Q8_0, Q8_K for Q4_K/Q5_K/Q6_K), and every weight block is read once
//! per tile of activation rows.
//!
//! Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K. Kernels ([`Kernel`]): AVX-512
//! VNNI, AVX2 and portable scalar, picked at run time (or by
//! `RAGNODE_QUANT_KERNEL=scalar|avx2|avx512`). All three compute each output element with
//! the same operations in the same order (exact integer block dot products, then a fixed
//! float sequence, block by block — for the 32-value formats candle's `vec_dot_unopt`
//! one), so results are bitwise identical across kernels, batch sizes, tilings and thread
//! counts; for Q4_1, Q5_0 and Q5_1 they are also bitwise identical to candle's `QMatMul`
//! (whose dot products for these are that same scalar loop), and within ~2e-6 of the
//! output's scale for the others (candle sums their SIMD dot products in another order).
//!
//! Threads come from candle's barrier pool (`candle_core::utils::barrier_pool`), shared with
//! candle's own CPU ops so the two never oversubscribe the cores.

mod acts;
mod exec;
mod kquants;
mod layout;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86k;

#[cfg(test)]
mod tests;

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use layout::{Format, Packed};
use std::sync::{Arc, OnceLock};

/// Errors from building or using a [`QuantMatrix`].
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("empty matrix [{n}, {k}]")]
    Empty { n: usize, k: usize },
    #[error("matrix [{n}, {k}] is too large")]
    TooLarge { n: usize, k: usize },
    #[error("k = {k} is not a multiple of the {dtype:?} block size {block}")]
    BadK { dtype: GgmlDType, k: usize, block: usize },
    #[error("{dtype:?} data for a [{n}, {k}] matrix must be {expected} bytes, got {got}")]
    SizeMismatch { dtype: GgmlDType, n: usize, k: usize, expected: usize, got: usize },
    #[error("{what}: expected {expected} elements, got {got}")]
    BadLength { what: &'static str, expected: usize, got: usize },
    #[error("concat_rows: {0}")]
    Concat(String),
    #[error("row {row} out of range for a matrix of {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("kernel {0:?} is not available on this CPU")]
    KernelUnavailable(Kernel),
}

/// A CPU kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable Rust; the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI.
    Avx512Vnni,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => x86::has_avx512_vnni(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512Vnni => false,
        }
    }

    /// Kernels this CPU can run, fastest first.
    pub fn available() -> Vec<Kernel> {
        [Self::Avx512Vnni, Self::Avx2, Self::Scalar].into_iter().filter(|k| k.is_available()).collect()
    }

    /// The kernel `matmul` uses: the fastest available, unless `RAGNODE_QUANT_KERNEL`
    /// (`scalar`, `avx2`, `avx512`) names another available one.
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            let forced =
                std::env::var("RAGNODE_QUANT_KERNEL").ok().and_then(|v| match v.to_ascii_lowercase().as_str() {
                    "scalar" => Some(Self::Scalar),
                    "avx2" => Some(Self::Avx2),
                    "avx512" | "avx512vnni" => Some(Self::Avx512Vnni),
                    _ => None,
                });
            match forced {
                Some(k) if k.is_available() => k,
                _ => Self::available()[0],
            }
        })
    }
}

/// How [`QuantMatrix::matmul_with`] runs.
#[derive(Clone, Copy, Debug)]
pub struct MatmulOptions {
    pub kernel: Kernel,
    /// Use candle's thread pool (otherwise the calling thread alone).
    pub parallel: bool,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        Self { kernel: Kernel::best(), parallel: true }
    }
}

/// A quantized weight matrix `W` of shape `[n, k]` (n output features, k inputs), repacked
/// for the CPU kernels.
#[derive(Clone)]
pub struct QuantMatrix {
    packed: Packed,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("dtype", &self.dtype())
            .field("rows", &self.rows())
            .field("cols", &self.cols())
            .finish()
    }
}

impl QuantMatrix {
    /// From GGML-layout bytes of a row-major `[n, k]` matrix (each row = `k / block_size`
    /// blocks), as stored in GGUF (candle's `QTensor::data()`). `Ok(None)` when `dtype` has
    /// no kernel here (use candle's `QMatMul` then).
    pub fn from_ggml(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Result<Option<QuantMatrix>, QuantError> {
        let Some(format) = Format::from_dtype(dtype) else {
            return Ok(None);
        };
        Ok(Some(Self { packed: Packed::from_ggml(format, data, n, k)? }))
    }

    /// Stacks matrices with the same `k` and format along `n` (fuses q/k/v or gate/up).
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Result<QuantMatrix, QuantError> {
        let Some(first) = parts.first() else {
            return Err(QuantError::Concat("no matrices".into()));
        };
        let (format, k) = (first.packed.format, first.packed.k);
        if let Some(bad) = parts.iter().find(|p| p.packed.format != format || p.packed.k != k) {
            return Err(QuantError::Concat(format!(
                "{:?} [.., {}] does not match {:?} [.., {k}]",
                bad.dtype(),
                bad.cols(),
                format.dtype()
            )));
        }
        let n: usize = parts.iter().map(|p| p.rows()).sum();
        let mut ggml = Vec::with_capacity(n * first.packed.nb * format.ggml_block_bytes());
        for part in parts {
            for r in 0..part.rows() {
                part.packed.push_ggml_row(r, &mut ggml);
            }
        }
        Ok(Self { packed: Packed::from_ggml(format, &ggml, n, k)? })
    }

    /// Output features `n`.
    pub fn rows(&self) -> usize {
        self.packed.n
    }

    /// Input features `k`.
    pub fn cols(&self) -> usize {
        self.packed.k
    }

    pub fn dtype(&self) -> GgmlDType {
        self.packed.format.dtype()
    }

    /// Bytes of the repacked matrix (the GGML size, rounded up to whole 16-row tiles).
    pub fn size_in_bytes(&self) -> usize {
        self.packed.size_in_bytes()
    }

    /// The matrix back in GGML layout (what `from_ggml` was given).
    pub fn to_ggml(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows() * self.packed.nb * self.packed.format.ggml_block_bytes());
        for r in 0..self.rows() {
            self.packed.push_ggml_row(r, &mut out);
        }
        out
    }

    /// `y[m×n] = x[m×k] · Wᵀ` (row-major f32), on candle's thread pool.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), QuantError> {
        self.matmul_with(x, m, y, MatmulOptions::default())
    }

    /// [`matmul`](Self::matmul) with an explicit kernel and threading.
    pub fn matmul_with(&self, x: &[f32], m: usize, y: &mut [f32], opts: MatmulOptions) -> Result<(), QuantError> {
        let (n, k) = (self.rows(), self.cols());
        let check = |what, expected: Option<usize>, got| match expected {
            Some(e) if e == got => Ok(()),
            Some(e) => Err(QuantError::BadLength { what, expected: e, got }),
            None => Err(QuantError::TooLarge { n: m, k }),
        };
        check("x (m × k)", m.checked_mul(k), x.len())?;
        check("y (m × n)", m.checked_mul(n), y.len())?;
        if !opts.kernel.is_available() {
            return Err(QuantError::KernelUnavailable(opts.kernel));
        }
        exec::matmul(&self.packed, x, m, y, opts.kernel, opts.parallel);
        Ok(())
    }

    /// Dequantizes row `r` (an embedding lookup) into `out[..k]`, exactly as candle does.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), QuantError> {
        if r >= self.rows() {
            return Err(QuantError::RowOutOfRange { row: r, rows: self.rows() });
        }
        let k = self.cols();
        let Some(out) = out.get_mut(..k) else {
            return Err(QuantError::BadLength { what: "dequantize_row out", expected: k, got: out.len() });
        };
        self.packed.dequantize_row(r, out);
        Ok(())
    }
}

/// Sets the SIMD kernels' register blocking (activation rows × 16-column tiles per
/// micro-kernel for `m > 1`, tiles for `m == 1`); for benchmarking. Results do not change.
#[doc(hidden)]
pub fn set_tuning(rows: usize, tiles: usize, tiles_m1: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    exec::TUNING.rows.store(rows, Relaxed);
    exec::TUNING.tiles.store(tiles, Relaxed);
    exec::TUNING.tiles_m1.store(tiles_m1, Relaxed);
}

/// Sets how many work items each pool thread gets (1: one contiguous range of tiles per
/// thread; more: smaller ranges handed out dynamically); for benchmarking.
#[doc(hidden)]
pub fn set_parts_per_thread(parts: usize) {
    exec::TUNING.parts_per_thread.store(parts, std::sync::atomic::Ordering::Relaxed);
}

/// Embedding lookup: `ids` → `[ids.len(), k]` f32, row-major.
pub fn quant_embedding(ids: &[u32], w: &QuantMatrix) -> Result<Vec<f32>, QuantError> {
    let k = w.cols();
    let mut out = vec![0f32; ids.len() * k];
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k)) {
        w.dequantize_row(id as usize, row)?;
    }
    Ok(out)
}

/// candle op computing `x · Wᵀ` on the CPU with the kernels here.
#[derive(Clone, Debug)]
pub struct QuantMatmulOp {
    pub w: Arc<QuantMatrix>,
}

impl CustomOp1 for QuantMatmulOp {
    fn name(&self) -> &'static str {
        "ragnode-quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = (self.w.rows(), self.w.cols());
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: x must be f32", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: x must be contiguous", self.name());
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("{}: x of shape {:?} does not end in k = {k}", self.name(), dims);
        }
        let m = layout.shape().elem_count() / k;
        let mut y = vec![0f32; m * n];
        self.w.matmul(&data[start..end], m, &mut y).map_err(candle_core::Error::wrap)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        candle_core::bail!("{}: not on CPU (use candle's QMatMul on CUDA)", self.name())
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        candle_core::bail!("{}: not on CPU (use candle's QMatMul on Metal)", self.name())
    }
}

/// `y = x · Wᵀ` for an f32 CPU tensor `x` of shape `[.., k]` → `[.., n]`.
pub fn quant_matmul(x: &Tensor, w: &Arc<QuantMatrix>) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("quant_matmul: x must be f32, got {:?}", x.dtype());
    }
    if !x.device().is_cpu() {
        candle_core::bail!("quant_matmul: not on CPU (x is on {:?})", x.device().location());
    }
    let x = x.contiguous()?;
    x.apply_op1_no_bwd(&QuantMatmulOp { w: w.clone() })
}
