//! Building blocks shared by the architectures: linear layers over any weight format,
//! RMS norm, token embeddings and rotary position tables.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use ragnode_kernels::quant::{QuantMatrix, quant_embedding, quant_matmul};

use crate::error::{ModelError, Result};

/// `y = x Wᵀ + b` for `x: [T, in]`, whatever the weights are stored as.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
}

#[derive(Clone)]
enum LinearWeight {
    /// GGML-quantized, on ragnode's CPU kernels (batch-reusing SIMD matmul).
    Quant(Arc<QuantMatrix>),
    /// GGML-quantized, through candle's QMatMul: formats without a ragnode kernel and
    /// non-CPU devices.
    CandleQuant(Arc<QTensor>, QMatMul),
    /// Dense `[out, in]`.
    Dense(Tensor),
}

impl std::fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Quant(w) => write!(f, "Quant({:?}, {}x{})", w.dtype(), w.rows(), w.cols()),
            Self::CandleQuant(w, _) => write!(f, "CandleQuant({:?}, {:?})", w.dtype(), w.shape()),
            Self::Dense(w) => write!(f, "Dense({:?}, {:?})", w.dtype(), w.shape()),
        }
    }
}

impl Linear {
    pub fn quant(w: Arc<QuantMatrix>, bias: Option<Tensor>) -> Self {
        let out_features = w.rows();
        Self { weight: LinearWeight::Quant(w), bias, out_features }
    }

    pub fn candle_quant(w: QTensor, bias: Option<Tensor>) -> Result<Self> {
        Self::candle_quant_arc(Arc::new(w), bias)
    }

    pub fn candle_quant_arc(w: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let out_features = w.shape().dims2()?.0;
        let mm = QMatMul::from_arc(w.clone())?;
        Ok(Self { weight: LinearWeight::CandleQuant(w, mm), bias, out_features })
    }

    pub fn dense(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_features = w.dims2()?.0;
        Ok(Self { weight: LinearWeight::Dense(w), bias, out_features })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Stacks layers with the same input along the output dimension, so q/k/v (or
    /// gate/up) run as one matmul that streams the input once. `None` when the weights
    /// are in different formats and cannot be stacked.
    pub fn concat(parts: &[Linear]) -> Result<Option<Linear>> {
        let Some(first) = parts.first() else { return Ok(None) };
        let has_bias = first.bias.is_some();
        if parts.iter().any(|p| p.bias.is_some() != has_bias) {
            return Ok(None);
        }
        let bias = if has_bias {
            let b: Vec<Tensor> = parts.iter().filter_map(|p| p.bias.clone()).collect();
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        let weight = match &first.weight {
            LinearWeight::Quant(first_w) => {
                let mut ws: Vec<&QuantMatrix> = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.weight {
                        LinearWeight::Quant(w) if w.dtype() == first_w.dtype() => ws.push(w),
                        _ => return Ok(None),
                    }
                }
                LinearWeight::Quant(Arc::new(QuantMatrix::concat_rows(&ws)?))
            }
            LinearWeight::Dense(_) => {
                let mut ws = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.weight {
                        LinearWeight::Dense(w) => ws.push(w.clone()),
                        _ => return Ok(None),
                    }
                }
                LinearWeight::Dense(Tensor::cat(&ws, 0)?)
            }
            LinearWeight::CandleQuant(..) => return Ok(None),
        };
        let out_features = parts.iter().map(|p| p.out_features).sum();
        Ok(Some(Linear { weight, bias, out_features }))
    }

    /// The same layer with output row `i` taken from row `perm[i]` (bias too). Quantized
    /// rows are whole blocks, so this is exact in every format.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Linear> {
        let n = self.out_features;
        if perm.len() != n || perm.iter().any(|&p| p >= n) {
            return Err(candle_core::Error::Msg(format!("permute_rows: a permutation of {n} rows expected")).into());
        }
        let shuffle = |bytes: &[u8]| -> Vec<u8> {
            let row = bytes.len() / n;
            perm.iter().flat_map(|&p| bytes[p * row..(p + 1) * row].iter().copied()).collect()
        };
        let weight = match &self.weight {
            LinearWeight::Dense(w) => {
                let idx = Tensor::from_vec(perm.iter().map(|&p| p as u32).collect::<Vec<_>>(), n, w.device())?;
                LinearWeight::Dense(w.index_select(&idx, 0)?)
            }
            LinearWeight::Quant(w) => {
                let bytes = shuffle(&w.to_ggml());
                match QuantMatrix::from_ggml(w.dtype(), &bytes, n, w.cols())? {
                    Some(m) => LinearWeight::Quant(Arc::new(m)),
                    None => unreachable!("a QuantMatrix format round-trips"),
                }
            }
            LinearWeight::CandleQuant(w, _) => {
                let bytes = shuffle(&w.data()?);
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    w.dtype(),
                    &bytes,
                    w.shape().dims().to_vec(),
                    &w.device(),
                )?;
                return Linear::candle_quant(q, self.permuted_bias(perm)?);
            }
        };
        Ok(Linear { weight, bias: self.permuted_bias(perm)?, out_features: n })
    }

    fn permuted_bias(&self, perm: &[usize]) -> Result<Option<Tensor>> {
        Ok(match &self.bias {
            Some(b) => {
                let idx = Tensor::from_vec(perm.iter().map(|&p| p as u32).collect::<Vec<_>>(), perm.len(), b.device())?;
                Some(b.index_select(&idx, 0)?)
            }
            None => None,
        })
    }

    /// The weight as a dense f32 `[out, in]` tensor (dequantized if need be).
    pub fn dense_weight(&self, device: &Device) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::CandleQuant(w, _) => w.dequantize(device)?,
            LinearWeight::Quant(w) => {
                let (rows, cols) = (w.rows(), w.cols());
                let mut out = vec![0f32; rows * cols];
                for (r, chunk) in out.chunks_exact_mut(cols).enumerate() {
                    w.dequantize_row(r, chunk)?;
                }
                Tensor::from_vec(out, (rows, cols), device)?
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quant(w) => quant_matmul(x, w)?,
            LinearWeight::CandleQuant(_, mm) => mm.forward(x)?,
            // Half-precision weights (safetensors off-CPU): the product runs in their dtype
            // (cuBLAS bf16), the activations stay f32.
            LinearWeight::Dense(w) if w.dtype() != x.dtype() => {
                let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?;
                let y = match &self.bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                    None => y,
                };
                return Ok(y.to_dtype(x.dtype())?);
            }
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Root-mean-square layer norm.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps: eps as f32 }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ragnode_kernels::rowwise::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The residual stream's add followed by this norm, fused: returns `(x + residual,
    /// norm(x + residual))`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(ragnode_kernels::rowwise::add_rms_norm(x, residual, &self.weight, self.eps)?)
    }
}

/// Token embedding table, kept in its checkpoint format (a quantized table is
/// dequantized row by row on lookup, never as a whole).
#[derive(Clone, Debug)]
pub enum TokenEmbedding {
    Quant(Arc<QuantMatrix>),
    /// GGML-quantized through candle (non-CPU devices, formats without a ragnode kernel).
    CandleQuant(Arc<QTensor>),
    Dense(Tensor),
}

impl TokenEmbedding {
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Quant(w) => {
                let rows = quant_embedding(ids, w)?;
                Ok(Tensor::from_vec(rows, (ids.len(), w.cols()), device)?)
            }
            Self::CandleQuant(w) => Ok(w.embedding(&Tensor::new(ids, device)?)?.to_dtype(DType::F32)?),
            Self::Dense(w) => {
                let ids = Tensor::new(ids, w.device())?;
                Ok(w.index_select(&ids, 0)?.to_dtype(DType::F32)?)
            }
        }
    }

    /// The same table used as the output projection (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Self::Quant(w) => Ok(Linear::quant(w.clone(), None)),
            Self::CandleQuant(w) => Linear::candle_quant_arc(w.clone(), None),
            Self::Dense(w) => Linear::dense(w.clone(), None),
        }
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors stored in the checkpoint (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
    /// YaRN (DeepSeek-V2/V3, long-context Qwen2.5): frequencies faster than `beta_fast`
    /// rotations over the original context keep their value, those slower than `beta_slow`
    /// are divided by `factor`, a linear ramp in between; cos/sin are multiplied by
    /// `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
    },
}

/// YaRN's magnitude correction `0.1 · mscale · ln(scale) + 1` (1 for no stretch).
pub fn yarn_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

impl RopeScaling {
    /// Parses a `config.json` `rope_scaling` object (`rope_type` or `type`).
    pub fn from_hf_json(v: Option<&serde_json::Value>) -> Result<Self, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Self::None) };
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let opt = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let num = |k: &str| opt(k).ok_or_else(|| format!("rope_scaling.{k} is missing"));
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear { factor: num("factor")? as f32 }),
            "llama3" => Ok(Self::Llama3 {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }),
            "yarn" => {
                let factor = num("factor")? as f32;
                // As transformers' `_compute_yarn_parameters`.
                let attention_factor = match (opt("attention_factor"), opt("mscale"), opt("mscale_all_dim")) {
                    (Some(a), _, _) => a as f32,
                    (None, Some(m), Some(all)) => yarn_mscale(factor, m as f32) / yarn_mscale(factor, all as f32),
                    _ => yarn_mscale(factor, 1.0),
                };
                Ok(Self::Yarn {
                    factor,
                    original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
                    beta_fast: opt("beta_fast").unwrap_or(32.0) as f32,
                    beta_slow: opt("beta_slow").unwrap_or(1.0) as f32,
                    attention_factor,
                })
            }
            other => {
                // Dynamic NTK only changes positions past the original context.
                tracing::warn!("rope_scaling type `{other}` is not supported; using unscaled rope");
                Ok(Self::None)
            }
        }
    }
}

/// Rotary position embedding with the half-split ("neox") pairing: dimension `i` pairs
/// with `i + head_dim / 2`. Checkpoints stored interleaved (GGUF llama) have their q/k
/// rows permuted at load so one kernel serves all.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    magnitude: f32,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Result<Self> {
        let mut inv_freq: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32)).collect();
        let mut magnitude = 1.0;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    *f = if wavelen < high_wavelen {
                        *f
                    } else if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * *f / factor + smooth * *f
                    };
                }
            }
            RopeScaling::Factors(factors) => {
                if factors.len() != inv_freq.len() {
                    return Err(ModelError::WeightShape {
                        name: "rope_freqs.weight".into(),
                        expected: vec![inv_freq.len()],
                        actual: vec![factors.len()],
                    });
                }
                inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
            }
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor } => {
                // The dimension index at which a frequency makes `rotations` turns over the
                // original context.
                let dim = head_dim as f32;
                let orig = *original_max_position_embeddings as f32;
                let correction_dim =
                    |rotations: f32| dim * (orig / (rotations * 2.0 * std::f32::consts::PI)).ln() / (2.0 * theta.ln());
                let low = correction_dim(*beta_fast).floor().max(0.0);
                let mut high = correction_dim(*beta_slow).ceil().min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let interpolated = 1.0 / (factor * theta.powf(2.0 * i as f32 / dim));
                    *f = interpolated * ramp + *f * (1.0 - ramp);
                }
                magnitude = *attention_factor;
            }
        }
        Ok(Self { inv_freq, magnitude })
    }

    /// `cos` and `sin` tables `[T, head_dim / 2]` for the given positions.
    pub fn tables(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.magnitude);
                sin.push(angle.sin() * self.magnitude);
            }
        }
        let shape = (positions.len(), half);
        Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_half_split() {
        let rope = RotaryEmbedding::new(4, 10000.0, &RopeScaling::None).unwrap();
        let (cos, sin) = rope.tables(&[0, 1], &Device::Cpu).unwrap();
        // One q head, one k head, one v head of 4 dims per row.
        let qkv = Tensor::new(
            &[[1f32, 2., 3., 4., 0., 0., 0., 0., 0., 0., 0., 0.], [1., 2., 3., 4., 0., 0., 0., 0., 0., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let (q, _, _) = ragnode_kernels::rowwise::rope_split_qkv(&qkv, &cos, &sin, 1, 1, 4).unwrap();
        let y = q.to_vec3::<f32>().unwrap();
        assert_eq!(y[0][0], vec![1., 2., 3., 4.]); // position 0: identity
        // position 1, first pair (dims 0 and 2) rotates by angle 1 rad.
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((y[1][0][0] - (1. * c - 3. * s)).abs() < 1e-6);
        assert!((y[1][0][2] - (3. * c + 1. * s)).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let plain = RotaryEmbedding::new(128, 500000.0, &RopeScaling::None).unwrap();
        let scaled = RotaryEmbedding::new(
            128,
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        )
        .unwrap();
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn yarn_keeps_fast_and_stretches_slow_frequencies() {
        // DeepSeek-V2-Lite's rope_scaling.
        let json = serde_json::json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707});
        let scaling = RopeScaling::from_hf_json(Some(&json)).unwrap();
        let RopeScaling::Yarn { attention_factor, .. } = scaling else { panic!("{scaling:?}") };
        assert!((attention_factor - 1.0).abs() < 1e-6);
        let plain = RotaryEmbedding::new(64, 10000.0, &RopeScaling::None).unwrap();
        let yarn = RotaryEmbedding::new(64, 10000.0, &scaling).unwrap();
        assert_eq!(yarn.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((yarn.inv_freq[last] - plain.inv_freq[last] / 40.0).abs() < 1e-9);
        assert!(yarn.inv_freq[12] < plain.inv_freq[12] && yarn.inv_freq[12] > plain.inv_freq[12] / 40.0);
        // Without mscale keys, transformers' default attention factor.
        let json = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
        let RopeScaling::Yarn { attention_factor, .. } = RopeScaling::from_hf_json(Some(&json)).unwrap() else {
            panic!()
        };
        assert!((attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }
}
