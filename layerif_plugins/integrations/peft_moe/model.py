"""``LoraMoeModel``: the PEFT tuner that injects LoRA-MoE layers and adds the router's auxiliary loss."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from layerif_plugins.errors import ConfigError
from layerif_plugins.integrations.peft_moe.config import (
    LoraMoeConfig,
    layer_key_of,
    match_pattern_key,
)
from layerif_plugins.integrations.peft_moe.layer import (
    MERGE_MESSAGE,
    LastForward,
    Linear,
    LoraMoeLayer,
    LoraMoeMergeError,
    TokenMask,
)
from layerif_plugins.models.families import peft_targets_by_type

# PEFT's per-model-type defaults, from the one family table (LoraMoeConfig always names its targets)
TARGET_MODULE_MAPPING: dict[str, list[str]] = peft_targets_by_type()


class RouterRuntime:
    """What all LoRA-MoE layers of one model share: the batch's token mask and the aux-loss hooks.

    It lives on the wrapped model (one per model, whatever number of tuners or adapters inject
    into it), so adapters added by ``add_adapter``, transformers' ``load_adapter`` (a tuner per
    call, through ``inject_adapter_in_model``) or several ``get_peft_model`` calls share one mask
    and one pair of hooks, and the loss is added once. Removed by ``unload()``.

    Hooks on the wrapped model, so the aux loss is added whoever calls it: a plain ``PeftModel``
    (``task_type=None``) calls the base model directly, skipping the tuner's ``forward``; hooks on
    the base model run on every path (``PeftModelForCausalLM``, plain ``PeftModel``, ``generate``,
    the HF ``Trainer``, a transformers model with adapters loaded by ``load_adapter``).
    """

    ATTRIBUTE = "_lora_moe_runtime"

    def __init__(self) -> None:
        self.token_mask = TokenMask()
        self.router_aux_loss: torch.Tensor | None = None
        self._hooks: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy of the model, pickling) drop the last loss: a non-leaf tensor cannot be deep-copied
        return {**self.__dict__, "router_aux_loss": None}

    @classmethod
    def of(cls, model: nn.Module) -> RouterRuntime:
        """The runtime of ``model``, created and hooked in on first use."""
        runtime = model.__dict__.get(cls.ATTRIBUTE)
        if runtime is None:
            runtime = cls()
            runtime._hooks = [
                model.register_forward_pre_hook(runtime._before_forward, with_kwargs=True),
                model.register_forward_hook(runtime._after_forward, with_kwargs=True),
            ]
            model.__dict__[cls.ATTRIBUTE] = runtime
        return runtime

    @classmethod
    def remove(cls, model: nn.Module) -> None:
        runtime = model.__dict__.pop(cls.ATTRIBUTE, None)
        if runtime is not None:
            for hook in runtime._hooks:
                hook.remove()
            runtime._hooks = []
            runtime.token_mask.mask = None

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.token_mask.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in _moe_layers(module):
            layer.aux_loss = LastForward()

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        per_adapter: dict[str, list[torch.Tensor]] = {}
        for layer in _moe_layers(module):
            for name, loss in layer.aux_loss.items():
                per_adapter.setdefault(name, []).append(loss)
        if not per_adapter:
            self.router_aux_loss = None
            return outputs
        device = next(iter(per_adapter.values()))[0].device
        sums = {name: torch.stack([t.to(device) for t in terms]).sum() for name, terms in per_adapter.items()}
        self.router_aux_loss = torch.stack(list(sums.values())).sum()
        loss = getattr(outputs, "loss", None)
        if not module.training or not isinstance(loss, torch.Tensor):
            return outputs
        configs = getattr(module, "peft_config", None) or {}
        coefs = {name: float(getattr(configs.get(name), "router_aux_loss_coef", 0.0)) for name in sums}
        if any(c > 0 for c in coefs.values()):
            added = torch.stack([coefs[name] * total for name, total in sums.items()]).sum()
            outputs.loss = loss + added.to(device=loss.device, dtype=loss.dtype)
        return outputs


def _moe_layers(model: nn.Module) -> list[LoraMoeLayer]:
    return [m for m in model.modules() if isinstance(m, LoraMoeLayer)]


class LoraMoeModel(BaseTuner):
    """Mixture of LoRA experts with a per-layer number of experts and router top-k.

    Created by ``get_peft_model(model, LoraMoeConfig(...))`` once ``layerif_plugins`` (or
    ``layerif_plugins.integrations.peft_moe``) is imported. In training mode every forward adds
    ``router_aux_loss_coef × router_aux_loss`` to the model's loss (when labels give one),
    as PEFT's AdaLoRA adds its orthogonality regulariser — from a forward hook on the wrapped
    model rather than from ``forward``, because a plain ``PeftModel`` skips the tuner's
    ``forward`` (:class:`RouterRuntime`). With several active adapters each adds its own
    ``router_aux_loss_coef ×`` its routers' loss. :attr:`router_aux_loss` keeps the unweighted
    sum of the last forward.

    Like ``LoraModel``: multiple adapters (``add_adapter``, ``load_adapter``, ``set_adapter``,
    ``delete_adapter``), ``disable_adapter()``, ``modules_to_save``, task heads,
    ``layers_to_transform``, ``unload()``. Not like it: merging (``merge_and_unload``,
    ``merge_adapter``) raises :class:`LoraMoeMergeError` — the update depends on input-dependent
    gates, so there is no weight delta — and per-sample ``adapter_names`` batches are refused.

    Args:
        model (`torch.nn.Module`): the model to adapt.
        config (`LoraMoeConfig`): the adapter configuration.
        adapter_name (`str`): the adapter's name, ``"default"`` by default.

    Attributes:
        router_aux_loss (`torch.Tensor | None`): last forward's summed load-balancing loss (unweighted).
    """

    prefix: str = "lora_moe_"
    tuner_layer_cls = LoraMoeLayer
    target_module_mapping = TARGET_MODULE_MAPPING

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        # set before BaseTuner.__init__, which injects the layers that share its token mask
        self._runtime = RouterRuntime.of(model)
        super().__init__(model, config, adapter_name, **kwargs)

    @property
    def router_aux_loss(self) -> torch.Tensor | None:
        """Summed (unweighted) load-balancing loss of the last forward; None before any forward with routers."""
        return self._runtime.router_aux_loss

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Validate the config against ``model`` (clear errors, nothing modified yet), then inject."""
        self._validate_config(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _targeted_keys(self, model: nn.Module, config: LoraMoeConfig) -> list[str]:
        inside = [k + "." for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        keys = []
        for key, _ in model.named_modules():
            if not key or any(key.startswith(p) for p in inside):
                continue
            found = check_target_module_exists(config, key)
            if found and not type(found).__name__ == "_ExcludedModule":
                keys.append(key)
        return keys

    def _validate_config(self, model: nn.Module, config: LoraMoeConfig) -> None:
        if config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            _maybe_include_all_linear_layers(config, model)  # PEFT's "all-linear" → the concrete names
        names = [k for k, _ in model.named_modules() if k]
        if isinstance(config.target_modules, (set, list, tuple)):
            absent = sorted(
                t for t in config.target_modules if not any(k == t or k.endswith(f".{t}") for k in names)
            )
            if absent:
                linear_leaves = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules()
                                        if isinstance(m, nn.Linear)})
                raise ConfigError(
                    f"target_modules {absent} are absent from {type(model).__name__}; its linear modules are "
                    f"named {linear_leaves}. Pass target_modules that exist (e.g. the attention/MLP projections)."
                )
        targeted = self._targeted_keys(model, config)
        if not targeted:
            layers = (f" in layers_to_transform={config.layers_to_transform!r} (layers_pattern="
                      f"{config.layers_pattern!r})" if config.layers_to_transform is not None else "")
            raise ConfigError(
                f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}{layers}; "
                "pass module names (suffixes) or a regex that exists in the model, and layer indices it has"
            )
        layers = sorted({layer_key_of(k) or k for k in targeted}, key=_natural)
        for attr in ("num_experts_pattern", "top_k_pattern"):
            pattern = getattr(config, attr)
            unmatched = [key for key in pattern if not any(match_pattern_key({key: 0}, k) for k in targeted)]
            if unmatched:
                shown = ", ".join(layers[:4]) + (", …" if len(layers) > 4 else "")
                raise ConfigError(
                    f"{attr} keys {unmatched} match no adapted module or decoder layer (layers are {shown}); "
                    "keys are regexes matched against the end of a module or layer name, e.g. 'model.layers.0'"
                )
        for key in targeted:
            n, k = config.experts_and_top_k(key)
            if k > n:
                raise ConfigError(
                    f"top_k={k} is larger than the {n} expert(s) of {key}; set top_k_pattern for "
                    f"{layer_key_of(key) or key} to at most {n} (or give it more experts)"
                )

    def _create_and_replace(
        self,
        lora_moe_config: LoraMoeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        num_experts, top_k = lora_moe_config.experts_and_top_k(current_key)
        kwargs = {
            "r": lora_moe_config.r,
            "lora_alpha": lora_moe_config.lora_alpha,
            "lora_dropout": lora_moe_config.lora_dropout,
            "num_experts": num_experts,
            "top_k": top_k,
            "router_jitter": lora_moe_config.router_jitter,
            "init_weights": lora_moe_config.init_weights,
        }
        if isinstance(target, LoraMoeLayer):
            target.update_layer(adapter_name, inference_mode=lora_moe_config.inference_mode, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ConfigError(
                f"{current_key} is a {type(base).__name__}; LoRA-MoE adapts nn.Linear modules only. "
                "Remove it from target_modules."
            )
        new_module = Linear(target, adapter_name, token_mask=self._runtime.token_mask, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ forward + aux loss

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Refuse ``adapter_names`` (per-sample adapters): PEFT would otherwise drop it silently."""
        if kwargs.get("adapter_names") is not None:
            raise ConfigError(
                "LoRA-MoE does not support mixed-adapter batches (adapter_names=...); activate one adapter with "
                "model.set_adapter(name) and run each adapter's samples separately"
            )
        yield

    def get_router_aux_loss(self) -> torch.Tensor | None:
        """Summed (unweighted) load-balancing loss of the last forward; None before any forward with routers."""
        return self.router_aux_loss

    # ------------------------------------------------------------------ inspection

    def layer_layout(self, adapter_name: str = "default") -> dict[str, dict[str, int]]:
        """``{module name: {"num_experts": n, "top_k": k, "router_out_features": n or 0}}`` as built in the model.

        ``num_experts`` is read from the experts' fused weights; a one-expert module has no router (0).
        """
        out = {}
        for key, module in self.model.named_modules():
            if isinstance(module, LoraMoeLayer) and adapter_name in module.lora_moe_A:
                router = module.lora_moe_router[adapter_name] if adapter_name in module.lora_moe_router else None
                out[key] = {
                    "num_experts": module.lora_moe_A[adapter_name].out_features // module.r[adapter_name],
                    "top_k": module.top_k[adapter_name],
                    "router_out_features": router.out_features if router is not None else 0,
                }
        return out

    def expert_load(self, adapter_name: str = "default") -> dict[str, list[float]]:
        """Fraction of the last forward's routed (non-padding) assignments that went to each expert, per module."""
        return {
            key: module.expert_load[adapter_name].tolist()
            for key, module in self.model.named_modules()
            if isinstance(module, LoraMoeLayer) and adapter_name in module.expert_load
        }

    # ------------------------------------------------------------------ unsupported

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        if merge:
            raise LoraMoeMergeError(MERGE_MESSAGE)
        RouterRuntime.remove(self.model)
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def _check_merge_allowed(self) -> None:
        raise LoraMoeMergeError(MERGE_MESSAGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise LoraMoeMergeError(MERGE_MESSAGE)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise LoraMoeMergeError(MERGE_MESSAGE)


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
