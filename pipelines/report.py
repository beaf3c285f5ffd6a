"""Rendering of the evaluation report: plots (PNG bytes), one self-contained HTML page, its Markdown twin.

Pure: takes the measured numbers, returns bytes and strings; `pipelines.evaluate.run` writes them.

    python -m pipelines evaluate   # writes data/evaluation/report.html and report.md

The HTML page embeds its plots as base64 PNG and its CSS inline, so it opens offline, from an e-mail
attachment or a CI artifact alike; the Markdown twin references the same plots as files beside it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.metrics import HIGHER_IS_BETTER, METRICS

LABELS = {"exact_match": "Exact match", "rouge_l": "ROUGE-L (F1)", "json_valid": "Valid JSON rate",
          "field_accuracy": "JSON field accuracy", "loss": "Completion loss (nats/token)",
          "perplexity": "Perplexity"}
CAPTIONS = {"metrics.png": "Metrics, base vs fine-tuned", "loss_curve.png": "Loss curves",
            "token_hist.png": "Token lengths"}
NO_LOSS_CURVE = "No loss curves: the adapter folder has no readable train_log.json (HF Trainer log_history)."
CELL_CHARS = 400  # longer prompts/answers are cut in the example tables (the full text is in examples.jsonl)


@dataclass
class ReportContext:
    metrics: dict[str, Any]  # the content of metrics.json
    best: list[dict[str, Any]] = field(default_factory=list)  # example records (see evaluate._example_records)
    worst: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[dict[str, float]] = field(default_factory=list)  # [{step, loss}]
    eval_loss: list[dict[str, float]] = field(default_factory=list)
    token_histogram: dict[str, list[float]] | None = None  # {edges (n+1), counts (n)}
    histogram_source: str = ""
    base_model: str = ""
    adapter: str = ""


# ------------------------------------------------------------------------------------------ plots


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend needed

    return Figure(figsize=(width, height), dpi=100, layout="tight")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same plot, same bytes
    return buf.getvalue()


def plot_loss_curve(train: Sequence[dict[str, float]], evals: Sequence[dict[str, float]]) -> bytes | None:
    if not train and not evals:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if train:
        ax.plot([p["step"] for p in train], [p["loss"] for p in train], label="training loss", color="#1f77b4")
    if evals:
        ax.plot([p["step"] for p in evals], [p["loss"] for p in evals], "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_token_histogram(hist: dict[str, list[float]] | None) -> bytes | None:
    if not hist or not hist.get("counts"):
        return None
    edges, counts = hist["edges"], hist["counts"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)], align="edge",
           color="#7f7f7f", edgecolor="white")
    ax.set_xlabel("tokens per example (chat template included)")
    ax.set_ylabel("examples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Token length of the data")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_metrics(metrics: dict[str, Any]) -> bytes | None:
    """Base vs fine-tuned bars with their confidence intervals, for the 0..1 metrics."""
    names = [m for m in METRICS if HIGHER_IS_BETTER[m] and m in metrics.get("base", {})]
    if not names:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.38
    for offset, model, color in ((-width / 2, "base", "#aec7e8"), (width / 2, "fine_tuned", "#1f77b4")):
        values = [metrics[model][m] for m in names]
        cis = [metrics.get("ci", {}).get(model, {}).get(m, {"low": v, "high": v})
               for m, v in zip(names, values, strict=True)]
        pairs = list(zip(values, cis, strict=True))
        errors = [[max(v - c["low"], 0) for v, c in pairs], [max(c["high"] - v, 0) for v, c in pairs]]  # (2, n)
        bars = ax.bar([i + offset for i in range(len(names))], values, width, yerr=errors, capsize=3, color=color,
                      label=model.replace("_", "-"))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)  # a 0 bar is otherwise invisible
    ax.set_xticks(range(len(names)), [LABELS[m] for m in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Base vs fine-tuned ({metrics.get('confidence', 0.95):.0%} bootstrap intervals)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _png(fig)


def plots(ctx: ReportContext) -> dict[str, bytes]:
    """File name -> PNG bytes, for the plots that have data."""
    made = {"metrics.png": plot_metrics(ctx.metrics), "loss_curve.png": plot_loss_curve(ctx.train_loss, ctx.eval_loss),
            "token_hist.png": plot_token_histogram(ctx.token_histogram)}
    return {name: png for name, png in made.items() if png}


# ----------------------------------------------------------------------------------- formatting


def _num(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def _signed(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.2f}" if metric == "perplexity" else f"{value:+.3f}"


def _ci(ci: dict[str, float] | None, metric: str, signed: bool = False) -> str:
    if not ci:
        return ""
    f = _signed if signed else _num
    return f"[{f(ci['low'], metric)}, {f(ci['high'], metric)}]"


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """One row per metric present: label, base, fine-tuned, delta (each with its interval), verdict."""
    rows = []
    ci = metrics.get("ci", {})
    for m in METRICS:
        if m not in metrics.get("base", {}):
            continue
        delta = metrics["delta"][m]
        d_ci = ci.get("delta", {}).get(m)
        sign = 1 if HIGHER_IS_BETTER[m] else -1
        verdict = ""
        if d_ci:  # judged on the interval, not the point: "better" only if the whole CI is an improvement
            lo, hi = sorted((sign * d_ci["low"], sign * d_ci["high"]))
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear change"
        rows.append({
            "metric": LABELS[m] + (" (primary)" if m == metrics.get("primary_metric") else ""),
            "base": f"{_num(metrics['base'][m], m)} {_ci(ci.get('base', {}).get(m), m)}".strip(),
            "fine_tuned": f"{_num(metrics['fine_tuned'][m], m)} {_ci(ci.get('fine_tuned', {}).get(m), m)}".strip(),
            "delta": f"{_signed(delta, m)} {_ci(d_ci, m, signed=True)}".strip(),
            "verdict": verdict,
        })
    return rows


def _md_cell(text: Any, limit: int = CELL_CHARS) -> str:
    s = str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return html.escape(s, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def metric_table_markdown(metrics: dict[str, Any]) -> str:
    level = f"{metrics.get('confidence', 0.95):.0%}"
    lines = [f"| metric | base [{level} CI] | fine-tuned [{level} CI] | delta [{level} CI] | |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['base']} | {r['fine_tuned']} | {r['delta']} | {r['verdict']} |"
              for r in metric_rows(metrics)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ champion
# The candidate beside the champion (the adapter promoted before) and the model it was first compared with (the base
# in the evaluation report, the SFT model in the alignment report), from the `champion` section of the metrics file
# (pipelines.champion).


def _verdict(ci: dict[str, float] | None, metric: str) -> str:
    if not ci:
        return ""
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    lo, hi = sorted((sign * ci["low"], sign * ci["high"]))
    return "better" if lo > 0 else "worse" if hi < 0 else "no clear change"


Reference = tuple[str, dict[str, Any]] | None  # (label, metric -> value) of the model first compared with, if any


def champion_rows(section: dict[str, Any], reference: Reference) -> list[list[str]]:
    """One row per metric measured for both: the reference model's value (when there is one), the champion's and the
    candidate's with their intervals, candidate - champion with its paired interval, a verdict."""
    rows = []
    ci = section.get("ci", {})
    for m in METRICS:
        if m not in section.get("champion", {}) or m not in section.get("candidate", {}):
            continue
        d_ci = ci.get("delta", {}).get(m)
        rows.append({
            "metric": LABELS[m] + (" (primary)" if m == section.get("primary_metric") else ""),
            "reference": _num(reference[1].get(m), m) if reference else None,
            "champion": f"{_num(section['champion'][m], m)} {_ci(ci.get('champion', {}).get(m), m)}".strip(),
            "candidate": f"{_num(section['candidate'][m], m)} {_ci(ci.get('candidate', {}).get(m), m)}".strip(),
            "delta": f"{_signed(section['delta'][m], m)} {_ci(d_ci, m, signed=True)}".strip(),
            "verdict": _verdict(d_ci, m),
        })
    keys = ("metric", *(("reference",) if reference else ()), "champion", "candidate", "delta", "verdict")
    return [[r[k] for k in keys] for r in rows]


def champion_header(section: dict[str, Any], reference: Reference, candidate_label: str) -> list[str]:
    level = f"{section.get('confidence', 0.95):.0%}"
    return ["metric", *((reference[0],) if reference else ()), f"champion [{level} CI]",
            f"{candidate_label} (candidate) [{level} CI]", f"candidate - champion [{level} CI]", ""]


def champion_decision(section: dict[str, Any]) -> tuple[str, list[str], str]:
    """(verdict, the rule's sentences, css class) of the champion comparison."""
    g = section.get("gate", {})
    if not section.get("compared"):
        return "NOT COMPARED: no champion comparison", list(g.get("reasons", [])), "muted"
    margin = g.get("champion_margin")
    if g.get("passed"):
        return (f"PASSED: not worse than the champion by more than evaluate.champion_margin ({margin:g})",
                list(g.get("reasons", [])), "pass")
    return (f"FAILED: worse than the champion by more than evaluate.champion_margin ({margin:g}); not promoted",
            list(g.get("reasons", [])), "fail")


def champion_intro(section: dict[str, Any]) -> str:
    """Which champion, how it was loaded, on how many rows; or why there was no comparison."""
    if not section.get("compared"):
        return f"No champion comparison: {section.get('reason')}."
    which = {"sft": "an SFT adapter", "aligned": "an aligned adapter"}.get(section.get("promoted_adapter"),
                                                                          "an adapter")
    sha = section.get("promoted_sha256") or section.get("weights_sha256") or ""
    return (f"Champion: `{section.get('path')}` ({which} promoted before, content hash {str(sha)[:12]}), loaded as "
            f"{section.get('loaded_as')}; the same {section.get('n_test')} test rows, greedy decoding. The champion "
            "is read as it is when this stage runs (not a DVC dependency).")


def champion_table_markdown(section: dict[str, Any], reference: Reference, candidate_label: str = "fine-tuned") -> str:
    """The side-by-side table (reference model, champion, candidate) as Markdown, or the sentence saying why there
    is none."""
    if not section.get("compared"):
        return champion_intro(section)
    header = champion_header(section, reference, candidate_label)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in champion_rows(section, reference)]
    return "\n".join(lines)


def champion_markdown(section: dict[str, Any] | None, reference: Reference, candidate_label: str) -> list[str]:
    """The report's champion section as Markdown lines."""
    if not section:
        return []
    verdict, reasons, _ = champion_decision(section)
    out = [f"## Champion: {verdict}", "", champion_intro(section), ""] + [f"- {r}" for r in reasons] + [""]
    if section.get("compared"):
        out += [champion_table_markdown(section, reference, candidate_label), "",
                "Delta = candidate - champion; intervals are paired bootstrap intervals over the test rows.", ""]
    return out


def champion_html(section: dict[str, Any] | None, reference: Reference, candidate_label: str) -> list[str]:
    """The report's champion section as HTML parts."""
    if not section:
        return []
    verdict, reasons, cls = champion_decision(section)
    parts = [f"<h2>Champion: <span class=\"{cls}\">{_e(verdict)}</span></h2>", f"<p>{_e(champion_intro(section))}</p>",
             "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>"]
    if section.get("compared"):
        header = champion_header(section, reference, candidate_label)
        parts += [_table(header, champion_rows(section, reference), classes=["", *["num"] * (len(header) - 2), ""]),
                  "<p class=\"muted\">Delta = candidate - champion; intervals are paired bootstrap intervals over the "
                  "test rows.</p>"]
    return parts


def _prompt_text(record: dict[str, Any]) -> str:
    """The conversation before the answer, one 'role: content' per turn (the template is in examples.jsonl)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in record.get("messages", []))


def _gate_lines(metrics: dict[str, Any]) -> tuple[str, list[str]]:
    g = metrics.get("gate", {})
    verdict = "PASSED: the adapter may be promoted" if g.get("passed") else "FAILED: the adapter is not promoted"
    return verdict, list(g.get("reasons", []))


def _per_field_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [[key, f"{v['base']:.3f}", f"{v['fine_tuned']:.3f}", f"{v['delta']:+.3f}", str(v["n"])]
            for key, v in metrics.get("per_field", {}).items()]


def _probe_line(metrics: dict[str, Any]) -> str:
    p = metrics.get("probe", {})
    if not p:
        return "No probe-set loss was measured."
    ci = p.get("forgetting_ci", {})
    ci_text = f" ({metrics.get('confidence', 0.95):.0%} CI [{ci['low']:+.4f}, {ci['high']:+.4f}])" if ci else ""
    return (f"General-instruction probe ({p['n']} examples, {p['n_tokens']} answer tokens): loss base "
            f"{p['base_loss']:.4f} -> fine-tuned {p['fine_tuned_loss']:.4f} nats/token, change "
            f"{metrics['forgetting']:+.4f}{ci_text}; allowed rise {p['max_forgetting']:.4f}.")


def has_reasoning(metrics: dict[str, Any]) -> bool:
    """Did any reference or output carry reasoning (then answers were extracted and the report shows both)?"""
    r = metrics.get("reasoning", {})
    return any(r.get(side, {}).get("with_reasoning", 0) for side in ("reference", "base", "fine_tuned"))


def _example_cells(r: dict[str, Any], answers: bool = False) -> list[str]:
    cells = [_prompt_text(r), r["reference"], r["base"]["output"] or "(empty)", r["fine_tuned"]["output"] or "(empty)"]
    if answers:  # the extracted final answers, which exact match and the task metrics compared
        cells += [r.get("reference_answer", r["reference"]), r["base"].get("answer", r["base"]["output"]) or "(none)",
                  r["fine_tuned"].get("answer", r["fine_tuned"]["output"]) or "(none)"]
    return cells + [f"{r['base']['rouge_l']:.2f} / {r['fine_tuned']['rouge_l']:.2f}"]


EXAMPLE_HEADER = ["prompt", "reference", "base output", "fine-tuned output", "ROUGE-L base / fine-tuned"]
ANSWER_HEADER = ["reference answer", "base answer", "fine-tuned answer"]  # extracted (chain-of-thought rows)


def example_header(answers: bool = False) -> list[str]:
    return EXAMPLE_HEADER[:4] + (ANSWER_HEADER if answers else []) + EXAMPLE_HEADER[4:]


REASONING_HEADER = ["", "rows with reasoning", "no answer (cut off while reasoning)", "reasoning tokens: mean",
                    "max"]


def reasoning_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows with reasoning, rows without an answer, and the reasoning length (tokens) per side."""
    r = metrics.get("reasoning", {})
    return [[label, str(s["with_reasoning"]), str(s["no_answer"]), f"{s['reasoning_tokens_mean']:.1f}",
             str(s["reasoning_tokens_max"])]
            for side, label in (("reference", "reference"), ("base", "base"), ("fine_tuned", "fine-tuned"))
            if (s := r.get(side))]


REASONING_NOTE = ("Answers with reasoning (<think> blocks, a final 'Answer:' line, ...) are scored on their extracted "
                  "final answer (evaluate.reasoning_pattern, evaluate.answer_patterns); texts without reasoning as "
                  "they are. The loss covers the whole answer, reasoning included. Lengths are tokens of the "
                  "evaluation tokenizer.")
BREAKDOWN_METRICS = ("exact_match", "rouge_l", "field_accuracy", "loss")  # shown per value, after the primary


def _change(entry: dict[str, Any], m: str) -> str:
    if m not in entry.get("base", {}):
        return "n/a"
    ci = entry.get("ci", {}).get("delta", {}).get(m)
    return (f"{_num(entry['base'][m], m)} → {_num(entry['fine_tuned'][m], m)} "
            f"({_signed(entry['delta'][m], m)} {_ci(ci, m, signed=True)})").replace(" )", ")")


def breakdown_tables(metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) per evaluate.breakdown_by field: one row per value with n and, per metric,
    base -> fine-tuned (delta [paired CI])."""
    tables = []
    for name, part in metrics.get("breakdown", {}).items():
        values = part.get("values", [])
        shown = [m for m in dict.fromkeys([metrics.get("primary_metric", "exact_match"), *BREAKDOWN_METRICS])
                 if m != "perplexity" and any(m in v.get("base", {}) for v in values)]
        header = [name, "n", *(f"{LABELS[m]}: base → fine-tuned (delta [CI])" for m in shown)]
        rows = [[str(v["value"]), str(v["n"]), *(_change(v, m) for m in shown)] for v in values]
        left = part.get("left_out", {})
        note = (f"{left['values']} more values ({left['rows']} rows) are not shown." if left.get("values") else "")
        tables.append((f"Metrics per {name}", header, rows, note))
    return tables


def breakdown_markdown(metrics: dict[str, Any]) -> list[str]:
    """The breakdown tables as Markdown blocks (heading, table, note)."""
    blocks = []
    for title, header, rows, note in breakdown_tables(metrics):
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        blocks.append("\n".join(lines + ([f"\n{note}"] if note else [])))
    return blocks


# ------------------------------------------------------------------------------------- markdown


def render_markdown(ctx: ReportContext, images: Sequence[str]) -> str:
    """The report as Markdown; `images` are PNG file names in the same folder."""
    m = ctx.metrics
    verdict, reasons = _gate_lines(m)
    out = ["# Evaluation: base vs fine-tuned", "",
           f"Base model `{ctx.base_model}`, adapter `{ctx.adapter}`, {m['n_test']} test examples "
           f"({m.get('n_json', 0)} with a JSON reference), greedy decoding.", "",
           f"## Promotion gate: {verdict}", ""]
    out += [f"- {r}" for r in reasons] + ["", "## Metrics", "", metric_table_markdown(m), "",
                                          "Delta = fine-tuned - base; intervals are paired bootstrap intervals "
                                          "over test examples.", ""]
    fields = _per_field_rows(m)
    if fields:
        out += ["### JSON per-field accuracy", "", "| field | base | fine-tuned | delta | n |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in fields] + [""]
    for block in breakdown_markdown(m):
        out += [block, ""]
    if has_reasoning(m):
        out += ["## Reasoning", "", REASONING_NOTE, "", "| " + " | ".join(REASONING_HEADER) + " |",
                "|" + "---|" * len(REASONING_HEADER)]
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in reasoning_rows(m)] + [""]
    out += champion_markdown(m.get("champion"), ("base", m["base"]), "fine-tuned")
    out += ["## Forgetting", "", _probe_line(m), ""]
    for name in images:
        out += [f"## {CAPTIONS.get(name, name)}", "", f"![{CAPTIONS.get(name, name)}]({name})", ""]
    if "token_hist.png" in images and ctx.histogram_source:
        out += [f"Token histogram from {ctx.histogram_source}.", ""]
    if "loss_curve.png" not in images:
        out += [NO_LOSS_CURVE, ""]
    answers = has_reasoning(m)
    header = example_header(answers)
    for title, records in (("Best examples (fine-tuned)", ctx.best), ("Worst examples (fine-tuned)", ctx.worst)):
        if not records:
            continue
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_md_cell(c) for c in _example_cells(r, answers)) + " |" for r in records] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
td pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85rem;max-height:16rem;overflow:auto}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.better{color:#1a7f37}.worse{color:#cf222e}.muted{color:#666}
img{max-width:100%;height:auto}.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots figure{margin:0;flex:1 1 480px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _cut(text: Any, limit: int = CELL_CHARS) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, pre: bool = False,
           classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
            cells.append(f"<td{cls}><pre>{_e(_cut(c))}</pre></td>" if pre else f"<td{cls}>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(ctx: ReportContext, images: dict[str, bytes]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, no external request of any kind."""
    m = ctx.metrics
    verdict, reasons = _gate_lines(m)
    level = f"{m.get('confidence', 0.95):.0%}"
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>Evaluation: {_e(ctx.adapter)}</title><style>{CSS}</style></head><body>",
        "<h1>Evaluation: base vs fine-tuned</h1>",
        f"<p>Base model <code>{_e(ctx.base_model)}</code>, adapter <code>{_e(ctx.adapter)}</code>, "
        f"{m['n_test']} test examples ({m.get('n_json', 0)} with a JSON reference), greedy decoding.</p>",
        f"<h2>Promotion gate: <span class=\"{'pass' if m.get('gate', {}).get('passed') else 'fail'}\">"
        f"{_e(verdict)}</span></h2>",
        "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>",
        "<h2>Metrics</h2>",
    ]
    rows = metric_rows(m)
    parts.append(_table(["metric", f"base [{level} CI]", f"fine-tuned [{level} CI]", f"delta [{level} CI]", ""],
                        [[r["metric"], r["base"], r["fine_tuned"], r["delta"], r["verdict"]] for r in rows],
                        classes=["", "num", "num", "num", ""]))
    parts.append("<p class=\"muted\">Delta = fine-tuned - base; intervals are paired bootstrap intervals over "
                 "test examples.</p>")
    fields = _per_field_rows(m)
    if fields:
        parts += ["<h3>JSON per-field accuracy</h3>",
                  _table(["field", "base", "fine-tuned", "delta", "n"], fields,
                         classes=["", "num", "num", "num", "num"])]
    for title, header, rows, note in breakdown_tables(m):
        parts += [f"<h3>{_e(title)}</h3>", _table(header, rows, classes=["", "num", *["num"] * (len(header) - 2)])]
        if note:
            parts.append(f"<p class=\"muted\">{_e(note)}</p>")
    if has_reasoning(m):
        parts += ["<h2>Reasoning</h2>", f"<p class=\"muted\">{_e(REASONING_NOTE)}</p>",
                  _table(REASONING_HEADER, reasoning_rows(m), classes=["", "num", "num", "num", "num"])]
    parts += champion_html(m.get("champion"), ("base", m["base"]), "fine-tuned")
    parts += ["<h2>Forgetting</h2>", f"<p>{_e(_probe_line(m))}</p>"]
    if images:
        figs = []
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            caption = CAPTIONS.get(name, name)
            if name == "token_hist.png" and ctx.histogram_source:
                caption += f" (from {ctx.histogram_source})"
            figs.append(f"<figure><img alt=\"{_e(caption)}\" src=\"data:image/png;base64,{data}\">"
                        f"<figcaption class=\"muted\">{_e(caption)}</figcaption></figure>")
        parts += ["<h2>Plots</h2>", "<div class=\"plots\">" + "".join(figs) + "</div>"]
    if "loss_curve.png" not in images:
        parts.append(f"<p class=\"muted\">{_e(NO_LOSS_CURVE)}</p>")
    answers = has_reasoning(m)
    for title, records in (("Best examples (fine-tuned)", ctx.best), ("Worst examples (fine-tuned)", ctx.worst)):
        if records:
            parts += [f"<h2>{_e(title)}</h2>", _table(example_header(answers),
                                                      [_example_cells(r, answers) for r in records], pre=True)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- alignment
# The alignment report (pipelines.evaluate_alignment): SFT vs aligned, on held-out preference pairs and on the SFT
# test split. It reuses the table, CSS and plot helpers above; only the sections differ.

ALIGN_CAPTIONS = {"reward_margins.png": "Reward margin during preference tuning",
                  "preference.png": "Held-out preference accuracy, SFT vs aligned"}
PAIR_HEADER = ["prompt (last turn)", "chosen", "rejected", "SFT output", "aligned output",
               "margin SFT / aligned (nats)"]


@dataclass
class AlignmentContext:
    metrics: dict[str, Any]  # the content of alignment_metrics.json
    pairs: list[dict[str, Any]] = field(default_factory=list)  # held-out pairs with both models' generations
    reward_curve: dict[str, list[float]] = field(default_factory=dict)  # pipelines.align.reward_curve
    task_table: list[dict[str, str]] = field(default_factory=list)  # metric_rows() of the task summary


def plot_reward_margins(curve: dict[str, list[float]]) -> bytes | None:
    if not curve or not (curve.get("step") or curve.get("eval_step")):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if curve.get("step"):
        ax.plot(curve["step"], curve["margin"], label="training batches", color="#1f77b4")
    if curve.get("eval_step"):
        ax.plot(curve["eval_step"], curve["eval_margin"], "o-", label="validation pairs", color="#d62728")
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin (chosen - rejected)")
    ax.set_title("Implicit reward margin against the reference (TRL rewards/margins)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_preference(metrics: dict[str, Any]) -> bytes | None:
    pref = metrics.get("preference")
    if not pref:
        return None
    fig = _figure(4.8, 3.6)
    ax = fig.add_subplot()
    values = [pref["sft"]["accuracy"], pref["aligned"]["accuracy"]]
    cis = [pref["ci"]["sft"]["accuracy"], pref["ci"]["aligned"]["accuracy"]]
    errors = [[max(v - c["low"], 0) for v, c in zip(values, cis, strict=True)],
              [max(c["high"] - v, 0) for v, c in zip(values, cis, strict=True)]]  # (2, n)
    bars = ax.bar(["SFT", "aligned"], values, yerr=errors, capsize=4, color=["#aec7e8", "#1f77b4"])
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of pairs ranked correctly")
    ax.set_title(f"{pref['n_pairs']} held-out pairs ({pref.get('confidence', 0.95):.0%} intervals)")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def alignment_plots(ctx: AlignmentContext) -> dict[str, bytes]:
    made = {"preference.png": plot_preference(ctx.metrics), "reward_margins.png": plot_reward_margins(ctx.reward_curve)}
    return {name: png for name, png in made.items() if png}


def _pref_rows(metrics: dict[str, Any]) -> list[list[str]]:
    pref = metrics.get("preference")
    if not pref:
        return []
    ci = pref["ci"]
    rows = []
    for key, label in (("accuracy", "Preference accuracy (chosen ranked first)"),
                       ("margin", "Mean log-likelihood margin (nats)")):
        lo, hi = ci["delta"][key]["low"], ci["delta"][key]["high"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear change"
        rows.append([label, f"{pref['sft'][key]:.3f} {_ci(ci['sft'][key], key)}",
                     f"{pref['aligned'][key]:.3f} {_ci(ci['aligned'][key], key)}",
                     f"{pref['delta'][key]:+.3f} {_ci(ci['delta'][key], key, signed=True)}", verdict])
    reward = pref["implicit_reward"]
    rows.append([f"Implicit reward accuracy vs SFT (beta {reward['beta']:g})", "0 (its own reference)",
                 f"{reward['accuracy']:.3f} {_ci(reward['ci']['accuracy'], 'accuracy')}", "", ""])
    rows.append(["Implicit reward margin vs SFT", "0 (its own reference)",
                 f"{reward['margin']:+.3f} {_ci(reward['ci']['margin'], 'margin', signed=True)}", "", ""])
    return rows


def alignment_table_markdown(metrics: dict[str, Any]) -> str:
    if not metrics.get("preference"):
        return "No held-out preference pairs: the test split holds no prompt with both a chosen and a rejected answer."
    level = f"{metrics['preference'].get('confidence', 0.95):.0%}"
    lines = [f"| held-out pairs | SFT [{level} CI] | aligned [{level} CI] | delta [{level} CI] | |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _pref_rows(metrics)]
    return "\n".join(lines)


def _align_gate(metrics: dict[str, Any]) -> tuple[str, list[str]]:
    g = metrics.get("gate", {})
    if not g.get("applicable", True):
        verdict = "NOT APPLICABLE: no preference tuning, the SFT adapter stays the final one"
    else:
        verdict = ("PASSED: the aligned adapter may be promoted" if g.get("passed")
                   else "FAILED: the aligned adapter is not promoted")
    return verdict, list(g.get("reasons", []))


def _last_turn(messages: list[dict[str, Any]]) -> str:
    return messages[-1]["content"] if messages else ""


def _pair_cells(r: dict[str, Any]) -> list[str]:
    return [_last_turn(r["prompt"]), "\n".join(m["content"] for m in r["chosen"]),
            "\n".join(m["content"] for m in r["rejected"]), r.get("sft_output") or "(empty)",
            r.get("aligned_output") or "(empty)", f"{r['sft_margin']:+.2f} / {r['aligned_margin']:+.2f}"]


def _intro(metrics: dict[str, Any]) -> str:
    if not metrics.get("applicable", True):
        return f"No preference tuning: {metrics.get('reason', '')}"
    pref, task = metrics.get("preference") or {"n_pairs": 0}, metrics["task"]
    return (f"Method {metrics.get('method')} (loss {metrics.get('loss')}, beta {metrics.get('beta'):g}); reference "
            f"model: {metrics.get('reference')}. {pref['n_pairs']} held-out preference pairs, {task.get('n_test')} "
            "SFT test rows, greedy decoding. Log-likelihoods are summed over the answer tokens; a pair counts as "
            "ranked correctly when the chosen answer is strictly more likely.")


def _task_table_md(ctx: AlignmentContext) -> list[str]:
    lines = ["| metric | SFT [CI] | aligned [CI] | delta [CI] | |", "|---|---|---|---|---|"]
    return lines + [f"| {r['metric']} | {r['base']} | {r['fine_tuned']} | {r['delta']} | {r['verdict']} |"
                    for r in ctx.task_table]


def _forgetting_line(metrics: dict[str, Any]) -> str:
    task = metrics.get("task", {})
    p = task.get("probe", {})
    if not p:
        return "No probe-set loss was measured."
    ci = p.get("forgetting_ci", {})
    ci_text = f" (CI [{ci['low']:+.4f}, {ci['high']:+.4f}])" if ci else ""
    return (f"General-instruction probe ({p['n']} examples): loss SFT {p['sft_loss']:.4f} -> aligned "
            f"{p['aligned_loss']:.4f} nats/token, change {task['forgetting']:+.4f}{ci_text}.")


def _align_champion(m: dict[str, Any]) -> tuple[Reference, str]:
    """The champion table's reference column and candidate label: SFT and aligned, or (nothing trained) the SFT
    adapter as the candidate with no reference."""
    if m.get("applicable", True) and m.get("task"):
        return ("SFT", m["task"].get("sft", {})), "aligned"
    return None, "SFT"


def render_alignment_markdown(ctx: AlignmentContext, images: Sequence[str]) -> str:
    m = ctx.metrics
    verdict, reasons = _align_gate(m)
    out = ["# Alignment: SFT vs aligned", "", _intro(m), "", f"## Alignment gate: {verdict}", ""]
    out += [f"- {r}" for r in reasons] + [""]
    out += champion_markdown(m.get("champion"), *_align_champion(m))
    if m.get("applicable", True):
        out += ["## Held-out preference pairs", "", alignment_table_markdown(m), "",
                "Delta = aligned - SFT; intervals are paired bootstrap intervals over pairs.", "",
                "## Task metrics on the SFT test split", "", *_task_table_md(ctx), "", "## Forgetting", "",
                _forgetting_line(m), ""]
        for name in images:
            out += [f"## {ALIGN_CAPTIONS.get(name, name)}", "", f"![{ALIGN_CAPTIONS.get(name, name)}]({name})", ""]
        if ctx.pairs:
            out += [f"## {len(ctx.pairs)} held-out pairs side by side (the first by id)", "",
                    "| " + " | ".join(PAIR_HEADER) + " |", "|" + "---|" * len(PAIR_HEADER)]
            out += ["| " + " | ".join(_md_cell(c) for c in _pair_cells(r)) + " |" for r in ctx.pairs] + [""]
    return "\n".join(out)


def render_alignment_html(ctx: AlignmentContext, images: dict[str, bytes]) -> str:
    m = ctx.metrics
    verdict, reasons = _align_gate(m)
    g = m.get("gate", {})
    cls = "muted" if not g.get("applicable", True) else "pass" if g.get("passed") else "fail"
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<title>Alignment: SFT vs aligned</title><style>{CSS}</style></head><body>",
             "<h1>Alignment: SFT vs aligned</h1>", f"<p>{_e(_intro(m))}</p>",
             f"<h2>Alignment gate: <span class=\"{cls}\">{_e(verdict)}</span></h2>",
             "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>"]
    parts += champion_html(m.get("champion"), *_align_champion(m))
    if m.get("applicable", True):
        level = f"{(m.get('preference') or {}).get('confidence', 0.95):.0%}"
        parts += ["<h2>Held-out preference pairs</h2>",
                  _table(["held-out pairs", f"SFT [{level} CI]", f"aligned [{level} CI]", f"delta [{level} CI]", ""],
                         _pref_rows(m), classes=["", "num", "num", "num", ""]) if m.get("preference") else
                  f"<p>{_e(alignment_table_markdown(m))}</p>",
                  "<p class=\"muted\">Delta = aligned - SFT; intervals are paired bootstrap intervals over pairs.</p>",
                  "<h2>Task metrics on the SFT test split</h2>",
                  _table(["metric", "SFT [CI]", "aligned [CI]", "delta [CI]", ""],
                         [[r["metric"], r["base"], r["fine_tuned"], r["delta"], r["verdict"]] for r in ctx.task_table],
                         classes=["", "num", "num", "num", ""]),
                  "<h2>Forgetting</h2>", f"<p>{_e(_forgetting_line(m))}</p>"]
        if images:
            figs = []
            for name, png in images.items():
                data = base64.b64encode(png).decode("ascii")
                caption = ALIGN_CAPTIONS.get(name, name)
                figs.append(f"<figure><img alt=\"{_e(caption)}\" src=\"data:image/png;base64,{data}\">"
                            f"<figcaption class=\"muted\">{_e(caption)}</figcaption></figure>")
            parts += ["<h2>Plots</h2>", "<div class=\"plots\">" + "".join(figs) + "</div>"]
        if ctx.pairs:
            parts += [f"<h2>{len(ctx.pairs)} held-out pairs side by side (the first by id)</h2>",
                      _table(PAIR_HEADER, [_pair_cells(r) for r in ctx.pairs], pre=True)]
    parts.append("</body></html>\n")
    return "\n".join(parts)
