"""The per-run shortcuts of the Dagster layer: file hashes reused while a file's stat is unchanged, and
params.yaml parsed once while it is unchanged. Both must notice every real change."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import pipelines.versions
from assets.versions import HASH_CACHE, HashCache, content_hash
from pipelines.io import RACY_NS, sha256_file


def _age(path: Path, seconds: float = 5.0) -> None:
    """Give `path` an mtime in the past, as a file written a while ago has (ctime is set to now by utime)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files whose bytes are read by pipelines.versions."""
    hashed: list[str] = []
    monkeypatch.setattr(pipelines.versions, "sha256_file", lambda p: hashed.append(Path(p).name) or sha256_file(p))
    return hashed


def _wait_past_racy_window() -> None:
    time.sleep(RACY_NS / 1e9 + 0.05)


def test_an_unchanged_file_is_hashed_once_and_its_hash_is_the_bytes_hash(tmp_path: Path, counted: list[str]) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.jsonl").write_text("one\n")
    (folder / "b.jsonl").write_text("two\n")
    _wait_past_racy_window()
    first = content_hash([folder], tmp_path)
    assert sorted(counted) == ["a.jsonl", "b.jsonl"] and (tmp_path / HASH_CACHE).is_file()
    assert first == content_hash([folder])  # the uncached hash: the cache changes speed, not the answer
    counted.clear()
    assert content_hash([folder], tmp_path) == first and counted == []  # a new process reads the cache file


@pytest.mark.parametrize("edit", ["same-size-rewrite", "mtime-set-back", "replaced-by-rename"])
def test_every_kind_of_change_is_rehashed(tmp_path: Path, counted: list[str], edit: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("abc\n")
    _age(path)
    _wait_past_racy_window()  # utime changed ctime: wait until the entry may be remembered
    before = content_hash([path], tmp_path)
    stat = path.stat()
    if edit == "same-size-rewrite":
        path.write_text("abd\n")
    elif edit == "mtime-set-back":  # `cp -p` style: same size, old mtime; only ctime and bytes tell
        path.write_text("xyz\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:  # atomic writers (every stage) replace the file: a new inode
        tmp = tmp_path / "new.tmp"
        tmp.write_text("new\n")
        os.replace(tmp, path)
    counted.clear()
    after = content_hash([path], tmp_path)
    assert counted == ["data.jsonl"] and after != before and after == content_hash([path])


def test_a_file_changed_within_the_racy_window_is_not_remembered(tmp_path: Path, counted: list[str]) -> None:
    path = tmp_path / "fresh.jsonl"
    path.write_text("just written\n")
    content_hash([path], tmp_path)
    content_hash([path], tmp_path)
    assert counted == ["fresh.jsonl", "fresh.jsonl"]  # a second write in the same clock tick could keep the stat
    assert str(path.resolve()) not in HashCache(tmp_path / HASH_CACHE).entries


def test_a_corrupt_or_unwritable_cache_only_costs_a_rehash(tmp_path: Path, counted: list[str]) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("x\n")
    _age(path)
    _wait_past_racy_window()
    (tmp_path / HASH_CACHE).parent.mkdir(parents=True)
    (tmp_path / HASH_CACHE).write_text("{not json")
    assert content_hash([path], tmp_path) == content_hash([path])
    assert json.loads((tmp_path / HASH_CACHE).read_text())[str(path.resolve())][4] == sha256_file(path)
    (tmp_path / HASH_CACHE).unlink()
    (tmp_path / HASH_CACHE).mkdir()  # cannot be replaced by a file: still the right hash, no error
    assert content_hash([path], tmp_path) == content_hash([path])


def test_deleted_files_are_forgotten(tmp_path: Path) -> None:
    keep, gone = tmp_path / "keep.jsonl", tmp_path / "gone.jsonl"
    keep.write_text("k\n")
    gone.write_text("g\n")
    _wait_past_racy_window()
    content_hash([keep, gone], tmp_path)
    gone.unlink()
    new = tmp_path / "new.jsonl"
    new.write_text("n\n")
    _wait_past_racy_window()
    content_hash([keep, new], tmp_path)
    assert set(HashCache(tmp_path / HASH_CACHE).entries) == {str(keep.resolve()), str(new.resolve())}


def test_params_are_parsed_once_and_reloaded_after_an_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resources.project
    from resources.project import ProjectResource

    params_file = tmp_path / "params.yaml"
    params_file.write_text("split:\n  seed: 1\n")
    _wait_past_racy_window()  # a file changed in the last second is re-read every time
    loads: list[Path] = []
    real = resources.project.load_params
    monkeypatch.setattr(resources.project, "load_params", lambda p: loads.append(p) or real(p))
    project = ProjectResource(params_file=str(params_file))
    first = project.params()
    assert project.params() is first and len(loads) == 1 and first.split.seed == 1
    params_file.write_text("split:\n  seed: 2\n")  # same size: the stat (mtime, ctime) still tells
    assert project.params().split.seed == 2 and len(loads) == 2
    assert project.params().split.seed == 2 and len(loads) == 3  # just edited: not remembered yet
