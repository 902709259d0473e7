"""Model + layer scores → a stock ``peft.LoraConfig`` with per-layer ``rank_pattern`` / ``alpha_pattern``.

The numbers come from :func:`layerif_plugins.allocate.ranks.rank_layout` (exact budget); this
module reads what it needs from the real model and PEFT, and refuses before anything is
trained:

* the targeted modules are the ones PEFT itself would adapt
  (``peft.tuners.tuners_utils.check_target_module_exists`` on ``model.named_modules()``); a
  ``target_modules`` that matches nothing, or a match that is not a linear layer, is refused;
* the scores must belong to the model (``LayerScores.check_model``: layer count, hidden size,
  config hash …);
* every decoder layer gets one pattern key, ``re.escape("model.layers.3") + r"\\..*"``, and each
  key is checked with PEFT's own resolution (``peft.utils.other.get_pattern_key``, first
  matching key wins) against the targeted module names: a key that matches no targeted module,
  matches a module of another layer, or loses a module of its own layer to another key is
  refused (PEFT itself would apply such a key silently, or only warn);
* the trainable parameters of the finished config are counted again from the resolved patterns
  and the module shapes (:func:`lora_trainable_params`) and must equal the uniform config's.

Alpha follows the rank by default (``alpha="scale"``: ``α_l = α · r_l / r``, so every layer keeps
the uniform config's scaling ``α / r``); ``alpha="fixed"`` keeps ``α`` everywhere (no
``alpha_pattern``; a layer's scaling is then ``α / r_l``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from layerif_plugins.allocate.ranks import DEFAULT_SPREAD, RankLayout, rank_layout
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_write_text
from layerif_plugins.models import blocks_prefix, fingerprint, linear_weight_is_transposed, num_layers
from layerif_plugins.models.families import peft_targets
from layerif_plugins.scores import LayerScores

ALPHA_MODES: tuple[str, ...] = ("scale", "fixed")
#: LoraConfig fields a rank layout refuses: they set ranks or layers themselves, or change which modules (or how
#: many parameters) are trained, so the layout's exact budget would no longer hold
_CLASHING = frozenset({"rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "use_rslora", "bias",
                       "modules_to_save", "exclude_modules", "target_parameters", "layer_replication", "use_dora",
                       "lora_bias", "trainable_token_indices", "r", "lora_alpha", "target_modules"})


@dataclass(frozen=True)
class LoraLayout:
    """A built per-layer LoRA config and what it was built from.

    Attributes:
        config: the ``peft.LoraConfig`` (stock PEFT; ``rank_pattern`` / ``alpha_pattern`` per layer).
        ranks: the :class:`RankLayout` (ranks, per-layer costs, ideal ranks, spread).
        modules: targeted module name → ``(d_in, d_out)``.
        layer_keys: the pattern key of each decoder layer, layer 0 first.
        alphas: the alpha of each layer.
        trainable: LoRA parameters of ``config`` on the model (counted from the resolved patterns).
        uniform_trainable: the same for the uniform config (``r`` everywhere); equal to ``trainable``.
    """

    config: Any
    ranks: RankLayout
    modules: dict[str, tuple[int, int]]
    layer_keys: list[str]
    alphas: list[float]
    trainable: int
    uniform_trainable: int

    def rows(self, scores: Sequence[float] | None = None) -> list[list[Any]]:
        """Per-layer table rows: layer, score, ideal rank, rank, alpha, trainable parameters."""
        out = []
        for i, (rank, cost) in enumerate(zip(self.ranks.ranks, self.ranks.costs, strict=True)):
            out.append([i, f"{scores[i]:.6g}" if scores is not None else "-", f"{self.ranks.ideal[i]:.3f}", rank,
                        f"{self.alphas[i]:g}", rank * cost])
        return out


def _shape(name: str, module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear module (``nn.Linear`` or GPT-2's ``Conv1D``); refuses anything else."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if linear_weight_is_transposed(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise ConfigError(
        f"target_modules matches {name} ({type(module).__name__}), which is not a linear layer: per-layer ranks are "
        "computed for nn.Linear targets only; name the projections (e.g. q_proj,v_proj) instead"
    )


def targeted_linears(model: nn.Module, target_modules: Sequence[str] | str) -> dict[str, tuple[int, int]]:
    """The modules PEFT's LoRA adapts for ``target_modules`` (PEFT's own matching), name → ``(d_in, d_out)``."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        raise ConfigError("target_modules='all-linear' is not supported here: list the projections "
                          "(e.g. q_proj,v_proj)")
    if not target_modules:
        raise ConfigError("target_modules is empty: name the linear layers to adapt (e.g. q_proj,v_proj)")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ConfigError("the model already has PEFT adapter layers; pass the base model (before get_peft_model)")
    probe = LoraConfig(target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    out = {}
    for name, module in model.named_modules():
        if name and check_target_module_exists(probe, name):
            out[name] = _shape(name, module)
    if not out:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"target_modules {target_modules!r} matches no module of the model; its linear layers are named "
            f"{names}: pass some of those"
        )
    return out


def layer_pattern_key(layer_name: str) -> str:
    """The pattern key of one decoder layer: every module under it (``model\\.layers\\.3\\..*``)."""
    return re.escape(layer_name) + r"\..*"


def _matches(key: str, name: str) -> bool:
    """Whether pattern ``key`` matches module ``name`` by PEFT's rule (``get_pattern_key`` with that key alone)."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key([key], name) == key


def check_pattern_keys(
    patterns: Mapping[str, Any],
    module_names: Sequence[str],
    intended: Mapping[str, set[str]] | None = None,
    what: str = "rank_pattern",
) -> None:
    """Refuse pattern keys that PEFT would apply silently to the wrong modules, or to none.

    Args:
        patterns: a ``rank_pattern`` / ``alpha_pattern`` dict (key → value).
        module_names: the names of the modules the config targets (:func:`targeted_linears`).
        intended: key → the exact set of module names it is meant for (omit to check only that every key
            matches some targeted module).
        what: the field's name, for messages.

    Raises:
        ConfigError: a key matches no targeted module; matches a module it is not meant for (e.g. one of
            another layer); or a module it is meant for resolves to another key (PEFT takes the first
            matching key in dict order, ``peft.utils.other.get_pattern_key``).
    """
    from peft.utils.other import get_pattern_key

    names = list(module_names)
    for key in patterns:
        matched = {n for n in names if _matches(key, n)}
        if not matched:
            raise ConfigError(
                f"{what} key '{key}' matches none of the {len(names)} targeted modules (e.g. {names[0]!r}); PEFT "
                "would ignore it: fix the key or target_modules"
            )
        if intended is None:
            continue
        want = intended.get(key)
        if want is None:
            raise ConfigError(f"{what} key '{key}' is not one this layout meant to write")
        extra = sorted(matched - want)
        if extra:
            raise ConfigError(
                f"{what} key '{key}' also matches {extra[:3]}{' …' if len(extra) > 3 else ''}, modules of another "
                "layer: it would give them this layer's value; use a key anchored on the layer name"
            )
        missing = sorted(want - matched)
        if missing:
            raise ConfigError(f"{what} key '{key}' does not match {missing[:3]}, modules it is meant for")
    if intended is not None:
        keys = list(patterns)
        for key, want in intended.items():
            for name in sorted(want):
                got = get_pattern_key(keys, name)
                if got != key:
                    raise ConfigError(
                        f"{what}: module {name!r} resolves to key '{got}', not to its layer's key '{key}' (PEFT uses "
                        "the first matching key): reorder or narrow the keys"
                    )


def lora_trainable_params(config: Any, modules: Mapping[str, tuple[int, int]]) -> int:
    """LoRA parameters a ``LoraConfig`` trains on ``modules`` (name → shape): ``Σ r(name) · (d_in + d_out)``.

    ``r(name)`` is resolved as PEFT does (``rank_pattern`` through ``get_pattern_key``, else ``r``); no bias
    (``bias="none"``), no ``modules_to_save``.
    """
    from peft.utils.other import get_pattern_key

    pattern = dict(config.rank_pattern or {})
    total = 0
    for name, (d_in, d_out) in modules.items():
        total += int(pattern.get(get_pattern_key(pattern.keys(), name), config.r)) * (d_in + d_out)
    return total


def _alpha(lora_alpha: float, r: int, rank: int, mode: str) -> float | int:
    if mode == "fixed":
        return lora_alpha
    value = lora_alpha * rank / r
    return int(value) if float(value).is_integer() else value


def lora_layout_config(
    model: nn.Module,
    scores: LayerScores,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Sequence[str] | str | None = None,
    spread: float = DEFAULT_SPREAD,
    invert: bool = False,
    alpha: str = "scale",
    budget: int | None = None,
    **config_kwargs: Any,
) -> LoraLayout:
    """A stock ``peft.LoraConfig`` with per-layer ranks from ``scores`` at the uniform ``r`` config's budget.

    Args:
        model: the base model (not a ``PeftModel``); its module names and shapes are read, not changed.
        scores: per-layer scores of this model (checked with ``LayerScores.check_model``); their ``direction``
            decides which end gets more rank.
        r: the uniform rank whose trainable-parameter count is kept exactly.
        lora_alpha: alpha of the uniform config.
        target_modules: as in ``LoraConfig`` (names or a regex); default the model family's projections.
        spread: ε of the rank mapping in [0, 1] (:mod:`layerif_plugins.allocate.ranks`).
        invert: give more rank to the better-trained layers instead.
        alpha: ``"scale"`` (α_l = α·r_l/r, constant α/r, the default) or ``"fixed"`` (α everywhere).
        budget: spend this many trainable parameters instead of the uniform ``r`` config's.
        config_kwargs: further ``LoraConfig`` fields (``lora_dropout``, ``task_type`` — default
            ``"CAUSAL_LM"`` …); fields that set ranks or change what is trained (``rank_pattern``,
            ``layers_to_transform``, ``exclude_modules``, ``use_dora`` …, see ``_CLASHING``) are refused.
    """
    from peft import LoraConfig

    if alpha not in ALPHA_MODES:
        raise ConfigError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    clash = sorted(_CLASHING & set(config_kwargs))
    if clash:
        raise ConfigError(f"{clash} cannot be combined with a per-layer rank layout: the layout sets the ranks itself "
                          "and counts the parameters of plain LoRA on exactly the targeted modules")
    if config_kwargs.get("init_lora_weights") == "eva":
        raise ConfigError("init_lora_weights='eva' redistributes the ranks itself; use it instead of a rank layout")
    if isinstance(lora_alpha, float) and lora_alpha.is_integer():
        lora_alpha = int(lora_alpha)
    if not isinstance(scores, LayerScores):
        raise ConfigError(f"scores must be a LayerScores (LayerScores.load(path)), got {type(scores).__name__}")
    scores.check_model(model)
    n_layers = num_layers(model)
    targets = list(peft_targets(model)) if target_modules is None else target_modules
    modules = targeted_linears(model, targets)
    prefix = blocks_prefix(model)
    layer_names = [f"{prefix}.{i}" for i in range(n_layers)]
    per_layer: list[dict[str, tuple[int, int]]] = [{} for _ in range(n_layers)]
    of_layer = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    for name, shape in modules.items():
        match = of_layer.match(name)
        if match:
            per_layer[int(match.group(1))][name] = shape
    empty = [i for i, m in enumerate(per_layer) if not m]
    if empty:
        raise ConfigError(
            f"target_modules {targets!r} matches nothing in decoder layers {empty[:5]}: every layer needs a targeted "
            "module to get a rank; target modules present in every layer"
        )
    costs = [sum(d_in + d_out for d_in, d_out in m.values()) for m in per_layer]
    source = {"scores_method": scores.method, "model": fingerprint(model).to_dict()}
    layout = rank_layout(scores.scores, costs, r, spread, scores.direction, invert, source=source, budget=budget)
    keys = [layer_pattern_key(n) for n in layer_names]
    alphas = [_alpha(lora_alpha, r, rank, alpha) for rank in layout.ranks]
    config_kwargs.setdefault("task_type", "CAUSAL_LM")
    config = LoraConfig(
        r=int(r), lora_alpha=lora_alpha, target_modules=targets if isinstance(targets, str) else list(targets),
        rank_pattern=dict(zip(keys, layout.ranks, strict=True)),
        alpha_pattern=dict(zip(keys, alphas, strict=True)) if alpha == "scale" else {},
        bias="none", **config_kwargs,
    )
    intended = {key: set(per_layer[i]) for i, key in enumerate(keys)}
    check_pattern_keys(config.rank_pattern, list(modules), intended, "rank_pattern")
    if config.alpha_pattern:
        check_pattern_keys(config.alpha_pattern, list(modules), intended, "alpha_pattern")
    trainable = lora_trainable_params(config, modules)
    uniform = lora_trainable_params(LoraConfig(r=int(r), target_modules=config.target_modules), modules)
    # modules outside the decoder layers (e.g. lm_head) keep rank r in both configs
    if trainable - uniform != layout.budget - layout.uniform_budget:  # pragma: no cover
        raise ConfigError(f"internal error: the config trains {trainable} parameters, the uniform one {uniform}")
    return LoraLayout(config, layout, modules, keys, [float(a) for a in alphas], trainable, uniform)


def save_lora_config(config: Any, path: str | Path) -> Path:
    """Write ``config`` as PEFT's ``save_pretrained`` writes ``adapter_config.json``, atomically, to ``path``.

    Load it with PEFT alone: ``LoraConfig.from_peft_type(**LoraConfig.from_json_file(path))``, or copy it to
    ``DIR/adapter_config.json`` and ``LoraConfig.from_pretrained(DIR)``. PEFT writes name sets
    (``target_modules``) in set order; they are sorted here so the same layout gives the same file.
    """
    with tempfile.TemporaryDirectory(prefix="layerif-lora-config-") as tmp:
        config.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))
    for key, value in data.items():
        if isinstance(getattr(config, key, None), set):
            data[key] = sorted(value)
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
