//! The `ragnode faq` commands as a user runs them: a real binary, a real tantivy index on disk.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use ragnode_retrieval::{FaqShard, SearchOptions, ShardConfig};
use ragnode_tests::ragnode_bin;

/// `kill -9` part-way through a large ingest: the index reopens and holds every row the
/// process reported committed.
#[test]
fn ingest_killed_mid_file_keeps_every_reported_commit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.jsonl");
    let rows = 300_000;
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..rows {
            writeln!(
                w,
                r#"{{"id": "e{i}", "question": "第{i}号问题：订单{i}如何退货退款？ order {i} refund", "answer": "answer {i}"}}"#
            )
            .unwrap();
        }
    }
    let index = dir.path().join("index");
    let mut child = Command::new(ragnode_bin())
        .args(["faq", "ingest"])
        .arg(&file)
        .arg("--index")
        .arg(&index)
        .args(["--batch-rows", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reported = 0u64;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("committed ").and_then(|r| r.strip_suffix(" rows")) {
            reported = n.parse().unwrap();
            if reported >= 15_000 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(reported >= 15_000, "the ingest ended before reporting 3 commits");
    assert!(reported < rows, "killed too late to test anything: all {rows} rows were committed");

    let shard = FaqShard::open(&index, &ShardConfig::default()).expect("index reopens after kill -9");
    let n = shard.stats().num_docs;
    assert!(n >= reported, "{n} entries on disk, {reported} reported committed");
    for i in [0, 1, reported / 2, reported - 1] {
        assert!(shard.get(&format!("e{i}")).unwrap().is_some(), "row {i} was reported committed but is missing");
    }
    // Usable: searchable and writable again.
    let hits = shard.search("订单7如何退货", &SearchOptions::default()).unwrap();
    assert!(!hits.is_empty());
}

#[test]
fn ingest_reports_rejected_rows_with_file_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faq.csv");
    std::fs::write(&file, "id,question,answer\nr1,退货政策是什么？,30天内可退货。\nr2,,没有问题\nr1,重复,dup\n")
        .unwrap();
    let out = Command::new(ragnode_bin())
        .args(["faq", "ingest"])
        .arg(&file)
        .arg("--index")
        .arg(dir.path().join("index"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = file.display().to_string();
    assert!(stderr.contains(&format!("{path}:3: rejected: missing question")), "{stderr}");
    assert!(stderr.contains(&format!("{path}:4: rejected: duplicate id")), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 rows committed, 2 rejected"), "{stdout}");

    let out = Command::new(ragnode_bin())
        .args(["faq", "search", "退货政策是什么?", "--json", "--index"])
        .arg(dir.path().join("index"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hits[0]["id"], "r1");
    assert_eq!(hits[0]["matched_field"], "question");
}

/// The demo FAQ shipped in `data/` ingests cleanly and answers typical questions in both
/// languages, including full-width and paraphrased input.
#[test]
fn demo_faq_answers_chinese_and_english_questions() {
    let dir = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
    let index = dir.path().join("index");
    let out =
        Command::new(ragnode_bin()).args(["faq", "ingest"]).arg(&demo).arg("--index").arg(&index).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shard = FaqShard::open(&index, &ShardConfig::default()).unwrap();
    assert!(shard.stats().num_docs >= 200);
    for (q, want) in [
        ("退货政策是什么？", "zh-001"),
        ("退款多久能到账", "zh-009"),
        ("ＶＩＰ会员怎么开通", "zh-039"),
        ("How long does delivery take?", "en-016"),
        ("I was charged twice", "en-027"),
        ("refund after returning an item", "en-003"),
    ] {
        let hits = shard.search(q, &SearchOptions::default()).unwrap();
        let top: Vec<&str> = hits.iter().take(3).map(|h| h.id.as_str()).collect();
        assert!(top.contains(&want), "{q}: expected {want} in the top 3, got {top:?}");
    }
    let en_only = SearchOptions { lang: Some("en".into()), ..SearchOptions::default() };
    assert!(shard.search("退货", &en_only).unwrap().iter().all(|h| h.lang == "en"));
}

/// `--rebuild` replaces the shard's contents; `delete` removes one entry and fails clearly
/// for an unknown id; `stats` reports the count.
#[test]
fn rebuild_delete_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let run = |args: &[&str]| {
        Command::new(ragnode_bin()).args(["faq"]).args(args).arg("--index").arg(&index).output().unwrap()
    };
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(
        &a,
        "{\"id\": \"a1\", \"question\": \"q1\", \"answer\": \"x\"}\n{\"id\": \"a2\", \"question\": \"q2\", \"answer\": \"y\"}\n",
    )
    .unwrap();
    std::fs::write(&b, "{\"id\": \"b1\", \"question\": \"q3\", \"answer\": \"z\"}\n").unwrap();
    assert!(run(&["ingest", a.to_str().unwrap()]).status.success());
    assert!(run(&["ingest", b.to_str().unwrap(), "--rebuild"]).status.success());
    let stats: serde_json::Value = serde_json::from_slice(&run(&["stats"]).stdout).unwrap();
    assert_eq!(stats["num_docs"], 1, "rebuild keeps only the new file's entries");
    assert!(run(&["delete", "b1"]).status.success());
    let out = run(&["delete", "b1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entry with id \"b1\""));
    let stats: serde_json::Value = serde_json::from_slice(&run(&["stats"]).stdout).unwrap();
    assert_eq!(stats["num_docs"], 0);
}
