//! Load generator for `ragnode serve`, over real sockets (HTTP/1.1, keep-alive):
//!
//! 1. **streams**: N concurrent streaming `/v1/chat/completions` requests (distinct
//!    prompts, `max_tokens` 16), all sent at once; counts errors (non-200, error events,
//!    missing `[DONE]`) and reports time to first token p50/p99 and throughput.
//! 2. **hot-answer cache**: C workers send non-streaming `app:faq` requests for questions
//!    the app has already answered (served from its cache); reports req/s and latency
//!    p50/p99.
//!
//! By default it starts the node itself (`--ragnode`, the SmolLM2 GGUF, the demo FAQ) and
//! stops it after; `--url` drives a node that is already running.
//!
//!   cargo build --release -p ragnode -p ragnode-benches
//!   target/release/serve-load [--streams 1000] [--cache-requests 50000] [--cache-concurrency 32]
//!
//! Cluster modes (start their own `nats-server`): `--forward-streams N` compares local and
//! forwarded token streams; `--faq-cluster-entries 100000 [--faq-nodes 3]` times
//! distributed FAQ searches (the evaluation queries of `--datasets`) over HTTP.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// A running node (`http://127.0.0.1:8080`); default: start one.
    #[arg(long)]
    url: Option<String>,
    /// The ragnode binary to start.
    #[arg(long, default_value = "target/release/ragnode")]
    ragnode: PathBuf,
    /// Model for the started node (default: the cached SmolLM2 GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent streaming requests.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Requests of the hot-answer-cache phase.
    #[arg(long, default_value_t = 50_000)]
    cache_requests: usize,
    /// Connections of the hot-answer-cache phase.
    #[arg(long, default_value_t = 32)]
    cache_concurrency: usize,
    /// Compute threads of the started node.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Instead of the phases above: start nats-server and two nodes, and compare
    /// streams generated on the receiving node with streams forwarded from the other,
    /// this many of each (sequential, `--forward-tokens` tokens each).
    #[arg(long, default_value_t = 0)]
    forward_streams: usize,
    #[arg(long, default_value_t = 64)]
    forward_tokens: usize,
    /// Instead of the phases above: start nats-server and `--faq-nodes` nodes sharing a
    /// FAQ of this many entries (8 shards x 2 replicas), and time distributed searches
    /// of the evaluation queries over HTTP.
    #[arg(long, default_value_t = 0)]
    faq_cluster_entries: usize,
    #[arg(long, default_value_t = 3)]
    faq_nodes: usize,
    /// The evaluation sets (`stackfaq`, `bq`).
    #[arg(long, default_value = "../shared/datasets")]
    datasets: PathBuf,
}

const KEY: &str = "sk-bench-0123456789";

struct Node {
    child: Option<Child>,
    addr: String,
    _dir: Option<PathBuf>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self._dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn start_node(args: &Args) -> Result<Node> {
    start_node_with(args, &[], "single")
}

fn demo_faq() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl")
}

/// Starts a node with `extra` flags; its files go to a temp dir named after `tag`.
fn start_node_with(args: &Args, extra: &[&str], tag: &str) -> Result<Node> {
    start_node_seeded(args, &demo_faq(), extra, tag)
}

/// As [`start_node_with`], seeding the FAQ from `faq`.
fn start_node_seeded(args: &Args, faq: &std::path::Path, extra: &[&str], tag: &str) -> Result<Node> {
    use std::io::BufRead;
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = std::env::var("RAGNODE_CACHE").unwrap_or_else(|_| format!("{home}/.cache/ragnode"));
    let model =
        args.model.clone().unwrap_or_else(|| PathBuf::from(&cache).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let dir = std::env::temp_dir().join(format!("ragnode-serve-load-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut child = Command::new(&args.ragnode)
        .args(["serve", "--listen", "127.0.0.1:0", "--served-model-name", "smollm2", "--api-key", KEY])
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--model")
        .arg(&model)
        .arg("--faq-index")
        .arg(dir.join("index"))
        .arg("--faq-seed")
        .arg(faq)
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .args(["--max-waiting", &(args.streams + 64).to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.ragnode.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(a) = line.strip_prefix("ragnode listening on http://") {
            addr = Some(a.trim().to_string());
        }
        if line.starts_with("ragnode ready") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let addr = addr.context("the node exited before it was ready")?;
    Ok(Node { child: Some(child), addr, _dir: Some(dir) })
}

async fn connection(addr: &str) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn post(addr: &str, path: &str, body: &Value) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// One streaming request: (time to first token, total, tokens) or an error.
async fn one_stream(addr: String, i: usize, max_tokens: usize) -> Result<(Duration, Duration, usize)> {
    let mut sender = connection(&addr).await?;
    let body = json!({
        "model": "smollm2", "stream": true, "max_tokens": max_tokens, "temperature": 0,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": format!("Customer #{i} asks: how do I track my order?")}],
    });
    let t0 = Instant::now();
    let resp = sender.send_request(post(&addr, "/v1/chat/completions", &body)).await?;
    if resp.status() != 200 {
        let b = resp.into_body().collect().await?.to_bytes();
        bail!("status {}: {}", 200, String::from_utf8_lossy(&b));
    }
    let mut body = resp.into_body();
    let mut ttft = None;
    let mut buf = String::new();
    let mut done = false;
    let mut tokens = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Ok(data) = frame.into_data() else { continue };
        buf.push_str(std::str::from_utf8(&data)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else { continue };
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(payload)?;
            if v.get("error").is_some() {
                bail!("error event: {payload}");
            }
            if ttft.is_none() && v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                ttft = Some(t0.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    Ok((ttft.unwrap_or_else(|| t0.elapsed()), t0.elapsed(), tokens))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn streams_phase(addr: &str, n: usize, max_tokens: usize) -> Result<()> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(one_stream(addr.to_string(), i, max_tokens))).collect();
    let mut ttfts = Vec::new();
    let mut totals = Vec::new();
    let mut tokens = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok((ttft, total, k)) => {
                ttfts.push(ttft);
                totals.push(total);
                tokens += k;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    ttfts.sort();
    totals.sort();
    println!(
        "| concurrent streams | ok | errors | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | wall s | generated tok/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {wall:.1} | {:.0} |",
        ttfts.len(),
        errors.len(),
        pct(&ttfts, 0.5),
        pct(&ttfts, 0.99),
        pct(&totals, 0.5),
        pct(&totals, 0.99),
        tokens as f64 / wall
    );
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
    Ok(())
}

const CACHED_QUESTIONS: [&str; 4] = ["退货政策是什么?", "How long does delivery take?", "可以退货吗", "发票怎么开?"];

async fn cache_phase(addr: &str, total: usize, conc: usize) -> Result<()> {
    // Warm: each question once.
    let mut warm = connection(addr).await?;
    for q in CACHED_QUESTIONS {
        let body = json!({"model": "app:faq", "messages": [{"role": "user", "content": q}]});
        let resp = warm.send_request(post(addr, "/v1/chat/completions", &body)).await?;
        if resp.status() != 200 {
            bail!("warm-up request failed: {}", resp.status());
        }
        resp.into_body().collect().await?;
    }
    let bodies: Arc<Vec<Value>> = Arc::new(
        CACHED_QUESTIONS
            .iter()
            .map(|q| json!({"model": "app:faq", "messages": [{"role": "user", "content": q}]}))
            .collect(),
    );
    let t0 = Instant::now();
    let per = total / conc;
    let tasks: Vec<_> = (0..conc)
        .map(|w| {
            let addr = addr.to_string();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut sender = connection(&addr).await?;
                let mut lat = Vec::with_capacity(per);
                let mut errors = 0usize;
                for i in 0..per {
                    let body = &bodies[(w + i) % bodies.len()];
                    let t = Instant::now();
                    sender.ready().await?;
                    let resp = sender.send_request(post(&addr, "/v1/chat/completions", body)).await?;
                    let ok = resp.status() == 200;
                    let b = resp.into_body().collect().await?.to_bytes();
                    if !ok || !b.windows(6).any(|w| w == "来源".as_bytes() || w == b"Source") {
                        errors += 1;
                    }
                    lat.push(t.elapsed());
                }
                anyhow::Ok((lat, errors))
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        lat.extend(l);
        errors += e;
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort();
    println!();
    println!("| hot-answer cache | requests | connections | errors | req/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| app:faq, non-stream | {} | {conc} | {errors} | {:.0} | {:.2} | {:.2} | {:.2} |",
        lat.len(),
        lat.len() as f64 / wall,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    Ok(())
}

/// One streaming request: the node that served it and the client-side arrival times of
/// its content chunks (first token onwards).
async fn timed_stream(addr: &str, user: &str, max_tokens: usize) -> Result<(String, Duration, Vec<Duration>)> {
    let mut sender = connection(addr).await?;
    let body = json!({
        "model": "smollm2", "stream": true, "max_tokens": max_tokens, "temperature": 0, "user": user,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
    });
    let t0 = Instant::now();
    let resp = sender.send_request(post(addr, "/v1/chat/completions", &body)).await?;
    let node = resp.headers().get("x-ragnode-node").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let now = t0.elapsed();
        buf.push_str(std::str::from_utf8(&data)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.contains("\"content\":\"") && !event.contains("\"content\":\"\"") {
                arrivals.push(now);
            }
        }
    }
    let ttft = arrivals.first().copied().unwrap_or_else(|| t0.elapsed());
    Ok((node, ttft, arrivals))
}

/// Local vs forwarded streams through one receiving node of a two-node cluster.
/// A `nats-server -js` on a free port, stopped (and its store removed) on drop.
struct Nats {
    child: Child,
    store: PathBuf,
    url: String,
}

impl Nats {
    fn start() -> Result<Nats> {
        let store = std::env::temp_dir().join(format!("ragnode-serve-load-nats-{}", std::process::id()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server (apt-get install nats-server)")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Nats { child, store, url: format!("nats://127.0.0.1:{port}") })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn forward_overhead(args: &Args) -> Result<()> {
    let nats = Nats::start()?;
    let url = nats.url.clone();
    let run = || -> Result<()> {
        let a = start_node_with(args, &["--nats", &url, "--cluster", "bench", "--node-id", "a"], "a")?;
        let _b = start_node_with(args, &["--nats", &url, "--cluster", "bench", "--node-id", "b"], "b")?;
        std::thread::sleep(Duration::from_millis(2500)); // both statuses heard
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            // Sessions that land on a (local to the receiver) and on b (forwarded).
            let mut local_user = None;
            let mut remote_user = None;
            for i in 0..64 {
                let u = format!("bench-user-{i}");
                let (node, _, _) = timed_stream(&a.addr, &u, 1).await?;
                match node.as_str() {
                    "a" if local_user.is_none() => local_user = Some(u),
                    "b" if remote_user.is_none() => remote_user = Some(u),
                    _ => {}
                }
            }
            let (Some(lu), Some(ru)) = (local_user, remote_user) else { bail!("no session mapped to each node") };
            let mut stats: [(Vec<Duration>, Vec<Duration>); 2] = Default::default();
            for _ in 0..args.forward_streams {
                // Interleaved, so host noise hits both alike.
                for (slot, user) in [(0, &lu), (1, &ru)] {
                    let (_, ttft, arrivals) = timed_stream(&a.addr, user, args.forward_tokens).await?;
                    stats[slot].0.push(ttft);
                    stats[slot].1.extend(arrivals.windows(2).map(|w| w[1] - w[0]));
                }
            }
            println!("| stream | requests | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms |");
            println!("|---|---|---|---|---|---|");
            let mut rows = Vec::new();
            for (name, (mut ttft, mut itl)) in
                ["local (generated on the receiving node)", "forwarded (generated on the other node)"]
                    .into_iter()
                    .zip(stats)
            {
                ttft.sort();
                itl.sort();
                let row = (pct(&ttft, 0.5), pct(&ttft, 0.99), pct(&itl, 0.5), pct(&itl, 0.99));
                println!("| {name} | {} | {:.1} | {:.1} | {:.2} | {:.2} |", ttft.len(), row.0, row.1, row.2, row.3);
                rows.push(row);
            }
            println!(
                "\nforwarding adds: TTFT p50 {:+.2} ms, inter-token p50 {:+.3} ms, p99 {:+.3} ms",
                rows[1].0 - rows[0].0,
                rows[1].2 - rows[0].2,
                rows[1].3 - rows[0].3
            );
            anyhow::Ok(())
        })
    };
    run()
}

const ADMIN_KEY: &str = "sk-bench-admin-0123456789";

async fn get_json(addr: &str, path: &str) -> Result<Value> {
    let mut c = connection(addr).await?;
    let req = hyper::Request::get(path)
        .header("host", addr)
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .body(Full::new(Bytes::new()))?;
    let res = c.send_request(req).await?;
    Ok(serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?)
}

/// Distributed FAQ search over `--faq-nodes` nodes and `--faq-cluster-entries` entries.
fn faq_cluster_search(args: &Args) -> Result<()> {
    let (faq, queries) = ragnode_benches::faq_corpus(&args.datasets, args.faq_cluster_entries)?;
    let seed = std::env::temp_dir().join(format!("ragnode-serve-load-faq-{}.jsonl", std::process::id()));
    std::fs::write(&seed, faq.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))?;
    let nats = Nats::start()?;
    let t = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..args.faq_nodes {
        let id = format!("n{i}");
        let extra = ["--nats", &nats.url, "--cluster", "benchfaq", "--node-id", &id, "--admin-key", ADMIN_KEY];
        nodes.push(start_node_seeded(args, &seed, &extra, &id)?);
        if i == 0 {
            // The first node seeds the log; the others find it full.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let _ = std::fs::remove_file(&seed);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let want = args.faq_nodes.min(2) as u64;
        loop {
            let v = get_json(&addrs[0], "/v1/cluster").await?;
            let settled = v["nodes"].as_array().is_some_and(|n| n.len() == args.faq_nodes)
                && v["faq"]["table"].as_array().is_some_and(|t| t.iter().all(|s| s["serving"] == want));
            if settled {
                break;
            }
            if t.elapsed() > Duration::from_secs(900) {
                bail!("the cluster did not settle: {v}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{} entries logged, replayed and served by {} nodes in {:.1} s", faq.len(), args.faq_nodes, t.elapsed().as_secs_f64());
        println!(
            "| nodes | entries | clients | queries | HTTP p50 ms | HTTP p99 ms | in-node search p50 ms | p99 ms | queries/s | partial |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for clients in [1usize, 4] {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let queries = Arc::new(queries.clone());
            let t = Instant::now();
            let mut workers = Vec::new();
            for _ in 0..clients {
                let (next, queries, addrs) = (next.clone(), queries.clone(), addrs.clone());
                workers.push(tokio::spawn(async move {
                    let mut conns = Vec::new();
                    for a in &addrs {
                        conns.push(connection(a).await?);
                    }
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= queries.len() {
                            return anyhow::Ok(out);
                        }
                        let n = i % addrs.len();
                        let body = json!({"query": queries[i], "k": 10});
                        let req = hyper::Request::post("/v1/admin/faq/search")
                            .header("host", &addrs[n])
                            .header("content-type", "application/json")
                            .header("authorization", format!("Bearer {ADMIN_KEY}"))
                            .body(Full::new(Bytes::from(body.to_string())))?;
                        let sent = Instant::now();
                        let res = conns[n].send_request(req).await?;
                        let status = res.status();
                        let bytes = res.into_body().collect().await?.to_bytes();
                        let took = sent.elapsed();
                        if !status.is_success() {
                            bail!("search failed: {status} {}", String::from_utf8_lossy(&bytes));
                        }
                        let v: Value = serde_json::from_slice(&bytes)?;
                        let inner = Duration::from_secs_f64(v["took_ms"].as_f64().unwrap_or(0.0) / 1e3);
                        out.push((took, inner, v["partial"] == true));
                    }
                }));
            }
            let mut all = Vec::new();
            for w in workers {
                all.extend(w.await??);
            }
            let wall = t.elapsed().as_secs_f64();
            let mut http: Vec<Duration> = all.iter().map(|r| r.0).collect();
            let mut inner: Vec<Duration> = all.iter().map(|r| r.1).collect();
            http.sort();
            inner.sort();
            println!(
                "| {} | {} | {clients} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
                args.faq_nodes,
                faq.len(),
                all.len(),
                pct(&http, 0.5),
                pct(&http, 0.99),
                pct(&inner, 0.5),
                pct(&inner, 0.99),
                all.len() as f64 / wall,
                all.iter().filter(|r| r.2).count()
            );
        }
        anyhow::Ok(())
    })?;
    drop(nodes);
    drop(nats);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.forward_streams > 0 {
        return forward_overhead(&args);
    }
    if args.faq_cluster_entries > 0 {
        return faq_cluster_search(&args);
    }
    let node = match &args.url {
        Some(u) => {
            Node { child: None, addr: u.trim_start_matches("http://").trim_end_matches('/').to_string(), _dir: None }
        }
        None => start_node(&args)?,
    };
    // The client gets one thread: the node needs the machine's cores more than we do.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        if args.streams > 0 {
            streams_phase(&node.addr, args.streams, args.max_tokens).await?;
        }
        if args.cache_requests > 0 {
            cache_phase(&node.addr, args.cache_requests, args.cache_concurrency.max(1)).await?;
        }
        anyhow::Ok(())
    })?;
    drop(node);
    Ok(())
}
