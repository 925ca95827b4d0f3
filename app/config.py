"""Settings shared by the web app, the workers and the CLI (PREFLOOP_* env vars or a .env file)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.paths import STATIC_DIR, TEMPLATES_DIR

DEFAULT_SECRET = "change-me-development-only"
# The default secret is in the source, so anyone who can reach the app could sign an admin's session.
SECRET_KEY_ADVICE = (
    "set PREFLOOP_SECRET_KEY to a long random value "
    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
)

PSEUDONYM_KEY_ADVICE = (
    "set PREFLOOP_PSEUDONYM_KEY to a long random value of its own "
    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFLOOP_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["development", "production", "test"] = "development"
    data_dir: Path = Field(default=Path("var"), description="Database file, model registry, exports.")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty means SQLite in data_dir.")
    broker_url: str = Field(
        default="", description="Celery broker; empty means a SQLite-backed kombu broker in data_dir."
    )
    # Per process (each uvicorn worker and Celery child has its own pool); keep the sum of all pools
    # under Postgres's max_connections.
    db_pool_size: int = Field(
        default=20,
        ge=1,
        description="Postgres connections kept per process; a web process also runs this many handlers at once.",
    )
    db_max_overflow: int = Field(default=10, ge=0, description="Extra connections under bursts.")
    # Each holds a statement for about a millisecond, so a few serve hundreds of requests a second.
    db_hot_pool_size: int = Field(
        default=6,
        ge=0,
        description="Postgres connections per web process that run annotators' next-task and submit "
        "statements (API and UI) on the event loop; 0 runs them in worker threads like other requests.",
    )
    auth_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a web process trusts a verified login or token before reading the user "
        "again; logout elsewhere, role changes and deactivation take effect within this. 0: every request.",
    )
    api_token_days: int = Field(
        default=90,
        ge=1,
        le=3650,
        description="Days an API token lives unless issued with another lifetime; then it is refused (401).",
    )
    gc_freeze: bool = Field(
        default=True,
        description="Web processes move what they loaded at start-up out of the garbage collector's "
        "generations, so a full collection no longer pauses every request for 70-160 ms.",
    )
    redis_url: str = Field(
        default="", description="Redis for policy wake-up messages; empty disables pub/sub (polling only)."
    )
    secret_key: str = DEFAULT_SECRET
    # Separate from the secret key on purpose: the secret is rotated after a leak, and pseudonyms in
    # published datasets must survive that. Unset outside production, a key is generated once and
    # kept in DATA_DIR/pseudonym.key.
    pseudonym_key: str = Field(
        default="",
        description="Keys the annotator pseudonyms in exports; stable for the deployment's lifetime. "
        "Required in production; otherwise generated once into DATA_DIR/pseudonym.key.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N for training and generation.")
    base_model: Path | None = Field(
        default=None, description="Local HF folder used instead of SmolLM2 by `prefloop init`."
    )
    # Only the worker's generation runs (the task pool) choose; the web playground always uses the built-in
    # generator, which needs neither a GPU nor vLLM and serves one stream at a time.
    generation_engine: Literal["builtin", "vllm", "auto"] = Field(
        default="auto",
        description="What samples task-pool responses on a worker: builtin, vllm (a CUDA GPU with the "
        "vllm package), or auto (vllm where it is installed and a CUDA GPU is the device, builtin elsewhere).",
    )
    generation_vllm_gpu_memory: float = Field(
        default=0.5,
        gt=0,
        le=0.95,
        description="Share of the GPU's memory a vLLM generation run may take (weights and KV cache).",
    )
    serve_policy: bool = Field(
        default=True, description="Load the live policy in the web process (playground, health)."
    )
    # Polling the one-row alias is cheap; it bounds the swap delay when no Redis wake-up arrives.
    policy_poll_seconds: float = 2.0
    # A version that failed to load is tried again after 2, 4, 8 … polls, up to this.
    policy_load_backoff_max_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Longest wait before a web process tries again to load a policy that failed.",
    )
    session_max_age_seconds: int = 14 * 24 * 3600
    assignment_ttl_seconds: int = 30 * 60
    task_overlap: int = 1
    responses_per_task: int = 4
    refill_below: int = 20
    refill_prompts: int = 16
    # A full chat answer from a small model; longer ones are rarely better and cost generation time.
    refill_max_new_tokens: int = 192
    auto_round_min_comparisons: int = 0
    # Runs beat a heartbeat while they work; a running row silent for run_stale_seconds belongs to a
    # dead worker, and maintenance queues it again (it resumes from its last checkpoint).
    run_heartbeat_seconds: float = 10.0
    run_stale_seconds: float = 60.0
    run_max_attempts: int = 3
    # A run or round still queued this long after its task was sent is sent again by maintenance: a
    # send that failed after the row committed would otherwise leave it queued for ever. A duplicate
    # does nothing (the run claims its row), so the only cost of work waiting behind a long GPU job
    # is one spare message per period.
    queued_resend_seconds: float = 600.0
    # Training across processes (workers/runs/launcher.py): what this worker's host offers a stage
    # whose round spec asks for `processes.per_host` > 1 or several hosts.
    train_processes_per_host: int = Field(
        default=0,
        ge=0,
        description="Training processes this host runs for one stage (what processes.per_host=auto "
        "means, and the most a round may ask for); 0: one per CUDA device, 1 without CUDA.",
    )
    train_rdzv_endpoint: str = Field(
        default="",
        description="host:port where the processes of a stage spanning several hosts meet (torchrun's "
        "rendezvous); a port free on that host. Empty: a free local port (one host only).",
    )
    train_launcher_prefix: str = Field(
        default="",
        description="Command that starts the same command once on every host of a multi-host stage, "
        "e.g. `srun --nodes=2 --ntasks-per-node=1`; torchrun's command follows it. Empty: this host only.",
    )
    train_cancel_grace_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a cancelled multi-process stage may take to stop at its next step before "
        "its processes are killed.",
    )
    # Celery soft time limits per task kind; the soft limit fails the run with the reason recorded,
    # and the hard limit (5 % later, at least 30 s) kills a child that did not heed it. Long work is
    # training, evaluation, generation and rounds; the broker's visibility timeout stays above them.
    long_task_time_limit_seconds: int = 36 * 3600
    export_task_time_limit_seconds: int = 2 * 3600
    maintenance_task_time_limit_seconds: int = 120
    # Quality control (app/quality).
    # One assignment in twenty is a gold task: enough to measure each annotator within a few dozen
    # tasks while costing little of their time.
    gold_share: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Share of assignments that are gold tasks."
    )
    # Gold tasks are chosen clear-cut, so careful annotators put the known best response on top far
    # more often than chance (1/K, 25% for K=4); below 60% the judgements look careless or adversarial.
    gold_min_accuracy: float = Field(
        default=0.6, ge=0.0, le=1.0, description="Gold accuracy under which an annotator is flagged."
    )
    # A single miss must not flag anyone: judge only after this many answered gold tasks.
    gold_min_answers: int = Field(default=5, ge=1, description="Answered gold tasks before flagging.")
    # Flagged annotators' comparisons stay in the database but leave training data and exports.
    exclude_flagged_annotators: bool = Field(
        default=True, description="Drop flagged annotators' comparisons from training and exports."
    )
    # Gold tasks are shown to every annotator once, so their annotation cap is set this high.
    gold_max_annotations: int = Field(default=100_000, ge=1, description="Annotation cap of a gold task.")
    # Disk: what maintenance deletes (`prefloop cleanup` shows it first with --dry-run), and the free
    # space below which no run starts.
    export_retention_days: float = Field(
        default=30.0, ge=0, description="Export archives older than this are deleted; 0 keeps them for ever."
    )
    failed_checkpoint_retention_hours: float = Field(
        default=24.0,
        ge=0,
        description="Checkpoints of failed or cancelled runs are deleted this long after the run ended.",
    )
    partial_file_retention_hours: float = Field(
        default=6.0,
        ge=0,
        description="Half-written export archives (.zip-partial) older than this are deleted.",
    )
    keep_rejected_candidates: int = Field(
        default=5,
        ge=0,
        description="Folders of the newest N rejected candidate policies are kept, older ones deleted.",
    )
    min_free_disk_gb: float = Field(
        default=2.0,
        ge=0,
        description="No run starts while the data dir's disk has less free space; 0: no check.",
    )
    # Workers and the embedded supervisor.
    worker_heartbeat_seconds: float = Field(
        default=10.0, gt=0, description="How often each Celery worker records that it is alive."
    )
    worker_stale_seconds: float = Field(
        default=45.0,
        gt=0,
        description="A worker silent this long counts as dead in /healthz and the console.",
    )
    worker_status_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a web process reuses its reading of worker liveness and queues.",
    )
    # `prefloop serve` restarts a worker that died, waiting 1, 2, 4 … seconds (up to the maximum);
    # after several deaths in a row each soon after its start, it stops everything and exits non-zero,
    # so a process manager (systemd, Docker) restarts the whole stack or a person looks.
    worker_restart_backoff_seconds: float = Field(
        default=1.0, gt=0, description="First wait before restarting a dead worker; doubles each time."
    )
    worker_restart_backoff_max_seconds: float = Field(
        default=60.0, gt=0, description="Longest wait before restarting a dead worker."
    )
    worker_fast_failure_seconds: float = Field(
        default=60.0, ge=0, description="A worker that dies sooner than this after its start failed fast."
    )
    worker_max_fast_failures: int = Field(
        default=5, ge=1, description="Fast failures in a row after which `prefloop serve` gives up (exit 1)."
    )
    # Request bodies (app/web/body_limits.py): checked against Content-Length and while streaming,
    # before the app parses them (and before any role or CSRF check, which need the parsed body).
    # Not signed in, the login form is all a caller may send: a 1024-character password, percent-
    # encoded, stays under 13 KiB.
    max_anonymous_body_bytes: int = Field(
        default=32 * 1024, ge=1024, description="Largest request body from a caller who is not signed in."
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest request body from a signed-in caller."
    )
    # A few hundred thousand prompts; larger sets go in several files.
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest prompt-set file an admin may upload."
    )
    # Rate limits (app/web/rate_limits.py), in the `limits` notation: "N/second|minute|hour|day",
    # several separated by ";", or "off". Counters live in Redis (redis_url) when set, else in the process.
    # Login: every attempt counts per client address, before the password is checked (so a flood
    # never reaches argon2), failed ones per username; the hourly tier makes a guesser wait longer.
    # An office shares one address, but sessions last two weeks: logins are rare for each person.
    login_rate_limit_per_ip: str = Field(
        default="60/minute;1000/hour", description="Login attempts per client address."
    )
    login_failure_limit_per_user: str = Field(
        default="5/minute;20/hour", description="Failed logins per username before it must wait."
    )
    # A careful annotator reads several responses per task: well under one task every 2 seconds.
    task_request_rate_limit: str = Field(
        default="60/minute;1200/hour", description="Next-task requests per annotator (page, htmx, API)."
    )
    submission_rate_limit: str = Field(
        default="60/minute;1200/hour", description="Judgements and skips submitted per annotator."
    )
    # Argon2 takes 64 MiB and tens of milliseconds per login: a flood of logins must not take the
    # thread pool every other request needs, so logins verify passwords on threads of their own.
    login_concurrency: int = Field(default=2, ge=1, description="Password checks running at once.")
    health_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long /healthz reuses its last check (0: check every time)."
    )
    templates_dir: Path = TEMPLATES_DIR
    static_dir: Path = STATIC_DIR

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.environment == "production" and self.secret_key == DEFAULT_SECRET:
            raise ValueError(
                f"PREFLOOP_SECRET_KEY is still the development default; {SECRET_KEY_ADVICE} "
                "before running in production."
            )
        if self.environment == "production" and len(self.secret_key) < 32:
            raise ValueError("PREFLOOP_SECRET_KEY must be at least 32 characters in production.")
        if self.environment == "production":
            self._check_pseudonym_key()
        return self

    def _check_pseudonym_key(self) -> None:
        if not self.pseudonym_key:
            raise ValueError(
                f"PREFLOOP_PSEUDONYM_KEY is unset; {PSEUDONYM_KEY_ADVICE} before running in production. "
                "Keep it for the deployment's lifetime: a new key changes every annotator pseudonym."
            )
        if len(self.pseudonym_key) < 32:
            raise ValueError("PREFLOOP_PSEUDONYM_KEY must be at least 32 characters in production.")
        if self.pseudonym_key == self.secret_key:
            raise ValueError(
                "PREFLOOP_PSEUDONYM_KEY must differ from PREFLOOP_SECRET_KEY: the secret is rotated after "
                f"a leak, the pseudonym key must not be; {PSEUDONYM_KEY_ADVICE}."
            )

    @field_validator(
        "login_rate_limit_per_ip",
        "login_failure_limit_per_user",
        "task_request_rate_limit",
        "submission_rate_limit",
    )
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        from limits import parse_many

        if value.strip().lower() == "off":
            return value
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate limit; write e.g. '30/minute', '5/minute;20/hour' or 'off'"
            ) from None
        return value

    @property
    def uses_default_secret(self) -> bool:
        return self.secret_key == DEFAULT_SECRET

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def registry_dir(self) -> Path:
        return self.resolved_data_dir / "registry"

    @property
    def runs_dir(self) -> Path:
        return self.resolved_data_dir / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.resolved_data_dir / "exports"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url.replace("postgres://", "postgresql+psycopg://", 1).replace(
                "postgresql://", "postgresql+psycopg://", 1
            )
        return f"sqlite:///{self.resolved_data_dir / 'prefloop.db'}"

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        # kombu's SQLAlchemy transport: a real broker with no server to run (embedded default).
        return f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def is_embedded(self) -> bool:
        return not self.broker_url

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def training_processes_per_host(self) -> int:
        """What this host offers one training stage: the setting, or one process per CUDA device."""
        if self.train_processes_per_host:
            return self.train_processes_per_host
        if self.device == "cpu":
            return 1
        import torch  # only a worker asks; the web process never does

        return max(1, torch.cuda.device_count())


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def default_secret_refusal(host: str) -> str:
    """Why the app will not serve on `host` with the development secret, and what to do instead."""
    return (
        f"refusing to serve on {host}: PREFLOOP_SECRET_KEY is the development default, which is "
        f"public, so anyone who can reach this address could forge an admin's session; {SECRET_KEY_ADVICE}, "
        "or bind to 127.0.0.1."
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (the CLI and tests change env vars before the app starts)."""
    get_settings.cache_clear()
