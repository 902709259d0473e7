"""The console: our own lines and bars on the terminal, host libraries' logs in a log file, everything restored.

The routing tests use the real hosts' loggers (loguru as llm-compressor uses it, transformers'
logging, Python warnings, tqdm); a host *print* is a function compiled with a host module's
``__name__`` (``transformers.fake_host``), because the router decides by the writing module.
The command tests run the real `layerif prune` (llm-compressor's oneshot) and `layerif demo`.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest

from layerif_plugins.console import host_output


def _host_function(source: str, module: str = "transformers.fake_host"):
    """A function whose code belongs to ``module`` (the router looks at the writing module's name)."""
    namespace: dict = {"__name__": module}
    exec(compile(source, f"<{module}>", "exec"), namespace)  # noqa: S102 - test code, fixed source
    return namespace["run"]


def _loguru_ids() -> set[int]:
    from loguru import logger

    return set(logger._core.handlers)


def test_host_output_routes_hosts_to_the_log_and_restores_everything(tmp_path: Path, capsys):
    import transformers  # noqa: F401 - configures its library logger, as in every command
    from loguru import logger
    from tqdm.auto import tqdm

    user_sink = io.StringIO()
    sink = logger.add(user_sink, format="{message}")
    tf_logger = logging.getLogger("transformers")
    before = (list(tf_logger.handlers), tf_logger.propagate, list(warnings.filters), _loguru_ids())
    streams = (sys.stdout, sys.stderr, warnings.showwarning)
    host = _host_function("def run():\n    print('host print')\n"
                          "    from tqdm import tqdm\n    for _ in tqdm(range(3), desc='host bar'):\n        pass\n")
    log = tmp_path / "logs" / "hosts.log"
    try:
        with host_output(log) as path:
            assert path == log
            logger.info("loguru record inside")
            logging.getLogger("transformers.modeling_utils").warning("transformers warning inside")
            host()
            print("our line")
            for _ in tqdm(range(2), desc="our bar"):
                pass
            warnings.simplefilter("ignore")  # a host changing the filters while captured
        logger.info("loguru record after")
    finally:
        logger.remove(sink)
    text = log.read_text()
    for expected in ("loguru record inside", "transformers warning inside", "host print", "host bar"):
        assert expected in text
    assert "our line" not in text and "our bar" not in text and "loguru record after" not in text
    out, err = capsys.readouterr()
    console = out + err
    assert "our line" in out and "our bar" in err
    for host_line in ("host print", "host bar", "transformers warning inside", "loguru record inside"):
        assert host_line not in console
    assert user_sink.getvalue() == "loguru record after\n"  # the user's sink was set aside, then back
    assert (list(tf_logger.handlers), tf_logger.propagate, list(warnings.filters)) == before[:3]
    assert _loguru_ids() == before[3] - {sink}
    assert (sys.stdout, sys.stderr, warnings.showwarning) == streams


def test_nested_captures_restore_the_outer_one(tmp_path: Path):
    outer, inner = tmp_path / "outer.log", tmp_path / "inner.log"
    tf_logger = logging.getLogger("transformers.generation")
    with host_output(outer):
        tf_logger.warning("to the outer log")
        with host_output(inner):
            tf_logger.warning("to the inner log")
        tf_logger.warning("outer again")
    assert outer.read_text().count("\n") == 2 and "outer again" in outer.read_text()
    assert "to the inner log" in inner.read_text() and "to the inner log" not in outer.read_text()


def test_verbose_sends_host_logs_to_stderr(capsys):
    from loguru import logger

    with host_output(None, verbose=True) as path:
        assert path is None
        logging.getLogger("transformers.tokenization_utils_base").warning("Token indices sequence length")
        logger.warning("Sparsifying model.layers.0")
    out, err = capsys.readouterr()
    assert "Token indices sequence length" in err and "Sparsifying model.layers.0" in err
    assert "Sparsifying" not in out


def _console_lines(text: str) -> list[str]:
    """Non-blank lines as a terminal shows them: a bar redraws its line after each carriage return."""
    lines = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return [line for line in lines if line.strip()]


@pytest.mark.slow
@pytest.mark.integration
def test_prune_prints_a_handful_of_lines_and_logs_llmcompressor(stories_dir: Path, tinystories_train: Path,
                                                               tmp_path: Path, monkeypatch, capsys):
    """`layerif prune`: the table and one summary line; llm-compressor's per-module lines are in the log."""
    import llmcompressor  # noqa: F401 - its import configures loguru (a stdout sink)

    from layerif_plugins.cli import main

    monkeypatch.setenv("LAYERIF_HOME", str(tmp_path / "home"))
    loguru_before = _loguru_ids()
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(stories_dir), "--allocation", "uniform", "--sparsity", "0.5",
                 "--calib", str(tinystories_train), "--n-calib", "8", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    lines = _console_lines(stdout + stderr)
    n_layers = 5
    assert len(lines) <= n_layers + 6, lines  # table (header, rule, layers, mean) + summary + where the log is
    assert not any("Sparsifying" in line or "METRIC" in line or "Calibrating" in line for line in lines)
    log = out / "logs" / "layerif-prune.log"
    assert f"library logs in {log}" in stderr
    text = log.read_text()
    assert "Sparsifying model.layers.0.self_attn.q_proj" in text and "Calibrating" in text
    assert _loguru_ids() == loguru_before  # llm-compressor's own sinks are back
    assert not list((tmp_path / "home" / "logs").glob("*.log"))  # the log moved under --out


@pytest.mark.slow
@pytest.mark.integration
def test_demo_prints_its_own_lines_and_logs_the_hosts(tmp_path: Path, monkeypatch, capfd):
    """`layerif demo` (small settings): one line per stage and model; host logs in ``logs/``.

    Captured at the file-descriptor level and run outside a git repository: lm-eval runs
    ``git describe`` in a subprocess, whose "fatal: not a git repository" must land in the log too.
    (The full `make demo` prints 46 lines: 43 stage lines and 3 OWL bars.)
    """
    from layerif_plugins.cli import main

    monkeypatch.setenv("LAYERIF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--sparsity", "0.5", "--n-train", "8", "--n-val", "8",
                 "--n-eval-docs", "4", "--n-mc", "8", "--n-calib", "8"]) == 0
    stdout, stderr = capfd.readouterr()
    lines = _console_lines(stdout + stderr)
    # convert, 2 tasks scored, 3 pruned models (2 lines each), 4 evaluations (2 lines each), header, report
    assert len(lines) < 30, "\n".join(lines)
    own = re.compile(r"^\[demo +\d+\.\d+s\] |\d+%\||it/s\]|s/it\]")  # a stage line, or one of our progress bars
    assert all(own.search(line) for line in lines), "\n".join(line for line in lines if not own.search(line))
    assert not any(word in stdout + stderr for word in ("Sparsifying", "METRIC", "Calibrating", "Loading weights"))
    library_log = (out / "logs" / "libraries.log").read_text()
    assert "Sparsifying model.layers.0.self_attn.q_proj" in library_log
    assert "not a git repository" in (out / "logs" / "lm_eval.log").read_text()
