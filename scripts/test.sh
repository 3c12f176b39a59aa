#!/usr/bin/env bash
# The one command that runs every test (README, .ci/run):
#   real test data (fetched once into ~/.cache/ragnode), the ragnode binary, then all
#   unit and whole-system tests of the workspace, optimised (profile `ci`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-data.sh
cargo build --profile ci -p ragnode
cargo test --profile ci --workspace "$@"
