#!/usr/bin/env bash
# The whole test suite, as the README gives it: install what is missing, then cargo test.
# A test that cannot run here (no root, no namespaces, no Envoy, no ../shared beside the
# checkout) says so through tests/common's skip(): a SKIP line, also appended to
# target/test-skips.txt. That list is printed at the end: skipped, not passed. Under CI
# (CI=true: root, ../shared beside the checkout, every tool installable) a skip fails the
# run even when cargo passed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/deps.sh
skips=target/test-skips.txt
rm -f "$skips"
status=0
# benches/xds_chains replays a real istiod dump; product code never reaches ../shared, so the
# path is handed to it here.
dump=../shared/istio-xds-dumps/dsb-hotelres-geo-sidecar-istio-1.18.2.json
if [ -f "$dump" ]; then export XDS_DUMP="$PWD/$dump"; fi
cargo test --all-targets || status=$?
if [ -s "$skips" ]; then
  echo "SKIPPED ($(sort -u "$skips" | wc -l), not passed):" >&2
  sort -u "$skips" | sed 's/^/  /' >&2
  if [ "${CI:-}" = true ]; then
    echo "tests/run.sh: CI=true: every test must run here, and the tests above did not" >&2
    [ "$status" -ne 0 ] || status=1
  fi
else
  echo "tests/run.sh: no test skipped" >&2
fi
exit "$status"
