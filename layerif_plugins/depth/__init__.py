"""Depth pruning: drop whole decoder blocks (:mod:`.drop`) and heal the rest with a LoRA (:mod:`.heal`)."""
