//! Normalizer and pre-tokenizer per `tokenizer.ggml.pre`, for byte-level BPE vocabularies.
//!
//! llama.cpp's reference vectors were produced with the original models' Hugging Face
//! `tokenizer.json`, so each entry mirrors that file (a sequence of isolated regex splits,
//! `Digits`, byte-level mapping, NFC for Qwen...) rather than llama.cpp's hand-adapted
//! regexes, which only exist because `std::regex` lacks `(?i:...)` and `\p{..}`.

use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;

/// One pre-tokenization step, in the order the original `tokenizer.json` applies them.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `Split` with `Isolated` behaviour: matches and the text between them become pieces.
    Split(&'static str),
    /// `Digits`: `true` puts every digit on its own, `false` keeps runs together.
    Digits(bool),
    /// `Punctuation` with `Contiguous` behaviour (Falcon).
    Punctuation,
    /// `ByteLevel` with GPT-2's own split regex; when absent a regex-less `ByteLevel` ends
    /// the sequence.
    ByteLevelRegex,
}

/// How a `tokenizer.ggml.pre` value is tokenized.
#[derive(Clone, Copy, Debug)]
struct PreSpec {
    nfc: bool,
    steps: &'static [Step],
    /// Words found whole in the vocabulary skip the merges (Llama 3, Tekken).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` before `tokenizer.ggml.add_bos_token` overrides it.
    add_bos: bool,
}

impl PreSpec {
    const fn new(steps: &'static [Step]) -> Self {
        Self { nfc: false, steps, ignore_merges: false, add_bos: false }
    }
    const fn nfc(mut self) -> Self {
        self.nfc = true;
        self
    }
    const fn ignore_merges(mut self) -> Self {
        self.ignore_merges = true;
        self
    }
    const fn add_bos(mut self) -> Self {
        self.add_bos = true;
        self
    }
}

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const JAIS2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}";
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+";
const DEEPSEEK_LLM_PUNCT: &str = r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+";
const CJK_HANGUL: &str = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+";
const DEEPSEEK_V3_CJK: &str = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+";
const DEEPSEEK_V3_MAIN: &str = r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TINY_AYA_DIGITS: &str = r"\d{1,3}(?=(?:\d{3})*\b)";
const PORO: &str = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+";
const SEED_CODER: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const UFAKZEKA: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const MINICPM5: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const EXAONE_MOE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+";
const LINES: &str = r"[^\n]+|[\n]+";

const GPT2_STEPS: &[Step] = &[Step::ByteLevelRegex];
const GPT2: PreSpec = PreSpec::new(GPT2_STEPS);

/// The spec for a `tokenizer.ggml.pre` value, `None` when it is not known.
fn spec_for(pre: &str) -> Option<PreSpec> {
    use Step::*;
    let spec = match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "olmo"
        | "jais" | "trillion" | "granite-docling" => GPT2,
        "mpt" => GPT2.nfc(),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => PreSpec::new(&[Split(LLAMA3)]).ignore_merges().add_bos(),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => PreSpec::new(&[Split(LLAMA3)]),
        "jais-2" => PreSpec::new(&[Split(JAIS2)]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => PreSpec::new(&[Split(QWEN2)]).nfc(),
        "stablelm2" | "megrez" | "hunyuan" | "solar-open" | "grok-2" => PreSpec::new(&[Split(QWEN2)]),
        "qwen35" => PreSpec::new(&[Split(QWEN35)]),
        "deepseek-llm" => PreSpec::new(&[
            Split(r"[\r\n]"),
            Split(DEEPSEEK_LLM_LETTERS),
            Split(DEEPSEEK_LLM_PUNCT),
            Split(r"\s+$"),
            Split(CJK_HANGUL),
            Digits(true),
        ]),
        "deepseek-coder" => {
            PreSpec::new(&[Split(r"[\r\n]"), Split(r"\s?\p{L}+"), Split(r"\s?\p{P}+"), Split(CJK_HANGUL), Digits(true)])
        }
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            PreSpec::new(&[Split(r"\p{N}{1,3}"), Split(DEEPSEEK_V3_CJK), Split(DEEPSEEK_V3_MAIN)])
        }
        "falcon" => PreSpec::new(&[Punctuation, ByteLevelRegex, Digits(false), Split("[0-9][0-9][0-9]")]),
        "starcoder" | "refact" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            PreSpec::new(&[Digits(true), ByteLevelRegex])
        }
        "command-r" => PreSpec::new(&[Digits(true), ByteLevelRegex]).nfc(),
        "poro-chat" | "bloom" | "gpt3-finnish" => PreSpec::new(&[Split(PORO)]),
        "viking" => PreSpec::new(&[Split(PORO), Digits(true)]),
        "tekken" => PreSpec::new(&[Split(TEKKEN)]).ignore_merges().add_bos(),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PreSpec::new(&[Split(GPT4O)]),
        "tiny_aya" | "cohere2moe" => PreSpec::new(&[Split(TINY_AYA_DIGITS), Split(GPT4O)]),
        "seed-coder" => PreSpec::new(&[Split(SEED_CODER)]),
        "ufakzeka" => PreSpec::new(&[Split(UFAKZEKA)]),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => PreSpec::new(&[Split(BAILINGMOE)]),
        "minicpm5" => PreSpec::new(&[Split(r"\p{N}{1,3}"), Split(MINICPM5)]).ignore_merges(),
        "exaone-moe" => PreSpec::new(&[Split(EXAONE_MOE)]),
        "laguna" => PreSpec::new(&[Split(LINES), Split(QWEN2)]),
        _ => return None,
    };
    Some(spec)
}

/// The byte-level BPE front end chosen for a vocabulary.
pub(crate) struct BytePipeline {
    pub normalizer: Option<NormalizerWrapper>,
    pub pre_tokenizer: PreTokenizerWrapper,
    pub ignore_merges: bool,
    pub add_bos_default: bool,
}

/// Builds the front end for `pre` (`None`: the key is absent). Unknown values fall back to
/// GPT-2's regex, as llama.cpp does for a missing key, with a warning: the text still
/// round-trips, only the token boundaries may differ from the original model's.
pub(crate) fn byte_pipeline(pre: Option<&str>) -> Result<BytePipeline, TokenizerError> {
    let spec = match pre {
        None => {
            tracing::warn!(
                "GGUF has no tokenizer.ggml.pre: using the GPT-2 pre-tokenizer, token boundaries may differ from the original model"
            );
            GPT2
        }
        Some(pre) => spec_for(pre).unwrap_or_else(|| {
            tracing::warn!(
                pre,
                "unsupported tokenizer.ggml.pre: falling back to the GPT-2 pre-tokenizer, token boundaries may differ from the original model"
            );
            GPT2
        }),
    };
    let pre_name = pre.unwrap_or("default");
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.steps.len() + 1);
    let mut has_byte_level = false;
    for step in spec.steps {
        steps.push(match *step {
            Step::Split(regex) => {
                Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| TokenizerError::PreTokenizer { pre: pre_name.to_string(), message: e.to_string() })?
                    .into()
            }
            Step::Digits(individual) => Digits::new(individual).into(),
            Step::Punctuation => Punctuation::new(SplitDelimiterBehavior::Contiguous).into(),
            Step::ByteLevelRegex => {
                has_byte_level = true;
                ByteLevel::new(false, true, true).into()
            }
        });
    }
    if !has_byte_level {
        steps.push(ByteLevel::new(false, true, false).into());
    }
    let pre_tokenizer = if steps.len() == 1 { steps.pop().expect("one step") } else { Sequence::new(steps).into() };
    Ok(BytePipeline {
        normalizer: spec.nfc.then(|| NFC.into()),
        pre_tokenizer,
        ignore_merges: spec.ignore_merges,
        add_bos_default: spec.add_bos,
    })
}

/// Whether `pre` is a value this module maps (the rest fall back to GPT-2).
pub fn is_supported_pre(pre: &str) -> bool {
    spec_for(pre).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// Every `tokenizer.ggml.pre` value `spec_for` maps.
    fn supported_pres() -> &'static [&'static str] {
        &[
            "default",
            "gpt-2",
            "gpt2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "mpt",
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
            "glm4",
            "chatglm-bpe",
            "jais-2",
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "stablelm2",
            "megrez",
            "hunyuan",
            "solar-open",
            "grok-2",
            "qwen35",
            "deepseek-llm",
            "deepseek-coder",
            "deepseek-v3",
            "hunyuan-dense",
            "joyai-llm",
            "hy_v4",
            "falcon",
            "starcoder",
            "refact",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
            "command-r",
            "poro-chat",
            "bloom",
            "gpt3-finnish",
            "viking",
            "tekken",
            "gpt-4o",
            "llama4",
            "kanana2",
            "talkie",
            "minimax-m2",
            "tiny_aya",
            "cohere2moe",
            "seed-coder",
            "ufakzeka",
            "bailingmoe",
            "bailingmoe2",
            "llada-moe",
            "minicpm5",
            "exaone-moe",
            "laguna",
        ]
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let pipeline = byte_pipeline(Some(pre)).unwrap();
        let mut s = PreTokenizedString::from(text);
        pipeline.pre_tokenizer.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect()
    }

    #[test]
    fn every_listed_pre_compiles() {
        for pre in supported_pres() {
            assert!(is_supported_pre(pre), "{pre} listed but not mapped");
            byte_pipeline(Some(pre)).unwrap_or_else(|e| panic!("{pre}: {e}"));
            // Exercise the regexes once: lookarounds must be supported by the engine.
            pieces(pre, "Hello'Ve world 123\n\n  foo 你好 !!");
        }
    }

    #[test]
    fn qwen2_splits_digits_and_keeps_newlines_together() {
        assert_eq!(
            pieces("qwen2", "Hello'Ve world 123\n\n  foo"),
            ["Hello", "'Ve", "Ġworld", "Ġ", "1", "2", "3", "ĊĊ", "Ġ", "Ġfoo"]
        );
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(pieces("llama-bpe", "abc 12345"), ["abc", "Ġ", "123", "45"]);
    }

    #[test]
    fn unknown_pre_falls_back_to_gpt2() {
        assert!(!is_supported_pre("no-such-pre"));
        assert_eq!(pieces("no-such-pre", "Hello world 123"), ["Hello", "Ġworld", "Ġ123"]);
    }
}
