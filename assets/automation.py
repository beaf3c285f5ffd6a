"""When things run: two jobs, a sensor on the raw files, content-driven retraining, a weekly schedule.

    data_job        observe raw_files, then raw_examples -> cleaned_examples -> formatted_dataset -> dataset_splits
                    -> preference_pairs
    lifecycle_job   everything, base model to GGUF files (the weekly schedule runs it)

Nothing runs because a clock ticked or a file was touched, only because content changed:
1. `raw_data_sensor` (every 30 s) hashes every file ingest reads in paths.raw_dir (sha256 of the bytes;
   a touched file is rehashed and counts as unchanged) and keeps {file: hash} as its cursor. When a file
   is added, changed or removed it requests one data_job run: the part of the graph below the raw files
   (the base model is not downstream of them and is left alone). Those stages are cheap (seconds to
   minutes); their outputs get content-hash DataVersions.
2. `lora_adapter`, `evaluation_report`, `preference_adapter`, `alignment_report`, `promoted_adapter`,
   `merged_model` and `gguf_model` carry `rebuild_when_inputs_change`: `retrain_sensor` requests them only when
   the *data version* of what they read changed. A new raw file whose rows the cleaner drops as duplicates leaves
   dataset_splits byte-identical, so its version is unchanged and no training starts; new preference pairs alone
   re-run only the alignment (preference_adapter watches preference_pairs and lora_adapter). Training waits for
   the blocking checks upstream (no leakage, formatted schema); train, evaluate, align, evaluate-alignment and
   promote go as one run, in which a failing `fine_tuned_beats_base` or `aligned_beats_sft` stops promotion. A
   newly promoted adapter is then merged (`merged_model`) and exported (`gguf_model`) in the same run, the
   blocking `reproduces_adapter` check standing between the two. A failed run is not retried automatically: the
   next change of the splits, or a click in the UI, starts the next one.

Both sensors default to RUNNING: with the UI open, a user who drops a file into data/raw expects the
graph to follow, and neither sensor can start work unless data content changed (the raw sensor's
first tick only records the current files as its baseline, so opening the UI starts nothing). The
weekly schedule retrains everything regardless of change, so it starts STOPPED: switch it on in the
UI if you want a periodic full rebuild (e.g. after library upgrades).
"""

import json

import dagster as dg
from dagster import SensorEvaluationContext

from assets.sync import check_keys, input_pointers, materialization, pending, raw_observation
from assets.versions import combined_hash, raw_file_states
from pipelines.stages import upstream_assets
from resources.project import ProjectResource

DATA_ASSETS = ("raw_examples", "cleaned_examples", "formatted_dataset", "dataset_splits", "preference_pairs")
RETRAINED = ("lora_adapter", "evaluation_report", "preference_adapter", "alignment_report", "promoted_adapter",
             "merged_model", "gguf_model")


def rebuild_when_inputs_change(*watched: str) -> dg.AutomationCondition:
    """Request the asset once a `watched` dependency has a new data version, made by a run that did not
    also build this asset (a lifecycle_job run rebuilds both, so nothing is left to do), or when that
    dependency is itself requested on this tick (so train -> evaluate -> promote go as one run).

    Waits while a dependency is missing or running, while this asset runs, and until every blocking
    check of its dependencies passed (or will run in the same run, which then enforces it).
    """
    newly_changed = (
        dg.AutomationCondition.data_version_changed() & ~dg.AutomationCondition.executed_with_root_target()
    ).with_label("data version changed by another run")
    changed = dg.AutomationCondition.any_deps_match(
        newly_changed | dg.AutomationCondition.will_be_requested()
    ).allow(dg.AssetSelection.assets(*watched)).with_label(f"{' or '.join(watched)} changed")
    # Like all_deps_blocking_checks_passed, but a dependency requested on this tick also counts: its
    # checks run in the same run (they carry CHECK_WITH_ASSET), and a failing blocking check there stops
    # this asset. The built-in only looks at the check, which is evaluated after this asset.
    checks_pass = dg.AutomationCondition.all_deps_match(
        dg.AutomationCondition.all_checks_match(
            dg.AutomationCondition.check_passed() | dg.AutomationCondition.will_be_requested(), blocking_only=True
        )
        | dg.AutomationCondition.will_be_requested()
    ).with_label("blocking checks of dependencies passed or run first")
    return (
        changed.since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & checks_pass
    ).with_label("inputs changed by content")


# Checks of the retrained assets run with them (the blocking one decides promotion in the same run).
CHECK_WITH_ASSET = dg.AutomationCondition.eager()

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.assets("raw_files", *DATA_ASSETS),
    description="Observe the raw files, then ingest, clean, format and split them (with every check).",
    # Its 14 steps run one after another in the run's own process: each is bounded in memory (streamed) and
    # takes 0.1-6 s on the demo, while a fresh process per step cost ~2 s of start-up each (bench_dagster --cli).
    executor_def=dg.in_process_executor,
)

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all(include_sources=True),
    description="The whole lifecycle: base model, data stages, training, evaluation, promotion.",
)

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=lifecycle_job,
    cron_schedule="0 3 * * 1",  # Mondays 03:00: a full rebuild whether or not anything changed
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Full retrain of lifecycle_job once a week. Stopped by default: the sensors already "
    "rebuild whatever new data changes; switch this on for a periodic rebuild regardless.",
)

retrain_sensor = dg.AutomationConditionSensorDefinition(
    "retrain_sensor",
    target=dg.AssetSelection.assets(*RETRAINED) | dg.AssetSelection.checks_for_assets(*RETRAINED),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Retrains, evaluates, promotes and exports when the content of dataset_splits changes "
    "(see rebuild_when_inputs_change).",
)


def _load_cursor(cursor: str | None) -> dict | None:
    return json.loads(cursor) if cursor else None


def changed_files(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    """Names of the files added, changed (content) and removed between two {file: sha256} maps."""
    return {
        "added": sorted(after.keys() - before.keys()),
        "changed": sorted(k for k in after.keys() & before.keys() if after[k] != before[k]),
        "removed": sorted(before.keys() - after.keys()),
    }


@dg.sensor(
    name="raw_data_sensor",
    job=data_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Hashes the files in paths.raw_dir by content; when one is added, changed or removed, "
    "runs data_job (everything below the raw files except training, which follows by data version).",
)
def raw_data_sensor(context: SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult:
    state = _load_cursor(context.cursor)
    # cursor: {"files": {file: [size, mtime_ns, ctime_ns, sha256]}, "runs": data_job runs requested so far}
    files = raw_file_states(project.params().path("raw_dir"), state["files"] if state else None)
    hashes = {name: f[-1] for name, f in files.items()}
    runs = state["runs"] if state else 0
    if state is None:
        return dg.SensorResult(
            skip_reason=f"baseline recorded: {len(hashes)} raw files; later changes trigger data_job",
            cursor=json.dumps({"files": files, "runs": runs}),
        )
    diff = changed_files({name: f[-1] for name, f in state["files"].items()}, hashes)
    if not any(diff.values()):
        return dg.SensorResult(skip_reason="no raw file was added, changed or removed",
                               cursor=json.dumps({"files": files, "runs": runs}))
    runs += 1
    summary = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in diff.items() if names)
    context.log.info("raw data changed (%s); requesting data_job", summary)
    # The run key makes a retried tick idempotent; the counter lets a reverted file trigger again.
    version = combined_hash(hashes)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"raw-{runs}-{version[:12]}",
                                    tags={"raw_data/changes": summary[:200], "raw_data/version": version[:16]})],
        cursor=json.dumps({"files": files, "runs": runs}),
    )


checks_job = dg.define_asset_job(
    "checks_job",
    selection=dg.AssetSelection.all_asset_checks(),
    description="Evaluate asset checks only (dvc_sync_sensor requests it for outputs `dvc repro` made).",
    executor_def=dg.in_process_executor,
)


@dg.sensor(
    name="dvc_sync_sensor",
    job=checks_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Shows in Dagster what `dvc repro` (or `python -m pipelines <stage>`) made: each output whose run "
    "record is current but unseen is reported as a materialisation with the same metadata a run gives, then its "
    "checks run (assets/sync.py).",
)
def dvc_sync_sensor(context: SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult:
    params = project.params()
    found = pending(context.instance, params)
    if not found:
        return dg.SensorResult(skip_reason="every output made outside Dagster is already shown")
    events: list = [raw_observation(params)] if any("raw_files" in upstream_assets(s) for s, _ in found) else []
    # provenance from what the instance holds now (an upstream reported in this same tick points at its previous
    # materialisation; the next `python -m assets.sync` or Dagster run of it sets it right)
    events += [materialization(stage, record, params, input_pointers(context.instance, record["card"]["inputs"]))
               for stage, record in found]
    stages = [stage for stage, _ in found]
    keys = check_keys(stages)
    run_key = "dvc-sync-" + "-".join(f"{stage.asset}:{record['data_version'][:8]}" for stage, record in found)
    context.log.info(f"reporting outputs made outside Dagster: {', '.join(stage.asset for stage in stages)}")
    return dg.SensorResult(asset_events=events,
                           run_requests=[dg.RunRequest(run_key=run_key[:250], asset_check_keys=keys)] if keys else [])
