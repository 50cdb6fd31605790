#!/usr/bin/env bash
# Istio's "Collecting Metrics for TCP Services" task on real software, without containers:
#   a real Redis server (Debian's redis-server), the database workload redis-v1, behind an
#     inbound ringside sidecar (reporter=destination);
#   a real client (redis-benchmark, then redis-cli), the ratings-v2 workload, behind an
#     outbound ringside sidecar (reporter=source), peer exchange `always` on both;
#   a real Prometheus (Debian's prometheus) scraping both sidecars with job istio-mesh;
# then PromQL over Prometheus' HTTP API, as the task does: istio_tcp_connections_opened_total
# and _closed_total by destination_version and canonical service, and the byte counters.
#
# Usage: docker/native-demo.sh [--connections N]
#   RINGSIDE=path/to/ringside  the binary (default: target/release/ringside, else a debug build)
#   DEMO_RESULT=file.json      also write what was measured there (for tests/native_demo.rs)
#   DEMO_DEADLINE=seconds      give up after this long (default 120)
# Packages: redis-server redis-tools prometheus curl python3 (tests/deps.sh installs them).
# Everything lives in one temporary directory, on free loopback ports; on exit, error or
# Ctrl-C it stops exactly the processes it started and removes the directory.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cli_connections=20
while (($#)); do
  case $1 in
    --connections) cli_connections=${2:?--connections needs a number}; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "native-demo: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done
[[ $cli_connections =~ ^[0-9]+$ ]] || { echo "native-demo: --connections wants a number" >&2; exit 64; }

deadline=$((SECONDS + ${DEMO_DEADLINE:-120}))
step=0
say() { step=$((step + 1)); printf '[%2d] %s\n' "$step" "$*"; }
die() { echo "native-demo: $*" >&2; exit 1; }

for tool in redis-server redis-cli redis-benchmark prometheus curl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (bash tests/deps.sh installs it)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringside-demo.XXXXXX")
pids=()
# Stop what was started, newest first: the client side goes before the server it talks to.
stop_started() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_started
  if ((status != 0)); then
    echo "native-demo: failed; logs:" >&2
    tail -n 5 "$tmp"/*.log >&2 2>/dev/null || true
  fi
  rm -rf "$tmp"
  echo "native-demo: stopped ${#pids[@]} processes, removed $tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Wait (bounded by the demo's deadline) until "$@" succeeds.
wait_until() {
  local what=$1; shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
}

# Wait like wait_until for a server started in the background as $pid; fails when that
# process exits first (another program took its port between the probe and the bind).
wait_ready() {
  local what=$1 pid=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "native-demo: $what exited before it was ready" >&2; return 1; }
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
}

ringside=${RINGSIDE:-}
if [[ -z $ringside ]]; then
  if [[ -x $repo/target/release/ringside ]]; then
    ringside=$repo/target/release/ringside
  else
    say "building ringside (cargo build)"
    (cd "$repo" && cargo build -q --bin ringside)
    ringside=$repo/target/debug/ringside
  fi
fi

# The workload, its two sidecars and Prometheus, each on a probed free loopback port.
start_mesh() {
  # Free loopback ports, below the ephemeral range so no client connection takes one first.
  read -r p_redis p_in p_in_admin p_in_metrics p_out p_out_admin p_out_metrics p_prom < <(python3 - <<'EOF'
import random, socket
socks = []
while len(socks) < 8:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(20000, 32000)))
        socks.append(s)
    except OSError:
        s.close()
print(*(s.getsockname()[1] for s in socks))
EOF
  )

  say "redis-v1: redis-server on 127.0.0.1:$p_redis (the database workload)"
  redis-server --port "$p_redis" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --daemonize no --logfile "$tmp/redis.log" &
  pids+=($!)
  wait_ready "redis" "$!" redis-cli -p "$p_redis" ping || return 1

  say "redis-v1 sidecar: inbound ringside on 127.0.0.1:$p_in -> redis (reporter=destination)"
  cat >"$tmp/redis-v1.yaml" <<EOF
node:
  workload_name: redis-v1
  namespace: default
  labels: {app: redis, version: v1}
  service_account: bookinfo-redis
drain_timeout: 1s
metrics: {listen: 127.0.0.1:$p_in_metrics}
admin: {listen: 127.0.0.1:$p_in_admin}
health: {listen: "off"}
listeners:
  - {name: inbound-redis, listen: 127.0.0.1:$p_in, direction: inbound, peer_exchange: always,
     cluster: local-redis}
clusters:
  - name: local-redis
    service: redis.default.svc.cluster.local
    endpoints: [{address: 127.0.0.1:$p_redis}]
EOF
  "$ringside" run --config "$tmp/redis-v1.yaml" 2>"$tmp/redis-v1-sidecar.log" &
  pids+=($!)
  wait_ready "the redis-v1 sidecar" "$!" curl -fsS "http://127.0.0.1:$p_in_admin/ready" || return 1

  say "ratings-v2 sidecar: outbound ringside on 127.0.0.1:$p_out -> redis-v1 sidecar (reporter=source)"
  cat >"$tmp/ratings-v2.yaml" <<EOF
node:
  workload_name: ratings-v2
  namespace: default
  labels: {app: ratings, version: v2}
  service_account: bookinfo-ratings-v2
drain_timeout: 1s
metrics: {listen: 127.0.0.1:$p_out_metrics}
admin: {listen: 127.0.0.1:$p_out_admin}
health: {listen: "off"}
listeners:
  - {name: outbound-redis, listen: 127.0.0.1:$p_out, direction: outbound, peer_exchange: always,
     cluster: redis}
clusters:
  - name: redis
    service: redis.default.svc.cluster.local
    endpoints: [{address: 127.0.0.1:$p_in, labels: {app: redis, version: v1}}]
EOF
  "$ringside" run --config "$tmp/ratings-v2.yaml" 2>"$tmp/ratings-v2-sidecar.log" &
  pids+=($!)
  wait_ready "the ratings-v2 sidecar" "$!" curl -fsS "http://127.0.0.1:$p_out_admin/ready" || return 1

  say "prometheus on 127.0.0.1:$p_prom, job istio-mesh scraping both sidecars every second"
  cat >"$tmp/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: istio-mesh
    metrics_path: /stats/prometheus
    static_configs:
      - targets: ["127.0.0.1:$p_in_metrics"]
        labels: {namespace: default, pod: redis-v1}
      - targets: ["127.0.0.1:$p_out_metrics"]
        labels: {namespace: default, pod: ratings-v2}
EOF
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/prometheus" \
    --web.listen-address="127.0.0.1:$p_prom" 2>"$tmp/prometheus.log" &
  pids+=($!)
  wait_ready "prometheus" "$!" curl -fsS "http://127.0.0.1:$p_prom/-/ready" || return 1
}

say "state in $tmp"
for attempt in 1 2 3; do
  if start_mesh; then break; fi
  ((attempt < 3)) || die "the mesh did not start in $attempt attempts"
  echo "native-demo: starting again on other ports" >&2
  stop_started
  pids=()
done

# Redis counts every connection it accepts; each mesh connection is relayed 1:1, so the
# client's connections are the difference, less the asking connection itself.
redis_connections() {
  redis-cli -p "$p_redis" info stats | tr -d '\r' | sed -n 's/^total_connections_received://p'
}
before=$(redis_connections)

say "ratings-v2 client: redis-benchmark (4 connections) and $cli_connections redis-cli calls through 127.0.0.1:$p_out"
timeout 60 redis-benchmark -h 127.0.0.1 -p "$p_out" -c 4 -n 2000 -t set,get -q >"$tmp/benchmark.log" \
  || die "redis-benchmark failed: $(cat "$tmp/benchmark.log")"
tr '\r' '\n' <"$tmp/benchmark.log" | grep 'requests per second' | sed 's/^/     /' || true
for i in $(seq "$cli_connections"); do
  timeout 10 redis-cli -h 127.0.0.1 -p "$p_out" set "rating:$i" "$((i % 5 + 1))" >/dev/null
done
after=$(redis_connections)
connections=$((after - before - 1))
echo "     redis-server accepted $connections connections from the client through the mesh"

# Scrape until both sidecars counted every connection closed, then until Prometheus has it.
scraped() { # port reporter
  curl -fsS "http://127.0.0.1:$1/stats/prometheus" | python3 -c '
import sys
want = sys.argv[1]
total = 0
for line in sys.stdin:
    if line.startswith("istio_tcp_connections_closed_total{") and ("reporter=\"%s\"" % want) in line:
        total += float(line.rsplit(" ", 1)[1])
print(int(total))' "$2"
}
settled() { [[ $(scraped "$p_out_metrics" source) == "$connections" && $(scraped "$p_in_metrics" destination) == "$connections" ]]; }
say "waiting for both sidecars to count $connections connections closed"
wait_until "the sidecars' closed counts" settled

promql() { # query -> "value<TAB>labels" lines
  curl -fsS --get "http://127.0.0.1:$p_prom/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    labels = ",".join("%s=\"%s\"" % kv for kv in sorted(r["metric"].items()))
    print("%s\t{%s}" % (r["value"][1], labels))'
}
in_prometheus() {
  [[ $(promql 'sum(istio_tcp_connections_closed_total{job="istio-mesh"})' | cut -f1) == "$((2 * connections))" ]]
}
say "waiting for Prometheus to scrape them (job istio-mesh)"
wait_until "Prometheus' istio_tcp_connections_closed_total" in_prometheus

by='reporter, source_canonical_service, destination_canonical_service, destination_version'
say "PromQL over Prometheus' HTTP API (http://127.0.0.1:$p_prom/api/v1/query):"
results=()
for metric in istio_tcp_connections_opened_total istio_tcp_connections_closed_total \
  istio_tcp_received_bytes_total istio_tcp_sent_bytes_total; do
  query="sum by ($by) ($metric{job=\"istio-mesh\"})"
  echo "     $query"
  while IFS=$'\t' read -r value labels; do
    printf '       %s%s %s\n' "$metric" "$labels" "$value"
    results+=("$metric"$'\t'"$labels"$'\t'"$value")
  done < <(promql "$query")
done

query='sum by (pod) (ringside_exchange_total{job="istio-mesh",outcome="metadata_added"})'
echo "     $query   (the peer exchange ran on every connection, both sides)"
while IFS=$'\t' read -r value labels; do
  printf '       ringside_exchange_total%s %s\n' "$labels" "$value"
  results+=("ringside_exchange_total"$'\t'"$labels"$'\t'"$value")
done < <(promql "$query")

if [[ -n ${DEMO_RESULT:-} ]]; then
  printf '%s\n' "${results[@]}" | python3 -c '
import json, sys
rows = []
for line in sys.stdin:
    metric, labels, value = line.rstrip("\n").split("\t")
    pairs = dict(p.split("=", 1) for p in labels.strip("{}").split(",") if p)
    rows.append({"metric": metric, "labels": {k: v.strip("\"") for k, v in pairs.items()}, "value": float(value)})
json.dump({"connections": int(sys.argv[1]), "pids": [int(p) for p in sys.argv[2].split()],
           "tmp": sys.argv[3], "series": rows}, open(sys.argv[4], "w"), indent=1)' \
    "$connections" "${pids[*]}" "$tmp" "$DEMO_RESULT"
fi
say "done; stopping what the demo started"
