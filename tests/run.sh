#!/usr/bin/env bash
# The whole test suite, as the README gives it: install what is missing, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
cargo test --all-targets
