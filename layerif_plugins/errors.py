"""One exception family for everything the library refuses.

Every error a user can cause (bad model, bad data, bad scores file, bad budget) is a
subclass of :class:`LayerIFError`, raised early with a message that names the bad value
and the fix; the CLI prints the message alone, without a traceback.

The family subclasses :class:`ValueError`: every one of these errors is about a value the
caller passed (a path, a file's contents, an option, a budget), and host libraries and
their users catch ``ValueError`` for exactly that (PEFT's config checks, pydantic
validators in llm-compressor modifiers, which wrap a ``ValueError`` into a
``ValidationError``).
"""

from __future__ import annotations


class LayerIFError(ValueError):
    """Base class of all errors raised on purpose by layerif_plugins."""


class ModelError(LayerIFError):
    """The model cannot be loaded, converted, or its decoder blocks cannot be found."""


class DataError(LayerIFError):
    """A data file is missing, empty, malformed, or too short for the request."""


class ScoresError(LayerIFError):
    """A scores file is malformed, or does not belong to the model it is applied to."""


class AllocationError(LayerIFError):
    """A budget or target that cannot be met (sparsity, expert counts, layers to drop)."""


class NumericsError(LayerIFError):
    """Non-finite values met during influence computation."""


class ConfigError(LayerIFError):
    """An option or combination of options that cannot work (device, params, paths)."""
