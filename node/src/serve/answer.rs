//! [`AnswerStream`]: one answer as the front ends (OpenAI, Dify, WebSocket) consume it,
//! whether it comes from the engine or is already known (cache hit, direct FAQ answer).
//!
//! It is where per-request serving figures are taken — time to first token,
//! inter-token latency, end-to-end latency, token counters — and where a finished RAG
//! answer is appended its source line, stored in the app's cache and recorded in the
//! audit line. Dropping it drops the engine's `TokenStream`, which cancels the request.

use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;

use ragnode_inference::{EngineHandle, FinishReason, SampledLogprobs, StreamEvent, TokenStream, Usage};

use super::audit::AuditCell;
use super::coalesce::{Follower, SharedEvent, Started};
use super::metrics as m;
use super::rag::{CachedAnswer, RagApp, Source};
use super::routing::{Placement, RemoteEnd, RemoteRequest, RemoteStream, Router};

/// Where a generated answer's tokens come from.
pub enum TokenSource {
    Local(TokenStream),
    Remote(RemoteStream),
}

impl TokenSource {
    pub fn node<'a>(&'a self, me: &'a str) -> &'a str {
        match self {
            Self::Local(_) => me,
            Self::Remote(r) => &r.node,
        }
    }
}

/// What is needed to run a request elsewhere when its node vanished before answering.
pub struct Redispatch {
    pub router: Arc<Router>,
    pub engine: Option<EngineHandle>,
    pub req: RemoteRequest,
    pub rest: VecDeque<Placement>,
}

/// Starts `req` on the first candidate that takes it (ourselves or another node).
pub async fn dispatch(
    router: &Router,
    engine: Option<&EngineHandle>,
    req: &RemoteRequest,
    candidates: &mut VecDeque<Placement>,
) -> Result<TokenSource, crate::serve::error::ApiError> {
    use crate::serve::error::ApiError;
    let mut last_err = None;
    while let Some(c) = candidates.pop_front() {
        match c {
            Placement::Local => {
                let Some(engine) = engine else { continue };
                let mut run = ragnode_inference::GenerationRequest::new(req.prompt.clone(), req.max_tokens);
                run.sampling = req.sampling.clone();
                run.stop = req.stop.clone();
                match engine.submit(run) {
                    Ok(ts) => return Ok(TokenSource::Local(ts)),
                    Err(e @ ragnode_inference::EngineError::Overloaded { .. }) => last_err = Some(ApiError::from(e)),
                    Err(e) => return Err(e.into()),
                }
            }
            Placement::Remote(node) => {
                if let Some(rs) = router.start_remote(&node, req).await? {
                    return Ok(TokenSource::Remote(rs));
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ApiError::overloaded("no node of the cluster could take the request")))
}

/// An event of an answer.
#[derive(Debug)]
pub enum AnswerEvent {
    Delta { text: String, logprobs: Vec<SampledLogprobs> },
    Done(AnswerEnd),
}

/// How an answer ended.
#[derive(Clone, Debug)]
pub struct AnswerEnd {
    /// OpenAI's finish_reason: `stop`, `length`, or ours: `cancelled`, `error`.
    pub finish_reason: &'static str,
    pub usage: Usage,
    /// Set when `finish_reason` is `error`: (code, message).
    pub error: Option<(&'static str, String)>,
}

enum Origin {
    Engine(TokenSource),
    /// Text known up front (cached or FAQ answers), as deltas.
    Known(std::collections::VecDeque<String>),
    /// Another request's generation of the same answer (see `coalesce`).
    Shared(Follower),
    Ended,
}

pub struct AnswerStream {
    origin: Origin,
    /// The node generating (or that answered); set by the caller for local answers.
    pub served_by: String,
    redispatch: Option<Redispatch>,
    pub sources: Arc<Vec<Source>>,
    pub cache_hit: bool,
    /// Appended after a complete model answer.
    suffix: Option<String>,
    end_after_suffix: Option<AnswerEnd>,
    /// Stores the complete answer in this app's cache under this key (planned in this
    /// cache epoch).
    cache: Option<(Arc<RagApp>, String, u64)>,
    /// Tokens generated so far (for usage when the stream ends early).
    generated: usize,
    text: String,
    deadline: tokio::time::Instant,
    audit: Option<Arc<AuditCell>>,
    started: Instant,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    /// Usage and finish reason reported for a known answer.
    known_usage: Usage,
    known_finish: &'static str,
}

impl AnswerStream {
    /// An answer the engine generates.
    pub fn engine(source: TokenSource, prompt_tokens: usize, deadline: tokio::time::Instant) -> Self {
        Self::new(Origin::Engine(source), prompt_tokens, deadline)
    }

    /// Lets a request whose node vanished before its first token run elsewhere.
    pub fn with_redispatch(mut self, r: Option<Redispatch>) -> Self {
        self.redispatch = r;
        self
    }

    pub fn served_by(mut self, node: String) -> Self {
        if let Some(a) = &self.audit {
            let n = node.clone();
            a.update(|r| r.node = Some(n));
        }
        self.served_by = node;
        self
    }

    /// An answer known up front; `usage` counts the question's and the answer's tokens.
    pub fn known(text: String, sources: Arc<Vec<Source>>, cache_hit: bool, usage: Usage) -> Self {
        let mut s = Self::new(Origin::Known([text].into()), usage.prompt_tokens, tokio::time::Instant::now());
        s.sources = sources;
        s.cache_hit = cache_hit;
        s.known_usage = usage;
        s
    }

    /// A cached answer, served as first served (text, sources, finish reason, usage).
    pub fn cached(hit: &CachedAnswer) -> Self {
        let mut s = Self::known(hit.text.clone(), hit.sources.clone(), true, hit.usage);
        s.known_finish = hit.finish_reason;
        s
    }

    /// A generation shared with other requests, followed from its first event.
    pub fn follow(follower: Follower, started: Started, deadline: tokio::time::Instant) -> Self {
        let mut s = Self::new(Origin::Shared(follower), started.prompt_tokens, deadline);
        s.sources = started.sources;
        s
    }

    fn new(origin: Origin, prompt_tokens: usize, deadline: tokio::time::Instant) -> Self {
        Self {
            origin,
            served_by: String::new(),
            redispatch: None,
            sources: Arc::new(Vec::new()),
            cache_hit: false,
            suffix: None,
            end_after_suffix: None,
            cache: None,
            generated: 0,
            text: String::new(),
            deadline,
            audit: None,
            started: Instant::now(),
            last_token: None,
            prompt_tokens,
            known_usage: Usage::default(),
            known_finish: "stop",
        }
    }

    pub fn with_sources(mut self, sources: Arc<Vec<Source>>, suffix: Option<String>) -> Self {
        self.sources = sources;
        self.suffix = suffix;
        self
    }

    pub fn with_cache(mut self, app: Arc<RagApp>, key: Option<(String, u64)>) -> Self {
        self.cache = key.map(|(k, epoch)| (app, k, epoch));
        self
    }

    /// Ties the stream to the request's audit line; latencies count from the request's
    /// arrival.
    pub fn with_audit(mut self, cell: Option<Arc<AuditCell>>) -> Self {
        if let Some(c) = &cell {
            self.started = c.started;
            let hit = self.cache_hit;
            c.update(|r| r.cache_hit = hit);
        }
        self.audit = cell;
        self
    }

    /// A known answer delivered in `pieces` (tests of the wire shapes).
    #[cfg(test)]
    pub fn known_pieces(pieces: Vec<String>) -> Self {
        Self::new(Origin::Known(pieces.into()), 0, tokio::time::Instant::now())
    }

    /// Whether the text comes from the model (not a cached or FAQ answer).
    pub fn is_generated(&self) -> bool {
        matches!(self.origin, Origin::Engine(_) | Origin::Shared(_))
    }

    /// Records the time to this client's first text in its audit line.
    fn note_first_text(&mut self) {
        if let Some(a) = &self.audit {
            let ttft = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
            a.update(|r| {
                r.ttft_ms.get_or_insert(ttft);
            });
        }
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event; `None` after `Done`.
    pub async fn next(&mut self) -> Option<AnswerEvent> {
        loop {
            let ev = match &mut self.origin {
                Origin::Ended => return None,
                Origin::Known(text) => {
                    let Some(text) = text.pop_front() else {
                        let end = AnswerEnd { finish_reason: self.known_finish, usage: self.known_usage, error: None };
                        return Some(self.finish(end));
                    };
                    self.note_first_text();
                    return Some(AnswerEvent::Delta { text, logprobs: Vec::new() });
                }
                Origin::Shared(f) => {
                    let end = match tokio::time::timeout_at(self.deadline, f.next()).await {
                        Ok(Some(SharedEvent::Delta(text))) => {
                            self.note_first_text();
                            return Some(AnswerEvent::Delta { text, logprobs: Vec::new() });
                        }
                        Ok(Some(SharedEvent::Done(end))) => end,
                        Ok(None) => self.error_end("engine_error", "the shared generation ended early".into()),
                        Err(_) => self.error_end("timeout", "the request ran past the server's time limit".into()),
                    };
                    return Some(self.finish(end));
                }
                Origin::Engine(source) => match tokio::time::timeout_at(self.deadline, async {
                    match source {
                        TokenSource::Local(ts) => Ok(ts.next().await),
                        TokenSource::Remote(rs) => rs.next().await,
                    }
                })
                .await
                {
                    Ok(Ok(Some(ev))) => ev,
                    Ok(Err(RemoteEnd::LostBeforeFirstToken)) => {
                        // Its node died before answering: run it on the next candidate.
                        let gone = self.served_by.clone();
                        let Some(mut r) = self.redispatch.take() else {
                            let end = self.error_end("node_lost", format!("node {gone} left the cluster"));
                            return Some(self.finish(end));
                        };
                        match dispatch(&r.router, r.engine.as_ref(), &r.req, &mut r.rest).await {
                            Ok(src) => {
                                let node = src.node(&r.router.membership.node_id).to_string();
                                tracing::warn!(from = %gone, to = %node, "node lost before the first token; re-dispatched");
                                self.origin = Origin::Engine(src);
                                self.redispatch = Some(r);
                                if let Some(a) = &self.audit {
                                    let n = node.clone();
                                    a.update(|rec| rec.node = Some(n));
                                }
                                self.served_by = node;
                                continue;
                            }
                            Err(e) => {
                                let end = self.error_end(e.code, e.message);
                                return Some(self.finish(end));
                            }
                        }
                    }
                    Ok(Ok(None)) => {
                        let end = self.error_end("engine_error", "the engine dropped the request".into());
                        return Some(self.finish(end));
                    }
                    Err(_) => {
                        let end = self.error_end("timeout", "the request ran past the server's time limit".into());
                        return Some(self.finish(end));
                    }
                },
            };
            match ev {
                StreamEvent::Delta { text, token_ids, logprobs } => {
                    self.on_tokens(token_ids.len());
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    if self.cache.is_some() {
                        self.text.push_str(&text);
                    }
                    return Some(AnswerEvent::Delta { text, logprobs });
                }
                StreamEvent::Finished { reason, usage, error, .. } => {
                    m::prompt_tokens(usage.prompt_tokens);
                    let end = match reason {
                        FinishReason::Stop | FinishReason::Length => {
                            AnswerEnd { finish_reason: reason.as_str(), usage, error: None }
                        }
                        FinishReason::Cancelled => AnswerEnd { finish_reason: "cancelled", usage, error: None },
                        FinishReason::Error => AnswerEnd {
                            finish_reason: "error",
                            usage,
                            error: Some(("engine_error", error.unwrap_or_else(|| "generation failed".into()))),
                        },
                    };
                    if end.error.is_none()
                        && end.finish_reason != "cancelled"
                        && let Some(suffix) = self.suffix.take()
                    {
                        self.end_after_suffix = Some(end);
                        self.text.push_str(&suffix);
                        self.origin = Origin::Known(Default::default());
                        return Some(AnswerEvent::Delta { text: suffix, logprobs: Vec::new() });
                    }
                    return Some(self.finish(end));
                }
            }
        }
    }

    fn error_end(&self, code: &'static str, message: String) -> AnswerEnd {
        AnswerEnd { finish_reason: "error", usage: self.usage_so_far(), error: Some((code, message)) }
    }

    fn usage_so_far(&self) -> Usage {
        Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.generated }
    }

    /// Ends the stream as cancelled by the client (WebSocket `cancel`).
    pub fn cancel(mut self) -> Usage {
        let usage = self.usage_so_far();
        if let Some(a) = &self.audit {
            a.update(|r| {
                r.completion_tokens = usage.completion_tokens;
                r.finish_reason = Some("cancelled");
            });
        }
        self.origin = Origin::Ended;
        usage
    }

    fn on_tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => {
                let ttft = now - self.started;
                m::time_to_first_token(ttft);
                if let Some(a) = &self.audit {
                    a.update(|r| r.ttft_ms = Some((ttft.as_secs_f64() * 1e6).round() / 1e3));
                }
            }
            Some(prev) => m::inter_token_latency(now - prev, n),
        }
        m::generation_tokens(n);
        self.generated += n;
        self.last_token = Some(now);
    }

    fn finish(&mut self, end: AnswerEnd) -> AnswerEvent {
        let end = self.end_after_suffix.take().unwrap_or(end);
        let from_engine = matches!(self.origin, Origin::Engine(_)) || self.last_token.is_some();
        self.origin = Origin::Ended;
        if from_engine {
            m::e2e_latency(self.started.elapsed(), end.finish_reason);
        }
        // A complete answer — ended by the model, or at the app's own max_tokens, which
        // another generation with the same settings would hit too — is repeated to others
        // (with its finish reason); an error or a cancel is not.
        if end.error.is_none()
            && matches!(end.finish_reason, "stop" | "length")
            && let Some((app, key, epoch)) = self.cache.take()
        {
            let usage = Usage {
                prompt_tokens: self.prompt_tokens.max(end.usage.prompt_tokens),
                completion_tokens: end.usage.completion_tokens,
            };
            let text = std::mem::take(&mut self.text);
            let cached = CachedAnswer { text, sources: self.sources.clone(), finish_reason: end.finish_reason, usage };
            app.store(key, cached, epoch);
        }
        if let Some(a) = &self.audit {
            let prompt = self.prompt_tokens.max(end.usage.prompt_tokens);
            a.update(|r| {
                r.prompt_tokens = prompt;
                r.completion_tokens = end.usage.completion_tokens;
                r.finish_reason = Some(end.finish_reason);
                if let Some((code, _)) = &end.error {
                    r.error_code = Some(code);
                }
            });
        }
        AnswerEvent::Done(end)
    }

    /// Reads the whole answer: text, logprobs and the end.
    pub async fn collect(mut self) -> (String, Vec<SampledLogprobs>, AnswerEnd, Arc<Vec<Source>>) {
        let mut text = String::new();
        let mut lps = Vec::new();
        let mut end = None;
        while let Some(ev) = self.next().await {
            match ev {
                AnswerEvent::Delta { text: t, logprobs } => {
                    text.push_str(&t);
                    lps.extend(logprobs);
                }
                AnswerEvent::Done(e) => end = Some(e),
            }
        }
        let end = end.unwrap_or(AnswerEnd { finish_reason: "error", usage: Usage::default(), error: None });
        (text, lps, end, self.sources.clone())
    }
}

impl Drop for AnswerStream {
    fn drop(&mut self) {
        // A stream dropped before its end is a client that went away.
        if !matches!(self.origin, Origin::Ended)
            && let Some(a) = &self.audit
        {
            let generated = self.generated;
            a.update(|r| {
                if r.finish_reason.is_none() {
                    r.completion_tokens = generated;
                    r.finish_reason = Some("cancelled");
                    r.error_code = Some("client_disconnected");
                }
            });
        }
    }
}
