//! `ragnode`: one binary that serves a customer-service LLM with retrieval.
//!
//! Subcommands:
//! - `generate`: load a model and stream one completion to stdout (the engine end to end).
//! - `faq ingest|search|delete|stats`: build and query a FAQ knowledge-base shard.
//! - `serve`: the node: OpenAI-compatible API, RAG apps, WebSocket chat, web page,
//!   metrics ([`serve`]; configuration in [`config`]).

mod cluster;
mod config;
mod faq;
mod serve;

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ragnode_inference::{Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams, StreamEvent};
use ragnode_models::tokenizer::ChatMessage;
use ragnode_models::{DummyWeights, LoadOptions, load_model};

#[derive(Parser)]
#[command(name = "ragnode", version, about = "An inference node for customer-service AI: LLM serving with retrieval")]
struct Cli {
    /// CPU threads for compute kernels (default: physical cores; env RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// FAQ knowledge base: ingest, search, delete, stats.
    Faq(faq::FaqArgs),
    /// Serve the model and the FAQ over HTTP: OpenAI-compatible API, RAG apps
    /// (`app:<name>`, Dify-style /v1/chat-messages), WebSocket chat, web page at `/`,
    /// Prometheus metrics. Every option is also a `RAGNODE_*` env var and a key of the
    /// --config TOML file (flags > env > file > defaults).
    Serve(Box<config::ServeArgs>),
    /// Cluster tools: `ragnode cluster status` lists the live nodes.
    Cluster(ClusterArgs),
}

#[derive(Args)]
struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Lists the nodes of a cluster (listens to their statuses for 1.5 s).
    Status {
        /// NATS server URL.
        #[arg(long, env = "RAGNODE_NATS")]
        nats: String,
        /// Cluster name.
        #[arg(long = "cluster", env = "RAGNODE_CLUSTER", default_value = "default")]
        cluster: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// A .gguf file, an HF checkpoint directory, or a Hugging Face repo id
    /// (`owner/name`, `owner/name:file.gguf`, `owner/name@revision`).
    #[arg(long, required_unless_present = "dummy_weights", conflicts_with = "dummy_weights")]
    model: Option<String>,
    /// Build the architecture a config.json describes (Llama, Qwen2, DeepSeek-V2/V3) with
    /// random weights instead of loading a checkpoint: for speed at any size without a
    /// download. Uses the config's directory's tokenizer.json if there is one, else a
    /// placeholder vocabulary (the text means nothing).
    #[arg(long, value_name = "CONFIG.json")]
    dummy_weights: Option<String>,
    /// Storage format of the random weights: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0,
    /// q4_k, q5_k, q6_k.
    #[arg(long, default_value = "q8_0", requires = "dummy_weights")]
    dummy_format: String,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: ragnode_models::DeviceSpec,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-turn tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print the prompt's token ids (`prompt ids: [..]`, one line on stderr) before
    /// generating, like llama.cpp's --verbose-prompt: shows exactly what the model sees
    /// (BOS, the chat template's control tokens).
    #[arg(long)]
    verbose_prompt: bool,
}

fn main() {
    let cli = Cli::parse();
    // The serve config may name the thread count, which must be set before any thread starts.
    let serve_cfg = match &cli.command {
        Command::Serve(args) => match config::ServeConfig::load(args, cli.threads) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    if let Some(n) = serve_cfg.as_ref().and_then(|c| c.threads).or(cli.threads) {
        // SAFETY: set before any thread is spawned; candle and rayon read it at first use.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if serve_cfg.is_some() { "info,tantivy=warn".into() } else { "warn".into() }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Faq(args) => faq::run(args),
        Command::Serve(_) => serve::run(serve_cfg.expect("loaded above")),
        Command::Cluster(args) => cluster_command(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let base = LoadOptions { device: args.device.open()?, ..LoadOptions::default() };
    let (spec, opts) = match (&args.model, &args.dummy_weights) {
        (_, Some(config)) => {
            let format = args.dummy_format.parse().map_err(|e: String| anyhow::anyhow!("--dummy-format: {e}"))?;
            (config.clone(), LoadOptions { dummy: Some(DummyWeights { format, seed: 0 }), ..base })
        }
        (Some(model), None) => (model.clone(), base),
        (None, None) => bail!("--model or --dummy-weights is required"),
    };
    let loaded = load_model(&spec, &opts).with_context(|| format!("loading model `{spec}`"))?;
    let tok = loaded.tokenizer.clone();
    let prompt_ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage { role: "system".into(), content: system.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: args.prompt.clone() });
        // As transformers' apply_chat_template(tokenize=True): the template places BOS.
        tok.encode_chat(&messages, true).context("applying the chat template")?
    } else {
        tok.encode(&args.prompt, true)?
    };
    if args.verbose_prompt {
        // On stderr so stdout stays the completion alone.
        eprintln!("prompt ids: {prompt_ids:?}");
    }
    tracing::info!(load_ms = started.elapsed().as_millis() as u64, prompt_tokens = prompt_ids.len(), "model loaded");

    let engine = Engine::start(loaded.model.clone(), tok.clone(), EngineConfig::default())?;
    let mut req = GenerationRequest::new(prompt_ids, args.max_tokens);
    req.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
        logprobs: None,
    };
    req.stop = args.stop;
    req.ignore_eos = args.ignore_eos;
    let mut stream = engine.submit(req)?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.next_blocking() {
        match ev {
            StreamEvent::Delta { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            StreamEvent::Finished { reason, usage, timings, error } => {
                if let Some(e) = error {
                    bail!("generation failed: {e}");
                }
                let ttft = timings.time_to_first_token.unwrap_or(timings.total).as_secs_f64();
                let decode_s = (timings.total.as_secs_f64() - ttft).max(1e-9);
                let prefill_tps = usage.prompt_tokens as f64 / ttft.max(1e-9);
                let decode_tps = usage.completion_tokens.saturating_sub(1) as f64 / decode_s;
                writeln!(
                    out,
                    "\n\n[prompt tokens: {}, generated tokens: {}, {:.1} tokens/s (prefill {:.1} tokens/s, first token after {:.0} ms), finish: {}]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    decode_tps,
                    prefill_tps,
                    ttft * 1e3,
                    reason.as_str()
                )?;
                if reason == FinishReason::Error {
                    bail!("generation ended with an error");
                }
            }
        }
    }
    engine.shutdown();
    Ok(())
}

fn cluster_command(args: ClusterArgs) -> Result<()> {
    let ClusterCommand::Status { nats, cluster: name, json } = args.command;
    cluster::check_token("cluster name", &name)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let members = rt.block_on(cluster::observe_once(&nats, &name, std::time::Duration::from_millis(1500)))?;
    // The shard layout as the nodes report it (all nodes of a cluster share it).
    let layout = members
        .iter()
        .find(|m| m.status.faq_shard_count > 0)
        .map(|m| (m.status.faq_shard_count, m.status.faq_replicas));
    let shards = layout.map(|(s, r)| cluster::placement::shard_table(&members, s, r)).unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "nodes": members, "faq_shards": shards }))?);
        return Ok(());
    }
    println!("cluster {name}: {} live node(s)", members.len());
    println!(
        "{:<20} {:<22} {:<6} {:>7} {:>7} {:>6} {:>8} {:>8}",
        "NODE", "HTTP", "READY", "RUNNING", "WAITING", "KV%", "TOK/S", "FAQ"
    );
    for m in members {
        let s = m.status;
        println!(
            "{:<20} {:<22} {:<6} {:>7} {:>7} {:>6.1} {:>8.1} {:>8}",
            s.id,
            s.http_addr,
            s.ready,
            s.running,
            s.waiting,
            s.kv_cache_usage * 100.0,
            s.recent_tokens_per_s,
            s.faq_documents
        );
    }
    if !shards.is_empty() {
        println!();
        println!("{:<6} {:<30} {:<40}", "SHARD", "PLACED ON", "REPLICAS (node:serving/applied/lag/docs)");
        for v in &shards {
            let replicas: Vec<String> = v
                .replicas
                .iter()
                .map(|r| {
                    format!(
                        "{}:{}/{}/{}/{}",
                        r.node,
                        if r.serving { "up" } else { "replaying" },
                        r.applied,
                        r.lag,
                        r.documents
                    )
                })
                .collect();
            println!("{:<6} {:<30} {}", v.shard, v.placed_on.join(","), replicas.join(" "));
        }
    }
    Ok(())
}
