"""
A disk that fills up, for the audit log's and the faults' tests.
"""

from __future__ import annotations

import os


class FullDisk:
    """
    C{os.write} on a disk that fills up after C{room} more bytes: a write
    that does not fit writes what fits, the next one fails with ENOSPC.
    """

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        n = min(self.room, len(data))
        self.room -= n
        return os.write(fd, bytes(data[:n]))
