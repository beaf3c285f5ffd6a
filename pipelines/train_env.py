"""The training environment: where and how training runs, declared once.

    PIPELINES_TRAIN_DEVICE=cpu PIPELINES_TRAIN_THREADS=2 python -m pipelines train

None of it changes what is learned (that is params.yaml `train:`). Each setting is one `EnvField` in `FIELDS`;
from that list come the resolved `TrainEnv` (what training receives), the `PIPELINES_TRAIN_*` variables that the
command line reads (`TrainEnv.auto`) and that a launched child process receives (`TrainEnv.environ`), the Dagster
trainer resource's fields (resources/trainer.py), and the README's table (`markdown_table`, checked by a test).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.errors import StageError

ENV_PREFIX = "PIPELINES_TRAIN_"


@dataclass(frozen=True)
class EnvField:
    """One setting of the training environment."""

    name: str  # the TrainEnv / trainer resource field
    var: str  # the variable: ENV_PREFIX + var
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # allowed values of a text setting (empty: any)

    @property
    def kind(self) -> type:
        return type(self.default) if self.default is not None else str

    def parse(self, text: str) -> Any:
        """The value of the variable's text: '1'/'true'/'yes' for booleans, an int, or the text ('' is None)."""
        if self.kind is bool:
            return text.strip().lower() in ("1", "true", "yes")
        if self.kind is int:
            try:
                return int(text)
            except ValueError:
                raise StageError(f"{ENV_PREFIX}{self.var} = {text!r} is not a whole number; {self.help}") from None
        return text or None if self.default is None else text

    def text(self, value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else "" if value is None else str(value)


FIELDS: tuple[EnvField, ...] = (
    EnvField("device", "DEVICE", "auto", "auto: CUDA if a GPU is visible, else CPU", ("auto", "cpu", "cuda")),
    EnvField("precision", "PRECISION", "auto", "auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on "
             "CPU (bf16/fp16 on CPU are refused: slow and lossy there)", ("auto", "bf16", "fp16", "fp32")),
    EnvField("num_threads", "THREADS", 0, "torch threads per process; 0: every core this process may use"),
    EnvField("load_in_4bit", "LOAD_IN_4BIT", False, "NF4 + double quantisation of the frozen base (bitsandbytes) "
             "for any PEFT method; train.method qlora always does it"),
    EnvField("launcher", "LAUNCHER", "in_process", "in_process: train in this process; accelerate: start "
             "`accelerate launch` with num_processes processes", ("in_process", "accelerate")),
    EnvField("num_processes", "PROCESSES", 1, "data-parallel processes (one per GPU) when launcher is accelerate"),
    EnvField("gradient_checkpointing", "GRADIENT_CHECKPOINTING", False, "recompute activations in the backward "
             "pass: less memory, ~20% more compute"),
    EnvField("accelerate_config", "ACCELERATE_CONFIG", None, "an `accelerate config` YAML (FSDP, DeepSpeed, several "
             "machines); none: plain DDP"),
)
BY_NAME: dict[str, EnvField] = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class TrainEnv:
    """The resolved environment: 'auto' filled in from the machine (see FIELDS for what each setting means)."""

    device: str  # cpu | cuda
    precision: str  # bf16 | fp16 | fp32
    num_threads: int  # >= 1
    load_in_4bit: bool
    launcher: str
    num_processes: int
    gradient_checkpointing: bool
    accelerate_config: str | None

    @classmethod
    def resolve(cls, **settings: Any) -> TrainEnv:
        """Fill in 'auto' values from the machine and refuse combinations that cannot work (StageError).

        `settings` are FIELDS names; a missing one takes its default."""
        import torch

        unknown = set(settings) - set(BY_NAME)
        if unknown:
            raise TypeError(f"unknown training environment settings: {', '.join(sorted(unknown))}")
        values = {f.name: settings.get(f.name, f.default) for f in FIELDS}
        for f in FIELDS:
            if f.choices and values[f.name] not in f.choices:
                raise StageError(f"trainer {f.name} = {values[f.name]!r} is not allowed; use one of "
                                 f"{', '.join(f.choices)}")
        cuda = torch.cuda.is_available()
        if values["device"] == "auto":
            values["device"] = "cuda" if cuda else "cpu"
        if values["device"] == "cuda" and not cuda:
            raise StageError("trainer device = 'cuda' but no CUDA GPU is visible; use device 'auto' or 'cpu'")
        if values["precision"] == "auto":
            values["precision"] = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") \
                if values["device"] == "cuda" else "fp32"
        if values["device"] == "cpu" and values["precision"] != "fp32":
            raise StageError(f"trainer precision = {values['precision']!r} on CPU is not allowed; CPU training runs "
                             "in fp32")
        if values["num_threads"] <= 0:
            values["num_threads"] = usable_cpus()
        if values["num_processes"] < 1:
            raise StageError(f"trainer num_processes = {values['num_processes']} must be at least 1")
        config = values["accelerate_config"]
        if config and not Path(config).is_file():
            raise StageError(f"trainer accelerate_config = '{config}' is not a file; write one with "
                             "`accelerate config --config_file FILE` or leave it empty for plain DDP")
        values["accelerate_config"] = config or None
        return cls(**values)

    @classmethod
    def auto(cls, environ: Mapping[str, str] | None = None) -> TrainEnv:
        """The machine's defaults, overridden by the PIPELINES_TRAIN_* variables that are set."""
        environ = os.environ if environ is None else environ
        return cls.resolve(**{f.name: f.parse(environ[ENV_PREFIX + f.var])
                              for f in FIELDS if ENV_PREFIX + f.var in environ})

    def environ(self) -> dict[str, str]:
        """This environment as PIPELINES_TRAIN_* variables (how a launched child process receives it)."""
        return {ENV_PREFIX + f.var: f.text(getattr(self, f.name)) for f in FIELDS}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def four_bit_unsupported(device: str) -> str | None:
    """None if bitsandbytes can quantise to NF4 on `device`, else the reason it cannot."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4", compress_statistics=True)
    except Exception as exc:  # ImportError, a missing native backend, or an unsupported device
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def markdown_table() -> str:
    """The README's table of the settings: resource field, variable, default, meaning."""
    rows = ["| resource field | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in FIELDS:
        default = "none" if f.default is None else f.text(f.default)
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.var}` | `{default}` | {f.help} |")
    return "\n".join(rows)


def trainer_arguments(cfg: Any, env: TrainEnv, output_dir: Path, *, has_eval: bool, load_best: bool) -> dict[str, Any]:
    """The transformers TrainingArguments that the SFT and the preference trainer share, from a train: or align:
    section (`cfg`: pipelines.config.TrainConfig or AlignConfig, the same field names) and this environment:
    schedule, evaluation and checkpoints (the latest, the resume point, plus the best when `load_best`), and the
    device and precision, which TRL would otherwise default (bf16, gradient checkpointing). Each stage adds its own
    (train: optimizer, NEFTune, batching; align: beta, max_length, the loss)."""
    return dict(
        output_dir=str(output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,  # accelerate's seedable sampler: each epoch's order is seed + epoch, so resumes replay it
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
        use_cpu=env.device == "cpu",
        bf16=env.precision == "bf16",
        fp16=env.precision == "fp16",
        activation_checkpointing=env.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        dataloader_pin_memory=env.device == "cuda",
        disable_tqdm=False,
    )
