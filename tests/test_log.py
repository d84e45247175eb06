"""shared.log: one logger for the commands, rank-aware: rank 0 says what the run does, other ranks only warn."""

from __future__ import annotations

import logging

import pytest
from cogtune.shared.log import QUIET, VERBOSE, setup_logging, verbosity


@pytest.fixture(autouse=True)
def restore_logger():
    yield
    logging.getLogger("cogtune").handlers.clear()


def test_info_goes_to_stdout_and_warnings_to_stderr_prefixed(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging("cogtrain")
    log = logging.getLogger("cogtune.train.something")
    log.debug("hidden at the default level")
    log.info("step %d", 3)
    log.warning("disk %s", "low")
    out, err = capsys.readouterr()
    assert out == "cogtrain: step 3\n"
    assert err == "cogtrain: warning: disk low\n"


def test_other_ranks_only_warn_and_say_which_rank_they_are(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    setup_logging("cogtrain", VERBOSE)
    log = logging.getLogger("cogtune.train.something")
    log.info("said once, by rank 0")
    log.debug("also rank 0's")
    log.error("broken")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "cogtrain [rank 3]: error: broken\n"


def test_quiet_keeps_warnings_and_a_second_setup_replaces_the_first(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging("cogprep")
    setup_logging("cogtrain", verbosity(quiet=True, verbose=False))
    assert verbosity(quiet=True, verbose=False) == QUIET and verbosity(quiet=False, verbose=True) == VERBOSE
    log = logging.getLogger("cogtune.x")
    log.info("not shown")
    log.warning("shown once")
    out, err = capsys.readouterr()
    assert out == "" and err == "cogtrain: warning: shown once\n"


def test_a_warning_every_rank_meets_alike_is_said_by_rank_0_alone(capsys, monkeypatch):
    from cogtune.shared.log import MAIN_ONLY

    for rank, said in (("1", ""), ("0", "cogtrain: warning: stopped\n")):
        monkeypatch.setenv("RANK", rank)
        setup_logging("cogtrain")
        logging.getLogger("cogtune.train").warning("stopped", extra=MAIN_ONLY)
        assert capsys.readouterr().err == said


def test_what_rich_draws_follows_the_level_and_the_rank(monkeypatch):
    from cogtune.shared.log import NORMAL, shown

    for rank, level, info, warning in (("0", NORMAL, True, True), ("0", QUIET, False, True),
                                       ("1", VERBOSE, False, True)):
        monkeypatch.setenv("RANK", rank)
        setup_logging("cogprep", level)
        assert (shown(), shown(logging.WARNING)) == (info, warning), (rank, level)
