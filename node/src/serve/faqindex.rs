//! The FAQ behind the API: this node's own shard (embedded mode) or the cluster's
//! sharded, replicated FAQ (writes through the log, searches scattered over NATS). The
//! handlers and RAG apps see one interface.

use std::sync::Arc;
use std::time::Duration;

use ragnode_retrieval::{FaqEntry, FaqHit, FaqShard, SearchOptions};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::cluster::faqlog::FaqOp;
use crate::cluster::search::ClusterSearch;

/// How long a write waits to become visible to searches before it is answered anyway.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

pub enum FaqIndex {
    /// One local shard holding everything.
    Local(Arc<FaqShard>),
    /// The cluster's shards.
    Cluster(Arc<ClusterSearch>),
}

/// Search results; `missing` lists shards that did not answer (partial results).
pub struct Found {
    pub hits: Arc<Vec<FaqHit>>,
    pub missing: Vec<u32>,
}

/// Runs blocking index work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("index task failed: {e}")))?
}

/// A cluster write: acknowledged once the log stored it, then given up to
/// [`VISIBLE_WITHIN`] to reach every serving replica. Returns the last log sequence and
/// whether it became visible.
async fn log_write(c: &ClusterSearch, op: FaqOp) -> Result<(u64, bool), ApiError> {
    let seqs = c
        .shards()
        .log()
        .append(op)
        .await
        .map_err(|e| ApiError::not_ready(format!("the FAQ log is unavailable: {e:#}")))?;
    let visible = c.wait_visible(&seqs, VISIBLE_WITHIN).await;
    Ok((seqs.values().copied().max().unwrap_or(0), visible))
}

impl FaqIndex {
    pub async fn search(&self, query: &str, opts: &SearchOptions) -> Result<Found, ApiError> {
        match self {
            // Usually a cache hit or a millisecond, but a long query through jieba and a big
            // index can take longer: off the runtime's workers.
            Self::Local(shard) => {
                let (shard, query, opts) = (shard.clone(), query.to_string(), opts.clone());
                let hits = blocking(move || {
                    shard.search(&query, &opts).map_err(|e| ApiError::internal(format!("FAQ search failed: {e}")))
                })
                .await?;
                Ok(Found { hits, missing: Vec::new() })
            }
            Self::Cluster(c) => {
                let g = c.search(query, opts).await;
                if g.missing.len() == c.shards().shards() as usize {
                    return Err(ApiError::not_ready("no FAQ shard answered; the cluster's FAQ is unavailable"));
                }
                Ok(Found { hits: Arc::new(g.hits), missing: g.missing })
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<FaqEntry>, ApiError> {
        match self {
            Self::Local(shard) => shard.get(id).map_err(|e| ApiError::internal(format!("lookup failed: {e}"))),
            Self::Cluster(c) => {
                c.get(id).await.map_err(|e| ApiError::not_ready(format!("the entry's FAQ shard did not answer: {e}")))
            }
        }
    }

    /// Upserts `entries` (validated); durable when it returns.
    pub async fn upsert(&self, entries: Vec<FaqEntry>) -> Result<Value, ApiError> {
        let n = entries.len();
        match self {
            Self::Local(shard) => {
                let shard = shard.clone();
                let opstamp = blocking(move || {
                    shard.upsert(&entries).map_err(|e| ApiError::internal(format!("indexing failed: {e}")))
                })
                .await?;
                Ok(json!({ "upserted": n, "opstamp": opstamp }))
            }
            Self::Cluster(c) => {
                let (seq, visible) = log_write(c, FaqOp::Upsert { entries }).await?;
                Ok(json!({ "upserted": n, "log_sequence": seq, "visible": visible }))
            }
        }
    }

    /// Deletes entry `id`; `None` if there was none.
    pub async fn delete(&self, id: &str) -> Result<Option<Value>, ApiError> {
        match self {
            Self::Local(shard) => {
                let (shard, id2) = (shard.clone(), id.to_string());
                let found =
                    blocking(move || shard.delete(&id2).map_err(|e| ApiError::internal(format!("delete failed: {e}"))))
                        .await?;
                Ok(found.then(|| json!({ "deleted": id })))
            }
            Self::Cluster(c) => {
                if self.get(id).await?.is_none() {
                    return Ok(None);
                }
                let (seq, visible) = log_write(c, FaqOp::Delete { ids: vec![id.to_string()] }).await?;
                Ok(Some(json!({ "deleted": id, "log_sequence": seq, "visible": visible })))
            }
        }
    }

    /// Entry counts (`num_docs` over the whole FAQ).
    pub async fn stats(&self) -> Value {
        match self {
            Self::Local(shard) => json!(shard.stats()),
            Self::Cluster(c) => {
                let (num_docs, missing) = c.count().await;
                json!({
                    "num_docs": num_docs,
                    "shards": c.shards().shards(),
                    "missing_shards": missing,
                    "held_here": c.shards().statuses(),
                })
            }
        }
    }
}
