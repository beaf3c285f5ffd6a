"""Per-example metrics, their aggregates with bootstrap confidence intervals, and the promotion gate.

Pure functions only (no model, no file I/O): `pipelines.evaluate` feeds them predictions and
per-example losses, `pipelines.promote` and the Dagster asset check call `gate` on metrics.json.

    from pipelines.metrics import score_example, summarise, gate

Chain-of-thought answers: `extract_answer` takes the final answer out of a text that carries reasoning
(`<think>` blocks, "Let's think step by step ... Answer: X"), with the patterns of evaluate.reasoning_pattern
and evaluate.answer_patterns; exact match and the task metrics below compare the extracted answers of the
prediction and the reference. A text without reasoning is its own answer, scored exactly as it is.

Metric names (the keys of metrics.json and the allowed values of `evaluate.primary_metric`):
    exact_match     prediction == reference after stripping surrounding whitespace (0/1 per example)
    rouge_l         ROUGE-L F-measure (rouge_score's reference implementation)
    json_valid      prediction parses as a JSON object; only rows whose reference is a JSON object
    field_accuracy  share of the reference object's keys whose value the prediction matches (same rows)
    loss            mean negative log-likelihood per completion token (nats), token-weighted
    perplexity      exp(loss)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

HIGHER_IS_BETTER = {"exact_match": True, "rouge_l": True, "json_valid": True, "field_accuracy": True,
                    "loss": False, "perplexity": False}
METRICS = tuple(HIGHER_IS_BETTER)
UNIT_INTERVAL_METRICS = ("exact_match", "rouge_l", "json_valid", "field_accuracy")  # shares in [0, 1]
JSON_METRICS = ("json_valid", "field_accuracy")
FLOAT_SLACK = 1e-9  # 0.25 - 0.2 is 0.0499999...: a delta equal to the bound in decimal passes
BOOTSTRAP_SEED = 0  # fixed: the same inputs give the same intervals on every run


@dataclass(frozen=True)
class Answer:
    """A text split into its final answer and its reasoning (extract_answer)."""

    text: str  # what is scored: the final answer, or the whole text when it has no reasoning
    reasoning: str = ""  # the reasoning blocks and the text before the answer, joined by newlines
    has_reasoning: bool = False


def _group(match: re.Match[str]) -> str:
    """The first group that took part in the match (patterns may have one group per alternative), else all of it."""
    return next((g for g in match.groups() if g is not None), match.group(0))


def extract_answer(text: str, reasoning_pattern: str | None, answer_patterns: Sequence[str]) -> Answer:
    """The final answer of `text` and its reasoning (patterns: evaluate.reasoning_pattern, answer_patterns).

    1. Every match of `reasoning_pattern` (a <think> block by default) is removed; its first group that took part
       is reasoning.
    2. The first of `answer_patterns` that matches what is left gives the answer: group 1 of its LAST match (the
       final "Answer:" line wins over earlier ones), stripped; the text before that match is reasoning too. A
       match with no text before it and no reasoning block is no reasoning ("Answer: 4" alone, or a one-line
       "The answer is in the manual."): the text stays whole.
    3. With reasoning blocks but no answer match, the answer is what is left, stripped: empty when the text was
       all reasoning (a generation cut off inside <think>).
    Without any reasoning the text is returned unchanged, so it is scored exactly as without this function.
    """
    parts: list[str] = []
    rest = text
    if reasoning_pattern:
        def cut(match: re.Match[str]) -> str:
            parts.append(_group(match))
            return ""

        rest = re.sub(reasoning_pattern, cut, text)
    for pattern in answer_patterns:
        matches = list(re.finditer(pattern, rest))
        if not matches:
            continue
        last = matches[-1]
        before = rest[: last.start()].strip()
        if before or parts:
            reasoning = "\n".join(p.strip() for p in [*parts, before] if p.strip())
            return Answer(last.group(1).strip(), reasoning, True)
        break  # an answer line that opens the text is the text itself, not a conclusion of reasoning
    if parts:
        return Answer(rest.strip(), "\n".join(p.strip() for p in parts if p.strip()), True)
    return Answer(text)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # the reference ROUGE implementation, not a re-derivation

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1. Identical texts score 1 even when the default tokenizer finds no words in them
    (it keeps only [a-z0-9] tokens, so e.g. an exact CJK answer would otherwise score 0)."""
    if prediction.strip() == reference.strip():
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The text as a JSON object, or None when it is not exactly one JSON object."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_fields(prediction: str, reference: dict[str, Any]) -> dict[str, float]:
    """Per-key 1/0: does the prediction (parsed) carry the reference's value for this key."""
    parsed = parse_json_object(prediction) or {}
    return {key: float(key in parsed and parsed[key] == value) for key, value in reference.items()}


def score_example(prediction: str, reference: str) -> dict[str, Any]:
    """All text metrics of one prediction; JSON metrics only when the reference is a JSON object."""
    scores: dict[str, Any] = {"exact_match": exact_match(prediction, reference),
                              "rouge_l": rouge_l(prediction, reference)}
    ref_obj = parse_json_object(reference)
    if ref_obj is not None:
        fields = json_fields(prediction, ref_obj)
        scores["json_valid"] = float(parse_json_object(prediction) is not None)
        scores["field_accuracy"] = sum(fields.values()) / len(fields) if fields else scores["json_valid"]
        scores["fields"] = fields
    return scores


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


def _ratio_stats(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # (samples, n) index matrix -> one weighted mean per resample
    return (values[idx] * weights[idx]).sum(axis=1) / weights[idx].sum(axis=1)


def _resample(n: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _percentiles(stats: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(low), float(high))


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    return float((v * w).sum() / w.sum())


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, *, samples: int = 1000,
                 confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile bootstrap interval of the (weighted) mean, resampling examples with replacement.

    Weights make a ratio of sums, e.g. per-example mean NLL weighted by completion tokens gives the
    token-weighted loss; one example cannot be split, so examples (not tokens) are resampled.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return Interval(math.nan, math.nan)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    return _percentiles(_ratio_stats(v, w, _resample(v.size, samples, seed)), confidence)


def paired_bootstrap_ci(base: Sequence[float], tuned: Sequence[float], weights: Sequence[float] | None = None, *,
                        samples: int = 1000, confidence: float = 0.95, seed: int = BOOTSTRAP_SEED,
                        transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Interval:
    """Interval of f(mean(tuned)) - f(mean(base)) (f = `transform`, default identity), resampling the
    SAME examples for both models: the pairing removes the between-example variance that both models
    share, so the interval is much tighter than two separate intervals suggest."""
    a, b = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        return Interval(math.nan, math.nan)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=float)
    idx = _resample(a.size, samples, seed)
    f = transform or (lambda x: x)
    return _percentiles(f(_ratio_stats(b, w, idx)) - f(_ratio_stats(a, w, idx)), confidence)


@dataclass
class ModelScores:
    """Per-example results of one model on the test rows (same order for both models)."""

    predictions: list[str]
    nll_sum: list[float]  # summed NLL (nats) over each example's completion tokens
    n_tokens: list[int]  # completion tokens per example

    @property
    def example_loss(self) -> list[float]:
        return [s / max(n, 1) for s, n in zip(self.nll_sum, self.n_tokens, strict=True)]


def _metric_columns(scores: list[dict[str, Any]], model: ModelScores) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (per-example values, weights) over the rows the metric applies to."""
    cols: dict[str, tuple[list[float], list[float]]] = {
        "loss": (model.example_loss, [float(n) for n in model.n_tokens]),
        "exact_match": ([s["exact_match"] for s in scores], [1.0] * len(scores)),
        "rouge_l": ([s["rouge_l"] for s in scores], [1.0] * len(scores)),
    }
    json_rows = [s for s in scores if "json_valid" in s]
    if json_rows:
        for name in JSON_METRICS:
            cols[name] = ([s[name] for s in json_rows], [1.0] * len(json_rows))
    return cols


def _per_field(base: list[dict[str, Any]], tuned: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, list[float]]] = {}
    for b, t in zip(base, tuned, strict=True):
        for key in b.get("fields", {}):
            cell = table.setdefault(key, {"base": [], "fine_tuned": []})
            cell["base"].append(b["fields"][key])
            cell["fine_tuned"].append(t["fields"][key])
    return {key: {"base": float(np.mean(c["base"])), "fine_tuned": float(np.mean(c["fine_tuned"])),
                  "delta": float(np.mean(c["fine_tuned"]) - np.mean(c["base"])), "n": len(c["base"])}
            for key, c in sorted(table.items())}


def summarise(references: list[str], base: ModelScores, tuned: ModelScores, *, samples: int = 1000,
              confidence: float = 0.95) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Aggregate metrics of both models with bootstrap CIs and the paired delta (fine-tuned - base).

    Returns (summary, per-example scores of base, per-example scores of fine-tuned). Perplexity's
    interval is exp() of the loss interval (exp is monotone, so it is the same bootstrap).
    """
    base_scores = [score_example(p, r) for p, r in zip(base.predictions, references, strict=True)]
    tuned_scores = [score_example(p, r) for p, r in zip(tuned.predictions, references, strict=True)]
    base_cols, tuned_cols = _metric_columns(base_scores, base), _metric_columns(tuned_scores, tuned)
    out: dict[str, Any] = {"base": {}, "fine_tuned": {}, "delta": {},
                           "ci": {"base": {}, "fine_tuned": {}, "delta": {}}, "confidence": confidence}
    for name, (b_vals, weights) in base_cols.items():
        t_vals = tuned_cols[name][0]
        out["base"][name] = weighted_mean(b_vals, weights)
        out["fine_tuned"][name] = weighted_mean(t_vals, weights)
        out["delta"][name] = out["fine_tuned"][name] - out["base"][name]
        kw = {"samples": samples, "confidence": confidence}
        out["ci"]["base"][name] = bootstrap_ci(b_vals, weights, **kw).as_dict()
        out["ci"]["fine_tuned"][name] = bootstrap_ci(t_vals, weights, **kw).as_dict()
        out["ci"]["delta"][name] = paired_bootstrap_ci(b_vals, t_vals, weights, **kw).as_dict()
    for model in ("base", "fine_tuned"):
        out[model]["perplexity"] = math.exp(out[model]["loss"])
        out["ci"][model]["perplexity"] = {k: math.exp(v) for k, v in out["ci"][model]["loss"].items()}
    out["delta"]["perplexity"] = out["fine_tuned"]["perplexity"] - out["base"]["perplexity"]
    b_loss, weights = base_cols["loss"]
    out["ci"]["delta"]["perplexity"] = paired_bootstrap_ci(
        b_loss, tuned_cols["loss"][0], weights, samples=samples, confidence=confidence, transform=np.exp).as_dict()
    out["n_json"] = sum("json_valid" in s for s in base_scores)
    out["per_field"] = _per_field(base_scores, tuned_scores)
    return out, base_scores, tuned_scores


def _fmt_ci(ci: dict[str, float]) -> str:
    return f"[{ci['low']:+.3f}, {ci['high']:+.3f}]"


def gate(metrics: dict[str, Any], cfg: Any) -> tuple[bool, list[str]]:
    """Should the fine-tuned adapter be promoted? One sentence per criterion, each with its numbers.

    Passes when, on `cfg.primary_metric`, the fine-tuned model improves on the base by at least
    `cfg.min_improvement` AND the lower end of the paired-bootstrap interval of that improvement is
    above 0 (so a lucky small test set does not pass), AND the probe-set loss rose by at most
    `cfg.max_forgetting` nats/token. For loss/perplexity an improvement is a decrease.
    `cfg` is an EvaluateConfig (anything with primary_metric, min_improvement, max_forgetting).
    """
    name = cfg.primary_metric
    reasons: list[str] = []
    ok = True
    if name not in metrics.get("base", {}) or name not in metrics.get("fine_tuned", {}):
        reasons.append(f"primary metric '{name}' is not in the metrics (have: "
                       f"{', '.join(sorted(metrics.get('base', {}))) or 'none'}); FAIL.")
        ok = False
    else:
        sign = 1.0 if HIGHER_IS_BETTER.get(name, True) else -1.0
        base, tuned = metrics["base"][name], metrics["fine_tuned"][name]
        gain = sign * (tuned - base)
        enough = gain >= cfg.min_improvement - FLOAT_SLACK
        reasons.append(f"{name}: fine-tuned {tuned:.4f} vs base {base:.4f}, improvement {gain:+.4f} "
                       f"{'>=' if enough else '<'} the required {cfg.min_improvement:+.4f}; "
                       f"{'pass' if enough else 'FAIL'}.")
        ci = metrics.get("ci", {}).get("delta", {}).get(name)
        if ci is None or any(v is None or math.isnan(v) for v in ci.values()):
            reasons.append(f"{name}: no confidence interval of the improvement; FAIL.")
            ok = False
        else:
            interval = {"low": sign * ci["low"], "high": sign * ci["high"]}
            interval = {"low": min(interval.values()), "high": max(interval.values())}
            sure = interval["low"] > 0
            level = metrics.get("confidence", 0.95)  # the level the interval was computed at (evaluate)
            reasons.append(f"{name}: {level:.0%} interval of the improvement {_fmt_ci(interval)} "
                           f"{'lies above' if sure else 'does not lie above'} 0; {'pass' if sure else 'FAIL'}.")
            ok = ok and sure
        ok = ok and enough
    within, reason = forgetting_rule(metrics.get("forgetting"), metrics.get("probe", {}), cfg.max_forgetting,
                                     ("base", "base_loss"), ("fine-tuned", "fine_tuned_loss"))
    reasons.append(reason)
    return ok and within, reasons


def forgetting_rule(forgetting: float | None, probe: dict[str, Any], bound: float, before: tuple[str, str],
                    after: tuple[str, str]) -> tuple[bool, str]:
    """The forgetting rule of a gate: the probe-set loss may rise by at most `bound` nats/token. `before` and
    `after` are (label, key in `probe`) of the two models' probe losses, shown when both are there. None or NaN
    (nothing measured) fails."""
    if forgetting is None or math.isnan(forgetting):
        return False, "forgetting: no probe-set loss was measured; FAIL."
    within = forgetting <= bound
    detail = (f" ({before[0]} {probe[before[1]]:.4f} -> {after[0]} {probe[after[1]]:.4f})"
              if {before[1], after[1]} <= probe.keys() else "")
    return within, (f"forgetting: probe-set loss changed by {forgetting:+.4f} nats/token{detail}, "
                    f"{'within' if within else 'over'} the bound {bound:.4f}; {'pass' if within else 'FAIL'}.")


# ----------------------------------------------------------------------------------------------- alignment


def preference_scores(sft_margins: Sequence[float], aligned_margins: Sequence[float], beta: float, *,
                      samples: int = 1000, confidence: float = 0.95) -> dict[str, Any]:
    """Held-out preference metrics of the SFT and the aligned model from their per-pair log-likelihood margins.

    A model's margin on a pair is m = log p(chosen | prompt) - log p(rejected | prompt), in nats summed over the
    answer tokens. Per model: accuracy = share of pairs with m > 0 (the model ranks the chosen answer first; a tie
    is not a win) and the mean margin. The aligned model's implicit reward against its reference, the SFT model,
    is r(x, y) = beta * log(p_aligned(y | x) / p_sft(y | x)) (Rafailov et al. 2023, eq. 5), so its reward margin on a
    pair is beta * (m_aligned - m_sft): `implicit_reward` holds the share of pairs where it is positive and its mean,
    i.e. TRL's rewards/accuracies and rewards/margins on held-out pairs. (The SFT model's implicit reward against
    itself is 0 on every pair, which is why the two models are compared on the likelihood ranking.) Intervals are
    percentile bootstraps; the deltas resample the same pairs for both models (paired_bootstrap_ci)."""
    sft, aligned = np.asarray(sft_margins, dtype=float), np.asarray(aligned_margins, dtype=float)
    kw = {"samples": samples, "confidence": confidence}
    cols = {"accuracy": ((sft > 0).astype(float), (aligned > 0).astype(float)), "margin": (sft, aligned)}
    out: dict[str, Any] = {"n_pairs": int(sft.size), "confidence": confidence, "sft": {}, "aligned": {}, "delta": {},
                           "ci": {"sft": {}, "aligned": {}, "delta": {}}}
    for name, (a, b) in cols.items():
        out["sft"][name], out["aligned"][name] = float(a.mean()), float(b.mean())
        out["delta"][name] = out["aligned"][name] - out["sft"][name]
        out["ci"]["sft"][name] = bootstrap_ci(a, **kw).as_dict()
        out["ci"]["aligned"][name] = bootstrap_ci(b, **kw).as_dict()
        out["ci"]["delta"][name] = paired_bootstrap_ci(a, b, **kw).as_dict()
    reward = beta * (aligned - sft)
    out["implicit_reward"] = {
        "beta": beta, "accuracy": float((reward > 0).mean()), "margin": float(reward.mean()),
        "ci": {"accuracy": bootstrap_ci((reward > 0).astype(float), **kw).as_dict(),
               "margin": bootstrap_ci(reward, **kw).as_dict()},
    }
    return out


def alignment_gate(metrics: dict[str, Any], cfg: Any, primary_metric: str) -> tuple[bool, list[str]]:
    """May the aligned adapter replace the SFT one? One sentence per criterion, each with its numbers.

    Passes when (1) the aligned model's held-out preference accuracy beats the SFT model's by at least
    `cfg.min_preference_gain` and the lower end of the paired bootstrap interval of that gain is above 0, (2) on
    `primary_metric` over the SFT test split the aligned model is at most `cfg.max_task_drop` worse than the SFT
    model (point estimate; for loss/perplexity worse is higher), and (3) the probe-set loss rose from SFT to aligned
    by at most `cfg.max_forgetting` nats/token. `cfg` is an AlignGateConfig; `metrics` the content of
    alignment_metrics.json (pipelines.evaluate_alignment). Missing evidence fails."""
    reasons: list[str] = []
    ok = True
    pref = metrics.get("preference") or {}
    gain, ci = pref.get("delta", {}).get("accuracy"), pref.get("ci", {}).get("delta", {}).get("accuracy")
    if gain is None or ci is None or any(v is None or math.isnan(v) for v in (gain, *ci.values())):
        reasons.append("preference accuracy: no held-out pairs were measured; FAIL.")
        ok = False
    else:
        enough = gain >= cfg.min_preference_gain - FLOAT_SLACK
        sure = ci["low"] > 0
        level = pref.get("confidence", 0.95)
        reasons.append(f"preference accuracy: aligned {pref['aligned']['accuracy']:.4f} vs SFT "
                       f"{pref['sft']['accuracy']:.4f} on {pref.get('n_pairs')} held-out pairs, gain {gain:+.4f} "
                       f"{'>=' if enough else '<'} the required {cfg.min_preference_gain:+.4f}; "
                       f"{'pass' if enough else 'FAIL'}.")
        reasons.append(f"preference accuracy: {level:.0%} interval of the gain {_fmt_ci(ci)} "
                       f"{'lies above' if sure else 'does not lie above'} 0; {'pass' if sure else 'FAIL'}.")
        ok = ok and enough and sure
    task = metrics.get("task") or {}
    if primary_metric not in task.get("sft", {}) or primary_metric not in task.get("aligned", {}):
        reasons.append(f"task: '{primary_metric}' was not measured on the SFT test split; FAIL.")
        ok = False
    else:
        sign = 1.0 if HIGHER_IS_BETTER.get(primary_metric, True) else -1.0
        sft, aligned = task["sft"][primary_metric], task["aligned"][primary_metric]
        drop = sign * (sft - aligned)
        within = drop <= cfg.max_task_drop + FLOAT_SLACK
        reasons.append(f"task: {primary_metric} aligned {aligned:.4f} vs SFT {sft:.4f} on {task.get('n_test')} test "
                       f"rows, a drop of {drop:+.4f}, {'within' if within else 'over'} the allowed "
                       f"{cfg.max_task_drop:.4f}; {'pass' if within else 'FAIL'}.")
        ok = ok and within
    within, reason = forgetting_rule(task.get("forgetting"), task.get("probe", {}), cfg.max_forgetting,
                                     ("SFT", "sft_loss"), ("aligned", "aligned_loss"))
    reasons.append(reason)
    return ok and within, reasons


# ------------------------------------------------------------------------------------------------ champion


def champion_shortfall(comparison: dict[str, Any], primary_metric: str) -> float | None:
    """How much worse the candidate is than the champion on `primary_metric` (negative: better), in the metric's
    units; None when the comparison holds no value of it for both."""
    champion = comparison.get("champion", {}).get(primary_metric)
    candidate = comparison.get("candidate", {}).get(primary_metric)
    if champion is None or candidate is None or math.isnan(champion) or math.isnan(candidate):
        return None
    sign = 1.0 if HIGHER_IS_BETTER.get(primary_metric, True) else -1.0
    return sign * (champion - candidate)


def champion_gate(comparison: dict[str, Any] | None, primary_metric: str, margin: float) -> tuple[bool, list[str]]:
    """May the candidate replace the champion (the adapter promoted before)? One sentence with its numbers.

    Passes when, on `primary_metric` over the same test rows, the candidate is at most `margin` worse than the
    champion (point estimate, as align.gate.max_task_drop; for loss/perplexity worse is higher); the paired bootstrap
    interval of candidate - champion is quoted as evidence. A comparison that was not made (no champion yet, the
    champion is this very adapter, it was trained on another base model, or it does not load: `compared` false with a
    `reason`) passes with that reason. `comparison` is the `champion` section of metrics.json or
    alignment_metrics.json (pipelines.champion); None, or a comparison without the metric, fails."""
    if not comparison:
        return False, ["champion: no comparison with the champion was measured; FAIL."]
    if not comparison.get("compared"):
        return True, [f"champion: no champion comparison ({comparison.get('reason') or 'no reason recorded'}); pass."]
    shortfall = champion_shortfall(comparison, primary_metric)
    if shortfall is None:
        return False, [f"champion: '{primary_metric}' was not measured for both the candidate and the champion; FAIL."]
    champion, candidate = comparison["champion"][primary_metric], comparison["candidate"][primary_metric]
    within = shortfall <= margin + FLOAT_SLACK
    how = (f"{shortfall:.4f} worse" if shortfall > FLOAT_SLACK else f"{-shortfall:.4f} better"
           if shortfall < -FLOAT_SLACK else "equal")
    ci = comparison.get("ci", {}).get("delta", {}).get(primary_metric)
    level = comparison.get("confidence", 0.95)
    interval = f" ({level:.0%} interval of candidate - champion {_fmt_ci(ci)})" if ci else ""
    return within, [f"champion: {primary_metric} candidate {candidate:.4f} vs champion {champion:.4f} on "
                    f"{comparison.get('n_test')} test rows{interval}, {how}, {'within' if within else 'more than'} "
                    f"the allowed margin {margin:.4f}; {'pass' if within else 'FAIL'}."]
