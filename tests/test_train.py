"""Training stage: completion-only masking, LoRA/DoRA/QLoRA/full on a tiny model, resume after a kill, the environment.

    .venv/bin/python -m pytest tests/test_train.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import checkpoints, cpu_speedups, train, train_env
from pipelines.config import ConfigError, load_params
from pipelines.io import StageError, read_json
from pipelines.stages import BY_NAME
from pipelines.train import CountingCollator, encode_example, encode_split, to_dataset
from pipelines.train_env import TrainEnv
from tests.conftest import REPO, skip_for_hardware

CPU = TrainEnv.resolve(device="cpu", num_threads=1)

# Rows as they arrive from the split stage (after ingest normalised each raw format to messages).
ALPACA = {  # instruction + input -> output, one turn
    "messages": [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "Eat well, sleep, exercise."},
    ],
    "tools": None,
}
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My card was charged twice."},
        {"role": "assistant", "content": '{"category": "billing"}'},
        {"role": "user", "content": "The app crashes."},
        {"role": "assistant", "content": '{"category": "bug", "priority": "high"}'},
    ],
    "tools": None,
}
SHAREGPT_TOOLS = {  # from/value turns with a function call and its result
    "messages": [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": '{"name": "track", "arguments": {"order": 7}}'},
        {"role": "tool", "content": '{"status": "in transit"}'},
        {"role": "assistant", "content": "Your parcel is in transit."},
    ],
    "tools": json.dumps([{"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}]),
}

QA = [("My card was charged twice", '{"category": "billing"}'), ("I cannot log in", '{"category": "login"}'),
      ("The app crashes", '{"category": "bug"}'), ("Where is my parcel?", '{"category": "shipping"}')]


def chat_rows(n: int) -> list[dict]:
    """A memorisable set: four questions (padded with '!' to vary lengths) and their fixed answers."""
    return [
        {"id": f"{i:04x}", "messages": [{"role": "user", "content": QA[i % 4][0] + "!" * (i % 5)},
                                        {"role": "assistant", "content": QA[i % 4][1]}], "tools": None}
        for i in range(n)
    ]


def make_project(root: Path, model_dir: Path, train: dict | None = None, *, n_train: int = 16,
                 n_val: int = 4) -> Path:
    """params.yaml + splits in `root`, the base model pointed at the tiny model folder."""
    splits = root / "data" / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    rows = chat_rows(n_train)
    (splits / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (splits / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_val]))
    settings = {"max_steps": 8, "batch_size": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 1,
                "learning_rate": 0.01, "warmup_ratio": 0.0, **(train or {})}
    params = {"paths": {"base_model": str(model_dir)}, "train": settings}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# --------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("row", [ALPACA, MULTI_TURN, SHAREGPT_TOOLS], ids=["alpaca", "multi_turn", "sharegpt_tools"])
def test_labels_cover_exactly_the_assistant_turns_and_their_eos(tiny_tokenizer, row):
    example, truncated = encode_example(tiny_tokenizer, row, max_length=512)
    ids, labels = example["input_ids"], example["labels"]
    eos = tiny_tokenizer.eos_token_id
    assert not truncated
    assert ids[-1] == eos and labels[-1] == eos, "the final end-of-turn token must be trained (model learns to stop)"
    # Every labelled run of tokens decodes to one assistant message + its end-of-turn token, in order.
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    expected = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(r) for r in runs] == expected
    # Nothing of the system/user/tool turns or the role headers is trained.
    assert sum(label != -100 for label in labels) == sum(len(r) for r in runs)


def test_padded_batch_masks_pads_and_keeps_every_eos(tiny_tokenizer):
    split = encode_split(tiny_tokenizer, [ALPACA, MULTI_TURN, SHAREGPT_TOOLS], 512, "train.jsonl")
    collator = CountingCollator(pad_token_id=tiny_tokenizer.pad_token_id)
    batch = collator([{**e, "is_eval": False} for e in split.examples])
    eos = tiny_tokenizer.eos_token_id
    for row, example in enumerate(split.examples):
        n = len(example["input_ids"])
        assert batch["labels"][row, n - 1] == eos  # the last real token: EOS, trained
        assert (batch["labels"][row, n:] == -100).all()  # pads never in the loss
        assert (batch["attention_mask"][row, n:] == 0).all() and batch["attention_mask"][row, :n].all()
    real, slots, trained = collator.counts["train"]
    assert real == split.n_tokens and slots == batch["input_ids"].numel() and trained == split.n_label_tokens
    assert collator.counts["eval"] == [0, 0, 0]


def test_overlong_rows_keep_the_answer(tiny_tokenizer):
    example, truncated = encode_example(tiny_tokenizer, MULTI_TURN, max_length=12)
    assert truncated and len(example["input_ids"]) == 12
    assert example["labels"][-1] == tiny_tokenizer.eos_token_id


def test_row_without_assistant_tokens_is_a_user_error(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": "hi"}], "tools": None}
    with pytest.raises(StageError, match=r"train.jsonl line 2: .*no assistant tokens"):
        encode_split(tiny_tokenizer, [ALPACA, row], max_length=512, where="train.jsonl")


def test_lm_head_scores_only_label_positions_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """On CPU TRL's fused head scored every position; scoring only the labelled ones must change nothing else."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    assert cpu_speedups.score_only_label_positions()
    compact = trl_utils._use_triton
    every_position = compact._fenced_original
    assert compact(torch.device("cpu")) and not every_position(torch.device("cpu"))
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 20))  # (batch, seq)
    attention = torch.ones_like(ids)
    attention[1, 14:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :11] = -100  # the prompt
    labels[1, 14:] = -100
    apply = trl_utils._ChunkedLogProbFunction.apply
    results, scored_rows = {}, {}
    for name, decide in (("every", every_position), ("compact", compact)):
        monkeypatch.setattr(trl_utils, "_use_triton", decide)
        rows: list[int] = []
        monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                            lambda hidden, *rest, rows=rows: rows.append(hidden.shape[0]) or apply(hidden, *rest))
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.loss.detach(), out.log_probs.detach(), out.entropy.detach(), out.is_top1, grads)
        scored_rows[name] = rows
    assert scored_rows["every"] == [3 * 19]  # every position of the shifted (batch, seq - 1) grid
    assert scored_rows["compact"] == [int((labels[:, 1:] != -100).sum())] == [9 + 3 + 9]
    (loss_a, logp_a, ent_a, top_a, grads_a), (loss_b, logp_b, ent_b, top_b, grads_b) = results.values()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    assert torch.equal(top_a, top_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_label_head_function_matches_cross_entropy_across_tiles():
    """LabelLogProb over several row tiles (70 rows, tiles of 32) = log_softmax + gather, entropy and argmax,
    with the gradients of both the hidden states and the head weight; its backward refuses a second call."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    hidden = torch.randn(70, 24, requires_grad=True)
    weight = (torch.randn(500, 24) * 0.3).requires_grad_()
    targets = torch.randint(0, 500, (70,))
    upstream = torch.randn(70)  # any incoming gradient, not only the mean loss's
    log_probs, entropy, is_top1 = cpu_speedups._label_log_prob_function().apply(hidden, weight, targets)
    (log_probs * upstream).sum().backward(retain_graph=True)
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    log_p = F.log_softmax(hidden @ weight.t(), dim=-1)
    ((log_p.gather(1, targets[:, None]).squeeze(1)) * upstream).sum().backward()
    torch.testing.assert_close(log_probs, log_p.gather(1, targets[:, None]).squeeze(1).detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1, (hidden @ weight.t()).argmax(-1) == targets) and not entropy.requires_grad
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="only once"):
        (log_probs * upstream).sum().backward()


def test_plain_cpu_head_matches_trl_fused_head(tiny_model_dir, monkeypatch):
    """The CPU head (one matmul, LabelLogProb) returns what TRL's chunked head returns, gradients included."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 20))  # (batch, seq)
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 12:] = -100
    results = {}
    for name in ("trl", "plain", "plain, over the label limit"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        calls = []
        fallback = model.forward
        model.forward = lambda *a, _f=fallback, _calls=calls, **k: _calls.append(1) or _f(*a, **k)  # TRL head calls
        if name != "trl":
            assert cpu_speedups.plain_head_on_cpu(model)
        if name.endswith("limit"):
            monkeypatch.setattr(cpu_speedups, "PLAIN_HEAD_MAX_LABELS", 5)
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        (-out.log_probs.sum() / out.label_mask.sum()).backward()  # the loss as TRL's compute_loss forms it
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out, grads, len(calls))
    (ref, ref_grads, ref_calls), (plain, plain_grads, plain_calls), (_, _, over_calls) = results.values()
    assert (ref_calls, plain_calls, over_calls) == (1, 0, 1)  # the plain path replaced TRL's, except over the limit
    torch.testing.assert_close(plain.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.log_probs, ref.log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.is_top1, ref.is_top1) and torch.equal(plain.label_mask, ref.label_mask)
    assert plain_grads.keys() == ref_grads.keys() and len(ref_grads) > 10
    for n in ref_grads:
        torch.testing.assert_close(plain_grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_trainer_batches_are_the_encoded_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    """TRL gets the rows pre-tokenised: its batches carry our labels unchanged (no re-masking, no extra EOS)."""
    split = encode_split(tiny_tokenizer, [ALPACA, MULTI_TURN, SHAREGPT_TOOLS] * 2, 512, "train.jsonl")
    cfg = load_params(make_project(tmp_path, tiny_model_dir, {"batch_size": 3})).train
    model = train.load_model(tiny_model_dir, cfg, CPU)
    trainer = train.build_trainer(model, tiny_tokenizer, to_dataset(split, is_eval=False), None, cfg, CPU,
                                  tmp_path / "ckpt")
    encoded = {tuple(e["input_ids"]): e["labels"] for e in split.examples}
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            assert labels[:n].tolist() == encoded[tuple(ids[:n].tolist())]
            seen += 1
    assert seen == len(split.examples)
    assert not trainer.args.bf16 and not trainer.args.gradient_checkpointing  # TRL's defaults, off on CPU


# -------------------------------------------------------------------------------------------------- training
def test_lora_trains_adapter_weights_and_leaves_base_weights(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 5})).train
    split = encode_split(tiny_tokenizer, chat_rows(8), 512, "train.jsonl")
    model = train.load_model(tiny_model_dir, cfg, CPU)
    trainer = train.build_trainer(model, tiny_tokenizer, to_dataset(split, is_eval=False), None, cfg, CPU,
                                  tmp_path / "ckpt")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in lora)
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in base)


def test_loss_goes_down_and_outputs_are_complete(tmp_path, tiny_model_dir):
    logs: list[dict] = []
    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 24, "eval_steps": 8,
                                                                "save_steps": 8}))
    result = train.run(params, CPU, on_log=logs.append)
    out = params.path("adapter")
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert losses[-1] < 0.85 * losses[0], losses
    m = read_json(out / "train_metrics.json")
    evals = [h["eval_loss"] for h in read_json(out / "train_log.json") if "eval_loss" in h]
    assert m["steps"] == 24 and m["final_eval_loss"] < evals[0]
    assert 0 < m["padding_efficiency"] <= 1 and m["tokens_seen"] <= m["token_slots"]
    assert m["trained_tokens"] < m["tokens_seen"]
    timings = {k: result.metrics[k] for k in train.TIMINGS if k in result.metrics}
    assert timings["tokens_per_s"] > 0 and timings["peak_rss_mb"] > 0 and timings["step_time_s"] > 0
    assert not set(timings) & set(m), "timings must stay out of the adapter folder (the same run, the same bytes)"
    assert not [k for entry in read_json(out / "train_log.json") for k in entry if k.endswith("_runtime")]
    assert 0 < m["trainable_params"] < m["total_params"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "train_log.json",
            "train_metrics.json", "loss_curve.png"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]  # no pickle is shipped
    card = (out / "README.md").read_text()
    for fact in ("base model sha256", "train split sha256", "seed: 42", "transformers", "final train loss"):
        assert fact in card
    assert result.metrics["loss_curve"]["train_loss"] == losses
    assert any("step" in entry and "max_steps" in entry for entry in logs)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_dora_and_full_fine_tuning(tmp_path, tiny_model_dir, method):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": method, "max_steps": 4}))
    result = train.run(params, CPU)
    out = params.path("adapter")
    if method == "full":
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        assert result.metrics["trainable_params"] == result.metrics["total_params"]
    else:
        assert read_json(out / "adapter_config.json")["use_dora"] is True
        assert result.metrics["trainable_params"] < result.metrics["total_params"]
    assert result.metrics["steps"] == 4


def test_early_stopping_on_validation_loss(tmp_path, tiny_model_dir):
    # A learning rate far too high makes the validation loss worse at once; patience 2 stops after 3 evaluations.
    params = load_params(make_project(tmp_path, tiny_model_dir, {
        "max_steps": 40, "learning_rate": 3.0, "eval_steps": 1, "save_steps": 1, "early_stopping_patience": 2}))
    result = train.run(params, CPU)
    assert result.metrics["early_stopped"] is True and result.metrics["steps"] < 40


def test_no_validation_rows_trains_without_evaluation(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 2}, n_val=0))
    result = train.run(params, CPU)
    assert result.metrics["final_eval_loss"] is None and result.metrics["validation_rows"] == 0


def test_missing_splits_name_the_stage(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir))
    (params.path("splits") / "train.jsonl").unlink()
    with pytest.raises(StageError, match="split"):
        train.run(params, CPU)


# ------------------------------------------------------------------------------------------------ QLoRA / 4-bit
def test_qlora_trains_on_a_4bit_base(tmp_path, tiny_model_dir):
    reason = train_env.four_bit_unsupported("cpu")
    if reason:
        skip_for_hardware(f"bitsandbytes cannot quantise to 4-bit on this CPU: {reason}")
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "qlora", "max_steps": 3}))
    model = train.load_model(params.path("base_model"), params.train, CPU)
    assert model.is_loaded_in_4bit and model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant
    result = train.run(params, CPU)
    assert (params.path("adapter") / "adapter_model.safetensors").is_file() and result.metrics["steps"] == 3
    assert result.metrics["final_train_loss"] == result.metrics["final_train_loss"]  # not NaN


def test_qlora_without_4bit_support_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(train_env, "four_bit_unsupported", lambda device: "no CPU backend")
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "qlora"}))
    # preflight (before any model is loaded) says it in one sentence; ConfigError and StageError are both user errors
    with pytest.raises((StageError, ConfigError), match=r"needs 4-bit.*no CPU backend.*lora"):
        train.run(params, CPU)


# ------------------------------------------------------------------------------------------------ resume
def _train_cmd(params_file: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINES_TRAIN_THREADS": "1", "PIPELINES_TRAIN_DEVICE": "cpu",
           "PYTHONPATH": str(REPO)}
    return [sys.executable, "-m", "pipelines", "train", "--params", str(params_file)], env


def test_resume_after_kill_continues_from_the_checkpoint(tmp_path, tiny_model_dir):
    params_file = make_project(tmp_path, tiny_model_dir, {"max_steps": 60, "save_steps": 5, "eval_steps": 5,
                                                          "early_stopping_patience": 0})
    params = load_params(params_file)
    cmd, env = _train_cmd(params_file)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"]
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoint-*/fingerprint.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean-up, no final save
    proc.wait()
    complete = sorted(checkpoints.step_of(p.parent) for p in run_dir.glob("checkpoint-*/fingerprint.json"))
    assert complete and complete[-1] < 60
    assert not params.path("adapter").exists()

    result = train.run(params, CPU)
    assert result.metrics["resumed_from_step"] >= complete[-1] and result.metrics["steps"] == 60
    history = read_json(params.path("adapter") / "train_log.json")
    assert history[0]["step"] == 1  # the log of the killed run is restored from the checkpoint


def _losses_by_step(adapter: Path) -> dict[tuple[int, str], float]:
    return {(h["step"], key): h[key] for h in read_json(adapter / "train_log.json")
            for key in ("loss", "eval_loss", "grad_norm", "learning_rate") if key in h}


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Kill -9 mid-epoch, rerun: the final adapter equals the one of a run that was never interrupted.

    32 rows / batch 4 = 8 steps per epoch and a checkpoint every 5 steps; the kill comes after checkpoint 10 or
    later, so training resumes in the middle of a second or later epoch: the hard case, as the shuffle of that
    epoch must be replayed (one in the first epoch comes out right by chance: it is drawn right after seeding).
    LoRA dropout is on (0.05 here; the params default is 0), so the restored RNG state matters too. Measured: 0.0
    (bit-exact: same machine, one thread, same kernels). Tolerance: max |A - B| <= 1e-5 x the largest adapter weight
    (~2e-6 here, ~100 float32 ulps at that size) to absorb harmless reduction-order noise; a resume that
    trains on other batches (the bug `cpu_speedups.epoch_seeded` fixes) differs by ~5e-2, 20 % of the weights' scale.
    """
    from safetensors.torch import load_file

    settings = {"max_steps": 30, "save_steps": 5, "eval_steps": 5, "early_stopping_patience": 0,
                "lora": {"dropout": 0.05}}
    uninterrupted = load_params(make_project(tmp_path / "a", tiny_model_dir, settings, n_train=32))
    train.run(uninterrupted, CPU)

    params_file = make_project(tmp_path / "b", tiny_model_dir, settings, n_train=32)
    params = load_params(params_file)
    cmd, env = _train_cmd(params_file)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path / "b", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"]
    assert run_dir.name == checkpoints.run_fingerprint(uninterrupted)["run_hash"]
    deadline = time.monotonic() + 180
    try:
        while not [p for p in run_dir.glob("checkpoint-*/fingerprint.json") if checkpoints.step_of(p.parent) >= 10]:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean-up, no final save
        proc.wait()
    assert not params.path("adapter").exists()

    resumed = train.run(params, CPU)
    start = resumed.metrics["resumed_from_step"]
    assert start is not None and 10 <= start < 30 and start % 8 != 0  # resumed mid-epoch (epoch 2+), before the end

    a = load_file(uninterrupted.path("adapter") / "adapter_model.safetensors")
    b = load_file(params.path("adapter") / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    scale = max(t.abs().max().item() for t in a.values())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed from step {start}: max |A - B| = {diff:.3g}, largest weight {scale:.3g}")
    assert diff <= 1e-5 * scale, f"resumed adapter differs by {diff:.3g} (weights up to {scale:.3g})"

    ma = read_json(uninterrupted.path("adapter") / "train_metrics.json")
    mb = read_json(params.path("adapter") / "train_metrics.json")
    assert mb["steps"] == ma["steps"] == 30
    for key in ("final_train_loss", "final_eval_loss", "best_eval_loss"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-6), key
    # Every step's loss, eval loss and gradient norm, those trained after the resume included.
    la, lb = _losses_by_step(uninterrupted.path("adapter")), _losses_by_step(params.path("adapter"))
    assert la.keys() == lb.keys() and any(step > start for step, _ in la)
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)


def test_the_run_hash_covers_the_training_code(tmp_path, tiny_model_dir, monkeypatch):
    """A rerun after a change to the training code (DVC reruns the stage) must not resume the old checkpoints."""
    import hashlib


    params = load_params(make_project(tmp_path, tiny_model_dir))
    before = checkpoints.run_fingerprint(params)
    code = b"".join((REPO / f).read_bytes() for f in BY_NAME["train"].code_files())
    assert before["parts"]["code"] == hashlib.sha256(code).hexdigest()
    assert "pipelines/chat.py" in BY_NAME["train"].code_files()
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (b"# edited" if self.name == "chat.py" else b""))
    assert checkpoints.run_fingerprint(params)["run_hash"] != before["run_hash"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 4}))
    train.run(params, CPU)
    old_dir = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"]
    changed = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 4, "learning_rate": 0.002}))
    new_dir = params.path("checkpoints") / checkpoints.run_fingerprint(changed)["run_hash"]
    assert new_dir != old_dir
    new_dir.mkdir(parents=True)
    shutil.copytree(old_dir / "checkpoint-4", new_dir / "checkpoint-4")  # e.g. copied by hand
    with pytest.raises(StageError, match=r"different run \(train_params changed\)"):
        train.run(changed, CPU)


def test_a_rerun_of_a_finished_run_trains_no_step_past_max_steps(tmp_path, tiny_model_dir):
    """The verifier's case: reruns of `train` with max_steps 2 went on to steps 3, 4, 5 (resuming from the last
    checkpoint, transformers steps once before it checks max_steps) and changed the adapter each time. A rerun
    restores the finished run's recorded adapter byte for byte; without the record (a kill after the last save)
    it trains from step 0 again, to the same bytes, rather than resume past the end."""
    from pipelines.io import sha256_tree

    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 2, "eval_steps": 1}))
    first = train.run(params, CPU)
    adapter = params.path("adapter")
    weights, tree = (adapter / "adapter_model.safetensors").read_bytes(), sha256_tree(adapter)
    run_dir = params.path("checkpoints") / first.metrics["run_hash"]
    assert first.metrics["steps"] == 2 and sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]

    again = train.run(params, CPU)
    assert (again.metrics["steps"], again.metrics["finished_run_restored"]) == (2, True)
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights and sha256_tree(adapter) == tree
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]  # no checkpoint-3

    (run_dir / checkpoints.COMPLETED_RECORD).unlink()  # killed between the last checkpoint and the record
    fresh = train.run(params, CPU)
    assert (fresh.metrics["steps"], fresh.metrics["resumed_from_step"]) == (2, None)
    assert "finished_run_restored" not in fresh.metrics
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights and sha256_tree(adapter) == tree


# ---------------------------------------------------------------------------------------------- environment
def test_env_auto_on_a_cpu_machine_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = TrainEnv.resolve()
    assert (env.device, env.precision, env.launcher) == ("cpu", "fp32", "in_process") and env.num_threads >= 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "cpu", "precision": "bf16"}, "CPU training runs in fp32"),
    ({"device": "tpu"}, "device = 'tpu' is not allowed"),
    ({"num_processes": 0}, "at least 1"),
])
def test_env_refuses_what_cannot_work(kwargs, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StageError, match=message):
        TrainEnv.resolve(**kwargs)


def test_env_variables_override_and_round_trip(monkeypatch):
    env = TrainEnv.resolve(device="cpu", num_threads=3, launcher="accelerate", num_processes=2)
    for key, value in env.environ().items():
        monkeypatch.setenv(key, value)
    assert TrainEnv.auto() == env


def test_trainer_resource_resolves_the_same_env():
    from resources.trainer import TrainerResource

    assert TrainerResource(device="cpu", num_threads=2).env() == TrainEnv.resolve(device="cpu", num_threads=2)


# ------------------------------------------------------------------------------------------ real base model
@pytest.mark.slow
def test_lora_on_smollm2_lowers_the_loss(tmp_path):
    from pipelines import base_model

    params = load_params(make_project(tmp_path, Path("data/base_model"),
                                      {"max_steps": 6, "learning_rate": 0.002, "batch_size": 8}))
    try:
        base_model.run(params)
    except StageError as exc:
        pytest.skip(str(exc))
    result = train.run(params, TrainEnv.resolve(device="cpu"))
    curve = result.metrics["loss_curve"]["train_loss"]
    assert curve[-1] < curve[0] and result.metrics["padding_efficiency"] > 0.5


def test_the_environment_is_declared_once():
    """TrainEnv, the trainer resource, the PIPELINES_TRAIN_* variables and the README table all come from FIELDS."""
    from dataclasses import fields

    from pipelines.train_env import ENV_PREFIX, FIELDS, markdown_table
    from resources.trainer import TrainerResource

    names = [f.name for f in FIELDS]
    assert [f.name for f in fields(TrainEnv)] == names
    assert list(TrainerResource.model_fields) == names
    for f in FIELDS:
        assert TrainerResource.model_fields[f.name].default == f.default
    assert set(TrainEnv.resolve(device="cpu").environ()) == {ENV_PREFIX + f.var for f in FIELDS}
    assert markdown_table() in (REPO / "README.md").read_text(), "README's trainer table differs from FIELDS"


def test_the_same_training_gives_the_same_adapter_bytes(tmp_path, tiny_model_dir):
    """Timings live in the run record and the stage metrics, not in the adapter folder: a rerun of the same
    training (a second door, a fresh checkpoint folder) writes byte-identical files, so nothing downstream of the
    adapter looks changed to DVC or Dagster."""
    from pipelines.io import sha256_tree

    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 2, "eval_steps": 1, "save_steps": 1}))
    train.run(params, CPU)
    first = sha256_tree(params.path("adapter"))
    shutil.rmtree(params.path("checkpoints"))  # no resume: train again from scratch
    train.run(params, CPU)
    assert sha256_tree(params.path("adapter")) == first
