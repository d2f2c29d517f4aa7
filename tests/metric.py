"""This process's Prometheus metrics, read through the public registry, the
way a scrape would see them (not through a metric object's internals)."""

from __future__ import annotations

from prometheus_client import REGISTRY


def value(name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels; 0 if never set.
    Counters are named with their ``_total`` suffix."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def bad_input(where: str, kind: str) -> float:
    """relayd_bad_input_total for one place and kind."""
    return value("relayd_bad_input_total", where=where, kind=kind)
