//! Shared helpers for the whole-system tests in `tests/`.
//!
//! Real test data (the SmolLM2 GGUF, llama.cpp's tokenizer vectors, real Hugging Face
//! tokenizers with their chat templates) lives in a cache outside the checkout, filled by
//! `scripts/fetch-test-data.sh` (which `scripts/test.sh` and `.ci/run` call). Tests fail
//! loudly, never skip, when it is missing.

use std::path::PathBuf;

/// The test-data cache: `$RAGNODE_CACHE`, else `~/.cache/ragnode`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAGNODE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    PathBuf::from(home).join(".cache").join("ragnode")
}

fn require(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "test data {} is missing: run scripts/fetch-test-data.sh", path.display());
    path
}

/// SmolLM2-135M-Instruct, Q4_1 weights with a Q8_0 tied embedding (Llama architecture).
pub fn smollm2_gguf() -> PathBuf {
    require(cache_dir().join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// Folder holding llama.cpp's `ggml-vocab-NAME.gguf` files with `.inp`/`.out` cases.
pub fn llama_vocab_dir() -> PathBuf {
    require(cache_dir().join("llama-vocab"))
}

/// A real Hugging Face tokenizer with its chat template: `tokenizer.json` and
/// `tokenizer_config.json` of `name` = `deepseek_v3`, `llama3` or `qwen3`.
pub fn hf_tokenizer_dir(name: &str) -> PathBuf {
    let dir = cache_dir().join("hf-tokenizers").join(name);
    require(dir.join("tokenizer.json"));
    require(dir.join("tokenizer_config.json"));
    dir
}

/// The `ragnode` binary of the same build profile as the running test (built by
/// `scripts/test.sh` before the tests run).
pub fn ragnode_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    let bin = dir.join(format!("ragnode{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p ragnode --profile <same profile>`; scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Drives a model directly (no engine) over one sequence: prefills `prompt`, then feeds
/// `steps` tokens chosen by `next` from each step's logits. Returns the logits of every
/// step (the prompt's last position first). The cache uses a scrambled block table so
/// paging is exercised.
pub fn run_sequence(
    model: &dyn ragnode_models::CausalLm,
    prompt: &[u32],
    steps: usize,
    mut next: impl FnMut(usize, &[f32]) -> u32,
) -> Vec<Vec<f32>> {
    use ragnode_models::{BatchInput, PagedKvCache};
    let block_size = 4;
    let total = prompt.len() + steps;
    let blocks = total.div_ceil(block_size) + 2;
    let cache = PagedKvCache::new(model.kv_layout(), blocks, block_size, candle_core::DType::F32, model.device())
        .expect("kv cache");
    // Reverse order: logical block i lives in physical block blocks-1-i.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut all = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut computed = 0;
    for step in 0..=steps {
        let mut batch = BatchInput::default();
        batch.push_sequence(&tokens[computed..], computed, &table, block_size, true);
        let logits: Vec<f32> =
            model.forward(&batch, &cache).expect("forward").flatten_all().unwrap().to_vec1().unwrap();
        computed = tokens.len();
        if step < steps {
            tokens.push(next(step, &logits));
        }
        all.push(logits);
    }
    all
}

/// Index of the largest value (first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Compares a model with a one-sequence reference over `prompt` and `steps` greedy steps
/// (the reference's choices feed both, so every step is compared on equal input).
/// `reference_step(tokens, position)` returns the reference's logits after `tokens`.
/// Panics past `tol`; returns the largest difference seen.
pub fn compare_greedy(
    ours: &dyn ragnode_models::CausalLm,
    prompt: &[u32],
    steps: usize,
    tol: f32,
    mut reference_step: impl FnMut(&[u32], usize) -> Vec<f32>,
) -> f32 {
    let n = prompt.len();
    let mut tokens = prompt.to_vec();
    let mut ref_logits = vec![reference_step(prompt, 0)];
    for _ in 0..steps {
        let t = argmax(ref_logits.last().expect("logits"));
        let pos = tokens.len();
        tokens.push(t);
        ref_logits.push(reference_step(&[t], pos));
    }
    let ours = run_sequence(ours, prompt, steps, |i, _| tokens[n + i]);
    let mut worst = 0f32;
    for (step, (a, b)) in ours.iter().zip(&ref_logits).enumerate() {
        let d = max_abs_diff(a, b);
        worst = worst.max(d);
        assert!(d < tol, "step {step}: max abs logit diff {d} (tolerance {tol})");
    }
    worst
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A `ragnode serve` process on a free loopback port, killed on drop.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: Option<tempfile::TempDir>,
}

impl ServeProcess {
    /// Starts the node with the SmolLM2 GGUF and the demo FAQ (seeded into a fresh index)
    /// plus `extra` flags, and waits until it is ready.
    pub fn start(extra: &[&str]) -> ServeProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Self::start_in(dir.path(), extra);
        p._dir = Some(dir);
        p
    }

    /// As [`start`](Self::start), with the FAQ index in `dir/index` (kept, so a node can be
    /// restarted on it).
    pub fn start_in(dir: &std::path::Path, extra: &[&str]) -> ServeProcess {
        let faq = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
        Self::start_seeded(dir, &faq, extra)
    }

    /// As [`start_in`](Self::start_in), seeded from the FAQ file `faq` (JSONL).
    pub fn start_seeded(dir: &std::path::Path, faq: &std::path::Path, extra: &[&str]) -> ServeProcess {
        let model = [std::ffi::OsString::from("--model"), smollm2_gguf().into_os_string()];
        Self::start_model(dir, faq, &model, extra)
    }

    /// As [`start_seeded`](Self::start_seeded), with the model given by `model` (e.g.
    /// `--dummy-weights CONFIG.json`).
    pub fn start_model(
        dir: &std::path::Path,
        faq: &std::path::Path,
        model: &[std::ffi::OsString],
        extra: &[&str],
    ) -> ServeProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(ragnode_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "2", "--audit-log", "off"])
            .args(model)
            .arg("--faq-index")
            .arg(dir.join("index"))
            .arg("--faq-seed")
            .arg(faq)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ragnode serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.expect("read stderr");
            if let Some(rest) = line.strip_prefix("ragnode listening on http://") {
                addr = Some(rest.trim().to_string());
            }
            if line.starts_with("ragnode ready") {
                break;
            }
        }
        let addr = addr.expect("ragnode exited before it was ready");
        // Keep draining stderr so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServeProcess { child, addr, _dir: None }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `nats-server -js` (Debian's package) on a free loopback port, killed on drop.
pub struct NatsServer {
    pub child: std::process::Child,
    pub port: u16,
    pub store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().unwrap().port();
        let child = Self::spawn(port, store.path());
        NatsServer { child, port, store }
    }

    fn spawn(port: u16, store: &std::path::Path) -> std::process::Child {
        let child = std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is missing: apt-get install nats-server (.ci/run does)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server did not listen on {port}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, self.store.path());
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub struct HttpReply {
    pub status: u16,
    /// The raw header block, lowercased.
    pub headers: String,
    pub body: String,
}

impl HttpReply {
    /// A header's value (name lowercased).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
    }
}

/// Sends `method path` with an optional JSON body and bearer key; reads the whole reply.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>, bearer: Option<&str>) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let auth = bearer.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head.to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // Connection: close, so a chunked body is the only framing to undo.
    let body = if headers.contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_string() };
    HttpReply { status, headers, body }
}

/// A plain GET; returns (status, body).
pub fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let r = http(addr, "GET", path, None, bearer);
    (r.status, r.body)
}

/// The sum of a Prometheus metric's samples at `addr` (every line starting with `name`,
/// so `name{` sums its label sets).
pub fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics", None);
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn unchunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
