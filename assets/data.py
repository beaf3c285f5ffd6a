"""Data assets: raw files -> raw examples -> cleaned -> formatted (chat template) -> train/validation/test, and the
preference pairs (raw files + the SFT split -> train/validation/test pairs).

Each asset is built from its stage in the manifest (pipelines/stages.py) by `assets.stage.stage_asset_def`:
the stage writes its folder (paths in params.yaml), the asset returns its figures as metadata and a
content-hash DataVersion. Only the metadata that is particular to an asset is written here.
"""

# No `from __future__ import annotations`: Dagster inspects the `context` annotation as a real class.
import dagster as dg

from assets.metadata import histogram_plot, md_table
from assets.stage import stage_asset_def
from assets.versions import combined_hash, raw_file_hashes
from pipelines.io import StageResult
from pipelines.stages import BY_NAME
from resources.project import ProjectResource


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


def _rows_out(result: StageResult) -> dict:
    return {"dagster/row_count": result.metrics.get("rows_out", 0)}


def _formatted_extra(result: StageResult) -> dict:
    figures = _rows_out(result)
    hist = result.metrics.get("token_histogram")
    if hist and hist.get("counts"):
        figures["token_length_histogram"] = histogram_plot(
            hist["edges"], hist["counts"], "Tokens per row (chat template included)", "tokens"
        )
    return figures


def _split_rows(result: StageResult) -> dict:
    """Rows over all splits (the split stage reports rows_train, rows_validation, rows_test)."""
    return {"dagster/row_count": sum(result.metrics.get(f"rows_{name}", 0) for name in ("train", "validation", "test"))}


def _preference_extra(result: StageResult) -> dict:
    m = result.metrics
    figures: dict = {"dagster/row_count": m.get("rows_out", 0)}
    per_split = m.get("per_split")
    if per_split:
        figures["rows_per_split"] = dg.MetadataValue.md(md_table([{"split": k, **v} for k, v in per_split.items()]))
    return figures


base_model = stage_asset_def(BY_NAME["fetch-model"])
raw_examples = stage_asset_def(BY_NAME["ingest"], extra=_rows_out, skip=["per_file"])
cleaned_examples = stage_asset_def(BY_NAME["clean"], extra=_rows_out)
formatted_dataset = stage_asset_def(BY_NAME["format"], extra=_formatted_extra, skip=["token_histogram"])
dataset_splits = stage_asset_def(BY_NAME["split"], extra=_split_rows)
preference_pairs = stage_asset_def(BY_NAME["preference-data"], extra=_preference_extra,
                                   skip=["per_split", "leakage", "per_file"])

DATA_ASSETS = [raw_files, base_model, raw_examples, cleaned_examples, formatted_dataset, dataset_splits,
               preference_pairs]
