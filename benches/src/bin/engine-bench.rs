//! Engine throughput on a real model: prefill tok/s, single-stream decode tok/s and
//! aggregate decode tok/s with concurrent streams. Prints a markdown table.
//!
//! cargo run --release -p ragnode-benches --bin engine-bench -- [--model PATH] [--threads 2]
//! cargo run --release -p ragnode-benches --bin engine-bench -- --dummy-weights CONFIG.json
//!   (random weights for any supported architecture at any size; each stream then gets its
//!   own random prompt, so MoE streams route to different experts as real traffic does)

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ragnode_inference::{
    Engine, EngineConfig, EngineHandle, GenerationRequest, SamplingParams, StreamEvent, TokenStream,
};
use ragnode_models::tokenizer::ChatMessage;
use ragnode_models::{DummyWeights, LoadOptions, load_model};

#[derive(Parser)]
struct Args {
    /// Model to load (default: the SmolLM2 Q4_1 GGUF from scripts/fetch-test-data.sh).
    #[arg(long)]
    model: Option<String>,
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per stream in decode measurements.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Concurrent stream counts for the aggregate measurement.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    streams: Vec<usize>,
    /// KV-cache element type: f32, f16 or bf16 (default: the engine's, f32 on CPU).
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Build the architecture a config.json describes with random weights instead of
    /// loading a model.
    #[arg(long, value_name = "CONFIG.json", conflicts_with = "model")]
    dummy_weights: Option<String>,
    /// Storage format of the random weights (f32, bf16, q4_0, q8_0, q4_k, ...).
    #[arg(long, default_value = "q4_0")]
    dummy_format: String,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: ragnode_models::DeviceSpec,
}

struct RunResult {
    prompt_tokens: usize,
    generated: usize,
    ttft: Duration,
    total: Duration,
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new(prompt, max_tokens);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    req
}

async fn finish(stream: &mut TokenStream) -> Result<RunResult> {
    while let Some(ev) = stream.next().await {
        if let StreamEvent::Finished { usage, timings, error, .. } = ev {
            if let Some(e) = error {
                anyhow::bail!(e);
            }
            return Ok(RunResult {
                prompt_tokens: usage.prompt_tokens,
                generated: usage.completion_tokens,
                ttft: timings.time_to_first_token.unwrap_or(timings.total),
                total: timings.total,
            });
        }
    }
    anyhow::bail!("stream ended without a Finished event")
}

/// `n` concurrent greedy streams: (sum of the streams' decode rates, tokens per wall-clock
/// second including prefill and ramp-up).
fn run_streams(engine: &EngineHandle, prompts: &[Vec<u32>], n: usize, max_tokens: usize) -> Result<(f64, f64)> {
    let start = Instant::now();
    // One consumer thread for all streams (as a server's event loop would be), so the
    // bench does not add n threads competing with the engine for the cores.
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut stream = engine.submit(greedy(prompts[i % prompts.len()].clone(), max_tokens))?;
            set.spawn(async move { finish(&mut stream).await });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r??);
        }
        anyhow::Ok(out)
    })?;
    let (mut tokens, mut rate) = (0, 0.0);
    for r in results {
        tokens += r.generated;
        // Each stream's decode rate (after its first token); the streams decode
        // concurrently, so their rates add up.
        rate += (r.generated - 1) as f64 / (r.total - r.ttft).as_secs_f64();
    }
    Ok((rate, tokens as f64 / start.elapsed().as_secs_f64()))
}

fn run_one(engine: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> Result<RunResult> {
    let mut stream = engine.submit(greedy(prompt, max_tokens))?;
    tokio::runtime::Builder::new_current_thread().build()?.block_on(finish(&mut stream))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Device memory bandwidth in bytes per second: device-to-device copies of a 1 GiB
/// buffer, counting the bytes read and written (HBM serves both from one budget, so a
/// read-only weight stream can reach about this rate).
fn copy_bandwidth(device: &candle_core::Device) -> Result<f64> {
    let src = candle_core::Tensor::ones(256usize << 20, candle_core::DType::F32, device)?;
    let _ = src.copy()?;
    device.synchronize()?;
    let (reps, t) = (10, Instant::now());
    for _ in 0..reps {
        let _ = src.copy()?;
    }
    device.synchronize()?;
    Ok((2usize * (1 << 30) * reps) as f64 / t.elapsed().as_secs_f64())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: single-threaded at this point; candle reads it when its pool starts.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string()) };
    let model = args.model.clone().or(args.dummy_weights.clone()).unwrap_or_else(|| {
        let cache = std::env::var("RAGNODE_CACHE")
            .unwrap_or_else(|_| format!("{}/.cache/ragnode", std::env::var("HOME").unwrap_or_default()));
        format!("{cache}/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let device = args.device.open()?;
    let free_before = ragnode_kernels::device_memory(&device)?.map(|(free, _)| free);
    let mut opts = LoadOptions { device: device.clone(), ..LoadOptions::default() };
    if args.dummy_weights.is_some() {
        let format = args.dummy_format.parse().map_err(|e: String| anyhow::anyhow!("--dummy-format: {e}"))?;
        opts.dummy = Some(DummyWeights { format, seed: 0 });
    }
    let load_started = Instant::now();
    let loaded = load_model(&model, &opts).with_context(|| format!("loading {model}"))?;
    let load_secs = load_started.elapsed().as_secs_f64();
    // On a GPU: the bytes the weights took, and the device's copy bandwidth, for the
    // bandwidth bound of single-stream decode (every weight read once per token).
    let gpu = match (free_before, ragnode_kernels::device_memory(&device)?) {
        (Some(before), Some((after, _))) => Some((before.saturating_sub(after), copy_bandwidth(&device)?)),
        _ => None,
    };
    let tok = loaded.tokenizer.clone();
    let kv_dtype = match args.kv_dtype.as_deref() {
        None => None,
        Some("f32") => Some(candle_core::DType::F32),
        Some("f16") => Some(candle_core::DType::F16),
        Some("bf16") => Some(candle_core::DType::BF16),
        Some(other) => anyhow::bail!("unknown --kv-dtype {other} (f32, f16, bf16)"),
    };
    let engine = Engine::start(
        loaded.model.clone(),
        tok.clone(),
        EngineConfig {
            max_batch_tokens: args.prompt_len.max(512),
            max_num_seqs: args.streams.iter().copied().max().unwrap_or(1).max(64),
            kv_dtype,
            device_memory_utilization: device.is_cuda().then_some(0.9),
            ..EngineConfig::default()
        },
    )?;

    // A long prompt from real text.
    let para = "Customers may return most items within 30 days of delivery for a full refund. \
                Items must be unused and in their original packaging. Refunds go back to the original \
                payment method within five business days after we receive the return. ";
    let mut long_ids = Vec::new();
    while long_ids.len() < args.prompt_len {
        long_ids.extend(tok.encode(para, false)?);
    }
    long_ids.truncate(args.prompt_len);
    let short_ids = tok.encode_chat(
        &[ChatMessage { role: "user".into(), content: "Tell me about the history of the city of Paris.".into() }],
        true,
    )?;
    // Per-stream prompts: the real model's chat prompt for all; random weights get random
    // 32-token prompts, one per stream (the placeholder vocabulary would make every prompt
    // the same unknown token, and identical MoE streams would share their experts).
    let prompts: Vec<Vec<u32>> = if args.dummy_weights.is_some() {
        let vocab = loaded.model.vocab_size() as u64;
        (0..64u64)
            .map(|s| (0..32u64).map(|j| ((s * 7919 + j * 104_729 + 13) * 2_654_435_761 % vocab) as u32).collect())
            .collect()
    } else {
        vec![short_ids.clone()]
    };
    let short_ids = prompts[0].clone();

    // Warm-up (page in weights, start the thread pool).
    run_one(&engine, short_ids.clone(), 8)?;

    let (mut prefill, mut ttft) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let r = run_one(&engine, long_ids.clone(), 1)?;
        prefill.push(r.prompt_tokens as f64 / r.ttft.as_secs_f64());
        ttft.push(r.ttft.as_secs_f64() * 1e3);
    }
    // The repetitions interleave the measurements (1 stream, then each stream count), so a
    // slow spell on a shared machine hits every row alike rather than skewing the ratios.
    let mut single = Vec::new();
    let mut multi: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); args.streams.len()];
    for _ in 0..args.reps {
        let r = run_one(&engine, short_ids.clone(), args.decode_tokens)?;
        single.push((r.generated - 1) as f64 / (r.total - r.ttft).as_secs_f64());
        for (&n, (decode, wall)) in args.streams.iter().zip(&mut multi) {
            let (d, w) = run_streams(&engine, &prompts, n, args.decode_tokens)?;
            decode.push(d);
            wall.push(w);
        }
    }
    let single_tps = median(single);
    let mut rows = vec![
        (
            format!("prefill ({}-token prompt)", args.prompt_len),
            median(prefill),
            format!("TTFT {:.1} ms", median(ttft)),
        ),
        ("decode, 1 stream".to_string(), single_tps, String::new()),
    ];
    if let Some((weight_bytes, bw)) = gpu {
        let bound = bw / weight_bytes as f64;
        rows[1].2 = format!(
            "{:.0}% of the bandwidth bound ({:.0} tok/s = {:.0} GB/s copy bandwidth / {:.2} GB of weights)",
            100.0 * single_tps / bound,
            bound,
            bw / 1e9,
            weight_bytes as f64 / 1e9
        );
    }
    for (&n, (decode, wall)) in args.streams.iter().zip(multi) {
        let d = median(decode);
        rows.push((
            format!("decode, {n} streams (aggregate)"),
            d,
            format!("{:.2}x single; {:.1} tok/s counting prefill and ramp-up", d / single_tps, median(wall)),
        ));
    }
    engine.shutdown();

    match &opts.dummy {
        Some(d) => println!("model: {model} with random {:?} weights (built in {load_secs:.1} s)", d.format),
        None => println!("model: {model}"),
    }
    match ragnode_kernels::device_memory(&device)? {
        Some((_, total)) => println!("device: {} ({} MiB), host {}", args.device, total >> 20, cpu_name()),
        None => println!("machine: {} ({} threads), {}", cpu_name(), args.threads, std::env::consts::ARCH),
    }
    println!();
    println!("| measurement | tokens/s | note |");
    println!("|---|---:|---|");
    for (name, v, note) in rows {
        println!("| {name} | {v:.1} | {note} |");
    }
    Ok(())
}
