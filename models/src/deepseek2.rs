//! DeepSeek-V2 / V2-Lite / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`, GGUF
//! `deepseek2`) in batched, paged form.
//!
//! **Multi-head latent attention.** Per token and layer the cache holds one latent row,
//! `c` (the `kv_lora_rank` compressed KV, after its norm) followed by the rotary key
//! `k_pe` (`qk_rope_head_dim`), shared by every head — for V2-Lite 576 numbers against
//! 16 × (192 + 128) = 5,120 for full per-head K/V (8.9× fewer bytes; V3: 576 against
//! 128 × 320 = 40,960). Decode absorbs the up-projection into the query and the output
//! (`q_lat = W_UK^T q_nope`, `out = W_UV o_lat`, [`ragnode_kernels::mla`]), so the cached
//! rows are never expanded. [`MlaCache::Full`] keeps the textbook per-head K/V instead (a
//! reference for tests and comparisons).
//!
//! **MoE.** Routed experts with top-k gating: softmax scores with greedy or
//! group-limited top-k (V2), or sigmoid scores plus `e_score_correction_bias` with
//! group-limited top-k over the sum of each group's two best (V3 `noaux_tc`);
//! `norm_topk_prob`, `routed_scaling_factor`, shared experts, the first
//! `first_k_dense_replace` layers dense. Each expert runs once per step over exactly the
//! rows routed to it (the quantized matmul reads its weights once for all of them); a
//! row's experts are summed in ascending expert order, so its output never depends on
//! the rest of the batch.
//!
//! **Rope.** YaRN as in the checkpoints' `rope_scaling`, with the softmax scale
//! multiplied by `mscale(factor, mscale_all_dim)²`. DeepSeek rotates interleaved pairs;
//! the q/k rope rows are reordered at load so the half-split kernel applies.

use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use ragnode_kernels::activation::swiglu;
use ragnode_kernels::attention::{PagedAttentionParams, paged_attention, write_kv};
use ragnode_kernels::mla::{LatentAttentionParams, head_matmul, latent_attention, write_latent};
use ragnode_kernels::rowwise::{add, matmul_t};
use serde::Deserialize;

use crate::batch::BatchInput;
use crate::error::Result;
use crate::kv_cache::{KvCacheLayout, PagedKvCache};
use crate::layers::{Linear, RmsNorm, RopeScaling, RotaryEmbedding, TokenEmbedding, yarn_mscale};
use crate::llama::gguf_usize;
use crate::weights::WeightSource;

/// How expert scores are computed from the router logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are picked from the scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TopkMethod {
    /// Plain top-k over all experts.
    #[serde(rename = "greedy")]
    Greedy,
    /// V2: the `topk_group` groups with the best single expert, then top-k inside them.
    #[serde(rename = "group_limited_greedy")]
    GroupLimitedGreedy,
    /// V3: scores plus `e_score_correction_bias` choose (groups ranked by the sum of their
    /// two best), the unbiased scores weigh.
    #[serde(rename = "noaux_tc")]
    NoAuxTc,
}

/// Routing hyper-parameters of the MoE layers.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Hyper-parameters of a DeepSeek-V2/V3 checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: a plain q projection (V2-Lite); else q goes through this low rank (V2, V3).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub attention_bias: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// YaRN's `mscale_all_dim` (the softmax scale is multiplied by its mscale squared).
    pub mscale_all_dim: Option<f32>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// `None`: every layer dense.
    pub moe: Option<MoeConfig>,
}

/// `config.json` of `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    #[serde(default)]
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    #[serde(default = "one_f32")]
    routed_scaling_factor: f32,
    topk_method: Option<TopkMethod>,
    num_experts_per_tok: Option<usize>,
    #[serde(default = "one_usize")]
    moe_layer_freq: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    scoring_func: Option<ScoringFunc>,
    #[serde(default = "one_usize")]
    n_group: usize,
    #[serde(default = "one_usize")]
    topk_group: usize,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    attention_bias: bool,
    q_lora_rank: Option<usize>,
    qk_rope_head_dim: usize,
    kv_lora_rank: usize,
    v_head_dim: usize,
    qk_nope_head_dim: usize,
    model_type: Option<String>,
}

fn one_f32() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn silu() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    4096
}
fn default_theta() -> f32 {
    10000.0
}

/// Parses a DeepSeek-V2/V3 `config.json`.
pub fn config_from_hf_json(json: &str) -> Result<Config, String> {
    let hf: HfConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if hf.hidden_act != "silu" {
        return Err(format!("hidden_act `{}` is not supported (silu only)", hf.hidden_act));
    }
    let v3 = hf.model_type.as_deref() == Some("deepseek_v3");
    let rope_scaling = RopeScaling::from_hf_json(hf.rope_scaling.as_ref())?;
    let mscale_all_dim = hf
        .rope_scaling
        .as_ref()
        .and_then(|v| v.get("mscale_all_dim"))
        .and_then(|v| v.as_f64())
        .filter(|m| *m != 0.0)
        .map(|m| m as f32);
    let moe = match hf.n_routed_experts {
        Some(n) if n > 0 => Some(MoeConfig {
            n_routed_experts: n,
            n_shared_experts: hf.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: hf.num_experts_per_tok.ok_or("num_experts_per_tok is missing")?,
            moe_intermediate_size: hf.moe_intermediate_size,
            first_k_dense_replace: hf.first_k_dense_replace,
            moe_layer_freq: hf.moe_layer_freq.max(1),
            scoring_func: hf.scoring_func.unwrap_or(if v3 { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax }),
            topk_method: hf.topk_method.unwrap_or(if v3 { TopkMethod::NoAuxTc } else { TopkMethod::Greedy }),
            n_group: hf.n_group.max(1),
            topk_group: hf.topk_group.max(1),
            norm_topk_prob: hf.norm_topk_prob,
            routed_scaling_factor: hf.routed_scaling_factor,
        }),
        _ => None,
    };
    let cfg = Config {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_hidden_layers: hf.num_hidden_layers,
        num_attention_heads: hf.num_attention_heads,
        q_lora_rank: hf.q_lora_rank,
        kv_lora_rank: hf.kv_lora_rank,
        qk_nope_head_dim: hf.qk_nope_head_dim,
        qk_rope_head_dim: hf.qk_rope_head_dim,
        v_head_dim: hf.v_head_dim,
        attention_bias: hf.attention_bias,
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta,
        rope_scaling,
        mscale_all_dim,
        max_position_embeddings: hf.max_position_embeddings,
        tie_word_embeddings: hf.tie_word_embeddings,
        moe,
    };
    cfg.validate()?;
    Ok(cfg)
}

impl Config {
    fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.kv_lora_rank == 0 {
            return Err("num_attention_heads and kv_lora_rank must be > 0".into());
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(format!("qk_rope_head_dim {} must be even", self.qk_rope_head_dim));
        }
        if let Some(m) = &self.moe {
            let k = m.num_experts_per_tok;
            if k == 0 || k > m.n_routed_experts {
                return Err(format!("num_experts_per_tok {k} must be in 1..={}", m.n_routed_experts));
            }
            if m.moe_intermediate_size == 0 {
                return Err("moe_intermediate_size must be > 0".into());
            }
            if m.topk_method != TopkMethod::Greedy {
                if !m.n_routed_experts.is_multiple_of(m.n_group) || m.topk_group > m.n_group {
                    return Err(format!(
                        "{} experts in {} groups with topk_group {} do not fit",
                        m.n_routed_experts, m.n_group, m.topk_group
                    ));
                }
                if m.topk_group * (m.n_routed_experts / m.n_group) < k {
                    return Err(format!("topk_group {} leaves fewer than {k} experts to choose", m.topk_group));
                }
            }
        }
        Ok(())
    }

    /// Width of a query/key head (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Numbers in one latent cache row.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// `1/sqrt(qk_head_dim)`, times YaRN's `mscale(factor, mscale_all_dim)²`.
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = 1.0 / (self.qk_head_dim() as f32).sqrt();
        if let (RopeScaling::Yarn { factor, .. }, Some(m)) = (&self.rope_scaling, self.mscale_all_dim) {
            let ms = yarn_mscale(*factor, m);
            scale *= ms * ms;
        }
        scale
    }

    /// Whether layer `i` is a MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| i >= m.first_k_dense_replace && i.is_multiple_of(m.moe_layer_freq))
    }

    /// What the cache holds per token in `mode`.
    pub fn kv_layout(&self, mode: MlaCache) -> KvCacheLayout {
        match mode {
            MlaCache::Latent => {
                KvCacheLayout::Latent { num_layers: self.num_hidden_layers, latent_dim: self.latent_dim() }
            }
            MlaCache::Full => KvCacheLayout::PerHead {
                num_layers: self.num_hidden_layers,
                num_kv_heads: self.num_attention_heads,
                head_dim: self.full_head_dim(),
            },
        }
    }

    /// Per-head K/V width in [`MlaCache::Full`]: the per-head kernel needs keys and values of
    /// one width, so the narrower is zero-padded.
    fn full_head_dim(&self) -> usize {
        self.qk_head_dim().max(self.v_head_dim)
    }

    /// Bytes per token of textbook per-head K/V (keys `qk_head_dim`, values `v_head_dim`),
    /// the figure MLA's latent cache is compared against.
    pub fn full_kv_bytes_per_token(&self, dtype: DType) -> usize {
        self.num_hidden_layers
            * self.num_attention_heads
            * (self.qk_head_dim() + self.v_head_dim)
            * dtype.size_in_bytes()
    }

    /// Reads the hyper-parameters from llama.cpp's `deepseek2.*` GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, String> {
        let md = |k: &str| content.metadata.get(&format!("deepseek2.{k}"));
        let int = |k: &str| md(k).and_then(gguf_usize).ok_or_else(|| format!("metadata `deepseek2.{k}` is missing"));
        let opt_int = |k: &str| md(k).and_then(gguf_usize);
        let float = |k: &str| md(k).and_then(|v| v.to_f32().ok());
        let heads = int("attention.head_count")?;
        let rope_dim = int("rope.dimension_count")?;
        let kv_lora_rank = int("attention.kv_lora_rank")?;
        let key_length = opt_int("attention.key_length_mla").or(opt_int("attention.key_length")).unwrap_or(192);
        let v_head_dim = opt_int("attention.value_length_mla").or(opt_int("attention.value_length")).unwrap_or(128);
        let hidden = int("embedding_length")?;
        let vocab = match opt_int("vocab_size") {
            Some(v) => v,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or("token_embd.weight is missing")?,
        };
        let (rope_scaling, mscale_all_dim) = match md("rope.scaling.type").and_then(|v| v.to_string().ok()) {
            Some(t) if t == "yarn" => {
                let factor = float("rope.scaling.factor").ok_or("rope.scaling.factor is missing")?;
                // llama.cpp stores 0.1 · mscale_all_dim; DeepSeek's mscale equals mscale_all_dim,
                // so the rope magnitude is 1.
                let mscale_all_dim = float("rope.scaling.yarn_log_multiplier").map(|m| m / 0.1);
                (
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: int("rope.scaling.original_context_length")?,
                        beta_fast: float("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                        beta_slow: float("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                        attention_factor: 1.0,
                    },
                    mscale_all_dim,
                )
            }
            Some(t) if t != "none" => return Err(format!("rope scaling `{t}` is not supported for deepseek2")),
            _ => (RopeScaling::None, None),
        };
        let experts = opt_int("expert_count").unwrap_or(0);
        let moe = if experts > 0 {
            let gating = opt_int("expert_gating_func").unwrap_or(1);
            let n_group = opt_int("expert_group_count").unwrap_or(1).max(1);
            let scoring_func = if gating == 2 { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
            let has_bias = content.tensor_infos.keys().any(|k| k.ends_with("exp_probs_b.bias"));
            Some(MoeConfig {
                n_routed_experts: experts,
                n_shared_experts: opt_int("expert_shared_count").unwrap_or(0),
                num_experts_per_tok: int("expert_used_count")?,
                moe_intermediate_size: int("expert_feed_forward_length")?,
                first_k_dense_replace: opt_int("leading_dense_block_count").unwrap_or(0),
                moe_layer_freq: 1,
                scoring_func,
                topk_method: if has_bias {
                    TopkMethod::NoAuxTc
                } else if n_group > 1 {
                    TopkMethod::GroupLimitedGreedy
                } else {
                    TopkMethod::Greedy
                },
                n_group,
                topk_group: opt_int("expert_group_used_count").unwrap_or(1).max(1),
                norm_topk_prob: md("expert_weights_norm").and_then(|v| v.to_bool().ok()).unwrap_or(false),
                routed_scaling_factor: float("expert_weights_scale").unwrap_or(1.0),
            })
        } else {
            None
        };
        let cfg = Config {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            q_lora_rank: opt_int("attention.q_lora_rank").filter(|&r| r > 0),
            kv_lora_rank,
            qk_nope_head_dim: key_length.checked_sub(rope_dim).ok_or("key_length is smaller than the rope dims")?,
            qk_rope_head_dim: rope_dim,
            v_head_dim,
            attention_bias: false,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")
                .ok_or("metadata `deepseek2.attention.layer_norm_rms_epsilon` is missing")?
                as f64,
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            mscale_all_dim,
            max_position_embeddings: opt_int("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            moe,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// What the attention caches per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlaCache {
    /// The compressed latent row (the serving default).
    #[default]
    Latent,
    /// Decompressed per-head keys and values (reference).
    Full,
}

/// Routes one row: the chosen experts (ascending id) and their weights.
pub fn route(logits: &[f32], bias: Option<&[f32]>, m: &MoeConfig) -> Vec<(usize, f32)> {
    let e = logits.len();
    let scores: Vec<f32> = match m.scoring_func {
        ScoringFunc::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|x| x / sum).collect()
        }
        ScoringFunc::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
    };
    // What chooses: V3 adds the load-balancing bias; weights always come from `scores`.
    let choice: Vec<f32> = match (m.topk_method, bias) {
        (TopkMethod::NoAuxTc, Some(b)) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        _ => scores.clone(),
    };
    let mut allowed = vec![true; e];
    if m.topk_method != TopkMethod::Greedy && m.n_group > 1 {
        let per = e / m.n_group;
        let group_score = |g: usize| -> f32 {
            let mut s: Vec<f32> = choice[g * per..(g + 1) * per].to_vec();
            s.sort_by(|a, b| b.total_cmp(a));
            match m.topk_method {
                TopkMethod::NoAuxTc => s.iter().take(2).sum(),
                _ => s[0],
            }
        };
        let groups = top_indices(&(0..m.n_group).map(group_score).collect::<Vec<_>>(), m.topk_group);
        for (i, a) in allowed.iter_mut().enumerate() {
            *a = groups.contains(&(i / per));
        }
    }
    let masked: Vec<f32> =
        choice.iter().zip(&allowed).map(|(&c, &ok)| if ok { c } else { f32::NEG_INFINITY }).collect();
    let mut chosen = top_indices(&masked, m.num_experts_per_tok);
    chosen.sort_unstable();
    let mut weights: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
    let normalise = m.num_experts_per_tok > 1 && m.norm_topk_prob;
    if normalise {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    // V2 scales only unnormalised weights; V3 always scales.
    if !normalise || m.topk_method == TopkMethod::NoAuxTc {
        weights.iter_mut().for_each(|w| *w *= m.routed_scaling_factor);
    }
    chosen.into_iter().zip(weights).collect()
}

/// Indices of the `k` largest values (ties: lower index first).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// gate/up (fused when the formats allow) and down.
#[derive(Debug)]
struct Mlp {
    gate_up: Vec<Linear>,
    down: Linear,
}

impl Mlp {
    fn load(w: &mut WeightSource, p: &str, hidden: usize, inter: usize) -> Result<Self> {
        let gate = w.linear(&format!("{p}.gate_proj"), hidden, inter, false)?;
        let up = w.linear(&format!("{p}.up_proj"), hidden, inter, false)?;
        Self::new(gate, up, w.linear(&format!("{p}.down_proj"), inter, hidden, false)?)
    }

    fn new(gate: Linear, up: Linear, down: Linear) -> Result<Self> {
        let gate_up = match Linear::concat(&[gate.clone(), up.clone()])? {
            Some(f) => vec![f],
            None => vec![gate, up],
        };
        Ok(Self { gate_up, down })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = match self.gate_up.as_slice() {
            [fused] => fused.forward(x)?,
            parts => Tensor::cat(&parts.iter().map(|l| l.forward(x)).collect::<Result<Vec<_>>>()?, 1)?,
        };
        self.down.forward(&swiglu(&gu)?)
    }
}

#[derive(Debug)]
struct Moe {
    /// `[experts, hidden]`, f32.
    router: Tensor,
    bias: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    fn forward(&self, x: &Tensor, m: &MoeConfig) -> Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        let logits: Vec<f32> = matmul_t(&x.to_dtype(DType::F32)?, &self.router)?.flatten_all()?.to_vec1()?;
        let e = self.experts.len();
        // Per expert: the rows routed to it, in row order, and their weights.
        let mut assigned: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e];
        for r in 0..rows {
            for (ex, wt) in route(&logits[r * e..(r + 1) * e], self.bias.as_deref(), m) {
                assigned[ex].0.push(r as u32);
                assigned[ex].1.push(wt);
            }
        }
        let mut y = Tensor::zeros((rows, hidden), DType::F32, x.device())?;
        for (expert, (idx, wts)) in self.experts.iter().zip(&assigned) {
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let idx = Tensor::from_slice(idx, n, x.device())?;
            let out = expert.forward(&x.index_select(&idx, 0)?)?.to_dtype(DType::F32)?;
            let wts = Tensor::from_slice(wts, (n, 1), x.device())?;
            y = y.index_add(&idx, &out.broadcast_mul(&wts)?, 0)?;
        }
        if let Some(shared) = &self.shared {
            y = add(&y, &shared.forward(x)?.to_dtype(DType::F32)?)?;
        }
        Ok(y)
    }
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
enum QProj {
    Plain(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

impl QProj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(l) => l.forward(x),
            Self::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?),
        }
    }
}

#[derive(Debug)]
struct Attention {
    q: QProj,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// `kv_b_proj` for [`MlaCache::Full`].
    kv_b: Linear,
    /// `W_UK` as `[heads, qk_nope_head_dim, kv_lora_rank]` (absorbed into the query).
    w_uk: Tensor,
    /// `W_UV` as `[heads, kv_lora_rank, v_head_dim]` (absorbed into the output).
    w_uv: Tensor,
    o_proj: Linear,
}

/// Row order that turns DeepSeek's interleaved rope pairs into the half-split pairing of
/// ragnode's kernels, applied to the `dim` rows starting at each `starts` entry.
fn rope_row_order(rows: usize, starts: impl Iterator<Item = usize>, dim: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..rows).collect();
    for s in starts {
        for i in 0..dim / 2 {
            perm[s + i] = s + 2 * i;
            perm[s + dim / 2 + i] = s + 2 * i + 1;
        }
    }
    perm
}

impl Attention {
    fn load(cfg: &Config, w: &mut WeightSource, p: &str) -> Result<Self> {
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let (dn, dr, dv, r) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let dq = cfg.qk_head_dim();
        let q_perm = rope_row_order(nh * dq, (0..nh).map(|i| i * dq + dn), dr);
        let q = match cfg.q_lora_rank {
            None => QProj::Plain(w.linear(&format!("{p}.q_proj"), h, nh * dq, false)?.permute_rows(&q_perm)?),
            Some(rank) => QProj::LowRank {
                a: w.linear(&format!("{p}.q_a_proj"), h, rank, cfg.attention_bias)?,
                norm: w.rms_norm(&format!("{p}.q_a_layernorm"), rank, cfg.rms_norm_eps)?,
                b: w.linear(&format!("{p}.q_b_proj"), rank, nh * dq, false)?.permute_rows(&q_perm)?,
            },
        };
        let kv_a = w
            .linear(&format!("{p}.kv_a_proj_with_mqa"), h, r + dr, cfg.attention_bias)?
            .permute_rows(&rope_row_order(r + dr, std::iter::once(r), dr))?;
        let kv_b = w.linear(&format!("{p}.kv_b_proj"), r, nh * (dn + dv), false)?;
        let dense = kv_b.dense_weight(w.device())?.reshape((nh, dn + dv, r))?;
        let w_uk = dense.narrow(1, 0, dn)?.contiguous()?;
        let w_uv = dense.narrow(1, dn, dv)?.transpose(1, 2)?.contiguous()?;
        let (w_uk, w_uv) =
            if w.device().is_cpu() { (w_uk, w_uv) } else { (w_uk.to_dtype(DType::BF16)?, w_uv.to_dtype(DType::BF16)?) };
        Ok(Self {
            q,
            kv_a,
            kv_a_norm: w.rms_norm(&format!("{p}.kv_a_layernorm"), r, cfg.rms_norm_eps)?,
            kv_b,
            w_uk,
            w_uv,
            o_proj: w.linear(&format!("{p}.o_proj"), nh * dv, h, cfg.attention_bias)?,
        })
    }

    fn forward(
        &self,
        h: &Tensor,
        cfg: &Config,
        ctx: &StepContext,
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = h.dim(0)?;
        let (nh, dn, dr, dv, r) =
            (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let q = self.q.forward(h)?.to_dtype(DType::F32)?.reshape((t, nh, dn + dr))?;
        let q_nope = q.narrow(2, 0, dn)?.contiguous()?;
        let q_pe = rope(&q.narrow(2, dn, dr)?, ctx)?;
        let ckv = self.kv_a.forward(h)?.to_dtype(DType::F32)?;
        let c = self.kv_a_norm.forward(&ckv.narrow(1, 0, r)?.contiguous()?)?;
        let k_pe = rope(&ckv.narrow(1, r, dr)?.unsqueeze(1)?, ctx)?.reshape((t, dr))?;
        let out = match ctx.mode {
            MlaCache::Latent => {
                let layer_cache = cache.latent_layer(layer)?;
                write_latent(layer_cache, &Tensor::cat(&[&c, &k_pe], 1)?, &ctx.slots)?;
                let q_lat = head_matmul(&q_nope, &self.w_uk)?;
                let q_full = Tensor::cat(&[&q_lat, &q_pe], 2)?;
                let params = LatentAttentionParams {
                    seqs: ctx.seqs.clone(),
                    num_heads: nh,
                    latent_dim: r + dr,
                    value_dim: r,
                    block_size: cache.block_size(),
                    scale: cfg.softmax_scale(),
                };
                let o_lat = latent_attention(&q_full, layer_cache, &params)?;
                head_matmul(&o_lat, &self.w_uv)?.reshape((t, nh * dv))?
            }
            MlaCache::Full => {
                let hd = cfg.full_head_dim();
                let kv = self.kv_b.forward(&c)?.to_dtype(DType::F32)?.reshape((t, nh, dn + dv))?;
                let k =
                    Tensor::cat(&[&kv.narrow(2, 0, dn)?, &k_pe.reshape((t, 1, dr))?.broadcast_as((t, nh, dr))?], 2)?;
                let pad = |x: Tensor| -> Result<Tensor> {
                    let w = x.dim(2)?;
                    Ok(if w < hd { x.pad_with_zeros(2, 0, hd - w)?.contiguous()? } else { x.contiguous()? })
                };
                let (q, k, v) =
                    (pad(Tensor::cat(&[&q_nope, &q_pe], 2)?)?, pad(k)?, pad(kv.narrow(2, dn, dv)?.contiguous()?)?);
                let (kc, vc) = cache.layer(layer)?;
                write_kv(kc, vc, &k, &v, &ctx.slots)?;
                let params = PagedAttentionParams {
                    seqs: ctx.seqs.clone(),
                    num_heads: nh,
                    num_kv_heads: nh,
                    head_dim: hd,
                    block_size: cache.block_size(),
                    scale: cfg.softmax_scale(),
                };
                paged_attention(&q, kc, vc, &params)?.reshape((t, nh, hd))?.narrow(2, 0, dv)?.reshape((t, nh * dv))?
            }
        };
        self.o_proj.forward(&out)
    }
}

/// Half-split rope over the last dimension of `x: [T, heads, d]` (a view into a
/// projection's output), rotated in place in the one copy that makes it contiguous.
fn rope(x: &Tensor, ctx: &StepContext) -> Result<Tensor> {
    // `contiguous` returns a shared view when x is already contiguous: copy then.
    let y = if x.is_contiguous() { x.copy()? } else { x.contiguous()? };
    ragnode_kernels::rowwise::rope_inplace(&y, &ctx.cos, &ctx.sin)?;
    Ok(y)
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Ffn,
}

struct StepContext {
    cos: Tensor,
    sin: Tensor,
    slots: Tensor,
    seqs: Arc<[crate::batch::SeqSpan]>,
    mode: MlaCache,
}

/// A loaded DeepSeek-V2/V3 model.
pub struct Model {
    cfg: Config,
    mode: MlaCache,
    embed: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
}

impl Model {
    /// Loads with the latent cache (the serving form).
    pub fn load(cfg: Config, w: &mut WeightSource) -> Result<Self> {
        Self::load_with_cache(cfg, w, MlaCache::Latent)
    }

    pub fn load_with_cache(cfg: Config, w: &mut WeightSource, mode: MlaCache) -> Result<Self> {
        let embed = w.embedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let h = cfg.hidden_size;
            let ffn = match (&cfg.moe, cfg.is_moe_layer(i)) {
                (Some(m), true) => {
                    let e = m.n_routed_experts;
                    let router = w.router(&format!("{p}.mlp.gate"), h, e)?;
                    let bias = match m.topk_method {
                        TopkMethod::NoAuxTc => Some(w.expert_bias(&format!("{p}.mlp.gate"), e)?),
                        _ => None,
                    };
                    let experts = w
                        .experts(&p, e, h, m.moe_intermediate_size)?
                        .into_iter()
                        .map(|(g, u, d)| Mlp::new(g, u, d))
                        .collect::<Result<Vec<_>>>()?;
                    let shared = if m.n_shared_experts > 0 {
                        Some(Mlp::load(
                            w,
                            &format!("{p}.mlp.shared_experts"),
                            h,
                            m.moe_intermediate_size * m.n_shared_experts,
                        )?)
                    } else {
                        None
                    };
                    Ffn::Moe(Moe { router, bias, experts, shared })
                }
                _ => Ffn::Dense(Mlp::load(w, &format!("{p}.mlp"), h, cfg.intermediate_size)?),
            };
            layers.push(DecoderLayer {
                input_norm: w.rms_norm(&format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
                attn: Attention::load(&cfg, w, &format!("{p}.self_attn"))?,
                post_norm: w.rms_norm(&format!("{p}.post_attention_layernorm"), h, cfg.rms_norm_eps)?,
                ffn,
            });
        }
        let norm = w.rms_norm("model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if !cfg.tie_word_embeddings && w.contains("lm_head") {
            w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        } else {
            embed.as_linear()?
        };
        let rope = RotaryEmbedding::new(cfg.qk_rope_head_dim, cfg.rope_theta, &cfg.rope_scaling)?;
        Ok(Self { device: w.device().clone(), cfg, mode, embed, layers, norm, lm_head, rope })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn cache_mode(&self) -> MlaCache {
        self.mode
    }
}

impl crate::CausalLm for Model {
    fn forward(&self, batch: &BatchInput, cache: &PagedKvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        if batch.tokens.is_empty() {
            return Ok(Tensor::zeros((0, cfg.vocab_size), DType::F32, &self.device)?);
        }
        batch.check(cache.layout(), cfg.kv_layout(self.mode), cfg.vocab_size)?;
        let (cos, sin) = self.rope.tables(&batch.positions, &self.device)?;
        let ctx = StepContext {
            cos,
            sin,
            slots: Tensor::new(batch.slots.as_slice(), &self.device)?,
            seqs: Arc::from(batch.seqs.as_slice()),
            mode: self.mode,
        };
        let mut x = self.embed.forward(&batch.tokens, &self.device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let attn = layer.attn.forward(&h, cfg, &ctx, cache, i)?.to_dtype(DType::F32)?;
            let (sum, h) = layer.post_norm.forward_residual(&x, &attn)?;
            x = sum;
            let y = match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(&h)?,
                Ffn::Moe(moe) => moe.forward(&h, cfg.moe.as_ref().expect("MoE layers have a MoE config"))?,
            };
            x = add(&x, &y.to_dtype(DType::F32)?)?;
        }
        let rows = Tensor::new(batch.logits_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    fn kv_layout(&self) -> KvCacheLayout {
        self.cfg.kv_layout(self.mode)
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
        "deepseek2"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moe(method: TopkMethod, scoring: ScoringFunc, norm: bool) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            n_shared_experts: 1,
            num_experts_per_tok: 2,
            moe_intermediate_size: 4,
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            scoring_func: scoring,
            topk_method: method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: norm,
            routed_scaling_factor: 2.0,
        }
    }

    #[test]
    fn greedy_softmax_routing_picks_the_best_and_scales() {
        let m = moe(TopkMethod::Greedy, ScoringFunc::Softmax, false);
        let logits = [0.0, 3.0, 1.0, 0.0, 2.5, 0.0, 0.0, 0.0];
        let r = route(&logits, None, &m);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
        let z: f32 = logits.iter().map(|x: &f32| x.exp()).sum();
        assert!((r[0].1 - 2.0 * 3f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn group_limited_routing_stays_inside_the_best_groups() {
        let m = moe(TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true);
        // Groups of 2: group 0 best = 5, group 1 best = 4, group 2 = 4.5, group 3 = 1.
        let logits = [5.0, -1.0, 4.0, 3.9, 4.5, 0.0, 1.0, 0.0];
        let r = route(&logits, None, &m);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 4]);
        // Normalised, and V2 does not scale normalised weights.
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn noaux_routing_chooses_with_bias_and_weighs_without() {
        let m = moe(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid, true);
        let logits = [2.0, 1.9, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        // The bias lifts expert 4, so group 2 outranks group 0 and expert 4 is chosen
        // before expert 1, though its unbiased score is lower.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0];
        let r = route(&logits, Some(&bias), &m);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 4]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sum = s(2.0) + s(1.0);
        assert!((r[0].1 - 2.0 * s(2.0) / sum).abs() < 1e-6);
    }

    #[test]
    fn v2_lite_config_parses() {
        let cfg = config_from_hf_json(
            r#"{"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
            "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
            "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
            "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
            "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": null, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1,
            "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
            "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
            "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
            "vocab_size": 102400}"#,
        )
        .unwrap();
        assert_eq!(cfg.latent_dim(), 576);
        assert!(cfg.is_moe_layer(1) && !cfg.is_moe_layer(0));
        let latent = cfg.kv_layout(MlaCache::Latent).bytes_per_token(DType::BF16);
        assert_eq!(cfg.full_kv_bytes_per_token(DType::BF16) as f64 / latent as f64, 5120.0 / 576.0);
        let ms = 0.1 * 0.707 * 40f32.ln() + 1.0;
        assert!((cfg.softmax_scale() - ms * ms / 192f32.sqrt()).abs() < 1e-6);
    }
}
