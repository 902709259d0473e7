"""LoRA-MoE for PEFT: a mixture of LoRA experts whose number of experts (and top-k) varies per layer.

The method is registered with PEFT (:func:`register`, through the table in
:mod:`layerif_plugins.integrations`) as soon as both PEFT and this package are imported, in
either order, so ``get_peft_model(model, LoraMoeConfig(...))``, ``save_pretrained``,
``PeftModel.from_pretrained(model, dir)``, ``AutoPeftModelForCausalLM.from_pretrained(dir)`` and
transformers' ``model.load_adapter(dir)`` / ``AutoModelForCausalLM.from_pretrained(dir)`` work
like for any built-in tuner::

    import layerif_plugins.integrations.peft_moe  # noqa: F401  (or: import layerif_plugins)
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, "out/moe-adapter")

Registration. ``peft_type`` is ``PeftType.LAYERIF_LORA_MOE``, a real member of PEFT's enum
(host code reads ``config.peft_type.value``); PEFT's enum is closed, so the member is added to it
first (:mod:`.peft_type` says how and why), then PEFT's own ``register_peft_method`` registers
config, tuner and prefix. Supported: ``peft>=0.21,<0.22`` (checked on import; other versions get a
warning).

Loading an adapter without this import fails inside PEFT with ``KeyError:
'LAYERIF_LORA_MOE'`` (PEFT looks the type up before any plugin code can run); the key
names the plugin. :func:`load_lora_moe` and :func:`check_adapter_dir` give the full message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
from packaging.version import Version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from layerif_plugins.errors import ConfigError
from layerif_plugins.integrations.peft_moe.config import LLAMA_PROJECTIONS, LORA_MOE_PEFT_TYPE, LoraMoeConfig
from layerif_plugins.integrations.peft_moe.layer import Linear, LoraMoeLayer, LoraMoeMergeError, load_balancing_loss
from layerif_plugins.integrations.peft_moe.model import LoraMoeModel
from layerif_plugins.integrations.peft_moe.peft_type import lora_moe_peft_type

logger = logging.getLogger(__name__)

SUPPORTED_PEFT = (Version("0.21"), Version("0.22"))
IMPORT_HINT = (
    "this is a LoRA-MoE adapter from layerif-plugins: run `import layerif_plugins` (or "
    "`import layerif_plugins.integrations.peft_moe`) before `PeftModel.from_pretrained`"
)

__all__ = [
    "LLAMA_PROJECTIONS",
    "LORA_MOE_PEFT_TYPE",
    "Linear",
    "LoraMoeConfig",
    "LoraMoeLayer",
    "LoraMoeMergeError",
    "LoraMoeModel",
    "check_adapter_dir",
    "is_registered",
    "load_balancing_loss",
    "load_lora_moe",
    "lora_moe_peft_type",
    "register",
]


def register(host: ModuleType | None = None) -> None:
    """Make the method known to PEFT (idempotent; ``host`` is the ``peft`` module, unused).

    Adds ``PeftType.LAYERIF_LORA_MOE`` and registers through PEFT's ``register_peft_method``; a
    registration left half-done (entries missing from some of PEFT's tables) is completed.
    """
    version = Version(peft.__version__)
    if not SUPPORTED_PEFT[0] <= version < SUPPORTED_PEFT[1]:
        warnings.warn(
            f"layerif_plugins' LoRA-MoE is tested with peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}; "
            f"found {peft.__version__}. It registers through PEFT's register_peft_method after adding a "
            "PeftType member, which may change.",
            stacklevel=2,
        )
    peft_type = lora_moe_peft_type()
    if is_registered():
        return
    tables = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)
    if not any(peft_type in table for table in tables):
        register_peft_method(
            name=LORA_MOE_PEFT_TYPE.lower(), config_cls=LoraMoeConfig, model_cls=LoraMoeModel,
            prefix=LoraMoeModel.prefix,
        )
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LoraMoeConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = LoraMoeModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = LoraMoeModel.prefix


def is_registered() -> bool:
    return (
        PEFT_TYPE_TO_TUNER_MAPPING.get(LORA_MOE_PEFT_TYPE) is LoraMoeModel
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(LORA_MOE_PEFT_TYPE) is LoraMoeConfig
        and PEFT_TYPE_TO_PREFIX_MAPPING.get(LORA_MOE_PEFT_TYPE) == LoraMoeModel.prefix
    )


def check_adapter_dir(path: str | Path) -> dict[str, Any]:
    """Read ``adapter_config.json`` of ``path`` and check its weight files (see :func:`_check_adapter`); the config."""
    return _check_adapter(path)[0]


def _check_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``adapter_config.json`` of ``path`` and check its weight files; raise a clear error when it cannot load.

    Says what to import when the adapter is LoRA-MoE and the plugin is not registered, and
    names the type when the directory holds another PEFT method. The config must be a JSON
    object whose fields pass :class:`LoraMoeConfig`'s checks (finite numbers in range, whole
    counts): an edited file is refused here, naming the field, not inside PEFT.
    """
    cfg_path = Path(path) / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{cfg_path}: not UTF-8 text (not an adapter config)") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: an adapter config is a JSON object, got a {type(cfg).__name__}; restore "
                          "the file or rebuild the adapter with `layerif moe`")
    peft_type = cfg.get("peft_type")
    if peft_type != LORA_MOE_PEFT_TYPE:
        raise ConfigError(f"{path} holds a {peft_type!r} adapter, not LoRA-MoE ({LORA_MOE_PEFT_TYPE!r})")
    if not is_registered():
        raise ConfigError(f"{path}: {IMPORT_HINT}")
    known = {f.name for f in dataclasses.fields(LoraMoeConfig) if f.init}
    try:
        LoraMoeConfig(**{k: v for k, v in cfg.items() if k in known and k != "peft_type"})
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: {exc} (an edited adapter config: restore it or rebuild the adapter with "
                          "`layerif moe`)") from exc
    from layerif_plugins.models.integrity import check_adapter_files

    saved = check_adapter_files(path)  # truncated / corrupt / non-finite weights: one ModelError, not a SafetensorError
    return cfg, saved


def _check_loaded(peft_model: Any, path: Path, saved: dict[str, Any]) -> None:
    """Refuse an adapter whose config built other tensors than the ones saved (names and shapes)."""
    from peft.utils import get_peft_model_state_dict

    built = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    stored = {k: tuple(info.shape) for k, info in saved.items()}
    dropped = sorted(set(stored) - set(built))
    missing = sorted(set(built) - set(stored))
    reshaped = sorted(k for k in set(built) & set(stored) if built[k] != stored[k])
    if not (dropped or missing or reshaped):
        return
    parts = []
    if dropped:
        parts.append(f"{len(dropped)} saved tensors have no place in the model the config builds (e.g. {dropped[0]}: "
                     "target_modules / layers lists fewer modules than were trained)")
    if missing:
        parts.append(f"{len(missing)} tensors the config builds were not saved (e.g. {missing[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensors have other shapes (e.g. {k}: {stored[k]} saved, {built[k]} from the "
                     "config: r or the expert counts were changed)")
    raise ConfigError(f"{path}: adapter_config.json and the saved weights disagree: {'; '.join(parts)}. Restore the "
                      "config, or rebuild the adapter with `layerif moe`")


def load_lora_moe(model: Any, path: str | Path, is_trainable: bool = False, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` for a LoRA-MoE adapter, with clear errors first.

    Refuses (:class:`ConfigError`) an adapter whose config and saved tensors disagree:
    tensors PEFT would drop silently (a config naming fewer ``target_modules``), tensors it
    would leave at their initial values, and shape mismatches (an edited ``r`` or expert
    pattern), which PEFT reports as a ``RuntimeError``.
    """
    from peft import PeftModel

    _, saved = _check_adapter(path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable, **kwargs)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))[:300]
        raise ConfigError(f"{path}: adapter_config.json and the saved weights disagree ({first}); r or the expert "
                          "counts were changed. Restore the config, or rebuild the adapter with `layerif moe`") from exc
    _check_loaded(peft_model, Path(path), saved)
    return peft_model
