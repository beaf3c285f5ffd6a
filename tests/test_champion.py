"""Promotion against the champion (issue 16, part 3): the candidate beside the adapter promoted before, on the same
test rows, and the rule that keeps a worse challenger out (pipelines.champion, metrics.champion_gate, promote)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines import align, champion, evaluate, evaluate_alignment, promote, report
from pipelines.config import EvaluateConfig, Params, load_params
from pipelines.io import StageError, read_json, read_jsonl
from pipelines.metrics import ModelScores, champion_gate
from tests.conftest import make_lora_adapter, tiny_overrides, write_project, write_test_split

REFS = ["alpha", "beta", "gamma", "delta"]
HEADER = "| metric | base | champion [95% CI] | fine-tuned (candidate) [95% CI] | candidate - champion [95% CI] |"


def _scores(predictions: list[str], nll: list[float] | None = None) -> ModelScores:
    return ModelScores(predictions, nll or [1.0] * len(predictions), [1] * len(predictions))


def _cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(**{"bootstrap_samples": 200, **kw})


def _compared(champ: ModelScores, cand: ModelScores, cfg: EvaluateConfig) -> dict:
    return {"compared": True, "measured_by": "evaluate", **champion.compare(REFS, champ, cand, cfg)}


# ------------------------------------------------------------------------------------ the rule on literal rows


@pytest.mark.parametrize("champ, cand, margin, passed, says", [
    (REFS, ["alpha", "beta", "gamma", "no"], 0.02, False, "0.2500 worse, more than the allowed margin 0.0200; FAIL."),
    (REFS, ["alpha", "beta", "gamma", "no"], 0.25, True, "0.2500 worse, within the allowed margin 0.2500; pass."),
    (REFS, ["alpha", "beta", "no", "no"], 0.25, False, "0.5000 worse, more than"),
    (["alpha", "beta", "gamma", "no"], REFS, 0.0, True, "0.2500 better, within"),
    (REFS, REFS, 0.0, True, "equal, within"),
])
def test_champion_gate_on_exact_match(champ, cand, margin, passed, says):
    comparison = _compared(_scores(champ), _scores(cand), _cfg())
    ok, reasons = champion_gate(comparison, "exact_match", margin)
    assert ok is passed and len(reasons) == 1
    assert says in reasons[0]
    assert "on 4 test rows" in reasons[0] and "interval of candidate - champion" in reasons[0]


@pytest.mark.parametrize("cand_nll, margin, passed, says", [
    ([1.5] * 4, 0.1, False, "0.5000 worse"),  # loss: higher is worse
    ([1.05] * 4, 0.1, True, "0.0500 worse, within"),
    ([0.5] * 4, 0.0, True, "0.5000 better"),
])
def test_champion_gate_on_loss_counts_a_rise_as_worse(cand_nll, margin, passed, says):
    comparison = _compared(_scores(REFS, [1.0] * 4), _scores(REFS, cand_nll), _cfg(primary_metric="loss"))
    ok, reasons = champion_gate(comparison, "loss", margin)
    assert ok is passed and says in reasons[0]


def test_compare_pairs_the_rows_and_gives_candidate_minus_champion():
    comparison = champion.compare(REFS, _scores(REFS), _scores(["alpha", "beta", "no", "no"]), _cfg())
    assert comparison["n_test"] == 4
    assert comparison["champion"]["exact_match"] == 1.0 and comparison["candidate"]["exact_match"] == 0.5
    assert comparison["delta"]["exact_match"] == pytest.approx(-0.5)
    ci = comparison["ci"]["delta"]["exact_match"]
    # paired: the candidate loses on 2 rows of 4 and wins on none, so no resample puts it ahead
    assert ci["low"] <= -0.5 <= ci["high"] <= 0


@pytest.mark.parametrize("section, passed, says", [
    ({"compared": False, "reason": "no champion yet: 'data/promoted' does not exist (the first promotion)"}, True,
     "no champion comparison (no champion yet: 'data/promoted' does not exist (the first promotion)); pass."),
    ({"compared": False, "reason": "the champion is this very adapter (weights sha256 0123456789ab)"}, True,
     "this very adapter"),
    (None, False, "no comparison with the champion was measured; FAIL."),
    ({"compared": True, "n_test": 4, "champion": {"loss": 1.0}, "candidate": {"loss": 1.0}}, False,
     "'exact_match' was not measured for both"),
])
def test_champion_gate_without_a_comparison(section, passed, says):
    ok, reasons = champion_gate(section, "exact_match", 0.02)
    assert ok is passed and says in reasons[0]


@pytest.mark.parametrize("margin, message", [
    (1.5, "evaluate.champion_margin = 1.5 is more than exact_match"),
    (-0.1, "greater than or equal to 0"),
])
def test_champion_margin_out_of_range_is_refused(margin, message):
    with pytest.raises(ValueError, match=message):
        EvaluateConfig(champion_margin=margin)


def test_champion_margin_above_one_is_allowed_on_loss():
    assert EvaluateConfig(primary_metric="loss", champion_margin=3.0).champion_margin == 3.0


# ------------------------------------------------------------------------------------ which champion


def _adapter(folder: Path, weights: bytes, base_sha: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    if base_sha:
        (folder / "train_metrics.json").write_text(json.dumps({"base_model_sha256": base_sha}))
    return folder


@pytest.fixture
def params(tmp_path):
    return load_params(write_project(tmp_path, {"align": {"method": "none"}}))


def test_no_champion_yet_is_the_first_promotion(params):
    candidate = _adapter(params.path("adapter"), b"new")
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found is None and section["compared"] is False
    assert section["reason"] == "no champion yet: 'data/promoted' does not exist (the first promotion)"


def test_the_same_adapter_is_not_compared_with_itself(params):
    candidate = _adapter(params.path("adapter"), b"same", "b" * 64)
    shutil.copytree(candidate, params.path("promoted"))
    (params.path("promoted") / "PROMOTED.json").write_text('{"adapter_sha256": "x"}')  # not a weight file
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found is None and "this very adapter" in section["reason"]


def test_a_champion_on_another_base_is_not_compared(params):
    candidate = _adapter(params.path("adapter"), b"new", "a" * 64)
    _adapter(params.path("promoted"), b"old", "b" * 64)
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found is None and "trained on another base model (base sha256 bbbbbbbbbbbb" in section["reason"]


def test_a_folder_without_weights_is_not_compared(params):
    candidate = _adapter(params.path("adapter"), b"new")
    params.path("promoted").mkdir(parents=True)
    (params.path("promoted") / "README.md").write_text("nothing here")
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found is None and "holds no adapter_config.json nor a whole model" in section["reason"]


def test_another_adapter_is_the_champion(params):
    candidate = _adapter(params.path("adapter"), b"new", "a" * 64)
    _adapter(params.path("promoted"), b"old", "a" * 64)
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found == champion.Champion(params.path("promoted"), "LORA") and section["reason"] is None


def test_a_pickled_champion_is_not_loaded_and_the_reason_is_recorded(params):
    candidate = _adapter(params.path("adapter"), b"new")
    old = params.path("promoted")
    old.mkdir(parents=True)
    (old / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (old / "adapter_model.bin").write_bytes(b"a pickle")
    found, section = champion.locate(params, candidate, candidate="sft", measured_by="evaluate")
    assert found is not None

    class Seats:
        champion = champion_adapter = None

    assert not champion.attach(Seats(), object(), found, section, base_dir=params.path("base_model"))
    assert "does not load beside the candidate" in section["reason"] and "adapter_model.safetensors" in \
        section["reason"]
    ok, reasons = champion_gate(champion.decide(section, params.evaluate), "exact_match", 0.02)
    assert ok and "no champion comparison" in reasons[0]


# ------------------------------------------------------------------------------------ the report


def test_the_report_shows_base_champion_and_candidate_side_by_side():
    cfg = _cfg()
    section = champion.decide({"compared": True, "path": "data/promoted", "weights_sha256": "c" * 64,
                               "loaded_as": "a second LORA adapter on the candidate's base",
                               **champion.compare(REFS, _scores(REFS), _scores(["alpha", "no", "no", "no"]), cfg)},
                              _cfg(champion_margin=0.1))
    base = {"exact_match": 0.0, "rouge_l": 0.1, "loss": 3.0}
    md = "\n".join(report.champion_markdown(section, ("base", base), "fine-tuned"))
    assert "## Champion: FAILED: worse than the champion by more than evaluate.champion_margin (0.1); not promoted" \
        in md
    assert HEADER in md
    row = next(line for line in md.splitlines() if line.startswith("| Exact match"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "Exact match (primary)" and cells[1].startswith("0.000")
    assert cells[2].startswith("1.000") and cells[3].startswith("0.250") and cells[4].startswith("-0.750")
    html = "".join(report.champion_html(section, ("base", base), "fine-tuned"))
    assert "<h2>Champion: <span class=\"fail\">" in html and "champion [95% CI]" in html
    skipped = champion.decide({"compared": False, "reason": "no champion yet: 'data/promoted' does not exist"}, cfg)
    assert "No champion comparison: no champion yet" in "\n".join(report.champion_markdown(skipped, None, "SFT"))


# ------------------------------------------------------------------------------------ end to end on tiny models

CONVERSATIONS = [
    [{"role": "user", "content": "My card was charged twice for the same order, please refund."},
     {"role": "assistant", "content": '{"category": "billing", "priority": "high"}'}],
    [{"role": "user", "content": "I cannot log in to my account since the password reset."},
     {"role": "assistant", "content": '{"category": "login", "priority": "low"}'}],
    [{"role": "user", "content": "The app crashes when I open the settings page."},
     {"role": "assistant", "content": '{"category": "bug", "priority": "high"}'}],
    [{"role": "user", "content": "Where is my parcel? Tracking has not updated in a week."},
     {"role": "assistant", "content": '{"category": "billing", "priority": "low"}'}],
]


def _fit(base_dir: Path, folder: Path, steps: int) -> Path:
    """A LoRA adapter fitted for `steps` full-batch Adam steps on CONVERSATIONS' answers (the test rows): more steps,
    lower test loss (tiny model: base 6.06 nats/token, 5 steps 5.58, 30 steps about 4.9); saved as the train stage
    saves one (safetensors, tokenizer, train_log.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.chat import tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    rows = [tokenize_conversation(tokenizer, c, only_last=True) for c in CONVERSATIONS]
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):  # one step over all rows (a row at a time never settles on this model)
        for row in rows:
            ids = torch.tensor([row.input_ids])
            labels = torch.tensor([[t if m else -100 for t, m in zip(row.input_ids, row.assistant_mask, strict=True)]])
            model(input_ids=ids, labels=labels).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "train_log.json").write_text(json.dumps([{"loss": 1.0, "step": steps}]))
    return folder


def _copy(project: Path, tmp_path: Path, align_method: str | None = None, **evaluate) -> Params:
    """A copy of `project` with evaluate.* (and align.method) changed in its params.yaml."""
    root = shutil.copytree(project, tmp_path / "project", symlinks=True)
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["evaluate"].update(evaluate)
    if align_method:
        data["align"]["method"] = align_method
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(root / "params.yaml")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_model_dir):
    """A project on the tiny model (align.method none, primary metric loss): a strong adapter evaluated and promoted
    (no champion yet), then a weaker one in paths.adapter evaluated beside it. (root, first promotion, metrics)."""
    root = tmp_path_factory.mktemp("champion")
    overrides = tiny_overrides(tiny_model_dir)
    overrides["paths"] = {"base_model": str(tiny_model_dir)}
    overrides["align"] = {**overrides["align"], "method": "none"}
    overrides["evaluate"] = {**overrides["evaluate"], "primary_metric": "loss", "min_improvement": 0.05,
                             "max_forgetting": 100.0, "champion_margin": 0.02, "max_new_tokens": 4,
                             "breakdown_by": []}
    params = load_params(write_project(root, overrides))
    write_test_split(params.path("splits"), CONVERSATIONS)
    _fit(tiny_model_dir, params.path("adapter"), steps=30)
    evaluate.run(params)
    align.run(params)  # align.method none: nothing trained, the SFT adapter is the final candidate
    evaluate_alignment.run(params)
    first_metrics = read_json(params.path("metrics"))
    first = promote.run(params)
    shutil.rmtree(params.path("adapter"))
    _fit(tiny_model_dir, params.path("adapter"), steps=5)
    evaluate.run(params)
    return root, first, first_metrics


def test_the_first_promotion_passes_and_records_why_there_was_no_comparison(lineage):
    root, first, first_metrics = lineage
    assert first_metrics["champion"]["compared"] is False
    manifest = read_json(root / "data" / "promoted" / "PROMOTED.json")
    reasons = manifest["champion"]["gate"]["reasons"]
    assert manifest["champion"]["compared"] is False and manifest["champion"]["gate"]["passed"] is True
    assert reasons == ["champion: no champion comparison (no champion yet: 'data/promoted' does not exist (the first "
                       "promotion)); pass."]
    assert reasons[0] in first.metrics["gate_reasons"]


def test_evaluate_measures_the_champion_on_the_same_rows(lineage):
    root, _, _ = lineage
    metrics = read_json(root / "data" / "metrics.json")
    section = metrics["champion"]
    assert section["compared"] is True and section["n_test"] == metrics["n_test"] == len(CONVERSATIONS)
    assert section["loaded_as"] == "a second LORA adapter on the candidate's base"
    assert section["candidate"]["loss"] == pytest.approx(metrics["fine_tuned"]["loss"])  # the same rows, the same model
    assert section["candidate"]["loss"] - section["champion"]["loss"] > 0.02  # the weaker adapter is worse
    assert section["gate"]["passed"] is False
    records = list(read_jsonl(root / "data" / "evaluation" / "examples.jsonl"))
    assert len(records) == len(CONVERSATIONS) and all("champion" in r and "output" in r["champion"] for r in records)


def test_the_report_has_the_side_by_side_table(lineage):
    root, _, _ = lineage
    md = (root / "data" / "evaluation" / "report.md").read_text()
    assert "## Champion: FAILED" in md
    assert HEADER in md
    html = (root / "data" / "evaluation" / "report.html").read_text()
    assert "Champion: <span class=\"fail\">" in html and "candidate - champion" in html


def test_a_worse_challenger_is_not_promoted_and_the_champion_stays(lineage, tmp_path):
    params = _copy(lineage[0], tmp_path)
    before = _files(params.path("promoted"))
    with pytest.raises(StageError) as caught:
        promote.run(params)
    message = str(caught.value)
    assert message.startswith(f"the sft adapter in '{params.path('adapter')}' was not promoted because it is worse "
                              f"than the champion in '{params.path('promoted')}'")
    assert "more than evaluate.champion_margin 0.02; the champion stays in place" in message
    assert message.endswith(".") and ". " not in message  # one sentence
    assert _files(params.path("promoted")) == before  # byte for byte


def test_a_champion_changed_since_the_evaluation_is_refused(lineage, tmp_path, tiny_model_dir):
    params = _copy(lineage[0], tmp_path, champion_margin=100.0)  # the margin would let it pass
    other = make_lora_adapter(tiny_model_dir, tmp_path / "other", r=8, seed=7)
    shutil.copy(other / "adapter_model.safetensors", params.path("promoted"))  # another champion promoted since
    with pytest.raises(StageError, match=r"the champion in '.*promoted' changed since 'evaluate' compared the sft "
                                         r"adapter with it .*re-run the 'evaluate' stage"):
        promote.run(params)


def test_within_the_margin_the_challenger_is_promoted_side_by_side(lineage, tmp_path):
    params = _copy(lineage[0], tmp_path, champion_margin=100.0)  # re-decided with the params of now
    result = promote.run(params)
    manifest = read_json(params.path("promoted") / "PROMOTED.json")
    side = manifest["champion"]
    assert side["compared"] is True and side["gate"]["passed"] is True and side["gate"]["champion_margin"] == 100.0
    assert {"base", "fine_tuned"} <= manifest.keys() and {"champion", "candidate", "delta", "ci"} <= side.keys()
    assert side["candidate"]["loss"] == pytest.approx(manifest["fine_tuned"]["loss"])
    assert HEADER in result.metrics["champion_table_md"]
    reasons = result.metrics["gate_reasons"]
    assert any(r.startswith("champion: loss candidate") and r.endswith("pass.") for r in reasons)


def test_metrics_without_a_champion_comparison_are_refused(lineage, tmp_path):
    params = _copy(lineage[0], tmp_path)
    metrics = read_json(params.path("metrics"))
    metrics.pop("champion")
    params.path("metrics").write_text(json.dumps(metrics))
    with pytest.raises(StageError, match=r"compares the sft adapter in '.*' with the champion .*re-run the 'evaluate'"):
        promote.run(params)


def test_alignment_metrics_defer_to_evaluate_when_align_method_is_none(lineage):
    section = read_json(lineage[0] / "data" / "alignment_metrics.json")["champion"]
    assert section["compared"] is False and section["measured_by"] == "evaluate"
    assert section["candidate_weights_sha256"] is None  # promote never mistakes it for the candidate's comparison


def test_evaluate_alignment_compares_the_sft_adapter_when_align_trained_nothing(lineage, tmp_path):
    """align.method dpo but no preference pairs: the SFT adapter stays the final candidate and evaluate-alignment
    measures it beside the champion (evaluate deferred to it)."""
    params = _copy(lineage[0], tmp_path, align_method="dpo")
    align._skip(params, "the preference data holds no pairs", {})  # what align writes when there are no pairs
    result = evaluate_alignment.run(params)
    section = read_json(params.path("alignment_metrics"))["champion"]
    assert section["compared"] is True and section["measured_by"] == "evaluate-alignment"
    assert section["n_test"] == len(CONVERSATIONS) and section["loaded_as"].startswith("a second LORA adapter")
    measured = read_json(lineage[0] / "data" / "metrics.json")["champion"]  # the same two models, the same rows
    assert section["champion"]["loss"] == pytest.approx(measured["champion"]["loss"], rel=1e-4)
    assert section["candidate"]["loss"] == pytest.approx(measured["candidate"]["loss"], rel=1e-4)
    assert section["gate"]["passed"] is False and result.metrics["champion_compared"] is True
    md = (params.path("alignment") / "report.md").read_text()
    assert "## Champion: FAILED" in md and "| metric | champion [95% CI] | SFT (candidate) [95% CI]" in md
    with pytest.raises(StageError, match="was not promoted because it is worse than the champion"):
        promote.run(params)


def test_the_aligned_candidate_and_its_champion_share_one_base(tiny_model_dir, tmp_path):
    """evaluate-alignment's seats: the champion becomes a third adapter beside "sft" and "aligned" on one base, and
    answers as the champion loaded on its own does; the candidate's adapter is active again afterwards."""
    params = load_params(write_project(tmp_path, {"paths": {"base_model": str(tiny_model_dir)}}))
    for seed, key in ((1, "adapter"), (2, "aligned_adapter"), (3, "promoted")):
        make_lora_adapter(tiny_model_dir, params.path(key), seed=seed)
    rows = evaluate._read_test_rows(write_test_split(params.path("splits"), CONVERSATIONS), None)
    models, tokenizer = evaluate_alignment.load_models(params)
    found, section = champion.locate(params, params.path("aligned_adapter"), candidate="aligned",
                                     measured_by="evaluate-alignment")
    assert champion.attach(models, models.model, found, section, base_dir=tiny_model_dir)
    assert models.champion is None and models.champion_adapter == "champion"
    active = models.model.active_adapter
    cfg = _cfg(max_new_tokens=4)
    result = evaluate.evaluate_models(models, tokenizer, rows, [{"messages": CONVERSATIONS[0]}], cfg, champion=True)
    assert models.model.active_adapter == active
    alone, _ = evaluate.load_models(tiny_model_dir, params.path("promoted"), full=False)
    alone_result = evaluate.evaluate_models(alone, tokenizer, rows, [{"messages": CONVERSATIONS[0]}], cfg)
    assert result.champion["champion"]["loss"] == pytest.approx(alone_result.summary["fine_tuned"]["loss"], rel=1e-5)
    assert result.champion["candidate"]["loss"] == pytest.approx(result.summary["fine_tuned"]["loss"], rel=1e-9)
    assert result.champion["candidate"]["loss"] != pytest.approx(result.champion["champion"]["loss"])
    assert [r["champion"]["output"] for r in result.examples] == [r["fine_tuned"]["output"]
                                                                  for r in alone_result.examples]
