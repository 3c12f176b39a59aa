//! Highlighted snippets: the passage of a text with the most query terms, terms in
//! `<b>…</b>`, HTML-escaped. (Written here rather than taken from tantivy's snippet
//! generator because jieba's search mode emits overlapping tokens — "退货政策" and its
//! sub-word "退货" — which that generator cannot render.)

use std::collections::HashSet;

use tantivy::tokenizer::{TextAnalyzer, TokenStream};

/// Context kept before the first highlighted term, in characters.
const LEAD_CHARS: usize = 20;

/// Only this much of a text is searched for the snippet window (the rest of a long answer
/// is not re-analysed on the query path).
const SCAN_BYTES: usize = 64 << 10;

/// The best window of about `max_chars` characters of `text` (of its first [`SCAN_BYTES`]),
/// query terms highlighted.
pub fn highlight(analyzer: &mut TextAnalyzer, text: &str, query_terms: &HashSet<String>, max_chars: usize) -> String {
    let full_len = text.len();
    let mut end = SCAN_BYTES.min(full_len);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    let mut ranges = Vec::new();
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        let t = stream.token();
        if query_terms.contains(&t.text) {
            ranges.push((t.offset_from, t.offset_to));
        }
    }
    ranges.sort_unstable();
    // Merge overlapping or touching ranges.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    // Character boundaries, to cut windows in characters.
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let char_at = |byte: usize| bounds.partition_point(|&b| b < byte);
    let (start_char, end_char) = if merged.is_empty() {
        (0, max_chars.min(bounds.len() - 1))
    } else {
        // The window starting at a highlighted range that holds the most ranges.
        let mut best = (0, 0usize);
        for (i, &(a, _)) in merged.iter().enumerate() {
            let end = bounds[(char_at(a) + max_chars).min(bounds.len() - 1)];
            let count = merged[i..].iter().take_while(|r| r.1 <= end).count();
            if count > best.1 {
                best = (i, count);
            }
        }
        let first = char_at(merged[best.0].0);
        let start = first.saturating_sub(LEAD_CHARS);
        (start, (start + max_chars).min(bounds.len() - 1))
    };
    let (from, to) = (bounds[start_char], bounds[end_char]);
    let mut out = String::new();
    if from > 0 {
        out.push('…');
    }
    let mut at = from;
    for &(a, b) in merged.iter().filter(|r| r.0 >= from && r.1 <= to) {
        escape_into(&text[at..a], &mut out);
        out.push_str("<b>");
        escape_into(&text[a..b], &mut out);
        out.push_str("</b>");
        at = b;
    }
    escape_into(&text[at..to], &mut out);
    if to < full_len {
        out.push('…');
    }
    out
}

fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyzer::{faq_analyzer, terms};

    fn q(a: &mut TextAnalyzer, s: &str) -> HashSet<String> {
        terms(a, s).into_iter().collect()
    }

    #[test]
    fn overlapping_chinese_terms_merge_into_one_highlight() {
        let mut a = faq_analyzer();
        let terms = q(&mut a, "退货政策");
        let s = highlight(&mut a, "我们的退货政策是30天。", &terms, 100);
        assert_eq!(s, "我们的<b>退货政策</b>是30天。");
    }

    #[test]
    fn long_text_is_windowed_around_the_terms_and_escaped() {
        let mut a = faq_analyzer();
        let terms = q(&mut a, "warranty");
        let text = format!("{} The <warranty> lasts two years. {}", "x ".repeat(200), "y ".repeat(200));
        let s = highlight(&mut a, &text, &terms, 60);
        assert!(s.starts_with('…') && s.ends_with('…'), "{s}");
        assert!(s.contains("&lt;<b>warranty</b>&gt;"), "{s}");
        assert!(s.chars().count() <= 60 + 2 + 30, "{s}");
    }

    #[test]
    fn only_the_opening_of_a_huge_text_is_scanned() {
        let mut a = faq_analyzer();
        let terms = q(&mut a, "warranty");
        let text = format!("{}warranty", "退".repeat(SCAN_BYTES));
        let s = highlight(&mut a, &text, &terms, 40);
        assert!(!s.contains("<b>") && s.ends_with('…'), "{s}");
    }

    #[test]
    fn no_match_gives_the_opening() {
        let mut a = faq_analyzer();
        let terms = q(&mut a, "发票");
        assert_eq!(highlight(&mut a, "abc", &terms, 10), "abc");
    }
}
