//! `ragnode faq ...`: build and query a FAQ shard from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ragnode_retrieval::ingest::{FieldMapping, Format, IngestOptions, ingest_file};
use ragnode_retrieval::{FaqShard, SearchOptions, ShardConfig};

#[derive(Args)]
pub struct FaqArgs {
    /// The shard's index directory (created when missing).
    #[arg(long, global = true, default_value = "data/index", env = "RAGNODE_FAQ_INDEX")]
    index: PathBuf,
    #[command(subcommand)]
    command: FaqCommand,
}

#[derive(Subcommand)]
enum FaqCommand {
    /// Upsert the entries of a CSV, JSONL or JSON file; exits non-zero if any row was rejected.
    Ingest(IngestArgs),
    /// Search the shard.
    Search(SearchArgs),
    /// Delete one entry by id.
    Delete { id: String },
    /// Entry count, segments and cache counters.
    Stats,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Jsonl,
    Json,
    Csv,
}

#[derive(Args)]
struct IngestArgs {
    file: PathBuf,
    /// File format (default: from the extension).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Map an entry field to the file's column/field name, e.g. `--map question=title`.
    #[arg(long = "map", value_name = "FIELD=NAME")]
    map: Vec<String>,
    /// Rows per durable commit.
    #[arg(long, default_value_t = 10_000)]
    batch_rows: usize,
    /// Replace the shard's contents with the file's (a full rebuild). The old entries go
    /// with the first commit, so an interrupted rebuild leaves the rows committed so far.
    #[arg(long)]
    rebuild: bool,
}

#[derive(Args)]
struct SearchArgs {
    query: String,
    #[arg(short, default_value_t = 5)]
    k: usize,
    #[arg(long)]
    category: Option<String>,
    #[arg(long)]
    lang: Option<String>,
    /// Print the hits as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: FaqArgs) -> Result<()> {
    let shard = FaqShard::open(&args.index, &ShardConfig::default())
        .with_context(|| format!("opening FAQ index {}", args.index.display()))?;
    match args.command {
        FaqCommand::Ingest(a) => ingest(&shard, a),
        FaqCommand::Search(a) => search(&shard, a),
        FaqCommand::Delete { id } => {
            if shard.delete(&id)? {
                println!("deleted {id}");
                Ok(())
            } else {
                bail!("no entry with id {id:?} in {}", args.index.display())
            }
        }
        FaqCommand::Stats => {
            println!("{}", serde_json::to_string_pretty(&shard.stats())?);
            Ok(())
        }
    }
}

fn ingest(shard: &FaqShard, a: IngestArgs) -> Result<()> {
    let format = match a.format {
        Some(FormatArg::Jsonl) => Format::Jsonl,
        Some(FormatArg::Json) => Format::Json,
        Some(FormatArg::Csv) => Format::Csv,
        None => Format::from_path(&a.file)
            .with_context(|| format!("{}: unknown extension; pass --format jsonl|json|csv", a.file.display()))?,
    };
    let mapping = FieldMapping::default().with_overrides(&a.map).map_err(anyhow::Error::msg)?;
    let len = std::fs::metadata(&a.file).with_context(|| format!("reading {}", a.file.display()))?.len();
    if a.rebuild {
        shard.stage_clear()?;
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("ingesting");
    let report = ingest_file(
        shard,
        &a.file,
        IngestOptions {
            format,
            mapping,
            batch_rows: a.batch_rows,
            // The line a crash-safety check can rely on: these rows are durable.
            on_commit: &mut |n| {
                bar.suspend(|| {
                    println!("committed {n} rows");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                })
            },
            on_progress: &mut |bytes| bar.set_position(bytes),
        },
    );
    bar.finish_and_clear();
    let report = report?;
    let file = a.file.display();
    for r in &report.rejected {
        eprintln!("{file}:{}: rejected: {}", r.pos, r.reason);
    }
    println!("{file}: {} rows committed, {} rejected", report.committed, report.rejected.len());
    if !report.rejected.is_empty() {
        bail!("{} rows of {file} were rejected", report.rejected.len());
    }
    Ok(())
}

fn search(shard: &FaqShard, a: SearchArgs) -> Result<()> {
    let hits = shard.search(&a.query, &SearchOptions { k: a.k, category: a.category, lang: a.lang })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&*hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no match");
    }
    for (i, h) in hits.iter().enumerate() {
        println!("{}. [{}] score {:.2} confidence {:.2} ({:?})", i + 1, h.id, h.score, h.confidence, h.matched_field);
        println!("   Q: {}", h.question);
        println!("   A: {}", h.answer.chars().take(200).collect::<String>());
    }
    Ok(())
}
