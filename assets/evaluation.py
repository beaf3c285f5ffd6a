"""Evaluation report (base vs fine-tuned on the test split), alignment report (SFT vs aligned) and the promoted
adapter behind the gates; each shows the final candidate beside the champion (the adapter promoted before) when its
stage compared them."""

from __future__ import annotations

from typing import Any

import dagster as dg

from assets.metadata import image_markdown
from assets.stage import stage_asset_def
from pipelines.io import StageResult
from pipelines.stages import BY_NAME


def _bullets(lines: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {line}" for line in lines))


def _champion_extra(result: StageResult) -> dict[str, Any]:
    """The champion comparison: base / champion / candidate side by side (or why there is none) and the rule."""
    extra: dict[str, Any] = {}
    if table := result.metrics.get("champion_table_md"):
        extra["champion_table"] = dg.MetadataValue.md(table)
    if reasons := result.metrics.get("champion_reasons"):
        extra["champion_reasons"] = _bullets(reasons)
    return extra


def _report_extra(result: StageResult) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if table := result.metrics.get("metric_table_md"):
        extra["metric_table"] = dg.MetadataValue.md(table)
    if reasons := result.metrics.get("gate_reasons"):
        extra["gate_reasons"] = _bullets(reasons)
    extra.update(_champion_extra(result))
    for name, path in result.outputs.items():
        if path.suffix == ".png" and path.is_file():
            extra[f"plot/{name}"] = image_markdown(path, name)
    return extra


CHAMPION_KEYS = ["champion_table_md", "champion_reasons"]  # shown by _champion_extra
evaluation_report = stage_asset_def(BY_NAME["evaluate"], extra=_report_extra,
                                    skip=["metric_table_md", "gate_reasons", "loss_curve", "token_histogram",
                                          *CHAMPION_KEYS])
alignment_report = stage_asset_def(BY_NAME["evaluate-alignment"], extra=_report_extra,
                                   skip=["metric_table_md", "gate_reasons", "preference_accuracy_gain_ci",
                                         *CHAMPION_KEYS])
promoted_adapter = stage_asset_def(BY_NAME["promote"],
                                   extra=lambda result: {"gate_reasons": _bullets(result.metrics.get("gate_reasons",
                                                                                                      [])),
                                                         **_champion_extra(result)},
                                   skip=["gate_reasons", *CHAMPION_KEYS])

EVALUATION_ASSETS = [evaluation_report, alignment_report, promoted_adapter]
