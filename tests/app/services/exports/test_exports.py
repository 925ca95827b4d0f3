"""Export formats, filters, split, pseudonyms and the dataset card, against a hand-checkable history
(tests/world/scenarios.py, `export_history`); every format and file format loads with `datasets.load_dataset`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from app.services.exports import (
    FORMATS,
    ExportCancelled,
    ExportSpec,
    export_dataset,
    get_format,
    iter_rows,
    pseudonym,
)
from app.services.exports.agreement import Judgement, consensus_scores, mean_outcome_agreement, pair_agreement
from app.services.exports.pairwise import hh_transcript
from app.services.exports.split import hash_unit
from app.services.exports.writers import SplitWriter
from tests.world import DAY1, DAY2, DAY3, USERNAMES, World, export_history

KEY = "test-pseudonym-key-that-is-long-enough-0123456789"


def rows(db, **spec) -> list[tuple[str, dict]]:
    return [(split, row) for split, row, _ in iter_rows(db, ExportSpec(**spec), pseudonym_key=KEY)]


def load(folder: Path, tmp_path: Path):
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))


@pytest.fixture
def seeded(db):
    return export_history(World(db))


# ---------------------------------------------------------------- agreement math (hand-computed)


def test_outcomes_agreement_and_scores_match_hand_computation():
    alice = Judgement(1, [[13], [11, 12], [14]])
    bob = Judgement(2, [[11], [13], [12], [14]])
    bad = Judgement(3, [[11, 12]], all_bad=True)
    assert alice.outcome(13, 11) == "a" and alice.outcome(11, 12) == "tie" and alice.outcome(14, 13) == "b"
    assert alice.outcome(13, 99) is None and bad.outcome(11, 12) == "bothbad"
    # alice's 13 > 11: bob says 11 > 13, so one of two agrees.
    assert pair_agreement([alice, bob], 1, 13, 11, "a") == (0.5, 2)
    assert pair_agreement([alice, bob], 1, 13, 12, "a") == (1.0, 2)
    assert pair_agreement([alice, bob, bad], 1, 13, 14, "a") == (pytest.approx(2 / 3), 3)
    # Of the 6 response pairs, alice and bob differ on (12, 11) and (11, 13).
    assert mean_outcome_agreement([alice, bob], [12, 11, 14, 13]) == pytest.approx(4 / 6)
    assert mean_outcome_agreement([alice], [12, 11, 14, 13]) is None
    # Borda in [0, 1], ties half: alice 13→1, 11→.5, 12→.5, 14→0; bob 11→1, 13→2/3, 12→1/3, 14→0.
    scores = consensus_scores([alice, bob, bad], [12, 11, 14, 13])
    assert scores == {13: pytest.approx(5 / 6), 11: pytest.approx(0.75), 12: pytest.approx(5 / 12), 14: 0.0}
    assert consensus_scores([bad], [11, 12]) == {11: None, 12: None}


def test_pseudonyms_are_keyed_stable_and_reveal_nothing():
    first = pseudonym(42, KEY)
    assert first == pseudonym(42, KEY)
    assert first != pseudonym(43, KEY)
    assert first != pseudonym(42, KEY + "-other-deployment")
    assert first.startswith("annotator-") and len(first) == len("annotator-") + 16


def test_hash_split_is_deterministic_and_seeded():
    hashes = [f"{i:064x}" for i in range(2000)]
    seed0 = [hash_unit(h, 0) < 0.1 for h in hashes]
    assert seed0 == [hash_unit(h, 0) < 0.1 for h in hashes]
    assert seed0 != [hash_unit(h, 1) < 0.1 for h in hashes]
    assert 0.07 < sum(seed0) / len(seed0) < 0.13


# ---------------------------------------------------------------- formats


def test_pairwise_rows_are_trl_conversational_with_hand_computed_figures(db, seeded):
    out = rows(db, format="pairwise", split_mode="none")
    assert len(out) == 13  # T1: alice 5 + bob 6, T2: alice 1, T3: carol 1
    r = seeded.responses
    by_pair = {
        (row["annotation_id"], row["chosen_response_id"], row["rejected_response_id"]): row for _, row in out
    }
    row = by_pair[(seeded.annotations["t1_alice"], r["r13"], r["r11"])]
    assert row["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "Paris is the capital of France."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Paris."}]
    assert row["margin"] == 1.0
    assert (row["agreement"], row["num_annotators"]) == (0.5, 2)
    assert row["score_chosen"] == pytest.approx(5 / 6) and row["score_rejected"] == pytest.approx(0.75)
    assert (row["chosen_policy_version"], row["rejected_policy_version"]) == (1, 0)
    assert row["annotator"] == pseudonym(seeded.users["alice"], KEY)
    assert by_pair[(seeded.annotations["t1_alice"], r["r13"], r["r14"])]["margin"] == 2.0
    # alice's T2 preference against bob's all-bad: half agreement.
    t2 = by_pair[(seeded.annotations["t2_alice"], r["r21"], r["r22"])]
    assert (t2["agreement"], t2["num_annotators"]) == (0.5, 2)
    assert t2["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert list(row) == get_format("pairwise").columns


def test_hh_and_text_pairwise_render_the_same_transcript(db, seeded):
    r = seeded.responses
    hh = {row["comparison_id"]: row for _, row in rows(db, format="hh_rlhf", split_mode="none")}
    text = {row["comparison_id"]: row for _, row in rows(db, format="pairwise_text", split_mode="none")}
    assert hh.keys() == text.keys() and len(hh) == 13
    t2 = next(row for row in text.values() if row["chosen_response_id"] == r["r21"])
    expected = "\n\nHuman: Be brief.\n\nHi\n\nAssistant: Hello!\n\nHuman: Name a prime.\n\nAssistant: 2"
    assert hh[t2["comparison_id"]]["chosen"] == expected
    assert hh[t2["comparison_id"]]["rejected"] == expected[:-1] + "9"
    assert t2["prompt"] + t2["chosen"] == expected
    assert t2["prompt"].endswith("\n\nAssistant:") and t2["chosen"] == " 2"
    assert hh_transcript([{"role": "user", "content": "x"}]) == "\n\nHuman: x"


def test_rankings_keep_ties_all_bad_skips_and_flags_raw(db, seeded):
    r = seeded.responses
    out = {row["annotation_id"]: row for _, row in rows(db, format="rankings", split_mode="none")}
    a = seeded.annotations
    assert set(out) == {a["t1_alice"], a["t1_bob"], a["t2_alice"], a["t2_bob"], a["t3_carol"]}
    alice = out[a["t1_alice"]]
    assert alice["ranking"] == [[r["r13"]], [r["r11"], r["r12"]], [r["r14"]]]
    assert [x["response_id"] for x in alice["responses"]] == [r["r12"], r["r11"], r["r14"], r["r13"]]
    assert [x["policy_version"] for x in alice["responses"]] == [1, 0, 1, 1]
    assert alice["agreement"] == pytest.approx(4 / 6) and alice["num_annotators"] == 2
    assert alice["rationale"] == "most complete" and alice["created_at"] == DAY1
    assert out[a["t2_bob"]]["all_bad"] is True and out[a["t2_bob"]]["agreement"] == 0.0
    carol = out[a["t3_carol"]]
    assert carol["flags"] == ["harmful"]
    assert json.loads(carol["flag_details"]) == {"responses": {str(r["r32"]): ["harmful"]}}
    assert carol["agreement"] is None and carol["num_annotators"] == 1
    with_skips = {row["annotation_id"]: row for _, row in rows(db, format="rankings", exclude_skipped=False)}
    assert with_skips[a["t1_carol"]]["skipped"] is True
    assert with_skips[a["t1_carol"]]["skip_reason"] == "unsure"
    assert with_skips[a["t1_carol"]]["ranking"] == []


def test_arena_battles_pair_versions_with_tie_and_both_bad(db, seeded):
    r = seeded.responses
    out = [row for _, row in rows(db, format="arena", split_mode="none")]
    assert len(out) == 9  # T1: 3 pairs with the v0 response r11 x 2 annotators; T2: 2; T3: 1
    t2 = {row["annotation_id"]: row for row in out if row["task_id"] == seeded.tasks["t2"]}
    alice, bob = t2[seeded.annotations["t2_alice"]], t2[seeded.annotations["t2_bob"]]
    assert (alice["model_a"], alice["model_b"], alice["winner"]) == ("policy-v1", "policy-v0", "model_b")
    assert bob["winner"] == "tie (bothbad)"
    assert alice["conversation_b"][-1] == {"role": "assistant", "content": "2"} and alice["turn"] == 2
    assert alice["tstamp"] == DAY1.timestamp() and alice["anony"] is True
    winners = {
        (row["annotation_id"], row["response_id_a"], row["response_id_b"]): row["winner"]
        for row in out
        if row["task_id"] == seeded.tasks["t1"]
    }
    a = seeded.annotations
    assert winners == {
        (a["t1_alice"], r["r12"], r["r11"]): "tie",  # alice tied Lyon (v1) with Paris (v0)
        (a["t1_alice"], r["r11"], r["r14"]): "model_a",
        (a["t1_alice"], r["r11"], r["r13"]): "model_b",
        (a["t1_bob"], r["r12"], r["r11"]): "model_b",
        (a["t1_bob"], r["r11"], r["r14"]): "model_a",
        (a["t1_bob"], r["r11"], r["r13"]): "model_a",
    }


# ---------------------------------------------------------------- filters and split


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, 13),
        ({"prompt_set_ids": "safety"}, 1),
        ({"policy_versions": [1]}, 6),  # T1 among r12, r13, r14: 3 pairs each by alice and bob
        ({"policy_versions": [0]}, 0),  # no task has two v0 responses that were ordered
        ({"since": DAY1, "until": DAY2}, 6),  # alice's day: T1 5 + T2 1
        ({"since": DAY3}, 1),  # carol's T3
        ({"min_agreement": 0.75}, 9),  # drops the three 0.5 rows of T1 and alice's T2
        ({"min_annotators": 2}, 12),  # drops T3
        ({"exclude_flagged": True}, 12),  # drops carol's flagged T3
    ],
)
def test_filters(db, seeded, spec, expected):
    if spec.get("prompt_set_ids") == "safety":
        spec = {"prompt_set_ids": [seeded.sets["safety"]]}
    assert len(rows(db, format="pairwise", **spec)) == expected


def test_split_is_by_prompt_and_reproducible(db, seeded):
    first = rows(db, format="pairwise", test_fraction=0.5, seed=3)
    assert first == rows(db, format="pairwise", test_fraction=0.5, seed=3)
    split_of_prompt: dict[int, set[str]] = {}
    for split, row in first:
        split_of_prompt.setdefault(row["prompt_id"], set()).add(split)
    assert all(len(s) == 1 for s in split_of_prompt.values())
    seeds = {
        tuple(split for split, _ in rows(db, format="pairwise", test_fraction=0.5, seed=s)) for s in range(8)
    }
    assert len(seeds) > 1  # the seed moves prompts between splits
    stored = {row["prompt_id"]: split for split, row in rows(db, format="pairwise", split_mode="stored")}
    assert stored[seeded.prompts["p2"]] == "test" and stored[seeded.prompts["p1"]] == "train"


def test_paging_does_not_change_the_rows(db, seeded):
    spec = ExportSpec(format="rankings", exclude_skipped=False)
    whole = list(iter_rows(db, spec, pseudonym_key=KEY))
    paged = list(iter_rows(db, spec, pseudonym_key=KEY, page_size=1))
    assert [r for _, r, _ in paged] == [r for _, r, _ in whole] and len(whole) == 6


# ---------------------------------------------------------------- files, card, datasets


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_every_format_loads_with_datasets(db, seeded, tmp_path, file_format):
    for name, fmt in FORMATS.items():
        spec = ExportSpec(format=name, file_format=file_format, layout="folder", split_mode="stored")
        result = export_dataset(db, spec, tmp_path / name, pseudonym_key=KEY)
        ds = load(tmp_path / name, tmp_path)
        assert set(ds) == set(result.splits) == {"train", "test"}, name
        for split in ds:
            assert ds[split].column_names == fmt.columns, name
            assert ds[split].num_rows == result.stats.rows[split], name
        assert (
            result.stats.total_rows
            == {"pairwise": 13, "pairwise_text": 13, "hh_rlhf": 13, "rankings": 5, "arena": 9}[name]
        )


def test_zip_layout_card_and_no_personal_data(db, seeded, tmp_path):
    spec = ExportSpec(
        format="pairwise",
        layout="zip",
        test_fraction=0.5,
        seed=7,
        min_annotators=1,
        license="cc-by-4.0",
        name="demo prefs",
    )
    result = export_dataset(db, spec, tmp_path / "prefs.zip", pseudonym_key=KEY)
    with zipfile.ZipFile(tmp_path / "prefs.zip") as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    assert "README.md" in names and all(
        n in ("README.md", "leaderboard.json") or n.startswith("data/") for n in names
    )
    card = (tmp_path / "unzipped" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "cc-by-4.0" and meta["pretty_name"] == "demo prefs"
    assert {c["split"] for c in meta["configs"][0]["data_files"]} == set(result.splits)
    assert "**Seed: 7.**" in card and "| **all** | 13 | 3 |" in card
    assert "| 1 | ppo | approved | 0 |" in card  # policy versions with lineage
    assert "mean agreement" in card
    # The arena battle of the seed (alice: v0 beats v1; bob: both bad, a tie) rates both versions.
    board = json.loads((tmp_path / "unzipped" / "leaderboard.json").read_text())
    assert board["battles"] == 2 and {e["policy_version"] for e in board["entries"]} == {0, 1}
    assert "## Policy leaderboard" in card and "2 battles" in card
    ds = load(tmp_path / "unzipped", tmp_path)
    assert sum(ds[s].num_rows for s in ds) == 13
    # Nothing that names a person leaves: check every byte of every format.
    for name in FORMATS:
        for file_format in ("jsonl", "parquet"):
            out = tmp_path / f"pii-{name}-{file_format}"
            export_dataset(
                db,
                ExportSpec(format=name, file_format=file_format, layout="folder", exclude_skipped=False),
                out,
                pseudonym_key=KEY,
            )
            blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
            for username in USERNAMES:
                assert username.encode() not in blob and b"example.org" not in blob
            assert pseudonym(seeded.users["alice"], KEY).encode() in blob


def test_shards_are_named_for_the_hub(tmp_path):
    fmt = get_format("hh_rlhf")
    writer = SplitWriter(tmp_path, "train", "parquet", fmt.schema, rows_per_shard=2)
    for i in range(5):
        writer.write(
            {name: None for name in fmt.columns} | {"chosen": f"c{i}", "rejected": "r", "margin": 1.0}
        )
    paths = writer.close()
    assert [p.name for p in paths] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(p).num_rows for p in paths) == 5


def test_empty_export_keeps_the_schema(db, seeded, tmp_path):
    import pyarrow.parquet as pq

    spec = ExportSpec(
        format="pairwise", layout="folder", since=DAY3, until=DAY3.replace(hour=11), exclude_flagged=True
    )
    result = export_dataset(db, spec, tmp_path / "empty", pseudonym_key=KEY)
    assert result.stats.total_rows == 0 and result.splits == ["train"]
    table = pq.read_table(tmp_path / "empty" / "data" / "train-00000-of-00001.parquet")
    assert table.num_rows == 0 and table.column_names == get_format("pairwise").columns
    assert "No rows matched" in (tmp_path / "empty" / "README.md").read_text()


def test_cancel_leaves_nothing_behind(db, seeded, tmp_path):
    with pytest.raises(ExportCancelled):
        export_dataset(
            db,
            ExportSpec(format="pairwise"),
            tmp_path / "out" / "x.zip",
            pseudonym_key=KEY,
            should_stop=lambda: True,
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_spec_validation_says_what_to_fix():
    with pytest.raises(ValueError, match="since must be earlier"):
        ExportSpec(since=DAY2, until=DAY1)
    with pytest.raises(ValueError, match="chat_template_version"):
        ExportSpec(format="pairwise_text", text_template="chat_template")
    with pytest.raises(ValueError):
        ExportSpec(format="csv")


def test_annotators_excluded_by_the_gold_gate_leave_exports(db, seeded, tmp_path):
    from app.data.models import User
    from app.services.quality.gold import mark_gold

    world = World(db)
    bob = seeded.users["bob"]
    for prompt in world.prompt_set("gold", [f"gold {i}" for i in range(5)]):
        # bob misses five gold tasks: accuracy 0 < gold_min_accuracy, so he is flagged
        good, bad = world.responses(prompt, ["good", "bad"], [0, 0])
        task = world.task_showing([good, bad], required=5)
        mark_gold(db, task.id, good)  # now shown last: [bad, good]
        db.commit()
        world.judge(task, db.get(User, bob), [[0], [1]], at=DAY2)

    out = [row for _, row in rows(db, format="pairwise", split_mode="none")]
    assert pseudonym(bob, KEY) not in {row["annotator"] for row in out}
    assert len(out) == 7  # 13 minus bob's 6: alice's T1 5 and T2 1, carol's T3 1
    assert {
        (row["agreement"], row["num_annotators"]) for row in out if row["task_id"] == seeded.tasks["t1"]
    } == {(1.0, 1)}  # bob's judgements no longer count in agreement either
    result = export_dataset(db, ExportSpec(layout="folder"), tmp_path / "gated", pseudonym_key=KEY)
    assert result.stats.excluded_annotators == 1
    assert "1 annotator(s) whose gold-task accuracy" in (tmp_path / "gated" / "README.md").read_text()
