//! Ingesting FAQ files into a shard: JSONL, JSON (an array of objects) and CSV (a header
//! row), UTF-8, with a mapping from the file's column/field names to entry fields.
//!
//! Row-level problems never stop the file; each is reported with its line (JSONL, CSV) or
//! array element (JSON) and the rest is ingested:
//! - invalid UTF-8 or malformed JSON/CSV in a row: rejected ("invalid UTF-8", parse error);
//! - missing id or question: rejected;
//! - a text field over [`MAX_FIELD_BYTES`](crate::entry::MAX_FIELD_BYTES) (1 MiB):
//!   rejected, never truncated;
//! - an id seen earlier in the same file: the later row is rejected ("duplicate id"), so
//!   the entry is the file's first definition of it (across files and runs, the latest
//!   ingest wins: that is an upsert).
//!
//! Durability: rows are committed every `batch_rows` rows and at the end; after
//! `on_commit` reports a count, those rows survive a crash (tantivy's commit fsyncs).
//! List fields (`alt_questions`, `tags`) are JSON arrays, or in CSV (and as JSON strings)
//! values separated by `|`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::entry::FaqEntry;
use crate::shard::{FaqShard, ShardError};

/// File formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Csv,
}

impl Format {
    /// From the file extension (`.jsonl`/`.ndjson`, `.json`, `.csv`).
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// Source names of the entry fields (defaults: the entry field names).
#[derive(Clone, Debug)]
pub struct FieldMapping {
    pub id: String,
    pub question: String,
    pub alt_questions: String,
    pub answer: String,
    pub category: String,
    pub tags: String,
    pub lang: String,
    pub updated_at: String,
}

impl Default for FieldMapping {
    fn default() -> Self {
        Self {
            id: "id".into(),
            question: "question".into(),
            alt_questions: "alt_questions".into(),
            answer: "answer".into(),
            category: "category".into(),
            tags: "tags".into(),
            lang: "lang".into(),
            updated_at: "updated_at".into(),
        }
    }
}

impl FieldMapping {
    /// Applies `entry_field=source_name` overrides, e.g. `question=title`.
    pub fn with_overrides(mut self, pairs: &[String]) -> Result<Self, String> {
        for pair in pairs {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("mapping {pair:?}: expected FIELD=NAME"))?;
            let slot = match k.trim() {
                "id" => &mut self.id,
                "question" => &mut self.question,
                "alt_questions" => &mut self.alt_questions,
                "answer" => &mut self.answer,
                "category" => &mut self.category,
                "tags" => &mut self.tags,
                "lang" => &mut self.lang,
                "updated_at" => &mut self.updated_at,
                other => return Err(format!("mapping {pair:?}: unknown entry field {other:?}")),
            };
            *slot = v.trim().to_string();
        }
        Ok(self)
    }
}

/// Where a row came from: a line (JSONL, CSV) or an array element (JSON), 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowPos {
    Line(u64),
    Element(u64),
}

impl std::fmt::Display for RowPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowPos::Line(n) => write!(f, "{n}"),
            RowPos::Element(n) => write!(f, "element {n}"),
        }
    }
}

/// A rejected row.
#[derive(Clone, Debug)]
pub struct RowError {
    pub pos: RowPos,
    pub reason: String,
}

/// Outcome of one file.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// Rows indexed and committed.
    pub committed: u64,
    pub rejected: Vec<RowError>,
}

/// Errors that stop an ingest (row problems do not: see [`IngestReport::rejected`]).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// Ingest settings and callbacks.
pub struct IngestOptions<'a> {
    pub format: Format,
    pub mapping: FieldMapping,
    /// Rows per commit.
    pub batch_rows: usize,
    /// Called after each durable commit with the rows committed so far.
    pub on_commit: &'a mut dyn FnMut(u64),
    /// Called with bytes read so far (for a progress bar).
    pub on_progress: &'a mut dyn FnMut(u64),
}

/// Ingests `path` into `shard` (upserts), committing as it goes.
pub fn ingest_file(shard: &FaqShard, path: &Path, opts: IngestOptions<'_>) -> Result<IngestReport, IngestError> {
    let io = |source| IngestError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut state = State {
        shard,
        mapping: opts.mapping,
        batch_rows: opts.batch_rows.max(1),
        on_commit: opts.on_commit,
        staged: 0,
        report: IngestReport::default(),
        seen: HashMap::new(),
    };
    let mut counted = CountingReader { inner: file, bytes: 0 };
    match opts.format {
        Format::Jsonl => {
            let mut reader = BufReader::new(&mut counted);
            let mut buf = Vec::new();
            let mut line = 0u64;
            loop {
                buf.clear();
                if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
                    break;
                }
                line += 1;
                let pos = RowPos::Line(line);
                let row = match std::str::from_utf8(&buf) {
                    Err(e) => Err(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
                    Ok(text) if text.trim().is_empty() => continue,
                    Ok(text) => serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}")),
                };
                state.row(pos, row.and_then(|v| state.entry_from_json(&v)))?;
                (opts.on_progress)(reader.get_ref().bytes);
            }
        }
        Format::Json => {
            let mut bytes = Vec::new();
            counted.read_to_end(&mut bytes).map_err(io)?;
            let text = std::str::from_utf8(&bytes).map_err(|e| IngestError::Format {
                path: path.to_path_buf(),
                reason: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            })?;
            let rows: Vec<Value> = serde_json::from_str(text).map_err(|e| IngestError::Format {
                path: path.to_path_buf(),
                reason: format!("expected a JSON array of objects: {e} (line {}, column {})", e.line(), e.column()),
            })?;
            for (i, v) in rows.iter().enumerate() {
                let row = state.entry_from_json(v);
                state.row(RowPos::Element(i as u64 + 1), row)?;
                (opts.on_progress)(((i + 1) * bytes.len() / rows.len()) as u64);
            }
        }
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(&mut counted);
            let headers = reader
                .byte_headers()
                .map_err(|e| IngestError::Format { path: path.to_path_buf(), reason: format!("CSV header: {e}") })?
                .clone();
            let headers: Vec<String> = headers.iter().map(|h| String::from_utf8_lossy(h).trim().to_string()).collect();
            let mut record = csv::ByteRecord::new();
            loop {
                let line_before = reader.position().line() + 1;
                match reader.read_byte_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {
                        let line = record.position().map_or(line_before, |p| p.line());
                        let row = state.entry_from_csv(&headers, &record);
                        state.row(RowPos::Line(line), row)?;
                    }
                    Err(e) => {
                        let line = e.position().map_or(line_before, |p| p.line());
                        if let csv::ErrorKind::Io(_) = e.kind() {
                            return Err(io(std::io::Error::other(e.to_string())));
                        }
                        state.row(RowPos::Line(line), Err(format!("invalid CSV: {e}")))?;
                    }
                }
                (opts.on_progress)(reader.get_ref().bytes);
            }
        }
    }
    state.commit()?;
    Ok(state.report)
}

struct CountingReader<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

struct State<'a> {
    shard: &'a FaqShard,
    mapping: FieldMapping,
    batch_rows: usize,
    on_commit: &'a mut dyn FnMut(u64),
    staged: usize,
    report: IngestReport,
    /// Ids seen in this file → where first.
    seen: HashMap<String, RowPos>,
}

impl State<'_> {
    fn row(&mut self, pos: RowPos, entry: Result<FaqEntry, String>) -> Result<(), IngestError> {
        let entry = match entry {
            Ok(e) => e,
            Err(reason) => {
                self.report.rejected.push(RowError { pos, reason });
                return Ok(());
            }
        };
        if let Some(first) = self.seen.get(&entry.id) {
            let reason = format!("duplicate id {:?} (first at {first})", entry.id);
            self.report.rejected.push(RowError { pos, reason });
            return Ok(());
        }
        match self.shard.stage(&entry) {
            Ok(()) => {}
            Err(ShardError::InvalidEntry { source, .. }) => {
                self.report.rejected.push(RowError { pos, reason: source.to_string() });
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.seen.insert(entry.id, pos);
        self.staged += 1;
        if self.staged >= self.batch_rows {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), IngestError> {
        if self.staged > 0 {
            self.shard.commit()?;
            self.report.committed += self.staged as u64;
            self.staged = 0;
            (self.on_commit)(self.report.committed);
        }
        Ok(())
    }

    fn entry_from_json(&self, v: &Value) -> Result<FaqEntry, String> {
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let m = &self.mapping;
        let text = |name: &str| -> Result<String, String> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                Some(Value::Bool(b)) => Ok(b.to_string()),
                Some(_) => Err(format!("field {name:?} must be a string")),
            }
        };
        let list = |name: &str| -> Result<Vec<String>, String> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or(format!("field {name:?} must hold strings")))
                    .collect(),
                Some(Value::String(s)) => Ok(split_list(s)),
                Some(_) => Err(format!("field {name:?} must be a list of strings")),
            }
        };
        let updated_at = match obj.get(&m.updated_at) {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => n.as_i64().ok_or(format!("field {:?} must be an integer", m.updated_at))?,
            Some(Value::String(s)) => parse_time(s).map_err(|e| format!("field {:?}: {e}", m.updated_at))?,
            Some(_) => return Err(format!("field {:?} must be an integer", m.updated_at)),
        };
        Ok(FaqEntry {
            id: text(&m.id)?.trim().to_string(),
            question: text(&m.question)?,
            alt_questions: list(&m.alt_questions)?,
            answer: text(&m.answer)?,
            category: text(&m.category)?,
            tags: list(&m.tags)?,
            lang: text(&m.lang)?,
            updated_at,
        })
    }

    fn entry_from_csv(&self, headers: &[String], record: &csv::ByteRecord) -> Result<FaqEntry, String> {
        let m = &self.mapping;
        let get = |name: &str| -> Result<String, String> {
            match headers.iter().position(|h| h == name).and_then(|i| record.get(i)) {
                None => Ok(String::new()),
                Some(bytes) => std::str::from_utf8(bytes)
                    .map(str::to_string)
                    .map_err(|e| format!("invalid UTF-8 in column {name:?} at byte {}", e.valid_up_to())),
            }
        };
        let updated = get(&m.updated_at)?;
        Ok(FaqEntry {
            id: get(&m.id)?.trim().to_string(),
            question: get(&m.question)?,
            alt_questions: split_list(&get(&m.alt_questions)?),
            answer: get(&m.answer)?,
            category: get(&m.category)?,
            tags: split_list(&get(&m.tags)?),
            lang: get(&m.lang)?,
            updated_at: if updated.trim().is_empty() {
                0
            } else {
                parse_time(&updated).map_err(|e| format!("column {:?}: {e}", m.updated_at))?
            },
        })
    }
}

/// `a|b|c` → ["a", "b", "c"] (empty parts dropped).
fn split_list(s: &str) -> Vec<String> {
    s.split('|').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
}

/// Seconds since the epoch, as an integer string.
fn parse_time(s: &str) -> Result<i64, String> {
    s.trim().parse::<i64>().map_err(|_| format!("{s:?} is not an integer timestamp (seconds since the epoch)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::ShardConfig;

    fn run(shard: &FaqShard, path: &Path, format: Format, batch_rows: usize) -> (IngestReport, Vec<u64>) {
        let mut commits = Vec::new();
        let report = ingest_file(
            shard,
            path,
            IngestOptions {
                format,
                mapping: FieldMapping::default(),
                batch_rows,
                on_commit: &mut |n| commits.push(n),
                on_progress: &mut |_| {},
            },
        )
        .unwrap();
        (report, commits)
    }

    #[test]
    fn jsonl_bad_rows_are_reported_by_line_and_the_rest_ingested() {
        let dir = tempfile::tempdir().unwrap();
        let shard = FaqShard::open(dir.path().join("idx"), &ShardConfig::default()).unwrap();
        let path = dir.path().join("faq.jsonl");
        let mut data = Vec::new();
        data.extend_from_slice(
            b"{\"id\": \"a\", \"question\": \"\xe9\x80\x80\xe8\xb4\xa7?\", \"alt_questions\": [\"x\"], \"answer\": \"y\"}\n",
        );
        data.extend_from_slice(b"{\"id\": \"b\", \"question\": \"bad \xff utf8\"}\n"); // line 2: invalid UTF-8
        data.extend_from_slice(b"\n");
        data.extend_from_slice(b"{\"id\": \"c\"}\n"); // line 4: no question
        data.extend_from_slice(b"{\"id\": \"a\", \"question\": \"again\"}\n"); // line 5: duplicate
        data.extend_from_slice(b"{not json\n"); // line 6
        let huge = "x".repeat(crate::entry::MAX_FIELD_BYTES + 1);
        data.extend_from_slice(format!("{{\"id\": \"h\", \"question\": \"q\", \"answer\": \"{huge}\"}}\n").as_bytes());
        data.extend_from_slice(b"{\"id\": 7, \"question\": \"numeric id\", \"answer\": \"n\", \"tags\": \"t1|t2\"}\n"); // line 8
        std::fs::write(&path, data).unwrap();
        let (report, commits) = run(&shard, &path, Format::Jsonl, 1);
        assert_eq!(report.committed, 2);
        assert_eq!(commits, [1, 2]);
        let lines: Vec<String> = report.rejected.iter().map(|r| r.pos.to_string()).collect();
        assert_eq!(lines, ["2", "4", "5", "6", "7"], "{:?}", report.rejected);
        assert!(report.rejected[0].reason.contains("UTF-8"));
        assert!(report.rejected[1].reason.contains("question"));
        assert!(report.rejected[2].reason.contains("duplicate id \"a\" (first at 1)"));
        assert!(report.rejected[4].reason.contains("limit"));
        assert_eq!(shard.get("a").unwrap().unwrap().question, "退货?");
        assert_eq!(shard.get("7").unwrap().unwrap().tags, ["t1", "t2"]);
    }

    #[test]
    fn csv_with_mapping_and_json_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let shard = FaqShard::open(dir.path().join("idx"), &ShardConfig::default()).unwrap();
        let csv_path = dir.path().join("faq.csv");
        std::fs::write(
            &csv_path,
            "key,title,answer,alt_questions\n1,如何退货?,\"在订单页申请, 7天内\",怎么退货|退货流程\n2,,no question,\n3,Invoice?,Yes,\n",
        )
        .unwrap();
        let mapping = FieldMapping::default().with_overrides(&["id=key".into(), "question=title".into()]).unwrap();
        let mut commits = Vec::new();
        let report = ingest_file(
            &shard,
            &csv_path,
            IngestOptions {
                format: Format::Csv,
                mapping,
                batch_rows: 100,
                on_commit: &mut |n| commits.push(n),
                on_progress: &mut |_| {},
            },
        )
        .unwrap();
        assert_eq!(report.committed, 2);
        assert_eq!(commits, [2]);
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(report.rejected[0].pos, RowPos::Line(3));
        let e = shard.get("1").unwrap().unwrap();
        assert_eq!(e.answer, "在订单页申请, 7天内");
        assert_eq!(e.alt_questions, ["怎么退货", "退货流程"]);

        let json_path = dir.path().join("faq.json");
        std::fs::write(
            &json_path,
            r#"[{"id": "j1", "question": "Q1", "answer": "A1"}, 5, {"id": "j2", "question": "Q2", "answer": "A2"}]"#,
        )
        .unwrap();
        let (report, _) = run(&shard, &json_path, Format::Json, 10);
        assert_eq!(report.committed, 2);
        assert_eq!(report.rejected[0].pos, RowPos::Element(2));
        assert_eq!(shard.stats().num_docs, 4);

        std::fs::write(&json_path, "{\"id\": 1}").unwrap();
        let err = ingest_file(
            &shard,
            &json_path,
            IngestOptions {
                format: Format::Json,
                mapping: FieldMapping::default(),
                batch_rows: 10,
                on_commit: &mut |_| {},
                on_progress: &mut |_| {},
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("faq.json") && err.to_string().contains("array"), "{err}");
    }
}
