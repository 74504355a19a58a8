"""Modules written in the styles of public AlphaFold-family code bases (OpenFold, Boltz, Protenix),
near misses the fusion rules must refuse, and the unmodified Boltz-2 Pairformer: see catalog.py."""
