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
//! - [`activation`]: fused SwiGLU; [`rowwise`]: RMS norm, fused residual add + RMS norm,
//!   qkv split + rope, rope in place.
//! - [`sampling`]: temperature / top-k / top-p / min-p sampling of many rows at once on the
//!   device holding the logits.
//!
//! Every CPU kernel gives each output element a value that does not depend on which
//! other rows share the batch, so a sequence decodes to the same tokens alone or batched.
//!
//! With the `cuda` feature, `cuda/ragnode.cu` is compiled to PTX at build time and the ops
//! above run their own CUDA kernels on CUDA tensors (paged attention, latent attention,
//! cache writes, add + RMS norm, rope, sampling; launched through cudarc on candle's
//! stream); matmuls and the rest take candle's CUDA kernels. Each CUDA kernel has a CPU
//! twin (the CPU kernel or a `*_reference` written with candle ops) that the unit tests
//! pin down and `ragnode-bench gpu-check` compares against on a GPU. Other devices run the
//! references.

pub mod activation;
pub mod attention;
mod math;
pub mod mla;
mod par;
pub mod quant;
pub mod rowwise;
pub mod sampling;

#[cfg(feature = "cuda")]
mod cuda;

/// Free and total memory of a CUDA device, in bytes (`None` for other devices).
pub fn device_memory(device: &candle_core::Device) -> candle_core::Result<Option<(usize, usize)>> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::memory_info(d).map(Some),
        _ => Ok(None),
    }
}
