//! The FAQ shards this node holds in a cluster: which ones (placement), keeping each up
//! to date (its log applier), and answering queries for the ones that have caught up.
//!
//! Every [`REBALANCE_EVERY`] the node computes the placement from its membership view
//! ([`placement::place`]). A shard placed here and not held is opened under
//! `<faq_index>/shard-<k>/` and its log replayed from the sequence recorded there (a
//! shard held before resumes from its copy; a new one replays everything). It starts
//! serving — subscribing to `faq.search.<k>` in queue group `faq-<k>` and to its own
//! `faq.search.<k>.<node>` — once it has applied the log as it stood when the node took
//! it. A shard held here but no longer placed here keeps serving until every node it is
//! placed on serves it, then is let go (its files stay, for a quicker return).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use ragnode_retrieval::{CorpusStats, FaqEntry, FaqHit, FaqShard, SearchOptions, ShardConfig};
use serde::{Deserialize, Serialize};

use super::faqlog::{FaqLog, ShardApplier};
use super::{HeldShard, Membership, Subjects, placement};

/// How often placement is recomputed.
pub const REBALANCE_EVERY: Duration = Duration::from_millis(250);

/// A query for one shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShardRequest {
    /// The shard's BM25 statistics for the query (phase 1 of a distributed search).
    Stats { query: String, opts: SearchOptions },
    /// Its top hits scored with the merged statistics (phase 2).
    Search { query: String, opts: SearchOptions, stats: CorpusStats },
    /// One entry by id.
    Get { id: String },
    /// Live entries.
    Count,
}

/// A shard's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ShardResult {
    Stats { stats: CorpusStats },
    Hits { hits: Vec<FaqHit> },
    Entry { entry: Option<FaqEntry> },
    Count { documents: u64 },
    Error { message: String },
}

/// A shard's answer and who gave it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardAnswer {
    pub node: String,
    pub shard: u32,
    #[serde(flatten)]
    pub result: ShardResult,
}

/// Answers `req` from `index` (blocking: run it off the async threads).
pub fn answer(index: &FaqShard, req: ShardRequest) -> ShardResult {
    let res = match req {
        ShardRequest::Stats { query, opts } => {
            index.corpus_stats(&query, &opts).map(|stats| ShardResult::Stats { stats })
        }
        ShardRequest::Search { query, opts, stats } => {
            index.search_with_stats(&query, &opts, &stats).map(|hits| ShardResult::Hits { hits })
        }
        ShardRequest::Get { id } => index.get(&id).map(|entry| ShardResult::Entry { entry }),
        ShardRequest::Count => Ok(ShardResult::Count { documents: index.stats().num_docs }),
    };
    res.unwrap_or_else(|e| ShardResult::Error { message: e.to_string() })
}

struct Held {
    index: Arc<FaqShard>,
    applier: ShardApplier,
    /// The log's last sequence when the node took the shard: serves once applied.
    target: u64,
    /// The query responder, once serving.
    responder: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(r) = &self.responder {
            r.abort();
        }
    }
}

/// This node's FAQ shards.
pub struct FaqShards {
    membership: Arc<Membership>,
    log: Arc<FaqLog>,
    dir: PathBuf,
    replicas: u32,
    held: Mutex<BTreeMap<u32, Held>>,
    on_commit: Arc<dyn Fn() + Send + Sync>,
}

impl FaqShards {
    /// Starts holding the shards placed on this node under `dir`, and keeps placement
    /// current. `on_commit` runs after each applied batch (answer-cache invalidation).
    pub fn start(
        membership: Arc<Membership>,
        log: Arc<FaqLog>,
        dir: PathBuf,
        replicas: u32,
        on_commit: impl Fn() + Send + Sync + 'static,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            membership,
            log,
            dir,
            replicas,
            held: Mutex::new(BTreeMap::new()),
            on_commit: Arc::new(on_commit),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            // One status round first, so a node joining a running cluster sees the others
            // before it places anything.
            tokio::time::sleep(super::STATUS_INTERVAL + Duration::from_millis(200)).await;
            loop {
                let Some(this) = weak.upgrade() else { return };
                if let Err(e) = this.rebalance().await {
                    tracing::warn!("FAQ shard placement: {e:#}");
                }
                drop(this);
                tokio::time::sleep(REBALANCE_EVERY).await;
            }
        });
        this
    }

    pub fn shards(&self) -> u32 {
        self.log.shards()
    }

    pub fn log(&self) -> &Arc<FaqLog> {
        &self.log
    }

    /// The shards held here, for the node's status.
    pub fn statuses(&self) -> Vec<HeldShard> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .map(|(&shard, h)| HeldShard {
                shard,
                serving: h.responder.is_some(),
                applied: h.applier.progress.applied(),
                lag: h.applier.progress.lag(),
                documents: h.index.stats().num_docs,
            })
            .collect()
    }

    /// Shard `k`'s index, when this node serves it (searched in-process).
    pub fn serving(&self, k: u32) -> Option<Arc<FaqShard>> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&k).filter(|h| h.responder.is_some()).map(|h| h.index.clone())
    }

    /// Whether every shard placed on this node serves (the node's FAQ is ready).
    pub fn placed_shards_serving(&self) -> bool {
        let placement = self.placement();
        let me = &self.membership.node_id;
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        placement
            .iter()
            .enumerate()
            .all(|(k, nodes)| !nodes.contains(me) || held.get(&(k as u32)).is_some_and(|h| h.responder.is_some()))
    }

    fn placement(&self) -> Vec<Vec<String>> {
        let mut ids = Vec::new();
        self.membership.view.for_each_live(|s| ids.push(s.id.clone()));
        if !ids.contains(&self.membership.node_id) {
            ids.push(self.membership.node_id.clone());
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        placement::place(&ids, self.shards(), self.replicas)
    }

    /// Whether every node shard `k` is placed on reports serving it.
    fn placed_replicas_serve(&self, k: u32, nodes: &[String]) -> bool {
        let mut serving = 0;
        self.membership.view.for_each_live(|s| {
            if nodes.contains(&s.id) && s.faq_shards.iter().any(|h| h.shard == k && h.serving) {
                serving += 1;
            }
        });
        serving == nodes.len()
    }

    /// One placement step: take what is placed here, serve what caught up, let go of what
    /// its placed replicas now serve.
    async fn rebalance(self: &Arc<Self>) -> Result<()> {
        let placement = self.placement();
        let me = self.membership.node_id.clone();
        let (to_take, to_serve, to_release) = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let mut take = Vec::new();
            for (k, nodes) in placement.iter().enumerate() {
                if nodes.contains(&me) && !held.contains_key(&(k as u32)) {
                    take.push(k as u32);
                }
            }
            let serve: Vec<u32> = held
                .iter()
                .filter(|(_, h)| h.responder.is_none() && h.applier.progress.applied() >= h.target)
                .map(|(&k, _)| k)
                .collect();
            let release: Vec<u32> = held
                .keys()
                .copied()
                .filter(|k| {
                    let nodes = &placement[*k as usize];
                    !nodes.contains(&me) && self.placed_replicas_serve(*k, nodes)
                })
                .collect();
            (take, serve, release)
        };
        let mut changed = false;
        for k in to_take {
            // The target first: everything logged before the node took the shard.
            let target = self.log.last_seq(k).await?;
            let dir = self.dir.join(format!("shard-{k}"));
            let config = ShardConfig { writer_memory_bytes: 32 << 20, ..ShardConfig::default() };
            let index = tokio::task::spawn_blocking(move || FaqShard::open(&dir, &config)).await??;
            let index = Arc::new(index);
            let on_commit = self.on_commit.clone();
            let m = self.membership.clone();
            let applier = self.log.spawn_applier(
                k,
                index.clone(),
                Arc::new(move || {
                    on_commit();
                    m.publish_soon();
                }),
            );
            tracing::info!(shard = k, target, from = applier.progress.applied(), "taking FAQ shard");
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.insert(k, Held { index, applier, target, responder: None });
        }
        for k in to_serve {
            let Some(index) = self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&k).map(|h| h.index.clone())
            else {
                continue;
            };
            let responder = self.spawn_responder(k, index).await?;
            if let Some(h) = self.held.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&k) {
                h.responder = Some(responder);
                tracing::info!(shard = k, applied = h.applier.progress.applied(), "serving FAQ shard");
                changed = true;
            }
        }
        for k in to_release {
            self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
            tracing::info!(shard = k, "released FAQ shard: its placed replicas serve it");
            changed = true;
        }
        if changed {
            self.membership.publish_soon();
        }
        Ok(())
    }

    /// Answers shard `k`'s queries (queue group and this node's own subject).
    async fn spawn_responder(&self, k: u32, index: Arc<FaqShard>) -> Result<tokio::task::JoinHandle<()>> {
        let client = self.membership.client.clone();
        let subjects = &self.membership.subjects;
        let group = client.queue_subscribe(subjects.faq_search(k), Subjects::faq_group(k)).await?;
        let direct = client.subscribe(subjects.faq_search_at(k, &self.membership.node_id)).await?;
        let node = self.membership.node_id.clone();
        Ok(tokio::spawn(async move {
            let mut messages = futures_util::stream::select(group, direct);
            while let Some(msg) = messages.next().await {
                let Some(reply) = msg.reply else { continue };
                let (client, index, node) = (client.clone(), index.clone(), node.clone());
                tokio::spawn(async move {
                    let result = match serde_json::from_slice::<ShardRequest>(&msg.payload) {
                        Ok(req) => tokio::task::spawn_blocking(move || answer(&index, req))
                            .await
                            .unwrap_or_else(|e| ShardResult::Error { message: format!("shard task failed: {e}") }),
                        Err(e) => ShardResult::Error { message: format!("malformed shard request: {e}") },
                    };
                    let answer = ShardAnswer { node, shard: k, result };
                    match serde_json::to_vec(&answer) {
                        Ok(payload) => {
                            if let Err(e) = client.publish(reply, payload.into()).await {
                                tracing::debug!(shard = k, "replying to a shard query: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(shard = k, "encoding a shard answer: {e}"),
                    }
                });
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, question: &str, answer: &str) -> FaqEntry {
        serde_json::from_value(serde_json::json!({"id": id, "question": question, "answer": answer})).unwrap()
    }

    /// Sends `req` through JSON both ways, as over NATS.
    fn over_the_wire(index: &FaqShard, req: ShardRequest) -> ShardResult {
        let req: ShardRequest = serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        let a = ShardAnswer { node: "n".into(), shard: 0, result: answer(index, req) };
        serde_json::from_slice::<ShardAnswer>(&serde_json::to_vec(&a).unwrap()).unwrap().result
    }

    #[test]
    fn shards_answering_over_the_wire_rank_like_one_index() {
        let root = std::env::temp_dir().join(format!("ragnode-faqshards-test-{}", std::process::id()));
        let cfg = ShardConfig { cache_capacity: 0, ..ShardConfig::default() };
        let whole = FaqShard::open(root.join("whole"), &cfg).unwrap();
        let parts = [FaqShard::open(root.join("p0"), &cfg).unwrap(), FaqShard::open(root.join("p1"), &cfg).unwrap()];
        let topics = ["退货", "退款", "发票", "快递", "会员"];
        let mut entries = Vec::new();
        for i in 0..60 {
            let t = topics[i % topics.len()];
            entries.push(entry(&format!("e{i}"), &format!("{t}问题{i}：怎么{t}？"), &format!("关于{t}的答案{i}")));
        }
        whole.upsert(&entries).unwrap();
        for e in &entries {
            parts[placement::shard_of(&e.id, 2) as usize].stage(e).unwrap();
        }
        for p in &parts {
            p.commit().unwrap();
        }
        let opts = SearchOptions { k: 7, ..SearchOptions::default() };
        for q in ["怎么退货", "发票问题12", "会员快递"] {
            let mut stats = CorpusStats::default();
            for p in &parts {
                match over_the_wire(p, ShardRequest::Stats { query: q.into(), opts: opts.clone() }) {
                    ShardResult::Stats { stats: s } => stats.merge(&s),
                    other => panic!("{other:?}"),
                }
            }
            let lists = parts.iter().map(|p| {
                match over_the_wire(
                    p,
                    ShardRequest::Search { query: q.into(), opts: opts.clone(), stats: stats.clone() },
                ) {
                    ShardResult::Hits { hits } => hits,
                    other => panic!("{other:?}"),
                }
            });
            let merged: Vec<String> = merge_ids(lists, opts.k);
            let one: Vec<String> = whole.search_uncached(q, &opts).unwrap().into_iter().map(|h| h.id).collect();
            assert_eq!(merged, one, "query {q}");
        }
        match over_the_wire(&parts[0], ShardRequest::Count) {
            ShardResult::Count { documents } => assert_eq!(documents, parts[0].stats().num_docs),
            other => panic!("{other:?}"),
        }
        let id = entries.iter().find(|e| placement::shard_of(&e.id, 2) == 1).unwrap().id.clone();
        match over_the_wire(&parts[1], ShardRequest::Get { id: id.clone() }) {
            ShardResult::Entry { entry: Some(e) } => assert_eq!(e.id, id),
            other => panic!("{other:?}"),
        }
        drop((whole, parts));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn merge_ids(lists: impl Iterator<Item = Vec<FaqHit>>, k: usize) -> Vec<String> {
        ragnode_retrieval::merge_hits(lists, k).into_iter().map(|h| h.id).collect()
    }
}
