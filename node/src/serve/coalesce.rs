//! One generation for identical questions asked at the same time.
//!
//! A RAG app's first-turn answers made with its own settings are shared through its
//! hot-answer cache once complete, but a burst of the same question (a promotion, an
//! outage: 10,000 customers ask "怎么退款" within a second) would otherwise start one
//! generation per request before the first one lands in the cache. Here the first such
//! request of a key (app, normalised question, cache epoch) leads: its generation runs in
//! a task that records every event; the others — and the leader's own client — follow that
//! record from the start, each at its own pace, under its own deadline and audit line.
//! The generation is cancelled only when every follower has gone away.
//!
//! Only requests that would share a cache entry are coalesced (no per-request settings,
//! no history, cache on, every FAQ shard answered), so each gets exactly the answer a
//! cache hit a moment later would give.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::answer::{AnswerEnd, AnswerEvent, AnswerStream};
use super::error::ApiError;
use super::rag::Source;

/// What followers need to know once the generation has started.
#[derive(Clone)]
pub struct Started {
    pub prompt_tokens: usize,
    pub served_by: String,
    pub sources: Arc<Vec<Source>>,
}

#[derive(Clone, Debug)]
pub enum SharedEvent {
    Delta(String),
    Done(AnswerEnd),
}

#[derive(Default)]
struct Record {
    /// `None` until the leader has started the generation (or failed to).
    started: Option<Result<Started, ApiError>>,
    events: Vec<SharedEvent>,
}

/// One shared generation: its record and a counter that ticks with every change.
pub struct SharedAnswer {
    record: Mutex<Record>,
    tick: watch::Sender<u64>,
}

impl SharedAnswer {
    fn new() -> Arc<Self> {
        Arc::new(Self { record: Mutex::new(Record::default()), tick: watch::channel(0).0 })
    }

    fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap_or_else(|e| e.into_inner()));
        self.tick.send_modify(|t| *t += 1);
    }

    /// A follower from the first event.
    pub fn follow(self: &Arc<Self>) -> Follower {
        Follower { shared: self.clone(), rx: self.tick.subscribe(), next: 0 }
    }
}

/// A reader of a [`SharedAnswer`]'s record.
pub struct Follower {
    shared: Arc<SharedAnswer>,
    rx: watch::Receiver<u64>,
    next: usize,
}

impl Follower {
    /// Waits for the leader to start the generation.
    pub async fn started(&mut self) -> Result<Started, ApiError> {
        loop {
            if let Some(s) = &self.shared.record.lock().unwrap_or_else(|e| e.into_inner()).started {
                return s.clone();
            }
            if self.rx.changed().await.is_err() {
                return Err(ApiError::internal("the shared generation ended before it started"));
            }
        }
    }

    /// The next recorded event; `None` if the generation ended without a last event.
    pub async fn next(&mut self) -> Option<SharedEvent> {
        loop {
            {
                let record = self.shared.record.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(ev) = record.events.get(self.next) {
                    self.next += 1;
                    return Some(ev.clone());
                }
            }
            self.rx.changed().await.ok()?;
        }
    }
}

/// A request's part in a coalesced answer.
pub enum Role {
    /// Start the generation and hand it to [`Lead::run`] (or report [`Lead::fail`]).
    Leader(Lead),
    /// Someone else is generating: follow.
    Follower(Follower),
}

/// The duty to start a shared generation. Dropped without [`run`](Self::run) or
/// [`fail`](Self::fail) — the task starting it panicked or was cancelled — it fails the
/// generation, so no follower waits for a start that will not come and the key is freed.
pub struct Lead {
    coalescer: Arc<Coalescer>,
    key: String,
    shared: Arc<SharedAnswer>,
    settled: bool,
}

impl Lead {
    /// A follower from the first event (the leader's own client follows too).
    pub fn follow(&self) -> Follower {
        self.shared.follow()
    }

    /// The leader could not start the generation: its followers get the same error.
    pub fn fail(mut self, e: ApiError) {
        self.settled = true;
        self.coalescer.forget(&self.key, &self.shared);
        self.shared.update(|r| r.started = Some(Err(e)));
    }

    /// Runs `answer` for everyone following, until it ends or nobody follows any more
    /// (which cancels it).
    pub fn run(mut self, started: Started, mut answer: AnswerStream) {
        self.settled = true;
        let (this, key, shared) = (self.coalescer.clone(), self.key.clone(), self.shared.clone());
        shared.update(|r| r.started = Some(Ok(started)));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = answer.next() => {
                        let ev = match ev {
                            Some(AnswerEvent::Delta { text, .. }) => SharedEvent::Delta(text),
                            Some(AnswerEvent::Done(end)) => SharedEvent::Done(end),
                            None => SharedEvent::Done(AnswerEnd {
                                finish_reason: "error",
                                usage: Default::default(),
                                error: Some(("engine_error", "the generation ended without a result".into())),
                            }),
                        };
                        let done = matches!(ev, SharedEvent::Done(_));
                        if done {
                            // Out of the map first: a request arriving from now on starts
                            // afresh (or hits the cache), none joins a finished record.
                            this.forget(&key, &shared);
                        }
                        shared.update(|r| r.events.push(ev));
                        if done {
                            return;
                        }
                    }
                    _ = shared.tick.closed() => {
                        // Nobody follows, unless someone joined since (joins hold the lock).
                        let mut map = this.inflight.lock().unwrap_or_else(|e| e.into_inner());
                        if shared.tick.receiver_count() == 0 {
                            forget_locked(&mut map, &key, &shared);
                            // Dropping `answer` cancels the engine request.
                            return;
                        }
                    }
                }
            }
        });
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if !self.settled {
            self.coalescer.forget(&self.key, &self.shared);
            let e = ApiError::internal("the shared generation was abandoned before it started");
            self.shared.update(|r| r.started = Some(Err(e)));
        }
    }
}

/// An app's generations in flight, by key.
#[derive(Default)]
pub struct Coalescer {
    inflight: Mutex<HashMap<String, Arc<SharedAnswer>>>,
}

impl Coalescer {
    /// Joins the generation in flight for `key`, or becomes its leader.
    pub fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = map.get(key) {
            metrics::counter!("ragnode:answers_coalesced_total").increment(1);
            // Subscribed under the lock: the driver cannot decide it has no followers
            // between this lookup and the subscription.
            return Role::Follower(shared.follow());
        }
        let shared = SharedAnswer::new();
        map.insert(key.to_string(), shared.clone());
        Role::Leader(Lead { coalescer: self.clone(), key: key.to_string(), shared, settled: false })
    }

    fn forget(&self, key: &str, shared: &Arc<SharedAnswer>) {
        forget_locked(&mut self.inflight.lock().unwrap_or_else(|e| e.into_inner()), key, shared);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}

fn forget_locked(map: &mut HashMap<String, Arc<SharedAnswer>>, key: &str, shared: &Arc<SharedAnswer>) {
    if map.get(key).is_some_and(|s| Arc::ptr_eq(s, shared)) {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Started {
        Started { prompt_tokens: 3, served_by: "n".into(), sources: Arc::new(Vec::new()) }
    }

    #[tokio::test]
    async fn followers_replay_the_whole_answer_whenever_they_join() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(lead) = c.join("q") else { panic!("first is the leader") };
        let mut early = lead.follow();
        let Role::Follower(mut second) = c.join("q") else { panic!("second follows") };
        lead.run(started(), AnswerStream::known_pieces(vec!["a".into(), "b".into()]));
        assert_eq!(early.started().await.unwrap().prompt_tokens, 3);
        let mut texts = Vec::new();
        while let Some(ev) = early.next().await {
            match ev {
                SharedEvent::Delta(t) => texts.push(t),
                SharedEvent::Done(end) => {
                    assert_eq!(end.finish_reason, "stop");
                    break;
                }
            }
        }
        assert_eq!(texts, ["a", "b"]);
        // A follower that joined before the end reads the same record.
        assert!(matches!(second.next().await, Some(SharedEvent::Delta(t)) if t == "a"));
        // Once done, the key is free: the next request leads a new generation.
        assert_eq!(c.len(), 0);
        assert!(matches!(c.join("q"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_start_reaches_every_follower() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(lead) = c.join("q") else { panic!() };
        let Role::Follower(mut f) = c.join("q") else { panic!() };
        lead.fail(ApiError::overloaded("busy"));
        assert_eq!(f.started().await.err().map(|e| e.code), Some("overloaded"));
        assert_eq!(c.len(), 0);
        // The task starting it went away (a panic, a cancel): followers learn at once.
        let Role::Leader(lead) = c.join("q") else { panic!() };
        let Role::Follower(mut f) = c.join("q") else { panic!() };
        drop(lead);
        assert_eq!(f.started().await.err().map(|e| e.code), Some("internal_error"));
        assert!(matches!(c.join("q"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_generation_nobody_follows_is_dropped() {
        let c = Arc::new(Coalescer::default());
        let Role::Leader(lead) = c.join("q") else { panic!() };
        let f = lead.follow();
        // A stream that never ends: only the followers leaving can stop it.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let answer = AnswerStream::engine(
            super::super::answer::TokenSource::Local(ragnode_inference::TokenStream::from_channel(1, rx)),
            1,
            tokio::time::Instant::now() + std::time::Duration::from_secs(60),
        );
        lead.run(started(), answer);
        assert_eq!(c.len(), 1);
        drop(f);
        for _ in 0..100 {
            if tx.is_closed() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(tx.is_closed(), "the engine stream was dropped (cancelling the request)");
        assert_eq!(c.len(), 0);
    }
}
