"""An output that cannot be written: one sentence and exit 2 before any work, the previous output left as it was,
no temporary folder left behind; a failure during the write or the exchange puts nothing half-done in place.

Handed case 09. Root ignores write permissions, so when the tests run as root the stage is started without
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER (setpriv, util-linux), as the reproducer does.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import io
from pipelines.io import StageError, atomic_dir
from tests.conftest import REPO, write_project

_CAPS = "-dac_override,-dac_read_search,-fowner"


def _no_dac_override() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which ignores write permissions, and setpriv (util-linux) is not installed "
                    "to drop CAP_DAC_OVERRIDE")
    return [setpriv, f"--inh-caps={_CAPS}", f"--bounding-set={_CAPS}"]


def _stage(stage: str, params: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "pipelines", stage, "--params", str(params)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)


def _state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def built(tmp_path):
    """A project whose ingest and clean outputs exist (then made read-only by the test); permissions restored."""
    raw = tmp_path / "raw_in"
    raw.mkdir()
    (raw / "a.jsonl").write_text('{"prompt": "where is my parcel", "completion": "it ships today"}\n')
    params = write_project(tmp_path / "proj", raw_from=raw)
    for stage in ("ingest", "clean"):
        assert _stage(stage, params).returncode == 0
    yield params
    for folder, _, _ in os.walk(params.parent / "data"):
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("stage", ["ingest", "clean"])
@pytest.mark.parametrize("read_only", ["parent", "output"])
def test_a_read_only_output_is_one_sentence_and_leaves_the_previous_output(built, stage, read_only):
    prefix = _no_dac_override()
    data = built.parent / "data"
    key, name = {"ingest": ("raw_examples", "raw_examples"), "clean": ("cleaned", "cleaned")}[stage]
    out = data / name
    before = _state(out)
    if read_only == "parent":  # case 09 (a): data/ read-only
        data.chmod(0o555)
        words = f"'{data}' is not writable (permission denied); make it writable"
    else:  # case 09 (b): the output folder read-only, data/ writable
        for file in out.iterdir():
            file.chmod(0o444)
        out.chmod(0o555)
        words = f"'{out}' is not writable (permission denied), so the previous output in it cannot be deleted"
    for _ in range(2):  # and the same on a rerun
        run = _stage(stage, built, prefix)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: cannot write paths.{key} = 'data/{name}'")
        assert words in run.stderr, run.stderr
        assert _state(out) == before
        assert [p.name for p in data.iterdir() if p.name.endswith(".tmp")] == []


def _previous(out: Path) -> dict[str, str]:
    with atomic_dir(out, "cleaned") as tmp:
        (tmp / "report.json").write_text('{"v": "previous"}')
    return _state(out)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_write_that_fails_midway_leaves_the_previous_output(tmp_path, err):
    out = tmp_path / "cleaned"
    before = _previous(out)
    with pytest.raises(StageError) as exc:
        with atomic_dir(out, "cleaned") as tmp:
            (tmp / "examples.jsonl").write_text("half")
            raise OSError(err, os.strerror(err), str(tmp / "examples.jsonl"))
    message = str(exc.value)
    assert message.startswith(f"could not write '{out}' ({os.strerror(err)} at '{tmp / 'examples.jsonl'}'); the "
                              "previous output is unchanged;")
    assert ("free some disk space" in message) is (err == errno.ENOSPC)
    assert _state(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cleaned"]


def test_an_exchange_that_fails_leaves_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "cleaned"
    before = _previous(out)

    def refuse(a, b):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(a), None, str(b))

    monkeypatch.setattr(io, "_exchange", refuse)
    with pytest.raises(StageError, match=r"could not write .*Permission denied.*the previous output is unchanged"):
        with atomic_dir(out, "cleaned") as tmp:
            (tmp / "report.json").write_text('{"v": "new"}')
    assert _state(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cleaned"]


def test_an_unreadable_input_read_while_writing_is_named_as_an_input(tmp_path):
    out = tmp_path / "out" / "cleaned"
    source = tmp_path / "in" / "examples.jsonl"
    with pytest.raises(StageError, match=rf"could not read '{source}' \(Permission denied\) while writing '{out}'"):
        with atomic_dir(out, "cleaned"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(source))


def test_a_bug_is_not_turned_into_a_user_error(tmp_path):
    with pytest.raises(IsADirectoryError):  # not an environment errno: keeps its traceback
        with atomic_dir(tmp_path / "cleaned", "cleaned") as tmp:
            open(tmp)  # noqa: SIM115
    assert sorted(p.name for p in tmp_path.iterdir()) == []
