"""Run records: what each stage run made, kept beside its output, so every door sees one state.

    data/cleaned/.run.json      {"stage", "door", "finished", "card", "data_version", "metrics", "outputs"}

The lifecycle has three doors: `dvc repro` (which runs `python -m pipelines <stage>`), the Dagster UI, and
Dagster's schedules and sensors. Both commands and assets run the same `run(params)` and then write the same
record into the stage's first output folder:

- `card`: pipelines.versions.stage_card computed before the stage ran (params, input data versions, code and
  library versions), and `data_version`: the content hash of the output's versioned files after it ran;
- `metrics` and `outputs`: the stage's figures, the same ones a Dagster materialisation shows as metadata
  (timings included: they live here, never in the versioned files, so a rebuild with the same result does not
  change the output's hash).

Outputs that DVC puts in place without running the stage (its run cache, `dvc checkout`) get their record from
assets.sync (door "dvc") once `dvc status` finds the stage up to date.

`.run.json` is in .dvcignore: DVC neither hashes nor caches it, so writing it never makes an output look changed
to `dvc status`. A record is `current` when its card equals the card the stage would have now and the output
still has the data version it recorded: then the output is up to date whichever door made it, and the other door
skips the stage (Dagster: assets/stage.py) or shows it as materialised (the `dvc_sync` sensor).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.io import RUN_RECORD, StageResult, atomic_open
from pipelines.stages import Stage
from pipelines.versions import current_version

log = logging.getLogger(__name__)

RECORD = RUN_RECORD
DOORS = ("cli", "dagster", "dvc")  # dvc: outputs DVC restored without running the stage (assets.sync)


def record_path(stage: Stage, params: Params) -> Path:
    """The record of `stage`: inside its first output folder (paths.<stage.outputs[0]>)."""
    return params.path(stage.outputs[0]) / RECORD


def _plain(value: Any) -> Any:
    """JSON-safe copy: paths as strings, non-finite floats as None, anything else unknown as its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write(stage: Stage, params: Params, result: StageResult, card: dict[str, Any], door: str) -> dict[str, Any]:
    """Record a finished run of `stage` (atomically); returns the record. A folder that cannot be written (a
    read-only output) only costs the record: the next run from another door then runs the stage again."""
    record = {
        "stage": stage.name,
        "door": door,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "card": card,
        "data_version": current_version(stage.asset, params),
        "metrics": _plain(result.metrics),
        "outputs": {name: str(path) for name, path in result.outputs.items()},
    }
    path = record_path(stage, params)
    try:
        with atomic_open(path) as fh:
            json.dump(record, fh, indent=1, sort_keys=True)
    except OSError as exc:
        log.warning("could not write the run record %s (%s); the other door will not see this run", path,
                    exc.strerror or exc)
    return record


def read(stage: Stage, params: Params) -> dict[str, Any] | None:
    """The last record of `stage`, or None (none yet, or unreadable)."""
    try:
        record = json.loads(record_path(stage, params).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("stage") == stage.name else None


def current(stage: Stage, params: Params, card: dict[str, Any]) -> dict[str, Any] | None:
    """The record of `stage` if the output it describes is up to date: same card, and the output files still
    have the data version the record saw. None otherwise (never ran, inputs/params/code changed, files edited)."""
    record = read(stage, params)
    if record is None or record.get("card") != card:
        return None
    if record.get("data_version") != current_version(stage.asset, params):
        return None
    return record


def result_of(record: dict[str, Any]) -> StageResult:
    """The StageResult a record describes (for metadata built from a run of the other door)."""
    return StageResult(record["stage"], {k: Path(v) for k, v in record.get("outputs", {}).items()},
                       dict(record.get("metrics", {})))
