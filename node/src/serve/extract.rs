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
use axum::http::{HeaderValue, StatusCode, header};
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
        let bytes = read_limited(req.into_body(), state.cfg.limits.max_body_bytes, body_timeout(state)).await?;
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

/// How long a request body may take: the body-read timeout, within the request's.
fn body_timeout(state: &SharedState) -> Duration {
    let l = &state.cfg.limits;
    Duration::from_secs(l.body_read_timeout_secs.min(l.request_timeout_secs))
}

async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    if body.size_hint().lower() as usize > DRAIN_CAP {
        return Err(ApiError::too_large(limit));
    }
    let read = consume(&mut body, limit)
        .await
        .map_err(|e| ApiError::bad_request("invalid_request", format!("reading the body: {e}")))?;
    if read.seen > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(read.kept)
}

/// What reading a body gave: its first bytes, how many arrived, whether it ended.
struct Consumed {
    kept: Vec<u8>,
    seen: usize,
    complete: bool,
}

/// Reads `body` to its end, or until more than [`DRAIN_CAP`] bytes came, keeping the first
/// `keep` bytes.
async fn consume(body: &mut Body, keep: usize) -> Result<Consumed, axum::Error> {
    let mut out = Consumed { kept: Vec::new(), seen: 0, complete: false };
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            out.seen += data.len();
            if out.seen <= keep {
                out.kept.extend_from_slice(&data);
            } else if out.seen > DRAIN_CAP {
                return Ok(out);
            }
        }
    }
    out.complete = true;
    Ok(out)
}

/// What rides along with a body and is let go with it: after its last byte went out,
/// or when the client went away (the audit line, a connection's request count, an unread
/// request body handed back).
pub trait BodyGuard: Unpin {
    /// Called when the body drops, with what is left of it.
    fn release(&mut self, _rest: &mut Body) {}
}

/// A body carrying a [`BodyGuard`].
pub struct GuardedBody<G: BodyGuard> {
    inner: Body,
    guard: G,
}

impl<G: BodyGuard> GuardedBody<G> {
    pub fn new(inner: Body, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<G: BodyGuard> HttpBody for GuardedBody<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<G: BodyGuard> Drop for GuardedBody<G> {
    fn drop(&mut self) {
        self.guard.release(&mut self.inner);
    }
}

/// Hands a request body dropped unread (the request was answered without it: 401, 404,
/// 405, 415...) back to [`drain_unread_body`].
struct ReturnUnread(Arc<Mutex<Option<Body>>>);

impl BodyGuard for ReturnUnread {
    fn release(&mut self, rest: &mut Body) {
        if !rest.is_end_stream() {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::mem::replace(rest, Body::empty()));
        }
    }
}

/// Middleware: reads and discards a request body its handler did not read, before the
/// answer goes out. Otherwise the connection is closed under a client still sending, which
/// then sees a broken pipe instead of its 401 / 404 / 405. Bounded like an over-limit body
/// (a cap, the body-read timeout). Not drained — the answer says `connection: close`
/// instead — when the body cannot end in time anyway (a 408), was already drained to the
/// cap (a 413), announces more than the cap, or waits on `Expect: 100-continue` (reading
/// it would invite the upload just to discard it).
pub async fn drain_unread_body(
    axum::extract::State(state): axum::extract::State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let expects_continue =
        req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(None));
    let body = Body::new(GuardedBody::new(body, ReturnUnread(slot.clone())));
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    let unread = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut body) = unread else { return resp };
    let closing = resp.headers().get(header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let hopeless = closing
        || expects_continue
        || matches!(resp.status(), StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE)
        || body.size_hint().lower() as usize > DRAIN_CAP;
    let drained = !hopeless
        && tokio::time::timeout(body_timeout(&state), consume(&mut body, 0))
            .await
            .is_ok_and(|r| r.is_ok_and(|c| c.complete));
    if !drained {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
