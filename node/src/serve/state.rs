//! The server's shared state: one struct behind an `Arc`, given to every handler.

use std::collections::HashMap;
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
    /// Set with the engine: prompts longer than this many bytes cannot fit the context
    /// ([`max_prompt_bytes`]; `None`: no such bound is known for the tokenizer).
    pub max_prompt_bytes: OnceLock<Option<usize>>,
}

/// Prompt-work jobs (chat-template rendering + tokenization) running at once; more wait
/// for a slot (within the request deadline).
pub const PROMPT_WORKERS: usize = 4;

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

/// Refuses a prompt of `bytes` that cannot fit `limit` tokens whatever it says.
fn check_prompt_bytes(bytes: usize, max_bytes: Option<usize>, limit: usize) -> Result<(), ApiError> {
    match max_bytes {
        Some(max) if bytes > max => Err(ApiError {
            param: Some("messages".into()),
            ..ApiError::bad_request(
                "context_length_exceeded",
                format!(
                    "This model's maximum context length is {limit} tokens. However, your prompt is {bytes} bytes, more than that many tokens can hold. Please reduce the length of the messages."
                ),
            )
        }),
        _ => Ok(()),
    }
}

/// The most prompt bytes `context_limit` tokens of `tok` can hold, when that can be known
/// without tokenizing: for BPE vocabularies (byte-level or byte-fallback) no token covers
/// more input bytes than its vocabulary entry is long (a byte-level entry spells each
/// byte as one character; SentencePiece's `▁` is three bytes for one space), and an
/// unknown character that is not fused with its neighbours is one token. With a
/// normalizer a factor 4 covers one that shrinks the text (NFKC maps a 4-byte character
/// to 1 byte at most). Other vocabularies (WordPiece, Unigram, word-level, fused
/// unknowns) can map a long run of text to one token: `None`.
pub fn max_prompt_bytes(tok: &ragnode_models::tokenizer::ModelTokenizer, context_limit: usize) -> Option<usize> {
    use tokenizers::ModelWrapper;
    let inner = tok.inner();
    match inner.get_model() {
        ModelWrapper::BPE(bpe) if bpe.unk_token.is_none() || !bpe.fuse_unk || bpe.byte_fallback => {}
        _ => return None,
    }
    let longest = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(4);
    let shrink = if inner.get_normalizer().is_some() { 4 } else { 1 };
    context_limit.checked_mul(longest)?.checked_mul(shrink)
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
        self.start_ids(ids, params, audit, affinity).await
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
        self.start_ids(ids, params, audit, affinity).await
    }

    /// A prompt's token ids. Rendering and tokenizing a large prompt takes a while (a
    /// 4 MB prompt: seconds), so it runs on the blocking pool, at most
    /// [`PROMPT_WORKERS`] at a time, and never on the runtime's workers (health checks
    /// and streams stay live). A prompt whose text is too long for the context whatever
    /// its tokens is refused before it is tokenized.
    pub async fn encode_prompt(&self, input: PromptInput) -> Result<Vec<u32>, ApiError> {
        let engine = self.engine()?;
        let limit = engine.context_limit();
        let max_bytes = self.max_prompt_bytes.get().copied().flatten();
        if let PromptInput::Text(text) = &input {
            check_prompt_bytes(text.len(), max_bytes, limit)?;
        }
        let permit = tokio::time::timeout_at(self.deadline(), self.prompt_workers.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::timeout("the request waited past the server's time limit"))?
            .map_err(|_| ApiError::not_ready("the server is shutting down"))?;
        let tok = engine.tokenizer().clone();
        let ids = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let large = match &input {
                PromptInput::Text(t) => t.len(),
                PromptInput::Chat { messages, .. } => messages.iter().map(|m| m.content.len()).sum(),
            } > LARGE_PROMPT_BYTES;
            let ids = match input {
                PromptInput::Text(text) => {
                    tok.encode(&text, true).map_err(|e| ApiError::internal(format!("tokenizing: {e}")))
                }
                PromptInput::Chat { messages, add_generation_prompt } => {
                    let text = tok.apply_chat_template(&messages, add_generation_prompt).map_err(|e| {
                        ApiError::bad_request("invalid_request", format!("the chat template failed: {e}"))
                    })?;
                    check_prompt_bytes(text.len(), max_bytes, limit)?;
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

    async fn start_ids(
        &self,
        ids: Vec<u32>,
        params: GenParams,
        audit: Option<Arc<AuditCell>>,
        affinity: Option<&str>,
    ) -> Result<AnswerStream, ApiError> {
        let engine = self.engine()?;
        let limit = engine.context_limit();
        let prompt_len = ids.len();
        let too_long = |requested: Option<usize>| {
            let ask = requested
                .map(|n| {
                    format!(
                        " However, you requested {} tokens ({prompt_len} in the messages, {n} in the completion).",
                        prompt_len.saturating_add(n)
                    )
                })
                .unwrap_or_else(|| format!(" However, your messages resulted in {prompt_len} tokens."));
            ApiError {
                param: Some("messages".into()),
                ..ApiError::bad_request(
                    "context_length_exceeded",
                    format!(
                        "This model's maximum context length is {limit} tokens.{ask} Please reduce the length of the messages or completion."
                    ),
                )
            }
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
        &self,
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
                // A direct answer does not depend on sampling settings: cached for all.
                if let Some((key, epoch)) = cache_key {
                    let cached =
                        CachedAnswer { text: text.clone(), sources: sources.clone(), finish_reason: "stop", usage };
                    app.store(key, cached, epoch);
                }
                Ok(AnswerStream::known(text, sources, false, usage).with_audit(audit).served_by(self.node_id.clone()))
            }
            RagPlan::Generate { messages, sources, suffix, cache_key } => {
                let mut params = overrides.params(app)?;
                params.stop.extend(super::rag::SOURCE_STOPS.iter().map(|s| s.to_string()));
                let Some(cache_key) = cache_key.filter(|_| shared) else {
                    let stream = self.start_chat(&messages, params, audit, affinity).await?;
                    return Ok(stream.with_sources(sources, suffix));
                };
                // The same question with the same settings already generating: follow it.
                let key = cache_key.0.clone();
                let shared = match app.inflight.join(&key) {
                    Role::Follower(mut f) => {
                        let started = f.started().await?;
                        let node = started.served_by.clone();
                        return Ok(AnswerStream::follow(f, started, self.deadline()).with_audit(audit).served_by(node));
                    }
                    Role::Leader(shared) => shared,
                };
                let mine = shared.follow();
                let stream = match self.start_chat(&messages, params, None, affinity).await {
                    Ok(s) => s,
                    Err(e) => {
                        app.inflight.fail(&key, &shared, e.clone());
                        return Err(e);
                    }
                };
                let started = Started {
                    prompt_tokens: stream.prompt_tokens(),
                    served_by: stream.served_by.clone(),
                    sources: sources.clone(),
                };
                let generation = stream.with_sources(sources, suffix).with_cache(app.clone(), Some(cache_key));
                let node = started.served_by.clone();
                app.inflight.lead(key, shared, started.clone(), generation);
                Ok(AnswerStream::follow(mine, started, self.deadline()).with_audit(audit).served_by(node))
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
