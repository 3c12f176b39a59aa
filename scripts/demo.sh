#!/usr/bin/env bash
# The demo (README's run command): a node serving the demo FAQ with the demo model.
# Fetches the demo model once (SmolLM2-135M-Instruct Q4_1, cached in ~/.cache/ragnode),
# builds ragnode, seeds data/index from data/faq-demo.jsonl if it is empty, and serves:
#   web chat  http://127.0.0.1:8080/
#   OpenAI    http://127.0.0.1:8080/v1  (models: SmolLM2-135M-Instruct.Q4_1, app:faq)
# Extra arguments go to `ragnode serve` (e.g. --listen 0.0.0.0:8080 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo model alone (not the test vectors and tokenizers), with progress shown.
scripts/fetch-test-data.sh --model-only
MODEL="${RAGNODE_CACHE:-$HOME/.cache/ragnode}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
exec cargo run --release -p ragnode -- serve --model "$MODEL" \
  --faq-index data/index --faq-seed data/faq-demo.jsonl "$@"
