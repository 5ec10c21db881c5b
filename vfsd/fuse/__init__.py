"""FUSE protocol layer: wire layouts (abi), INIT negotiation, file-system options. Pure."""
