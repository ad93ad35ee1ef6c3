"""Generated gRPC stubs of proto/specmesh/v1/generate.proto (scripts/gen_proto.sh); do not edit."""
