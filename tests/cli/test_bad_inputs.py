"""Hostile inputs to every command: one ``layerif X: error:`` line, exit 2, and nothing changed or left behind.

The output / command-line half of issue 12 (the model / data / scores half is
``test_bad_inputs_model.py``): ``--out`` never replaces what is not our own output, never an
input, and is checked (type, writability, ``--overwrite``) before any work; bad numbers are
refused by the parser; a damaged ``--checkpoint-dir`` is named with "delete it to start
over"; Ctrl-C exits 130 and SIGTERM 143 with every temp directory removed.

Each case runs the real command in-process (``main(argv)``) in a sandbox holding copies of
its inputs, and compares a snapshot of the sandbox (every path and every file's bytes)
before and after. Only the interrupt tests start a process, to deliver a real signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layerif_plugins.cli import main
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import MARKER, atomic_dir, replacing

ROOT = os.geteuid() == 0


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` → ``dir`` or the sha256 of the file's bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)`` in-process: (exit code, stderr); argparse's exit is caught like a shell would see it."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def unwritable_dir(sandbox: Path) -> Path:
    """A directory where no file can be created: a read-only mode for a user, ``/proc`` for root."""
    if ROOT:
        return Path("/proc")
    ro = sandbox / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scored(stories_dir: Path, tinystories_valid: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real `layerif score` run with a checkpoint directory: its scores file and its (complete) checkpoints."""
    where = tmp_path_factory.mktemp("scored")
    ck, scores = where / "ck", where / "scores.json"
    assert main(["score", "--model", str(stories_dir), *SCORE_DATA.split(), str(tinystories_valid),
                 "--val", str(tinystories_valid), "--checkpoint-dir", str(ck), "--out", str(scores)]) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json", "pass0.pt", "pass1.pt", "pass2.pt", "pass3.pt"]
    return {"ck": ck, "scores": scores}


#: the small scoring run of the checkpoint cases (the same options as the `scored` fixture)
SCORE_DATA = "--n-train 4 --n-val 2 --max-length 16 --params attn --batch-size 2 --quiet --train"


@dataclass
class Sandbox:
    root: Path
    names: dict[str, str] = field(default_factory=dict)


@pytest.fixture()
def sandbox(tmp_path: Path, stories_dir: Path, stories_bin: Path, tinystories_valid: Path,
            scored: dict[str, Path]) -> Sandbox:
    """Copies of every input a case may harm, a user's project, a text file, an old JSON, an empty dir."""
    sb = tmp_path / "sb"
    sb.mkdir()
    shutil.copytree(stories_dir, sb / "m")
    (sb / "bin").mkdir()
    for f in stories_bin.parent.iterdir():
        shutil.copy(f, sb / "bin" / f.name)
    lines = tinystories_valid.read_text(encoding="utf-8").splitlines()[:400]
    (sb / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(scored["scores"], sb / "scores.json")
    (sb / "user" / "keep").mkdir(parents=True)
    (sb / "user" / "keep" / "f").write_text("the user's work\n")
    (sb / "file.txt").write_text("a user's notes\n")
    (sb / "old.json").write_text('{"a": 1}\n')
    (sb / "empty").mkdir()
    (sb / "adapter").mkdir()
    (sb / "adapter" / "adapter_config.json").write_text("{}\n")
    names = {"sb": str(sb), "m": str(sb / "m"), "bin": str(sb / "bin" / stories_bin.name),
             "train": str(sb / "train.txt"),
             "scores": str(sb / "scores.json"), "user": str(sb / "user"), "file": str(sb / "file.txt"),
             "hf": str(stories_dir), "valid": str(tinystories_valid), "ro": str(unwritable_dir(sb))}
    return Sandbox(sb, names)


def _ck_copy(sb: Sandbox, scored: dict[str, Path]) -> Path:
    ck = sb.root / "ck"
    shutil.copytree(scored["ck"], ck)
    return ck


def _ck_truncated_meta(sb: Sandbox, scored: dict[str, Path]) -> None:
    meta = _ck_copy(sb, scored) / "meta.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])


def _ck_truncated_pass(sb: Sandbox, scored: dict[str, Path]) -> None:
    p = _ck_copy(sb, scored) / "pass1.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _ck_without_meta(sb: Sandbox, scored: dict[str, Path]) -> None:
    (_ck_copy(sb, scored) / "meta.json").unlink()


def _ck_is_file(sb: Sandbox, scored: dict[str, Path]) -> None:
    (sb.root / "ck").write_text("not a directory\n")


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # formatted with the sandbox names, then split on whitespace
    expect: tuple[str, ...]  # substrings of the error line
    setup: Any = None  # (sandbox, scored) -> None


SCORE = "score --model {hf} --train {valid} --val {valid} --n-train 4 --n-val 2 --max-length 16 --quiet"
SCORE_CK = f"score --model {{hf}} {SCORE_DATA} {{valid}} --val {{valid}} --checkpoint-dir {{sb}}/ck --out {{sb}}/s.json"
DROP = "drop --model {m} --by last --n-layers 1"
HEAL = "heal --model {m} --data {train} --n 4 --max-length 16 --steps 1"
MOE = "moe --model {m} --layout uniform --device cpu"
PRUNE = "prune --model {m} --allocation uniform --sparsity 0.5 --calib {train} --n-calib 4 --max-length 16"

CASES = [
    # convert: --out is a user's directory, a file, the input, or has no parent
    Case("convert-out-nonempty", "convert {bin} --out {user}", ("--out", "not empty", "--overwrite")),
    Case("convert-out-nonempty-overwrite", "convert {bin} --out {user} --overwrite",
         ("not a layerif output", MARKER)),
    Case("convert-out-is-file", "convert {bin} --out {file}", ("is a file", "a directory goes there")),
    Case("convert-out-is-input", "convert {bin} --out {bin} --overwrite", ("is the input checkpoint",)),
    Case("convert-out-no-parent", "convert {bin} --out {sb}/no/such/dir", ("does not exist",)),
    # score: every --out check happens before the model is loaded
    Case("score-out-is-train", SCORE + " --train {train} --out {train}", ("is the input --train",)),
    Case("score-out-is-dir", SCORE + " --out {user}", ("is a directory", "a file goes there")),
    Case("score-out-unwritable", SCORE + " --out {ro}/s.json", ("cannot write in",)),
    Case("score-out-exists", SCORE + " --out {sb}/old.json", ("exists", "--overwrite")),
    Case("score-out-overwrite-not-ours", SCORE + " --out {file} --overwrite", ("not a previous layerif output",)),
    Case("score-out-inside-checkpoint-dir", SCORE + " --checkpoint-dir {user} --out {user}/keep/s.json",
         ("inside the input --checkpoint-dir",)),
    Case("score-nproc-0", SCORE + " --nproc 0 --out {sb}/s.json", ("--nproc", "must be >= 1")),
    Case("score-n-train-0", SCORE + " --n-train 0 --out {sb}/s.json", ("--n-train", "must be >= 1")),
    Case("score-damping-nan", SCORE + " --damping nan --out {sb}/s.json", ("--damping", "not a finite number")),
    Case("score-train-unreadable", "score --model {hf} --train /proc/self/mem --val {valid} --out {sb}/s.json",
         ("--train /proc/self/mem cannot be read",)),
    Case("score-checkpoint-dir-is-file", SCORE_CK, ("is a file", "delete it to start over"), _ck_is_file),
    Case("score-checkpoint-meta-truncated", SCORE_CK, ("damaged", "meta.json", "delete it to start over"),
         _ck_truncated_meta),
    Case("score-checkpoint-pass-truncated", SCORE_CK, ("damaged", "pass1.pt", "delete it to start over"),
         _ck_truncated_pass),
    Case("score-checkpoint-without-meta", SCORE_CK, ("damaged", "no meta.json", "delete it to start over"),
         _ck_without_meta),
    # eval / vllm-check
    Case("eval-limit-0", "eval --model {m} --tasks perplexity:{train} --limit 0", ("--limit", "must be >= 1")),
    Case("eval-out-is-dir", "eval --model {m} --tasks perplexity:{train} --limit 2 --out {user}",
         ("is a directory",)),
    Case("eval-out-is-task-file", "eval --model {m} --tasks perplexity:{train} --limit 2 --out {train} --overwrite",
         ("is the input --tasks",)),
    Case("eval-task-dir-is-file", "eval --model {m} --tasks perplexity:{train} --limit 2 --task-dir {file}",
         ("--task-dir", "is a file")),
    Case("vllm-check-limit-0", "vllm-check {m} --limit 0", ("--limit", "must be >= 1")),
    Case("vllm-check-out-inside-model", "vllm-check {m} --out {m}/check.json", ("inside the input model",)),
    # show / select-layers
    Case("show-png-is-dir", "show {scores} --png {user}", ("--png", "is a directory")),
    Case("show-png-is-scores", "show {scores} --png {scores} --overwrite", ("is the input scores",)),
    Case("show-png-overwrite-not-png", "show {scores} --png {file} --overwrite",
         ("not a previous layerif output", "PNG")),
    Case("select-layers-out-is-scores", "select-layers --scores {scores} --k 2 --out {scores} --overwrite",
         ("is the input --scores",)),
    Case("select-layers-k-0", "select-layers --scores {scores} --k 0", ("--k", "must be >= 1")),
    # drop: the reported case (`--out` the folder holding the model), the model itself, inside it, overlaps
    Case("drop-out-holds-model", DROP + " --out {sb} --overwrite", ("holds the input --model",)),
    Case("drop-out-is-model", DROP + " --out {m} --overwrite", ("is the input --model",)),
    Case("drop-out-inside-model", DROP + " --out {m}/smaller", ("inside the input --model",)),
    Case("drop-save-scores-inside-out", "drop --model {m} --by angular --calib {train} --n-layers 1 --out {sb}/empty "
         "--save-scores {sb}/empty/s.json", ("overlap",)),
    # heal / moe / finetune
    Case("heal-lr-nan", HEAL + " --lr nan --out {sb}/h", ("--lr", "not a finite number")),
    Case("heal-lr-inf", HEAL + " --lr inf --out {sb}/h", ("--lr", "not a finite number")),
    Case("heal-out-nonempty", HEAL + " --out {user}", ("not empty",)),
    Case("moe-budget-unbounded", MOE + " --budget 1000000 --out {sb}/a", ("T=1000000", "at most 40")),
    Case("moe-beta-nan", MOE + " --budget 10 --beta nan --out {sb}/a", ("--beta", "not a finite number")),
    Case("moe-out-overwrite-not-ours", MOE + " --budget 10 --out {user} --overwrite", ("not a layerif output",)),
    Case("finetune-out-is-adapter", "finetune --model {m} --adapter {sb}/adapter --train {train} --out {sb}/adapter "
         "--overwrite", ("is the input --adapter",)),
    # prune
    Case("prune-out-overwrite-not-ours", PRUNE + " --out {user} --overwrite", ("not a layerif output",)),
    Case("prune-sparsity-nan", PRUNE + " --sparsity nan --out {sb}/p", ("--sparsity", "not a finite number")),
    Case("prune-out-is-calib", PRUNE + " --out {train} --overwrite", ("is the input --calib",)),
    # models fetch / demo
    Case("models-fetch-out-is-file", "models fetch stories260k --out {file}", ("is a file",)),
    Case("models-fetch-out-nonempty", "models fetch stories260k --out {user}", ("not empty",)),
    Case("demo-out-not-a-demo", "demo --out {user} --quiet", ("not a layerif demo output",)),
    Case("demo-out-is-file", "demo --out {file} --quiet", ("is a file",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, sandbox: Sandbox, scored: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if case.setup is not None:
        case.setup(sandbox, scored)
    before = snapshot(sandbox.root)
    argv = case.argv.format(**sandbox.names).split()
    rc, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    command = "models" if argv[0] == "models" else argv[0]
    assert rc == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith(f"layerif {command}: error: "), err
    assert sum(": error: " in line for line in lines) == 1, err
    for text in case.expect:
        assert text in lines[-1], lines[-1]
    assert snapshot(sandbox.root) == before  # nothing changed, nothing left behind (no hidden temp dirs either)


def test_bad_input_cases_cover_every_command() -> None:
    commands = {c.argv.split()[0] for c in CASES}
    assert commands >= {"convert", "score", "eval", "vllm-check", "show", "select-layers", "drop", "heal", "moe",
                        "finetune", "prune", "models", "demo"}
    assert len(CASES) >= 30


def test_score_refuses_an_unwritable_out_before_the_work(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]):
    """The reported case: the whole computation ran, then the write failed. Now it fails in well under a second."""
    argv = (SCORE + " --n-train 64 --n-val 32 --max-length 128 --out {ro}/s.json").format(**sandbox.names).split()
    start = time.perf_counter()
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and "cannot write in" in err
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- --overwrite of our own output


def test_overwrite_replaces_only_our_own_output(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    out = sandbox.root / "hf"
    convert = ["convert", sandbox.names["bin"], "--out", str(out)]
    assert run_cli(convert, capsys)[0] == 0
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    rc, err = run_cli(convert, capsys)  # our own output, but no --overwrite
    assert rc == 2 and "pass --overwrite" in err
    (out / "stale.txt").write_text("from the first run\n")
    assert run_cli([*convert, "--overwrite"], capsys)[0] == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert sorted(p.name for p in sandbox.root.iterdir() if p.name.startswith(".")) == []  # no .hf.old or temp
    # a file output: replaced with --overwrite when it is a JSON object (an earlier result)
    dest = sandbox.root / "old.json"
    rc, _ = run_cli(["select-layers", "--scores", sandbox.names["scores"], "--k", "2", "--out", str(dest),
                     "--overwrite"], capsys)
    assert rc == 0 and json.loads(dest.read_text())["layers_to_transform"]


def test_atomic_dir_defaults_to_not_overwriting(tmp_path: Path) -> None:
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "src" / "main.py").write_text("print('mine')\n")
    with pytest.raises(ConfigError, match="not empty"), atomic_dir(user) as tmp:
        (tmp / "x").write_text("never")
    with pytest.raises(ConfigError, match="not a layerif output"), atomic_dir(user, overwrite=True) as tmp:
        (tmp / "x").write_text("never")
    with pytest.raises(ConfigError, match="not a layerif output"), replacing(tmp_path), atomic_dir(user) as tmp:
        (tmp / "x").write_text("never")
    assert (user / "src" / "main.py").read_text() == "print('mine')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    # our own output: replaced inside replacing() (what --overwrite does), the marker kept
    ours = tmp_path / "ours"
    with atomic_dir(ours) as tmp:
        (tmp / "a").write_text("1")
    with replacing(ours), atomic_dir(ours) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "project"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_dir_leaves_target_and_no_temp_on_failure(tmp_path: Path, error: type[BaseException]) -> None:
    ours = tmp_path / "out"
    with atomic_dir(ours) as tmp:
        (tmp / "v1").write_text("1")
    before = snapshot(tmp_path)
    with pytest.raises(error), atomic_dir(ours, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
        raise error("stopped mid-write")
    assert snapshot(tmp_path) == before


def test_atomic_dir_sweeps_temp_dirs_of_killed_processes(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: its temp dir stays until the next write to the same target removes it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    left = tmp_path / f".out.layerif-tmp-{pid}-abc123"
    (left / "model").mkdir(parents=True)
    other = tmp_path / ".out.layerif-tmp-notapid"  # not ours by name: kept
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert not left.exists() and other.exists() and (tmp_path / "out" / "a").is_file()


# ----------------------------------------------------------------------------- interrupts (real signals)

#: the real `layerif convert`, with the weights' save slowed down so the signal lands mid-write
_SLOW_SAVE = textwrap.dedent("""
    import signal, sys, time
    # a terminal's Ctrl-C: a job started in the background of a non-interactive shell (CI under
    # nohup, `cmd &`) inherits SIGINT ignored, and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import transformers
    save = transformers.PreTrainedModel.save_pretrained
    def slow_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        time.sleep(120)
    transformers.PreTrainedModel.save_pretrained = slow_save
    from layerif_plugins.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: 10-30 s on a busy 2-core machine
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_write_exits_cleanly(sig: int, code: int, word: str, tmp_path: Path, stories_bin: Path) -> None:
    out = tmp_path / "hf"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    with err.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, "convert", str(stories_bin), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=fh, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".hf.layerif-tmp-*/model.safetensors")):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert rc == code
    assert lines[-1].startswith(f"layerif convert: error: {word}"), lines[-3:]
    assert "Traceback" not in err.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt", "tmp"]  # no --out, no hidden temp dir
    assert list(tmpdir.glob("layerif-*")) == []
