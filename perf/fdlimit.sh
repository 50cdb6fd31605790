#!/usr/bin/env bash
# The descriptor limit, as issue reports tried it: ringside under `prlimit --nofile=256`, 400
# clients that connect and hold (more than the descriptors allow), per driver: CPU of the
# process over 5 s while saturated, back-off log lines, then the clients leave and a new
# connection must be served (time to recover).
#   perf/fdlimit.sh
source "$(dirname "$0")/harness.sh"

BACKEND=18500; FRONT=18501; ADMIN=18502
build
echo_backend $BACKEND
for driver in uring epoll; do
  RUST_LOG=warn spawn prlimit --nofile=256 -- "$RINGSIDE" run --listen "127.0.0.1:$FRONT" \
    --upstream "127.0.0.1:$BACKEND" --direction outbound --peer-exchange off --driver $driver \
    --workers 2 --admin "127.0.0.1:$ADMIN" --metrics off --health off 2>"$WORK/$driver.log"
  pid=$LAST_PID
  wait_ready "http://127.0.0.1:$ADMIN/ready"
  # 400 clients that each complete an echo and hold; those past the limit wait in the queue.
  "$LOADGEN" idle --target "127.0.0.1:$FRONT" --connections 400 --hold-seconds 12 --open-seconds 3 \
    >"$WORK/idle-$driver.json" &
  clients=$!
  sleep 4  # the clients' own open phase (3 s) is over: saturated from here
  t0=$(cpu_ticks "$pid")
  sleep 5  # the measurement window
  used=$(( $(cpu_ticks "$pid") - t0 ))
  lines_saturated=$(grep -c "pausing accepts" "$WORK/$driver.log" || true)
  wait "$clients" || true   # they hold 12 s in all, then leave
  t1=$(date +%s.%N)
  ok=$(timeout 10 "$LOADGEN" connrate --target "127.0.0.1:$FRONT" --concurrency 1 --seconds 5 --size 16 --max 1)
  recovered=$(python3 -c "import time; print(f'{time.time() - $t1:.3f}')")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  echo "fdlimit $driver: $(head -c 200 "$WORK/idle-$driver.json")"
  echo "fdlimit $driver: CPU $used ticks (1/100 s) in 5 s saturated = $((used * 100 / 500))% of a core; $lines_saturated back-off lines by then, $(grep -c 'pausing accepts' "$WORK/$driver.log" || true) in all"
  echo "fdlimit $driver: after the clients left, a new connection served in ${recovered}s: $ok"
done
