//! Errors as OpenAI's API returns them, so the official SDKs raise their typed errors:
//! `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ragnode_inference::EngineError;
use serde::Serialize;

/// An error answered to a client.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// Machine-readable code (`context_length_exceeded`, `model_not_found`, ...).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault (`messages`, `entries[3].answer`).
    pub param: Option<Cow<'static, str>>,
    /// Seconds, for 429/503.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, message: message.into(), param: None, retry_after: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }

    pub fn invalid_param(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::bad_request("invalid_value", message) }
    }

    /// 400 `context_length_exceeded`, naming the request field that is too long.
    pub fn context_length(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::bad_request("context_length_exceeded", message) }
    }

    /// 404 for a model id that is neither the served model nor `app:<name>`.
    pub fn model_not_found(model: &str) -> Self {
        Self::not_found("model_not_found", format!("The model `{model}` does not exist."))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", code, message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "overloaded", message)
        }
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "not_ready", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    /// 408: the client did not send its request in time; the connection is closed.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "server_error", "timeout", message)
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the request may never come: do not wait for it on this connection.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // Lets the audit layer log the code without parsing the body.
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// The error code of a response, for the audit line.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { .. } => Self::overloaded(e.to_string()),
            EngineError::InvalidRequest(m) => Self::bad_request("invalid_request", m),
            EngineError::ContextLength { prompt, limit } => Self::context_length(
                "messages",
                format!(
                    "This model's maximum context length is {limit} tokens, but the prompt has {prompt} tokens. Shorten the messages."
                ),
            ),
            EngineError::Stopped => Self::not_ready("the engine has stopped"),
            EngineError::Start(m) => Self::internal(m),
        }
    }
}

impl ApiError {
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// A body that does not parse: syntax (including invalid UTF-8) or shape.
    pub fn from_json(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Self::bad_request("invalid_request", format!("invalid request body: {e}")),
            _ => Self::bad_request("invalid_json", format!("the request body is not valid JSON (UTF-8): {e}")),
        }
    }
}
