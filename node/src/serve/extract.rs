//! Request extractors that answer bad input the OpenAI way.
//!
//! [`ApiJson`] reads the body itself instead of axum's `Json`: a JSON content type or none
//! is accepted (form and plain-text types are refused, so a web page cannot post to the
//! API without a CORS preflight); a body over the limit is read to the end and discarded
//! (up to a cap) before the 413, so the client sees the answer instead of a reset
//! connection while it is still sending; a body that does not arrive in
//! `limits.body_read_timeout_secs` (or the request timeout, if shorter) is a 408.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, header};
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
        let l = &state.cfg.limits;
        let within = Duration::from_secs(l.body_read_timeout_secs.min(l.request_timeout_secs));
        let bytes = read_limited(req.into_body(), l.max_body_bytes, within).await?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| ApiError::from_json(&e))
    }
}

/// The body, if it is at most `limit` bytes and arrives `within` that time; otherwise a
/// 413 after draining, or a 408 (the connection is then closed: a client that stopped
/// sending must not hold it).
pub async fn read_limited(body: Body, limit: usize, within: Duration) -> Result<Vec<u8>, ApiError> {
    tokio::time::timeout(within, read_body(body, limit)).await.unwrap_or_else(|_| {
        Err(ApiError::request_timeout(format!("the request body did not arrive within {} s", within.as_secs())))
    })
}

async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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

/// A request body that, when dropped unread (the request was answered without it: 401,
/// 404, 405, 415...), hands itself back to [`drain_unread_body`].
struct ReturnableBody {
    inner: Option<Body>,
    slot: Arc<Mutex<Option<Body>>>,
}

impl HttpBody for ReturnableBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for ReturnableBody {
    fn drop(&mut self) {
        if let Some(b) = self.inner.take()
            && !b.is_end_stream()
        {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
    }
}

/// Middleware: reads and discards a request body its handler did not read, before the
/// answer goes out. Otherwise the connection is closed under a client still sending, which
/// then sees a broken pipe instead of its 401 / 404 / 405. Bounded like an over-limit body
/// (a cap, the body-read timeout); past those the answer says `connection: close`.
pub async fn drain_unread_body(
    axum::extract::State(state): axum::extract::State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(None));
    let body = Body::new(ReturnableBody { inner: Some(body), slot: slot.clone() });
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    let unread = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    // An answer that closes the connection anyway (408: the body is not coming) needs none.
    let closing = resp.headers().get(header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if let Some(mut body) = unread.filter(|_| !closing) {
        let within = Duration::from_secs(state.cfg.limits.body_read_timeout_secs);
        let drained = tokio::time::timeout(within, async {
            let mut seen = 0usize;
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                let Ok(frame) = frame else { return false };
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > DRAIN_CAP {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
        if !drained {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}
