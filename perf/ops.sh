#!/usr/bin/env bash
# Counts what one relayed message and one short connection cost ringside in kernel
# operations: io_uring requests submitted (tracepoint io_uring:io_uring_submit_req) and
# syscalls entered (raw_syscalls:sys_enter, with poll/recvfrom/epoll_wait/io_uring_enter
# broken out), per round trip of a kept-alive connection (64 B each way) and per short
# connection (connect, 64 B each way, close). Counts do not depend on optimisation, so a debug
# binary will do. Usage: perf/ops.sh [path/to/ringside]   (default: target/release/ringside)
# Bounded: 20000 round trips and 5000 connections per driver. Needs perf (linux-perf).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
RINGSIDE=${1:-$ROOT/target/release/ringside}
LOADGEN=$HERE/loadgen/target/release/loadgen
BACKEND=127.0.0.1:18300; FRONT=127.0.0.1:18301
TRIPS=20000; CONNS=5000
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
[[ -x $LOADGEN ]] || cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"
[[ -x $RINGSIDE ]] || (cd "$ROOT" && cargo build --release --quiet)

EVENTS=io_uring:io_uring_submit_req,raw_syscalls:sys_enter,syscalls:sys_enter_poll,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_shutdown

"$LOADGEN" echo-server --listen "$BACKEND" --seconds 300 >/dev/null & PIDS+=($!)

# Runs one loadgen test against a fresh proxy under perf stat; prints the counts over `per`.
count() {  # driver label per loadgen-args...
  local driver=$1 label=$2 per=$3; shift 3
  "$RINGSIDE" run --listen "$FRONT" --upstream "$BACKEND" --direction outbound --peer-exchange off \
    --workers 1 --metrics off --admin off --health off --driver "$driver" 2>/dev/null &
  local proxy=$!
  PIDS+=("$proxy")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/${FRONT%:*}/${FRONT#*:}") 2>/dev/null && break; sleep 0.05; done
  sleep 0.2  # the probe connection above closes before counting starts
  local out=$(mktemp)
  perf stat -x, -e "$EVENTS" -p "$proxy" -o "$out" &
  local stat=$!
  sleep 0.3
  "$LOADGEN" "$@" --target "$FRONT" >/dev/null
  kill -INT "$stat"; wait "$stat" 2>/dev/null || true
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
  awk -F, -v d="$driver" -v l="$label" -v per="$per" '
    $3 ~ /submit_req/ {r = $1} $3 ~ /raw_syscalls/ {s = $1} $3 ~ /_poll$/ {p = $1}
    $3 ~ /recvfrom/ {rv = $1} $3 ~ /epoll_wait/ {e = $1} $3 ~ /io_uring_enter/ {u = $1}
    $3 ~ /shutdown/ {sd = $1}
    END {printf "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", d, l, r / per, s / per, p / per, rv / per, e / per, u / per, sd / per}' "$out"
  rm -f "$out"
}

echo "| driver | per | io_uring requests | syscalls | poll | recvfrom | epoll_wait | io_uring_enter | shutdown |"
echo "|---|---|---|---|---|---|---|---|---|"
for driver in uring epoll; do
  count "$driver" "round trip" "$TRIPS" latency --connections 1 --requests "$TRIPS" --size 64
  count "$driver" "connection" "$CONNS" connrate --concurrency 1 --seconds 60 --max "$CONNS" --size 64
done
