//! The sharded, replicated FAQ of a cluster, over a real `nats-server -js` and real
//! ragnode processes:
//! - one node and three nodes give the same search results (ids and order) for the
//!   evaluation queries of `../shared/datasets` (stackfaq, bq), and the same as a single
//!   embedded node within float rounding;
//! - under a steady load of searches, writes and chats, a node killed with SIGKILL costs
//!   no acknowledged write, searches are complete again within 5 s, the node rejoins and
//!   catches up; a NATS restart under load is survived within 5 s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ragnode_tests::{NatsServer, ServeProcess, http, http_get, metric};
use serde_json::{Value, json};

const ADMIN: &str = "sk-admin-test-123";

/// The two tests run 7 nodes between them: one at a time, so that the kill test's 5 s
/// limits measure the cluster, not two tests sharing two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn cluster_flags<'a>(nats: &'a str, cluster: &'a str, id: &'a str) -> Vec<&'a str> {
    vec!["--nats", nats, "--cluster", cluster, "--node-id", id, "--admin-key", ADMIN]
}

/// A search's ids, in order, and whether it was partial; `None` on an error status.
fn search(addr: &str, query: &str, k: usize) -> Option<(Vec<String>, bool)> {
    let r = http(addr, "POST", "/v1/admin/faq/search", Some(&json!({"query": query, "k": k}).to_string()), Some(ADMIN));
    if r.status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&r.body).expect("search JSON");
    let ids = v["hits"].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap().to_string()).collect();
    Some((ids, v["partial"] == true))
}

fn view(addr: &str) -> Value {
    let (status, body) = http_get(addr, "/v1/cluster", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `nodes` are live and every shard is served by `replicas` replicas.
fn wait_settled(addr: &str, nodes: usize, replicas: u64, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let v = view(addr);
        let live = v["nodes"].as_array().unwrap().len();
        let table = v["faq"]["table"].as_array().unwrap();
        if live == nodes
            && table
                .iter()
                .all(|s| s["serving"] == replicas && s["replicas"].as_array().unwrap().len() as u64 == replicas)
        {
            return;
        }
        assert!(t0.elapsed() < limit, "cluster did not settle within {limit:?}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs every query on `addrs` (query i on node i % n), 4 at a time; results in order.
fn search_all(addrs: &[&str], queries: &[String], k: usize) -> Vec<Vec<String>> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(vec![Vec::new(); queries.len()]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= queries.len() {
                        return;
                    }
                    let addr = addrs[i % addrs.len()];
                    let (ids, partial) = search(addr, &queries[i], k)
                        .unwrap_or_else(|| panic!("search {:?} failed at {addr}", queries[i]));
                    assert!(!partial, "query {:?} at {addr}: partial results from a healthy cluster", queries[i]);
                    out.lock().unwrap()[i] = ids;
                }
            });
        }
    });
    out.into_inner().unwrap()
}

fn datasets() -> Option<PathBuf> {
    let dir = std::env::var_os("RAGNODE_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets"));
    dir.join("bq/queries.jsonl").exists().then_some(dir)
}

fn jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The FAQ (as a JSONL seed) and the queries: the evaluation sets when present, else
/// the demo FAQ's own questions and paraphrases.
fn corpus(dir: &std::path::Path) -> (PathBuf, Vec<String>) {
    let seed = dir.join("seed.jsonl");
    let mut rows = Vec::new();
    let mut queries = Vec::new();
    match datasets() {
        Some(ds) => {
            for set in ["stackfaq", "bq"] {
                for mut e in jsonl(&ds.join(set).join("faq.jsonl")) {
                    // BQ entries are questions only; the answer field must not be empty.
                    if e["answer"].as_str().is_none_or(str::is_empty) {
                        e["answer"] = e["question"].clone();
                    }
                    e["id"] = json!(format!("{set}-{}", e["id"].as_str().unwrap()));
                    rows.push(e.to_string());
                }
                queries.extend(
                    jsonl(&ds.join(set).join("queries.jsonl")).iter().map(|q| q["query"].as_str().unwrap().to_string()),
                );
            }
        }
        None => {
            eprintln!(
                "NOTE: ../shared/datasets not found (set RAGNODE_DATASETS): comparing on the demo FAQ's questions only"
            );
            let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
            for e in jsonl(&demo) {
                queries.push(e["question"].as_str().unwrap().to_string());
                queries.extend(
                    e["alt_questions"].as_array().into_iter().flatten().map(|q| q.as_str().unwrap().to_string()),
                );
                rows.push(e.to_string());
            }
        }
    }
    std::fs::write(&seed, rows.join("\n")).unwrap();
    (seed, queries)
}

#[test]
fn one_node_and_three_nodes_give_the_same_search_results() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let (seed, queries) = corpus(tmp.path());
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let one = ServeProcess::start_seeded(&dir("one"), &seed, &cluster_flags(&url, "one", "solo"));
    let three: Vec<ServeProcess> = ["x", "y", "z"]
        .iter()
        .map(|id| ServeProcess::start_seeded(&dir(id), &seed, &cluster_flags(&url, "three", id)))
        .collect();
    let embedded = ServeProcess::start_seeded(&dir("embedded"), &seed, &["--admin-key", ADMIN]);
    wait_settled(&one.addr, 1, 1, Duration::from_secs(60));
    wait_settled(&three[0].addr, 3, 2, Duration::from_secs(60));

    let k = 10;
    let t = Instant::now();
    let by_one = search_all(&[&one.addr], &queries, k);
    let one_took = t.elapsed();
    let t = Instant::now();
    let addrs: Vec<&str> = three.iter().map(|n| n.addr.as_str()).collect();
    let by_three = search_all(&addrs, &queries, k);
    let three_took = t.elapsed();
    let by_embedded = search_all(&[&embedded.addr], &queries, k);
    eprintln!("{} queries: 1 node {one_took:?}, 3 nodes {three_took:?}", queries.len());

    let mut differ = Vec::new();
    for (i, (a, b)) in by_one.iter().zip(&by_three).enumerate() {
        if a != b {
            differ.push(format!("{:?}: 1 node {a:?} vs 3 nodes {b:?}", queries[i]));
        }
    }
    assert!(differ.is_empty(), "{} of {} queries differ, e.g. {}", differ.len(), queries.len(), differ[0]);
    assert!(by_one.iter().filter(|h| !h.is_empty()).count() > queries.len() / 2, "most queries find something");

    // One unsharded index scores with the same statistics; only float summation order
    // can part them, at equal-looking scores.
    let same = by_embedded.iter().zip(&by_three).filter(|(a, b)| a == b).count();
    eprintln!("embedded single index vs 3-node cluster: {same} of {} identical top-{k} lists", queries.len());
    assert!(same * 1000 >= queries.len() * 998, "only {same} of {} top-{k} lists match one index", queries.len());
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new().name(name.to_string()).spawn(f).unwrap()
}

#[test]
fn a_node_killed_under_load_loses_no_write_and_searches_stay_complete() {
    let _serial = one_at_a_time();
    let mut nats = NatsServer::start();
    let url = nats.url();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize, id: &str| ServeProcess::start_in(dirs[i].path(), &cluster_flags(&url, "k", id));
    let a = start(0, "a");
    let b = start(1, "b");
    let mut c = start(2, "c");
    wait_settled(&a.addr, 3, 2, Duration::from_secs(30));

    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
    let queries: Vec<String> =
        jsonl(&demo).iter().take(16).map(|e| e["question"].as_str().unwrap().to_string()).collect();
    let reference: Vec<Vec<String>> = queries.iter().map(|q| search(&a.addr, q, 5).unwrap().0).collect();

    let stop = Arc::new(AtomicBool::new(false));
    // (when, complete with the same top hit)
    let outcomes: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let chats: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let addrs = [a.addr.clone(), b.addr.clone()];
    let mut load = Vec::new();
    for t in 0..2 {
        let (stop, outcomes, addrs, queries, reference) =
            (stop.clone(), outcomes.clone(), addrs.clone(), queries.clone(), reference.clone());
        load.push(spawn_named(&format!("search-{t}"), move || {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let q = i % queries.len();
                // The writes below change the corpus statistics, so only the top hit (the
                // question itself, by far) is compared.
                let res = search(&addrs[i % 2], &queries[q], 5);
                let ok = res.as_ref().is_some_and(|(ids, partial)| !partial && ids.first() == reference[q].first());
                if !ok {
                    eprintln!("search {:?} at {}: {res:?}", queries[q], addrs[i % 2]);
                }
                outcomes.lock().unwrap().push((Instant::now(), ok));
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    {
        let (stop, acked, addrs) = (stop.clone(), acked.clone(), addrs.clone());
        load.push(spawn_named("writer", move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{i}");
                // Words of their own: these entries never match the demo questions.
                let body = json!({"entries": [{"id": id, "question": format!("zyzzyva loadtest {i}"), "answer": format!("quokka {i}")}]});
                let r = http(&addrs[i % 2], "POST", "/v1/admin/faq", Some(&body.to_string()), Some(ADMIN));
                if r.status == 200 {
                    acked.lock().unwrap().push(id);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    {
        let (stop, chats, addrs) = (stop.clone(), chats.clone(), addrs.clone());
        load.push(spawn_named("chat", move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4, "user": format!("u{i}"),
                    "messages": [{"role": "user", "content": "你好"}]});
                let r = http(&addrs[i % 2], "POST", "/v1/chat/completions", Some(&body.to_string()), Some(ADMIN));
                chats.lock().unwrap().push((r.status, r.body));
                i += 1;
            }
        }));
    }

    std::thread::sleep(Duration::from_secs(3));
    let acked_before_kill = acked.lock().unwrap().clone();
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    // c is back on its own index: it replays what it missed, then takes its shards back.
    let c_started = Instant::now();
    c = start(2, "c");
    eprintln!("c restarted and ready in {:?}", c_started.elapsed());
    wait_settled(&a.addr, 3, 2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    nats.restart();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }

    let outcomes = outcomes.lock().unwrap();
    let report = |from: Instant, to: Instant| {
        let window: Vec<bool> = outcomes.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, ok)| *ok).collect();
        (window.len(), window.iter().filter(|ok| !**ok).count())
    };
    let before = report(killed - Duration::from_secs(3), killed);
    let just_after = report(killed, killed + Duration::from_secs(5));
    let after = report(killed + Duration::from_secs(5), c_started);
    let nats_down = report(restarted, restarted + Duration::from_secs(5));
    let nats_after = report(restarted + Duration::from_secs(5), Instant::now());
    eprintln!(
        "searches (total, incomplete or different): before the kill {before:?}, 0-5 s after {just_after:?}, \
         5 s after to c's restart {after:?}, NATS restart 0-5 s {nats_down:?}, after {nats_after:?}"
    );
    assert_eq!(before.1, 0, "healthy cluster");
    assert!(after.0 > 20 && after.1 == 0, "complete results 5 s after the kill: {after:?}");
    assert!(nats_after.0 > 20 && nats_after.1 == 0, "complete results 5 s after the NATS restart: {nats_after:?}");

    // No acknowledged write is lost, on any node (c caught up on those made while down).
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > acked_before_kill.len() + 50, "writes continued after the kill: {}", acked.len());
    wait_settled(&a.addr, 3, 2, Duration::from_secs(15));
    let mut missing = Vec::new();
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        for id in &acked {
            let (status, body) = http_get(&node.addr, &format!("/v1/admin/faq/{id}"), Some(ADMIN));
            if status != 200 {
                missing.push(format!("{id} via {name}: {status} {body}"));
            }
        }
    }
    assert!(missing.is_empty(), "acknowledged writes missing: {missing:#?}\n{}", view(&a.addr)["faq"]);
    // c's own replicas hold what the others hold.
    let t0 = Instant::now();
    loop {
        let table = view(&c.addr)["faq"]["table"].clone();
        let agree = table.as_array().unwrap().iter().all(|s| {
            let r = s["replicas"].as_array().unwrap();
            r.iter().all(|x| x["applied"] == r[0]["applied"] && x["documents"] == r[0]["documents"])
        });
        let c_holds = table
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["replicas"].as_array().unwrap().iter().any(|x| x["node"] == "c"));
        if agree && c_holds {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "replicas disagree: {table}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Shard metrics: what a serves, and its distributed searches.
    let a_serves = view(&a.addr)["faq"]["table"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["replicas"].as_array().unwrap().iter().any(|r| r["node"] == "a" && r["serving"] == true))
        .count();
    assert_eq!(metric(&a.addr, "ragnode:faq_shard_serving{"), a_serves as f64);
    assert!(metric(&a.addr, "ragnode:faq_search_seconds_count") > 100.0, "searches are timed");

    // Chats: answered, or a clean JSON error — never a dropped connection.
    let chats = chats.lock().unwrap();
    let ok = chats.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in chats.iter().filter(|(s, _)| *s != 200) {
        assert!(*status >= 400, "chat: status {status}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("chat error body is not JSON: {body}"));
        assert!(v["error"]["message"].is_string(), "{body}");
    }
    eprintln!("chats: {ok} of {} answered", chats.len());
    assert!(ok * 10 >= chats.len() * 8, "most chats answered through the kill and the NATS restart");
}
