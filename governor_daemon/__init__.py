"""Tolaria governor daemon: policy core, run registry, journal, gRPC servicers and CLI."""
