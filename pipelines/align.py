"""Preference-tune the SFT adapter: TRL DPOTrainer / KTOTrainer (ORPO and SimPO from trl.experimental).

    python -m pipelines align                     # reads paths.preferences, paths.adapter, paths.base_model

Hyperparameters come from params.yaml `align:`; the environment (device, precision, threads, 4-bit loading) from
`pipelines.train.TrainEnv`, as for SFT. The stage runs in one process: the accelerate launcher of the train stage
is not wired here (a multi-process environment trains in one process, with a warning).

Policy and reference. The policy starts as the SFT model and continues the SFT adapter (sequential fine-tuning):
the adapter folder is loaded onto the base with peft as the trainable adapter "default". DPO and KTO need a frozen
reference; TRL's documented way for a PEFT model that already carries an adapter is used as it is: DPOTrainer and
KTOTrainer load a copy of that adapter under the name "ref" (frozen) and compute the reference log-probabilities
with it switched on, so the reference is exactly the SFT model (base + SFT adapter), not the raw base
(tests/test_align.py proves the reference log-probabilities equal the SFT model's). After full fine-tuning (train.
method full) the SFT model is loaded twice, the second copy frozen as `ref_model`. ORPO and SimPO have no reference
model (reference-free losses); the run card says which model the reference was.

Data (pipelines.preferences): DPO, ORPO and SimPO train on pairs (unpaired rows whose prompt has both a desirable
and an undesirable completion are paired, the rest are counted as unused); KTO trains on unpaired rows (every pair
gives one of each label), shuffled once with align.seed because KTOTrainer reads them in order (its KL term is
estimated within each batch). TRL renders and tokenises the rows with the tokenizer's chat template. Rows whose
prompt alone fills format.max_length would be dropped by TRL: they are dropped here first and counted; rows whose
answer is cut at format.max_length are counted as truncated.

Checkpoints go to <paths.align_checkpoints>/<run hash> (the preference splits, the SFT adapter weights, the base
model, the align training params and this code); a rerun resumes from the last complete one, as the train stage
does (pipelines.train.resume_point), and the data order of every epoch is seeded (accelerate's seedable sampler with
data_seed = align.seed), so a resumed run trains on the same batches; a rerun of a finished run copies its recorded
output back and trains no step (pipelines.checkpoints). Early stopping watches the validation loss.

Outputs (paths.aligned_adapter): the aligned adapter (peft, "default" only) + tokenizer, README.md (run card),
train_log.json (TRL's log: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps,
kl for KTO), train_metrics.json. With align.method none, or nothing to train on, the folder holds SKIPPED.json and
a README saying why, and the SFT adapter stays the final one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from pipelines import chat
from pipelines.base_model import model_hash, source_info
from pipelines.checkpoints import callbacks as trainer_callbacks
from pipelines.checkpoints import (
    completed_run,
    drop_incomplete,
    record_completed,
    restore_completed,
    resume_point,
    training_lock,
    unless_finished,
)
from pipelines.config import ALIGN_TRAINING_KEYS, AlignConfig, Params, align_loss
from pipelines.cpu_speedups import score_only_label_positions
from pipelines.io import (
    StageError,
    StageResult,
    atomic_dir,
    claim_output,
    read_json,
    read_jsonl,
    require,
    sha256_file,
    write_json,
)
from pipelines.methods import safetensors_adapter
from pipelines.preferences import as_pairs, as_unpaired
from pipelines.runcard import library_versions
from pipelines.train import count_params, load_model, peak_memory_mb
from pipelines.train_env import TrainEnv, trainer_arguments

log = logging.getLogger(__name__)

OnLog = Callable[[dict[str, Any]], None]
SKIPPED = "SKIPPED.json"
REFERENCE_FREE = ("orpo", "simpo")
PAIRED = ("dpo", "orpo", "simpo")
# The reward TRL logs per step: how the implicit reward of chosen vs rejected answers moved during training.
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# ------------------------------------------------------------------------------------------------ data


def training_params(cfg: AlignConfig) -> dict[str, Any]:
    """The align keys that change what is trained (not the gate, not how much is evaluated)."""
    return {key: getattr(cfg, key) for key in ALIGN_TRAINING_KEYS} | {"loss": align_loss(cfg)}


def examples_for(method: str, rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], int]:
    """Trainer rows of `method` from preference rows: pairs (prompt, chosen, rejected) or KTO rows (prompt,
    completion, label), and how many rows the method cannot use."""
    if method in PAIRED:
        return as_pairs(rows)
    unpaired = as_unpaired(rows)
    random.Random(seed).shuffle(unpaired)  # KTOTrainer reads in order: mix the two labels into every batch
    return unpaired, 0


def fit_length(tokenizer: Any, examples: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, Any]],
                                                                                       dict[str, int]]:
    """Drop the examples whose prompt alone fills `max_length` tokens (TRL would drop them silently) and count
    those whose prompt + answer exceeds it (TRL cuts the answer)."""
    kept, dropped, truncated = [], 0, 0
    answers = ("chosen", "rejected") if examples and "chosen" in examples[0] else ("completion",)
    for ex in examples:
        prompt = chat.render(tokenizer, ex["prompt"], tools=ex.get("tools"), add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt >= max_length:
            dropped += 1
            continue
        longest = max(len(tokenizer(chat.render(tokenizer, [*ex["prompt"], *ex[side]], tools=ex.get("tools")),
                                    add_special_tokens=False)["input_ids"]) for side in answers)
        truncated += longest > max_length
        kept.append(ex)
    return kept, {"overlong_prompt_dropped": dropped, "truncated": truncated}


def to_dataset(examples: list[dict[str, Any]]) -> Any:
    """A datasets.Dataset in TRL's conversational format; `tools` only when some row has tools."""
    from datasets import Dataset

    columns = [k for k in examples[0] if k not in ("id", "tools")] if examples else []
    data = {k: [ex[k] for ex in examples] for k in columns}
    if any(ex.get("tools") for ex in examples):
        data["tools"] = [ex.get("tools") for ex in examples]
    return Dataset.from_dict(data)


# ----------------------------------------------------------------------------------------- model/trainer


def _experimental(method: str) -> tuple[Any, Any]:
    """(Config, Trainer) of ORPO or SimPO (CPOTrainer with loss_type simpo). The one place this project imports
    from trl.experimental, whose API TRL may change in any release: a missing or moved class is a user error that
    says which method to use instead, never a traceback deep in training."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the warning is this docstring's job
    try:
        if method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOConfig, ORPOTrainer
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer
    except ImportError as exc:
        import trl

        raise StageError(f"align.method = {method!r} needs trl.experimental, which trl {trl.__version__} does not "
                         f"provide as expected ({exc}); use align.method dpo or kto") from None


def is_full(adapter_dir: Path) -> bool:
    """The SFT output is a whole model (train.method full) rather than a peft adapter."""
    return not (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "config.json").is_file()


def load_policy(params: Params, env: TrainEnv) -> tuple[Any, Any, str]:
    """(policy, reference model or None, what the reference is) for the method, starting from the SFT output."""
    base_dir, adapter_dir = params.path("base_model"), params.path("adapter")
    trust = params.model.trust_remote_code
    method = params.align.method
    if is_full(adapter_dir):
        policy = load_model(adapter_dir, params.train, env, trust_remote_code=trust)
        if method in REFERENCE_FREE:
            return policy, None, "none: the loss is reference-free"
        ref = load_model(adapter_dir, params.train, env, trust_remote_code=trust).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return policy, ref, "the SFT model (a frozen second copy of the fully fine-tuned model)"
    safetensors_adapter(adapter_dir, "re-run the 'train' stage (python -m pipelines train)")
    from peft import PeftModel

    base = load_model(base_dir, params.train, env, trust_remote_code=trust)
    policy = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  # the SFT adapter, as "default"
    if method in REFERENCE_FREE:
        return policy, None, "none: the loss is reference-free"
    return policy, None, ("the SFT model: base + SFT adapter, loaded by TRL as the frozen peft adapter 'ref', a copy "
                          "of the SFT adapter")


def build_trainer(model: Any, ref_model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any, cfg: AlignConfig,
                  env: TrainEnv, output_dir: Path, max_length: int, *, callbacks: list[Any] | None = None) -> Any:
    """The one place a preference trainer is made: typed config in, TRL trainer out (composition, no subclass)."""
    from transformers import EarlyStoppingCallback

    score_only_label_positions()  # TRL's fused LM head scores only the answer positions on CPU too
    has_eval = eval_ds is not None and len(eval_ds) > 0
    load_best = has_eval and cfg.save_steps % cfg.eval_steps == 0
    common: dict[str, Any] = {**trainer_arguments(cfg, env, output_dir, has_eval=has_eval, load_best=load_best),
                              "beta": cfg.beta, "max_length": max_length}
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        # RPO when sft_weight > 0: TRL combines the listed losses with loss_weights (DPOConfig.loss_type docs)
        losses = {"loss_type": [align_loss(cfg), "sft"], "loss_weights": [1.0, cfg.sft_weight]} \
            if cfg.sft_weight > 0 else {"loss_type": [align_loss(cfg)]}
        args = DPOConfig(**common, **losses)
        trainer_cls, extra = DPOTrainer, {"ref_model": ref_model}
    elif cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, loss_type=align_loss(cfg), desirable_weight=cfg.desirable_weight,
                         undesirable_weight=cfg.undesirable_weight)
        trainer_cls, extra = KTOTrainer, {"ref_model": ref_model}
    else:
        config_cls, trainer_cls = _experimental(cfg.method)
        kwargs = {"loss_type": "simpo", "simpo_gamma": cfg.simpo_gamma, "cpo_alpha": 0.0} if cfg.method == "simpo" \
            else {}
        args, extra = config_cls(**common, **kwargs), {}
    callbacks = list(callbacks or [])
    if has_eval and cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if has_eval else None,
                          processing_class=tokenizer, callbacks=callbacks, **extra)
    if env.precision == "fp32":  # as the train stage: adapter weights stay fp32 on CPU
        import torch

        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    return trainer


# ---------------------------------------------------------------------------------------- checkpoints/resume


def weights_hash(folder: Path) -> str:
    """Content hash of a model folder's weights and config (not its run card, whose timings change every run)."""
    names = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors")
    h = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def run_fingerprint(params: Params) -> dict[str, Any]:
    """What a checkpoint belongs to: the preference splits, the SFT weights, the base model, the align training
    params and the training code; a checkpoint of anything else is not resumed."""
    prefs = params.path("preferences")
    parts = {
        "train_split": sha256_file(prefs / "train.jsonl"),
        "validation_split": sha256_file(prefs / "validation.jsonl") if (prefs / "validation.jsonl").is_file()
        else None,
        "sft_adapter": weights_hash(params.path("adapter")),
        "base_model": model_hash(params.path("base_model")),
        "align_params": hashlib.sha256(json.dumps(training_params(params.align), sort_keys=True).encode())
        .hexdigest(),
        "sft_method": params.train.method,
        "max_length": params.format.max_length,
        # the code that turns preference rows into trainer rows and trains on them
        "code": hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], chat,
                                                                                 sys.modules[as_pairs.__module__])))
        .hexdigest(),
    }
    run_hash = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"run_hash": run_hash, "parts": parts}


# ----------------------------------------------------------------------------------------------------- outputs


def reward_curve(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Plot-ready reward margins by step: training (per logging window) and validation."""
    train = [(h["step"], h["rewards/margins"]) for h in log_history if "rewards/margins" in h]
    evals = [(h["step"], h["eval_rewards/margins"]) for h in log_history if "eval_rewards/margins" in h]
    return {"step": [s for s, _ in train], "margin": [v for _, v in train],
            "eval_step": [s for s, _ in evals], "eval_margin": [v for _, v in evals]}


def render_card(card: dict[str, Any]) -> str:
    """The run card (README.md) of the aligned adapter: which model was the reference, data, params, figures."""
    m = card["metrics"]
    front = {"base_model": card["base_model"].get("name"), "library_name": "peft" if card["peft"] else "transformers",
             "pipeline_tag": "text-generation", "tags": ["trl", card["method"], "preference-tuning"]}
    figures = [("method / loss", f"{card['method']} / {card['params']['loss']}"), ("beta", card["params"]["beta"]),
               ("optimizer steps", m.get("steps")), ("early stopped", m.get("early_stopped")),
               ("training pairs" if card["method"] in PAIRED else "training rows", m.get("train_examples")),
               ("final train loss", m.get("final_train_loss")), ("best validation loss", m.get("best_eval_loss")),
               ("final validation reward margin", m.get("final_eval_reward_margin")),
               ("final validation reward accuracy", m.get("final_eval_reward_accuracy")),
               ("tokens / s", m.get("tokens_per_s")), ("wall time (s)", m.get("train_wall_time_s"))]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Preference-tuned ({card['method']}) adapter of {card['base_model'].get('name')}", "",
        "Trained by the fine-tuning factory (`python -m pipelines align`) with TRL, continuing the SFT adapter.", "",
        f"**Reference model:** {card['reference']}.", "",
        "## Results", "", "| figure | value |", "| --- | --- |",
        *(f"| {name} | {f'{v:.5g}' if isinstance(v, float) else v} |" for name, v in figures if v is not None), "",
        "## Reproduce", "",
        f"- SFT adapter (policy start{'' if card['method'] in REFERENCE_FREE else ' and reference'}) weights sha256: "
        f"`{card['sft_adapter_sha256']}`",
        f"- base model sha256: `{card['base_model_sha256']}`",
        *(f"- preference {split} split sha256: `{digest}`" for split, digest in card["data"].items()),
        f"- run hash: `{card['run_hash']}`",
        f"- device: {card['env'].get('device')}, precision {card['env'].get('precision')}, "
        f"{card['env'].get('num_threads')} thread(s)", "",
        "### Align params (params.yaml `align:`)", "", "```yaml",
        yaml.safe_dump(card["params"], sort_keys=False).strip(), "```", "",
        "### Library versions", "", *(f"- {k} {v}" for k, v in card["versions"].items()), "",
    ]
    return "\n".join(lines)


def _skip(params: Params, reason: str, figures: dict[str, Any]) -> StageResult:
    """Write the record of an alignment that did not train; the SFT adapter stays the final one."""
    out = claim_output(params, "aligned_adapter")
    record = {"skipped": True, "reason": reason, "method": params.align.method, **figures}
    with atomic_dir(out, "aligned_adapter") as tmp:
        write_json(tmp / SKIPPED, record)
        (tmp / "README.md").write_text(f"# No preference tuning\n\n{reason}\n\nThe SFT adapter is the final one.\n",
                                       encoding="utf-8")
    log.warning("align: %s", reason)
    return StageResult("align", {"aligned_adapter": out, "skipped": out / SKIPPED}, record)


def _read_split(params: Params, name: str) -> list[dict[str, Any]]:
    path = params.path("preferences") / f"{name}.jsonl"
    return list(read_jsonl(path)) if path.is_file() else []


def run(params: Params, env: TrainEnv | None = None, on_log: OnLog | None = None) -> StageResult:
    """Preference-tune the SFT adapter (module docstring); `on_log` receives each trainer log dict."""
    started = time.perf_counter()
    cfg = params.align
    claim_output(params, "aligned_adapter")  # before any work: the folder is the stage's own, and writable
    if cfg.method == "none":
        return _skip(params, "align.method is none: no preference tuning was asked for", {})
    require(params.path("preferences") / "train.jsonl", "preference-data")
    require(params.path("adapter"), "train")
    base_dir = require(params.path("base_model"), "fetch-model")
    env = env or TrainEnv.auto()
    if env.launcher == "accelerate" and env.num_processes > 1:
        log.warning("align runs in one process; the trainer's accelerate launcher (%d processes) is not used here",
                    env.num_processes)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(env.num_threads)
    adapter_dir = params.path("adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file()
                                              else base_dir, trust_remote_code=params.model.trust_remote_code)
    max_length = params.format.max_length
    train_rows, val_rows = _read_split(params, "train"), _read_split(params, "validation")
    train_ex, unused_train = examples_for(cfg.method, train_rows, cfg.seed)
    val_ex, unused_val = examples_for(cfg.method, val_rows, cfg.seed)
    train_ex, train_len = fit_length(tokenizer, train_ex, max_length)
    val_ex, val_len = fit_length(tokenizer, val_ex, max_length)
    data_figures = {
        "train_rows": len(train_rows), "validation_rows": len(val_rows),
        "train_examples": len(train_ex), "validation_examples": len(val_ex),
        "unused_unpaired_rows": unused_train + unused_val,  # unpaired rows DPO/ORPO/SimPO found no partner for
        "overlong_prompt_dropped": train_len["overlong_prompt_dropped"] + val_len["overlong_prompt_dropped"],
        "truncated": train_len["truncated"] + val_len["truncated"],
    }
    if not train_ex:
        what = "pairs" if cfg.method in PAIRED else "rows"
        return _skip(params, f"no training {what} for align.method {cfg.method} in "
                     f"'{params.path('preferences') / 'train.jsonl'}' ({len(train_rows)} preference rows, "
                     f"{data_figures['unused_unpaired_rows']} unpaired rows without a partner, "
                     f"{data_figures['overlong_prompt_dropped']} prompts over format.max_length): nothing was trained",
                     data_figures)

    # One training per checkpoint folder, as the train stage (pipelines.checkpoints.training_lock): a second align
    # started while one runs (the UI and `dvc repro` at once) stops with one sentence instead of writing the same
    # checkpoints and adapter.
    with training_lock(params.path("align_checkpoints")):
        return _train(params, env, on_log, started, tokenizer, train_ex, val_ex, data_figures)


def _train(params: Params, env: TrainEnv, on_log: OnLog | None, started: float, tokenizer: Any,
           train_ex: list[dict[str, Any]], val_ex: list[dict[str, Any]], data_figures: dict[str, Any]) -> StageResult:
    """align's training under the lock: resume or restore by fingerprint, train, write the adapter and record."""
    cfg = params.align
    max_length = params.format.max_length
    base_dir = params.path("base_model")
    fingerprint = run_fingerprint(params)
    run_dir = params.path("align_checkpoints") / fingerprint["run_hash"]
    out = params.path("aligned_adapter")
    if (record := completed_run(run_dir, fingerprint)) is not None:  # this very run finished: no step past its end
        restore_completed(run_dir, out, "aligned_adapter")
        return StageResult("align", {"aligned_adapter": out, "checkpoints": run_dir},
                           {**record["metrics"], "finished_run_restored": True,
                            "reward_curve": reward_curve(read_json(out / "train_log.json"))})
    resume = resume_point(run_dir, fingerprint, remove_corrupt=True)  # a corrupt checkpoint: named, passed over
    resume = unless_finished(resume, run_dir, remove=True)  # where the run ended, without a record: start over
    drop_incomplete(run_dir)
    model, ref_model, reference = load_policy(params, env)
    trainer = build_trainer(model, ref_model, tokenizer, to_dataset(train_ex), to_dataset(val_ex) if val_ex else None,
                            cfg, env, run_dir, max_length, callbacks=trainer_callbacks(fingerprint, on_log))
    train_result = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    final_eval = trainer.evaluate() if val_ex else {}
    staging = run_dir / "final"
    shutil.rmtree(staging, ignore_errors=True)
    peft = hasattr(trainer.model, "peft_config")
    if peft:  # only the trained adapter: TRL's frozen "ref" copy is the SFT adapter, already in paths.adapter
        trainer.model.save_pretrained(str(staging), selected_adapters=["default"])
        tokenizer.save_pretrained(str(staging))
    else:
        trainer.save_model(str(staging))

    state = trainer.state
    history = state.log_history
    early = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "EarlyStoppingCallback"),
                 None)
    timer = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "StepTimer")
    resumed_step = resume.step
    # TRL logs num_tokens as a running total of this process's non-pad training tokens (a resumed run restores the
    # killed run's log, whose totals started from 0 in that process): the last value logged in this session
    tokens = next((h["num_tokens"] for h in reversed(history)
                   if "num_tokens" in h and h.get("step", 0) > (resumed_step or 0)), 0)
    trainable, total = count_params(trainer.model)
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    metrics: dict[str, Any] = {
        "method": cfg.method, "loss": align_loss(cfg), "beta": cfg.beta,
        "reference": reference,
        "steps": state.global_step, "max_steps": state.max_steps, "epochs": round(float(state.epoch or 0), 3),
        "resumed_from_step": resumed_step,
        "early_stopped": bool(early and early.early_stopping_patience_counter >= early.early_stopping_patience),
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": float(train_result.training_loss),
        "best_eval_loss": state.best_metric,
        "final_eval_loss": final_eval.get("eval_loss"),
        "final_eval_reward_margin": final_eval.get("eval_rewards/margins"),
        "final_eval_reward_accuracy": final_eval.get("eval_rewards/accuracies"),
        "first_eval_reward_margin": evals[0].get("eval_rewards/margins") if evals else None,
        **data_figures,
        # non-pad tokens of the policy's forward passes (prompt + answer, both sides of a pair) in this session;
        # the step time includes the reference model's forward passes
        "tokens_seen": int(tokens),
        "train_wall_time_s": round(float(train_result.metrics.get("train_runtime", 0.0)), 2),
        "step_time_s": round(timer.seconds / timer.steps, 3) if timer.steps else None,
        "tokens_per_s": round(tokens / timer.seconds, 1) if timer.seconds and tokens else None,
        "stage_wall_time_s": round(time.perf_counter() - started, 2),
        **peak_memory_mb(env.device),
        "trainable_params": int(trainable), "total_params": int(total),
        "device": env.device, "precision": env.precision, "num_threads": env.num_threads,
        "run_hash": fingerprint["run_hash"],
    }
    card = {
        "method": cfg.method, "peft": peft, "reference": reference,
        "base_model": source_info(base_dir) or {"name": str(base_dir), "source": "folder"},
        "base_model_sha256": fingerprint["parts"]["base_model"],
        "sft_adapter_sha256": fingerprint["parts"]["sft_adapter"],
        "data": {"train": fingerprint["parts"]["train_split"], "validation": fingerprint["parts"]["validation_split"]},
        "run_hash": fingerprint["run_hash"], "params": training_params(cfg), "env": asdict(env),
        "versions": library_versions(), "metrics": metrics,
    }
    with atomic_dir(out, "aligned_adapter") as tmp:
        for item in staging.iterdir():
            if item.suffix not in (".bin", ".pt", ".pth"):  # training_args.bin is a pickle: never shipped
                shutil.move(str(item), tmp / item.name)
        (tmp / "README.md").write_text(render_card(card), encoding="utf-8")
        write_json(tmp / "train_log.json", history)
        write_json(tmp / "train_metrics.json", metrics)
    shutil.rmtree(staging, ignore_errors=True)
    record_completed(run_dir, out, fingerprint, metrics)  # a rerun restores it instead of training past the end
    return StageResult("align", {"aligned_adapter": out, "checkpoints": run_dir},
                       {**metrics, "reward_curve": reward_curve(history)})


def read_record(folder: Path) -> dict[str, Any]:
    """What the align stage left in `folder`: its train_metrics.json, or SKIPPED.json ({"skipped": true, ...})."""
    if (folder / SKIPPED).is_file():
        return read_json(folder / SKIPPED)
    if (folder / "train_metrics.json").is_file():
        return {"skipped": False, **read_json(folder / "train_metrics.json")}
    raise StageError(f"'{folder}' holds no aligned adapter and no {SKIPPED}; re-run the 'align' stage "
                     "(python -m pipelines align)")
