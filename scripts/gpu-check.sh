#!/usr/bin/env bash
# The GPU acceptance run, in pieces: the GPU machine has no Rust toolchain, and at most
# 64 MiB travels with one call of the device tool.
#
#   here:  scripts/gpu-check.sh prepare
#          builds gpu-check and engine-bench with --features cuda (release), strips and
#          xz-compresses them into .gpu/ (≈ 28 MB), and splits the SmolLM2 Q4_1 GGUF into
#          three parts (≈ 33 MB each).
#   there, on one warm machine (carried ignored paths stay between calls while it is warm,
#   30 s after each call, so issue the calls back to back):
#          call 1, carry [".gpu/bin", ".gpu/model-aa"]:  scripts/gpu-check.sh stage
#          call 2, carry [".gpu/model-ab"]:              scripts/gpu-check.sh stage
#          call 3, carry [".gpu/model-ac"]:              scripts/gpu-check.sh run
#          `run` stages what it carries too, and writes its logs to $OUT.
#
# `run`: gpu-check (every CUDA kernel vs its CPU twin on random inputs, SmolLM2 greedy 32
# tokens cuda == cpu, copy bandwidth), then engine-bench on a Qwen2-1.5B-shaped bf16
# model and a DeepSeek-V2-Lite-shaped bf16 model (random weights): 1,024-token prefill
# (TTFT), decode at 1 / 8 / 64 streams, single-stream decode vs the bandwidth bound.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RAGNODE_CACHE:-$HOME/.cache/ragnode}"
GPU=.gpu

B=/tmp/ragnode-gpu

stage() {
  mkdir -p "$B"
  if [ -d "$GPU/bin" ]; then
    for f in "$GPU"/bin/*.xz; do xz -dc "$f" >"$B/$(basename "$f" .xz)"; done
    chmod +x "$B"/gpu-check "$B"/engine-bench
  fi
  for f in "$GPU"/model-a?; do [ -f "$f" ] && cp "$f" "$B/"; done
  ls -la "$B"
}

case "${1:-}" in
prepare)
  scripts/cuda-toolchain.sh
  scripts/fetch-test-data.sh
  cargo build --release -p ragnode-benches --features cuda --bin gpu-check --bin engine-bench
  target="${CARGO_TARGET_DIR:-target}/release"
  grep -qxF "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >>.git/info/exclude
  rm -rf "$GPU" && mkdir -p "$GPU/bin"
  for b in gpu-check engine-bench; do
    strip -o "$GPU/bin/$b" "$target/$b"
    xz -T0 -9 "$GPU/bin/$b"
  done
  split -n 3 "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$GPU/model-"
  du -sh "$GPU"/bin "$GPU"/model-* ;;
stage)
  stage ;;
run)
  stage
  [ -x "$B/gpu-check" ] || { echo "error: the binaries were not staged (call 1)" >&2; exit 1; }
  for p in aa ab ac; do [ -f "$B/model-$p" ] || { echo "error: model part $p was not staged" >&2; exit 1; }; done
  cat "$B"/model-aa "$B"/model-ab "$B"/model-ac >"$B/smollm2.gguf"
  # CUDA 13 libraries of the machine's Python packages (cuBLAS, cuRAND, NVRTC, cudart).
  libs=$(python3 -c 'import glob,os,nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d+"/**/lib/*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  out="${OUT:-$B/out}"; mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
  "$B/gpu-check" --model "$B/smollm2.gguf" --tokens 32 2>&1 | tee "$out/gpu-check.txt" || true
  for cfg in qwen2-1.5b deepseek-v2-lite; do
    timeout 240 "$B/engine-bench" --device cuda:0 --dummy-weights "benches/configs/$cfg.json" --dummy-format bf16 \
      --prompt-len 1024 --decode-tokens 128 --streams 8,64 --reps 3 2>&1 | tee "$out/engine-$cfg.txt" || true
  done ;;
*)
  echo "usage: scripts/gpu-check.sh prepare|stage|run" >&2; exit 2 ;;
esac
