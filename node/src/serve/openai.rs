//! OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`. Request validation happens here, at the edge; shapes follow OpenAI's
//! so the official SDKs work (streams end with `data: [DONE]`; errors mid-stream are a
//! `data: {"error": ...}` event). The model `app:<name>` runs a RAG app.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use ragnode_inference::{SampledLogprobs, SamplingParams, Usage};
use ragnode_models::tokenizer::{ChatMessage, ModelTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::answer::{AnswerEnd, AnswerEvent, AnswerStream};
use super::audit::AuditCell;
use super::error::ApiError;
use super::extract::ApiJson;
use super::reasoning::{ReasoningFormat, ReasoningSplitter, Split};
use super::state::{AppState, GenParams, RagOverrides, SharedState};

/// `stop`: one string or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string or a list of parts (`{"type": "text", "text": ...}`).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and completions.
#[derive(Deserialize, Debug, Default)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<i64>,
    pub user: Option<String>,
    // vLLM-style extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

#[derive(Deserialize, Debug)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Reasoning models: `"deepseek"` (default) puts the `<think>` text in
    /// `reasoning_content`; `"none"` leaves it inline in `content`.
    pub reasoning_format: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Serialize)]
struct UsageBody {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

fn usage_body(u: &Usage, prompt_tokens: usize) -> UsageBody {
    let prompt = u.prompt_tokens.max(prompt_tokens);
    UsageBody {
        prompt_tokens: prompt,
        completion_tokens: u.completion_tokens,
        total_tokens: prompt + u.completion_tokens,
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

impl SamplingFields {
    /// Validates and converts; `logprobs` is the number of alternatives to return.
    pub fn to_params(&self, logprobs: Option<usize>) -> Result<GenParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid_param("n", format!("n must be 1 (one choice per request), got {n}")));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) | (None, Some(n)) if n < 1 => {
                return Err(ApiError::invalid_param("max_tokens", format!("max_tokens must be at least 1, got {n}")));
            }
            (Some(n), _) | (None, Some(n)) => Some(n as usize),
            (None, None) => None,
        };
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid_param("temperature", format!("temperature must be in [0, 2], got {t}")));
        }
        let top_k = match self.top_k {
            Some(k) if k < -1 => return Err(ApiError::invalid_param("top_k", "top_k must be -1, 0 or positive")),
            Some(k) if k > 0 => k as usize,
            _ => 0,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > 16 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::invalid_param(
                "stop",
                "stop takes at most 16 non-empty strings of at most 256 bytes",
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            logprobs,
        };
        sampling.validate().map_err(|m| ApiError::bad_request("invalid_value", m))?;
        Ok(GenParams { sampling, max_tokens, stop })
    }
}

impl SamplingFields {
    /// The fields a RAG app lets a request change, taken from `params` (their validated
    /// form, [`to_params`](Self::to_params)) where they were given.
    pub fn rag_overrides(&self, params: &mut GenParams) -> RagOverrides {
        RagOverrides {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: params.max_tokens,
            seed: params.sampling.seed,
            stop: std::mem::take(&mut params.stop),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        }
    }
}

/// The text of a message's content (text parts joined); other part types are refused.
fn content_text(c: Option<&Content>) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(s)) => Ok(s.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("content parts of type {kind:?} are not supported (text only)"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

pub fn chat_messages(wire: &[WireMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must contain at least one message"));
    }
    wire.iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant") => r,
                other => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("unsupported role {other:?} (system, developer, user, assistant)"),
                    ));
                }
            };
            Ok(ChatMessage::new(role, content_text(m.content.as_ref())?))
        })
        .collect()
}

/// Which model a request names.
enum Target<'a> {
    Model,
    App(&'a str),
}

fn target<'a>(state: &AppState, model: &'a str) -> Result<Target<'a>, ApiError> {
    if let Some(app) = model.strip_prefix("app:") {
        state.app(app)?;
        return Ok(Target::App(app));
    }
    state.served_model(model).map(|()| Target::Model)
}

/// OpenAI's logprobs object for one choice.
fn logprobs_json(tok: Option<&Arc<ModelTokenizer>>, lps: &[SampledLogprobs]) -> Value {
    let Some(tok) = tok else { return Value::Null };
    let entry = |id: u32, lp: f32| {
        let text = tok.decode(&[id], false).unwrap_or_default();
        json!({ "token": text, "logprob": lp, "bytes": text.as_bytes() })
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.chosen.token, l.chosen.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|t| entry(t.token, t.logprob)).collect());
            e
        })
        .collect();
    json!({ "content": content })
}

fn audit_model(cell: &Option<Extension<Arc<AuditCell>>>, model: &str, user: &Option<String>) -> Option<Arc<AuditCell>> {
    let cell = cell.as_ref().map(|c| c.0.clone());
    if let Some(c) = &cell {
        let (m, u) = (model.to_string(), user.clone());
        c.update(|r| {
            r.model = Some(m);
            r.user = u;
        });
    }
    cell
}

pub async fn chat_completions(
    State(state): State<SharedState>,
    audit: Option<Extension<Arc<AuditCell>>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let audit = audit_model(&audit, &req.model, &req.sampling.user);
    let messages = chat_messages(&req.messages)?;
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::invalid_param("top_logprobs", "top_logprobs must be in [0, 20]"));
        }
        (Some(true), n) => Some(n.unwrap_or(0) as usize),
        (_, Some(_)) => return Err(ApiError::invalid_param("top_logprobs", "top_logprobs needs logprobs: true")),
        _ => None,
    };
    let format = match req.reasoning_format.as_deref() {
        None => ReasoningFormat::Deepseek,
        Some(f) => ReasoningFormat::parse(f).ok_or_else(|| {
            ApiError::invalid_param("reasoning_format", "reasoning_format must be \"deepseek\" or \"none\"")
        })?,
    };
    let mut params = req.sampling.to_params(top)?;
    let answer = match target(&state, &req.model)? {
        Target::Model => state.start_chat(&messages, params, audit, req.sampling.user.as_deref()).await?,
        Target::App(name) => {
            let app = state.app(name)?.clone();
            let (last, history) = messages.split_last().ok_or_else(|| ApiError::invalid_param("messages", "empty"))?;
            if last.role != "user" {
                return Err(ApiError::invalid_param("messages", "the last message must be the user's question"));
            }
            if top.is_some() {
                return Err(ApiError::invalid_param("logprobs", "apps do not return logprobs"));
            }
            let overrides = req.sampling.rag_overrides(&mut params);
            // The app's own system prompt replaces a client's: history is user/assistant turns.
            let history: Vec<ChatMessage> = history.iter().filter(|m| m.role != "system").cloned().collect();
            state.start_rag(&app, &last.content, &history, overrides, audit, req.sampling.user.as_deref()).await?
        }
    };
    // Only logprobs need the tokenizer: cached and direct answers work while the model loads.
    let tok = state.engine.get().map(|e| e.tokenizer().clone());
    // A reasoning model's own text is split (cached and FAQ answers are not).
    let split_reasoning = format == ReasoningFormat::Deepseek
        && answer.is_generated()
        && tok.as_ref().is_some_and(|t| t.chat_template().reasons());
    let id = new_id("chatcmpl");
    let created = now_secs();
    let node = node_header(&answer);
    if req.stream {
        let shape = ChunkShape {
            object: "chat.completion.chunk",
            chat: true,
            id,
            created,
            model: req.model,
            include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
            logprobs: top.map(|_| (tok, logprobs_json as LogprobsFormat)),
        };
        let first = vec![shape.chunk(json!({"role": "assistant", "content": ""}), None, Value::Null)];
        let splitter = split_reasoning.then(ReasoningSplitter::new);
        return Ok((node, openai_sse(answer, shape, first, splitter)).into_response());
    }
    let prompt_tokens = answer.prompt_tokens();
    let (text, lps, end, sources) = answer.collect().await;
    if let Some(e) = end_error(&end) {
        return Err(e);
    }
    let mut message = json!({ "role": "assistant", "content": text, "refusal": Value::Null });
    if split_reasoning {
        let split = ReasoningSplitter::split_all(&text);
        message["content"] = if split.content.is_empty() { Value::Null } else { json!(split.content) };
        message["reasoning_content"] = json!(split.reasoning);
    }
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": if top.is_some() { logprobs_json(tok.as_ref(), &lps) } else { Value::Null },
            "finish_reason": end.finish_reason,
        }],
        "usage": usage_body(&end.usage, prompt_tokens),
    });
    if !sources.is_empty() {
        body["sources"] = json!(*sources);
    }
    Ok((node, Json(body)).into_response())
}

/// The error a non-streaming response gets for an answer that did not complete.
pub fn end_error(end: &AnswerEnd) -> Option<ApiError> {
    match (&end.error, end.finish_reason) {
        (Some((code, message)), _) if *code == "timeout" => Some(ApiError::timeout(message.clone())),
        (Some((_, message)), _) => Some(ApiError::internal(message.clone())),
        (None, "cancelled") => Some(ApiError::not_ready("the request was cancelled: the server is shutting down")),
        _ => None,
    }
}

fn sse_json(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn error_event(code: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": "server_error", "param": Value::Null, "code": code } })
}

/// How a streamed response shapes its chunks: chat (`delta` objects) or legacy
/// completions (`text`).
struct ChunkShape {
    object: &'static str,
    chat: bool,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Logprobs per delta: the tokenizer for token texts and the wire format.
    logprobs: Option<(Option<Arc<ModelTokenizer>>, LogprobsFormat)>,
}

type LogprobsFormat = fn(Option<&Arc<ModelTokenizer>>, &[SampledLogprobs]) -> Value;

impl ChunkShape {
    /// One chunk; `body` is the delta object (chat) or the text (completions).
    fn chunk(&self, body: Value, finish: Option<&str>, lp: Value) -> Value {
        let field = if self.chat { "delta" } else { "text" };
        let mut c = json!({
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": [{ "index": 0, field: body, "logprobs": lp, "finish_reason": finish }],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn delta(&self, text: String, lps: &[SampledLogprobs]) -> Value {
        let lp = self.logprobs.as_ref().map_or(Value::Null, |(tok, f)| f(tok.as_ref(), lps));
        let body = if self.chat { json!({ "content": text }) } else { json!(text) };
        self.chunk(body, None, lp)
    }

    /// A chat delta split into reasoning and content (either may be absent).
    fn split_delta(&self, split: Split, lps: &[SampledLogprobs]) -> Value {
        let lp = self.logprobs.as_ref().map_or(Value::Null, |(tok, f)| f(tok.as_ref(), lps));
        let mut body = json!({});
        if !split.reasoning.is_empty() {
            body["reasoning_content"] = json!(split.reasoning);
        }
        if !split.content.is_empty() {
            body["content"] = json!(split.content);
        }
        self.chunk(body, None, lp)
    }

    fn empty_body(&self) -> Value {
        if self.chat { json!({}) } else { json!("") }
    }

    /// The final events: the finish chunk (or an error event), the usage chunk, `[DONE]`.
    fn end(&self, answer: &AnswerStream, end: &AnswerEnd) -> Vec<Result<Event, Infallible>> {
        let mut out = Vec::new();
        match &end.error {
            Some((code, message)) => out.push(sse_json(&error_event(code, message))),
            None => out.push(sse_json(&self.chunk(self.empty_body(), Some(end.finish_reason), Value::Null))),
        }
        if self.include_usage {
            let mut c = self.chunk(self.empty_body(), None, Value::Null);
            c["choices"] = json!([]);
            c["usage"] = serde_json::to_value(usage_body(&end.usage, answer.prompt_tokens())).unwrap_or(Value::Null);
            out.push(sse_json(&c));
        }
        out.push(Ok(Event::default().data("[DONE]")));
        out
    }
}

/// A streamed OpenAI response: the `first` chunks, one chunk per delta (split into
/// reasoning and content by `splitter`, when given), the end events.
fn openai_sse(
    answer: AnswerStream,
    shape: ChunkShape,
    first: Vec<Value>,
    splitter: Option<ReasoningSplitter>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let batches = futures_util::stream::unfold(
        (answer, shape, Some(first), splitter, false),
        |(mut answer, shape, mut first, mut splitter, done)| async move {
            if done {
                return None;
            }
            let mut events: Vec<Result<Event, Infallible>> =
                first.take().unwrap_or_default().iter().map(sse_json).collect();
            let done = match answer.next().await {
                Some(AnswerEvent::Delta { text, logprobs }) => {
                    match &mut splitter {
                        None => events.push(sse_json(&shape.delta(text, &logprobs))),
                        Some(s) => {
                            // A tail held back as a possible tag still carries its logprobs.
                            let split = s.push(&text);
                            if !split.is_empty() || !logprobs.is_empty() {
                                events.push(sse_json(&shape.split_delta(split, &logprobs)));
                            }
                        }
                    }
                    false
                }
                Some(AnswerEvent::Done(end)) => {
                    if let Some(split) = splitter.as_mut().map(ReasoningSplitter::finish).filter(|s| !s.is_empty()) {
                        events.push(sse_json(&shape.split_delta(split, &[])));
                    }
                    events.extend(shape.end(&answer, &end));
                    true
                }
                None => {
                    events.push(Ok(Event::default().data("[DONE]")));
                    true
                }
            };
            Some((futures_util::stream::iter(events), (answer, shape, first, splitter, done)))
        },
    );
    Sse::new(futures_util::StreamExt::flatten(batches)).keep_alive(KeepAlive::default())
}

pub async fn completions(
    State(state): State<SharedState>,
    audit: Option<Extension<Arc<AuditCell>>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let audit = audit_model(&audit, &req.model, &req.sampling.user);
    if !matches!(target(&state, &req.model)?, Target::Model) {
        return Err(ApiError::invalid_param("model", "apps answer chat requests: use /v1/chat/completions"));
    }
    let prompt = match &req.prompt {
        PromptSpec::One(p) => p.clone(),
        PromptSpec::Many(v) if v.len() == 1 => v[0].clone(),
        PromptSpec::Many(_) => {
            return Err(ApiError::invalid_param("prompt", "give one prompt per request (a string or a list of one)"));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let top = match req.logprobs {
        Some(n) if !(0..=20).contains(&n) => {
            return Err(ApiError::invalid_param("logprobs", "logprobs must be in [0, 20]"));
        }
        Some(n) => Some(n as usize),
        None => None,
    };
    let mut params = req.sampling.to_params(top)?;
    // OpenAI's legacy default.
    params.max_tokens.get_or_insert(16);
    let answer = state.start_completion(&prompt, params, audit, req.sampling.user.as_deref()).await?;
    let tok = state.engine.get().map(|e| e.tokenizer().clone());
    let id = new_id("cmpl");
    let created = now_secs();
    let node = node_header(&answer);
    let echo = if req.echo { Some(prompt) } else { None };
    if req.stream {
        let shape = ChunkShape {
            object: "text_completion",
            chat: false,
            id,
            created,
            model: req.model,
            include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
            logprobs: top.map(|_| (tok, legacy_logprobs as LogprobsFormat)),
        };
        let first = echo.map(|e| vec![shape.chunk(json!(e), None, Value::Null)]).unwrap_or_default();
        return Ok((node, openai_sse(answer, shape, first, None)).into_response());
    }
    let prompt_tokens = answer.prompt_tokens();
    let (text, lps, end, _) = answer.collect().await;
    if let Some(e) = end_error(&end) {
        return Err(e);
    }
    let text = match echo {
        Some(p) => p + &text,
        None => text,
    };
    Ok((
        node,
        Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": Value::Null,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": if top.is_some() { legacy_logprobs(tok.as_ref(), &lps) } else { Value::Null },
                "finish_reason": end.finish_reason,
            }],
            "usage": usage_body(&end.usage, prompt_tokens),
        })),
    )
        .into_response())
}

/// `x-ragnode-node`: which node generated the answer.
pub fn node_header(answer: &AnswerStream) -> [(axum::http::HeaderName, axum::http::HeaderValue); 1] {
    let v = axum::http::HeaderValue::from_str(&answer.served_by).unwrap_or(axum::http::HeaderValue::from_static(""));
    [(axum::http::HeaderName::from_static("x-ragnode-node"), v)]
}

/// The legacy completions logprobs object.
fn legacy_logprobs(tok: Option<&Arc<ModelTokenizer>>, lps: &[SampledLogprobs]) -> Value {
    let Some(tok) = tok else { return Value::Null };
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let tokens: Vec<String> = lps.iter().map(|l| text(l.chosen.token)).collect();
    let token_logprobs: Vec<f32> = lps.iter().map(|l| l.chosen.logprob).collect();
    let top: Vec<Value> = lps
        .iter()
        .map(|l| {
            let m: serde_json::Map<String, Value> = l.top.iter().map(|t| (text(t.token), json!(t.logprob))).collect();
            Value::Object(m)
        })
        .collect();
    json!({ "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": Value::Array(vec![]) })
}

fn model_object(id: &str, created: u64) -> Value {
    json!({ "id": id, "object": "model", "created": created, "owned_by": "ragnode" })
}

pub async fn list_models(State(state): State<SharedState>) -> Json<Value> {
    let created = now_secs().saturating_sub(state.started.elapsed().as_secs());
    let mut data = vec![model_object(&state.model_id, created)];
    let mut apps: Vec<&String> = state.apps.keys().collect();
    apps.sort();
    data.extend(apps.into_iter().map(|a| model_object(&format!("app:{a}"), created)));
    Json(json!({ "object": "list", "data": data }))
}

pub async fn get_model(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    target(&state, &id)?;
    let created = now_secs().saturating_sub(state.started.elapsed().as_secs());
    Ok(Json(model_object(&id, created)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `data:` payloads of a streamed response.
    async fn sse_payloads(answer: AnswerStream, splitter: Option<ReasoningSplitter>) -> Vec<String> {
        let shape = ChunkShape {
            object: "chat.completion.chunk",
            chat: true,
            id: "chatcmpl-t".into(),
            created: 0,
            model: "m".into(),
            include_usage: false,
            logprobs: None,
        };
        let res = openai_sse(answer, shape, Vec::new(), splitter).into_response();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    fn pieces(p: &[&str]) -> AnswerStream {
        AnswerStream::known_pieces(p.iter().map(|s| s.to_string()).collect())
    }

    #[tokio::test]
    async fn streamed_reasoning_goes_to_reasoning_content_across_token_boundaries() {
        let tokens = ["<", "think", ">\n用户问退货。\n</", "think", ">\n\n", "30天内", "可退。"];
        let payloads = sse_payloads(pieces(&tokens), Some(ReasoningSplitter::new())).await;
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        let (mut reasoning, mut content) = (String::new(), String::new());
        for p in &payloads[..payloads.len() - 1] {
            let v: Value = serde_json::from_str(p).unwrap();
            let d = &v["choices"][0]["delta"];
            reasoning += d["reasoning_content"].as_str().unwrap_or("");
            content += d["content"].as_str().unwrap_or("");
            assert!(!d.to_string().contains("think>"), "a tag leaked: {p}");
        }
        assert_eq!(reasoning, "\n用户问退货。\n");
        assert_eq!(content, "30天内可退。");

        // `reasoning_format: "none"`: no splitter, the text stays inline.
        let payloads = sse_payloads(pieces(&tokens), None).await;
        let inline: String = payloads[..payloads.len() - 1]
            .iter()
            .filter_map(|p| {
                serde_json::from_str::<Value>(p).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string)
            })
            .collect();
        assert_eq!(inline, tokens.concat());
    }
}
