"""Fine-tune the base model on the train split: TRL `SFTTrainer` + peft (LoRA, DoRA, QLoRA) or full fine-tuning.

    python -m pipelines train                                        # one process, device picked automatically
    PIPELINES_TRAIN_LAUNCHER=accelerate PIPELINES_TRAIN_PROCESSES=2 python -m pipelines train   # 2-process DDP
    accelerate launch --num_processes 2 --cpu -m pipelines train     # the same DDP run, launched by hand

Hyperparameters come from params.yaml `train:`; the environment (device, precision, threads, 4-bit loading,
launcher) from `TrainEnv` (the Dagster trainer resource, or PIPELINES_TRAIN_* variables on the command line).

Data: each row of splits/{train,validation}.jsonl is tokenised by `pipelines.chat.tokenize_conversation`, the
one source of truth for the chat template and the loss mask: labels are the token ids on every assistant turn
(its end-of-turn token included, so the model learns to stop) and -100 elsewhere. SFTTrainer receives this
pre-tokenised dataset with `skip_prepare_dataset=True`, so TRL neither re-renders, re-masks, nor adds or
removes an EOS. Batches are grouped by length and padded to their longest row (exact: pads get attention 0
and label -100); the padding efficiency (real tokens / computed token slots) is measured and reported.

Checkpoints go to <paths.checkpoints>/<run hash>, the hash of the splits, the base model, the train params and code;
a rerun resumes from the last complete checkpoint there whose files load (a corrupt one is named, deleted and
passed over), and refuses one whose stored hash differs. One training at a time holds the checkpoint folder's lock.
See pipelines.checkpoints.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipelines.base_model import source_info
from pipelines.chat import TemplateError, tokenize_conversation
from pipelines.checkpoints import FINGERPRINT, drop_incomplete, resume_point, run_fingerprint, training_lock
from pipelines.checkpoints import _step as _step  # re-exported: pipelines.train._step, run_fingerprint as before
from pipelines.config import Params, TrainConfig
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, read_json, read_jsonl, require, write_json
from pipelines.preflight import preflight
from pipelines.runcard import library_versions, render_run_card

log = logging.getLogger(__name__)

OnLog = Callable[[dict[str, Any]], None]
ENV_PREFIX = "PIPELINES_TRAIN_"
LOG_MARK = "@@train-log "  # stdout prefix of a child process's log dict, read back by the launching process
EVAL_TAG = "is_eval"  # column that tells the counting collator a validation row from a train row
DEVICES, PRECISIONS, LAUNCHERS = ("auto", "cpu", "cuda"), ("auto", "bf16", "fp16", "fp32"), ("in_process", "accelerate")


# --------------------------------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class TrainEnv:
    """Where and how training runs; none of it changes what is learned (that is params.yaml `train:`)."""

    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # bf16 | fp16 | fp32; never reduced precision on CPU (slow and lossy there)
    num_threads: int = 1  # torch intra-op threads per process
    load_in_4bit: bool = False  # NF4 + double quantisation of the frozen base (QLoRA memory) for any PEFT method
    launcher: str = "in_process"  # in_process | accelerate (a subprocess `accelerate launch`)
    num_processes: int = 1  # data-parallel processes when launcher == accelerate
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models on small GPUs)
    accelerate_config: str | None = None  # an `accelerate config` YAML (FSDP, DeepSpeed); None: plain DDP

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", num_threads: int = 0,
                load_in_4bit: bool = False, launcher: str = "in_process", num_processes: int = 1,
                gradient_checkpointing: bool = False, accelerate_config: str | None = None) -> TrainEnv:
        """Fill in 'auto' values from the machine and refuse combinations that cannot work."""
        import torch

        for name, value, allowed in (("device", device, DEVICES), ("precision", precision, PRECISIONS),
                                     ("launcher", launcher, LAUNCHERS)):
            if value not in allowed:
                raise StageError(f"trainer {name} = {value!r} is not allowed; use one of {', '.join(allowed)}")
        cuda = torch.cuda.is_available()
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        if device == "cuda" and not cuda:
            raise StageError("trainer device = 'cuda' but no CUDA GPU is visible; use device 'auto' or 'cpu'")
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device == "cuda" else "fp32"
        if device == "cpu" and precision != "fp32":
            raise StageError(f"trainer precision = {precision!r} on CPU is not allowed; CPU training runs in fp32")
        if num_threads <= 0:
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if num_processes < 1:
            raise StageError(f"trainer num_processes = {num_processes} must be at least 1")
        if accelerate_config and not Path(accelerate_config).is_file():
            raise StageError(f"trainer accelerate_config = '{accelerate_config}' is not a file; write one with "
                             "`accelerate config --config_file FILE` or leave it empty for plain DDP")
        return cls(device, precision, num_threads, load_in_4bit, launcher, num_processes, gradient_checkpointing,
                   accelerate_config or None)

    @classmethod
    def auto(cls) -> TrainEnv:
        """The machine's defaults, overridden by PIPELINES_TRAIN_{DEVICE,PRECISION,THREADS,LOAD_IN_4BIT,...}."""
        env = os.environ

        def flag(name: str) -> bool:
            return env.get(ENV_PREFIX + name, "").lower() in ("1", "true", "yes")

        return cls.resolve(
            device=env.get(ENV_PREFIX + "DEVICE", "auto"),
            precision=env.get(ENV_PREFIX + "PRECISION", "auto"),
            num_threads=int(env.get(ENV_PREFIX + "THREADS", "0")),
            load_in_4bit=flag("LOAD_IN_4BIT"),
            launcher=env.get(ENV_PREFIX + "LAUNCHER", "in_process"),
            num_processes=int(env.get(ENV_PREFIX + "PROCESSES", "1")),
            gradient_checkpointing=flag("GRADIENT_CHECKPOINTING"),
            accelerate_config=env.get(ENV_PREFIX + "ACCELERATE_CONFIG") or None,
        )

    def environ(self) -> dict[str, str]:
        """This environment as PIPELINES_TRAIN_* variables (how a launched child process receives it)."""
        return {
            ENV_PREFIX + "DEVICE": self.device,
            ENV_PREFIX + "PRECISION": self.precision,
            ENV_PREFIX + "THREADS": str(self.num_threads),
            ENV_PREFIX + "LOAD_IN_4BIT": str(self.load_in_4bit).lower(),
            ENV_PREFIX + "LAUNCHER": self.launcher,
            ENV_PREFIX + "PROCESSES": str(self.num_processes),
            ENV_PREFIX + "GRADIENT_CHECKPOINTING": str(self.gradient_checkpointing).lower(),
            ENV_PREFIX + "ACCELERATE_CONFIG": self.accelerate_config or "",
        }


def four_bit_unsupported(device: str) -> str | None:
    """None if bitsandbytes can quantise to NF4 on `device`, else the reason it cannot."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4", compress_statistics=True)
    except Exception as exc:  # ImportError, a missing native backend, or an unsupported device
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class EncodedSplit:
    """A split as trainer-ready examples (input_ids + labels) and the figures the run card reports."""

    examples: list[dict[str, list[int]]]
    n_tokens: int = 0
    n_label_tokens: int = 0
    n_truncated: int = 0


def encode_example(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels (-100 off the assistant turns) of one row; overlong rows keep their end (the answer)."""
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
        except (TemplateError, KeyError, ValueError, TypeError) as exc:
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
    """

    pad_token_id: int
    counts: dict[str, list[int]] = field(default_factory=lambda: {"train": [0, 0, 0], "eval": [0, 0, 0]})

    def __post_init__(self) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        phase = "eval" if examples[0].get(EVAL_TAG) else "train"
        batch = self.inner([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        real, slots, trained = self.counts[phase]
        self.counts[phase] = [
            real + int(batch["attention_mask"].sum()),
            slots + batch["input_ids"].numel(),
            trained + int((batch["labels"] != -100).sum()),
        ]
        return batch


# ------------------------------------------------------------------------------------------------ model/trainer
def peft_config(cfg: TrainConfig) -> Any:
    """The peft LoraConfig of the method (None for full fine-tuning)."""
    if cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, use_dora=cfg.method == "dora", task_type="CAUSAL_LM",
    )


def _dtype(env: TrainEnv) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[env.precision]


def load_model(base_dir: Path, cfg: TrainConfig, env: TrainEnv, *, trust_remote_code: bool = False) -> Any:
    """The base model from safetensors only; 4-bit NF4 (double quantisation) for QLoRA or when the env asks."""
    import torch
    from transformers import AutoModelForCausalLM

    four_bit = cfg.method == "qlora" or (env.load_in_4bit and cfg.method != "full")
    if cfg.method == "full" and env.load_in_4bit:
        raise StageError("train.method = 'full' cannot train 4-bit weights; use method lora/qlora or turn off "
                         "the trainer's load_in_4bit")
    # PEFT methods keep the frozen base in the compute dtype (half the memory on GPU); full fine-tuning keeps
    # fp32 master weights and lets autocast do the reduced precision.
    dtype = torch.float32 if cfg.method == "full" else _dtype(env)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if four_bit:
        reason = four_bit_unsupported(env.device)
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
    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)


def _epoch_seeded(sampler: Any, seed: int) -> Any:
    """The trainer's length-grouped sampler, its shuffle drawn from seed + epoch instead of the global RNG.

    transformers draws the order of an epoch from the global torch RNG when the epoch starts; a resume in the
    middle of an epoch rebuilds that order before it restores rng_state.pth (and that state is not the one of
    the epoch start anyway), so without this a resumed run trains on other batches than an uninterrupted one.
    """
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if type(sampler) is not LengthGroupedSampler:
        return sampler

    class EpochSeeded(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer / accelerate before each epoch
            self.epoch = epoch

        def __iter__(self):
            import torch

            self.generator = torch.Generator().manual_seed(seed + self.epoch)
            return super().__iter__()

    return EpochSeeded(sampler.batch_size, lengths=sampler.lengths)


def score_only_label_positions() -> bool:
    """Make TRL's fused LM head project only the positions that have a label, on every device; True if it does.

    TRL's SFTTrainer computes the loss with a fused, chunked LM head. On CUDA/XPU it scores only the positions
    with a label ("compact"); elsewhere it scores every position, so that compilers such as Neuron see fixed
    tile shapes. On CPU that spends the 49k-vocabulary head on every prompt token: in a profile of the ticket
    demo (13 of 124 tokens trained) it was a third of the step. The compact path is the same computation on
    fewer rows, scattered back to their positions, so losses and gradients are unchanged
    (tests/test_train.py checks both). The switch is a module-level function of trl.trainer.utils; if a TRL
    release renames it, training still works, at the old speed, and a warning says so.
    """
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        log.warning("trl %s has no trl.trainer.utils._use_triton: the LM head scores every position on CPU",
                    getattr(sys.modules.get("trl"), "__version__", "?"))
        return False
    if getattr(decide, "_compact_everywhere", False):
        return True

    def compact(device: Any) -> bool:
        return device.type == "cpu" or decide(device)

    compact._compact_everywhere = True  # type: ignore[attr-defined]
    compact._original = decide  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    return True


PLAIN_HEAD_MAX_LABELS = 4096  # label positions per batch up to which the CPU head keeps (labels, vocab) logits
HEAD_ROWS = 32  # label positions per elementwise pass of the CPU head: a (32, vocab) tile stays in cache
_SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@functools.cache
def _label_log_prob_function() -> Any:
    """The LM head at the label positions as one autograd Function: (hidden, weight, targets) -> log p(target),
    entropy, is-top-1. Built on first use so importing this module does not import torch."""
    import torch

    class LabelLogProb(torch.autograd.Function):
        """logits = hidden @ weight.T, held once: the forward reads it in cache-sized row tiles for the
        log-sum-exp and the entropy, and the backward turns that same buffer, in place, into the gradient
        of log p(target) with respect to the logits (one-hot minus softmax, times the incoming gradient).
        F.cross_entropy + a separate entropy allocate five (labels, vocab) tensors per step instead of one;
        on this CPU each fresh one costs page faults and a pass over memory."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any) -> tuple[Any, Any, Any]:
            logits = hidden @ weight.t()  # (n, vocab)
            lse, entropy = logits.new_empty(len(logits)), logits.new_empty(len(logits))
            for start in range(0, len(logits), HEAD_ROWS):
                tile = logits[start:start + HEAD_ROWS]
                peak = tile.amax(-1, keepdim=True)
                exp = (tile - peak).exp_()
                total = exp.sum(-1)
                lse[start:start + HEAD_ROWS] = tile_lse = peak.squeeze(-1) + total.log()
                entropy[start:start + HEAD_ROWS] = tile_lse - torch.linalg.vecdot(exp, tile) / total  # lse - E[logit]
            is_top1 = logits.argmax(-1) == targets  # the first maximum, as TRL counts a tie
            log_probs = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.logits = logits  # consumed by backward
            ctx.mark_non_differentiable(entropy, is_top1)
            return log_probs, entropy, is_top1

        @staticmethod
        def backward(ctx: Any, grad: Any, _entropy: Any, _top1: Any) -> tuple[Any, Any, None]:
            hidden, weight, targets, lse = ctx.saved_tensors
            logits, ctx.logits = ctx.logits, None
            if logits is None:
                raise RuntimeError("the CPU LM head's backward reuses its logits buffer and can run only once")
            for start in range(0, len(logits), HEAD_ROWS):  # d log p_t / d logit_j = 1[j = t] - p_j
                rows = slice(start, start + HEAD_ROWS)
                logits[rows].sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])
            logits[torch.arange(len(logits)), targets] += grad
            grad_hidden = logits @ weight if ctx.needs_input_grad[0] else None
            grad_weight = logits.t() @ hidden if ctx.needs_input_grad[1] else None
            return grad_hidden, grad_weight, None

    return LabelLogProb


def _plain_label_head(hidden: Any, head: Any, targets: Any) -> tuple[Any, Any, Any]:
    """log p(target), entropy and "target is the argmax" at each labelled position: (n,) each.

    entropy and is_top1 are for logging only, as in TRL (no gradient flows through them).
    """
    return _label_log_prob_function().apply(hidden.float(), head.weight.float(), targets)


def plain_head_on_cpu(model: Any) -> bool:
    """On CPU, compute TRL's fused-LM-head outputs with one matmul and an in-place softmax; True if installed.

    TRL computes the loss with a chunked LM head that never holds the (positions, vocab) logits: right for
    GPU memory, but on CPU its torch fallback makes ~10 elementwise passes over every logit tile forward and
    backward. Measured here, 2 threads, forward + backward: on 900 label positions (a batch of 8 Alpaca rows)
    2.45 s TRL's head vs 0.94 s matmul + F.cross_entropy; on 1,500 positions 2.05 s for matmul +
    cross-entropy + a separate entropy vs 1.29 s for LabelLogProb (_label_log_prob_function). This path keeps
    TRL's contract (same loss, log_probs, entropy, is_top1 and label_mask; tests/test_train.py compares them,
    gradients included) for batches of up to PLAIN_HEAD_MAX_LABELS labels (~0.8 GB of logits for SmolLM2);
    larger batches, scaled, soft-capped or biased heads and pre-shifted labels go to TRL's own path.
    """
    import types

    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # a TRL without the fused head: its compute_loss does not call fused_lm_head=True either
        return False

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.get_text_config()
    if any(getattr(text_config, key, None) is not None for key in _SCALED_HEAD_KEYS):
        return False
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:  # a wrapped (e.g. LoRA) or biased head
        return False
    fused = base.forward  # TRL's patched forward: the fallback

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or labels is None or shift_labels is not None or \
                int((labels[:, 1:] != -100).sum()) > PLAIN_HEAD_MAX_LABELS:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # (batch, seq - 1, hidden)
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs, entropy, is_top1 = _plain_label_head(hidden[mask], self.get_output_embeddings(), targets[mask])

        def full(x: Any) -> Any:  # back to (batch, seq - 1), zero where there is no label
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=full(log_probs),
                                   entropy=full(entropy), is_top1=full(is_top1), label_mask=mask)

    base.forward = types.MethodType(forward, base)
    return True


def build_trainer(model: Any, tokenizer: Any, train_ds: Any, eval_ds: Any, cfg: TrainConfig, env: TrainEnv,
                  output_dir: Path, *, callbacks: list[Any] | None = None) -> Any:
    """The one place an SFTTrainer is made: typed config in, trainer out (composition, no subclass)."""
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    score_only_label_positions()
    has_eval = eval_ds is not None and len(eval_ds) > 0
    # The best checkpoint can only be reloaded if every save step is also an eval step.
    load_best = has_eval and cfg.save_steps % cfg.eval_steps == 0
    args = SFTConfig(
        output_dir=str(output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a share of the total steps in transformers 5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the latest (resume point) + the best (kept in addition when load_best)
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False,
        load_best_model_at_end=load_best,
        report_to=cfg.report_to,
        # Environment, not hyperparameters. TRL defaults bf16 and gradient checkpointing on; both are decided here.
        use_cpu=env.device == "cpu",
        bf16=env.precision == "bf16",
        fp16=env.precision == "fp16",
        activation_checkpointing=env.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        dataloader_pin_memory=env.device == "cuda",
        ddp_find_unused_parameters=False,  # every trainable tensor gets a gradient; the search costs a pass
        # Rows arrive tokenised and masked by pipelines.chat; TRL must not re-render, re-mask or touch EOS.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # already truncated at encoding (format.max_length)
        packing=False,
        padding_free=False,  # without FlashAttention not proven exact here; length grouping is exact
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,  # the collator needs the eval tag
        label_names=["labels"],
        disable_tqdm=False,
    )
    callbacks = list(callbacks or [])
    if has_eval and cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=CountingCollator(pad_id),
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
        callbacks=callbacks,
    )
    default_sampler = trainer._get_train_sampler  # looked up when the train dataloader is built
    trainer._get_train_sampler = lambda dataset=None: _epoch_seeded(default_sampler(dataset), cfg.seed)
    if env.device == "cpu":
        plain_head_on_cpu(trainer.model)
    if env.precision == "fp32":
        # TRL casts a quantised model's adapter weights to bf16 (the QLoRA paper's GPU recipe); in fp32 (CPU)
        # they stay fp32. The optimizer is created in train(), after this.
        import torch

        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    return trainer


# ---------------------------------------------------------------------------------------- checkpoints/resume
def _callbacks(fingerprint: dict[str, Any], on_log: OnLog | None) -> list[Any]:
    from transformers import TrainerCallback

    class Fingerprint(TrainerCallback):
        """Marks a checkpoint complete (written last) and records which run it belongs to."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / FINGERPRINT, fingerprint)

    class ForwardLogs(TrainerCallback):
        """Hands each trainer log (loss, lr, grad norm, eval loss) to the caller, e.g. the Dagster log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None and state.is_world_process_zero and logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    return [Fingerprint(), ForwardLogs(), step_timer()]


def step_timer() -> Any:
    """A trainer callback summing the seconds spent in optimizer steps (forward, backward, update), without
    evaluation and checkpoint saves: `.seconds` over `.steps` (bench/bench_train.py times both arms with it)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds, self.steps, self._start = 0.0, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._start
            self.steps += 1

    return StepTimer()


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

    fingerprint = run_fingerprint(params)
    run_dir = params.path("checkpoints") / fingerprint["run_hash"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = resume_point(run_dir, fingerprint, remove_corrupt=is_main)  # corrupt ones: named, deleted, passed over
    if is_main:
        drop_incomplete(run_dir)

    model = load_model(base_dir, cfg, env, trust_remote_code=params.model.trust_remote_code)
    trainer = build_trainer(model, tokenizer, to_dataset(train_split, is_eval=False),
                            to_dataset(val_split, is_eval=True), cfg, env, run_dir,
                            callbacks=_callbacks(fingerprint, on_log))
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
    }
    card = {
        "method": cfg.method,
        "base_model": source_info(base_dir) or {"name": str(base_dir), "source": "folder"},  # no fetch-model record
        "base_model_sha256": fingerprint["parts"]["base_model"],
        "data": {"train": fingerprint["parts"]["train_split"], "validation": fingerprint["parts"]["validation_split"]},
        "run_hash": fingerprint["run_hash"],
        "params": cfg.model_dump(mode="json"),
        "env": {**asdict(env), "num_processes": world_size},
        "versions": library_versions(),
        "metrics": metrics,
    }
    out = params.path("adapter")
    with atomic_dir(out, "adapter") as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        for item in staging.iterdir():
            if item.suffix not in (".bin", ".pt", ".pth"):  # training_args.bin is a pickle: never shipped
                shutil.move(str(item), tmp / item.name)
        (tmp / "README.md").write_text(render_run_card(card), encoding="utf-8")
        write_json(tmp / "train_log.json", state.log_history)
        write_json(tmp / "train_metrics.json", metrics)
        plot_loss(curve, tmp / "loss_curve.png")
    shutil.rmtree(staging, ignore_errors=True)
    return StageResult(
        "train",
        {"adapter": out, "loss_curve": out / "loss_curve.png", "checkpoints": run_dir},
        {**metrics, "loss_curve": curve},
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _portable_params(params: Params) -> dict[str, Any]:
    """params as a dict whose paths are absolute, so the file can live anywhere (a temp folder)."""
    data = params.model_dump(mode="json")
    data["paths"] = {key: str(params.path(key)) for key in data["paths"]}
    return data


def launch_accelerate(params: Params, env: TrainEnv, on_log: OnLog | None) -> StageResult:
    """Run this same stage as `accelerate launch --num_processes N -m pipelines train` (DDP; no own layer)."""
    threads = max(1, env.num_threads // env.num_processes)
    child_env = replace(env, num_threads=threads, launcher="in_process")
    package_root = str(Path(__file__).resolve().parents[1])
    environ = {
        **os.environ, **child_env.environ(),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        ENV_PREFIX + "LOG_STDOUT": "1",
    }
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[env.precision]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with tempfile.TemporaryDirectory(prefix="train-params-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(_portable_params(params), sort_keys=False), encoding="utf-8")
        # accelerate's `--cpu` starts several processes only through MPI (mpirun); its torchrun launcher
        # (`--multi_gpu`) starts them on any machine, and the trainer's use_cpu then selects CPU + gloo.
        topology = ["--config_file", env.accelerate_config] if env.accelerate_config else ["--multi_gpu"]
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *topology, "--num_processes", str(env.num_processes),
            "--num_machines", "1", "--mixed_precision", mixed, "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            "-m", "pipelines", "train", "--params", str(params_file),
        ]
        log.info("launching: %s", " ".join(cmd))
        with subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                mark = line.find(LOG_MARK)  # progress bars end in "\r", not "\n", so the mark can be mid-line
                if mark >= 0:
                    if on_log is not None:
                        on_log(json.loads(line[mark + len(LOG_MARK):]))
                    line = line[:mark]
                tail.append(line.rstrip())
                log.info("[accelerate] %s", line.rstrip())
    if proc.returncode != 0:
        errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
        if errors:
            raise StageError(errors[-1])
        raise StageError(f"`accelerate launch` with {env.num_processes} processes failed (exit {proc.returncode}); "
                         f"its last output: {' | '.join(list(tail)[-5:])}")
    out = params.path("adapter")
    metrics = read_json(out / "train_metrics.json")
    curve = loss_curve(read_json(out / "train_log.json"))
    return StageResult("train", {"adapter": out, "loss_curve": out / "loss_curve.png"},
                       {**metrics, "loss_curve": curve})


def _stdout_log(logs: dict[str, Any]) -> None:
    print(LOG_MARK + json.dumps(logs, default=str), flush=True)


def run(params: Params, env: TrainEnv | None = None, on_log: OnLog | None = None) -> StageResult:
    """Train the adapter; `on_log` receives each trainer log dict (step, loss, learning_rate, eval_loss, ...)."""
    preflight(params, "train")  # bad target modules / max_length: one sentence before any model is loaded
    claim_output(params, "adapter")  # a folder the stage did not write, or cannot replace: before training
    env = env or TrainEnv.auto()
    if on_log is None and os.environ.get(ENV_PREFIX + "LOG_STDOUT") == "1":
        on_log = _stdout_log
    inside_launcher = "WORLD_SIZE" in os.environ
    # One training per checkpoint folder (pipelines.checkpoints): the ranks of a launch hold the lock shared.
    with training_lock(params.path("checkpoints"), shared=inside_launcher) as lock:
        if env.launcher == "accelerate" and env.num_processes > 1 and not inside_launcher:
            lock.share()  # the ranks take it too, and keep it should this launcher be killed
            return launch_accelerate(params, env, on_log)
        return train_in_process(params, env, on_log)
