"""Evaluation report (base vs fine-tuned on the test split) and the promoted adapter behind the gate."""

from __future__ import annotations

from typing import Any

import dagster as dg

from assets.automation import rebuild_when_inputs_change
from assets.data import base_model, dataset_splits
from assets.metadata import image_markdown
from assets.stage import materialized, run_stage
from assets.training import lora_adapter
from assets.versions import code_version
from resources.project import ProjectResource


def _bullets(lines: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {line}" for line in lines))


@dg.asset(
    deps=[lora_adapter, dataset_splits, base_model],
    group_name="evaluation",
    kinds={"pytorch", "huggingface", "html"},
    code_version=code_version("pipelines.evaluate", "pipelines.metrics", "pipelines.report", "pipelines.chat"),
    automation_condition=rebuild_when_inputs_change("lora_adapter"),
    description="Base model vs fine-tuned adapter on the held-out test split: exact match, ROUGE-L, loss, "
    "JSON validity with bootstrap confidence intervals, forgetting on a general probe set; report.html/.md "
    "and metrics.json.",
)
def evaluation_report(project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import evaluate as stage

    params = project.params()
    result = run_stage(stage.run, params)
    extra: dict[str, Any] = {}
    if table := result.metrics.get("metric_table_md"):
        extra["metric_table"] = dg.MetadataValue.md(table)
    if reasons := result.metrics.get("gate_reasons"):
        extra["gate_reasons"] = _bullets(reasons)
    for name, path in result.outputs.items():
        if path.suffix == ".png" and path.is_file():
            extra[f"plot/{name}"] = image_markdown(path, name)
    return materialized(
        "evaluation_report", result, params, sections=["evaluate", "train.method", "model.trust_remote_code"],
        inputs=["lora_adapter", "dataset_splits", "base_model"], extra=extra,
        skip=["metric_table_md", "gate_reasons", "loss_curve", "token_histogram"],
    )


@dg.asset(
    deps=[evaluation_report, lora_adapter],
    group_name="evaluation",
    kinds={"huggingface"},
    code_version=code_version("pipelines.promote", "pipelines.metrics"),
    automation_condition=rebuild_when_inputs_change("evaluation_report"),
    description="The adapter that passed the promotion gate (copied with PROMOTED.json). In a run it starts "
    "only after the blocking check fine_tuned_beats_base passed; the stage re-applies the gate itself.",
)
def promoted_adapter(project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import promote as stage

    params = project.params()
    result = run_stage(stage.run, params)
    return materialized(
        "promoted_adapter", result, params,
        sections=["evaluate.primary_metric", "evaluate.min_improvement", "evaluate.max_forgetting"],
        inputs=["evaluation_report", "lora_adapter"],
        extra={"gate_reasons": _bullets(result.metrics.get("gate_reasons", []))},
        skip=["gate_reasons"],
    )


EVALUATION_ASSETS = [evaluation_report, promoted_adapter]
