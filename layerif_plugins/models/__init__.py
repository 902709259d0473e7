"""Models: the family table, fingerprints, loading (HF dir, hub id, llama2.c ``.bin``, ``.gguf``, catalogue name),
integrity checks (config vs weights, safetensors sizes, finite weights).

Everything is re-exported here, so ``from layerif_plugins.models import decoder_blocks`` is
the one import callers need; the submodules each hold one job.
"""

from layerif_plugins.models.catalogue import CATALOGUE, CatalogueEntry, resolve_model
from layerif_plugins.models.families import (
    FAMILIES,
    PARAM_GROUPS,
    Family,
    LinearModule,
    ParamGroup,
    block_class_name,
    block_linears,
    blocks_prefix,
    decoder_blocks,
    family_of,
    linear_weight_is_transposed,
    model_type,
    num_layers,
)
from layerif_plugins.models.fingerprint import ModelFingerprint, config_hash, fingerprint
from layerif_plugins.models.integrity import (
    check_adapter_files,
    check_finite_parameters,
    check_model_files,
    read_safetensors_header,
)
from layerif_plugins.models.loading import (
    load_model_and_tokenizer,
    locate_model,
    looks_like_path,
    model_dir_for,
    resolve_device,
    resolve_dtype,
    save_model_dir,
)

__all__ = [
    "CATALOGUE",
    "FAMILIES",
    "PARAM_GROUPS",
    "Family",
    "LinearModule",
    "ModelFingerprint",
    "ParamGroup",
    "CatalogueEntry",
    "block_class_name",
    "block_linears",
    "blocks_prefix",
    "check_adapter_files",
    "check_finite_parameters",
    "check_model_files",
    "config_hash",
    "decoder_blocks",
    "family_of",
    "fingerprint",
    "linear_weight_is_transposed",
    "load_model_and_tokenizer",
    "locate_model",
    "looks_like_path",
    "model_dir_for",
    "model_type",
    "num_layers",
    "read_safetensors_header",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "save_model_dir",
]
