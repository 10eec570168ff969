"""Generated protobuf and gRPC code for orders.v1 (made by scripts/gen_protos.py; never edit)."""
