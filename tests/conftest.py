"""
Suite-wide guard: a test fails if anything logged an unhandled error (a
failed Deferred garbage-collected, an exception in a protocol callback).
"""

from __future__ import annotations

import gc
from typing import Any, Dict, List

import pytest
from twisted.logger import globalLogPublisher

_errors: List[Dict[str, Any]] = []


def _observer(event: Dict[str, Any]) -> None:
    if event.get("log_failure") is not None or event.get("isError"):
        _errors.append(event)


globalLogPublisher.addObserver(_observer)


@pytest.fixture(autouse=True)
def no_logged_errors():
    del _errors[:]
    yield
    # Surface "Unhandled error in Deferred" from this test, then freeze what
    # survives so the next collection only walks objects the next test made.
    gc.collect()
    gc.freeze()
    found, _errors[:] = list(_errors), []
    if found:
        from twisted.logger import formatEvent

        pytest.fail(
            "logged errors:\n"
            + "\n".join(
                formatEvent(e)
                + ("\n" + e["log_failure"].getTraceback() if e.get("log_failure") else "")
                for e in found
            )
        )


@pytest.fixture
def logged_errors() -> List[Dict[str, Any]]:
    """
    The errors logged so far in this test: one that expects an error takes
    it out of this list, and only the others fail the test.
    """
    return _errors


@pytest.fixture(params=[False, True], ids=["whole", "trickle"])
def trickle(request) -> bool:
    """
    Run a wire test twice: data fed whole, and one byte at a time.
    """
    return request.param
