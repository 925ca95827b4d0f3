"""`prefloop export`: preference data as a Hugging Face dataset (card and data files) from the command line."""

from __future__ import annotations

import time
from pathlib import Path

import click
from pydantic import ValidationError
from sqlalchemy import select
from tqdm import tqdm

from app.config import get_settings
from app.data.db import session_scope
from app.data.models import PromptSet
from app.services.exports import ExportSpec, export_dataset, pseudonym_key


@click.command("export")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "format_",
    type=click.Choice(["pairwise", "pairwise_text", "rankings", "hh_rlhf", "arena"]),
    default="pairwise",
    show_default=True,
    help="pairwise: TRL conversational prompt/chosen/rejected (DPOTrainer, RewardTrainer); pairwise_text: "
    "TRL standard text; rankings: raw per-annotator rankings with ties, all-bad, flags; hh_rlhf: Anthropic "
    "'\\n\\nHuman: …\\n\\nAssistant: …' transcripts; arena: model_a/model_b/winner battles.",
)
@click.option("--file-format", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True)
@click.option(
    "--prompt-set", "prompt_sets", multiple=True, help="Only this prompt set (name or id); repeatable."
)
@click.option("--since", type=click.DateTime(), default=None, help="Annotations submitted at or after (UTC).")
@click.option("--until", type=click.DateTime(), default=None, help="Annotations submitted before (UTC).")
@click.option(
    "--policy-version", "policy_versions", type=int, multiple=True, help="Only responses of this version."
)
@click.option(
    "--min-agreement", type=click.FloatRange(0, 1), default=None, help="Drop rows below this agreement."
)
@click.option(
    "--min-annotators",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="Drop rows judged by fewer annotators (2 keeps overlapped items only).",
)
@click.option("--exclude-flagged", is_flag=True, help="Drop annotations that carry a flag.")
@click.option("--include-skipped", is_flag=True, help="Keep skipped annotations (rankings format).")
@click.option(
    "--split",
    "split_mode",
    type=click.Choice(["hash", "stored", "none"]),
    default="hash",
    show_default=True,
    help="hash: seeded hash of the prompt; stored: the prompt sets' own split.",
)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option(
    "--seed", type=click.IntRange(0), default=0, show_default=True, help="Split seed (in the card)."
)
@click.option(
    "--license", "license_", default="other", show_default=True, help="Hub licence id for the card."
)
@click.option("--name", default="prefloop-preferences", show_default=True, help="Dataset name in the card.")
@click.option(
    "--chat-template-version",
    type=int,
    default=None,
    help="pairwise_text: render prompts with this policy version's chat template instead of HH text.",
)
@click.option("--rows-per-shard", type=click.IntRange(1000), default=None, help="Rows per data file.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def export_command(
    output: Path,
    format_: str,
    file_format: str,
    prompt_sets: tuple[str, ...],
    since,
    until,
    policy_versions: tuple[int, ...],
    min_agreement: float | None,
    min_annotators: int,
    exclude_flagged: bool,
    include_skipped: bool,
    split_mode: str,
    test_fraction: float,
    seed: int,
    license_: str,
    name: str,
    chat_template_version: int | None,
    rows_per_shard: int | None,
    force: bool,
) -> None:
    """Export preference data as a Hugging Face dataset: OUTPUT/README.md (dataset card) and
    OUTPUT/data/{train,test}-*.parquet|jsonl, or the same as a zip when OUTPUT ends in .zip.

    Reads the database of the current settings, streams rows (memory stays flat), splits by prompt with
    a recorded seed, and writes annotators only as keyed pseudonyms. `datasets.load_dataset(OUTPUT)` loads it.
    """
    settings = get_settings()
    with session_scope() as db:
        set_ids = []
        for ref in prompt_sets:
            column = PromptSet.id if ref.isdigit() else PromptSet.name
            found = db.scalar(select(PromptSet.id).where(column == (int(ref) if ref.isdigit() else ref)))
            if found is None:
                raise click.BadParameter(f"no prompt set {ref!r}", param_hint="--prompt-set")
            set_ids.append(found)
        try:
            spec = ExportSpec(
                format=format_,
                file_format=file_format,
                layout="zip" if output.suffix == ".zip" else "folder",
                prompt_set_ids=set_ids,
                since=since,
                until=until,
                policy_versions=list(policy_versions),
                min_agreement=min_agreement,
                min_annotators=min_annotators,
                exclude_flagged=exclude_flagged,
                exclude_skipped=not include_skipped,
                split_mode=split_mode,
                test_fraction=test_fraction,
                seed=seed,
                license=license_,
                name=name,
                rows_per_shard=rows_per_shard,
                text_template="chat_template" if chat_template_version is not None else "hh",
                chat_template_version=chat_template_version,
            )
        except ValidationError as exc:
            raise click.UsageError(
                "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            ) from exc
        started = time.perf_counter()
        with tqdm(total=0, desc="export", unit="task", disable=None) as bar:

            def progress(done: int, total: int, message: str) -> None:
                bar.total = total
                bar.n = done
                bar.set_postfix_str(message.split(" from ")[0], refresh=False)
                bar.refresh()

            try:
                result = export_dataset(
                    db,
                    spec,
                    output,
                    pseudonym_key=pseudonym_key(settings),
                    progress=progress,
                    overwrite=force,
                )
            except (FileExistsError, ValueError) as exc:
                raise click.ClickException(str(exc)) from exc
    rows = ", ".join(f"{split} {n}" for split, n in result.stats.rows.items()) or "no rows"
    click.echo(
        f"{spec.format} ({spec.file_format}): {result.stats.total_rows} rows ({rows}) "
        f"from {result.stats.tasks_seen} tasks in {time.perf_counter() - started:.1f}s"
    )
    click.echo(f"wrote {output} ({result.bytes / 1e6:.2f} MB); split seed {spec.seed}")
