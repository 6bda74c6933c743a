"""The nightly checks (docs/testing.md): deeper repeats of checks the default run makes in a lighter form, run only
with ``PERSONALIZATION_NIGHTLY=1``. Whole tests carry ``@pytest.mark.nightly`` (conftest skips them); a test
parametrised by a shared fixture (a family) skips its deeper cases with :func:`only_nightly`."""
from __future__ import annotations

import os

import pytest

#: set to 1 to run the nightly checks too
NIGHTLY = "PERSONALIZATION_NIGHTLY"


def nightly() -> bool:
    return os.environ.get(NIGHTLY) == "1"


def only_nightly(why: str) -> None:
    """Skip the running test case outside the nightly run; ``why`` says what the default run checks instead."""
    if not nightly():
        pytest.skip(f"nightly check ({why}): run with {NIGHTLY}=1")
