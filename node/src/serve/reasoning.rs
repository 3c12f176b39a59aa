//! DeepSeek-R1-style reasoning output: the text a reasoning model writes inside
//! `<think>…</think>` goes to `reasoning_content`, the rest to `content` (as DeepSeek's
//! API and vLLM's `deepseek_r1` parser do).
//!
//! R1 chat templates open `<think>\n` in the generation prompt, so the model's output
//! starts inside its reasoning, with or without repeating the opening tag; everything
//! before `</think>` is reasoning. An answer that never closes its reasoning (cut by
//! `max_tokens`) is all reasoning. Tags may arrive split over several deltas: a tail
//! that could be the start of a tag is held back until the next delta decides it.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Where a request wants reasoning text (`reasoning_format`, llama.cpp's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// Split into `reasoning_content` (the default for reasoning models).
    Deepseek,
    /// Leave it inline in `content`.
    None,
}

impl ReasoningFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "deepseek" | "parsed" => Some(Self::Deepseek),
            "none" | "inline" => Some(Self::None),
            _ => None,
        }
    }
}

/// Text of one delta, split.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Split {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

/// Splits a stream of text deltas into reasoning and content.
#[derive(Debug)]
pub struct ReasoningSplitter {
    thinking: bool,
    /// Nothing but whitespace seen in the reasoning yet (an opening tag there is dropped).
    at_reasoning_start: bool,
    /// No content character yet after `</think>` (the newlines after it are dropped).
    at_content_start: bool,
    /// Held-back text: may be the start of a tag.
    pending: String,
}

impl Default for ReasoningSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl ReasoningSplitter {
    pub fn new() -> Self {
        Self { thinking: true, at_reasoning_start: true, at_content_start: true, pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> Split {
        let mut out = Split::default();
        self.pending.push_str(delta);
        let mut text = std::mem::take(&mut self.pending);
        loop {
            if !self.thinking {
                self.emit_content(&text, &mut out);
                return out;
            }
            if self.at_reasoning_start {
                let trimmed = text.trim_start();
                if let Some(rest) = trimmed.strip_prefix(OPEN) {
                    text = rest.to_string();
                    self.at_reasoning_start = false;
                    continue;
                }
                if OPEN.starts_with(trimmed) && !trimmed.is_empty() {
                    self.pending = text; // maybe the opening tag, split
                    return out;
                }
            }
            if let Some(i) = text.find(CLOSE) {
                self.emit_reasoning(&text[..i], &mut out);
                self.thinking = false;
                text = text[i + CLOSE.len()..].to_string();
                continue;
            }
            let keep = partial_tag_len(&text, CLOSE);
            let cut = text.len() - keep;
            self.emit_reasoning(&text[..cut], &mut out);
            self.pending = text[cut..].to_string();
            return out;
        }
    }

    /// The end of the answer: whatever was held back.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        let text = std::mem::take(&mut self.pending);
        if self.thinking {
            self.emit_reasoning(&text, &mut out);
        } else {
            self.emit_content(&text, &mut out);
        }
        out
    }

    fn emit_reasoning(&mut self, s: &str, out: &mut Split) {
        if self.at_reasoning_start && !s.trim().is_empty() {
            self.at_reasoning_start = false;
        }
        out.reasoning.push_str(s);
    }

    fn emit_content(&mut self, s: &str, out: &mut Split) {
        let s = if self.at_content_start { s.trim_start_matches(['\n', '\r']) } else { s };
        if !s.is_empty() {
            self.at_content_start = false;
        }
        out.content.push_str(s);
    }

    /// Splits a whole answer.
    pub fn split_all(text: &str) -> Split {
        let mut s = Self::new();
        let mut out = s.push(text);
        let end = s.finish();
        out.reasoning.push_str(&end.reasoning);
        out.content.push_str(&end.content);
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` one by one; returns (reasoning, content) joined.
    fn feed(parts: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new();
        let (mut r, mut c) = (String::new(), String::new());
        for p in parts {
            let o = s.push(p);
            r += &o.reasoning;
            c += &o.content;
        }
        let o = s.finish();
        (r + &o.reasoning, c + &o.content)
    }

    #[test]
    fn reasoning_and_content_split_at_the_closing_tag() {
        let want = ("\nThey ask about returns.\n".to_string(), "30 days.".to_string());
        assert_eq!(feed(&["\nThey ask about returns.\n</think>\n\n30 days."]), want);
        // The model repeats the opening tag the template already wrote.
        assert_eq!(feed(&["<think>\nThey ask about returns.\n</think>\n\n30 days."]), want);
    }

    #[test]
    fn tags_split_over_deltas_every_way() {
        let text = "<think>\n推理：退货。\n</think>\n\n30天内可退。";
        let chars: Vec<char> = text.chars().collect();
        let whole = feed(&[text]);
        assert_eq!(whole, ("\n推理：退货。\n".to_string(), "30天内可退。".to_string()));
        // Every split point in two, and one char per delta.
        for i in 0..chars.len() {
            let a: String = chars[..i].iter().collect();
            let b: String = chars[i..].iter().collect();
            assert_eq!(feed(&[&a, &b]), whole, "split at {i}");
        }
        let singles: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        let singles: Vec<&str> = singles.iter().map(String::as_str).collect();
        assert_eq!(feed(&singles), whole);
        // Tokens as an R1 tokenizer cuts them.
        assert_eq!(feed(&["<", "think", ">\n推理：退货。\n</", "think", ">\n\n", "30天内可退。"]), whole);
    }

    #[test]
    fn unclosed_reasoning_and_near_misses() {
        assert_eq!(
            feed(&["still thinking when max_tokens hit"]),
            ("still thinking when max_tokens hit".into(), "".into())
        );
        // A `<` that is not a tag is released once it cannot be one.
        assert_eq!(feed(&["a < b", " </thin", "g> x</think>y"]), ("a < b </thing> x".into(), "y".into()));
        // Tags later in the content stay content.
        assert_eq!(feed(&["r</think>c <think>x</think>"]), ("r".into(), "c <think>x</think>".into()));
        assert_eq!(
            ReasoningSplitter::split_all("r</think>\n\nc"),
            Split { reasoning: "r".into(), content: "c".into() }
        );
    }

    #[test]
    fn reasoning_formats_parse() {
        assert_eq!(ReasoningFormat::parse("none"), Some(ReasoningFormat::None));
        assert_eq!(ReasoningFormat::parse("deepseek"), Some(ReasoningFormat::Deepseek));
        assert_eq!(ReasoningFormat::parse("x"), None);
    }
}
