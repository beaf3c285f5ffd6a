"""The one adapter every asset uses: run a pipelines stage, turn its result into a MaterializeResult.

`stage_asset_def(stage)` builds a stage's Dagster asset from its declaration in the stage manifest
(pipelines/stages.py): deps, group, kinds, description, code version and automation condition all come from
there, so the asset graph and dvc.yaml cannot drift apart.

A data asset whose inputs, params and code are those of its latest materialisation, and whose output files
still hold what that materialisation wrote, is not recomputed: `stage_asset` returns the previous
metadata with a `skipped` note, as `dvc repro` skips an unchanged stage. Launch a run with the tag
`pipelines/force=true` to recompute anyway.
"""

# No `from __future__ import annotations`: Dagster reads the asset functions' annotations (context, resources).
import importlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from assets.metadata import figures, output_paths
from assets.versions import current_version, run_card, stage_code_version
from pipelines.config import Params
from pipelines.errors import UserError
from pipelines.io import StageResult
from pipelines.stages import Stage, upstream_assets
from resources.project import ProjectResource
from resources.trainer import TrainerResource


def run_stage(run: Callable[..., StageResult], params: Params, **kwargs: Any) -> StageResult:
    """Call `run(params, **kwargs)`; a user error fails the step with its one sentence, no traceback."""
    started = time.perf_counter()
    try:
        result = run(params, **kwargs)
    except UserError as exc:  # a bad params key, row or input: its sentence, not a traceback
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    result.metrics.setdefault("wall_time_s", round(time.perf_counter() - started, 2))
    return result


def materialized(
    asset: str,
    result: StageResult,
    params: Params,
    *,
    sections: Sequence[str],
    inputs: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    skip: Sequence[str] = (),
    card: Mapping[str, Any] | None = None,
) -> dg.MaterializeResult:
    """Metadata = stage figures + output paths + run card; DataVersion = hash of what downstream reads.

    Only the files downstream stages read are hashed (assets.versions.versioned_files), so a rebuild
    with identical data keeps its version and leaves every descendant in sync.
    """
    metadata = {
        **figures(result.metrics, skip=skip),
        **output_paths(result),
        **(extra or {}),
        **(card if card is not None else run_card(params, sections, inputs)),  # hashed before the stage ran
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(current_version(asset, params)))


FORCE_TAG = "pipelines/force"  # run tag: "true" recomputes every selected asset even when nothing changed
SKIPPED = "skipped"


def _unchanged(context: dg.AssetExecutionContext, asset: str, card: Mapping[str, Any],
               version: str) -> dg.MaterializeResult | None:
    """The latest materialisation again, if it was made from the same inputs, params and code and its output
    files are unchanged on disk (their content hash is its DataVersion); else None."""
    if context.run.tags.get(FORCE_TAG, "").lower() == "true":
        return None
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


def stage_asset(
    context: dg.AssetExecutionContext,
    asset: str,
    run: Callable[..., StageResult],
    params: Params,
    *,
    sections: Sequence[str],
    inputs: Sequence[str],
    extra: Callable[[StageResult], Mapping[str, Any]] | None = None,
    skip: Sequence[str] = (),
) -> dg.MaterializeResult:
    """Run a data stage unless nothing it depends on changed (see the module docstring), then `materialized`."""
    card = run_card(params, sections, inputs)
    kept = _unchanged(context, asset, card, current_version(asset, params))
    if kept is not None:
        return kept
    result = run_stage(run, params)
    return materialized(asset, result, params, sections=sections, inputs=inputs,
                        extra=extra(result) if extra else None, skip=skip, card=card)


Extra = Callable[[StageResult], Mapping[str, Any]]


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

        return stage_asset(context, stage.asset, call, project.params(), sections=stage.params, inputs=inputs,
                           extra=extra, skip=skip)

    if stage.uses_trainer:
        def with_trainer(context: dg.AssetExecutionContext, project: ProjectResource,
                         trainer: TrainerResource) -> dg.MaterializeResult:
            return build(context, project, trainer)

        return decorator(with_trainer)

    def without_trainer(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
        return build(context, project, None)

    return decorator(without_trainer)
