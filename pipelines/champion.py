"""The champion: the adapter promoted before, measured beside the candidate on the same test rows.

    from pipelines import champion
    found, section = champion.locate(params, candidate_dir, candidate="sft")   # None + the reason when not compared
    champion.attach(models, host, found, section, base_dir=..., ...)           # load it beside the candidate
    section.update(champion.compare(references, champion_scores, candidate_scores, cfg))

Promotion compares the candidate not only with the base but with the champion, the adapter in paths.promoted as it
is when the candidate is evaluated: a candidate more than evaluate.champion_margin worse on evaluate.primary_metric
is not promoted (pipelines.metrics.champion_gate, applied by pipelines.promote). Both models answer the same test
rows in the same run (greedy generation and the completion loss of pipelines.evaluate), so the comparison is paired:
the interval of candidate - champion is a paired bootstrap over those rows (pipelines.metrics.summarise).

Which stage measures it: the one that evaluates the final candidate. `evaluate` when align.method is none (the SFT
adapter is final); otherwise `evaluate-alignment`, for the aligned adapter, or for the SFT adapter when the align
stage trained nothing (no preference pairs). The champion costs one generation pass and one loss pass over the test
rows (no probe set: forgetting is judged against the base, not the champion).

The champion is read, not a DVC dependency: paths.promoted is written by `promote`, which runs after both evaluation
stages, so declaring it a dep would be a cycle. A new champion therefore does not by itself rerun an evaluation; the
next candidate is compared with whatever champion is promoted when it is evaluated, and promote refuses a comparison
made with another champion than the one in place (re-run the evaluation then).

Not compared, with the reason in the `champion` section (and the rule then passes): no champion yet (first
promotion); the champion is this very adapter (same weights hash, pipelines.methods.weights_sha256); it was trained
on another base model (base hashes of the two train_metrics.json differ); its folder holds no weights, or they do
not load beside the candidate.

Loading: a LoRA or IA3 champion beside a candidate adapter of the same peft type becomes a second adapter named
"champion" on the candidate's PeftModel (peft `load_adapter`, switched with `set_adapter`), so the base is loaded
once; anything else (whole models of train.method full / freeze, other or prompt-learning adapter types) is loaded
as a separate model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import EvaluateConfig, Params
from pipelines.io import StageError, read_json
from pipelines.methods import safetensors_adapter, weights_sha256
from pipelines.metrics import ModelScores, champion_gate, summarise

log = logging.getLogger(__name__)

ADAPTER_NAME = "champion"  # the champion's adapter name on the candidate's PeftModel
SHARED_TYPES = ("LORA", "IA3")  # peft types whose adapters share one PeftModel (load_adapter + set_adapter)
PROMOTED_MANIFEST = "PROMOTED.json"  # written by pipelines.promote (imported there from here: no import cycle)
# What a champion that does not load raises: a missing or malformed file (OSError, ValueError, KeyError), shapes that
# do not fit the base (RuntimeError), our own refusal of pickled weights (StageError).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, StageError)


@dataclass(frozen=True)
class Champion:
    """The champion folder to load: a peft adapter (`peft_type` from adapter_config.json) or a whole model."""

    folder: Path
    peft_type: str | None  # None: a whole model (config.json + safetensors)


def _base_sha(folder: Path) -> str | None:
    """The base model hash its train_metrics.json records (train and align write it), or None."""
    try:
        value = read_json(folder / "train_metrics.json").get("base_model_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _peft_type(folder: Path) -> str | None:
    try:
        return read_json(folder / "adapter_config.json").get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _relative(params: Params, path: Path) -> str:
    return str(path.relative_to(params.root)) if path.is_relative_to(params.root) else str(path)


def deferred(candidate: str, measured_by: str, why: str) -> dict[str, Any]:
    """The section of a stage that does not measure the champion because another stage does (`measured_by`)."""
    return {"compared": False, "candidate": candidate, "candidate_weights_sha256": None, "measured_by": measured_by,
            "reason": why}


def locate(params: Params, candidate_dir: Path, *, candidate: str, measured_by: str) -> tuple[Champion | None,
                                                                                          dict[str, Any]]:
    """The champion to measure beside the candidate in `candidate_dir` ("sft" or "aligned"), or None; and the
    `champion` section of the metrics file so far: who is compared with whom, and the reason when nobody is."""
    folder = params.path("promoted")
    candidate_sha = weights_sha256(candidate_dir)
    section: dict[str, Any] = {
        "compared": False, "candidate": candidate, "candidate_weights_sha256": candidate_sha,
        "measured_by": measured_by, "path": _relative(params, folder), "reason": None,
    }
    if not folder.is_dir():
        section["reason"] = f"no champion yet: '{section['path']}' does not exist (the first promotion)"
        return None, section
    try:
        record = read_json(folder / PROMOTED_MANIFEST)
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    champion_sha = weights_sha256(folder)
    section.update({"promoted_sha256": record.get("adapter_sha256"), "promoted_adapter": record.get("adapter"),
                    "weights_sha256": champion_sha})
    peft_type = _peft_type(folder)
    whole = peft_type is None and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    if peft_type is None and not whole:
        section["reason"] = (f"'{section['path']}' holds no adapter_config.json nor a whole model (config.json + "
                             "safetensors) to load")
        return None, section
    if champion_sha == candidate_sha:
        section["reason"] = f"the champion is this very adapter (weights sha256 {candidate_sha[:12]})"
        return None, section
    ours, theirs = _base_sha(candidate_dir), _base_sha(folder)
    section["base_model_sha256"] = theirs
    if ours and theirs and ours != theirs:
        section["reason"] = (f"the champion was trained on another base model (base sha256 {theirs[:12]}, the "
                             f"candidate's {ours[:12]}), so their scores are not comparable")
        return None, section
    return Champion(folder, peft_type), section


def _host_type(host: Any) -> str | None:
    """The peft type of the candidate's active adapter, None if `host` is no PeftModel."""
    config = getattr(host, "peft_config", None)
    if not isinstance(config, dict) or not config:
        return None
    active = getattr(host, "active_adapter", None)
    value = getattr(config.get(active), "peft_type", None)
    return str(getattr(value, "value", value)) if value is not None else None


def load_beside(host: Any, found: Champion, *, base_dir: Path, trust_remote_code: bool = False, env: Any = None,
                four_bit: bool = False) -> tuple[Any | None, str | None, str]:
    """Load the champion beside the candidate model `host`: (separate model or None, adapter name on `host` or None,
    how it was loaded). Raises one of LOAD_ERRORS when it does not load."""
    from pipelines.evaluate import _load_causal_lm

    if found.peft_type is None:
        return _load_causal_lm(found.folder, trust_remote_code, env), None, "a separate whole model"
    safetensors_adapter(found.folder, "re-promote an adapter saved with safe_serialization=True")
    from peft import PeftModel

    if found.peft_type in SHARED_TYPES and _host_type(host) == found.peft_type:
        try:
            host.load_adapter(str(found.folder), adapter_name=ADAPTER_NAME, is_trainable=False)
        except LOAD_ERRORS:
            if ADAPTER_NAME in getattr(host, "peft_config", {}):
                host.delete_adapter(ADAPTER_NAME)  # a half-injected adapter must not stay on the candidate
            raise
        return None, ADAPTER_NAME, f"a second {found.peft_type} adapter on the candidate's base"
    base = _load_causal_lm(base_dir, trust_remote_code, env, four_bit=four_bit)
    model = PeftModel.from_pretrained(base, found.folder, is_trainable=False)
    return model.eval(), None, f"a separate {found.peft_type} adapter on its own copy of the base"


def attach(models: Any, host: Any, found: Champion | None, section: dict[str, Any], **kwargs: Any) -> bool:
    """Load `found` beside the candidate and set `models.champion` (a separate model) or `models.champion_adapter`
    (its adapter name on `host`); True if it loaded. When it does not, the reason goes into `section`."""
    if found is None:
        return False
    try:
        models.champion, models.champion_adapter, how = load_beside(host, found, **kwargs)
    except LOAD_ERRORS as exc:
        section["reason"] = f"the champion in '{section['path']}' does not load beside the candidate: {exc}"
        log.warning("no champion comparison: %s", section["reason"])
        return False
    section["loaded_as"] = how
    return True


@contextlib.contextmanager
def use(models: Any, host: Any) -> Iterator[Any]:
    """The champion model: the separate one, or `host` with the champion adapter active (the previous one after)."""
    if models.champion is not None:
        yield models.champion
        return
    previous = host.active_adapter
    host.set_adapter(models.champion_adapter, inference_mode=True)
    try:
        yield host
    finally:
        host.set_adapter(previous, inference_mode=True)


def compare(references: Sequence[str], champion: ModelScores, candidate: ModelScores,
            cfg: EvaluateConfig) -> dict[str, Any]:
    """Both models' metrics on the same rows, candidate - champion with paired bootstrap intervals (every metric of
    pipelines.metrics.summarise; the rule reads the primary one)."""
    summary, _, _ = summarise(list(references), champion, candidate, samples=cfg.bootstrap_samples,
                              confidence=cfg.confidence)
    ci = summary["ci"]
    return {"compared": True, "n_test": len(references), "confidence": summary["confidence"],
            "champion": summary["base"], "candidate": summary["fine_tuned"], "delta": summary["delta"],
            "ci": {"champion": ci["base"], "candidate": ci["fine_tuned"], "delta": ci["delta"]}}


def decide(section: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    """`section` with the rule applied under the params of now (`gate`: passed, reasons, margin)."""
    passed, reasons = champion_gate(section, cfg.primary_metric, cfg.champion_margin)
    return {**section, "primary_metric": cfg.primary_metric,
            "gate": {"passed": passed, "applicable": bool(section.get("compared")), "reasons": reasons,
                     "champion_margin": cfg.champion_margin}}


def figures(section: dict[str, Any], primary: str) -> dict[str, Any]:
    """The comparison's figures for the stage result (Dagster metadata)."""
    out: dict[str, Any] = {"champion_compared": bool(section.get("compared")),
                           "champion_reasons": section.get("gate", {}).get("reasons", [])}
    if section.get("compared"):
        out[f"champion_{primary}"] = round(section["champion"][primary], 4) if primary in section["champion"] else None
        out["champion_sha256"] = str(section.get("promoted_sha256") or section.get("weights_sha256"))[:16]
    return out


__all__ = ["ADAPTER_NAME", "Champion", "LOAD_ERRORS", "attach", "compare", "decide", "deferred", "figures",
           "load_beside", "locate", "use"]
