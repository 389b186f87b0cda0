"""The gRPC-facing layer: codec, wire validation, streams, and the thin servicers."""
