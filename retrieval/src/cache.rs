//! Hot-answer cache: repeated questions skip the index.
//!
//! Keys are the normalised question (width-folded, lowercased, punctuation dropped,
//! whitespace collapsed: "退货政策是什么？" = "退货政策是什么?" = " 退货政策 是什么 ") plus the
//! search options. Entries expire after a TTL and the least recently used go first when
//! the cache is full. Any write to the shard clears it, so a cached answer is never older
//! than the index it came from.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::analyzer::fold_width;

/// Default time to live of a cached answer.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// Default number of cached queries.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// The normalised form of a question used as a cache key.
pub fn normalize_question(q: &str) -> String {
    let mut out = String::with_capacity(q.len());
    let mut space = false;
    for c in q.chars().map(fold_width) {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.extend(c.to_lowercase());
        } else {
            // Punctuation and whitespace both separate words.
            space = true;
        }
    }
    out
}

/// Hit/miss counters, for metrics.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// Cached values with the time they were stored.
type Entries<V> = LruCache<String, (Instant, Arc<V>)>;

/// A TTL + LRU map from search keys to results.
pub struct HotAnswerCache<V> {
    inner: Option<Mutex<Entries<V>>>,
    ttl: Duration,
    counters: Arc<CacheCounters>,
}

impl<V> HotAnswerCache<V> {
    /// `capacity == 0` or `ttl == 0` disables caching (every lookup misses).
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let inner = match NonZeroUsize::new(capacity) {
            Some(cap) if !ttl.is_zero() => Some(Mutex::new(LruCache::new(cap))),
            _ => None,
        };
        Self { inner, ttl, counters: Arc::default() }
    }

    pub fn counters(&self) -> Arc<CacheCounters> {
        self.counters.clone()
    }

    pub fn get(&self, key: &str) -> Option<Arc<V>> {
        let hit = self.inner.as_ref().and_then(|m| {
            let mut lru = m.lock().unwrap_or_else(|e| e.into_inner());
            match lru.get(key) {
                Some((at, v)) if at.elapsed() < self.ttl => Some(v.clone()),
                Some(_) => {
                    lru.pop(key);
                    None
                }
                None => None,
            }
        });
        let c = if hit.is_some() { &self.counters.hits } else { &self.counters.misses };
        c.fetch_add(1, Ordering::Relaxed);
        hit
    }

    pub fn put(&self, key: String, value: Arc<V>) {
        if let Some(m) = &self.inner {
            m.lock().unwrap_or_else(|e| e.into_inner()).put(key, (Instant::now(), value));
        }
    }

    pub fn clear(&self) {
        if let Some(m) = &self.inner {
            m.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |m| m.lock().unwrap_or_else(|e| e.into_inner()).len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_folds_width_case_punctuation_and_space() {
        let a = normalize_question("退货政策是什么？");
        assert_eq!(a, normalize_question("退货政策是什么?"));
        assert_eq!(a, normalize_question("  退货政策是什么 "));
        assert_eq!(normalize_question("How do I  RETURN an item?!"), "how do i return an item");
        assert_eq!(normalize_question("ＶＩＰ，会员"), "vip 会员");
    }

    #[test]
    fn lru_evicts_and_ttl_expires() {
        let c = HotAnswerCache::new(2, Duration::from_secs(60));
        c.put("a".into(), Arc::new(1));
        c.put("b".into(), Arc::new(2));
        assert_eq!(c.get("a").as_deref(), Some(&1)); // a is now most recent
        c.put("c".into(), Arc::new(3)); // evicts b
        assert!(c.get("b").is_none());
        assert_eq!(c.get("c").as_deref(), Some(&3));
        let counters = c.counters();
        assert_eq!((counters.hits.load(Ordering::Relaxed), counters.misses.load(Ordering::Relaxed)), (2, 1));

        let short = HotAnswerCache::new(2, Duration::from_millis(20));
        short.put("a".into(), Arc::new(1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(short.get("a").is_none());
        assert!(short.is_empty());
    }

    #[test]
    fn disabled_cache_always_misses() {
        let c = HotAnswerCache::new(0, DEFAULT_TTL);
        c.put("a".into(), Arc::new(1));
        assert!(c.get("a").is_none());
    }
}
