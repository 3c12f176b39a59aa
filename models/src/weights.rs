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
}

impl WeightSource {
    pub fn device(&self) -> &Device {
        match self {
            Self::Gguf(g) => &g.device,
            Self::Safetensors(s) => &s.device,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.content.tensor_infos.contains_key(&gguf_name(name, "weight")),
            Self::Safetensors(s) => s.vb.contains_tensor(&format!("{name}.weight")),
        }
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
        }
    }

    pub fn rms_norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let w = match self {
            Self::Gguf(g) => g.dense(&gguf_name(name, "weight"), &[dim])?,
            Self::Safetensors(s) => s.get(&format!("{name}.weight"), &[dim])?,
        };
        Ok(RmsNorm::new(w, eps))
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
