//! One FAQ entry, as ingested and as returned.

use serde::{Deserialize, Serialize};

/// An FAQ entry. `id` is unique within the knowledge base and chosen by the caller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaqEntry {
    pub id: String,
    pub question: String,
    #[serde(default)]
    pub alt_questions: Vec<String>,
    #[serde(default)]
    pub answer: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// BCP-47-ish language tag ("zh", "en"); empty when unknown.
    #[serde(default)]
    pub lang: String,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub updated_at: i64,
}

/// Largest accepted text field (question, answer, one paraphrase): larger values are
/// rejected rather than truncated, so what is stored is what was given.
pub const MAX_FIELD_BYTES: usize = 1 << 20;

/// Why an entry cannot be indexed.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum EntryError {
    #[error("missing id")]
    MissingId,
    #[error("missing question")]
    MissingQuestion,
    #[error("missing answer: an entry without one would be served as an empty answer")]
    MissingAnswer,
    #[error("field `{field}` is {bytes} bytes, over the {MAX_FIELD_BYTES}-byte limit")]
    TooLarge { field: &'static str, bytes: usize },
    #[error(
        "the id {id:?} contains {what} (U+{code:04X}); ids are printable text without control, separator, zero-width or byte-order-mark characters, and without surrounding spaces"
    )]
    BadIdCharacter { id: String, what: &'static str, code: u32 },
}

impl EntryError {
    /// The entry field at fault (`alt_questions` for any paraphrase).
    pub fn field(&self) -> &'static str {
        match self {
            Self::MissingId | Self::BadIdCharacter { .. } => "id",
            Self::MissingQuestion => "question",
            Self::MissingAnswer => "answer",
            Self::TooLarge { field, .. } => field,
        }
    }
}

/// Why `c` may not appear in an id, if it may not: ids are keys in URLs, logs, audit
/// lines and the cluster's FAQ log, so two ids that look the same must be the same.
fn unprintable(c: char) -> Option<&'static str> {
    match c {
        '\u{2028}' | '\u{2029}' => Some("a line or paragraph separator"),
        '\u{FEFF}' => Some("a byte-order mark"),
        '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{00AD}' | '\u{180E}' => {
            Some("an invisible (zero-width) character")
        }
        '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => {
            Some("a text-direction control")
        }
        '\u{FFF9}'..='\u{FFFB}' | '\u{206A}'..='\u{206F}' => Some("a format control"),
        c if c.is_control() => Some("a control character"),
        _ => None,
    }
}

impl FaqEntry {
    /// Checks the entry can be indexed and served as given: the one check every way in
    /// (admin API, `faq ingest`, seeds, appends to the cluster's FAQ log) applies.
    pub fn validate(&self) -> Result<(), EntryError> {
        self.validate_indexable()?;
        let bad_id = |what, c: char| EntryError::BadIdCharacter { id: self.id.clone(), what, code: c as u32 };
        if let Some(c) = self.id.chars().find(|&c| unprintable(c).is_some()) {
            return Err(bad_id(unprintable(c).unwrap_or_default(), c));
        }
        if let Some(c) = self.id.chars().next().filter(|c| c.is_whitespace()) {
            return Err(bad_id("leading white space", c));
        }
        if let Some(c) = self.id.chars().next_back().filter(|c| c.is_whitespace()) {
            return Err(bad_id("trailing white space", c));
        }
        if self.answer.trim().is_empty() {
            return Err(EntryError::MissingAnswer);
        }
        Ok(())
    }

    /// The floor below which an entry cannot be indexed at all: an id, a question, sizes.
    /// Replaying the cluster's FAQ log checks only this, so every replica indexes what was
    /// acknowledged — also entries logged before [`validate`](Self::validate) was stricter
    /// (answer required, printable ids); retrieval skips answerless hits instead.
    pub fn validate_indexable(&self) -> Result<(), EntryError> {
        if self.id.trim().is_empty() {
            return Err(EntryError::MissingId);
        }
        if self.question.trim().is_empty() {
            return Err(EntryError::MissingQuestion);
        }
        let check = |field, s: &str| {
            if s.len() > MAX_FIELD_BYTES { Err(EntryError::TooLarge { field, bytes: s.len() }) } else { Ok(()) }
        };
        check("id", &self.id)?;
        check("question", &self.question)?;
        check("answer", &self.answer)?;
        check("category", &self.category)?;
        for a in &self.alt_questions {
            check("alt_questions", a)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, question: &str, answer: &str) -> FaqEntry {
        FaqEntry { id: id.into(), question: question.into(), answer: answer.into(), ..FaqEntry::default() }
    }

    #[test]
    fn entries_need_an_id_a_question_and_an_answer() {
        assert_eq!(entry("a", "Q?", "A.").validate(), Ok(()));
        assert_eq!(entry("退货-1", "退货政策是什么？", "30天").validate(), Ok(()));
        assert_eq!(entry(" ", "Q?", "A.").validate(), Err(EntryError::MissingId));
        assert_eq!(entry("a", "  ", "A.").validate(), Err(EntryError::MissingQuestion));
        let e = entry("a", "Q?", "").validate().unwrap_err();
        assert_eq!((e.clone(), e.field()), (EntryError::MissingAnswer, "answer"));
        assert_eq!(entry("a", "Q?", " \n\t").validate(), Err(EntryError::MissingAnswer));
    }

    #[test]
    fn ids_are_printable_text() {
        for (id, what) in [
            ("a\u{0}b", "control"),
            ("a\nb", "control"),
            ("a\u{7f}", "control"),
            ("a\u{2028}b", "separator"),
            ("\u{FEFF}a", "byte-order"),
            ("a\u{200B}b", "zero-width"),
            ("a\u{2060}", "zero-width"),
            ("a\u{202E}b", "direction"),
            (" a", "leading"),
            ("a\u{3000}", "trailing"),
        ] {
            let e = entry(id, "Q?", "A.").validate().unwrap_err();
            assert_eq!(e.field(), "id");
            assert!(e.to_string().contains(what), "{id:?}: {e}");
        }
        assert_eq!(entry("a b", "Q?", "A.").validate(), Ok(()), "inner spaces are printable");
    }
}
