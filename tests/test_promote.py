"""The promotion gate and the promote stage: only an adapter that beats the base and did not forget."""

from __future__ import annotations

import copy
import json

import pytest

from pipelines import champion
from pipelines.config import EvaluateConfig, load_params
from pipelines.io import StageError, read_json, sha256_tree
from pipelines.promote import MANIFEST, gate, run
from tests.conftest import write_project

CFG = EvaluateConfig(primary_metric="exact_match", min_improvement=0.05, max_forgetting=0.5)


def _metrics(base: float = 0.2, tuned: float = 0.5, ci: tuple[float, float] = (0.1, 0.5),
             forgetting: float = 0.1) -> dict:
    return {
        "primary_metric": "exact_match", "confidence": 0.95, "n_test": 40,
        "base": {"exact_match": base, "loss": 2.0}, "fine_tuned": {"exact_match": tuned, "loss": 1.5},
        "delta": {"exact_match": tuned - base, "loss": -0.5},
        "ci": {"delta": {"exact_match": {"low": ci[0], "high": ci[1]}, "loss": {"low": -0.7, "high": -0.3}}},
        "forgetting": forgetting, "probe": {"base_loss": 3.0, "fine_tuned_loss": 3.0 + forgetting},
    }


@pytest.mark.parametrize("metrics, passed, failing", [
    (_metrics(), True, []),
    (_metrics(tuned=0.22, ci=(0.01, 0.05)), False, ["improvement +0.0200 < the required +0.0500"]),
    (_metrics(ci=(-0.02, 0.6)), False, ["interval of the improvement [-0.020, +0.600] does not lie above 0"]),
    (_metrics(forgetting=0.8), False, ["changed by +0.8000 nats/token (base 3.0000 -> fine-tuned 3.8000), "
                                       "over the bound 0.5000"]),
    (_metrics(tuned=0.1, ci=(-0.2, 0.0), forgetting=0.9), False, ["< the required", "does not lie above 0",
                                                                   "over the bound"]),
    (_metrics(tuned=0.25, ci=(0.0, 0.1)), False, ["[+0.000, +0.100] does not lie above 0"]),  # exactly 0 fails
])
def test_gate(metrics, passed, failing):
    ok, reasons = gate(metrics, CFG)
    assert ok is passed
    assert len(reasons) == 3
    fails = [r for r in reasons if r.endswith("FAIL.")]
    assert len(fails) == len(failing)
    for expected in failing:
        assert any(expected in r for r in fails), (expected, fails)


def test_gate_on_a_lower_is_better_metric_counts_a_decrease_as_improvement():
    cfg = EvaluateConfig(primary_metric="loss", min_improvement=0.2, max_forgetting=0.5)
    ok, reasons = gate(_metrics(), cfg)
    assert ok, reasons
    assert "improvement +0.5000" in reasons[0] and "[+0.300, +0.700] lies above 0" in reasons[1]
    worse = _metrics()
    worse["fine_tuned"]["loss"], worse["ci"]["delta"]["loss"] = 2.3, {"low": 0.1, "high": 0.5}
    ok, reasons = gate(worse, cfg)
    assert not ok and "improvement -0.3000" in reasons[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("forgetting"), "no probe-set loss was measured"),
    (lambda m: m["ci"]["delta"].pop("exact_match"), "no confidence interval"),
    (lambda m: [m["base"].pop("exact_match"), m["fine_tuned"].pop("exact_match")], "is not in the metrics"),
])
def test_gate_fails_closed_on_missing_evidence(mutate, message):
    metrics = copy.deepcopy(_metrics())
    mutate(metrics)
    ok, reasons = gate(metrics, CFG)
    assert not ok
    assert any(message in r for r in reasons)


# ------------------------------------------------------------------------------------ run()


def _no_champion(params, candidate, which: str = "sft") -> dict:
    """The `champion` section the evaluation writes when nothing was promoted before (pipelines.champion)."""
    found, section = champion.locate(params, candidate, candidate=which, measured_by="evaluate")
    assert found is None and section["reason"].startswith("no champion yet")
    return champion.decide(section, params.evaluate)


def _project(tmp_path, metrics: dict, **evaluate):
    params = load_params(write_project(tmp_path, {"evaluate": evaluate} if evaluate else None))
    adapter = params.path("adapter")
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    metrics = {**metrics, "adapter_sha256": sha256_tree(adapter), "champion": _no_champion(params, adapter)}
    params.path("metrics").write_text(json.dumps(metrics))
    # what evaluate-alignment writes when no preference tuning ran: the SFT adapter is the final one
    params.path("alignment_metrics").write_text(json.dumps({"applicable": False, "reason": "align.method is none"}))
    return params


def test_promote_copies_the_adapter_when_the_gate_passes(tmp_path):
    params = _project(tmp_path, _metrics())
    result = run(params)
    promoted = params.path("promoted")
    assert (promoted / "adapter_model.safetensors").read_bytes() == b"weights"
    manifest = read_json(promoted / MANIFEST)
    assert manifest["adapter_sha256"] == sha256_tree(params.path("adapter")) == result.metrics["adapter_sha256"]
    assert manifest["gate"]["passed"] is True and manifest["delta"]["exact_match"] == pytest.approx(0.3)
    first = (promoted / MANIFEST).read_bytes()
    run(params)
    assert (promoted / MANIFEST).read_bytes() == first  # no timestamp: same adapter, same bytes
    assert not [p for p in promoted.parent.iterdir() if p.name.startswith(".promoted")]  # no temp left


def test_promote_refuses_when_the_gate_fails_and_keeps_nothing(tmp_path):
    params = _project(tmp_path, _metrics(ci=(-0.05, 0.6)))
    with pytest.raises(StageError, match=r"not promoted because the gate failed: .*does not lie above 0"):
        run(params)
    assert not params.path("promoted").exists()


def test_promote_reapplies_the_gate_with_current_params(tmp_path):
    params = _project(tmp_path, _metrics(), min_improvement=0.5)  # measured +0.3 was enough at 0.05
    with pytest.raises(StageError, match=r"improvement \+0.3000 < the required \+0.5000"):
        run(params)


def test_promote_keeps_the_previous_promotion_when_a_new_adapter_fails(tmp_path):
    params = _project(tmp_path, _metrics())
    run(params)
    params.path("metrics").write_text(json.dumps({**_metrics(forgetting=2.0),
                                                  "adapter_sha256": sha256_tree(params.path("adapter"))}))
    with pytest.raises(StageError, match="over the bound"):
        run(params)
    assert (params.path("promoted") / MANIFEST).exists()


def test_promote_refuses_metrics_of_another_adapter(tmp_path):
    params = _project(tmp_path, _metrics())
    (params.path("adapter") / "adapter_model.safetensors").write_bytes(b"retrained")
    with pytest.raises(StageError, match="measured on another adapter"):
        run(params)


def test_promote_names_the_missing_metrics(tmp_path):
    params = _project(tmp_path, _metrics())
    params.path("metrics").unlink()
    with pytest.raises(StageError, match="run the 'evaluate' stage first"):
        run(params)


# ------------------------------------------------------------------------------------ with preference tuning


def _aligned(tmp_path, gain_ci=(0.05, 0.3)):
    """A project whose align stage trained an adapter and whose evaluate-alignment measured it."""
    params = _project(tmp_path, _metrics())
    aligned = params.path("aligned_adapter")
    aligned.mkdir(parents=True)
    (aligned / "adapter_config.json").write_text('{"r": 4}')
    (aligned / "adapter_model.safetensors").write_bytes(b"aligned weights")
    alignment = {
        "applicable": True, "aligned_adapter_sha256": sha256_tree(aligned),
        "sft_adapter_sha256": sha256_tree(params.path("adapter")),
        "preference": {"n_pairs": 60, "sft": {"accuracy": 0.7}, "aligned": {"accuracy": 0.85},
                       "delta": {"accuracy": 0.15},
                       "ci": {"delta": {"accuracy": {"low": gain_ci[0], "high": gain_ci[1]}}}},
        "task": {"n_test": 40, "sft": {"exact_match": 0.5}, "aligned": {"exact_match": 0.5}, "forgetting": 0.01,
                 "probe": {"sft_loss": 3.0, "aligned_loss": 3.01}},
        "champion": _no_champion(params, aligned, "aligned"),
    }
    params.path("alignment_metrics").write_text(json.dumps(alignment))
    return params


def test_promote_ships_the_aligned_adapter_when_both_gates_pass(tmp_path):
    params = _aligned(tmp_path)
    result = run(params)
    promoted = params.path("promoted")
    assert (promoted / "adapter_model.safetensors").read_bytes() == b"aligned weights"
    manifest = read_json(promoted / MANIFEST)
    assert manifest["adapter"] == result.metrics["adapter"] == "aligned"
    assert manifest["adapter_sha256"] == sha256_tree(params.path("aligned_adapter"))
    assert manifest["sft_adapter_sha256"] == sha256_tree(params.path("adapter"))
    assert manifest["gate"]["passed"] and manifest["alignment_gate"]["passed"]


def test_promote_without_alignment_ships_the_sft_adapter(tmp_path):
    params = _project(tmp_path, _metrics())  # alignment_metrics: not applicable (align.method none)
    assert run(params).metrics["adapter"] == "sft"
    manifest = read_json(params.path("promoted") / MANIFEST)
    assert manifest["adapter"] == "sft" and manifest["alignment_gate"]["applicable"] is False


def test_a_failed_alignment_gate_promotes_nothing(tmp_path):
    params = _aligned(tmp_path, gain_ci=(-0.02, 0.3))
    with pytest.raises(StageError, match=r"alignment gate failed: .*does not lie above 0.*align.method: none"):
        run(params)
    assert not params.path("promoted").exists()


def test_promote_refuses_alignment_metrics_of_another_aligned_adapter(tmp_path):
    params = _aligned(tmp_path)
    (params.path("aligned_adapter") / "adapter_model.safetensors").write_bytes(b"retrained")
    with pytest.raises(StageError, match="measured on another adapter.*evaluate-alignment"):
        run(params)
