#!/usr/bin/env bash
# The demo: fetch the demo model (SmolLM2-135M-Instruct Q4_1, cached in ~/.cache/ragnode)
# and stream a chat answer from it with the ragnode engine.
#   scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-data.sh >/dev/null
MODEL="${RAGNODE_CACHE:-$HOME/.cache/ragnode}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="${1:-What is your return policy for unused items?}"
cargo run --release -p ragnode -- generate --model "$MODEL" --chat \
  --system "You are a friendly customer-service assistant for an online shop." \
  --prompt "$PROMPT" --max-tokens 200 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.1
