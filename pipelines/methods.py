"""Fine-tuning methods: what each `train.method` trains, how peft builds it, and what can be done with the result.

    from pipelines import methods
    methods.peft_config(params.train, base_dir)     # the peft config of the method (None: full / freeze)
    methods.can_merge("prefix_tuning")              # None if merge_and_unload works, else the reason (one sentence)

The methods all come from peft, transformers and TRL; nothing here trains. The training stage (pipelines.train)
calls these to build the model, and records `trainable_summary` in the run card:

| method | peft type | what trains | saved as |
| --- | --- | --- | --- |
| lora, dora, qlora | LORA | low-rank A, B (+ DoRA's magnitude) in train.lora.target_modules | adapter |
| adalora | ADALORA | A, E, B triplets whose rank budget is pruned on a schedule | adapter (+ rank_pattern) |
| ia3 | IA3 | one scaling vector per target module | adapter |
| prompt_tuning, p_tuning | PROMPT_TUNING, P_TUNING | virtual-token embeddings (p_tuning: from an MLP/LSTM) | adapter |
| prefix_tuning | PREFIX_TUNING | key/value prefixes of every attention layer | adapter |
| full | - | every weight | whole model |
| freeze | - | the last N decoder blocks (+ the LM head) | whole model |

`train.init_from` continues an existing adapter (or, for full / freeze, a whole model): `parent_dir`, `check_parent`
and `parent_record` find it, refuse one of another method or shape, and give the content hash that goes into the
run hash and the run card.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.config import METHOD_SECTIONS, PROMPT_LEARNING, Params, TrainConfig
from pipelines.errors import ConfigError, StageError
from pipelines.io import read_json, sha256_file

log = logging.getLogger(__name__)

PEFT_TYPES = {  # method -> peft's PeftType value in adapter_config.json
    "lora": "LORA", "dora": "LORA", "qlora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
    "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING",
}
FULL_MODEL = ("full", "freeze")  # methods whose output folder is a whole model, not an adapter
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
BUILTIN_OPTIMIZERS = ("adamw_torch", "adafactor", "sgd")  # torch / transformers: run on every device


def saves_full_model(method: str) -> bool:
    """True if the method's output folder is a whole model (config.json + model.safetensors), not a peft adapter."""
    return method in FULL_MODEL


def is_prompt_learning(method: str) -> bool:
    """True for the methods that add virtual tokens (prompt_tuning, prefix_tuning, p_tuning)."""
    return method in PROMPT_LEARNING


def can_merge(method: str) -> str | None:
    """None if peft's `merge_and_unload` folds the method's adapter into the base weights, else why not (one sentence).

    LoRA, DoRA, AdaLoRA and IA3 change existing weight matrices, so they merge into a plain model. Prompt-learning
    adapters add virtual tokens in front of the input (or key/value prefixes in every layer): there is no weight
    to fold them into, and peft's PeftModel has no merge for them. full and freeze are whole models already."""
    if method in PROMPT_LEARNING:
        return (f"a {method} adapter cannot be merged into the base weights: it adds virtual tokens (or attention "
                "prefixes), not weight changes, so serve it with peft (PeftModel) or train a lora/ia3 adapter to merge")
    return None


# ------------------------------------------------------------------------------------------- peft configs
def peft_config(cfg: TrainConfig, base_dir: Path, *, total_steps: int | None = None) -> Any:
    """The peft config of `cfg.method` built from its train.<section> (None for full and freeze).

    `total_steps` is AdaLoRA's total_step, which peft requires up front; the training stage passes train.max_steps
    (or 1 + tinit + tfinal when it is not known yet) and the AdaLoRA callback replaces it by the trainer's real step
    count when training begins. `base_dir` is where prompt tuning's init_text is tokenised from."""
    method, section = cfg.method, cfg.section()
    if method in FULL_MODEL:
        return None
    import peft

    if method in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
            target_modules=section.target_modules, use_dora=method == "dora", task_type="CAUSAL_LM",
        )
    if method == "adalora":
        # orth_reg_weight = 0: peft adds AdaLoRA's orthogonality penalty to the model output's `loss`, but TRL's
        # SFTTrainer computes its loss from the fused head's per-token log-probs and never reads that field, so a
        # non-zero weight would be recorded in adapter_config.json without having been applied. The rank budget
        # (the method's point) is allocated by AdaLoraBudget below.
        return peft.AdaLoraConfig(
            init_r=section.init_r, target_r=section.target_r, tinit=section.tinit, tfinal=section.tfinal,
            deltaT=section.delta_t, beta1=section.beta1, beta2=section.beta2, orth_reg_weight=0.0,
            total_step=total_steps or (1 + section.tinit + section.tfinal), lora_alpha=section.alpha,
            lora_dropout=section.dropout, target_modules=section.target_modules, task_type="CAUSAL_LM",
        )
    if method == "ia3":
        return peft.IA3Config(target_modules=section.target_modules, feedforward_modules=section.feedforward_modules,
                              task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        text = section.init_text
        return peft.PromptTuningConfig(
            num_virtual_tokens=section.num_virtual_tokens, task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(base_dir) if text else None,
        )
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=section.num_virtual_tokens, prefix_projection=section.prefix_projection,
            encoder_hidden_size=section.encoder_hidden_size, task_type="CAUSAL_LM",
        )
    if method == "p_tuning":
        return peft.PromptEncoderConfig(
            num_virtual_tokens=section.num_virtual_tokens, encoder_reparameterization_type=section.encoder_type.upper(),
            encoder_hidden_size=section.encoder_hidden_size, encoder_num_layers=section.encoder_num_layers,
            task_type="CAUSAL_LM",
        )
    raise ValueError(f"unknown method {method!r}")  # config.py's Literal keeps this unreachable


def target_modules(cfg: TrainConfig) -> tuple[str, Any] | None:
    """(params key, value) of the module names the method adapts, for the preflight; None: none to check."""
    section = cfg.section()
    if cfg.method in ("lora", "dora", "qlora", "adalora"):
        return f"train.{'lora' if cfg.method != 'adalora' else 'adalora'}.target_modules", section.target_modules
    if cfg.method == "ia3" and section.target_modules is not None:
        return "train.ia3.target_modules", section.target_modules
    return None


def virtual_tokens(cfg: TrainConfig) -> int:
    """Positions a prompt-learning method adds in front of every row (0 for the other methods)."""
    return cfg.section().num_virtual_tokens if cfg.method in PROMPT_LEARNING else 0


# ------------------------------------------------------------------------------------------------- freeze
def decoder_blocks(model: Any) -> tuple[str, int]:
    """(qualified name, count) of the model's list of decoder blocks: the ModuleList of config.num_hidden_layers
    modules (model.layers in Llama, Qwen, Mistral; transformer.h in GPT-2). StageError if there is none."""
    import torch

    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, count
    raise StageError(f"train.method = 'freeze' found no list of {count} decoder blocks in {type(model).__name__}; "
                     "use method full or lora for this model")


def freeze_all_but_last_blocks(model: Any, last_n_blocks: int, train_lm_head: bool) -> list[str]:
    """Make only the last `last_n_blocks` decoder blocks (and the LM head if asked) trainable; return the names of
    the trainable parameters. With tied embeddings the head's weight is the input embedding's (one tensor)."""
    blocks, count = decoder_blocks(model)
    if last_n_blocks > count:
        raise StageError(f"train.freeze.last_n_blocks = {last_n_blocks} but the model has {count} blocks; set it to "
                         f"at most {count} (or use method full)")
    prefixes = tuple(f"{blocks}.{i}." for i in range(count - last_n_blocks, count))
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(True)
    if train_lm_head:
        model.get_output_embeddings().weight.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def tied_head_trained(model: Any) -> bool:
    """True if the LM head is trainable and is the same tensor as the input embeddings (tied), so training the
    head changes the embeddings as well."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    return (head is not None and embeddings is not None and head.weight is embeddings.weight
            and head.weight.requires_grad)


def trainable_summary(model: Any) -> list[dict[str, Any]]:
    """The trainable tensors, grouped by name with the decoder block index replaced by `{i}`:
    [{"tensors": "model.layers.{i}.mlp.down_proj.weight", "blocks": "28-29", "count": 2, "parameters": 1769472}].
    Tied tensors (an LM head sharing the embedding matrix) are listed once, by their first name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        blocks = re.escape(decoder_blocks(base)[0])
    except StageError:
        blocks = r"(?!)"  # no block list found: no grouping
    index = re.compile(rf"(?:^|\.){blocks}\.(\d+)\.")
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        match = index.search(name)
        key = name[:match.start(1)] + "{i}" + name[match.end(1):] if match else name
        group = groups.setdefault(key, {"tensors": key, "indices": [], "count": 0, "parameters": 0})
        if match:
            group["indices"].append(int(match.group(1)))
        group["count"] += 1
        group["parameters"] += param.numel()
    out = []
    for group in groups.values():
        indices = sorted(set(group.pop("indices")))
        group["blocks"] = _ranges(indices) if indices else "-"
        out.append(group)
    return out


def effective_params(cfg: TrainConfig) -> dict[str, Any]:
    """train: as it acted: the chosen method's section with its defaults filled in, the other sections left out."""
    params = cfg.model_dump(mode="json", exclude={s for s in METHOD_SECTIONS.values() if s})
    section = METHOD_SECTIONS[cfg.method]
    if section:
        params[section] = cfg.section().model_dump(mode="json")
    return params


def _ranges(numbers: list[int]) -> str:
    """Sorted distinct numbers as ranges: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


# ------------------------------------------------------------------------------------------------- AdaLoRA
def adalora_budget() -> Any:
    """A TrainerCallback that runs AdaLoRA's rank allocation: neither transformers' Trainer nor TRL calls peft's
    `update_and_allocate`, which must run after each backward pass, before the gradients are zeroed (peft's
    docstring), so it runs in on_optimizer_step (after optimizer.step(), before model.zero_grad(), with the 0-based
    index of the step, as peft's examples count). When training begins it sets AdaLoRA's total_step to the
    trainer's real step count (train.max_steps, or what the epochs give)."""
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        @staticmethod
        def _tuner(model: Any) -> Any:
            return model.base_model  # PeftModel -> AdaLoraModel

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            tuner = self._tuner(model)
            config = tuner.peft_config[tuner.trainable_adapter_name]
            if config.tinit >= state.max_steps - config.tfinal:
                raise StageError(f"train.adalora.tinit + tfinal = {config.tinit} + {config.tfinal} leaves none of the "
                                 f"{state.max_steps} training steps to prune the rank budget in; lower tinit or "
                                 "tfinal, or train longer")
            tuner.rankallocator.set_total_step(state.max_steps)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self._tuner(model).update_and_allocate(state.global_step)

    return AdaLoraBudget()


def resume_refused(method: str) -> str | None:
    """None if a run of `method` resumes exactly from its checkpoints, else why it restarts from step 0.

    AdaLoRA: peft's rank allocator keeps its importance averages in memory only, and a checkpoint saves the adapter
    already cut to its current rank pattern, which the Trainer's load_adapter would then resize the live modules to
    (optimizer state included): a resumed run would not be the same run."""
    if method == "adalora":
        return ("an AdaLoRA run restarts from step 0: its rank allocator's importance averages are not in the "
                "checkpoints, and peft reloads a checkpoint at its pruned ranks")
    return None


# --------------------------------------------------------------------------------------- options' support
@lru_cache(maxsize=16)
def optimizer_unsupported(optim: str, device: str) -> str | None:
    """None if transformers can build and step optimizer `optim` on `device`, else the reason (one clause).

    The bitsandbytes optimizers (8-bit, paged, Lion) need bitsandbytes' kernels for the device; this builds the
    optimizer exactly as the Trainer does (Trainer.get_optimizer_cls_and_kwargs) and takes one step on a
    4096 x 2 tensor (bitsandbytes quantises tensors of 4096 elements or more)."""
    if optim in BUILTIN_OPTIMIZERS:
        return None
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, optim=optim, use_cpu=device == "cpu", report_to="none")
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        param = torch.nn.Parameter(torch.randn(4096, 2, device=device))
        optimizer = cls([param], **kwargs)
        param.grad = torch.randn_like(param)
        optimizer.step()
    except Exception as exc:  # ImportError, a missing native backend, an unsupported device
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}".strip().rstrip(":")
    return None


def compile_unsupported(device: str) -> str | None:
    """None if torch.compile can build kernels for `device`, else why not. On CPU, inductor compiles C++ with the
    system compiler (g++, c++ or clang++ on PATH); a machine without one fails at the first training step."""
    import shutil

    if device == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler (g++, c++ or clang++) on PATH for CPU kernels, and none is there"
    return None


def tracker_missing(report_to: str) -> str | None:
    """None if the experiment tracker's package is importable (or no tracker is asked for), else the sentence."""
    modules = TRACKER_MODULES.get(report_to)
    if not modules or any(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return (f"train.report_to = {report_to!r} needs the Python package {modules[0]}, which is not installed; "
            f"install it (.venv/bin/pip install {modules[0]}) or set train.report_to: none")


def tracker_environment(report_to: str, run_dir: Path, environ: dict[str, str]) -> dict[str, str]:
    """Variables to set for the tracker unless the user set them: wandb runs offline and writes under the run's
    checkpoint folder. Its API key is read by wandb from WANDB_API_KEY only; params.yaml has no place for it."""
    if report_to != "wandb":
        return {}
    wanted = {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir)}
    return {k: v for k, v in wanted.items() if k not in environ}


# ------------------------------------------------------------------------------------------------ init_from
def parent_dir(params: Params) -> Path | None:
    """The folder train.init_from names ('promoted' is paths.promoted; a relative path is relative to the params
    file's folder), or None."""
    value = params.train.init_from
    if value is None:
        return None
    if value == "promoted":
        return params.path("promoted")
    path = Path(value)
    return path if path.is_absolute() else params.root / path


WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
                "model.safetensors.index.json")


def weights_sha256(folder: Path) -> str:
    """Content hash of what a model folder's weights are: its adapter or model config and safetensors files (names +
    contents, sorted), not its run card, logs or PROMOTED.json, so a promoted copy hashes as its original."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name in WEIGHT_FILES or (
        p.name.startswith("model-") and p.suffix == ".safetensors")))
    for path in files:
        h.update(path.name.encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def _parent_kind(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "model"
    return "none"


def check_parent(params: Params) -> Path | None:
    """The parent folder of train.init_from after checking it can be continued with train.method (ConfigError, one
    sentence, if not): an adapter of the same peft type and shape, or a whole model for full / freeze."""
    folder = parent_dir(params)
    if folder is None:
        return None
    cfg = params.train
    where = f"train.init_from = {cfg.init_from!r}"
    if not folder.is_dir():
        made_by = " (the promote stage writes it)" if cfg.init_from == "promoted" else ""
        raise ConfigError(f"{where}: the folder '{folder}' does not exist{made_by}; train an adapter first or set "
                          "train.init_from: null")
    kind = _parent_kind(folder)
    if cfg.method in FULL_MODEL:
        if kind != "model":
            raise ConfigError(f"{where}: train.method = {cfg.method!r} continues a whole model (config.json + "
                              f"safetensors) but '{folder}' holds {'a peft adapter' if kind == 'adapter' else 'none'}; "
                              "point init_from at a full or freeze run's output, or use the adapter's method")
        return folder
    if kind != "adapter":
        raise ConfigError(f"{where}: '{folder}' has no adapter_config.json (a peft adapter) to continue with "
                          f"train.method = {cfg.method!r}; point init_from at an adapter folder")
    config = read_json(folder / "adapter_config.json")
    parent_type, use_dora = config.get("peft_type"), bool(config.get("use_dora"))
    parent_method = next((m for m, t in PEFT_TYPES.items() if t == parent_type and (m == "dora") == use_dora), None)
    same = parent_type == PEFT_TYPES[cfg.method] and (cfg.method == "dora") == use_dora
    if not same:
        raise ConfigError(f"{where}: '{folder}' is a {parent_method or parent_type} adapter but train.method = "
                          f"{cfg.method!r}; an adapter continues with its own method, so set train.method: "
                          f"{parent_method or 'to match'}")
    section = cfg.section()
    shape = {"lora": (("r", "r"), ("alpha", "lora_alpha")), "dora": (("r", "r"), ("alpha", "lora_alpha")),
             "qlora": (("r", "r"), ("alpha", "lora_alpha"))}.get(cfg.method, (("num_virtual_tokens",) * 2,)
                                                                if cfg.method in PROMPT_LEARNING else ())
    for ours, theirs in shape:
        if getattr(section, ours) != config.get(theirs):
            key = f"train.{'lora' if cfg.method in ('lora', 'dora', 'qlora') else cfg.method}.{ours}"
            raise ConfigError(f"{where}: {key} = {getattr(section, ours)} but the adapter in '{folder}' has "
                              f"{theirs} = {config.get(theirs)}; an adapter continues with its own shape, so set "
                              f"{key}: {config.get(theirs)}")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{where}: '{folder}' has no adapter_model.safetensors; only safetensors are loaded (a .bin "
                          "file is a pickle that can run code): re-save the adapter with safe_serialization=True")
    return folder


def parent_record(folder: Path) -> dict[str, Any]:
    """What the run card and the stage metrics say about the parent: its folder, weights hash, and, when it was
    trained by this pipeline, its run hash, method and base model hash (from its train_metrics.json)."""
    metrics: dict[str, Any] = {}
    try:
        metrics = read_json(folder / "train_metrics.json")
    except (OSError, ValueError):
        pass
    return {"path": str(folder), "weights_sha256": weights_sha256(folder), "run_hash": metrics.get("run_hash"),
            "method": metrics.get("method"), "base_model_sha256": metrics.get("base_model_sha256")}


def safetensors_adapter(folder: Path, fix: str) -> Path:
    """`folder` when its adapter weights are adapter_model.safetensors; StageError naming the folder and `fix` (what
    to re-run) otherwise. Every peft load goes through this: without that file peft falls back to
    adapter_model.bin, a pickle that can run code when loaded."""
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise StageError(f"adapter folder '{folder}' has no adapter_model.safetensors; only safetensors weights are "
                         f"loaded (a .bin file is a pickle that can run code): {fix}")
    return Path(folder)


def load_parent_adapter(model: Any, folder: Path) -> Any:
    """The base `model` wrapped with the parent adapter, its weights trainable (peft PeftModel.from_pretrained).

    Only adapter_model.safetensors is loaded: without it peft would fall back to adapter_model.bin, a pickle."""
    from peft import PeftModel

    safetensors_adapter(folder, "train.init_from names it; re-save the adapter with safe_serialization=True")
    return PeftModel.from_pretrained(model, folder, is_trainable=True)
