//! The shard's tantivy schema, in one place.

use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};

use crate::analyzer::FAQ_ANALYZER;

/// Fields of an FAQ entry document.
#[derive(Clone, Copy, Debug)]
pub struct FaqFields {
    /// Caller-chosen unique id (raw term: upserts and deletes address it).
    pub id: Field,
    pub question: Field,
    /// Multi-valued: one value per paraphrase.
    pub alt_questions: Field,
    pub answer: Field,
    /// Raw terms, for filters.
    pub category: Field,
    pub tags: Field,
    pub lang: Field,
    /// Seconds since the Unix epoch.
    pub updated_at: Field,
}

impl FaqFields {
    pub fn build() -> (Schema, FaqFields) {
        let mut b = Schema::builder();
        let text = TextOptions::default().set_stored().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(FAQ_ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        );
        let fields = FaqFields {
            id: b.add_text_field("id", STRING | STORED),
            question: b.add_text_field("question", text.clone()),
            alt_questions: b.add_text_field("alt_questions", text.clone()),
            answer: b.add_text_field("answer", text),
            category: b.add_text_field("category", STRING | STORED),
            tags: b.add_text_field("tags", STRING | STORED),
            lang: b.add_text_field("lang", STRING | STORED),
            updated_at: b.add_i64_field("updated_at", INDEXED | STORED | FAST),
        };
        (b.build(), fields)
    }

    /// Resolves the fields of an existing index's schema (checks it is a FAQ shard).
    pub fn from_schema(schema: &Schema) -> Result<FaqFields, String> {
        let f = |name: &str| schema.get_field(name).map_err(|_| format!("not an FAQ shard: no field `{name}`"));
        Ok(FaqFields {
            id: f("id")?,
            question: f("question")?,
            alt_questions: f("alt_questions")?,
            answer: f("answer")?,
            category: f("category")?,
            tags: f("tags")?,
            lang: f("lang")?,
            updated_at: f("updated_at")?,
        })
    }
}
