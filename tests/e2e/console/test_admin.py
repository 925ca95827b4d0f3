"""The admin console in a real Chromium: a run or round page left open follows it to its end, the
start button waits for the active round, charts keep unrelated scales apart and print numbers
readably, evaluation samples render as the annotation page renders them, and the admin sets the
task overlap and chooses gold tasks from a list."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.data.models import AppSetting, Round, Run, RunMetric, Task, utcnow
from tests.e2e.conftest import shot
from tests.e2e.console.conftest import log_in_as
from tests.world import World

pytestmark = pytest.mark.e2e


def running_round(db) -> tuple[Round, Run]:
    round_ = Round(algorithm="ppo", status="running", stage="ppo", active=True, config={})
    db.add(round_)
    db.flush()
    run = Run(kind="ppo", round_id=round_.id, status="running", progress=0.5, progress_message="step 2 of 4")
    db.add(run)
    db.flush()
    for step in (1, 2):
        for name, value in {
            "policy_loss": 0.02 * step,
            "value_loss": 0.03,
            "ptx_loss": 4.0,
            "lr": 1.1e-5,
        }.items():
            db.add(RunMetric(run_id=run.id, step=step, name=name, value=value))
    db.commit()
    return round_, run


def finish(db, round_: Round, run: Run) -> None:
    run.status, run.progress, run.finished_at = "succeeded", 1.0, utcnow()
    run.result = {"policy_version": 7, "reward_gain": 0.25}
    round_.status, round_.active, round_.stage, round_.finished_at = "succeeded", None, "done", utcnow()
    db.commit()


def test_a_run_page_left_open_follows_the_run_to_its_end(page, server, server_db, admin, no_active_round):
    round_, run = running_round(server_db)
    log_in_as(page, server, admin, "admin")
    page.goto(f"{server.url}/admin/runs/{run.id}")
    assert page.locator("#run-actions button", has_text="Cancel run").count() == 1
    assert "None yet" in page.inner_text("#run-result")
    page.wait_for_selector("#charts figure[data-chart=Losses] canvas")

    # Losses of two sizes share a chart on two axes; the learning rate reads 1.1e-5, in words.
    axes = page.evaluate(
        """() => {
            const chart = window.Chart.getChart(document.querySelector("figure[data-chart=Losses] canvas"));
            return { scales: Object.keys(chart.scales).sort(), labels: chart.data.datasets.map((d) => d.label) };
        }"""
    )
    assert axes["scales"] == ["x", "y", "y1"] and "Policy loss" in axes["labels"]
    captions = page.locator("#charts figcaption").all_inner_texts()
    assert "Learning rate" in captions and "lr" not in captions
    ticks = page.evaluate(
        """() => window.Chart.getChart(document.querySelector("figure[data-chart=lr] canvas"))
                 .scales.y.ticks.map((t) => t.label)"""
    )
    assert any("e-5" in t for t in ticks) and not any("E-5" in t or "0000" in t for t in ticks)
    assert len(set(ticks)) == len(ticks)  # close values stay apart (1.08e-5, 1.1e-5, 1.12e-5)
    steps = page.evaluate(
        """() => window.Chart.getChart(document.querySelector("figure[data-chart=lr] canvas"))
                 .scales.x.ticks.map((t) => t.value)"""
    )
    assert all(float(s).is_integer() for s in steps)  # training steps are whole numbers
    shot(page, "run-page-running")

    finish(server_db, round_, run)
    page.wait_for_selector(f"#run-progress-{run.id}[data-status=succeeded]", timeout=15_000)
    page.wait_for_function("!document.querySelector('#run-actions button')")
    assert "reward_gain" in page.inner_text("#run-result") and "None yet" not in page.inner_text(
        "#run-result"
    )
    shot(page, "run-page-ended")
    assert page.errors == []


def test_start_round_waits_for_the_active_round_and_a_round_page_follows_it(
    page, server, server_db, admin, no_active_round
):
    round_, run = running_round(server_db)
    log_in_as(page, server, admin, "admin")
    for path in ("/admin", "/admin/rounds"):
        page.goto(f"{server.url}{path}")
        assert page.locator("#start-round button").is_disabled()
        assert f"#{round_.id}" in page.inner_text("#start-round")
    page.goto(f"{server.url}/admin/rounds/{round_.id}")
    assert page.locator("#round-actions button", has_text="Cancel round").count() == 1
    page.goto(f"{server.url}/admin/rounds")
    finish(server_db, round_, run)
    # A selector, not wait_for_function: the page's CSP (no 'unsafe-eval') blocks Playwright's eval.
    page.wait_for_selector("#start-round button:not([disabled])", timeout=15_000)
    page.goto(f"{server.url}/admin/rounds/{round_.id}")
    assert page.locator("#round-actions button").count() == 0
    assert page.errors == []


def test_round_samples_render_markdown_and_no_script(page, server, server_db, admin, no_active_round):
    round_ = Round(algorithm="dpo", status="succeeded", stage="done", active=None, config={})
    server_db.add(round_)
    server_db.flush()
    sample = {
        "prompt": "Explain **tides** <script>window.__pwned = 1</script>",
        "live": "- one\n- two",
        "candidate": 'Use `code` and <img src=x onerror="window.__pwned = 2">',
    }
    server_db.add(Run(kind="evaluate", round_id=round_.id, status="succeeded", result={"samples": [sample]}))
    server_db.commit()
    log_in_as(page, server, admin, "admin")
    page.goto(f"{server.url}/admin/rounds/{round_.id}")
    samples = page.locator("table.samples")
    assert samples.locator("strong", has_text="tides").count() == 1
    assert samples.locator("li").count() == 2 and samples.locator("code").count() == 1
    assert samples.locator("script, img").count() == 0
    assert "<img src=x" in samples.inner_text()
    assert page.evaluate("window.__pwned") is None


def test_the_admin_sets_the_overlap_and_chooses_a_gold_task_from_a_list(page, server, server_db, admin):
    tasks = World(server_db).tasks_from_texts(
        [
            ("How do tides work?", ["The moon pulls the sea.", "Magic."]),
            ("Boil an egg", ["8 minutes", "1 hour"]),
        ],
        prompt_set="gold-list",
    )
    log_in_as(page, server, admin, "admin")
    page.goto(f"{server.url}/admin/prompts")
    page.fill("#overlap", "3")
    page.click("#overlap-form button[type=submit]:not([name])")
    page.wait_for_selector("#overlap-saved")
    assert page.input_value("#overlap") == "3"
    server_db.expire_all()
    assert server_db.get(AppSetting, "task_overlap").value == "3"
    page.click("#overlap-form button[name=reset]")
    page.wait_for_selector("#overlap-saved")
    server_db.expire_all()
    assert server_db.get(AppSetting, "task_overlap") is None

    page.goto(f"{server.url}/admin/quality/gold")
    page.fill("#gold-search", "tides")
    page.click("form[role=search] button")
    rows = page.locator("#gold-choices tbody tr")
    assert rows.count() == 1 and "How do tides work?" in rows.first.inner_text()
    page.click(f"text=Choose task {tasks[0]}")
    page.wait_for_selector("#gold-editor")
    page.locator("#gold-editor label.response-choice", has_text="The moon pulls the sea.").locator(
        "input"
    ).check()
    page.click("#gold-editor button.primary")
    page.wait_for_selector("#gold-table")
    server_db.expire_all()
    task = server_db.scalar(select(Task).where(Task.id == tasks[0]))
    assert task.is_gold
    shot(page, "gold-chosen-from-list")
    assert page.errors == []
