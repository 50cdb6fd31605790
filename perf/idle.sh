#!/usr/bin/env bash
# Idle connections up to what the descriptor limit allows in one process, with live traffic
# byte-exact meanwhile: one sidecar (outbound, exchange on) in front of an inbound sidecar and
# an echo backend; loadgen opens IDLE connections through it (each completes one echo, so
# both legs exist and have carried data) and holds them while bulk streams and short
# connections run. Reports the outbound sidecar's RSS per idle connection.
#   perf/idle.sh [IDLE]   (default: (hard descriptor limit - 1000) / 2)
source "$(dirname "$0")/harness.sh"

IDLE=${1:-$(( ($(ulimit -Hn) - 1000) / 2 ))}
BACKEND=18300; INNER=18301; OUTER=18302; INNER_ADMIN=18303; OUTER_ADMIN=18304
HOLD=${IDLE_HOLD_SECONDS:-60}

build
echo_backend $BACKEND
sidecar inbound inbound $INNER $BACKEND $INNER_ADMIN --workers 1
sidecar outbound outbound $OUTER $INNER $OUTER_ADMIN --workers 1
PID=$LAST_PID
before=$(rss_kib "$PID")

log "opening $IDLE idle connections (hard limit $(ulimit -Hn) descriptors per process)"
"$LOADGEN" idle --target "127.0.0.1:$OUTER" --connections "$IDLE" --hold-seconds "$HOLD" \
  --open-seconds 120 >"$WORK/idle.json" &
IDLE_PID=$!
PIDS+=("$IDLE_PID")
for ((i = 0; i < 1200; i++)); do
  [[ -s $WORK/idle.json ]] && break
  sleep 0.1
done
ready=$(cat "$WORK/idle.json")
held=$(json_field connections <<<"$ready")
errors=$(json_field errors <<<"$ready")
active=$(metric_sum "$OUTER_ADMIN" ringside_connections_active)
after=$(rss_kib "$PID")
per_conn=$(python3 -c "print(f'{($after - $before) * 1024 / max($held, 1):.0f}')")
log "idle: $ready"

# Live traffic while they are held: bulk streams (the sink answers the byte count that
# crossed both sidecars) and short connections.
bulk=$("$LOADGEN" bulk --target "127.0.0.1:$OUTER" --streams 2 --seconds 5)
short=$("$LOADGEN" connrate --target "127.0.0.1:$OUTER" --concurrency 8 --seconds 5 --size 64 --max 20000)
log "bulk: $bulk"
log "short: $short"
bulk_bytes=$(json_field bytes <<<"$bulk")
short_conns=$(json_field connections <<<"$short")
short_errors=$(json_field errors <<<"$short")

# Byte-exact: what the outbound sidecar counted received equals what clients sent: 2 bytes
# per idle connection (mode + 1), 1 mode byte per bulk stream plus what the sink counted, 65
# per short connection. (Held connections are still open: their bytes are reported by the
# reporting tick, so wait for it.)
want=$((held * 2 + 2 + bulk_bytes + short_conns * 65))
want_sent=$((held + 2 * 8 + short_conns * 64))  # the echo, the sink's 8-byte counts, echoes
for ((i = 0; i < 300; i++)); do
  got=$(metric_sum "$OUTER_ADMIN" istio_tcp_received_bytes_total reporter=source)
  got_sent=$(metric_sum "$OUTER_ADMIN" istio_tcp_sent_bytes_total reporter=source)
  [[ $got == "$want" && $got_sent == "$want_sent" ]] && break
  sleep 0.1
done
echo "idle: $held idle connections held ($errors failed to open), ringside_connections_active $active"
echo "idle: RSS $before KiB -> $after KiB: $per_conn bytes per idle connection (one sidecar, both legs)"
echo "idle: live traffic meanwhile: bulk $bulk_bytes bytes, $short_conns short connections ($short_errors errors)"
echo "idle: received_bytes counted $got, sent by clients $want; sent_bytes counted $got_sent, expected $want_sent"
[[ $got == "$want" && $got_sent == "$want_sent" && $short_errors == 0 && $errors == 0 ]]
