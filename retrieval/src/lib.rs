//! # ragnode-retrieval
//!
//! The FAQ knowledge base: each node holds a tantivy shard of the customer-service FAQ
//! (Chinese and English), answers shard queries and caches hot answers.
//!
//! Not built yet: the crate exists so the workspace layout is final (see the FAQ issue).
