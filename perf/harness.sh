# Shared by perf/million.sh, perf/idle.sh and perf/soak.sh (sourced, not run): release
# builds, a loadgen echo backend, ringside sidecars on fixed loopback ports, scrapes.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
LOADGEN=$HERE/loadgen/target/release/loadgen
RINGSIDE=$ROOT/target/release/ringside
PIDS=()
WORK=$(mktemp -d /tmp/ringside-harden.XXXXXX)

cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$(basename "$0" .sh): $*" >&2; }
die() { log "$*"; exit 1; }

build() {
  (cd "$ROOT" && cargo build --release --quiet)
  cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"
}

# A proxy holds two descriptors per relayed connection: as many as the hard limit allows.
ulimit -n "$(ulimit -Hn)"

# Polls an HTTP path until it answers 200, for at most 10 s.
wait_ready() {
  local url=$1 i
  for ((i = 0; i < 200; i++)); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.05
  done
  die "not ready: $url"
}

# Starts a command in the background; its pid lands in LAST_PID.
spawn() {
  "$@" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# echo_backend PORT: loadgen's echo/sink server.
echo_backend() {
  spawn "$LOADGEN" echo-server --listen "127.0.0.1:$1" --seconds 100000 >/dev/null
  local i
  for ((i = 0; i < 100; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  die "echo backend on $1 did not start"
}

# sidecar NAME DIRECTION LISTEN_PORT UPSTREAM_PORT ADMIN_PORT [extra flags]: pid in LAST_PID.
sidecar() {
  local name=$1 direction=$2 listen=$3 upstream=$4 admin=$5
  shift 5
  RUST_LOG=${RUST_LOG:-warn} spawn "$RINGSIDE" run --listen "127.0.0.1:$listen" \
    --upstream "127.0.0.1:$upstream" --direction "$direction" --peer-exchange always \
    --admin "127.0.0.1:$admin" --metrics off --health off --workload-name "$name" \
    --namespace perf "$@" 2>"$WORK/$name.log"
  wait_ready "http://127.0.0.1:$admin/ready"
}

scrape() { curl -fsS "http://127.0.0.1:$1/stats/prometheus"; }

# metric_sum ADMIN_PORT METRIC [k=v ...]: the sum of every series matching all labels.
metric_sum() {
  local port=$1 metric=$2
  shift 2
  scrape "$port" | python3 -c '
import re, sys
metric, want = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
total = 0.0
for line in sys.stdin:
    m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line.strip())
    if not m or m.group(1) != metric:
        continue
    labels = dict(re.findall(r"(\w+)=\"((?:[^\"\\\\]|\\\\.)*)\"", m.group(3) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        total += float(m.group(4))
print(int(total) if total == int(total) else total)
' "$metric" "$@"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# utime+stime of a process in clock ticks (1/100 s).
cpu_ticks() {
  local rest f
  rest=$(<"/proc/$1/stat"); rest=${rest##*) }
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

json_field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())[sys.argv[1]])' "$1"; }
