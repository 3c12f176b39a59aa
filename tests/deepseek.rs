//! DeepSeek-V2/V3 (`ragnode_models::deepseek2`): tiny random-weight checkpoints written
//! here against candle-transformers' `deepseek2` (V2) and a V3 router written from the
//! published formulas; the latent cache against full per-head K/V; the KV pool's bytes per
//! token for a V2-Lite-shaped model; and batched == alone through the engine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::deepseek2 as reference;
use ragnode_inference::{Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams};
use ragnode_models::deepseek2::{self, MlaCache, MoeConfig, ScoringFunc, TopkMethod};
use ragnode_models::tokenizer::ModelTokenizer;
use ragnode_models::weights::{RandomFormat, RandomWeights, SafetensorsWeights, WeightSource};
use ragnode_models::{CausalLm, DummyWeights, LoadOptions, load_model};
use ragnode_tests::{compare_greedy, run_sequence};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A tiny V2-style config: first layer dense, then MoE (6 experts, top-2, one shared),
/// YaRN with distinct `mscale` / `mscale_all_dim` so both the rope magnitude and the
/// softmax scale are exercised.
fn v2_config(q_lora_rank: Option<usize>) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 6, "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.5, "topk_method": "greedy", "scoring_func": "softmax",
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": false,
        "n_group": 1, "topk_group": 1, "hidden_act": "silu", "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8},
        "attention_bias": false, "q_lora_rank": q_lora_rank, "qk_rope_head_dim": 8,
        "kv_lora_rank": 32, "v_head_dim": 16, "qk_nope_head_dim": 16
    })
}

/// A tiny V3-style config: sigmoid scores with `e_score_correction_bias`, 8 experts in 4
/// groups (2 chosen), top-2, normalised and scaled weights, low-rank q.
fn v3_config() -> serde_json::Value {
    let mut c = v2_config(Some(24));
    let o = c.as_object_mut().expect("object");
    for (k, v) in [
        ("architectures", serde_json::json!(["DeepseekV3ForCausalLM"])),
        ("model_type", serde_json::json!("deepseek_v3")),
        ("n_routed_experts", serde_json::json!(8)),
        ("topk_method", serde_json::json!("noaux_tc")),
        ("scoring_func", serde_json::json!("sigmoid")),
        ("n_group", serde_json::json!(4)),
        ("topk_group", serde_json::json!(2)),
        ("norm_topk_prob", serde_json::json!(true)),
        ("routed_scaling_factor", serde_json::json!(2.5)),
    ] {
        o.insert(k.into(), v);
    }
    c
}

/// Random weights (HF names) for a config above, seeded.
fn random_checkpoint(cfg: &serde_json::Value) -> HashMap<String, Tensor> {
    let u = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let (h, heads, vocab, layers) =
        (u("hidden_size"), u("num_attention_heads"), u("vocab_size"), u("num_hidden_layers"));
    let (dn, dr, dv, r) = (u("qk_nope_head_dim"), u("qk_rope_head_dim"), u("v_head_dim"), u("kv_lora_rank"));
    let (experts, shared, mi) = (u("n_routed_experts"), u("n_shared_experts"), u("moe_intermediate_size"));
    let v3 = cfg["topk_method"] == "noaux_tc";
    let dev = Device::Cpu;
    let rng = std::cell::RefCell::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(20261204));
    let rand = |shape: &[usize], std: f64| {
        use rand::Rng;
        let a = 3f64.sqrt() * std;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.borrow_mut().random_range(-a..a) as f32).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let norm = |n: usize| (Tensor::ones(n, DType::F32, &dev).unwrap() + rand(&[n], 0.1)).unwrap();
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), rand(&[vocab, h], 0.5));
    t.insert("model.norm.weight".into(), norm(h));
    t.insert("lm_head.weight".into(), rand(&[vocab, h], 0.1));
    let mlp = |t: &mut HashMap<String, Tensor>, p: String, inter: usize| {
        t.insert(format!("{p}.gate_proj.weight"), rand(&[inter, h], 0.1));
        t.insert(format!("{p}.up_proj.weight"), rand(&[inter, h], 0.1));
        t.insert(format!("{p}.down_proj.weight"), rand(&[h, inter], 0.1));
    };
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.insert(format!("{p}.input_layernorm.weight"), norm(h));
        t.insert(format!("{p}.post_attention_layernorm.weight"), norm(h));
        let a = format!("{p}.self_attn");
        match cfg["q_lora_rank"].as_u64() {
            None => {
                t.insert(format!("{a}.q_proj.weight"), rand(&[heads * (dn + dr), h], 0.1));
            }
            Some(q) => {
                let q = q as usize;
                t.insert(format!("{a}.q_a_proj.weight"), rand(&[q, h], 0.1));
                t.insert(format!("{a}.q_a_layernorm.weight"), norm(q));
                t.insert(format!("{a}.q_b_proj.weight"), rand(&[heads * (dn + dr), q], 0.15));
            }
        }
        t.insert(format!("{a}.kv_a_proj_with_mqa.weight"), rand(&[r + dr, h], 0.1));
        t.insert(format!("{a}.kv_a_layernorm.weight"), norm(r));
        t.insert(format!("{a}.kv_b_proj.weight"), rand(&[heads * (dn + dv), r], 0.15));
        t.insert(format!("{a}.o_proj.weight"), rand(&[h, heads * dv], 0.1));
        if l == 0 {
            mlp(&mut t, format!("{p}.mlp"), u("intermediate_size"));
        } else {
            t.insert(format!("{p}.mlp.gate.weight"), rand(&[experts, h], 0.3));
            if v3 {
                t.insert(format!("{p}.mlp.gate.e_score_correction_bias"), rand(&[experts], 0.05));
            }
            for j in 0..experts {
                mlp(&mut t, format!("{p}.mlp.experts.{j}"), mi);
            }
            mlp(&mut t, format!("{p}.mlp.shared_experts"), mi * shared);
        }
    }
    t
}

fn write_checkpoint(dir: &Path, cfg: &serde_json::Value) {
    candle_core::safetensors::save(&random_checkpoint(cfg), dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg).unwrap()).unwrap();
}

fn load_ours(dir: &Path, mode: MlaCache) -> deepseek2::Model {
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = deepseek2::config_from_hf_json(&json).unwrap();
    let mut ws = WeightSource::Safetensors(
        SafetensorsWeights::open(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap(),
    );
    deepseek2::Model::load_with_cache(cfg, &mut ws, mode).unwrap()
}

fn prompt_32() -> Vec<u32> {
    (0..32u32).map(|i| (i * 37 + 11) % 300).collect()
}

#[test]
fn random_deepseek_v2_matches_candle_deepseek2() {
    // V2-Lite style (plain q projection) and V2 style (low-rank q).
    for q_lora in [None, Some(24)] {
        let dir = tempdir();
        let cfg = v2_config(q_lora);
        write_checkpoint(dir.path(), &cfg);
        let ours = load_ours(dir.path(), MlaCache::Latent);
        let ref_cfg: reference::DeepSeekV2Config = serde_json::from_value(cfg.clone()).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.path().join("model.safetensors")], DType::F32, &Device::Cpu)
                .unwrap()
        };
        let mut oracle = reference::DeepSeekV2::new(&ref_cfg, vb).unwrap();
        let worst = compare_greedy(&ours, &prompt_32(), 16, 1e-4, |tokens, pos| {
            let input = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            oracle.forward(&input, pos).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        });
        eprintln!("q_lora_rank {q_lora:?}: worst logit difference vs candle deepseek2 {worst:e}");
    }
}

/// DeepSeek-V3's router written from the published formulas (DeepSeek-V3 report §2.1.2,
/// `noaux_tc` in the released modeling code) with candle tensor ops over a whole batch:
/// `s = sigmoid(u)`; choose with `s + b`: groups ranked by the sum of their two best,
/// the best `topk_group` groups kept, top-k inside them; weights `s` of the chosen,
/// normalised, times `routed_scaling_factor`.
fn reference_v3_router(logits: &Tensor, bias: &Tensor, m: &MoeConfig) -> Vec<Vec<(usize, f32)>> {
    let (n, e) = logits.dims2().unwrap();
    let g = m.n_group;
    let scores = candle_nn::ops::sigmoid(logits).unwrap();
    let choice = scores.broadcast_add(bias).unwrap();
    let grouped = choice.reshape((n, g, e / g)).unwrap().contiguous().unwrap();
    let order = grouped.arg_sort_last_dim(false).unwrap();
    let group_scores = grouped
        .gather(&order.narrow(D::Minus1, 0, 2).unwrap().contiguous().unwrap(), D::Minus1)
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    let group_idx =
        group_scores.arg_sort_last_dim(false).unwrap().narrow(1, 0, m.topk_group).unwrap().contiguous().unwrap();
    let group_mask = group_scores
        .zeros_like()
        .unwrap()
        .scatter_add(&group_idx, &group_idx.ones_like().unwrap().to_dtype(DType::F32).unwrap(), 1)
        .unwrap();
    let expert_mask = group_mask.unsqueeze(2).unwrap().expand((n, g, e / g)).unwrap().reshape((n, e)).unwrap();
    let neg = Tensor::full(f32::NEG_INFINITY, (n, e), &Device::Cpu).unwrap();
    let masked = expert_mask.ne(0f32).unwrap().where_cond(&choice, &neg).unwrap();
    let idx =
        masked.arg_sort_last_dim(false).unwrap().narrow(1, 0, m.num_experts_per_tok).unwrap().contiguous().unwrap();
    let mut w = scores.gather(&idx, 1).unwrap();
    if m.norm_topk_prob {
        w = w.broadcast_div(&(w.sum_keepdim(1).unwrap() + 1e-20).unwrap()).unwrap();
    }
    let w = (w * m.routed_scaling_factor as f64).unwrap();
    let (idx, w): (Vec<Vec<u32>>, Vec<Vec<f32>>) = (idx.to_vec2().unwrap(), w.to_vec2().unwrap());
    idx.into_iter()
        .zip(w)
        .map(|(i, w)| {
            let mut row: Vec<(usize, f32)> = i.into_iter().map(|x| x as usize).zip(w).collect();
            row.sort_by_key(|p| p.0);
            row
        })
        .collect()
}

#[test]
fn v3_router_matches_the_published_formulas() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // DeepSeek-V3's own routing shape: 256 experts in 8 groups, 4 groups, top-8.
    let m = MoeConfig {
        n_routed_experts: 256,
        n_shared_experts: 1,
        num_experts_per_tok: 8,
        moe_intermediate_size: 2048,
        first_k_dense_replace: 3,
        moe_layer_freq: 1,
        scoring_func: ScoringFunc::Sigmoid,
        topk_method: TopkMethod::NoAuxTc,
        n_group: 8,
        topk_group: 4,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let rows = 300;
    let logits: Vec<f32> = (0..rows * 256).map(|_| rng.random_range(-4.0..4.0)).collect();
    let bias: Vec<f32> = (0..256).map(|_| rng.random_range(-0.3..0.3)).collect();
    let want = reference_v3_router(
        &Tensor::from_slice(&logits, (rows, 256), &Device::Cpu).unwrap(),
        &Tensor::from_slice(&bias, 256, &Device::Cpu).unwrap(),
        &m,
    );
    let mut bias_mattered = 0;
    for (r, want) in want.iter().enumerate() {
        let row = &logits[r * 256..(r + 1) * 256];
        let got = deepseek2::route(row, Some(&bias), &m);
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "row {r}"
        );
        for (a, b) in got.iter().zip(want) {
            assert!((a.1 - b.1).abs() < 1e-5, "row {r}: weight {} vs {}", a.1, b.1);
        }
        if deepseek2::route(row, None, &m) != got {
            bias_mattered += 1;
        }
    }
    assert!(bias_mattered > rows / 4, "the correction bias changed only {bias_mattered} of {rows} routings");
}

#[test]
fn latent_cache_decode_equals_full_kv_decode() {
    for cfg in [v2_config(None), v3_config()] {
        let dir = tempdir();
        write_checkpoint(dir.path(), &cfg);
        let latent = load_ours(dir.path(), MlaCache::Latent);
        let full = load_ours(dir.path(), MlaCache::Full);
        assert!(latent.kv_layout() != full.kv_layout());
        // Full-K/V logits as the reference, fed through a second cache of its own layout.
        let mut full_steps = Vec::new();
        let mut first = true;
        let prompt = prompt_32();
        let tokens = std::cell::RefCell::new(prompt.clone());
        let worst = compare_greedy(&latent, &prompt, 16, 1e-4, |step_tokens, _| {
            if !first {
                tokens.borrow_mut().extend_from_slice(step_tokens);
            }
            first = false;
            let all = tokens.borrow().clone();
            let l = run_sequence(&full, &all, 0, |_, _| 0).pop().unwrap();
            full_steps.push(l.clone());
            l
        });
        eprintln!("{}: latent vs full K/V worst logit difference {worst:e}", cfg["model_type"]);
    }
}

/// DeepSeek-V2-Lite's attention exactly (16 heads, kv_lora_rank 512, q/k head 128 + 64,
/// v head 128, hidden 2048), with 2 layers and a small MoE so random weights build fast.
fn v2_lite_shaped(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 1024,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 128,
        "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 8, "n_shared_experts": 2,
        "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": layers, "num_key_value_heads": 16, "q_lora_rank": null, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1,
        "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
        "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
        "vocab_size": 2000
    })
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new(prompt, max_tokens);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    req
}

#[test]
fn latent_kv_pool_holds_far_fewer_bytes_per_token_than_full_kv() {
    let json = v2_lite_shaped(2).to_string();
    let cfg = deepseek2::config_from_hf_json(&json).unwrap();
    let tok = Arc::new(ModelTokenizer::placeholder(cfg.vocab_size).unwrap());
    let budget = 64 << 20;
    let mut stats = Vec::new();
    let mut outputs = Vec::new();
    for mode in [MlaCache::Latent, MlaCache::Full] {
        let mut ws = WeightSource::Random(RandomWeights::new(RandomFormat::F32, 1, &Device::Cpu));
        let model = Arc::new(deepseek2::Model::load_with_cache(cfg.clone(), &mut ws, mode).unwrap());
        let engine =
            Engine::start(model, tok.clone(), EngineConfig { kv_cache_bytes: budget, ..EngineConfig::default() })
                .unwrap();
        let prompt: Vec<u32> = (0..40u32).map(|i| (i * 7 + 3) % 2000).collect();
        let mut stream = engine.submit(greedy(prompt, 8)).unwrap();
        // Mid-generation the pool holds this sequence's blocks.
        let mut held = 0;
        let mut ids = Vec::new();
        while let Some(ev) = stream.next_blocking() {
            if let ragnode_inference::StreamEvent::Delta { token_ids, .. } = &ev {
                held = held.max(engine.stats().kv_bytes_used);
                ids.extend_from_slice(token_ids);
            }
        }
        stats.push((engine.stats(), held));
        outputs.push(ids);
        engine.shutdown();
    }
    let ((latent, latent_held), (full, full_held)) = (&stats[0], &stats[1]);
    // A latent row per token and layer: 512 + 64 f32.
    assert_eq!(latent.kv_bytes_per_token, 2 * 576 * 4);
    // Textbook per-head K/V: 16 heads × (192 + 128) per layer.
    let textbook = cfg.full_kv_bytes_per_token(DType::F32);
    assert_eq!(textbook, 2 * 16 * 320 * 4);
    let vs_textbook = textbook as f64 / latent.kv_bytes_per_token as f64;
    let vs_full_pool = full.kv_bytes_per_token as f64 / latent.kv_bytes_per_token as f64;
    eprintln!(
        "bytes/token: latent {} full-K/V pool {} textbook {textbook} ({vs_textbook:.1}x, pool {vs_full_pool:.1}x); \
         blocks in {budget} bytes: latent {} full {}; held mid-run: {latent_held} vs {full_held}",
        latent.kv_bytes_per_token, full.kv_bytes_per_token, latent.kv_blocks_total, full.kv_blocks_total
    );
    assert!(vs_textbook >= 4.0 && vs_full_pool >= 4.0);
    assert!(latent.kv_blocks_total >= 4 * full.kv_blocks_total);
    assert!(*latent_held > 0 && full_held >= &(4 * latent_held));
    // Both caches decode the same greedy tokens.
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn batched_requests_produce_exactly_their_solo_tokens() {
    let dir = tempdir();
    let mut cfg = v3_config();
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 512),
        ("moe_intermediate_size", 64),
        ("vocab_size", 1000),
        ("num_hidden_layers", 4),
    ] {
        cfg[k] = serde_json::json!(v);
    }
    cfg["q_lora_rank"] = serde_json::json!(64);
    cfg["kv_lora_rank"] = serde_json::json!(64);
    cfg["qk_nope_head_dim"] = serde_json::json!(32);
    cfg["qk_rope_head_dim"] = serde_json::json!(32);
    cfg["v_head_dim"] = serde_json::json!(32);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let opts = LoadOptions {
        dummy: Some(DummyWeights { format: RandomFormat::Ggml(candle_core::quantized::GgmlDType::Q8_0), seed: 5 }),
        ..LoadOptions::default()
    };
    let m = load_model(dir.path().join("config.json").to_str().unwrap(), &opts).unwrap();
    assert_eq!(m.model.architecture(), "deepseek2");
    let prompts: Vec<Vec<u32>> =
        (0..8u32).map(|i| (0..(5 + i * 23)).map(|j| (j * 31 + i * 17 + 1) % 1000).collect()).collect();
    let solo_engine = Engine::start(m.model.clone(), m.tokenizer.clone(), EngineConfig::default()).unwrap();
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| solo_engine.submit(greedy(p.clone(), 24)).unwrap().collect_blocking().token_ids)
        .collect();
    solo_engine.shutdown();
    let engine = Engine::start(
        m.model.clone(),
        m.tokenizer.clone(),
        EngineConfig { max_batch_tokens: 64, ..EngineConfig::default() },
    )
    .unwrap();
    // All submitted at once (a timed stagger let this small model finish one request before
    // the next arrived): the 64-token step budget still admits them chunk by chunk, so
    // prefill chunks of later prompts run beside the decodes of earlier ones.
    let streams: Vec<_> = prompts.iter().map(|p| engine.submit(greedy(p.clone(), 24)).unwrap()).collect();
    let batched: Vec<_> = streams.into_iter().map(|s| s.collect_blocking()).collect();
    let stats = engine.stats();
    engine.shutdown();
    for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
        assert_eq!(b.finish_reason, Some(FinishReason::Length));
        assert_eq!(&b.token_ids, s, "request {i} ({} prompt tokens) differs when batched", prompts[i].len());
    }
    let serial_steps: usize = prompts.iter().map(|p| p.len().div_ceil(64) + 23).sum();
    assert!((stats.steps as usize) < serial_steps, "{} steps, {serial_steps} if serial", stats.steps);
}

/// Writes `weights` (HF names) as a llama.cpp `deepseek2` GGUF: llama.cpp's tensor names,
/// routed experts stacked per layer (`ffn_{gate,up,down}_exps`), V3's bias as
/// `exp_probs_b.bias`, the `deepseek2.*` metadata its converter writes; all f32.
fn write_deepseek2_gguf(path: &Path, cfg: &serde_json::Value, weights: &HashMap<String, Tensor>) {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let u = |k: &str| cfg[k].as_u64().unwrap_or(0) as u32;
    let f32q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut experts: HashMap<(String, String), Vec<(usize, Tensor)>> = HashMap::new();
    for (name, t) in weights {
        if let Some((layer, rest)) = name.strip_prefix("model.layers.").and_then(|r| r.split_once(".mlp.experts.")) {
            let (j, proj) = rest.split_once('.').unwrap();
            let kind = proj.strip_suffix("_proj.weight").unwrap().to_string();
            experts.entry((layer.to_string(), kind)).or_default().push((j.parse().unwrap(), t.clone()));
        } else if let Some(layer) = name.strip_suffix(".mlp.gate.e_score_correction_bias") {
            let layer = layer.strip_prefix("model.layers.").unwrap();
            tensors.push((format!("blk.{layer}.exp_probs_b.bias"), f32q(t)));
        } else {
            let base = name.strip_suffix(".weight").unwrap();
            tensors.push((ragnode_models::weights::gguf_name(base, "weight"), f32q(t)));
        }
    }
    for ((layer, kind), mut list) in experts {
        list.sort_by_key(|p| p.0);
        let stacked = Tensor::stack(&list.into_iter().map(|p| p.1).collect::<Vec<_>>(), 0).unwrap();
        tensors.push((format!("blk.{layer}.ffn_{kind}_exps.weight"), f32q(&stacked)));
    }
    use gguf_file::Value as V;
    let rs = &cfg["rope_scaling"];
    let mut md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("deepseek2".into())),
        ("deepseek2.block_count", V::U32(u("num_hidden_layers"))),
        ("deepseek2.context_length", V::U32(u("max_position_embeddings"))),
        ("deepseek2.embedding_length", V::U32(u("hidden_size"))),
        ("deepseek2.feed_forward_length", V::U32(u("intermediate_size"))),
        ("deepseek2.attention.head_count", V::U32(u("num_attention_heads"))),
        ("deepseek2.attention.head_count_kv", V::U32(u("num_attention_heads"))),
        ("deepseek2.rope.freq_base", V::F32(10000.0)),
        ("deepseek2.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("deepseek2.vocab_size", V::U32(u("vocab_size"))),
        ("deepseek2.attention.kv_lora_rank", V::U32(u("kv_lora_rank"))),
        ("deepseek2.attention.key_length", V::U32(u("qk_nope_head_dim") + u("qk_rope_head_dim"))),
        ("deepseek2.attention.value_length", V::U32(u("v_head_dim"))),
        ("deepseek2.rope.dimension_count", V::U32(u("qk_rope_head_dim"))),
        ("deepseek2.leading_dense_block_count", V::U32(u("first_k_dense_replace"))),
        ("deepseek2.expert_feed_forward_length", V::U32(u("moe_intermediate_size"))),
        ("deepseek2.expert_count", V::U32(u("n_routed_experts"))),
        ("deepseek2.expert_shared_count", V::U32(u("n_shared_experts"))),
        ("deepseek2.expert_used_count", V::U32(u("num_experts_per_tok"))),
        ("deepseek2.expert_weights_scale", V::F32(cfg["routed_scaling_factor"].as_f64().unwrap() as f32)),
        ("deepseek2.expert_weights_norm", V::Bool(cfg["norm_topk_prob"].as_bool().unwrap())),
        ("deepseek2.expert_gating_func", V::U32(if cfg["scoring_func"] == "sigmoid" { 2 } else { 1 })),
        ("deepseek2.expert_group_count", V::U32(u("n_group"))),
        ("deepseek2.expert_group_used_count", V::U32(u("topk_group"))),
        ("deepseek2.rope.scaling.type", V::String("yarn".into())),
        ("deepseek2.rope.scaling.factor", V::F32(rs["factor"].as_f64().unwrap() as f32)),
        (
            "deepseek2.rope.scaling.original_context_length",
            V::U32(rs["original_max_position_embeddings"].as_u64().unwrap() as u32),
        ),
        ("deepseek2.rope.scaling.yarn_log_multiplier", V::F32(0.1 * rs["mscale_all_dim"].as_f64().unwrap() as f32)),
    ];
    if let Some(q) = cfg["q_lora_rank"].as_u64() {
        md.push(("deepseek2.attention.q_lora_rank", V::U32(q as u32)));
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn deepseek2_gguf_loads_like_the_safetensors_checkpoint() {
    // llama.cpp keeps DeepSeek's rope magnitude at 1 (mscale == mscale_all_dim in the
    // released configs), so the GGUF carries only mscale_all_dim: use such a config.
    for mut cfg in [v2_config(None), v3_config()] {
        cfg["rope_scaling"]["mscale"] = cfg["rope_scaling"]["mscale_all_dim"].clone();
        let dir = tempdir();
        write_checkpoint(dir.path(), &cfg);
        let weights = random_checkpoint(&cfg);
        let gguf = dir.path().join("model.gguf");
        write_deepseek2_gguf(&gguf, &cfg, &weights);
        let from_st = load_ours(dir.path(), MlaCache::Latent);
        let g = ragnode_models::weights::GgufWeights::open(&gguf, &Device::Cpu).unwrap();
        let gcfg = deepseek2::Config::from_gguf(&g.content).unwrap();
        let st = from_st.config();
        assert_eq!(gcfg.moe, st.moe, "{}", cfg["model_type"]);
        assert_eq!(
            (gcfg.q_lora_rank, gcfg.latent_dim(), gcfg.qk_head_dim()),
            (st.q_lora_rank, st.latent_dim(), st.qk_head_dim())
        );
        assert!((gcfg.softmax_scale() - st.softmax_scale()).abs() < 1e-6);
        let from_gguf = deepseek2::Model::load(gcfg, &mut WeightSource::Gguf(g)).unwrap();
        let reference = std::cell::RefCell::new(prompt_32());
        let mut first = true;
        let worst = compare_greedy(&from_gguf, &prompt_32(), 8, 1e-4, |step, _| {
            if !first {
                reference.borrow_mut().extend_from_slice(step);
            }
            first = false;
            run_sequence(&from_st, &reference.borrow(), 0, |_, _| 0).pop().unwrap()
        });
        eprintln!("{}: GGUF vs safetensors worst logit difference {worst:e}", cfg["model_type"]);
    }
}

#[test]
fn generate_with_dummy_weights_runs_any_config() {
    let dir = tempdir();
    let config = dir.path().join("config.json");
    std::fs::write(&config, v3_config().to_string()).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(ragnode_tests::ragnode_bin())
            .args(["generate", "--dummy-weights", config.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "5"])
            .args(["--ignore-eos"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&["--dummy-format", "f32"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("generated tokens: 5"), "{stdout}");
    let bad = run(&["--dummy-format", "q9_9"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown weight format `q9_9`"));
    // A config that cannot work is a clear error naming the file.
    let mut broken = v3_config();
    broken["num_experts_per_tok"] = serde_json::json!(99);
    std::fs::write(&config, broken.to_string()).unwrap();
    let bad = run(&[]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("config.json") && err.contains("num_experts_per_tok"), "{err}");
}
