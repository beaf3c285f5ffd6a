"""The one adapter every asset uses: run a pipelines stage, turn its result into a MaterializeResult.

A data asset whose inputs, params and code are those of its latest materialisation, and whose output files
still hold what that materialisation wrote, is not recomputed: `stage_asset` returns the previous
metadata with a `skipped` note, as `dvc repro` skips an unchanged stage. Launch a run with the tag
`pipelines/force=true` to recompute anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from assets.metadata import figures, output_paths
from assets.versions import current_version, run_card
from pipelines.config import Params
from pipelines.io import StageError, StageResult


def run_stage(run: Callable[..., StageResult], params: Params, **kwargs: Any) -> StageResult:
    """Call `run(params, **kwargs)`; a user error fails the step with its one sentence, no traceback."""
    started = time.perf_counter()
    try:
        result = run(params, **kwargs)
    except StageError as exc:
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
