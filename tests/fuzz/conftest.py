"""Shared pieces of the fuzz tests: bounded hypothesis settings and the log check.

Every fuzz test here runs a fixed, small number of examples with a generous per-example
deadline, so the whole folder stays under a minute on a loaded 2-core machine; the point is
breadth of odd input on every run, not a long search. The ext_proc helper module lives in
tests/extproc and goes on sys.path the way that folder's own conftest puts it.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "extproc"))

#: Examples per fuzz test and the per-example deadline (loaded CI machines are slow).
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=10),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    database=None,
)


def assert_no_crash_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No record at ERROR or above, and none carrying a traceback: a routine bad input must
    never be logged as a crash."""
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert not crashes, [f"{r.name}: {r.getMessage()}" for r in crashes]
