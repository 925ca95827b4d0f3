"""Researcher exports: preference data in the formats TRL, HH-RLHF and arena tools read.

    spec = ExportSpec(format="pairwise", file_format="parquet", layout="folder", min_annotators=2)
    result = export_dataset(db, spec, Path("out/prefs"), pseudonym_key=pseudonym_key(settings))
    datasets.load_dataset("out/prefs")  # train / test splits, README.md dataset card

Modules: spec (what to export), source (keyset-paged reading), agreement, formats (the formats by
name) with rows (what a format is) and the row builders and schemas of each family (pairwise, rankings,
arena), split, pseudonym, writers (JSONL / Parquet shards), stats and card (README.md), exporter
(the pipeline), jobs (the export run behind the API and the Celery task).
"""

from app.services.exports.exporter import ExportCancelled, ExportResult, export_dataset, iter_rows
from app.services.exports.formats import FORMATS, get_format
from app.services.exports.pseudonym import Pseudonymizer, pseudonym, pseudonym_key
from app.services.exports.spec import ExportSpec

__all__ = [
    "FORMATS",
    "ExportCancelled",
    "ExportResult",
    "ExportSpec",
    "Pseudonymizer",
    "export_dataset",
    "get_format",
    "iter_rows",
    "pseudonym",
    "pseudonym_key",
]
