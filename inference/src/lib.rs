//! # ragnode-inference
//!
//! The generation engine: continuous batching over a paged KV cache, on any candle device.
//!
//! - [`engine`]: [`Engine`] starts a thread that owns the model and cache; callers submit
//!   tokenized [`GenerationRequest`]s through an [`EngineHandle`] and read a
//!   [`TokenStream`] of text deltas ending in a `Finished` event (reason, usage, timings).
//! - [`scheduler`]: [`scheduler::BatchScheduler`] plans each step under a token budget —
//!   decodes first, chunked prefill, FIFO admission, preemption by recomputation.
//! - [`block_pool`]: [`block_pool::KvBlockPool`], the cache's block accounting; a full pool
//!   makes requests wait, a full queue rejects them ([`EngineError::Overloaded`]).
//! - [`sampling`]: temperature, top-k/top-p/min-p, repetition/presence/frequency
//!   penalties, seeds, logprobs.
//! - [`stop`] and [`detokenizer`]: stop strings across token boundaries and UTF-8-safe
//!   incremental text.
//!
//! Tokenization happens at the edge (the caller encodes the prompt with the model's
//! tokenizer, available from [`EngineHandle::tokenizer`]).

pub mod block_pool;
pub mod detokenizer;
pub mod engine;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod stop;

pub use engine::{Engine, EngineConfig, EngineError, EngineHandle, EngineStats};
pub use request::{Collected, FinishReason, GenerationRequest, RequestId, StreamEvent, Timings, TokenStream, Usage};
pub use sampling::{SampledLogprobs, SamplingParams, TokenLogprob};
