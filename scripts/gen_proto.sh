#!/usr/bin/env bash
# Regenerate the gateway's gRPC stubs from proto/specmesh/v1/generate.proto.
# Run from the repository root: scripts/gen_proto.sh  (needs grpcio-tools, a dev extra)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=services/gateway/proto
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I proto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    proto/specmesh/v1/generate.proto
mkdir -p "$OUT"
cp "$tmp"/specmesh/v1/generate_pb2.py "$tmp"/specmesh/v1/generate_pb2.pyi "$tmp"/specmesh/v1/generate_pb2_grpc.py "$OUT"/
# The generated service module imports its messages by proto path; make it package-relative.
sed -i 's/^from specmesh\.v1 import generate_pb2/from . import generate_pb2/' "$OUT"/generate_pb2_grpc.py
[ -f "$OUT"/__init__.py ] || echo '"""Generated gRPC stubs of proto/specmesh/v1/generate.proto (scripts/gen_proto.sh); do not edit."""' > "$OUT"/__init__.py
echo "stubs written to $OUT"
