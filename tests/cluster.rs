//! Cluster membership over a real `nats-server -js` (Debian's package): nodes see each
//! other within a few seconds, a node killed with SIGKILL leaves every view within 5 s,
//! `ragnode cluster status` lists the live nodes, and after a NATS restart the statuses
//! flow again within 5 s.

use std::time::{Duration, Instant};

use ragnode_tests::{NatsServer, ServeProcess, http_get, ragnode_bin};
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
        assert_eq!(n["faq_documents"], 202);
        assert!(n["last_seen_ms"].as_u64().unwrap() < 3000);
        assert!(n["http_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let c_addr = c.addr.clone();
    assert!(v["nodes"].as_array().unwrap().iter().any(|n| n["http_addr"] == c_addr.as_str()));

    let out = std::process::Command::new(ragnode_bin())
        .args(["cluster", "status", "--nats", &nats.url(), "--cluster", "t", "--json"])
        .output()
        .expect("ragnode cluster status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"]);

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
        fresh(v) && v["nodes"].as_array().unwrap().iter().any(|n| n["id"] == "b" && n["last_seen_ms"].as_u64().unwrap() < seen)
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
