"""The run card (README.md model card) written next to a trained adapter.

It records what is needed to reproduce or audit the run: base model and its hash, data hashes, the train
params, library versions, device, seed and the final losses. The YAML front matter follows the Hugging Face
model-card convention (base_model, library_name, tags) so the folder reads correctly on the hub.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from typing import Any

import yaml

from pipelines.methods import saves_full_model

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (and Python), for run cards and asset metadata."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def render_run_card(card: dict[str, Any]) -> str:
    """Markdown model card from the run's facts (keys: base_model, method, data, params, env, metrics, ...)."""
    base = card["base_model"]
    front = {
        "base_model": base.get("name"),
        "library_name": "transformers" if saves_full_model(card["method"]) else "peft",
        "pipeline_tag": "text-generation",
        "tags": ["trl", "sft", card["method"]],
    }
    metrics = card["metrics"]
    headline = [
        ("final train loss", metrics.get("final_train_loss")),
        ("best validation loss", metrics.get("best_eval_loss")),
        ("final validation loss", metrics.get("final_eval_loss")),
        ("optimizer steps", metrics.get("steps")),
        ("early stopped", metrics.get("early_stopped")),
        ("train tokens seen (non-pad)", metrics.get("tokens_seen")),
        ("padding efficiency", metrics.get("padding_efficiency")),
        ("trainable / total parameters", f"{metrics.get('trainable_params')} / {metrics.get('total_params')}"),
    ]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Fine-tuned {card['method']} of {base.get('name')}",
        "",
        "Trained by the fine-tuning factory (`python -m pipelines train`) with TRL `SFTTrainer`; the loss is",
        "computed on the assistant turns only (end-of-turn token included).",
        "",
        "## Results",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {name} | {_fmt(value)} |" for name, value in headline if value is not None),
        "",
        "Timings and memory of the run are not written here (the same training must give the same bytes): they",
        "are in the run record `.run.json` beside this file and in the Dagster metadata of `lora_adapter`.",
        "",
        *_trained_section(card),
        "## Reproduce",
        "",
        f"- base model: `{json.dumps(base, sort_keys=True)}`",
        f"- base model sha256: `{card['base_model_sha256']}`",
        *(f"- {split} split sha256: `{digest}`" for split, digest in card["data"].items()),
        *_parent_lines(card.get("parent")),
        f"- run hash (data + base model + parent + train params): `{card['run_hash']}`",
        f"- seed: {card['params'].get('seed')}",
        f"- device: {card['env'].get('device')}, precision {card['env'].get('precision')}, "
        f"{card['env'].get('num_processes')} process(es), {card['env'].get('num_threads')} thread(s)",
        "",
        "### Train params (params.yaml `train:`)",
        "",
        "```yaml",
        yaml.safe_dump(card["params"], sort_keys=False).strip(),
        "```",
        "",
        "### Library versions",
        "",
        *(f"- {name} {version}" for name, version in card["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def _trained_section(card: dict[str, Any]) -> list[str]:
    """What was trainable (metrics.trainable_tensors from pipelines.methods.trainable_summary), and merging."""
    groups = card["metrics"].get("trainable_tensors") or []
    if not groups:
        return []
    lines = ["## What was trained", "", "| trainable tensors | blocks | tensors | parameters |",
             "| --- | --- | --- | --- |"]
    lines += [f"| `{g['tensors']}` | {g['blocks']} | {g['count']} | {g['parameters']} |" for g in groups]
    lines.append("")
    if card.get("tied_head_trained"):
        lines += ["The LM head shares its matrix with the input embeddings (tied weights), so training the head "
                  "changed the embeddings too.", ""]
    if "merge" in card:
        merge = card["merge"]
        lines += [f"Merging: {merge}" if merge else (
            "Merging: not needed, the folder holds the whole model." if saves_full_model(card["method"])
            else "Merging: peft's `merge_and_unload()` folds this adapter into the base weights."), ""]
    return lines


def _parent_lines(parent: dict[str, Any] | None) -> list[str]:
    """The parent adapter a continued run started from (train.init_from)."""
    if not parent:
        return ["- started from: the base model (no train.init_from)"]
    lines = [f"- started from (train.init_from): `{parent['path']}`, weights sha256 `{parent['weights_sha256']}`"]
    if parent.get("run_hash"):
        lines.append(f"- parent run hash: `{parent['run_hash']}` (method {parent.get('method')})")
    return lines
