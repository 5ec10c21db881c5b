"""Real-guest tests (QEMU); see tests/rig/README.md."""
