"""
Hypothesis settings of the parser fuzz tests: a few hundred examples in CI,
many more per round under C{make fuzz} (C{CODEX_FUZZ=1}), which repeats the
rounds, each with a fresh random seed, for C{FUZZ_SECONDS} (10 minutes).
"""

from __future__ import annotations

import os

from hypothesis import settings

#: Set by C{make fuzz}.
FUZZ = os.environ.get("CODEX_FUZZ") == "1"

#: Examples per test and round under C{make fuzz}.
FUZZ_EXAMPLES = 20_000


def fuzz_settings(ci_examples: int) -> settings:
    """
    C{ci_examples} examples in CI, L{FUZZ_EXAMPLES} under C{make fuzz}; no
    deadline either way (a busy CI machine must not fail a correct parser).
    """
    return settings(max_examples=FUZZ_EXAMPLES if FUZZ else ci_examples, deadline=None)
