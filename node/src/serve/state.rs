//! The server's shared state: one struct behind an `Arc`, given to every handler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use ragnode_inference::{EngineHandle, GenerationRequest, SamplingParams, Usage};
use ragnode_models::tokenizer::ChatMessage;
use ragnode_retrieval::SearchOptions;

use std::collections::VecDeque;

use super::answer::{AnswerStream, Redispatch, TokenSource, dispatch};
use super::audit::{AuditCell, AuditSink};
use super::auth::KeyRing;
use super::coalesce::{Role, Started};
use super::error::ApiError;
use super::faqindex::FaqIndex;
use super::rag::{CachedAnswer, ConversationStore, RagApp, RagPlan};
use super::routing::{Placement, RemoteRequest, Router};
use crate::config::ServeConfig;

pub type SharedState = Arc<AppState>;

pub struct AppState {
    pub cfg: ServeConfig,
    /// The id clients name the model by.
    pub model_id: String,
    /// Set once the model is loaded and the engine runs.
    pub engine: OnceLock<EngineHandle>,
    /// Set once the FAQ is searchable: the local shard open (and seeded), or, in a
    /// cluster, the shards placed here caught up.
    pub faq: OnceLock<FaqIndex>,
    pub apps: HashMap<String, Arc<RagApp>>,
    /// The app `/v1/chat-messages` and the web page use by default (the first configured).
    pub default_app: String,
    pub keys: KeyRing,
    pub conversations: ConversationStore,
    pub audit: AuditSink,
    pub prometheus: PrometheusHandle,
    pub started: Instant,
    /// This node's id (also when alone).
    pub node_id: String,
    /// The address the listener got.
    pub http_addr: OnceLock<std::net::SocketAddr>,
    /// Set when the node has joined a cluster over NATS.
    pub membership: OnceLock<Arc<crate::cluster::Membership>>,
    /// Set with the membership: places generations on the cluster's nodes.
    pub router: OnceLock<Arc<Router>>,
    /// Cluster mode: the FAQ shards this node holds (set at join, before they catch up).
    pub faq_shards: OnceLock<Arc<crate::cluster::faqshards::FaqShards>>,
    /// Slots for prompt rendering + tokenization on the blocking pool ([`PROMPT_WORKERS`]).
    pub prompt_workers: Arc<tokio::sync::Semaphore>,
    /// Prompt jobs waiting for a slot (at most [`PROMPT_QUEUE`]).
    pub prompt_queue: AtomicUsize,
    /// Set with the engine: prompts longer than this many bytes cannot fit the context
    /// ([`max_prompt_bytes`]; `None`: no such bound is known for the tokenizer).
    pub max_prompt_bytes: OnceLock<Option<usize>>,
}

/// Prompt-work jobs (chat-template rendering + tokenization) running at once; more wait
/// for a slot (within the request deadline).
pub const PROMPT_WORKERS: usize = 4;

/// Prompt jobs that may wait for one of the [`PROMPT_WORKERS`]; more are answered 429.
pub const PROMPT_QUEUE: usize = 64;

/// A place in a bounded waiting line, given back on drop.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn take(waiting: &'a AtomicUsize, limit: usize) -> Result<Self, ApiError> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .map_err(|n| ApiError::overloaded(format!("{n} prompts are waiting to be tokenized; retry shortly")))?;
        Ok(Self(waiting))
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Prompts past this size leave large freed buffers behind (the tokenizer's working
/// memory is ~100× the text): handed back to the OS after them.
const LARGE_PROMPT_BYTES: usize = 256 << 10;

/// Returns freed heap memory to the OS. glibc keeps freed blocks in its per-thread
/// arenas; after a burst of large prompts that is hundreds of MB the node no longer uses.
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory glibc's allocator owns and no longer hands
    // out; it takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a request asks the model to continue.
pub enum PromptInput {
    /// A conversation, rendered with the model's chat template (ending with the
    /// assistant's turn opened, when `add_generation_prompt`).
    Chat { messages: Vec<ChatMessage>, add_generation_prompt: bool },
    /// Raw text (completions), with the tokenizer's BOS.
    Text(String),
}

impl PromptInput {
    /// Bytes of text the request brought (all messages' contents, or the prompt).
    fn text_bytes(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Chat { messages, .. } => messages.iter().map(|m| m.content.len()).sum(),
        }
    }
}

/// Refuses a prompt of `bytes` that cannot fit `limit` tokens whatever it says.
fn check_prompt_bytes(
    bytes: usize,
    max_bytes: Option<usize>,
    limit: usize,
    param: &'static str,
) -> Result<(), ApiError> {
    match max_bytes {
        Some(max) if bytes > max => Err(ApiError::context_length(
            param,
            format!(
                "This model's maximum context length is {limit} tokens. However, your {param} are {bytes} bytes, more than that many tokens can hold. Please reduce the length of the {param}."
            ),
        )),
        _ => Ok(()),
    }
}

/// The most prompt bytes `context_limit` tokens of `tok` can hold, when that can be known
/// without tokenizing: for BPE vocabularies (byte-level or byte-fallback) no token covers
/// more input bytes than its vocabulary entry is long (a byte-level entry spells each
/// byte as one character; SentencePiece's `▁` is three bytes for one space), and an
/// unknown character that is not fused with its neighbours is one token; a normalizer
/// that shrinks text multiplies the bound by [`shrink_factor`]. Other vocabularies
/// (WordPiece, Unigram, word-level, fused unknowns) can map a long run of text to one
/// token: `None`. Long-context models with long vocabulary entries get a bound past the
/// body limit (Qwen3: 256-byte entries × 32K tokens × 3): their guard is that prompts are
/// tokenized off the runtime, bounded.
pub fn max_prompt_bytes(tok: &ragnode_models::tokenizer::ModelTokenizer, context_limit: usize) -> Option<usize> {
    use tokenizers::ModelWrapper;
    let inner = tok.inner();
    match inner.get_model() {
        ModelWrapper::BPE(bpe) if bpe.unk_token.is_none() || !bpe.fuse_unk || bpe.byte_fallback => {}
        _ => return None,
    }
    let longest = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(4);
    let shrink = match inner.get_normalizer() {
        None => 1,
        Some(n) => shrink_factor(n)?,
    };
    context_limit.checked_mul(longest)?.checked_mul(shrink)
}

/// How many times shorter (in bytes) a normalizer can make a text: NFC composes at most
/// three jamo (9 bytes) into one syllable (3); NFKC/NFKD map a 4-byte character to one
/// byte at most; lowercasing shrinks a few characters by a third; prepending and the
/// byte-level mapping only add. A normalizer that may delete text (strip, replace,
/// precompiled SentencePiece maps, BERT's cleaning) has no bound: `None`.
fn shrink_factor(n: &tokenizers::NormalizerWrapper) -> Option<usize> {
    use tokenizers::NormalizerWrapper as N;
    match n {
        N::NFD(_) | N::Prepend(_) | N::ByteLevel(_) => Some(1),
        N::Lowercase(_) => Some(2),
        N::NFC(_) => Some(3),
        N::NFKC(_) | N::NFKD(_) => Some(4),
        N::Sequence(seq) => seq.as_ref().iter().try_fold(1usize, |f, n| f.checked_mul(shrink_factor(n)?)),
        _ => None,
    }
}

/// Generation settings from a request, before they meet the prompt.
#[derive(Clone, Debug, Default)]
pub struct GenParams {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
}

impl AppState {
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.engine.get().ok_or_else(|| ApiError::not_ready("the model is still loading; retry shortly"))
    }

    pub fn faq(&self) -> Result<&FaqIndex, ApiError> {
        self.faq.get().ok_or_else(|| ApiError::not_ready("the FAQ index is still opening; retry shortly"))
    }

    /// Checks that `model` names the served model (404 `model_not_found` otherwise).
    pub fn served_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_id { Ok(()) } else { Err(ApiError::model_not_found(model)) }
    }

    pub fn app(&self, name: &str) -> Result<&Arc<RagApp>, ApiError> {
        self.apps.get(name).ok_or_else(|| {
            ApiError::not_found("model_not_found", format!("The model `app:{name}` does not exist (no such app)."))
        })
    }

    pub fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(self.cfg.limits.request_timeout_secs)
    }

    /// Renders `messages` with the model's chat template and starts generating (here or,
    /// in a cluster, on the node `affinity` maps to).
    pub async fn start_chat(
        &self,
        messages: &[ChatMessage],
        params: GenParams,
        audit: Option<Arc<AuditCell>>,
        affinity: Option<&str>,
    ) -> Result<AnswerStream, ApiError> {
        let ids =
            self.encode_prompt(PromptInput::Chat { messages: messages.to_vec(), add_generation_prompt: true }).await?;
        self.start_ids(ids, params, audit, affinity, "messages").await
    }

    /// Tokenizes a raw prompt (with BOS) and starts generating.
    pub async fn start_completion(
        &self,
        prompt: &str,
        params: GenParams,
        audit: Option<Arc<AuditCell>>,
        affinity: Option<&str>,
    ) -> Result<AnswerStream, ApiError> {
        let ids = self.encode_prompt(PromptInput::Text(prompt.to_string())).await?;
        if ids.is_empty() {
            return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
        }
        self.start_ids(ids, params, audit, affinity, "prompt").await
    }

    /// A prompt's token ids. Rendering and tokenizing a large prompt takes a while (a
    /// 4 MB prompt: seconds), so it runs on the blocking pool, at most
    /// [`PROMPT_WORKERS`] at a time with at most [`PROMPT_QUEUE`] waiting (more: 429), and
    /// never on the runtime's workers (health checks and streams stay live). A prompt
    /// whose text is too long for the context whatever its tokens is refused before it
    /// waits or is tokenized.
    pub async fn encode_prompt(&self, input: PromptInput) -> Result<Vec<u32>, ApiError> {
        let engine = self.engine()?;
        let limit = engine.context_limit();
        let max_bytes = self.max_prompt_bytes.get().copied().flatten();
        let (param, bytes) = match &input {
            PromptInput::Text(text) => ("prompt", text.len()),
            // Templates add to the users' turns, never leave them out: a lower bound of
            // the rendered length before rendering.
            PromptInput::Chat { messages, .. } => {
                ("messages", messages.iter().filter(|m| m.role == "user").map(|m| m.content.len()).sum())
            }
        };
        check_prompt_bytes(bytes, max_bytes, limit, param)?;
        let permit = {
            let _waiting = QueueSlot::take(&self.prompt_queue, PROMPT_QUEUE)?;
            tokio::time::timeout_at(self.deadline(), self.prompt_workers.clone().acquire_owned())
                .await
                .map_err(|_| ApiError::timeout("the request waited past the server's time limit"))?
                .map_err(|_| ApiError::not_ready("the server is shutting down"))?
        };
        let tok = engine.tokenizer().clone();
        let large = input.text_bytes() > LARGE_PROMPT_BYTES;
        let ids = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let ids = match input {
                PromptInput::Text(text) => {
                    tok.encode(&text, true).map_err(|e| ApiError::internal(format!("tokenizing: {e}")))
                }
                PromptInput::Chat { messages, add_generation_prompt } => {
                    let text = tok.apply_chat_template(&messages, add_generation_prompt).map_err(|e| {
                        ApiError::bad_request("invalid_request", format!("the chat template failed: {e}"))
                    })?;
                    check_prompt_bytes(text.len(), max_bytes, limit, "messages")?;
                    tok.encode_rendered_chat(&text).map_err(|e| ApiError::internal(format!("tokenizing: {e}")))
                }
            };
            if large {
                give_back_free_memory();
            }
            ids
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??;
        Ok(ids)
    }

    /// Starts generating from prompt `ids`; `param` names the request field they came
    /// from (`messages`, `prompt`) in context-length errors.
    async fn start_ids(
        &self,
        ids: Vec<u32>,
        params: GenParams,
        audit: Option<Arc<AuditCell>>,
        affinity: Option<&str>,
        param: &'static str,
    ) -> Result<AnswerStream, ApiError> {
        let engine = self.engine()?;
        let limit = engine.context_limit();
        let prompt_len = ids.len();
        let too_long = |requested: Option<usize>| {
            let ask = requested
                .map(|n| {
                    format!(
                        " However, you requested {} tokens ({prompt_len} in the {param}, {n} in the completion).",
                        prompt_len.saturating_add(n)
                    )
                })
                .unwrap_or_else(|| format!(" However, your {param} resulted in {prompt_len} tokens."));
            ApiError::context_length(
                param,
                format!(
                    "This model's maximum context length is {limit} tokens.{ask} Please reduce the length of the {param} or completion."
                ),
            )
        };
        if prompt_len >= limit {
            return Err(too_long(None));
        }
        let max_tokens = match params.max_tokens {
            Some(n) if prompt_len.saturating_add(n) > limit => return Err(too_long(Some(n))),
            Some(n) => n,
            None => limit - prompt_len,
        };
        if let Some(a) = &audit {
            a.update(|r| r.prompt_tokens = prompt_len);
        }
        let Some(router) = self.router.get() else {
            let mut req = GenerationRequest::new(ids, max_tokens);
            req.sampling = params.sampling;
            req.stop = params.stop;
            let stream = engine.submit(req)?;
            return Ok(AnswerStream::engine(TokenSource::Local(stream), prompt_len, self.deadline())
                .with_audit(audit)
                .served_by(self.node_id.clone()));
        };
        let req = RemoteRequest {
            request_id: format!("{}-{:016x}", self.node_id, rand::random::<u64>()),
            from: self.node_id.clone(),
            model: self.model_id.clone(),
            prompt: ids,
            sampling: params.sampling,
            max_tokens,
            stop: params.stop,
        };
        let mut rest: VecDeque<Placement> = router.candidates(affinity).into();
        let source = dispatch(router, Some(engine), &req, &mut rest).await?;
        let node = source.node(&self.node_id).to_string();
        let redispatch = Redispatch { router: router.clone(), engine: Some(engine.clone()), req, rest };
        Ok(AnswerStream::engine(source, prompt_len, self.deadline())
            .with_redispatch(Some(redispatch))
            .with_audit(audit)
            .served_by(node))
    }

    /// Answers a RAG app's question (after `history`): cache, direct answer or model.
    pub async fn start_rag(
        self: &Arc<Self>,
        app: &Arc<RagApp>,
        question: &str,
        history: &[ChatMessage],
        overrides: RagOverrides,
        audit: Option<Arc<AuditCell>>,
        affinity: Option<&str>,
    ) -> Result<AnswerStream, ApiError> {
        if let Some(a) = &audit {
            let name = app.cfg.name.clone();
            a.update(|r| r.app = Some(name));
        }
        RagApp::check_question(question)?;
        // Answers made with the app's own settings are shared through its cache; a request
        // with its own settings neither reads nor fills it.
        let shared = overrides.is_empty();
        // A cached first turn needs neither the index nor the model.
        if shared
            && history.is_empty()
            && let Some(hit) = app.cached(question)
        {
            return Ok(AnswerStream::cached(&hit).with_audit(audit).served_by(self.node_id.clone()));
        }
        let epoch = app.epoch();
        let t = Instant::now();
        let found =
            self.faq()?.search(question, &SearchOptions { k: app.cfg.top_k, ..SearchOptions::default() }).await?;
        super::metrics::retrieval_latency(t.elapsed());
        let plan = app.plan(&found.hits, !found.missing.is_empty(), epoch, question, history)?;
        match plan {
            RagPlan::Answer { text, sources, cache_key } => {
                let usage = Usage {
                    prompt_tokens: self.count_tokens(question).await,
                    completion_tokens: self.count_tokens(&text).await,
                };
                // A direct answer does not depend on sampling settings: cached for all (once
                // its tokens can be counted: not while the model loads).
                if let Some((key, epoch)) = cache_key
                    && self.engine.get().is_some()
                {
                    let cached =
                        CachedAnswer { text: text.clone(), sources: sources.clone(), finish_reason: "stop", usage };
                    app.store(key, cached, epoch);
                }
                Ok(AnswerStream::known(text, sources, false, usage).with_audit(audit).served_by(self.node_id.clone()))
            }
            RagPlan::Generate { messages, sources, suffix, cache_key } => {
                let mut params = overrides.params(app)?;
                params.stop.extend(super::rag::SOURCE_STOPS.iter().map(|s| s.to_string()));
                let Some((key, epoch)) = cache_key.filter(|_| shared) else {
                    let stream = self.start_chat(&messages, params, audit, affinity).await?;
                    return Ok(stream.with_sources(sources, suffix));
                };
                // The same question, asked with the app's settings in the same cache epoch (so
                // planned from the same FAQ), already generating: follow it.
                let deadline = self.deadline();
                let mut follower = match app.inflight.join(&format!("{epoch}:{key}")) {
                    Role::Follower(f) => f,
                    Role::Leader(lead) => {
                        let mine = lead.follow();
                        // Started in a task of its own: no client going away (the leader's
                        // included) can abort the generation half-started.
                        let (this, app, question) = (self.clone(), app.clone(), question.to_string());
                        let affinity = affinity.map(str::to_string);
                        tokio::spawn(async move {
                            // A request that missed the cache before its search may find it
                            // filled by now.
                            if let Some(hit) = app.cached(&question) {
                                let started = Started {
                                    prompt_tokens: hit.usage.prompt_tokens,
                                    served_by: this.node_id.clone(),
                                    sources: hit.sources.clone(),
                                };
                                return lead.run(started, AnswerStream::cached(&hit));
                            }
                            match this.start_chat(&messages, params, None, affinity.as_deref()).await {
                                Ok(stream) => {
                                    let started = Started {
                                        prompt_tokens: stream.prompt_tokens(),
                                        served_by: stream.served_by.clone(),
                                        sources: sources.clone(),
                                    };
                                    let generation = stream
                                        .with_sources(sources, suffix)
                                        .with_cache(app.clone(), Some((key, epoch)));
                                    lead.run(started, generation);
                                }
                                Err(e) => lead.fail(e),
                            }
                        });
                        mine
                    }
                };
                let started = tokio::time::timeout_at(deadline, follower.started())
                    .await
                    .map_err(|_| ApiError::timeout("the request ran past the server's time limit"))??;
                let node = started.served_by.clone();
                Ok(AnswerStream::follow(follower, started, deadline).with_audit(audit).served_by(node))
            }
        }
    }

    /// Tokens in `text` (no special tokens), for the usage of answers the model did not
    /// write; 0 while the model loads. Long texts are counted off the runtime's workers.
    pub async fn count_tokens(&self, text: &str) -> usize {
        let Some(engine) = self.engine.get() else { return 0 };
        let tok = engine.tokenizer().clone();
        if text.len() <= 4 << 10 {
            return tok.encode(text, false).map(|ids| ids.len()).unwrap_or(0);
        }
        let text = text.to_string();
        tokio::task::spawn_blocking(move || tok.encode(&text, false).map(|ids| ids.len()).unwrap_or(0))
            .await
            .unwrap_or(0)
    }
}

/// A request's changes to a RAG app's generation settings.
#[derive(Clone, Debug, Default)]
pub struct RagOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

impl RagOverrides {
    pub fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.max_tokens.is_none()
            && self.seed.is_none()
            && self.stop.is_empty()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
    }

    /// The app's settings with these changes, validated.
    fn params(self, app: &RagApp) -> Result<GenParams, ApiError> {
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(app.cfg.temperature),
            top_p: self.top_p.unwrap_or(app.cfg.top_p),
            seed: self.seed,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            ..SamplingParams::default()
        };
        sampling.validate().map_err(|m| ApiError::bad_request("invalid_value", m))?;
        Ok(GenParams { sampling, max_tokens: Some(self.max_tokens.unwrap_or(app.cfg.max_tokens)), stop: self.stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragnode_models::tokenizer::ModelTokenizer;
    /// A BPE tokenizer over "a", "b", "ab", "<unk>" with `normalizer` (tokenizer.json form).
    fn bpe(normalizer: serde_json::Value, fuse_unk: bool) -> ModelTokenizer {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": normalizer, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": fuse_unk, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "ab": 2, "<unk>": 3}, "merges": [["a", "b"]]
            }
        });
        let path =
            std::env::temp_dir().join(format!("ragnode-bpe-{}-{}.json", std::process::id(), rand::random::<u32>()));
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = ModelTokenizer::from_hf_files(&path, None, None).unwrap();
        let _ = std::fs::remove_file(&path);
        tok
    }

    #[test]
    fn prompt_byte_bounds_hold_only_where_tokens_cannot_swallow_text() {
        // No normalizer: 100 tokens of at most 5 bytes ("<unk>") each.
        let none = serde_json::Value::Null;
        assert_eq!(max_prompt_bytes(&bpe(none.clone(), false), 100), Some(500));
        // NFC can compose three jamo (9 bytes) into one syllable (3).
        assert_eq!(max_prompt_bytes(&bpe(serde_json::json!({"type": "NFC"}), false), 100), Some(1500));
        let seq = serde_json::json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]});
        assert_eq!(max_prompt_bytes(&bpe(seq, false), 100), Some(3000));
        // A normalizer that deletes text, fused unknowns and word-level vocabularies: no bound.
        let strip = serde_json::json!({"type": "Strip", "strip_left": true, "strip_right": true});
        assert_eq!(max_prompt_bytes(&bpe(strip, false), 100), None);
        assert_eq!(max_prompt_bytes(&bpe(none, true), 100), None);
        assert_eq!(max_prompt_bytes(&ModelTokenizer::placeholder(10).unwrap(), 100), None);
        let err = check_prompt_bytes(501, Some(500), 100, "prompt").unwrap_err();
        assert_eq!((err.code, err.param.as_deref()), ("context_length_exceeded", Some("prompt")));
        assert!(check_prompt_bytes(500, Some(500), 100, "prompt").is_ok());
    }

    #[test]
    fn the_prompt_queue_is_bounded_and_gives_slots_back() {
        let waiting = AtomicUsize::new(0);
        let a = QueueSlot::take(&waiting, 2).unwrap();
        let _b = QueueSlot::take(&waiting, 2).unwrap();
        assert_eq!(QueueSlot::take(&waiting, 2).err().map(|e| e.code), Some("overloaded"));
        drop(a);
        assert!(QueueSlot::take(&waiting, 2).is_ok());
        assert_eq!(waiting.load(Ordering::Relaxed), 1);
    }
}
