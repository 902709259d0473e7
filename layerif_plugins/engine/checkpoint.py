"""Per-pass checkpoints so a killed scoring run resumes where it stopped.

Each finished pass writes its (already reduced) results to ``<dir>/<pass>.pt`` atomically,
on rank 0. ``meta.json`` holds the run's fingerprint - model, data hashes and every option
that changes the numbers, the weights fingerprint included
(:func:`~layerif_plugins.models.fingerprint.weights_fingerprint`: replaced weights under the same
config are refused, naming both fingerprints; a directory from before the fingerprint is
accepted); a directory written for another run is refused, naming the field that differs,
instead of silently mixing results. A damaged directory (a truncated
``meta.json`` or pass file, pass files without ``meta.json``, a file where the directory
goes) is refused in one line that names it and says to delete it to start over.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NoReturn

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
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--checkpoint-dir {self.dir} is a file, not a directory: delete it to start over, "
                              "or choose another --checkpoint-dir")
        meta = self.dir / "meta.json"
        if meta.exists():
            old = self._read_meta(meta)
            self._check_model(old.get("model"), self.fingerprint.get("model"))
            for key in sorted(set(old) | set(self.fingerprint)):
                if key == "model":
                    continue
                if old.get(key) != self.fingerprint.get(key):
                    raise ConfigError(
                        f"checkpoint directory {self.dir} belongs to a different run: {key} was "
                        f"{old.get(key)!r} there and is {self.fingerprint.get(key)!r} now. "
                        "Use another --checkpoint-dir, or delete it to start over."
                    )
        else:
            if self.dir.is_dir() and any(self.dir.glob("*.pt")):
                self._damaged("it holds pass files but no meta.json (which run they belong to is unknown)")
            if dd.is_main():
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(meta, self.fingerprint)
        dd.barrier()

    def _check_model(self, old: Any, new: Any) -> None:
        """Refuse a directory of another model: architecture fields by name, then the weights fingerprint.

        A directory written before the weights fingerprint existed (no ``weights`` in its
        ``model`` block) is accepted, with a debug log; so is a model whose weights cannot be
        fingerprinted (offloaded) or were fingerprinted at another precision.
        """
        from layerif_plugins.models.fingerprint import same_weights

        old_d = old if isinstance(old, dict) else {"": old}
        new_d = new if isinstance(new, dict) else {"": new}
        for key in sorted((set(old_d) | set(new_d)) - {"weights"}):
            if old_d.get(key) != new_d.get(key):
                raise ConfigError(
                    f"checkpoint directory {self.dir} belongs to a different run: model{'.' + key if key else ''} was "
                    f"{old_d.get(key)!r} there and is {new_d.get(key)!r} now. "
                    "Use another --checkpoint-dir, or delete it to start over."
                )
        same = same_weights(old_d.get("weights"), new_d.get("weights"))
        if same is False:
            raise ConfigError(
                f"checkpoint directory {self.dir} was written for other weights: weights fingerprint "
                f"{old_d['weights']} there, {new_d['weights']} now (same config: the model's weights were replaced). "
                "Resuming would mix two models' results: use another --checkpoint-dir, or delete it to start over."
            )
        if same is None:
            logger.debug("checkpoint %s: weights not compared (%s there, %s now): an older directory, an offloaded "
                         "model or another precision", self.dir, old_d.get("weights"), new_d.get("weights"))

    def _damaged(self, what: str) -> NoReturn:
        raise ConfigError(f"checkpoint directory {self.dir} is damaged: {what}; delete it to start over "
                          "(or choose another --checkpoint-dir)")

    def _read_meta(self, meta: Path) -> dict[str, Any]:
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # truncated, binary, a directory
            self._damaged(f"meta.json cannot be read ({exc})")
        if not isinstance(old, dict):
            self._damaged("meta.json is not a JSON object")
        return old

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        path = None if self.dir is None else self.dir / f"{name}.pt"
        if path is None or not path.exists():
            return None
        logger.info("resuming: %s loaded from %s", name, self.dir)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, OSError ...
            first = (str(exc).splitlines() or [""])[0][:120]
            self._damaged(f"{name}.pt cannot be read ({type(exc).__name__}: {first})")
        if not isinstance(state, dict):
            self._damaged(f"{name}.pt does not hold a pass state (a dict of tensors)")
        return state

    def save(self, name: str, state: dict[str, Any]) -> None:
        if self.dir is None:
            return
        if dd.is_main():
            cpu = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in state.items()}
            with atomic_file(self.dir / f"{name}.pt") as tmp:
                torch.save(cpu, tmp)
        dd.barrier()
