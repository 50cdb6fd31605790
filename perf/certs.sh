# Istio-style workload identities for the perf pairs (sourced by perf/run.sh, perf/hbone.sh and
# perf/mtls-bulk.sh, not run), made with openssl: an EC P-256 mesh root and one certificate per
# workload with its SPIFFE URI SAN (spiffe://cluster.local/ns/default/sa/ID).
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
