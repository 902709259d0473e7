"""The environment every quality and serving benchmark sets before torch or a host library is imported.

The benchmarks run where there is no hub (offline, local files only), print tables that host libraries'
INFO lines would bury (llm-compressor at ERROR; its logs are not the product), share 2 cores with a
tokenizer pool and torch's threads (no tokenizer threads; idle OpenMP threads yield instead of spinning),
and run from a checkout (the package and the sibling benchmark modules importable without an install).
Import it before anything heavy: ``from bench_env import REPO  # noqa: E402``. Values a caller already
set win (``setdefault``), so ``OMP_WAIT_POLICY=ACTIVE python benchmarks/…`` still works.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

#: set unless already set
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",
    "OMP_WAIT_POLICY": "PASSIVE",
}

for _name, _value in ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)
for _path in (BENCHMARKS, REPO):  # REPO first on the path: this checkout's package, not an installed one
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
