"""Scores → allocations: per-layer sparsity, per-layer LoRA expert counts, layers to drop / adapt.

Pure functions of plain lists, one module per kind of allocation; adapters call these and
never the engine.
"""
