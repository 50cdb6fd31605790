#!/usr/bin/env bash
# Run every fuzz target for a bounded time and print its execution count:
#   fuzz/run.sh [SECONDS_PER_TARGET]    (default 300)
# Targets: `parser` (the preamble parser, SPEC §2) and `config` (the YAML config loader and
# the `--istio` documents, SPEC §4/§6). libFuzzer via libfuzzer-sys, on the nightly
# toolchain; with cargo-fuzz when it is installed, else the same coverage flags cargo-fuzz
# passes (without a sanitizer: the crate is safe Rust outside src/socket.rs). Seeds come from
# tests/data; new inputs go to fuzz/corpus/<target>, crashes to fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
jobs=${FUZZ_JOBS:-1}
data=../tests/data

mkdir -p corpus/parser corpus/config artifacts/parser artifacts/config
# Seeds: the golden preamble; each YAML file whole as a native config (split byte 255) and
# whole as Istio documents (split byte 0).
cp "$data/preamble_golden_client.bin" corpus/parser/seed-golden
for f in "$data"/spec-example.yaml "$data"/istio/*.yaml "$data"/istio/bookinfo-like/*.yaml "$data"/istio/local/*.yaml; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .yaml)
  { printf '\377'; cat "$f"; } >"corpus/config/seed-native-$name"
  { printf '\000'; cat "$f"; } >"corpus/config/seed-istio-$name"
done

# An explicit --target keeps the coverage flags off build scripts and proc macros.
host=$(rustc +"$toolchain" -vV | sed -n 's/^host: //p')
if cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
  build() { cargo +"$toolchain" fuzz build --sanitizer none -O "$1" >&2; echo "target/$host/release/$1"; }
else
  build() {
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
      cargo +"$toolchain" build --release --target "$host" --bin "$1" >&2
    echo "target/$host/release/$1"
  }
fi

status=0
for target in parser config; do
  bin=$(build "$target")
  log=artifacts/$target/run.log
  # -max_len: a preamble is at most 64 KiB, a config file a few KiB; room above both.
  set +e
  "$bin" corpus/$target -artifact_prefix=artifacts/$target/ -max_total_time="$seconds" \
    -max_len=131072 -rss_limit_mb=2048 -jobs="$jobs" -workers="$jobs" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -h 'stat::number_of_executed_units' "$log" fuzz-*.log 2>/dev/null | awk '{s+=$2} END {print s+0}')
  peak=$(grep -h 'stat::peak_rss_mb' "$log" fuzz-*.log 2>/dev/null | awk '{if ($2>m) m=$2} END {print m+0}')
  corpus=$(find corpus/$target -type f | wc -l)
  echo "fuzz $target: $execs executions in ${seconds}s, peak RSS ${peak} MB, corpus $corpus inputs, exit $rc"
  rm -f fuzz-*.log
  if [ "$rc" -ne 0 ]; then
    echo "fuzz $target: FAILED; see fuzz/$log and fuzz/artifacts/$target/" >&2
    status=1
  fi
done
exit $status
