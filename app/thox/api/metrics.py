"""Prometheus metrics for /metrics (a registry per app, so tests can run
several apps in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


# request methods counted under their own name; any other is counted as "other"
HTTP_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    @staticmethod
    def method_label(method: str) -> str:
        return method if method in HTTP_METHODS else "other"

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("thox_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.tokens = Counter("thox_tokens_generated", "Completion tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("thox_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.ttft = Histogram("thox_time_to_first_token_seconds", "Time from request to first token",
                              ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("thox_queue_depth", "Requests running or waiting per model", ["model"],
                                 registry=r)
        self.loaded = Gauge("thox_model_loaded", "1 when the model is resident", ["model"], registry=r)
        self.disconnects = Counter("thox_client_disconnects", "Generations stopped by client disconnect",
                                   registry=r)

    def track_slots(self, source: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Export ``thox_slots{model,state}`` (busy, idle) from ``source()``
        ({model: {"busy": n, "idle": n}}), read at each scrape."""
        self.registry.register(_Slots(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Slots:
    def __init__(self, source: Callable[[], dict[str, dict[str, int]]]):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("thox_slots", "Generation slots per model, by state", labels=["model", "state"])
        for model, st in self.source().items():
            for state in ("busy", "idle"):
                g.add_metric([model, state], st.get(state, 0))
        yield g
