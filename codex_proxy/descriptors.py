"""
Make C{limits.max_connections} fit the process's open-file limit (SPEC §2.6).

Each admitted client connection may hold two descriptors (its own and its
outbound leg). When the soft C{RLIMIT_NOFILE} is too low for that, accepting
fails with C{EMFILE} before the limit is reached, and Twisted drops such a
client with no reply and no audit event. So at start the soft limit is
raised toward the hard one, and if it is still too low the effective limit
is lowered until the 503 (SOCKS5 0x01) and its audit event are reachable.
"""

from __future__ import annotations

import resource
from typing import Callable, Tuple

from twisted.logger import Logger

_log = Logger()

#: Descriptors kept for what is no client connection or outbound leg: the
#: listeners, the reactor's own, log and audit files, resolver threads, the
#: CA files read at a reload.
RESERVE = 32

Limits = Tuple[int, int]


def descriptors_needed(max_connections: int, reserve: int = RESERVE) -> int:
    """
    The open files C{max_connections} client connections may take at once.
    """
    return 2 * max_connections + reserve


def connections_fitting(max_connections: int, soft: int, reserve: int = RESERVE) -> int:
    """
    C{max_connections}, or fewer when their descriptors would exceed a soft
    limit of C{soft} open files (C{RLIM_INFINITY}: no limit); never below 0.
    """
    if soft == resource.RLIM_INFINITY or descriptors_needed(max_connections, reserve) <= soft:
        return max_connections
    return max(0, (soft - reserve) // 2)


def fit_max_connections(
    max_connections: int,
    getrlimit: Callable[[int], Limits] = resource.getrlimit,
    setrlimit: Callable[[int, Limits], None] = resource.setrlimit,
    reserve: int = RESERVE,
) -> int:
    """
    Raise the soft open-file limit as far as C{max_connections} needs (at
    most to the hard limit) and return how many client connections fit
    into it, with a warning naming both numbers when that is fewer.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(max_connections, reserve)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as e:
            _log.warn(
                "cannot raise the open-file limit from {soft} to {wanted}: {error}",
                soft=soft,
                wanted=wanted,
                error=e,
            )
        else:
            soft = wanted
    effective = connections_fitting(max_connections, soft, reserve)
    if effective < max_connections:
        _log.warn(
            "limits.max_connections = {configured} needs {needed} open files but"
            " only {soft} are allowed (hard limit {hard}); admitting at most"
            " {effective} client connections",
            configured=max_connections,
            needed=needed,
            soft=soft,
            hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
            effective=effective,
        )
    return effective
