#!/usr/bin/env bash
# Transparent capture vs explicit listeners (SPEC §8), in one run: two network-namespace
# "pods" joined by a veth pair, a ringside sidecar in each (uid 1337, peer_exchange always),
# a loadgen echo server in pod B and the loadgen client in pod A. Both paths cross both
# sidecars and the veth pair:
#   capture:  client -> 10.77.0.2:18100 --REDIRECT--> A:15001 -> B --REDIRECT--> B:15006
#             -> (from 127.0.0.6) 10.77.0.2:18100
#   explicit: client -> 127.0.0.1:18101 (A, explicit outbound) -> 10.77.0.2:18106 (B, explicit
#             inbound, excluded from B's capture) -> 127.0.0.1:18100
# Connection rate and 1-stream throughput alternate between the two, ROUNDS times; medians
# and the capture/explicit ratio are printed (target >= 0.9). Needs root; creates and
# removes its namespaces; touches nothing outside them. Usage: perf/capture.sh [--quick]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
ROUNDS=5; SECONDS_EACH=3; CONCURRENCY=16
for arg in "$@"; do
  case "$arg" in
    --quick) ROUNDS=1; SECONDS_EACH=1 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 64 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "perf/capture.sh: needs root (network namespaces, iptables)" >&2; exit 1; }
for cmd in ip iptables setpriv python3; do
  command -v "$cmd" >/dev/null || { echo "perf/capture.sh: needs $cmd (tests/deps.sh installs it)" >&2; exit 1; }
done

A=rs-perf-a-$$; B=rs-perf-b-$$
# As perf/run.sh: load generator and backend on core 0, both sidecars on core 1, at a higher
# priority when allowed, so a neighbour's build perturbs both paths alike and less.
LOAD_CORE=0; PROXY_CORE=1
PRIO=()
[[ $(nice -n -10 nice 2>/dev/null) == -10 ]] && PRIO=(nice -n -10)
WORK=$(mktemp -d /tmp/ringside-capture-perf.XXXXXX)
chmod 755 "$WORK"  # the sidecars run as uid 1337 and read their configs here
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "perf/capture: $*" >&2; }

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"
RINGSIDE=$ROOT/target/release/ringside
LOADGEN=$HERE/loadgen/target/release/loadgen

ip netns add "$A"; ip netns add "$B"
ip link add "rspa$$" netns "$A" type veth peer name "rspb$$" netns "$B"
ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip -n "$A" addr add 10.77.0.1/24 dev "rspa$$"; ip -n "$B" addr add 10.77.0.2/24 dev "rspb$$"
ip -n "$A" link set "rspa$$" up; ip -n "$B" link set "rspb$$" up

# Short connections to one address:port spend the source ports of that 4-tuple space
# (TIME_WAIT, 60 s), and through capture the client's and the sidecar's connections share it.
# Reuse TIME_WAIT ports as Linux already does on loopback (tcp_tw_reuse=2) so neither path
# runs out mid-run: inside these namespaces only; the host's setting is untouched.
for ns in "$A" "$B"; do ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1; done

ip netns exec "$A" "$RINGSIDE" iptables --apply
ip netns exec "$B" "$RINGSIDE" iptables --apply --exclude-ports 15090,15021,15020,18106

sidecar() { # NS WORKLOAD EXTRA_LISTENER CLUSTERS
  cat >"$WORK/$1.yaml" <<EOF
node: {workload_name: $2, namespace: default, labels: {app: $2, version: v1}}
workers: 1
metrics: {listen: 127.0.0.1:15090}
admin: {listen: 127.0.0.1:15000}
health: {listen: 'off'}
listeners:
  - {name: virtual-outbound, listen: 0.0.0.0:15001, direction: outbound, peer_exchange: always, capture: outbound}
  - {name: virtual-inbound, listen: 0.0.0.0:15006, direction: inbound, peer_exchange: always, capture: inbound}
  - $3
clusters: $4
EOF
  ip netns exec "$1" "${PRIO[@]}" taskset -c "$PROXY_CORE" setpriv --reuid=1337 --regid=1337 --clear-groups \
    "$RINGSIDE" run --config "$WORK/$1.yaml" 2>"$WORK/$1.log" &
  PIDS+=($!)
}
sidecar "$A" client \
  "{name: explicit-out, listen: 127.0.0.1:18101, direction: outbound, peer_exchange: always, cluster: explicit}" \
  "[{name: explicit, endpoints: [{address: 10.77.0.2:18106}]}, {name: svc, endpoints: [{address: 10.77.0.2:18100}]}]"
sidecar "$B" server \
  "{name: explicit-in, listen: 0.0.0.0:18106, direction: inbound, peer_exchange: always, cluster: app}" \
  "[{name: app, endpoints: [{address: 127.0.0.1:18100}]}]"
ip netns exec "$B" "${PRIO[@]}" taskset -c "$LOAD_CORE" "$LOADGEN" echo-server --listen 0.0.0.0:18100 --seconds 900 >/dev/null &
PIDS+=($!)

ready() { # NS: /ready on the sidecar's admin port, for at most 10 s
  local i
  for ((i = 0; i < 100; i++)); do
    ip netns exec "$1" python3 -c 'import urllib.request,sys; sys.exit(urllib.request.urlopen("http://127.0.0.1:15000/ready",timeout=1).status!=200)' 2>/dev/null && return 0
    sleep 0.1
  done
  log "sidecar in $1 not ready: $(cat "$WORK/$1.log")"; exit 1
}
ready "$A"; ready "$B"

run() { # PATH TEST: one loadgen JSON line from pod A (as root: captured where rules say)
  local target
  [[ $1 == capture ]] && target=10.77.0.2:18100 || target=127.0.0.1:18101
  case $2 in
    connrate) ip netns exec "$A" timeout 120 "${PRIO[@]}" taskset -c "$LOAD_CORE" "$LOADGEN" connrate --target "$target" \
                --concurrency "$CONCURRENCY" --seconds "$SECONDS_EACH" --size 64 ;;
    bulk) ip netns exec "$A" timeout 120 "${PRIO[@]}" taskset -c "$LOAD_CORE" "$LOADGEN" bulk --target "$target" --streams 1 --seconds "$SECONDS_EACH" ;;
  esac
}

: >"$WORK/raw.jsonl"
for ((r = 1; r <= ROUNDS; r++)); do
  for test in connrate bulk; do
    for path in explicit capture; do
      line=$(run "$path" "$test")
      echo "{\"path\":\"$path\",\"round\":$r,\"result\":$line}" >>"$WORK/raw.jsonl"
      log "round $r $path $line"
    done
  done
done

python3 - "$WORK/raw.jsonl" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(path, test, key):
    return statistics.median(r["result"][key] for r in rows if r["path"] == path and r["result"]["test"] == test)
errors = sum(r["result"]["errors"] for r in rows)
print(f"# capture vs explicit ({len(rows)//4} rounds, medians; {sys.argv[2]} CPUs, loadavg {sys.argv[3]}: a busy shared machine)")
for test, key in [("connrate", "conn_per_s"), ("bulk", "gbit_per_s")]:
    per = [c["result"][key] / e["result"][key] for e, c in zip(
        [r for r in rows if r["path"] == "explicit" and r["result"]["test"] == test],
        [r for r in rows if r["path"] == "capture" and r["result"]["test"] == test]) if e["result"][key]]
    print(f"{test}: per-round capture/explicit " + " ".join(f"{x:.2f}" for x in per))
print("| test | explicit | capture | capture/explicit |")
print("|---|---|---|---|")
for test, key, unit in [("connrate", "conn_per_s", "conn/s"), ("bulk", "gbit_per_s", "Gbit/s")]:
    e, c = med("explicit", test, key), med("capture", test, key)
    print(f"| {test} ({unit}) | {e:.1f} | {c:.1f} | {c / e:.2f}x |")
print(f"loadgen errors: {errors}")
EOF
