"""The one adapter every asset uses: run a pipelines stage, turn its result into a MaterializeResult.

`stage_asset_def(stage)` builds a stage's Dagster asset from its declaration in the stage manifest
(pipelines/stages.py): deps, group, kinds, description, code version and automation condition all come from
there, so the asset graph and dvc.yaml cannot drift apart.

An asset whose output is up to date is not recomputed, whichever door made it, as `dvc repro` skips an unchanged
stage (`stage_asset`):
1. the stage's run record (pipelines.records, written by `python -m pipelines <stage>` under `dvc repro` and by
   this adapter alike) has the card the stage would have now (params, input data versions, code, libraries) and
   its output still has the recorded content: the record's figures become the metadata, with a `skipped` note;
2. or Dagster's own latest materialisation has that card and data version (a project whose records were deleted).
Otherwise the stage runs, its record is written, and its dvc.lock entry is updated (`dvc commit`, assets/sync.py)
so that `dvc repro` afterwards sees the stage as up to date too. Launch a run with the tag `pipelines/force=true`
to recompute anyway.
"""

# No `from __future__ import annotations`: Dagster reads the asset functions' annotations (context, resources).
import importlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from assets.metadata import figures, output_paths
from assets.versions import card_metadata, current_version, stage_card, stage_code_version
from pipelines import records
from pipelines.config import Params
from pipelines.errors import UserError
from pipelines.io import StageResult
from pipelines.stages import Stage, upstream_assets
from resources.project import ProjectResource
from resources.trainer import TrainerResource

FORCE_TAG = "pipelines/force"  # run tag: "true" recomputes every selected asset even when nothing changed
SKIPPED = "skipped"
Extra = Callable[[StageResult], Mapping[str, Any]]
# asset -> (extra metadata function, stage metrics not copied as metadata): metadata built from a run record of
# the other door (assets/sync.py) looks exactly like that of a Dagster run
METADATA: dict[str, tuple[Extra | None, Sequence[str]]] = {}


def run_stage(run: Callable[..., StageResult], params: Params, **kwargs: Any) -> StageResult:
    """Call `run(params, **kwargs)`; a user error fails the step with its one sentence, no traceback."""
    started = time.perf_counter()
    try:
        result = run(params, **kwargs)
    except UserError as exc:  # a bad params key, row or input: its sentence, not a traceback
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    result.metrics.setdefault("wall_time_s", round(time.perf_counter() - started, 2))
    return result


def stage_metadata(stage: Stage, result: StageResult, card: dict[str, Any]) -> dict[str, Any]:
    """Metadata of a stage's output: its figures + output paths + asset-specific plots and tables + run card."""
    extra, skip = METADATA.get(stage.asset, (None, ()))
    return {
        **figures(result.metrics, skip=skip),
        **output_paths(result),
        **(extra(result) if extra else {}),
        **card_metadata(card),
    }


def _unchanged(context: dg.AssetExecutionContext, asset: str, card: Mapping[str, Any],
               version: str) -> dg.MaterializeResult | None:
    """The latest materialisation again, if it was made from the same inputs, params and code and its output
    files are unchanged on disk (their content hash is its DataVersion); else None."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    previous = event.asset_materialization
    recorded = {key: value.value for key, value in previous.metadata.items()}
    code = context.assets_def.code_versions_by_key.get(context.asset_key)
    same = (
        previous.tags.get("dagster/data_version") == version
        and previous.tags.get("dagster/code_version") == code
        and all(recorded.get(key) == getattr(value, "value", value) for key, value in card.items())
    )  # the card: params hash and values, input data versions, library versions
    if not same:
        return None
    note = (f"inputs, params, code and output unchanged since run {event.run_id[:8]}: the stage did not run "
            f"(tag {FORCE_TAG}=true recomputes)")
    context.log.info(f"{asset}: {note}")
    metadata = {key: value for key, value in previous.metadata.items() if key != SKIPPED}
    return dg.MaterializeResult(metadata={**metadata, SKIPPED: note}, data_version=dg.DataVersion(version))


def stage_asset(context: dg.AssetExecutionContext, stage: Stage, call: Callable[[Params], StageResult],
                params: Params) -> dg.MaterializeResult:
    """Run the stage unless its output is up to date (see the module docstring); return its materialisation."""
    from assets.sync import dvc_commit

    card = stage_card(params, stage)
    if context.run.tags.get(FORCE_TAG, "").lower() != "true":
        record = records.current(stage, params, card)
        if record is not None:
            door = {"cli": "`dvc repro` / the command line", "dvc": "DVC (restored from its cache)"}.get(
                record.get("door"), "a Dagster run")
            note = (f"made by {door} at {record.get('finished')}; inputs, params, code and output unchanged: the "
                    f"stage did not run (tag {FORCE_TAG}=true recomputes)")
            context.log.info(f"{stage.asset}: {note}")
            metadata = stage_metadata(stage, records.result_of(record), card)
            return dg.MaterializeResult(metadata={**metadata, SKIPPED: note},
                                        data_version=dg.DataVersion(record["data_version"]))
        kept = _unchanged(context, stage.asset, card_metadata(card), current_version(stage.asset, params))
        if kept is not None:
            return kept
    result = run_stage(call, params)
    for message in result.metrics.get("messages") or []:  # notes on the stage's input files (ingest): in the run log
        context.log.warning(f"{stage.asset}: {message}")
    records.write(stage, params, result, card, door="dagster")
    if (problem := dvc_commit(stage, params)) is not None:
        context.log.warning(f"{stage.asset}: dvc.lock not updated ({problem}); `dvc repro` will run the stage again")
    return dg.MaterializeResult(metadata=stage_metadata(stage, result, card),
                                data_version=dg.DataVersion(current_version(stage.asset, params)))


def describe_log(logs: dict[str, Any]) -> str:
    """One line per trainer log, e.g. 'step 5/40 loss=1.903 learning_rate=0.0009 grad_norm=0.84'."""
    shown, quiet = ("loss", "eval_loss", "learning_rate", "grad_norm"), ("runtime", "per_second")

    def fmt(k: str, v: Any) -> str:
        return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"

    known = [fmt(k, logs[k]) for k in shown if k in logs]
    others = [fmt(k, v) for k, v in logs.items()
              if k not in (*shown, "step", "max_steps") and not any(q in k for q in quiet)]
    return " ".join([f"step {logs.get('step', '?')}/{logs.get('max_steps', '?')}", *known, *others])


def stage_asset_def(stage: Stage, *, extra: Extra | None = None, skip: Sequence[str] = ()) -> dg.AssetsDefinition:
    """The Dagster asset of a manifest stage: a thin adapter over `<stage.module>.run(params)`.

    `extra` adds asset-specific metadata (plots, tables) from the stage result; `skip` names stage metrics not
    to copy into metadata (shown by `extra` instead). A stage with `uses_trainer` gets the trainer resource's
    environment (`env=`), and a `run` that takes `on_log` streams its log lines (e.g. per-step losses) to the run.
    """
    from assets.automation import rebuild_when_inputs_change  # automation imports this module's users

    METADATA[stage.asset] = (extra, tuple(skip))
    inputs = upstream_assets(stage)
    decorator = dg.asset(
        name=stage.asset, deps=inputs, group_name=stage.group, kinds=set(stage.kinds),
        code_version=stage_code_version(stage), description=stage.description,
        automation_condition=rebuild_when_inputs_change(*stage.rebuild_on) if stage.rebuild_on else None,
    )

    def build(context: dg.AssetExecutionContext, project: ProjectResource,
              trainer: TrainerResource | None) -> dg.MaterializeResult:
        run = importlib.import_module(stage.module).run  # imported on use: loading the code location stays fast
        kwargs: dict[str, Any] = {}
        if "on_log" in inspect.signature(run).parameters:
            kwargs["on_log"] = lambda logs: context.log.info(describe_log(logs))

        def call(params: Params) -> StageResult:
            if trainer is not None:  # resolved inside run_stage: cuda without a GPU is a user error
                kwargs["env"] = trainer.env()
            return run(params, **kwargs)

        return stage_asset(context, stage, call, project.params())

    if stage.uses_trainer:
        def with_trainer(context: dg.AssetExecutionContext, project: ProjectResource,
                         trainer: TrainerResource) -> dg.MaterializeResult:
            return build(context, project, trainer)

        return decorator(with_trainer)

    def without_trainer(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        return build(context, project, None)

    return decorator(without_trainer)
