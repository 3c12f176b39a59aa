//! # ragnode-kernels
//!
//! The compute kernels under ragnode's models, exposed as candle custom ops so model
//! code stays device-generic:
//!
//! - [`quant`]: quantized weight matrices (GGML block formats) with SIMD CPU matmul
//!   kernels that read each weight block once for the whole batch of rows.
//! - [`attention`]: paged attention over a block-structured KV cache for a varlen batch
//!   (decode rows and prefill chunks of many sequences in one call), and the cache write.
//! - [`mla`]: DeepSeek multi-head latent attention over a paged latent cache (one row
//!   per token shared by all heads, up-projections absorbed), and its cache write.
//! - [`activation`]: fused SwiGLU; [`rowwise`]: RMS norm, residual add, qkv split + rope.
//!
//! Every CPU kernel gives each output element a value that does not depend on which
//! other rows share the batch, so a sequence decodes to the same tokens alone or batched.
//!
//! The `cuda` feature builds candle with CUDA; device code lands in a later issue and
//! until then CUDA tensors take candle's own kernels.

pub mod activation;
pub mod attention;
mod math;
pub mod mla;
mod par;
pub mod quant;
pub mod rowwise;
