#!/usr/bin/env python3
"""istio-peer-exchange preamble with Google's protobuf library, to check ringside against.

    peer.py encode < node.json > preamble.bin   # whole preamble: magic, BE length, Any(Struct)
    peer.py decode < preamble.bin > node.json   # node metadata of a whole preamble

node.json uses ringside's NodeMetadata field names: id, name, namespace, owner, workload_name,
cluster_id, mesh_id, service_account, istio_version (strings, "" = absent) and labels (an object
of strings). The writer follows SPEC §2 exactly as src/exchange.rs does.
"""
import json
import os
import struct
import sys

# Use protobuf's pure-Python backend: its deterministic serialization orders map keys as C++
# protobuf does (std::less, bytewise), which is what Istio's proxy writes and what prost's
# BTreeMap gives. The default upb backend emits a key before its own prefix
# ("x-envoy-peer-metadata-id" before "x-envoy-peer-metadata"): `_upb_mapsorter_cmpstr` negates
# the bytewise compare but not the length tie-break, and the encoder writes back to front.
os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"

from google.protobuf import any_pb2, struct_pb2  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

assert api_implementation.Type() == "python", api_implementation.Type()

MAGIC = 0x3D230467
METADATA_KEY = "x-envoy-peer-metadata"
METADATA_ID_KEY = "x-envoy-peer-metadata-id"
ALWAYS = [("NAME", "name"), ("NAMESPACE", "namespace"), ("WORKLOAD_NAME", "workload_name"),
          ("CLUSTER_ID", "cluster_id"), ("OWNER", "owner")]
WHEN_SET = [("MESH_ID", "mesh_id"), ("SERVICE_ACCOUNT", "service_account"),
            ("ISTIO_VERSION", "istio_version")]


def encode(node):
    top = struct_pb2.Struct()
    fields = top.fields[METADATA_KEY].struct_value
    for key, name in ALWAYS:
        fields.fields[key].string_value = node.get(name, "")
    for key, name in WHEN_SET:
        if node.get(name, ""):
            fields.fields[key].string_value = node[name]
    labels = fields.fields["LABELS"].struct_value
    labels.SetInParent()  # present even when empty
    for key, value in node.get("labels", {}).items():
        labels.fields[key].string_value = value
    top.fields[METADATA_ID_KEY].string_value = node.get("id", "")
    payload = any_pb2.Any()
    payload.Pack(top, deterministic=True)
    body = payload.SerializeToString(deterministic=True)
    return struct.pack(">II", MAGIC, len(body)) + body


def text(fields, key):
    value = fields.get(key)
    if value is not None and value.WhichOneof("kind") == "string_value":
        return value.string_value
    return ""


def decode(preamble):
    magic, length = struct.unpack(">II", preamble[:8])
    if magic != MAGIC or len(preamble) != 8 + length:
        raise SystemExit("peer.py: not a whole preamble")
    payload = any_pb2.Any()
    payload.ParseFromString(preamble[8:])
    top = struct_pb2.Struct()
    if not payload.Unpack(top):
        raise SystemExit("peer.py: payload is not a google.protobuf.Struct")
    node = {"id": text(top.fields, METADATA_ID_KEY)}
    meta = top.fields.get(METADATA_KEY)
    fields = meta.struct_value.fields if meta is not None else {}
    for key, name in ALWAYS + WHEN_SET:
        node[name] = text(fields, key)
    labels = fields.get("LABELS")
    node["labels"] = {} if labels is None else {
        key: value.string_value
        for key, value in labels.struct_value.fields.items()
        if value.WhichOneof("kind") == "string_value"
    }
    return node


def main():
    if sys.argv[1:] == ["encode"]:
        sys.stdout.buffer.write(encode(json.load(sys.stdin)))
    elif sys.argv[1:] == ["decode"]:
        json.dump(decode(sys.stdin.buffer.read()), sys.stdout, sort_keys=True)
    else:
        raise SystemExit("usage: peer.py encode|decode")


if __name__ == "__main__":
    main()
