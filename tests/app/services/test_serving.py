"""PolicyHolder: follows the alias, loads off the request path, swaps atomically, survives bad loads."""

from __future__ import annotations

import shutil

from app.services.registry import init_base_policy, publish_policy, set_live
from app.services.serving import PolicyHolder


def test_holder_swaps_to_the_new_live_version_and_keeps_old_on_failure(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    holder = PolicyHolder(session_factory(engine), settings, load_models=True)
    holder.check_now()
    first = holder.current
    assert first is not None and first.version == 0 and first.generator is not None

    v1 = publish_policy(
        db, lambda d: shutil.copytree(base.path, d, dirs_exist_ok=True), kind="ppo", settings=settings
    )
    set_live(db, v1.version, settings)
    holder.check_now()
    assert holder.current.version == 1 and holder.swaps == 2
    assert first.model is not holder.current.model  # a request holding `first` keeps its own model

    broken = publish_policy(
        db, lambda d: (d / "config.json").write_text("{not json"), kind="ppo", settings=settings
    )
    set_live(db, broken.version, settings)
    holder.check_now()
    assert holder.current.version == 1  # the failed load kept the old model
    assert holder.live_version == 2 and "v2" in holder.last_error


def test_holder_without_models_tracks_the_version_only(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    holder = PolicyHolder(session_factory(engine), settings, load_models=False)
    holder.check_now()
    assert holder.served_version == 0 and holder.current.model is None


def test_holder_refuses_a_folder_changed_since_publishing_and_backs_off(
    settings, engine, db, tiny_model_dir, caplog
):
    import logging
    import time
    from pathlib import Path

    from app.data.db import session_factory

    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    holder = PolicyHolder(session_factory(engine), settings, load_models=True)
    holder.check_now()
    v1 = publish_policy(
        db, lambda d: shutil.copytree(base.path, d, dirs_exist_ok=True), kind="ppo", settings=settings
    )
    set_live(db, v1.version, settings)
    weights = next(Path(v1.path).glob("*.safetensors"))
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # cut short on disk after it was published

    caplog.set_level(logging.ERROR, logger="app.services.serving")
    holder.check_now()
    assert holder.served_version == 0  # the changed folder is not served
    assert "does not match the sha256 recorded when it was published" in holder.last_error
    failures = [r.getMessage() for r in caplog.records if "loading policy v1 failed" in r.getMessage()]
    assert len(failures) == 1 and "(1 in a row; next try in 1s)" in failures[0]

    holder.check_now()  # within the backoff: not read again
    holder.check_now()
    assert sum("loading policy v1 failed" in r.getMessage() for r in caplog.records) == 1

    time.sleep(holder.retry_in(1) + 0.05)
    holder.check_now()
    failures = [r.getMessage() for r in caplog.records if "loading policy v1 failed" in r.getMessage()]
    assert len(failures) == 2 and "(2 in a row; next try in 2s)" in failures[1]

    weights.write_bytes(intact)  # repaired: loaded at the next try after the wait
    time.sleep(holder.retry_in(1) + 0.05)
    holder.check_now()
    assert holder.served_version == 1 and holder.last_error is None and holder.retry_in(1) is None
