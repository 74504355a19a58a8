"""Reference models, written plainly from the papers; they import torch only.

``foldcompile.models.alphafold2`` (AlphaFold 2), ``foldcompile.models.pairformer``
(AlphaFold 3's Pairformer stack) and ``foldcompile.models.zoo`` (every model at a
tiny and at the papers' size, with example inputs).
"""
