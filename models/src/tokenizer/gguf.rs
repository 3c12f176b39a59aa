//! Rebuilds a model's tokenizer from GGUF metadata (`tokenizer.ggml.*`), following
//! llama.cpp's `llama_vocab::load` for which keys mean what.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::pretokenize::byte_pipeline;
use super::{ChatTemplate, END_OF_TURN_TOKENS, Parts, TokenizerError, collect_stop_ids};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_raw(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            // 0 (undefined) and anything unexpected behave as ordinary text.
            _ => Self::Normal,
        }
    }
}

/// The three tokenizer algorithms GGUF files carry that map onto `tokenizers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `gpt2`: byte-level BPE with merges.
    ByteBpe,
    /// `llama`: SentencePiece BPE with scores and `<0xNN>` byte fallback.
    Spm,
    /// `gemma4`: BPE over raw UTF-8 with `▁` for spaces and byte fallback.
    RawBpe,
}

pub(crate) fn build(content: &Content) -> Result<Parts, TokenizerError> {
    let md = &content.metadata;
    let model = get_str(md, KEY_MODEL)?.ok_or_else(|| missing(KEY_MODEL))?;
    let kind = match model {
        "gpt2" => Kind::ByteBpe,
        "llama" => Kind::Spm,
        "gemma4" => Kind::RawBpe,
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };

    let tokens = vocabulary(md)?;
    let n = tokens.len();
    let mut types = match get_array(md, KEY_TYPES)? {
        None => vec![TokenType::Normal; n],
        Some(values) => {
            check_len(KEY_TYPES, values.len(), n)?;
            values
                .iter()
                .take(n)
                .map(|v| as_i64(v).map(TokenType::from_raw).ok_or_else(|| wrong(KEY_TYPES, "an array of integers", v)))
                .collect::<Result<_, _>>()?
        }
    };
    // Converters often leave end-of-turn tokens as plain text; llama.cpp promotes them to
    // control tokens so they end generation and vanish from decoded output.
    for (id, token) in tokens.iter().enumerate() {
        if matches!(types[id], TokenType::Normal | TokenType::UserDefined)
            && END_OF_TURN_TOKENS.contains(&token.as_str())
        {
            types[id] = TokenType::Control;
        }
    }

    let vocab: Vocab = tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();

    let special_id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        let Some(id) = get_u32(md, key)? else {
            return Ok(None);
        };
        if (id as usize) < n {
            Ok(Some(id))
        } else {
            tracing::warn!(key, id, vocab_size = n, "special token id outside the vocabulary, ignored");
            Ok(None)
        }
    };
    let by_text = |text: &str| vocab.get(text).copied();
    let mut bos = special_id("tokenizer.ggml.bos_token_id")?;
    let mut eos = special_id("tokenizer.ggml.eos_token_id")?;
    let mut unk = special_id("tokenizer.ggml.unknown_token_id")?;
    let eot = special_id("tokenizer.ggml.eot_token_id")?;
    let eom = special_id("tokenizer.ggml.eom_token_id")?;
    if kind == Kind::Spm {
        // llama.cpp's SentencePiece defaults (bos 1, eos 2, unk 0), by text to be safe.
        bos = bos.or_else(|| by_text("<s>"));
        eos = eos.or_else(|| by_text("</s>"));
        unk = unk.or_else(|| by_text("<unk>"));
    }

    let pre = get_str(md, KEY_PRE)?;
    let mut add_bos_default = kind == Kind::Spm || kind == Kind::RawBpe;
    let (model, normalizer, pre_tokenizer, decoder) = match kind {
        Kind::ByteBpe => {
            let merges = merges(md, &vocab)?;
            let pipeline = byte_pipeline(pre)?;
            add_bos_default = pipeline.add_bos_default;
            let model =
                BPE::builder().vocab_and_merges(vocab.clone(), merges).ignore_merges(pipeline.ignore_merges).build()?;
            let decoder: DecoderWrapper = ByteLevelDecoder::new(false, false, false).into();
            (model, pipeline.normalizer, Some(pipeline.pre_tokenizer), decoder)
        }
        Kind::Spm => {
            let scores = scores(md, n)?;
            let add_space_prefix = get_bool(md, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
            let merges = spm_merges(&tokens, &scores, &vocab);
            let mut builder = BPE::builder().vocab_and_merges(vocab.clone(), merges).byte_fallback(true).fuse_unk(true);
            if let Some(unk) = unk {
                builder = builder.unk_token(tokens[unk as usize].clone());
            }
            let model = builder.build()?;
            let (normalizer, decoder) = spm_text_handling(add_space_prefix)?;
            (model, Some(normalizer), None, decoder)
        }
        Kind::RawBpe => {
            let merges = merges(md, &vocab)?;
            let mut builder = BPE::builder().vocab_and_merges(vocab.clone(), merges).byte_fallback(true);
            if let Some(unk) = unk {
                builder = builder.unk_token(tokens[unk as usize].clone());
            }
            let model = builder.build()?;
            let (normalizer, decoder) = spm_text_handling(false)?;
            (model, Some(normalizer), None, decoder)
        }
    };

    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(normalizer)?;
    tokenizer.with_pre_tokenizer(pre_tokenizer);
    tokenizer.with_decoder(Some(decoder));

    // Control and unknown-type tokens are special (matched in text only when parsing
    // special tokens, dropped by `decode(skip_special)`); user-defined ones are ordinary
    // added tokens, always matched whole, as Hugging Face does for its added tokens.
    let mut specials = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types[id] {
            TokenType::Control | TokenType::Unknown => {
                specials.push(AddedToken::from(token.clone(), true).normalized(false))
            }
            TokenType::UserDefined => user_defined.push(AddedToken::from(token.clone(), false).normalized(false)),
            _ => {}
        }
    }
    if !specials.is_empty() {
        tokenizer.add_special_tokens(specials)?;
    }
    if !user_defined.is_empty() {
        tokenizer.add_tokens(user_defined)?;
    }

    let add_bos = get_bool(md, KEY_ADD_BOS)?.unwrap_or(add_bos_default);
    let add_eos = get_bool(md, KEY_ADD_EOS)?.unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(TokenizerError::MissingSpecialToken { flag: KEY_ADD_BOS, what: "BOS" });
    }
    if add_eos && eos.is_none() {
        return Err(TokenizerError::MissingSpecialToken { flag: KEY_ADD_EOS, what: "EOS" });
    }
    // So that `inner().encode(text, true)` agrees with `ModelTokenizer::encode`.
    if let Some(processor) = template_processor(
        add_bos.then(|| bos.map(|id| (tokens[id as usize].as_str(), id))).flatten(),
        add_eos.then(|| eos.map(|id| (tokens[id as usize].as_str(), id))).flatten(),
    ) {
        tokenizer.with_post_processor(Some(processor));
    }

    let is_control = |id: u32| matches!(types.get(id as usize), Some(TokenType::Control | TokenType::UserDefined));
    let stop_ids = collect_stop_ids(&tokenizer, [eos, eot, eom].into_iter().flatten(), is_control);

    let bos_text = bos.map(|id| tokens[id as usize].as_str());
    let eos_text = eos.map(|id| tokens[id as usize].as_str());
    let chat_template = match chat_template_source(md)? {
        Some(source) => ChatTemplate::new(source, bos_text, eos_text)?,
        None => ChatTemplate::fallback(vocab.contains_key("<|im_start|>"), bos_text, eos_text),
    };

    Ok(Parts { tokenizer, bos, eos, add_bos, add_eos, stop_ids, chat_template })
}

/// `tokenizer.ggml.tokens`, with llama.cpp's checks: empty entries get a placeholder,
/// duplicates are an error (ids would silently alias).
fn vocabulary(md: &HashMap<String, Value>) -> Result<Vec<String>, TokenizerError> {
    let values = get_array(md, KEY_TOKENS)?.ok_or_else(|| missing(KEY_TOKENS))?;
    if values.is_empty() {
        return Err(TokenizerError::WrongType {
            key: KEY_TOKENS.to_string(),
            expected: "a non-empty array of strings",
            found: "an empty array".to_string(),
        });
    }
    let mut seen: HashMap<&str, u32> = HashMap::with_capacity(values.len());
    let mut tokens = Vec::with_capacity(values.len());
    for (id, v) in values.iter().enumerate() {
        let Value::String(s) = v else {
            return Err(wrong(KEY_TOKENS, "an array of strings", v));
        };
        if let Some(&first) = seen.get(s.as_str()) {
            return Err(TokenizerError::DuplicateToken { token: s.clone(), first, second: id as u32 });
        }
        seen.insert(s.as_str(), id as u32);
        if s.is_empty() {
            tracing::warn!(id, "empty token in GGUF vocabulary");
            tokens.push(format!("[EMPTY_{id}]"));
        } else {
            tokens.push(s.clone());
        }
    }
    Ok(tokens)
}

/// `tokenizer.ggml.merges` ("left right", split at the first space after the first byte as
/// llama.cpp does). Merges naming tokens absent from the vocabulary can never fire; they are
/// dropped (with a warning) instead of failing the load.
fn merges(md: &HashMap<String, Value>, vocab: &Vocab) -> Result<Vec<(String, String)>, TokenizerError> {
    let values = get_array(md, KEY_MERGES)?.ok_or_else(|| missing(KEY_MERGES))?;
    let mut merges = Vec::with_capacity(values.len());
    let mut dropped = 0usize;
    for (index, v) in values.iter().enumerate() {
        let Value::String(merge) = v else {
            return Err(wrong(KEY_MERGES, "an array of strings", v));
        };
        let split = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let Some(pos) = split.filter(|&p| p + 1 < merge.len()) else {
            return Err(TokenizerError::MalformedMerge { index, merge: merge.clone() });
        };
        let (left, right) = (&merge[..pos], &merge[pos + 1..]);
        let merged = format!("{left}{right}");
        if vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&merged) {
            merges.push((left.to_string(), right.to_string()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, "merges referring to tokens outside the vocabulary were ignored");
    }
    Ok(merges)
}

/// `tokenizer.ggml.scores` as f32 (llama.cpp also accepts i32).
fn scores(md: &HashMap<String, Value>, n: usize) -> Result<Vec<f32>, TokenizerError> {
    let values = get_array(md, KEY_SCORES)?.ok_or_else(|| missing(KEY_SCORES))?;
    check_len(KEY_SCORES, values.len(), n)?;
    values
        .iter()
        .take(n)
        .map(|v| match v {
            Value::F32(f) => Ok(*f),
            Value::F64(f) => Ok(*f as f32),
            other => as_i64(other).map(|i| i as f32).ok_or_else(|| wrong(KEY_SCORES, "an array of numbers", other)),
        })
        .collect()
}

/// Turns SentencePiece scores into BPE merges the way `transformers`' converter does
/// (`SentencePieceExtractor`): every split of a piece into two vocabulary pieces is a merge,
/// ranked by the merged piece's score (highest first, ties in vocabulary order). Merging
/// the best-scoring pair first is exactly SentencePiece BPE (and llama.cpp's) algorithm.
pub(crate) fn spm_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
    let mut local = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        local.clear();
        for (pos, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(pos);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((score, l, r, left.to_string(), right.to_string()));
            }
        }
        local.sort_by_key(|m| (m.1, m.2));
        ranked.append(&mut local);
    }
    // Stable: equal scores keep the vocabulary order built above.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

/// SentencePiece text handling: spaces become `▁` (plus one in front of the text when the
/// model adds a space prefix), and decoding undoes it, turning `<0xNN>` pieces into bytes.
fn spm_text_handling(add_space_prefix: bool) -> Result<(NormalizerWrapper, DecoderWrapper), TokenizerError> {
    let replace = Replace::new(" ", "▁")?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".to_string()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    Ok((normalizer, DecoderSequence::new(decoders).into()))
}

/// A post-processor adding BOS/EOS, when their texts can be written in a template.
fn template_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Option<TemplateProcessing> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    // Template pieces are parsed as `TEXT:TYPE_ID`; a colon in the text would be misread.
    if bos.iter().chain(eos.iter()).any(|(t, _)| t.contains(':') || t.starts_with('$')) {
        return None;
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    for (seq, type_id) in [("$A", 0), ("$B", 1)] {
        if let Some((t, id)) = bos {
            pair.push(format!("{t}:{type_id}"));
            if type_id == 0 {
                single.push(format!("{t}:0"));
                specials.push((t.to_string(), id));
            }
        }
        pair.push(format!("{seq}:{type_id}"));
        if type_id == 0 {
            single.push("$A:0".to_string());
        }
        if let Some((t, id)) = eos {
            pair.push(format!("{t}:{type_id}"));
            if type_id == 0 {
                single.push(format!("{t}:0"));
                if bos.map(|b| b.1) != Some(id) {
                    specials.push((t.to_string(), id));
                }
            }
        }
    }
    TemplateProcessing::builder().try_single(single).ok()?.try_pair(pair).ok()?.special_tokens(specials).build().ok()
}

/// The default chat template: `tokenizer.chat_template`, else the one named in
/// `tokenizer.chat_templates` called "default".
fn chat_template_source(md: &HashMap<String, Value>) -> Result<Option<&str>, TokenizerError> {
    if let Some(t) = get_str(md, KEY_CHAT_TEMPLATE)? {
        return Ok(Some(t));
    }
    get_str(md, "tokenizer.chat_template.default")
}

fn missing(key: &str) -> TokenizerError {
    TokenizerError::MissingKey(key.to_string())
}

fn check_len(key: &str, found: usize, expected: usize) -> Result<(), TokenizerError> {
    if found < expected {
        return Err(TokenizerError::LengthMismatch { key: key.to_string(), expected, found });
    }
    Ok(())
}

fn type_name(v: &Value) -> String {
    match v {
        Value::U8(_) => "u8".into(),
        Value::I8(_) => "i8".into(),
        Value::U16(_) => "u16".into(),
        Value::I16(_) => "i16".into(),
        Value::U32(_) => "u32".into(),
        Value::I32(_) => "i32".into(),
        Value::U64(_) => "u64".into(),
        Value::I64(_) => "i64".into(),
        Value::F32(_) => "f32".into(),
        Value::F64(_) => "f64".into(),
        Value::Bool(_) => "bool".into(),
        Value::String(_) => "a string".into(),
        Value::Array(a) => match a.first() {
            Some(first) => format!("an array of {}", type_name(first)),
            None => "an empty array".into(),
        },
    }
}

fn wrong(key: &str, expected: &'static str, found: &Value) -> TokenizerError {
    TokenizerError::WrongType { key: key.to_string(), expected, found: type_name(found) }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong(key, "a string", v)),
    }
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => as_i64(v).map(|i| Some(i != 0)).ok_or_else(|| wrong(key, "a bool", v)),
    }
}

/// An id key; a negative value (some converters write -1 for "none") reads as absent.
fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let i = as_i64(v).ok_or_else(|| wrong(key, "an integer", v))?;
            Ok(u32::try_from(i).ok())
        }
    }
}

fn get_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a [Value]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(wrong(key, "an array", v)),
    }
}
