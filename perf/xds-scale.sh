#!/usr/bin/env bash
# A mesh of N services, ringside vs Envoy (SPEC §11, issue #29): runs benches/xds_scale.rs
# in a network namespace of its own whose OUTPUT chain redirects the services' ClusterIPs
# (10.96.0.0/12) to the capture port 15001, as istio-iptables does in a pod. The proxies
# (one worker each, one after the other) are pinned to core CORE (default 1); the bench
# process (ADS server, clients, backends) to the other core. Needs root; removes its
# namespace on exit. Usage: perf/xds-scale.sh [--quick]  (SERVICES, PROXIES,
# ENVOY_MAX_SERVICES, SECONDS, CONCURRENCY, PUSH_SECONDS, HELD: see the bench's header)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
for arg in "$@"; do
  case "$arg" in
    --quick) export SERVICES=${SERVICES:-100,1000} SECONDS=${SECONDS:-1} PUSH_SECONDS=${PUSH_SECONDS:-3} ;;
    *) echo "usage: $0 [--quick]" >&2; exit 64 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "perf/xds-scale.sh: needs root (a network namespace, iptables)" >&2; exit 1; }
for cmd in ip iptables taskset; do
  command -v "$cmd" >/dev/null || { echo "perf/xds-scale.sh: needs $cmd (tests/deps.sh installs it)" >&2; exit 1; }
done
export CORE=${CORE:-1}
LOAD_CORE=$(( CORE == 0 ? 1 : 0 ))
NS=rs-xds-scale-$$
cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ENVOY=$(bash "$HERE/fetch-envoy.sh") || { echo "perf/xds-scale.sh: no Envoy; ringside only" >&2; ENVOY=; }
export ENVOY
BENCH=$(cd "$ROOT" && cargo bench --bench xds_scale --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "xds_scale" and m.get("executable"):
        print(m["executable"])')
[[ -x $BENCH ]] || { echo "perf/xds-scale.sh: the bench did not build" >&2; exit 1; }
# The bench finds ringside through CARGO_BIN_EXE_ringside, compiled in: the release binary.
(cd "$ROOT" && cargo build --release --quiet)

ip netns add "$NS"
ip -n "$NS" link set lo up
# A pod's interface: the ClusterIPs need a route before the OUTPUT chain redirects them.
ip -n "$NS" link add eth0 type dummy
ip -n "$NS" addr add 10.244.0.9/32 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" route add 10.96.0.0/12 dev eth0
ip netns exec "$NS" iptables -t nat -A OUTPUT -p tcp -d 10.96.0.0/12 -j REDIRECT --to-ports 15001
ulimit -n 20000
echo "perf/xds-scale: $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD), proxies on core $CORE, load on core $LOAD_CORE; machine shared" >&2
ip netns exec "$NS" taskset -c "$LOAD_CORE" "$BENCH" --bench
