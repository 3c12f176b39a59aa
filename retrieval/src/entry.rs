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
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EntryError {
    #[error("missing id")]
    MissingId,
    #[error("missing question")]
    MissingQuestion,
    #[error("field `{field}` is {bytes} bytes, over the {MAX_FIELD_BYTES}-byte limit")]
    TooLarge { field: &'static str, bytes: usize },
}

impl FaqEntry {
    /// Checks the entry can be indexed as given.
    pub fn validate(&self) -> Result<(), EntryError> {
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
