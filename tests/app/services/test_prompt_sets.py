"""Prompt-set parsing (per-row errors), dedup, the deterministic split, storing, and the demo set."""

from __future__ import annotations

import csv
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from app.data.models import Prompt, PromptSet
from app.services.demo import install_demo_prompt_set
from app.services.prompt_sets import create_prompt_set, list_prompt_sets, split_for
from app.services.prompt_uploads import MAX_PROMPT_CHARS, PromptSetError, content_hash, parse_prompt_file


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


# ---------------------------------------------------------------- JSONL


def test_jsonl_prompt_and_messages_rows_with_id_and_metadata():
    data = jsonl(
        {"id": "a1", "prompt": "  Why is the sky blue?  ", "metadata": {"topic": "physics"}},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "Name a prime", "difficulty": "easy"},
    )
    result = parse_prompt_file(data, "set.jsonl")
    assert result.errors == [] and result.duplicates == 0 and result.rows == 3
    first, second, third = result.prompts
    assert first.messages == [{"role": "user", "content": "Why is the sky blue?"}]
    assert first.external_id == "a1" and first.meta == {"topic": "physics"}
    assert second.text == "Hi" and second.messages[0]["role"] == "system"
    assert third.meta == {"difficulty": "easy"}  # unknown columns are kept as metadata


def test_jsonl_reports_each_bad_line_with_its_number():
    data = (
        jsonl(
            {"prompt": "fine"},
            '{"prompt": "unterminated',
            {"prompt": "   "},
            {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "robot", "content": "q"}]},
            "[1, 2]",
            {"text": "no prompt field"},
        )
        + b"\n"
        + b'{"prompt": "caf\xe9"}'
    )
    result = parse_prompt_file(data, "bad.jsonl")
    assert [p.text for p in result.prompts] == ["fine"]
    by_line = {e.line: e.message for e in result.errors}
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8, 9}
    assert "bad JSON" in by_line[2]
    assert "empty" in by_line[3]
    assert "too long" in by_line[4]
    assert "last message must be a user turn" in by_line[5]
    assert "role must be one of" in by_line[6]
    assert "JSON object" in by_line[7]
    assert "no 'prompt' or 'messages'" in by_line[8]
    assert "UTF-8" in by_line[9] and "0xe9" in by_line[9]
    assert str(result.errors[0]).startswith("line 2: ")


def test_blank_lines_are_ignored_and_duplicates_dropped_by_content():
    data = jsonl({"prompt": "same"}, "", "   ", {"prompt": " same "}, {"prompt": "other"})
    result = parse_prompt_file(data, "d.jsonl")
    assert [p.text for p in result.prompts] == ["same", "other"]
    assert result.duplicates == 1 and result.errors == []


def test_content_hash_ignores_surrounding_whitespace_but_not_roles():
    a = parse_prompt_file(jsonl({"prompt": "Hello"}), "a.jsonl").prompts[0]
    b = parse_prompt_file(jsonl({"messages": [{"role": "user", "content": " Hello\n"}]}), "b.jsonl").prompts[
        0
    ]
    c = content_hash([{"role": "system", "content": "Hello"}])
    assert a.content_hash == b.content_hash != c


# ---------------------------------------------------------------- CSV and Parquet


def test_csv_with_quoted_multiline_cells_reports_the_right_line():
    text = (
        "id,prompt,metadata,lang\n"
        'p1,"First line\nsecond line",{"k": 1},en\n'
        "p2,,,en\n"
        'p3,Fine prompt,"{not json",en\n'
        "p4,Last one,,fr\n"
    )
    result = parse_prompt_file(text.encode(), "set.csv")
    assert [p.external_id for p in result.prompts] == ["p1", "p4"]
    assert result.prompts[0].text == "First line\nsecond line"
    assert result.prompts[0].meta == {"k": 1, "lang": "en"}
    assert [(e.line, e.message.split(":")[0]) for e in result.errors] == [
        (4, "prompt is empty"),
        (5, "'metadata' is not valid JSON"),
    ]


def test_csv_messages_column_holds_json_and_header_is_checked():
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows([["messages"], [json.dumps([{"role": "user", "content": "Hi there"}])]])
    data = out.getvalue().encode()
    assert parse_prompt_file(data, "m.csv").prompts[0].text == "Hi there"
    with pytest.raises(PromptSetError, match="'prompt' or a 'messages' column"):
        parse_prompt_file(b"question,answer\nq,a\n", "x.csv")
    with pytest.raises(PromptSetError) as err:
        parse_prompt_file(b"prompt\nok\nbad \xff byte\n", "x.csv")
    assert err.value.errors[0].line == 3


def test_parquet_with_prompt_and_messages_columns():
    table = pa.table(
        {
            "id": [1, 2, 3],
            "prompt": ["Tell me a joke", None, ""],
            "messages": [None, [{"role": "user", "content": "Chat turn"}], None],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    result = parse_prompt_file(buf.getvalue(), "set.parquet")
    assert [(p.external_id, p.text) for p in result.prompts] == [("1", "Tell me a joke"), ("2", "Chat turn")]
    assert [str(e) for e in result.errors] == ["row 3: prompt is empty"]
    with pytest.raises(PromptSetError, match="Parquet"):
        parse_prompt_file(b"PAR1 not really", "broken.parquet")


def test_format_is_sniffed_without_a_file_name():
    assert parse_prompt_file(jsonl({"prompt": "a"}), None).prompts[0].text == "a"
    assert parse_prompt_file(b"prompt\nb\n", None).prompts[0].text == "b"


# ---------------------------------------------------------------- split


def test_split_depends_on_content_and_seed_only():
    hashes = [content_hash([{"role": "user", "content": f"prompt {i}"}]) for i in range(2000)]
    splits = {h: split_for(h, 7, 0.2) for h in hashes}
    shuffled = hashes[:]
    random.Random(1).shuffle(shuffled)
    assert {h: split_for(h, 7, 0.2) for h in shuffled} == splits
    n_eval = sum(s == "eval" for s in splits.values())
    # Binomial(2000, 0.2): mean 400, sd ~17.9; five sd either side.
    assert 310 < n_eval < 490
    assert {split_for(h, 8, 0.2) for h in hashes[:50]} == {"train", "eval"}
    assert [split_for(h, 8, 0.2) for h in hashes] != list(splits.values())
    assert {split_for(h, 7, 0.0) for h in hashes} == {"train"}


# ---------------------------------------------------------------- storing


def test_create_prompt_set_stores_prompts_with_their_split(db):
    rows = [{"prompt": f"Question number {i}?"} for i in range(40)] + [{"prompt": "Question number 3?"}]
    report = create_prompt_set(db, name="qs", data=jsonl(*rows), filename="q.jsonl", eval_fraction=0.25)
    assert (report.created, report.duplicates) == (40, 1)
    assert report.train + report.eval == 40 and report.eval > 0
    stored = db.execute(
        select(Prompt.content_hash, Prompt.split).where(Prompt.prompt_set_id == report.prompt_set.id)
    )
    for h, split in stored:
        assert split == split_for(h, 0, 0.25)
    (summary,) = list_prompt_sets(db)
    assert (summary.name, summary.prompts, summary.eval) == ("qs", 40, report.eval)


def test_a_row_can_pin_its_side_of_the_split(db):
    rows = [{"prompt": f"Held-out question {i}?", "metadata": {"split": "eval"}} for i in range(5)]
    rows += [{"prompt": f"Training question {i}?", "split": "train"} for i in range(5)]  # a column
    rows += [{"prompt": f"Other question {i}?", "metadata": {"split": "test"}} for i in range(20)]
    report = create_prompt_set(db, name="pinned", data=jsonl(*rows), filename="p.jsonl", eval_fraction=0.5)
    by_text = dict(db.execute(select(Prompt.text, Prompt.split)).all())
    assert all(by_text[f"Held-out question {i}?"] == "eval" for i in range(5))
    assert all(by_text[f"Training question {i}?"] == "train" for i in range(5))
    # A value that names no side is ordinary metadata: those rows take the hash split.
    others = [by_text[f"Other question {i}?"] for i in range(20)]
    assert {"train", "eval"} == set(others)
    assert report.eval == 5 + others.count("eval")


def test_invalid_rows_refuse_the_upload_unless_skipped(db):
    data = jsonl({"prompt": "good"}, "{oops", {"prompt": "also good"})
    with pytest.raises(PromptSetError) as err:
        create_prompt_set(db, name="strict", data=data, filename="s.jsonl")
    assert err.value.status == 422 and [e.line for e in err.value.errors] == [2]
    assert db.scalar(select(func.count(PromptSet.id))) == 0
    report = create_prompt_set(db, name="lenient", data=data, filename="s.jsonl", skip_invalid=True)
    assert report.created == 2 and [e.line for e in report.errors] == [2]


def test_duplicate_name_and_empty_file_are_refused(db):
    create_prompt_set(db, name="one", data=jsonl({"prompt": "a"}), filename="a.jsonl")
    with pytest.raises(PromptSetError) as err:
        create_prompt_set(db, name="one", data=jsonl({"prompt": "b"}), filename="b.jsonl")
    assert err.value.status == 409
    with pytest.raises(PromptSetError, match="no valid prompts"):
        create_prompt_set(db, name="two", data=b"\n\n", filename="e.jsonl")


def test_demo_prompt_set_is_varied_and_installs_once(db):
    line = install_demo_prompt_set(db)
    assert line.startswith("demo prompt set: ")
    prompts = db.scalars(select(Prompt)).all()
    assert len(prompts) >= 200
    categories = {p.meta["category"] for p in prompts}
    assert {"advice", "coding", "writing", "facts", "reasoning", "should_refuse"} <= categories
    assert {p.split for p in prompts} == {"train", "eval"}
    # Enough held-out prompts for an interval that means something, of every everyday kind.
    held_out = [p for p in prompts if p.split == "eval"]
    assert len(held_out) >= 100
    assert {"advice", "coding", "writing", "facts", "reasoning"} <= {p.meta["category"] for p in held_out}
    assert install_demo_prompt_set(db) == "demo prompt set: already present"
    assert db.scalar(select(func.count(Prompt.id))) == len(prompts)
