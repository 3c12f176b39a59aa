//! One JSON audit line per request, and the per-route request counter.
//!
//! The [`audit`] middleware puts an [`AuditCell`] in the request's extensions; handlers
//! and answer streams fill in what they know (key id, model/app, tokens, TTFT, cache hit,
//! error code). The line is written when the response body is dropped — after the last
//! byte of a stream, or when the client goes away — so streamed requests are logged with
//! their final figures. Lines go through a channel to one writer task (stdout or a file),
//! so handlers never wait on the disk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::error::ErrorCode;
use super::state::SharedState;

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditSink {
    tx: Option<mpsc::UnboundedSender<String>>,
}

impl AuditSink {
    /// `-` (stdout), a file path (appended to), or `off`.
    pub async fn open(target: &str) -> anyhow::Result<Self> {
        let writer: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match target {
            "off" | "" => return Ok(Self { tx: None }),
            "-" => Box::new(tokio::io::stdout()),
            path => Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| anyhow::anyhow!("opening audit log {path}: {e}"))?,
            ),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::new(writer);
            while let Some(line) = rx.recv().await {
                let mut ok = w.write_all(line.as_bytes()).await.is_ok();
                // Batch whatever else is queued, then flush once.
                while let Ok(more) = rx.try_recv() {
                    ok &= w.write_all(more.as_bytes()).await.is_ok();
                }
                if !ok || w.flush().await.is_err() {
                    tracing::error!("writing the audit log failed");
                }
            }
        });
        Ok(Self { tx: Some(tx) })
    }

    fn write(&self, rec: &AuditRecord) {
        if let Some(tx) = &self.tx
            && let Ok(mut line) = serde_json::to_string(rec)
        {
            line.push('\n');
            let _ = tx.send(line);
        }
    }
}

/// What an audit line says.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditRecord {
    pub request_id: String,
    /// Unix time of arrival, seconds with milliseconds.
    pub time: f64,
    pub source_ip: String,
    pub key_id: Option<String>,
    /// The end user named by the request (`user`), if any.
    pub user: Option<String>,
    pub method: String,
    pub route: String,
    pub model: Option<String>,
    pub app: Option<String>,
    /// The node that generated the answer (cluster mode).
    pub node: Option<String>,
    pub status: u16,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: Option<f64>,
    pub latency_ms: f64,
    pub cache_hit: bool,
    pub finish_reason: Option<&'static str>,
    pub error_code: Option<&'static str>,
}

/// A request's audit record while it is being served.
pub struct AuditCell {
    pub started: Instant,
    rec: Mutex<AuditRecord>,
}

impl AuditCell {
    pub fn update(&self, f: impl FnOnce(&mut AuditRecord)) {
        f(&mut self.rec.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Writes the line when dropped (with the response body).
struct AuditGuard {
    cell: Arc<AuditCell>,
    sink: AuditSink,
}

impl super::extract::BodyGuard for AuditGuard {}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let latency = self.cell.started.elapsed().as_secs_f64() * 1e3;
        let mut rec = self.cell.rec.lock().unwrap_or_else(|e| e.into_inner());
        rec.latency_ms = (latency * 1000.0).round() / 1000.0;
        self.sink.write(&rec);
    }
}

/// Until the response exists: a request whose handler is dropped (the client closed the
/// connection first) is still counted and audited, with nginx's 499.
struct PendingAudit {
    guard: Option<AuditGuard>,
    route: &'static str,
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        if let Some(g) = &self.guard {
            g.cell.update(|r| {
                r.status = 499;
                r.error_code.get_or_insert("client_disconnected");
            });
            metrics::counter!("ragnode:http_requests_total", "route" => self.route, "status" => "499").increment(1);
        }
    }
}

impl AuditCell {
    /// A separate audited request riding on `parent`'s connection (a WebSocket message):
    /// same caller and source, its own id (`PARENT/ID`) and timing. The line is written
    /// when the returned guard drops.
    pub fn child(parent: &AuditCell, id: &str, sink: &AuditSink) -> (Arc<AuditCell>, impl Drop + Send + use<>) {
        let p = parent.rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cell = AuditCell::starting(AuditRecord {
            request_id: format!("{}/{id}", p.request_id),
            source_ip: p.source_ip,
            key_id: p.key_id,
            method: "WS".into(),
            route: p.route,
            status: 200,
            ..AuditRecord::default()
        });
        (cell.clone(), AuditGuard { cell, sink: sink.clone() })
    }

    /// A request's cell, started now (arrival time stamped into the record).
    fn starting(mut rec: AuditRecord) -> Arc<AuditCell> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        rec.time = (now * 1000.0).round() / 1000.0;
        Arc::new(AuditCell { started: Instant::now(), rec: Mutex::new(rec) })
    }
}

/// Low-cardinality route label for metrics and audit lines.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/v1/chat-messages" => "/v1/chat-messages",
        "/v1/chat/ws" => "/v1/chat/ws",
        "/v1/cluster" => "/v1/cluster",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/" => "/",
        p if p.starts_with("/v1/admin/") => "/v1/admin",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// A client's `x-request-id` is kept only if it is a plain token (letters, digits, `-`,
/// `_`, `.`, `:`; at most 128), so audit lines stay parseable; otherwise the server makes
/// one.
pub async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    let ok = |v: &str| {
        !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if let Some(v) = req.headers().get("x-request-id")
        && !v.to_str().is_ok_and(ok)
    {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// Middleware: audit cell in, request counter and audited body out.
pub async fn audit(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ci| ci.0.ip().to_string()).unwrap_or_default();
    let cell = AuditCell::starting(AuditRecord {
        request_id: request_id(req.headers()),
        source_ip: ip,
        method: req.method().to_string(),
        route: route.to_string(),
        ..AuditRecord::default()
    });
    req.extensions_mut().insert(cell.clone());
    // Probes and scrapes are counted, not audited.
    let audited = !matches!(route, "/metrics" | "/healthz" | "/readyz");
    let mut pending =
        PendingAudit { guard: audited.then(|| AuditGuard { cell: cell.clone(), sink: state.audit.clone() }), route };
    let resp = next.run(req).await;
    let status = resp.status();
    metrics::counter!("ragnode:http_requests_total", "route" => route, "status" => status.as_str().to_string())
        .increment(1);
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
    cell.update(|r| {
        r.status = status.as_u16();
        if r.error_code.is_none() {
            r.error_code = code;
        }
    });
    match pending.guard.take() {
        Some(guard) => resp.map(|inner| Body::new(super::extract::GuardedBody::new(inner, guard))),
        None => resp,
    }
}
