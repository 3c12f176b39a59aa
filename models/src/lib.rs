//! # ragnode-models
//!
//! Model architectures, their weights and their tokenizers, in the form the engine
//! needs for continuous batching:
//!
//! - [`llama`]: the Llama decoder family (Llama 2/3, SmolLM, DeepSeek-R1-Distill-Llama) and,
//!   through [`qwen2`], Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen. A forward step takes a
//!   varlen [`BatchInput`] — many sequences, each at its own position — and reads/writes
//!   a [`PagedKvCache`] whose blocks the engine hands out.
//! - [`deepseek2`]: DeepSeek-V2 / V2-Lite / V3 — multi-head latent attention over a latent
//!   cache (one shared row per token, up-projections absorbed), MoE with V2 softmax and V3
//!   sigmoid + bias group-limited routing, shared experts, YaRN.
//! - [`weights`]: GGUF (every GGML type candle supports, f16/f32 too), HF safetensors
//!   (f32/f16/bf16) and random weights made from a config. Quantized weights run on
//!   `ragnode-kernels`' CPU matmul where it has a kernel for the format, and on candle's
//!   `QMatMul` otherwise.
//! - [`loader`]: a local path or a Hugging Face repo id (through `hf-hub`) to a
//!   [`LoadedModel`].
//! - [`tokenizer`]: tokenizers built from GGUF metadata or `tokenizer.json`, and chat
//!   templates rendered with minijinja.
//!
//! candle-transformers' one-sequence models are the test oracle for these (see `tests/`).
//! Model code holds no serving logic: scheduling and sampling live in `ragnode-inference`.

pub mod batch;
pub mod deepseek2;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod loader;
pub mod qwen2;
pub mod tokenizer;
pub mod weights;

pub use batch::BatchInput;
pub use error::{ModelError, Result};
pub use kv_cache::{KvCacheLayout, PagedKvCache};
pub use loader::{DeviceSpec, DummyWeights, LoadOptions, LoadedModel, load_model};

use candle_core::{Device, Tensor};

/// A decoder that runs a varlen batch against a paged KV cache.
pub trait CausalLm: Send + Sync {
    /// Runs one step. Writes the batch's keys/values into `cache` and returns f32 logits
    /// `[batch.logits_rows.len(), vocab_size]`.
    fn forward(&self, batch: &BatchInput, cache: &PagedKvCache) -> Result<Tensor>;
    /// What the cache must hold per token.
    fn kv_layout(&self) -> KvCacheLayout;
    fn vocab_size(&self) -> usize;
    /// The longest sequence (prompt + generated) the model was trained for.
    fn max_context(&self) -> usize;
    fn device(&self) -> &Device;
    fn architecture(&self) -> &'static str;
}
