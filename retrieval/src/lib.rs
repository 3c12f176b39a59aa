//! # ragnode-retrieval
//!
//! The FAQ knowledge base: each node holds a tantivy shard of the customer-service FAQ
//! (Chinese and English), answers shard queries and caches hot answers.
pub mod analyzer;
pub mod cache;
pub mod entry;
pub mod ingest;
pub mod schema;
pub mod shard;
pub mod snippet;

pub use entry::{EntryError, FaqEntry};
pub use shard::{
    CONFIDENT, CorpusStats, FaqHit, FaqShard, MatchedField, SearchOptions, ShardConfig, ShardError, merge_hits,
};
