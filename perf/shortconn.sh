#!/usr/bin/env bash
# Proxy CPU per short connection in both shapes, ringside binaries against HAProxy, in
# alternating rounds (one run: neighbours' builds hit every row alike). Shapes: `client`
# (64 in flight, the client closes first: perf/run.sh's connection rate) and `backend` (32 in
# flight, the backend answers and closes first: an HTTP/1.0-style server).
# Usage: perf/shortconn.sh [ROUNDS] [ringside binary...]   (default: 5 rounds, target/release)
# Prints a row per round and proxy, then each one's median and ratio to HAProxy's (target ≤ 0.95×).
# Proxy on core 1, load generator and echo backend on core 0, as in perf/run.sh; 3 s per row.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ROUNDS=${1:-5}; shift || true
BINS=("$@"); ((${#BINS[@]})) || BINS=("$ROOT/target/release/ringside")
LOADGEN=$HERE/loadgen/target/release/loadgen
BACKEND=127.0.0.1:18210; FRONT=127.0.0.1:18211
WORK=$(mktemp -d /tmp/ringside-shortconn.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"
command -v haproxy >/dev/null || { echo "perf: needs haproxy" >&2; exit 1; }
printf 'global\n  nbthread 1\n  maxpipes 64\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\nfrontend f\n  bind %s\n  default_backend b\nbackend b\n  server s %s\n' \
  "$FRONT" "$BACKEND" >"$WORK/haproxy.cfg"

taskset -c 0 "$LOADGEN" echo-server --listen "$BACKEND" --seconds 3600 >/dev/null & PIDS+=($!)

# All threads' run time of a process in ns (schedstat): finer than clock ticks.
cpu_ns() {
  local total=0 t ns
  for t in /proc/"$1"/task/*; do read -r ns _ <"$t/schedstat"; total=$((total + ns)); done
  echo "$total"
}

start() {  # proxy: ringside binary path or "haproxy"; sets PROXY
  if [[ $1 == haproxy ]]; then
    taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db 2>>"$WORK/proxy.log" & PROXY=$!
  else
    taskset -c 1 env RINGSIDE_ISTIO_METRICS=0 "$1" run --listen "$FRONT" --upstream "$BACKEND" \
      --direction outbound --peer-exchange off --workers 1 --metrics off --admin off --health off \
      --driver uring 2>>"$WORK/proxy.log" & PROXY=$!
  fi
  PIDS+=("$PROXY")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/${FRONT%:*}/${FRONT#*:}") 2>/dev/null && return 0; sleep 0.05; done
  return 1
}

echo "round shape proxy conn_per_s cpu_us_per_conn"
for ((r = 1; r <= ROUNDS; r++)); do
  for shape in client backend; do
    c=64; [[ $shape == backend ]] && c=32
    for proxy in "${BINS[@]}" haproxy; do
      start "$proxy"
      c0=$(cpu_ns "$PROXY")
      out=$(timeout 60 taskset -c 0 "$LOADGEN" connrate --target "$FRONT" --concurrency "$c" --seconds 3 \
        --size 64 --closer "$shape")
      c1=$(cpu_ns "$PROXY")
      kill "$PROXY"; wait "$PROXY" 2>/dev/null || true
      n=$(grep -o '"connections":[0-9]*' <<<"$out" | cut -d: -f2)
      rate=$(grep -o '"conn_per_s":[0-9.]*' <<<"$out" | cut -d: -f2)
      name=$proxy; [[ $proxy == haproxy ]] || name=$(basename "$proxy")
      awk -v r="$r" -v s="$shape" -v p="$name" -v rate="$rate" -v ns=$((c1 - c0)) -v n="$n" \
        'BEGIN {printf "%d %s %s %s %.1f\n", r, s, p, rate, ns / 1000 / n}' | tee -a "$WORK/rows"
    done
  done
done

# Medians per shape and proxy, and each ringside's ratio to HAProxy's median (the target is
# ≤ 0.95×), with the per-round ratios.
python3 - "$WORK/rows" <<'PY'
import collections, statistics, sys
cpu = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, shape, proxy, _, us = line.split()
    cpu[shape, proxy].append(float(us))
print("shape proxy median_us ratio_to_haproxy per_round")
for shape in ("client", "backend"):
    ha = cpu[shape, "haproxy"]
    for (s, proxy), v in cpu.items():
        if s != shape:
            continue
        rounds = " ".join(f"{a / b:.2f}" for a, b in zip(v, ha))
        print(f"{shape} {proxy} {statistics.median(v):.1f} {statistics.median(v) / statistics.median(ha):.3f} {rounds}")
PY
