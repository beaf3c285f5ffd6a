"""Preference tuning on the tiny model: the SFT model is the reference, only the adapter moves, the margin rises,
a killed run resumes to the same adapter, every method trains, and the evaluation and gate see it.

    .venv/bin/python -m pytest tests/test_align.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import align, evaluate_alignment, io, preferences
from pipelines.config import AlignGateConfig, load_params
from pipelines.io import StageError, read_json
from pipelines.metrics import alignment_gate, preference_scores
from pipelines.train_env import TrainEnv
from tests.conftest import REPO, SHARED_DATASETS

CPU = TrainEnv.resolve(device="cpu", num_threads=1)
# A memorisable set: four questions (padded with '!' to vary lengths), a JSON answer to prefer and a mistake.
QA = [("My card was charged twice", '{"category": "billing"}', "It is about billing."),
      ("I cannot log in", '{"category": "login"}', '{"category": "bug"}'),
      ("The app crashes", '{"category": "bug"}', "A bug, I think."),
      ("Where is my parcel?", '{"category": "shipping"}', '{"category": "billing"}')]


def pair_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        question, chosen, rejected = QA[i % 4]
        rows.append({"id": f"{i:04x}", "source": "data/raw/p.jsonl", "line": i + 1, "format": "messages_pair",
                     "kind": "pair", "prompt": [{"role": "user", "content": question + "!" * (i % 5)}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "completion": None, "label": None,
                     "tools": None, "meta": {}, "group": f"g{i}", "sft_split": None})
    return rows


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """An SFT adapter that is not the base: LoRA with random B (peft starts B at 0, i.e. at the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sft_adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def make_project(root: Path, model_dir: Path, sft: Path, settings: dict | None = None, *, n_train: int = 16,
                 n_val: int = 4, n_test: int = 8) -> Path:
    """params.yaml + preference splits in `root`; base model and SFT adapter point at the fixtures."""
    prefs = root / "data" / "preferences"
    prefs.mkdir(parents=True, exist_ok=True)
    (prefs / io.MARKER).write_text(io._marker("preferences"))  # as the preference-data stage writes its folder
    for name, rows in (("train", pair_rows(n_train)), ("validation", pair_rows(n_val, 1000)),
                       ("test", pair_rows(n_test, 2000))):
        (prefs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"method": "dpo", "max_steps": 8, "batch_size": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 1,
           "learning_rate": 0.01, "warmup_ratio": 0.0, **(settings or {})}
    params = {"paths": {"base_model": str(model_dir), "adapter": str(sft)}, "align": cfg}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def trainer_for(params, tokenizer):
    rows = [json.loads(line) for line in (params.path("preferences") / "train.jsonl").read_text().splitlines()]
    examples, _ = align.examples_for(params.align.method, rows, params.align.seed)
    model, ref, _ = align.load_policy(params, CPU)
    return align.build_trainer(model, ref, tokenizer, align.to_dataset(examples), None, params.align, CPU,
                               params.path("align_checkpoints") / "t", 1024)


def sft_sequence_logps(sft: Path, model_dir: Path, batch: dict) -> torch.Tensor:
    """log p(answer) of each row of a DPO batch under an independently loaded SFT model (plain logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), sft).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)  # (2 * batch,): chosen rows, then rejected rows


# ------------------------------------------------------------------------------------ reference and weights


def test_the_reference_is_the_sft_model_and_only_the_adapter_moves(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                    sft_dir):
    """After training steps the policy has moved, but TRL's reference log-probabilities still equal those of the SFT
    model loaded on its own (to 1e-5 nats), and no base weight changed."""
    from safetensors.torch import load_file

    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, {"max_steps": 3}))
    trainer = trainer_for(params, tiny_tokenizer)
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapter == "default"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    base = [n for n in before if "lora_" not in n]
    trained = [n for n in before if ".default." in n]
    assert base and trained
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in base)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trained)
    sft_weights = load_file(sft_dir / "adapter_model.safetensors")  # keys: ...lora_A.weight (no adapter name)
    ref = {n.replace(".ref.", "."): p for n, p in model.named_parameters() if ".ref." in n}
    assert len(ref) == len(sft_weights)
    assert all(torch.equal(p.detach(), sft_weights[n]) for n, p in ref.items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)

    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    expected = sft_sequence_logps(sft_dir, tiny_model_dir, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        policy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True).log_probs.sum(-1)
    assert (policy - expected).abs().max() > 1e-3  # the policy is no longer the reference


def test_dpo_raises_the_margin_on_a_memorisable_set(tmp_path, tiny_model_dir, sft_dir):
    """The aligned model ranks chosen above rejected by more than the SFT model on every training pair, and the
    implicit reward margin TRL logs goes up (plain DPO: the sft term's own test is below)."""
    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, {"max_steps": 16, "sft_weight": 0.0}))
    result = align.run(params, CPU)
    curve = result.metrics["reward_curve"]
    assert curve["margin"][0] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert curve["margin"][-1] > 0.5
    models, tokenizer = evaluate_alignment.load_models(params)
    pairs, _ = preferences.as_pairs(pair_rows(16))
    logps = evaluate_alignment.pair_log_likelihoods(models, tokenizer, pairs, batch_size=8)
    margin = {name: [c - r for c, r in zip(lp["chosen"], lp["rejected"], strict=True)] for name, lp in logps.items()}
    assert all(a > s + 1.0 for a, s in zip(margin["aligned"], margin["sft"], strict=True)), margin
    card = (params.path("aligned_adapter") / "README.md").read_text()
    assert "**Reference model:** the SFT model: base + SFT adapter" in card
    files = {p.name for p in params.path("aligned_adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "train_log.json", "train_metrics.json"} <= files
    assert not (params.path("aligned_adapter") / "ref").exists()  # TRL's frozen copy is not shipped


def test_the_sft_term_keeps_the_chosen_answers_likely(tmp_path, tiny_model_dir, sft_dir):
    """align.sft_weight (RPO: DPO + NLL of the chosen answer, TRL's loss_type [sigmoid, sft]): after the same steps
    from the same SFT adapter, the chosen answers are more likely than under plain DPO, and the ranking still rises."""
    chosen, margins = {}, {}
    for weight in (0.0, 1.0):
        root = tmp_path / f"w{weight}"
        params = load_params(make_project(root, tiny_model_dir, sft_dir, {"max_steps": 8, "sft_weight": weight}))
        align.run(params, CPU)
        models, tokenizer = evaluate_alignment.load_models(params)
        pairs, _ = preferences.as_pairs(pair_rows(16))
        logps = evaluate_alignment.pair_log_likelihoods(models, tokenizer, pairs, batch_size=8)["aligned"]
        chosen[weight] = sum(logps["chosen"]) / len(pairs)
        margins[weight] = sum(c - r for c, r in zip(logps["chosen"], logps["rejected"], strict=True)) / len(pairs)
    assert chosen[1.0] > chosen[0.0] + 0.1, chosen
    assert margins[1.0] > 0, margins


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_the_sft_term_is_refused_outside_dpo(method):
    from pydantic import ValidationError

    from pipelines.config import AlignConfig

    with pytest.raises(ValidationError, match="align.sft_weight = 0.5 applies to align.method dpo only"):
        AlignConfig(method=method, sft_weight=0.5)


# ------------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method, reference", [("kto", "the SFT model"), ("orpo", "none: the loss is reference-free"),
                                               ("simpo", "none: the loss is reference-free")])
def test_every_method_trains_and_logs_rewards(tmp_path, tiny_model_dir, sft_dir, method, reference):
    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, {"method": method, "max_steps": 4}))
    result = align.run(params, CPU)
    m = result.metrics
    assert m["steps"] == 4 and m["method"] == method and m["reference"].startswith(reference)
    assert m["train_examples"] == (32 if method == "kto" else 16)  # KTO: every pair is one row of each label
    log = read_json(params.path("aligned_adapter") / "train_log.json")
    assert any("rewards/chosen" in h and "rewards/rejected" in h for h in log)
    assert (params.path("aligned_adapter") / "adapter_model.safetensors").is_file()


def test_nothing_to_train_leaves_a_record_and_the_gate_not_applicable(tmp_path, tiny_model_dir, sft_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, {"method": "none"}))
    assert align.run(params, CPU).metrics["skipped"] is True
    result = evaluate_alignment.run(params)
    metrics = read_json(params.path("alignment_metrics"))
    assert metrics["applicable"] is False and metrics["gate"]["applicable"] is False
    assert result.metrics["gate_applicable"] is False and "align.method is none" in metrics["reason"]
    assert "NOT APPLICABLE" in (params.path("alignment") / "report.md").read_text()

    (params.path("preferences") / "train.jsonl").write_text("")  # dpo, but no pairs at all
    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, n_train=0))
    assert "no training pairs for align.method dpo" in align.run(params, CPU).metrics["reason"]


# -------------------------------------------------------------------------------------------------- resume


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, sft_dir):
    """Kill -9 after checkpoint 10 or later (32 pairs / batch 4 = 8 steps an epoch: mid-epoch 2), rerun: the adapter
    equals that of a run never interrupted. Measured: 0.0 (same machine, one thread). Tolerance as the train
    stage's test: max |A - B| <= 1e-5 x the largest adapter weight; every logged loss and reward within 1e-5."""
    from safetensors.torch import load_file

    settings = {"max_steps": 20, "save_steps": 5, "eval_steps": 5, "early_stopping_patience": 0}
    uninterrupted = load_params(make_project(tmp_path / "a", tiny_model_dir, sft_dir, settings, n_train=32))
    align.run(uninterrupted, CPU)

    params_file = make_project(tmp_path / "b", tiny_model_dir, sft_dir, settings, n_train=32)
    params = load_params(params_file)
    run_dir = params.path("align_checkpoints") / align.run_fingerprint(params)["run_hash"]
    assert run_dir.name == align.run_fingerprint(uninterrupted)["run_hash"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINES_TRAIN_THREADS": "1", "PIPELINES_TRAIN_DEVICE": "cpu",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "align", "--params", str(params_file)], env=env,
                            cwd=tmp_path / "b", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not [p for p in run_dir.glob("checkpoint-*/fingerprint.json") if int(p.parent.name[11:]) >= 10]:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean-up, no final save
        proc.wait()
    assert not params.path("aligned_adapter").exists()

    resumed = align.run(params, CPU)
    start = resumed.metrics["resumed_from_step"]
    assert start is not None and 10 <= start < 20 and start % 8 != 0
    a = load_file(uninterrupted.path("aligned_adapter") / "adapter_model.safetensors")
    b = load_file(params.path("aligned_adapter") / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    scale = max(t.abs().max().item() for t in a.values())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed from step {start}: max |A - B| = {diff:.3g}, largest weight {scale:.3g}")
    assert diff <= 1e-5 * scale

    def logged(folder: Path) -> dict:
        keys = ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "grad_norm")
        return {(h["step"], k): h[k] for h in read_json(folder / "train_log.json") for k in keys if k in h}

    la, lb = logged(uninterrupted.path("aligned_adapter")), logged(params.path("aligned_adapter"))
    assert la.keys() == lb.keys() and any(step > start for step, _ in la)
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_resume_never_trains_a_finished_run_past_max_steps(tmp_path, tiny_model_dir, sft_dir, method):
    """As the train stage (tests/test_train.py): a rerun of a finished run restores its output byte for byte (it
    went on to step 3 before: transformers steps once before it checks max_steps); without the record it trains
    from step 0 again, to the same weights."""
    from pipelines import checkpoints
    from pipelines.io import sha256_tree

    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir, {"method": method, "max_steps": 2,
                                                                          "eval_steps": 1}))
    align.run(params, CPU)
    out = params.path("aligned_adapter")
    weights, tree = (out / "adapter_model.safetensors").read_bytes(), sha256_tree(out)
    again = align.run(params, CPU)
    assert (again.metrics["steps"], again.metrics["finished_run_restored"]) == (2, True)
    assert sha256_tree(out) == tree
    run_dir = params.path("align_checkpoints") / again.metrics["run_hash"]
    (run_dir / checkpoints.COMPLETED_RECORD).unlink()  # killed between the last checkpoint and the record
    fresh = align.run(params, CPU)
    assert (fresh.metrics["steps"], fresh.metrics["resumed_from_step"]) == (2, None)
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]


# ----------------------------------------------------------------------------------- evaluation and gate


def test_preference_scores_on_literal_margins():
    scores = preference_scores([1.0, -2.0, 0.0, 3.0], [2.0, 1.0, -1.0, 3.0], beta=0.5, samples=200)
    assert scores["sft"] == {"accuracy": 0.5, "margin": 0.5} and scores["aligned"] == {"accuracy": 0.75,
                                                                                      "margin": 1.25}
    assert scores["delta"]["accuracy"] == 0.25 and scores["n_pairs"] == 4
    # beta * (aligned - sft) per pair: 0.5, 1.5, -0.5, 0.0 -> TRL's held-out rewards/accuracies and margins
    assert scores["implicit_reward"]["accuracy"] == 0.5 and scores["implicit_reward"]["margin"] == 0.375


def _alignment_metrics(gain_ci=(0.05, 0.3), task=(0.80, 0.79), forgetting=0.02) -> dict:
    low, high = gain_ci
    return {"preference": {"n_pairs": 60, "confidence": 0.95, "sft": {"accuracy": 0.7}, "aligned": {"accuracy": 0.85},
                           "delta": {"accuracy": 0.15}, "ci": {"delta": {"accuracy": {"low": low, "high": high}}}},
            "task": {"n_test": 100, "sft": {"exact_match": task[0], "loss": 0.5},
                     "aligned": {"exact_match": task[1], "loss": 0.6}, "forgetting": forgetting,
                     "probe": {"sft_loss": 2.0, "aligned_loss": 2.0 + forgetting}}}


@pytest.mark.parametrize("metrics, primary, failing", [
    (_alignment_metrics(), "exact_match", []),
    (_alignment_metrics(gain_ci=(-0.01, 0.3)), "exact_match", ["[-0.010, +0.300] does not lie above 0"]),
    (_alignment_metrics(task=(0.80, 0.75)), "exact_match", ["a drop of +0.0500, over the allowed 0.0200"]),
    (_alignment_metrics(task=(0.80, 0.82)), "exact_match", []),  # a rise is no drop
    (_alignment_metrics(), "loss", ["loss aligned 0.6000 vs SFT 0.5000 on 100 test rows, a drop of +0.1000"]),
    (_alignment_metrics(forgetting=0.3), "exact_match", ["changed by +0.3000 nats/token (SFT 2.0000 -> aligned"]),
    ({}, "exact_match", ["no held-out pairs", "not measured", "no probe-set loss"]),
])
def test_alignment_gate(metrics, primary, failing):
    ok, reasons = alignment_gate(metrics, AlignGateConfig(), primary)
    fails = [r for r in reasons if r.endswith("FAIL.")]
    assert ok is (not failing) and len(fails) == len(failing), reasons
    for words in failing:
        assert any(words in r for r in fails), (words, fails)


def with_sft_test_split(params_file: Path) -> None:
    """An SFT test split of six memorisable rows, and a quick evaluate section, for evaluate-alignment."""
    from tests.test_train import chat_rows

    splits = params_file.parent / "data" / "splits"
    splits.mkdir(parents=True)
    rows = [{**r, "source": "s", "line": i + 1, "format": "messages", "meta": {}, "n_tokens": 20,
             "n_completion_tokens": 5, "truncated": False, "group": r["id"]} for i, r in enumerate(chat_rows(6))]
    (splits / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_params = yaml.safe_load(params_file.read_text())
    yaml_params["evaluate"] = {"max_new_tokens": 8, "bootstrap_samples": 200, "batch_size": 8}
    params_file.write_text(yaml.safe_dump(yaml_params))


def test_evaluation_compares_sft_and_aligned_and_writes_the_report(tmp_path, tiny_model_dir, sft_dir):
    params_file = make_project(tmp_path, tiny_model_dir, sft_dir, {"max_steps": 12})
    with_sft_test_split(params_file)
    params = load_params(params_file)
    align.run(params, CPU)
    result = evaluate_alignment.run(params)
    m = read_json(params.path("alignment_metrics"))
    pref = m["preference"]
    assert pref["n_pairs"] == 8 and pref["aligned"]["margin"] > pref["sft"]["margin"]
    assert pref["aligned"]["accuracy"] >= pref["sft"]["accuracy"]  # the test pairs ask the memorised questions
    assert pref["implicit_reward"]["margin"] == pytest.approx(
        m["beta"] * (pref["aligned"]["margin"] - pref["sft"]["margin"]), rel=1e-6)
    assert {"sft", "aligned", "delta", "ci", "probe", "forgetting"} <= m["task"].keys() and m["task"]["n_test"] == 6
    assert len(m["gate"]["reasons"]) == 4 and m["gate"]["applicable"] is True
    assert m["aligned_adapter_sha256"] and m["sft_adapter_sha256"] != m["aligned_adapter_sha256"]
    out = params.path("alignment")
    html = (out / "report.html").read_text()
    for section in ("Alignment gate", "Held-out preference pairs", "Task metrics on the SFT test split",
                    "Forgetting", "held-out pairs side by side", "data:image/png;base64"):
        assert section in html
    assert (out / "reward_margins.csv").read_text().startswith("step,reward_margin\n1,0\n")
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 8
    assert result.metrics["n_pairs"] == 8 and "| held-out pairs |" in result.metrics["metric_table_md"]


def test_held_out_rows_without_pairs_give_no_preference_evidence(tmp_path, tiny_model_dir, sft_dir):
    """KTO rows whose prompts carry one label each cannot be ranked: the report says so and the gate fails on it."""
    params_file = make_project(tmp_path, tiny_model_dir, sft_dir, {"method": "kto", "max_steps": 2})
    with_sft_test_split(params_file)
    params = load_params(params_file)
    unpaired = [{**r, "kind": "unpaired", "chosen": None, "rejected": None, "completion": r["chosen"], "label": True}
                for r in pair_rows(3, 3000)]
    (params.path("preferences") / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    align.run(params, CPU)
    result = evaluate_alignment.run(params)
    m = read_json(params.path("alignment_metrics"))
    assert m["preference"] is None and m["unused_unpaired_rows"] == 3 and result.metrics["n_pairs"] == 0
    assert m["gate"]["passed"] is False and "no held-out pairs were measured; FAIL." in m["gate"]["reasons"][0]
    assert "No held-out preference pairs" in (params.path("alignment") / "report.md").read_text()


# ----------------------------------------------------------------------------------------------- real data

needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent")


@needs_shared
@pytest.mark.parametrize("name, method", [("dpo_en_demo.json", "dpo"), ("kto_en_demo.json", "kto")])
def test_shared_preference_datasets_train_a_few_steps(tmp_path, tiny_model_dir, sft_dir, name, method):
    """The shared DPO and KTO demos go through preference-data and train two steps; every row is accounted for:
    trained on, or dropped because its prompt alone is over format.max_length (the tiny tokenizer needs ~4x the
    tokens of a real one)."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / name).write_bytes((SHARED_DATASETS / name).read_bytes())
    params_file = make_project(tmp_path, tiny_model_dir, sft_dir, {"method": method, "max_steps": 2,
                                                                    "batch_size": 2})
    splits = tmp_path / "data" / "splits"
    splits.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (splits / f"{split}.jsonl").write_text("")
    params = load_params(params_file)
    prefs = preferences.run(params).metrics
    assert prefs["malformed"] == 0
    expected = {"dpo_en_demo.json": (295, 0, 0), "kto_en_demo.json": (0, 150, 150)}[name]
    assert (prefs["pairs"], prefs["desirable"], prefs["undesirable"]) == expected
    m = align.run(params, CPU).metrics
    assert m["steps"] == 2
    trainable = prefs["rows_train"] + prefs["rows_validation"]  # one trainer row per pair (dpo) or row (kto)
    assert m["train_examples"] + m["validation_examples"] + m["overlong_prompt_dropped"] == trainable


def test_a_missing_sft_adapter_names_the_stage(tmp_path, tiny_model_dir, sft_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, tmp_path / "nowhere"))
    with pytest.raises(StageError, match="run the 'train' stage first"):
        align.run(params, CPU)


def test_a_second_align_while_one_trains_stops_in_one_sentence(tmp_path, tiny_model_dir, sft_dir):
    """align holds the training lock on paths.align_checkpoints, as train does on paths.checkpoints."""
    from pipelines.checkpoints import training_lock

    params = load_params(make_project(tmp_path, tiny_model_dir, sft_dir))
    with training_lock(params.path("align_checkpoints")):  # another align, mid-run
        with pytest.raises(StageError, match="another training run .* is writing the checkpoints"):
            align.run(params, CPU)
    assert not params.path("aligned_adapter").exists()
