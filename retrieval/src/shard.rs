//! `FaqShard`: one node's share of the FAQ knowledge base, a tantivy index on disk.
//!
//! Lifecycle: [`FaqShard::open`] creates or opens the index in a directory with a reader;
//! the index's single writer (tantivy's directory lock keeps a second one out) is taken at
//! the first write, so read-only users (`ragnode faq search` beside a running ingest)
//! never contend for it.
//! Writes are staged with [`FaqShard::stage`] / [`FaqShard::stage_delete`] and made durable
//! by [`FaqShard::commit`] (tantivy fsyncs the segments and the meta file before it
//! returns), after which the reader is reloaded and the hot-answer cache cleared. The
//! convenience calls [`FaqShard::upsert`] and [`FaqShard::delete`] commit at once.
//!
//! Search ranks with BM25 over question, paraphrases and answer (field boosts in
//! [`SearchBoosts`]), and returns per hit the matched field, a highlighted snippet and a
//! confidence (see [`FaqHit::confidence`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{DocSet, Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

use crate::analyzer::{FAQ_ANALYZER, faq_analyzer, terms};
use crate::cache::{CacheCounters, DEFAULT_CAPACITY, DEFAULT_TTL, HotAnswerCache, normalize_question};
use crate::entry::{EntryError, FaqEntry};
use crate::schema::FaqFields;
use crate::snippet::highlight;

/// Extra hits fetched beyond k to settle equal scores at the cut by id.
const TIE_WINDOW: usize = 16;

/// Length of a hit's snippet, in characters.
const SNIPPET_CHARS: usize = 160;

/// Errors of shard operations.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("index at {path}: {source}")]
    Open { path: PathBuf, source: tantivy::TantivyError },
    #[error("index at {path}: {reason}")]
    NotAShard { path: PathBuf, reason: String },
    #[error("entry {id:?}: {source}")]
    InvalidEntry { id: String, source: EntryError },
    #[error(transparent)]
    Index(#[from] tantivy::TantivyError),
}

pub type Result<T> = std::result::Result<T, ShardError>;

/// Confidence at which the top hit is taken to answer the question. Chosen on the
/// StackFAQ evaluation set (`faq-eval`, see `benches/RESULTS.md`): top-1 precision is 0.70
/// over all queries, 0.90 at ≥ 0.4 and 0.945 at ≥ 0.5 (18% of queries). On the BQ set no
/// threshold separates right from wrong (precision ≈ 0.1 throughout: its paraphrases
/// share few words), so callers should treat a low confidence as "hand to the LLM or a
/// person", not as "no answer exists".
pub const CONFIDENT: f32 = 0.5;

/// Field weights of the ranking (multipliers on each field's BM25 score).
#[derive(Clone, Copy, Debug)]
pub struct SearchBoosts {
    pub question: f32,
    pub alt_questions: f32,
    pub answer: f32,
}

impl Default for SearchBoosts {
    fn default() -> Self {
        Self { question: 2.0, alt_questions: 1.5, answer: 1.0 }
    }
}

/// Shard settings.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Hot-answer cache size in queries (0 disables it).
    pub cache_capacity: usize,
    pub cache_ttl: Duration,
    /// Indexing memory budget of the writer.
    pub writer_memory_bytes: usize,
    pub boosts: SearchBoosts,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            cache_capacity: DEFAULT_CAPACITY,
            cache_ttl: DEFAULT_TTL,
            writer_memory_bytes: 64 << 20,
            boosts: SearchBoosts::default(),
        }
    }
}

/// What to search for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchOptions {
    pub k: usize,
    pub category: Option<String>,
    pub lang: Option<String>,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self { k: 5, category: None, lang: None }
    }
}

/// Which field a hit matched best.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedField {
    Question,
    AltQuestion,
    Answer,
}

/// One search result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaqHit {
    pub id: String,
    /// BM25 score on this shard's statistics.
    pub score: f32,
    pub question: String,
    pub answer: String,
    pub category: String,
    pub lang: String,
    pub matched_field: MatchedField,
    /// The best passage of the matched field, query terms in `<b>…</b>`.
    pub snippet: String,
    /// How much of the query the hit's question (or best paraphrase) covers, in [0, 1]:
    /// the IDF-weighted share of the query's distinct terms found in it. Rare terms
    /// ("发票", "warranty") weigh more than common ones ("的", "how"). At or above
    /// [`CONFIDENT`] the top hit is taken to answer the question.
    pub confidence: f32,
}

/// BM25 statistics of a corpus — one shard, or several [`merge`](CorpusStats::merge)d —
/// for one query's terms: the "DFS" step of a distributed search. Shards that score with
/// the same merged statistics ([`FaqShard::search_with_stats`]) give the scores one index
/// holding all their entries would give, so their hits merge by score
/// ([`merge_hits`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CorpusStats {
    /// Documents, deleted ones included until merged away (what tantivy's BM25 counts).
    pub max_docs: u64,
    /// Live documents (for confidence).
    pub num_docs: u64,
    /// Tokens per field name (text and filter fields).
    pub total_tokens: BTreeMap<String, u64>,
    /// Document frequency by `field \u{1} term` (the query's terms in the text fields, its
    /// filter values in theirs).
    pub doc_freqs: BTreeMap<String, u64>,
}

impl CorpusStats {
    /// Adds another shard's statistics (for the same query).
    pub fn merge(&mut self, other: &CorpusStats) {
        self.max_docs += other.max_docs;
        self.num_docs += other.num_docs;
        for (k, v) in &other.total_tokens {
            *self.total_tokens.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.doc_freqs {
            *self.doc_freqs.entry(k.clone()).or_default() += v;
        }
    }

    fn key(field: &str, term: &str) -> String {
        format!("{field}\u{1}{term}")
    }

    fn df(&self, field: &str, term: &str) -> u64 {
        self.doc_freqs.get(&Self::key(field, term)).copied().unwrap_or(0)
    }
}

/// Scores with [`CorpusStats`] instead of the local index's.
struct StatsProvider<'a> {
    stats: &'a CorpusStats,
    schema: tantivy::schema::Schema,
}

impl tantivy::query::Bm25StatisticsProvider for StatsProvider<'_> {
    fn total_num_tokens(&self, field: tantivy::schema::Field) -> tantivy::Result<u64> {
        Ok(self.stats.total_tokens.get(self.schema.get_field_name(field)).copied().unwrap_or(0))
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        Ok(self.stats.max_docs)
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        let field = self.schema.get_field_name(term.field());
        Ok(term.value().as_str().map_or(0, |t| self.stats.df(field, t)))
    }
}

fn idf_of(n: f32, df: f32) -> f32 {
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// Merges several shards' hits (scored with the same [`CorpusStats`]) into the top `k`:
/// by score, ties by id, so every node merges to the same list.
pub fn merge_hits(lists: impl IntoIterator<Item = Vec<FaqHit>>, k: usize) -> Vec<FaqHit> {
    let mut all: Vec<FaqHit> = lists.into_iter().flatten().collect();
    sort_hits(&mut all);
    all.truncate(k);
    all
}

fn sort_hits(hits: &mut [FaqHit]) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
}

/// Shard-level figures.
#[derive(Clone, Debug, Serialize)]
pub struct ShardStats {
    pub num_docs: u64,
    pub segments: usize,
    pub cache_entries: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// A FAQ shard on disk.
pub struct FaqShard {
    path: PathBuf,
    index: Index,
    reader: IndexReader,
    /// Taken at the first write.
    writer: Mutex<Option<IndexWriter>>,
    writer_memory_bytes: usize,
    fields: FaqFields,
    analyzer: TextAnalyzer,
    cache: HotAnswerCache<Vec<FaqHit>>,
    /// Bumped by every commit: a search that started before a commit does not cache its
    /// (older) hits after it.
    epoch: std::sync::atomic::AtomicU64,
    boosts: SearchBoosts,
}

impl FaqShard {
    /// Opens the shard in `dir`, creating an empty one if the directory has none.
    pub fn open(dir: impl AsRef<Path>, config: &ShardConfig) -> Result<Self> {
        let path = dir.as_ref().to_path_buf();
        let open_err = |source| ShardError::Open { path: path.clone(), source };
        std::fs::create_dir_all(&path).map_err(|e| open_err(e.into()))?;
        let (schema, _) = FaqFields::build();
        let mmap =
            tantivy::directory::MmapDirectory::open(&path).map_err(|e| open_err(tantivy::TantivyError::from(e)))?;
        let index = Index::open_or_create(mmap, schema).map_err(open_err)?;
        let fields = FaqFields::from_schema(&index.schema())
            .map_err(|reason| ShardError::NotAShard { path: path.clone(), reason })?;
        index.tokenizers().register(FAQ_ANALYZER, faq_analyzer());
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(open_err)?;
        Ok(Self {
            path,
            index,
            reader,
            writer: Mutex::new(None),
            writer_memory_bytes: config.writer_memory_bytes.max(15 << 20),
            fields,
            analyzer: faq_analyzer(),
            cache: HotAnswerCache::new(config.cache_capacity, config.cache_ttl),
            epoch: Default::default(),
            boosts: config.boosts,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the index writer, taking it (and the directory lock) on first use.
    fn with_writer<R>(&self, f: impl FnOnce(&mut IndexWriter) -> tantivy::Result<R>) -> Result<R> {
        let mut slot = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let writer = match &mut *slot {
            Some(w) => w,
            None => slot.insert(self.index.writer(self.writer_memory_bytes)?),
        };
        Ok(f(writer)?)
    }

    /// Stages an upsert (replaces any entry with the same id at the next commit); the
    /// entry must pass [`FaqEntry::validate`].
    pub fn stage(&self, entry: &FaqEntry) -> Result<()> {
        entry.validate().map_err(|source| ShardError::InvalidEntry { id: entry.id.clone(), source })?;
        self.stage_doc(entry)
    }

    /// Stages an upsert replayed from a log of acknowledged writes: only
    /// [`FaqEntry::validate_indexable`] is required, so replicas replaying entries logged
    /// under older rules index the same thing as those that applied them then.
    pub fn stage_logged(&self, entry: &FaqEntry) -> Result<()> {
        entry.validate_indexable().map_err(|source| ShardError::InvalidEntry { id: entry.id.clone(), source })?;
        self.stage_doc(entry)
    }

    fn stage_doc(&self, entry: &FaqEntry) -> Result<()> {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.id, &entry.id);
        doc.add_text(f.question, &entry.question);
        for a in &entry.alt_questions {
            doc.add_text(f.alt_questions, a);
        }
        doc.add_text(f.answer, &entry.answer);
        doc.add_text(f.category, &entry.category);
        for t in &entry.tags {
            doc.add_text(f.tags, t);
        }
        doc.add_text(f.lang, &entry.lang);
        doc.add_i64(f.updated_at, entry.updated_at);
        self.with_writer(|w| {
            w.delete_term(Term::from_field_text(f.id, &entry.id));
            w.add_document(doc)
        })?;
        Ok(())
    }

    /// Stages the deletion of entry `id`.
    pub fn stage_delete(&self, id: &str) -> Result<()> {
        self.with_writer(|w| Ok(w.delete_term(Term::from_field_text(self.fields.id, id))))?;
        Ok(())
    }

    /// Stages the removal of every entry (a full rebuild then stages the new ones).
    pub fn stage_clear(&self) -> Result<()> {
        self.with_writer(|w| w.delete_all_documents())?;
        Ok(())
    }

    /// Makes every staged change durable and visible; returns the commit's opstamp.
    pub fn commit(&self) -> Result<u64> {
        let opstamp = self.with_writer(|w| w.commit())?;
        self.reader.reload()?;
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache.clear();
        Ok(opstamp)
    }

    /// Drops every staged, uncommitted change.
    pub fn rollback(&self) -> Result<()> {
        self.with_writer(|w| w.rollback())?;
        Ok(())
    }

    /// Upserts `entries` and commits.
    pub fn upsert(&self, entries: &[FaqEntry]) -> Result<u64> {
        for e in entries {
            self.stage(e)?;
        }
        self.commit()
    }

    /// Deletes entry `id` and commits; returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let existed = self.get(id)?.is_some();
        self.stage_delete(id)?;
        self.commit()?;
        Ok(existed)
    }

    /// The entry with this id, if any.
    pub fn get(&self, id: &str) -> Result<Option<FaqEntry>> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(Term::from_field_text(self.fields.id, id), IndexRecordOption::Basic);
        let top = searcher.search(&q, &TopDocs::with_limit(1).order_by_score())?;
        match top.first() {
            Some(&(_, addr)) => Ok(Some(self.entry(&searcher.doc(addr)?))),
            None => Ok(None),
        }
    }

    fn entry(&self, doc: &TantivyDocument) -> FaqEntry {
        let f = &self.fields;
        let one = |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let all = |field| doc.get_all(field).filter_map(|v| v.as_str().map(str::to_string)).collect();
        FaqEntry {
            id: one(f.id),
            question: one(f.question),
            alt_questions: all(f.alt_questions),
            answer: one(f.answer),
            category: one(f.category),
            tags: all(f.tags),
            lang: one(f.lang),
            updated_at: doc.get_first(f.updated_at).and_then(|v| v.as_i64()).unwrap_or_default(),
        }
    }

    /// The query's distinct analyzed terms, in first-seen order.
    fn query_terms(&self, text: &str) -> Vec<String> {
        let mut seen = HashSet::new();
        terms(&mut self.analyzer.clone(), text).into_iter().filter(|t| seen.insert(t.clone())).collect()
    }

    /// Top hits for `query`, from the hot-answer cache when a normalised repeat.
    pub fn search(&self, query: &str, opts: &SearchOptions) -> Result<Arc<Vec<FaqHit>>> {
        let key = format!(
            "{}\u{1}{}\u{1}{}\u{1}{}",
            normalize_question(query),
            opts.k,
            opts.category.as_deref().unwrap_or(""),
            opts.lang.as_deref().unwrap_or("")
        );
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let epoch = self.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let hits = Arc::new(self.search_uncached(query, opts)?);
        if self.epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch {
            self.cache.put(key, hits.clone());
        }
        Ok(hits)
    }

    /// [`search`](Self::search) without the cache.
    pub fn search_uncached(&self, query: &str, opts: &SearchOptions) -> Result<Vec<FaqHit>> {
        self.search_inner(query, opts, None)
    }

    /// Searches this shard scoring with `stats` (merged over all shards) instead of its
    /// own statistics; not cached. See [`CorpusStats`].
    pub fn search_with_stats(&self, query: &str, opts: &SearchOptions, stats: &CorpusStats) -> Result<Vec<FaqHit>> {
        self.search_inner(query, opts, Some(stats))
    }

    fn search_inner(&self, query: &str, opts: &SearchOptions, stats: Option<&CorpusStats>) -> Result<Vec<FaqHit>> {
        let qterms = self.query_terms(query);
        if qterms.is_empty() || opts.k == 0 {
            return Ok(Vec::new());
        }
        let f = self.fields;
        let b = self.boosts;
        let field_query = |field, boost: f32| -> Box<dyn Query> {
            let clauses = qterms
                .iter()
                .map(|t| {
                    let q: Box<dyn Query> =
                        Box::new(TermQuery::new(Term::from_field_text(field, t), IndexRecordOption::WithFreqs));
                    (Occur::Should, q)
                })
                .collect();
            Box::new(BoostQuery::new(Box::new(BooleanQuery::new(clauses)), boost))
        };
        let text_query: Box<dyn Query> = Box::new(BooleanQuery::new(vec![
            (Occur::Should, field_query(f.question, b.question)),
            (Occur::Should, field_query(f.alt_questions, b.alt_questions)),
            (Occur::Should, field_query(f.answer, b.answer)),
        ]));
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, text_query)];
        for (field, value) in [(f.category, &opts.category), (f.lang, &opts.lang)] {
            if let Some(v) = value {
                clauses.push((
                    Occur::Must,
                    Box::new(TermQuery::new(Term::from_field_text(field, v), IndexRecordOption::Basic)),
                ));
            }
        }
        let searcher = self.reader.searcher();
        let query = BooleanQuery::new(clauses);
        // A few more than k, so equal scores across the cut are settled by id below.
        let collector = TopDocs::with_limit(opts.k + TIE_WINDOW).order_by_score();
        let mut top = match stats {
            None => searcher.search(&query, &collector)?,
            Some(stats) => {
                let provider = StatsProvider { stats, schema: self.index.schema() };
                searcher.search_with_statistics_provider(&query, &collector, &provider)?
            }
        };
        if top.is_empty() {
            return Ok(Vec::new());
        }
        if top.len() > opts.k {
            let cut = top[opts.k - 1].0;
            if top[opts.k].0 == cut {
                // Ties at the cut: the smallest ids win, as in `merge_hits`, so one index
                // and several shards pick the same entries.
                let (mut keep, tied): (Vec<_>, Vec<_>) =
                    top.into_iter().filter(|(sc, _)| *sc >= cut).partition(|(sc, _)| *sc > cut);
                let mut tied = tied
                    .into_iter()
                    .map(|(sc, addr)| {
                        let doc: TantivyDocument = searcher.doc(addr)?;
                        let id = doc.get_first(f.id).and_then(|v| v.as_str()).unwrap_or_default().to_string();
                        Ok((id, (sc, addr)))
                    })
                    .collect::<Result<Vec<_>>>()?;
                tied.sort_by(|a, b| a.0.cmp(&b.0));
                let room = opts.k - keep.len();
                keep.extend(tied.into_iter().take(room).map(|(_, t)| t));
                top = keep;
            } else {
                top.truncate(opts.k);
            }
        }
        let idf = match stats {
            None => self.idf(&searcher, &qterms)?,
            Some(stats) => {
                let n = stats.num_docs as f32;
                let name = self.index.schema().get_field_name(f.question).to_string();
                qterms.iter().map(|t| idf_of(n, stats.df(&name, t) as f32)).collect()
            }
        };
        let total: f32 = idf.iter().sum();
        let qset: HashSet<String> = qterms.iter().cloned().collect();
        let mut analyzer = self.analyzer.clone();
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let e = self.entry(&searcher.doc(addr)?);
            // IDF-weighted share of the query terms a text holds.
            let mut coverage = |text: &str| -> f32 {
                let have: HashSet<String> = terms(&mut analyzer, text).into_iter().collect();
                let got: f32 = qterms.iter().zip(&idf).filter(|(t, _)| have.contains(*t)).map(|(_, w)| w).sum();
                if total > 0.0 { (got / total).clamp(0.0, 1.0) } else { 0.0 }
            };
            let cq = coverage(&e.question);
            let (best_alt, ca) = e
                .alt_questions
                .iter()
                .map(|a| (a.as_str(), coverage(a)))
                .fold(("", 0.0f32), |best, x| if x.1 > best.1 { x } else { best });
            // Answers can be long: which query terms they hold comes from the index's
            // postings instead of re-analysing the text.
            let cans = {
                let seg = searcher.segment_reader(addr.segment_ord).inverted_index(f.answer)?;
                let mut got = 0.0;
                for (t, w) in qterms.iter().zip(&idf) {
                    let term = Term::from_field_text(f.answer, t);
                    if let Some(mut postings) =
                        seg.read_postings(&term, IndexRecordOption::Basic).map_err(tantivy::TantivyError::from)?
                        // A fresh postings list sits on its first doc; `seek` may only
                        // move forward from there.
                        && postings.doc() <= addr.doc_id
                        && postings.seek(addr.doc_id) == addr.doc_id
                    {
                        got += w;
                    }
                }
                if total > 0.0 { (got / total).clamp(0.0, 1.0) } else { 0.0 }
            };
            let (matched_field, text) = if cq >= ca && cq >= cans {
                (MatchedField::Question, e.question.as_str())
            } else if ca >= cans {
                (MatchedField::AltQuestion, best_alt)
            } else {
                (MatchedField::Answer, e.answer.as_str())
            };
            let snippet = highlight(&mut analyzer, text, &qset, SNIPPET_CHARS);
            hits.push(FaqHit {
                id: e.id,
                score,
                question: e.question,
                answer: e.answer,
                category: e.category,
                lang: e.lang,
                matched_field,
                snippet,
                confidence: cq.max(ca),
            });
        }
        // Ties by id, so one index and several merged shards agree on the order.
        sort_hits(&mut hits);
        Ok(hits)
    }

    /// BM25 IDF of each term over the question field.
    fn idf(&self, searcher: &Searcher, qterms: &[String]) -> Result<Vec<f32>> {
        let n = searcher.num_docs() as f32;
        qterms
            .iter()
            .map(|t| Ok(idf_of(n, searcher.doc_freq(&Term::from_field_text(self.fields.question, t))? as f32)))
            .collect()
    }

    /// This shard's [`CorpusStats`] for `query` (and the filter values of `opts`).
    pub fn corpus_stats(&self, query: &str, opts: &SearchOptions) -> Result<CorpusStats> {
        use tantivy::query::Bm25StatisticsProvider;
        let searcher = self.reader.searcher();
        let f = self.fields;
        let schema = self.index.schema();
        let mut stats = CorpusStats {
            max_docs: Bm25StatisticsProvider::total_num_docs(&searcher)?,
            num_docs: searcher.num_docs(),
            ..CorpusStats::default()
        };
        let text_fields = [f.question, f.alt_questions, f.answer];
        // Filter clauses are scored too, so their fields' token counts count.
        for field in [f.question, f.alt_questions, f.answer, f.category, f.lang] {
            let name = schema.get_field_name(field).to_string();
            stats.total_tokens.insert(name, Bm25StatisticsProvider::total_num_tokens(&searcher, field)?);
        }
        let mut add = |field, t: &str| -> Result<()> {
            let df = searcher.doc_freq(&Term::from_field_text(field, t))?;
            stats.doc_freqs.insert(CorpusStats::key(schema.get_field_name(field), t), df);
            Ok(())
        };
        for t in self.query_terms(query) {
            for field in text_fields {
                add(field, &t)?;
            }
        }
        if let Some(c) = &opts.category {
            add(f.category, c)?;
        }
        if let Some(l) = &opts.lang {
            add(f.lang, l)?;
        }
        Ok(stats)
    }

    pub fn stats(&self) -> ShardStats {
        let searcher = self.reader.searcher();
        let c = self.cache_counters();
        ShardStats {
            num_docs: searcher.num_docs(),
            segments: searcher.segment_readers().len(),
            cache_entries: self.cache.len(),
            cache_hits: c.hits.load(std::sync::atomic::Ordering::Relaxed),
            cache_misses: c.misses.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn cache_counters(&self) -> Arc<CacheCounters> {
        self.cache.counters()
    }

    /// The underlying index (for maintenance tools).
    pub fn index(&self) -> &Index {
        &self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, q: &str, a: &str, cat: &str, lang: &str) -> FaqEntry {
        FaqEntry {
            id: id.into(),
            question: q.into(),
            answer: a.into(),
            category: cat.into(),
            lang: lang.into(),
            ..FaqEntry::default()
        }
    }

    fn demo(dir: &Path) -> FaqShard {
        let shard = FaqShard::open(dir, &ShardConfig::default()).unwrap();
        shard
            .upsert(&[
                entry("r1", "退货政策是什么？", "收到商品后30天内可无理由退货。", "returns", "zh"),
                entry("r2", "退款多久到账？", "退款在收到退货后5个工作日内原路退回。", "refunds", "zh"),
                entry(
                    "s1",
                    "How long does shipping take?",
                    "Standard shipping takes 3-5 business days.",
                    "shipping",
                    "en",
                ),
                FaqEntry {
                    alt_questions: vec!["Can I get an invoice for my order?".into()],
                    ..entry("i1", "如何开具发票？", "在订单详情页申请电子发票。", "invoices", "zh")
                },
            ])
            .unwrap();
        shard
    }

    #[test]
    fn finds_chinese_english_and_paraphrases() {
        let dir = tempfile::tempdir().unwrap();
        let shard = demo(dir.path());
        let hits = shard.search("退货政策是什么?", &SearchOptions::default()).unwrap();
        assert_eq!(hits[0].id, "r1");
        assert_eq!(hits[0].matched_field, MatchedField::Question);
        assert!(hits[0].snippet.contains("<b>"), "{}", hits[0].snippet);
        assert!(hits[0].confidence > 0.9, "{}", hits[0].confidence);
        let hits = shard.search("shipping time", &SearchOptions::default()).unwrap();
        assert_eq!(hits[0].id, "s1");
        let hits = shard.search("invoice for orders", &SearchOptions::default()).unwrap();
        assert_eq!(hits[0].id, "i1");
        assert_eq!(hits[0].matched_field, MatchedField::AltQuestion);
        // Nothing in common: no hits rather than noise.
        assert!(shard.search("？！", &SearchOptions::default()).unwrap().is_empty());
    }

    #[test]
    fn filters_by_category_and_lang() {
        let dir = tempfile::tempdir().unwrap();
        let shard = demo(dir.path());
        let opts = SearchOptions { category: Some("refunds".into()), ..SearchOptions::default() };
        let hits = shard.search("退货", &opts).unwrap();
        assert!(hits.iter().all(|h| h.category == "refunds") && !hits.is_empty());
        let opts = SearchOptions { lang: Some("en".into()), ..SearchOptions::default() };
        assert!(shard.search("退货", &opts).unwrap().is_empty());
    }

    #[test]
    fn upsert_replaces_delete_removes_and_both_invalidate_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let shard = demo(dir.path());
        let first = shard.search("退货政策是什么？", &SearchOptions::default()).unwrap();
        // A normalised repeat is served from the cache: the very same result.
        let again = shard.search("  退货政策是什么? ", &SearchOptions::default()).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(shard.stats().cache_hits, 1);

        shard.upsert(&[entry("r1", "退货政策是什么？", "新政策：60天内可退货。", "returns", "zh")]).unwrap();
        let after = shard.search("退货政策是什么？", &SearchOptions::default()).unwrap();
        assert!(!Arc::ptr_eq(&first, &after));
        assert!(after[0].answer.contains("60天"));
        assert_eq!(shard.stats().num_docs, 4, "upsert must replace, not add");

        assert!(shard.delete("r1").unwrap());
        assert!(!shard.delete("r1").unwrap());
        let hits = shard.search("退货政策是什么？", &SearchOptions::default()).unwrap();
        assert!(hits.iter().all(|h| h.id != "r1"));
    }

    #[test]
    fn reopen_keeps_committed_entries_and_corpus_stats_count_them() {
        let dir = tempfile::tempdir().unwrap();
        drop(demo(dir.path()));
        let shard = FaqShard::open(dir.path(), &ShardConfig::default()).unwrap();
        assert_eq!(shard.stats().num_docs, 4);
        assert_eq!(shard.get("s1").unwrap().unwrap().lang, "en");
        let ts = shard.corpus_stats("退款 shipping", &SearchOptions::default()).unwrap();
        assert_eq!(ts.num_docs, 4);
        assert_eq!((ts.df("question", "退款"), ts.df("answer", "退款")), (1, 1));
        assert!(ts.total_tokens["question"] > 0);
    }

    #[test]
    fn a_reader_opens_beside_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = demo(dir.path());
        writer.stage(&entry("w1", "写入中", "写入", "", "zh")).unwrap(); // holds the writer
        let reader = FaqShard::open(dir.path(), &ShardConfig::default()).unwrap();
        assert_eq!(reader.search("退货政策", &SearchOptions::default()).unwrap()[0].id, "r1");
        // Only one of them may write.
        assert!(reader.stage_delete("r1").is_err());
    }

    #[test]
    fn invalid_entries_are_rejected_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let shard = FaqShard::open(dir.path(), &ShardConfig::default()).unwrap();
        let err = shard.stage(&entry("x", "  ", "a", "", "")).unwrap_err();
        assert!(matches!(err, ShardError::InvalidEntry { source: EntryError::MissingQuestion, .. }));
        let huge = "退".repeat(crate::entry::MAX_FIELD_BYTES);
        let err = shard.stage(&entry("x", "q", &huge, "", "")).unwrap_err();
        assert!(matches!(err, ShardError::InvalidEntry { source: EntryError::TooLarge { field: "answer", .. }, .. }));
    }
}
