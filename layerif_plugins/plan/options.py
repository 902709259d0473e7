"""``AllocationOptions``: the one set of allocation options, validated once, for every entry point.

The CLI (``layerif prune`` / ``layerif plan``: options generated from these fields by
:class:`~layerif_plugins.cli.common.ConfigOptions`), :func:`prune_model` and the
llm-compressor modifiers' fields (their pydantic validators call :func:`check_field`) all
read the same fields with the same checks, so a value refused in one place is refused
with the same words everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from layerif_plugins.allocate.sparsity import (
    ALLOCATIONS,
    AUTO,
    SEARCHED_ALLOCATIONS,
    check_epsilon,
    default_epsilon,
)
from layerif_plugins.errors import ConfigError

#: where the sensitivity table is measured: every other layer dense, or every other layer at the target
SENSITIVITY_AROUND = ("dense", "uniform")


def _positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _finite(name: str, value: Any, lo: float, hi: float, allow_none: bool = True, open_lo: bool = False
            ) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (open_lo and value == lo):
        raise ConfigError(f"{name} must be in {'(' if open_lo else '['}{lo}, {hi}], got {value}")
    return float(value)


def _grid(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"epsilon_grid must be a list of spreads in [0, 1], got {value!r}")
    values = list(value)
    if not values:
        raise ConfigError("epsilon_grid is empty; leave it out for the default grid")
    return [check_epsilon(v, "epsilon_grid value") for v in values]  # type: ignore[misc]


#: field name → checker(value) → normalised value (one place for every entry point)
CHECKS: dict[str, Any] = {
    "allocation": lambda v: _choice(v),
    "epsilon": lambda v: check_epsilon(v),
    "invert": lambda v: _bool("invert", v),
    "epsilon_grid": _grid,
    "beta": lambda v: _finite("beta (ATP slope per layer)", v, 0.0, 1.0),
    "budget_prunes": lambda v: _positive_int("budget_prunes", v),
    "budget_seconds": lambda v: _finite("budget_seconds", v, 0.0, math.inf, open_lo=True),
    "sigmas": lambda v: _finite("sigmas", v, 0.0, 100.0, allow_none=False),
    "sensitivity_step": lambda v: _finite("sensitivity_step", v, 0.0, 0.5, allow_none=False, open_lo=True),
    "sensitivity_levels": lambda v: _positive_int("sensitivity_levels", v, allow_none=False),
    "sensitivity_examples": lambda v: _positive_int("sensitivity_examples", v, allow_none=False),
    "max_moves": lambda v: _nonneg_int("max_moves", v),
    "confirm_examples": lambda v: _nonneg_int("confirm_examples", v),
    "judge_orders": lambda v: _positive_int("judge_orders", v, allow_none=False),
    "sensitivity_around": lambda v: _one_of("sensitivity_around", v, SENSITIVITY_AROUND),
}


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def _choice(value: Any) -> str:
    if value not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {value!r}")
    return str(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_field(name: str, value: Any) -> Any:
    """Validate one option (used by the modifiers' pydantic validators and by :class:`AllocationOptions`)."""
    return CHECKS[name](value) if name in CHECKS else value


@dataclass
class AllocationOptions:
    """How the per-layer sparsity is chosen (docs/pruning.md).

    Attributes:
        allocation: uniform | atp | depth_ramp | owl | alpha_hill | layerif | sensitivity | auto.
        epsilon: spread of score-mapped allocations ([1-ε, 1+ε]; OWL's λ); None = the reference's; auto = searched
            with the direction (as scored / inverted) on held-out calibration data.
        invert: reverse a score mapping (more sparsity where the scores say less).
        epsilon_grid: the spreads epsilon auto tries (default 0, 0.05, 0.1, 0.2, 0.3 and the reference's).
        beta: ATP's slope (sparsity added per layer of depth); None = searched on held-out calibration data.
        budget_prunes: most pruning passes a search may run (each candidate costs one); None = no limit.
        budget_seconds: most seconds a search may run; None = no limit.
        sigmas: auto keeps the simpler candidate unless another beats it by more than this many paired standard errors.
        sensitivity_step: sensitivity: the spacing of the per-layer levels around the target.
        sensitivity_levels: sensitivity: levels on each side of the target (7 levels for 3).
        sensitivity_examples: sensitivity: examples for the per-layer table, never those that judge the candidates
            (``prune_model``: the ones after the held-out set in the same file; else the first calibration examples).
        max_moves: sensitivity: local-search moves after the knapsack (each a pruning pass).
        sensitivity_around: sensitivity: measure the table with every other layer dense (``dense``) or pruned at the
            target (``uniform``: the operating point, where the layers' costs interact; one more forward over the
            calibration data per layer).
        confirm_examples: auto: the last this-many held-out examples judge only the final decision (uniform, the best
            ATP, the best heuristic, the best sensitivity list), never the search that chose those finalists, so a
            margin won by picking the best of many candidates on the same examples does not decide; 0 = one held-out
            set for both. Costs no pruning pass (each candidate is measured on every held-out example once).
        judge_orders: auto: prune each finalist (uniform, the best ATP, the best of each other provider) at this many
            orders of the calibration batches and judge the per-example losses averaged over them; 1 = the search's
            order only. For SparseGPT at high sparsity, whose result moves with the floating-point order (the same
            list gave up to 27 % different perplexity, docs/quality.md §0): a finalist that wins at one order only
            does not decide. Costs ``(judge_orders - 1)`` pruning passes per finalist, reserved from budget_prunes.
    """

    allocation: str = "layerif"
    epsilon: float | str | None = None
    invert: bool = False
    epsilon_grid: list[float] | None = field(default=None, metadata={"cli": False})
    beta: float | None = None
    budget_prunes: int | None = None
    budget_seconds: float | None = None
    sigmas: float = 2.0
    sensitivity_step: float = 0.05
    sensitivity_levels: int = 3
    sensitivity_examples: int = 16
    max_moves: int = 8
    sensitivity_around: str = "dense"
    confirm_examples: int = 0
    judge_orders: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        if self.allocation in ("atp", "sensitivity", "auto") and self.epsilon not in (None, AUTO):
            # spreads belong to score mappings; ATP's knob is beta (uniform ignores a spread, as it always did)
            raise ConfigError(f"epsilon is the spread of a score mapping; allocation {self.allocation!r} has none "
                              "(ATP's knob is beta): leave epsilon out")
        if self.judge_orders > 1 and self.allocation != "auto":
            raise ConfigError(f"judge_orders rechecks the finalists of allocation 'auto'; allocation "
                              f"{self.allocation!r} keeps its lowest held-out candidate: leave judge_orders at 1")
        if self.confirm_examples and self.allocation != "auto":
            raise ConfigError(f"confirm_examples judges the final choice of allocation 'auto'; allocation "
                              f"{self.allocation!r} keeps its lowest held-out candidate: leave confirm_examples at 0")

    @property
    def searched(self) -> bool:
        """Whether this allocation is chosen by evaluating candidates on held-out data."""
        return (self.allocation in SEARCHED_ALLOCATIONS or self.epsilon == AUTO
                or (self.allocation == "atp" and self.beta is None))

    @property
    def uses_table(self) -> bool:
        """Whether the search measures the per-layer sensitivity table (``sensitivity`` and ``auto``)."""
        return self.allocation in ("sensitivity", "auto")

    @property
    def spread(self) -> float:
        """The fixed spread of a score mapping (the reference's when unset)."""
        if self.epsilon is None or self.epsilon == AUTO:
            return default_epsilon(self.allocation)
        return float(self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["CHECKS", "SENSITIVITY_AROUND", "AllocationOptions", "check_field"]
