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
4. Against the champion (pipelines.metrics.champion_gate): the adapter chosen above may be at most
   evaluate.champion_margin worse on evaluate.primary_metric than the champion, the adapter promoted before, both
   measured on the same test rows by the stage that evaluated the candidate (pipelines.champion: `evaluate` for the
   SFT adapter with align.method none, else `evaluate-alignment`). If it is worse, nothing is promoted and the
   champion stays. No champion (the first promotion), the champion being this very adapter, a champion on another
   base model or one that does not load: no comparison, and the reason is recorded. The comparison must have been
   made with the champion in place now (or the candidate is already the champion): a champion promoted since the
   evaluation means re-running it.
The gates are re-applied with the current params (evaluate.*, align.gate), so tightening a bound in params.yaml
re-decides without re-evaluating, and both metrics files must have been measured on the adapters on disk.

On a pass the chosen adapter folder is copied whole to paths.promoted (swapped in atomically) with PROMOTED.json:
which adapter ("aligned" or "sft"), its content hash, the gates' numbers and the champion comparison (`champion`: the
champion's hash, both models' metrics side by side, the interval of candidate - champion, the rule's sentence); no
timestamp, so the same adapter
promoted twice is byte-identical. On a fail it raises StageError with the failing reasons: the DVC stage fails
loudly and the previous promoted adapter, if any, stays in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.champion import PROMOTED_MANIFEST
from pipelines.champion import figures as champion_figures
from pipelines.config import Params
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, read_json, require, sha256_tree, write_json
from pipelines.methods import weights_sha256
from pipelines.metrics import alignment_gate, champion_gate, champion_shortfall, gate
from pipelines.report import champion_table_markdown

MANIFEST = PROMOTED_MANIFEST


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


def champion_comparison(params: Params, which: str, source: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The `champion` section measured for the adapter promote is about to copy (`which`, from `source`): the one of
    alignment_metrics.json or metrics.json whose candidate has the same weights; StageError when none has, or when it
    was made with another champion than the one in paths.promoted now."""
    candidate_sha = weights_sha256(source)
    sections = [read_json(params.path("alignment_metrics")).get("champion"), metrics.get("champion")]
    found = next((s for s in sections if isinstance(s, dict) and s.get("candidate_weights_sha256") == candidate_sha),
                 None)
    if found is None:
        raise StageError(f"neither '{params.path('metrics')}' nor '{params.path('alignment_metrics')}' compares the "
                         f"{which} adapter in '{source}' with the champion (made before the champion rule, or for "
                         "another adapter); re-run the 'evaluate' and 'evaluate-alignment' stages before promoting")
    folder = params.path("promoted")
    now = weights_sha256(folder) if folder.is_dir() else None
    then = found.get("weights_sha256")
    if now not in (then, candidate_sha):
        raise StageError(
            f"the champion in '{folder}' changed since '{found.get('measured_by')}' compared the {which} adapter with "
            f"it (weights {str(then)[:12] if then else 'none'} then, {now[:12] if now else 'none'} now); re-run the "
            f"'{found.get('measured_by')}' stage so that the candidate is compared with the champion in place")
    return found


def _refusal(which: str, source: Path, params: Params, comparison: dict[str, Any]) -> str:
    """One sentence: why the candidate is not promoted over the champion, with both numbers and the margin."""
    primary, margin = params.evaluate.primary_metric, params.evaluate.champion_margin
    shortfall = champion_shortfall(comparison, primary)
    sha = comparison.get("promoted_sha256") or comparison.get("weights_sha256") or ""
    where = f"the champion in '{params.path('promoted')}' (adapter {str(sha)[:12]})"
    if shortfall is None:
        return (f"the {which} adapter in '{source}' was not promoted because its comparison with {where} holds no "
                f"{primary} for both models; re-run the '{comparison.get('measured_by')}' stage.")
    return (f"the {which} adapter in '{source}' was not promoted because it is worse than {where}: {primary} "
            f"{comparison['candidate'][primary]:.4f} vs the champion's {comparison['champion'][primary]:.4f} on "
            f"{comparison.get('n_test')} test rows, {shortfall:.4f} worse, more than evaluate.champion_margin "
            f"{margin:g}; the champion stays in place: improve the adapter (data, training) or, deliberately, raise "
            "evaluate.champion_margin in params.yaml.")


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
    comparison = champion_comparison(params, which, source, metrics)
    primary = params.evaluate.primary_metric
    beats_champion, champion_reasons = champion_gate(comparison, primary, params.evaluate.champion_margin)
    if not beats_champion:
        raise StageError(_refusal(which, source, params, comparison))
    record = {**promotion_record(metrics, reasons, source_sha), "adapter": which, "sft_adapter_sha256": adapter_sha,
              "alignment_gate": alignment or {"applicable": False, "reasons": alignment_reasons},
              "champion": {**comparison, "primary_metric": primary,
                           "gate": {"passed": True, "applicable": bool(comparison.get("compared")),
                                    "reasons": champion_reasons, "champion_margin": params.evaluate.champion_margin}}}
    with atomic_dir(out, "promoted") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        write_json(tmp / MANIFEST, record)
    return StageResult("promote", outputs={"promoted": out, "manifest": Path(out) / MANIFEST}, metrics={
        "promoted": True, "adapter": which, "adapter_sha256": source_sha, "primary_metric": primary,
        f"delta_{primary}": metrics.get("delta", {}).get(primary), "forgetting": metrics.get("forgetting"),
        "gate_reasons": reasons + alignment_reasons + champion_reasons,
        **champion_figures(record["champion"], primary),
        "champion_table_md": champion_table_markdown(record["champion"], ("base", metrics.get("base", {})),
                                                     "aligned" if which == "aligned" else "fine-tuned"),
    })


__all__ = ["MANIFEST", "gate", "promotion_record", "run"]
