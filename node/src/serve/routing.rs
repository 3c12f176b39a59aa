//! Generation routing between nodes over NATS.
//!
//! The node that receives a request picks where it runs ([`Router::candidates`]): the
//! session's node by rendezvous hash of its affinity key (conversation id or user) over
//! the live, ready nodes serving the same model — so a conversation keeps landing on the
//! same node — unless that node is saturated (requests waiting, or KV cache ≥ 90% used),
//! then the least loaded. The prompt is tokenized here and sent as ids.
//!
//! A remote run ([`RemoteStream`]): the receiver subscribes to a fresh inbox and sends a
//! [`RemoteRequest`] to `ragnode.<cluster>.gen.<node>` with that inbox as reply subject.
//! The runner answers `accepted` (or `rejected`), then streams the engine's events as
//! numbered messages to the inbox. Flow control: the runner keeps at most [`WINDOW`]
//! events unacknowledged; the receiver acknowledges every [`ACK_EVERY`] events on
//! `ragnode.<cluster>.ctl.<node>`, where it also sends `cancel` when its client goes away.
//! No answer within [`ACCEPT_TIMEOUT`], a rejection for load, or the node leaving the
//! cluster view before the first token: the next candidate runs it instead. After tokens
//! have flowed, losing the node (3 s of silence) ends the stream with an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use ragnode_inference::{
    EngineError, EngineHandle, FinishReason, GenerationRequest, SamplingParams, StreamEvent, TokenStream, Usage,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::cluster::{Member, Membership};

/// Events a runner sends before waiting for an acknowledgement.
pub const WINDOW: u64 = 256;
/// The receiver acknowledges every this many events.
pub const ACK_EVERY: u64 = 32;
/// How long the receiver waits for `accepted`.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a runner waits for acknowledgements before giving the request up.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a runner tells the receiver it is still on the request.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a receiver gives a remote run up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Subjects of remote generation.
pub fn gen_subject(cluster: &str, node: &str) -> String {
    format!("ragnode.{cluster}.gen.{node}")
}

pub fn ctl_subject(cluster: &str, node: &str) -> String {
    format!("ragnode.{cluster}.ctl.{node}")
}

/// A generation another node runs for us.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteRequest {
    pub request_id: String,
    /// The receiving node.
    pub from: String,
    /// Must be the runner's model id.
    pub model: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// Runner → receiver, on the request's inbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RemoteReply {
    Accepted,
    /// Not run. `retry`: another node may take it (load, not ready).
    Rejected {
        code: String,
        message: String,
        retry: bool,
    },
    Event {
        seq: u64,
        event: StreamEvent,
    },
    /// Every [`HEARTBEAT`] while the run lasts (queued or generating): `sent` events so
    /// far. Core NATS drops messages across a server restart; the receiver notices a gap
    /// (`sent` ahead of what it got) or silence ([`STALL_TIMEOUT`]) instead of waiting.
    Heartbeat {
        sent: u64,
    },
}

/// Receiver → runner, on the runner's control subject.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Control {
    Ack { request_id: String, seq: u64 },
    Cancel { request_id: String },
}

/// Where a request runs.
pub enum Placement {
    Local,
    Remote(String),
}

/// Picks nodes and starts runs.
pub struct Router {
    pub membership: Arc<Membership>,
    pub model_id: String,
}

fn saturated(m: &Member) -> bool {
    m.status.waiting > 0 || m.status.kv_cache_usage >= 0.9
}

fn load(m: &Member) -> (usize, u64) {
    (m.status.running + m.status.waiting, (m.status.kv_cache_usage * 1000.0) as u64)
}

/// Orders `nodes` for a request: by rendezvous hash of `key` (no key: least loaded
/// first, `me` first among equals — no hop without a reason), the preferred node moved
/// behind the least loaded one when it is saturated.
pub fn order_candidates(nodes: &[Member], key: Option<&str>, me: &str) -> Vec<String> {
    let mut v: Vec<&Member> = nodes.iter().collect();
    match key {
        Some(k) => {
            v.sort_by_key(|m| std::cmp::Reverse(crate::cluster::stable_hash(&[k, &m.status.id])));
            if v.first().is_some_and(|m| saturated(m))
                && let Some((i, _)) = v.iter().enumerate().filter(|(_, m)| !saturated(m)).min_by_key(|(_, m)| load(m))
            {
                let pick = v.remove(i);
                v.insert(0, pick);
            }
        }
        None => v.sort_by(|a, b| {
            load(a)
                .cmp(&load(b))
                .then_with(|| (a.status.id != me).cmp(&(b.status.id != me)))
                .then_with(|| a.status.id.cmp(&b.status.id))
        }),
    }
    v.into_iter().map(|m| m.status.id.clone()).collect()
}

impl Router {
    /// The nodes that may run a request with this affinity key, best first.
    pub fn candidates(&self, key: Option<&str>) -> Vec<Placement> {
        let me = &self.membership.node_id;
        let live: Vec<Member> = self
            .membership
            .view
            .live()
            .into_iter()
            .filter(|m| m.status.ready && m.status.model == self.model_id)
            .collect();
        let mut order = order_candidates(&live, key, me);
        if !order.iter().any(|id| id == me) {
            order.push(me.clone()); // we can always run it ourselves
        }
        order.into_iter().map(|id| if &id == me { Placement::Local } else { Placement::Remote(id) }).collect()
    }

    /// Asks `node` to run `req`. `Ok(None)`: it did not take it (try another node).
    pub async fn start_remote(&self, node: &str, req: &RemoteRequest) -> Result<Option<RemoteStream>, ApiError> {
        let m = &self.membership;
        let inbox = m.client.new_inbox();
        let mut sub = m.client.subscribe(inbox.clone()).await.map_err(|e| ApiError::internal(format!("NATS: {e}")))?;
        let payload = serde_json::to_vec(req).map_err(|e| ApiError::internal(e.to_string()))?;
        if let Err(e) = m.client.publish_with_reply(gen_subject(&m.cluster, node), inbox, payload.into()).await {
            tracing::warn!(node, "sending a remote request failed: {e}");
            return Ok(None);
        }
        let first = tokio::time::timeout(ACCEPT_TIMEOUT, sub.next()).await;
        let reply = match first {
            Ok(Some(msg)) => serde_json::from_slice::<RemoteReply>(&msg.payload).ok(),
            _ => None,
        };
        match reply {
            Some(RemoteReply::Accepted) => {
                metrics::counter!("ragnode:remote_requests_total", "node" => node.to_string()).increment(1);
                Ok(Some(RemoteStream {
                    sub,
                    liveness: liveness_check(),
                    last_heard: tokio::time::Instant::now(),
                    membership: m.clone(),
                    node: node.to_string(),
                    request_id: req.request_id.clone(),
                    next_seq: 0,
                    tokens: 0,
                    done: false,
                }))
            }
            Some(RemoteReply::Rejected { retry: true, code, .. }) => {
                tracing::info!(node, code, "remote node declined; trying the next");
                Ok(None)
            }
            Some(RemoteReply::Rejected { code, message, .. }) => Err(remote_error(&code, message)),
            _ => {
                tracing::warn!(node, "no answer from the remote node; trying the next");
                Ok(None)
            }
        }
    }
}

fn liveness_check() -> tokio::time::Interval {
    let period = Duration::from_millis(250);
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

fn remote_error(code: &str, message: String) -> ApiError {
    match code {
        "context_length_exceeded" => ApiError::bad_request("context_length_exceeded", message),
        "invalid_request" => ApiError::bad_request("invalid_request", message),
        _ => ApiError::internal(message),
    }
}

/// A generation running on another node, read from our inbox.
pub struct RemoteStream {
    sub: async_nats::Subscriber,
    /// When to look whether the runner is still in the cluster view (not per event).
    liveness: tokio::time::Interval,
    /// When the runner was last heard from (event or heartbeat).
    last_heard: tokio::time::Instant,
    membership: Arc<Membership>,
    pub node: String,
    request_id: String,
    next_seq: u64,
    /// Tokens received so far.
    pub tokens: usize,
    done: bool,
}

/// Why a remote stream ended early.
pub enum RemoteEnd {
    /// The node left before any token: the request can run elsewhere.
    LostBeforeFirstToken,
}

impl RemoteStream {
    /// The next event. `Err(LostBeforeFirstToken)` when the node vanished first.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, RemoteEnd> {
        if self.done {
            return Ok(None);
        }
        loop {
            tokio::select! {
                msg = self.sub.next() => {
                    let Some(msg) = msg else {
                        return Ok(Some(self.fail("the cluster connection closed")));
                    };
                    self.last_heard = tokio::time::Instant::now();
                    match serde_json::from_slice::<RemoteReply>(&msg.payload) {
                        Ok(RemoteReply::Heartbeat { sent }) => {
                            if sent > self.next_seq {
                                return self.lost(&format!("events from node {} were lost", self.node)).await;
                            }
                        }
                        Ok(RemoteReply::Event { seq, event }) => {
                            if seq != self.next_seq {
                                return Ok(Some(self.fail(&format!("events from node {} arrived out of order", self.node))));
                            }
                            self.next_seq += 1;
                            if self.next_seq.is_multiple_of(ACK_EVERY) {
                                self.control(Control::Ack { request_id: self.request_id.clone(), seq: self.next_seq }).await;
                            }
                            match &event {
                                StreamEvent::Delta { token_ids, .. } => self.tokens += token_ids.len(),
                                StreamEvent::Finished { .. } => self.done = true,
                            }
                            return Ok(Some(event));
                        }
                        Ok(_) => continue,
                        Err(e) => return Ok(Some(self.fail(&format!("a malformed event from node {}: {e}", self.node)))),
                    }
                }
                _ = self.liveness.tick() => {
                    if self.last_heard.elapsed() > STALL_TIMEOUT {
                        return self.lost(&format!("node {} went silent mid-answer", self.node)).await;
                    }
                    if !self.membership.view.is_live(&self.node) {
                        if self.tokens == 0 {
                            self.done = true;
                            return Err(RemoteEnd::LostBeforeFirstToken);
                        }
                        return Ok(Some(self.fail(&format!("node {} left the cluster mid-answer", self.node))));
                    }
                }
            }
        }
    }

    /// The runner is alive but the stream broke: stop it there, and re-dispatch if no
    /// token was sent yet.
    async fn lost(&mut self, why: &str) -> Result<Option<StreamEvent>, RemoteEnd> {
        tracing::warn!(node = %self.node, request_id = %self.request_id, "{why}");
        self.control(Control::Cancel { request_id: self.request_id.clone() }).await;
        if self.tokens == 0 {
            self.done = true;
            return Err(RemoteEnd::LostBeforeFirstToken);
        }
        Ok(Some(self.fail(why)))
    }

    fn fail(&mut self, why: &str) -> StreamEvent {
        self.done = true;
        StreamEvent::Finished {
            reason: FinishReason::Error,
            usage: Usage { prompt_tokens: 0, completion_tokens: self.tokens },
            timings: Default::default(),
            error: Some(why.to_string()),
        }
    }

    async fn control(&self, c: Control) {
        let m = &self.membership;
        if let Ok(p) = serde_json::to_vec(&c) {
            let _ = m.client.publish(ctl_subject(&m.cluster, &self.node), p.into()).await;
        }
    }
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        if !self.done {
            // The client went away: tell the runner to stop.
            let m = self.membership.clone();
            let c = Control::Cancel { request_id: self.request_id.clone() };
            let node = self.node.clone();
            tokio::spawn(async move {
                if let Ok(p) = serde_json::to_vec(&c) {
                    let _ = m.client.publish(ctl_subject(&m.cluster, &node), p.into()).await;
                }
            });
        }
    }
}

/// The runner side: takes requests on `gen.<self>` and streams their events back.
pub async fn serve_remote(
    membership: Arc<Membership>,
    model_id: String,
    engine: impl Fn() -> Option<EngineHandle> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let m = membership;
    let mut requests = m.client.subscribe(gen_subject(&m.cluster, &m.node_id)).await?;
    let mut controls = m.client.subscribe(ctl_subject(&m.cluster, &m.node_id)).await?;
    let runs: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>> = Arc::default();
    {
        let runs = runs.clone();
        tokio::spawn(async move {
            while let Some(msg) = controls.next().await {
                let Ok(c) = serde_json::from_slice::<Control>(&msg.payload) else { continue };
                let id = match &c {
                    Control::Ack { request_id, .. } | Control::Cancel { request_id } => request_id.clone(),
                };
                if let Some(tx) = runs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                    let _ = tx.send(c);
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let client = m.client.clone();
            let send = move |r: RemoteReply| {
                let client = client.clone();
                let reply = reply.clone();
                async move {
                    match serde_json::to_vec(&r) {
                        Ok(p) => client.publish(reply, p.into()).await.is_ok(),
                        Err(_) => false,
                    }
                }
            };
            let req: RemoteRequest = match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    send(RemoteReply::Rejected {
                        code: "invalid_request".into(),
                        message: e.to_string(),
                        retry: false,
                    })
                    .await;
                    continue;
                }
            };
            let Some(engine) = engine().filter(|_| req.model == model_id) else {
                let message = format!("node {} is not serving model {}", m.node_id, req.model);
                send(RemoteReply::Rejected { code: "not_ready".into(), message, retry: true }).await;
                continue;
            };
            let mut run = GenerationRequest::new(req.prompt, req.max_tokens);
            run.sampling = req.sampling;
            run.stop = req.stop;
            let stream = match engine.submit(run) {
                Ok(s) => s,
                Err(e) => {
                    let retry = matches!(e, EngineError::Overloaded { .. } | EngineError::Stopped);
                    let code = match e {
                        EngineError::ContextLength { .. } => "context_length_exceeded",
                        EngineError::InvalidRequest(_) => "invalid_request",
                        _ => "overloaded",
                    };
                    send(RemoteReply::Rejected { code: code.into(), message: e.to_string(), retry }).await;
                    continue;
                }
            };
            let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
            runs.lock().unwrap_or_else(|e| e.into_inner()).insert(req.request_id.clone(), ctl_tx);
            metrics::counter!("ragnode:remote_requests_served_total", "from" => req.from.clone()).increment(1);
            tracing::info!(request = %req.request_id, from = %req.from, "running a request for another node");
            let runs = runs.clone();
            tokio::spawn(async move {
                if send(RemoteReply::Accepted).await {
                    pump(stream, ctl_rx, &send).await;
                }
                runs.lock().unwrap_or_else(|e| e.into_inner()).remove(&req.request_id);
            });
        }
    });
    Ok(())
}

/// Forwards a run's events within the flow-control window until it ends or is cancelled.
/// Dropping the engine stream (on return) cancels the engine request.
async fn pump<F, Fut>(mut stream: TokenStream, mut ctl: mpsc::UnboundedReceiver<Control>, send: &F)
where
    F: Fn(RemoteReply) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut seq = 0u64;
    let mut acked = 0u64;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    loop {
        // Wait for room in the window (or a cancel).
        while seq - acked >= WINDOW {
            match tokio::time::timeout(ACK_TIMEOUT, ctl.recv()).await {
                Ok(Some(Control::Ack { seq: s, .. })) => acked = acked.max(s),
                Ok(Some(Control::Cancel { .. })) | Ok(None) | Err(_) => return,
            }
        }
        let ev = tokio::select! {
            ev = stream.next() => ev,
            c = ctl.recv() => match c {
                Some(Control::Ack { seq: s, .. }) => { acked = acked.max(s); continue; }
                Some(Control::Cancel { .. }) | None => return,
            },
            _ = heartbeat.tick() => {
                send(RemoteReply::Heartbeat { sent: seq }).await;
                continue;
            }
        };
        let Some(event) = ev else { return };
        let last = matches!(event, StreamEvent::Finished { .. });
        if !send(RemoteReply::Event { seq, event }).await || last {
            return;
        }
        seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeStatus;

    fn member(id: &str, running: usize, waiting: usize) -> Member {
        Member { status: NodeStatus { id: id.into(), running, waiting, ..NodeStatus::default() }, last_seen_ms: 0 }
    }

    #[test]
    fn sessions_stick_to_a_node_and_spread_over_nodes() {
        let nodes = [member("a", 0, 0), member("b", 0, 0), member("c", 0, 0)];
        let mut firsts = HashMap::new();
        for u in 0..300 {
            let key = format!("user-{u}");
            let first = order_candidates(&nodes, Some(&key), "a")[0].clone();
            assert_eq!(order_candidates(&nodes, Some(&key), "a")[0], first, "same key, same node");
            *firsts.entry(first).or_insert(0) += 1;
        }
        assert_eq!(firsts.len(), 3);
        assert!(firsts.values().all(|&n| n > 60), "{firsts:?}");
        // Removing a node moves only its own sessions.
        let two = [member("a", 0, 0), member("b", 0, 0)];
        for u in 0..300 {
            let key = format!("user-{u}");
            let before = order_candidates(&nodes, Some(&key), "a")[0].clone();
            if before != "c" {
                assert_eq!(order_candidates(&two, Some(&key), "a")[0], before);
            }
        }
    }

    #[test]
    fn a_saturated_preferred_node_yields_to_the_least_loaded() {
        let nodes = [member("a", 3, 0), member("b", 1, 0), member("c", 5, 0)];
        let key = (0..100).map(|u| format!("k{u}")).find(|k| order_candidates(&nodes, Some(k), "a")[0] == "c").unwrap();
        let busy = [member("a", 3, 0), member("b", 1, 0), member("c", 64, 7)];
        let order = order_candidates(&busy, Some(&key), "a");
        assert_eq!(order[0], "b");
        assert!(order.contains(&"c".to_string()), "the saturated node stays a fallback");
        assert_eq!(order_candidates(&nodes, None, "a"), ["b", "a", "c"]);
        let idle = [member("a", 0, 0), member("b", 0, 0)];
        assert_eq!(order_candidates(&idle, None, "b"), ["b", "a"], "no key, equal load: stay here");
    }

    #[test]
    fn stream_events_survive_the_wire() {
        let ev = RemoteReply::Event {
            seq: 3,
            event: StreamEvent::Delta { text: "退货".into(), token_ids: vec![1, 2], logprobs: vec![] },
        };
        let back: RemoteReply = serde_json::from_slice(&serde_json::to_vec(&ev).unwrap()).unwrap();
        match back {
            RemoteReply::Event { seq: 3, event: StreamEvent::Delta { text, token_ids, .. } } => {
                assert_eq!(text, "退货");
                assert_eq!(token_ids, [1, 2]);
            }
            other => panic!("{other:?}"),
        }
    }
}
