//! Quantized matmul kernels vs candle's `QMatMul` on the SmolLM2-135M shapes.
//!
//! ```text
//! cargo run --release -p ragnode-benches --bin kernel-bench [-- --quick] [--m 1,16]
//!     [--shapes qkv,lm_head] [--model PATH] [--tune R,T,T1] [--variants 'R,T,T1,PARTS;...'] [--no-candle] [--hot]
//! ```
//!
//! Weights come from the GGUF file when present (random otherwise). Each shape is timed
//! over enough distinct copies of the matrix (≥ 128 MB) that every call streams its
//! weights from DRAM, as in a real forward pass; ours and candle's runs are interleaved
//! round by round and the median round is reported. The whole-model estimate sums one
//! layer's matmuls × 30 + the lm head.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{Device, Module, Tensor};
use ragnode_kernels::quant::{Kernel, MatmulOptions, QuantMatrix};
use std::borrow::Cow;
use std::time::{Duration, Instant};

const LAYERS: usize = 30;
const FOOTPRINT: usize = 128 << 20;

struct Shape {
    name: &'static str,
    /// GGUF tensors stacked along n (layer 0's).
    tensors: &'static [&'static str],
    n: usize,
    k: usize,
    dtype: GgmlDType,
    /// Times per token in the model (per layer × 30, or 1).
    per_token: usize,
    /// Whether candle runs it as one matmul (otherwise as the separate parts).
    fused: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "q/o 576→576",
        tensors: &["attn_q"],
        n: 576,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: 0,
        fused: false,
    },
    Shape {
        name: "k/v 576→192",
        tensors: &["attn_k"],
        n: 192,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: 0,
        fused: false,
    },
    Shape {
        name: "gate/up 576→1536",
        tensors: &["ffn_gate"],
        n: 1536,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: 0,
        fused: false,
    },
    Shape {
        name: "down 1536→576",
        tensors: &["ffn_down"],
        n: 576,
        k: 1536,
        dtype: GgmlDType::Q4_1,
        per_token: LAYERS,
        fused: false,
    },
    Shape {
        name: "o 576→576",
        tensors: &["attn_output"],
        n: 576,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: LAYERS,
        fused: false,
    },
    Shape {
        name: "qkv 576→960 (fused)",
        tensors: &["attn_q", "attn_k", "attn_v"],
        n: 960,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: LAYERS,
        fused: true,
    },
    Shape {
        name: "gate_up 576→3072 (fused)",
        tensors: &["ffn_gate", "ffn_up"],
        n: 3072,
        k: 576,
        dtype: GgmlDType::Q4_1,
        per_token: LAYERS,
        fused: true,
    },
    Shape {
        name: "lm_head 576→49152 Q8_0",
        tensors: &["token_embd"],
        n: 49152,
        k: 576,
        dtype: GgmlDType::Q8_0,
        per_token: 1,
        fused: false,
    },
    // Other formats (random weights; not part of SmolLM2).
    random("Q4_0 1536→1536 (random)", GgmlDType::Q4_0),
    random("Q5_0 1536→1536 (random)", GgmlDType::Q5_0),
    random("Q4_K 1536→1536 (random)", GgmlDType::Q4K),
    random("Q5_K 1536→1536 (random)", GgmlDType::Q5K),
    random("Q6_K 1536→1536 (random)", GgmlDType::Q6K),
];

/// A 1536 × 1536 matrix of random weights.
const fn random(name: &'static str, dtype: GgmlDType) -> Shape {
    Shape { name, tensors: &[], n: 1536, k: 1536, dtype, per_token: 0, fused: false }
}

/// Quantized matmul kernels vs candle's QMatMul on the SmolLM2-135M shapes.
#[derive(clap::Parser)]
struct Cli {
    /// Fewer, shorter rounds.
    #[arg(long)]
    quick: bool,
    /// Batch sizes (rows) to time.
    #[arg(long = "m", value_delimiter = ',', default_values_t = [1usize, 4, 16, 64, 512])]
    ms: Vec<usize>,
    /// Only these shapes (by name prefix).
    #[arg(long, value_delimiter = ',')]
    shapes: Option<Vec<String>>,
    /// GGUF file to take real weights from (random weights when missing).
    #[arg(long)]
    model: Option<String>,
    /// Rounds per measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Register blocking ROWS,TILES,TILES_M1 (never changes results).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    tune: Option<Vec<usize>>,
    /// Blockings to compare in the model-sequence run: 'R,T,T1,PARTS;R,T,T1,PARTS;...'.
    #[arg(long)]
    variants: Option<String>,
    /// Skip candle's QMatMul.
    #[arg(long)]
    no_candle: bool,
    /// One copy of each matrix (cache-resident): shows the fixed per-call costs.
    #[arg(long)]
    hot: bool,
    /// Only the model-sequence run.
    #[arg(long)]
    seq_only: bool,
}

struct Args {
    ms: Vec<usize>,
    rounds: usize,
    round_time: Duration,
    shapes: Option<Vec<String>>,
    model: String,
    tune: Option<(usize, usize, usize)>,
    candle: bool,
    hot: bool,
    variants: Vec<(usize, usize, usize, usize)>,
    seq_only: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let cli = <Cli as clap::Parser>::parse();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut variants = Vec::new();
    for v in cli.variants.as_deref().unwrap_or("").split(';').filter(|v| !v.is_empty()) {
        let v: Vec<usize> = v.split(',').map(|s| s.parse()).collect::<Result<_, _>>()?;
        anyhow::ensure!(v.len() == 4, "--variants R,T,T1,P;R,T,T1,P;...");
        variants.push((v[0], v[1], v[2], v[3]));
    }
    Ok(Args {
        ms: cli.ms,
        rounds: if cli.quick { 3 } else { cli.rounds },
        round_time: Duration::from_millis(if cli.quick { 60 } else { 150 }),
        shapes: cli.shapes,
        model: cli.model.unwrap_or_else(|| format!("{home}/.cache/ragnode/models/SmolLM2-135M-Instruct.Q4_1.gguf")),
        tune: cli.tune.map(|v| (v[0], v[1], v[2])),
        candle: !cli.no_candle,
        hot: cli.hot,
        variants,
        seq_only: cli.seq_only,
    })
}

/// GGML bytes of a shape: the real layer-0 tensors stacked, or random blocks.
fn shape_bytes(shape: &Shape, model: Option<&(gguf_file::Content, std::fs::File)>) -> anyhow::Result<Vec<u8>> {
    if let Some((content, file)) = model.filter(|_| !shape.tensors.is_empty()) {
        let mut file = file.try_clone()?;
        let mut out = Vec::new();
        for t in shape.tensors {
            let name = if *t == "token_embd" { "token_embd.weight".to_string() } else { format!("blk.0.{t}.weight") };
            let q = content.tensor(&mut file, &name, &Device::Cpu)?;
            anyhow::ensure!(q.dtype() == shape.dtype, "{name} is {:?}", q.dtype());
            out.extend_from_slice(&q.data()?);
        }
        let expect = shape.n * shape.k / shape.dtype.block_size() * shape.dtype.type_size();
        anyhow::ensure!(out.len() == expect, "{}: {} bytes, expected {expect}", shape.name, out.len());
        return Ok(out);
    }
    let w: Vec<f32> = (0..shape.n * shape.k).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
    let t = Tensor::from_vec(w, (shape.n, shape.k), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, shape.dtype)?.data()?.into_owned())
}

fn copies_for(bytes: usize) -> usize {
    FOOTPRINT.div_ceil(bytes).max(2)
}

/// Runs `f(i)` for i = 0, 1, … for at least `min` time (and at least once); seconds per call.
fn time_round(min: Duration, mut f: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let mut i = 0;
    while i == 0 || start.elapsed() < min {
        f(i);
        i += 1;
    }
    start.elapsed().as_secs_f64() / i as f64
}

/// (busy ticks of the whole machine, ticks of this process), from /proc.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy = cpu.iter().sum::<u64>() - cpu.get(3)? - cpu.get(4)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    Some((busy, fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?))
}

/// Times a round, retrying (up to 8 times) while other processes took more than ~15% of a
/// core during it: this 2-core machine is shared. Returns (seconds per call, clean).
fn clean_round(min: Duration, mut f: impl FnMut(usize)) -> (f64, bool) {
    let mut last = 0.0;
    for _ in 0..8 {
        let before = cpu_ticks();
        let t0 = Instant::now();
        last = time_round(min, &mut f);
        let wall_ticks = t0.elapsed().as_secs_f64() * 100.0;
        match (before, cpu_ticks()) {
            (Some((b0, o0)), Some((b1, o1))) => {
                let others = (b1 - b0).saturating_sub(o1 - o0) as f64;
                if others <= 0.15 * wall_ticks + 1.0 {
                    return (last, true);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            _ => return (last, true),
        }
    }
    (last, false)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Read bandwidth of 2 × 128 MB (both pool threads), GB/s.
fn memory_bandwidth() -> f64 {
    let buf = vec![1u64; FOOTPRINT / 8 * 2];
    let pool = candle_core::utils::barrier_pool();
    let parts = pool.n_workers() + 1;
    let chunk = buf.len().div_ceil(parts);
    let mut best = 0f64;
    for _ in 0..5 {
        let sink = std::sync::atomic::AtomicU64::new(0);
        let t = Instant::now();
        pool.execute(|tid| {
            let s: u64 = buf[(tid * chunk).min(buf.len())..((tid + 1) * chunk).min(buf.len())]
                .iter()
                .fold(0u64, |a, &b| a.wrapping_add(b));
            sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max((buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
        assert!(sink.into_inner() > 0);
    }
    best
}

struct Row {
    shape: usize,
    m: usize,
    ours: f64,
    candle: Option<f64>,
    /// No other process was busy during the rounds.
    clean: bool,
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some((r, t, t1)) = args.tune {
        ragnode_kernels::quant::set_tuning(r, t, t1);
    }
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let kernel = Kernel::best();
    println!(
        "kernel-bench: kernel {kernel:?}, {threads} threads (candle barrier pool), weights ≥ {} MB per shape",
        FOOTPRINT >> 20
    );
    println!("memory read bandwidth (2 threads): {:.1} GB/s", memory_bandwidth());

    let model = match std::fs::File::open(&args.model) {
        Ok(mut f) => {
            let content = gguf_file::Content::read(&mut f)?;
            println!("weights: {}", args.model);
            Some((content, f))
        }
        Err(_) => {
            println!("weights: random ({} not found)", args.model);
            None
        }
    };

    if let Some(model) = &model {
        model_sequence(&args, model)?;
    }
    if args.seq_only {
        return Ok(());
    }

    let mut rows = Vec::new();
    for (si, shape) in SHAPES.iter().enumerate() {
        if let Some(sel) = &args.shapes
            && !sel.iter().any(|s| shape.name.contains(s.as_str()))
        {
            continue;
        }
        let bytes = shape_bytes(shape, model.as_ref())?;
        let w = QuantMatrix::from_ggml(shape.dtype, &bytes, shape.n, shape.k)?
            .ok_or_else(|| anyhow::anyhow!("no kernel for {:?}", shape.dtype))?;
        let copies = if args.hot { 1 } else { copies_for(bytes.len()) };
        let ours: Vec<QuantMatrix> = (0..copies).map(|_| w.clone()).collect();
        // candle runs fused shapes as their separate parts (as quantized_llama does).
        let parts: Vec<usize> = if shape.fused && shape.tensors.len() == 3 {
            vec![576, 192, 192]
        } else if shape.fused {
            vec![shape.n / 2, shape.n / 2]
        } else {
            vec![shape.n]
        };
        let candle: Vec<Vec<QMatMul>> = if args.candle {
            (0..copies)
                .map(|_| {
                    let mut off = 0;
                    parts
                        .iter()
                        .map(|&pn| {
                            let len = pn * shape.k / shape.dtype.block_size() * shape.dtype.type_size();
                            let s =
                                QStorage::from_data(Cow::Borrowed(&bytes[off..off + len]), &Device::Cpu, shape.dtype)?;
                            off += len;
                            QMatMul::from_qtensor(QTensor::new(s, (pn, shape.k))?)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()
                })
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        for &m in &args.ms {
            let x: Vec<f32> = (0..m * shape.k).map(|i| ((i * 2654435761usize) % 2000) as f32 / 1000.0 - 1.0).collect();
            let xt = Tensor::from_vec(x.clone(), (m, shape.k), &Device::Cpu)?;
            let mut y = vec![0f32; m * shape.n];
            let opts = MatmulOptions { kernel, parallel: true };
            // Warm-up (page-in) of every copy.
            for w in &ours {
                w.matmul_with(&x, m, &mut y, opts)?;
            }
            for c in candle.iter().take(if m >= 64 { 2 } else { copies }) {
                for p in c {
                    p.forward(&xt)?;
                }
            }
            let (mut t_ours, mut t_candle, mut clean) = (Vec::new(), Vec::new(), true);
            for _ in 0..args.rounds {
                let (t, c) = clean_round(args.round_time, |i| {
                    ours[i % copies].matmul_with(&x, m, &mut y, opts).expect("matmul");
                });
                t_ours.push(t);
                clean &= c;
                if args.candle {
                    let (t, c) = clean_round(args.round_time, |i| {
                        for p in &candle[i % copies] {
                            p.forward(&xt).expect("candle forward");
                        }
                    });
                    t_candle.push(t);
                    clean &= c;
                }
            }
            let row = Row { shape: si, m, ours: median(t_ours), candle: args.candle.then(|| median(t_candle)), clean };
            print_row(&row, bytes.len());
            rows.push(row);
        }
    }

    println!();
    println!("whole-model estimate (one layer's fused qkv + o + gate_up + down × {LAYERS} + lm head):");
    for &m in &args.ms {
        let sum = |f: &dyn Fn(&Row) -> Option<f64>| -> Option<f64> {
            let mut total = 0.0;
            for (shape_i, shape) in SHAPES.iter().enumerate() {
                let per = shape.per_token;
                if per == 0 {
                    continue;
                }
                let r = rows.iter().find(|r| r.shape == shape_i && r.m == m)?;
                total += per as f64 * f(r)?;
            }
            Some(total)
        };
        if let Some(t) = sum(&|r| Some(r.ours)) {
            let c = sum(&|r| r.candle);
            println!(
                "  m={m:>3}: ours {:>8.2} ms/step = {:>7.1} tok/s{}",
                t * 1e3,
                m as f64 / t,
                c.map(|c| format!("   candle {:>8.2} ms/step = {:>7.1} tok/s ({:.2}×)", c * 1e3, m as f64 / c, c / t))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The real per-step matmul sequence: for each of the 30 layers fused qkv, o, fused
/// gate_up and down on that layer's own weights, then the lm head; ms per step for each m
/// (and each `--variants` blocking, alternated round by round).
fn model_sequence(args: &Args, (content, file): &(gguf_file::Content, std::fs::File)) -> anyhow::Result<()> {
    let mut file = file.try_clone()?;
    let mut load = |name: &str| -> anyhow::Result<QuantMatrix> {
        let q = content.tensor(&mut file, name, &Device::Cpu)?;
        let (n, k) = q.shape().dims2()?;
        QuantMatrix::from_ggml(q.dtype(), &q.data()?, n, k)?.ok_or_else(|| anyhow::anyhow!("no kernel for {name}"))
    };
    let mut layers = Vec::new();
    for l in 0..LAYERS {
        let p = |t: &str| format!("blk.{l}.{t}.weight");
        let (q, k, v) = (load(&p("attn_q"))?, load(&p("attn_k"))?, load(&p("attn_v"))?);
        let (g, u) = (load(&p("ffn_gate"))?, load(&p("ffn_up"))?);
        layers.push([
            QuantMatrix::concat_rows(&[&q, &k, &v])?,
            load(&p("attn_output"))?,
            QuantMatrix::concat_rows(&[&g, &u])?,
            load(&p("ffn_down"))?,
        ]);
    }
    let head = load("token_embd.weight")?;
    let bytes: usize = layers.iter().flatten().map(|w| w.size_in_bytes()).sum::<usize>() + head.size_in_bytes();
    println!();
    println!(
        "model sequence: {LAYERS} layers × (qkv, o, gate_up, down) + lm head = {:.1} MB of weights per step",
        bytes as f64 / 1e6
    );
    let variants =
        if args.variants.is_empty() { vec![None] } else { args.variants.iter().copied().map(Some).collect() };
    for &m in &args.ms {
        let x: Vec<f32> = (0..m * 1536).map(|i| ((i * 2654435761usize) % 2000) as f32 / 1000.0 - 1.0).collect();
        let mut y = vec![0f32; m * 49152];
        let mut step = || {
            for [qkv, o, gu, down] in &layers {
                for w in [qkv, o, gu, down] {
                    let (n, k) = (w.rows(), w.cols());
                    w.matmul(&x[..m * k], m, &mut y[..m * n]).expect("matmul");
                }
            }
            head.matmul(&x[..m * 576], m, &mut y[..m * 49152]).expect("matmul");
        };
        let steps = (200 / m).clamp(2, 50);
        let mut times = vec![Vec::new(); variants.len()];
        let mut clean = true;
        step();
        for _ in 0..args.rounds.max(3) * 2 {
            for (vi, v) in variants.iter().enumerate() {
                if let Some((r, t, t1, parts)) = *v {
                    ragnode_kernels::quant::set_tuning(r, t, t1);
                    ragnode_kernels::quant::set_parts_per_thread(parts);
                }

                let (t, c) = clean_round(Duration::ZERO, |_| {
                    for _ in 0..steps {
                        step();
                    }
                });
                times[vi].push(t / steps as f64);
                clean &= c;
            }
        }
        for (v, t) in variants.iter().zip(times) {
            let t = median(t);
            println!(
                "  m={m:>3}{}: {:>8.3} ms/step = {:>8.1} tok/s, {:>5.1} GB/s{}",
                v.map(|(r, t, t1, parts)| format!(" [{r},{t},{t1},{parts}]")).unwrap_or_default(),
                t * 1e3,
                m as f64 / t,
                bytes as f64 / t / 1e9,
                if clean { "" } else { "  (noisy: machine busy)" }
            );
        }
    }
    if let Some((r, t, t1)) = args.tune {
        ragnode_kernels::quant::set_tuning(r, t, t1);
    }
    ragnode_kernels::quant::set_parts_per_thread(1);
    println!();
    Ok(())
}

fn print_row(r: &Row, weight_bytes: usize) {
    let s = &SHAPES[r.shape];
    let flops = 2.0 * (r.m * s.n * s.k) as f64;
    let gbs = weight_bytes as f64 / r.ours / 1e9;
    let candle = r
        .candle
        .map(|c| {
            format!(
                " | candle {:>9.1} µs {:>6.1} GB/s {:>7.1} GFLOP/s | {:>5.2}×",
                c * 1e6,
                weight_bytes as f64 / c / 1e9,
                flops / c / 1e9,
                c / r.ours
            )
        })
        .unwrap_or_default();
    println!(
        "{:<26} m={:>3} | ours {:>9.1} µs {:>6.1} GB/s {:>7.1} GFLOP/s{candle}{}",
        s.name,
        r.m,
        r.ours * 1e6,
        gbs,
        flops / r.ours / 1e9,
        if r.clean { "" } else { "  (noisy: machine busy)" }
    );
}
