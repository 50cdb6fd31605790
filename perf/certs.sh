# Istio-style workload identities for the perf pairs (sourced by perf/run.sh, perf/hbone.sh,
# perf/mtls-bulk.sh and perf/mtls-ab.sh, not run), made with openssl: an EC P-256 mesh root
# and one certificate per workload with its SPIFFE URI SAN (spiffe://cluster.local/ns/default/sa/ID).
#   mesh_certs DIR ID...   writes DIR/root-key.pem, DIR/root-cert.pem, DIR/ID-key.pem, DIR/ID-cert.pem
mesh_certs() {
  local d=$1 id
  shift
  mkdir -p "$d"
  openssl ecparam -name prime256v1 -genkey -noout -out "$d/root-key.pem" 2>/dev/null
  openssl req -x509 -new -key "$d/root-key.pem" -subj /O=perf-mesh -days 2 -out "$d/root-cert.pem" 2>/dev/null
  for id in "$@"; do
    openssl ecparam -name prime256v1 -genkey -noout -out "$d/$id-key.pem" 2>/dev/null
    openssl req -new -key "$d/$id-key.pem" -subj /O=perf-mesh -out "$d/$id.csr" 2>/dev/null
    printf 'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/%s\n' "$id" >"$d/$id.ext"
    openssl x509 -req -in "$d/$id.csr" -CA "$d/root-cert.pem" -CAkey "$d/root-key.pem" -CAcreateserial \
      -days 2 -extfile "$d/$id.ext" -out "$d/$id-cert.pem" 2>/dev/null
  done
}

# The ringside-2-mtls pair's two configs: ratings' inbound sidecar on INNER (strict mTLS, to
# the sink on BACKEND) and productpage's outbound sidecar on FRONT (ISTIO_MUTUAL to INNER), one
# io_uring worker each, no admin or health listener; metrics on INNER_METRICS / OUTER_METRICS
# (host:port, default off) and, with SUITES, the inbound side's `cipher_suites` list.
#   mtls_pair_configs CERTDIR BACKEND INNER FRONT INNER_YAML OUTER_YAML [INNER_METRICS
#   OUTER_METRICS [SUITES]]   (certificates from `mesh_certs CERTDIR productpage ratings`)
mtls_pair_configs() {
  local d=$1 backend=$2 inner=$3 front=$4 suites=${9:+, cipher_suites: [$9]}
  local common='workers: 1
driver: uring
admin: {listen: "off"}
health: {listen: "off"}'
  cat >"$5" <<YAML
node: {workload_name: ratings-v1, namespace: default, labels: {app: ratings, version: v1}}
$common
metrics: {listen: "${7:-off}"}
listeners:
  - {name: inbound, listen: "127.0.0.1:$inner", direction: inbound, peer_exchange: alpn, cluster: app,
     tls: {mode: strict, cert_chain: $d/ratings-cert.pem, private_key: $d/ratings-key.pem, root_cert: $d/root-cert.pem$suites}}
clusters:
  - {name: app, service: ratings.default.svc.cluster.local, endpoints: [{address: "127.0.0.1:$backend"}]}
YAML
  cat >"$6" <<YAML
node: {workload_name: productpage-v1, namespace: default, labels: {app: productpage, version: v1}}
$common
metrics: {listen: "${8:-off}"}
listeners:
  - {name: outbound, listen: "127.0.0.1:$front", direction: outbound, peer_exchange: alpn, cluster: ratings}
clusters:
  - {name: ratings, service: ratings.default.svc.cluster.local, endpoints: [{address: "127.0.0.1:$inner"}],
     tls: {mode: istio_mutual, cert_chain: $d/productpage-cert.pem, private_key: $d/productpage-key.pem,
           root_cert: $d/root-cert.pem, subject_alt_names: ["spiffe://cluster.local/ns/default/sa/ratings"]}}
YAML
}
