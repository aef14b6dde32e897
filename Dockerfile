# The bone-age service on the bundled model. Installs exactly what the README's run command
# installs (`pip install -e '.[serve]'`); the GPU profile adds the CUDA runtime wheels.
FROM python:3.11-slim

ARG EXTRAS=serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 boneage
WORKDIR /srv/boneage

COPY pyproject.toml README.md ./
COPY radiograph ./radiograph
COPY app ./app
COPY export ./export
COPY training ./training
COPY models ./models
RUN pip install -e ".[${EXTRAS}]"

USER boneage
EXPOSE 8000
# uvicorn's default SIGTERM handling lets in-flight requests finish before the lifespan drains the queue.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
