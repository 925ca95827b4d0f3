"""Atomic publishing of a folder with a stable hash."""

from __future__ import annotations

import pytest

from app.common.files import atomic_publish, sha256_folder


def test_sha256_folder_depends_on_names_and_contents_not_creation_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, order in ((a, ["x.txt", "sub/y.bin"]), (b, ["sub/y.bin", "x.txt"])):
        for name in order:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"data-" + name.encode())
    assert sha256_folder(a) == sha256_folder(b)
    (b / "x.txt").write_bytes(b"changed")
    assert sha256_folder(a) != sha256_folder(b)
    (b / "x.txt").write_bytes(b"data-x.txt")
    (b / "x.txt").rename(b / "z.txt")
    assert sha256_folder(a) != sha256_folder(b)


def test_atomic_publish_builds_hashes_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "models" / "rm-1"

    def build(folder):
        (folder / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (folder / "meta.json").write_text("{}")

    digest = atomic_publish(build, dest)
    assert digest == sha256_folder(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["meta.json", "weights.bin"]
    with pytest.raises(FileExistsError):
        atomic_publish(build, dest)
    assert sha256_folder(dest) == digest


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "rm-2"

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_publish(broken, dest)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
