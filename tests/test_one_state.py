"""One state behind the doors: `dvc repro` then Dagster recomputes nothing and shows every asset with its metadata;
Dagster then `dvc status` is clean; outputs `dvc repro` made are reported into a Dagster instance with their checks.

Each test works on a git + DVC copy of the repository whose params point at the tiny model (tests/test_dvc.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import dagster as dg
import pytest

from pipelines.stages import BY_ASSET, STAGES, upstream_assets
from tests.conftest import tiny_overrides, write_project
from tests.test_dvc import copy_repo, dvc_executable, ran_stages, run

# promote and what follows it are left out: the tiny model does not pass the promotion gate, so `dvc repro` would
# stop there (and llama.cpp's converter does not know the tiny vocabulary: tests/test_export.py covers export)
LIFECYCLE = STAGES[: [s.name for s in STAGES].index("promote")]
NOT_RUN = [s.asset for s in STAGES if s not in LIFECYCLE]
TARGETS = [s.dvc_name for s in LIFECYCLE]  # evaluate and evaluate-alignment are both ends: name every stage


def _project(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, str]]:
    import os
    import sys

    root = copy_repo(tmp_path_factory.mktemp("state") / "project")
    write_project(root, tiny_overrides(tiny_model_dir))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    return root, env


def _assets():
    from assets.checks import CHECKS
    from assets.definitions import defs

    return [a for a in defs.assets if a.key.to_user_string() not in NOT_RUN], CHECKS


def _resources(root: Path) -> dict:
    from resources.project import ProjectResource
    from resources.trainer import TrainerResource

    return {"project": ProjectResource(params_file=str(root / "params.yaml")),
            "trainer": TrainerResource(device="cpu", num_threads=1)}


def _selection() -> dg.AssetSelection:
    # without promotion and its gates (blocking checks the tiny model fails, which would stop the run)
    gates = [dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "fine_tuned_beats_base"),
             dg.AssetCheckKey(dg.AssetKey("alignment_report"), "aligned_beats_sft")]
    return dg.AssetSelection.all() - dg.AssetSelection.assets(*NOT_RUN) - dg.AssetSelection.checks(*gates)


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


# What each asset's metadata shows beyond the run card (a figure, a plot or a table its stage makes).
SHOWN = {"base_model": "path/base_model", "raw_examples": "rows_out", "cleaned_examples": "rows_out",
         "formatted_dataset": "token_length_histogram", "dataset_splits": "rows_train", "lora_adapter": "loss_curve",
         "evaluation_report": "metric_table", "preference_pairs": "dagster/row_count"}


def test_dvc_repro_then_dagster_recomputes_nothing(tmp_path_factory, tiny_model_dir, monkeypatch) -> None:
    from assets.stage import SKIPPED

    root, env = _project(tmp_path_factory, tiny_model_dir)
    out = run([dvc_executable(), "repro", *TARGETS], root, env)
    assert ran_stages(out) == {s.dvc_name for s in LIFECYCLE}
    ran: list[str] = []
    for stage in LIFECYCLE:  # any stage that runs in Dagster now is recomputed work: record it
        module = importlib.import_module(stage.module)
        monkeypatch.setattr(module, "run", lambda *a, _name=stage.name, **k: ran.append(_name))
    assets, checks = _assets()
    with dg.instance_for_test() as instance:
        result = dg.materialize([*assets, *checks], selection=_selection(), resources=_resources(root),
                                instance=instance)
        assert result.success and ran == []
        for stage in LIFECYCLE:
            meta = _metadata(result, stage.asset)
            assert "dvc repro" in meta[SKIPPED], (stage.asset, meta.get(SKIPPED))
            # the align stage and its report have nothing particular to show without preference pairs (tiny data)
            assert SHOWN.get(stage.asset, SKIPPED) in meta and len(meta["run_card/params_hash"]) == 16, stage.asset
        assert _metadata(result, "lora_adapter")["tokens_per_s"] > 0  # the timings of the DVC run, from its record
        assert [e for e in result.get_asset_check_evaluations() if not e.passed] == []
    status = run([dvc_executable(), "status"], root, env)
    assert "promote" in status and not any(f"{s.dvc_name}:" in status for s in LIFECYCLE), status


def test_dagster_then_dvc_status_is_clean_and_repro_runs_nothing(tmp_path_factory, tiny_model_dir) -> None:
    root, env = _project(tmp_path_factory, tiny_model_dir)
    assets, checks = _assets()
    with dg.instance_for_test() as instance:
        result = dg.materialize([*assets, *checks], selection=_selection(), resources=_resources(root),
                                instance=instance)
        assert result.success
    status = run([dvc_executable(), "status", *TARGETS], root, env)
    assert "Data and pipelines are up to date" in status, status
    again = run([dvc_executable(), "repro", *TARGETS], root, env)
    assert ran_stages(again) == set(), again


def test_sync_reports_what_dvc_made_with_metadata_and_checks(tmp_path_factory, tiny_model_dir) -> None:
    """What `make pipeline` ends with (python -m assets.sync) and what the dvc_sync_sensor does in the UI."""
    from assets import sync
    from assets.automation import dvc_sync_sensor
    from pipelines.config import load_params
    from resources.project import ProjectResource

    root, env = _project(tmp_path_factory, tiny_model_dir)
    run([dvc_executable(), "repro", "split"], root, env)
    params = load_params(root / "params.yaml")
    data = ["base_model", "raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits"]
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"project": ProjectResource(
            params_file=str(root / "params.yaml"))})
        result = dvc_sync_sensor(context)
        reported = [e.asset_key.to_user_string() for e in result.asset_events
                    if isinstance(e, dg.AssetMaterialization)]
        assert reported == data
        [request] = result.run_requests
        assert {k.asset_key.to_user_string() for k in request.asset_check_keys} == set(data)

        assert sync.sync(instance, params) == data
        for asset in data:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization
            assert SHOWN[asset] in event.metadata and sync.SYNCED in event.metadata
            assert event.tags["dagster/data_version"] and event.tags["dagster/code_version"]
            # provenance a Dagster run would record: each input's data version and the event it was read from (the
            # UI's staleness check reads both; without the pointer it shows "has a new dependency on ...")
            for upstream in upstream_assets(BY_ASSET[asset]):
                latest = (instance.fetch_materializations(dg.AssetKey(upstream), limit=1).records
                          or instance.fetch_observations(dg.AssetKey(upstream), limit=1).records)
                assert event.tags[f"dagster/input_event_pointer/{upstream}"] == str(latest[0].storage_id), upstream
                assert f"dagster/input_data_version/{upstream}" in event.tags, upstream
        checks = {(k.asset_key.to_user_string(), k.name): instance.get_latest_asset_check_evaluation_record(k)
                  for k in sync.check_keys([s for s in STAGES if s.asset in data])}
        assert all(r is not None and r.event.dagster_event.event_specific_data.passed for r in checks.values())
        assert sync.sync(instance, params) == []  # nothing new: reported once
        assert dvc_sync_sensor(context).skip_reason is not None


@pytest.mark.parametrize("stage", [s for s in STAGES if s.name in ("clean", "split")], ids=lambda s: s.name)
def test_a_record_is_not_current_once_its_output_changes(tmp_path, tiny_model_dir, stage) -> None:
    from pipelines import records
    from pipelines.__main__ import run_and_record
    from pipelines.config import load_params
    from pipelines.versions import stage_card, versioned_files

    params = load_params(write_project(tmp_path, tiny_overrides(tiny_model_dir)))
    for earlier in STAGES[: STAGES.index(stage) + 1]:
        run_and_record(earlier, params)
    card = stage_card(params, stage)
    assert records.current(stage, params, card) is not None
    report = params.path(stage.outputs[0]) / "report.json"  # not versioned: downstream does not read it
    report.write_text(report.read_text() + "\n")
    assert records.current(stage, params, card) is not None
    victim = versioned_files(stage.asset, params)[0]
    victim.write_text(victim.read_text() + "\n")  # same rows, other bytes
    assert records.current(stage, params, card) is None


def test_outputs_dvc_restores_from_its_run_cache_are_shown_too(tmp_path_factory, tiny_model_dir) -> None:
    """A params value set back to one already run: `dvc repro` restores the outputs from its run cache without
    running the stage, so no run record is written; sync asks `dvc status`, records them (door "dvc") and reports
    them, and the Dagster door then skips the stage too."""
    import yaml

    from assets import sync
    from pipelines import records
    from pipelines.config import load_params
    from pipelines.versions import current_version, stage_card

    root, env = _project(tmp_path_factory, tiny_model_dir)
    params_file = root / "params.yaml"
    original = params_file.read_text()
    run([dvc_executable(), "repro", "split"], root, env)
    changed = yaml.safe_load(original)
    changed["clean"]["near_dup_threshold"] = 0.9
    params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    assert {"clean"} <= ran_stages(run([dvc_executable(), "repro", "split"], root, env))
    params_file.write_text(original)
    restored = run([dvc_executable(), "repro", "split"], root, env)
    assert "clean" not in ran_stages(restored), restored  # restored from the run cache, not run
    params = load_params(params_file)
    clean = BY_ASSET["cleaned_examples"]
    assert records.current(clean, params, stage_card(params, clean)) is None  # the record is the 0.9 run's

    with dg.instance_for_test() as instance:
        reported = sync.sync(instance, params, run_checks=False)
        assert "cleaned_examples" in reported
        record = records.current(clean, params, stage_card(params, clean))
        assert record is not None and record["door"] == "dvc"
        event = instance.get_latest_materialization_event(dg.AssetKey("cleaned_examples")).asset_materialization
        assert event.tags["dagster/data_version"] == current_version("cleaned_examples", params)
        assert sync.sync(instance, params, run_checks=False) == []  # reported once
