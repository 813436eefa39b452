"""`mmstack.io.atomic`: a write that fails part-way leaves the old file and no temporary file; modes; JSON round
trip; `torch.save` through it; leftovers of interrupted writes cleaned."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from mmstack.io.atomic import (atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text,
                               clean_stale_temps)


class Unpicklable:
    """Fails while `torch.save` is part-way through writing its archive."""

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


def _names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content" and _names(tmp_path) == {"out.bin"}


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, error):
    target = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(type(error)):
        atomic_torch_save({"step": 2, "bad": Unpicklable(error)}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert _names(tmp_path) == {"state.pt"}


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def refuse(src, dst):
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and _names(tmp_path) == {"a.txt"}


def test_a_missing_folder_is_an_error_and_unserialisable_json_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "no" / "such" / "file", b"x")
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert _names(tmp_path) == set()


def test_modes_are_applied_as_given_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "default", b"x")
        atomic_write_text(tmp_path / "private", "x", mode=0o600)
        atomic_write_json(tmp_path / "shared.json", [], mode=0o664)
        atomic_torch_save(torch.zeros(1), tmp_path / "t.pt")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"default": 0o644, "private": 0o600, "shared.json": 0o664, "t.pt": 0o644}


def test_json_round_trips_with_indent_unicode_and_a_final_newline(tmp_path):
    data = {"name": "café ☕", "rows": [[1, 2.5], [None, True]], "nested": {"a": []}}
    path = tmp_path / "d.json"
    atomic_write_json(path, data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert text.endswith("}\n") and "café ☕" in text and '\n  "rows"' in text


def test_text_is_utf8_and_newlines_are_kept(tmp_path):
    atomic_write_text(tmp_path / "t.csv", "a,b\r\nü,2\n")
    assert (tmp_path / "t.csv").read_bytes() == "a,b\r\nü,2\n".encode("utf-8")


def test_clean_stale_temps_removes_only_old_temporary_files(tmp_path):
    for name in (".tmp-old", ".tmp-new", "keep.json", ".other"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".tmp-folder").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-nested").write_text("x")
    hour_ago = os.path.getmtime(tmp_path / ".tmp-old") - 3600
    os.utime(tmp_path / ".tmp-old", (hour_ago, hour_ago))

    assert clean_stale_temps(tmp_path, older_than_s=600) == 1
    assert ".tmp-old" not in _names(tmp_path) and ".tmp-new" in _names(tmp_path)
    assert clean_stale_temps(tmp_path) == 1  # older_than_s=0: every temporary file
    assert _names(tmp_path) == {"keep.json", ".other", ".tmp-folder", "sub"}
    assert (tmp_path / "sub" / ".tmp-nested").exists()
    assert clean_stale_temps(tmp_path, prefix=".oth") == 1 and clean_stale_temps(tmp_path / "missing") == 0
