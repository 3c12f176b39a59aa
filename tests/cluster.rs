//! Cluster membership over a real `nats-server -js` (Debian's package): nodes see each
//! other within a few seconds, a node killed with SIGKILL leaves every view within 5 s,
//! `ragnode cluster status` lists the live nodes, and after a NATS restart the statuses
//! flow again within 5 s.

use std::time::{Duration, Instant};

use ragnode_tests::{NatsServer, ServeProcess, http, http_get, metric, ragnode_bin};
use serde_json::Value;

fn join(nats: &NatsServer, id: &str) -> ServeProcess {
    ServeProcess::start(&["--nats", &nats.url(), "--cluster", "t", "--node-id", id])
}

fn view(node: &ServeProcess) -> Value {
    let (status, body) = http_get(&node.addr, "/v1/cluster", None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("cluster JSON")
}

fn live_ids(node: &ServeProcess) -> Vec<String> {
    view(node)["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
}

/// Polls until `pred` holds on `node`'s view; returns how long it took.
fn wait_view(node: &ServeProcess, limit: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let v = view(node);
        if pred(&v) {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}; view: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nodes_see_each_other_and_a_killed_node_leaves_within_5s() {
    let mut nats = NatsServer::start();
    let a = join(&nats, "a");
    let b = join(&nats, "b");
    let mut c = join(&nats, "c");
    for n in [&a, &b, &c] {
        wait_view(n, Duration::from_secs(10), "three live, ready nodes", |v| {
            let nodes = v["nodes"].as_array().unwrap();
            nodes.len() == 3 && nodes.iter().all(|n| n["ready"] == true)
        });
    }
    let v = view(&b);
    assert_eq!(v["mode"], "cluster");
    assert_eq!(v["cluster"], "t");
    assert_eq!(v["node_id"], "b");
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["ready"], true);
        assert_eq!(n["model"], "SmolLM2-135M-Instruct.Q4_1");
        assert!(n["last_seen_ms"].as_u64().unwrap() < 3000);
        assert!(n["http_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    // 202 FAQ entries in 8 shards, each shard on 2 of the 3 nodes.
    wait_view(&b, Duration::from_secs(10), "every shard on its 2 placed replicas", |v| {
        let table = v["faq"]["table"].as_array().unwrap();
        let held: u64 = v["nodes"].as_array().unwrap().iter().map(|n| n["faq_documents"].as_u64().unwrap()).sum();
        table.len() == 8
            && table.iter().all(|s| s["serving"] == 2 && s["replicas"].as_array().unwrap().len() == 2)
            && held == 2 * 202
    });
    let c_addr = c.addr.clone();
    assert!(v["nodes"].as_array().unwrap().iter().any(|n| n["http_addr"] == c_addr.as_str()));

    let out = std::process::Command::new(ragnode_bin())
        .args(["cluster", "status", "--nats", &nats.url(), "--cluster", "t", "--json"])
        .output()
        .expect("ragnode cluster status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = listed["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(listed["faq_shards"].as_array().unwrap().len(), 8);

    // SIGKILL: no goodbye; the others notice the silence.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let took = wait_view(&a, Duration::from_secs(5), "c leaves a's view", |v| {
        v["nodes"].as_array().unwrap().iter().all(|n| n["id"] != "c")
    });
    eprintln!("c left a's view {took:?} after the kill");
    assert_eq!(live_ids(&b), ["a", "b"]);

    // NATS restarts: both nodes reconnect and hear each other again within 5 s.
    nats.restart();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let fresh = |v: &Value| {
        let nodes = v["nodes"].as_array().unwrap();
        nodes.len() == 2 && nodes.iter().all(|n| n["last_seen_ms"].as_u64().unwrap() < 1500)
    };
    // Fresh statuses from the other node prove the path through the new server.
    wait_view(&a, Duration::from_secs(5), "a hears b after the NATS restart", |v| {
        let seen = restarted.elapsed().as_millis() as u64;
        fresh(v)
            && v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == "b" && n["last_seen_ms"].as_u64().unwrap() < seen)
    });
    wait_view(&b, Duration::from_secs(5), "b hears a after the NATS restart", fresh);
    eprintln!("statuses flow again {:?} after the NATS restart", restarted.elapsed());
}

#[test]
fn without_nats_the_node_is_embedded() {
    let node = ServeProcess::start(&["--node-id", "solo"]);
    let v = view(&node);
    assert_eq!(v["mode"], "embedded");
    assert_eq!(v["nodes"][0]["id"], "solo");
    assert_eq!(v["nodes"][0]["ready"], true);
}

/// POSTs JSON; returns (status, the `x-ragnode-node` header, body).
fn post(addr: &str, path: &str, body: &Value) -> (u16, String, String) {
    let r = http(addr, "POST", path, Some(&body.to_string()), None);
    (r.status, r.header("x-ragnode-node").unwrap_or_default().to_string(), r.body)
}

/// Opens a streaming chat; returns the `x-ragnode-node` header and a reader of SSE payloads.
fn open_stream(addr: &str, body: &Value) -> (String, impl Iterator<Item = String> + use<>) {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let b = body.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut lines = std::io::BufReader::new(s).lines().map_while(Result::ok);
    let mut node = String::new();
    for l in lines.by_ref() {
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("x-ragnode-node: ") {
            node = v.trim().to_string();
        }
    }
    (node, lines.filter_map(|l| l.strip_prefix("data: ").map(str::to_string)))
}

fn chat(user: &str, max_tokens: usize, stream: bool) -> Value {
    serde_json::json!({
        "model": "smollm2", "user": user, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
    })
}

#[test]
fn requests_run_on_their_session_node_and_survive_its_death() {
    let nats = NatsServer::start();
    let serve = |id: &str| {
        ServeProcess::start(&[
            "--nats",
            &nats.url(),
            "--cluster",
            "r",
            "--node-id",
            id,
            "--served-model-name",
            "smollm2",
        ])
    };
    let a = serve("a");
    let mut b = serve("b");
    wait_view(&a, Duration::from_secs(10), "two ready nodes", |v| {
        let nodes = v["nodes"].as_array().unwrap();
        nodes.len() == 2 && nodes.iter().all(|n| n["ready"] == true)
    });

    // A session that hashes to b, asked at a, runs on b.
    let user = (0..64)
        .map(|i| format!("user-{i}"))
        .find(|u| post(&a.addr, "/v1/chat/completions", &chat(u, 4, false)).1 == "b")
        .expect("some session maps to b");
    let (status, node, via_a) = post(&a.addr, "/v1/chat/completions", &chat(&user, 24, false));
    assert_eq!((status, node.as_str()), (200, "b"), "{via_a}");
    let (status, node, at_b) = post(&b.addr, "/v1/chat/completions", &chat(&user, 24, false));
    assert_eq!((status, node.as_str()), (200, "b"), "the same session asked at b stays on b");
    let text = |body: &str| {
        let v: Value = serde_json::from_str(body).unwrap();
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    assert_eq!(text(&via_a), text(&at_b), "greedy output is the same whichever node receives it");
    assert!(metric(&b.addr, "ragnode:remote_requests_served_total") >= 2.0);
    assert!(metric(&a.addr, "ragnode:remote_requests_total") >= 2.0);

    // Streaming through a: every token arrives, in order, then [DONE].
    let (node, events) = open_stream(&a.addr, &chat(&user, 24, true));
    assert_eq!(node, "b");
    let events: Vec<String> = events.collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text(&at_b));

    // b dies mid-stream: the client gets an error event within 5 s, then [DONE].
    let (node, mut events) = open_stream(&a.addr, &chat(&user, 3000, true));
    assert_eq!(node, "b");
    for _ in 0..5 {
        events.next().expect("tokens flow");
    }
    b.child.kill().unwrap();
    let killed = Instant::now();
    b.child.wait().unwrap();
    let rest: Vec<String> = events.collect();
    let ended = killed.elapsed();
    assert!(ended < Duration::from_secs(5), "the stream ended {ended:?} after the kill");
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&rest[rest.len() - 2]).expect("an error event");
    assert!(err["error"]["message"].as_str().unwrap().contains("left the cluster"), "{err}");
    eprintln!("stream cut {ended:?} after the kill");

    // Before a notices b is gone, a new request for b's session is re-dispatched to a.
    let (status, node, body) = post(&a.addr, "/v1/chat/completions", &chat(&user, 8, false));
    assert_eq!((status, node.as_str()), (200, "a"), "{body}");
}

/// One request with the admin key: (status, body).
fn admin(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let r = http(addr, method, path, body.map(|b| b.to_string()).as_deref(), Some(ADMIN));
    (r.status, r.body)
}

const ADMIN: &str = "sk-admin-test-123";

#[test]
fn faq_writes_go_through_the_log_and_a_restarted_node_catches_up() {
    let nats = NatsServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let flags = |id: &'static str| {
        vec![
            "--nats".to_string(),
            nats.url(),
            "--cluster".into(),
            "w".into(),
            "--node-id".into(),
            id.into(),
            "--admin-key".into(),
            ADMIN.into(),
        ]
    };
    let start = |i: usize, id: &'static str| {
        let f = flags(id);
        ServeProcess::start_in(dirs[i].path(), &f.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let a = start(0, "a");
    let mut b = start(1, "b");
    // Both were seeded from the one log.
    for n in [&a, &b] {
        let (status, body) = admin(&n.addr, "GET", "/v1/admin/faq/stats", None);
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["num_docs"], 202, "{body}");
    }

    // A write at a is acknowledged once logged, applied at a at once and at b shortly.
    let mars = serde_json::json!({"entries": [{"id": "t1", "question": "你们支持火星配送吗？", "answer": "暂不支持火星配送。"}]});
    let (status, body) = admin(&a.addr, "POST", "/v1/admin/faq", Some(&mars));
    assert_eq!(status, 200, "{body}");
    let ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ack["visible"], true, "every serving replica applied it before the answer");
    assert!(ack["log_sequence"].as_u64().unwrap() >= 2);
    let t0 = Instant::now();
    while admin(&b.addr, "GET", "/v1/admin/faq/t1", None).0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(5), "b never applied the write");
        std::thread::sleep(Duration::from_millis(20));
    }

    // b dies; writes made meanwhile reach it when it comes back on the same index.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let moon =
        serde_json::json!({"entries": [{"id": "t2", "question": "月球配送多少钱？", "answer": "月球配送每件999元。"}]});
    assert_eq!(admin(&a.addr, "POST", "/v1/admin/faq", Some(&moon)).0, 200);
    assert_eq!(admin(&a.addr, "DELETE", "/v1/admin/faq/t1", None).0, 200);
    let b = start(1, "b");
    let (status, body) = admin(&b.addr, "GET", "/v1/admin/faq/t2", None);
    assert_eq!(status, 200, "the restarted node caught up before serving: {body}");
    assert_eq!(admin(&b.addr, "GET", "/v1/admin/faq/t1", None).0, 404, "and applied the delete");
    let (_, body) = admin(&b.addr, "GET", "/v1/admin/faq/stats", None);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["num_docs"], 203);
    let (_, body) =
        admin(&b.addr, "POST", "/v1/admin/faq/search", Some(&serde_json::json!({"query": "月球配送", "k": 1})));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["hits"][0]["id"], "t2");
}
