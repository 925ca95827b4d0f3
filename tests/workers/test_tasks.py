"""Beat's maintenance task: it starts a round once enough new comparisons arrived, and only one."""

from __future__ import annotations

from app.config import reset_settings
from app.data.models import Round
from app.services import dispatch
from app.services.registry import init_base_policy
from app.services.rounds import comparisons_since_last_round
from tests.world import World, marker_preferences


def test_maintenance_starts_a_round_when_enough_comparisons_arrived(
    db, settings, tiny_model_dir, monkeypatch
):
    from workers.tasks import periodic_maintenance

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=1)
    arrived = comparisons_since_last_round(db)
    assert arrived > 0
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(dispatch, "_sender", lambda name, args: sent.append((name, args)))

    def maintenance_with_threshold(threshold: int) -> dict[str, int]:
        monkeypatch.setenv("PREFLOOP_AUTO_ROUND_MIN_COMPARISONS", str(threshold))
        reset_settings()
        return periodic_maintenance()

    assert maintenance_with_threshold(0)["auto_round"] == 0  # 0 turns automatic rounds off
    assert maintenance_with_threshold(arrived + 1)["auto_round"] == 0  # not enough yet
    assert not any(name == dispatch.RUN_ROUND for name, _ in sent)

    round_id = maintenance_with_threshold(arrived)["auto_round"]
    assert round_id
    db.expire_all()
    round_ = db.get(Round, round_id)
    assert round_.trigger == "auto" and round_.status == "queued"
    assert (dispatch.RUN_ROUND, [round_id]) in sent
    # The next beat finds the round still active and starts no second one.
    assert maintenance_with_threshold(arrived)["auto_round"] == 0
