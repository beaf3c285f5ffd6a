"""The code location loads, and its shape is the one the README promises."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.definitions import defs
from tests.conftest import REPO

ASSETS = {
    "raw_files", "base_model", "raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits",
    "preference_pairs", "lora_adapter", "evaluation_report", "preference_adapter", "alignment_report",
    "promoted_adapter", "merged_model", "gguf_model",
}
BLOCKING = {
    ("formatted_dataset", "schema"), ("dataset_splits", "no_leakage"), ("preference_pairs", "no_leakage"),
    ("evaluation_report", "fine_tuned_beats_base"), ("alignment_report", "aligned_beats_sft"),
    ("merged_model", "reproduces_adapter"),
}
RETRAINED = {"lora_adapter", "evaluation_report", "preference_adapter", "alignment_report", "promoted_adapter",
             "merged_model", "gguf_model"}


@pytest.fixture(scope="module")
def repo() -> dg.RepositoryDefinition:
    return defs.get_repository_def()


def test_definitions_load() -> None:
    dg.Definitions.validate_loadable(defs)


def test_workspace_loads_this_module() -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    [location] = workspace["load_from"]
    assert location["python_module"]["module_name"] == "assets.definitions"


def test_graph_has_every_asset(repo: dg.RepositoryDefinition) -> None:
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == ASSETS


def test_every_asset_has_a_check(repo: dg.RepositoryDefinition) -> None:
    checked = {key.asset_key.to_user_string() for key in repo.asset_graph.asset_check_keys}
    assert checked == ASSETS


def test_blocking_checks_are_the_gates(repo: dg.RepositoryDefinition) -> None:
    specs = [repo.asset_graph.get_check_spec(key) for key in repo.asset_graph.asset_check_keys]
    assert {(spec.asset_key.to_user_string(), spec.name) for spec in specs if spec.blocking} == BLOCKING


@pytest.mark.parametrize("key", sorted(ASSETS - {"raw_files"}))
def test_assets_are_documented_and_versioned(repo: dg.RepositoryDefinition, key: str) -> None:
    node = repo.asset_graph.get(dg.AssetKey(key))
    assert node.description and len(node.description) > 40
    assert node.group_name in {"data", "training", "evaluation", "export"}
    assert node.code_version and len(node.code_version) == 12
    assert node.kinds


def test_jobs_select_their_part_of_the_graph(repo: dg.RepositoryDefinition) -> None:
    data = {k.to_user_string() for k in repo.get_job("data_job").asset_layer.selected_asset_keys}
    # raw_files is observed first, so the run records the raw data version it was built from
    assert data == {"raw_files", "raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits",
                    "preference_pairs"}
    lifecycle = {k.to_user_string() for k in repo.get_job("lifecycle_job").asset_layer.selected_asset_keys}
    assert lifecycle == ASSETS
    # training waits for these blocking checks, so the job the sensor launches must run them
    data_checks = {(k.asset_key.to_user_string(), k.name)
                   for k in repo.get_job("data_job").asset_layer.asset_graph.asset_check_keys}
    assert {("formatted_dataset", "schema"), ("dataset_splits", "no_leakage")} <= data_checks


def test_sensors_and_schedule(repo: dg.RepositoryDefinition) -> None:
    sensor = repo.get_sensor_def("raw_data_sensor")
    assert sensor.job_name == "data_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    retrain = repo.get_sensor_def("retrain_sensor")
    assert retrain.default_status == dg.DefaultSensorStatus.RUNNING
    schedule = repo.get_schedule_def("weekly_retrain")
    assert schedule.job_name == "lifecycle_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    # no hidden default automation sensor: every automated asset is covered by retrain_sensor
    assert {s.name for s in repo.sensor_defs} == {"raw_data_sensor", "retrain_sensor", "dvc_sync_sensor"}
    assert repo.get_sensor_def("dvc_sync_sensor").default_status == dg.DefaultSensorStatus.RUNNING


def test_code_version_follows_the_stage_source(tmp_path: Path) -> None:
    from assets.versions import code_version

    assert code_version("pipelines.ingest") == code_version("pipelines.ingest")
    assert code_version("pipelines.ingest") != code_version("pipelines.clean")


def _pass_checks(instance: dg.DagsterInstance, asset: str) -> None:
    for key in defs.get_repository_def().asset_graph.asset_check_keys:
        if key.asset_key == dg.AssetKey(asset):
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=key.asset_key, check_name=key.name, passed=True)
            )


def _materialized(instance: dg.DagsterInstance, asset: str, version: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, tags={"dagster/data_version": version}))
    _pass_checks(instance, asset)


@pytest.mark.parametrize("trained_before", [True, False], ids=["retrain", "first-training"])
def test_new_splits_content_retrains_evaluates_and_promotes_in_one_request(trained_before: bool) -> None:
    built = ASSETS - {"raw_files"} if trained_before else {
        "base_model", "raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits", "preference_pairs"}
    with dg.instance_for_test() as instance:
        for asset in built:
            _materialized(instance, asset, "v1")
        result = dg.evaluate_automation_conditions(defs, instance=instance)
        assert result.total_requested == 0

        _materialized(instance, "dataset_splits", "v1")  # rebuilt, same content
        result = dg.evaluate_automation_conditions(defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0

        _materialized(instance, "dataset_splits", "v2")
        result = dg.evaluate_automation_conditions(defs, instance=instance, cursor=result.cursor)
        requested = {key.to_user_string() for key in (dg.AssetKey(a) for a in ASSETS) if result.get_num_requested(key)}
        assert requested == RETRAINED


@pytest.mark.parametrize("leak_check_passed", [True, False])
def test_failed_leakage_check_holds_training_back(leak_check_passed: bool) -> None:
    with dg.instance_for_test() as instance:
        for asset in ASSETS - {"raw_files"}:
            _materialized(instance, asset, "v1")
        result = dg.evaluate_automation_conditions(defs, instance=instance)
        instance.report_runless_asset_event(
            dg.AssetMaterialization("dataset_splits", tags={"dagster/data_version": "v2"})
        )
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=dg.AssetKey("dataset_splits"), check_name="no_leakage",
                                    passed=leak_check_passed)
        )
        result = dg.evaluate_automation_conditions(defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(dg.AssetKey("lora_adapter")) == int(leak_check_passed)
