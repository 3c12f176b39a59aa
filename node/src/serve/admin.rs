//! FAQ admin API (admin key required):
//! - `POST /v1/admin/faq` `{"entries": [FaqEntry, ...]}` — upsert a batch (all or nothing:
//!   every entry is validated first; durable when the answer arrives);
//! - `GET /v1/admin/faq/{id}`, `DELETE /v1/admin/faq/{id}`;
//! - `POST /v1/admin/faq/search` `{"query", "k", "category", "lang"}`;
//! - `GET /v1/admin/faq/stats`.
//!
//! Every write clears the apps' hot-answer caches (the shard clears its own).

use axum::Json;
use axum::extract::{Path, State};
use ragnode_retrieval::{FaqEntry, SearchOptions};
use serde::Deserialize;
use serde_json::{Value, json};

use std::time::Duration;

use super::error::ApiError;
use super::extract::ApiJson;
use super::state::SharedState;
use crate::cluster::faqlog::FaqOp;

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

/// Runs blocking index work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("index task failed: {e}")))?
}

pub async fn upsert(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.entries.is_empty() || req.entries.len() > MAX_BATCH {
        return Err(ApiError::invalid_param("entries", format!("send 1 to {MAX_BATCH} entries")));
    }
    for (i, e) in req.entries.iter().enumerate() {
        e.validate().map_err(|err| ApiError::invalid_param("entries", format!("entries[{i}] ({:?}): {err}", e.id)))?;
    }
    let n = req.entries.len();
    if let Some(log) = state.faq_log.get() {
        // Cluster: acknowledged once the log stored it; every node applies it.
        let seq = log
            .append(FaqOp::Upsert { entries: req.entries })
            .await
            .map_err(|e| ApiError::not_ready(format!("the FAQ log is unavailable: {e:#}")))?;
        let applied = log.wait_applied(seq, Duration::from_secs(5)).await;
        return Ok(Json(json!({ "upserted": n, "log_sequence": seq, "applied_here": applied })));
    }
    let shard = state.shard()?.clone();
    let opstamp =
        blocking(move || shard.upsert(&req.entries).map_err(|e| ApiError::internal(format!("indexing failed: {e}"))))
            .await?;
    clear_app_caches(&state);
    Ok(Json(json!({ "upserted": n, "opstamp": opstamp })))
}

pub async fn delete(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if let Some(log) = state.faq_log.get() {
        if state.shard()?.get(&id).map_err(|e| ApiError::internal(e.to_string()))?.is_none() {
            return Err(ApiError::not_found("faq_not_found", format!("no FAQ entry {id:?}")));
        }
        let seq = log
            .append(FaqOp::Delete { ids: vec![id.clone()] })
            .await
            .map_err(|e| ApiError::not_ready(format!("the FAQ log is unavailable: {e:#}")))?;
        let applied = log.wait_applied(seq, Duration::from_secs(5)).await;
        return Ok(Json(json!({ "deleted": id, "log_sequence": seq, "applied_here": applied })));
    }
    let shard = state.shard()?.clone();
    let id2 = id.clone();
    let found =
        blocking(move || shard.delete(&id2).map_err(|e| ApiError::internal(format!("delete failed: {e}")))).await?;
    if !found {
        return Err(ApiError::not_found("faq_not_found", format!("no FAQ entry {id:?}")));
    }
    clear_app_caches(&state);
    Ok(Json(json!({ "deleted": id })))
}

pub async fn get(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<FaqEntry>, ApiError> {
    let shard = state.shard()?;
    match shard.get(&id).map_err(|e| ApiError::internal(format!("lookup failed: {e}")))? {
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
    let shard = state.shard()?;
    let opts = SearchOptions { k, category: req.category, lang: req.lang };
    let hits = shard.search(&req.query, &opts).map_err(|e| ApiError::internal(format!("search failed: {e}")))?;
    Ok(Json(json!({ "hits": *hits })))
}

pub async fn stats(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(state.shard()?.stats())))
}
