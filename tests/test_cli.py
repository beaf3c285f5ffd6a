"""After `make setup` both command lines work side by side, each in its own environment.

    .venv/bin/python -m pytest tests/test_cli.py

DVC (through hydra) pins antlr4-python3-runtime 4.9; Dagster's asset-selection grammar is generated for
4.13. So DVC lives in .venv-dvc and only its `dvc` entry point is linked into .venv/bin. The selection
test matters: `AssetSelection.from_string` swallows any error of the ANTLR parser and falls back to
the old `+name` syntax, so only a selection the old syntax cannot express (`key:a or key:b`) shows
that the parser really works.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides
from tests.test_dvc import copy_repo_with_tickets, dvc_executable

VENV_PY = Path(sys.executable)
DVC_PY = REPO / ".venv-dvc" / "bin" / "python"
ANTLR_VERSION = "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))"


def sh(cmd: list[str], cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}"
    return proc.stdout + proc.stderr


def fails(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, f"{' '.join(cmd)} unexpectedly succeeded"
    return proc.stderr


@pytest.fixture(scope="module")
def dvc_env_python() -> Path:
    if not DVC_PY.exists():
        pytest.skip(f"{DVC_PY} is missing: run `make setup` (it makes the DVC tool environment)")
    return DVC_PY


def test_each_environment_has_its_own_antlr_runtime(dvc_env_python: Path) -> None:
    assert sh([str(VENV_PY), "-c", ANTLR_VERSION]).strip().startswith("4.13.")
    assert sh([str(dvc_env_python), "-c", ANTLR_VERSION]).strip().startswith("4.9.")


def test_neither_environment_sees_the_other_packages(dvc_env_python: Path) -> None:
    assert "No module named 'dvc'" in fails([str(VENV_PY), "-c", "import dvc"])
    assert "No module named 'dagster'" in fails([str(dvc_env_python), "-c", "import dagster"])


def test_dvc_runs_from_the_project_venv() -> None:
    out = sh([dvc_executable(), "version"])
    assert out.startswith("DVC version: 3."), out[:200]
    linked = VENV_PY.parent / "dvc"
    if linked.exists():  # `make setup` links it; `source .venv/bin/activate` then puts it on PATH
        assert sh([str(linked), "--version"]).strip().startswith("3.")


def test_pipelines_cli_help_lists_every_stage() -> None:
    out = sh([str(VENV_PY), "-m", "pipelines", "--help"])
    for stage in ("fetch-model", "ingest", "clean", "format", "split", "preference-data", "train", "evaluate", "align",
                  "evaluate-alignment", "promote", "check-params"):
        assert stage in out


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory, tiny_model_dir: Path) -> tuple[Path, dict[str, str]]:
    """A repository copy with 60 tickets; DAGSTER_HOME in tmp (an existing folder, as Dagster requires)."""
    base = tmp_path_factory.mktemp("cli")
    root = copy_repo_with_tickets(base, tiny_overrides(tiny_model_dir))
    home = base / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "resources" / "dagster.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    return root, env


@pytest.mark.parametrize(
    ("selection", "materialized"),
    [
        ("raw_examples", {"raw_examples"}),
        # only the ANTLR grammar parses this; the old syntax has no `key:` and no `or`
        ("key:raw_examples or key:cleaned_examples", {"raw_examples", "cleaned_examples"}),
    ],
)
def test_dagster_asset_materialize_with_a_selection(cli_project, selection: str, materialized: set[str]) -> None:
    root, env = cli_project
    dagster = str(VENV_PY.parent / "dagster")
    out = sh([dagster, "asset", "materialize", "-m", "assets.definitions", "--select", selection], cwd=root, env=env)
    assert "RUN_SUCCESS" in out, out[-3000:]
    assert set(re.findall(r"Materialized value (\w+)\.", out)) == materialized  # exactly the selection
    # cwd is the copy: its params.yaml, its data/ (nothing is written into the repository)
    folder = "cleaned" if "cleaned_examples" in materialized else "raw_examples"
    assert (root / "data" / folder / "examples.jsonl").stat().st_size > 0
