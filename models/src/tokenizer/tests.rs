//! Unit tests on small synthetic vocabularies (the real ones run in
//! `tests/tokenizer_vectors.rs`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

use super::*;

fn content(md: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strs(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

fn ints(items: &[i32]) -> Value {
    Value::Array(items.iter().map(|&i| Value::I32(i)).collect())
}

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

const BPE_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "i", "Ġ", "hi", "Ġh", "Ġhi", "!"];
const BPE_TYPES: &[i32] = &[3, 3, 3, 1, 1, 1, 1, 1, 1, 1];
const BPE_MERGES: &[&str] = &["Ġ h", "h i", "Ġh i"];

fn byte_bpe(extra: Vec<(&'static str, Value)>) -> Content {
    let mut md = vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        ("tokenizer.ggml.tokens", strs(BPE_TOKENS)),
        ("tokenizer.ggml.token_type", ints(BPE_TYPES)),
        ("tokenizer.ggml.merges", strs(BPE_MERGES)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    for (k, v) in extra {
        md.retain(|(key, _)| *key != k);
        md.push((k, v));
    }
    content(md)
}

#[test]
fn byte_level_bpe_encodes_and_decodes() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![])).unwrap();
    assert_eq!(t.vocab_size(), BPE_TOKENS.len());
    assert_eq!(t.encode("hi hi!", false).unwrap(), [6, 8, 9]);
    assert_eq!(t.decode(&[6, 8, 9], false).unwrap(), "hi hi!");
    // Control tokens in text are single tokens, unless special parsing is off.
    assert_eq!(t.encode("<|im_start|>hi<|im_end|>", false).unwrap(), [1, 6, 2]);
    assert_ne!(
        t.encode_with("<|im_start|>", false, false).unwrap(),
        [1],
        "with parse_special off the text must not become the control token"
    );
    assert_eq!(t.decode(&[1, 6, 2], true).unwrap(), "hi");
    assert_eq!(t.decode(&[1, 6, 2], false).unwrap(), "<|im_start|>hi<|im_end|>");
    assert!(t.is_special(1) && !t.is_special(6));
    // eos plus the end-of-turn texts present as control tokens.
    assert_eq!(t.stop_token_ids(), [0, 2]);
    assert_eq!(t.bos_token_id(), Some(1));
    assert!(!t.adds_bos());
    assert_eq!(t.token_to_id("Ġhi"), Some(8));
    assert_eq!(t.id_to_token(8).as_deref(), Some("Ġhi"));
    // No template in the metadata, <|im_start|> in the vocabulary: ChatML.
    assert_eq!(
        t.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn add_bos_follows_metadata() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![("tokenizer.ggml.add_bos_token", Value::Bool(true))])).unwrap();
    assert_eq!(t.encode("hi", true).unwrap(), [1, 6]);
    assert_eq!(t.encode("hi", false).unwrap(), [6]);
    assert_eq!(t.inner().encode("hi", true).unwrap().get_ids(), [1, 6]);
}

#[test]
fn gguf_chat_template_is_used() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![(
        "tokenizer.chat_template",
        s("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"),
    )]))
    .unwrap();
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("x")], true).unwrap(), "<|im_start|>[user]x");
    let bad = ModelTokenizer::from_gguf(&byte_bpe(vec![("tokenizer.chat_template", s("ok\n{% for %}"))])).unwrap_err();
    assert!(matches!(bad, TokenizerError::TemplateSyntax { line: Some(2), .. }), "{bad}");
}

/// The chat prompt's BOS is the template's, as in `transformers`' `apply_chat_template`
/// (render, then encode with nothing added), whatever the vocabulary's `add_bos_token`.
/// The old render-then-strip-BOS path lost it: the text dropped the BOS and every caller
/// encoded without special tokens (issue 16, item 7).
#[test]
fn chat_prompt_bos_comes_from_the_template() {
    let with_bos_template = |add_bos: bool| {
        ModelTokenizer::from_gguf(&byte_bpe(vec![
            ("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
            ("tokenizer.chat_template", s("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")),
        ]))
        .unwrap()
    };
    let msgs = [ChatMessage::user("hi")];
    for add_bos in [true, false] {
        let t = with_bos_template(add_bos);
        assert_eq!(t.adds_bos(), add_bos);
        // The text is the template's exact output, BOS included...
        assert_eq!(t.apply_chat_template(&msgs, true).unwrap(), "<|im_start|>hi");
        assert_eq!(t.apply_chat_template(&msgs, true).unwrap(), t.chat_template().render(&msgs, true).unwrap());
        // ...and the ids hold it exactly once.
        assert_eq!(t.encode_chat(&msgs, true).unwrap(), [1, 6], "add_bos_token = {add_bos}");
    }
    // A template that writes no BOS gets none, even where plain text gets one; control
    // tokens it writes are parsed as such.
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.chat_template", s("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")),
    ]))
    .unwrap();
    assert_eq!(t.encode("hi", true).unwrap(), [1, 6]);
    assert_eq!(t.encode_chat(&msgs, true).unwrap(), [6, 2]);
}

#[test]
fn unknown_pre_falls_back_to_gpt2() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![("tokenizer.ggml.pre", s("brand-new-model"))])).unwrap();
    assert_eq!(t.encode("hi hi", false).unwrap(), [6, 8]);
}

#[test]
fn bad_metadata_gives_typed_errors() {
    let err = |c: Content| ModelTokenizer::from_gguf(&c).unwrap_err();

    let mut c = byte_bpe(vec![]);
    c.metadata.remove("tokenizer.ggml.tokens");
    let e = err(c);
    assert!(matches!(&e, TokenizerError::MissingKey(k) if k == "tokenizer.ggml.tokens"), "{e}");
    assert!(e.to_string().contains("tokenizer.ggml.tokens"));

    let mut c = byte_bpe(vec![]);
    c.metadata.remove("tokenizer.ggml.model");
    assert!(matches!(err(c), TokenizerError::MissingKey(k) if k == "tokenizer.ggml.model"));

    let mut c = byte_bpe(vec![]);
    c.metadata.remove("tokenizer.ggml.merges");
    assert!(matches!(err(c), TokenizerError::MissingKey(k) if k == "tokenizer.ggml.merges"));

    let e = err(byte_bpe(vec![("tokenizer.ggml.model", s("bert"))]));
    assert!(matches!(&e, TokenizerError::UnsupportedModel(m) if m == "bert"), "{e}");

    let e = err(byte_bpe(vec![("tokenizer.ggml.merges", strs(&["h i", "nospace"]))]));
    assert!(matches!(&e, TokenizerError::MalformedMerge { index: 1, merge } if merge == "nospace"), "{e}");

    let e = err(byte_bpe(vec![("tokenizer.ggml.tokens", Value::U32(3))]));
    assert!(matches!(e, TokenizerError::WrongType { .. }), "{e}");

    let e = err(byte_bpe(vec![("tokenizer.ggml.token_type", ints(&[1, 1]))]));
    assert!(matches!(e, TokenizerError::LengthMismatch { found: 2, .. }), "{e}");

    let e = err(byte_bpe(vec![("tokenizer.ggml.tokens", strs(&["a", "b", "a"]))]));
    assert!(matches!(e, TokenizerError::DuplicateToken { first: 0, second: 2, .. }), "{e}");

    let mut c = byte_bpe(vec![("tokenizer.ggml.add_bos_token", Value::Bool(true))]);
    c.metadata.remove("tokenizer.ggml.bos_token_id");
    assert!(matches!(err(c), TokenizerError::MissingSpecialToken { .. }));
}

#[test]
fn merges_outside_the_vocabulary_are_skipped() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![("tokenizer.ggml.merges", strs(&["Ġ h", "x y", "h i", "Ġh i"]))]))
        .unwrap();
    assert_eq!(t.encode("hi hi", false).unwrap(), [6, 8]);
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let t = ModelTokenizer::from_gguf(&byte_bpe(vec![])).unwrap();
    let e = t.decode(&[6, 10], false).unwrap_err();
    assert!(matches!(e, TokenizerError::IdOutOfRange { id: 10, vocab_size: 10 }), "{e}");
}

/// A tiny SentencePiece vocabulary: the scores decide the merge order.
fn spm() -> Content {
    let mut tokens = vec!["<unk>", "<s>", "</s>"];
    let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
    tokens.extend(bytes.iter().map(String::as_str));
    let words = ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello", "lo"];
    tokens.extend(words);
    let mut types = vec![2, 3, 3];
    types.extend(std::iter::repeat_n(6, 256));
    types.extend(std::iter::repeat_n(1, words.len()));
    let mut scores = vec![0.0f32; 3 + 256];
    scores.extend((0..words.len()).map(|i| -(i as f32)));
    content(vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", ints(&types)),
        ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ])
}

#[test]
fn sentencepiece_merges_by_score_with_byte_fallback() {
    let t = ModelTokenizer::from_gguf(&spm()).unwrap();
    let id = |tok: &str| t.token_to_id(tok).unwrap();
    // "▁hello": ▁h (score -5) beats ll (-6), then ▁he, ll, ▁hell, ▁hello.
    assert_eq!(t.encode("hello", false).unwrap(), [id("▁hello")]);
    // BOS by default for SentencePiece, a space prefix, and bytes for unknown characters.
    assert_eq!(t.encode("hello é", true).unwrap(), [1, id("▁hello"), id("▁"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(t.decode(&t.encode("hello é", true).unwrap(), true).unwrap(), "hello é");
    assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(t.stop_token_ids(), [2]);
    // No chat tokens: plain transcript fallback, with the SentencePiece bos text.
    assert_eq!(t.chat_template().bos_token(), Some("<s>"));
    assert_eq!(t.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap(), "User: hi\nAssistant:");
}

#[test]
fn sentencepiece_needs_scores() {
    let mut c = spm();
    c.metadata.remove("tokenizer.ggml.scores");
    assert!(matches!(
        ModelTokenizer::from_gguf(&c).unwrap_err(),
        TokenizerError::MissingKey(k) if k == "tokenizer.ggml.scores"
    ));
}

/// A scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ragnode-tokenizer-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn hf_files_with_configs() {
    let gguf = ModelTokenizer::from_gguf(&byte_bpe(vec![])).unwrap();
    let json = gguf.inner().to_string(false).unwrap();
    let dir = Scratch::new("hf");
    let tokenizer_json = dir.write("tokenizer.json", &json);
    let config = dir.write(
        "tokenizer_config.json",
        r#"{
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
            ]
        }"#,
    );
    let generation = dir.write("generation_config.json", r#"{"eos_token_id": [2, 0]}"#);
    let t = ModelTokenizer::from_hf_files(&tokenizer_json, Some(&config), Some(&generation)).unwrap();
    assert_eq!(t.bos_token_id(), Some(1));
    assert_eq!(t.eos_token_id(), Some(2));
    assert_eq!(t.encode("hi hi", true).unwrap(), [1, 6, 8]);
    assert_eq!(t.stop_token_ids(), [0, 2]);
    // The "default" entry of the template list, with the configured bos/eos texts; the
    // prompt ids keep the BOS the template writes, once (the vocabulary adds BOS too).
    let msgs = [ChatMessage::user("hi")];
    assert_eq!(t.chat_template().render(&msgs, true).unwrap(), "<|im_start|>hi<|im_end|>");
    assert_eq!(t.apply_chat_template(&msgs, true).unwrap(), "<|im_start|>hi<|im_end|>");
    assert_eq!(t.encode_chat(&msgs, true).unwrap(), [1, 6, 2]);

    // Without side files: the post-processor decides BOS, ChatML is the fallback template.
    let t = ModelTokenizer::from_hf_files(&tokenizer_json, None, None).unwrap();
    assert_eq!(t.encode("hi", true).unwrap(), [6]);
    assert!(t.apply_chat_template(&[ChatMessage::user("x")], false).unwrap().starts_with("<|im_start|>user"));

    let broken = dir.write("broken.json", "{ not json");
    assert!(matches!(
        ModelTokenizer::from_hf_files(&tokenizer_json, Some(&broken), None).unwrap_err(),
        TokenizerError::Config { .. }
    ));
    let missing = dir.0.join("missing.json");
    assert!(matches!(ModelTokenizer::from_hf_files(&missing, None, None).unwrap_err(), TokenizerError::Io { .. }));
}
