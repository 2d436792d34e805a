"""
The benchmarks (`make bench`, `python -m bench`) and single-property
scripts (`python bench/rss_tunnel.py`, ...).

C{proxyproc} is the end-to-end layer's process module
(C{tests/e2e/proxyproc.py}), loaded by path under the name the e2e conftest
uses, so starting and synchronising with a proxy exists once.
"""

import importlib.util
import sys
from pathlib import Path

_NAME = "codex_e2e_proxyproc"
_PATH = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "proxyproc.py"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
proxyproc = sys.modules[_NAME]
