//! API keys: `Authorization: Bearer KEY` (or `api-key: KEY`; `?api_key=KEY` on the
//! WebSocket, which browsers cannot give headers). With no key configured the API is
//! open; the admin API always needs an admin key.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::audit::AuditCell;
use super::error::ApiError;
use super::state::SharedState;
use crate::config::AuthConfig;

/// Who is calling, put in the request's extensions by the auth middleware.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: Option<String>,
    pub admin: bool,
    /// The app the key is bound to, if any.
    pub app: Option<String>,
}

/// Configured keys, by key.
pub struct KeyRing {
    keys: HashMap<String, Caller>,
    any_api_key: bool,
    any_admin_key: bool,
}

impl KeyRing {
    pub fn new(cfg: &AuthConfig) -> Self {
        let mut keys = HashMap::new();
        for k in &cfg.api_keys {
            keys.insert(k.key.clone(), Caller { key_id: Some(k.id.clone()), admin: false, app: k.app.clone() });
        }
        for k in &cfg.admin_keys {
            keys.insert(k.key.clone(), Caller { key_id: Some(k.id.clone()), admin: true, app: k.app.clone() });
        }
        Self { keys, any_api_key: !cfg.api_keys.is_empty(), any_admin_key: !cfg.admin_keys.is_empty() }
    }

    /// True when the inference API needs no key.
    pub fn is_open(&self) -> bool {
        !self.any_api_key && !self.any_admin_key
    }

    fn lookup(&self, key: &str) -> Option<&Caller> {
        self.keys.get(key)
    }
}

fn presented_key(headers: &HeaderMap, uri: &Uri, allow_query: bool) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        return Some(v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim().to_string());
    }
    if let Some(v) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    if allow_query {
        // Percent-decoded, as browsers encode it (`URLSearchParams`).
        let Query(q) = Query::<HashMap<String, String>>::try_from_uri(uri).ok()?;
        return q.get("api_key").cloned();
    }
    None
}

fn authenticate(state: &SharedState, req: &Request, admin: bool) -> Result<Caller, ApiError> {
    let keys = &state.keys;
    if admin && !keys.any_admin_key {
        return Err(ApiError::forbidden("the admin API is disabled: configure an admin key (--admin-key)"));
    }
    if !admin && keys.is_open() {
        return Ok(Caller { key_id: None, admin: false, app: None });
    }
    let allow_query = req.uri().path() == "/v1/chat/ws";
    let Some(key) = presented_key(req.headers(), req.uri(), allow_query) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header (Authorization: Bearer YOUR_KEY).",
        ));
    };
    let caller = keys.lookup(&key).ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))?;
    if admin && !caller.admin {
        return Err(ApiError::forbidden("this key may not use the admin API"));
    }
    Ok(caller.clone())
}

async fn check(state: SharedState, mut req: Request, next: Next, admin: bool) -> Response {
    match authenticate(&state, &req, admin) {
        Ok(caller) => {
            if let Some(cell) = req.extensions().get::<Arc<AuditCell>>() {
                let id = caller.key_id.clone();
                cell.update(|r| r.key_id = id);
            }
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Middleware for the inference API.
pub async fn require_api_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    check(state, req, next, false).await
}

/// Middleware for the admin API.
pub async fn require_admin_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    check(state, req, next, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_bearer_headers_or_the_websocket_query() {
        let mut h = HeaderMap::new();
        let uri: Uri = "/v1/chat/ws?api_key=k%2B1%3D&x=y".parse().unwrap();
        assert_eq!(presented_key(&h, &uri, true).as_deref(), Some("k+1="));
        assert_eq!(presented_key(&h, &uri, false), None);
        h.insert("authorization", "Bearer sk-abc".parse().unwrap());
        assert_eq!(presented_key(&h, &uri, false).as_deref(), Some("sk-abc"));
    }
}
