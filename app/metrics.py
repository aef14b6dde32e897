"""Prometheus metrics, one registry per app instance (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "boneage_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "boneage_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "boneage_batch_size",
            "Images per ONNX Runtime call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "boneage_in_flight",
            "Prediction requests inside the service (uploading, preprocessing, queued, predicting)",
            registry=self.registry,
        )
        self.refused = Counter(
            "boneage_refused", "Prediction requests refused at the door (service full)", registry=self.registry
        )
        self.out_of_distribution = Counter(
            "boneage_out_of_distribution",
            "Images refused as not ratable (colour photograph, or features unlike the training radiographs)",
            registry=self.registry,
        )
        self.queue_depth = Gauge("boneage_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.queue_wait = Histogram(
            "boneage_queue_wait_seconds",
            "Time from queued to batch start",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "boneage_inference_seconds", "ONNX Runtime time per batch", buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.batch_size.observe(size)
        for wait in waits:
            self.queue_wait.observe(wait)
        self.inference.observe(seconds)
