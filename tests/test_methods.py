"""Every train.method on the tiny model: what trains, what stays frozen, loss, save/reload, evaluation, merging; the
CPU speed-ups per method; padding-free exactness; the training options; continuing from an adapter (init_from).

    .venv/bin/python -m pytest tests/test_methods.py
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import checkpoints, cpu_speedups, methods, train
from pipelines.chat import tokenize_conversation, tokenize_prompt
from pipelines.config import ConfigError, load_params
from pipelines.evaluate import completion_nll, generate_ids, load_models
from pipelines.io import read_json
from pipelines.preflight import preflight
from pipelines.train import encode_split, to_dataset
from tests.test_train import CPU, QA, chat_rows, make_project

# The tiny model: 2 decoder blocks (model.layers.0-1), every block q,k,v,o + gate,up,down projections.
LINEAR = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PEFT_PREFIX = r"base_model\.model\.model\.layers\.[01]\."
EXPECTED_TRAINABLE = {  # method -> the trainable parameter names, as full-match patterns (each must match one)
    "lora": [rf"{PEFT_PREFIX}{LINEAR}\.lora_(A|B)\.default\.weight"],
    "adalora": [rf"{PEFT_PREFIX}{LINEAR}\.lora_(A|B|E)\.default"],
    "ia3": [rf"{PEFT_PREFIX}(self_attn\.(k|v)_proj|mlp\.down_proj)\.ia3_l\.default"],
    "prompt_tuning": [r"prompt_encoder\.default\.embedding\.weight"],
    "prefix_tuning": [r"prompt_encoder\.default\.embedding\.weight"],
    "p_tuning": [r"prompt_encoder\.default\.embedding\.weight",
                 r"prompt_encoder\.default\.mlp_head\.[024]\.(weight|bias)"],
    "freeze": [r"model\.layers\.1\.\S+"],  # last_n_blocks: 1 of 2
}
EXPECTED_COUNT = {"lora": 28, "adalora": 42, "ia3": 6, "prompt_tuning": 1, "prefix_tuning": 1, "p_tuning": 7,
                  "freeze": 9}  # 7 projections x 2 blocks x (A, B[, E]); 3 x 2; 6 + embedding; 7 weights + 2 norms
SETTINGS = {  # method -> train: settings for a few-step run on the memorisable set
    "lora": {},
    "adalora": {"adalora": {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3}},
    "ia3": {"learning_rate": 0.05},
    "prompt_tuning": {"learning_rate": 0.05, "prompt_tuning": {"num_virtual_tokens": 4, "init_text": "Answer in JSON"}},
    "prefix_tuning": {"learning_rate": 0.05, "prefix_tuning": {"num_virtual_tokens": 4}},
    "p_tuning": {"learning_rate": 0.01, "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}},
    "freeze": {"freeze": {"last_n_blocks": 1}},
}
MESSAGES = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]


def _build(tmp_path: Path, model_dir: Path, tokenizer, method: str, steps: int, **extra):
    params = load_params(make_project(tmp_path, model_dir, {"method": method, "max_steps": steps, "eval_steps": 100,
                                                            "save_steps": 100, **SETTINGS[method], **extra}))
    split = encode_split(tokenizer, chat_rows(16), 512, "train.jsonl")
    model = train.load_model(model_dir, params.train, CPU)
    trainer = train.build_trainer(model, tokenizer, to_dataset(split, is_eval=False),
                                  to_dataset(split, is_eval=True), params.train, CPU, tmp_path / "ckpt")
    return params, trainer


def _logits(model, tokenizer, conversations) -> torch.Tensor:
    """Right-padded batch of whole conversations -> logits at the rows' own positions (batch, seq, vocab)."""
    from pipelines.evaluate import _pad

    ids = [tokenize_conversation(tokenizer, c).input_ids for c in conversations]
    batch, mask = _pad(ids, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits
    return logits[:, -batch.shape[1]:] * mask[..., None]  # prompt-learning methods prepend virtual positions


def _greedy(model, tokenizer, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation one token at a time, no cache, no padding: the reference for batched generation."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("method", list(EXPECTED_TRAINABLE))
def test_each_method_trains_saves_reloads_and_evaluates(tmp_path, tiny_model_dir, tiny_tokenizer, method):
    """For each method on the tiny model: the trainable tensors are exactly the method's, every other weight is
    unchanged, the loss on a memorisable set goes down, and the saved folder reloads through the evaluation stage's
    loader with identical logits, generations and completion losses; `disable_adapter` gives back the base model,
    and merging works exactly when methods.can_merge says it does."""
    params, trainer = _build(tmp_path, tiny_model_dir, tiny_tokenizer, method, steps=12)
    model = trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    patterns = [re.compile(p) for p in EXPECTED_TRAINABLE[method]]
    assert all(any(p.fullmatch(n) for p in patterns) for n in trainable), trainable
    assert len(trainable) == EXPECTED_COUNT[method], trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        # AdaLoRA's singular values start at zero and a matrix whose ranks were all pruned keeps them at zero
        pruned = method == "adalora" and "lora_E" in name and not param.detach().any()
        assert changed == (name in trainable) or pruned, name

    out = tmp_path / "out"
    trainer.save_model(str(out))
    full = methods.saves_full_model(method)
    models, tokenizer = load_models(tiny_model_dir, out, full=full)
    model.eval()
    reference = _logits(model, tiny_tokenizer, MESSAGES)
    with models.use("fine_tuned") as tuned:
        torch.testing.assert_close(_logits(tuned, tokenizer, MESSAGES), reference, rtol=0, atol=1e-5)
        prompts = [tokenize_prompt(tokenizer, m).input_ids for m in MESSAGES]
        batched = generate_ids(tuned, tokenizer, prompts, batch_size=4, max_new_tokens=6)
        assert batched == [_greedy(tuned, tokenizer, p, 6) for p in prompts]
        convs = [tokenize_conversation(tokenizer, m, only_last=True) for m in MESSAGES]
        nll, counts = completion_nll(tuned, tokenizer, convs, batch_size=4)
        for conv, got, count in zip(convs, nll, counts, strict=True):
            logits = _logits(tuned, tokenizer, [MESSAGES[convs.index(conv)]])[0]
            mask = torch.tensor(conv.assistant_mask[1:], dtype=torch.bool)
            targets = torch.tensor(conv.input_ids[1:])[mask]
            want = torch.nn.functional.cross_entropy(logits[:-1][mask], targets, reduction="sum").item()
            assert got == pytest.approx(want, rel=1e-5) and count == int(mask.sum())
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with models.use("base") as as_base:
        torch.testing.assert_close(_logits(as_base, tokenizer, MESSAGES), _logits(base, tokenizer, MESSAGES),
                                   rtol=0, atol=1e-6)
    if not full:
        reason = methods.can_merge(method)
        if reason is None:
            merged = models.tuned.merge_and_unload()
            torch.testing.assert_close(_logits(merged, tokenizer, MESSAGES), reference, rtol=1e-4, atol=1e-4)
        else:
            assert method in ("prompt_tuning", "prefix_tuning", "p_tuning") and "cannot be merged" in reason
            with pytest.raises(AttributeError):
                models.tuned.merge_and_unload()


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "freeze"])
def test_cpu_speedups_are_exact_for_every_method(tiny_model_dir, method):
    """The CPU LM head and the label-only scoring give the model's own loss (transformers' cross-entropy on full
    logits, virtual tokens included) and its gradients, for every method: prompt-learning methods shift labels and
    attention by their virtual tokens, freeze trains a block, the head is tied."""
    import trl.trainer.utils as trl_utils
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_params_for(method)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 20))  # (batch, seq)
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 12:] = -100
    results = {}
    for path in ("model", "plain"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if path == "plain":
            trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if method == "freeze":
            methods.freeze_all_but_last_blocks(model, 1, train_lm_head=True)
        else:
            model = get_peft_model(model, methods.peft_config(cfg, tiny_model_dir, total_steps=10))
        if path == "plain":
            assert cpu_speedups.score_only_label_positions() and cpu_speedups.plain_head_on_cpu(model)
            out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
            loss = -out.log_probs.sum() / out.label_mask.sum()  # TRL's compute_loss
        else:
            loss = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False).loss
        loss.backward()
        results[path] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_grads), (fast, fast_grads) = results["model"], results["plain"]
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def load_params_for(method: str, **extra):
    """A TrainConfig of `method` with the few-step settings (no project folder needed)."""
    from pipelines.config import TrainConfig

    return TrainConfig.model_validate({"method": method, **SETTINGS.get(method, {}), **extra})


# ------------------------------------------------------------------------------------------------ AdaLoRA
def test_adalora_prunes_the_rank_budget_on_schedule(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The budget callback runs peft's update_and_allocate every step: after the schedule (10 steps, 2 warm-up, 3
    final) the 14 adapted matrices keep target_r = 2 of their init_r = 4 ranks on average (28 of 56), the final
    phase keeps the pruned triplets at zero, and the saved adapter records that pattern (orthogonal regulariser
    off: TRL's loss does not read it)."""
    params, trainer = _build(tmp_path, tiny_model_dir, tiny_tokenizer, "adalora", steps=10)
    trainer.train()
    tuner = trainer.model.base_model
    config = tuner.peft_config["default"]
    assert config.total_step == trainer.state.max_steps == 10
    pattern = config.rank_pattern
    assert pattern is not None and len(pattern) == 14
    assert sum(sum(kept) for kept in pattern.values()) == 2 * 14
    for name, param in trainer.model.named_parameters():
        if "lora_E" in name:
            # pattern keys name the modules inside the tuner (model.layers...), the PeftModel adds base_model.model.
            key = next(k for k in pattern if name.removesuffix(".default").endswith(k.removesuffix(".default")))
            kept = torch.tensor(pattern[key])
            assert torch.all(param.detach().view(-1)[~kept] == 0), name
    trainer.save_model(str(tmp_path / "out"))
    saved = read_json(tmp_path / "out" / "adapter_config.json")
    assert saved["orth_reg_weight"] == 0.0 and sum(sum(v) for v in saved["rank_pattern"].values()) == 28


def test_adalora_schedule_that_leaves_no_pruning_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"train.adalora.tinit \+ tfinal = 3 \+ 2 leaves no steps"):
        load_params(make_project(tmp_path, tiny_model_dir, {"method": "adalora", "max_steps": 5,
                                                            "adalora": {"tinit": 3, "tfinal": 2}}))


def test_adalora_restarts_instead_of_resuming(tmp_path, tiny_model_dir, caplog):
    """A checkpoint of an AdaLoRA run is not resumed (methods.resume_refused): the run starts over and says so."""
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "adalora", "max_steps": 4, "save_steps": 2,
                                                                "eval_steps": 2}))
    train.run(params, CPU)
    run_dir = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"]
    assert (run_dir / "checkpoint-2" / "fingerprint.json").is_file()
    # a kill after checkpoint 2: no adapter, no finished run's record, no checkpoint 4
    for path in (params.path("adapter"), run_dir / "checkpoint-4", run_dir / checkpoints.COMPLETED):
        shutil.rmtree(path)
    (run_dir / checkpoints.COMPLETED_RECORD).unlink()
    with caplog.at_level("WARNING", logger="pipelines.train"):
        result = train.run(params, CPU)
    assert result.metrics["resumed_from_step"] is None and result.metrics["steps"] == 4
    assert "restarts from step 0" in caplog.text


# ----------------------------------------------------------------------------------------------- padding-free
def test_padding_free_batches_give_the_padded_loss_and_gradients(tmp_path, tiny_model_dir, tiny_tokenizer):
    """train.padding_free (one flattened row, restarting position ids, no attention mask) is exact on CPU with sdpa:
    the same rows give the padded batch's summed loss and gradients, through the trainer's own loss (TRL's
    compute_loss + the CPU LM head). Measured: loss identical to 6 digits, gradients within ~1e-6 of each other."""
    rows = [{"messages": m, "tools": None} for m in MESSAGES]
    split = encode_split(tiny_tokenizer, rows, 512, "train.jsonl")
    results = {}
    for padding_free in (False, True):
        params = load_params(make_project(tmp_path / str(padding_free), tiny_model_dir,
                                          {"padding_free": padding_free, "batch_size": 4}))
        model = train.load_model(tiny_model_dir, params.train, CPU)
        trainer = train.build_trainer(model, tiny_tokenizer, to_dataset(split, is_eval=False), None, params.train,
                                      CPU, tmp_path / "ckpt")
        batch = trainer.data_collator([{**e, "is_eval": False} for e in split.examples])
        assert ("attention_mask" in batch) != padding_free and ("position_ids" in batch) == padding_free
        n_labels = int((batch["labels"][:, 1:] != -100).sum())
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n_labels) * n_labels
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[padding_free] = loss.item(), grads, trainer.data_collator.counts["train"]
    (padded, grads_a, counts_a), (flat, grads_b, counts_b) = results[False], results[True]
    assert flat == pytest.approx(padded, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counts_b[0] == counts_a[0] == split.n_tokens and counts_b[1] == split.n_tokens < counts_a[1]


@pytest.mark.parametrize(("train_settings", "words"), [
    ({"method": "prompt_tuning", "padding_free": True}, "padding_free cannot be used with train.method"),
    ({"padding_free": True, "neftune_alpha": 5}, "neftune_alpha cannot be used with train.padding_free"),
    ({"method": "ia3", "lora": {"r": 8}}, "train.lora is set but train.method = 'ia3' does not read it"),
    ({"method": "lora", "freeze": {"last_n_blocks": 2}}, "train.freeze is set but train.method = 'lora'"),
    ({"method": "adalora", "adalora": {"init_r": 4, "target_r": 8}}, "target_r = 8 is above init_r = 4"),
    ({"method": "ia3", "ia3": {"feedforward_modules": ["down_proj"]}}, "feedforward_modules is set but target"),
    ({"method": "ia3", "ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}},
     "not in target_modules"),
    ({"method": "prefix_tuning", "prefix_tuning": {"encoder_hidden_size": 8}}, "prefix_projection is false"),
    ({"method": "prompt_tuning", "prompt_tuning": {"init_text": " "}}, "empty init_text"),
    ({"method": "adalora", "init_from": "promoted"}, "cannot continue an AdaLoRA adapter"),
    ({"method": "adalora", "adalora": {"rank": 4}}, "allowed keys here: init_r, target_r"),
    ({"optim": "adam"}, "'adamw_torch', 'adafactor', 'sgd'"),
])
def test_method_settings_are_checked_when_params_load(tmp_path, tiny_model_dir, train_settings, words):
    with pytest.raises(ConfigError) as err:
        load_params(make_project(tmp_path, tiny_model_dir, train_settings))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_section_of_the_chosen_method_or_null_loads(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "ia3", "lora": None, "ia3": {}}))
    assert params.train.section().target_modules is None
    assert load_params(make_project(tmp_path, tiny_model_dir, {"method": "lora"})).train.section().r == 16


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("optim", ["adafactor", "sgd", "adamw_8bit", "lion_8bit", "paged_adamw_8bit"])
def test_optimizer_by_name(tmp_path, tiny_model_dir, tiny_tokenizer, optim):
    reason = methods.optimizer_unsupported(optim, "cpu")
    if reason:
        pytest.skip(f"bitsandbytes cannot run {optim} on this CPU: {reason}")
    params, trainer = _build(tmp_path, tiny_model_dir, tiny_tokenizer, "lora", steps=2, optim=optim)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    names = {"adafactor": "Adafactor", "sgd": "SGD", "adamw_8bit": "AdamW", "lion_8bit": "Lion",
             "paged_adamw_8bit": "AdamW"}
    assert type(optimizer).__name__ == names[optim]
    if optim.endswith("8bit"):  # bitsandbytes' classes, 8-bit states, paged where asked
        assert type(optimizer).__module__.startswith("bitsandbytes.optim")
        assert optimizer.args.optim_bits == 8 and optimizer.is_paged == optim.startswith("paged")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_an_optimizer_the_device_cannot_run_is_refused_by_the_preflight(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(methods, "optimizer_unsupported", lambda optim, device: "RuntimeError: no CPU kernel")
    params = load_params(make_project(tmp_path, tiny_model_dir, {"optim": "lion_8bit"}))
    with pytest.raises(ConfigError, match=r"train.optim = 'lion_8bit' cannot run on (cpu|cuda) here \(RuntimeError: "
                                          r"no CPU kernel\); use adamw_torch") as err:
        preflight(params, "train")
    assert "\n" not in str(err.value)


def test_neftune_adds_noise_to_training_embeddings_only(tmp_path, tiny_model_dir, tiny_tokenizer):
    """neftune_alpha changes the first training step's loss (noisy input embeddings), not the evaluation loss."""
    first = {}
    for alpha in (None, 5.0):
        params, trainer = _build(tmp_path / str(alpha), tiny_model_dir, tiny_tokenizer, "lora", steps=1,
                                 neftune_alpha=alpha)
        assert trainer.args.neftune_noise_alpha == alpha
        evaluation = trainer.evaluate()["eval_loss"]
        trainer.train()
        first[alpha] = (evaluation, next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert first[None][0] == pytest.approx(first[5.0][0], rel=1e-6)  # no noise outside training
    assert first[None][1] != pytest.approx(first[5.0][1], rel=1e-4)


def test_torch_compile_is_passed_to_the_trainer(tmp_path, tiny_model_dir, tiny_tokenizer):
    _, trainer = _build(tmp_path, tiny_model_dir, tiny_tokenizer, "lora", steps=1, torch_compile=True)
    assert trainer.args.torch_compile is True
    _, plain = _build(tmp_path / "b", tiny_model_dir, tiny_tokenizer, "lora", steps=1)
    assert plain.args.torch_compile is False


def test_torch_compile_without_a_compiler_is_refused_by_the_preflight(tmp_path, tiny_model_dir, monkeypatch):
    import shutil as shell

    monkeypatch.setattr(shell, "which", lambda name: None)
    params = load_params(make_project(tmp_path, tiny_model_dir, {"torch_compile": True}))
    if torch.cuda.is_available():
        pytest.skip("the compiler check is for CPU kernels")
    with pytest.raises(ConfigError, match=r"train.torch_compile = true cannot work on cpu here: inductor needs a C\+\+ "
                                          r"compiler"):
        preflight(params, "train")


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two steps compiled (inductor, CPU) give the eager losses. Slow: compiling takes minutes on 2 cores."""
    losses = {}
    for compiled in (False, True):
        params = load_params(make_project(tmp_path / str(compiled), tiny_model_dir, {
            "max_steps": 2, "batch_size": 4, "torch_compile": compiled}))
        rows = [{"messages": MESSAGES[0], "tools": None}] * 8  # one length: one compilation
        split = encode_split(tiny_tokenizer, rows, 512, "train.jsonl")
        model = train.load_model(tiny_model_dir, params.train, CPU)
        trainer = train.build_trainer(model, tiny_tokenizer, to_dataset(split, is_eval=False), None, params.train,
                                      CPU, tmp_path / str(compiled) / "ckpt")
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_wandb_without_the_package_is_refused_and_runs_offline_otherwise(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    params = load_params(make_project(tmp_path, tiny_model_dir, {"report_to": "wandb"}))
    with pytest.raises(ConfigError, match=r"train.report_to = 'wandb' needs the Python package wandb, which is not "
                                          r"installed; install it .* or set train.report_to: none") as err:
        preflight(params, "train")
    assert "\n" not in str(err.value)
    run_dir = tmp_path / "run"
    assert methods.tracker_environment("wandb", run_dir, {}) == {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)}
    assert methods.tracker_environment("wandb", run_dir, {"WANDB_MODE": "online"}) == {"WANDB_DIR": str(run_dir)}
    assert methods.tracker_environment("tensorboard", run_dir, {}) == {}


def test_freeze_with_the_lm_head_trains_the_tied_embeddings_and_says_so(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "freeze", "max_steps": 2,
                                                                "freeze": {"last_n_blocks": 1, "train_lm_head": True}}))
    result = train.run(params, CPU)
    groups = {g["tensors"]: g for g in result.metrics["trainable_tensors"]}
    assert groups["model.embed_tokens.weight"]["blocks"] == "-" and "model.layers.{i}.mlp.up_proj.weight" in groups
    assert groups["model.layers.{i}.mlp.up_proj.weight"]["blocks"] == "1"
    card = (params.path("adapter") / "README.md").read_text()
    assert "changed the embeddings too" in card and "| `model.layers.{i}.mlp.up_proj.weight` | 1 | 1 |" in card
    assert "library_name: transformers" in card and (params.path("adapter") / "model.safetensors").is_file()


def test_freeze_more_blocks_than_the_model_has_is_refused_by_the_preflight(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "freeze",
                                                                "freeze": {"last_n_blocks": 3}}))
    with pytest.raises(ConfigError, match=r"train.freeze.last_n_blocks = 3 but the base model .* has 2 blocks"):
        preflight(params, "train")


def test_virtual_tokens_count_against_the_context_window(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"method": "prefix_tuning",
                                                                "prefix_tuning": {"num_virtual_tokens": 600}}))
    params = params.model_copy(update={"format": params.format.model_copy(update={"max_length": 512})})
    with pytest.raises(ConfigError, match=r"num_virtual_tokens = 600 plus format.max_length = 512 is above .* 1024"):
        preflight(params, "train")
    preflight(params, "format")  # the format stage does not add virtual tokens


@pytest.mark.parametrize(("method", "merge"), [("lora", None), ("dora", None), ("adalora", None), ("ia3", None),
                                               ("prompt_tuning", "virtual tokens"), ("prefix_tuning", "virtual tokens"),
                                               ("p_tuning", "virtual tokens"), ("full", None), ("freeze", None)])
def test_can_merge_is_one_decision_per_method(method, merge):
    reason = methods.can_merge(method)
    assert (reason is None) == (merge is None) and (merge is None or (merge in reason and "\n" not in reason))


# ------------------------------------------------------------------------------------------------ init_from
def test_continue_from_an_adapter_records_its_hash_and_starts_from_its_weights(tmp_path, tiny_model_dir):
    """Train a LoRA adapter, then continue it on the same splits with init_from: the model starts from the parent's
    weights, the parent's weights hash is in the run hash, the metrics and the run card, and a change of the
    parent's content changes the run hash (no stale resume)."""
    from safetensors.torch import load_file

    parent_params = load_params(make_project(tmp_path / "parent", tiny_model_dir, {"max_steps": 4}))
    train.run(parent_params, CPU)
    parent = parent_params.path("adapter")
    child_file = make_project(tmp_path / "child", tiny_model_dir, {"max_steps": 3, "init_from": str(parent)})
    child = load_params(child_file)
    model = train.load_model(tiny_model_dir, child.train, CPU, parent=methods.check_parent(child))
    weights = load_file(parent / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded and all(p.requires_grad for p in loaded.values())
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded[name.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0)

    result = train.run(child, CPU)
    digest = methods.weights_sha256(parent)
    assert result.metrics["parent_weights_sha256"] == digest and result.metrics["init_from"] == str(parent)
    assert result.metrics["parent_run_hash"] == read_json(parent / "train_metrics.json")["run_hash"]
    card = (child.path("adapter") / "README.md").read_text()
    assert digest in card and "started from (train.init_from)" in card
    before = checkpoints.run_fingerprint(child)
    assert before["parts"]["parent_weights"] == digest
    (parent / "README.md").write_text("edited run card")  # not a weight: same parent
    assert checkpoints.run_fingerprint(child)["run_hash"] == before["run_hash"]
    config = read_json(parent / "adapter_config.json")
    (parent / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.1}))
    assert checkpoints.run_fingerprint(child)["run_hash"] != before["run_hash"]


def test_promoted_is_the_promoted_folder(tmp_path, tiny_model_dir):
    params = load_params(make_project(tmp_path, tiny_model_dir, {"init_from": "promoted"}))
    assert methods.parent_dir(params) == params.path("promoted")
    with pytest.raises(ConfigError, match=r"train.init_from = 'promoted': the folder .* does not exist \(the promote "
                                          r"stage writes it\)"):
        preflight(params, "train")


@pytest.mark.parametrize(("parent_config", "train_settings", "words"), [
    ({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, {"method": "ia3"}, "is a lora adapter but train.method = 'ia3'"),
    ({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_dora": True}, {}, "set train.method: dora"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 32}, {}, "train.lora.r = 16 but the adapter"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}, {"method": "prompt_tuning"},
     "train.prompt_tuning.num_virtual_tokens = 20 but the adapter"),
    ({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, {"method": "freeze"}, "continues a whole model"),
    ({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, {}, "has no adapter_model.safetensors"),  # a .bin: pickle
])
def test_a_parent_of_another_method_or_shape_is_refused(tmp_path, tiny_model_dir, parent_config, train_settings,
                                                        words):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "adapter_config.json").write_text(json.dumps(parent_config))
    params = load_params(make_project(tmp_path, tiny_model_dir, {"init_from": "parent", **train_settings}))
    with pytest.raises(ConfigError) as err:
        preflight(params, "train")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_train_stage_declares_what_init_from_reads():
    from pipelines.stages import BY_NAME

    stage = BY_NAME["train"]
    assert "paths.promoted" in stage.params and "pipelines.methods" in stage.code
    dvc = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["train"]
    assert "${paths.promoted}" not in dvc["deps"]  # a dep on promote's output would be a cycle


@pytest.mark.parametrize(("numbers", "text"), [([3], "3"), ([0, 1, 2, 5, 7, 8], "0-2, 5, 7-8"), ([28, 29], "28-29")])
def test_block_ranges_in_the_run_card(numbers, text):
    assert methods._ranges(numbers) == text


def test_the_run_card_shows_the_method_settings_that_acted():
    """A method whose section is left out trains with that section's defaults; the card shows them, and no other
    method's section."""
    params = methods.effective_params(load_params_for("ia3"))
    assert params["ia3"] == {"target_modules": None, "feedforward_modules": None} and "lora" not in params
    assert methods.effective_params(load_params_for("lora"))["lora"]["r"] == 16
    assert "freeze" not in methods.effective_params(load_params_for("full"))
