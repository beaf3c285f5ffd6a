"""DVC reproduces the data stages, skips what has not changed, and re-runs only what a param touches.

Runs `dvc` from its own tool environment (.venv-dvc, linked into .venv/bin by `make setup`) on a
temporary copy of the repository whose params point at the tiny test model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_overrides, write_project

DATA_STAGES = ["fetch_model", "ingest", "clean", "format", "split"]
_SKIP = {".git", ".venv", ".venv-dvc", ".dagster_home", "__pycache__", ".pytest_cache", ".ruff_cache", "bench"}


def dvc_executable() -> str:
    for candidate in (REPO / ".venv-dvc" / "bin" / "dvc", Path(sys.executable).parent / "dvc"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("dvc")
    assert found, "dvc is not installed: run `make setup` (it installs DVC into .venv-dvc)"
    return found


def copy_repo(dest: Path) -> Path:
    """The tracked sources + bundled raw data, without outputs, venvs or git history."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in _SKIP}
        if Path(folder) == REPO / "data":
            skip |= {n for n in names if n != "raw"}
        if Path(folder) == REPO / ".dvc":  # the local cache (GBs after real runs) and DVC's scratch space
            skip |= {"cache", "tmp"}
        return skip

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def copy_repo_with_tickets(base: Path, overrides: dict) -> Path:
    """A repository copy under `base` whose data/raw holds 60 distinct tickets and whose params take `overrides`."""
    import json

    from tests.test_materialize import raw_rows

    seed = base / "seed"
    seed.mkdir()
    (seed / "tickets.jsonl").write_text("".join(json.dumps(row) + "\n" for row in raw_rows()))
    root = copy_repo(base / "project")
    shutil.rmtree(root / "data" / "raw")
    write_project(root, overrides, raw_from=seed)
    return root


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, str]]:
    root = copy_repo(tmp_path_factory.mktemp("repo") / "project")
    write_project(root, tiny_overrides(tiny_model_dir))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    return root, env


def test_repro_runs_data_stages_then_is_a_no_op(project):
    root, env = project
    first = run([dvc_executable(), "repro", "split"], root, env)
    assert ran_stages(first) == set(DATA_STAGES)
    assert (root / "data" / "splits" / "train.jsonl").stat().st_size > 0

    second = run([dvc_executable(), "repro", "split"], root, env)
    assert ran_stages(second) == set(), second
    status = run([dvc_executable(), "status", "split"], root, env)
    assert "up to date" in status


def test_changing_a_clean_param_reruns_only_downstream(project):
    root, env = project
    run([dvc_executable(), "repro", "split"], root, env)  # make sure everything is built
    params_file = root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["clean"]["near_dup_threshold"] = 0.9
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    out = run([dvc_executable(), "repro", "split"], root, env)
    # clean reads the threshold; split reads it too (leakage check). Nothing upstream re-runs.
    assert {"clean"} <= ran_stages(out) <= {"clean", "format", "split"}, out
    assert not ran_stages(out) & {"fetch_model", "ingest"}


@pytest.mark.parametrize("cache_type", ["copy", "symlink"])
def test_checkout_restores_outputs_that_their_stage_may_replace(project, cache_type):
    """The ownership marker is a file of the output, so DVC caches it and `dvc checkout` (or `dvc pull`, or a
    `git checkout` of another revision) restores it; the stage then replaces the restored folder as its own, with
    DVC's files copied or linked into the cache."""
    from pipelines.io import MARKER

    root, env = project
    dvc = dvc_executable()
    run([dvc, "config", "--local", "cache.type", cache_type], root, env)
    try:
        run([dvc, "repro", "split"], root, env)
        cleaned = root / "data" / "cleaned"
        marker = (cleaned / MARKER).read_bytes()
        shutil.rmtree(cleaned)
        run([dvc, "checkout", "--relink", "clean"], root, env)
        assert (cleaned / MARKER).read_bytes() == marker
        assert (cleaned / "examples.jsonl").is_symlink() is (cache_type == "symlink")
        assert "up to date" in run([dvc, "status", "clean"], root, env)
        out = run([sys.executable, "-m", "pipelines", "clean"], root, env)  # replaces the restored folder
        assert out.startswith("clean: ") and not (cleaned / "examples.jsonl").is_symlink()
        assert "up to date" in run([dvc, "status", "clean"], root, env)  # same bytes, marker included
    finally:
        run([dvc, "config", "--local", "--unset", "cache.type"], root, env)

