//! Dify-compatible `POST /v1/chat-messages` for RAG apps: `query`, `inputs`, `user`,
//! `conversation_id`, `response_mode` (`streaming` | `blocking`). Streaming sends SSE
//! events `message` (answer chunks), `message_end` (usage and `retriever_resources`) or
//! `error`. Conversations keep their history server-side by `conversation_id`.
//!
//! The app is the one the API key is bound to, else `?app=NAME`, else `inputs.app`, else
//! the first configured app.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::answer::{AnswerEvent, AnswerStream};
use super::audit::AuditCell;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::rag::Source;
use super::state::{RagOverrides, SharedState};

#[derive(Deserialize, Debug)]
pub struct ChatMessageRequest {
    pub query: String,
    #[serde(default)]
    pub inputs: HashMap<String, Value>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub conversation_id: Option<String>,
    #[serde(default = "default_mode")]
    pub response_mode: String,
}

fn default_mode() -> String {
    "streaming".into()
}

#[derive(Deserialize, Debug, Default)]
pub struct AppQuery {
    pub app: Option<String>,
}

fn new_uuid() -> String {
    let v = rand::random::<u128>();
    let h = format!("{v:032x}");
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// Dify's `retriever_resources`.
pub fn retriever_resources(sources: &[Source], app: &str) -> Value {
    Value::Array(
        sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "position": i + 1,
                    "dataset_id": "faq",
                    "dataset_name": app,
                    "document_id": s.id,
                    "document_name": s.question,
                    "segment_id": s.id,
                    "score": s.confidence,
                    "content": s.answer,
                })
            })
            .collect(),
    )
}

pub async fn chat_messages(
    State(state): State<SharedState>,
    caller: Option<Extension<Caller>>,
    audit: Option<Extension<Arc<AuditCell>>>,
    q: Result<Query<AppQuery>, QueryRejection>,
    ApiJson(req): ApiJson<ChatMessageRequest>,
) -> Result<Response, ApiError> {
    let audit = audit.map(|a| a.0);
    let Query(q) =
        q.map_err(|e| ApiError::bad_request("invalid_request", format!("query string: {}", e.body_text())))?;
    let streaming = match req.response_mode.as_str() {
        "streaming" => true,
        "blocking" => false,
        other => {
            return Err(ApiError::invalid_param(
                "response_mode",
                format!("response_mode must be streaming or blocking, got {other:?}"),
            ));
        }
    };
    let app_name = caller
        .and_then(|c| c.0.app.clone())
        .or(q.app)
        .or_else(|| req.inputs.get("app").and_then(|v| v.as_str()).map(str::to_string))
        .unwrap_or_else(|| state.default_app.clone());
    let app = state.app(&app_name)?.clone();
    let user = req.user.as_deref().filter(|u| !u.is_empty());
    let (conversation_id, history) = match req.conversation_id.as_deref().filter(|c| !c.is_empty()) {
        Some(id) => (id.to_string(), state.conversations.history(id, &app_name, user)?),
        None => (new_uuid(), Vec::new()),
    };
    if let Some(a) = &audit {
        let u = req.user.clone();
        a.update(|r| {
            r.user = u;
            r.model = Some(format!("app:{app_name}"));
        });
    }
    let affinity = Some(conversation_id.as_str());
    let answer = state.start_rag(&app, &req.query, &history, RagOverrides::default(), audit, affinity).await?;
    let message_id = new_uuid();
    let task_id = new_uuid();
    let created_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ctx = Ctx {
        state: state.clone(),
        app: app_name,
        user: user.map(str::to_string),
        query: req.query.clone(),
        conversation_id,
        message_id,
        task_id,
        created_at,
        started: Instant::now(),
    };
    if streaming {
        return Ok(Sse::new(events(answer, ctx)).keep_alive(KeepAlive::default()).into_response());
    }
    let (text, _, end, sources) = answer.collect().await;
    if let Some(e) = super::openai::end_error(&end) {
        return Err(e);
    }
    ctx.remember(&text);
    Ok(Json(json!({
        "event": "message",
        "task_id": ctx.task_id,
        "id": ctx.message_id,
        "message_id": ctx.message_id,
        "conversation_id": ctx.conversation_id,
        "mode": "chat",
        "answer": text,
        "metadata": ctx.metadata(&end.usage, &sources),
        "created_at": ctx.created_at,
    }))
    .into_response())
}

struct Ctx {
    state: SharedState,
    app: String,
    user: Option<String>,
    query: String,
    conversation_id: String,
    message_id: String,
    task_id: String,
    created_at: u64,
    started: Instant,
}

impl Ctx {
    fn remember(&self, answer: &str) {
        self.state.conversations.append(&self.conversation_id, &self.app, self.user.as_deref(), &self.query, answer);
    }

    fn metadata(&self, usage: &ragnode_inference::Usage, sources: &[Source]) -> Value {
        json!({
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "latency": self.started.elapsed().as_secs_f64(),
            },
            "retriever_resources": retriever_resources(sources, &self.app),
        })
    }

    fn base(&self, event: &str) -> Value {
        json!({
            "event": event,
            "task_id": self.task_id,
            "message_id": self.message_id,
            "id": self.message_id,
            "conversation_id": self.conversation_id,
            "created_at": self.created_at,
        })
    }
}

fn events(answer: AnswerStream, ctx: Ctx) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold((answer, ctx, String::new(), false), |(mut answer, ctx, mut text, done)| async move {
        if done {
            return None;
        }
        let (ev, done) = match answer.next().await {
            Some(AnswerEvent::Delta { text: t, .. }) => {
                text.push_str(&t);
                let mut v = ctx.base("message");
                v["answer"] = json!(t);
                (v, false)
            }
            Some(AnswerEvent::Done(end)) => match &end.error {
                Some((code, message)) => {
                    let mut v = ctx.base("error");
                    v["status"] = json!(500);
                    v["code"] = json!(code);
                    v["message"] = json!(message);
                    (v, true)
                }
                None => {
                    if end.finish_reason != "cancelled" {
                        ctx.remember(&text);
                    }
                    let mut v = ctx.base("message_end");
                    v["metadata"] = ctx.metadata(&end.usage, &answer.sources);
                    v["finish_reason"] = json!(end.finish_reason);
                    (v, true)
                }
            },
            None => return None,
        };
        Some((Ok(Event::default().data(ev.to_string())), (answer, ctx, text, done)))
    })
}
