"""The dataset card: README.md with the hub's YAML front matter (so `load_dataset(folder)` finds the
splits) and what a reader needs to trust the data: counts, fields, filters, split, policy versions,
agreement, pseudonymisation and licence."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.services.exports.rows import Format
from app.services.exports.spec import ExportSpec
from app.services.exports.stats import ExportStats


@dataclass(frozen=True)
class PolicyNote:
    version: int
    kind: str
    status: str
    parent_version: int | None
    created_at: datetime | None


def _yaml_str(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, and it escapes everything that needs it.
    return json.dumps(value, ensure_ascii=False)


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" or value == [] else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _size_category(rows: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return label
    return "1M<n<10M"


def front_matter(spec: ExportSpec, fmt: Format, splits: list[str], rows: int) -> str:
    lines = [
        "---",
        f"pretty_name: {_yaml_str(spec.name)}",
        f"license: {spec.license}",
        "tags:",
        "- prefloop",
        "- rlhf",
        "- human-feedback",
        f"- {fmt.name.replace('_', '-')}",
        "size_categories:",
        f"- {_yaml_str(_size_category(rows))}",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines.append("---")
    return "\n".join(lines) + "\n"


def render_card(
    *,
    spec: ExportSpec,
    fmt: Format,
    stats: ExportStats,
    splits: list[str],
    files: list[str],
    policies: list[PolicyNote],
    prompt_set_names: dict[int, str],
    generated_at: datetime,
    leaderboard: dict | None = None,
    pseudonym_key_id: str = "",
) -> str:
    summary = stats.as_dict()
    out = [front_matter(spec, fmt, splits, stats.total_rows)]
    out.append(f"# {spec.name}\n")
    out.append(
        f"{fmt.title}, exported from a prefloop deployment on {generated_at:%Y-%m-%d %H:%M} UTC. "
        f"{fmt.description}\n"
    )

    out.append("## Counts\n")
    out.append("| split | rows | prompts |\n|---|---:|---:|")
    for split in splits:
        out.append(f"| {split} | {stats.rows.get(split, 0)} | {summary['prompts'].get(split, 0)} |")
    out.append(f"| **all** | {stats.total_rows} | {summary['total_prompts']} |\n")
    if stats.total_rows == 0:
        out.append(
            "No rows matched the filters. The data file still carries the schema, but `datasets` cannot load "
            "an empty split: widen the filters and export again.\n"
        )
    out.append(f"Annotators: {summary['annotators']} (pseudonymous). Tasks read: {stats.tasks_seen}.")
    for key, count in summary["details"].items():
        out.append(f"- {key}: {count}")
    out.append("")

    out.append("## Fields\n")
    out.append("| field | type | meaning |\n|---|---|---|")
    for name, dtype, meaning in fmt.fields:
        out.append(f"| `{name}` | `{_cell(dtype)}` | {_cell(meaning)} |")
    out.append("")

    out.append("## Filters\n")
    out.append("| filter | value |\n|---|---|")
    filters = spec.filter_summary()
    names = [f"{prompt_set_names.get(i, '?')} (id {i})" for i in spec.prompt_set_ids]
    filters["prompt_set_ids"] = ", ".join(names) if names else "all"
    filters["policy_versions"] = ", ".join(map(str, spec.policy_versions)) if spec.policy_versions else "all"
    for key, value in filters.items():
        out.append(f"| {key} | {_cell(value)} |")
    out.append(
        "\nDate bounds apply to when annotations were submitted (`until` is exclusive). Agreement always counts "
        "every non-skipped annotation of a task, whatever the other filters.\n"
    )

    out.append("## Split\n")
    if spec.split_mode == "hash":
        out.append(
            f'By prompt: a prompt is in `test` when sha256("prefloop-split:{spec.seed}:<prompt content hash>") '
            f"read as a number in [0, 1) is below {spec.test_fraction}. **Seed: {spec.seed}.** A prompt never "
            "appears in two splits, and the same seed gives the same split in every export.\n"
        )
    elif spec.split_mode == "stored":
        out.append("By prompt, as stored with each prompt set at upload (eval prompts are `test`).\n")
    else:
        out.append("No split: every row is in `train`.\n")

    out.append("## Policy versions\n")
    out.append("| version | kind | status | parent | registered | rows |\n|---:|---|---|---:|---|---:|")
    by_version = summary["rows_by_policy_version"]
    for note in policies:
        created = f"{note.created_at:%Y-%m-%d}" if note.created_at else None
        out.append(
            f"| {note.version} | {note.kind} | {note.status} | {_cell(note.parent_version)} | {_cell(created)} "
            f"| {by_version.get(str(note.version), 0)} |"
        )
    if "none" in by_version:
        out.append(f"| — | unknown | — | — | — | {by_version['none']} |")
    out.append("")

    agreement = summary["agreement"]
    out.append("## Agreement\n")
    out.append(
        "Percent agreement between annotators who judged the same pair of responses (same order, tie or "
        "all-bad). A pairwise or arena row judged by one annotator counts as 1.0; a rankings row of a task "
        "with one annotator has none. The '2 or more' figures leave single-annotator rows out.\n"
    )
    out.append("| figure | value |\n|---|---:|")
    for key, value in agreement.items():
        out.append(f"| {key.replace('_', ' ')} | {_cell(value)} |")
    out.append("")

    if leaderboard is not None:
        out.extend(_leaderboard_section(leaderboard))

    out.append("## Annotators and privacy\n")
    out.append(
        "Annotators appear only as pseudonyms (`annotator-…`): an HMAC-SHA256 of the internal user id under the "
        "deployment's pseudonym key (a key of its own, never the one that signs logins), so they are stable "
        "across exports of one deployment and cannot be linked to usernames, emails or other deployments. "
        "No usernames, emails or addresses are exported. Rationales and skip reasons are free text typed by "
        "annotators.\n"
    )
    out.append(
        f"**Pseudonym key id: `{pseudonym_key_id or 'unknown'}`.** Two exports whose key ids match name each "
        "annotator alike; different ids mean their pseudonyms cannot be compared.\n"
    )
    if stats.excluded_annotators:
        out.append(
            f"{stats.excluded_annotators} annotator(s) whose gold-task accuracy fell under the deployment's "
            "threshold were left out entirely (their judgements give no rows and do not count in agreement).\n"
        )

    out.append("## Licence\n")
    if spec.license == "other":
        out.append(
            "No licence was chosen at export (`license: other`). The prompts and responses belong to the "
            "data owner of this deployment; ask them before redistributing.\n"
        )
    else:
        out.append(
            f"Released under `{spec.license}`. Responses were generated by the policy versions listed above; "
            "the licences of their base model and of the prompts also apply.\n"
        )

    out.append("## Files\n")
    out.extend(f"- `{name}`" for name in files)
    out.append("")
    out.append("## Usage\n")
    out.append(
        '```python\nfrom datasets import load_dataset\n\nds = load_dataset("path/to/this/folder")\n'
        f"{fmt.usage}\n```\n"
    )
    return "\n".join(out)


def _leaderboard_section(board: dict) -> list[str]:
    """Policy versions rated from blind arena battles (`leaderboard.json` holds the full record)."""
    lines = ["## Policy leaderboard\n"]
    if not board.get("entries"):
        lines.append("No arena battles yet: the leaderboard fills as annotators judge arena tasks.\n")
        return lines
    lines.append(f"{board['method']}; {board['battles']} battles. Full record: `leaderboard.json`.\n")
    lines.append("| rank | version | kind | rating | 95% interval | battles | wins | losses | ties |")
    lines.append("|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for entry in board["entries"]:
        rating = entry["rating"]
        interval = f"{_cell(rating.get('low'))} – {_cell(rating.get('high'))}"
        lines.append(
            f"| {entry['rank']} | {entry['policy_version']} | {entry['kind']} | {_cell(rating.get('value'))} "
            f"| {interval} | {entry['battles']} | {entry['wins']} | {entry['losses']} | {entry['ties']} |"
        )
    lines.append("")
    return lines
