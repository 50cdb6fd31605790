#!/usr/bin/env bash
# Install what the test suite needs, only when missing: Debian's prometheus (promtool and a
# real Prometheus server), Google's protobuf for Python (the independent wire peer), and the
# openssl command line (an independent TLS peer and key converter for tests/tls.rs).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_install() {
  if ((updated == 0)); then apt-get update -qq; updated=1; fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v python3 >/dev/null || need_apt+=(python3)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi
# Debian's prometheus package starts a service on :9090; the tests run their own servers.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
# pip where Python allows it; Debian's own package where the system Python is externally
# managed (PEP 668).
if ! python3 -c 'import google.protobuf' 2>/dev/null; then
  python3 -m pip install -q protobuf 2>/dev/null || apt_install python3-protobuf
fi
python3 -c 'import google.protobuf' || { echo "tests/deps.sh: cannot install protobuf for python3" >&2; exit 1; }
