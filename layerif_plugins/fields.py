"""One validator for numbers read from files (scores files, adapter configs, recipes).

JSON gives numbers that Python takes at face value: ``true`` is an int, ``"5"`` is a string
that ``int()`` accepts, ``1e999`` is ``inf``, ``NaN`` parses, and an integer literal with 400
digits is an exact int that ``float()`` cannot hold (``OverflowError``, a traceback). A field
read from a file therefore passes :func:`check_number` before it is used: the right JSON
type, finite, representable as a float, inside its range - and the message names the file,
the field and the value.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from layerif_plugins.errors import ConfigError, LayerIFError

Kind = Literal["int", "float"]


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True, default=repr)
    except (TypeError, ValueError, OverflowError):
        text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_number(
    value: Any,
    name: str,
    *,
    kind: Kind = "float",
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    source: str = "",
    error: type[LayerIFError] = ConfigError,
) -> Any:
    """``value`` as an ``int`` (``kind="int"``) or ``float``; else ``error`` naming ``source``, ``name`` and the value.

    Refused: booleans, strings (also ``"5"``), null and other non-numbers; for ``int`` any
    float (``5.0`` included: a count is written as a whole number); non-finite values;
    integers too large for a float; values outside ``[minimum, maximum]`` (``minimum``
    excluded with ``exclusive_minimum``).
    """
    where = f"{source}: " if source else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = "a whole number" if kind == "int" else "a number"
        raise error(f"{where}{name} must be {want}, got {_shown(value)} ({type(value).__name__})")
    if kind == "int" and not isinstance(value, int):
        raise error(f"{where}{name} must be a whole number, got {_shown(value)}")
    try:
        as_float = float(value)
    except OverflowError:
        raise error(f"{where}{name} is {_shown(value)}, an integer too large for a floating-point number") from None
    if not math.isfinite(as_float):
        raise error(f"{where}{name} must be a finite number, got {_shown(value)}")
    low_ok = minimum is None or (as_float > minimum if exclusive_minimum else as_float >= minimum)
    if not low_ok or (maximum is not None and as_float > maximum):
        low = "any" if minimum is None else f"{'(' if exclusive_minimum else '['}{minimum:g}"
        high = "any" if maximum is None else f"{maximum:g}]"
        raise error(f"{where}{name} must be in {low}, {high}, got {_shown(value)}")
    return int(value) if kind == "int" else as_float


def check_string(value: Any, name: str, *, source: str = "", error: type[LayerIFError] = ConfigError) -> str:
    """``value`` when it is a JSON string, else ``error`` naming the field (``"5"`` vs ``5`` matters in a file)."""
    if not isinstance(value, str):
        where = f"{source}: " if source else ""
        raise error(f"{where}{name} must be a string, got {_shown(value)} ({type(value).__name__})")
    return value
