"""Tissue masks, patch grids and patch reading for every slide OpenSlide reads (no gRPC, no torch)."""
