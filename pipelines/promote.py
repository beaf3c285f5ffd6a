"""Promote the fine-tuned adapter only when it passed the gate: beats the base, did not forget.

    python -m pipelines promote [--params params.yaml]

Reads paths.metrics (written by `evaluate`) and re-applies `gate` with the current `evaluate` params,
so tightening a bound in params.yaml re-decides without re-evaluating. On a pass the adapter folder
is copied whole to paths.promoted (swapped in atomically) with PROMOTED.json: the gate's numbers and
a content hash of the adapter, no timestamp, so the same adapter promoted twice is byte-identical.
On a fail it raises StageError with the gate's reasons: the DVC stage fails loudly and the previous
promoted adapter, if any, stays in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, read_json, require, sha256_tree, write_json
from pipelines.metrics import gate

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


def run(params: Params) -> StageResult:
    out = claim_output(params, "promoted")  # before any work: the folder is the stage's own, and writable
    metrics_path = require(params.path("metrics"), "evaluate")
    adapter_dir = require(params.path("adapter"), "train")
    try:
        metrics = read_json(metrics_path)
    except ValueError as exc:
        raise StageError(f"'{metrics_path}' is not valid JSON ({exc}); re-run the 'evaluate' stage") from None
    adapter_sha = sha256_tree(adapter_dir)
    measured = metrics.get("adapter_sha256")
    if measured and measured != adapter_sha:
        raise StageError(f"'{metrics_path}' was measured on another adapter than '{adapter_dir}' (content hash "
                         f"{measured[:12]} vs {adapter_sha[:12]}); re-run the 'evaluate' stage before promoting")
    passed, reasons = gate(metrics, params.evaluate)
    if not passed:
        failed = [r for r in reasons if r.endswith("FAIL.")]
        raise StageError(f"the adapter in '{adapter_dir}' was not promoted because the gate failed: "
                         + " ".join(failed or reasons)
                         + " Improve the adapter (data, training) or, deliberately, the bounds in params.yaml "
                         "evaluate.")
    with atomic_dir(out, "promoted") as tmp:
        shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        write_json(tmp / MANIFEST, promotion_record(metrics, reasons, adapter_sha))
    primary = params.evaluate.primary_metric
    return StageResult("promote", outputs={"promoted": out, "manifest": Path(out) / MANIFEST}, metrics={
        "promoted": True, "adapter_sha256": adapter_sha, "primary_metric": primary,
        f"delta_{primary}": metrics.get("delta", {}).get(primary), "forgetting": metrics.get("forgetting"),
        "gate_reasons": reasons,
    })


__all__ = ["MANIFEST", "gate", "promotion_record", "run"]
