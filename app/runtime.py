"""What the lifespan builds and the handlers use: model, batcher, worker pool, metrics."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

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
    #: Bounds explanations in progress (BONEAGE_EXPLAIN_CONCURRENCY): each one is many model inputs.
    explaining: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
