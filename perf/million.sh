#!/usr/bin/env bash
# 1,000,000 short connections through two sidecars with the peer exchange on (client ->
# outbound sidecar -> inbound sidecar -> echo backend): opened == closed == N in both
# reporters, and the byte counters exact (each connection sends SIZE+1 bytes: loadgen's mode
# byte and SIZE, and gets SIZE back). Bounded: at most MILLION_SECONDS (default 1800).
#   perf/million.sh [N]        (default 1000000; tests/scale.rs runs 50,000 in the suite)
source "$(dirname "$0")/harness.sh"

N=${1:-1000000}
SIZE=64
CONCURRENCY=${MILLION_CONCURRENCY:-32}
SECONDS_MAX=${MILLION_SECONDS:-1800}
BACKEND=18200; INNER=18201; OUTER=18202; INNER_ADMIN=18203; OUTER_ADMIN=18204

build
echo_backend $BACKEND
sidecar inbound inbound $INNER $BACKEND $INNER_ADMIN --workers 1
INNER_PID=$LAST_PID
sidecar outbound outbound $OUTER $INNER $OUTER_ADMIN --workers 1
OUTER_PID=$LAST_PID

log "$N connections of $SIZE bytes each way, $CONCURRENCY at a time"
start=$(date +%s.%N)
result=$("$LOADGEN" connrate --target "127.0.0.1:$OUTER" --concurrency "$CONCURRENCY" \
  --seconds "$SECONDS_MAX" --size $SIZE --max "$N")
took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
done_conns=$(json_field connections <<<"$result")
errors=$(json_field errors <<<"$result")
log "loadgen: $result"

# The counters settle once every connection is closed on both sidecars (bounded wait).
status=0
for side in "source $OUTER_ADMIN $OUTER_PID" "destination $INNER_ADMIN $INNER_PID"; do
  read -r reporter port pid <<<"$side"
  for ((i = 0; i < 300; i++)); do
    [[ $(metric_sum "$port" istio_tcp_connections_closed_total) == "$N" ]] && break
    sleep 0.1
  done
  opened=$(metric_sum "$port" istio_tcp_connections_opened_total reporter="$reporter")
  closed=$(metric_sum "$port" istio_tcp_connections_closed_total reporter="$reporter")
  received=$(metric_sum "$port" istio_tcp_received_bytes_total reporter="$reporter")
  sent=$(metric_sum "$port" istio_tcp_sent_bytes_total reporter="$reporter")
  flags_ok=$(metric_sum "$port" istio_tcp_connections_opened_total reporter="$reporter" response_flags=-)
  echo "$reporter: opened $opened closed $closed (response_flags=\"-\": $flags_ok) received_bytes $received sent_bytes $sent; RSS $(rss_kib "$pid") KiB, CPU $(cpu_ticks "$pid") ticks"
  want_received=$((N * (SIZE + 1)))
  want_sent=$((N * SIZE))
  if [[ $opened != "$N" || $closed != "$N" || $flags_ok != "$N" || $received != "$want_received" || $sent != "$want_sent" ]]; then
    echo "$reporter: MISMATCH: want opened=closed=$N, received=$want_received, sent=$want_sent" >&2
    status=1
  fi
done
echo "million: $done_conns connections in ${took}s, $errors errors"
[[ $done_conns == "$N" && $errors == 0 ]] || status=1
exit $status
