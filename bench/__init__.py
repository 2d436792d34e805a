"""
The benchmarks (`make bench`, `python -m bench`) and single-property
scripts (`python bench/rss_tunnel.py`, ...).

C{proxyproc} is the test support's process module
(C{tests/support/proxyproc.py}), so starting and synchronising with a proxy
exists once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import proxyproc  # noqa: E402

__all__ = ["proxyproc"]
