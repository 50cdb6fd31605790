#!/usr/bin/env bash
# The whole test suite, as the README gives it: install what is missing, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
# Tests that cannot run here (no root or namespaces) append a line to this file: they are
# skipped, not passed, and the run says so at the end.
skips=target/test-skips.txt
rm -f "$skips"
status=0
cargo test --all-targets || status=$?
if [ -s "$skips" ]; then
  echo "SKIPPED (not passed):" >&2
  sed 's/^/  /' "$skips" >&2
fi
exit "$status"
