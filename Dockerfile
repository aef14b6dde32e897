# The bone-age service on the bundled model, as a non-root user on a read-only filesystem.
#
#   docker build -t boneage:cpu .                                        # CPU: plain ONNX Runtime (small)
#   docker build --build-arg EXTRAS=serve,gpu -t boneage:gpu .           # NVIDIA GPU: CUDA runtime wheels
#
# BASE_IMAGE: any Debian-like image with Python 3.11 and its venv module. The default is the public
# Python image; where no registry is reachable, scripts/build-base-image.sh builds one locally.
ARG BASE_IMAGE=python:3.11-slim

# Build stage: the virtual environment, without what a service never runs (pip itself, bytecode
# caches, test suites, duplicate library copies: scripts/slim-venv.py).
FROM ${BASE_IMAGE} AS build
ARG EXTRAS=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/boneage
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY scripts/slim-venv.py /tmp/
# The project is installed editable, as the README does; its packages are copied in the final stage.
RUN mkdir -p app radiograph export training \
    && touch app/__init__.py radiograph/__init__.py export/__init__.py training/__init__.py \
    && /opt/venv/bin/pip install --no-compile -e ".[${EXTRAS}]" \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && python3 /tmp/slim-venv.py /opt/venv

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 boneage
WORKDIR /srv/boneage
COPY --from=build /opt/venv /opt/venv
COPY pyproject.toml README.md ./
COPY radiograph ./radiograph
COPY app ./app
COPY export ./export
COPY training ./training
COPY models ./models

USER boneage
EXPOSE 8000
# uvicorn's default SIGTERM handling lets in-flight requests finish before the lifespan drains the queue.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
