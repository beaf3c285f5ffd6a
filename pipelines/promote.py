"""Promote the final adapter only when it passed its gates: the aligned one when preference tuning ran, else SFT.

    python -m pipelines promote [--params params.yaml]

The rule, in one sentence: the promoted adapter is the last adapter of the lifecycle, and every gate on the way to
it must pass. Concretely:
1. The SFT gate (pipelines.metrics.gate on paths.metrics, written by `evaluate`): the SFT adapter beats the base
   and did not forget. If it fails, nothing is promoted.
2. If the align stage trained an aligned adapter (alignment_metrics.json says applicable), the alignment gate
   (pipelines.metrics.alignment_gate: held-out preference accuracy up with an interval above 0, the task metric
   not down by more than align.gate.max_task_drop, forgetting bounded) must pass too, and the aligned adapter is
   promoted. If it fails, nothing is promoted: a failed alignment is a failed lifecycle run, as in the Dagster
   run, where the blocking check aligned_beats_sft stops this asset. To ship the SFT adapter on purpose, set
   align.method: none.
3. If no alignment ran (align.method none, or no preference data), the SFT adapter is promoted on its gate alone.
Both gates are re-applied with the current params (evaluate.*, align.gate), so tightening a bound in params.yaml
re-decides without re-evaluating, and both metrics files must have been measured on the adapters on disk.

On a pass the chosen adapter folder is copied whole to paths.promoted (swapped in atomically) with PROMOTED.json:
which adapter ("aligned" or "sft"), its content hash, and both gates' numbers; no timestamp, so the same adapter
promoted twice is byte-identical. On a fail it raises StageError with the failing reasons: the DVC stage fails
loudly and the previous promoted adapter, if any, stays in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, read_json, require, sha256_tree, write_json
from pipelines.metrics import alignment_gate, gate

MANIFEST = "PROMOTED.json"


def promotion_record(metrics: dict[str, Any], reasons: list[str], adapter_sha256: str) -> dict[str, Any]:
    """What PROMOTED.json says: which adapter, and the evidence it passed on."""
    primary = metrics.get("primary_metric")
    return {
        "adapter_sha256": adapter_sha256,
        "primary_metric": primary,
        "base": metrics.get("base", {}),
        "fine_tuned": metrics.get("fine_tuned", {}),
        "delta": metrics.get("delta", {}),
        "ci_delta": metrics.get("ci", {}).get("delta", {}),
        "forgetting": metrics.get("forgetting"),
        "n_test": metrics.get("n_test"),
        "gate": {"passed": True, "reasons": reasons},
    }


def _read_metrics(path: Path, stage: str) -> dict[str, Any]:
    require(path, stage)
    try:
        return read_json(path)
    except ValueError as exc:
        raise StageError(f"'{path}' is not valid JSON ({exc}); re-run the '{stage}' stage") from None


def _measured_on(metrics: dict[str, Any], key: str, folder: Path, metrics_path: Path, stage: str) -> str:
    """The content hash of `folder`, which must be the one `metrics[key]` was measured on."""
    sha = sha256_tree(folder)
    measured = metrics.get(key)
    if measured and measured != sha:
        raise StageError(f"'{metrics_path}' was measured on another adapter than '{folder}' (content hash "
                         f"{measured[:12]} vs {sha[:12]}); re-run the '{stage}' stage before promoting")
    return sha


def alignment_decision(params: Params) -> tuple[str, dict[str, Any] | None, list[str]]:
    """("aligned" or "sft", the alignment gate record or None, its reasons) per rules 2 and 3 of the docstring;
    raises StageError when the aligned adapter exists but fails its gate."""
    path = params.path("alignment_metrics")
    alignment = _read_metrics(path, "evaluate-alignment")
    if not alignment.get("applicable"):
        return "sft", None, [f"no alignment: {alignment.get('reason', 'the align stage trained nothing')}"]
    require(params.path("aligned_adapter"), "align")
    _measured_on(alignment, "aligned_adapter_sha256", params.path("aligned_adapter"), path, "evaluate-alignment")
    _measured_on(alignment, "sft_adapter_sha256", params.path("adapter"), path, "evaluate-alignment")
    passed, reasons = alignment_gate(alignment, params.align.gate, params.evaluate.primary_metric)
    if not passed:
        failed = [r for r in reasons if r.endswith("FAIL.")]
        raise StageError(f"the aligned adapter in '{params.path('aligned_adapter')}' was not promoted because the "
                         "alignment gate failed: " + " ".join(failed or reasons) + " Improve the preference data or "
                         "align params, or set align.method: none to promote the SFT adapter.")
    return "aligned", {"passed": True, "reasons": reasons, "preference": alignment.get("preference"),
                       "task_delta": alignment.get("task", {}).get("delta"),
                       "forgetting": alignment.get("task", {}).get("forgetting")}, reasons


def run(params: Params) -> StageResult:
    out = claim_output(params, "promoted")  # before any work: the folder is the stage's own, and writable
    metrics_path = params.path("metrics")
    metrics = _read_metrics(metrics_path, "evaluate")
    adapter_dir = require(params.path("adapter"), "train")
    adapter_sha = sha256_tree(adapter_dir)
    _measured_on(metrics, "adapter_sha256", adapter_dir, metrics_path, "evaluate")
    passed, reasons = gate(metrics, params.evaluate)
    if not passed:
        failed = [r for r in reasons if r.endswith("FAIL.")]
        raise StageError(f"the adapter in '{adapter_dir}' was not promoted because the gate failed: "
                         + " ".join(failed or reasons)
                         + " Improve the adapter (data, training) or, deliberately, the bounds in params.yaml "
                         "evaluate.")
    which, alignment, alignment_reasons = alignment_decision(params)
    source = params.path("aligned_adapter") if which == "aligned" else adapter_dir
    source_sha = sha256_tree(source) if which == "aligned" else adapter_sha
    record = {**promotion_record(metrics, reasons, source_sha), "adapter": which, "sft_adapter_sha256": adapter_sha,
              "alignment_gate": alignment or {"applicable": False, "reasons": alignment_reasons}}
    with atomic_dir(out, "promoted") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        write_json(tmp / MANIFEST, record)
    primary = params.evaluate.primary_metric
    return StageResult("promote", outputs={"promoted": out, "manifest": Path(out) / MANIFEST}, metrics={
        "promoted": True, "adapter": which, "adapter_sha256": source_sha, "primary_metric": primary,
        f"delta_{primary}": metrics.get("delta", {}).get(primary), "forgetting": metrics.get("forgetting"),
        "gate_reasons": reasons + alignment_reasons,
    })


__all__ = ["MANIFEST", "gate", "promotion_record", "run"]
