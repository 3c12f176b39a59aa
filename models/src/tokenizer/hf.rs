//! Loads a Hugging Face checkpoint's tokenizer files: `tokenizer.json` is used as is; the
//! side files say what it does not (chat template, which tokens are BOS/EOS, whether BOS is
//! prepended, and the extra stop ids of `generation_config.json`).

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::{ChatTemplate, Parts, TokenizerError, collect_stop_ids};

pub(crate) fn build(
    tokenizer_json: &Path,
    tokenizer_config: Option<&Path>,
    generation_config: Option<&Path>,
) -> Result<Parts, TokenizerError> {
    let bytes = std::fs::read(tokenizer_json)
        .map_err(|source| TokenizerError::Io { path: tokenizer_json.to_path_buf(), source })?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| TokenizerError::Config { path: tokenizer_json.to_path_buf(), message: e.to_string() })?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let config = tokenizer_config.map(read_json).transpose()?;
    let generation = generation_config.map(read_json).transpose()?;

    let token_field = |name: &str| -> Option<String> {
        match config.as_ref()?.get(name)? {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let in_range = |id: u32| {
        if (id as usize) < vocab_size {
            Some(id)
        } else {
            tracing::warn!(id, vocab_size, "generation_config token id outside the vocabulary, ignored");
            None
        }
    };
    let gen_ids = |name: &str| -> Vec<u32> {
        match generation.as_ref().and_then(|g| g.get(name)) {
            Some(Json::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Json::Array(items)) => items.iter().filter_map(Json::as_u64).collect(),
            _ => Vec::new(),
        }
        .into_iter()
        .filter_map(|id| u32::try_from(id).ok().and_then(in_range))
        .collect()
    };

    let bos_text = token_field("bos_token");
    let eos_text = token_field("eos_token");
    let bos =
        bos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)).or_else(|| gen_ids("bos_token_id").first().copied());
    let gen_eos = gen_ids("eos_token_id");
    let eos = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)).or_else(|| gen_eos.first().copied());

    // tokenizer_config's flags win; otherwise see what tokenizer.json's post-processor does.
    let flag = |name: &str| config.as_ref().and_then(|c| c.get(name)).and_then(Json::as_bool);
    let (probe_bos, probe_eos) = probe_post_processor(&tokenizer, bos, eos)?;
    let add_bos = flag("add_bos_token").unwrap_or(probe_bos) && bos.is_some();
    let add_eos = flag("add_eos_token").unwrap_or(probe_eos) && eos.is_some();

    let special: HashSet<u32> =
        tokenizer.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
    let stop_ids =
        collect_stop_ids(&tokenizer, eos.into_iter().chain(gen_eos.iter().copied()), |id| special.contains(&id));

    let bos_str = bos_text.or_else(|| bos.and_then(|id| tokenizer.id_to_token(id)));
    let eos_str = eos_text.or_else(|| eos.and_then(|id| tokenizer.id_to_token(id)));
    let source = match config.as_ref() {
        Some(c) => chat_template_field(c, tokenizer_config.expect("config was read"))?,
        None => None,
    }
    .or(read_template_file(tokenizer_json)?);
    let chat_template = match source {
        Some(source) => ChatTemplate::new(&source, bos_str.as_deref(), eos_str.as_deref())?,
        None => ChatTemplate::fallback(
            tokenizer.token_to_id("<|im_start|>").is_some(),
            bos_str.as_deref(),
            eos_str.as_deref(),
        ),
    };

    Ok(Parts { tokenizer, bos, eos, add_bos, add_eos, stop_ids, chat_template })
}

fn read_json(path: &Path) -> Result<Json, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    let value: Json = serde_json::from_slice(&bytes)
        .map_err(|e| TokenizerError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    if !value.is_object() {
        return Err(TokenizerError::Config { path: path.to_path_buf(), message: "expected a JSON object".to_string() });
    }
    Ok(value)
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn chat_template_field(config: &Json, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(items)) => {
            let named = |want: &str| {
                items.iter().find_map(|item| {
                    (item.get("name")?.as_str()? == want)
                        .then(|| item.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            match named("default") {
                Some(t) => Ok(Some(t)),
                None => Err(TokenizerError::Config {
                    path: path.to_path_buf(),
                    message: "chat_template is a list without a \"default\" entry".to_string(),
                }),
            }
        }
        Some(_) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            message: "chat_template must be a string or a list of {name, template}".to_string(),
        }),
    }
}

/// Recent `transformers` saves the template beside the tokenizer as `chat_template.jinja`.
fn read_template_file(tokenizer_json: &Path) -> Result<Option<String>, TokenizerError> {
    let Some(dir) = tokenizer_json.parent() else {
        return Ok(None);
    };
    let path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path, source }),
    }
}

/// Whether tokenizer.json's post-processor adds BOS / EOS around a sequence.
fn probe_post_processor(
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<(bool, bool), TokenizerError> {
    let with = tokenizer.encode_fast("a", true)?;
    let without = tokenizer.encode_fast("a", false)?;
    let (with, without) = (with.get_ids(), without.get_ids());
    let adds_bos = bos.is_some() && with.first().copied() == bos && without.first().copied() != bos;
    let adds_eos = eos.is_some() && with.last().copied() == eos && without.last().copied() != eos;
    Ok((adds_bos, adds_eos))
}
