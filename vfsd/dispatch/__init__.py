"""Supervisor <-> worker IPC: shared-memory rings, control channel, fh ownership."""
