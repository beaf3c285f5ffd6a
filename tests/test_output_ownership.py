"""A stage replaces only what it owns: an output path naming an unrelated folder is refused before any work.

Handed case 01: `paths.cleaned` set to an existing folder (absolute outside the project, or `my_models/` inside
it) made the clean stage delete that folder's files. Now every output folder carries the marker io.MARKER, and a
stage replaces a folder only if it is absent, empty, holds its marker, or is an output of the same stage written
before markers existed; params that point outputs at each other, the raw folder, the project, .git or .dvc are
refused when loaded. Every stage that writes is checked, with the inputs it requires faked.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import io
from pipelines.config import ConfigError, load_params
from pipelines.io import MARKER, StageError, atomic_dir, claim_output, ownership_problem
from tests.conftest import REPO, write_project

# ------------------------------------------------------------------------------------------ params: path checks


@pytest.mark.parametrize(("value", "key", "words"), [
    (".git", "paths.cleaned", "lies inside '.git', where git or DVC keep their own files"),
    (".git/objects/pack", "paths.cleaned", "lies inside '.git'"),
    (".dvc/cache", "paths.adapter", "lies inside '.dvc'"),
    ("{root}", "paths.cleaned", "is the project folder or a folder that contains it"),
    ("{root}/..", "paths.promoted", "is the project folder or a folder that contains it"),
    ("/", "paths.evaluation", "is the project folder or a folder that contains it"),
    ("{root}/data/raw", "paths.cleaned", "paths.raw_dir = 'data/raw' and paths.cleaned = '{root}/data/raw' overlap"),
    ("{root}/data/raw/sub", "paths.splits", "overlap"),  # an absolute spelling of a folder inside data/raw
    ("data/linked_raw", "paths.formatted", "overlap"),  # a symlink to data/raw
])
def test_output_paths_that_would_replace_something_else_are_refused(tmp_path, value, key, words):
    root = (tmp_path / "proj").resolve()
    params_file = write_project(root)
    (root / "data" / "linked_raw").symlink_to(root / "data" / "raw")
    params = json.loads(json.dumps({"paths": {key.split(".")[1]: value.format(root=root)}}))
    with pytest.raises(ConfigError) as err:
        load_params(params_file, {f"paths.{k}": v for k, v in params["paths"].items()})
    message = str(err.value)
    assert "\n" not in message and key in message and words.format(root=root) in message, message


def test_a_project_inside_dvc_tmp_keeps_its_own_paths(tmp_path):
    """`dvc exp run --temp` (and queued experiments) run a copy of the project under .dvc/tmp/exps/."""
    root = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp1234"
    params = load_params(write_project(root))
    assert params.path("cleaned") == root.resolve() / "data" / "cleaned"
    with pytest.raises(ConfigError, match=r"paths.adapter = '.*/repo/.git/x' lies inside '.git'"):
        load_params(root / "params.yaml", {"paths.adapter": str(tmp_path / "repo" / ".git" / "x")})


# --------------------------------------------------------------------------------------- every stage that writes


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "my_models"
    (victim / "llama-ft").mkdir(parents=True)
    (victim / "llama-ft" / "adapter.bin").write_text("weights I care about")
    (victim / "NOTES.md").write_text("notes")
    return victim


def _inputs(params, stage: str) -> None:
    """Fake the inputs the stage requires before it claims its output (the claim comes before reading them)."""
    files = {"clean": ["raw_examples/examples.jsonl"], "format": ["cleaned/examples.jsonl"],
             "split": ["formatted/dataset.jsonl"]}.get(stage, [])
    for name in files:
        key, _, file = name.partition("/")
        params.path(key).mkdir(parents=True, exist_ok=True)
        (params.path(key) / file).write_text("")
    if stage == "evaluate":
        for key in ("base_model", "adapter"):
            params.path(key).mkdir(parents=True, exist_ok=True)


STAGES = [("fetch-model", "base_model", "base_model"), ("ingest", "ingest", "raw_examples"),
          ("clean", "clean", "cleaned"), ("format", "format", "formatted"), ("split", "split", "splits"),
          ("train", "train", "adapter"), ("evaluate", "evaluate", "evaluation"), ("promote", "promote", "promoted")]


@pytest.mark.parametrize(("stage", "module", "key"), STAGES)
def test_every_stage_refuses_to_replace_a_folder_it_did_not_write(tmp_path, tiny_model_dir, stage, module, key):
    victim = _victim(tmp_path)
    params = load_params(write_project(tmp_path / "proj", {"model": {"source": "local", "name": str(tiny_model_dir)},
                                                           "paths": {key: str(victim)}}))
    _inputs(params, stage)
    with pytest.raises(StageError) as err:
        importlib.import_module(f"pipelines.{module}").run(params)
    assert str(err.value) == (
        f"paths.{key} = '{victim}' holds files that the {stage} stage did not write ('NOTES.md', 'llama-ft') and no "
        f".pipelines-output marker, and the {stage} stage replaces its whole folder; point paths.{key} at a new or "
        "empty folder, or move those files away")
    assert (victim / "llama-ft" / "adapter.bin").read_text() == "weights I care about"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_models", "proj"]  # no temporary beside it


def test_evaluate_refuses_to_overwrite_a_file_that_is_not_its_metrics(tmp_path):
    params = load_params(write_project(tmp_path, {"paths": {"metrics": "README.md"}}))
    (tmp_path / "README.md").write_text("# my project\n")
    _inputs(params, "evaluate")
    with pytest.raises(StageError, match=r"paths.metrics = 'README.md' is a file that the evaluate stage did not "
                                         r"write \(it is not its JSON metrics\), and the evaluate stage replaces its "
                                         r"file; point paths.metrics at a new or empty path"):
        importlib.import_module("pipelines.evaluate").run(params)
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    (tmp_path / "README.md").write_text(json.dumps({"primary_metric": "exact_match", "gate": {}}))
    assert claim_output(params, "metrics") == tmp_path / "README.md"  # its own metrics file may be replaced


@pytest.mark.parametrize("value", ["{victim}", "my_models"])  # absolute outside the project; relative inside it
def test_check_params_names_the_key_before_anything_is_written(tmp_path, value):
    """Handed case 01 through the command line: check-params and the clean stage, exit 2, the files untouched."""
    root = tmp_path / "proj"
    victim = _victim(root if value == "my_models" else tmp_path)
    path = write_project(root, {"paths": {"cleaned": value.format(victim=victim)}})
    for stage in ("check-params", "clean"):
        run = subprocess.run([sys.executable, "-m", "pipelines", stage, "--params", str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1
        assert run.stderr.startswith(f"error: paths.cleaned = '{value.format(victim=victim)}' holds files that the "
                                     "clean stage did not write")
    assert sorted(p.name for p in victim.iterdir()) == ["NOTES.md", "llama-ft"]
    assert not (root / "data" / "raw_examples").exists()


# ----------------------------------------------------------------------------------------------- the marker itself


def _write(out: Path, key: str = "cleaned", files: tuple[str, ...] = ("examples.jsonl", "report.json")) -> None:
    with atomic_dir(out, key) as tmp:
        for name in files:
            (tmp / name).write_text(name)


def test_the_marker_is_written_into_every_output_and_makes_it_replaceable(tmp_path):
    out = tmp_path / "cleaned"
    _write(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["key"] == "paths.cleaned" and marker["stage"] == "clean"
    first = (out / MARKER).read_bytes()
    _write(out, files=("examples.jsonl", "report.json", "extra.txt"))  # its own folder: replaced
    assert (out / "extra.txt").is_file() and (out / MARKER).read_bytes() == first  # same bytes: DVC hash stable


@pytest.mark.parametrize(("entries", "key", "allowed"), [
    ({}, "cleaned", True),  # an empty folder
    ({"examples.jsonl": "", "quarantine.jsonl": "", "report.json": "{}"}, "cleaned", True),  # written before markers
    ({"dataset.jsonl": "", "report.json": "{}"}, "formatted", True),
    ({"adapter_model.safetensors": "", "adapter_config.json": "", "train_metrics.json": "", "loss_curve.png": "",
      "chat_template.jinja": ""}, "adapter", True),
    ({"examples.jsonl": "", "quarantine.jsonl": ""}, "cleaned", False),  # no report.json: not recognisably clean's
    ({"examples.jsonl": "", "report.json": "{}", "NOTES.md": ""}, "cleaned", False),  # a file of someone else
    ({"report.json": "{}", "sub/x": ""}, "cleaned", False),  # a subfolder
    ({MARKER: json.dumps({"key": "paths.formatted"})}, "cleaned", False),  # another stage's output
    ({MARKER: "garbage"}, "cleaned", False),
])
def test_which_existing_folders_a_stage_may_replace(tmp_path, entries, key, allowed):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in entries.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    problem = ownership_problem(out, key)
    assert (problem is None) is allowed, problem
    if not allowed:
        with pytest.raises(StageError, match=r"point paths\.\w+ at a new or empty folder"):
            _write(out, key)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(entries)


def test_a_file_where_a_folder_belongs_is_refused(tmp_path):
    (tmp_path / "cleaned").write_text("mine")
    assert ownership_problem(tmp_path / "cleaned", "cleaned") == "is a file, not a folder that the clean stage writes"


def test_a_folder_that_changes_while_the_stage_works_is_not_replaced(tmp_path):
    out = tmp_path / "cleaned"
    _write(out)
    with pytest.raises(StageError, match="holds the output of paths.formatted"):
        with atomic_dir(out, "cleaned") as tmp:
            (tmp / "report.json").write_text("{}")
            (out / MARKER).write_text(json.dumps({"key": "paths.formatted"}))  # e.g. someone re-pointed a folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cleaned"]  # the temporary is gone


def test_every_output_key_has_an_owner():
    from pipelines.config import PathsConfig

    # read only: train and align lock their checkpoint folders instead
    written = set(PathsConfig.model_fields) - {"raw_dir", "checkpoints", "align_checkpoints"}
    assert written == set(io.OUTPUTS) | set(io.FILE_OUTPUTS)
    assert os.path.basename(MARKER).startswith(".")


# ------------------------------------------------------------------------------------------ modes of outputs


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_the_umask_gives_not_owner_only(tmp_path, mask):
    """mkdtemp / mkstemp make owner-only (0700 / 0600) temporaries; an output folder or file written through them
    gets what mkdir / open would give under the umask, so a team member (or a container user) can read it."""
    previous = os.umask(mask)
    try:
        assert io.umask() == mask
        with atomic_dir(tmp_path / "cleaned", "cleaned") as tmp:
            (tmp / "rows.jsonl").write_text("{}\n")
        with io.atomic_open(tmp_path / "cleaned" / "report.json") as fh:
            fh.write("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "cleaned").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "cleaned" / "report.json").stat().st_mode & 0o777 == 0o666 & ~mask
