"""The benchmarks' shared environment: set before torch is imported, a caller's own values kept."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
USERS = ("peft_cost", "quality_depth", "quality_moe", "quality_peft", "quality_precision", "quality_pruning",
         "serving", "planner_memory")


def first_import_line(tree: ast.Module, module: str) -> int | None:
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) else [])
        if module in names:
            return node.lineno
    return None


def test_every_quality_benchmark_sets_the_environment_before_torch_or_a_host_library():
    for stem in USERS:
        tree = ast.parse((BENCH / f"{stem}.py").read_text())
        env = first_import_line(tree, "bench_env")
        assert env is not None, stem
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        heavy = [n.lineno for n in top if any(
            (a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
            in ("torch", "transformers", "llmcompressor", "peft", "layerif_plugins", "quality_pruning")
            for a in (n.names if isinstance(n, ast.Import) else [n]))]
        assert all(env < line for line in heavy), (stem, env, heavy)


def test_environment_is_set_unless_the_caller_set_it_and_the_checkout_comes_first():
    code = ("import os, sys; import bench_env; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['HF_HUB_OFFLINE'], os.environ['TOKENIZERS_PARALLELISM'], "
            "sys.path[0] == str(bench_env.REPO))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["ACTIVE", "1", "false", "True"]
