//! Distributed FAQ search: scatter a query to one replica of every shard, gather with a
//! deadline, merge.
//!
//! Two phases, as in a DFS query-then-fetch search: phase 1 asks every shard for its BM25
//! statistics of the query's terms ([`CorpusStats`]), merged into the whole FAQ's;
//! phase 2 asks the shards that hold any query term for their top hits scored with the
//! merged statistics, so scores compare across shards and the merged top-k
//! ([`merge_hits`]) is the one a single index would give.
//!
//! Each shard request goes to the shard's queue group (NATS spreads it over the
//! replicas) — or is answered in-process when this node serves the shard. With no answer
//! after the hedge delay, or a failure, it is sent again to every serving replica's own
//! subject; the first answer wins. A shard that has not answered by the deadline is left
//! out and the result is flagged partial.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ragnode_retrieval::{CorpusStats, FaqEntry, FaqHit, SearchOptions, merge_hits};

use super::Membership;
use super::faqshards::{FaqShards, ShardAnswer, ShardRequest, ShardResult, answer};
use super::placement::shard_of;

/// Merged hits and the shards that did not answer.
#[derive(Debug, Default)]
pub struct Gathered {
    pub hits: Vec<FaqHit>,
    /// Shards left out (no replica answered in time): the hits may miss entries.
    pub missing: Vec<u32>,
}

/// Searches the cluster's FAQ.
pub struct ClusterSearch {
    membership: Arc<Membership>,
    shards: Arc<FaqShards>,
    /// Per shard and phase.
    timeout: Duration,
    hedge_after: Duration,
}

type Attempt = Pin<Box<dyn Future<Output = Result<ShardResult, String>> + Send>>;

impl ClusterSearch {
    pub fn new(membership: Arc<Membership>, shards: Arc<FaqShards>, timeout: Duration, hedge_after: Duration) -> Self {
        Self { membership, shards, timeout, hedge_after }
    }

    pub fn shards(&self) -> &Arc<FaqShards> {
        &self.shards
    }

    /// Sends `req` to one replica of shard `k` (hedged), or answers it here.
    async fn ask(&self, k: u32, req: &ShardRequest) -> Result<ShardResult, String> {
        if let Some(index) = self.shards.serving(k) {
            let req = req.clone();
            return tokio::task::spawn_blocking(move || answer(&index, req))
                .await
                .map_err(|e| format!("shard task failed: {e}"))
                .and_then(ok_result);
        }
        let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let m = &self.membership;
        let send = |subject: String| -> Attempt {
            let client = m.client.clone();
            let payload = payload.clone();
            Box::pin(async move {
                let msg = client.request(subject, payload.into()).await.map_err(|e| e.to_string())?;
                let a: ShardAnswer =
                    serde_json::from_slice(&msg.payload).map_err(|e| format!("malformed shard answer: {e}"))?;
                ok_result(a.result)
            })
        };
        let mut attempts = FuturesUnordered::new();
        attempts.push(send(m.subjects.faq_search(k)));
        let hedge_timer = tokio::time::sleep(self.hedge_after);
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(hedge_timer, deadline);
        let mut hedged = false;
        let mut last_err = String::from("no replica serves it");
        loop {
            let hedge_now = tokio::select! {
                r = attempts.next(), if !attempts.is_empty() => match r {
                    Some(Ok(res)) => return Ok(res),
                    Some(Err(e)) => { last_err = e; attempts.is_empty() }
                    None => true,
                },
                _ = &mut hedge_timer, if !hedged => true,
                _ = &mut deadline => return Err(format!("no answer within {} ms ({last_err})", self.timeout.as_millis())),
            };
            if hedge_now && !hedged {
                hedged = true;
                let mut targets = Vec::new();
                m.view.for_each_live(|s| {
                    if s.id != m.node_id && s.faq_shards.iter().any(|h| h.shard == k && h.serving) {
                        targets.push(s.id.clone());
                    }
                });
                metrics::counter!("ragnode:faq_shard_hedges_total").increment(1);
                for node in targets {
                    attempts.push(send(m.subjects.faq_search_at(k, &node)));
                }
            }
            if hedged && attempts.is_empty() {
                return Err(last_err);
            }
        }
    }

    /// Asks every shard in `shards` concurrently; `None` where none answered.
    async fn scatter(&self, shards: &[u32], req: impl Fn(u32) -> ShardRequest) -> Vec<(u32, Option<ShardResult>)> {
        let asks = shards.iter().map(|&k| {
            let req = req(k);
            async move {
                let res = self.ask(k, &req).await;
                if let Err(e) = &res {
                    metrics::counter!("ragnode:faq_shard_failures_total").increment(1);
                    tracing::warn!(shard = k, "FAQ shard did not answer: {e}");
                }
                (k, res.ok())
            }
        });
        futures_util::future::join_all(asks).await
    }

    /// The merged top `opts.k` hits for `query` over every shard.
    pub async fn search(&self, query: &str, opts: &SearchOptions) -> Gathered {
        let t = Instant::now();
        let all: Vec<u32> = (0..self.shards.shards()).collect();
        let phase1 = self.scatter(&all, |_| ShardRequest::Stats { query: query.to_string(), opts: opts.clone() }).await;
        metrics::histogram!("ragnode:faq_shard_phase_seconds", "phase" => "stats").record(t.elapsed().as_secs_f64());
        let mut missing = Vec::new();
        let mut merged = CorpusStats::default();
        let mut with_terms = Vec::new();
        for (k, res) in phase1 {
            match res {
                Some(ShardResult::Stats { stats }) => {
                    merged.merge(&stats);
                    // A shard holding none of the query's terms has no hits.
                    if stats.doc_freqs.values().any(|&df| df > 0) {
                        with_terms.push(k);
                    }
                }
                _ => missing.push(k),
            }
        }
        let t2 = Instant::now();
        let phase2 = self
            .scatter(&with_terms, |_| ShardRequest::Search {
                query: query.to_string(),
                opts: opts.clone(),
                stats: merged.clone(),
            })
            .await;
        metrics::histogram!("ragnode:faq_shard_phase_seconds", "phase" => "search").record(t2.elapsed().as_secs_f64());
        let mut lists = Vec::new();
        for (k, res) in phase2 {
            match res {
                Some(ShardResult::Hits { hits }) => lists.push(hits),
                _ => missing.push(k),
            }
        }
        missing.sort_unstable();
        if !missing.is_empty() {
            metrics::counter!("ragnode:faq_search_partial_total").increment(1);
        }
        metrics::histogram!("ragnode:faq_search_seconds").record(t.elapsed().as_secs_f64());
        Gathered { hits: merge_hits(lists, opts.k), missing }
    }

    /// Entry `id`, from its shard.
    pub async fn get(&self, id: &str) -> Result<Option<FaqEntry>, String> {
        match self.ask(shard_of(id, self.shards.shards()), &ShardRequest::Get { id: id.to_string() }).await? {
            ShardResult::Entry { entry } => Ok(entry),
            other => Err(format!("unexpected shard answer {other:?}")),
        }
    }

    /// Live entries over every shard, and the shards that did not answer.
    pub async fn count(&self) -> (u64, Vec<u32>) {
        let all: Vec<u32> = (0..self.shards.shards()).collect();
        let mut total = 0;
        let mut missing = Vec::new();
        for (k, res) in self.scatter(&all, |_| ShardRequest::Count).await {
            match res {
                Some(ShardResult::Count { documents }) => total += documents,
                _ => missing.push(k),
            }
        }
        (total, missing)
    }

    /// Waits until every replica serving a shard written to has applied the write
    /// (`seqs`: shard → stream sequence), so that the next search sees it; `false` after
    /// `limit`.
    pub async fn wait_visible(&self, seqs: &BTreeMap<u32, u64>, limit: Duration) -> bool {
        let view = &self.membership.view;
        let mut changes = view.changes();
        let until = tokio::time::Instant::now() + limit;
        loop {
            changes.borrow_and_update();
            let visible = seqs.iter().all(|(&k, &seq)| {
                let (mut serving, mut behind) = (0, 0);
                view.for_each_live(|s| {
                    for h in s.faq_shards.iter().filter(|h| h.shard == k && h.serving) {
                        serving += 1;
                        behind += usize::from(h.applied < seq);
                    }
                });
                serving > 0 && behind == 0
            });
            if visible {
                return true;
            }
            // Replicas publish their status right after applying a write.
            if !matches!(tokio::time::timeout_at(until, changes.changed()).await, Ok(Ok(()))) {
                return false;
            }
        }
    }
}

fn ok_result(r: ShardResult) -> Result<ShardResult, String> {
    match r {
        ShardResult::Error { message } => Err(message),
        r => Ok(r),
    }
}
