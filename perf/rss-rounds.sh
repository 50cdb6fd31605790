#!/usr/bin/env bash
# RSS after each round of one kind of traffic through a sidecar pair (exchange on, both
# scraped after every round), to tell a leak (RSS grows with every round) from allocator
# retention (RSS grows, then stays).
#   perf/rss-rounds.sh short|idle|bulk [ROUNDS]   (default 8; each round 5-10 s)
source "$(dirname "$0")/harness.sh"

KIND=${1:?short|idle|bulk}; ROUNDS=${2:-8}
BACKEND=18500; INNER=18501; OUTER=18502; INNER_ADMIN=18503; OUTER_ADMIN=18504

build
echo_backend $BACKEND
sidecar inbound inbound $INNER $BACKEND $INNER_ADMIN --workers 1 --tcp-reporting-duration 5s
INNER_PID=$LAST_PID
sidecar outbound outbound $OUTER $INNER $OUTER_ADMIN --workers 1 --tcp-reporting-duration 5s
OUTER_PID=$LAST_PID
target=127.0.0.1:$OUTER
for ((r = 1; r <= ROUNDS; r++)); do
  case $KIND in
    short) "$LOADGEN" connrate --target "$target" --concurrency 16 --seconds 10 --size 512 ;;
    idle) "$LOADGEN" idle --target "$target" --connections 2000 --hold-seconds 2 --open-seconds 10 ;;
    bulk) "$LOADGEN" bulk --target "$target" --streams 4 --seconds 5 ;;
    *) die "unknown kind $KIND" ;;
  esac >"$WORK/round.json"
  scrape $OUTER_ADMIN >/dev/null
  scrape $INNER_ADMIN >/dev/null
  echo "round $r: $(cat "$WORK/round.json") outbound RSS $(rss_kib "$OUTER_PID") KiB, inbound $(rss_kib "$INNER_PID") KiB"
done
