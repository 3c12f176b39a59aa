//! Streaming chat over a WebSocket: `GET /v1/chat/ws`.
//!
//! Client → server (JSON text frames):
//! - `{"type": "chat", "id": "q1", "query": "退货政策是什么?", "app": "faq", "conversation_id": "…"}`
//!   asks a RAG app (default: the first app); or `{"type": "chat", "id": "q2", "model":
//!   "<model id>", "messages": [{"role": "user", "content": "…"}]}` asks the model itself.
//!   Optional: OpenAI's sampling fields (`max_tokens`, `temperature`, `top_p`, `seed`,
//!   `stop`, penalties...), checked as on `/v1/chat/completions`; message roles too.
//! - `{"type": "cancel", "id": "q1"}`.
//!
//! Server → client: `{"type": "delta", "id", "text"}`, then `{"type": "done", "id",
//! "finish_reason", "usage", "sources", "conversation_id", "cache_hit"}`, or `{"type":
//! "error", "id", "code", "message"}`. Several requests may be in flight on one socket
//! (up to `limits.ws_max_inflight`); each is answered under its id. The server pings every
//! `limits.ws_ping_interval_secs` and closes a socket that missed two pongs. Protocol
//! errors close the socket with their RFC 6455 code and a reason: 1009 for a message
//! over `limits.ws_max_message_bytes`, 1007 for invalid UTF-8, 1002 for a forbidden frame.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::answer::AnswerEvent;
use super::audit::AuditCell;
use super::error::ApiError;
use super::openai::{SamplingFields, WireMessage, chat_messages};
use super::state::SharedState;

#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    Chat(Box<ChatAsk>),
    Cancel { id: String },
}

#[derive(Deserialize, Debug)]
struct ChatAsk {
    id: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<WireMessage>>,
    /// OpenAI's sampling fields, checked as on `/v1/chat/completions`.
    #[serde(flatten)]
    sampling: SamplingFields,
}

pub async fn upgrade(
    State(state): State<SharedState>,
    audit: Option<Extension<Arc<AuditCell>>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::bad_request("websocket_required", format!("connect with a WebSocket: {}", e.body_text()))
                .into_response();
        }
    };
    let limits = &state.cfg.limits;
    let audit = audit.map(|a| a.0);
    ws.max_message_size(limits.ws_max_message_bytes)
        .max_frame_size(limits.ws_max_message_bytes)
        .on_upgrade(move |socket| serve_socket(state, socket, audit))
}

/// The close frame that answers a read error caused by the client: 1009 for a message
/// or frame over the limit, 1007 for text that is not UTF-8, 1002 for a frame the
/// protocol forbids (unmasked, reserved bits or opcodes, bad fragmentation). Transport
/// errors and closes get none.
fn close_frame_for(e: axum::Error) -> Option<CloseFrame> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let e = e.into_inner();
    let (code, reason) = match e.downcast_ref::<WsError>()? {
        WsError::Capacity(c) => (1009, c.to_string()),
        WsError::Utf8(_) => (1007, "text frame is not valid UTF-8".to_string()),
        WsError::Protocol(p) => (1002, p.to_string()),
        _ => return None,
    };
    // A close reason is at most 123 bytes.
    let mut reason = reason;
    while reason.len() > 123 {
        reason.pop();
    }
    Some(CloseFrame { code, reason: reason.into() })
}

fn error_msg(id: Option<&str>, e: &ApiError) -> Value {
    json!({ "type": "error", "id": id, "code": e.code, "message": e.message })
}

/// Frames waiting for the writer; a client that lets this fill is not reading and is
/// closed.
const OUT_QUEUE: usize = 1024;

/// A request in flight: its cancel switch and a token telling it from a later request
/// that reuses the client id.
struct InFlight {
    token: u64,
    cancel: oneshot::Sender<()>,
}

async fn serve_socket(state: SharedState, socket: WebSocket, audit: Option<Arc<AuditCell>>) {
    let limits = state.cfg.limits.clone();
    let (mut sink, mut stream) = socket.split();
    // One writer task owns the sink, so a client that stops reading blocks only it: the
    // loop below keeps reading frames, handling cancels and counting missed pongs.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
    });
    let mut inflight: HashMap<String, InFlight> = HashMap::new();
    let mut next_token = 0u64;
    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<(String, u64)>();
    let period = Duration::from_secs(limits.ws_ping_interval_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut unanswered_pings = 0u32;
    let mut ping_seq = 0u64;
    let reply = |v: Value| Message::Text(v.to_string().into());
    loop {
        tokio::select! {
            incoming = stream.next() => {
                let msg = match incoming {
                    Some(Ok(m)) => m,
                    // Closed, reset, or a frame the protocol does not allow: the client
                    // is told why (RFC 6455 close codes) instead of seeing a dropped socket.
                    Some(Err(e)) => {
                        tracing::debug!("websocket closed: {e}");
                        if let Some(frame) = close_frame_for(e) {
                            let _ = out_tx.try_send(Message::Close(Some(frame)));
                        }
                        break;
                    }
                    None => break,
                };
                let answer = match msg {
                    Message::Text(text) => match serde_json::from_str::<ClientMessage>(text.as_str()) {
                        Ok(ClientMessage::Chat(ask)) => {
                            let id = ask.id.clone();
                            if inflight.contains_key(&id) {
                                let e = ApiError::bad_request("duplicate_id", format!("request {id:?} is already in flight"));
                                Some(error_msg(Some(&id), &e))
                            } else if inflight.len() >= limits.ws_max_inflight {
                                let e = ApiError::overloaded(format!("at most {} requests in flight per socket", limits.ws_max_inflight));
                                Some(error_msg(Some(&id), &e))
                            } else {
                                let (cancel_tx, cancel_rx) = oneshot::channel();
                                next_token += 1;
                                inflight.insert(id, InFlight { token: next_token, cancel: cancel_tx });
                                tokio::spawn(run_chat(state.clone(), *ask, next_token, out_tx.clone(), cancel_rx, finished_tx.clone(), audit.clone()));
                                None
                            }
                        }
                        Ok(ClientMessage::Cancel { id }) => {
                            if let Some(f) = inflight.remove(&id) {
                                let _ = f.cancel.send(());
                            }
                            None
                        }
                        Err(e) => {
                            let id = serde_json::from_str::<Value>(text.as_str()).ok().and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
                            let e = ApiError::bad_request("invalid_message", format!("invalid message: {e}"));
                            Some(error_msg(id.as_deref(), &e))
                        }
                    },
                    Message::Binary(_) => Some(error_msg(None, &ApiError::bad_request("invalid_message", "send JSON text frames"))),
                    Message::Pong(_) => {
                        unanswered_pings = 0;
                        None
                    }
                    Message::Ping(_) => None, // answered by the WebSocket layer
                    Message::Close(_) => break,
                };
                if let Some(v) = answer && out_tx.try_send(reply(v)).is_err() {
                    break;
                }
            }
            Some((id, token)) = finished_rx.recv() => {
                // Only the request that finished: the id may already name a newer one.
                if inflight.get(&id).is_some_and(|f| f.token == token) {
                    inflight.remove(&id);
                }
            }
            _ = ping.tick() => {
                if unanswered_pings >= 2 {
                    let close = Message::Close(Some(CloseFrame { code: 1011, reason: "missed pongs".into() }));
                    let _ = out_tx.try_send(close);
                    break;
                }
                unanswered_pings += 1;
                ping_seq += 1;
                if out_tx.try_send(Message::Ping(ping_seq.to_be_bytes().to_vec().into())).is_err() {
                    break; // the client has stopped reading
                }
            }
        }
    }
    // Dropping the cancel switches ends every request of this socket.
    drop(inflight);
    drop(out_tx);
    // Give a queued close frame a moment, then stop writing.
    if tokio::time::timeout(Duration::from_secs(1), writer).await.is_err() {
        tracing::debug!("websocket writer stalled; dropping the connection");
    }
}

async fn run_chat(
    state: SharedState,
    ask: ChatAsk,
    token: u64,
    out: mpsc::Sender<Message>,
    mut cancel: oneshot::Receiver<()>,
    finished: mpsc::UnboundedSender<(String, u64)>,
    audit: Option<Arc<AuditCell>>,
) {
    let id = ask.id.clone();
    // Each message is its own audited request; the line is written when `_line` drops.
    let (cell, _line) = match &audit {
        Some(parent) => {
            let (c, g) = AuditCell::child(parent, &id, &state.audit);
            (Some(c), Some(g))
        }
        None => (None, None),
    };
    let send = |v: Value| {
        let out = out.clone();
        async move { out.send(Message::Text(v.to_string().into())).await.is_ok() }
    };
    let (mut answer, conversation) = match start(&state, &ask, cell.clone()).await {
        Ok(x) => x,
        Err(e) => {
            if let Some(c) = &cell {
                c.update(|r| {
                    r.status = e.status.as_u16();
                    r.error_code = Some(e.code);
                });
            }
            send(error_msg(Some(&id), &e)).await;
            let _ = finished.send((id, token));
            return;
        }
    };
    let mut text = String::new();
    loop {
        let ev = tokio::select! {
            ev = answer.next() => ev,
            // A `cancel` message, or the socket went away (the switch was dropped).
            _ = &mut cancel => {
                // Ending the answer cancels the engine request.
                let usage = answer.cancel();
                send(json!({ "type": "done", "id": id, "finish_reason": "cancelled",
                             "usage": { "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens },
                             "sources": [] })).await;
                break;
            }
        };
        match ev {
            Some(AnswerEvent::Delta { text: t, .. }) => {
                text.push_str(&t);
                if !send(json!({ "type": "delta", "id": id, "text": t })).await {
                    break;
                }
            }
            Some(AnswerEvent::Done(end)) => {
                if let Some((code, message)) = &end.error {
                    send(json!({ "type": "error", "id": id, "code": code, "message": message })).await;
                    break;
                }
                if let Some((conv_id, app, question)) = &conversation
                    && end.finish_reason != "cancelled"
                {
                    state.conversations.append(conv_id, app, None, question, &text);
                }
                send(json!({
                    "type": "done",
                    "id": id,
                    "finish_reason": end.finish_reason,
                    "usage": {
                        "prompt_tokens": answer.prompt_tokens().max(end.usage.prompt_tokens),
                        "completion_tokens": end.usage.completion_tokens,
                    },
                    "sources": &*answer.sources,
                    "conversation_id": conversation.as_ref().map(|c| c.0.clone()),
                    "cache_hit": answer.cache_hit,
                }))
                .await;
                break;
            }
            None => break,
        }
    }
    let _ = finished.send((id, token));
}

/// (conversation id, app name, question) of an app request.
type AppTurn = (String, String, String);

/// Starts one request: a RAG app question or a plain model chat. Returns the answer and,
/// for apps, (conversation id, app name, question).
async fn start(
    state: &SharedState,
    ask: &ChatAsk,
    audit: Option<Arc<AuditCell>>,
) -> Result<(super::answer::AnswerStream, Option<AppTurn>), ApiError> {
    let mut params = ask.sampling.to_params(None)?;
    let messages = match &ask.messages {
        Some(m) if !m.is_empty() => Some(chat_messages(m)?),
        _ => None,
    };
    if let Some(c) = &audit {
        let model =
            ask.model.clone().or_else(|| Some(format!("app:{}", ask.app.as_deref().unwrap_or(&state.default_app))));
        c.update(|r| r.model = model);
    }
    if let Some(model) = &ask.model
        && !model.starts_with("app:")
    {
        state.served_model(model)?;
        let Some(messages) = messages else {
            return Err(ApiError::invalid_param("messages", "messages must contain at least one message"));
        };
        return Ok((state.start_chat(&messages, params, audit, None).await?, None));
    }
    let app_name = ask
        .app
        .clone()
        .or_else(|| ask.model.as_deref().and_then(|m| m.strip_prefix("app:")).map(str::to_string))
        .unwrap_or_else(|| state.default_app.clone());
    let app = state.app(&app_name)?.clone();
    let query = ask
        .query
        .clone()
        .or_else(|| messages.as_ref().and_then(|m| m.last()).map(|m| m.content.clone()))
        .unwrap_or_default();
    let (conv_id, history) = match ask.conversation_id.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => (c.to_string(), state.conversations.history(c, &app_name, None)?),
        None => (format!("ws-{:032x}", rand::random::<u128>()), Vec::new()),
    };
    let overrides = ask.sampling.rag_overrides(&mut params);
    let answer = state.start_rag(&app, &query, &history, overrides, audit, Some(&conv_id)).await?;
    Ok((answer, Some((conv_id, app_name, query))))
}
