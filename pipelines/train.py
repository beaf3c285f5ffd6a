"""Fine-tune the base model on the train split: TRL `SFTTrainer` + the peft method of train.method, or full / freeze.

    python -m pipelines train                                        # one process, device picked automatically
    PIPELINES_TRAIN_LAUNCHER=accelerate PIPELINES_TRAIN_PROCESSES=2 python -m pipelines train   # 2-process DDP
    accelerate launch --num_processes 2 --multi_gpu -m pipelines train   # the same DDP run, launched by hand

It reads top to bottom like TRL's `sft.py`: encode the splits, build the trainer, train, write the adapter.
Hyperparameters come from params.yaml `train:`; the environment (device, precision, threads, 4-bit loading,
launcher) is a `TrainEnv` (pipelines.train_env: the Dagster trainer resource, or PIPELINES_TRAIN_* variables).
Around it: pipelines.methods (each method's peft config, freezing, AdaLoRA's budget callback, init_from),
pipelines.checkpoints (run hash, resume), pipelines.cpu_speedups (the same losses, faster on CPU),
pipelines.launcher (`accelerate launch` and its log protocol), pipelines.fence (the library internals those use).

Data: each row of splits/{train,validation}.jsonl is tokenised by `pipelines.chat.tokenize_conversation`, the
one source of truth for the chat template and the loss mask: labels are the token ids on every trained assistant
turn (its end-of-turn token included, so the model learns to stop) and -100 elsewhere, including on an assistant
turn marked `"weight": 0`; special-token text inside a message is encoded as plain text. SFTTrainer receives this
pre-tokenised dataset with `skip_prepare_dataset=True`, so TRL neither re-renders, re-masks, nor adds or
removes an EOS. Batches are grouped by length and padded to their longest row (exact: pads get attention 0
and label -100), or with train.padding_free flattened into one row (exact too, tests/test_methods.py); the padding
efficiency (real tokens / computed token slots) is measured and reported.

Checkpoints go to <paths.checkpoints>/<run hash>, the hash of the splits, the base model, the parent adapter, the
train params and code; a rerun resumes from the last complete checkpoint there whose files load (a corrupt one is
named, deleted and passed over), and refuses one whose stored hash differs; a rerun of a finished run copies its
recorded adapter back byte for byte and trains no step (never past train.max_steps). One training at a time holds
the checkpoint folder's lock. See pipelines.checkpoints.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import chat, checkpoints, cpu_speedups, fence, launcher, methods, train_env
from pipelines.base_model import source_info
from pipelines.chat import TemplateError, tokenize_conversation
from pipelines.config import Params, TrainConfig
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, read_json, read_jsonl, require, write_json
from pipelines.preflight import preflight
from pipelines.runcard import library_versions, render_run_card
from pipelines.train_env import TrainEnv, trainer_arguments

log = logging.getLogger(__name__)

OnLog = launcher.OnLog
EVAL_TAG = "is_eval"  # column that tells the counting collator a validation row from a train row
# Figures that differ between two runs of the same training (time, memory). They go to the stage's metrics (the run
# record and the Dagster metadata) but never into the adapter folder: the same data, params and code must give
# the same adapter bytes, or a rerun would make everything downstream of the adapter look changed.
TIMINGS = ("train_wall_time_s", "step_time_s", "tokens_per_s", "stage_wall_time_s", "peak_rss_mb", "peak_gpu_mb")
TIMING_LOG_SUFFIXES = ("_runtime", "_per_second")  # trainer log keys such as train_runtime, eval_samples_per_second
FULL_METRICS = "final_metrics.json"  # in the run's checkpoint folder: every figure, for a launching process


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def log_without_timings(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if not k.endswith(TIMING_LOG_SUFFIXES)} for entry in log_history]


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class EncodedSplit:
    """A split as trainer-ready examples (input_ids + labels) and the figures the run card reports."""

    examples: list[dict[str, list[int]]]
    n_tokens: int = 0
    n_label_tokens: int = 0
    n_truncated: int = 0


def encode_example(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels (-100 off the trained assistant turns) of one row; overlong rows keep their end."""
    tok = tokenize_conversation(tokenizer, row["messages"], tools=row.get("tools"))
    ids = tok.input_ids
    labels = [t if m else -100 for t, m in zip(ids, tok.assistant_mask, strict=True)]
    # Tokens after the last trained one (the template's newline after <|im_end|>) cannot change any loss
    # under causal attention, so they are not computed at all.
    end = max((i + 1 for i, label in enumerate(labels) if label != -100), default=len(ids))
    ids, labels = ids[:end], labels[:end]
    truncated = len(ids) > max_length
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}, truncated


def encode_split(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, where: str) -> EncodedSplit:
    """Encode every row; a row that cannot be rendered or has nothing to train on is a user error naming its line."""
    split = EncodedSplit([])
    for line, row in enumerate(rows, start=1):
        try:
            example, truncated = encode_example(tokenizer, row, max_length)
        except (TemplateError, *chat.RENDER_ERRORS) as exc:
            raise StageError(f"{where} line {line}: the row cannot be tokenised with the chat template ({exc}); "
                             "rerun the format stage with this base model") from None
        n_labels = sum(label != -100 for label in example["labels"])
        if n_labels == 0:
            raise StageError(f"{where} line {line}: the row has no assistant tokens to train on; every row must "
                             "end with an assistant turn (rerun the format stage)")
        split.examples.append(example)
        split.n_tokens += len(example["input_ids"])
        split.n_label_tokens += n_labels
        split.n_truncated += truncated
    return split


def to_dataset(split: EncodedSplit, *, is_eval: bool) -> Any:
    """A datasets.Dataset of input_ids + labels, tagged train/eval for the token counts."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in split.examples],
        "labels": [e["labels"] for e in split.examples],
        EVAL_TAG: [is_eval] * len(split.examples),
    })


@dataclass
class CountingCollator:
    """TRL's padding collator, plus counts of real tokens vs computed token slots per phase.

    Padding goes to the longest row of the batch (rows are length-grouped by the sampler), so
    padding efficiency = real tokens / (batch size x padded length) is what the forward pass really costs.
    With `padding_free` the rows are concatenated into one (1, total) row whose position ids restart at each row
    and which has no attention mask: transformers then masks attention per row (block-diagonal), and TRL sets the
    label of each row's first token to -100 (no prediction across rows).
    """

    pad_token_id: int
    padding_free: bool = False
    counts: dict[str, list[int]] = field(default_factory=lambda: {"train": [0, 0, 0], "eval": [0, 0, 0]})

    def __post_init__(self) -> None:
        self.inner = fence.get("padding_collator")(pad_token_id=self.pad_token_id, padding_free=self.padding_free)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        phase = "eval" if examples[0].get(EVAL_TAG) else "train"
        batch = self.inner([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        real, slots, trained = self.counts[phase]
        self.counts[phase] = [
            real + (int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()),
            slots + batch["input_ids"].numel(),
            trained + int((batch["labels"] != -100).sum()),
        ]
        return batch


# ------------------------------------------------------------------------------------------------ model/trainer
def _dtype(env: TrainEnv) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[env.precision]


def load_model(base_dir: Path, cfg: TrainConfig, env: TrainEnv, *, trust_remote_code: bool = False,
               parent: Path | None = None) -> Any:
    """The model to train, from safetensors only: the base (4-bit NF4 with double quantisation for QLoRA or when the
    env asks), with the last blocks alone trainable for freeze; with `parent` (train.init_from, checked by
    methods.check_parent) the parent's whole model (full, freeze) or the base wrapped with the parent adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    whole = methods.saves_full_model(cfg.method)
    four_bit = cfg.method == "qlora" or (env.load_in_4bit and not whole)
    if whole and env.load_in_4bit:
        raise StageError(f"train.method = {cfg.method!r} cannot train 4-bit weights; use method lora/qlora or turn "
                         "off the trainer's load_in_4bit")
    # PEFT methods keep the frozen base in the compute dtype (half the memory on GPU); full fine-tuning keeps
    # fp32 master weights and lets autocast do the reduced precision.
    dtype = torch.float32 if whole else _dtype(env)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if four_bit:
        reason = train_env.four_bit_unsupported(env.device)
        if reason:
            raise StageError(f"train.method = {cfg.method!r} needs 4-bit loading, which bitsandbytes cannot do on "
                             f"{env.device} here ({reason}); use method 'lora' or a CUDA machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(env),
        )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": f"cuda:{local_rank}" if env.device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(parent if parent is not None and whole else base_dir, **kwargs)
    if cfg.method == "freeze":
        section = cfg.section()
        methods.freeze_all_but_last_blocks(model, section.last_n_blocks, section.train_lm_head)
    if parent is not None and not whole:
        model = methods.load_parent_adapter(model, parent)
    return model


def build_trainer(model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any, cfg: TrainConfig, env: TrainEnv,
                  output_dir: Path, *, callbacks: list[Any] | None = None) -> Any:
    """The one place an SFTTrainer is made: typed config in, trainer out (composition, no subclass)."""
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    cpu_speedups.score_only_label_positions()
    has_eval = eval_ds is not None and len(eval_ds) > 0
    # The best checkpoint can only be reloaded if every save step is also an eval step. AdaLoRA keeps its last
    # step: its budget schedule ends there, and peft reloads an earlier checkpoint at that checkpoint's ranks.
    load_best = has_eval and cfg.save_steps % cfg.eval_steps == 0 and cfg.method != "adalora"
    args = SFTConfig(
        **trainer_arguments(cfg, env, output_dir, has_eval=has_eval, load_best=load_best),
        optim=cfg.optim,
        neftune_noise_alpha=cfg.neftune_alpha,
        torch_compile=cfg.torch_compile,
        ddp_find_unused_parameters=False,  # every trainable tensor gets a gradient; the search costs a pass
        # Rows arrive tokenised and masked by pipelines.chat; TRL must not re-render, re-mask or touch EOS.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # already truncated at encoding (format.max_length)
        packing=False,
        # train.padding_free flattens batches in CountingCollator (TRL refuses its own flag with a custom collator);
        # exact with sdpa on CPU because the model sees no attention mask, only restarting position ids.
        padding_free=False,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,  # the collator needs the eval tag
        label_names=["labels"],
    )
    callbacks = list(callbacks or [])
    if cfg.method == "adalora":
        callbacks.insert(0, methods.adalora_budget())  # before the Fingerprint callback, which must run last
    if has_eval and cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=CountingCollator(pad_id, padding_free=cfg.padding_free),
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        # a model that already is a PeftModel (train.init_from) carries its adapter
        peft_config=None if hasattr(model, "peft_config") else methods.peft_config(
            cfg, Path(tokenizer.name_or_path), total_steps=cfg.max_steps if cfg.max_steps > 0 else None),
        callbacks=callbacks,
    )
    fence.wrap_train_sampler(trainer, lambda sampler: cpu_speedups.epoch_seeded(sampler, cfg.seed))
    if env.device == "cpu":
        cpu_speedups.plain_head_on_cpu(trainer.model)
    if env.precision == "fp32":
        # TRL casts a quantised model's adapter weights to bf16 (the QLoRA paper's GPU recipe); in fp32 (CPU)
        # they stay fp32. The optimizer is created in train(), after this.
        import torch

        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    return trainer


# ----------------------------------------------------------------------------------------------------- outputs
def loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Plot-ready train and validation loss by step."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return {
        "step": [s for s, _ in train], "train_loss": [v for _, v in train],
        "eval_step": [s for s, _ in evals], "eval_loss": [v for _, v in evals],
    }


def plot_loss(curve: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in Dagster runs
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(curve["step"], curve["train_loss"], label="train", marker=".")
    if curve["eval_step"]:
        ax.plot(curve["eval_step"], curve["eval_loss"], label="validation", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / assistant token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; peft counts 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (Linux reports KiB), plus the GPU's peak allocation."""
    figures = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        import torch

        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


# --------------------------------------------------------------------------------------------------------- run
def _read_split(params: Params, name: str, required: bool) -> list[dict[str, Any]]:
    path = params.path("splits") / f"{name}.jsonl"
    if required:
        require(path, "split")
    return list(read_jsonl(path)) if path.is_file() else []


def train_in_process(params: Params, env: TrainEnv, on_log: OnLog | None) -> StageResult:
    """Train in this process (or, under `accelerate launch`, as one rank of it) and write the adapter folder."""
    import torch
    from transformers import AutoTokenizer

    started = time.perf_counter()
    torch.set_num_threads(env.num_threads)
    cfg, base_dir = params.train, require(params.path("base_model"), "fetch-model")
    train_rows = _read_split(params, "train", required=True)
    if not train_rows:
        raise StageError(f"'{params.path('splits') / 'train.jsonl'}' has no rows; add data and rerun the split stage")
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=params.model.trust_remote_code)
    max_length = params.format.max_length
    train_split = encode_split(tokenizer, train_rows, max_length, str(params.path("splits") / "train.jsonl"))
    val_split = encode_split(tokenizer, _read_split(params, "validation", required=False), max_length,
                             str(params.path("splits") / "validation.jsonl"))

    parent = methods.check_parent(params)  # train.init_from (checked by the preflight too)
    fingerprint = checkpoints.run_fingerprint(params)
    parent_info = methods.parent_record(parent) if parent is not None else None
    base_sha = fingerprint["parts"]["base_model"]
    if parent_info and parent_info["base_model_sha256"] not in (None, base_sha):
        raise StageError(f"train.init_from: the adapter in '{parent}' was trained on another base model (sha256 "
                         f"{parent_info['base_model_sha256'][:12]}, this one is {base_sha[:12]}); continue it on its "
                         "own base model or start fresh (train.init_from: null)")
    run_dir = params.path("checkpoints") / fingerprint["run_hash"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    # a corrupt checkpoint is named, deleted and passed over (pipelines.checkpoints)
    resume = checkpoints.resume_point(run_dir, fingerprint, remove_corrupt=is_main)
    # where the run ended: resuming would train past max_steps (a finished run is restored in run(), not resumed)
    resume = checkpoints.unless_finished(resume, run_dir, remove=is_main)
    if resume.checkpoint is not None and (refused := methods.resume_refused(cfg.method)):
        log.warning("not resuming from %s: %s", resume.checkpoint, refused)
        resume = checkpoints.ResumePoint(None, resume.corrupt)
        if is_main:
            shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints would be mixed with the new run's
    if is_main:
        checkpoints.drop_incomplete(run_dir)
    for key, value in methods.tracker_environment(cfg.report_to, run_dir, dict(os.environ)).items():
        os.environ[key] = value  # read by the tracker's callback when the trainer is built

    model = load_model(base_dir, cfg, env, trust_remote_code=params.model.trust_remote_code, parent=parent)
    trainer = build_trainer(model, tokenizer, to_dataset(train_split, is_eval=False),
                            to_dataset(val_split, is_eval=True), cfg, env, run_dir,
                            callbacks=checkpoints.callbacks(fingerprint, on_log))
    train_result = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    final_eval = trainer.evaluate() if len(val_split.examples) else {}
    collator: CountingCollator = trainer.data_collator
    # Token counts of every rank (a sum-reduce is the identity in one process).
    real, slots, trained = (int(x) for x in trainer.accelerator.reduce(
        torch.tensor(collator.counts["train"], device=trainer.args.device), reduction="sum"))
    staging = run_dir / "final"
    trainer.save_model(str(staging))  # every rank calls it: FSDP/DeepSpeed gather shards inside
    if not trainer.is_world_process_zero():
        return StageResult("train", {}, {"rank": int(os.environ.get("RANK", "0"))})

    state = trainer.state
    early = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "EarlyStoppingCallback"),
                 None)
    train_runtime = float(train_result.metrics.get("train_runtime", 0.0))
    timer = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "StepTimer")
    trainable, total = count_params(trainer.model)
    curve = loss_curve(state.log_history)
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "init_from": cfg.init_from,  # the parent adapter (None: trained from the base model)
        "parent_weights_sha256": parent_info["weights_sha256"] if parent_info else None,
        "parent_run_hash": parent_info["run_hash"] if parent_info else None,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0), 3),
        "resumed_from_step": resume.step,
        "corrupt_checkpoints": resume.corrupt,  # one sentence per checkpoint that did not load and was deleted
        "early_stopped": bool(early and early.early_stopping_patience_counter >= early.early_stopping_patience),
        "final_train_loss": curve["train_loss"][-1] if curve["train_loss"] else None,
        "mean_train_loss": float(train_result.training_loss),
        "best_eval_loss": state.best_metric,
        "final_eval_loss": final_eval.get("eval_loss"),
        "train_rows": len(train_split.examples),
        "validation_rows": len(val_split.examples),
        "truncated_rows": train_split.n_truncated + val_split.n_truncated,
        "tokens_seen": real,  # non-pad train tokens in this session's forward passes, all processes
        "trained_tokens": trained,  # of which assistant tokens (the loss)
        "token_slots": slots,  # batch x padded length: what the forward pass computed
        "padding_efficiency": round(real / slots, 4) if slots else None,
        "train_wall_time_s": round(train_runtime, 2),  # trainer.train(), evaluations and saves included
        "step_time_s": round(timer.seconds / timer.steps, 3) if timer.steps else None,  # one optimizer step
        "tokens_per_s": round(real / timer.seconds, 1) if timer.seconds else None,  # non-pad tokens per step second
        "stage_wall_time_s": round(time.perf_counter() - started, 2),
        **peak_memory_mb(env.device),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "device": env.device,
        "precision": env.precision,
        "num_processes": world_size,
        "num_threads": env.num_threads,
        "run_hash": fingerprint["run_hash"],
        "base_model_sha256": fingerprint["parts"]["base_model"],  # lets a continuation check its base model
        "optimizer": cfg.optim,
        "trainable_tensors": methods.trainable_summary(trainer.model),
    }
    card = {
        "method": cfg.method,
        "parent": parent_info,
        "tied_head_trained": methods.tied_head_trained(trainer.model),
        "merge": methods.can_merge(cfg.method),
        "base_model": source_info(base_dir) or {"name": str(base_dir), "source": "folder"},  # no fetch-model record
        "base_model_sha256": fingerprint["parts"]["base_model"],
        "data": {"train": fingerprint["parts"]["train_split"], "validation": fingerprint["parts"]["validation_split"]},
        "run_hash": fingerprint["run_hash"],
        "params": methods.effective_params(cfg),
        "env": {**env.as_dict(), "num_processes": world_size},
        "versions": library_versions(),
        "metrics": without_timings(metrics),
    }
    out = params.path("adapter")
    with atomic_dir(out, "adapter") as tmp:
        for item in staging.iterdir():
            if item.suffix not in (".bin", ".pt", ".pth"):  # training_args.bin is a pickle: never shipped
                shutil.move(str(item), tmp / item.name)
        (tmp / "README.md").write_text(render_run_card(card), encoding="utf-8")
        write_json(tmp / "train_log.json", log_without_timings(state.log_history))
        write_json(tmp / "train_metrics.json", without_timings(metrics))
        plot_loss(curve, tmp / "loss_curve.png")
    shutil.rmtree(staging, ignore_errors=True)
    write_json(run_dir / FULL_METRICS, metrics)  # read back by a launching process (pipelines.launcher)
    checkpoints.record_completed(run_dir, out, fingerprint, metrics)  # a rerun restores it instead of training
    return StageResult(
        "train",
        {"adapter": out, "loss_curve": out / "loss_curve.png", "checkpoints": run_dir},
        {**metrics, "loss_curve": curve},
    )


def _finished_run(params: Params) -> StageResult | None:
    """The recorded output of this very run (same splits, base model, params and code), written again to
    paths.adapter byte for byte by the main process, or None when the run has not finished (pipelines.checkpoints)."""
    require(params.path("splits") / "train.jsonl", "split")  # what the fingerprint hashes: named if missing
    require(params.path("base_model"), "fetch-model")
    fingerprint = checkpoints.run_fingerprint(params)
    run_dir = params.path("checkpoints") / fingerprint["run_hash"]
    record = checkpoints.completed_run(run_dir, fingerprint)
    if record is None:
        return None
    out = params.path("adapter")
    if int(os.environ.get("RANK", "0")) != 0:
        return StageResult("train", {}, {"rank": int(os.environ.get("RANK", "0"))})
    checkpoints.restore_completed(run_dir, out, "adapter")
    return StageResult("train", {"adapter": out, "loss_curve": out / "loss_curve.png", "checkpoints": run_dir},
                       {**record["metrics"], "finished_run_restored": True,
                        "loss_curve": loss_curve(read_json(out / "train_log.json"))})


def run(params: Params, env: TrainEnv | None = None, on_log: OnLog | None = None) -> StageResult:
    """Train the adapter; `on_log` receives each trainer log dict (step, loss, learning_rate, eval_loss, ...)."""
    preflight(params, "train")  # bad target modules / max_length: one sentence before any model is loaded
    claim_output(params, "adapter")  # a folder the stage did not write, or cannot replace: before training
    env = env or TrainEnv.auto()
    on_log = on_log or launcher.child_log()
    inside = launcher.inside_launcher()
    # One training per checkpoint folder (pipelines.checkpoints): the ranks of a launch hold the lock shared.
    with checkpoints.training_lock(params.path("checkpoints"), shared=inside) as lock:
        if (done := _finished_run(params)) is not None:
            return done
        if env.launcher == "accelerate" and env.num_processes > 1 and not inside:
            lock.share()  # the ranks take it too, and keep it should this launcher be killed
            launcher.launch_accelerate(params, env, on_log, stage="train")
            out = params.path("adapter")
            full = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"] / FULL_METRICS
            return StageResult("train", {"adapter": out, "loss_curve": out / "loss_curve.png"},
                               {**read_json(full if full.is_file() else out / "train_metrics.json"),
                                "loss_curve": loss_curve(read_json(out / "train_log.json"))})
        return train_in_process(params, env, on_log)
