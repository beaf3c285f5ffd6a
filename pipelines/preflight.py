"""Preflight: the checks of params.yaml that need the base model folder, run before any expensive work.

    python -m pipelines.preflight                          # every check, params.yaml in the current folder
    python -m pipelines.preflight --params p.yaml --stage train

load_params already rejects unknown keys, wrong types, bad ratios and paths that leave the project. What
it cannot see without the model is checked here, from config.json alone (weights are never read; the
module tree is built on the meta device, which allocates no memory):

    model.trust_remote_code   the model folder ships its own code (auto_map) but running it is not allowed
    format.max_length         above the model's context window (max_position_embeddings), virtual tokens included
    train.method              qlora needs 4-bit bitsandbytes kernels on this device; freeze.last_n_blocks <= blocks
    train.optim, report_to    a bitsandbytes optimizer this device cannot run; a tracker that is not installed;
    train.torch_compile       no C++ compiler for inductor's CPU kernels
    train.init_from           the parent folder exists and holds an adapter of train.method (pipelines.methods)
    train.<method>.target_modules  a name that is no module of the model, or a module the method cannot adapt

Each failure is a ConfigError with one sentence naming the key, the value, what is allowed and the fix.
A missing model folder is not a config error: the stage itself says which stage makes it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines import methods
from pipelines.config import ConfigError, Params

# Which checks each stage needs; None (no stage) runs all of them.
_STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "fetch-model": ("remote_code",),
    "format": ("remote_code", "max_length"),
    "train": ("remote_code", "max_length", "method", "options", "init_from", "target_modules"),
    "evaluate": ("remote_code",),
}
_ALL = ("remote_code", "max_length", "method", "options", "init_from", "target_modules")
# Config attributes that hold the context window, by model family (Llama/Qwen/Mistral, GPT-2, MPT, ChatGLM).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def preflight(params: Params, stage: str | None = None) -> None:
    """Raise ConfigError (one sentence) if params cannot work with the base model for `stage` (None: every stage)."""
    if stage is not None and stage not in _STAGE_CHECKS:
        return  # ingest, clean, split, promote do not depend on the model
    checks = _STAGE_CHECKS[stage] if stage else _ALL
    if "method" in checks:
        _check_method(params)
    if "options" in checks:
        _check_options(params)
    if "init_from" in checks:
        methods.check_parent(params)
    folder = params.path("base_model")
    if not (folder / "config.json").is_file():
        return
    config = _read_json(folder / "config.json")
    if "remote_code" in checks:
        _check_remote_code(params, folder, config)
    if "max_length" in checks:
        _check_max_length(params, folder, config, stage)
    if "method" in checks:
        _check_blocks(params, folder, config)
    if "target_modules" in checks:
        _check_target_modules(params, folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc}); re-run the fetch-model stage") from None
    return data if isinstance(data, dict) else {}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_options(params: Params) -> None:
    cfg = params.train
    missing = methods.tracker_missing(cfg.report_to)
    if missing:
        raise ConfigError(missing)
    device = _device()
    reason = methods.optimizer_unsupported(cfg.optim, device)
    if reason:
        raise ConfigError(f"train.optim = {cfg.optim!r} cannot run on {device} here ({reason}); use adamw_torch, "
                          "adafactor or sgd, or a machine where bitsandbytes supports it")
    reason = methods.compile_unsupported(device) if cfg.torch_compile else None
    if reason:
        raise ConfigError(f"train.torch_compile = true cannot work on {device} here: {reason}; install one "
                          "(apt-get install g++) or set train.torch_compile: false")


def _check_blocks(params: Params, folder: Path, config: dict[str, Any]) -> None:
    if params.train.method != "freeze":
        return
    blocks = _text_config(config).get("num_hidden_layers")
    wanted = params.train.section().last_n_blocks
    if isinstance(blocks, int) and wanted > blocks:
        raise ConfigError(f"train.freeze.last_n_blocks = {wanted} but the base model in '{folder}' has {blocks} "
                          f"blocks (num_hidden_layers); set it to at most {blocks}, or use train.method: full")


def _check_method(params: Params) -> None:
    if params.train.method != "qlora":
        return
    from pipelines.train_env import four_bit_unsupported

    device = _device()
    reason = four_bit_unsupported(device)
    if reason:
        raise ConfigError(f"train.method = 'qlora' needs 4-bit bitsandbytes kernels, which do not run on {device} "
                          f"here ({reason}); use train.method: lora (or dora)")


def _check_remote_code(params: Params, folder: Path, config: dict[str, Any]) -> None:
    if params.model.trust_remote_code:
        return
    tokenizer_config = folder / "tokenizer_config.json"
    for path, data in ((folder / "config.json", config),
                       (tokenizer_config, _read_json(tokenizer_config) if tokenizer_config.is_file() else {})):
        if data.get("auto_map"):
            raise ConfigError(
                f"model.trust_remote_code = false but the base model in '{folder}' needs its own Python code "
                f"('auto_map' in {path.name}); set model.trust_remote_code: true only if you trust that code, or "
                "use a model that transformers supports natively"
            )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's settings under text_config."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def context_window(config: dict[str, Any]) -> int | None:
    """The model's maximum sequence length in tokens from its config.json, or None if it does not say."""
    text = _text_config(config)
    for key in _CONTEXT_KEYS:
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_max_length(params: Params, folder: Path, config: dict[str, Any], stage: str | None) -> None:
    limit = context_window(config)
    if limit is not None and params.format.max_length > limit:
        raise ConfigError(
            f"format.max_length = {params.format.max_length} is above the base model's context window of {limit} "
            f"tokens ({folder.name}/config.json); set format.max_length to at most {limit}"
        )
    # prompt-learning methods put their virtual tokens (or key/value prefixes) in front of every row
    extra = methods.virtual_tokens(params.train) if stage in ("train", None) else 0
    if limit is not None and extra and params.format.max_length + extra > limit:
        raise ConfigError(
            f"train.{params.train.method}.num_virtual_tokens = {extra} plus format.max_length = "
            f"{params.format.max_length} is above the base model's context window of {limit} tokens "
            f"({folder.name}/config.json); lower one so that they sum to at most {limit}"
        )


@lru_cache(maxsize=4)
def _modules(folder: str, mtime_ns: int, trust_remote_code: bool) -> tuple[tuple[str, str, bool], ...]:
    """(qualified name, class name, LoRA can wrap it) of every module, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # The layer types peft's LoRA wraps (peft.tuners.lora.layer.dispatch_default); GPT-2 uses Conv1D.
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                 torch.nn.MultiheadAttention, Conv1D)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the base model config in '{folder}' cannot be read by transformers ({first}); re-run the "
                          "fetch-model stage or check model.name") from None
    return tuple((name, type(m).__name__, isinstance(m, adaptable)) for name, m in model.named_modules() if name)


def _check_target_modules(params: Params, folder: Path) -> None:
    found = methods.target_modules(params.train)
    if found is None:
        return
    key, targets = found
    if targets == "all-linear":
        return
    modules = _modules(str(folder), (folder / "config.json").stat().st_mtime_ns, params.model.trust_remote_code)
    layers = sorted({name.rsplit(".", 1)[-1] for name, _, ok in modules if ok})
    hint = f"its adaptable layers are {', '.join(layers)}; fix the name or use all-linear"
    if isinstance(targets, str):  # peft treats a single string other than all-linear as a regex on full names
        if not any(ok and re.fullmatch(targets, name) for name, _, ok in modules):
            raise ConfigError(f"{key} = {targets!r} (a regular expression) matches no adaptable "
                              f"layer of the base model in '{folder}'; {hint}")
        return
    for target in targets:
        # peft's rule: a target names a module whose qualified name equals it or ends with '.<target>'
        matched = [(cls, ok) for name, cls, ok in modules if name == target or name.endswith(f".{target}")]
        if not matched:
            raise ConfigError(f"{key} has {target!r}, which is no module of the base model in "
                              f"'{folder}'; {hint}")
        if not any(ok for _, ok in matched):
            kind = "IA3" if params.train.method == "ia3" else "LoRA"
            raise ConfigError(f"{key} has {target!r}, a {matched[0][0]} that {kind} cannot adapt (it "
                              f"wraps Linear, Embedding and Conv layers); {hint}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipelines.config import load_params
    from pipelines.errors import exit_code

    parser = argparse.ArgumentParser(prog="python -m pipelines.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stage", choices=sorted(_STAGE_CHECKS), help="only the checks this stage needs")
    args = parser.parse_args(argv)
    try:
        preflight(load_params(args.params), args.stage)
    except ConfigError as exc:
        return exit_code(exc)
    print("preflight: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
