//! FAQ admin API (admin key required):
//! - `POST /v1/admin/faq` `{"entries": [FaqEntry, ...]}` — upsert a batch (all or nothing:
//!   every entry is validated first; durable when the answer arrives);
//! - `GET /v1/admin/faq/{id}`, `DELETE /v1/admin/faq/{id}`;
//! - `POST /v1/admin/faq/search` `{"query", "k", "category", "lang"}`;
//! - `GET /v1/admin/faq/stats`.
//!
//! Every write clears the apps' hot-answer caches (the shard clears its own). In a cluster
//! a write is answered once the FAQ log stored it (`visible`: every serving replica of
//! its shards applied it within 5 s); searches answer `partial` when a shard did not.

use axum::Json;
use axum::extract::{Path, State};
use ragnode_retrieval::{FaqEntry, SearchOptions};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::ApiJson;
use super::state::SharedState;

/// Most entries in one upsert.
const MAX_BATCH: usize = 10_000;

#[derive(Deserialize)]
pub struct UpsertRequest {
    pub entries: Vec<FaqEntry>,
}

#[derive(Deserialize)]
pub struct SearchRequest {
    pub query: String,
    #[serde(default)]
    pub k: Option<usize>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub lang: Option<String>,
}

fn clear_app_caches(state: &SharedState) {
    for app in state.apps.values() {
        app.clear_cache();
    }
}

pub async fn upsert(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.entries.is_empty() || req.entries.len() > MAX_BATCH {
        return Err(ApiError::invalid_param("entries", format!("send 1 to {MAX_BATCH} entries")));
    }
    for (i, e) in req.entries.iter().enumerate() {
        e.validate().map_err(|err| {
            ApiError::invalid_param(
                format!("entries[{i}].{}", err.field()),
                format!("entries[{i}] ({:?}): {err}", e.id),
            )
        })?;
    }
    let out = state.faq()?.upsert(req.entries).await?;
    clear_app_caches(&state);
    Ok(Json(out))
}

pub async fn delete(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let out = state.faq()?.delete(&id).await?;
    let out = out.ok_or_else(|| ApiError::not_found("faq_not_found", format!("no FAQ entry {id:?}")))?;
    clear_app_caches(&state);
    Ok(Json(out))
}

pub async fn get(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<FaqEntry>, ApiError> {
    match state.faq()?.get(&id).await? {
        Some(e) => Ok(Json(e)),
        None => Err(ApiError::not_found("faq_not_found", format!("no FAQ entry {id:?}"))),
    }
}

pub async fn search(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.query.len() > super::rag::MAX_QUESTION_BYTES {
        return Err(ApiError::invalid_param(
            "query",
            format!("the query is over {} bytes", super::rag::MAX_QUESTION_BYTES),
        ));
    }
    let k = req.k.unwrap_or(5);
    if k == 0 || k > 100 {
        return Err(ApiError::invalid_param("k", "k must be in 1..=100"));
    }
    let opts = SearchOptions { k, category: req.category, lang: req.lang };
    let t = std::time::Instant::now();
    let found = state.faq()?.search(&req.query, &opts).await?;
    Ok(Json(json!({
        "hits": *found.hits,
        "partial": !found.missing.is_empty(),
        "missing_shards": found.missing,
        "took_ms": t.elapsed().as_secs_f64() * 1e3,
    })))
}

pub async fn stats(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.faq()?.stats().await))
}
