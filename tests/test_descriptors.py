"""
limits.max_connections against the open-file limit (SPEC §2.6): the soft
limit is raised toward the hard one, and when two descriptors per client
connection plus a reserve still do not fit, fewer connections are admitted,
with a warning naming the configured and the effective number.
"""

from __future__ import annotations

import resource
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from codex_proxy.descriptors import RESERVE, connections_fitting, fit_max_connections

INFINITY = resource.RLIM_INFINITY


@pytest.fixture
def warnings() -> Iterator[List[str]]:
    """
    The text of every warning logged while the test runs.
    """
    seen: List[str] = []

    def observer(event: Dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


class Limits:
    """
    A process's C{RLIMIT_NOFILE}, with C{setrlimit} calls recorded and
    raising C{refuse} when set.
    """

    def __init__(self, soft: int, hard: int, refuse: Exception | None = None) -> None:
        self.soft, self.hard = soft, hard
        self.refuse = refuse
        self.set: List[Tuple[int, int]] = []

    def getrlimit(self, which: int) -> Tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: Tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set.append(limits)
        if self.refuse is not None:
            raise self.refuse
        self.soft, self.hard = limits

    def fit(self, max_connections: int) -> int:
        return fit_max_connections(max_connections, self.getrlimit, self.setrlimit)


@pytest.mark.parametrize(
    "wanted, soft, fitting",
    [
        (4096, 256, (256 - RESERVE) // 2),
        (4096, 2 * 4096 + RESERVE, 4096),
        (4096, 2 * 4096 + RESERVE - 1, 4095),
        (4096, INFINITY, 4096),
        (10, 1024, 10),
        (4096, RESERVE + 1, 0),
        (4096, 3, 0),
    ],
)
def test_each_connection_counts_two_descriptors_beside_the_reserve(wanted, soft, fitting):
    assert RESERVE == 32
    assert connections_fitting(wanted, soft) == fitting


def test_the_soft_limit_is_raised_as_far_as_needed(warnings):
    limits = Limits(1024, 1 << 20)
    assert limits.fit(4096) == 4096
    assert limits.set == [(2 * 4096 + RESERVE, 1 << 20)]
    assert warnings == []


def test_an_unlimited_hard_limit_is_raised_to_what_is_needed(warnings):
    limits = Limits(1024, INFINITY)
    assert limits.fit(100) == 100
    assert limits.set == []  # 232 descriptors fit already
    assert limits.fit(1000) == 1000
    assert limits.set == [(2032, INFINITY)]
    assert warnings == []


def test_below_the_hard_limit_the_effective_limit_is_lowered_with_a_warning(warnings):
    limits = Limits(256, 256)
    assert limits.fit(4096) == 112
    assert limits.set == []  # nothing to raise
    assert warnings == [
        "limits.max_connections = 4096 needs 8224 open files but only 256 are"
        " allowed (hard limit 256); admitting at most 112 client connections"
    ]


def test_the_soft_limit_goes_up_to_the_hard_one_before_lowering(warnings):
    limits = Limits(1024, 4096)
    assert limits.fit(4096) == (4096 - RESERVE) // 2
    assert limits.set == [(4096, 4096)]
    assert warnings == [
        "limits.max_connections = 4096 needs 8224 open files but only 4096 are"
        " allowed (hard limit 4096); admitting at most 2032 client connections"
    ]


def test_a_refused_raise_keeps_the_soft_limit_and_says_so(warnings):
    limits = Limits(1024, 1 << 20, refuse=ValueError("not allowed to raise"))
    assert limits.fit(4096) == (1024 - RESERVE) // 2
    assert limits.set == [(8224, 1 << 20)]
    assert warnings == [
        "cannot raise the open-file limit from 1024 to 8224: not allowed to raise",
        "limits.max_connections = 4096 needs 8224 open files but only 1024 are"
        " allowed (hard limit 1048576); admitting at most 496 client connections",
    ]


def test_an_unlimited_soft_limit_is_left_alone(warnings):
    limits = Limits(INFINITY, INFINITY)
    assert limits.fit(4096) == 4096
    assert limits.set == []
    assert warnings == []
