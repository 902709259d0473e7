"""``PeftType.LAYERIF_LORA_MOE``: the LoRA-MoE method as a real member of PEFT's ``PeftType`` enum.

Why a member and not a plain string. PEFT, transformers and their users read
``config.peft_type.value`` (transformers' ``load_adapter`` / ``delete_adapter`` /
``from_pretrained(adapter_dir)``, PEFT's model-card tags, ``PeftMixedModel``'s refusal), so a
``str`` there crashes with ``AttributeError``. PEFT's own ``register_peft_method`` — the
supported way to add a method — accepts only names that are already members of ``PeftType``
("please add an entry to peft.utils.peft_types.PeftType"), a closed enum that only PEFT's own
source can extend, and Python has no public API to add a member to an existing enum.

So :func:`lora_moe_peft_type` adds the member the way the ``enum`` module builds its own
members (the steps of ``enum._proto_member.__set_name__``, or ``EnumType._add_member_`` where
Python has it), and checks the result through the public enum API: ``PeftType["…"]``,
``PeftType("…")``, ``"…" in list(PeftType)``. The member is a ``str`` equal to, and hashing like,
``"LAYERIF_LORA_MOE"``, so adapter configs saved with the plain string load unchanged. Then
``register_peft_method`` registers the method like any built-in one (see ``__init__.py``).
"""

from __future__ import annotations

import threading

from peft import PeftType

from layerif_plugins.errors import ConfigError

# The name (= value) of the member. The ``LAYERIF_`` namespace keeps it from ever colliding with a
# future PEFT member and names the plugin when PEFT cannot find it (``KeyError: 'LAYERIF_LORA_MOE'``
# = "import layerif_plugins first").
LORA_MOE_PEFT_TYPE = "LAYERIF_LORA_MOE"

_LOCK = threading.Lock()


def lora_moe_peft_type() -> PeftType:
    """``PeftType.LAYERIF_LORA_MOE``, added to PEFT's enum on first use (idempotent, thread-safe)."""
    existing = PeftType.__members__.get(LORA_MOE_PEFT_TYPE)
    if existing is not None:
        return existing
    with _LOCK:
        existing = PeftType.__members__.get(LORA_MOE_PEFT_TYPE)
        if existing is not None:
            return existing
        member = _add_str_member(PeftType, LORA_MOE_PEFT_TYPE)
    _check_member(member)
    return member


def _add_str_member(enum_cls: type, name: str) -> PeftType:
    """Add ``name = name`` to a ``(str, Enum)`` class, following the steps ``enum`` itself takes."""
    member = str.__new__(enum_cls, name)
    member._value_ = name
    member._name_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13 (it leaves the value maps alone)
    if add_member is not None:
        add_member(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    hashable = getattr(enum_cls, "_hashable_values_", None)  # Python >= 3.13 keeps a list of values too
    if isinstance(hashable, list) and name not in hashable:
        hashable.append(name)
    return member


def _check_member(member: PeftType) -> None:
    """The new member must behave like PEFT's own through the public enum API; say so if this Python differs."""
    ok = (
        isinstance(member, PeftType)
        and PeftType[LORA_MOE_PEFT_TYPE] is member
        and PeftType(LORA_MOE_PEFT_TYPE) is member
        and member in list(PeftType)
        and member.value == LORA_MOE_PEFT_TYPE
        and member == LORA_MOE_PEFT_TYPE
        and hash(member) == hash(LORA_MOE_PEFT_TYPE)
    )
    if not ok:
        raise ConfigError(
            f"could not add {LORA_MOE_PEFT_TYPE} to peft.PeftType on this Python version; "
            "please report it to layerif-plugins with `python --version` and `pip show peft`"
        )
