//! The cluster's FAQ write log: a JetStream stream that is the source of truth for FAQ
//! writes. An upsert or delete at any node is acknowledged only once JetStream has stored
//! it; every node applies the log, in order, to its local shard and records the last
//! applied stream sequence next to the index, so a node that was down catches up on what
//! it missed when it comes back.
//!
//! Today every node holds a full replica (one shard, replicated everywhere); splitting
//! the log per shard (`…faq.log.<shard>`) is the next step (see ARCHITECTURE.md).
//!
//! | name | what |
//! |---|---|
//! | stream `RAGNODE_FAQ_<CLUSTER>` | file storage, subjects `ragnode.<cluster>.faq.log.>` |
//! | subject `ragnode.<cluster>.faq.log.0` | `FaqOp` JSON |

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use futures_util::StreamExt;
use ragnode_retrieval::{FaqEntry, FaqShard};
use serde::{Deserialize, Serialize};

/// One logged write.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FaqOp {
    Upsert { entries: Vec<FaqEntry> },
    Delete { ids: Vec<String> },
}

/// Most entries in one log message (JetStream's default max payload is 1 MiB).
const ENTRIES_PER_MESSAGE: usize = 200;

/// The log, and this node's progress applying it.
pub struct FaqLog {
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// Stream sequence of the last write applied to the local shard (watched by writers
    /// waiting for their own write).
    applied: tokio::sync::watch::Sender<u64>,
}

impl FaqLog {
    /// Opens (creating if needed) the cluster's log stream.
    pub async fn open(client: async_nats::Client, cluster: &str) -> Result<Self> {
        let js = jetstream::new(client);
        let stream = format!("RAGNODE_FAQ_{}", cluster.to_ascii_uppercase().replace('-', "_"));
        js.get_or_create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("ragnode.{cluster}.faq.log.>")],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the JetStream stream {stream}: {e}"))?;
        let applied = tokio::sync::watch::Sender::new(0);
        Ok(Self { js, stream, subject: format!("ragnode.{cluster}.faq.log.0"), applied })
    }

    /// Messages in the log.
    pub async fn len(&self) -> Result<u64> {
        let mut s = self.js.get_stream(&self.stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(s.info().await.map_err(|e| anyhow::anyhow!("{e}"))?.state.messages)
    }

    /// Appends writes; returns the stream sequence of the last once JetStream stored them.
    pub async fn append(&self, op: FaqOp) -> Result<u64> {
        let parts: Vec<FaqOp> = match op {
            FaqOp::Upsert { entries } => {
                entries.chunks(ENTRIES_PER_MESSAGE).map(|c| FaqOp::Upsert { entries: c.to_vec() }).collect()
            }
            FaqOp::Delete { ids } => {
                ids.chunks(ENTRIES_PER_MESSAGE).map(|c| FaqOp::Delete { ids: c.to_vec() }).collect()
            }
        };
        let mut last = 0;
        for part in parts {
            let payload = serde_json::to_vec(&part)?;
            let ack = self
                .js
                .publish(self.subject.clone(), payload.into())
                .await
                .map_err(|e| anyhow::anyhow!("publishing to the FAQ log: {e}"))?
                .await
                .map_err(|e| anyhow::anyhow!("the FAQ log did not store the write: {e}"))?;
            last = ack.sequence;
        }
        Ok(last)
    }

    /// Waits until the local shard has applied the log up to `seq` (read-your-writes for
    /// the node that took the write).
    pub async fn wait_applied(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        matches!(tokio::time::timeout(limit, rx.wait_for(|&a| a >= seq)).await, Ok(Ok(_)))
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Applies the log to `shard` from the sequence after the one recorded in
    /// `<shard dir>/.ragnode-applied-seq`, forever (reconnecting with the client).
    /// `on_commit` runs after each durable commit (cache invalidation).
    pub async fn spawn_applier(
        self: &Arc<Self>,
        shard: Arc<FaqShard>,
        on_commit: impl Fn() + Send + Sync + 'static,
    ) -> Result<()> {
        let seq_file = shard.path().join(".ragnode-applied-seq");
        let start = read_seq(&seq_file);
        self.applied.send_replace(start);
        let log = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = log.apply(&shard, &seq_file, &on_commit).await {
                    tracing::warn!("FAQ log applier: {e:#}; resuming");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(())
    }

    async fn apply(
        &self,
        shard: &Arc<FaqShard>,
        seq_file: &PathBuf,
        on_commit: &(impl Fn() + Send + Sync),
    ) -> Result<()> {
        let from = self.applied() + 1;
        let stream = self.js.get_stream(&self.stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the log consumer: {e}"))?;
        let mut messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut staged = 0usize;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            let (seq, pending) = {
                let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                (info.stream_sequence, info.pending)
            };
            match serde_json::from_slice::<FaqOp>(&msg.payload) {
                Ok(FaqOp::Upsert { entries }) => {
                    for e in &entries {
                        // Entries were validated before they were logged; a bad one is skipped, not fatal.
                        if let Err(err) = shard.stage(e) {
                            tracing::warn!(seq, id = %e.id, "FAQ log entry not indexed: {err}");
                        }
                    }
                    staged += entries.len();
                }
                Ok(FaqOp::Delete { ids }) => {
                    for id in &ids {
                        shard.stage_delete(id)?;
                    }
                    staged += ids.len();
                }
                Err(e) => tracing::warn!(seq, "malformed FAQ log message skipped: {e}"),
            }
            // Commit when caught up, or every 10,000 rows while replaying.
            if pending == 0 || staged >= 10_000 {
                let shard2 = shard.clone();
                tokio::task::spawn_blocking(move || shard2.commit()).await??;
                // After the commit: a crash in between only replays idempotent writes.
                // (Up to `seq`, everything is in this commit.)
                std::fs::write(seq_file, seq.to_string()).with_context(|| format!("writing {}", seq_file.display()))?;
                self.applied.send_replace(seq);
                staged = 0;
                on_commit();
            }
        }
        Ok(())
    }
}

fn read_seq(path: &PathBuf) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}
