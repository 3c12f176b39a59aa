#!/usr/bin/env bash
# The one command that runs every test (README, .ci/run):
#   real test data (fetched once into ~/.cache/ragnode), the ragnode binary, all unit and
#   whole-system tests of the workspace, optimised (profile `ci`), then the black-box
#   Python tests (official `openai` SDK, headless Chromium) against a running node.
#   Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RAGNODE_CACHE:-$HOME/.cache/ragnode}"
scripts/fetch-test-data.sh

# Python test clients, in a venv outside the checkout.
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo build --profile ci -p ragnode
cargo test --profile ci --workspace "$@"

export RAGNODE_BIN="${CARGO_TARGET_DIR:-target}/ci/ragnode"
export RAGNODE_ARTIFACTS="${RAGNODE_ARTIFACTS:-${CARGO_TARGET_DIR:-target}/test-artifacts}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python
echo "test artefacts (screenshot, node log, audit log): $RAGNODE_ARTIFACTS"
