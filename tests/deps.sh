#!/usr/bin/env bash
# Install what the test suite needs, only when missing: Debian's prometheus (promtool and a
# real Prometheus server) and Google's protobuf for Python (the independent wire peer).
set -euo pipefail
need_apt=()
{ command -v promtool && command -v prometheus; } >/dev/null || need_apt+=(prometheus)
command -v python3 >/dev/null || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian's prometheus package starts a service on :9090; the tests run their own servers.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
python3 -c 'import google.protobuf' 2>/dev/null || python3 -m pip install -q protobuf
