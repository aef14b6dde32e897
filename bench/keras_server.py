"""The per-request approach, for comparison only: a synchronous endpoint running Keras ``predict``
on one image per request (no batching, no ONNX Runtime). Benchmark code, not part of the service.

    BENCH_KERAS_MODEL=runs/NAME/best.keras uvicorn bench.keras_server:app

Without ``BENCH_KERAS_MODEL`` it builds the same Xception architecture at the bundled model's
input size with untrained weights: the cost per request does not depend on the weights.
"""

from __future__ import annotations

import os
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile

from app.config import BUNDLED_MODEL
from export.modelfile import open_session
from radiograph import load_model_input

_, _modelfile = open_session(os.environ.get("BENCH_SPEC_MODEL", BUNDLED_MODEL))
spec = _modelfile.spec

import keras  # noqa: E402  (after reading the spec: TensorFlow start-up is slow)

if os.environ.get("BENCH_KERAS_MODEL"):
    model = keras.models.load_model(os.environ["BENCH_KERAS_MODEL"])
else:
    from training.model import build_model

    model = build_model(spec.input_size)
model.predict(
    {"image": np.zeros((1, spec.input_size, spec.input_size, 3), np.float32), "sex": np.zeros((1, 1), np.float32)},
    verbose=0,
)

app = FastAPI()


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


@app.post("/v1/bone-age")
def bone_age(image: Annotated[UploadFile, File()], sex: Annotated[str, Form()]) -> dict:
    """Decode, preprocess and predict one image, synchronously, per request."""
    tensor, _ = load_model_input(image.file.read(), spec)
    male = np.array([[1.0 if sex.lower() in ("male", "m") else 0.0]], np.float32)
    months = model.predict({"image": tensor[None], "sex": male}, verbose=0)
    return {"bone_age_months": round(float(np.asarray(months).reshape(-1)[0]), 1)}
