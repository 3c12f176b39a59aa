//! The server's shared state: one struct behind an `Arc`, given to every handler.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use ragnode_inference::{EngineHandle, GenerationRequest, SamplingParams};
use ragnode_models::tokenizer::ChatMessage;
use ragnode_retrieval::SearchOptions;

use std::collections::VecDeque;

use super::answer::{AnswerStream, Redispatch, TokenSource, dispatch};
use super::audit::{AuditCell, AuditSink};
use super::auth::KeyRing;
use super::error::ApiError;
use super::faqindex::FaqIndex;
use super::rag::{ConversationStore, RagApp, RagPlan};
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
        let engine = self.engine()?;
        let tok = engine.tokenizer();
        let text = tok
            .apply_chat_template(messages, true)
            .map_err(|e| ApiError::bad_request("invalid_request", format!("the chat template failed: {e}")))?;
        // The template spells out any BOS it wants.
        let ids = tok.encode(&text, false).map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
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
        let engine = self.engine()?;
        let ids =
            engine.tokenizer().encode(prompt, true).map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
        if ids.is_empty() {
            return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
        }
        self.start_ids(ids, params, audit, affinity).await
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
                param: Some("messages"),
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
            return Ok(AnswerStream::known(hit.text.clone(), hit.sources.clone(), true)
                .with_audit(audit)
                .served_by(self.node_id.clone()));
        }
        let epoch = app.epoch();
        let t = Instant::now();
        let found =
            self.faq()?.search(question, &SearchOptions { k: app.cfg.top_k, ..SearchOptions::default() }).await?;
        super::metrics::retrieval_latency(t.elapsed());
        let plan = app.plan(&found.hits, !found.missing.is_empty(), epoch, question, history)?;
        match plan {
            RagPlan::Answer { text, sources, cache_hit } => {
                Ok(AnswerStream::known(text, sources, cache_hit).with_audit(audit).served_by(self.node_id.clone()))
            }
            RagPlan::Generate { messages, sources, suffix, cache_key } => {
                let mut params = overrides.params(app)?;
                params.stop.extend(super::rag::SOURCE_STOPS.iter().map(|s| s.to_string()));
                let stream = self.start_chat(&messages, params, audit, affinity).await?;
                let cache_key = if shared { cache_key } else { None };
                Ok(stream.with_sources(sources, suffix).with_cache(app.clone(), cache_key))
            }
        }
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
