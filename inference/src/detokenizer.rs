//! Incremental detokenization: turns a growing list of token ids into text deltas that are
//! always whole characters.
//!
//! Byte-level tokenizers split multi-byte characters (Chinese, emoji) across tokens, and
//! decoding a lone piece yields U+FFFD. Like TGI and vLLM, we decode a short window twice —
//! up to the last emitted token and up to the newest — and emit the difference only when
//! the newer text does not end in a replacement character. Decoding a window rather than a
//! single token also keeps the spacing rules of SentencePiece-style decoders right.

/// Decodes ids to text, skipping special tokens.
pub trait TokenDecoder {
    fn decode_ids(&self, ids: &[u32]) -> Result<String, String>;
}

impl TokenDecoder for ragnode_models::tokenizer::ModelTokenizer {
    fn decode_ids(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids, true).map_err(|e| e.to_string())
    }
}

/// Prompt tokens used as left context for the first generated tokens.
const PROMPT_CONTEXT: usize = 6;

#[derive(Debug)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the text already emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let n = ids.len();
        Self { ids, prefix_offset: 0, read_offset: n }
    }

    /// Adds a token; returns the text it completes (often empty while a character is
    /// still partial).
    pub fn push(&mut self, id: u32, dec: &impl TokenDecoder) -> Result<String, String> {
        self.ids.push(id);
        let prefix = dec.decode_ids(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = dec.decode_ids(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(delta) = full.get(prefix.len()..)
        {
            let delta = delta.to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// The text still held back at the end of generation (possibly with U+FFFD, exactly
    /// as a full decode would show it).
    pub fn flush(&mut self, dec: &impl TokenDecoder) -> Result<String, String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = dec.decode_ids(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = dec.decode_ids(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose tokens are single bytes (like byte-level BPE pieces).
    struct Bytes;
    impl TokenDecoder for Bytes {
        fn decode_ids(&self, ids: &[u32]) -> Result<String, String> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    fn stream(text_bytes: &[u8]) -> (Vec<String>, String) {
        let mut d = IncrementalDecoder::new(&[]);
        let mut deltas = Vec::new();
        for &b in text_bytes {
            deltas.push(d.push(b as u32, &Bytes).unwrap());
        }
        deltas.push(d.flush(&Bytes).unwrap());
        let full = Bytes.decode_ids(&text_bytes.iter().map(|&b| b as u32).collect::<Vec<_>>()).unwrap();
        (deltas, full)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "退货政策是什么? 🙂 ok";
        let (deltas, full) = stream(text.as_bytes());
        assert_eq!(deltas.concat(), full);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn genuinely_invalid_bytes_show_as_the_full_decode_does() {
        let bytes = [b'a', 0xE9, 0x80, b'b', 0xF0, 0x9F];
        let (deltas, full) = stream(&bytes);
        assert_eq!(deltas.concat(), full);
    }
}
