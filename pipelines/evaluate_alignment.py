"""SFT vs aligned: held-out preference accuracy, the task metrics and forgetting, and the alignment gate.

    python -m pipelines evaluate-alignment [--params params.yaml]

Both models are the same base with two adapters (peft: "sft" from paths.adapter, "aligned" from
paths.aligned_adapter, switched by name), or two whole models after full fine-tuning, so nothing but the
preference tuning differs between them.

1. Held-out preference pairs (paths.preferences/test.jsonl; unpaired test rows are paired by prompt,
   pipelines.preferences.as_pairs): each model's log-likelihood of the chosen and the rejected answer, summed over
   the answer tokens with the trainer's mask (pipelines.evaluate.completion_nll: the answer text and its end-of-turn
   token). From the per-pair margins, pipelines.metrics.preference_scores gives each model's preference accuracy
   and mean margin, the paired bootstrap interval of the gain, and the aligned model's implicit reward against the
   SFT model (TRL's rewards/accuracies and rewards/margins, on held-out pairs).
2. The SFT test split (paths.splits/test.jsonl): pipelines.evaluate.evaluate_models with the SFT model in the
   "base" seat and the aligned one in the "fine_tuned" seat: exact match, ROUGE-L, JSON metrics, completion loss
   with paired bootstrap intervals, and the forgetting probe (the rise of the general probe-set loss from SFT to
   aligned). In alignment_metrics.json the seats are named sft and aligned.
3. The alignment gate (pipelines.metrics.alignment_gate with params align.gate and evaluate.primary_metric).
4. The champion (pipelines.champion): the adapter promoted before (paths.promoted, read as it is now: not a DVC
   dependency) answers the same test rows as the aligned adapter, the final candidate; the `champion` section of
   alignment_metrics.json compares them side by side (the rule is applied by promote).
5. The report: table, the reward-margin curve of training (TRL's rewards/margins per step, from the aligned
   adapter's train_log.json), and five held-out pairs side by side with both models' generations (the first five
   by id: ids are hashes, so an unselected sample).

When the align stage trained nothing (align.method none, or no pairs), the report and metrics say why and the gate
is not applicable: the SFT adapter stays the final one (pipelines.promote). With align.method none, `evaluate` has
compared it with the champion; when the align stage found no pairs, this stage does (the SFT adapter and the champion
on the SFT test split: two generation and loss passes). When it trained but the test split holds
no pair (KTO rows whose prompts have a single label), there is no preference evidence: the gate fails on it.

Reads:  paths.base_model, paths.adapter, paths.aligned_adapter, paths.preferences/test.jsonl, paths.splits/test.jsonl,
        paths.promoted (the champion)
Writes: paths.alignment/ report.html (self-contained), report.md (+ PNGs), pairs.jsonl (per-pair log-likelihoods),
        examples.jsonl (task rows), reward_margins.csv and eval_reward_margins.csv (DVC plots);
        paths.alignment_metrics (alignment_metrics.json, DVC metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import champion as champion_seat
from pipelines import report
from pipelines.align import is_full, read_record, reward_curve
from pipelines.chat import TemplateError, TokenizedConversation, tokenize_conversation, tokenize_prompt
from pipelines.config import Params
from pipelines.evaluate import (
    _load_causal_lm,
    _read_test_rows,
    compare_with_champion,
    completion_nll,
    evaluate_models,
    generate,
    load_probe,
)
from pipelines.evaluate import load_models as load_sft_model
from pipelines.io import StageError, StageResult, atomic_dir, read_json, read_jsonl, require, sha256_tree, write_json
from pipelines.methods import safetensors_adapter
from pipelines.metrics import METRICS, alignment_gate, preference_scores
from pipelines.preferences import as_pairs

log = logging.getLogger(__name__)

N_SHOWN = 5  # held-out pairs shown side by side
SEATS = {"base": "sft", "fine_tuned": "aligned"}  # pipelines.evaluate's names -> this stage's


# ------------------------------------------------------------------------------------------------- models


@dataclass
class AlignedModels:
    """The SFT and the aligned model, with the `use(which)` interface of pipelines.evaluate.Models: "base" and
    "sft" give the SFT model, "fine_tuned" and "aligned" the aligned one."""

    model: Any  # the peft model holding both adapters, or the aligned whole model
    separate_sft: Any | None = None  # full fine-tuning: the SFT model, loaded on its own
    champion: Any | None = None  # pipelines.champion: a separately loaded champion, or
    champion_adapter: str | None = None  # its adapter name on `model`

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[Any]:
        name = SEATS.get(which, which)
        if name == "champion":
            with champion_seat.use(self, self.model) as model:
                yield model
            return
        if self.separate_sft is not None:
            yield self.separate_sft if name == "sft" else self.model
            return
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)


def load_models(params: Params) -> tuple[AlignedModels, Any]:
    """Base + SFT adapter ("sft") + aligned adapter ("aligned") in fp32, or two whole models; and the tokenizer."""
    from transformers import AutoTokenizer

    base_dir, sft_dir, aligned_dir = params.path("base_model"), params.path("adapter"), params.path("aligned_adapter")
    trust = params.model.trust_remote_code
    tok_dir = sft_dir if (sft_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
    if is_full(sft_dir):
        return AlignedModels(_load_causal_lm(aligned_dir, trust), _load_causal_lm(sft_dir, trust)), tokenizer
    from peft import PeftModel

    safetensors_adapter(sft_dir, "re-run the 'train' stage (python -m pipelines train)")
    safetensors_adapter(aligned_dir, "re-run the 'align' stage (python -m pipelines align)")
    model = PeftModel.from_pretrained(_load_causal_lm(base_dir, trust), sft_dir, adapter_name="sft",
                                      is_trainable=False)
    model.load_adapter(str(aligned_dir), adapter_name="aligned", is_trainable=False)
    return AlignedModels(model.eval()), tokenizer


# ---------------------------------------------------------------------------------------------- pair scoring


def answer_tokens(tokenizer: Any, prompt: list[dict[str, str]], answer: list[dict[str, str]],
                  tools: str | None) -> TokenizedConversation:
    """The conversation prompt + answer with a mask on the answer's assistant tokens only (each answer message's
    text and end-of-turn token, as the trainer's mask), not on assistant turns inside the prompt."""
    tok = tokenize_conversation(tokenizer, [*prompt, *answer], tools=tools)
    # the prompt as pipelines.chat encodes it (the template's adaptations, special-token text as text), not a
    # re-tokenised string
    n_prompt = len(tokenize_prompt(tokenizer, [*prompt, *answer], tools=tools).input_ids)
    mask = [0] * min(n_prompt, len(tok.assistant_mask)) + tok.assistant_mask[n_prompt:]
    return TokenizedConversation(tok.input_ids, mask, tok.text, tok.changes)


def pair_log_likelihoods(models: AlignedModels, tokenizer: Any, pairs: Sequence[dict[str, Any]],
                         batch_size: int) -> dict[str, dict[str, list[float]]]:
    """{model: {"chosen": [log p], "rejected": [log p]}} over the pairs, in nats summed over the answer tokens."""
    sides = {side: [answer_tokens(tokenizer, p["prompt"], p[side], p.get("tools")) for p in pairs]
             for side in ("chosen", "rejected")}
    out: dict[str, dict[str, list[float]]] = {}
    for name in ("sft", "aligned"):
        with models.use(name) as model:
            out[name] = {side: [-nll for nll in completion_nll(model, tokenizer, conv, batch_size=batch_size,
                                                                desc=f"pairs {name} {side}")[0]]
                         for side, conv in sides.items()}
    return out


def _renamed(obj: Any) -> Any:
    """pipelines.evaluate's seat names (base, fine_tuned, base_loss, ...) as this stage's (sft, aligned, ...)."""
    names = {"base": "sft", "fine_tuned": "aligned", "base_loss": "sft_loss", "fine_tuned_loss": "aligned_loss"}
    if isinstance(obj, dict):
        return {names.get(k, k): _renamed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_renamed(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------------------------- run


def _sft_champion(params: Params) -> tuple[dict[str, Any], dict[str, float]]:
    """The champion section when the align stage trained nothing: with align.method none `evaluate` compared the SFT
    adapter with the champion; otherwise (no preference pairs) the SFT adapter is compared with it here."""
    if params.align.method == "none":
        return champion_seat.deferred("sft", "evaluate", "align.method is none, so the SFT adapter is the final "
                                      "candidate: evaluate compares it with the champion"), {}
    base_dir, sft_dir = params.path("base_model"), params.path("adapter")
    found, section = champion_seat.locate(params, sft_dir, candidate="sft", measured_by="evaluate-alignment")
    if found is None:
        return section, {}
    trust = params.model.trust_remote_code
    models, tokenizer = load_sft_model(base_dir, sft_dir, full=is_full(sft_dir), trust_remote_code=trust)
    if not champion_seat.attach(models, models.tuned, found, section, base_dir=base_dir, trust_remote_code=trust):
        return section, {}
    rows = _read_test_rows(require(params.path("splits") / "test.jsonl", "split"), params.evaluate.max_examples)
    try:
        comparison, seconds = compare_with_champion(models, tokenizer, rows, params.evaluate)
    except TemplateError as exc:
        raise StageError(f"the chat template cannot render the test rows: {exc}") from None
    return {**section, **comparison}, seconds


def _skipped(params: Params, record: dict[str, Any]) -> StageResult:
    started = time.perf_counter()
    reason = record.get("reason", "the align stage trained nothing")
    champion, seconds = _sft_champion(params)
    champion = champion_seat.decide(champion, params.evaluate)
    metrics = {"aligned": False, "applicable": False, "method": record.get("method"), "reason": reason,
               "sft_adapter_sha256": sha256_tree(params.path("adapter")),
               "aligned_adapter_sha256": sha256_tree(params.path("aligned_adapter")),
               "gate": {"passed": False, "applicable": False,
                        "reasons": [f"not applicable: {reason}; the SFT adapter stays the final one."]},
               "champion": champion}
    out_dir = params.path("alignment")
    with atomic_dir(out_dir, "alignment") as tmp:
        ctx = report.AlignmentContext(metrics=metrics)
        (tmp / "report.html").write_text(report.render_alignment_html(ctx, {}), encoding="utf-8")
        (tmp / "report.md").write_text(report.render_alignment_markdown(ctx, []), encoding="utf-8")
        (tmp / "reward_margins.csv").write_text("step,reward_margin\n", encoding="utf-8")
        (tmp / "eval_reward_margins.csv").write_text("step,eval_reward_margin\n", encoding="utf-8")
    write_json(params.path("alignment_metrics"), metrics)
    primary = params.evaluate.primary_metric
    return StageResult("evaluate-alignment", {"alignment": out_dir, "metrics": params.path("alignment_metrics")},
                       {"aligned": False, "gate_applicable": False, "gate_passed": False, "reason": reason,
                        "gate_reasons": metrics["gate"]["reasons"], **champion_seat.figures(champion, primary),
                        "champion_table_md": report.champion_table_markdown(champion, None, "SFT"),
                        "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)}})


def _preference_figures(preference: dict[str, Any] | None) -> dict[str, Any]:
    if preference is None:
        return {}
    return {"sft_preference_accuracy": round(preference["sft"]["accuracy"], 4),
            "aligned_preference_accuracy": round(preference["aligned"]["accuracy"], 4),
            "preference_accuracy_gain_ci": preference["ci"]["delta"]["accuracy"],
            "sft_mean_margin": round(preference["sft"]["margin"], 4),
            "aligned_mean_margin": round(preference["aligned"]["margin"], 4),
            "implicit_reward_accuracy": round(preference["implicit_reward"]["accuracy"], 4),
            "implicit_reward_margin": round(preference["implicit_reward"]["margin"], 4)}


def _csv(points: list[tuple[float, float]], column: str) -> str:
    return f"step,{column}\n" + "".join(f"{s:g},{v:.6g}\n" for s, v in points)


def run(params: Params) -> StageResult:
    started = time.perf_counter()
    cfg, ecfg = params.align, params.evaluate
    if ecfg.primary_metric not in METRICS:
        raise StageError(f"params.yaml evaluate.primary_metric = '{ecfg.primary_metric}' is unknown; use one of: "
                         f"{', '.join(METRICS)}")
    require(params.path("base_model"), "fetch-model")
    require(params.path("adapter"), "train")
    aligned_dir = require(params.path("aligned_adapter"), "align")
    record = read_record(aligned_dir)
    if record.get("skipped"):
        return _skipped(params, record)
    pref_path = require(params.path("preferences") / "test.jsonl", "preference-data")
    pairs, unused = as_pairs(read_jsonl(pref_path))
    pairs.sort(key=lambda p: p["id"])
    if cfg.max_eval_pairs is not None:
        pairs = pairs[: cfg.max_eval_pairs]
    test_rows = _read_test_rows(require(params.path("splits") / "test.jsonl", "split"), ecfg.max_examples)
    sft_sha, aligned_sha = sha256_tree(params.path("adapter")), sha256_tree(aligned_dir)
    found, champion = champion_seat.locate(params, aligned_dir, candidate="aligned", measured_by="evaluate-alignment")
    models, tokenizer = load_models(params)
    measured = champion_seat.attach(models, models.model, found, champion, base_dir=params.path("base_model"),
                                    trust_remote_code=params.model.trust_remote_code)
    try:
        logps = pair_log_likelihoods(models, tokenizer, pairs, ecfg.batch_size)
        task = evaluate_models(models, tokenizer, test_rows, load_probe(), ecfg, champion=measured)
        shown = pairs[:N_SHOWN]
        prompts = [tokenize_prompt(tokenizer, [*p["prompt"], *p["chosen"]], tools=p.get("tools")).input_ids
                   for p in shown]  # token ids, as evaluate.generate takes them
        generations = {}
        for name in ("sft", "aligned"):
            with models.use(name) as model:
                generations[name] = generate(model, tokenizer, prompts, batch_size=ecfg.batch_size,
                                             max_new_tokens=ecfg.max_new_tokens, desc=f"generate {name}")
    except TemplateError as exc:
        raise StageError(f"the chat template cannot render the held-out rows: {exc}") from None
    margins = {name: [c - r for c, r in zip(lp["chosen"], lp["rejected"], strict=True)] for name, lp in logps.items()}
    beta = float(record["beta"])
    # No held-out pair (e.g. KTO rows whose prompts have one label only): no preference evidence, so the gate fails
    # on it, and the report says why; the task metrics are still measured.
    preference = preference_scores(margins["sft"], margins["aligned"], beta, samples=ecfg.bootstrap_samples,
                                   confidence=ecfg.confidence) if pairs else None
    summary = {k: v for k, v in task.summary.items() if k != "gate"}  # that gate is SFT-vs-base's
    metrics: dict[str, Any] = {
        "aligned": True, "applicable": True, "method": record.get("method"), "loss": record.get("loss"),
        "beta": beta, "reference": record.get("reference"), "unused_unpaired_rows": unused,
        "preference": preference, "task": _renamed(summary),
        "sft_adapter_sha256": sft_sha, "aligned_adapter_sha256": aligned_sha,
    }
    passed, reasons = alignment_gate(metrics, cfg.gate, ecfg.primary_metric)
    metrics["gate"] = {"passed": passed, "applicable": True, "reasons": reasons, **cfg.gate.model_dump()}
    metrics["champion"] = champion_seat.decide({**champion, **(task.champion or {})}, ecfg)
    sides = ("chosen", "rejected")
    pair_records = [{"id": p["id"], "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                     **{f"{name}_logp_{side}": logps[name][side][i] for name in logps for side in sides},
                     "sft_margin": margins["sft"][i], "aligned_margin": margins["aligned"][i]}
                    for i, p in enumerate(pairs)]
    side_by_side = [{**pair_records[i], **{f"{name}_output": generations[name][i] for name in generations}}
                    for i in range(len(shown))]
    try:
        history = read_json(aligned_dir / "train_log.json")
    except (OSError, ValueError):
        history = []
    curve = reward_curve(history)
    ctx = report.AlignmentContext(metrics=metrics, pairs=side_by_side, reward_curve=curve,
                                  task_table=report.metric_rows(summary))
    images = report.alignment_plots(ctx)
    out_dir = params.path("alignment")
    with atomic_dir(out_dir, "alignment") as tmp:
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.html").write_text(report.render_alignment_html(ctx, images), encoding="utf-8")
        (tmp / "report.md").write_text(report.render_alignment_markdown(ctx, list(images)), encoding="utf-8")
        (tmp / "reward_margins.csv").write_text(
            _csv(list(zip(curve["step"], curve["margin"], strict=True)), "reward_margin"), encoding="utf-8")
        (tmp / "eval_reward_margins.csv").write_text(
            _csv(list(zip(curve["eval_step"], curve["eval_margin"], strict=True)), "eval_reward_margin"),
            encoding="utf-8")
        with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_records)
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(_renamed(r), ensure_ascii=False) + "\n" for r in task.examples)
    write_json(params.path("alignment_metrics"), metrics)
    primary = ecfg.primary_metric
    figures: dict[str, Any] = {
        "aligned": True, "method": metrics["method"], "n_pairs": len(pairs), "unused_unpaired_rows": unused,
        "n_test": summary["n_test"], **_preference_figures(preference),
        f"sft_{primary}": round(summary["base"][primary], 4) if primary in summary["base"] else None,
        f"aligned_{primary}": round(summary["fine_tuned"][primary], 4) if primary in summary["fine_tuned"] else None,
        "forgetting": round(summary["forgetting"], 4),
        "gate_applicable": True, "gate_passed": passed, "gate_reasons": reasons,
        "metric_table_md": report.alignment_table_markdown(metrics),
        **champion_seat.figures(metrics["champion"], primary),
        "champion_table_md": report.champion_table_markdown(metrics["champion"], ("SFT", metrics["task"]["sft"]),
                                                            "aligned"),
        "seconds": {**task.seconds, "total": round(time.perf_counter() - started, 3)},
    }
    outputs = {"alignment": out_dir, "metrics": params.path("alignment_metrics"),
               "report_html": out_dir / "report.html", "report_md": out_dir / "report.md",
               **{Path(n).stem: out_dir / n for n in images}}
    log.info("alignment gate %s: %s", "passed" if passed else "failed", " ".join(reasons))
    return StageResult("evaluate-alignment", outputs=outputs, metrics=figures)
