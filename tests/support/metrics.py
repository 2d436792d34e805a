"""
Reading a L{codex_proxy.metrics.Metrics} registry as a scraper would: its
exposition parsed with prometheus_client's own parser.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from codex_proxy.metrics import Metrics


def samples(metrics: Metrics) -> Dict[Any, float]:
    """
    Every sample of the exposition, parsed with prometheus_client's own
    parser, keyed by (sample name, sorted labels).
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> Optional[float]:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))
