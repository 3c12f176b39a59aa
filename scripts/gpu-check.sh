#!/usr/bin/env bash
# The GPU acceptance run, in two halves (the GPU machine has no Rust toolchain, and at most
# 64 MiB travels with one call of the device tool):
#
#   here:  scripts/gpu-check.sh prepare
#          builds ragnode, engine-bench and gpu-check with --features cuda (release),
#          strips and xz-compresses them into .gpu/bin, and splits the SmolLM2 Q4_1 GGUF
#          into .gpu/model-a / .gpu/model-b (each carried by its own call).
#   there: call 1, carry [".gpu/bin", ".gpu/model-a"]:  scripts/gpu-check.sh stage
#          call 2, carry [".gpu/model-b"]:               scripts/gpu-check.sh run
#          (call 2 right after call 1, while the machine is warm: carried ignored paths
#          stay between calls on a warm machine). `run` writes its logs to $OUT.
#
# `run`: gpu-check (every CUDA kernel vs its CPU twin on random inputs, SmolLM2 greedy 32
# tokens cuda == cpu, copy bandwidth), then engine-bench on a Qwen2-1.5B-shaped bf16
# model and a DeepSeek-V2-Lite-shaped bf16 model (random weights): 1,024-token prefill
# (TTFT), decode at 1 / 8 / 64 streams, single-stream decode vs the bandwidth bound.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RAGNODE_CACHE:-$HOME/.cache/ragnode}"
GPU=.gpu

case "${1:-}" in
prepare)
  scripts/cuda-toolchain.sh
  scripts/fetch-test-data.sh
  cargo build --release -p ragnode -p ragnode-benches --features ragnode/cuda,ragnode-benches/cuda \
    --bin ragnode --bin gpu-check --bin engine-bench
  target="${CARGO_TARGET_DIR:-target}/release"
  grep -qxF "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >>.git/info/exclude
  rm -rf "$GPU" && mkdir -p "$GPU/bin"
  for b in ragnode gpu-check engine-bench; do
    strip -o "$GPU/bin/$b" "$target/$b"
    xz -T0 -6 "$GPU/bin/$b"
  done
  model="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  half=$(( ($(stat -c %s "$model") + 1) / 2 ))
  head -c "$half" "$model" >"$GPU/model-a"
  tail -c +"$((half + 1))" "$model" >"$GPU/model-b"
  du -sh "$GPU"/* ;;
stage)
  mkdir -p /tmp/ragnode-gpu
  for f in "$GPU"/bin/*.xz; do xz -dc "$f" >"/tmp/ragnode-gpu/$(basename "$f" .xz)"; done
  chmod +x /tmp/ragnode-gpu/*
  cp "$GPU/model-a" /tmp/ragnode-gpu/model-a
  ls -la /tmp/ragnode-gpu ;;
run)
  B=/tmp/ragnode-gpu
  [ -x "$B/gpu-check" ] || { echo "error: run 'stage' first (call 1)" >&2; exit 1; }
  cat "$B/model-a" "$GPU/model-b" >"$B/smollm2.gguf"
  # CUDA 13 libraries of the machine's Python packages (cuBLAS, cuRAND, NVRTC, cudart).
  libs=$(python3 -c 'import glob,os,nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d+"/**/lib/*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  out="${OUT:-/tmp/ragnode-gpu/out}"; mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
  set -o pipefail
  "$B/gpu-check" --model "$B/smollm2.gguf" --tokens 32 2>&1 | tee "$out/gpu-check.txt" || true
  for cfg in qwen2-1.5b deepseek-v2-lite; do
    timeout 240 "$B/engine-bench" --device cuda:0 --dummy-weights "benches/configs/$cfg.json" --dummy-format bf16 \
      --prompt-len 1024 --decode-tokens 128 --streams 8,64 --reps 3 2>&1 | tee "$out/engine-$cfg.txt" || true
  done ;;
*)
  echo "usage: scripts/gpu-check.sh prepare|stage|run" >&2; exit 2 ;;
esac
