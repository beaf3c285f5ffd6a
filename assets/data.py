"""Data assets: raw files -> raw examples -> cleaned -> formatted (chat template) -> train/validation/test.

Each asset is a thin adapter over `pipelines.<stage>.run(params)`: the stage writes its folder (paths in
params.yaml), the asset returns its figures as metadata and a content-hash DataVersion. Stage modules
are imported inside the assets so that loading the code location stays fast.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` annotation as a real class.
import dagster as dg
from dagster import AssetExecutionContext

from assets.metadata import histogram_plot, md_table
from assets.stage import materialized, run_stage, stage_asset
from assets.versions import code_version, combined_hash, raw_file_hashes
from pipelines.io import StageResult
from resources.project import ProjectResource

TABULAR = {"python", "pandas"}


@dg.observable_source_asset(
    name="raw_files",
    group_name="data",
    description="The files in paths.raw_dir (JSONL / JSON / CSV / Parquet) you drop in; observed, never written. "
    "Data version = sha256 over file names and contents (not mtimes).",
)
def raw_files(project: ProjectResource) -> dg.ObserveResult:
    raw_dir = project.params().path("raw_dir")
    hashes = raw_file_hashes(raw_dir)
    sizes = {name: (raw_dir / name).stat().st_size for name in hashes}
    table = md_table([{"file": n, "bytes": sizes[n], "sha256": h[:16]} for n, h in hashes.items()])
    return dg.ObserveResult(
        data_version=dg.DataVersion(combined_hash(hashes)[:16]),
        metadata={"files": len(hashes), "bytes": sum(sizes.values()), "file_hashes": dg.MetadataValue.md(table),
                  "path": dg.MetadataValue.path(str(raw_dir))},
    )


@dg.asset(
    group_name="training",
    kinds={"huggingface", "safetensors"},
    code_version=code_version("pipelines.base_model"),
    description="The base model as a plain Hugging Face folder (safetensors, config, tokenizer with chat "
    "template), from params.model (offline default: SmolLM2-135M-Instruct converted from GGUF).",
)
def base_model(project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import base_model as stage

    params = project.params()
    result = run_stage(stage.run, params)
    return materialized("base_model", result, params, sections=["model"], inputs=[])


@dg.asset(
    deps=[raw_files],
    group_name="data",
    kinds=TABULAR,
    code_version=code_version("pipelines.ingest", "pipelines.schemas"),
    description="Every raw row normalised to one conversation schema (messages ending with an assistant "
    "turn); malformed rows go to quarantine.jsonl with file, line and reason.",
)
def raw_examples(context: AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import ingest as stage

    return stage_asset(context, "raw_examples", stage.run, project.params(), sections=["data"],
                       inputs=["raw_files"], extra=_rows_out, skip=["per_file"])


@dg.asset(
    deps=[raw_examples],
    group_name="data",
    kinds=TABULAR,
    code_version=code_version("pipelines.clean", "pipelines.pii", "pipelines.dedup", "pipelines.schemas"),
    description="Rows normalised (Unicode, HTML), PII redacted, exact and near duplicates removed; the "
    "per-rule counts of rows touched and removed are in the metadata.",
)
def cleaned_examples(context: AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import clean as stage

    return stage_asset(context, "cleaned_examples", stage.run, project.params(), sections=["clean"],
                       inputs=["raw_examples"], extra=_rows_out)


@dg.asset(
    deps=[cleaned_examples, base_model],
    group_name="data",
    kinds=TABULAR | {"huggingface"},
    code_version=code_version("pipelines.format", "pipelines.chat", "pipelines.schemas"),
    description="Rows rendered with the base model's chat template, with token counts and the length "
    "policy applied (overlong rows dropped or their prompt truncated).",
)
def formatted_dataset(context: AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import format as stage

    def extra(result: StageResult) -> dict:
        figures = _rows_out(result)
        hist = result.metrics.get("token_histogram")
        if hist and hist.get("counts"):
            figures["token_length_histogram"] = histogram_plot(
                hist["edges"], hist["counts"], "Tokens per row (chat template included)", "tokens"
            )
        return figures

    return stage_asset(context, "formatted_dataset", stage.run, project.params(),
                       sections=["format", "model.trust_remote_code"], inputs=["cleaned_examples", "base_model"],
                       extra=extra, skip=["token_histogram"])


@dg.asset(
    deps=[formatted_dataset],
    group_name="data",
    kinds=TABULAR,
    code_version=code_version("pipelines.split", "pipelines.dedup", "pipelines.schemas"),
    description="Deterministic train / validation / test split; near-duplicate groups stay within one split "
    "so nothing leaks from training into evaluation.",
)
def dataset_splits(context: AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    from pipelines import split as stage

    return stage_asset(context, "dataset_splits", stage.run, project.params(),
                       sections=["split", "clean.near_dup_threshold", "clean.num_perm", "clean.shingle_size",
                                 "clean.boilerplate_share", "clean.own_similarity_ratio"],
                       inputs=["formatted_dataset"],
                       extra=lambda result: {"dagster/row_count": _split_rows(result.metrics)})


def _rows_out(result: StageResult) -> dict:
    return {"dagster/row_count": result.metrics.get("rows_out", 0)}


def _split_rows(metrics: dict) -> int:
    """Rows over all splits (the split stage reports rows_train, rows_validation, rows_test)."""
    return sum(metrics.get(f"rows_{name}", 0) for name in ("train", "validation", "test"))


DATA_ASSETS = [raw_files, base_model, raw_examples, cleaned_examples, formatted_dataset, dataset_splits]
