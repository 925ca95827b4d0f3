"""Prompt-set uploads: read JSONL, CSV or Parquet, validate each row into a prompt, drop duplicates.

A row is either a `prompt` string (one user turn) or a `messages` chat list
(`[{"role": "system"|"user"|"assistant", "content": str}, ...]`, ending with a user turn),
plus an optional `id` and `metadata` object. Other columns are kept as metadata.

Every problem is reported with the line (or Parquet row) it came from, so an admin can fix the
file. Duplicates are found by a content hash of the normalised messages, the hash the split of a
stored prompt is drawn from too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_PROMPT_CHARS = 8000  # a prompt longer than this does not fit the base model's context with room to answer
MAX_ID_CHARS = 200  # prompts.external_id is VARCHAR(200)
ROLES = ("system", "user", "assistant")
FORMATS = ("jsonl", "csv", "parquet")
RESERVED_KEYS = {"prompt", "messages", "id", "metadata"}


@dataclass(frozen=True)
class RowError:
    line: int  # 1-based line of a JSONL/CSV file, or 1-based row of a Parquet file
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.message}"


@dataclass
class ParsedPrompt:
    line: int
    messages: list[dict[str, str]]
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return last_user_turn(self.messages)

    @property
    def content_hash(self) -> str:
        return content_hash(self.messages)


@dataclass
class ParseResult:
    prompts: list[ParsedPrompt]
    errors: list[RowError]
    duplicates: int  # rows dropped because an earlier row had the same content
    rows: int  # non-blank rows read


class PromptSetError(ValueError):
    """An upload that cannot be stored; `errors` lists the rows at fault, `status` the HTTP code."""

    def __init__(self, message: str, errors: list[RowError] | None = None, status: int = 422):
        super().__init__(message)
        self.errors = errors or []
        self.status = status


# ---------------------------------------------------------------- normalising and hashing


def content_hash(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def last_user_turn(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return ""


def normalise_messages(value: Any, max_chars: int = MAX_PROMPT_CHARS) -> list[dict[str, str]]:
    """Validate a `messages` list; raises ValueError with a message that says what to fix."""
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    messages: list[dict[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)} (got {role!r})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        content = content.strip()
        if not content:
            raise ValueError(f"messages[{i}].content is empty")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be a user turn (the model answers it)")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise ValueError(f"prompt is too long: {total} characters, at most {max_chars}")
    return messages


def _row_to_prompt(row: dict[str, Any], line: int, max_chars: int) -> ParsedPrompt:
    """One decoded row (a JSON object, CSV row or Parquet row) → a prompt; ValueError says why not."""
    has_prompt = row.get("prompt") not in (None, "")
    has_messages = row.get("messages") not in (None, "", [])
    if has_prompt and has_messages:
        raise ValueError("give either 'prompt' or 'messages', not both")
    if has_messages:
        raw = row["messages"]
        if isinstance(raw, str):  # CSV cells hold JSON text
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"'messages' is not valid JSON: {exc.msg} at column {exc.colno}") from None
        messages = normalise_messages(raw, max_chars)
    elif "prompt" in row or "messages" in row:
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        if not (prompt or "").strip():
            raise ValueError("prompt is empty")
        messages = normalise_messages([{"role": "user", "content": prompt}], max_chars)
    else:
        raise ValueError("no 'prompt' or 'messages' field")

    external_id = row.get("id")
    if external_id in ("", None):
        external_id = None
    else:
        if not isinstance(external_id, str | int):
            raise ValueError("'id' must be a string or an integer")
        external_id = str(external_id)
        if len(external_id) > MAX_ID_CHARS:
            raise ValueError(f"'id' is longer than {MAX_ID_CHARS} characters")

    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"'metadata' is not valid JSON: {exc.msg}") from None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError("'metadata' must be an object")
    extras = {k: v for k, v in row.items() if k not in RESERVED_KEYS and v not in (None, "")}
    meta = {**extras, **meta}
    try:
        json.dumps(meta)
    except (TypeError, ValueError):
        meta = json.loads(json.dumps(meta, default=str))
    return ParsedPrompt(line=line, messages=messages, external_id=external_id, meta=meta)


# ---------------------------------------------------------------- file formats


def detect_format(filename: str | None, data: bytes) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if data[:4] == b"PAR1":
        return "parquet"
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return "jsonl"
    return "csv"


def _iter_jsonl(data: bytes) -> list[tuple[int, dict[str, Any] | RowError]]:
    rows: list[tuple[int, dict[str, Any] | RowError]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(
                (
                    number,
                    RowError(number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start})"),
                )
            )
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((number, RowError(number, f"bad JSON: {exc.msg} at column {exc.colno}")))
            continue
        if not isinstance(obj, dict):
            rows.append((number, RowError(number, "each line must be a JSON object")))
            continue
        rows.append((number, obj))
    return rows


def _iter_csv(data: bytes) -> list[tuple[int, dict[str, Any] | RowError]]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start]
        raise PromptSetError(
            "the CSV file is not valid UTF-8; save it as UTF-8 and upload again",
            [RowError(line, f"not valid UTF-8 (byte 0x{byte:02x})")],
        ) from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "prompt" not in fields and "messages" not in fields:
        raise PromptSetError(
            "the CSV header needs a 'prompt' or a 'messages' column",
            [RowError(1, f"header has columns {fields or '(none)'}")],
        )
    reader.fieldnames = fields
    rows: list[tuple[int, dict[str, Any] | RowError]] = []
    start = 2  # the header is line 1; rows may span several lines, DictReader tracks where each ends
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if None in record:  # more cells than header columns
                rows.append((line, RowError(line, "more cells than header columns")))
                continue
            if all((v or "").strip() == "" for v in record.values()):
                continue
            rows.append((line, {k: v for k, v in record.items() if k}))
    except csv.Error as exc:
        rows.append((start, RowError(start, f"bad CSV: {exc}")))
    return rows


def _iter_parquet(data: bytes) -> list[tuple[int, dict[str, Any] | RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise PromptSetError(f"not a readable Parquet file: {exc}") from None
    if "prompt" not in table.column_names and "messages" not in table.column_names:
        raise PromptSetError(
            f"the Parquet file needs a 'prompt' or a 'messages' column (has {table.column_names})"
        )
    return [(i, row) for i, row in enumerate(table.to_pylist(), start=1)]


def parse_prompt_file(
    data: bytes, filename: str | None = None, fmt: str | None = None, max_chars: int = MAX_PROMPT_CHARS
) -> ParseResult:
    """Parse an upload into prompts, per-row errors and a duplicate count (nothing is stored)."""
    fmt = fmt or detect_format(filename, data)
    if fmt not in FORMATS:
        raise PromptSetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    reader = {"jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}[fmt]
    unit = "row" if fmt == "parquet" else "line"
    prompts: list[ParsedPrompt] = []
    errors: list[RowError] = []
    seen: set[str] = set()
    duplicates = 0
    rows = reader(data)
    for line, row in rows:
        if isinstance(row, RowError):
            errors.append(row)
            continue
        try:
            prompt = _row_to_prompt(row, line, max_chars)
        except ValueError as exc:
            errors.append(RowError(line, str(exc), unit))
            continue
        if prompt.content_hash in seen:
            duplicates += 1
            continue
        seen.add(prompt.content_hash)
        prompts.append(prompt)
    return ParseResult(prompts=prompts, errors=errors, duplicates=duplicates, rows=len(rows))
