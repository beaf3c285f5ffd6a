"""raw_data_sensor reacts to content, not to mtimes; retraining follows data versions, not materialisations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from assets.automation import changed_files, raw_data_sensor, rebuild_when_inputs_change
from assets.versions import combined_hash, raw_file_hashes
from resources.project import ProjectResource
from tests.conftest import write_project

ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    raw = tmp_path / "seed"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    return write_project(tmp_path, raw_from=raw)


def tick(params_file: Path, cursor: str | None) -> dg.SensorResult:
    resources = {"project": ProjectResource(params_file=str(params_file))}
    context = dg.build_sensor_context(cursor=cursor, resources=resources)
    return raw_data_sensor(context)


def test_first_tick_records_a_baseline_without_a_run(project: Path) -> None:
    result = tick(project, None)
    assert not result.run_requests
    files = json.loads(result.cursor)["files"]
    assert {name: f[-1] for name, f in files.items()} == raw_file_hashes(project.parent / "data" / "raw")


def test_nothing_changed_no_run(project: Path) -> None:
    baseline = tick(project, None).cursor
    result = tick(project, baseline)
    assert not result.run_requests
    assert "no raw file" in result.skip_reason.skip_message


def test_touching_a_file_is_not_a_change(project: Path) -> None:
    baseline = tick(project, None).cursor
    path = project.parent / "data" / "raw" / "a.jsonl"
    later = path.stat().st_mtime + 3600
    os.utime(path, (later, later))
    assert not tick(project, baseline).run_requests


def test_unchanged_files_are_not_read_again(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.versions

    raw = project.parent / "data" / "raw"
    (raw / "b.jsonl").write_text(json.dumps(ROW) + "\n")
    cursor = tick(project, None).cursor
    hashed: list[str] = []
    real = pipelines.versions.sha256_file
    monkeypatch.setattr(pipelines.versions, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    (raw / "b.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    assert tick(project, cursor).run_requests
    assert hashed == ["b.jsonl"]  # a.jsonl: same size, mtime and ctime, its recorded hash is reused


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        (lambda raw: (raw / "b.jsonl").write_text(json.dumps(ROW) + "\n"), "added"),
        (lambda raw: (raw / "sub").mkdir() or (raw / "sub" / "c.csv").write_text("prompt,completion\nq,a\n"), "added"),
        (lambda raw: (raw / "a.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n"), "changed"),
        (lambda raw: (raw / "a.jsonl").write_text((raw / "a.jsonl").read_text().replace("Hi?", "Ho?")), "changed"),
        (lambda raw: (raw / "a.jsonl").unlink(), "removed"),
    ],
    ids=["new-file", "new-file-in-subfolder", "content-changed", "same-size-edit", "file-removed"],
)
def test_content_change_requests_data_job(project: Path, change, kind: str) -> None:
    baseline = tick(project, None).cursor
    change(project.parent / "data" / "raw")
    result = tick(project, baseline)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert kind in request.tags["raw_data/changes"]
    assert raw_data_sensor.job_name == "data_job"
    # the new state is the next baseline: the same files do not trigger twice
    assert not tick(project, result.cursor).run_requests


@pytest.mark.parametrize("name", ["README.md", ".a.jsonl.swp", "notes.txt", ".hidden/x.jsonl"])
def test_files_ingest_does_not_read_are_ignored(project: Path, name: str) -> None:
    baseline = tick(project, None).cursor
    path = project.parent / "data" / "raw" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not data\n")
    assert not tick(project, baseline).run_requests


def test_reverting_a_file_triggers_again_with_a_new_run_key(project: Path) -> None:
    raw = project.parent / "data" / "raw"
    original = (raw / "a.jsonl").read_text()
    cursor = tick(project, None).cursor
    keys = []
    for content in (original + original, original, original + original):
        (raw / "a.jsonl").write_text(content)
        result = tick(project, cursor)
        keys.append(result.run_requests[0].run_key)
        cursor = result.cursor
    assert len(set(keys)) == 3


def test_changed_files_and_combined_hash() -> None:
    before, after = {"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}
    assert changed_files(before, after) == {"added": ["c"], "changed": ["b"], "removed": []}
    assert combined_hash(before) == combined_hash(dict(reversed(before.items())))
    assert combined_hash({"a": "1"}) != combined_hash({"b": "1"})  # a rename is a change


# --------------------------------------------------------------------------- retraining by data version


def _graph(versions: dict[str, str]) -> list[dg.AssetsDefinition]:
    """Stand-ins with the real conditions; each materialisation reports versions[key] as its DataVersion."""

    @dg.asset(name="dataset_splits")
    def splits() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(versions["dataset_splits"]))

    @dg.asset(name="lora_adapter", deps=[splits], automation_condition=rebuild_when_inputs_change("dataset_splits"))
    def adapter() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(versions["lora_adapter"]))

    @dg.asset(name="evaluation_report", deps=[adapter], automation_condition=rebuild_when_inputs_change("lora_adapter"))
    def report() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion("r"))

    return [splits, adapter, report]


def test_retraining_follows_the_data_version_of_the_splits() -> None:
    versions = {"dataset_splits": "v1", "lora_adapter": "a1"}
    graph = _graph(versions)
    with dg.instance_for_test() as instance:
        assert dg.materialize(graph, instance=instance).success
        result = dg.evaluate_automation_conditions(graph, instance=instance)
        assert result.total_requested == 0  # first evaluation: nothing has changed since

        # the data stages rerun and produce byte-identical splits: same version, no training
        assert dg.materialize(graph[:1], instance=instance).success
        result = dg.evaluate_automation_conditions(graph, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0

        # new content in the splits: train, and evaluate in the same run
        versions["dataset_splits"] = "v2"
        assert dg.materialize(graph[:1], instance=instance).success
        result = dg.evaluate_automation_conditions(graph, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(dg.AssetKey("lora_adapter")) == 1
        assert result.get_num_requested(dg.AssetKey("evaluation_report")) == 1

        # the requested run happened; nothing is left to do
        versions["lora_adapter"] = "a2"
        assert dg.materialize(graph[1:], instance=instance, selection=["lora_adapter", "evaluation_report"]).success
        result = dg.evaluate_automation_conditions(graph, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0


def test_a_run_that_rebuilt_both_leaves_nothing_to_retrain() -> None:
    versions = {"dataset_splits": "v1", "lora_adapter": "a1"}
    graph = _graph(versions)
    with dg.instance_for_test() as instance:
        assert dg.materialize(graph, instance=instance).success
        result = dg.evaluate_automation_conditions(graph, instance=instance)
        versions.update(dataset_splits="v2", lora_adapter="a2")
        assert dg.materialize(graph, instance=instance).success  # e.g. lifecycle_job from the UI
        result = dg.evaluate_automation_conditions(graph, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0
