//! vLLM-compatible tokenizer endpoints (API key required):
//! - `POST /tokenize` `{"model", "messages", "add_generation_prompt": true}` or
//!   `{"model", "prompt"}` → `{"count", "max_model_len", "tokens"}`: exactly the ids a chat
//!   or completion request with the same input would prompt the model with (same code
//!   path), so clients can count tokens and check prompts against the context;
//! - `POST /detokenize` `{"model", "tokens"}` → `{"prompt"}`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::openai::{WireMessage, chat_messages};
use super::state::{PromptInput, SharedState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Option<Vec<WireMessage>>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

pub async fn tokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    state.served_model(&req.model)?;
    let input = match (req.messages, req.prompt) {
        (Some(m), None) => PromptInput::Chat {
            messages: chat_messages(&m)?,
            add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        },
        (None, Some(p)) => PromptInput::Text(p),
        _ => return Err(ApiError::invalid_param("messages", "send either `messages` or `prompt`")),
    };
    let tokens = state.encode_prompt(input).await?;
    let max_model_len = state.engine()?.context_limit();
    Ok(Json(json!({ "count": tokens.len(), "max_model_len": max_model_len, "tokens": tokens })))
}

pub async fn detokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    state.served_model(&req.model)?;
    let engine = state.engine()?;
    if req.tokens.len() > engine.context_limit() {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("at most {} tokens (the context length) at a time", engine.context_limit()),
        ));
    }
    let tok = engine.tokenizer();
    let prompt = tok.decode(&req.tokens, false).map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
    Ok(Json(json!({ "prompt": prompt })))
}
