"""What the lifespan builds and the handlers use: model, batcher, worker pool, metrics."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

from app.batching import Batcher
from app.config import Settings
from app.inference import Model
from app.metrics import Metrics


@dataclass
class Runtime:
    settings: Settings
    model: Model
    batcher: Batcher
    pool: Executor
    metrics: Metrics
    ready: bool = False
