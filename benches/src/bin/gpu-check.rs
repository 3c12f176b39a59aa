//! `gpu-check`: on a machine with a CUDA GPU, runs every ragnode CUDA kernel on fresh
//! random inputs and compares it with its CPU twin (the CPU kernel the CPU path runs, fed
//! the same inputs), then checks that a real GGUF model decodes the same greedy tokens on
//! the GPU as on the CPU, and measures the device's copy bandwidth (the ceiling for
//! decode). Prints one table; exits non-zero if any check fails.
//!
//! Built only with `--features cuda` (see scripts/gpu-check.sh, which builds it here and
//! runs it on the lent GPU machine).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use clap::Parser;
use ragnode_inference::{Engine, EngineConfig, GenerationRequest, SamplingParams, StreamEvent};
use ragnode_kernels::attention::{
    PagedAttentionParams, SeqSpan, key_cache_shape, paged_attention, value_cache_shape, write_kv,
};
use ragnode_kernels::mla::{LatentAttentionParams, latent_attention, latent_cache_shape, write_latent};
use ragnode_kernels::rowwise::{add_rms_norm, rope_inplace, rope_split_qkv};
use ragnode_kernels::sampling::{RowSampling, sample_rows};
use ragnode_models::{LoadOptions, load_model};

#[derive(Parser)]
struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// A GGUF model for the greedy CPU-vs-GPU comparison (skipped when absent).
    #[arg(long)]
    model: Option<String>,
    /// Greedy tokens compared.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
}

struct Row {
    check: String,
    value: String,
    limit: String,
    ok: bool,
}

impl Row {
    /// A comparison against the CPU twin: passes when the max abs difference is within
    /// `limit` (0: exact). NaN never passes.
    fn diff(check: String, diff: f32, limit: f32) -> Self {
        Self { check, value: format!("{diff:.2e}"), limit: format!("{limit:.0e}"), ok: diff <= limit }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?;
    let d: Vec<f32> = (a - b)?.abs()?.to_vec1()?;
    // NaN must fail: fold with a NaN-propagating max.
    Ok(d.iter().fold(0f32, |m, &x| if x.is_nan() || m.is_nan() { f32::NAN } else { m.max(x) }))
}

fn randn(shape: impl Into<Shape>, seed_dev: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, seed_dev)?)
}

/// A batch of decode rows and prefill chunks over scattered blocks.
fn spans(block_size: usize, num_blocks: usize) -> Vec<SeqSpan> {
    let shapes = [(1usize, 1usize), (1, 37), (1, 300), (17, 17), (5, 64), (1, 1000)];
    let mut next = 0usize;
    let mut q_start = 0;
    shapes
        .iter()
        .map(|&(q_len, ctx_len)| {
            let blocks = ctx_len.div_ceil(block_size);
            // A stride through the pool so tables are not contiguous.
            let table = (0..blocks).map(|b| ((next + b * 7) % num_blocks) as u32).collect::<Vec<_>>();
            next += blocks * 7 + 3;
            let s = SeqSpan { q_start, q_len, ctx_len, block_table: table };
            q_start += q_len;
            s
        })
        .collect()
}

fn check_attention(gpu: &Device, rows: &mut Vec<Row>) -> Result<()> {
    for (dtype, limit) in [(DType::F32, 1e-4f32), (DType::F16, 1e-3), (DType::BF16, 1e-3)] {
        for (nh, nkv, hd, bs) in [(9usize, 3usize, 64usize, 16usize), (12, 2, 128, 32), (8, 8, 128, 64), (4, 1, 96, 8)]
        {
            let nb = 512;
            let seqs = spans(bs, nb);
            let t: usize = seqs.iter().map(|s| s.q_len).sum();
            let p = PagedAttentionParams {
                seqs: seqs.clone().into(),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                block_size: bs,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let k = randn(key_cache_shape(nb, nkv, bs, hd), &Device::Cpu)?.to_dtype(dtype)?;
            let v = randn(value_cache_shape(nb, nkv, bs, hd), &Device::Cpu)?.to_dtype(dtype)?;
            let q = randn((t, nh, hd), &Device::Cpu)?;
            let want = paged_attention(&q, &k, &v, &p)?;
            let got = paged_attention(&q.to_device(gpu)?, &k.to_device(gpu)?, &v.to_device(gpu)?, &p)?;
            let d = max_abs_diff(&got, &want)?;
            rows.push(Row::diff(format!("paged attention {dtype:?} h{nh}/{nkv} d{hd} bs{bs} ({t} rows)"), d, limit));
        }
        // Cache scatter: the same rows into both caches must give identical caches.
        let (nb, nkv, hd, bs) = (64, 4, 64, 16);
        let slots: Vec<u32> = (0..200u32)
            .map(|i| (i * 37) % (nb * bs) as u32)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = slots.len();
        let kc = Tensor::zeros(key_cache_shape(nb, nkv, bs, hd), dtype, &Device::Cpu)?;
        let vc = Tensor::zeros(value_cache_shape(nb, nkv, bs, hd), dtype, &Device::Cpu)?;
        let (gk, gv) = (kc.to_device(gpu)?, vc.to_device(gpu)?);
        let (kr, vr) = (randn((n, nkv, hd), &Device::Cpu)?, randn((n, nkv, hd), &Device::Cpu)?);
        let st = Tensor::new(slots.as_slice(), &Device::Cpu)?;
        write_kv(&kc, &vc, &kr, &vr, &st)?;
        write_kv(&gk, &gv, &kr.to_device(gpu)?, &vr.to_device(gpu)?, &st.to_device(gpu)?)?;
        let d = max_abs_diff(&gk, &kc)?.max(max_abs_diff(&gv, &vc)?);
        rows.push(Row::diff(format!("kv cache scatter {dtype:?} ({n} rows)"), d, 0.0));
    }
    Ok(())
}

fn check_latent(gpu: &Device, rows: &mut Vec<Row>) -> Result<()> {
    for (dtype, limit) in [(DType::F32, 1e-4f32), (DType::BF16, 1e-3)] {
        for (nh, ld, vd, bs) in [(16usize, 576usize, 512usize, 16usize), (4, 48, 32, 8)] {
            let nb = 512;
            let seqs = spans(bs, nb);
            let t: usize = seqs.iter().map(|s| s.q_len).sum();
            let p = LatentAttentionParams {
                seqs: seqs.into(),
                num_heads: nh,
                latent_dim: ld,
                value_dim: vd,
                block_size: bs,
                scale: 1.0 / (192f32).sqrt(),
            };
            let cache = (randn(latent_cache_shape(nb, bs, ld), &Device::Cpu)? * 0.5)?.to_dtype(dtype)?;
            let q = (randn((t, nh, ld), &Device::Cpu)? * 0.5)?;
            let want = latent_attention(&q, &cache, &p)?;
            let got = latent_attention(&q.to_device(gpu)?, &cache.to_device(gpu)?, &p)?;
            let d = max_abs_diff(&got, &want)?;
            rows.push(Row::diff(format!("latent attention {dtype:?} h{nh} {ld}/{vd} bs{bs} ({t} rows)"), d, limit));
        }
        let (nb, bs, ld) = (32, 16, 576);
        let slots: Vec<u32> = (0..100u32)
            .map(|i| i * 5 % (nb * bs) as u32)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = slots.len();
        let cache = Tensor::zeros(latent_cache_shape(nb, bs, ld), dtype, &Device::Cpu)?;
        let gcache = cache.to_device(gpu)?;
        let r = randn((n, ld), &Device::Cpu)?;
        let st = Tensor::new(slots.as_slice(), &Device::Cpu)?;
        write_latent(&cache, &r, &st)?;
        write_latent(&gcache, &r.to_device(gpu)?, &st.to_device(gpu)?)?;
        let d = max_abs_diff(&gcache, &cache)?;
        rows.push(Row::diff(format!("latent cache scatter {dtype:?} ({n} rows)"), d, 0.0));
    }
    Ok(())
}

fn check_rowwise(gpu: &Device, rows: &mut Vec<Row>) -> Result<()> {
    for (t, d) in [(1usize, 576usize), (64, 1536), (300, 4096)] {
        let x = randn((t, d), &Device::Cpu)?;
        let r = (randn((t, d), &Device::Cpu)? * 3.0)?;
        let w = ((randn(d, &Device::Cpu)? * 0.1)? + 1.0)?;
        let (ws, wn) = add_rms_norm(&x, &r, &w, 1e-6)?;
        let (gs, gn) = add_rms_norm(&x.to_device(gpu)?, &r.to_device(gpu)?, &w.to_device(gpu)?, 1e-6)?;
        let diff = max_abs_diff(&gs, &ws)?.max(max_abs_diff(&gn, &wn)?);
        rows.push(Row::diff(format!("add + rms norm f32 [{t}, {d}]"), diff, 1e-5));
    }
    for (t, nh, nkv, hd) in [(1usize, 9usize, 3usize, 64usize), (200, 12, 2, 128)] {
        let qkv = randn((t, (nh + 2 * nkv) * hd), &Device::Cpu)?;
        let pos: Vec<f32> = (0..t * hd / 2).map(|i| ((i / (hd / 2)) as f32) * 0.01 * (i % (hd / 2)) as f32).collect();
        let ang = Tensor::from_vec(pos, (t, hd / 2), &Device::Cpu)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let (q, k, v) = rope_split_qkv(&qkv, &cos, &sin, nh, nkv, hd)?;
        let (gq, gk, gv) =
            rope_split_qkv(&qkv.to_device(gpu)?, &cos.to_device(gpu)?, &sin.to_device(gpu)?, nh, nkv, hd)?;
        let diff = max_abs_diff(&gq, &q)?.max(max_abs_diff(&gk, &k)?).max(max_abs_diff(&gv, &v)?);
        rows.push(Row::diff(format!("qkv split + rope f32 t{t} h{nh}/{nkv} d{hd}"), diff, 1e-6));
        let x = randn((t, nh, hd), &Device::Cpu)?;
        let y = x.copy()?;
        rope_inplace(&y, &cos, &sin)?;
        let gy = x.to_device(gpu)?;
        rope_inplace(&gy, &cos.to_device(gpu)?, &sin.to_device(gpu)?)?;
        let diff = max_abs_diff(&gy, &y)?;
        rows.push(Row::diff(format!("rope in place f32 t{t} h{nh} d{hd}"), diff, 1e-6));
    }
    Ok(())
}

fn check_sampling(gpu: &Device, rows: &mut Vec<Row>) -> Result<()> {
    for vocab in [49_152usize, 151_936] {
        let r = 64;
        let logits = (randn((r, vocab), &Device::Cpu)? * 3.0)?;
        let mut settings = Vec::new();
        for i in 0..r {
            let u = ((i * 7919) % 1000) as f32 / 1000.0;
            settings.push(match i % 4 {
                0 => RowSampling::greedy(),
                1 => RowSampling { temperature: 0.7, top_k: 40, top_p: 0.9, min_p: 0.0, u },
                2 => RowSampling { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.05, u },
                _ => RowSampling { temperature: 1.3, top_k: 0, top_p: 0.8, min_p: 0.0, u },
            });
        }
        let want = sample_rows(&logits, &settings)?;
        let got = sample_rows(&logits.to_device(gpu)?, &settings)?;
        let same = want.iter().zip(&got).filter(|(a, b)| a == b).count();
        let greedy_same = (0..r).step_by(4).all(|i| want[i] == got[i]);
        rows.push(Row {
            check: format!("sampling V={vocab} ({r} rows: greedy, top-k/p, min-p, top-p)"),
            value: format!("{same}/{r} ids equal"),
            limit: "greedy all, >= 62/64".into(),
            ok: greedy_same && same >= r - 2,
        });
    }
    Ok(())
}

fn greedy_tokens(model: &str, device: &Device, n: usize) -> Result<Vec<u32>> {
    let loaded = load_model(model, &LoadOptions { device: device.clone(), ..LoadOptions::default() })?;
    let tok = loaded.tokenizer.clone();
    let msgs = [ragnode_models::tokenizer::ChatMessage {
        role: "user".into(),
        content: "What is the return policy for unused items?".into(),
    }];
    let prompt = tok.encode_chat(&msgs, true)?;
    let engine =
        Engine::start(loaded.model, tok, EngineConfig { kv_cache_bytes: 256 << 20, ..EngineConfig::default() })?;
    let mut req = GenerationRequest::new(prompt, n);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    let mut stream = engine.submit(req)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let ids = rt.block_on(async {
        let mut ids = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev {
                StreamEvent::Delta { token_ids, .. } => ids.extend(token_ids),
                StreamEvent::Finished { error: Some(e), .. } => bail!(e),
                StreamEvent::Finished { .. } => break,
            }
        }
        Ok(ids)
    })?;
    engine.shutdown();
    Ok(ids)
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a 2 GiB buffer.
fn copy_bandwidth(gpu: &Device) -> Result<f64> {
    let n = 512usize << 20; // f32 elements: 2 GiB
    let src = Tensor::ones(n, DType::F32, gpu)?;
    for _ in 0..3 {
        let _ = src.copy()?;
    }
    gpu.synchronize()?;
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = src.copy()?;
    }
    gpu.synchronize()?;
    Ok((2 * 4 * n * reps) as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gpu = Device::new_cuda(args.gpu).context("opening the CUDA device")?;
    let mut rows = Vec::new();
    check_attention(&gpu, &mut rows)?;
    check_latent(&gpu, &mut rows)?;
    check_rowwise(&gpu, &mut rows)?;
    check_sampling(&gpu, &mut rows)?;
    if let Some(model) = &args.model {
        let cpu = greedy_tokens(model, &Device::Cpu, args.tokens)?;
        let cuda = greedy_tokens(model, &gpu, args.tokens)?;
        let same = cpu.iter().zip(&cuda).take_while(|(a, b)| a == b).count();
        println!("greedy cpu : {cpu:?}\ngreedy cuda: {cuda:?}");
        rows.push(Row {
            check: format!("greedy {} tokens, {model}", args.tokens),
            value: format!("{same} equal before the first difference"),
            limit: format!("{}", args.tokens),
            ok: same >= args.tokens && cuda.len() >= args.tokens,
        });
    }
    let bw = copy_bandwidth(&gpu)?;
    let (free, total) = ragnode_kernels::device_memory(&gpu)?.unwrap_or((0, 0));
    println!(
        "device: cuda:{} ({} MiB, {} MiB free); copy bandwidth {:.0} GB/s (read + write)",
        args.gpu,
        total >> 20,
        free >> 20,
        bw / 1e9
    );
    println!();
    println!("| check | measured | limit | ok |");
    println!("|---|---|---|---|");
    let mut failed = 0;
    for r in &rows {
        failed += usize::from(!r.ok);
        println!("| {} | {} | {} | {} |", r.check, r.value, r.limit, if r.ok { "yes" } else { "NO" });
    }
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    Ok(())
}
