"""Merge the promoted adapter into the base model: one plain Hugging Face folder that any engine loads.

    python -m pipelines merge [--params params.yaml]

Reads:  paths.promoted (the adapter that passed the gate; a full fine-tune's model folder works too),
        paths.base_model, the first `export.check_prompts` rows of paths.splits/test.jsonl.
Writes: paths.merged/ model.safetensors + config.json (fp32), the tokenizer with its chat template,
        generation_config.json (eos_token_id = every stop id: the template's end-of-turn token and the EOS),
        README.md (model card), MERGED.json (provenance and the check's figures, no timestamp).

The merge is peft's `merge_and_unload(safe_merge=True)` on an fp32 base (W + scale * B @ A per layer, NaN-checked).
It is blocking-checked before the folder is swapped in (`check_merged`): on the check prompts, the saved folder,
loaded back from disk, must give the logits of base + adapter within `export.merge_tolerance` (max abs difference
over every position of prompt + answer, fp32) and the same greedy answers. A failed check leaves the previous
merged folder in place and fails the stage with the figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.evaluate import (
    _load_causal_lm,
    _pad,
    _pad_id,
    _read_test_rows,
    build_examples,
    generate_ids,
    load_models,
    stop_token_ids,
)
from pipelines.io import (
    StageError,
    StageResult,
    atomic_dir,
    claim_output,
    read_json,
    require,
    sha256_tree,
    write_json,
)
from pipelines.promote import MANIFEST as PROMOTED_MANIFEST
from pipelines.runcard import library_versions

log = logging.getLogger(__name__)

MANIFEST = "MERGED.json"


@dataclass
class MergeCheck:
    """Merged folder vs base + adapter on the same prompts (fp32)."""

    n_prompts: int
    max_abs_logit_diff: float  # over every (prompt + reference answer) position and vocabulary entry
    tolerance: float
    greedy_match_rate: float  # share of prompts whose greedy token ids are identical
    same_prompt_ids: bool  # the merged folder's tokenizer + template give the adapter's prompt token ids
    passed: bool
    answers: list[str]  # the merged model's greedy answers (text), for the card and the GGUF check

    def summary(self) -> str:
        return (f"max |logit difference| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:g}), greedy "
                f"answers identical on {self.greedy_match_rate:.0%} of {self.n_prompts} prompts"
                + ("" if self.same_prompt_ids else ", and the saved tokenizer gives other prompt ids"))


def is_full_model(folder: Path) -> bool:
    """A full fine-tune's output (a whole model folder) rather than a peft adapter."""
    return not (folder / "adapter_config.json").exists() and (folder / "config.json").exists()


def check_rows(params: Params) -> list[dict[str, Any]]:
    """The first `export.check_prompts` rows of the test split (conversations ending with a reference answer)."""
    test_path = require(params.path("splits") / "test.jsonl", "split")
    return _read_test_rows(test_path, params.export.check_prompts)


def max_logit_diff(a: Any, b: Any, sequences: list[list[int]], pad_id: int) -> float:
    """Max |logits_a - logits_b| over every real position of `sequences` (right-padded batch, pads ignored)."""
    import torch

    ids, mask = _pad(sequences, pad_id, "right")  # (batch, seq)
    with torch.inference_mode():
        la = a(input_ids=ids, attention_mask=mask).logits.float()  # (batch, seq, vocab)
        lb = b(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()  # (batch, seq)
    return float((la - lb).abs()[real].max())


def check_merged(merged_dir: Path, base_dir: Path, adapter_dir: Path, rows: list[dict[str, Any]], *,
                 max_new_tokens: int, tolerance: float, trust_remote_code: bool = False) -> MergeCheck:
    """Load the merged folder and base + adapter from disk and compare them on the prompts of `rows`
    (conversations ending with an assistant turn; the prompt is everything before it, as evaluate builds it).

    Each model gets its prompts tokenized by its own folder's tokenizer (pipelines.chat.tokenize_prompt) and
    generates greedily (the same batching, so the same padding); the logits are then compared teacher-forced on
    prompt + the reference's answer. Returns the figures; `passed` needs the max abs logit difference <=
    tolerance, identical greedy token ids on every prompt and identical prompt token ids.
    """
    from transformers import AutoTokenizer

    reference, ref_tokenizer = load_models(base_dir, adapter_dir, full=is_full_model(adapter_dir),
                                           trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    merged = _load_causal_lm(merged_dir, trust_remote_code)
    ref_prompts = [e.prompt_ids for e in build_examples(rows, ref_tokenizer)]
    prompts = [e.prompt_ids for e in build_examples(rows, tokenizer)]
    kwargs = {"batch_size": len(prompts), "max_new_tokens": max_new_tokens}
    with reference.use("fine_tuned") as ref_model:
        ref_ids = generate_ids(ref_model, ref_tokenizer, ref_prompts, desc="base+adapter", **kwargs)
        sequences = [p + ids for p, ids in zip(ref_prompts, ref_ids, strict=True)]
        diff = max_logit_diff(merged, ref_model, sequences, _pad_id(tokenizer))
    merged_ids = generate_ids(merged, tokenizer, prompts, desc="merged", **kwargs)
    matches = sum(a == b for a, b in zip(ref_ids, merged_ids, strict=True))
    same_prompts = prompts == ref_prompts
    return MergeCheck(
        n_prompts=len(prompts), max_abs_logit_diff=diff, tolerance=tolerance, greedy_match_rate=matches / len(prompts),
        same_prompt_ids=same_prompts, passed=diff <= tolerance and matches == len(prompts) and same_prompts,
        answers=[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in merged_ids],
    )


def merge(base_dir: Path, adapter_dir: Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(merged transformers model in fp32, the adapter's tokenizer). A full fine-tune is returned as loaded."""
    models, tokenizer = load_models(base_dir, adapter_dir, full=is_full_model(adapter_dir),
                                    trust_remote_code=trust_remote_code)
    if models.separate_base is not None:
        return models.tuned, tokenizer
    return models.tuned.merge_and_unload(progressbar=False, safe_merge=True), tokenizer


def _front_matter(base: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump({
        "base_model": base.get("name"), "library_name": "transformers", "pipeline_tag": "text-generation",
        "tags": ["finetune-factory", "merged", "lora"],
    }, sort_keys=False) + "---\n"


def model_card(*, base: dict[str, Any], record: dict[str, Any], check: MergeCheck) -> str:
    """README.md of the merged folder: what it is, the evidence it was checked on, how to run it."""
    gate = record.get("promotion") or {}
    primary = gate.get("primary_metric")
    lines = [
        _front_matter(base),
        "# Merged fine-tuned model",
        "",
        f"The adapter promoted by the fine-tuning factory (content hash `{record['adapter_sha256'][:12]}`), merged "
        f"into `{base.get('name')}` with peft `merge_and_unload` in fp32. A plain Hugging Face folder: "
        "transformers, vLLM and llama.cpp's converter load it without peft.",
        "",
        "## Evidence",
        "",
        f"- Merge check on {check.n_prompts} test prompts: {check.summary()}.",
    ]
    if primary:
        lines.append(f"- Promotion gate on {gate.get('n_test')} test rows: {primary} base "
                     f"{gate.get('base', {}).get(primary)}, fine-tuned {gate.get('fine_tuned', {}).get(primary)}.")
    lines += [
        f"- Stop tokens (generation_config.json eos_token_id): {record['eos_token_id']}.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m pipelines chat --adapter none --model data/merged   # or: --adapter promoted on the base",
        "python -m pipelines export-gguf                                # llama.cpp / Ollama files in data/gguf",
        "python -m pipelines serve                                      # OpenAI-compatible API on 127.0.0.1",
        "```",
        "",
    ]
    return "\n".join(lines)


def run(params: Params) -> StageResult:
    cfg = params.export
    adapter_dir = params.path("promoted")
    if not adapter_dir.exists():
        raise StageError(f"there is no promoted adapter in '{adapter_dir}' to merge; run the 'promote' stage first "
                         "(python -m pipelines promote), which copies the adapter there only if it passed the gate")
    base_dir = require(params.path("base_model"), "fetch-model")
    out = claim_output(params, "merged")  # before any work: the folder is the stage's own, and writable
    trust = params.model.trust_remote_code
    started = time.perf_counter()
    model, tokenizer = merge(base_dir, adapter_dir, trust_remote_code=trust)
    rows = check_rows(params)
    stops = stop_token_ids(model, tokenizer)
    promoted = read_json(adapter_dir / PROMOTED_MANIFEST) if (adapter_dir / PROMOTED_MANIFEST).exists() else {}
    base_source = read_json(base_dir / "source.json") if (base_dir / "source.json").exists() else {}
    with atomic_dir(out, "merged") as tmp:
        model.generation_config.eos_token_id = stops  # the end-of-turn token and the EOS: every engine stops
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        merge_seconds = time.perf_counter() - started
        check = check_merged(tmp, base_dir, adapter_dir, rows, max_new_tokens=cfg.max_new_tokens,
                             tolerance=cfg.merge_tolerance, trust_remote_code=trust)
        if not check.passed:
            raise StageError(f"the merged model in '{out}' does not reproduce base + adapter: {check.summary()}; "
                             "the previous merged folder is kept. Check that paths.base_model is the model the "
                             "adapter was trained on")
        record = {
            "adapter_sha256": promoted.get("adapter_sha256") or sha256_tree(adapter_dir),
            "base_model": base_source.get("name") or str(base_dir.name),
            "method": "full" if is_full_model(adapter_dir) else "peft merge_and_unload (fp32)",
            "eos_token_id": stops,
            "check": {k: v for k, v in asdict(check).items() if k != "answers"},
            "promotion": {k: promoted.get(k) for k in ("primary_metric", "base", "fine_tuned", "n_test")},
            "versions": library_versions(("torch", "transformers", "peft")),
        }
        write_json(tmp / MANIFEST, record)
        (tmp / "README.md").write_text(model_card(base=base_source or {"name": str(base_dir)}, record=record,
                                                  check=check), encoding="utf-8")
    log.info("merge check: %s", check.summary())
    return StageResult("merge", outputs={"merged": out, "manifest": out / MANIFEST}, metrics={
        "max_abs_logit_diff": check.max_abs_logit_diff, "merge_tolerance": check.tolerance,
        "greedy_match_rate": check.greedy_match_rate, "check_prompts": check.n_prompts, "check_passed": check.passed,
        "eos_token_id": json.dumps(stops), "size_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1),
        "seconds": {"merge_and_save": round(merge_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    })


__all__ = ["MANIFEST", "MergeCheck", "check_merged", "check_rows", "is_full_model", "max_logit_diff", "merge",
           "model_card", "run"]
