"""Issue 18, chain-of-thought data and per-source metrics: reasoning rows train as they are, the evaluation scores
their extracted final answers (texts without reasoning exactly as before) and breaks every metric down per source."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pipelines import evaluate as ev
from pipelines import report
from pipelines.chat import encode_text
from pipelines.config import DEFAULT_ANSWER_PATTERNS, DEFAULT_REASONING_PATTERN, EvaluateConfig, load_params
from pipelines.io import read_jsonl
from pipelines.metrics import Answer, ModelScores, extract_answer, summarise
from tests.conftest import REPO, write_project
from tests.test_evaluate import adapter_dir, loaded  # noqa: F401  (fixtures: the tiny model with a LoRA adapter)

R, A = DEFAULT_REASONING_PATTERN, list(DEFAULT_ANSWER_PATTERNS)


@pytest.mark.parametrize(("text", "answer", "reasoning"), [
    pytest.param("<think>2 + 2 is 4</think>\n\n4", "4", "2 + 2 is 4", id="think-block"),
    pytest.param("<think>\nfirst\nsecond\n</think>\nAnswer: {\"a\": 1}", '{"a": 1}', "first\nsecond",
                 id="think-then-answer-line"),
    pytest.param("2 + 2 is 4</think> 4", "4", "2 + 2 is 4", id="closing-tag-only"),  # the prompt opened the block
    pytest.param("<think>still adding 17 and", "", "still adding 17 and", id="cut-off-while-reasoning"),
    pytest.param("Let's think step by step. 2 + 2 = 4.\nAnswer: 4", "4", "Let's think step by step. 2 + 2 = 4.",
                 id="answer-line"),
    pytest.param("Step 1: 6 * 7.\nFinal answer: 42", "42", "Step 1: 6 * 7.", id="final-answer-line"),
    pytest.param("Add them.\n**Answer:** 7", "7", "Add them.", id="markdown-answer-line"),
    pytest.param("Answer: 3\nWait, 1 + 2 + 2.\nAnswer: 5", "5", "Answer: 3\nWait, 1 + 2 + 2.", id="last-answer-wins"),
    pytest.param("Let's think step by step. 3 + 1 = 4, so the answer is 4.", "4",
                 "Let's think step by step. 3 + 1 = 4, so", id="the-answer-is"),
    pytest.param("Half of 7 is 3.5.\nThe answer is 3.5.", "3.5", "Half of 7 is 3.5.", id="the-answer-is-decimal"),
    pytest.param("We add 5 and 7: \\boxed{12}", "12", "We add 5 and 7:", id="boxed"),
])
def test_the_final_answer_is_extracted_from_reasoning(text, answer, reasoning):
    assert extract_answer(text, R, A) == Answer(answer, reasoning, True)


NO_REASONING = [
    '{"category": "billing", "priority": "high"}',
    "Answer: 4",  # an answer line that opens the text concludes nothing
    "The answer is in the manual on page 4.",
    "**Answer:** 7",
    "The parcel will arrive on Monday.\n\nBest regards",
    "",
    "  spaced  ",
    "<thinking>not our tag</thinking> 4",
]


@pytest.mark.parametrize("text", NO_REASONING)
def test_a_text_without_reasoning_is_scored_as_it_is(text):
    assert extract_answer(text, R, A) == Answer(text)


@pytest.mark.parametrize("text", ["<think>a</think>4", "Because 2 + 2.\nAnswer: 4"])
def test_extraction_is_off_without_patterns(text):
    assert extract_answer(text, None, []) == Answer(text)


def test_the_patterns_in_params_yaml_are_the_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.evaluate.reasoning_pattern == R and params.evaluate.answer_patterns == A


def test_every_answer_of_the_demo_is_scored_as_it_is(tmp_path):
    """The demo has no reasoning: extraction returns each of its answers unchanged, so its metrics cannot move."""
    from pipelines import ingest

    params = load_params(write_project(tmp_path))
    ingest.run(params)
    answers = [m["content"] for r in read_jsonl(params.path("raw_examples") / "examples.jsonl")
               for m in r["messages"] if m["role"] == "assistant"]
    assert len(answers) > 1000
    assert [extract_answer(a, R, A) for a in answers] == [Answer(a) for a in answers]


# ----------------------------------------------------------------------------------- evaluate_models, faked outputs

JSON = '{"category": "bug", "priority": "high"}'


def _rows(references: list[str], sources: list[str] | None = None) -> list[dict]:
    return [{"id": f"r{i}", "source": (sources or ["data/raw/a.jsonl"] * len(references))[i],
             "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": ref}]}
            for i, ref in enumerate(references)]


@pytest.fixture
def fake_outputs(monkeypatch):
    """Replace generation by fixed outputs per model (losses still come from the tiny model)."""
    outputs: dict[str, list[str]] = {}

    def generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, desc="generate"):
        return outputs[desc.removeprefix("generate ")][: len(prompts)]

    monkeypatch.setattr(ev, "generate", generate)
    return outputs


CFG = EvaluateConfig(batch_size=4, max_new_tokens=4, bootstrap_samples=100)


def test_rows_without_reasoning_get_the_metrics_of_before(loaded, fake_outputs):  # noqa: F811
    references = [JSON, '{"category": "billing", "priority": "low"}', "Your parcel is on its way.", "Eat well."]
    fake_outputs["base"] = ["", '{"category": "billing"', "Your parcel is late.", "The answer is sleep."]
    fake_outputs["fine_tuned"] = [JSON, '{"category": "billing", "priority": "low"}', "Your parcel is on its way.",
                                  "Eat well and sleep."]
    models, tokenizer = loaded
    result = ev.evaluate_models(models, tokenizer, _rows(references), ev.load_probe()[:2], CFG)
    nll = [0.0] * 4  # losses do not enter the text metrics; compare those with summarise on the raw texts
    before, _, _ = summarise(references, ModelScores(fake_outputs["base"], nll, [1] * 4),
                             ModelScores(fake_outputs["fine_tuned"], nll, [1] * 4), samples=100)
    for side in ("base", "fine_tuned", "delta"):
        for metric in ("exact_match", "rouge_l", "json_valid", "field_accuracy"):
            assert result.summary[side][metric] == before[side][metric], (side, metric)
            assert result.summary["ci"][side][metric] == before["ci"][side][metric]
    assert result.summary["reasoning"]["reference"] == {"with_reasoning": 0, "no_answer": 0,
                                                        "reasoning_tokens_mean": 0.0, "reasoning_tokens_max": 0}
    assert [r["fine_tuned"]["answer"] for r in result.examples] == fake_outputs["fine_tuned"]


def test_reasoning_rows_are_scored_on_their_final_answers(loaded, fake_outputs):  # noqa: F811
    references = ["Let's think step by step. 12 + 30 = 42.\nAnswer: 42", f"<think>It crashes: a bug.</think>\n{JSON}",
                  "Paris."]
    fake_outputs["base"] = ["42", "<think>maybe billing, or a bug that keeps", "Paris."]
    fake_outputs["fine_tuned"] = ["12 + 30 is 42.\nAnswer: 42", f"<think>A crash.</think>{JSON}", "Paris."]
    models, tokenizer = loaded
    result = ev.evaluate_models(models, tokenizer, _rows(references), ev.load_probe()[:2], CFG)
    s = result.summary
    assert s["fine_tuned"]["exact_match"] == 1.0 and s["base"]["exact_match"] == pytest.approx(2 / 3)
    assert s["n_json"] == 1 and s["fine_tuned"]["json_valid"] == 1.0 and s["base"]["json_valid"] == 0.0
    reasoning = s["reasoning"]
    assert reasoning["unit"] == "tokens" and reasoning["reference"]["with_reasoning"] == 2
    cut_off = len(encode_text(tokenizer, "maybe billing, or a bug that keeps")[0])  # base: cut off while reasoning
    assert reasoning["base"] == {"with_reasoning": 1, "no_answer": 1, "reasoning_tokens_mean": float(cut_off),
                                 "reasoning_tokens_max": cut_off}
    tokens = [len(encode_text(tokenizer, t)[0])
              for t in ("Let's think step by step. 12 + 30 = 42.", "It crashes: a bug.")]
    assert reasoning["reference"]["reasoning_tokens_mean"] == pytest.approx(sum(tokens) / 2, abs=0.01)
    first = result.examples[0]
    assert first["reference"] == references[0] and first["reference_answer"] == "42"
    assert first["fine_tuned"]["output"] == fake_outputs["fine_tuned"][0] and first["fine_tuned"]["answer"] == "42"
    assert first["fine_tuned"]["reasoning_tokens"] > 0 and first["base"]["reasoning_tokens"] == 0
    assert result.examples[2]["reference_reasoning_tokens"] == 0
    ctx = report.ReportContext(metrics=s, best=result.examples[:2], worst=result.examples[2:])
    md = report.render_markdown(ctx, [])
    assert "## Reasoning" in md and "| fine-tuned | 2 | 0 |" in md
    assert "| reference answer | base answer | fine-tuned answer |" in md and "(none)" in md
    html = report.render_html(ctx, {})
    assert "<h2>Reasoning</h2>" in html and "<th>fine-tuned answer</th>" in html


def test_metrics_are_broken_down_per_source_with_intervals(loaded, fake_outputs, monkeypatch):  # noqa: F811
    sources = ["data/raw/a.jsonl"] * 3 + ["data/raw/b.csv"] * 2 + ["data/raw/c.json"]
    references = ["x", "y", "z", JSON, JSON, "w"]
    fake_outputs["base"] = ["x", "no", "no", "no", JSON, "w"]
    fake_outputs["fine_tuned"] = ["x", "y", "z", JSON, JSON, "no"]
    models, tokenizer = loaded
    monkeypatch.setattr(ev, "BREAKDOWN_VALUES", 2)
    cfg = CFG.model_copy(update={"breakdown_by": ["source"]})
    result = ev.evaluate_models(models, tokenizer, _rows(references, sources), ev.load_probe()[:2], cfg)
    part = result.summary["breakdown"]["source"]
    assert [(v["value"], v["n"], v["n_json"]) for v in part["values"]] == [
        ("data/raw/a.jsonl", 3, 0), ("data/raw/b.csv", 2, 2)]
    assert part["left_out"] == {"values": 1, "rows": 1}
    a, b = part["values"]
    assert a["base"]["exact_match"] == pytest.approx(1 / 3) and a["fine_tuned"]["exact_match"] == 1.0
    assert a["delta"]["exact_match"] == pytest.approx(2 / 3) and "json_valid" not in a["base"]
    assert b["base"]["json_valid"] == 0.5 and b["fine_tuned"]["field_accuracy"] == 1.0
    for entry in (a, b):
        for metric in ("exact_match", "rouge_l", "loss"):
            ci = entry["ci"]["delta"][metric]
            assert ci["low"] <= entry["delta"][metric] + 1e-9 and entry["delta"][metric] <= ci["high"] + 1e-9
            assert math.isfinite(ci["low"])
    tables = report.breakdown_markdown(result.summary)
    assert len(tables) == 1 and "### Metrics per source" in tables[0]
    assert re.search(r"\| data/raw/a\.jsonl \| 3 \| 0\.333 → 1\.000 \(\+0\.667 \[", tables[0])
    assert "1 more values (1 rows) are not shown." in tables[0]
    html = report.render_html(report.ReportContext(metrics=result.summary), {})
    assert "<h3>Metrics per source</h3>" in html and "data/raw/b.csv" in html


def test_a_report_without_reasoning_keeps_its_example_columns():
    metrics, base_scores, tuned_scores = summarise(["ref"], ModelScores(["ref"], [1.0], [2]),
                                                   ModelScores(["x"], [1.0], [2]), samples=100)
    metrics.update({"n_test": 1, "primary_metric": "exact_match", "forgetting": 0.0, "gate": {"passed": False},
                    "reasoning": {side: {"with_reasoning": 0} for side in ("reference", "base", "fine_tuned")}})
    record = {"messages": [], "reference": "ref", "base": {"output": "ref", **base_scores[0]},
              "fine_tuned": {"output": "x", **tuned_scores[0]}}
    md = report.render_markdown(report.ReportContext(metrics=metrics, best=[record]), [])
    assert "| " + " | ".join(report.EXAMPLE_HEADER) + " |" in md and "Reasoning" not in md


# ------------------------------------------------------------------------------ reasoning rows train as they are


def test_reasoning_rows_pass_ingest_clean_and_format_intact(tmp_path, tiny_model_dir):
    from pipelines import clean, ingest
    from pipelines import format as fmt

    answers = ["<think>\nThe order was charged twice, so this is billing.\n</think>\n\n" + JSON,
               "Let's think step by step. 17 + 25 = 42.\nAnswer: 42"]
    rows = [{"instruction": f"Question {i}", "output": a} for i, a in enumerate(answers)]
    raw = tmp_path / "raw_in"
    raw.mkdir()
    (raw / "cot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = load_params(write_project(tmp_path / "proj", {"model": {"source": "local", "name": str(tiny_model_dir)},
                                                          "format": {"max_length": 1024}}, raw_from=raw))
    Path(params.path("base_model")).symlink_to(tiny_model_dir)
    for stage in (ingest, clean, fmt):
        stage.run(params)
    formatted = list(read_jsonl(params.path("formatted") / "dataset.jsonl"))
    assert [r["messages"][-1]["content"] for r in formatted] == answers
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    for row, answer in zip(formatted, answers, strict=True):  # the loss covers the reasoning, not only the answer
        final = extract_answer(answer, R, A).text
        assert row["n_completion_tokens"] > len(encode_text(tokenizer, final)[0]) + 5
