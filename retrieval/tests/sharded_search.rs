//! Distributed scoring: the demo FAQ split over 3 shards, searched with merged corpus
//! statistics and merged by score, gives the same hits (ids, order, scores, confidences)
//! as one index holding everything — for every question and paraphrase as a query, with
//! and without filters.

use ragnode_retrieval::{CorpusStats, FaqEntry, FaqShard, SearchOptions, ShardConfig, merge_hits};

fn demo_entries() -> Vec<FaqEntry> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn shard_of(id: &str, n: usize) -> usize {
    id.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) as usize % n
}

#[test]
fn three_shards_with_merged_stats_rank_like_one_index() {
    let entries = demo_entries();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShardConfig { cache_capacity: 0, ..ShardConfig::default() };
    let whole = FaqShard::open(dir.path().join("whole"), &cfg).unwrap();
    whole.upsert(&entries).unwrap();
    let shards: Vec<FaqShard> = (0..3)
        .map(|i| {
            let s = FaqShard::open(dir.path().join(format!("s{i}")), &cfg).unwrap();
            let part: Vec<FaqEntry> = entries.iter().filter(|e| shard_of(&e.id, 3) == i).cloned().collect();
            assert!(part.len() > 40, "a real split");
            s.upsert(&part).unwrap();
            s
        })
        .collect();

    let mut queries: Vec<String> = Vec::new();
    for e in &entries {
        queries.push(e.question.clone());
        queries.extend(e.alt_questions.iter().cloned());
    }
    queries.push("how do I get my money back for a broken phone".into());
    let filtered = SearchOptions { k: 5, category: Some("returns".into()), lang: Some("zh".into()) };
    let mut compared = 0;
    for q in &queries {
        for opts in [SearchOptions { k: 5, ..SearchOptions::default() }, filtered.clone()] {
            let one = whole.search_uncached(q, &opts).unwrap();
            let mut stats = CorpusStats::default();
            for s in &shards {
                stats.merge(&s.corpus_stats(q, &opts).unwrap());
            }
            let merged = merge_hits(shards.iter().map(|s| s.search_with_stats(q, &opts, &stats).unwrap()), opts.k);
            // Equal scores at the k-th place may be cut differently: compare above it.
            let cut = |hits: &[ragnode_retrieval::FaqHit]| {
                let last = hits.last().map(|h| h.score);
                hits.iter()
                    .filter(|h| Some(h.score) != last || hits.len() < opts.k)
                    .map(|h| h.id.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(cut(&one), cut(&merged), "query {q:?} ({opts:?})");
            assert_eq!(one.len(), merged.len(), "query {q:?}");
            for (a, b) in one.iter().zip(&merged) {
                assert!(
                    (a.score - b.score).abs() <= 1e-4 * a.score.abs().max(1.0),
                    "{q:?}: {} vs {}",
                    a.score,
                    b.score
                );
                if a.id == b.id {
                    assert!((a.confidence - b.confidence).abs() < 1e-5, "{q:?}: confidence");
                    assert_eq!(a.snippet, b.snippet);
                }
            }
            compared += 1;
        }
    }
    assert!(compared > 600, "{compared}");

    // Without merged statistics the shards disagree with the whole index somewhere (the
    // reason for the DFS step).
    let differs = queries.iter().any(|q| {
        let opts = SearchOptions::default();
        let one = whole.search_uncached(q, &opts).unwrap();
        let local = merge_hits(shards.iter().map(|s| s.search_uncached(q, &opts).unwrap()), opts.k);
        one.iter().zip(&local).any(|(a, b)| (a.score - b.score).abs() > 1e-3)
    });
    assert!(differs);
}
