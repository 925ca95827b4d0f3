"""PolicyHolder: follows the live alias, loads new versions off the request path, swaps atomically.

Requests read `holder.current` once and keep that object for their whole duration, so a swap never
disturbs a request already running; a failed load keeps the old model and is reported.
Wake-ups come from Redis pub/sub when configured; polling the alias covers lost messages.

Before loading a version's folder the holder checks its sha256 against the one recorded when it was
published, so a folder changed or cut short on disk is refused rather than served. A version that
failed to load is tried again after a wait that doubles with each failure (up to
PREFLOOP_POLICY_LOAD_BACKOFF_MAX_SECONDS), not at every poll: a broken folder would otherwise be read
(and hashed) again every few seconds by every web process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.common.files import sha256_folder
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


def _verify_folder(version: int, path: str, sha256: str) -> None:
    """Refuse a folder whose files are not those that were published (changed, truncated, missing)."""
    found = sha256_folder(Path(path))
    if found != sha256:
        raise ValueError(
            f"the folder of policy v{version} ({path}) does not match the sha256 recorded when it was "
            f"published ({sha256[:12]}…, found {found[:12]}…): its files changed or are incomplete; "
            "roll back, or publish the version again"
        )


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
        self._failed_loads: dict[int, tuple[int, float]] = {}  # version → (failures in a row, retry at)

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

    def read_alias(self) -> tuple[int, str, str] | None:
        """The live version, its folder and the folder's recorded sha256."""
        with read_session(self._sessions) as db:
            row = db.execute(
                select(Policy.version, Policy.path, Policy.sha256).join(
                    PolicyAlias, PolicyAlias.policy_id == Policy.id
                )
            ).first()
        return (row.version, row.path, row.sha256) if row else None

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
        version, path, sha256 = alias
        self.live_version = version
        self.alias_checked = True
        if self.current is not None and self.current.version == version:
            return
        failed = self._failed_loads.get(version)
        if failed is not None and time.monotonic() < failed[1]:
            return  # backing off after failed loads of this version
        self._load(version, path, sha256)

    def retry_in(self, version: int) -> float | None:
        """Seconds until a version that failed to load is tried again; None when it has not failed."""
        failed = self._failed_loads.get(version)
        return None if failed is None else max(0.0, failed[1] - time.monotonic())

    def _load(self, version: int, path: str, sha256: str) -> None:
        with self._lock:
            if self.current is not None and self.current.version == version:
                return
            self.loading_version = version
            started = time.perf_counter()
            try:
                if self._load_models:
                    _verify_folder(version, path, sha256)
                    loaded = load_policy(version, path, self._settings.torch_device())
                else:
                    loaded = LoadedPolicy(version=version, path=path)
            except Exception as exc:
                self._back_off(version, exc)
                return
            finally:
                self.loading_version = None
            self.current = loaded  # the swap: one reference assignment
            self.swaps += 1
            self.last_error = None
            self._failed_loads.pop(version, None)
            log.info("now serving policy v%s (loaded in %.1fs)", version, time.perf_counter() - started)

    def _back_off(self, version: int, exc: Exception) -> None:
        failures = self._failed_loads.get(version, (0, 0.0))[0] + 1
        wait = min(
            self._settings.policy_load_backoff_max_seconds,
            self._settings.policy_poll_seconds * 2**failures,
        )
        self._failed_loads = {version: (failures, time.monotonic() + wait)}  # only the live one matters
        self.last_error = f"loading policy v{version} failed: {exc}"
        log.error(
            "loading policy v%s failed (%d in a row; next try in %.0fs); keeping v%s: %s",
            version,
            failures,
            wait,
            self.served_version,
            exc,
            exc_info=failures == 1,  # the traceback once, not at every retry
        )

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
