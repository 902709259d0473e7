"""Resuming a pipeline: reuse what an earlier run into the same output directory made with the same settings.

Each check compares what was recorded beside an artifact (the scores file's parameters and
data fingerprints, ``sparsity_report.json``, the weights themselves) with what this run would
do, and answers "reuse" only on an exact match; the caller recomputes everything downstream
of a step it recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerif_plugins.errors import ScoresError
from layerif_plugins.scores import LayerScores


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (an interrupted write)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def same_weights(model: Any, hf_dir: Path) -> bool:
    """True when the safetensors files in ``hf_dir`` hold exactly ``model``'s weights."""
    import torch
    from safetensors.torch import load_file

    state = model.state_dict()
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        return False
    for f in files:
        for name, tensor in load_file(str(f)).items():
            if name not in state or not torch.equal(state[name].detach().cpu(), tensor):
                return False
    return True


def reusable_scores(model: Any, path: Path, method: str, data: Any, max_length: int,
                    params: str) -> LayerScores | None:
    """The scores file at ``path`` when it holds ``method`` scores of ``model`` on the same data and settings."""
    from layerif_plugins.scorers import resolve_scores

    if not path.is_file():
        return None
    try:
        scores = resolve_scores(model, method, path)
    except ScoresError:
        return None
    same = (scores.params.get("max_length") == max_length and scores.params.get("params") == params
            and scores.data == data.fingerprints())
    return scores if same else None


def reusable_prune(model_dir: Path, calib: dict[str, Any], **expected: Any) -> dict[str, Any] | None:
    """``prune_model``'s report in ``model_dir`` when its fields equal ``expected`` and its calibration ``calib``."""
    from layerif_plugins.integrations.llmcompressor.prune import REPORT_NAME

    rep = read_json(model_dir / REPORT_NAME)
    if rep is None or any(rep.get(k) != v for k, v in expected.items()):
        return None
    recorded = rep.get("calib") or {}
    return rep if all(recorded.get(k) == v for k, v in calib.items()) else None
