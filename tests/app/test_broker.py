"""The Celery configuration: time limits per task kind, lost children's tasks rejected, visibility
above every hard limit."""

from __future__ import annotations

from app.broker import make_celery
from app.config import Settings
from app.services import dispatch

LONG = (
    dispatch.TRAIN_REWARD_MODEL,
    dispatch.TRAIN_POLICY,
    dispatch.EVALUATE_POLICY,
    dispatch.GENERATE_RESPONSES,
    dispatch.RUN_ROUND,
)


def _limits(conf) -> dict[str, tuple[float, float]]:
    return {name: (a["soft_time_limit"], a["time_limit"]) for name, a in conf.task_annotations.items()}


def test_every_task_has_a_soft_then_hard_limit_for_its_kind(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://localhost:6379/0",
        long_task_time_limit_seconds=36 * 3600,
        export_task_time_limit_seconds=7200,
        maintenance_task_time_limit_seconds=120,
    )
    limits = _limits(make_celery(settings).conf)
    assert set(limits) == set(dispatch.QUEUE_OF)
    for name in LONG:
        assert limits[name][0] == 36 * 3600
    assert limits[dispatch.EXPORT_DATASET][0] == 7200
    assert limits[dispatch.PERIODIC_MAINTENANCE][0] == 120
    for soft, hard in limits.values():
        assert soft < hard <= soft + max(30, 0.05 * soft)


def test_lost_children_are_rejected_and_the_visibility_timeout_outlasts_every_hard_limit(tmp_path):
    for long_seconds in (36 * 3600, 72 * 3600):  # the default, and one above the 48 h floor
        settings = Settings(
            data_dir=tmp_path,
            broker_url="redis://localhost:6379/0",
            long_task_time_limit_seconds=long_seconds,
        )
        conf = make_celery(settings).conf
        assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
        longest_hard = max(hard for _, hard in _limits(conf).values())
        assert longest_hard > long_seconds
        assert conf.broker_transport_options["visibility_timeout"] > longest_hard
