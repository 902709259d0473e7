"""Issue 23, round two of hostile inputs: concurrent runs, symlinked outputs, umask, full disks.

The output half (``io``): the ``--out`` rule is enforced again at the final swap (two real
processes writing the same ``--out``: exactly one wins, the other exits 2 and says where its
result was kept); a symlinked output is written through (its target replaced in place, the
link kept, no ``.NAME.layerif-old-*`` left); outputs follow the umask; a full disk / file-size
limit while saving is one line naming the path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_bad_inputs import run_cli  # main(argv) in-process: (exit code, stderr)

from layerif_plugins.cli import main
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import MARKER, atomic_dir, atomic_file, atomic_write_json, check_out_dir, check_out_file


def one_error_line(err: str, command: str) -> str:
    """The one ``layerif COMMAND: error: ...`` line of ``err`` (no traceback, no second error line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"layerif {command}: error: "), err
    assert sum(": error: " in line for line in lines) == 1, err
    return lines[-1]


# ----------------------------------------------------------------------------- the swap re-checks the target


def test_atomic_dir_refuses_a_target_written_meanwhile_and_keeps_its_result(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="written by another process") as info, atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("this run\n")
        out.mkdir()  # another process's result appears while this one works
        (out / "theirs.txt").write_text("the other run\n")
    assert (out / "theirs.txt").read_text() == "the other run\n"  # the winner is untouched
    kept = tmp_path / f"out.layerif-conflict-{os.getpid()}"
    assert str(kept) in str(info.value)
    assert (kept / "mine.txt").read_text() == "this run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", kept.name]  # no hidden temp dir


def test_overwrite_refuses_a_target_replaced_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    check_out_dir(out, overwrite=True)  # what the CLI checks before the work: our v1
    with atomic_dir(tmp_path / "elsewhere") as tmp:
        (tmp / "v2").write_text("2")
    os.rename(out, tmp_path / "v1-moved")
    os.rename(tmp_path / "elsewhere", out)  # another run replaced v1 by v2 meanwhile
    with pytest.raises(ConfigError, match="written by another process"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v3").write_text("3")
    assert (out / "v2").read_text() == "2"


def test_atomic_file_refuses_a_file_written_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "scores.json"
    check_out_file(target)
    target.write_text('{"theirs": 1}\n')
    with pytest.raises(ConfigError, match="written by another process") as info:
        atomic_write_json(target, {"mine": 1})
    assert target.read_text() == '{"theirs": 1}\n'
    kept = tmp_path / f"scores.layerif-conflict-{os.getpid()}.json"
    assert str(kept) in str(info.value) and kept.read_text().strip().startswith('{\n  "mine"')
    with pytest.raises(ConfigError, match="written by another process"), atomic_file(tmp_path / "p.png") as tmp:
        tmp.write_bytes(b"\x89PNG\r\n\x1a\nmine")
        (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\ntheirs")
    assert (tmp_path / "p.png").read_bytes().endswith(b"theirs")


def test_a_process_writes_the_same_output_twice(tmp_path: Path) -> None:
    """The recorded identity follows this process's own writes: a second write of ours is no conflict."""
    target = tmp_path / "a.json"
    check_out_file(target)
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    out = tmp_path / "d"
    check_out_dir(out)
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b"]


# ----------------------------------------------------------------------------- two real processes, one --out

#: the real `layerif` command, held after its result is written to the temp dir until the test says go,
#: so that both runs have passed the checks before the work and are about to swap
_GATED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    ready, go = Path(os.environ["GATE_READY"]), Path(os.environ["GATE_GO"])
    def gate():
        ready.touch()
        deadline = time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if sys.argv[1] == "convert":
        import transformers
        save = transformers.PreTrainedModel.save_pretrained
        def gated(self, *args, **kwargs):
            save(self, *args, **kwargs)
            gate()
        transformers.PreTrainedModel.save_pretrained = gated
    else:
        from layerif_plugins.scores import LayerScores
        save = LayerScores.save
        def gated(self, path):
            gate()
            return save(self, path)
        LayerScores.save = gated
    from layerif_plugins.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _race(tmp_path: Path, argv: list[str]) -> list[tuple[int, str]]:
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        env = {**os.environ, "GATE_READY": str(tmp_path / f"ready{i}"), "GATE_GO": str(go)}
        err = (tmp_path / f"err{i}.txt").open("w")
        procs.append((subprocess.Popen([sys.executable, "-c", _GATED, *argv], stdout=subprocess.DEVNULL,
                                       stderr=err, env=env), err))
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p, _ in procs), [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
            assert time.monotonic() < deadline, "the runs never reached the swap"
            time.sleep(0.05)
        go.touch()
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, fh in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            fh.close()
    return [(rc, (tmp_path / f"err{i}.txt").read_text()) for i, rc in enumerate(codes)]


@pytest.mark.slow  # two fresh interpreters import torch + transformers
def test_two_converts_to_the_same_out_one_wins(tmp_path: Path, stories_bin: Path) -> None:
    out = tmp_path / "hf"
    results = _race(tmp_path, ["convert", str(stories_bin), "--out", str(out)])
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    line = one_error_line(loser, "convert")
    assert "written by another process" in line and "kept at" in line
    kept = Path(line.split("kept at ")[1].split(" - ")[0])
    assert kept.parent == tmp_path and kept.name.startswith("hf.layerif-conflict-")
    assert (out / "model.safetensors").is_file() and (kept / "model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp / old dirs


@pytest.mark.slow
def test_two_scores_to_the_same_out_one_wins(tmp_path: Path, stories_dir: Path, tinystories_valid: Path) -> None:
    out = tmp_path / "s.json"
    argv = ["score", "--model", str(stories_dir), "--train", str(tinystories_valid), "--val", str(tinystories_valid),
            "--n-train", "2", "--n-val", "2", "--max-length", "8", "--quiet", "--out", str(out)]
    results = _race(tmp_path, argv)
    assert sorted(rc for rc, _ in results) == [0, 2], results
    line = one_error_line(next(err for rc, err in results if rc == 2), "score")
    assert "written by another process" in line and "s.layerif-conflict-" in line
    assert out.is_file() and len(list(tmp_path.glob("s.layerif-conflict-*.json"))) == 1


# ----------------------------------------------------------------------------- symlinked outputs


def test_symlinked_out_dir_is_written_through(tmp_path: Path, stories_bin: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The reported case: `--out link --overwrite` replaced the link by a real dir and left `.link.layerif-old-*`."""
    real = tmp_path / "v1"
    assert run_cli(["convert", str(stories_bin), "--out", str(real)], capsys)[0] == 0
    (real / "stale.txt").write_text("from v1\n")
    link = tmp_path / "current"
    link.symlink_to(real)
    rc, err = run_cli(["convert", str(stories_bin), "--out", str(link)], capsys)
    assert rc == 2 and "--overwrite" in one_error_line(err, "convert")
    assert run_cli(["convert", str(stories_bin), "--out", str(link), "--overwrite"], capsys)[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link is kept
    assert (real / "model.safetensors").is_file() and not (real / "stale.txt").exists()  # its target replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]  # no .current.layerif-old-*


def test_symlinked_out_file_and_dangling_links(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text('{"old": 1}\n')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    check_out_file(link, overwrite=True)
    atomic_write_json(link, {"new": 1})
    assert link.is_symlink() and '"new"' in real.read_text()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "not-yet")
    check_out_dir(dangling)  # its target's directory exists: written through
    with atomic_dir(dangling) as tmp:
        (tmp / "a").write_text("1")
    assert dangling.is_symlink() and (tmp_path / "not-yet" / "a").is_file()
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "no" / "such" / "dir")
    with pytest.raises(ConfigError, match="is a symlink to .* does not exist"):
        check_out_dir(broken, option="--out")
    (tmp_path / "emptydir").mkdir()
    to_empty = tmp_path / "to-empty"
    to_empty.symlink_to(tmp_path / "emptydir")
    check_out_dir(to_empty)  # an empty directory behind the link is fine, before the work
    with atomic_dir(to_empty) as tmp:
        (tmp / "a").write_text("1")
    assert to_empty.is_symlink() and (tmp_path / "emptydir" / "a").is_file()


# ----------------------------------------------------------------------------- umask


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
        atomic_write_json(tmp_path / "f.json", {"a": 1})
        with atomic_file(tmp_path / "p.png") as tmp:
            tmp.write_bytes(b"\x89PNG\r\n\x1a\n")
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d", tmp_path / "d" / MARKER,
                                                          tmp_path / "d" / "sub", tmp_path / "f.json",
                                                          tmp_path / "p.png")}
    assert mode == {"d": 0o750, MARKER: 0o640, "sub": 0o750, "f.json": 0o640, "p.png": 0o640}


# ----------------------------------------------------------------------------- a full disk / file-size limit

_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    limit = int(sys.argv.pop(1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from layerif_plugins.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # a fresh interpreter (the file-size limit must not apply to the test process)
def test_file_too_large_while_saving_is_one_line(tmp_path: Path, stories_bin: Path) -> None:
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", _LIMITED, "200000", "convert", str(stories_bin), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr, "convert")
    assert "file size limit" in line and str(out) in line and "bytes" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing at --out, no temp dir


# ----------------------------------------------------------------------------- SIGTERM reaches every worker


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            out.append(int(entry.name))
    return out


@pytest.mark.slow  # three interpreters (parent, two gloo workers) import torch
def test_sigterm_to_score_nproc_2_stops_every_worker(tmp_path: Path, stories_dir: Path,
                                                     tinystories_train: Path, tinystories_valid: Path) -> None:
    """The reported case: the parent exited 143 and both orphaned workers wrote --out a minute later."""
    ck, out, err = tmp_path / "ck", tmp_path / "s.json", tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "layerif_plugins.cli", "score", "--model", str(stories_dir),
            "--train", str(tinystories_train), "--val", str(tinystories_valid), "--n-train", "2000", "--n-val", "64",
            "--max-length", "64", "--quiet", "--nproc", "2", "--checkpoint-dir", str(ck), "--out", str(out)]
    with err.open("w") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=fh, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (ck / "meta.json").exists():  # the workers are inside the engine
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        assert len(_processes_mentioning(str(out))) == 3  # the parent and its two workers
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert rc == 143, text
    assert lines[-1].startswith("layerif score: error: terminated"), lines[-3:]
    assert sum(": error: " in line for line in lines) == 1 and "Traceback" not in text, text
    assert _processes_mentioning(str(out)) == []  # every worker has exited when the parent reports
    time.sleep(3)
    assert not out.exists() and not list(tmp_path.glob("*.layerif-conflict-*"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# ----------------------------------------------------------------------------- refused before the work, not after


def test_checkpoint_dir_equal_to_out_is_refused_before_the_work(tmp_path: Path, stories_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    rc, err = run_cli(["score", "--model", str(stories_dir), "--method", "uniform", "--checkpoint-dir", str(ck),
                       "--out", str(ck)], capsys)
    assert rc == 2 and "overlap" in one_error_line(err, "score")
    assert sorted(tmp_path.iterdir()) == []


def test_out_dot_names_the_directory(tmp_path: Path, stories_bin: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` inside an earlier output: that directory's rules apply before the work (ours: --overwrite)."""
    out = tmp_path / "hf"
    assert run_cli(["convert", str(stories_bin), "--out", str(out)], capsys)[0] == 0
    monkeypatch.chdir(out)
    rc, err = run_cli(["convert", str(stories_bin), "--out", "."], capsys)
    assert rc == 2 and "--overwrite" in one_error_line(err, "convert")
    assert run_cli(["convert", str(stories_bin), "--out", ".", "--overwrite"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    assert (out / MARKER).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.slow  # three interpreters import torch
def test_score_nproc_2_bad_input_is_one_line_and_good_input_matches_one_process(
        tmp_path: Path, stories_dir: Path, tinystories_valid: Path) -> None:
    common = ["--model", str(stories_dir), "--train", str(tinystories_valid), "--val", str(tinystories_valid),
              "--n-val", "3", "--max-length", "24", "--quiet", "--params", "attn", "--dtype", "float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "layerif_plugins.cli", "score", *common, "--n-train", "999999",
                          "--nproc", "2", "--out", str(tmp_path / "bad.json")], capture_output=True, text=True,
                         env=env, timeout=400)
    assert bad.returncode == 2, bad.stderr
    line = one_error_line(bad.stderr, "score")  # every rank reports it; printed once, no launcher traceback
    assert "asked for 999999 examples" in line
    two = tmp_path / "two.json"
    good = subprocess.run([sys.executable, "-m", "layerif_plugins.cli", "score", *common, "--n-train", "6",
                           "--nproc", "2", "--out", str(two)], capture_output=True, text=True, env=env, timeout=400)
    assert good.returncode == 0, good.stderr
    one = tmp_path / "one.json"
    assert main(["score", *common, "--n-train", "6", "--out", str(one)]) == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["params"]["world_size"] == 2
    assert b["scores"] == pytest.approx(a["scores"], rel=1e-9)


def test_wrote_tells_what_this_process_put_in_place(tmp_path: Path) -> None:
    from layerif_plugins.io import wrote

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with atomic_dir(ours) as tmp:
        (tmp / "a").write_text("1")
    theirs.mkdir()
    assert wrote(ours) and not wrote(theirs) and not wrote(tmp_path / "missing")
    with pytest.raises(ConfigError), atomic_dir(theirs.with_name("late")) as tmp:
        theirs.rename(tmp_path / "late")  # another process's result took the place meanwhile
    assert not wrote(tmp_path / "late")
