"""Versions with DVC: push a full run, pull it into a fresh clone, run an experiment, go back to an older adapter.

    .venv/bin/python -m pytest tests/test_dvc_versions.py

One temporary git repository (a copy of this one with the tiny model and 60 short tickets) runs the whole
pipeline once (`dvc repro`, run A), commits dvc.lock and pushes the cache to a temporary remote. Then:
a fresh `git clone` + `dvc pull` gets every output back byte for byte and nothing re-runs; an
experiment with one knob changed is listed next to the baseline; and after committing that experiment
(run B), `git checkout <A> && dvc checkout` brings adapter A back from the cache without training.

The promotion gate is set so a 4-step run on the random tiny model passes deterministically: primary
metric `loss` (every run lowers the completion loss; its bootstrap interval stays above 0),
min_improvement 0, max_forgetting 5 nats/token. So the test covers all eleven stages, `promote`
included, instead of stopping at `evaluate`; whether the gate's real thresholds are right is
tests/test_promote.py's business, not this file's. The copy's dvc.yaml leaves out the export stages after
`promote` (merge, export_gguf): llama.cpp's converter does not know the tiny model's vocabulary, and
tests/test_export.py runs them on the real SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipelines.io import RUN_RECORD
from tests.conftest import tiny_overrides
from tests.test_dvc import copy_repo_with_tickets, dvc_executable, ran_stages, run

# The tickets hold no preference pairs: preference_data writes empty splits, align records that it trained nothing,
# evaluate_alignment that its gate is not applicable, and promote ships the SFT adapter.
ALL_STAGES = {"fetch_model", "ingest", "clean", "format", "split", "preference_data", "train", "evaluate", "align",
              "evaluate_alignment", "promote"}
EXPORT_STAGES = ("merge", "export_gguf")  # not in the copy's dvc.yaml (see the docstring)
# What a clone must get back from the remote (DVC cache) or from git (metrics.json, cache: false).
RESTORED = ["data/adapter", "data/evaluation", "data/splits", "data/promoted", "data/metrics.json"]
# champion_margin: the experiment's lower learning rate leaves the tiny model worse than run A, the champion it is
# compared with, and promote would refuse it (that rule is tested in tests/test_champion.py)
GATE_THAT_A_TINY_RUN_PASSES = {"primary_metric": "loss", "min_improvement": 0.0, "max_forgetting": 5.0,
                               "champion_margin": 10.0}
EXPERIMENT_LR = 0.0005  # the baseline's train.learning_rate is 0.001 (params.yaml)


@dataclass
class Versioned:
    root: Path
    env: dict[str, str]
    rev_a: str  # the commit of run A
    digests_a: dict[str, dict[str, str]]  # RESTORED path -> {file: sha256} right after run A
    repro_a: str  # output of the first `dvc repro`


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by the path relative to it; without the run
    records (.run.json: local, in .dvcignore, not versioned; a record left from another run is not `current` for
    the files DVC restores, pipelines.records.current, so no door takes it for theirs)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != RUN_RECORD)
    return {str(f.relative_to(path)) if f != path else f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


def digests(root: Path) -> dict[str, dict[str, str]]:
    return {name: digest(root / name) for name in RESTORED}


def dvc(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run([dvc_executable(), *args], cwd, env)


def git(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(["git", *args], cwd, env).strip()


@pytest.fixture(scope="module")
def versioned(tmp_path_factory, tiny_model_dir: Path) -> Versioned:
    base = tmp_path_factory.mktemp("versions")
    overrides = tiny_overrides(tiny_model_dir)
    overrides["evaluate"] = {**overrides["evaluate"], **GATE_THAT_A_TINY_RUN_PASSES}
    root = copy_repo_with_tickets(base, overrides)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    for name in EXPORT_STAGES:
        del pipeline["stages"][name]
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))

    ident = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env = {**os.environ, **ident, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    git(["init", "-q", "-b", "main"], root, env)
    # The remote goes into the committed .dvc/config, so a clone knows where to pull from.
    dvc(["remote", "add", "-d", "-f", "tmpremote", str(base / "remote")], root, env)
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "sources"], root, env)

    repro = dvc(["repro"], root, env)
    git(["add", "-A"], root, env)  # dvc.lock, params.yaml unchanged, data/metrics.json (git-tracked)
    git(["commit", "-qm", "run A"], root, env)
    dvc(["push"], root, env)
    return Versioned(root, env, git(["rev-parse", "HEAD"], root, env), digests(root), repro)


def test_full_run_commits_the_lock_and_metrics_and_pushes_the_cache(versioned: Versioned) -> None:
    root, env = versioned.root, versioned.env
    assert ran_stages(versioned.repro_a) == ALL_STAGES, versioned.repro_a
    assert git(["ls-files", "dvc.lock", "data/metrics.json"], root, env).split() == ["data/metrics.json", "dvc.lock"]
    assert git(["status", "--porcelain"], root, env) == ""  # nothing generated is left outside git or DVC
    assert "in sync" in dvc(["status", "--cloud"], root, env)
    assert (root / "data" / "evaluation" / "report.html").stat().st_size > 0
    assert json.loads((root / "data" / "metrics.json").read_text())["gate"]["passed"] is True


def test_fresh_clone_pulls_every_output_byte_identical_and_runs_nothing(versioned: Versioned, tmp_path: Path) -> None:
    env = versioned.env
    clone = tmp_path / "clone"
    git(["clone", "-q", str(versioned.root), str(clone)], tmp_path, env)
    git(["checkout", "-q", versioned.rev_a], clone, env)  # run A, whatever the other tests committed since
    assert not (clone / "data" / "adapter").exists()

    dvc(["pull"], clone, env)

    assert digests(clone) == versioned.digests_a
    assert "report.html" in versioned.digests_a["data/evaluation"]
    assert {"train.jsonl", "validation.jsonl", "test.jsonl"} <= set(versioned.digests_a["data/splits"])
    assert "adapter_model.safetensors" in versioned.digests_a["data/adapter"]
    assert "Data and pipelines are up to date" in dvc(["status"], clone, env)
    assert ran_stages(dvc(["repro"], clone, env)) == set()


def _exp_show(root: Path, env: dict[str, str]) -> list[dict]:
    """(name, train.learning_rate, metrics) of the baseline commit and of each of its experiments."""
    rows = []
    for entry in json.loads(dvc(["exp", "show", "--json"], root, env)):
        if entry["rev"] == "workspace":
            continue
        for rev in [entry, *(r for exp in entry.get("experiments") or [] for r in exp["revs"])]:
            data = rev["data"]
            rows.append({
                "name": rev["name"],
                "learning_rate": data["params"]["params.yaml"]["data"]["train"]["learning_rate"],
                "metrics": data["metrics"]["data/metrics.json"]["data"],
            })
    return rows


def test_experiment_is_listed_beside_the_baseline_and_the_earlier_adapter_comes_back(versioned: Versioned) -> None:
    root, env = versioned.root, versioned.env
    git(["checkout", "-q", "main"], root, env)
    adapter_a = versioned.digests_a["data/adapter"]

    out = dvc(["exp", "run", "-S", f"train.learning_rate={EXPERIMENT_LR}"], root, env)
    # the data stages do not read train.*; align and evaluate_alignment read the adapter
    assert ran_stages(out) == {"train", "evaluate", "align", "evaluate_alignment", "promote"}, out

    [baseline, experiment] = _exp_show(root, env)
    assert baseline["name"] == "main" and baseline["learning_rate"] == 0.001
    assert experiment["learning_rate"] == EXPERIMENT_LR
    for row in (baseline, experiment):
        assert {"loss", "exact_match", "rouge_l"} <= set(row["metrics"]["fine_tuned"]), row
    assert baseline["metrics"]["adapter_sha256"] != experiment["metrics"]["adapter_sha256"]
    assert baseline["metrics"]["fine_tuned"]["loss"] != experiment["metrics"]["fine_tuned"]["loss"]

    # `dvc exp run` leaves its results in the workspace: commit them as run B.
    adapter_b = digest(root / "data" / "adapter")
    assert adapter_b != adapter_a
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "run B: lower learning rate"], root, env)

    git(["checkout", "-q", versioned.rev_a], root, env)
    dvc(["checkout"], root, env)
    assert digest(root / "data" / "adapter") == adapter_a
    assert digests(root) == versioned.digests_a
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"] == 0.001
    assert "Data and pipelines are up to date" in dvc(["status"], root, env)

    git(["checkout", "-q", "main"], root, env)  # and forward again, still from the cache
    dvc(["checkout"], root, env)
    assert digest(root / "data" / "adapter") == adapter_b
    assert "Data and pipelines are up to date" in dvc(["status"], root, env)
