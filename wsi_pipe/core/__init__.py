"""Torch-free core: units, geometry, errors, configs, atomic file I/O, run layout, manifests."""
