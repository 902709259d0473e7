"""Task data: text / JSONL files → tokenized examples and batches (:mod:`.text`); labelled sets (:mod:`.labelled`)."""

from layerif_plugins.data.labelled import LabelledExamples, load_labelled, read_labelled
from layerif_plugins.data.text import (
    EOT_SEPARATOR,
    IGNORE_INDEX,
    Batch,
    Examples,
    batches,
    collate,
    iter_jsonl_objects,
    load_examples,
    model_positions,
    pad_id_of,
    plan_batches,
    read_records,
    read_text_file,
    select,
)

__all__ = [
    "EOT_SEPARATOR",
    "IGNORE_INDEX",
    "Batch",
    "Examples",
    "LabelledExamples",
    "batches",
    "collate",
    "iter_jsonl_objects",
    "load_examples",
    "load_labelled",
    "model_positions",
    "pad_id_of",
    "plan_batches",
    "read_labelled",
    "read_records",
    "read_text_file",
    "select",
]
