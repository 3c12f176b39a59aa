//! Cluster membership over NATS.
//!
//! A node started with `--nats URL` joins cluster `--cluster NAME` as `--node-id ID`: every
//! second it publishes its [`NodeStatus`] (address, model, apps, running/waiting
//! requests, KV-cache usage, recent tokens/s) and every node keeps a [`ClusterView`] of the
//! statuses it hears; a node silent for [`NODE_TIMEOUT`] is out. NATS is the only shared
//! component; the client reconnects by itself (every 100 ms–1 s) after a server restart.
//!
//! Subjects, all under `ragnode.<cluster>.` (see [`Subjects`]):
//!
//! | subject | payload | who |
//! |---|---|---|
//! | `ragnode.<cluster>.status.<node>` | `NodeStatus` JSON, every second | each node publishes; all subscribe to `status.*` |
//! | `ragnode.<cluster>.faq.log.<shard>` | `FaqOp` JSON in JetStream | see [`faqlog`] |
//! | `ragnode.<cluster>.faq.search.<shard>` (queue group `faq-<shard>`) and `….<shard>.<node>` | `ShardRequest` / `ShardAnswer` JSON | see [`faqshards`], [`search`] |

pub mod faqlog;
pub mod faqshards;
pub mod placement;
pub mod search;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// A node not heard from for this long is out of the cluster.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node publishes its status.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Every NATS subject the cluster uses, in one place.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(cluster: &str) -> Self {
        Self { prefix: format!("ragnode.{cluster}") }
    }

    /// Where node `id` publishes its status.
    pub fn status(&self, id: &str) -> String {
        format!("{}.status.{id}", self.prefix)
    }

    /// Every node's status.
    pub fn all_statuses(&self) -> String {
        format!("{}.status.*", self.prefix)
    }

    /// FAQ shard `shard`'s write log (in the JetStream stream).
    pub fn faq_log(&self, shard: u32) -> String {
        format!("{}.faq.log.{shard}", self.prefix)
    }

    /// Every shard's write log: the stream's subjects.
    pub fn faq_logs(&self) -> String {
        format!("{}.faq.log.>", self.prefix)
    }

    /// Queries for FAQ shard `shard`, answered by one of its serving replicas (queue group
    /// [`Subjects::faq_group`]).
    pub fn faq_search(&self, shard: u32) -> String {
        format!("{}.faq.search.{shard}", self.prefix)
    }

    /// Queries for FAQ shard `shard` at one replica (hedged retries).
    pub fn faq_search_at(&self, shard: u32, node: &str) -> String {
        format!("{}.faq.search.{shard}.{node}", self.prefix)
    }

    pub fn faq_group(shard: u32) -> String {
        format!("faq-{shard}")
    }
}

/// 64-bit FNV-1a then a finaliser: stable across processes and versions (the same on
/// every node), unlike std's hasher. Session affinity and shard placement use it.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Checks a cluster name or node id can be a NATS subject token.
pub fn check_token(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        anyhow::bail!("{what} {s:?}: use 1-64 letters, digits, '-' or '_'");
    }
    Ok(())
}

/// What a node tells the cluster about itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    /// Where its HTTP API listens.
    pub http_addr: String,
    pub model: String,
    pub apps: Vec<String>,
    /// Model loaded and FAQ index open.
    pub ready: bool,
    pub running: usize,
    pub waiting: usize,
    /// Share of KV-cache blocks in use (0-1).
    pub kv_cache_usage: f64,
    /// Tokens generated per second over the last interval.
    pub recent_tokens_per_s: f64,
    /// FAQ entries in the shards this node holds (replicas counted on every holder).
    pub faq_documents: u64,
    /// The FAQ shards this node holds (cluster mode).
    #[serde(default)]
    pub faq_shards: Vec<HeldShard>,
    /// The cluster's FAQ shard count and replication factor, as this node is configured.
    #[serde(default)]
    pub faq_shard_count: u32,
    #[serde(default)]
    pub faq_replicas: u32,
    pub uptime_s: u64,
    pub version: String,
    /// Unix time of the status, milliseconds.
    pub sent_at_ms: u64,
}

/// One FAQ shard replica on a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldShard {
    pub shard: u32,
    /// Answering queries: it had applied the shard's log as it stood when the node
    /// took the shard.
    pub serving: bool,
    /// Stream sequence of the last write applied.
    pub applied: u64,
    /// Log messages still to apply (replay lag).
    pub lag: u64,
    pub documents: u64,
}

/// A member as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Milliseconds since its last status arrived.
    pub last_seen_ms: u64,
}

/// The statuses heard, by node id.
pub struct ClusterView {
    nodes: Mutex<HashMap<String, (NodeStatus, Instant)>>,
    /// Touched at every status heard (waiters for a cluster-wide condition).
    changes: tokio::sync::watch::Sender<()>,
}

impl Default for ClusterView {
    fn default() -> Self {
        Self { nodes: Mutex::default(), changes: tokio::sync::watch::Sender::new(()) }
    }
}

impl ClusterView {
    pub fn observe(&self, status: NodeStatus) {
        self.observe_at(status, Instant::now());
    }

    fn observe_at(&self, status: NodeStatus, at: Instant) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.insert(status.id.clone(), (status, at));
        drop(nodes);
        self.changes.send_replace(());
    }

    /// Notified whenever a status arrives.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Calls `f` with each live member's status (no copies).
    pub fn for_each_live(&self, mut f: impl FnMut(&NodeStatus)) {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        for (s, at) in nodes.values() {
            if at.elapsed() < NODE_TIMEOUT {
                f(s);
            }
        }
    }

    /// Whether `id` was heard from within [`NODE_TIMEOUT`] (cheap: no copies).
    pub fn is_live(&self, id: &str) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(id).is_some_and(|(_, at)| at.elapsed() < NODE_TIMEOUT)
    }

    /// Members heard from within [`NODE_TIMEOUT`], by id; forgets the others.
    pub fn live(&self) -> Vec<Member> {
        self.live_at(Instant::now())
    }

    fn live_at(&self, now: Instant) -> Vec<Member> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, (_, at)| now.saturating_duration_since(*at) < NODE_TIMEOUT);
        let mut out: Vec<Member> = nodes
            .values()
            .map(|(s, at)| Member {
                status: s.clone(),
                last_seen_ms: now.saturating_duration_since(*at).as_millis() as u64,
            })
            .collect();
        out.sort_by(|a, b| a.status.id.cmp(&b.status.id));
        out
    }
}

/// Connects to NATS with quick reconnects (a restarted server is back within a second).
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).clamp(100, 1000)))
        .event_callback(|ev| async move {
            match ev {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; reconnecting"),
                other => tracing::debug!("NATS event: {other}"),
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// A node's membership: publishes its own status, listens to the others'.
pub struct Membership {
    pub node_id: String,
    pub cluster: String,
    pub subjects: Subjects,
    pub view: Arc<ClusterView>,
    pub client: async_nats::Client,
    /// Wakes the status publisher ahead of its tick (a shard started serving, a write
    /// was applied: others wait for that).
    publish_now: tokio::sync::Notify,
}

impl Membership {
    /// Joins: subscribes to every status, then publishes `status()` every second.
    pub async fn join(
        client: async_nats::Client,
        cluster: &str,
        node_id: &str,
        status: impl Fn() -> NodeStatus + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let subjects = Subjects::new(cluster);
        let view = Arc::new(ClusterView::default());
        let mut sub = client.subscribe(subjects.all_statuses()).await.context("subscribing to node statuses")?;
        {
            let view = view.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    match serde_json::from_slice::<NodeStatus>(&msg.payload) {
                        Ok(s) => view.observe(s),
                        Err(e) => tracing::warn!(subject = %msg.subject, "ignoring a malformed node status: {e}"),
                    }
                }
            });
        }
        let m = Arc::new(Self {
            node_id: node_id.to_string(),
            cluster: cluster.to_string(),
            subjects,
            view,
            client,
            publish_now: tokio::sync::Notify::new(),
        });
        {
            let m = m.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STATUS_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = m.publish_now.notified() => {}
                    }
                    let mut s = status();
                    s.sent_at_ms =
                        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                    // Our own view does not wait for the round trip.
                    m.view.observe(s.clone());
                    let Ok(payload) = serde_json::to_vec(&s) else { continue };
                    // While NATS is down the client buffers; a stale status is harmless.
                    if let Err(e) = m.client.publish(m.subjects.status(&m.node_id), payload.into()).await {
                        tracing::debug!("publishing status: {e}");
                    }
                }
            });
        }
        Ok(m)
    }
}

impl Membership {
    /// Publishes this node's status now rather than at the next tick.
    pub fn publish_soon(&self) {
        self.publish_now.notify_one();
    }
}

/// `ragnode cluster status`: listens to the cluster's statuses for a moment.
pub async fn observe_once(url: &str, cluster: &str, wait: Duration) -> Result<Vec<Member>> {
    let client = async_nats::ConnectOptions::new()
        .name("ragnode-cluster-status")
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let subjects = Subjects::new(cluster);
    let mut sub = client.subscribe(subjects.all_statuses()).await?;
    let view = ClusterView::default();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(s) = serde_json::from_slice::<NodeStatus>(&msg.payload) {
            view.observe(s);
        }
    }
    Ok(view.live())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str) -> NodeStatus {
        NodeStatus { id: id.into(), ..NodeStatus::default() }
    }

    #[test]
    fn silent_nodes_leave_the_view() {
        let view = ClusterView::default();
        let t0 = Instant::now();
        view.observe_at(status("b"), t0);
        view.observe_at(status("a"), t0 + Duration::from_secs(2));
        let live: Vec<String> =
            view.live_at(t0 + Duration::from_millis(2500)).into_iter().map(|m| m.status.id).collect();
        assert_eq!(live, ["a", "b"]);
        let live: Vec<String> =
            view.live_at(t0 + Duration::from_millis(3500)).into_iter().map(|m| m.status.id).collect();
        assert_eq!(live, ["a"], "b was silent for 3.5 s");
        view.observe_at(status("b"), t0 + Duration::from_secs(4));
        assert_eq!(view.live_at(t0 + Duration::from_millis(4100)).len(), 2, "a node that speaks again is back");
    }

    #[test]
    fn subjects_and_names() {
        let s = Subjects::new("shop");
        assert_eq!(s.status("n1"), "ragnode.shop.status.n1");
        assert_eq!(s.all_statuses(), "ragnode.shop.status.*");
        assert!(check_token("node id", "node-1_a").is_ok());
        assert!(check_token("node id", "a.b").is_err());
        assert!(check_token("node id", "").is_err());
    }
}
