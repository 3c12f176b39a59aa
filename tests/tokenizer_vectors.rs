//! llama.cpp's tokenizer reference vectors (`ggml-vocab-NAME.gguf` with `.inp`/`.out`,
//! produced by Hugging Face `tokenizers` from the original models) against tokenizers
//! rebuilt from GGUF metadata, plus the real SmolLM2 model file.
//!
//! The cases are read exactly as llama.cpp's `tests/test-tokenizer-0.cpp` reads them:
//! inputs separated by "\n__ggml_vocab_test__\n" (the text after the last separator is
//! empty and dropped), one output line per case, tokenized with `add_special = false` and
//! `parse_special = false`.

use std::fmt::Write as _;
use std::path::Path;

use candle_core::quantized::gguf_file;
use ragnode_models::tokenizer::{ChatMessage, ModelTokenizer};

fn load(path: &Path) -> ModelTokenizer {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let content =
        gguf_file::Content::read(&mut file).unwrap_or_else(|e| panic!("reading GGUF {}: {e}", path.display()));
    ModelTokenizer::from_gguf(&content).unwrap_or_else(|e| panic!("building the tokenizer of {}: {e}", path.display()))
}

fn read_cases(vocab: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let path = vocab.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    };
    let (inp, out) = (read("inp"), read("out"));

    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(SEP) {
            Some(pos) => {
                inputs.push(rest[..pos].to_string());
                rest = &rest[pos + SEP.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace().map(|id| id.parse().unwrap_or_else(|e| panic!("bad id {id:?}: {e}"))).collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{}: {} inputs but {} outputs",
        vocab.display(),
        inputs.len(),
        outputs.len()
    );
    assert!(!inputs.is_empty(), "{}: no cases", vocab.display());
    inputs.into_iter().zip(outputs).collect()
}

/// `id "piece"` pairs, the first 40 of them.
fn show_ids(tok: &ModelTokenizer, ids: &[u32]) -> String {
    const SHOWN: usize = 40;
    let mut text = ids
        .iter()
        .take(SHOWN)
        .map(|&id| match tok.id_to_token(id) {
            Some(piece) => format!("{id} {piece:?}"),
            None => format!("{id} <?>"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        text.push_str(&format!(", ... ({} ids)", ids.len()));
    }
    text
}

/// The case text, cut to 200 characters.
fn show_text(text: &str) -> String {
    let cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() { format!("{cut:?}... ({} bytes)", text.len()) } else { format!("{cut:?}") }
}

/// Runs every case of `ggml-vocab-NAME.gguf`, failing with each mismatch spelled out.
fn check_vocab(name: &str) {
    let path = ragnode_tests::llama_vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    let tok = load(&path);
    let cases = read_cases(&path);
    let mut report = String::new();
    let mut failed = 0;
    for (index, (text, expected)) in cases.iter().enumerate() {
        let got = tok.encode_with(text, false, false).unwrap_or_else(|e| panic!("{name} case {index} {text:?}: {e}"));
        if &got != expected {
            failed += 1;
            let _ = writeln!(
                report,
                "case {index}: {}\n  expected: [{}]\n  got:      [{}]",
                show_text(text),
                show_ids(&tok, expected),
                show_ids(&tok, &got)
            );
        }
    }
    assert!(failed == 0, "{name}: {failed}/{} cases differ from llama.cpp's reference ids:\n{report}", cases.len());
    eprintln!("{name}: {n}/{n} cases pass", n = cases.len());
}

#[test]
fn qwen2() {
    check_vocab("qwen2");
}

#[test]
fn qwen35() {
    check_vocab("qwen35");
}

#[test]
fn llama_bpe() {
    check_vocab("llama-bpe");
}

#[test]
fn deepseek_llm() {
    check_vocab("deepseek-llm");
}

#[test]
fn deepseek_coder() {
    check_vocab("deepseek-coder");
}

#[test]
fn gpt_2() {
    check_vocab("gpt-2");
}

#[test]
fn starcoder() {
    check_vocab("starcoder");
}

#[test]
fn refact() {
    check_vocab("refact");
}

#[test]
fn falcon() {
    check_vocab("falcon");
}

#[test]
fn command_r() {
    check_vocab("command-r");
}

#[test]
fn mpt() {
    check_vocab("mpt");
}

#[test]
fn phi_3() {
    check_vocab("phi-3");
}

#[test]
fn llama_spm() {
    check_vocab("llama-spm");
}

#[test]
fn gemma_4() {
    check_vocab("gemma-4");
}

fn smollm2() -> ModelTokenizer {
    load(&ragnode_tests::smollm2_gguf())
}

#[test]
fn smollm2_round_trips_text() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    for text in [
        "Hello, world!",
        "  leading spaces and trailing  ",
        "Numbers 1234567 and symbols #$%&*",
        "Ünïcödé: 你好, мир, 🦙🚀",
        "line one\nline two\n\n\ttabbed",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
    // The digits of SmolLM2's pre-tokenizer ("smollm") are split one by one.
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4, "{}", show_ids(&tok, &ids));
    // SmolLM2 does not ask for BOS.
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("Hi", true).unwrap(), tok.encode("Hi", false).unwrap());
}

#[test]
fn smollm2_chat_tokens_and_template() {
    let tok = smollm2();
    let im_start = tok.token_to_id("<|im_start|>").expect("<|im_start|>");
    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), [im_start]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), [im_end]);
    assert!(tok.stop_token_ids().contains(&im_end), "{:?}", tok.stop_token_ids());
    assert!(tok.is_special(im_start) && tok.is_special(im_end));

    let messages = [ChatMessage::user("What is the capital of France?")];
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // SmolLM2's template writes no BOS and its vocabulary adds none: the prompt ids are the
    // text's, starting at the first <|im_start|>.
    let ids = tok.encode_chat(&messages, true).unwrap();
    assert_eq!(ids, tok.encode(&prompt, false).unwrap());
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&id| id == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);
    assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
    let visible = tok.decode(&ids, true).unwrap();
    assert!(!visible.contains("<|im_start|>") && visible.contains("capital of France"));

    // A system message replaces the default one.
    let prompt = tok.apply_chat_template(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")], false).unwrap();
    assert_eq!(prompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}
