//! The engine on the real SmolLM2 model: continuous batching equals running alone,
//! cancellation and backpressure, UTF-8-safe streaming and stop strings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ragnode_inference::detokenizer::IncrementalDecoder;
use ragnode_inference::{
    Engine, EngineConfig, EngineError, EngineHandle, FinishReason, GenerationRequest, SamplingParams, StreamEvent,
};
use ragnode_models::tokenizer::{ChatMessage, ModelTokenizer};
use ragnode_models::{LoadOptions, LoadedModel, load_model};
use ragnode_tests::smollm2_gguf;

fn model() -> LoadedModel {
    load_model(smollm2_gguf().to_str().unwrap(), &LoadOptions::default()).expect("load SmolLM2")
}

fn start(m: &LoadedModel, cfg: EngineConfig) -> EngineHandle {
    Engine::start(m.model.clone(), m.tokenizer.clone(), cfg).expect("engine")
}

fn chat(tok: &ModelTokenizer, user: &str) -> Vec<u32> {
    tok.encode_chat(&[ChatMessage { role: "user".into(), content: user.into() }], true).unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut r = GenerationRequest::new(prompt, max_tokens);
    r.sampling = SamplingParams::greedy();
    r.ignore_eos = true;
    r
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn batched_requests_produce_exactly_their_solo_tokens() {
    let m = model();
    let tok = m.tokenizer.clone();
    let long = "Our return policy: items can be returned within 30 days of delivery if unused. ".repeat(6);
    let questions = [
        "Hi".to_string(),
        "What is the capital of France?".to_string(),
        "Write a haiku about the sea.".to_string(),
        format!("{long} Summarise the policy in one sentence."),
        "List three colours.".to_string(),
        format!("{long}{long} How many days do I have?"),
        "Explain what a CPU does, briefly.".to_string(),
        "Count from one to ten.".to_string(),
    ];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| chat(&tok, q)).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().max().unwrap() > &128, "want prompts longer than a prefill chunk: {lens:?}");

    // Alone: one request at a time.
    let solo_engine = start(&m, EngineConfig::default());
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| solo_engine.submit(greedy(p.clone(), 24)).unwrap().collect_blocking().token_ids)
        .collect();
    solo_engine.shutdown();

    // Together: staggered arrivals into a small token budget, so requests join a running
    // batch and long prompts are prefilled in chunks alongside decodes.
    let engine = start(&m, EngineConfig { max_batch_tokens: 64, ..EngineConfig::default() });
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let engine = engine.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * i as u64));
                engine.submit(greedy(p, 24)).unwrap().collect_blocking()
            })
        })
        .collect();
    let batched: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let stats = engine.stats();
    engine.shutdown();
    for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
        assert_eq!(b.finish_reason, Some(FinishReason::Length));
        assert_eq!(&b.token_ids, s, "request {i} (prompt {} tokens) differs when batched", lens[i]);
    }
    // It really was batched: fewer steps than tokens computed one sequence at a time.
    let solo_steps: usize = lens.iter().map(|l| l.div_ceil(64) + 23).sum();
    assert!((stats.steps as usize) < solo_steps, "{} steps, {solo_steps} if serial", stats.steps);
}

#[test]
fn cancelling_returns_blocks_to_the_pool() {
    let m = model();
    let engine = start(&m, EngineConfig::default());
    let prompt = chat(&m.tokenizer, "Tell me a very long story about a dragon.");

    // Dropping the stream mid-generation.
    let mut stream = engine.submit(greedy(prompt.clone(), 400)).unwrap();
    for _ in 0..3 {
        assert!(matches!(stream.next_blocking(), Some(StreamEvent::Delta { .. })));
    }
    assert!(engine.stats().kv_blocks_used > 0);
    drop(stream);
    wait_until("blocks freed after drop", Duration::from_secs(10), || {
        let s = engine.stats();
        s.kv_blocks_used == 0 && s.cancelled == 1 && s.running == 0
    });

    // Explicit cancel: the stream ends with `cancelled`.
    let mut stream = engine.submit(greedy(prompt, 400)).unwrap();
    assert!(matches!(stream.next_blocking(), Some(StreamEvent::Delta { .. })));
    engine.cancel(stream.id());
    let mut reason = None;
    while let Some(ev) = stream.next_blocking() {
        if let StreamEvent::Finished { reason: r, .. } = ev {
            reason = Some(r);
        }
    }
    assert_eq!(reason, Some(FinishReason::Cancelled));
    wait_until("blocks freed after cancel", Duration::from_secs(10), || engine.stats().kv_blocks_used == 0);
    engine.shutdown();
}

#[test]
fn full_pool_makes_requests_wait_and_full_queue_rejects() {
    let m = model();
    let layout = m.model.kv_layout();
    let block_tokens = 16;
    let block_bytes = layout.bytes_per_token(candle_core::DType::F32) * block_tokens;
    // 8 blocks = 128 token slots.
    let engine = start(&m, EngineConfig { kv_cache_bytes: 8 * block_bytes, max_waiting: 1, ..EngineConfig::default() });
    assert_eq!(engine.stats().kv_blocks_total, 8);
    assert_eq!(engine.context_limit(), 128);

    let filler = "Please keep this text in mind while answering. ".repeat(8);
    let a_prompt = chat(&m.tokenizer, &filler);
    assert!((97..=112).contains(&a_prompt.len()), "A's prompt should fill 7 blocks: {}", a_prompt.len());
    let a_max = 128 - a_prompt.len();
    let b_prompt = chat(&m.tokenizer, "Hi there");

    let mut a = engine.submit(greedy(a_prompt, a_max)).unwrap();
    assert!(matches!(a.next_blocking(), Some(StreamEvent::Delta { .. })));
    // B waits: the pool cannot take it while A runs (64 sequences would be allowed).
    let b = engine.submit(greedy(b_prompt, 8)).unwrap();
    wait_until("B waiting while A runs", Duration::from_secs(5), || engine.stats().waiting == 1);
    assert_eq!(engine.stats().running, 1);

    let a = a.collect_blocking();
    assert_eq!(a.finish_reason, Some(FinishReason::Length));
    let b = b.collect_blocking();
    assert_eq!(b.finish_reason, Some(FinishReason::Length));
    assert_eq!(b.token_ids.len(), 8);
    assert_eq!(engine.stats().kv_blocks_used, 0);
    // A prompt that cannot fit the context at all is refused up front.
    let too_long = vec![1u32; 200];
    assert!(matches!(engine.submit(greedy(too_long, 1)), Err(EngineError::ContextLength { prompt: 200, limit: 128 })));
    engine.shutdown();
}

#[test]
fn the_engine_takes_max_num_seqs_plus_max_waiting_requests_in_a_burst() {
    let m = model();
    let engine = start(&m, EngineConfig { max_num_seqs: 2, max_waiting: 2, ..EngineConfig::default() });
    // Ten at once, before the engine thread has admitted any: exactly 2 + 2 are taken,
    // however far the engine thread has got.
    let results: Vec<_> = (0..10).map(|_| engine.submit(greedy(chat(&m.tokenizer, "Tell me a story."), 32))).collect();
    let accepted: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(accepted.len(), 4);
    for r in &results[4..] {
        assert!(matches!(r, Err(EngineError::Overloaded { in_engine: 4, limit: 4 })), "{r:?}");
    }
    // Once they finish, the room is back.
    for r in results.into_iter().flatten() {
        r.collect_blocking();
    }
    wait_until("requests done", Duration::from_secs(10), || engine.stats().running == 0);
    let again: Vec<_> = (0..5).map(|_| engine.submit(greedy(vec![1, 2, 3], 2))).collect();
    assert_eq!(again.iter().filter(|r| r.is_ok()).count(), 4);
    engine.shutdown();
}

/// Checks a stream's text deltas against the full decode of its tokens.
fn assert_clean_stream(tok: &ModelTokenizer, deltas: &[String], ids: &[u32]) {
    let full = tok.decode(ids, true).unwrap();
    assert_eq!(deltas.concat(), full, "deltas do not add up to the full decode");
    if !full.contains('\u{FFFD}') {
        for d in deltas {
            assert!(!d.contains('\u{FFFD}'), "delta {d:?} has U+FFFD that the full decode lacks");
        }
    }
}

#[test]
fn chinese_streams_never_split_characters() {
    let m = model();
    let tok: Arc<ModelTokenizer> = m.tokenizer.clone();

    // The real tokenizer splits CJK and emoji across byte-level tokens.
    let text = "退货政策是什么？我们支持七天无理由退货 🙂，运费由买家承担。";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count(), "expected characters split across tokens");
    let mut d = IncrementalDecoder::new(&[]);
    let mut deltas: Vec<String> = ids.iter().map(|&t| d.push(t, tok.as_ref()).unwrap()).collect();
    deltas.push(d.flush(tok.as_ref()).unwrap());
    assert_eq!(deltas.concat(), text);
    assert_clean_stream(&tok, &deltas, &ids);

    // And through the engine, sampling a Chinese answer.
    let engine = start(&m, EngineConfig::default());
    let prompt = chat(&tok, "请用中文回答：退货政策是什么？");
    for seed in [1u64, 2, 3] {
        let mut req = GenerationRequest::new(prompt.clone(), 48);
        req.sampling = SamplingParams { temperature: 0.9, seed: Some(seed), ..SamplingParams::default() };
        let mut stream = engine.submit(req).unwrap();
        let (mut deltas, mut ids) = (Vec::new(), Vec::new());
        while let Some(ev) = stream.next_blocking() {
            if let StreamEvent::Delta { text, token_ids, .. } = ev {
                deltas.push(text);
                ids.extend(token_ids);
            }
        }
        let stop_ids = tok.stop_token_ids();
        ids.retain(|t| !stop_ids.contains(t));
        assert_clean_stream(&tok, &deltas, &ids);
    }
    engine.shutdown();
}

#[test]
fn device_sampling_path_matches_the_host_sampler_where_the_rules_agree() {
    // The GPU engine samples on the device; here the same plumbing runs with the CPU
    // reference rule (EngineConfig::device_sampling), so ids, order, counts and seeds are
    // checked without a GPU.
    let m = model();
    let prompts: Vec<Vec<u32>> = ["Hi", "What is the capital of France?", "List three colours.", "Count to five."]
        .iter()
        .map(|q| chat(&m.tokenizer, q))
        .collect();
    let run = |device_sampling: bool, sampling: SamplingParams| {
        let engine = start(&m, EngineConfig { device_sampling: Some(device_sampling), ..EngineConfig::default() });
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let mut req = GenerationRequest::new(p.clone(), 16);
                req.sampling = sampling.clone();
                req.ignore_eos = true;
                engine.submit(req).unwrap()
            })
            .collect();
        let out: Vec<Vec<u32>> = handles.into_iter().map(|h| h.collect_blocking().token_ids).collect();
        engine.shutdown();
        out
    };
    // Greedy: both paths take the argmax.
    let host = run(false, SamplingParams::greedy());
    assert_eq!(run(true, SamplingParams::greedy()), host);
    // top_k = 1 keeps only the argmax (no ties in real logits): greedy at any temperature.
    let top1 = SamplingParams { temperature: 0.8, top_k: 1, seed: Some(3), ..SamplingParams::default() };
    assert_eq!(run(true, top1), host);
    // Seeded sampling on the device path is reproducible and uses the seed.
    let seeded = |seed| SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..SamplingParams::default() };
    let a = run(true, seeded(7));
    assert_eq!(a, run(true, seeded(7)));
    assert_ne!(a, run(true, seeded(8)));
    assert!(a.iter().all(|ids| ids.len() == 16 && ids.iter().all(|&t| (t as usize) < m.model.vocab_size())));
}

#[test]
fn same_seed_same_output() {
    let m = model();
    let engine = start(&m, EngineConfig::default());
    let prompt = chat(&m.tokenizer, "Give me a random fruit name.");
    let run = |seed| {
        let mut req = GenerationRequest::new(prompt.clone(), 20);
        req.sampling =
            SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 50, seed: Some(seed), ..SamplingParams::default() };
        req.ignore_eos = true;
        engine.submit(req).unwrap().collect_blocking().token_ids
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    engine.shutdown();
}

#[test]
fn stop_string_split_across_tokens_is_caught_and_not_emitted() {
    let m = model();
    let engine = start(&m, EngineConfig::default());
    let prompt = chat(&m.tokenizer, "What is the capital of France? Answer in two sentences.");
    let mut stream = engine.submit(greedy(prompt.clone(), 40)).unwrap();
    let mut deltas = Vec::new();
    while let Some(ev) = stream.next_blocking() {
        if let StreamEvent::Delta { text, .. } = ev {
            deltas.push(text);
        }
    }
    let full = deltas.concat();
    // A stop string made of the end of one token's text and the start of the next one's.
    let i = (3..deltas.len() - 1)
        .find(|&i| {
            deltas[i].chars().count() >= 2
                && deltas[i + 1].chars().count() >= 2
                && deltas[i].is_ascii()
                && deltas[i + 1].is_ascii()
        })
        .expect("two adjacent multi-character tokens");
    let stop = format!("{}{}", &deltas[i][deltas[i].len() - 2..], &deltas[i + 1][..2]);
    let cut = full.find(&stop).unwrap();

    let mut req = greedy(prompt, 40);
    req.stop = vec![stop.clone()];
    let got = engine.submit(req).unwrap().collect_blocking();
    assert_eq!(got.finish_reason, Some(FinishReason::Stop));
    assert_eq!(got.text, full[..cut], "stop {stop:?}");
    assert!(!got.text.contains(&stop));
    engine.shutdown();
}

#[test]
fn stop_token_ids_end_the_stream_and_usage_counts_tokens() {
    let m = model();
    let engine = start(&m, EngineConfig::default());
    let prompt = chat(&m.tokenizer, "Name three fruits.");
    let free = engine.submit(greedy(prompt.clone(), 12)).unwrap().collect_blocking();
    assert_eq!(free.usage.completion_tokens, 12);
    assert_eq!(free.usage.prompt_tokens, prompt.len());
    // Stop at the first occurrence of the 6th token.
    let stop_at = free.token_ids[5];
    let first = free.token_ids.iter().position(|&t| t == stop_at).unwrap();
    let mut req = greedy(prompt, 12);
    req.stop_token_ids = vec![stop_at];
    let got = engine.submit(req).unwrap().collect_blocking();
    assert_eq!(got.finish_reason, Some(FinishReason::Stop));
    assert_eq!(got.token_ids, free.token_ids[..=first]);
    assert_eq!(got.usage.completion_tokens, first + 1);
    // The stop token's own text is not part of the output.
    let before = m.tokenizer.decode(&free.token_ids[..first], true).unwrap();
    assert_eq!(got.text, before);
    // Bad requests are refused at the edge.
    assert!(matches!(engine.submit(greedy(vec![], 4)), Err(EngineError::InvalidRequest(_))));
    assert!(matches!(engine.submit(greedy(vec![1], 0)), Err(EngineError::InvalidRequest(_))));
    assert!(matches!(engine.submit(greedy(vec![1_000_000], 4)), Err(EngineError::InvalidRequest(_))));
    let mut bad = greedy(vec![1], 4);
    bad.sampling.top_p = 0.0;
    assert!(matches!(engine.submit(bad), Err(EngineError::InvalidRequest(_))));
    engine.shutdown();
}
