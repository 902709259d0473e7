"""Per-pass checkpoints so a killed scoring run resumes where it stopped.

Each finished pass writes its (already reduced) results to ``<dir>/<pass>.pt`` atomically,
on rank 0. ``meta.json`` holds the run's fingerprint - model, data hashes and every option
that changes the numbers; a directory written for another run is refused, naming the field
that differs, instead of silently mixing results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.engine import distributed as dd
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_file, atomic_write_json

logger = logging.getLogger(__name__)


class PassCheckpoints:
    """Load / save the state of each pass under ``directory`` (disabled when it is None)."""

    def __init__(self, directory: str | Path | None, fingerprint: dict[str, Any]):
        self.dir = Path(directory) if directory is not None else None
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        if self.dir is None:
            return
        meta = self.dir / "meta.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            for key in sorted(set(old) | set(self.fingerprint)):
                if old.get(key) != self.fingerprint.get(key):
                    raise ConfigError(
                        f"checkpoint directory {self.dir} belongs to a different run: {key} was "
                        f"{old.get(key)!r} there and is {self.fingerprint.get(key)!r} now. "
                        "Use another --checkpoint-dir, or delete it to start over."
                    )
        elif dd.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, self.fingerprint)
        dd.barrier()

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        if self.dir is None or not (self.dir / f"{name}.pt").is_file():
            return None
        logger.info("resuming: %s loaded from %s", name, self.dir)
        return torch.load(self.dir / f"{name}.pt", map_location="cpu", weights_only=True)

    def save(self, name: str, state: dict[str, Any]) -> None:
        if self.dir is None:
            return
        if dd.is_main():
            cpu = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in state.items()}
            with atomic_file(self.dir / f"{name}.pt") as tmp:
                torch.save(cpu, tmp)
        dd.barrier()
