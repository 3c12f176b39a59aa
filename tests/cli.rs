//! The `ragnode` binary, run as a process.

use std::process::Command;

use ragnode_tests::{ragnode_bin, smollm2_gguf};

#[test]
fn generate_streams_and_reports_token_counts() {
    let out = Command::new(ragnode_bin())
        .args(["--threads", "2", "generate", "--chat", "--max-tokens", "16", "--ignore-eos", "--model"])
        .arg(smollm2_gguf())
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("[prompt tokens: "), "last line: {last:?}");
    assert!(last.contains("generated tokens: 16,"), "last line: {last:?}");
    assert!(last.contains("tokens/s"), "last line: {last:?}");
    assert!(stdout.len() > last.len() + 10, "no generated text: {stdout:?}");
}

#[test]
fn bad_model_paths_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("broken.gguf");
    std::fs::write(&junk, b"this is not a gguf file").unwrap();
    for (model, expect) in [(dir.path().join("missing.gguf"), "not found"), (junk.clone(), "broken.gguf")] {
        let out =
            Command::new(ragnode_bin()).args(["generate", "--prompt", "hi", "--model"]).arg(&model).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(stderr.starts_with("error: "), "stderr: {stderr}");
        assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    }
}

#[test]
fn hub_repo_ids_fail_clearly_when_offline() {
    let hf_home = tempfile::tempdir().unwrap();
    let out = Command::new(ragnode_bin())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hf_home.path())
        .args(["generate", "--prompt", "hi", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("HuggingFaceTB/SmolLM2-135M-Instruct"), "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    assert!(stderr.contains("local path"), "{stderr}");
}

#[test]
fn cuda_device_on_a_cpu_build_is_a_clear_error() {
    // The test binary is the CPU build (CI has no GPU): asking for CUDA must say how to get
    // it, and a malformed device must name the accepted forms; neither may panic.
    let model = smollm2_gguf();
    let run = |device: &str| {
        Command::new(ragnode_bin())
            .args(["generate", "--prompt", "hi", "--device", device, "--model"])
            .arg(&model)
            .output()
            .unwrap()
    };
    let out = run("cuda:0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("device cuda:0") && stderr.contains("--features cuda"), "stderr: {stderr}");
    let out = run("tpu");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("cpu, cuda or cuda:N"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    // `serve` rejects the same before loading anything.
    let out =
        Command::new(ragnode_bin()).args(["serve", "--device", "cuda:7", "--model"]).arg(&model).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("--features cuda"), "stderr: {stderr}");
}
