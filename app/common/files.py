"""Durable folders on disk: fsync a tree, hash a folder, publish a folder atomically.

A published folder appears under its final name in one rename, after every byte is on disk, so
readers see either nothing or the complete folder; its hash is computed before the rename and can be
recorded elsewhere (policy rows, run results) because a published folder is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (and root itself) to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_folder(path: Path) -> str:
    """A stable hash of a folder: its files' relative paths, sizes and contents, in sorted order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        rel = file.relative_to(path).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "big") + rel)
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def atomic_publish(src_builder: Callable[[Path], None], dest: Path) -> str:
    """Build a folder in a temporary sibling, fsync it, hash it, rename it to `dest`; return the hash.

    Readers see either no `dest` or a complete one. Refuses when `dest` already exists, because a
    published folder is immutable (its hash may be recorded elsewhere).
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; published folders are never overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same filesystem, so the final rename is atomic and listings skip it.
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        src_builder(tmp)
        fsync_tree(tmp)
        digest = sha256_folder(tmp)
        if dest.exists():  # someone published while we were building
            raise FileExistsError(f"{dest} already exists; published folders are never overwritten")
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest
