"""Writers: JSONL lines and Parquet row groups, in shards named the way the Hugging Face hub expects.

Rows are written as they come. The Parquet writer keeps at most one row group in memory (pyarrow's
ParquetWriter appends each group to the open file), the JSONL writer none, so memory does not grow
with the export. Shard files get their final `-00000-of-0000N` names when the split closes, once N is
known.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ROW_GROUP = 2000


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=_json_default, separators=(",", ":")) + "\n"


class FileWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlFile:
    def __init__(self, path: Path, schema: pa.Schema):
        self._file = path.open("w", encoding="utf-8", newline="\n")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json_line(row))

    def close(self) -> None:
        self._file.close()


class ParquetFile:
    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int = DEFAULT_ROW_GROUP):
        self._schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._buffer: list[dict[str, Any]] = []
        self._row_group_size = row_group_size

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self._row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            # Column by column is ~3x faster than Table.from_pylist for these nested rows.
            rows = self._buffer
            columns = [pa.array([row[f.name] for row in rows], type=f.type) for f in self._schema]
            self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))
            self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


class SplitWriter:
    """All files of one split under data/: `<split>-00000-of-00002.parquet`, …"""

    def __init__(
        self,
        data_dir: Path,
        split: str,
        file_format: str,
        schema: pa.Schema,
        rows_per_shard: int | None = None,
        row_group_size: int = DEFAULT_ROW_GROUP,
    ):
        self.data_dir, self.split, self.file_format = data_dir, split, file_format
        self.schema, self.rows_per_shard, self.row_group_size = schema, rows_per_shard, row_group_size
        self.rows = 0
        self._shards: list[Path] = []
        self._current: FileWriter | None = None
        self._in_shard = 0

    def _open_shard(self) -> None:
        path = self.data_dir / f".{self.split}-{len(self._shards):05d}.partial"
        self._shards.append(path)
        if self.file_format == "parquet":
            self._current = ParquetFile(path, self.schema, self.row_group_size)
        else:
            self._current = JsonlFile(path, self.schema)
        self._in_shard = 0

    def write(self, row: dict[str, Any]) -> None:
        if self._current is None or (self.rows_per_shard and self._in_shard >= self.rows_per_shard):
            if self._current is not None:
                self._current.close()
            self._open_shard()
        assert self._current is not None
        self._current.write(row)
        self._in_shard += 1
        self.rows += 1

    def close(self) -> list[Path]:
        if self._current is None:
            self._open_shard()  # an empty split still gets a (schema-only) file
        assert self._current is not None
        self._current.close()
        total = len(self._shards)
        final = []
        for index, path in enumerate(self._shards):
            target = self.data_dir / f"{self.split}-{index:05d}-of-{total:05d}.{self.file_format}"
            path.rename(target)
            final.append(target)
        return final
