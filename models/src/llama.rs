//! The Llama decoder family in batched, paged form: Llama 2/3, SmolLM, Mistral-style
//! GQA models, DeepSeek-R1-Distill-Llama, and (with q/k/v biases) Qwen2 / Qwen2.5 /
//! DeepSeek-R1-Distill-Qwen — see [`crate::qwen2`] for the config mapping.
//!
//! One forward step takes a varlen batch ([`BatchInput`]): the stacked new tokens of many
//! sequences, each at its own position, with keys/values written to and read from the
//! paged cache. Every op is row-independent, so a sequence's logits do not depend on the
//! rest of the batch.

use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use ragnode_kernels::activation::swiglu;
use ragnode_kernels::attention::{PagedAttentionParams, paged_attention, write_kv};
use ragnode_kernels::rowwise::{add, rope_split_qkv};
use serde::Deserialize;

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::{KvCacheLayout, PagedKvCache};
use crate::layers::{Linear, RmsNorm, RopeScaling, RotaryEmbedding, TokenEmbedding};
use crate::weights::WeightSource;

/// Which member of the family: decides biases and, for GGUF, the tensor layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
}

/// Hyper-parameters of a Llama-family checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
}

/// `config.json` of `LlamaForCausalLM` (and the shared fields of `Qwen2ForCausalLM`).
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_rope_theta() -> f32 {
    10000.0
}

fn default_max_position_embeddings() -> usize {
    4096
}

impl HfConfig {
    pub(crate) fn into_config(self, family: Family) -> Result<Config, String> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) && self.head_dim.is_none() {
            return Err(format!("hidden_size {} is not divisible by {heads} heads", self.hidden_size));
        }
        let kv = self.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!("{heads} attention heads are not a multiple of {kv} kv heads"));
        }
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Llama => (self.attention_bias, self.attention_bias),
        };
        Ok(Config {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::from_hf_json(self.rope_scaling.as_ref())?,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias,
        })
    }
}

impl Config {
    /// Reads the hyper-parameters from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(content: &gguf_file::Content, family: Family, arch: &str) -> Result<Self, String> {
        let md = |k: &str| content.metadata.get(&format!("{arch}.{k}"));
        let int = |k: &str| -> Result<usize, String> {
            md(k)
                .ok_or_else(|| format!("metadata `{arch}.{k}` is missing"))
                .and_then(|v| gguf_usize(v).ok_or_else(|| format!("metadata `{arch}.{k}` is not an integer")))
        };
        let heads = int("attention.head_count")?;
        let kv = md("attention.head_count_kv").and_then(gguf_usize).unwrap_or(heads);
        let hidden = int("embedding_length")?;
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(format!("{heads} attention heads are not a multiple of {kv} kv heads"));
        }
        let head_dim = md("attention.key_length").and_then(gguf_usize).unwrap_or(hidden / heads);
        if let Some(rope_dim) = md("rope.dimension_count").and_then(gguf_usize)
            && rope_dim != head_dim
        {
            return Err(format!("partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported"));
        }
        let vocab = match md("vocab_size").and_then(gguf_usize) {
            Some(v) => v,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or("token_embd.weight is missing")?,
        };
        let eps = md("attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32().ok())
            .ok_or(format!("metadata `{arch}.attention.layer_norm_rms_epsilon` is missing"))?;
        let rope_scaling = match md("rope.scaling.type").and_then(|v| v.to_string().ok()).map(String::as_str) {
            Some("linear") => RopeScaling::Linear {
                factor: md("rope.scaling.factor")
                    .and_then(|v| v.to_f32().ok())
                    .ok_or("rope.scaling.factor is missing")?,
            },
            Some("none") | None => RopeScaling::None,
            Some(other) => {
                tracing::warn!("GGUF rope scaling `{other}` is not supported; using unscaled rope");
                RopeScaling::None
            }
        };
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Llama => (
                content.tensor_infos.contains_key("blk.0.attn_q.bias"),
                content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            ),
        };
        Ok(Config {
            family,
            hidden_size: hidden,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: eps as f64,
            rope_theta: md("rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: md("context_length").and_then(gguf_usize).unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias,
            o_bias,
            mlp_bias: false,
        })
    }

    pub fn kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::PerHead {
            num_layers: self.num_hidden_layers,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }
}

pub(crate) fn gguf_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value::*;
    match v {
        U8(x) => Some(*x as usize),
        U16(x) => Some(*x as usize),
        U32(x) => Some(*x as usize),
        U64(x) => Some(*x as usize),
        I32(x) if *x >= 0 => Some(*x as usize),
        I64(x) if *x >= 0 => Some(*x as usize),
        _ => None,
    }
}

/// q, k and v projections, fused into one matmul when the formats allow.
#[derive(Debug)]
enum Qkv {
    Fused(Linear),
    Split(Linear, Linear, Linear),
}

/// gate and up projections, fused when the formats allow.
#[derive(Debug)]
enum GateUp {
    Fused(Linear),
    Split(Linear, Linear),
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: RmsNorm,
    qkv: Qkv,
    o_proj: Linear,
    post_norm: RmsNorm,
    gate_up: GateUp,
    down: Linear,
}

/// Per-step data shared by all layers.
struct StepContext {
    cos: Tensor,
    sin: Tensor,
    slots: Tensor,
    attn: PagedAttentionParams,
}

impl DecoderLayer {
    fn load(cfg: &Config, w: &mut WeightSource, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_dim = cfg.num_attention_heads * hd;
        let kv_dim = cfg.num_key_value_heads * hd;
        let q = w.linear(&format!("{p}.self_attn.q_proj"), h, q_dim, cfg.qkv_bias)?;
        let k = w.linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, cfg.qkv_bias)?;
        let v = w.linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, cfg.qkv_bias)?;
        let qkv = match Linear::concat(&[q.clone(), k.clone(), v.clone()])? {
            Some(f) => Qkv::Fused(f),
            None => Qkv::Split(q, k, v),
        };
        let gate = w.linear(&format!("{p}.mlp.gate_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?;
        let up = w.linear(&format!("{p}.mlp.up_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?;
        let gate_up = match Linear::concat(&[gate.clone(), up.clone()])? {
            Some(f) => GateUp::Fused(f),
            None => GateUp::Split(gate, up),
        };
        Ok(Self {
            input_norm: w.rms_norm(&format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
            qkv,
            o_proj: w.linear(&format!("{p}.self_attn.o_proj"), q_dim, h, cfg.o_bias)?,
            post_norm: w.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            gate_up,
            down: w.linear(&format!("{p}.mlp.down_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
        })
    }

    fn forward(&self, x: &Tensor, cfg: &Config, ctx: &StepContext, kv: (&Tensor, &Tensor)) -> Result<Tensor> {
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let h = self.input_norm.forward(x)?;
        let qkv = match &self.qkv {
            Qkv::Fused(l) => l.forward(&h)?,
            Qkv::Split(q, k, v) => Tensor::cat(&[q.forward(&h)?, k.forward(&h)?, v.forward(&h)?], 1)?,
        };
        let (q, k, v) = rope_split_qkv(&qkv, &ctx.cos, &ctx.sin, nh, nkv, hd)?;
        write_kv(kv.0, kv.1, &k, &v, &ctx.slots)?;
        let attn = paged_attention(&q, kv.0, kv.1, &ctx.attn)?;
        let (x, h) = self.post_norm.forward_residual(x, &self.o_proj.forward(&attn)?)?;
        let act = match &self.gate_up {
            GateUp::Fused(l) => swiglu(&l.forward(&h)?)?,
            GateUp::Split(g, u) => swiglu(&Tensor::cat(&[g.forward(&h)?, u.forward(&h)?], 1)?)?,
        };
        Ok(add(&x, &self.down.forward(&act)?)?)
    }
}

/// A loaded Llama-family model.
pub struct Model {
    cfg: Config,
    embed: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
}

impl Model {
    pub fn load(cfg: Config, w: &mut WeightSource) -> Result<Self> {
        if let (Family::Llama, WeightSource::Gguf(g)) = (cfg.family, &mut *w) {
            g.set_unpermute_qk(cfg.num_attention_heads, cfg.num_key_value_heads);
        }
        let embed = w.embedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(&cfg, w, i)).collect::<Result<Vec<_>>>()?;
        let norm = w.rms_norm("model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if !cfg.tie_word_embeddings && w.contains("lm_head") {
            w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        } else {
            embed.as_linear()?
        };
        let mut scaling = cfg.rope_scaling.clone();
        if let Some(factors) = w.optional_f32("rope_freqs.weight", "model.rope_freqs")? {
            scaling = RopeScaling::Factors(factors);
        }
        let rope = RotaryEmbedding::new(cfg.head_dim, cfg.rope_theta, &scaling)?;
        Ok(Self { device: w.device().clone(), cfg, embed, layers, norm, lm_head, rope })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl crate::CausalLm for Model {
    fn forward(&self, batch: &BatchInput, cache: &PagedKvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        if batch.logits_rows.is_empty() && batch.tokens.is_empty() {
            return Ok(Tensor::zeros((0, cfg.vocab_size), DType::F32, &self.device)?);
        }
        batch.check(cache.layout(), cfg.kv_layout(), cfg.vocab_size)?;
        let (cos, sin) = self.rope.tables(&batch.positions, &self.device)?;
        let ctx = StepContext {
            cos,
            sin,
            slots: Tensor::new(batch.slots.as_slice(), &self.device)?,
            attn: PagedAttentionParams {
                seqs: Arc::from(batch.seqs.as_slice()),
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                block_size: cache.block_size(),
                scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            },
        };
        let mut x = self.embed.forward(&batch.tokens, &self.device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, cfg, &ctx, cache.layer(i)?)?;
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    fn kv_layout(&self) -> KvCacheLayout {
        self.cfg.kv_layout()
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_context(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn architecture(&self) -> &'static str {
        match self.cfg.family {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }
}

/// Parses a `config.json` of `LlamaForCausalLM`.
pub fn config_from_hf_json(json: &str) -> Result<Config, String> {
    let hf: HfConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
    hf.into_config(Family::Llama)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_defaults_and_gqa() {
        let cfg = config_from_hf_json(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                "rms_norm_eps": 1e-5,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.rope_theta, 10000.0);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }));
        assert!(!cfg.qkv_bias);
    }

    #[test]
    fn bad_head_counts_are_rejected() {
        let err = config_from_hf_json(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 100, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap_err();
        assert!(err.contains("kv heads"), "{err}");
    }
}
