"""Argument groups and loaders shared by the subcommands.

Options that set a config dataclass (:class:`~layerif_plugins.engine.InfluenceConfig`,
:class:`~layerif_plugins.depth.heal.HealConfig`, :class:`~layerif_plugins.training.TrainConfig`)
are generated from its fields by :class:`ConfigOptions` — name, type, choices, default and
help come from the field — so a field added to the dataclass is a command-line option
without touching the command, and the CLI default can never drift from the library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import (
    check_out_dir,
    check_out_file,
    check_outputs_apart,
    check_readable,
)
from layerif_plugins.models import load_model_and_tokenizer

if TYPE_CHECKING:
    from layerif_plugins.scorers import ScoringData

logger = logging.getLogger(__name__)


MODEL_HELP = "HF model directory, hub id, llama2.c .bin, .gguf, or a catalogue name (`layerif models list`)"


def add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: beside the model)")
    p.add_argument("--dtype", default="float32", help="float32 | float64 | bfloat16 | float16")
    if device:
        p.add_argument("--device", default="auto", type=device_option,
                       help="cpu | cuda | cuda:N | auto (cuda when available)")
        p.add_argument("--device-map", default=None,
                       help="spread a large model over devices (accelerate device_map, e.g. 'auto')")


def add_progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- option values


def finite_float(text: str) -> float:
    """``type=`` of a float option: a finite number (``nan`` / ``inf`` are refused by the parser, in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


#: device types a command can run on (``meta`` holds no values; ``gpu`` / ``tpu`` are not torch device names)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def device_option(text: str) -> str:
    """``type=`` of ``--device``: ``auto`` or a torch device of :data:`DEVICE_TYPES` (``cuda:1``), else refused."""
    value = text.strip().lower()
    if value == "auto":
        return value
    kind, _, index = value.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or value.endswith(":"):
        hint = " (the GPU is 'cuda')" if kind in {"gpu", "nvidia"} else ""
        raise argparse.ArgumentTypeError(f"unknown device {text!r}{hint}: use auto, cpu, cuda or cuda:N")
    return value


def positive_int(text: str) -> int:
    """``type=`` of a count option (``--limit``, ``--nproc``, ``--n-*``): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- output and input paths


@dataclass(frozen=True)
class PathSpec:
    """Which options of a command are outputs and inputs, for the checks :func:`check_paths` runs before the work.

    Attributes:
        dirs: dests of directory outputs, replaced atomically (``io.atomic_dir``).
        files: dest → kind (``json`` / ``png``) of file outputs.
        into: dests of directories the command writes files into and keeps (``--task-dir``).
        inputs: dests of input paths (a string, or a list of them).
        more_inputs: the inputs hidden inside other options (``eval --tasks perplexity:FILE``).
        names: dest → how the user wrote it (``--out``, ``checkpoint``), filled by :func:`declare_paths`.
    """

    dirs: tuple[str, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    into: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    more_inputs: Callable[[argparse.Namespace], dict[str, list[str]]] | None = None
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, dest: str) -> str:
        return self.names.get(dest, f"--{dest.replace('_', '-')}")


def declare_paths(
    p: argparse.ArgumentParser,
    *,
    dirs: Sequence[str] = (),
    files: Mapping[str, str] | None = None,
    into: Sequence[str] = (),
    inputs: Sequence[str] = (),
    more_inputs: Callable[[argparse.Namespace], dict[str, list[str]]] | None = None,
) -> PathSpec:
    """Declare a command's output and input paths (after its options) and add ``--overwrite``.

    The ``layerif`` entry point then checks them all before the command runs
    (:func:`check_paths`): one rule for ``--out`` in every command.
    """
    names = {}
    for action in p._actions:
        if action.dest in {*dirs, *(files or {}), *into, *inputs}:
            names[action.dest] = action.option_strings[0] if action.option_strings else action.dest
    if (dirs or files) and "--overwrite" not in p._option_string_actions:
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output (only one written by layerif: never an input, never "
                            "a directory without its marker file)")
    spec = PathSpec(dirs=tuple(dirs), files=dict(files or {}), into=tuple(into), inputs=tuple(inputs),
                    more_inputs=more_inputs, names=names)
    p.set_defaults(path_spec=spec)
    return spec


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


#: inputs that the command also writes (``--checkpoint-dir``: resumed from, and filled)
_BOTH_WAYS = ("checkpoint_dir",)


def check_paths(args: argparse.Namespace) -> list[str]:
    """Run every output / input check of the command's :class:`PathSpec` before any work.

    Returns the directory outputs the command may replace (``--overwrite`` given), for
    :func:`layerif_plugins.io.replacing`.
    """
    spec: PathSpec | None = getattr(args, "path_spec", None)
    if spec is None:
        return []
    inputs = {spec.name(d): _listed(getattr(args, d, None)) for d in spec.inputs}
    if spec.more_inputs is not None:
        inputs.update(spec.more_inputs(args))
    for name, values in inputs.items():
        for value in values:
            check_readable(name, value)
    overwrite = bool(getattr(args, "overwrite", False))
    for dest in (*spec.dirs, *spec.files, *spec.into):
        value = getattr(args, dest, None)
        if value is not None and str(value).strip() == "":
            raise ConfigError(f"{spec.name(dest)} is empty: give a path")
    outputs: dict[str, Any] = {}
    for dest in spec.dirs:
        if getattr(args, dest, None):
            outputs[spec.name(dest)] = check_out_dir(getattr(args, dest), overwrite=overwrite,
                                                     option=spec.name(dest), inputs=inputs)
    for dest, kind in spec.files.items():
        if getattr(args, dest, None):
            outputs[spec.name(dest)] = check_out_file(getattr(args, dest), overwrite=overwrite, kind=kind,
                                                      option=spec.name(dest), inputs=inputs)
    for dest in spec.into:
        if getattr(args, dest, None):
            outputs[spec.name(dest)] = check_out_dir(getattr(args, dest), option=spec.name(dest), inputs=inputs,
                                                     into=True)
    for dest in _BOTH_WAYS:  # read and written by the command: never the same path as, or nested with, an output
        if dest in spec.inputs and getattr(args, dest, None):
            outputs[spec.name(dest)] = getattr(args, dest)
    check_outputs_apart(outputs)
    return [str(getattr(args, d)) for d in spec.dirs if overwrite and getattr(args, d, None)]



def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, getattr(args, "device", "cpu"),
                                    device_map=getattr(args, "device_map", None))


def load_split(path: str, tokenizer: Any, args: argparse.Namespace, n: int | None) -> Examples:
    return load_examples(path, tokenizer, max_length=args.max_length, n=n, seed=getattr(args, "seed", None),
                         text_field=getattr(args, "text_field", "text"))


# ----------------------------------------------------------------------------- scoring data


def load_scoring_data(
    args: argparse.Namespace,
    tokenizer: Any,
    method: str,
    *,
    calib: str | None = None,
    n_calib: int | None = None,
) -> ScoringData:
    """The :class:`~layerif_plugins.scorers.ScoringData` that ``method`` declares (``needs=``), from the options.

    Reads ``--train`` / ``--val`` / ``--calib`` (``calib`` overrides the path, e.g. a
    command's ``--data``) and their ``--n-*`` counts; when the method needs labels,
    ``--calib`` is a labelled JSONL read with ``--label-field`` (default ``label``). Inputs
    the method does not need are not read; inputs it needs but the command line lacks stay
    ``None``, so :func:`~layerif_plugins.scorers.resolve_scores` names them.
    """
    from layerif_plugins.data import pad_id_of
    from layerif_plugins.scorers import ScoringData, get_scorer

    needs = get_scorer(method).needs
    data = ScoringData(pad_id=pad_id_of(tokenizer))
    for split in ("train", "val"):
        path = getattr(args, split, None)
        if split in needs and path:
            setattr(data, split, load_split(path, tokenizer, args, getattr(args, f"n_{split}", None)))
        elif path:
            logger.info("--%s is not used by %r scores", split, method)
    calib = calib if calib is not None else getattr(args, "calib", None)
    n_calib = n_calib if n_calib is not None else getattr(args, "n_calib", None)
    if "calib" in needs and calib and "labels" in needs:
        from layerif_plugins.data.labelled import load_labelled

        labelled = load_labelled(calib, tokenizer, max_length=args.max_length, n=n_calib,
                                 seed=getattr(args, "seed", None), text_field=getattr(args, "text_field", "text"),
                                 label_field=getattr(args, "label_field", None) or "label")
        data.calib, data.labels = labelled.examples, list(labelled.labels)
    elif "calib" in needs and calib:
        data.calib = load_split(calib, tokenizer, args, n_calib)
    return data


# ----------------------------------------------------------------------------- options from dataclasses

_SCALARS: tuple[type, ...] = (bool, int, float, str)


def _field_kind(tp: Any) -> tuple[tuple[type, ...], tuple[Any, ...] | None]:
    """(scalar types, Literal choices or None) of a field annotation; ``()`` types when not a CLI scalar.

    ``X | None`` is X (None is the default, not a value to type); ``Literal[...]`` gives
    choices; unions of scalars (``int | str``) keep every member, tried in that order.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return tuple(dict.fromkeys(type(c) for c in choices)), choices
    if origin in (typing.Union, types.UnionType):
        parts = [_field_kind(a) for a in typing.get_args(tp) if a is not type(None)]
        if any(not kinds for kinds, _ in parts):
            return (), None
        kinds = tuple(dict.fromkeys(k for part_kinds, _ in parts for k in part_kinds))
        if all(choices is not None for _, choices in parts):
            return kinds, tuple(c for _, choices in parts for c in choices or ())
        return kinds, None  # free values of some member: no fixed choices
    if tp in _SCALARS:
        return (tp,), None
    return (), None


def _converter(kinds: tuple[type, ...]) -> Callable[[str], Any]:
    """Parse a command-line string into the first of ``kinds`` that accepts it (int before float before str)."""
    order = [t for t in (int, float, str) if t in kinds]

    def convert(text: str) -> Any:
        for t in order:
            try:
                value = t(text)
            except ValueError:
                continue
            if t is float and not math.isfinite(value):
                continue  # nan / inf are never a setting: refused (or a string, for a field that takes one)
            return value
        kind = " or ".join("finite number" if t is float else t.__name__ for t in order)
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}")

    convert.__name__ = order[0].__name__ if len(order) == 1 else "value"
    return convert


def _docstring_help(cls: type) -> dict[str, str]:
    """Field descriptions from the class docstring's ``Args:`` / ``Attributes:`` section.

    Google style: ``name: text`` at the entry indent, continuation lines indented deeper;
    ``a / b / c: text`` describes several fields at once.
    """
    out: dict[str, str] = {}
    names: list[str] = []
    indent: int | None = None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Attributes:", "Arguments:"):
            indent, names = None, []
            continue
        if not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        entry = re.match(r"^([A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*)\s*(?:\([^)]*\))?:\s*(.*)$", stripped)
        if entry and (indent is None or depth == indent):
            indent = depth
            names = [n.strip() for n in entry.group(1).split("/")]
            for name in names:
                out[name] = entry.group(2)
        elif names and indent is not None and depth > indent:
            for name in names:
                out[name] = f"{out[name]} {stripped}".strip()
        else:
            names = []
    return {k: re.sub(r"``([^`]*)``", r"\1", v) for k, v in out.items()}


@dataclass(frozen=True)
class ConfigOptions:
    """Command-line options generated from a config dataclass's fields, and the config built back from them.

    Every field of a scalar type (``bool``, ``int``, ``float``, ``str``, a ``Literal``, any
    of them ``| None``, or a union such as ``int | str``) becomes ``--[prefix]field-name``:
    the default is the field's, a ``Literal`` gives ``choices``, a ``bool`` defaulting to
    False is a switch (``store_true``) and one defaulting to True gets ``--[prefix]no-name``.
    Help comes from ``field(metadata={"help": ...})``, else the class docstring, else
    ``help`` here. An option a command already defines (by hand, for its own meaning) is
    left to the command.

    Attributes:
        cls: the dataclass.
        prefix: option prefix, e.g. ``"heal-"`` → ``--heal-lr``.
        exclude: fields that get no option (set by the command, e.g. ``show_progress``).
        rename: field → option name (without ``--`` and prefix), e.g. ``{"r": "rank"}``.
        choices: extra choices for fields typed ``str``.
        help: help text overrides per field.
    """

    cls: type
    prefix: str = ""
    exclude: tuple[str, ...] = ()
    rename: Mapping[str, str] = field(default_factory=dict)
    choices: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    help: Mapping[str, str] = field(default_factory=dict)

    def fields(self) -> list[tuple[dataclasses.Field, tuple[type, ...], tuple[Any, ...] | None]]:
        """The fields that get an option, with their scalar types and choices."""
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.exclude or not f.init:
                continue
            kinds, choices = _field_kind(hints[f.name])
            if not kinds:
                logger.debug("%s.%s (%s) has no command-line form", self.cls.__name__, f.name, hints[f.name])
                continue
            out.append((f, kinds, choices))
        return out

    def option(self, name: str, negated: bool = False) -> str:
        base = self.rename.get(name, name).replace("_", "-")
        return f"--{self.prefix}{'no-' if negated else ''}{base}"

    def dest(self, name: str) -> str:
        return f"{self.prefix}{self.rename.get(name, name)}".replace("-", "_")

    def add_to(self, p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add one option per field to ``p`` (options ``p`` already has are skipped)."""
        docs = _docstring_help(self.cls)
        taken = getattr(p, "_option_string_actions", {})
        for f, kinds, choices in self.fields():
            default = _default(f)
            text = f.metadata.get("help") or self.help.get(f.name) or docs.get(f.name) or f.name.replace("_", " ")
            text = text.rstrip(".").replace("%", "%%")  # argparse formats help with %
            if kinds == (bool,):
                negated = default is True
                flag = self.option(f.name, negated)
                if flag in taken:
                    continue
                p.add_argument(flag, dest=self.dest(f.name), action="store_false" if negated else "store_true",
                               default=bool(default), help=text)
                continue
            flag = self.option(f.name)
            if flag in taken:
                logger.debug("%s is defined by the command; %s.%s not generated", flag, self.cls.__name__, f.name)
                continue
            choices = choices or (tuple(self.choices[f.name]) if f.name in self.choices else None)
            shown = f" (default: {default})".replace("%", "%%") if default not in (None, "") else ""
            p.add_argument(flag, dest=self.dest(f.name), type=_converter(kinds), choices=choices, default=default,
                           help=f"{text}{shown}", metavar=None if choices else self.rename.get(f.name, f.name).upper())

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The field values present in ``args``.

        A field whose option the command defines itself (same name) takes that option's
        value; a field with no option at all keeps the dataclass default.
        """
        out = {}
        for f, _, _ in self.fields():
            dest = self.dest(f.name)
            if hasattr(args, dest):
                out[f.name] = getattr(args, dest)
        return out

    def build(self, args: argparse.Namespace, **overrides: Any) -> Any:
        """The dataclass from the parsed options, with ``overrides`` (e.g. ``show_progress``) on top."""
        return self.cls(**{**self.values(args), **overrides})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
