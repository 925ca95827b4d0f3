"""PolicyHolder: follows the live alias, loads new versions off the request path, swaps atomically.

Requests read `holder.current` once and keep that object for their whole duration, so a swap never
disturbs a request already running; a failed load keeps the old model and is reported.
Wake-ups come from Redis pub/sub when configured; polling the alias covers lost messages.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.data.db import read_session
from app.data.models import Policy, PolicyAlias
from app.services.registry import POLICY_CHANNEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPolicy:
    version: int
    path: str
    model: Any = None
    tokenizer: Any = None
    generator: Any = None
    loaded_at: float = field(default_factory=time.time)


def load_policy(version: int, path: str, device: str) -> LoadedPolicy:
    """Load a policy folder, put it on the device, and warm it up with one short generation."""
    # Imported here: torch, transformers and app.inference (which loads torch) stay out of every process
    # that imports this module (the web app, the Celery prefork parent) until a policy is loaded.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.inference.generator import BatchedGenerator
    from app.inference.sampling import SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    generator = BatchedGenerator(model, tokenizer, device=device)
    # Warm-up: the first forward pass allocates caches and (on GPU) picks kernels.
    generator.generate_chat([[{"role": "user", "content": "Hello"}]], SamplingConfig(max_new_tokens=2))
    return LoadedPolicy(version=version, path=path, model=model, tokenizer=tokenizer, generator=generator)


class PolicyHolder:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, load_models: bool | None = None):
        self._sessions = sessions
        self._settings = settings
        self._load_models = settings.serve_policy if load_models is None else load_models
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.current: LoadedPolicy | None = None
        self.live_version: int | None = None
        # True once the alias has been read: live_version is then the answer (None: no live policy).
        self.alias_checked = False
        self.loading_version: int | None = None
        self.last_error: str | None = None
        self.swaps = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._poll_loop, name="policy-poll", daemon=True)]
        if self._settings.redis_url:
            self._threads.append(
                threading.Thread(target=self._listen_loop, name="policy-listen", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ following the alias

    def read_alias(self) -> tuple[int, str] | None:
        with read_session(self._sessions) as db:
            row = db.execute(
                select(Policy.version, Policy.path).join(PolicyAlias, PolicyAlias.policy_id == Policy.id)
            ).first()
        return (row.version, row.path) if row else None

    def check_now(self) -> None:
        """Read the alias once and load the live version if we do not hold it yet (blocking)."""
        try:
            alias = self.read_alias()
        except Exception as exc:  # database briefly unavailable: keep serving what we have
            log.warning("policy alias unreadable: %s", exc)
            return
        if alias is None:
            self.live_version = None
            self.alias_checked = True
            return
        version, path = alias
        self.live_version = version
        self.alias_checked = True
        if self.current is not None and self.current.version == version:
            return
        self._load(version, path)

    def _load(self, version: int, path: str) -> None:
        with self._lock:
            if self.current is not None and self.current.version == version:
                return
            self.loading_version = version
            started = time.perf_counter()
            try:
                if self._load_models:
                    loaded = load_policy(version, path, self._settings.torch_device())
                else:
                    loaded = LoadedPolicy(version=version, path=path)
            except Exception as exc:
                self.last_error = f"loading policy v{version} failed: {exc}"
                log.exception("loading policy v%s failed; keeping v%s", version, self.served_version)
                return
            finally:
                self.loading_version = None
            self.current = loaded  # the swap: one reference assignment
            self.swaps += 1
            self.last_error = None
            log.info("now serving policy v%s (loaded in %.1fs)", version, time.perf_counter() - started)

    @property
    def served_version(self) -> int | None:
        current = self.current
        return current.version if current else None

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._wake.wait(self._settings.policy_poll_seconds)
            self._wake.clear()

    def _listen_loop(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self._settings.redis_url, socket_timeout=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(POLICY_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._wake.set()
                pubsub.close()
                client.close()
            except Exception as exc:  # Redis down: polling still works, retry the subscription later
                log.debug("policy wake-up listener: %s", exc)
                self._stop.wait(5)
