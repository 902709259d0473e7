"""Depth pruning: remove whole decoder blocks from an HF causal LM and save a shallower model.

Removing blocks is the one kind of pruning that makes serving faster without sparse
kernels (vLLM loads the result as an ordinary, shallower model). A correct removal has
to keep four things consistent, or KV-cache generation and reloading break:

1. the block list itself (``model.layers`` …), renumbered ``0 … L−K−1``;
2. ``config.num_hidden_layers`` (forward loops over ``layers[:num_hidden_layers]``, and the
   KV cache allocates one slot per layer);
3. per-layer indices stored in the modules (``layer_idx`` on attention modules, which
   index the KV cache, and the rarer ``layer_id`` / ``layer_num`` / ``layer_number``);
4. per-layer config lists (``layer_types`` for sliding/full attention, ``mlp_layer_types``,
   ``no_rope_layers`` …) and lists of layer *indices* (``mlp_only_layers`` …).

Before touching the model, :func:`drop_layers` builds the shallower model's skeleton
from the edited config on the ``meta`` device (no memory) and checks that it has exactly
the parameters (names and shapes) and the per-module settings (``layer_idx``,
``sliding_window`` …) the kept blocks will have. A family whose block structure depends
on the layer position in a way the edited config cannot express (e.g. DeepSeek's
``first_k_dense_replace``: a MoE block cannot move into a dense slot) is refused with
the first difference named. So a model that passes loads back with
``AutoModelForCausalLM.from_pretrained`` into the same modules.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.errors import AllocationError, ModelError
from layerif_plugins.io import atomic_dir
from layerif_plugins.models import decoder_blocks, family_of

logger = logging.getLogger(__name__)

#: config fields with one entry per decoder layer (sliced to the kept layers)
PER_LAYER_CONFIG_LISTS: tuple[str, ...] = (
    "layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type", "layer_rope_theta",
    "num_key_value_heads_per_layer", "num_attention_heads_per_layer", "sliding_window_layers",
)
#: config fields listing layer *indices* (kept indices renumbered, dropped ones removed)
LAYER_INDEX_CONFIG_LISTS: tuple[str, ...] = (
    "mlp_only_layers", "moe_layers", "cross_attention_layers", "full_attn_idxs", "hybrid_layer_ids",
    "global_attn_layers", "swa_layers",
)
#: module attributes that hold the module's own layer index
LAYER_INDEX_ATTRS: tuple[str, ...] = ("layer_idx", "layer_id", "layer_num", "layer_number")
#: config settings under which a block computes differently at another depth (refused)
_DEPTH_DEPENDENT = {
    "scale_attn_by_inverse_layer_idx": "GPT-2 scales attention by 1/(layer_idx+1), so a block moved to another "
                                       "depth would compute a different function",
}
# module attributes that are runtime state, not structure
_IGNORED_ATTRS = {"training", "config", "gradient_checkpointing", "name_or_path"}

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class DropInfo:
    """What :func:`drop_layers` removed; saved as ``layer_drop.json`` beside the model."""

    dropped: list[int]
    kept: list[int]
    original_num_layers: int
    config_fields: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_drop(layers: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique layer indices; refuse out-of-range, duplicates, none, or all of them."""
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_layers]
    if bad:
        raise AllocationError(f"layers to drop {bad} are not layer indices 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise AllocationError(f"layers to drop {list(layers)} contain duplicates")
    if len(layers) < 1:
        raise AllocationError("no layers to drop: choose at least 1")
    if len(layers) >= num_layers:
        raise AllocationError(f"cannot drop {len(layers)} of {num_layers} layers: at least one must remain")
    return sorted(layers)


def shallower_config(config: Any, kept: Sequence[int]) -> tuple[Any, list[str]]:
    """A copy of ``config`` for a model made of blocks ``kept`` (old indices); also the fields changed."""
    old_n = int(config.num_hidden_layers)
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept)
    changed = ["num_hidden_layers"]
    remap = {old: j for j, old in enumerate(kept)}
    for name in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            if len(value) != old_n:
                raise ModelError(f"config.{name} has {len(value)} entries for {old_n} layers; cannot drop layers")
            setattr(new, name, type(value)(value[i] for i in kept))
            changed.append(name)
    for name in LAYER_INDEX_CONFIG_LISTS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
            setattr(new, name, type(value)(remap[i] for i in value if i in remap))
            changed.append(name)
    handled = set(PER_LAYER_CONFIG_LISTS) | set(LAYER_INDEX_CONFIG_LISTS)
    for name, value in config.to_dict().items():
        if name in handled or "layer" not in name or not isinstance(value, list) or len(value) != old_n:
            continue
        raise ModelError(
            f"config.{name} looks like a per-layer list ({old_n} entries) that layer_drop does not know how to "
            "rebuild; add it to layerif_plugins.depth.drop.PER_LAYER_CONFIG_LISTS (one entry per "
            "layer) or LAYER_INDEX_CONFIG_LISTS (layer indices)"
        )
    return new, changed


def _scalar_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in _IGNORED_ATTRS and isinstance(v, _SCALARS)}


def _planned(model: nn.Module, prefix: str, kept: Sequence[int]) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Parameter/buffer shapes and scalar module attributes the shallower model will have, by new name."""
    remap = {str(old): str(j) for j, old in enumerate(kept)}
    head = prefix + "."

    def rename(name: str) -> str | None:
        if not name.startswith(head):
            return name
        idx, _, rest = name[len(head):].partition(".")
        if idx not in remap:
            return None
        return head + remap[idx] + ("." + rest if rest else "")

    shapes: dict[str, tuple] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        new = rename(name)
        if new is not None:
            shapes[new] = tuple(t.shape)
    attrs: dict[str, dict] = {}
    for name, mod in model.named_modules():
        new = rename(name) if name != prefix else name
        if new is None:
            continue
        a = _scalar_attrs(mod)
        if new.startswith(head):
            j = int(new[len(head):].partition(".")[0])
            a.update({k: j for k in LAYER_INDEX_ATTRS if isinstance(a.get(k), int)})
        attrs[new] = a
    return shapes, attrs


def verify_rebuildable(model: nn.Module, new_config: Any, prefix: str, kept: Sequence[int]) -> None:
    """Build the shallower skeleton on ``meta`` and compare it with the planned model; raise on a difference."""
    try:
        with torch.device("meta"):
            skeleton = type(model)(new_config)
    except Exception as exc:  # noqa: BLE001 - any failure means the family cannot be rebuilt
        raise ModelError(f"{type(model).__name__} cannot be rebuilt with {new_config.num_hidden_layers} layers: "
                         f"{type(exc).__name__}: {exc}") from exc
    shapes, attrs = _planned(model, prefix, kept)
    sk_shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict(keep_vars=True).items()}
    what = f"{type(model).__name__} (model_type={getattr(new_config, 'model_type', '?')!r})"
    for name in sorted(set(shapes) | set(sk_shapes)):
        if shapes.get(name) != sk_shapes.get(name):
            mine = f"shape {shapes[name]}" if name in shapes else "no such tensor"
            theirs = f"shape {sk_shapes[name]}" if name in sk_shapes else "no such tensor"
            raise ModelError(
                f"cannot drop these layers from {what}: after the drop, {name} would have {mine} but a "
                f"{new_config.num_hidden_layers}-layer model built from the edited config has {theirs} "
                "(the block structure depends on the layer position)"
            )
    for name, mod in skeleton.named_modules():
        want, have = _scalar_attrs(mod), attrs.get(name, {})
        # Inside the blocks every setting must agree; outside them (rotary embeddings …) a
        # setting the shallower config no longer needs may remain on the in-memory model.
        keys = set(want) | set(have) if name.startswith(prefix + ".") else set(want) & set(have)
        for key in sorted(keys):
            if want.get(key) != have.get(key):
                raise ModelError(
                    f"cannot drop these layers from {what}: {name or 'model'}.{key} would be {have.get(key)!r} but "
                    f"a model built from the edited config has {want.get(key)!r}"
                )


def drop_layers(model: nn.Module, layers: Sequence[int]) -> DropInfo:
    """Remove decoder blocks ``layers`` from ``model`` **in place**; returns what was done.

    Refuses (``ModelError``) models whose blocks compute differently at another depth or
    whose shallower version cannot be rebuilt from its config; nothing is changed then.
    """
    blocks = decoder_blocks(model)
    n_old = len(blocks)
    dropped = check_drop(list(layers), n_old)
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError("layer drop supports decoder-only models; this one is encoder-decoder")
    for key, why in _DEPTH_DEPENDENT.items():
        if getattr(config, key, False):
            raise ModelError(f"cannot drop layers while config.{key}=True: {why}")
    if getattr(config, "num_hidden_layers", None) != n_old:
        raise ModelError(f"config.num_hidden_layers={getattr(config, 'num_hidden_layers', None)} but the model has "
                         f"{n_old} decoder blocks; cannot rebuild the layer list of {type(model).__name__}")
    kept = [i for i in range(n_old) if i not in set(dropped)]
    new_config, changed = shallower_config(config, kept)
    path = family_of(model).blocks_path
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    verify_rebuildable(model, new_config, prefix, kept)

    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for j, block in enumerate(new_blocks):
        for mod in block.modules():
            for key in LAYER_INDEX_ATTRS:
                if isinstance(getattr(mod, key, None), int) and not isinstance(getattr(mod, key), bool):
                    setattr(mod, key, j)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new_blocks)
    # Edit the shared config object in place: every submodule holding it sees the change.
    for name in changed:
        setattr(config, name, getattr(new_config, name))
    logger.info("dropped layers %s of %d (kept %s); config fields updated: %s", dropped, n_old, kept, changed)
    return DropInfo(dropped=dropped, kept=kept, original_num_layers=n_old, config_fields=changed)


def save_dropped(model: nn.Module, tokenizer: Any, out: str | Path, info: DropInfo | dict[str, Any]) -> Path:
    """Save the shallower model + tokenizer + ``layer_drop.json`` as one HF directory (atomically).

    ``info`` is the :class:`DropInfo` or a dict extending it (method, scores, healing record).
    """
    out = Path(out)
    record = info.to_dict() if isinstance(info, DropInfo) else dict(info)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "layer_drop.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out
