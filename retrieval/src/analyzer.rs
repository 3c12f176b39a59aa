//! The text analyzer shared by indexing and querying: mixed Chinese/English text in, search
//! terms out.
//!
//! Width folding (full-width ASCII forms → ASCII, ideographic space → space, so "ＶＩＰ" is
//! one word "VIP") → jieba (search mode: long words also yield their dictionary sub-words,
//! so "退货政策" matches "退货") → drop punctuation/whitespace tokens → drop absurdly long
//! tokens → lowercase → English Snowball stemming ("refunds" = "refund"; CJK tokens pass
//! through unchanged). Token offsets are those of the original text, so snippets highlight
//! the stored text.

use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, Stemmer, TextAnalyzer, Token, TokenStream, Tokenizer,
};

/// Name under which the analyzer is registered on a shard's index.
pub const FAQ_ANALYZER: &str = "ragnode_faq";

/// Builds the analyzer (cheap: jieba's dictionary is loaded once per process).
pub fn faq_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(FaqTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The analyzed terms of `text`, in order (duplicates kept).
pub fn terms(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}

/// Full-width ASCII variants (U+FF01..U+FF5E) and the ideographic space as their ASCII
/// forms; everything else unchanged.
pub fn fold_width(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        '\u{3000}' => ' ',
        _ => c,
    }
}

/// jieba over the width-folded text, keeping tokens that hold a letter or digit (any
/// script), with offsets mapped back to the original text.
#[derive(Clone, Default)]
struct FaqTokenizer {
    jieba: tantivy_jieba::JiebaTokenizer,
    folded: String,
    /// Original byte offset of each byte of `folded`, plus one past the end.
    map: Vec<usize>,
    tokens: Vec<Token>,
}

impl Tokenizer for FaqTokenizer {
    type TokenStream<'a> = FaqTokenStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> FaqTokenStream<'a> {
        self.folded.clear();
        self.map.clear();
        self.tokens.clear();
        for (at, c) in text.char_indices() {
            let f = fold_width(c);
            self.folded.push(f);
            self.map.extend(std::iter::repeat_n(at, f.len_utf8()));
        }
        self.map.push(text.len());
        let mut inner = self.jieba.token_stream(&self.folded);
        while inner.advance() {
            let t = inner.token();
            if !t.text.chars().any(char::is_alphanumeric) {
                continue;
            }
            self.tokens.push(Token {
                offset_from: self.map[t.offset_from],
                offset_to: self.map[t.offset_to],
                position: self.tokens.len(),
                text: t.text.clone(),
                position_length: 1,
            });
        }
        FaqTokenStream { tokens: &mut self.tokens, next: 0 }
    }
}

struct FaqTokenStream<'a> {
    tokens: &'a mut [Token],
    next: usize,
}

impl TokenStream for FaqTokenStream<'_> {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_is_segmented_and_punctuation_dropped() {
        let t = terms(&mut faq_analyzer(), "退货政策是什么？");
        assert!(t.contains(&"退货".to_string()), "{t:?}");
        assert!(t.contains(&"政策".to_string()), "{t:?}");
        assert!(!t.iter().any(|w| w == "？" || w == "?"), "{t:?}");
    }

    #[test]
    fn english_is_lowercased_and_stemmed() {
        let t = terms(&mut faq_analyzer(), "Refunds for Shipping ORDERS");
        assert_eq!(t, ["refund", "for", "ship", "order"]);
    }

    #[test]
    fn mixed_and_fullwidth_text() {
        let t = terms(&mut faq_analyzer(), "ＶＩＰ会员的iPhone退款");
        assert!(t.contains(&"vip".to_string()), "{t:?}");
        assert!(t.contains(&"iphon".to_string()), "{t:?}");
        assert!(t.contains(&"退款".to_string()), "{t:?}");
    }

    #[test]
    fn offsets_point_into_the_original_text() {
        let text = "ＶＩＰ退款";
        let mut a = faq_analyzer();
        let mut s = a.token_stream(text);
        assert!(s.advance());
        let tok = s.token();
        assert_eq!(&text[tok.offset_from..tok.offset_to], "ＶＩＰ");
    }
}
