//! FAQ retrieval quality and speed on an evaluation set.
//!
//! `faq-eval DIR [DIR...]`: each DIR holds `faq.jsonl` (`{"id", "question", "answer"}`) and
//! `queries.jsonl` (`{"query", "faq_id"}`) (see `../shared/datasets/README.md`). The FAQ is
//! indexed into a fresh temporary shard, every query is run with the hot-answer cache
//! disabled, and the bench prints top-1 accuracy, recall@5, MRR@10, how top-1 precision
//! and coverage trade off against the confidence threshold, and query latency.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use ragnode_retrieval::shard::SearchBoosts;
use ragnode_retrieval::{CorpusStats, FaqEntry, FaqShard, SearchOptions, ShardConfig, merge_hits};
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "FAQ retrieval quality (top-1, recall@5, MRR@10) and query latency")]
struct Cli {
    /// Evaluation set directories.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Field boosts QUESTION,ALT,ANSWER.
    #[arg(long, value_delimiter = ',')]
    boosts: Option<Vec<f32>>,
    /// Also split the FAQ over this many shards (by a hash of the id) and check that a
    /// distributed search — merged corpus statistics, per-shard search, merge by score —
    /// returns what the single index returns.
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

fn shard_of(id: &str, n: usize) -> usize {
    (id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)) % n as u64)
        as usize
}

#[derive(Deserialize)]
struct Query {
    query: String,
    faq_id: String,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), i + 1))?);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut config = ShardConfig { cache_capacity: 0, ..ShardConfig::default() };
    if let Some(b) = &cli.boosts {
        anyhow::ensure!(b.len() == 3, "--boosts takes three numbers: QUESTION,ALT,ANSWER");
        config.boosts = SearchBoosts { question: b[0], alt_questions: b[1], answer: b[2] };
    }
    println!("| set | entries | queries | top-1 | recall@5 | MRR@10 | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut thresholds = Vec::new();
    let mut sharded_rows = Vec::new();
    for dir in &cli.dirs {
        let mut faq: Vec<FaqEntry> = read_jsonl(&dir.join("faq.jsonl"))?;
        // BQ's entries are questions only, and an entry needs an answer: a placeholder that
        // indexes no term (punctuation is dropped), so the scores are the dataset's own.
        for e in faq.iter_mut().filter(|e| e.answer.trim().is_empty()) {
            e.answer = "-".into();
        }
        let queries: Vec<Query> = read_jsonl(&dir.join("queries.jsonl"))?;
        let tmp = std::env::temp_dir().join(format!("ragnode-faq-eval-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let shard = FaqShard::open(&tmp, &config)?;
        shard.upsert(&faq)?;
        let opts = SearchOptions { k: 10, ..SearchOptions::default() };
        let parts: Vec<FaqShard> = if cli.shards > 1 {
            (0..cli.shards)
                .map(|i| {
                    let part: Vec<FaqEntry> =
                        faq.iter().filter(|e| shard_of(&e.id, cli.shards) == i).cloned().collect();
                    let s = FaqShard::open(tmp.join(format!("shard-{i}")), &config)?;
                    s.upsert(&part)?;
                    anyhow::Ok(s)
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let (mut same, mut same_top1, mut sharded_top1) = (0usize, 0usize, 0usize);
        let mut sharded_lat = Vec::new();
        let (mut top1, mut r5, mut mrr) = (0usize, 0usize, 0f64);
        let mut lat = Vec::with_capacity(queries.len());
        // (confidence of the top hit, whether it is right)
        let mut conf = Vec::with_capacity(queries.len());
        for q in &queries {
            let t = Instant::now();
            let hits = shard.search_uncached(&q.query, &opts)?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let rank = hits.iter().position(|h| h.id == q.faq_id);
            top1 += usize::from(rank == Some(0));
            r5 += usize::from(rank.is_some_and(|r| r < 5));
            mrr += rank.map_or(0.0, |r| 1.0 / (r + 1) as f64);
            if let Some(h) = hits.first() {
                conf.push((h.confidence, rank == Some(0)));
            }
            if !parts.is_empty() {
                let t = Instant::now();
                let mut stats = CorpusStats::default();
                for p in &parts {
                    stats.merge(&p.corpus_stats(&q.query, &opts)?);
                }
                let lists = parts
                    .iter()
                    .map(|p| p.search_with_stats(&q.query, &opts, &stats))
                    .collect::<Result<Vec<_>, _>>()?;
                let merged = merge_hits(lists, opts.k);
                sharded_lat.push(t.elapsed().as_secs_f64() * 1e3);
                let ids = |h: &[ragnode_retrieval::FaqHit]| h.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
                same += usize::from(ids(&hits) == ids(&merged));
                same_top1 += usize::from(hits.first().map(|h| &h.id) == merged.first().map(|h| &h.id));
                sharded_top1 += usize::from(merged.first().is_some_and(|h| h.id == q.faq_id));
            }
        }
        lat.sort_by(f64::total_cmp);
        let n = queries.len() as f64;
        let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "| {name} | {} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
            faq.len(),
            queries.len(),
            top1 as f64 / n,
            r5 as f64 / n,
            mrr / n,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        if !parts.is_empty() {
            sharded_lat.sort_by(f64::total_cmp);
            sharded_rows.push(format!(
                "| {name} | {} | {} | {same}/{} | {same_top1}/{} | {:.3} | {:.2} | {:.2} |",
                cli.shards,
                queries.len(),
                queries.len(),
                queries.len(),
                sharded_top1 as f64 / n,
                percentile(&sharded_lat, 0.5),
                percentile(&sharded_lat, 0.99)
            ));
        }
        thresholds.push((name, conf, queries.len()));
        drop(parts);
        drop(shard);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if !sharded_rows.is_empty() {
        println!();
        println!("distributed search (in process: stats phase, per-shard search, merge) vs the single index, top 10");
        println!();
        println!("| set | shards | queries | same ids and order | same top-1 | top-1 | p50 ms | p99 ms |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &sharded_rows {
            println!("{r}");
        }
    }
    println!();
    println!("confidence threshold: share of queries answered (top hit confidence ≥ t) and precision of those answers");
    println!();
    println!("| set | t | answered | precision |");
    println!("|---|---:|---:|---:|");
    for (name, conf, n) in thresholds {
        for t in [0.0f32, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] {
            let kept: Vec<_> = conf.iter().filter(|c| c.0 >= t).collect();
            let right = kept.iter().filter(|c| c.1).count();
            println!(
                "| {name} | {t:.1} | {:.3} | {:.3} |",
                kept.len() as f64 / n as f64,
                if kept.is_empty() { 0.0 } else { right as f64 / kept.len() as f64 }
            );
        }
    }
    Ok(())
}
