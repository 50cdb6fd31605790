# HBONE pair configurations (SPEC §12, issue #30), shared by perf/hbone.sh and perf/run.sh's
# ringside-2-hbone / envoy-2-hbone rows so both measure the same thing. Sourced, not run.
#
# Both take: out (directory for the files), d (certificates: root-cert.pem, <id>-cert.pem,
# <id>-key.pem), client and server (workload ids; the server's SPIFFE id is
# spiffe://cluster.local/ns/default/sa/<server>), front (where clients connect), tunnel (the
# terminator's HBONE port), backend (the application), admin1 and admin2 (admin ports).

# Two ringsides: an originator (outbound listener, cluster with `tunnel: hbone`) in
# $out/orig.yaml and a terminator (listener with `tunnel: hbone`) in $out/term.yaml; mTLS 1.3,
# ALPN h2, one worker each.
hbone_ringside_configs() {
  local out=$1 d=$2 client=$3 server=$4 front=$5 tunnel=$6 backend=$7 admin1=$8 admin2=$9
  cat >"$out/term.yaml" <<EOF
node: {workload_name: server, namespace: default, labels: {app: server, version: v1}}
workers: 1
driver: uring
admin: {listen: "127.0.0.1:$admin2"}
health: {listen: "off"}
metrics: {listen: "off"}
listeners:
  - {name: hbone, listen: "127.0.0.1:$tunnel", direction: inbound, tunnel: hbone,
     tls: {mode: strict, cert_chain: $d/$server-cert.pem, private_key: $d/$server-key.pem, root_cert: $d/root-cert.pem}}
EOF
  cat >"$out/orig.yaml" <<EOF
node: {workload_name: client, namespace: default, labels: {app: client, version: v1}}
workers: 1
driver: uring
admin: {listen: "127.0.0.1:$admin1"}
health: {listen: "off"}
metrics: {listen: "off"}
listeners:
  - {name: outbound, listen: "127.0.0.1:$front", direction: outbound, peer_exchange: "off", cluster: app}
clusters:
  - {name: app, service: app.default.svc.cluster.local, endpoints: [{address: "127.0.0.1:$backend"}],
     tunnel: {protocol: hbone, port: $tunnel},
     tls: {mode: istio_mutual, cert_chain: $d/$client-cert.pem, private_key: $d/$client-key.pem,
           root_cert: $d/root-cert.pem, subject_alt_names: ["spiffe://cluster.local/ns/default/sa/$server"]}}
EOF
}

# Two Envoys as Istio's HBONE pair: tcp_proxy `tunneling_config` over HTTP/2 mTLS
# ($out/envoy-orig.yaml) into an http_connection_manager with CONNECT upgrade
# ($out/envoy-term.yaml), ztunnel's 4/16 MiB windows, circuit breakers raised.
hbone_envoy_configs() {
  local out=$1 d=$2 client=$3 server=$4 front=$5 tunnel=$6 backend=$7 admin1=$8 admin2=$9
  cat >"$out/envoy-term.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin2}}}
static_resources:
  listeners:
  - name: hbone
    address: {socket_address: {address: 127.0.0.1, port_value: $tunnel}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {tls_minimum_protocol_version: TLSv1_3}
            alpn_protocols: [h2]
            tls_certificates: [{certificate_chain: {filename: $d/$server-cert.pem}, private_key: {filename: $d/$server-key.pem}}]
            validation_context: {trusted_ca: {filename: $d/root-cert.pem}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {allow_connect: true, initial_stream_window_size: 4194304, initial_connection_window_size: 16777216}
          upgrade_configs: [{upgrade_type: CONNECT}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {connect_matcher: {}}
                route: {cluster: app, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment: {cluster_name: app, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $backend}}}}]}]}
EOF
  cat >"$out/envoy-orig.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin1}}}
static_resources:
  listeners:
  - name: out
    address: {socket_address: {address: 127.0.0.1, port_value: $front}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: out
          cluster: hbone
          tunneling_config: {hostname: "127.0.0.1:$backend"}
  clusters:
  - name: hbone
    type: STATIC
    connect_timeout: 5s
    # Envoy's default breakers stop at 1,024 streams; Istio raises them to the maximum.
    circuit_breakers: {thresholds: [{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295}]}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {initial_stream_window_size: 4194304, initial_connection_window_size: 16777216}}
    load_assignment: {cluster_name: hbone, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $tunnel}}}}]}]}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}
          alpn_protocols: [h2]
          tls_certificates: [{certificate_chain: {filename: $d/$client-cert.pem}, private_key: {filename: $d/$client-key.pem}}]
          validation_context:
            trusted_ca: {filename: $d/root-cert.pem}
            match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: "spiffe://cluster.local/ns/default/sa/$server"}}]
EOF
}
