//! RAG apps (the seed's "Knowledge Q&A" chatflow): retrieve FAQ hits → render the
//! app's prompt → generate, with the app's hot-answer cache in front and a direct answer
//! for a confident hit.
//!
//! Sources are cited by the server, not trusted to the model: the model is stopped at its
//! own "来源:" line and the server appends the exact source line of the hits it was given.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use minijinja::Environment;
use ragnode_inference::Usage;
use ragnode_models::tokenizer::ChatMessage;
use ragnode_retrieval::FaqHit;
use ragnode_retrieval::cache::{CacheCounters, HotAnswerCache, normalize_question};
use serde::Serialize;

use super::coalesce::Coalescer;
use super::error::ApiError;
use crate::config::AppConfig;

/// A FAQ entry an answer is based on (Dify's `retriever_resources`, our `sources`).
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    pub id: String,
    pub question: String,
    pub answer: String,
    pub category: String,
    pub score: f32,
    pub confidence: f32,
}

impl From<&FaqHit> for Source {
    fn from(h: &FaqHit) -> Self {
        Self {
            id: h.id.clone(),
            question: h.question.clone(),
            answer: h.answer.clone(),
            category: h.category.clone(),
            score: h.score,
            confidence: h.confidence,
        }
    }
}

/// A cached first-turn answer.
pub struct CachedAnswer {
    pub text: String,
    pub sources: Arc<Vec<Source>>,
    /// `stop`, or `length` for an answer cut at the app's `max_tokens` (served as such).
    pub finish_reason: &'static str,
    /// The tokens of the question and of the answer as first served.
    pub usage: Usage,
}

/// What to do with one question.
pub enum RagPlan {
    /// Answer with this text, no model (confident FAQ hit, or no-answer text); to be
    /// cached under `cache_key` (key, epoch) if set.
    Answer { text: String, sources: Arc<Vec<Source>>, cache_key: Option<(String, u64)> },
    /// Ask the model.
    Generate {
        messages: Vec<ChatMessage>,
        sources: Arc<Vec<Source>>,
        /// The source line appended after the model's answer.
        suffix: Option<String>,
        /// Where to cache the answer once complete (first turns only), and the cache
        /// epoch it was planned in.
        cache_key: Option<(String, u64)>,
    },
}

/// A configured app, ready to serve.
pub struct RagApp {
    pub cfg: AppConfig,
    env: Environment<'static>,
    cache: HotAnswerCache<CachedAnswer>,
    /// First-turn generations in flight, shared by identical questions.
    pub inflight: Arc<Coalescer>,
    /// Bumped by every cache clear: an answer computed from the FAQ as it was before a
    /// write is not stored after it.
    epoch: AtomicU64,
}

/// Longest question accepted (bytes): questions are cache keys and jieba input.
pub const MAX_QUESTION_BYTES: usize = 4096;

/// Stop strings that end the model's own source line (the server writes it).
pub const SOURCE_STOPS: [&str; 4] = ["来源:", "来源：", "Source:", "Sources:"];

impl RagApp {
    pub fn new(cfg: AppConfig) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_template_owned("prompt", cfg.prompt_template.clone())
            .map_err(|e| format!("app {:?}: prompt_template: {e}", cfg.name))?;
        let cache_capacity = if cfg.cache { ragnode_retrieval::cache::DEFAULT_CAPACITY } else { 0 };
        let cache = HotAnswerCache::new(cache_capacity, ragnode_retrieval::cache::DEFAULT_TTL);
        Ok(Self { cfg, env, cache, inflight: Arc::default(), epoch: AtomicU64::new(0) })
    }

    pub fn cache_counters(&self) -> Arc<CacheCounters> {
        self.cache.counters()
    }

    /// Drops every cached answer (after a FAQ write).
    pub fn clear_cache(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
    }

    /// The cache epoch; pass it back to [`RagApp::store`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Cache lookup only: the answer to a first-turn question, if cached.
    pub fn cached(&self, question: &str) -> Option<Arc<CachedAnswer>> {
        if !self.cfg.cache {
            return None;
        }
        self.cache.get(&normalize_question(question))
    }

    /// Decides how to answer `question` after `history` (earlier turns, oldest first)
    /// from its FAQ `hits` (the app's `top_k`, best first; `partial` when some FAQ shard
    /// did not answer: such an answer is not cached), searched in cache epoch `epoch`
    /// (read before the search).
    pub fn plan(
        &self,
        hits: &[FaqHit],
        partial: bool,
        epoch: u64,
        question: &str,
        history: &[ChatMessage],
    ) -> Result<RagPlan, ApiError> {
        Self::check_question(question)?;
        // (The caller looks in the cache first: see `AppState::start_rag`.)
        let first_turn = history.is_empty();
        // An entry without an answer (indexed before answers were required) answers nothing.
        let hits: Vec<&FaqHit> =
            hits.iter().filter(|h| h.confidence >= self.cfg.min_confidence && !h.answer.trim().is_empty()).collect();
        let sources: Arc<Vec<Source>> = Arc::new(hits.iter().map(|h| Source::from(*h)).collect());
        let cache_key = (first_turn && self.cfg.cache && !partial).then(|| normalize_question(question));

        if let Some(top) = hits.first()
            && self.cfg.direct_answer
            && top.confidence >= self.cfg.direct_answer_confidence
        {
            let sources = Arc::new(vec![Source::from(*top)]);
            let text = format!("{}\n\n{}", top.answer, source_line(&sources));
            return Ok(RagPlan::Answer { text, sources, cache_key: cache_key.map(|k| (k, epoch)) });
        }
        if hits.is_empty()
            && let Some(text) = &self.cfg.no_answer
        {
            return Ok(RagPlan::Answer { text: text.clone(), sources, cache_key: None });
        }

        let faq_answer = hits
            .iter()
            .enumerate()
            .map(|(i, h)| format!("[{}] {}\n{}", i + 1, h.question, h.answer))
            .collect::<Vec<_>>()
            .join("\n\n");
        let prompt = self
            .env
            .get_template("prompt")
            .and_then(|t| {
                t.render(minijinja::context! { question => question, faq_answer => faq_answer, sources => minijinja::value::Serde(&*sources) })
            })
            .map_err(|e| ApiError::internal(format!("app {:?}: rendering the prompt: {e}", self.cfg.name)))?;
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(system) = &self.cfg.system_prompt {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.extend(history.iter().cloned());
        messages.push(ChatMessage::user(prompt));
        let suffix = (!sources.is_empty()).then(|| format!("\n\n{}", source_line(&sources)));
        let cache_key = cache_key.map(|k| (k, epoch));
        Ok(RagPlan::Generate { messages, sources, suffix, cache_key })
    }

    /// Remembers a first-turn answer computed in cache epoch `epoch` (dropped if the FAQ
    /// changed since).
    pub fn store(&self, key: String, answer: CachedAnswer, epoch: u64) {
        if self.epoch() == epoch {
            self.cache.put(key, Arc::new(answer));
        }
    }

    /// Checks a question before it is used as a cache key and search input.
    pub fn check_question(question: &str) -> Result<(), ApiError> {
        if question.len() > MAX_QUESTION_BYTES {
            return Err(ApiError::invalid_param(
                "messages",
                format!("the question is {} bytes; the limit is {MAX_QUESTION_BYTES}", question.len()),
            ));
        }
        if normalize_question(question).is_empty() {
            return Err(ApiError::invalid_param("messages", "the question is empty"));
        }
        Ok(())
    }
}

/// "来源: Q1; Q2" (or "Source: ..." when every source is English).
pub fn source_line(sources: &[Source]) -> String {
    let english = sources.iter().all(|s| s.question.is_ascii());
    let label = if english { "Source: " } else { "来源: " };
    let names: Vec<&str> = sources.iter().map(|s| s.question.as_str()).collect();
    format!("{label}{}", names.join("; "))
}

/// One server-side conversation (Dify's `conversation_id`).
#[derive(Clone, Debug)]
pub struct Conversation {
    pub app: String,
    pub user: Option<String>,
    pub messages: VecDeque<ChatMessage>,
}

/// Conversations by id: bounded in number (LRU) and in messages each.
pub struct ConversationStore {
    inner: Mutex<LruCache<String, Conversation>>,
    max_messages: usize,
}

impl ConversationStore {
    pub fn new(max_conversations: usize, max_messages: usize) -> Self {
        let cap = NonZeroUsize::new(max_conversations.max(1)).unwrap_or(NonZeroUsize::MIN);
        // Kept in whole exchanges (a question and its answer).
        Self { inner: Mutex::new(LruCache::new(cap)), max_messages: (max_messages.max(2) / 2) * 2 }
    }

    /// The conversation's earlier messages, if it exists and belongs to `app` and `user`.
    pub fn history(&self, id: &str, app: &str, user: Option<&str>) -> Result<Vec<ChatMessage>, ApiError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.get(id) {
            Some(c) if c.app == app && (c.user.is_none() || c.user.as_deref() == user) => {
                Ok(c.messages.iter().cloned().collect())
            }
            _ => Err(ApiError::not_found("conversation_not_found", format!("conversation {id:?} does not exist"))),
        }
    }

    /// Appends one exchange, creating the conversation if needed.
    pub fn append(&self, id: &str, app: &str, user: Option<&str>, question: &str, answer: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let conv = inner.get_or_insert_mut(id.to_string(), || Conversation {
            app: app.to_string(),
            user: user.map(str::to_string),
            messages: VecDeque::new(),
        });
        conv.messages.push_back(ChatMessage::user(question));
        conv.messages.push_back(ChatMessage::assistant(answer));
        // Whole exchanges go, so the history still starts with a user turn.
        while conv.messages.len() > self.max_messages {
            conv.messages.pop_front();
            conv.messages.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_are_bounded_and_scoped_to_their_app() {
        let store = ConversationStore::new(2, 4);
        for i in 0..3 {
            store.append("c1", "faq", Some("u"), &format!("q{i}"), &format!("a{i}"));
        }
        let h = store.history("c1", "faq", Some("u")).unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h[0].content, "q1");
        assert_eq!(h[3].content, "a2");
        assert!(store.history("c1", "other", Some("u")).is_err());
        assert!(store.history("c1", "faq", Some("someone-else")).is_err());
        store.append("c2", "faq", None, "q", "a");
        store.append("c3", "faq", None, "q", "a");
        assert_eq!(store.len(), 2);
        assert!(store.history("c1", "faq", Some("u")).is_err(), "least recently used is dropped");
    }

    #[test]
    fn source_lines_follow_the_language_of_the_sources() {
        let s = |q: &str| Source {
            id: "x".into(),
            question: q.into(),
            answer: String::new(),
            category: String::new(),
            score: 1.0,
            confidence: 1.0,
        };
        assert_eq!(source_line(&[s("退货政策是什么？")]), "来源: 退货政策是什么？");
        assert_eq!(
            source_line(&[s("What is your return policy?"), s("Refunds")]),
            "Source: What is your return policy?; Refunds"
        );
    }
}
