"""A signal decides the exit code even when a host library turns its exception into another one.

llm-compressor 0.14's ``SequentialPipeline`` tracer (``auto_wrapper.visit_Call``) evaluates
with ``try / except Exception / finally`` and reads a variable in ``finally`` that a
``KeyboardInterrupt`` left unbound: the Ctrl-C surfaces as ``UnboundLocalError``. The CLI
must still exit 130 (143 for SIGTERM) with its one line, not a traceback and exit 1.
"""

from __future__ import annotations

import signal

import pytest

from layerif_plugins.cli import Terminated, _exit_code, _signals_raise


def _host_code_that_loses_the_signal(signum: int) -> None:
    """The upstream pattern: the signal lands in the ``try``; ``finally`` then reads an unbound name."""
    try:
        signal.raise_signal(signum)
        caller = 1
    except Exception:
        caller = None
    finally:
        if caller is not None:  # noqa: B012 - the host's bug, reproduced on purpose
            pass


@pytest.fixture
def terminal_sigint():
    """SIGINT as a terminal delivers it (Python's KeyboardInterrupt handler), also when the test run itself was
    started with SIGINT ignored (a background job, ``nohup``), where the CLI rightly keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("terminal_sigint")
@pytest.mark.parametrize(("signum", "code", "words"), [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                        (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_replaced_by_another_exception_still_exits_with_its_code(
        signum: int, code: int, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    received: list[int] = []
    with pytest.raises(UnboundLocalError) as caught, _signals_raise(received):
        _host_code_that_loses_the_signal(signum)
    assert received == [signum]
    assert _exit_code("layerif plan", caught.value, received) == code
    assert capsys.readouterr().err == f"layerif plan: error: {words}; nothing half-written was left behind\n"


@pytest.mark.usefixtures("terminal_sigint")
def test_handlers_are_restored_and_an_ignored_sigint_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _signals_raise([]):
        assert signal.getsignal(signal.SIGTERM) is not before[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `nohup`, a background job
    try:
        received: list[int] = []
        with _signals_raise(received):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored: nothing raised, nothing recorded
        assert received == []
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_unrelated_bug_without_a_signal_is_not_ours_to_hide() -> None:
    assert _exit_code("layerif plan", ValueError("a bug"), []) is None
    assert _exit_code("layerif plan", Terminated(15), []) == 143
