//! FAQ shard at scale: ingest time for N entries, single-thread query latency with the
//! cache disabled, queries/s on all threads, and the hot-answer cache hit path.
//!
//! `faq-scale [--entries 100000] [--datasets ../shared/datasets]`: the entries are the
//! evaluation sets' FAQ entries plus generated bilingual entries up to N; the queries are
//! the evaluation sets' queries.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use ragnode_retrieval::ingest::{FieldMapping, Format, IngestOptions, ingest_file};
use ragnode_retrieval::{FaqShard, SearchOptions, ShardConfig};

#[derive(Parser)]
#[command(about = "FAQ shard ingest and query speed at scale")]
struct Cli {
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    #[arg(long, default_value = "../shared/datasets")]
    datasets: PathBuf,
    /// Query threads for the throughput row.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (faq, queries) = ragnode_benches::faq_corpus(&cli.datasets, cli.entries)?;
    let dir = std::env::temp_dir().join(format!("ragnode-faq-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("faq.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
        for e in &faq {
            writeln!(w, "{e}")?;
        }
    }
    let config = ShardConfig { cache_capacity: 0, ..ShardConfig::default() };
    let shard = FaqShard::open(dir.join("index"), &config)?;
    let t = Instant::now();
    let report = ingest_file(
        &shard,
        &file,
        IngestOptions {
            format: Format::Jsonl,
            mapping: FieldMapping::default(),
            batch_rows: 10_000,
            on_commit: &mut |_| {},
            on_progress: &mut |_| {},
        },
    )?;
    let ingest_s = t.elapsed().as_secs_f64();
    let opts = SearchOptions::default();
    // Warm-up, then single-thread latency.
    for q in queries.iter().take(200) {
        shard.search_uncached(q, &opts)?;
    }
    let mut lat: Vec<f64> = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        shard.search_uncached(q, &opts)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    // Throughput: all threads pull queries from a shared counter.
    let next = AtomicUsize::new(0);
    let total = queries.len() * 2;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cli.threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let _ = shard.search_uncached(&queries[i % queries.len()], &opts);
                }
            });
        }
    });
    let qps = total as f64 / t.elapsed().as_secs_f64();
    // Cache hit path: a separate shard handle with the cache on, same index.
    drop(shard);
    let cached = FaqShard::open(dir.join("index"), &ShardConfig::default())?;
    let q = "退货政策是什么？";
    cached.search(q, &opts)?;
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(cached.search("  退货政策是什么? ", &opts)?);
    }
    let hit_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(cached);
    let _ = std::fs::remove_dir_all(&dir);

    println!("| measurement | value | target |");
    println!("|---|---:|---|");
    println!("| ingest {} entries ({} rejected) | {ingest_s:.1} s | < 60 s |", report.committed, report.rejected.len());
    println!("| query latency p50, 1 thread, cache off ({} queries) | {:.2} ms | < 2 ms |", lat.len(), pct(0.5));
    println!("| query latency p99 | {:.2} ms | < 10 ms |", pct(0.99));
    println!("| queries/s, {} threads, cache off | {qps:.0} | ≥ 2000 |", cli.threads);
    println!("| cache hit (normalised repeat) | {hit_us:.1} µs | < 50 µs |");
    Ok(())
}
