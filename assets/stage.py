"""The one adapter every asset uses: run a pipelines stage, turn its result into a MaterializeResult."""

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
) -> dg.MaterializeResult:
    """Metadata = stage figures + output paths + run card; DataVersion = hash of what downstream reads.

    Only the files downstream stages read are hashed (assets.versions.versioned_files), so a rebuild
    with identical data keeps its version and leaves every descendant in sync.
    """
    metadata = {
        **figures(result.metrics, skip=skip),
        **output_paths(result),
        **(extra or {}),
        **run_card(params, sections, inputs),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(current_version(asset, params)))
