//! Chat prompts of real models equal Hugging Face `transformers`' ids: for the real
//! tokenizers and chat templates of DeepSeek-V3, Llama-3 and Qwen3,
//! `ModelTokenizer::encode_chat` (and `ragnode generate --chat`, and the server) must give exactly what
//! `tokenizer.apply_chat_template(messages, add_generation_prompt=.., tokenize=True)` gave
//! when `scripts/record-chat-template-ids.py` recorded `fixtures/chat_template_ids.json`.
//!
//! DeepSeek-V3 and Llama-3 are the case that broke (issue 16, item 7): their templates
//! write BOS and their tokenizers add BOS to plain text (Llama-3 in its later revisions),
//! and the old render-strip-encode path dropped it from every chat prompt.

use std::path::Path;
use std::process::Command;

use ragnode_models::tokenizer::{ChatMessage, ModelTokenizer};
use ragnode_tests::{ServeProcess, hf_tokenizer_dir, http, ragnode_bin};
use serde_json::Value;

const NAMES: [&str; 3] = ["deepseek_v3", "llama3", "qwen3"];

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("chat_template_ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn recorded<'a>(fixture: &'a Value, name: &str) -> &'a Value {
    let entry = &fixture["tokenizers"][name];
    assert!(entry.is_object(), "no recorded ids for {name} in the fixture");
    entry
}

fn load(name: &str) -> ModelTokenizer {
    let dir = hf_tokenizer_dir(name);
    ModelTokenizer::from_hf_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json")), None)
        .unwrap_or_else(|e| panic!("loading the {name} tokenizer: {e}"))
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).expect("messages")
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("ids")
}

#[test]
fn encode_chat_matches_transformers_on_real_templates() {
    let fixture = fixture();
    for name in NAMES {
        let tok = load(name);
        let entry = recorded(&fixture, name);
        assert_eq!(tok.vocab_size() as u64, entry["vocab_size"].as_u64().unwrap(), "{name}: vocabulary size");
        let cases = entry["conversations"].as_array().expect("conversations");
        assert_eq!(cases.len(), 3, "{name}: system+user, multi-turn, user alone");
        for case in cases {
            let label = format!("{name} / {}", case["name"].as_str().unwrap_or("?"));
            let msgs = messages(case);
            let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("add_generation_prompt");
            let text = tok.apply_chat_template(&msgs, add_generation_prompt).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{label}: rendered text");
            let got = tok.encode_chat(&msgs, add_generation_prompt).unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(got, want, "{label}: ids\n  ours:         {got:?}\n  transformers: {want:?}");
        }
    }
}

/// The defect's case: a template that writes BOS with a vocabulary that adds BOS to plain
/// text. DeepSeek-V3's `tokenizer_config.json` says `add_bos_token: true`; this Llama-3
/// `tokenizer.json` is the early one whose post-processor adds nothing, so it also runs
/// with `add_bos_token: true` forced, as the later Llama-3 revisions behave (their
/// post-processor prepends `<|begin_of_text|>`). transformers' chat ids never depend on
/// that flag (it encodes with `add_special_tokens=False`), so the recorded ids still hold,
/// with exactly one BOS.
#[test]
fn bos_templates_get_exactly_one_bos() {
    let fixture = fixture();
    let forced_dir = tempfile::tempdir().expect("temp dir");
    let forced_llama3 = {
        let src = hf_tokenizer_dir("llama3");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
        config["add_bos_token"] = true.into();
        let config_path = forced_dir.path().join("tokenizer_config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        ModelTokenizer::from_hf_files(&src.join("tokenizer.json"), Some(&config_path), None).unwrap()
    };
    let llama3 = load("llama3");
    assert!(!llama3.adds_bos(), "the shipped Llama-3 tokenizer.json adds no BOS");
    for (name, tok) in
        [("deepseek_v3", load("deepseek_v3")), ("llama3 (add_bos_token)", forced_llama3), ("llama3", llama3)]
    {
        let bos = tok.bos_token_id().expect("BOS id");
        if name != "llama3" {
            assert!(tok.adds_bos(), "{name}: the vocabulary adds BOS to plain text");
            assert_eq!(tok.encode("a", true).unwrap()[0], bos, "{name}");
        }
        assert!(tok.chat_template().source().contains("bos_token"), "{name}: the template writes BOS");
        let entry = recorded(&fixture, name.split(' ').next().unwrap());
        for case in entry["conversations"].as_array().unwrap() {
            let got = tok.encode_chat(&messages(case), case["add_generation_prompt"].as_bool().unwrap()).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{name}");
            assert_eq!(got[0], bos, "{name}: {got:?}");
            assert_eq!(got.iter().filter(|&&id| id == bos).count(), 1, "{name}: {got:?}");
        }
    }
    let qwen = load("qwen3");
    assert_eq!(qwen.bos_token_id(), None);
    assert!(!qwen.adds_bos());
}

/// A tiny random-weight model config whose vocabulary is the tokenizer's: DeepSeek-V3 for
/// DeepSeek's tokenizer, Qwen2 for Qwen3's (the closest architecture ragnode has), Llama
/// for Llama-3's. The weights mean nothing; the prompt ids are what is checked.
fn tiny_config(name: &str, vocab_size: u64) -> Value {
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": false, "hidden_act": "silu"
    });
    let o = cfg.as_object_mut().expect("object");
    match name {
        "qwen3" => {
            o.insert("architectures".into(), serde_json::json!(["Qwen2ForCausalLM"]));
            o.insert("model_type".into(), serde_json::json!("qwen2"));
        }
        "deepseek_v3" => {
            for (k, v) in [
                ("architectures", serde_json::json!(["DeepseekV3ForCausalLM"])),
                ("model_type", serde_json::json!("deepseek_v3")),
                ("num_hidden_layers", serde_json::json!(2)),
                ("num_key_value_heads", serde_json::json!(2)),
                ("moe_intermediate_size", serde_json::json!(32)),
                ("n_shared_experts", serde_json::json!(1)),
                ("n_routed_experts", serde_json::json!(4)),
                ("num_experts_per_tok", serde_json::json!(2)),
                ("routed_scaling_factor", serde_json::json!(2.5)),
                ("topk_method", serde_json::json!("noaux_tc")),
                ("scoring_func", serde_json::json!("sigmoid")),
                ("moe_layer_freq", serde_json::json!(1)),
                ("first_k_dense_replace", serde_json::json!(1)),
                ("norm_topk_prob", serde_json::json!(true)),
                ("n_group", serde_json::json!(2)),
                ("topk_group", serde_json::json!(1)),
                ("attention_bias", serde_json::json!(false)),
                ("q_lora_rank", serde_json::json!(32)),
                ("kv_lora_rank", serde_json::json!(32)),
                ("qk_rope_head_dim", serde_json::json!(8)),
                ("qk_nope_head_dim", serde_json::json!(16)),
                ("v_head_dim", serde_json::json!(16)),
            ] {
                o.insert(k.into(), v);
            }
        }
        _ => {}
    }
    cfg
}

/// A temp dir holding the real tokenizer files of `name` and a tiny config.json.
fn checkpoint_dir(name: &str, vocab_size: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = hf_tokenizer_dir(name);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), tiny_config(name, vocab_size).to_string()).unwrap();
    dir
}

/// The server prompts the model with transformers' ids: `POST /tokenize` (the same path
/// as a chat request) gives them for every recorded conversation, and a chat completion
/// reports that many prompt tokens.
#[test]
fn served_chat_prompt_ids_match_transformers() {
    let fixture = fixture();
    let faq = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
    for name in NAMES {
        let entry = recorded(&fixture, name);
        let dir = checkpoint_dir(name, entry["vocab_size"].as_u64().unwrap());
        let model = [
            "--dummy-weights".into(),
            dir.path().join("config.json").into_os_string(),
            "--dummy-format".into(),
            "f32".into(),
        ];
        let node = ServeProcess::start_model(dir.path(), &faq, &model, &["--served-model-name", "tiny"]);
        for case in entry["conversations"].as_array().unwrap() {
            let label = format!("{name} / {}", case["name"].as_str().unwrap_or("?"));
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let body = serde_json::json!({
                "model": "tiny", "messages": case["messages"], "add_generation_prompt": add_generation_prompt,
            });
            let r = http(&node.addr, "POST", "/tokenize", Some(&body.to_string()), None);
            assert_eq!(r.status, 200, "{label}: {}", r.body);
            let got: Value = serde_json::from_str(&r.body).unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(ids(&got["tokens"]), want, "{label}: served prompt ids vs transformers");
            assert_eq!(got["count"].as_u64(), Some(want.len() as u64), "{label}");
            if add_generation_prompt {
                let chat = serde_json::json!({ "model": "tiny", "messages": case["messages"], "max_tokens": 1 });
                let r = http(&node.addr, "POST", "/v1/chat/completions", Some(&chat.to_string()), None);
                assert_eq!(r.status, 200, "{label}: {}", r.body);
                let usage: Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(usage["usage"]["prompt_tokens"].as_u64(), Some(want.len() as u64), "{label}");
            }
        }
    }
}

/// `generate --chat --system S --prompt P --verbose-prompt` on a random-weight checkpoint
/// that carries the real tokenizer prints transformers' ids for that conversation.
#[test]
fn generate_chat_prompt_ids_match_transformers() {
    let fixture = fixture();
    for name in NAMES {
        let entry = recorded(&fixture, name);
        let case = entry["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "system_user")
            .expect("the system_user conversation");
        let msgs = messages(case);
        assert!(case["add_generation_prompt"].as_bool().unwrap(), "generate --chat adds the generation prompt");
        let (system, user) = match msgs.as_slice() {
            [s, u] if s.role == "system" && u.role == "user" => (&s.content, &u.content),
            other => panic!("{name}: expected system + user, got {other:?}"),
        };

        let dir = tempfile::tempdir().expect("temp dir");
        let src = hf_tokenizer_dir(name);
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
        }
        let config = dir.path().join("config.json");
        std::fs::write(&config, tiny_config(name, entry["vocab_size"].as_u64().unwrap()).to_string()).unwrap();

        let out = Command::new(ragnode_bin())
            .args(["--threads", "2", "generate", "--dummy-format", "f32", "--max-tokens", "1", "--dummy-weights"])
            .arg(&config)
            .args(["--chat", "--verbose-prompt", "--system", system, "--prompt", user])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: ragnode failed: {stderr}");
        let line = stderr
            .lines()
            .find_map(|l| l.strip_prefix("prompt ids: "))
            .unwrap_or_else(|| panic!("{name}: no `prompt ids:` line on stderr: {stderr}"));
        let printed: Vec<u32> = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {line:?}: {e}"));
        assert_eq!(printed, ids(&case["ids"]), "{name}: generate --chat prompt ids vs transformers");
        // The completion's own report counts the same prompt.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("[prompt tokens: {}, ", printed.len())), "{name}: {stdout}");
    }
}
