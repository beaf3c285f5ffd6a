"""The evaluation stage on the tiny model: batched greedy generation, completion loss, report files."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from pipelines.chat import tokenize_conversation, tokenize_prompt
from pipelines.config import ConfigError, EvaluateConfig, load_params
from pipelines.evaluate import (
    Models,
    completion_nll,
    evaluate_models,
    find_token_histogram,
    generate_ids,
    load_models,
    load_probe,
    loss_points,
    rank_examples,
    run,
    stop_token_ids,
)
from pipelines.io import StageError, read_json, read_jsonl
from tests.conftest import write_project

CONVERSATIONS = [
    [{"role": "user", "content": "My card was charged twice for the same order, please refund."},
     {"role": "assistant", "content": '{"category": "billing", "priority": "high"}'}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "I cannot log in."},
     {"role": "assistant", "content": '{"category": "login", "priority": "low"}'}],
    [{"role": "user", "content": "Where is my parcel? Tracking has not updated in a week."},
     {"role": "assistant", "content": "Your parcel is on its way."}],
    [{"role": "user", "content": "Could you add a dark mode?"},
     {"role": "assistant", "content": "Thanks, noted."},
     {"role": "user", "content": "The app crashes when I open the settings page."},
     {"role": "assistant", "content": '{"category": "bug", "priority": "high"}'}],
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat well, sleep, exercise."}],
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model whose B matrices are non-zero, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)  # before get_peft_model: its lora_A init draws from the global RNG, which earlier tests move
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    peft_model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    log = [{"loss": 3.0 - 0.2 * s, "step": s, "learning_rate": 1e-3} for s in range(1, 5)]
    log += [{"eval_loss": 2.9, "step": 2}, {"eval_loss": 2.6, "step": 4}, {"train_runtime": 1.0, "step": 4}]
    (folder / "train_log.json").write_text(json.dumps(log))
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, adapter_dir):
    return load_models(tiny_model_dir, adapter_dir, full=False)


def test_adapter_changes_the_model(loaded, tiny_tokenizer):
    models, tokenizer = loaded
    conv = [tokenize_conversation(tokenizer, c, only_last=True) for c in CONVERSATIONS]
    with models.use("base") as m:
        base, _ = completion_nll(m, tokenizer, conv, batch_size=4)
    with models.use("fine_tuned") as m:
        tuned, _ = completion_nll(m, tokenizer, conv, batch_size=4)
    assert all(abs(b - t) > 1e-3 for b, t in zip(base, tuned, strict=True))


@pytest.mark.parametrize("which", ["base", "fine_tuned"])
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_generation_equals_one_at_a_time(loaded, which, batch_size):
    """Left padding must not change greedy outputs: prompts of different lengths share a batch."""
    models, tokenizer = loaded
    prompts = [tokenize_prompt(tokenizer, c).input_ids for c in CONVERSATIONS]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    with models.use(which) as model:
        batched = generate_ids(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=10)
        single = [generate_ids(model, tokenizer, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert all(batched)  # something was generated for every prompt (the tiny model never stops early)


def test_completion_nll_equals_transformers_masked_loss(loaded):
    """Batched, right-padded, tail-only logits give the same per-example loss as HF's own loss."""
    import torch

    models, tokenizer = loaded
    conv = [tokenize_conversation(tokenizer, c, only_last=True) for c in CONVERSATIONS]
    with models.use("fine_tuned") as model:
        nll, counts = completion_nll(model, tokenizer, conv, batch_size=3)
        for c, total, n in zip(conv, nll, counts, strict=True):
            ids = torch.tensor([c.input_ids])
            labels = torch.tensor([[t if m else -100 for t, m in zip(c.input_ids, c.assistant_mask, strict=True)]])
            with torch.inference_mode():
                expected = model(input_ids=ids, labels=labels).loss.item()
            assert n == sum(c.assistant_mask) > 0
            assert total / n == pytest.approx(expected, rel=1e-4)


def test_stop_tokens_include_the_templates_end_of_turn(loaded):
    models, tokenizer = loaded
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(models.tuned, tokenizer)


def test_base_view_is_the_plain_base_model_and_adapter_comes_back(loaded, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    models, tokenizer = loaded
    conv = [tokenize_conversation(tokenizer, c, only_last=True) for c in CONVERSATIONS]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected, _ = completion_nll(plain, tokenizer, conv, batch_size=5)
    with models.use("fine_tuned") as m:
        tuned_before, _ = completion_nll(m, tokenizer, conv, batch_size=5)
    with models.use("base") as m:
        base, _ = completion_nll(m, tokenizer, conv, batch_size=5)
    with models.use("fine_tuned") as m:
        tuned_after, _ = completion_nll(m, tokenizer, conv, batch_size=5)
    assert base == pytest.approx(expected, rel=1e-5)
    assert tuned_after == pytest.approx(tuned_before, rel=1e-6)


def test_full_fine_tune_is_compared_with_a_separate_base(tiny_model_dir, tmp_path):
    """method: full -> the 'adapter' folder is a whole model and the base is loaded beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned_dir = tmp_path / "full"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05)  # tied with the embeddings: shifts every logit path
    model.save_pretrained(tuned_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tuned_dir)
    models, tokenizer = load_models(tiny_model_dir, tuned_dir, full=True)
    assert isinstance(models, Models) and models.separate_base is not None
    cfg = EvaluateConfig(batch_size=4, max_new_tokens=4, bootstrap_samples=100)
    result = evaluate_models(models, tokenizer, [{"id": "a", "messages": c} for c in CONVERSATIONS[:2]],
                             load_probe()[:3], cfg)
    assert result.summary["base"]["loss"] != pytest.approx(result.summary["fine_tuned"]["loss"])


def test_probe_set_is_shipped_and_well_formed(tiny_tokenizer):
    probe = load_probe()
    assert 30 <= len(probe) <= 60
    assert len({p["id"] for p in probe}) == len(probe)
    for row in probe:
        assert [m["role"] for m in row["messages"]][-1] == "assistant"
        assert tokenize_conversation(tiny_tokenizer, row["messages"], only_last=True).n_completion_tokens > 0


def test_loss_points_reads_trainer_log_history_and_skips_junk():
    log = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.5, "step": 1}, {"loss": float("nan"), "step": 2},
           {"train_runtime": 3.0, "step": 2}, "junk", {"loss": 1.0}, {"loss": 1.2, "step": 3},
           {"eval_loss": 1.4, "step": 3}, {"eval_loss": 1.4, "step": 3}]  # final evaluate() repeats a step
    train, evals = loss_points(log)
    assert train == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.2}]
    assert evals == [{"step": 1, "loss": 1.5}, {"step": 3, "loss": 1.4}]
    assert loss_points({"not": "a list"}) == ([], [])


@pytest.mark.parametrize("report_json, expected_counts", [
    ({"token_histogram": {"edges": [0, 10, 20], "counts": [3, 4]}}, [3, 4]),
    ({"stats": {"n_tokens": {"histogram": {"bins": [0, 8, 16, 24], "counts": [1, 2, 3]}}}}, [1, 2, 3]),
    ({"other": {"bins": [0, 1, 2], "counts": [9, 9]}, "tokens": {"bin_edges": [0, 5, 10], "counts": [5, 6]}}, [5, 6]),
    ({"token_histogram": {"bins": [0, 10, 20], "counts": [7, 8]}}, [7, 8]),  # left edges only
    ({"token_histogram": {"edges": [0, 10], "counts": [1, 2, 3]}}, None),  # inconsistent: ignored
    ({"rows": 10}, None),
])
def test_find_token_histogram_tolerates_layouts(report_json, expected_counts):
    hist = find_token_histogram(report_json)
    if expected_counts is None:
        assert hist is None
    else:
        assert hist["counts"] == expected_counts
        assert len(hist["edges"]) == len(hist["counts"]) + 1


def _record(i: int, ft_score: float, rouge: float) -> dict:
    return {"id": str(i), "fine_tuned": {"exact_match": ft_score, "rouge_l": rouge, "loss": 1.0}}


def test_rank_examples_best_and_worst_do_not_overlap():
    records = [_record(i, float(i % 2), i / 10) for i in range(7)]
    best, worst = rank_examples(records, "exact_match", k=5)
    assert not {r["id"] for r in best} & {r["id"] for r in worst}
    assert len(best) + len(worst) == 7
    assert best[0]["id"] == "5" and worst[0]["id"] == "0"


# --------------------------------------------------------------------------------------- run()


def _split_row(i: int, messages: list, tokenizer) -> dict:
    tok = tokenize_conversation(tokenizer, messages, only_last=True)
    return {"id": f"{i:04x}", "source": "data/raw/demo.jsonl", "line": i + 1, "format": "messages",
            "messages": messages, "tools": None, "meta": {}, "n_tokens": tok.n_tokens,
            "n_completion_tokens": tok.n_completion_tokens, "truncated": False, "group": f"g{i}"}


def _project(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path, tokenizer, **evaluate) -> Path:
    overrides = {"model": {"source": "local", "name": str(tiny_model_dir)},
                 "paths": {"base_model": str(tiny_model_dir), "adapter": str(adapter_dir)},
                 "evaluate": {"max_new_tokens": 8, "bootstrap_samples": 200, "batch_size": 4, **evaluate}}
    params_path = write_project(tmp_path, overrides)
    splits = tmp_path / "data" / "splits"
    splits.mkdir(parents=True)
    rows = [_split_row(i, CONVERSATIONS[i % len(CONVERSATIONS)], tokenizer) for i in range(10)]
    (splits / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return params_path


def test_run_writes_self_contained_report_and_metrics(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer):
    params = load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer, max_examples=8))
    started = time.perf_counter()
    result = run(params)
    print(f"evaluate.run on the tiny model: {time.perf_counter() - started:.2f} s, {result.metrics['seconds']}")
    out = tmp_path / "data" / "evaluation"

    metrics = read_json(tmp_path / "data" / "metrics.json")
    assert {"base", "fine_tuned", "delta", "ci", "forgetting", "probe", "gate", "n_test", "per_field",
            "adapter_sha256"} <= metrics.keys()
    assert metrics["n_test"] == 8 and metrics["n_json"] == 5  # max_examples; rows 0, 1, 3, 5, 6 are JSON
    for model in ("base", "fine_tuned"):
        assert {"loss", "perplexity", "exact_match", "rouge_l", "json_valid", "field_accuracy"} <= metrics[model].keys()
        ci = metrics["ci"][model]["rouge_l"]
        assert ci["low"] <= metrics[model]["rouge_l"] <= ci["high"]
    assert set(metrics["per_field"]) == {"category", "priority"}
    assert isinstance(metrics["gate"]["passed"], bool) and len(metrics["gate"]["reasons"]) == 3
    assert metrics["evaluated_on"] == {"device": "cpu", "precision": "fp32", "four_bit_base": False}

    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)  # nothing fetched from anywhere
    assert "<link" not in html and "<script" not in html
    assert html.count("data:image/png;base64,") == 3  # metrics, loss curve, token histogram
    assert "Worst examples" in html and "Best examples" in html
    md = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / image).is_file()
    assert "| metric |" in md and "loss_curve.png" in md
    assert result.metrics["metric_table_md"] in md
    [per_source] = metrics["breakdown"]["source"]["values"]  # evaluate.breakdown_by: [source] by default
    assert per_source["value"] == "data/raw/demo.jsonl" and per_source["n"] == 8
    assert per_source["base"] == metrics["base"] and per_source["ci"] == metrics["ci"]  # one source: the whole
    assert "### Metrics per source" in md and result.metrics["breakdown_md"] in md
    assert metrics["reasoning"]["reference"]["with_reasoning"] == 0 and "## Reasoning" not in md

    examples = list(read_jsonl(out / "examples.jsonl"))
    assert len(examples) == 8
    assert {"prompt", "reference", "reference_answer", "source", "base", "fine_tuned"} <= examples[0].keys()
    assert examples[0]["reference_answer"] == examples[0]["reference"]  # no reasoning: the answer is the text
    assert (out / "train_loss.csv").read_text().splitlines() == ["step,train_loss", "1,2.8", "2,2.6", "3,2.4", "4,2.2"]
    assert (out / "eval_loss.csv").read_text().splitlines() == ["step,eval_loss", "2,2.9", "4,2.6"]
    assert result.metrics["gate_passed"] == metrics["gate"]["passed"]
    json.dumps(result.metrics)  # Dagster metadata must be JSON-able


def test_unknown_primary_metric_is_refused_at_load(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer):
    # params.yaml is refused when loaded (check-params, the first stage of a run), not after training
    with pytest.raises(ConfigError, match=r"'evaluate.primary_metric' = 'bleu' .* use one of: exact_match, rouge_l"):
        load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer, primary_metric="bleu"))


def test_run_names_the_missing_test_split(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer):
    params = load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer))
    shutil.rmtree(tmp_path / "data" / "splits")
    with pytest.raises(StageError, match="test.jsonl' is missing; run the 'split' stage"):
        run(params)


def test_run_names_the_bad_test_row(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer):
    params = load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer))
    test = tmp_path / "data" / "splits" / "test.jsonl"
    rows = test.read_text().splitlines()
    bad = json.loads(rows[1])
    bad["messages"] = [{"role": "user", "content": "no answer"}]
    rows[1] = json.dumps(bad)
    test.write_text("\n".join(rows) + "\n")
    with pytest.raises(StageError, match=r"test.jsonl:2: conversation has no assistant message"):
        run(params)


@pytest.mark.parametrize("breakdown_by, message", [
    (["sorce"], "evaluate.breakdown_by lists 'sorce', which is not a field of any row in '{test}' (did you mean "
     "'source'?); use a dotted field of the rows such as 'source' or 'meta.category', or remove it from params.yaml"),
    (["source", "meta.categroy"], "evaluate.breakdown_by lists 'meta.categroy', which is not a field of any row in "
     "'{test}' (did you mean 'meta.category'?); use"),
    (["zzz"], "evaluate.breakdown_by lists 'zzz', which is not a field of any row in '{test}'; use a dotted field"),
])
def test_a_breakdown_field_no_test_row_has_is_named(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer,
                                                    breakdown_by, message):
    """A typo in evaluate.breakdown_by put every row under '(missing)' with exit 0; now one sentence, before any
    model is loaded (as split.stratify_by at the split stage)."""
    params = load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer, breakdown_by=breakdown_by))
    test = tmp_path / "data" / "splits" / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    rows[3]["meta"] = {"category": "billing"}  # one row has it: a field some rows lack is fine ('(missing)')
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageError) as err:
        run(params)
    assert str(err.value).startswith(message.format(test=test))


def test_field_names_lists_top_level_and_nested_keys():
    from pipelines.schemas import field_names

    assert field_names([{"source": "a", "meta": {"category": "x"}}, {"id": 1, "meta": {}}]) == [
        "id", "meta", "meta.category", "source"]


@pytest.mark.parametrize("field, value, message", [
    ("n_completion_tokens", 10_000, "at line 3: fails the check 'n_completion_tokens must not exceed n_tokens'"),
    ("line", 0, "at line 3: column 'line' fails greater_than_or_equal_to(1)"),
])
def test_run_names_the_row_breaking_the_split_contract(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer,
                                                       field, value, message):
    params = load_params(_project(tmp_path, tiny_model_dir, adapter_dir, tiny_tokenizer))
    test = tmp_path / "data" / "splits" / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    rows[2][field] = value
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageError, match="breaks the row contract") as err:
        run(params)
    assert message in str(err.value)


def test_report_escapes_model_output_and_says_when_curves_are_missing():
    from pipelines import report
    from pipelines.metrics import ModelScores, summarise

    hostile = "<script>alert(1)</script> | a\nb"
    scores = ModelScores(predictions=[hostile], nll_sum=[1.0], n_tokens=[2])
    metrics, base_scores, tuned_scores = summarise(["ref"], scores, scores, samples=100)
    metrics.update({"n_test": 1, "primary_metric": "exact_match", "forgetting": 0.0,
                    "gate": {"passed": False, "reasons": ["exact_match: ...; FAIL."]}})
    record = {"messages": [{"role": "user", "content": "q | <b>"}], "reference": "ref",
              "base": {"output": hostile, **base_scores[0]}, "fine_tuned": {"output": "", **tuned_scores[0]}}
    ctx = report.ReportContext(metrics=metrics, best=[record])
    page = report.render_html(ctx, report.plots(ctx))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert report.NO_LOSS_CURVE in page and "(empty)" in page
    md = report.render_markdown(ctx, ["metrics.png"])
    row = next(line for line in md.splitlines() if "alert(1)" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == len(report.EXAMPLE_HEADER) + 1  # no cell split by a '|'
    assert "<script>" not in md and report.NO_LOSS_CURVE in md


def test_evaluation_follows_the_trainer_environment(tmp_path, tiny_model_dir, monkeypatch):
    """The evaluate stage takes the trainer resource's device and precision (a GPU in bf16/fp16, the CPU in fp32);
    the Dagster asset hands it the resource's environment as the train asset does."""
    import dagster as dg

    from assets.evaluation import evaluation_report
    from pipelines import evaluate
    from pipelines.train_env import TrainEnv
    from resources.project import ProjectResource
    from resources.trainer import TrainerResource
    from tests.conftest import tiny_overrides, write_project

    gpu = TrainEnv(device="cuda", precision="bf16", num_threads=1, load_in_4bit=False, launcher="in_process",
                   num_processes=1, gradient_checkpointing=False, accelerate_config=None)
    assert evaluate.evaluation_precision(gpu) == "bf16"
    assert evaluate.evaluation_precision(TrainEnv.resolve(device="cpu")) == "fp32"
    assert evaluate.evaluation_precision(None) == "fp32"

    seen = []
    monkeypatch.setattr(evaluate, "run", lambda params, env=None: seen.append(env) or (_ for _ in ()).throw(
        evaluate.StageError("stop here")))
    params_file = write_project(tmp_path, tiny_overrides(tiny_model_dir))
    result = dg.materialize([evaluation_report], raise_on_error=False, resources={
        "project": ProjectResource(params_file=str(params_file)), "trainer": TrainerResource(device="cpu",
                                                                                             num_threads=1)})
    assert not result.success and seen == [TrainEnv.resolve(device="cpu", num_threads=1)]
