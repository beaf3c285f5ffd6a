"""The assets on a throw-away project: dg.materialize with the tiny model, every check evaluated."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import dagster as dg
import pytest

from assets.checks import CHECKS
from assets.data import base_model, cleaned_examples, dataset_splits, formatted_dataset, raw_examples, raw_files
from resources.project import ProjectResource
from tests.conftest import tiny_overrides, write_project

DATA_ASSETS = [raw_files, base_model, raw_examples, cleaned_examples, formatted_dataset, dataset_splits]
CATEGORIES = ("billing", "login", "bug", "shipping")
WORDS = (
    "card charged twice refund order password reset login crash settings page parcel tracking week dark mode "
    "dashboard invoice address delivery email account locked app update slow screen error upload photo export "
    "report payment failed subscription cancel renew coupon discount warehouse courier damaged box missing item"
).split()
N_ROWS = 60


def raw_rows(n: int = N_ROWS, seed: int = 0) -> list[dict]:
    """Distinct tickets (random word bags, so no two are near duplicates) labelled with a category."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        text = " ".join(rng.choice(WORDS) for _ in range(14))
        rows.append({"messages": [{"role": "user", "content": f"Ticket {i}: {text}"},
                                  {"role": "assistant", "content": json.dumps({"category": cat})}]})
    return rows


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    raw = tmp_path / "seed"
    raw.mkdir()
    rows = raw_rows()
    lines = [json.dumps(r) for r in rows] + [json.dumps(rows[0]), "{not json"]  # one exact duplicate, one bad line
    (raw / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    return write_project(tmp_path / "proj", tiny_overrides(tiny_model_dir), raw_from=raw)


def materialize(assets: list, params_file: Path, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    resources = {"project": ProjectResource(params_file=str(params_file))}
    return dg.materialize([*assets, *CHECKS], resources=resources, instance=instance, **kwargs)


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    [event] = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in event.metadata.items()}


def _versions(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    materializations = [e.step_materialization_data.materialization for e in result.get_asset_materialization_events()]
    return {m.asset_key.to_user_string(): m.tags["dagster/data_version"] for m in materializations}


def test_data_assets_materialise_with_metadata_and_passing_checks(project: Path) -> None:
    with dg.instance_for_test() as instance:
        result = materialize(DATA_ASSETS, project, instance)
        assert result.success

        raw = _metadata(result, "raw_examples")
        assert (raw["rows_in"], raw["rows_out"], raw["quarantined"]) == (N_ROWS + 2, N_ROWS + 1, 1)
        assert raw["dagster/row_count"] == N_ROWS + 1
        cleaned = _metadata(result, "cleaned_examples")
        assert cleaned["dagster/row_count"] == N_ROWS  # the exact duplicate is gone
        formatted = _metadata(result, "formatted_dataset")
        assert formatted["dagster/row_count"] == N_ROWS
        assert formatted["token_length_histogram"].startswith("![")
        splits = _metadata(result, "dataset_splits")
        assert splits["rows_train"] + splits["rows_validation"] + splits["rows_test"] == N_ROWS
        for meta in (raw, cleaned, formatted, splits):
            assert len(meta["run_card/params_hash"]) == 16
            assert "transformers" in meta["run_card/libraries"]

        evaluations = result.get_asset_check_evaluations()
        checked = {(e.asset_key.to_user_string(), e.check_name) for e in evaluations}
        assert {("formatted_dataset", "schema"), ("dataset_splits", "no_leakage"), ("raw_examples", "bad_row_share"),
                ("cleaned_examples", "no_exact_duplicates"), ("base_model", "loads_with_chat_template")} <= checked
        assert [e for e in evaluations if not e.passed] == []

        # same inputs, same outputs, same data versions: nothing downstream would look stale
        again = materialize(DATA_ASSETS, project, instance)
        assert _versions(again) == _versions(result)


def test_a_warm_rerun_skips_unchanged_stages_and_reruns_what_changed(project: Path, monkeypatch) -> None:
    import yaml

    from assets.stage import FORCE_TAG, SKIPPED
    from pipelines import clean, format, ingest, split

    data = ["raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits"]
    with dg.instance_for_test() as instance:
        cold = materialize(DATA_ASSETS, project, instance)
        assert all(SKIPPED not in _metadata(cold, key) for key in data)
        ran: list[str] = []
        for module in (ingest, clean, format, split):
            monkeypatch.setattr(module, "run", lambda params, _run=module.run, _name=module.STAGE:
                                ran.append(_name) or _run(params))

        warm = materialize(DATA_ASSETS, project, instance)
        assert ran == [] and all("did not run" in _metadata(warm, key)[SKIPPED] for key in data)
        assert _metadata(warm, "cleaned_examples")["rows_out"] == _metadata(cold, "cleaned_examples")["rows_out"]
        assert _versions(warm) == _versions(cold)
        assert [e for e in warm.get_asset_check_evaluations() if not e.passed] == []
        # the data checks re-read no file whose bytes, params and check code are those of their last pass
        assert _reused(warm) == {"raw_examples/schema", "cleaned_examples/schema", "formatted_dataset/schema",
                                 "cleaned_examples/no_exact_duplicates", "dataset_splits/no_leakage",
                                 "dataset_splits/schema", "dataset_splits/non_empty"}
        assert _reused(cold) == set()

        # an output edited on disk: that stage runs again and writes what its inputs give (same version)
        formatted = project.parent / "data" / "formatted" / "dataset.jsonl"
        formatted.write_text(formatted.read_text().replace("Ticket 1:", "Ticket one:", 1))
        again = materialize(DATA_ASSETS, project, instance)
        assert ran == ["format"] and SKIPPED not in _metadata(again, "formatted_dataset")
        assert _versions(again) == _versions(cold)
        # rebuilt byte for byte (formatted/ holds no timings), so the verdict on those bytes stands; a check on
        # changed bytes is evaluated again (test_schema_check_fails_with_evidence_on_a_broken_file)
        assert {"formatted_dataset/schema", "dataset_splits/schema"} <= _reused(again)

        # a changed param reruns its stage; unchanged output leaves the stages below skipped
        params = yaml.safe_load(project.read_text())
        params.setdefault("clean", {})["min_chars"] = 3  # no message is that short: the output stays the same
        project.write_text(yaml.safe_dump(params))
        ran.clear()
        materialize(DATA_ASSETS, project, instance)
        assert ran == ["clean"]

        ran.clear()
        forced = materialize(DATA_ASSETS, project, instance, tags={FORCE_TAG: "true"})
        assert forced.success and ran == ["ingest", "clean", "format", "split"] and _reused(forced) == set()


def _reused(result: dg.ExecuteInProcessResult) -> set[str]:
    from assets.checks import REUSED

    return {f"{e.asset_key.to_user_string()}/{e.check_name}" for e in result.get_asset_check_evaluations()
            if REUSED in e.metadata}


def test_schema_check_fails_with_evidence_on_a_broken_file(project: Path) -> None:
    with dg.instance_for_test() as instance:
        assert materialize(DATA_ASSETS[:4], project, instance).success
        path = project.parent / "data" / "cleaned" / "examples.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[3]["messages"] = [{"role": "user", "content": "no answer"}]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        check = next(c for c in CHECKS if dg.AssetCheckKey(dg.AssetKey("cleaned_examples"), "schema") in c.check_keys)
        result = dg.materialize([check, cleaned_examples], selection=dg.AssetSelection.checks(check),
                                resources={"project": ProjectResource(params_file=str(project))}, instance=instance)
        [evaluation] = result.get_asset_check_evaluations()
        assert not evaluation.passed
        assert evaluation.metadata["failures"].value == 1
        assert "| messages |" in evaluation.metadata["failure_cases"].value
        again = dg.materialize([check, cleaned_examples], selection=dg.AssetSelection.checks(check),
                               resources={"project": ProjectResource(params_file=str(project))}, instance=instance)
        [evaluation] = again.get_asset_check_evaluations()
        assert not evaluation.passed and "reused" not in evaluation.metadata  # a failure is evaluated afresh


def test_leakage_check_fails_with_evidence_when_a_train_row_is_copied_into_test(project: Path) -> None:
    with dg.instance_for_test() as instance:
        assert materialize(DATA_ASSETS, project, instance).success
        splits = project.parent / "data" / "splits"
        row = json.loads((splits / "train.jsonl").read_text().splitlines()[0])
        with open(splits / "test.jsonl", "a") as fh:
            fh.write(json.dumps({**row, "id": "copied-row"}) + "\n")
        check = next(c for c in CHECKS
                     if dg.AssetCheckKey(dg.AssetKey("dataset_splits"), "no_leakage") in c.check_keys)
        result = dg.materialize([check, dataset_splits], selection=dg.AssetSelection.checks(check),
                                resources={"project": ProjectResource(params_file=str(project))}, instance=instance,
                                raise_on_error=False)  # a blocking check that fails fails the run
        [evaluation] = result.get_asset_check_evaluations()
        assert not evaluation.passed and not result.success
        assert evaluation.metadata["exact_duplicates_across_splits"].value == 1
        assert "test:copied-row" in evaluation.metadata["examples"].value


def test_the_ingest_notes_are_in_the_dagster_run_log(project: Path) -> None:
    (project.parent / "data" / "raw" / "notes.tsv").write_text("a\tb\n")
    with dg.instance_for_test() as instance:
        result = materialize([raw_files, raw_examples], project, instance)
        warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert any(w.startswith("raw_examples: data/raw/notes.tsv: unknown extension '.tsv', skipped; supported: ")
               for w in warnings), warnings


def test_bad_params_fail_with_one_sentence(tmp_path: Path) -> None:
    params = write_project(tmp_path, {"clean": {"near_dup_treshold": 0.9}})
    with dg.instance_for_test() as instance:
        result = materialize([raw_examples, cleaned_examples], params, instance, raise_on_error=False,
                             selection=[cleaned_examples])
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "unknown key 'clean.near_dup_treshold'" in message
    assert "Traceback" not in message


def test_training_evaluation_and_the_blocking_gate(project: Path, tiny_model_dir: Path) -> None:
    from assets.data import preference_pairs
    from assets.evaluation import alignment_report, evaluation_report, promoted_adapter
    from assets.training import lora_adapter, preference_adapter
    from resources.trainer import TrainerResource

    # The project's raw data has no preference pairs: the align stage trains nothing, the alignment gate is not
    # applicable (its blocking check passes), and promotion depends on the SFT gate alone.
    lifecycle = [*DATA_ASSETS, preference_pairs, lora_adapter, evaluation_report, preference_adapter,
                 alignment_report, promoted_adapter]
    with dg.instance_for_test() as instance:
        resources = {"project": ProjectResource(params_file=str(project)), "trainer": TrainerResource()}
        result = dg.materialize([*lifecycle, *CHECKS], resources=resources, instance=instance, raise_on_error=False)
        adapter = _metadata(result, "lora_adapter")
        assert adapter["steps"] == 4
        assert adapter["trainable_params"] < adapter["total_params"]
        assert adapter["tokens_seen"] > 0 and adapter["tokens_per_s"] > 0
        assert adapter["loss_curve"].startswith("![")
        report = _metadata(result, "evaluation_report")
        assert "| metric |" in report["metric_table"]
        checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
        assert checks[("lora_adapter", "loads")].passed
        assert checks[("lora_adapter", "eval_loss_finite")].passed
        assert checks[("preference_pairs", "no_leakage")].passed and checks[("preference_adapter", "loads")].passed
        aligned_gate = checks[("alignment_report", "aligned_beats_sft")]
        assert aligned_gate.passed and aligned_gate.metadata["applicable"].value is False
        assert _metadata(result, "preference_adapter")["skipped"] is True
        gate = checks[("evaluation_report", "fine_tuned_beats_base")]
        # 4 steps of a random tiny model cannot beat the base: the blocking gate fails and promotion is skipped
        assert not gate.passed
        assert "FAIL" in gate.metadata["reasons"].value
        assert not result.asset_materializations_for_node("promoted_adapter")
        assert not (project.parent / "data" / "promoted").exists()

        # Judged on loss with a zero margin, the same evaluation passes: the check and promotion re-read
        # metrics.json with the new bounds (no re-evaluation) and the adapter is promoted.
        overrides = tiny_overrides(tiny_model_dir)
        overrides["evaluate"].update(primary_metric="loss", min_improvement=0.0, max_forgetting=100.0)
        write_project(project.parent, overrides)
        gate_check = dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "fine_tuned_beats_base")
        result = dg.materialize(
            [*lifecycle, *CHECKS], resources=resources, instance=instance,
            selection=dg.AssetSelection.checks(gate_check) | dg.AssetSelection.assets(promoted_adapter),
        )
        [gate] = [e for e in result.get_asset_check_evaluations() if e.check_name == "fine_tuned_beats_base"]
        assert gate.passed, gate.metadata["reasons"].value
        assert _metadata(result, "promoted_adapter")["promoted"] is True
        assert _metadata(result, "promoted_adapter")["adapter"] == "sft"
        assert (project.parent / "data" / "promoted" / "adapter_model.safetensors").is_file()
