//! Tokenizers from GGUF metadata or `tokenizer.json`, and chat templates.
//!
//! Every model is turned into a [`tokenizers::Tokenizer`] configured like the original
//! model's Hugging Face `tokenizer.json`: GGUF keeps only the vocabulary, merges/scores and
//! the name of the pre-tokenizer (`tokenizer.ggml.pre`), so [`gguf`] rebuilds the rest from
//! a table ([`pretokenize`]). That makes token ids match llama.cpp's reference vectors (which
//! were produced by Hugging Face `tokenizers`) and what the model saw in training.

mod chat_template;
mod gguf;
mod hf;
mod pretokenize;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;

pub use chat_template::{CHATML_TEMPLATE, ChatMessage, ChatTemplate, PLAIN_TEMPLATE};
pub use pretokenize::is_supported_pre;

/// Token texts that end a turn in some model family. llama.cpp treats them as
/// end-of-generation whatever the metadata says, since converters often forget to list them.
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<｜end▁of▁sentence｜>",
];

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` should be {expected}, found {found}")]
    WrongType { key: String, expected: &'static str, found: String },
    #[error("GGUF metadata key `{key}` has {found} entries, the vocabulary has {expected} tokens")]
    LengthMismatch { key: String, expected: usize, found: usize },
    #[error(
        "unsupported tokenizer.ggml.model `{0}` (supported: `gpt2` byte-level BPE, `llama` SentencePiece, `gemma4`)"
    )]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.merges[{index}] = {merge:?} is malformed: expected two tokens separated by a space")]
    MalformedMerge { index: usize, merge: String },
    #[error("token {token:?} appears twice in the vocabulary, at ids {first} and {second}")]
    DuplicateToken { token: String, first: u32, second: u32 },
    #[error("`{flag}` is set but no {what} token id is known")]
    MissingSpecialToken { flag: &'static str, what: &'static str },
    #[error("pre-tokenizer for tokenizer.ggml.pre = `{pre}` does not build: {message}")]
    PreTokenizer { pre: String, message: String },
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("chat template does not compile{}: {message}", at_line(*.line))]
    TemplateSyntax { line: Option<usize>, message: String },
    #[error("chat template failed to render{}: {message}", at_line(*.line))]
    TemplateRender { line: Option<usize>, message: String },
    #[error("tokenizer: {0}")]
    Tokenizers(#[source] tokenizers::Error),
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(e: tokenizers::Error) -> Self {
        Self::Tokenizers(e)
    }
}

/// Everything the two loaders work out; [`ModelTokenizer`] adds the lazily built
/// no-special-parsing copy.
pub(crate) struct Parts {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub stop_ids: Vec<u32>,
    pub chat_template: ChatTemplate,
}

/// A model's tokenizer: text ↔ ids, its special tokens and its chat template.
#[derive(Clone)]
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special-token matching off, built on first use: text that
    /// merely spells `<|im_start|>` must not become the control token (llama.cpp's
    /// `parse_special = false`).
    literal: OnceLock<tokenizers::Tokenizer>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    stop_ids: Vec<u32>,
    special: Vec<bool>,
    chat_template: ChatTemplate,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

impl ModelTokenizer {
    /// Builds from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        Ok(Self::from_parts(gguf::build(content)?))
    }

    /// Builds from a Hugging Face checkpoint's `tokenizer.json`, with `tokenizer_config.json`
    /// (chat template, bos/eos, `add_bos_token`) and `generation_config.json` (`eos_token_id`,
    /// possibly a list) when present.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        Ok(Self::from_parts(hf::build(tokenizer_json, tokenizer_config, generation_config)?))
    }

    /// A stand-in for models without a tokenizer (random-weight checkpoints made from a
    /// config alone): token `i` is the word `<i>`, ids 0/1/2 are unk/bos/eos, text is split
    /// on whitespace and unknown words map to unk. Enough to drive the engine and measure
    /// speed; the text it decodes means nothing.
    pub fn placeholder(vocab_size: usize) -> Result<Self, TokenizerError> {
        use tokenizers::models::wordlevel::WordLevel;
        let vocab_size = vocab_size.max(3);
        let vocab: std::collections::HashMap<String, u32> =
            (0..vocab_size as u32).map(|i| (format!("<{i}>"), i)).collect();
        let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<0>".into()).build()?;
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        Ok(Self::from_parts(Parts {
            tokenizer,
            bos: Some(1),
            eos: Some(2),
            add_bos: true,
            add_eos: false,
            stop_ids: vec![2],
            chat_template: ChatTemplate::plain(Some("<1>"), Some("<2>")),
        }))
    }

    fn from_parts(parts: Parts) -> Self {
        let vocab_size = parts.tokenizer.get_vocab_size(true);
        let mut special = vec![false; vocab_size];
        for (id, token) in parts.tokenizer.get_added_tokens_decoder() {
            if token.special
                && let Some(slot) = special.get_mut(id as usize)
            {
                *slot = true;
            }
        }
        Self {
            inner: parts.tokenizer,
            literal: OnceLock::new(),
            bos: parts.bos,
            eos: parts.eos,
            add_bos: parts.add_bos,
            add_eos: parts.add_eos,
            stop_ids: parts.stop_ids,
            special,
            chat_template: parts.chat_template,
        }
    }

    /// Encodes text. `add_special` adds BOS (and EOS) where the model's vocabulary asks for
    /// it, like llama.cpp's `add_special`. Special tokens written in the text (e.g.
    /// `<|im_start|>` in a rendered chat prompt) become single tokens. Chat prompts come
    /// from [`encode_chat`](Self::encode_chat), where the template alone places BOS.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, add_special, true)
    }

    /// [`encode`](Self::encode) with control over special-token parsing: with
    /// `parse_special = false` text such as `<|im_start|>` is tokenized as ordinary
    /// characters (user-defined tokens still match), which is how user input should be
    /// treated and how llama.cpp's reference vectors were made.
    pub fn encode_with(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            self.literal.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        let encoding = tokenizer.encode_fast(text, false)?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        if add_special
            && self.add_eos
            && let Some(eos) = self.eos
        {
            out.push(eos);
        }
        Ok(out)
    }

    /// Decodes ids to text; `skip_special` drops control tokens (BOS, `<|im_end|>`...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::IdOutOfRange { id, vocab_size });
        }
        Ok(self.inner.decode(ids, skip_special)?)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Every id that ends generation: EOS plus the end-of-turn tokens known from metadata,
    /// config or the vocabulary (see [`END_OF_TURN_TOKENS`]). Sorted, without duplicates.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn is_stop_token(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// Whether `id` is a special (control) token, the kind `decode(.., true)` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of a vocabulary entry, in the vocabulary's own spelling (byte-level BPE
    /// writes a leading space as `Ġ`, SentencePiece as `▁`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of an id, in the vocabulary's own spelling.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat_template
    }

    /// The same tokenizer with another chat template (a deployment's override).
    pub fn with_chat_template(mut self, template: ChatTemplate) -> Self {
        self.chat_template = template;
        self
    }

    /// Renders the conversation with the model's chat template: the template's exact output
    /// ([`ChatTemplate::render`]), BOS included when the template writes one. This is the
    /// text [`encode_chat`](Self::encode_chat) tokenizes, and what `transformers`'
    /// `apply_chat_template(.., tokenize=False)` returns. To get prompt ids use
    /// `encode_chat`, not `encode(text, true)`: that would add a second BOS.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.chat_template.render(messages, add_generation_prompt)
    }

    /// The prompt ids of a conversation: the ids of `transformers`'
    /// `tokenizer.apply_chat_template(messages, add_generation_prompt=.., tokenize=True)`.
    /// Like it, this renders the template with the model's `bos_token`/`eos_token` and
    /// encodes the text with special tokens parsed (the `<|im_start|>`s the template wrote
    /// become control tokens) and nothing added (`add_special_tokens=False`): the template
    /// alone decides where BOS goes. So a template that writes `{{ bos_token }}` gets exactly
    /// one BOS whether or not the vocabulary adds BOS to plain text (DeepSeek-V3, Llama-3),
    /// and one that does not (ChatML: SmolLM2, Qwen) gets none. Every chat prompt should
    /// come from here, so that prompts match what the model was trained and evaluated on.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_rendered_chat(&self.apply_chat_template(messages, add_generation_prompt)?)
    }

    /// The ids of a chat prompt already rendered by [`apply_chat_template`](Self::apply_chat_template)
    /// — for callers that look at the text between the two steps (the server refuses a
    /// prompt too long for the context before tokenizing it). Same rule as
    /// [`encode_chat`](Self::encode_chat).
    pub fn encode_rendered_chat(&self, rendered: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(rendered, false)
    }
}

/// Collects stop ids: the given ones plus every end-of-turn text present as an added token.
pub(crate) fn collect_stop_ids(
    tokenizer: &tokenizers::Tokenizer,
    known: impl IntoIterator<Item = u32>,
    is_control: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let mut ids: Vec<u32> = known.into_iter().collect();
    for text in END_OF_TURN_TOKENS {
        if let Some(id) = tokenizer.token_to_id(text)
            && is_control(id)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests;
