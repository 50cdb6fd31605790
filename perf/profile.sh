#!/usr/bin/env bash
# Profiles one proxy under one load: CPU per connection (or per GB), where the proxy's time
# goes (perf record -g: kernel entry points), and TCP segments per connection (nstat).
# Usage: perf/profile.sh ringside|ringside-epoll|haproxy|envoy connrate|connrate-close|bulk [extra ringside flags...]
# (connrate: 64 in flight, the client closes first; connrate-close: 32 in flight, the backend
# closes first.)
# Proxy on core 1, load generator and echo backend on core 0, as in perf/run.sh. Bounded: one
# 3 s run. Needs perf (linux-perf), nstat (iproute2), haproxy for the haproxy target.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
target=${1:?target}; test=${2:?test}; shift 2
LOADGEN=$HERE/loadgen/target/release/loadgen
RINGSIDE=$ROOT/target/release/ringside
BACKEND=127.0.0.1:18200; FRONT=127.0.0.1:18201
WORK=$(mktemp -d /tmp/ringside-profile.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
(cd "$ROOT" && cargo build --release --quiet)
cargo build --release --quiet --manifest-path "$HERE/loadgen/Cargo.toml"

taskset -c 0 "$LOADGEN" echo-server --listen "$BACKEND" --seconds 60 >/dev/null & PIDS+=($!)
case $target in
  ringside|ringside-epoll)
    driver=uring; [[ $target == ringside-epoll ]] && driver=epoll
    taskset -c 1 "$RINGSIDE" run --listen "$FRONT" --upstream "$BACKEND" --direction outbound \
      --peer-exchange off --workers 1 --metrics off --admin off --health off --driver "$driver" "$@" \
      2>"$WORK/proxy.log" & PROXY=$! ;;
  haproxy)
    printf 'global\n  nbthread 1\n  maxpipes 64\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\nfrontend f\n  bind %s\n  default_backend b\nbackend b\n  server s %s\n' \
      "$FRONT" "$BACKEND" >"$WORK/haproxy.cfg"
    taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/proxy.log" & PROXY=$! ;;
  envoy)
    # As perf/run.sh runs it: tcp_proxy, Istio's circuit breakers, one worker thread.
    ENVOY=$("$HERE/fetch-envoy.sh")
    printf 'static_resources:\n  listeners:\n  - name: f\n    address: {socket_address: {address: %s, port_value: %s}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: f\n          cluster: b\n  clusters:\n  - name: b\n    type: STATIC\n    connect_timeout: 5s\n    circuit_breakers: {thresholds: [{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}]}\n    load_assignment: {cluster_name: b, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}]}]}\n' \
      "${FRONT%:*}" "${FRONT#*:}" "${BACKEND%:*}" "${BACKEND#*:}" >"$WORK/envoy.yaml"
    taskset -c 1 "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --log-level error --disable-hot-restart \
      2>"$WORK/proxy.log" & PROXY=$! ;;
  *) echo "unknown target $target" >&2; exit 64 ;;
esac
PIDS+=("$PROXY")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/${FRONT%:*}/${FRONT#*:}") 2>/dev/null && break; sleep 0.05; done

ticks() { awk '{print $14 + $15}' "/proc/$PROXY/stat"; }
t0=$(ticks); nstat -n >/dev/null
perf record -q -e cpu-clock -g -p "$PROXY" -o "$WORK/perf.data" -- sleep 3 >/dev/null 2>&1 &
rec=$!
case $test in
  connrate) out=$(taskset -c 0 "$LOADGEN" connrate --target "$FRONT" --concurrency 64 --seconds 3 --size 64) ;;
  connrate-close) out=$(taskset -c 0 "$LOADGEN" connrate --target "$FRONT" --concurrency 32 --seconds 3 --size 64 --closer backend) ;;
  bulk) out=$(taskset -c 0 "$LOADGEN" bulk --target "$FRONT" --streams 1 --seconds 3) ;;
  *) echo "unknown test $test" >&2; exit 64 ;;
esac
wait "$rec" || true
t1=$(ticks)
echo "$out"
hz=$(getconf CLK_TCK)
if [[ $test == connrate* ]]; then
  n=$(grep -o '"connections":[0-9]*' <<<"$out" | cut -d: -f2)
  echo "proxy CPU per connection: $(( (t1 - t0) * 1000000 / hz / n )) µs"
  nstat 2>/dev/null | awk -v n="$n" '/TcpOutSegs|TcpActiveOpens|TcpExtTW |TcpExtTCPPureAcks/ {printf "  %s per connection: %.2f\n", $1, $2 / n}'
else
  bytes=$(grep -o '"bytes":[0-9]*' <<<"$out" | cut -d: -f2)
  echo "proxy CPU per GB: $(awk -v t=$((t1 - t0)) -v hz="$hz" -v b="$bytes" 'BEGIN {printf "%.3f s", t / hz / (b / 1e9)}')"
fi
echo "where the proxy's time goes (children %, kernel entry points and the proxy's own code):"
perf report -i "$WORK/perf.data" --children --sort sym --stdio -g none 2>/dev/null |
  grep -E '\] (io_connect|__sys_connect|io_send|__sys_sendto|__sys_shutdown|__x64_sys_close|__fput|__sys_socket|io_accept|__sys_accept4|io_recv|__sys_recvfrom|task_work_run|do_epoll_wait|do_epoll_ctl|__inet_hash_connect|do_splice|__do_sys_io_uring_enter)$' |
  head -20
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '%' | head -5
rm -rf "$WORK"
