//! Shared helpers for the whole-system tests in `tests/`.
//!
//! Real test data (the SmolLM2 GGUF, llama.cpp's tokenizer vectors) lives in a cache
//! outside the checkout, filled by `scripts/fetch-test-data.sh` (which `scripts/test.sh`
//! and `.ci/run` call). Tests fail loudly, never skip, when it is missing.

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
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Starts the node with the SmolLM2 GGUF and the demo FAQ (seeded into a fresh index)
    /// plus `extra` flags, and waits until it is ready.
    pub fn start(extra: &[&str]) -> ServeProcess {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let faq = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/faq-demo.jsonl");
        let mut child = std::process::Command::new(ragnode_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--threads", "2", "--audit-log", "off"])
            .arg("--model")
            .arg(smollm2_gguf())
            .arg("--faq-index")
            .arg(dir.path().join("index"))
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
        ServeProcess { child, addr, _dir: dir }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
