"""What the server exposes at /metrics, in the Prometheus text format (as vLLM's own server does).

    alignloop_requests_total{kind, outcome}         chat | regenerate | compare | rank; ok | error | stopped
    alignloop_time_to_first_token_seconds           histogram, streamed replies
    alignloop_decode_tokens_per_second              histogram, per reply: tokens after the first / their time
    alignloop_generated_tokens_total{version}       completion tokens by model version
    alignloop_feedback_total{kind}                  rating | comparison | ranking | demonstration (stored)
    alignloop_version_info{role, version}           1 for the live and the candidate version

Each server process has its own registry (tests start several in one process).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ServingMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 100, 200, 500)


class ServingMetrics:
    """Counters and histograms of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alignloop_requests", "Generation requests by kind and outcome.",
                                ["kind", "outcome"], registry=r)
        self.ttft = Histogram("alignloop_time_to_first_token_seconds", "Time from request to the first streamed token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_rate = Histogram("alignloop_decode_tokens_per_second",
                                     "Per reply: completion tokens after the first, per second.",
                                     buckets=_RATE_BUCKETS, registry=r)
        self.tokens = Counter("alignloop_generated_tokens", "Completion tokens generated, by model version.",
                              ["version"], registry=r)
        self.feedback = Counter("alignloop_feedback", "Feedback events stored, by kind.", ["kind"], registry=r)
        self.version = Gauge("alignloop_version_info", "1 for the version serving each role.", ["role", "version"],
                             registry=r)
        self._shown: dict[str, str] = {}

    def request(self, kind: str, outcome: str) -> None:
        self.requests.labels(kind=kind, outcome=outcome).inc()

    def reply(self, version: str, completion_tokens: int, ttft_s: float | None, total_s: float) -> None:
        """One finished reply: its tokens, time to first token and decode rate."""
        if completion_tokens > 0:
            self.tokens.labels(version=version).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if completion_tokens > 1 and total_s > ttft_s:
                self.decode_rate.observe((completion_tokens - 1) / (total_s - ttft_s))

    def stored(self, kind: str) -> None:
        self.feedback.labels(kind=kind).inc()

    def serving(self, role: str, version: str | None) -> None:
        """Which version serves `role` (live, candidate) now; the old label goes away."""
        old = self._shown.pop(role, None)
        if old is not None:
            self.version.remove(role, old)
        if version is not None:
            self.version.labels(role=role, version=version).set(1)
            self._shown[role] = version

    def render(self) -> bytes:
        return generate_latest(self.registry)
