"""The LoRA-MoE tuner layer: frozen base linear + top-k router + N LoRA experts.

The N experts of one adapter are stored fused, as PEFT's Lily does with its B adapters:
``lora_moe_A[name]`` is ``nn.Linear(in, N·r)`` (rows ``e·r … (e+1)·r`` are expert ``e``'s
``A_e``) and ``lora_moe_B[name]`` is ``nn.Linear(N·r, out)`` (columns ``e·r … (e+1)·r``
are ``B_e``). Scaling the ``r`` hidden units of each expert by its gate before ``B`` gives
``Σ_e g_e B_e A_e x`` in two matmuls, whatever N is; experts outside the top-k have
``g_e = 0`` and get no gradient, exactly as if they had been skipped.

Gates. ``p = softmax(router(x))``; at ``top_k = 1`` the chosen expert is scaled by its own
``p_e``, as in the Switch Transformer: renormalising a single gate would make it exactly 1,
leaving the router without any gradient from the task loss (stories260K, 4-expert ``q_proj``:
largest router gradient 4e-8 renormalised, 0.50 with ``p_e``, 1.00 at top-2). At
``top_k >= 2`` the top-k probabilities are renormalised to sum 1 (Mixtral), which keeps a
gradient through their ratios. A module with one expert is a plain LoRA: it has no router at
all (no parameter that could never learn) and no load-balancing loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from layerif_plugins.errors import ConfigError


class LoraMoeMergeError(ConfigError, NotImplementedError):
    """Routed experts depend on the input, so they have no weight delta to merge into the base layer."""


MERGE_MESSAGE = (
    "LoRA-MoE adapters cannot be merged into the base weights: each token's update Σ_e g_e(x) B_e A_e x depends "
    "on the router's input-dependent gates, so there is no single ΔW. Keep the PeftModel for inference, or use "
    "`.unload()` to get the base model back without the adapter."
)


class TokenMask:
    """Shared holder of the current batch's attention mask, set by the model's forward.

    Layers read it to leave padding out of the load-balancing statistics. It stays set
    until the next forward, so gradient-checkpoint recomputation sees the same mask.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def for_input(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
            return None
        return mask.to(device=x.device, dtype=torch.bool)


class LastForward(dict):
    """Per-adapter results of the last forward that are part of its autograd graph (the aux losses).

    Copies and pickles start empty: ``copy.deepcopy`` cannot copy non-leaf tensors, and a copy of
    the model has run no forward yet.
    """

    def __deepcopy__(self, memo: dict) -> LastForward:
        return type(self)()

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return (type(self), ())


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``N · Σ_e f_e · P_e`` of one router.

    ``probs`` (tokens × N) are the softmax router probabilities, ``top_idx`` (tokens × k) the
    routed experts; ``f_e`` is the fraction of the ``tokens · k`` assignments that went to
    expert ``e`` and ``P_e`` its mean probability, over the tokens where ``mask`` is true.
    Equals 1 at a perfectly uniform routing and approaches N when one expert takes all.
    """
    n_experts = probs.shape[-1]
    probs = probs.reshape(-1, n_experts)
    top_idx = top_idx.reshape(probs.shape[0], -1)
    if mask is not None:
        keep = mask.reshape(-1)
        probs, top_idx = probs[keep], top_idx[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = F.one_hot(top_idx, n_experts).to(probs.dtype).sum(dim=(0, 1))
    fraction = counts / top_idx.numel()
    mean_prob = probs.mean(dim=0)
    return n_experts * torch.sum(fraction * mean_prob)


class LoraMoeLayer(BaseTunerLayer):
    """Adapter state of a LoRA-MoE module, one entry per adapter name in each container."""

    # All names of layers that may contain (trainable) adapter weights
    adapter_layer_names: tuple[str, ...] = ("lora_moe_A", "lora_moe_B", "lora_moe_router")
    # All names of other attributes that hold per-adapter settings or state (PEFT's delete_adapter clears them all)
    other_param_names: tuple[str, ...] = (
        "r", "lora_alpha", "scaling", "num_experts", "top_k", "router_jitter", "lora_moe_dropout", "aux_loss",
        "expert_load",
    )

    def __init__(self, base_layer: nn.Module, token_mask: TokenMask | None = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.router_jitter: dict[str, float] = {}
        self.lora_moe_A = nn.ModuleDict({})
        self.lora_moe_B = nn.ModuleDict({})
        self.lora_moe_router = nn.ModuleDict({})
        self.lora_moe_dropout = nn.ModuleDict({})
        self.token_mask = token_mask or TokenMask()
        # last forward's load-balancing loss and expert load per adapter (read by the model)
        self.aux_loss: dict[str, torch.Tensor] = LastForward()
        self.expert_load: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ConfigError(
                f"LoRA-MoE adapts nn.Linear modules only; got {type(base).__name__}. "
                "Remove it from target_modules."
            )
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        num_experts: int,
        top_k: int,
        router_jitter: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        if r < 1 or num_experts < 1:
            raise ConfigError(f"r and num_experts must be >= 1, got r={r}, num_experts={num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k={top_k} must be between 1 and the module's {num_experts} experts")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = top_k
        self.router_jitter[adapter_name] = router_jitter
        self.lora_moe_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_moe_A[adapter_name] = nn.Linear(self.in_features, num_experts * r, bias=False)
        self.lora_moe_B[adapter_name] = nn.Linear(num_experts * r, self.out_features, bias=False)
        if num_experts > 1:  # one expert needs no routing: no router, so no parameter that never learns
            self.lora_moe_router[adapter_name] = nn.Linear(self.in_features, num_experts, bias=False)
        elif adapter_name in self.lora_moe_router:  # re-created with one expert
            del self.lora_moe_router[adapter_name]
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """LoRA's init per expert: A Kaiming-uniform, B zero (identity at start); router: nn.Linear's default."""
        if adapter_name not in self.lora_moe_A:
            return
        n, r = self.num_experts[adapter_name], self.r[adapter_name]
        a = self.lora_moe_A[adapter_name].weight
        with torch.no_grad():
            for e in range(n):  # each expert's A as its own (r × in) matrix, like a LoRA A
                nn.init.kaiming_uniform_(a[e * r : (e + 1) * r], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.lora_moe_B[adapter_name].weight)
        else:
            nn.init.normal_(self.lora_moe_B[adapter_name].weight, std=1.0 / math.sqrt(r))
        if adapter_name in self.lora_moe_router:
            self.lora_moe_router[adapter_name].reset_parameters()

    def expert(self, adapter_name: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_e, B_e)`` of expert ``index`` (views: ``r × in`` and ``out × r``)."""
        n, r = self.num_experts[adapter_name], self.r[adapter_name]
        if not 0 <= index < n:
            raise IndexError(f"expert {index} out of range: this module has {n} experts")
        a = self.lora_moe_A[adapter_name].weight[index * r : (index + 1) * r]
        b = self.lora_moe_B[adapter_name].weight[:, index * r : (index + 1) * r]
        return a, b

    def route(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gates, probs, top_idx)``: gates (zero off the top-k), softmax probabilities, chosen experts.

        Top-1 gates are the chosen expert's probability (Switch); top-k >= 2 gates are renormalised
        to sum 1 (Mixtral). Only for modules with a router (more than one expert).
        """
        if adapter_name not in self.lora_moe_router:
            raise ConfigError(f"adapter {adapter_name!r} has {self.num_experts.get(adapter_name)} expert(s) here: "
                              "nothing to route")
        router = self.lora_moe_router[adapter_name]
        jitter = self.router_jitter[adapter_name]
        if self.training and jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        probs = F.softmax(router(x).float(), dim=-1)
        top_val, top_idx = torch.topk(probs, self.top_k[adapter_name], dim=-1)
        if top_idx.shape[-1] > 1:
            top_val = top_val / top_val.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_val)
        return gates, probs, top_idx


class Linear(nn.Module, LoraMoeLayer):
    """LoRA-MoE on an ``nn.Linear``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        num_experts: int = 4,
        top_k: int = 2,
        router_jitter: float = 0.0,
        init_weights: bool = True,
        token_mask: TokenMask | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraMoeLayer.__init__(self, base_layer, token_mask=token_mask, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r, lora_alpha, lora_dropout, num_experts, top_k, router_jitter=router_jitter,
            init_weights=init_weights,
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise LoraMoeMergeError(MERGE_MESSAGE)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise LoraMoeMergeError(MERGE_MESSAGE)

    def unmerge(self) -> None:
        raise LoraMoeMergeError(MERGE_MESSAGE)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        self.aux_loss = LastForward()
        if self.disable_adapters or not self.active_adapters:
            return result
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_moe_A:
                continue
            lora_a = self.lora_moe_A[active_adapter]
            n, r = self.num_experts[active_adapter], self.r[active_adapter]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            hidden = lora_a(self.lora_moe_dropout[active_adapter](xa))
            if n > 1:
                gates, probs, top_idx = self.route(active_adapter, xa)
                hidden = (hidden.unflatten(-1, (n, r)) * gates.to(hidden.dtype).unsqueeze(-1)).flatten(-2)
                self._record_routing(active_adapter, x, probs, top_idx)
            else:
                self.expert_load[active_adapter] = torch.ones(1, device=x.device)
            delta = self.lora_moe_B[active_adapter](hidden) * self.scaling[active_adapter]
            result = result + delta.to(result_dtype)
        return result

    def _record_routing(self, adapter_name: str, x: torch.Tensor, probs: torch.Tensor, top_idx: torch.Tensor) -> None:
        """Keep this forward's load-balancing loss and expert load (padding excluded) for the model to read."""
        n = probs.shape[-1]
        mask = self.token_mask.for_input(x)
        with torch.no_grad():
            flat = top_idx.reshape(-1, top_idx.shape[-1])
            if mask is not None:
                flat = flat[mask.reshape(-1)]
            load = torch.bincount(flat.reshape(-1), minlength=n).float()
            self.expert_load[adapter_name] = load / load.sum().clamp_min(1.0)
        self.aux_loss[adapter_name] = load_balancing_loss(probs, top_idx, mask)

    def __repr__(self) -> str:
        return "lora_moe." + super().__repr__()
