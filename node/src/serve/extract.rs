//! Request extractors that answer bad input the OpenAI way.
//!
//! [`ApiJson`] reads the body itself instead of axum's `Json`: a JSON content type or none
//! is accepted (form and plain-text types are refused, so a web page cannot post to the
//! API without a CORS preflight); a body over the limit is read to the end and discarded
//! (up to a cap) before the 413, so the client sees the answer instead of a reset
//! connection while it is still sending.

use axum::body::{Body, HttpBody};
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::SharedState;

/// Most bytes read and thrown away from an over-limit body before the connection is
/// given up on.
const DRAIN_CAP: usize = 64 << 20;

/// A JSON body, parsed, with OpenAI-style errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            if ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]
                .iter()
                .any(|t| ct.starts_with(t))
            {
                return Err(ApiError {
                    status: axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ..ApiError::bad_request(
                        "unsupported_media_type",
                        "send the body as JSON (Content-Type: application/json)",
                    )
                });
            }
        }
        let limit = state.cfg.limits.max_body_bytes;
        let bytes = read_limited(req.into_body(), limit).await?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| ApiError::from_json(&e))
    }
}

/// The body, if it is at most `limit` bytes; otherwise a 413 after draining.
pub async fn read_limited(mut body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    if body.size_hint().lower() as usize > DRAIN_CAP {
        return Err(ApiError::too_large(limit));
    }
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| ApiError::bad_request("invalid_request", format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_CAP {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(buf)
}
