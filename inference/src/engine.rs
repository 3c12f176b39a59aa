//! The engine: one thread that owns the model and its KV cache and runs continuous
//! batching — every step it plans (via [`BatchScheduler`]), runs one forward pass over the
//! mixed batch, samples, detokenizes and streams each sequence's new text to its caller.
//!
//! Callers hold an [`EngineHandle`]. `submit` validates at the edge and enqueues, or fails
//! fast with [`EngineError::Overloaded`] when the bounded queue is full (backpressure, not
//! a timeout). Dropping a [`TokenStream`] cancels its request; its blocks are freed at the
//! next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use ragnode_models::tokenizer::ModelTokenizer;
use ragnode_models::{BatchInput, CausalLm, PagedKvCache};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::block_pool::{KvBlockPool, PoolCounters};
use crate::detokenizer::IncrementalDecoder;
use crate::request::{FinishReason, GenerationRequest, RequestId, StreamEvent, Timings, TokenStream, Usage};
use crate::sampling::{SampledLogprobs, Sampler};
use crate::scheduler::{BatchScheduler, SchedulerConfig, Sequence, StepItem};
use crate::stop::{StopCheck, StopMatcher};

/// Engine limits and sizes.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences decoding together.
    pub max_num_seqs: usize,
    /// Token budget of one step; also the prefill chunk size.
    pub max_batch_tokens: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Memory for the KV cache; fixes the number of blocks at start.
    pub kv_cache_bytes: usize,
    /// KV-cache element type; default f32 on CPU, bf16 on GPUs.
    pub kv_dtype: Option<DType>,
    /// Requests that may wait for admission beyond the `max_num_seqs` that run: `submit`
    /// accepts while fewer than `max_num_seqs + max_waiting` requests are in the engine
    /// (running, waiting or not yet seen by the engine thread) and answers `Overloaded`
    /// after that, whatever the engine thread has got round to.
    pub max_waiting: usize,
    /// Cap on prompt + generated tokens; default the model's context length.
    pub max_context: Option<usize>,
    /// On a GPU: size the KV cache from the device's memory instead of `kv_cache_bytes`,
    /// leaving this fraction of the device in use once the cache is allocated (the
    /// weights are already loaded; a working reserve for activations is kept aside).
    pub device_memory_utilization: Option<f32>,
    /// Sample on the logits' device (`ragnode_kernels::sampling`) instead of copying the
    /// logits to the host: `None` on CUDA devices only; `Some(true)` on any device (the
    /// CPU runs the reference rule: tests of this path); `Some(false)` never. Rows with
    /// penalties or log-probabilities always go through the host [`Sampler`].
    pub device_sampling: Option<bool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batch_tokens: 512,
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            kv_dtype: None,
            max_waiting: 256,
            max_context: None,
            device_memory_utilization: None,
            device_sampling: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("overloaded: {in_engine} requests are already running or waiting (limit {limit}); retry later")]
    Overloaded { in_engine: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens but the context limit is {limit}")]
    ContextLength { prompt: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("engine start failed: {0}")]
    Start(String),
}

/// Live counters, shared with handles (metrics, health, tests).
#[derive(Debug, Default)]
struct Counters {
    /// Submitted and not finished: running, waiting, or on its way to the engine thread
    /// (bounded by `max_num_seqs + max_waiting`). Counted at submit and at the final
    /// event, so the bound does not depend on how far the engine thread has got.
    in_engine: AtomicUsize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    steps: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    preemptions: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
}

/// A snapshot of the engine's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    /// Waiting for admission (new or preempted).
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Cache bytes one token takes (all layers; per-head K/V or a latent row).
    pub kv_bytes_per_token: usize,
    /// Cache bytes held by running sequences.
    pub kv_bytes_used: usize,
    /// Bytes the KV cache occupies on its device (allocated at start).
    pub kv_cache_bytes: usize,
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
    pub cancelled: u64,
}

enum Command {
    Submit { id: RequestId, req: Box<GenerationRequest>, tx: UnboundedSender<StreamEvent>, at: Instant },
    Cancel(RequestId),
    Shutdown,
}

struct Shared {
    cmd: Mutex<Sender<Command>>,
    counters: Counters,
    pool: Arc<PoolCounters>,
    next_id: AtomicU64,
    cfg: EngineConfig,
    /// prompt + generated tokens one sequence may reach.
    context_limit: usize,
    vocab_size: usize,
    tokenizer: Arc<ModelTokenizer>,
    thread: Mutex<Option<JoinHandle<()>>>,
    kv_cache_bytes: usize,
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

/// Working memory kept free on a GPU beside the KV cache: a fixed part plus a share per
/// token of the step budget (activations, logits, cuBLAS workspaces).
const DEVICE_RESERVE_BYTES: usize = 512 << 20;
const DEVICE_RESERVE_PER_BATCH_TOKEN: usize = 256 << 10;

/// The KV cache's byte budget: from the device's free memory when asked to and the device
/// reports it, else `kv_cache_bytes`.
fn kv_budget(cfg: &EngineConfig, device: &candle_core::Device) -> Result<usize, EngineError> {
    let Some(util) = cfg.device_memory_utilization else { return Ok(cfg.kv_cache_bytes) };
    if !(util > 0.0 && util <= 1.0) {
        return Err(EngineError::Start(format!("device memory utilization must be in (0, 1], got {util}")));
    }
    let Some((free, total)) =
        ragnode_kernels::device_memory(device).map_err(|e| EngineError::Start(format!("device memory: {e}")))?
    else {
        return Ok(cfg.kv_cache_bytes);
    };
    let keep_free = ((1.0 - util as f64) * total as f64) as usize;
    let reserve = DEVICE_RESERVE_BYTES + DEVICE_RESERVE_PER_BATCH_TOKEN * cfg.max_batch_tokens;
    let budget = free.saturating_sub(keep_free).saturating_sub(reserve);
    tracing::info!(
        free_mib = free >> 20,
        total_mib = total >> 20,
        util,
        kv_mib = budget >> 20,
        "KV cache sized from device memory"
    );
    if budget == 0 {
        return Err(EngineError::Start(format!(
            "no device memory left for the KV cache: {} MiB free of {} MiB, {} MiB to keep free at utilization {util}, {} MiB reserve",
            free >> 20,
            total >> 20,
            keep_free >> 20,
            reserve >> 20
        )));
    }
    Ok(budget)
}

/// What a step hands back: token ids sampled on the device, or the logits rows.
enum StepOutput {
    Sampled(Vec<u32>),
    Logits(Vec<f32>),
}

/// Starts engines.
pub struct Engine;

impl Engine {
    /// Sizes the KV cache from the budget and starts the engine thread.
    pub fn start(
        model: Arc<dyn CausalLm>,
        tokenizer: Arc<ModelTokenizer>,
        cfg: EngineConfig,
    ) -> Result<EngineHandle, EngineError> {
        if cfg.block_size == 0 || cfg.max_batch_tokens == 0 || cfg.max_num_seqs == 0 {
            return Err(EngineError::Start("block_size, max_batch_tokens and max_num_seqs must be > 0".into()));
        }
        let device = model.device().clone();
        let dtype = cfg.kv_dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::BF16 });
        let layout = model.kv_layout();
        let budget = kv_budget(&cfg, &device)?;
        let num_blocks = PagedKvCache::blocks_for_budget(layout, cfg.block_size, dtype, budget);
        if num_blocks == 0 {
            return Err(EngineError::Start(format!(
                "a KV cache budget of {} bytes holds no block of {} tokens ({} bytes per token)",
                budget,
                cfg.block_size,
                layout.bytes_per_token(dtype)
            )));
        }
        let cache = PagedKvCache::new(layout, num_blocks, cfg.block_size, dtype, &device)
            .map_err(|e| EngineError::Start(e.to_string()))?;
        let pool = KvBlockPool::new(num_blocks, cfg.block_size);
        pool.counters().block_bytes.store(layout.bytes_per_token(dtype) * cfg.block_size, Ordering::Relaxed);
        let context_limit =
            cfg.max_context.unwrap_or(usize::MAX).min(model.max_context()).min(num_blocks * cfg.block_size);
        tracing::info!(
            num_blocks,
            block_size = cfg.block_size,
            ?dtype,
            cache_mib = cache.size_in_bytes() >> 20,
            context_limit,
            "KV cache ready"
        );
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            cmd: Mutex::new(tx),
            counters: Counters::default(),
            pool: pool.counters(),
            next_id: AtomicU64::new(1),
            context_limit,
            vocab_size: model.vocab_size(),
            tokenizer: tokenizer.clone(),
            thread: Mutex::new(None),
            cfg: cfg.clone(),
            kv_cache_bytes: cache.size_in_bytes(),
        });
        let sched = BatchScheduler::new(
            SchedulerConfig { max_num_seqs: cfg.max_num_seqs, max_batch_tokens: cfg.max_batch_tokens },
            pool,
        );
        let worker = Worker { model, cache, tokenizer, sched, rx, shared: shared.clone() };
        let thread = std::thread::Builder::new()
            .name("ragnode-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Start(e.to_string()))?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(EngineHandle { shared })
    }
}

impl EngineHandle {
    /// Validates and enqueues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerationRequest) -> Result<TokenStream, EngineError> {
        let s = &self.shared;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if let Some(bad) = req.prompt.iter().chain(&req.stop_token_ids).find(|&&t| t as usize >= s.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({})",
                s.vocab_size
            )));
        }
        req.sampling.validate().map_err(EngineError::InvalidRequest)?;
        if req.prompt.len() >= s.context_limit {
            return Err(EngineError::ContextLength { prompt: req.prompt.len(), limit: s.context_limit });
        }
        let limit = s.cfg.max_num_seqs.saturating_add(s.cfg.max_waiting);
        s.counters
            .in_engine
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < limit).then_some(q + 1))
            .map_err(|in_engine| EngineError::Overloaded { in_engine, limit })?;
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let cmd = Command::Submit { id, req: Box::new(req), tx, at: Instant::now() };
        if s.cmd.lock().unwrap_or_else(|e| e.into_inner()).send(cmd).is_err() {
            s.counters.in_engine.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        Ok(TokenStream { id, rx })
    }

    /// Cancels a request; its stream ends with `FinishReason::Cancelled`.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.shared.cmd.lock().unwrap_or_else(|e| e.into_inner()).send(Command::Cancel(id));
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let total = self.shared.pool.total.load(Ordering::Relaxed);
        EngineStats {
            running: c.running.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            kv_blocks_total: total,
            kv_blocks_used: self.shared.pool.used(),
            kv_bytes_per_token: self.shared.pool.block_bytes.load(Ordering::Relaxed) / self.shared.cfg.block_size,
            kv_bytes_used: self.shared.pool.used_bytes(),
            kv_cache_bytes: self.shared.kv_cache_bytes,
            steps: c.steps.load(Ordering::Relaxed),
            prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
            generation_tokens: c.generation_tokens.load(Ordering::Relaxed),
            preemptions: c.preemptions.load(Ordering::Relaxed),
            finished: c.finished.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
        }
    }

    pub fn tokenizer(&self) -> &Arc<ModelTokenizer> {
        &self.shared.tokenizer
    }

    /// The most tokens (prompt + generated) one sequence may reach.
    pub fn context_limit(&self) -> usize {
        self.shared.context_limit
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// Stops the engine: running and waiting requests end as cancelled. Waits for the
    /// engine thread.
    pub fn shutdown(&self) {
        let _ = self.shared.cmd.lock().unwrap_or_else(|e| e.into_inner()).send(Command::Shutdown);
        let thread = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Per-request state riding along with its sequence.
struct Active {
    tx: UnboundedSender<StreamEvent>,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    /// Tokens that end generation (model end-of-turn unless ignored, plus the request's).
    stop_ids: Vec<u32>,
    max_tokens: usize,
    generated: usize,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

struct Worker {
    model: Arc<dyn CausalLm>,
    cache: PagedKvCache,
    tokenizer: Arc<ModelTokenizer>,
    sched: BatchScheduler<Active>,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
}

/// What one sampled token did to its sequence.
enum Outcome {
    Continue,
    Finish(FinishReason, Option<String>),
}

impl Worker {
    fn run(mut self) {
        let mut disconnected = false;
        loop {
            if self.sched.is_idle() {
                if disconnected {
                    return;
                }
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.reap_cancelled();
            let items = self.sched.schedule();
            self.note_admissions(&items);
            self.publish_gauges();
            if items.is_empty() {
                // Nothing fits (should not happen: requests are capped to the pool); avoid
                // spinning while waiting for a command.
                if let Ok(cmd) = self.rx.recv_timeout(Duration::from_millis(50))
                    && !self.handle(cmd)
                {
                    return;
                }
                continue;
            }
            // A bug in a kernel must not leave callers waiting on streams that never end:
            // fail the step's sequences and keep serving.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(&items))).is_err() {
                tracing::error!("engine step panicked; failing its sequences");
                for it in &items {
                    if let Some(seq) = self.sched.remove(it.id) {
                        self.finished(seq, FinishReason::Error, Some("internal engine error".into()));
                    }
                }
            }
            self.publish_gauges();
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit { id, req, tx, at } => {
                let tokenizer = &self.tokenizer;
                let mut stop_ids = req.stop_token_ids.clone();
                if !req.ignore_eos {
                    stop_ids.extend_from_slice(tokenizer.stop_token_ids());
                }
                // Generation ends at the context limit as `length`.
                let room = self.shared.context_limit - req.prompt.len();
                let active = Active {
                    tx,
                    sampler: Sampler::new(req.sampling.clone(), &req.prompt),
                    detok: IncrementalDecoder::new(&req.prompt),
                    stop: StopMatcher::new(&req.stop),
                    stop_ids,
                    max_tokens: req.max_tokens.min(room),
                    generated: 0,
                    submitted: at,
                    admitted: None,
                    first_token: None,
                };
                self.shared.counters.prompt_tokens.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
                self.sched.enqueue(Sequence::new(id, req.prompt, active));
                true
            }
            Command::Cancel(id) => {
                if let Some(seq) = self.sched.remove(id) {
                    self.finished(seq, FinishReason::Cancelled, None);
                }
                true
            }
            Command::Shutdown => {
                for seq in self.sched.remove_where(|_| true) {
                    self.finished(seq, FinishReason::Cancelled, Some("the engine is shutting down".into()));
                }
                false
            }
        }
    }

    /// Drops sequences whose caller went away, freeing their blocks.
    fn reap_cancelled(&mut self) {
        for seq in self.sched.remove_where(|s| s.payload.tx.is_closed()) {
            tracing::debug!(id = seq.id, "stream dropped; cancelling");
            self.finished(seq, FinishReason::Cancelled, None);
        }
    }

    fn note_admissions(&mut self, items: &[StepItem]) {
        let now = Instant::now();
        for it in items {
            if let Some(seq) = self.sched.get_mut(it.id)
                && seq.payload.admitted.is_none()
            {
                seq.payload.admitted = Some(now);
            }
        }
    }

    fn publish_gauges(&self) {
        let c = &self.shared.counters;
        c.running.store(self.sched.num_running(), Ordering::Relaxed);
        c.waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
        c.preemptions.store(self.sched.preemptions(), Ordering::Relaxed);
    }

    fn step(&mut self, items: &[StepItem]) {
        let block_size = self.cache.block_size();
        let mut batch = BatchInput::default();
        for it in items {
            let seq = self.sched.get(it.id).expect("scheduled sequences exist");
            batch.push_sequence(
                &seq.tokens[it.start..it.start + it.len],
                it.start,
                &seq.block_table,
                block_size,
                it.samples,
            );
        }
        let logits = self.model.forward(&batch, &self.cache).and_then(|t| Ok(self.sample_or_fetch(items, &t)?));
        self.shared.counters.steps.fetch_add(1, Ordering::Relaxed);
        let mut logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                for it in items {
                    if let Some(seq) = self.sched.remove(it.id) {
                        self.finished(seq, FinishReason::Error, Some(format!("model error: {e}")));
                    }
                }
                return;
            }
        };
        self.sched.complete(items);
        let vocab = self.model.vocab_size();
        let sampling = items.iter().filter(|it| it.samples);
        for (row, it) in sampling.enumerate() {
            let Some(seq) = self.sched.get_mut(it.id) else { continue };
            let (token, logprobs) = match &mut logits {
                StepOutput::Sampled(ids) => {
                    seq.payload.sampler.record(ids[row]);
                    (ids[row], None)
                }
                StepOutput::Logits(l) => seq.payload.sampler.sample(&mut l[row * vocab..(row + 1) * vocab]),
            };
            let outcome = on_token(seq, token, logprobs, &self.tokenizer);
            self.shared.counters.generation_tokens.fetch_add(1, Ordering::Relaxed);
            if let Outcome::Finish(reason, error) = outcome
                && let Some(seq) = self.sched.remove(it.id)
            {
                self.finished(seq, reason, error);
            }
        }
    }

    /// On a GPU, samples the step's rows there when every row's settings allow it (no
    /// penalties, no log-probabilities), so only the ids cross PCIe; otherwise copies the
    /// logits to the host for the [`Sampler`]s.
    fn sample_or_fetch(&mut self, items: &[StepItem], logits: &Tensor) -> candle_core::Result<StepOutput> {
        if self.shared.cfg.device_sampling.unwrap_or(logits.device().is_cuda()) {
            let mut rows = Vec::new();
            for it in items.iter().filter(|it| it.samples) {
                match self.sched.get(it.id).and_then(|s| s.payload.sampler.device_settings()) {
                    Some(p) => rows.push(p),
                    None => break,
                }
            }
            if rows.len() == items.iter().filter(|it| it.samples).count() {
                for (it, row) in items.iter().filter(|it| it.samples).zip(rows.iter_mut()) {
                    if let Some(seq) = self.sched.get_mut(it.id) {
                        row.u = seq.payload.sampler.draw(row.temperature);
                    }
                }
                return Ok(StepOutput::Sampled(ragnode_kernels::sampling::sample_rows(logits, &rows)?));
            }
        }
        Ok(StepOutput::Logits(logits.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Sends the final event of a removed sequence.
    fn finished(&self, seq: Sequence<Active>, reason: FinishReason, error: Option<String>) {
        let c = &self.shared.counters;
        c.in_engine.fetch_sub(1, Ordering::AcqRel);
        if reason == FinishReason::Cancelled {
            c.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        c.finished.fetch_add(1, Ordering::Relaxed);
        let a = &seq.payload;
        let now = Instant::now();
        let timings = Timings {
            queued: a.admitted.unwrap_or(now) - a.submitted,
            time_to_first_token: a.first_token.map(|t| t - a.submitted),
            total: now - a.submitted,
        };
        let usage = Usage { prompt_tokens: seq.prompt_len, completion_tokens: a.generated };
        let _ = a.tx.send(StreamEvent::Finished { reason, usage, timings, error });
    }
}

/// Records the sampled next token of `seq`, streams its text and says whether it is done.
fn on_token(
    seq: &mut Sequence<Active>,
    token: u32,
    logprobs: Option<SampledLogprobs>,
    tokenizer: &ModelTokenizer,
) -> Outcome {
    let a = &mut seq.payload;
    seq.tokens.push(token);
    a.generated += 1;
    a.first_token.get_or_insert_with(Instant::now);
    let send = |a: &Active, text: String, token_ids: Vec<u32>, logprobs| {
        let _ = a.tx.send(StreamEvent::Delta { text, token_ids, logprobs });
    };
    if a.stop_ids.contains(&token) {
        let tail = flush(a, tokenizer);
        send(a, tail.text, vec![token], logprobs.into_iter().collect());
        return Outcome::Finish(FinishReason::Stop, None);
    }
    let text = match a.detok.push(token, tokenizer) {
        Ok(t) => t,
        Err(e) => return Outcome::Finish(FinishReason::Error, Some(format!("detokenization failed: {e}"))),
    };
    match a.stop.push(&text) {
        StopCheck::Stopped(before) => {
            send(a, before, vec![token], logprobs.into_iter().collect());
            return Outcome::Finish(FinishReason::Stop, None);
        }
        StopCheck::Continue(out) => {
            if a.generated < a.max_tokens {
                send(a, out, vec![token], logprobs.into_iter().collect());
                return Outcome::Continue;
            }
            // Last token: release everything held back with it.
            let tail = flush(a, tokenizer);
            send(a, out + &tail.text, vec![token], logprobs.into_iter().collect());
            if tail.stopped {
                return Outcome::Finish(FinishReason::Stop, None);
            }
        }
    }
    Outcome::Finish(FinishReason::Length, None)
}

struct Tail {
    text: String,
    stopped: bool,
}

/// Releases text held by the detokenizer and the stop matcher at the end of a stream.
/// A stop string completed by the detokenizer's remainder still cuts the text.
fn flush(a: &mut Active, tokenizer: &ModelTokenizer) -> Tail {
    let rest = a.detok.flush(tokenizer).unwrap_or_default();
    match a.stop.push(&rest) {
        StopCheck::Stopped(t) => Tail { text: t, stopped: true },
        StopCheck::Continue(t) => Tail { text: t + &a.stop.flush(), stopped: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_budget_uses_device_memory_only_where_the_device_reports_it() {
        let cfg =
            EngineConfig { kv_cache_bytes: 123 << 20, device_memory_utilization: Some(0.9), ..Default::default() };
        // The CPU reports no device memory: the configured budget stands.
        assert_eq!(kv_budget(&cfg, &candle_core::Device::Cpu).unwrap(), 123 << 20);
        let plain = EngineConfig { device_memory_utilization: None, ..cfg.clone() };
        assert_eq!(kv_budget(&plain, &candle_core::Device::Cpu).unwrap(), 123 << 20);
        for bad in [0.0, -0.5, 1.5, f32::NAN] {
            let c = EngineConfig { device_memory_utilization: Some(bad), ..cfg.clone() };
            assert!(kv_budget(&c, &candle_core::Device::Cpu).is_err(), "{bad}");
        }
    }
}
