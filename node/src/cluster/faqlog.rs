//! The cluster's FAQ write log: a JetStream stream that is the source of truth for FAQ
//! writes. An upsert or delete at any node is acknowledged only once JetStream has stored
//! it. Each write goes to the subject of the shard its entry belongs to
//! ([`placement::shard_of`]); every holder of a shard applies that subject, in order, to
//! its local copy and records the last applied stream sequence next to it, so a node
//! that was down, or that gains a shard, catches up by replaying from there.
//!
//! | name | what |
//! |---|---|
//! | stream `RAGNODE_FAQ_<CLUSTER>` | file storage, subjects `ragnode.<cluster>.faq.log.>`, description `… ragnode_faq_shards=<S>` |
//! | subject `ragnode.<cluster>.faq.log.<shard>` | `FaqOp` JSON, ≤ 200 rows |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use futures_util::StreamExt;
use ragnode_retrieval::{FaqEntry, FaqShard};
use serde::{Deserialize, Serialize};

use super::{Subjects, placement};

/// One logged write.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FaqOp {
    Upsert { entries: Vec<FaqEntry> },
    Delete { ids: Vec<String> },
}

/// An applier that has heard nothing for this long checks the log has nothing for it.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// Most entries in one log message (JetStream's default max payload is 1 MiB).
const ENTRIES_PER_MESSAGE: usize = 200;

/// Key in the stream's description that records its shard count: entries are placed by
/// `hash % shards`, so the count is fixed for the log's life.
const SHARDS_KEY: &str = "ragnode_faq_shards";

/// The cluster's FAQ log.
pub struct FaqLog {
    js: jetstream::Context,
    stream: String,
    subjects: Subjects,
    shards: u32,
}

impl FaqLog {
    /// Opens (creating if needed) the cluster's log stream, split into `shards` shards.
    /// Fails if the stream was created with another shard count.
    pub async fn open(client: async_nats::Client, cluster: &str, shards: u32) -> Result<Self> {
        let js = jetstream::new(client);
        let stream = format!("RAGNODE_FAQ_{}", cluster.to_ascii_uppercase().replace('-', "_"));
        let subjects = Subjects::new(cluster);
        let info = js
            .get_or_create_stream(jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![subjects.faq_logs()],
                storage: jetstream::stream::StorageType::File,
                description: Some(format!("ragnode FAQ write log; {SHARDS_KEY}={shards}")),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the JetStream stream {stream}: {e}"))?
            .cached_info()
            .clone();
        let logged = info
            .config
            .description
            .as_deref()
            .and_then(|d| d.split_once(&format!("{SHARDS_KEY}=")))
            .and_then(|(_, n)| n.trim().parse::<u32>().ok());
        if logged != Some(shards) {
            anyhow::bail!(
                "the cluster's FAQ log {stream} was created with {} shards; this node is configured with {shards} \
                 (cluster.faq_shards / --faq-shards must match the log)",
                logged.map_or("an unknown number of".to_string(), |n| n.to_string())
            );
        }
        Ok(Self { js, stream, subjects, shards })
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Messages in the log.
    pub async fn len(&self) -> Result<u64> {
        let mut s = self.js.get_stream(&self.stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(s.info().await.map_err(|e| anyhow::anyhow!("{e}"))?.state.messages)
    }

    /// Appends writes, each to its entry's shard; once JetStream stored them all, returns
    /// for each shard written the stream sequence of its last message.
    pub async fn append(&self, op: FaqOp) -> Result<BTreeMap<u32, u64>> {
        // What is logged is replayed by every replica forever: nothing invalid goes in
        // (callers validate first, with better errors; this is the last line).
        if let FaqOp::Upsert { entries } = &op
            && let Some((e, err)) = entries.iter().find_map(|e| e.validate().err().map(|err| (e, err)))
        {
            anyhow::bail!("FAQ entry {:?}: {err}", e.id);
        }
        let parts = match op {
            FaqOp::Upsert { entries } => self.messages(entries, |e| &e.id, |entries| FaqOp::Upsert { entries }),
            FaqOp::Delete { ids } => self.messages(ids, |id| id, |ids| FaqOp::Delete { ids }),
        };
        // Publish everything, then wait for the acks (JetStream pipelines them).
        let mut pending = Vec::new();
        for (shard, part) in parts {
            let ack = self
                .js
                .publish(self.subjects.faq_log(shard), serde_json::to_vec(&part)?.into())
                .await
                .map_err(|e| anyhow::anyhow!("publishing to the FAQ log: {e}"))?;
            pending.push((shard, ack));
        }
        let mut last = BTreeMap::new();
        for (shard, ack) in pending {
            let ack = ack.await.map_err(|e| anyhow::anyhow!("the FAQ log did not store the write: {e}"))?;
            let seq = last.entry(shard).or_insert(0);
            *seq = ack.sequence.max(*seq);
        }
        Ok(last)
    }

    /// `items` grouped by the shard of their id, in messages of at most
    /// [`ENTRIES_PER_MESSAGE`] rows.
    fn messages<T: Clone>(
        &self,
        items: Vec<T>,
        id: impl Fn(&T) -> &str,
        op: impl Fn(Vec<T>) -> FaqOp,
    ) -> Vec<(u32, FaqOp)> {
        let mut by_shard: BTreeMap<u32, Vec<T>> = BTreeMap::new();
        for item in items {
            by_shard.entry(placement::shard_of(id(&item), self.shards)).or_default().push(item);
        }
        by_shard
            .into_iter()
            .flat_map(|(shard, rows)| {
                rows.chunks(ENTRIES_PER_MESSAGE).map(|c| (shard, op(c.to_vec()))).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Stream sequence of shard `shard`'s last logged write (0: none).
    pub async fn last_seq(&self, shard: u32) -> Result<u64> {
        let stream = self.js.get_stream_no_info(&self.stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        match stream.get_last_raw_message_by_subject(&self.subjects.faq_log(shard)).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(anyhow::anyhow!("reading the FAQ log of shard {shard}: {e}")),
        }
    }

    /// Starts applying shard `shard`'s log to `index` from the sequence after the one
    /// recorded in `<index dir>/.ragnode-applied-seq`, until the returned applier is
    /// dropped (reconnecting with the client). `on_commit` runs after each durable
    /// commit (cache invalidation, status).
    pub fn spawn_applier(
        self: &Arc<Self>,
        shard: u32,
        index: Arc<FaqShard>,
        on_commit: Arc<dyn Fn() + Send + Sync>,
    ) -> ShardApplier {
        let seq_file = index.path().join(".ragnode-applied-seq");
        let progress = Arc::new(Progress { applied: AtomicU64::new(read_seq(&seq_file)), lag: AtomicU64::new(0) });
        let log = self.clone();
        let p = progress.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = log.apply(shard, &index, &seq_file, &p, &*on_commit).await {
                    tracing::warn!(shard, "FAQ log applier: {e:#}; resuming");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        ShardApplier { progress, task }
    }

    async fn apply(
        &self,
        shard_no: u32,
        shard: &Arc<FaqShard>,
        seq_file: &Path,
        progress: &Progress,
        on_commit: &(dyn Fn() + Send + Sync),
    ) -> Result<()> {
        let from = progress.applied() + 1;
        let stream = self.js.get_stream_no_info(&self.stream).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.subjects.faq_log(shard_no),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating the log consumer: {e}"))?;
        let mut messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut staged = 0usize;
        let mut received = from.saturating_sub(1);
        loop {
            let msg = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                Ok(Some(msg)) => msg.map_err(|e| anyhow::anyhow!("{e}"))?,
                Ok(None) => return Ok(()),
                // Quiet: make sure the log is quiet too. A consumer can miss the restart of
                // a NATS server and wait forever; a new one starts where this one stopped.
                Err(_) => {
                    let last = self.last_seq(shard_no).await?;
                    if last > received {
                        anyhow::bail!("the log consumer stalled at {received} (log at {last}); recreating it");
                    }
                    continue;
                }
            };
            let (seq, pending) = {
                let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                (info.stream_sequence, info.pending)
            };
            progress.lag.store(pending, Ordering::Relaxed);
            received = seq;
            match serde_json::from_slice::<FaqOp>(&msg.payload) {
                Ok(FaqOp::Upsert { entries }) => {
                    for e in &entries {
                        // Entries were validated before they were logged (under the rules of
                        // their day: replayed as logged); an unindexable one is skipped, not fatal.
                        if let Err(err) = shard.stage_logged(e) {
                            tracing::warn!(seq, shard = shard_no, id = %e.id, "FAQ log entry not indexed: {err}");
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
                Err(e) => tracing::warn!(seq, shard = shard_no, "malformed FAQ log message skipped: {e}"),
            }
            // Commit when caught up, or every 10,000 rows while replaying.
            if pending == 0 || staged >= 10_000 {
                let shard2 = shard.clone();
                tokio::task::spawn_blocking(move || shard2.commit()).await??;
                // After the commit: a crash in between only replays idempotent writes.
                // (Up to `seq`, everything is in this commit.)
                std::fs::write(seq_file, seq.to_string()).with_context(|| format!("writing {}", seq_file.display()))?;
                progress.applied.store(seq, Ordering::Relaxed);
                staged = 0;
                on_commit();
            }
        }
    }
}

/// How far a shard's applier got.
pub struct Progress {
    /// Stream sequence of the last write applied (and committed).
    applied: AtomicU64,
    /// Messages of the shard's subject still to apply, as of the last one received.
    lag: AtomicU64,
}

impl Progress {
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }
}

/// A running applier of one shard's log; stops when dropped.
pub struct ShardApplier {
    pub progress: Arc<Progress>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ShardApplier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_seq(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}
