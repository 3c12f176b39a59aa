//! Where weights come from: a GGUF file or HF safetensors. Model code asks by Hugging Face
//! names (`model.layers.3.self_attn.q_proj`); the GGUF source maps them to llama.cpp's
//! names (`blk.3.attn_q`) and undoes llama.cpp's q/k row permutation.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, ggml_file, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ragnode_kernels::quant::QuantMatrix;

use crate::error::{ModelError, Result};
use crate::layers::{Linear, RmsNorm, TokenEmbedding};

/// An opened checkpoint.
pub enum WeightSource {
    Gguf(GgufWeights),
    Safetensors(SafetensorsWeights),
    /// Random weights made on request (`ragnode generate --dummy-weights`, benches).
    Random(RandomWeights),
}

impl WeightSource {
    pub fn device(&self) -> &Device {
        match self {
            Self::Gguf(g) => &g.device,
            Self::Safetensors(s) => &s.device,
            Self::Random(r) => &r.device,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.content.tensor_infos.contains_key(&gguf_name(name, "weight")),
            Self::Safetensors(s) => s.vb.contains_tensor(&format!("{name}.weight")),
            Self::Random(_) => true,
        }
    }

    /// A MoE router `name` (`[experts, hidden]`), kept dense in f32: its logits choose the
    /// experts, so they are computed at full precision whatever the checkpoint's format.
    pub fn router(&mut self, name: &str, hidden: usize, experts: usize) -> Result<Tensor> {
        let w = match self {
            Self::Gguf(g) => g.dense(&gguf_name(name, "weight"), &[experts, hidden])?,
            Self::Safetensors(s) => s.get(&format!("{name}.weight"), &[experts, hidden])?.to_dtype(DType::F32)?,
            Self::Random(r) => r.tensor(&format!("{name}.weight"), &[experts, hidden], (1.0 / hidden as f32).sqrt())?,
        };
        Ok(w)
    }

    /// DeepSeek-V3's `e_score_correction_bias` of the router `name`.
    pub fn expert_bias(&mut self, name: &str, experts: usize) -> Result<Vec<f32>> {
        let t = match self {
            Self::Gguf(g) => {
                let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).unwrap_or("");
                g.dense(&format!("blk.{layer}.exp_probs_b.bias"), &[experts])?
            }
            Self::Safetensors(s) => {
                s.get(&format!("{name}.e_score_correction_bias"), &[experts])?.to_dtype(DType::F32)?
            }
            Self::Random(r) => r.tensor(&format!("{name}.e_score_correction_bias"), &[experts], 0.05)?,
        };
        Ok(t.to_vec1()?)
    }

    /// The routed experts of layer prefix `p` (`model.layers.N`): per expert (gate, up, down).
    /// HF checkpoints hold them one by one (`mlp.experts.J.gate_proj`); GGUF stacks them
    /// (`blk.N.ffn_gate_exps`).
    pub fn experts(
        &mut self,
        p: &str,
        experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<Vec<(Linear, Linear, Linear)>> {
        if let Self::Gguf(g) = self {
            let layer = p.strip_prefix("model.layers.").unwrap_or(p);
            let gate = g.stacked(&format!("blk.{layer}.ffn_gate_exps.weight"), experts, inter, hidden)?;
            let up = g.stacked(&format!("blk.{layer}.ffn_up_exps.weight"), experts, inter, hidden)?;
            let down = g.stacked(&format!("blk.{layer}.ffn_down_exps.weight"), experts, hidden, inter)?;
            return Ok(gate.into_iter().zip(up).zip(down).map(|((g, u), d)| (g, u, d)).collect());
        }
        (0..experts)
            .map(|j| {
                let e = format!("{p}.mlp.experts.{j}");
                Ok((
                    self.linear(&format!("{e}.gate_proj"), hidden, inter, false)?,
                    self.linear(&format!("{e}.up_proj"), hidden, inter, false)?,
                    self.linear(&format!("{e}.down_proj"), inter, hidden, false)?,
                ))
            })
            .collect()
    }

    /// A linear layer `name` mapping `in_dim` to `out_dim`, with its bias if `bias`.
    pub fn linear(&mut self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        match self {
            Self::Gguf(g) => g.linear(name, in_dim, out_dim, bias),
            Self::Safetensors(s) => {
                let w = s.get(&format!("{name}.weight"), &[out_dim, in_dim])?;
                let b = if bias { Some(s.get(&format!("{name}.bias"), &[out_dim])?) } else { None };
                Linear::dense(w, b)
            }
            Self::Random(r) => r.linear(name, in_dim, out_dim, bias),
        }
    }

    pub fn rms_norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let w = match self {
            Self::Gguf(g) => g.dense(&gguf_name(name, "weight"), &[dim])?,
            Self::Safetensors(s) => s.get(&format!("{name}.weight"), &[dim])?,
            Self::Random(r) => (r.tensor(&format!("{name}.weight"), &[dim], 0.1)? + 1.0)?,
        };
        // Norm weights stay f32 whatever the checkpoint's dtype: the fused kernels read f32.
        Ok(RmsNorm::new(w.to_dtype(DType::F32)?, eps))
    }

    pub fn embedding(&mut self, name: &str, vocab: usize, dim: usize) -> Result<TokenEmbedding> {
        match self {
            Self::Gguf(g) => {
                let gname = gguf_name(name, "weight");
                let raw = g.raw(&gname, &[vocab, dim])?;
                if use_ragnode_kernels(&g.device)
                    && let Some(m) = QuantMatrix::from_ggml(raw.dtype, &raw.bytes, vocab, dim)?
                {
                    return Ok(TokenEmbedding::Quant(Arc::new(m)));
                }
                let t = ggml_file::qtensor_from_ggml(raw.dtype, &raw.bytes, vec![vocab, dim], &g.device)?;
                match raw.dtype {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Ok(TokenEmbedding::Dense(t.dequantize(&g.device)?))
                    }
                    _ => Ok(TokenEmbedding::CandleQuant(Arc::new(t))),
                }
            }
            Self::Safetensors(s) => Ok(TokenEmbedding::Dense(s.get(&format!("{name}.weight"), &[vocab, dim])?)),
            Self::Random(r) => r.embedding(name, vocab, dim),
        }
    }

    /// A small float tensor (e.g. GGUF's `rope_freqs.weight`), if present.
    pub fn optional_f32(&mut self, gguf: &str, hf: &str) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Gguf(g) => match g.content.tensor_infos.get(gguf) {
                Some(info) => {
                    let dims = info.shape.dims().to_vec();
                    Ok(Some(g.dense(gguf, &dims)?.flatten_all()?.to_vec1()?))
                }
                None => Ok(None),
            },
            Self::Safetensors(s) => {
                if s.vb.contains_tensor(hf) {
                    Ok(Some(s.vb.get_unchecked_dtype(hf, DType::F32)?.flatten_all()?.to_vec1()?))
                } else {
                    Ok(None)
                }
            }
            Self::Random(_) => Ok(None),
        }
    }
}

/// Maps a Hugging Face Llama/Qwen2 tensor prefix to llama.cpp's GGUF name.
pub fn gguf_name(hf: &str, suffix: &str) -> String {
    let base = match hf {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => match hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
            Some((layer, rest)) => {
                let part = match rest {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    // DeepSeek-V2/V3 (llama.cpp `deepseek2`).
                    "self_attn.q_a_proj" => "attn_q_a",
                    "self_attn.q_a_layernorm" => "attn_q_a_norm",
                    "self_attn.q_b_proj" => "attn_q_b",
                    "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
                    "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
                    "self_attn.kv_b_proj" => "attn_kv_b",
                    "mlp.gate" => "ffn_gate_inp",
                    "mlp.shared_experts.gate_proj" => "ffn_gate_shexp",
                    "mlp.shared_experts.up_proj" => "ffn_up_shexp",
                    "mlp.shared_experts.down_proj" => "ffn_down_shexp",
                    other => other,
                };
                format!("blk.{layer}.{part}")
            }
            None => hf.to_string(),
        },
    };
    format!("{base}.{suffix}")
}

struct RawTensor {
    dtype: GgmlDType,
    bytes: Vec<u8>,
}

/// A GGUF checkpoint: metadata plus lazily read tensors.
pub struct GgufWeights {
    path: PathBuf,
    reader: BufReader<File>,
    pub content: gguf_file::Content,
    device: Device,
    /// Head counts for undoing llama.cpp's interleaved-rope permutation of q/k rows
    /// (set for `llama`-architecture files, which llama.cpp converts that way).
    unpermute_qk: Option<(usize, usize)>,
}

impl GgufWeights {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| ModelError::Gguf { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self { path: path.to_path_buf(), reader, content, device: device.clone(), unpermute_qk: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_unpermute_qk(&mut self, n_head: usize, n_kv_head: usize) {
        self.unpermute_qk = Some((n_head, n_kv_head));
    }

    fn raw(&mut self, name: &str, expected: &[usize]) -> Result<RawTensor> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| ModelError::MissingWeight(name.into()))?;
        if info.shape.dims() != expected {
            return Err(ModelError::WeightShape {
                name: name.into(),
                expected: expected.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if elems % dtype.block_size() != 0 {
            return Err(self.bad(format!("tensor {name}: {elems} elements are not whole {dtype:?} blocks")));
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        let mut bytes = vec![0u8; size];
        let path = self.path.clone();
        let io = |source| ModelError::Io { path: path.clone(), source };
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        self.reader.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ModelError::Gguf {
                    path: path.clone(),
                    message: format!("tensor {name} runs past the end of the file (truncated download?)"),
                }
            } else {
                io(e)
            }
        })?;
        Ok(RawTensor { dtype, bytes })
    }

    fn bad(&self, message: String) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), message }
    }

    /// A tensor dequantized to f32 (norms, biases, small tables).
    fn dense(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let raw = self.raw(name, expected)?;
        let q = ggml_file::qtensor_from_ggml(raw.dtype, &raw.bytes, expected.to_vec(), &self.device)?;
        Ok(q.dequantize(&self.device)?)
    }

    /// Splits a stacked `[experts, rows, cols]` tensor into one linear layer per expert.
    fn stacked(&mut self, name: &str, experts: usize, rows: usize, cols: usize) -> Result<Vec<Linear>> {
        let raw = self.raw(name, &[experts, rows, cols])?;
        let per = raw.bytes.len() / experts;
        raw.bytes
            .chunks_exact(per)
            .map(|bytes| self.linear_from_raw(&RawTensor { dtype: raw.dtype, bytes: bytes.to_vec() }, rows, cols, None))
            .collect()
    }

    fn linear_from_raw(&self, raw: &RawTensor, out_dim: usize, in_dim: usize, b: Option<Tensor>) -> Result<Linear> {
        match raw.dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let q = ggml_file::qtensor_from_ggml(raw.dtype, &raw.bytes, vec![out_dim, in_dim], &self.device)?;
                Linear::dense(q.dequantize(&self.device)?, b)
            }
            dtype => {
                if use_ragnode_kernels(&self.device)
                    && let Some(m) = QuantMatrix::from_ggml(dtype, &raw.bytes, out_dim, in_dim)?
                {
                    return Ok(Linear::quant(Arc::new(m), b));
                }
                let q = ggml_file::qtensor_from_ggml(dtype, &raw.bytes, vec![out_dim, in_dim], &self.device)?;
                Linear::candle_quant(q, b)
            }
        }
    }

    fn linear(&mut self, hf: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let name = gguf_name(hf, "weight");
        let mut raw = self.raw(&name, &[out_dim, in_dim])?;
        let heads = match (self.unpermute_qk, hf) {
            (Some((h, _)), n) if n.ends_with("self_attn.q_proj") => Some(h),
            (Some((_, kv)), n) if n.ends_with("self_attn.k_proj") => Some(kv),
            _ => None,
        };
        if let Some(h) = heads {
            let row_bytes = raw.bytes.len() / out_dim;
            raw.bytes = unpermute_rows(&raw.bytes, row_bytes, out_dim, h);
        }
        let b = if bias {
            let mut b = self.dense(&gguf_name(hf, "bias"), &[out_dim])?;
            if let Some(h) = heads {
                let v: Vec<f32> = b.to_vec1()?;
                let v: Vec<f32> = bytemuck_f32(&unpermute_rows(&f32_bytes(&v), 4, out_dim, h));
                b = Tensor::from_vec(v, out_dim, &self.device)?;
            }
            Some(b)
        } else {
            None
        };
        self.linear_from_raw(&raw, out_dim, in_dim, b)
    }
}

/// ragnode's quantized CPU kernels run on CPU unless `RAGNODE_CANDLE_QMATMUL=1` asks for
/// candle's own quantized matmul (a fallback and a reference for comparisons).
fn use_ragnode_kernels(device: &Device) -> bool {
    device.is_cpu() && !std::env::var("RAGNODE_CANDLE_QMATMUL").is_ok_and(|v| v == "1")
}

/// llama.cpp stores llama q/k rows permuted for interleaved rope: within each head, row
/// `2i + half` holds HF row `half * head_dim / 2 + i`. Reorders them back to HF order
/// (half-split rope). Rows are whole quantized blocks, so this is an exact byte shuffle.
fn unpermute_rows(bytes: &[u8], row_bytes: usize, rows: usize, heads: usize) -> Vec<u8> {
    let hd = rows / heads;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let dst = h * hd + half * hd / 2 + i;
                let src = h * hd + 2 * i + half;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The storage format of random weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomFormat {
    F32,
    F16,
    BF16,
    /// A GGML block format (Q4_0, Q8_0, Q4_K, ...), quantized at load.
    Ggml(GgmlDType),
}

impl std::str::FromStr for RandomFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q4_0" => Self::Ggml(GgmlDType::Q4_0),
            "q4_1" => Self::Ggml(GgmlDType::Q4_1),
            "q5_0" => Self::Ggml(GgmlDType::Q5_0),
            "q5_1" => Self::Ggml(GgmlDType::Q5_1),
            "q8_0" => Self::Ggml(GgmlDType::Q8_0),
            "q4_k" => Self::Ggml(GgmlDType::Q4K),
            "q5_k" => Self::Ggml(GgmlDType::Q5K),
            "q6_k" => Self::Ggml(GgmlDType::Q6K),
            other => {
                return Err(format!(
                    "unknown weight format `{other}` (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)"
                ));
            }
        })
    }
}

/// Random weights for a config, made when the model asks for each tensor: every tensor is
/// a function of `seed` and its name alone (so load order does not matter), uniform with
/// the variance of a standard initialisation (`1/fan_in`), norms near 1. Linear layers are
/// stored in `format`; norms, routers and biases stay f32.
pub struct RandomWeights {
    device: Device,
    format: RandomFormat,
    seed: u64,
}

impl RandomWeights {
    pub fn new(format: RandomFormat, seed: u64, device: &Device) -> Self {
        Self { device: device.clone(), format, seed }
    }

    /// `n` uniform values in `[-bound, bound]` for tensor `name`.
    fn values(&self, name: &str, n: usize, bound: f32) -> Vec<f32> {
        // FNV-1a of the name, then splitmix64: cheap and reproducible.
        let mut state = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    }

    fn tensor(&self, name: &str, shape: &[usize], bound: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.values(name, n, bound), shape, &self.device)?)
    }

    fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        // Uniform in ±sqrt(3/in) has variance 1/in.
        let w = self.tensor(&format!("{name}.weight"), &[out_dim, in_dim], (3.0 / in_dim as f32).sqrt())?;
        let b = if bias { Some(self.tensor(&format!("{name}.bias"), &[out_dim], 0.02)?) } else { None };
        match self.format {
            RandomFormat::F32 => Linear::dense(w, b),
            RandomFormat::F16 => Linear::dense(w.to_dtype(DType::F16)?, b.map(|b| b.to_dtype(DType::F16)).transpose()?),
            RandomFormat::BF16 => {
                Linear::dense(w.to_dtype(DType::BF16)?, b.map(|b| b.to_dtype(DType::BF16)).transpose()?)
            }
            RandomFormat::Ggml(dtype) => {
                if !in_dim.is_multiple_of(dtype.block_size()) {
                    return Err(ModelError::Config {
                        path: PathBuf::from(name),
                        message: format!("{in_dim} inputs are not whole {dtype:?} blocks of {}", dtype.block_size()),
                    });
                }
                let q = candle_core::quantized::QTensor::quantize(&w, dtype)?;
                if use_ragnode_kernels(&self.device)
                    && let Some(m) = QuantMatrix::from_ggml(dtype, &q.data()?, out_dim, in_dim)?
                {
                    return Ok(Linear::quant(Arc::new(m), b));
                }
                Linear::candle_quant(q, b)
            }
        }
    }

    fn embedding(&self, name: &str, vocab: usize, dim: usize) -> Result<TokenEmbedding> {
        let w = self.tensor(&format!("{name}.weight"), &[vocab, dim], 1.0)?;
        match self.format {
            RandomFormat::Ggml(dtype) if dim.is_multiple_of(dtype.block_size()) => {
                let q = candle_core::quantized::QTensor::quantize(&w, dtype)?;
                if use_ragnode_kernels(&self.device)
                    && let Some(m) = QuantMatrix::from_ggml(dtype, &q.data()?, vocab, dim)?
                {
                    return Ok(TokenEmbedding::Quant(Arc::new(m)));
                }
                Ok(TokenEmbedding::CandleQuant(Arc::new(q)))
            }
            _ => Ok(TokenEmbedding::Dense(w)),
        }
    }
}

/// HF safetensors shards, memory-mapped.
pub struct SafetensorsWeights {
    vb: VarBuilder<'static>,
    device: Device,
}

impl SafetensorsWeights {
    /// Opens the shards; weights are converted to `dtype` on load.
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(ModelError::Io {
                    path: f.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // nobody truncating them while the model is loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        Ok(Self { vb, device: device.clone() })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.vb.contains_tensor(name) {
            return Err(ModelError::MissingWeight(name.into()));
        }
        self.vb.get(shape, name).map_err(|e| match e {
            candle_core::Error::UnexpectedShape { expected, got, .. } => ModelError::WeightShape {
                name: name.into(),
                expected: expected.dims().to_vec(),
                actual: got.dims().to_vec(),
            },
            e => e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj", "weight"), "blk.12.attn_k.weight");
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj", "bias"), "blk.0.ffn_down.bias");
        assert_eq!(gguf_name("model.embed_tokens", "weight"), "token_embd.weight");
        assert_eq!(gguf_name("lm_head", "weight"), "output.weight");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute: reshape(heads, 2, hd/2) -> swap(1,2); apply it to row ids.
        let (heads, hd) = (3, 8);
        let rows = heads * hd;
        let mut permuted = vec![0u8; rows];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for half in 0..2 {
                    permuted[h * hd + 2 * i + half] = (h * hd + half * hd / 2 + i) as u8;
                }
            }
        }
        let back = unpermute_rows(&permuted, 1, rows, heads);
        assert_eq!(back, (0..rows as u8).collect::<Vec<_>>());
    }
}
