//! Reasoning output through a real node: SmolLM2 served with a DeepSeek-R1-style chat
//! template (`--chat-template`), whose generation prompt opens `<think>`. The 135M model
//! never closes its reasoning, so a short answer is all reasoning: it must arrive as
//! `reasoning_content` (message and stream deltas), with `content` empty, and inline with
//! `reasoning_format: "none"`. (Where `</think>` falls, across tokens, is covered by
//! `serve::reasoning` and `serve::openai` unit tests.)

use ragnode_tests::{ServeProcess, http};
use serde_json::{Value, json};

/// DeepSeek-R1's template, shortened to the parts a plain conversation uses.
const R1_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}\
{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}\
{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}";

fn chat(node: &ServeProcess, extra: Value) -> (u16, String) {
    let mut body = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What is your return policy?"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = http(&node.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None);
    (r.status, r.body)
}

#[test]
fn reasoning_models_answer_with_reasoning_content() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("r1.jinja");
    std::fs::write(&template, R1_TEMPLATE).unwrap();
    let node = ServeProcess::start(&["--chat-template", template.to_str().unwrap()]);

    let (status, body) = chat(&node, json!({}));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let msg = &v["choices"][0]["message"];
    let reasoning = msg["reasoning_content"].as_str().expect("reasoning_content");
    assert!(!reasoning.trim().is_empty(), "{body}");
    assert!(msg["content"].is_null(), "unclosed reasoning leaves no content: {body}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Inline on request: the same greedy text, in content.
    let (status, body) = chat(&node, json!({"reasoning_format": "none"}));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(reasoning));
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none());

    // Streamed: the deltas carry reasoning_content and add up to the same text.
    let (status, body) = chat(&node, json!({"stream": true}));
    assert_eq!(status, 200, "{body}");
    let mut streamed = String::new();
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let v: Value = serde_json::from_str(line).unwrap();
        let d = &v["choices"][0]["delta"];
        streamed += d["reasoning_content"].as_str().unwrap_or("");
        assert!(d["content"].as_str().is_none_or(str::is_empty), "no content delta: {line}");
    }
    assert_eq!(streamed, reasoning);

    let (status, body) = chat(&node, json!({"reasoning_format": "hidden"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["param"], "reasoning_format");

    // The model's own template (no `</think>`): plain content.
    let plain = ServeProcess::start(&[]);
    let (_, body) = chat(&plain, json!({}));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none());
}
