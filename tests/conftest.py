"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from distnorm.world import _LAUNCHERS

# Every environment variable through which a launcher tells distnorm the world's layout.
LAUNCHER_VARIABLES = [v for _, *variables in _LAUNCHERS for v in variables]


@pytest.fixture
def no_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A test environment without launcher variables (the CI runner may be under one);
    the monkeypatch, to set some."""
    for variable in LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch
