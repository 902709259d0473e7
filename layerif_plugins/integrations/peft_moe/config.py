"""``LoraMoeConfig``: a PEFT config for a mixture of LoRA experts with per-layer expert counts."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig

from layerif_plugins.errors import ConfigError
from layerif_plugins.fields import check_number
from layerif_plugins.integrations.peft_moe.peft_type import LORA_MOE_PEFT_TYPE, lora_moe_peft_type
from layerif_plugins.models.families import LLAMA_PROJECTIONS

# fields that hold a set of module names: sets in the config (as LoraConfig's target_modules), sorted
# lists in to_dict / adapter_config.json, so a config and its JSON compare equal
_NAME_SET_FIELDS = ("target_modules", "exclude_modules")

_LAYER_OF_KEY = re.compile(r"^(?P<layer>.*?\.\d+)\.")


def layer_key_of(module_key: str) -> str | None:
    """The decoder-layer part of a module name: ``model.layers.3.self_attn.q_proj`` → ``model.layers.3``."""
    match = _LAYER_OF_KEY.match(module_key)
    return match.group("layer") if match else None


def match_pattern_key(patterns: Mapping[str, Any], module_key: str) -> str | None:
    """The first key of ``patterns`` that names ``module_key`` or its decoder layer, else None.

    A key matches like PEFT's ``rank_pattern`` (``re.match(rf"(.*\\.)?({key})$", name)``),
    tried against the full module name and against its decoder-layer name, so ``"3"``,
    ``"layers.3"``, ``"model.layers.3"`` and ``"layers.3.mlp.down_proj"`` are all valid keys.
    """
    layer_key = layer_key_of(module_key)
    for key in patterns:
        for name in (module_key, layer_key):
            if name is not None and re.match(rf"(.*\.)?({key})$", name):
                return key
    return None


@dataclass
class LoraMoeConfig(PeftConfig):
    """Configuration of a :class:`LoraMoeModel`: LoRA experts behind a top-k router, per-layer expert counts.

    Every targeted linear layer keeps its frozen weight and gets ``n`` LoRA experts
    (``A_e: r × in``, ``B_e: out × r``, ``B`` zero-initialised) and, when ``n > 1``, a bias-free linear
    router ``in → n``; its output is ``W x + (α/r) Σ_{e ∈ top-k} g_e B_e A_e dropout(x)`` with
    ``p = softmax(router(x))``. The gates ``g`` are zero outside the ``k`` most probable experts; inside,
    ``g_e = p_e`` when ``k = 1`` (Switch Transformer: the router learns through the scale of the chosen
    expert) and the top-k of ``p`` renormalised to sum 1 when ``k >= 2`` (Mixtral). A module with one
    expert has no router (``g = 1``: a plain LoRA). ``n`` and ``k`` vary per decoder layer.

    Args:
        r (`int`): rank of every LoRA expert.
        lora_alpha (`int`): LoRA scaling numerator; the expert output is scaled by ``lora_alpha / r``.
        lora_dropout (`float`): dropout on the experts' input (not on the router's).
        target_modules (`Union[list[str], str]`): module names (suffixes) or a regex to adapt; default:
            the seven Llama projections ``q,k,v,o,gate,up,down_proj``.
        exclude_modules (`Union[list[str], str]`, *optional*): module names or a regex to leave alone.
        modules_to_save (`list[str]`, *optional*): modules besides the adapted ones to train fully and save in the
            adapter, as in ``LoraConfig`` (e.g. ``["lm_head"]``). With ``task_type="SEQ_CLS"`` PEFT adds the
            classification head (``score`` / ``classifier``) itself.
        layers_to_transform (`Union[list[int], int]`, *optional*): adapt only the decoder layers with these indices
            (as in ``LoraConfig``; needs a list of ``target_modules``, not a regex).
        layers_pattern (`Union[list[str], str]`, *optional*): name of the ``nn.ModuleList`` holding the layers
            (``"layers"``, ``"h"``), used with ``layers_to_transform``.
        num_experts (`int`): experts of a layer that no ``num_experts_pattern`` key names.
        top_k (`int`): experts routed per token in a layer that no ``top_k_pattern`` key names.
        num_experts_pattern (`dict[str, int]`): per-layer expert counts, keyed like PEFT's ``rank_pattern``: a
            key is a regex matched against the end of the module name *or* of its decoder-layer name, so
            ``{"model.layers.0": 2, "model.layers.1": 8}`` sets whole layers and
            ``{"layers.1.mlp.down_proj": 4}`` one module. Every key must match a targeted module. A module with
            one expert gets no router.
        top_k_pattern (`dict[str, int]`): per-layer top-k, keyed the same way. ``top_k`` may not exceed the
            experts of its layer; top-1 gates are the un-renormalised router probability (see above).
        router_aux_loss_coef (`float`): weight of the Switch-Transformer load-balancing loss
            (``n · Σ_e f_e P_e`` per routed module, summed over all modules with more than one expert) added to
            the model's loss in training mode. 0 disables it.
        router_jitter (`float`): Switch-style multiplicative noise ``x · U(1 − ε, 1 + ε)`` on the router input
            in training mode (0 = off).
        init_weights (`bool`): zero-initialise ``B`` so the adapter starts as the identity (default). ``False``
            initialises ``B`` randomly — only useful for tests.
        layout (`dict`, *optional*): provenance of the per-layer counts (method, budget, scores, model
            fingerprint), stored in ``adapter_config.json`` for the record; not used for the computation.
    """

    r: int = field(default=8, metadata={"help": "Rank of every LoRA expert."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; expert outputs are scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the experts' input."})
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={
            "help": "Module names (matched as suffixes) or a regex of the linear layers to adapt. "
            "Default: the seven Llama projections q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules apart from the LoRA-MoE layers to set as trainable and save in the adapter, as in "
            "LoraConfig (e.g. ['lm_head']; a classification head `score`/`classifier` is added for SEQ_CLS)."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Decoder-layer indices to adapt (as in LoraConfig); only with a list of target_modules."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers ('layers', 'h'), used with layers_to_transform."
        },
    )
    num_experts: int = field(
        default=4, metadata={"help": "Experts per adapted module unless a pattern says otherwise."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts routed per token unless top_k_pattern says otherwise."})
    num_experts_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer expert counts: {key: n}, key a regex matched against the end of the module name or "
            "of its decoder-layer name (like LoraConfig.rank_pattern), e.g. {'model.layers.0': 2}."
        },
    )
    top_k_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-layer router top-k, keyed like num_experts_pattern."},
    )
    router_aux_loss_coef: float = field(
        default=0.001,
        metadata={
            "help": "Weight of the Switch-style load-balancing loss (summed over routed modules), added to the "
            "model loss in training. 0 disables it."
        },
    )
    router_jitter: float = field(
        default=0.0, metadata={"help": "Multiplicative uniform noise ε on the router input in training (0 = off)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the experts' B so the adapter starts as the identity."}
    )
    layout: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Where the per-layer counts came from (method, budget, scores); informational only."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = lora_moe_peft_type()
        for attr in _NAME_SET_FIELDS:
            value = getattr(self, attr)
            if isinstance(value, (list, tuple)):
                setattr(self, attr, set(value))
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if not self.target_modules:
            raise ConfigError("target_modules is empty; name the linear layers to adapt (e.g. ['q_proj', 'v_proj'])")
        for name, value in (("r", self.r), ("num_experts", self.num_experts), ("top_k", self.top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        # the floats (from a recipe or an adapter_config.json): finite, JSON numbers, in range - a NaN
        # lora_alpha or router_aux_loss_coef would train to NaN without a word
        # (checked, not converted: an int stays an int in the saved config)
        check_number(self.lora_alpha, "lora_alpha", minimum=0, exclusive_minimum=True)
        if check_number(self.lora_dropout, "lora_dropout", minimum=0) >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_number(self.router_aux_loss_coef, "router_aux_loss_coef", minimum=0)
        if check_number(self.router_jitter, "router_jitter", minimum=0) >= 1.0:
            raise ConfigError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        self._check_layer_selection()
        for attr in ("num_experts_pattern", "top_k_pattern"):
            pattern = getattr(self, attr) or {}
            if not isinstance(pattern, Mapping):
                raise ConfigError(f"{attr} must be a dict {{key: int}}, got {type(pattern).__name__}")
            clean: dict[str, int] = {}
            for key, value in pattern.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"{attr}[{key!r}] = {value!r}: must be an integer >= 1")
                try:
                    re.compile(str(key))
                except re.error as exc:
                    raise ConfigError(f"{attr} key {key!r} is not a valid regex ({exc})") from exc
                clean[str(key)] = value
            setattr(self, attr, clean)

    def _check_layer_selection(self) -> None:
        """``layers_to_transform`` / ``layers_pattern`` as ``LoraConfig`` accepts them (same rules)."""
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be used when target_modules is a regex string; pass a list of module "
                "names (e.g. ['q_proj', 'v_proj']) or put the layer indices into the regex"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("layers_pattern cannot be used when target_modules is a regex string; pass a list")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)"
            )
        indices = self.layers_to_transform
        if indices is not None:
            values = [indices] if isinstance(indices, int) else indices
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values
            ):
                raise ConfigError(f"layers_to_transform must be an int or a list of ints >= 0, got {indices!r}")
            if isinstance(indices, tuple):
                self.layers_to_transform = list(indices)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values: name sets become sorted lists, so ``to_dict()`` equals the saved JSON."""
        out = super().to_dict()
        for attr in _NAME_SET_FIELDS:
            if isinstance(out.get(attr), set):
                out[attr] = sorted(out[attr])
        return out

    def experts_and_top_k(self, module_key: str) -> tuple[int, int]:
        """``(num_experts, top_k)`` of the module named ``module_key`` (patterns first, then the defaults)."""
        n_key = match_pattern_key(self.num_experts_pattern, module_key)
        k_key = match_pattern_key(self.top_k_pattern, module_key)
        n = self.num_experts_pattern[n_key] if n_key is not None else self.num_experts
        k = self.top_k_pattern[k_key] if k_key is not None else self.top_k
        return n, k

    @classmethod
    def from_recipe(cls, path: str | Path, **overrides: Any) -> LoraMoeConfig:
        """Read a recipe (``recipes/moe/*.json`` / ``.yaml``): config fields; keys starting with ``_`` are notes."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot parse the recipe ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of LoraMoeConfig fields")
        fields = {k: v for k, v in data.items() if not str(k).startswith("_")}
        peft_type = fields.pop("peft_type", LORA_MOE_PEFT_TYPE)
        if peft_type != LORA_MOE_PEFT_TYPE:
            raise ConfigError(f"{path}: peft_type {peft_type!r} is not {LORA_MOE_PEFT_TYPE!r}")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{path}: unknown LoraMoeConfig fields {unknown}")
        return cls(**{**fields, **overrides})

    @classmethod
    def from_layout(cls, experts: list[int], top_k: list[int], layer_names: list[str], **kwargs: Any) -> LoraMoeConfig:
        """A config giving decoder layer ``layer_names[i]`` (e.g. ``model.layers.3``) ``experts[i]`` / ``top_k[i]``."""
        if not len(experts) == len(top_k) == len(layer_names):
            raise ConfigError(
                f"{len(experts)} expert counts, {len(top_k)} top-k values, {len(layer_names)} layers: give one each"
            )
        # plain names: `(.*\.)?(model.layers.1)$` cannot match model.layers.11, and they stay readable in JSON
        escaped = list(layer_names)
        kwargs.setdefault("num_experts", max(experts))
        kwargs.setdefault("top_k", max(top_k))
        return cls(
            num_experts_pattern=dict(zip(escaped, (int(n) for n in experts), strict=True)),
            top_k_pattern=dict(zip(escaped, (int(k) for k in top_k), strict=True)),
            **kwargs,
        )
