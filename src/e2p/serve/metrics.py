"""Prometheus metrics, in a registry of their own (several apps can live in one process, e.g. in tests)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("e2p_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("e2p_request_latency_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("e2p_batch_size", "rows in the running batch when it starts or rows join it", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("e2p_batch_seconds", "seconds a request spends in the running batch (prefill to last token)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("e2p_queue_depth", "requests waiting for the batcher", registry=r)
        self.generated_tokens = Counter("e2p_generated_tokens", "completion tokens returned", registry=r)
        self.rejected = Counter("e2p_rejected", "requests refused before generation, by reason", ["reason"], registry=r)
        self.personalized = Counter("e2p_generations", "generation requests by embedding source", ["source"], registry=r)
        # per tenant (never per user): where a request's time goes, as operators of vLLM and LoRAX read it
        self.queue_seconds = Histogram("e2p_queue_seconds", "seconds a request waited before its row joined the batch",
                                       ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("e2p_time_to_first_token_seconds",
                                             "seconds from a request's submission to its first generated token",
                                             ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("e2p_time_per_output_token_seconds",
                                               "seconds per generated token after the first, per request",
                                               ["tenant"], buckets=TOKEN_BUCKETS, registry=r)
        self.store_writes = Counter("e2p_store_writes", "embedding store writes by operation", ["op"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
