"""Real-guest test rig: build a tiny Linux guest and drive it under QEMU (see README.md)."""
