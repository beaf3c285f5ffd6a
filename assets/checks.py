"""Asset checks: the data contracts (pipelines.schemas) and stage reports, re-checked on the written files,
each with its evidence in metadata. Blocking checks stop the rest of the run when they fail:

    formatted_dataset / schema                  nothing malformed reaches the split or the trainer
    dataset_splits / no_leakage                 no duplicate straddles train and evaluation splits
    preference_pairs / no_leakage               no preference prompt straddles splits, nor sits in another split
                                                than an SFT row it duplicates
    evaluation_report / fine_tuned_beats_base   only an adapter that beats the base gets promoted
    alignment_report / aligned_beats_sft        only an aligned adapter that beats SFT gets promoted
    merged_model / reproduces_adapter           only a merge that equals base + adapter is exported
"""

# No `from __future__ import annotations`: Dagster reads the `context` annotation of a check at decoration time.
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandera.errors
import pandera.pandas as pa

from assets.automation import CHECK_WITH_ASSET
from assets.data import (
    base_model,
    cleaned_examples,
    dataset_splits,
    formatted_dataset,
    preference_pairs,
    raw_examples,
    raw_files,
)
from assets.evaluation import alignment_report, evaluation_report, promoted_adapter
from assets.export import gguf_model, merged_model
from assets.metadata import mapping_table, md_table
from assets.stage import FORCE_TAG
from assets.training import lora_adapter, preference_adapter
from assets.versions import HASH_CACHE, RAW_SUFFIXES, code_version, content_hash, raw_file_hashes
from pipelines.config import Params
from pipelines.io import chunked, read_json, read_jsonl, sha256_tree, write_json
from pipelines.records import RECORD
from pipelines.schemas import ConversationSchema, FormattedSchema, PreferenceSchema, SplitSchema, validate
from pipelines.schemas import failures as schema_failures
from resources.project import ProjectResource

CHUNK_ROWS = 5000  # rows validated at once: bounded memory on large files
SHOWN_FAILURES = 10  # failure cases listed in the evidence
SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------ helpers


def _chunks(path: Path) -> Iterator[list[dict[str, Any]]]:
    return chunked(read_jsonl(path), CHUNK_ROWS)


def schema_result(schema: type[pa.DataFrameModel], files: dict[str, Path]) -> dg.AssetCheckResult:
    """Validate JSONL files against a pandera model in chunks (ids must be unique across chunks too)."""
    rows_per_file: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    n_failures = 0
    for name, path in files.items():
        if not path.is_file():
            failures.append({"file": name, "column": "", "check": "file exists", "row": "", "value": str(path)})
            n_failures += 1
            continue
        seen: set[str] = set()
        n = 0
        for chunk in _chunks(path):
            try:
                validate(schema, chunk)
            except pandera.errors.SchemaErrors as exc:
                found = schema_failures(exc, offset=n)  # the one reading of pandera's failure cases
                n_failures += len(found)
                failures += [{"file": name, "column": f.column, "check": f.check, "row": f.row or "", "value": f.value}
                             for f in found[:SHOWN_FAILURES]]
            for i, row in enumerate(chunk):
                if row.get("id") in seen:
                    n_failures += 1
                    failures.append({"file": name, "column": "id", "check": "unique across file",
                                     "row": n + i + 1, "value": str(row.get("id"))})
                seen.add(row.get("id"))
            n += len(chunk)
        rows_per_file[name] = n
    return dg.AssetCheckResult(
        passed=n_failures == 0,
        metadata={
            "schema": schema.__name__,
            "rows_checked": sum(rows_per_file.values()),
            "rows_per_file": dg.MetadataValue.md(mapping_table(rows_per_file, key="file")),
            "failures": n_failures,
            "failure_cases": dg.MetadataValue.md(md_table(failures[:SHOWN_FAILURES])),
        },
    )


# The code a data check's verdict depends on: this module and the pipelines modules the checks call.
CHECK_CODE = code_version("assets.checks", "pipelines.schemas", "pipelines.dedup", "pipelines.split",
                          "pipelines.preferences", "pipelines.io")
REUSED = "reused"


def _fingerprint(context: dg.AssetCheckExecutionContext, params: Params, folder: str) -> tuple[str, str]:
    """(check key, fingerprint): what a data check's result is a function of: the check, its code, the params and
    the bytes of every file in the output folder but its run record (hashes of unchanged files come from the
    project's hash cache)."""
    (key,) = sorted(spec.key.to_user_string() for spec in context.check_specs)
    root = params.path(folder)
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name != RECORD) if root.is_dir() else [root]
    names = [f.relative_to(root).as_posix() if root.is_dir() else f.name for f in files]
    parts = [key, CHECK_CODE, params.model_dump(mode="json"), names, content_hash(files, params.root)]
    return key, hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _passes_file(params: Params, key: str) -> Path:
    """Where a check's last pass is kept: the project's cache, beside the file-hash cache (deleting it is safe)."""
    return params.root / HASH_CACHE.parent / "checks" / (key.replace("/", "__") + ".json")


def _last_pass(params: Params, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_passes_file(params, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("metadata"), dict) else None


def _keep_pass(params: Params, key: str, fingerprint: str, result: dg.AssetCheckResult, run_id: str) -> None:
    """Remember a passed result with its fingerprint (plain JSON: each metadata entry as kind + value)."""
    entries = {}
    for name, value in result.metadata.items():
        if isinstance(value, dg.MarkdownMetadataValue):
            entries[name] = ["md", value.value]
        elif isinstance(value, dg.JsonMetadataValue):
            entries[name] = ["json", value.value]
        elif isinstance(value, dg.MetadataValue):
            entries[name] = ["text", str(value.value)]
        else:
            entries[name] = ["raw", value]
    path = _passes_file(params, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"fingerprint": fingerprint, "run_id": run_id, "metadata": entries})
    except (OSError, TypeError, ValueError):  # a read-only project, or a value JSON cannot hold: no reuse
        return


def _kept_metadata(entries: dict[str, Any]) -> dict[str, Any]:
    kinds = {"md": dg.MetadataValue.md, "json": dg.MetadataValue.json, "text": dg.MetadataValue.text}
    return {name: kinds[kind](value) if kind in kinds else value for name, (kind, value) in entries.items()}


def reuse_or_check(context: dg.AssetCheckExecutionContext, params: Params, folder: str,
                   evaluate: Callable[[], dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """The last passed result of this check if nothing it depends on changed (see _fingerprint), else a fresh one.

    A warm re-run then re-reads no data file: on a 1M-row project the schema checks alone read and
    validate every row of five files. A failed result is never reused, and the run tag
    pipelines/force=true (assets.stage.FORCE_TAG) re-evaluates every check. Passes are kept in the project's
    .cache/checks/ (plain JSON), not read back from Dagster's event log, whose storage API is not public.
    """
    key, fingerprint = _fingerprint(context, params, folder)
    if context.run.tags.get(FORCE_TAG, "").lower() != "true" and (last := _last_pass(params, key)):
        if last.get("fingerprint") == fingerprint:
            note = f"files, params and check code unchanged since run {str(last.get('run_id'))[:8]}: not re-read"
            metadata = {k: v for k, v in _kept_metadata(last["metadata"]).items() if k != REUSED}
            return dg.AssetCheckResult(passed=True, metadata={**metadata, REUSED: note})
    result = evaluate()
    result = result.with_metadata({**result.metadata, "fingerprint": fingerprint})
    if result.passed:
        _keep_pass(params, key, fingerprint, result, context.run.run_id)
    else:
        _passes_file(params, key).unlink(missing_ok=True)
    return result


def _missing(path: Path, stage: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False, metadata={"missing": dg.MetadataValue.path(str(path)), "fix": f"materialise {stage} first"}
    )


# -------------------------------------------------------------------------------------------- raw


@dg.asset_check(asset=raw_files, name="has_data_files", description="paths.raw_dir holds at least one data file "
                "ingest can read; lists files it will ignore.")
def raw_files_has_data_files(project: ProjectResource) -> dg.AssetCheckResult:
    raw_dir = project.params().path("raw_dir")
    hashes = raw_file_hashes(raw_dir)
    ignored = sorted(
        p.relative_to(raw_dir).as_posix() for p in raw_dir.rglob("*")
        if p.is_file() and p.relative_to(raw_dir).as_posix() not in hashes
    ) if raw_dir.is_dir() else []
    return dg.AssetCheckResult(
        passed=bool(hashes),
        metadata={"data_files": len(hashes), "ignored_files": dg.MetadataValue.json(ignored),
                  "readable_suffixes": ", ".join(RAW_SUFFIXES)},
    )


@dg.asset_check(asset=raw_examples, name="schema", description="Every row follows ConversationSchema; ids unique.")
def raw_examples_schema(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    path = params.path("raw_examples") / "examples.jsonl"
    return reuse_or_check(context, params, "raw_examples",
                          lambda: schema_result(ConversationSchema, {"examples.jsonl": path}))


@dg.asset_check(asset=raw_examples, name="bad_row_share",
                description="Malformed rows are at most data.max_bad_fraction of the rows read.")
def raw_examples_bad_row_share(project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    report_path = params.path("raw_examples") / "report.json"
    if not report_path.is_file():
        return _missing(report_path, "raw_examples")
    report = read_json(report_path)
    share, limit = report.get("bad_fraction", 0.0), params.data.max_bad_fraction
    return dg.AssetCheckResult(
        passed=share <= limit,
        metadata={"rows_read": report.get("rows_in", 0), "malformed": report.get("malformed", 0),
                  "bad_fraction": float(share), "max_bad_fraction": float(limit),
                  "quarantined_by_rule": dg.MetadataValue.md(mapping_table(report.get("rules", {}), key="rule")),
                  "quarantine": dg.MetadataValue.path(str(params.path("raw_examples") / "quarantine.jsonl"))},
    )


# ------------------------------------------------------------------------------------------ clean


@dg.asset_check(asset=cleaned_examples, name="schema", description="Every row follows ConversationSchema; ids unique.")
def cleaned_examples_schema(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    path = params.path("cleaned") / "examples.jsonl"
    return reuse_or_check(context, params, "cleaned",
                          lambda: schema_result(ConversationSchema, {"examples.jsonl": path}))


@dg.asset_check(asset=cleaned_examples, name="no_exact_duplicates",
                description="No two rows have the same normalised conversation text (pipelines.dedup.exact_key).")
def cleaned_examples_no_exact_duplicates(context: dg.AssetCheckExecutionContext,
                                         project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    path = params.path("cleaned") / "examples.jsonl"
    if not path.is_file():
        return _missing(path, "cleaned_examples")
    return reuse_or_check(context, params, "cleaned", lambda: _exact_duplicates(params, path))


def _exact_duplicates(params: Params, path: Path) -> dg.AssetCheckResult:
    from pipelines.dedup import conversation_text, exact_key

    ids_by_key: dict[str, list[str]] = defaultdict(list)
    for row in read_jsonl(path):
        ids_by_key[exact_key(conversation_text(row))].append(row["id"])
    dups = [ids for ids in ids_by_key.values() if len(ids) > 1]
    return dg.AssetCheckResult(
        # With clean.exact_dedup off, duplicates are the user's choice: reported, not failed.
        passed=not dups or not params.clean.exact_dedup,
        severity=dg.AssetCheckSeverity.ERROR if params.clean.exact_dedup else dg.AssetCheckSeverity.WARN,
        metadata={"rows": sum(len(ids) for ids in ids_by_key.values()), "duplicate_groups": len(dups),
                  "exact_dedup_enabled": params.clean.exact_dedup,
                  "examples": dg.MetadataValue.json([ids[:5] for ids in dups[:SHOWN_FAILURES]])},
    )


# ----------------------------------------------------------------------------------------- format


@dg.asset_check(asset=formatted_dataset, name="schema", blocking=True,
                description="Every row follows FormattedSchema (token counts consistent); blocks split and training.")
def formatted_dataset_schema(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    path = params.path("formatted") / "dataset.jsonl"
    return reuse_or_check(context, params, "formatted", lambda: schema_result(FormattedSchema, {"dataset.jsonl": path}))


# ------------------------------------------------------------------------------------------ split


def _split_files(project: ProjectResource) -> dict[str, Path]:
    folder = project.params().path("splits")
    return {name: folder / f"{name}.jsonl" for name in SPLITS}


@dg.asset_check(asset=dataset_splits, name="no_leakage", blocking=True,
                description="No exact duplicate and no near-duplicate pair (Jaccard >= clean.near_dup_threshold) "
                "sits in two different splits; blocks training.")
def dataset_splits_no_leakage(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    files = _split_files(project)
    if missing := [p for p in files.values() if not p.is_file()]:
        return _missing(missing[0], "dataset_splits")
    return reuse_or_check(context, params, "splits", lambda: _leakage(params, files))


def _leakage(params: Params, files: dict[str, Path]) -> dg.AssetCheckResult:
    from pipelines.split import leakage

    splits = {name: read_jsonl(path) for name, path in files.items()}  # streamed: leakage keeps id and text only
    leak = leakage(splits, params.clean.near_dup_threshold, params.clean.num_perm, params.clean.shingle_size,
                   params.clean.boilerplate_share, params.clean.own_similarity_ratio)
    exact, near = leak["exact_duplicates_across_splits"], leak["near_duplicate_pairs_across_splits"]
    examples = [{"a": f"{e['a']['split']}:{e['a']['id']}", "b": f"{e['b']['split']}:{e['b']['id']}",
                 "jaccard": e["jaccard"]} for e in leak.get("examples", [])]
    return dg.AssetCheckResult(
        passed=exact == 0 and near == 0,
        metadata={"exact_duplicates_across_splits": exact, "near_duplicate_pairs_across_splits": near,
                  "threshold": float(leak["threshold"]), "examples": dg.MetadataValue.md(md_table(examples))},
    )


@dg.asset_check(asset=dataset_splits, name="schema", description="Every split follows SplitSchema; ids unique.")
def dataset_splits_schema(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    files = {f"{name}.jsonl": path for name, path in _split_files(project).items()}
    return reuse_or_check(context, project.params(), "splits", lambda: schema_result(SplitSchema, files))


@dg.asset_check(asset=dataset_splits, name="non_empty",
                description="Every split with a positive ratio in params.split has rows.")
def dataset_splits_non_empty(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    return reuse_or_check(context, params, "splits", lambda: _non_empty(params, _split_files(project)))


def _non_empty(params: Params, files: dict[str, Path]) -> dg.AssetCheckResult:
    counts = {name: sum(1 for _ in read_jsonl(path)) if path.is_file() else 0
              for name, path in files.items()}
    empty = [name for name, n in counts.items() if n == 0 and getattr(params.split, name) > 0]
    return dg.AssetCheckResult(
        passed=not empty,
        metadata={**{f"rows_{name}": n for name, n in counts.items()}, "empty_splits": ", ".join(empty) or "none"},
    )


# ------------------------------------------------------------------------------------- preferences


def _preference_files(params: Params) -> dict[str, Path]:
    folder = params.path("preferences")
    return {name: folder / f"{name}.jsonl" for name in SPLITS}


@dg.asset_check(asset=preference_pairs, name="no_leakage", blocking=True,
                description="No exact or near-duplicate prompt (Jaccard >= clean.near_dup_threshold) sits in two "
                "preference splits, or in another split than an SFT row it duplicates; blocks preference tuning.")
def preference_pairs_no_leakage(context: dg.AssetCheckExecutionContext,
                                project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    files = {**_preference_files(params), **{f"sft {n}": p for n, p in _split_files(project).items()}}
    if missing := [p for p in files.values() if not p.is_file()]:
        return _missing(missing[0], "preference_pairs")
    # Not reused across runs (reuse_or_check): the verdict depends on the SFT split's files as well as this folder.
    return _preference_leakage(params, project)


def _preference_leakage(params: Params, project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.preferences import preference_leakage

    preference = {name: read_jsonl(path) for name, path in _preference_files(params).items()}
    sft = {name: read_jsonl(path) for name, path in _split_files(project).items()}
    leak = preference_leakage(preference, sft, params.clean.near_dup_threshold, params.clean.num_perm,
                              params.clean.shingle_size)
    exact, near = leak["exact_duplicates_across_splits"], leak["near_duplicate_pairs_across_splits"]
    examples = [{"a": f"{e['a']['split']}:{e['a']['id']}", "b": f"{e['b']['split']}:{e['b']['id']}"}
                for e in leak["examples"]]
    return dg.AssetCheckResult(
        passed=exact == 0 and near == 0,
        metadata={"exact_duplicates_across_splits": exact, "near_duplicate_pairs_across_splits": near,
                  "threshold": float(leak["threshold"]), "examples": dg.MetadataValue.md(md_table(examples))},
    )


@dg.asset_check(asset=preference_pairs, name="schema",
                description="Every preference split follows PreferenceSchema (valid pairs or labelled rows); ids "
                "unique.")
def preference_pairs_schema(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    files = {f"{name}.jsonl": path for name, path in _preference_files(params).items()}
    return reuse_or_check(context, params, "preferences", lambda: schema_result(PreferenceSchema, files))


# --------------------------------------------------------------------------------------- training


def _weights_file(folder: Path) -> Path:
    return folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors")


@dg.asset_check(asset=lora_adapter, name="loads", automation_condition=CHECK_WITH_ASSET,
                description="The adapter files exist, its weights are finite, and it loads onto the base model.")
def lora_adapter_loads(project: ProjectResource) -> dg.AssetCheckResult:
    params = project.params()
    return _adapter_loads(params, params.path("adapter"), "lora_adapter")


@dg.asset_check(asset=preference_adapter, name="loads", automation_condition=CHECK_WITH_ASSET,
                description="The aligned adapter's weights are finite and it loads onto the base model (or the align "
                "stage recorded why it trained nothing).")
def preference_adapter_loads(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.align import SKIPPED

    params = project.params()
    folder = params.path("aligned_adapter")
    if (folder / SKIPPED).is_file():
        record = read_json(folder / SKIPPED)
        return dg.AssetCheckResult(passed=True, metadata={"skipped": dg.MetadataValue.text(str(record.get("reason")))})
    return _adapter_loads(params, folder, "preference_adapter")


def _adapter_loads(params: Params, folder: Path, asset: str) -> dg.AssetCheckResult:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir = params.path("base_model")
    weights = _weights_file(folder)
    if not weights.is_file():
        return _missing(weights, asset)
    tensors = load_file(str(weights))
    non_finite = sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())
    trust = params.model.trust_remote_code
    if weights.name == "adapter_model.safetensors":  # exists (checked above): the only weights peft will load
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trust,
                                                                               use_safetensors=True),
                                          folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, use_safetensors=True)
    return dg.AssetCheckResult(
        passed=bool(tensors) and not non_finite,
        metadata={"files": dg.MetadataValue.json(sorted(p.name for p in folder.iterdir())),
                  "tensors": len(tensors), "adapter_params": sum(t.numel() for t in tensors.values()),
                  "loaded_model_params": sum(p.numel() for p in model.parameters()),
                  "non_finite_tensors": dg.MetadataValue.json(non_finite[:SHOWN_FAILURES])},
    )


@dg.asset_check(asset=lora_adapter, name="eval_loss_finite", automation_condition=CHECK_WITH_ASSET,
                description="The final validation loss (train loss when there is no validation split) is finite.")
def lora_adapter_eval_loss_finite(project: ProjectResource) -> dg.AssetCheckResult:
    path = project.params().path("adapter") / "train_metrics.json"
    if not path.is_file():
        return _missing(path, "lora_adapter")
    metrics = read_json(path)
    key = "final_eval_loss" if metrics.get("final_eval_loss") is not None else "final_train_loss"
    loss = metrics.get(key)
    finite = isinstance(loss, (int, float)) and math.isfinite(loss)
    return dg.AssetCheckResult(
        passed=finite,
        metadata={"loss_used": key, key: float(loss) if finite else dg.MetadataValue.text(str(loss)),
                  "best_eval_loss": dg.MetadataValue.text(str(metrics.get("best_eval_loss"))),
                  "steps": metrics.get("steps", 0)},
    )


# ------------------------------------------------------------------------------------- evaluation


@dg.asset_check(asset=evaluation_report, name="fine_tuned_beats_base", blocking=True,
                automation_condition=CHECK_WITH_ASSET,
                description="The promotion gate (pipelines.evaluate.gate): the fine-tuned adapter beats the base "
                "on evaluate.primary_metric by evaluate.min_improvement with a confidence interval above 0, and "
                "forgets at most evaluate.max_forgetting; blocks promotion.")
def fine_tuned_beats_base(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.evaluate import gate

    params = project.params()
    path = params.path("metrics")
    if not path.is_file():
        return _missing(path, "evaluation_report")
    metrics = read_json(path)
    passed, reasons = gate(metrics, params.evaluate)
    primary = params.evaluate.primary_metric
    rows = [{"model": m, primary: metrics.get(m, {}).get(primary), "loss": metrics.get(m, {}).get("loss")}
            for m in ("base", "fine_tuned", "delta")]
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in reasons)),
                  "primary_metric": primary, "scores": dg.MetadataValue.md(md_table(rows)),
                  "forgetting": dg.MetadataValue.text(str(metrics.get("forgetting"))),
                  "gate": dg.MetadataValue.json(params.evaluate.model_dump(mode="json"))},
    )


@dg.asset_check(asset=alignment_report, name="aligned_beats_sft", blocking=True,
                automation_condition=CHECK_WITH_ASSET,
                description="The alignment gate (pipelines.metrics.alignment_gate): the aligned adapter ranks the "
                "held-out preference pairs better than SFT (interval above 0), loses at most align.gate.max_task_drop "
                "of evaluate.primary_metric and forgets at most align.gate.max_forgetting; blocks promotion. Passes, "
                "as not applicable, when no preference tuning ran (the SFT adapter is then the final one).")
def aligned_beats_sft(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.metrics import alignment_gate

    params = project.params()
    path = params.path("alignment_metrics")
    if not path.is_file():
        return _missing(path, "alignment_report")
    metrics = read_json(path)
    if not metrics.get("applicable"):
        return dg.AssetCheckResult(passed=True, metadata={
            "applicable": False, "reason": dg.MetadataValue.text(str(metrics.get("reason")))})
    passed, reasons = alignment_gate(metrics, params.align.gate, params.evaluate.primary_metric)
    pref = metrics.get("preference", {})
    rows = [{"model": m, "preference_accuracy": pref.get(m, {}).get("accuracy"),
             "mean_margin": pref.get(m, {}).get("margin"),
             params.evaluate.primary_metric: metrics.get("task", {}).get(m, {}).get(params.evaluate.primary_metric)}
            for m in ("sft", "aligned", "delta")]
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"applicable": True, "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in reasons)),
                  "scores": dg.MetadataValue.md(md_table(rows)),
                  "gate": dg.MetadataValue.json(params.align.gate.model_dump(mode="json"))},
    )


@dg.asset_check(asset=promoted_adapter, name="matches_evaluated_adapter", automation_condition=CHECK_WITH_ASSET,
                description="The promoted folder holds exactly the adapter its gates passed (the aligned or the SFT "
                "adapter, as PROMOTED.json says; content hashes match); the evidence shows the champion it was "
                "compared with (base / champion / candidate side by side, or why there was no comparison).")
def promoted_adapter_matches_evaluated(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.promote import MANIFEST

    params = project.params()
    folder = params.path("promoted")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return _missing(manifest_path, "promoted_adapter")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    source_dir = params.path("aligned_adapter" if manifest.get("adapter") == "aligned" else "adapter")
    adapter_sha = sha256_tree(source_dir) if source_dir.is_dir() else "missing"
    copied = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    source = {p.relative_to(source_dir).as_posix()
              for p in source_dir.rglob("*") if p.is_file()} if adapter_sha != "missing" else set()
    passed = manifest.get("adapter_sha256") == adapter_sha and copied == source and bool(manifest["gate"]["passed"])
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"adapter": str(manifest.get("adapter", "sft")),
                  "promoted_sha256": str(manifest.get("adapter_sha256"))[:16], "adapter_sha256": adapter_sha[:16],
                  "files": len(copied), "gate_passed": bool(manifest["gate"]["passed"]),
                  **_champion_evidence(manifest)},
    )


def _champion_evidence(manifest: dict[str, Any]) -> dict[str, Any]:
    """What PROMOTED.json says about the champion the adapter replaced: base / champion / candidate side by side (or
    why they were not compared) and the rule's sentence."""
    from pipelines.report import champion_table_markdown

    champion = manifest.get("champion")
    if not isinstance(champion, dict):
        return {"champion_compared": False, "champion": dg.MetadataValue.text(
            "PROMOTED.json records no champion comparison (promoted before the champion rule existed)")}
    label = "aligned" if manifest.get("adapter") == "aligned" else "fine-tuned"
    reasons = champion.get("gate", {}).get("reasons", [])
    return {"champion_compared": bool(champion.get("compared")),
            "champion": dg.MetadataValue.md(champion_table_markdown(champion, ("base", manifest.get("base", {})),
                                                                     label)),
            "champion_reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in reasons))}


@dg.asset_check(asset=base_model, name="loads_with_chat_template",
                description="Config and tokenizer load, the tokenizer has a chat template, weights are safetensors.")
def base_model_loads(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.base_model import PICKLE_SUFFIXES, check_output
    from pipelines.io import StageError

    params = project.params()
    folder = params.path("base_model")
    if not folder.is_dir():
        return _missing(folder, "base_model")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    safetensors = sorted(p.name for p in folder.glob("*.safetensors"))
    try:
        facts, problem = check_output(folder, params.model), ""
    except (StageError, OSError, ValueError) as exc:  # OSError/ValueError: transformers cannot read the folder
        facts, problem = {}, str(exc)
    return dg.AssetCheckResult(
        passed=not problem and not pickles and bool(safetensors),
        metadata={**{k: str(v) for k, v in facts.items()}, "safetensors": dg.MetadataValue.json(safetensors),
                  "pickle_files": dg.MetadataValue.json(pickles), "problem": problem or "none"},
    )


# ----------------------------------------------------------------------------------------- export


@dg.asset_check(asset=merged_model, name="reproduces_adapter", blocking=True, automation_condition=CHECK_WITH_ASSET,
                description="MERGED.json: on the first test prompts the merged folder's logits equal base + adapter's "
                "within export.merge_tolerance and its greedy answers are identical, and it was merged from the "
                "adapter promoted now; blocks the GGUF export.")
def merged_model_reproduces_adapter(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.merged_model import MANIFEST
    from pipelines.promote import MANIFEST as PROMOTED

    params = project.params()
    path = params.path("merged") / MANIFEST
    if not path.is_file():
        return _missing(path, "merged_model")
    record = read_json(path)
    check = record.get("check", {})
    promoted = params.path("promoted") / PROMOTED
    current = read_json(promoted).get("adapter_sha256") if promoted.is_file() else None
    diff = check.get("max_abs_logit_diff")
    within = isinstance(diff, (int, float)) and diff <= params.export.merge_tolerance
    passed = bool(check.get("passed")) and within and record.get("adapter_sha256") == current
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"max_abs_logit_diff": dg.MetadataValue.text(str(diff)),
                  "merge_tolerance": params.export.merge_tolerance,
                  "greedy_match_rate": dg.MetadataValue.text(str(check.get("greedy_match_rate"))),
                  "check_prompts": check.get("n_prompts", 0),
                  "adapter_sha256": str(record.get("adapter_sha256"))[:16],
                  "promoted_sha256": str(current)[:16]},
    )


@dg.asset_check(asset=gguf_model, name="answers_like_merged", automation_condition=CHECK_WITH_ASSET,
                description="GGUF.json: each GGUF file exists and its greedy answers in llama-server equal the merged "
                "model's on at least export.min_float_match (f16/bf16) or export.min_quant_match (quantised) of the "
                "check prompts.")
def gguf_model_answers_like_merged(project: ProjectResource) -> dg.AssetCheckResult:
    from pipelines.gguf_model import MANIFEST, MODELFILE

    params = project.params()
    folder = params.path("gguf")
    path = folder / MANIFEST
    if not path.is_file():
        return _missing(path, "gguf_model")
    checks = read_json(path).get("checks", [])
    rows, passed = [], bool(checks) and (folder / MODELFILE).is_file()
    for i, c in enumerate(checks):
        floor = params.export.min_float_match if i == 0 else params.export.min_quant_match
        ok = (folder / c["file"]).is_file() and c["match_rate"] >= floor
        passed &= ok
        rows.append({"file": c["file"], "size_mb": c["size_mb"], "greedy_match": c["match_rate"], "floor": floor,
                     "tokenizer_match": c["tokenizer_match_rate"], "ok": ok})
    return dg.AssetCheckResult(passed=passed, metadata={"files": dg.MetadataValue.md(md_table(rows)),
                                                         "modelfile": (folder / MODELFILE).is_file()})


CHECKS = [
    raw_files_has_data_files, base_model_loads, raw_examples_schema, raw_examples_bad_row_share,
    cleaned_examples_schema, cleaned_examples_no_exact_duplicates, formatted_dataset_schema,
    dataset_splits_no_leakage, dataset_splits_schema, dataset_splits_non_empty,
    preference_pairs_no_leakage, preference_pairs_schema,
    lora_adapter_loads, lora_adapter_eval_loss_finite, preference_adapter_loads, fine_tuned_beats_base,
    aligned_beats_sft, promoted_adapter_matches_evaluated,
    merged_model_reproduces_adapter, gguf_model_answers_like_merged,
]
