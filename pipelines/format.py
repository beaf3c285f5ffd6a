"""Format stage: render every cleaned conversation with the base model's chat template and apply the length policy.

    python -m pipelines format [--params params.yaml]

Reads `cleaned/examples.jsonl`, tokenises each row with `pipelines.chat.tokenize_conversation` (the one
place that decides tokens and the assistant loss mask), and writes `formatted/`:
    dataset.jsonl     the row + n_tokens, n_completion_tokens, truncated (+ prompt, completion strings
                      when format.output == prompt_completion)
    quarantine.jsonl  rows that cannot be trained on (overlong, no completion tokens, template failure)
    report.json       counts, token-length statistics, a histogram of n_tokens, "rendering": how many
                      rows each rendering adaptation touched (below), and "per_source": rows in, out and
                      quarantined per source file (replayed general rows, data.replay, under their own source)

Rendering (pipelines.chat, where each rule is documented): a row is rendered the way the base model's
template can render it, and every adaptation is counted in report.json "rendering" (input rows kept):
    untrained_tail_dropped     turns after the last trained assistant turn (weight 0) removed from the row
    opening_assistant_dropped  an opening assistant greeting the template cannot render
    system_merged              system text merged into the next user turn (template without a system role)
    turns_merged               consecutive same-role turns joined (template demands strict alternation)
    tools_in_system            tool schemas written into the system message (template ignores `tools`)
    control_token_text         special-token text inside a message, encoded as plain text
    history_expanded           a row the template renders with rewritten history (Qwen3, DeepSeek-R1
                               reasoning) became one row per trained assistant turn (`expanded_rows`
                               input rows; each new row has id `<id>-<k>` and `expanded_from`)
A row the template refuses even so is quarantined with rule `template` and the template's own message.

Rows longer than format.max_length are dropped (quarantined) or, with overlong: truncate, their prompt
side is shortened: whole early exchanges go first, then the final user message loses text from its
start. The final assistant answer and its end-of-turn token are never cut.

n_completion_tokens counts the tokens the loss is computed on: every trained assistant turn (weight 1 or
absent; a weight-0 turn is context only) for `messages` output, the last trained assistant turn only for
`prompt_completion` output (what a completion-only loss sees).

Rows are streamed in chunks and tokenised by a pool of worker processes, so memory stays flat and a
1M-row file uses every core.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import pandera.errors

from pipelines.chat import (
    CHANGES,
    RENDER_ERRORS,
    UNTRAINED_TAIL,
    Message,
    NotPrefixStable,
    TemplateError,
    TokenizedConversation,
    encode_text,
    expand_turns,
    render_prompt,
    tokenize_conversation,
)
from pipelines.config import FormatConfig, Params
from pipelines.io import StageError, StageResult, atomic_dir, chunked, claim_output, require, write_json
from pipelines.preflight import preflight
from pipelines.schemas import FormattedSchema, conversation_problem, describe_failures, trained, validate

log = logging.getLogger(__name__)

STAGE = "format"
CHUNK_ROWS = 1024  # rows per worker task: large enough to amortise IPC, small enough to keep memory flat
HISTOGRAM_BINS = 16  # equal-width bins over [0, max_length] tokens, fixed so runs are comparable
# Chat templates signal unrenderable conversations with these (raise_exception -> jinja2.TemplateError;
# tools that are not JSON -> ValueError).
_RENDER_ERRORS = (TemplateError, *RENDER_ERRORS)
HISTORY_EXPANDED = "history_expanded"  # rows of a history-rewriting template, one row per trained turn
RENDERING_RULES = (*CHANGES, HISTORY_EXPANDED)  # the report's "rendering" keys: rows each adaptation touched


@dataclass
class FormatResult:
    """Formatted rows, quarantined rows and how many rows the length policy touched."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0  # rows whose prompt side was shortened to fit max_length
    dropped: int = 0  # overlong rows quarantined (policy drop, or the answer alone does not fit)
    rows_in: int = 0
    rendering: Counter[str] = field(default_factory=Counter)  # input rows (kept) per adaptation, RENDERING_RULES
    expanded: int = 0  # input rows expanded into one row per trained turn (history-rewriting template)


# --------------------------------------------------------------------------------------------------
# Pure transforms
# --------------------------------------------------------------------------------------------------


def _excerpt(messages: Any) -> str:
    if not isinstance(messages, list):
        return str(messages)[:200]
    parts = [f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, dict)]
    return " | ".join(parts)[:200]


def _quarantine(row: dict[str, Any], rule: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": row.get("id"), "source": row.get("source"), "line": row.get("line"), "stage": STAGE,
        "rule": rule, "reason": reason, "excerpt": _excerpt(row.get("messages")), **extra,
    }


def _early_blocks(messages: list[Message], last_user: int) -> list[list[int]]:
    """Indices of the non-system turns before the final user message, grouped into exchanges.

    An exchange starts at a user turn and runs to the next one, so dropping whole exchanges keeps
    the user/assistant alternation that strict templates (Mistral, Gemma) insist on.
    """
    blocks: list[list[int]] = []
    for i in range(last_user):
        if messages[i]["role"] == "system":
            continue
        if not blocks or messages[i]["role"] == "user":
            blocks.append([])
        blocks[-1].append(i)
    return blocks


def truncate_prompt(tokenizer: Any, messages: list[Message], *, tools: str | list | None, max_length: int,
                    only_last: bool = False) -> tuple[list[Message], TokenizedConversation] | None:
    """Shorten the prompt side until the conversation fits `max_length` tokens, or None if it cannot.

    System messages, the turns after the final user message (tool calls and results) and the final
    assistant answer are kept verbatim; first whole early exchanges are dropped (as few as needed,
    found by bisection), then text is cut from the start of the final user message.
    """
    users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user"]
    if not users:
        return None
    last_user = users[-1]
    blocks = _early_blocks(messages, last_user)

    def without(k: int) -> list[Message]:
        gone = {i for block in blocks[:k] for i in block}
        return [m for i, m in enumerate(messages) if i not in gone]

    cache: dict[int, TokenizedConversation] = {}

    def tokens(k: int) -> TokenizedConversation:
        if k not in cache:
            cache[k] = tokenize_conversation(tokenizer, without(k), tools=tools, only_last=only_last)
        return cache[k]

    if blocks and tokens(len(blocks)).n_tokens <= max_length:
        lo, hi = 1, len(blocks)  # smallest number of dropped exchanges that fits; fits(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            if tokens(mid).n_tokens <= max_length:
                hi = mid
            else:
                lo = mid + 1
        return without(hi), tokens(hi)
    return _cut_final_user(tokenizer, without(len(blocks)), tokens(len(blocks)), tools=tools,
                           max_length=max_length, only_last=only_last)


def _cut_final_user(tokenizer: Any, messages: list[Message], tc: TokenizedConversation, *,
                    tools: str | list | None, max_length: int,
                    only_last: bool) -> tuple[list[Message], TokenizedConversation] | None:
    """Drop tokens from the start of the final user message until the conversation fits."""
    u = max(i for i, m in enumerate(messages[:-1]) if m["role"] == "user")
    messages = [dict(m) for m in messages]
    # Tokens merge differently in context than alone, so one cut may leave a token or two too many;
    # each pass removes at least the remaining excess, so a handful of passes always suffices.
    for _ in range(16):
        excess = tc.n_tokens - max_length
        if excess <= 0:
            return messages, tc
        content = messages[u]["content"]
        _, offsets = encode_text(tokenizer, content)  # the content's own tokens, special-token text as text
        if excess >= len(offsets):
            return None  # even an empty final user message leaves the row too long
        messages[u]["content"] = content[max(offsets[excess][0], 1):]
        tc = tokenize_conversation(tokenizer, messages, tools=tools, only_last=only_last)
    return None


def _format_conversation(row: dict[str, Any], messages: list[Message], tokenizer: Any,
                         cfg: FormatConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None, tuple[str, ...]]:
    """One conversation -> (formatted row, None, adaptations) or (None, quarantine record, ()).

    NotPrefixStable propagates (the caller expands the row); other template failures are quarantined.
    """
    tools = row.get("tools")
    only_last = cfg.output == "prompt_completion"
    truncated = False
    try:
        tc = tokenize_conversation(tokenizer, messages, tools=tools, only_last=only_last)
        if tc.n_completion_tokens == 0:
            return None, _quarantine(row, "no_completion",
                                     "no assistant token is left to train on after tokenisation"), ()
        if tc.n_tokens > cfg.max_length:
            fitted = None
            if cfg.overlong == "truncate":
                fitted = truncate_prompt(tokenizer, messages, tools=tools, max_length=cfg.max_length,
                                         only_last=only_last)
            if fitted is None:
                why = "overlong policy is 'drop'" if cfg.overlong == "drop" else "the answer alone does not fit"
                return None, _quarantine(
                    row, "overlong", f"{tc.n_tokens} tokens > format.max_length {cfg.max_length} ({why})",
                    n_tokens=tc.n_tokens,
                ), ()
            messages, tc = fitted
            truncated = True
        out = {**row, "messages": messages, "n_tokens": tc.n_tokens,
               "n_completion_tokens": tc.n_completion_tokens, "truncated": truncated}
        if only_last:
            prompt = render_prompt(tokenizer, messages, tools=tools)
            if not tc.text.startswith(prompt):
                raise TemplateError("the rendered prompt is not a prefix of the rendered conversation")
            out["prompt"], out["completion"] = prompt, tc.text[len(prompt):]
    except NotPrefixStable:
        raise
    except _RENDER_ERRORS as exc:
        return None, _quarantine(row, "template", f"the chat template refuses this row: {exc}"), ()
    return out, None, tc.changes


@dataclass
class RowOutcome:
    """What became of one input row: its formatted rows (several when expanded), quarantine records,
    and the rendering adaptations it needed (pipelines.chat.CHANGES, plus history_expanded)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    changes: set[str] = field(default_factory=set)


def format_row(row: dict[str, Any], tokenizer: Any, cfg: FormatConfig) -> RowOutcome:
    """One row -> its formatted row(s) and/or quarantine record(s).

    Turns after the last trained assistant turn (weight 0) are dropped from the row (they cannot change
    any loss). A conversation the template renders with rewritten history (NotPrefixStable: Qwen3,
    DeepSeek-R1) becomes one row per trained assistant turn (pipelines.chat.expand_turns), with ids
    `<id>-<k>` (k = 1, 2, ...) and `expanded_from: <id>`; each of them is formatted and length-checked
    on its own.
    """
    outcome = RowOutcome()
    messages = row.get("messages")
    problem = conversation_problem(messages)
    if problem is not None:
        outcome.quarantine.append(_quarantine(row, "invalid_conversation", problem))
        return outcome
    last = max(i for i, m in enumerate(messages) if trained(m))
    if last < len(messages) - 1:
        messages = messages[: last + 1]
        outcome.changes.add(UNTRAINED_TAIL)
    try:
        results = [_format_conversation(row, messages, tokenizer, cfg)]
    except NotPrefixStable:
        outcome.changes.add(HISTORY_EXPANDED)
        results = []
        for k, turns in enumerate(expand_turns(messages), start=1):
            sub_row = {**row, "id": f"{row.get('id')}-{k}", "expanded_from": row.get("id")}
            try:
                results.append(_format_conversation(sub_row, turns, tokenizer, cfg))
            except NotPrefixStable as exc:
                results.append((None, _quarantine(sub_row, "template", f"the chat template refuses this row: "
                                                  f"{exc}, even for its last turn alone"), ()))
    for out, bad, changes in results:
        if out is not None:
            outcome.rows.append(out)
            outcome.changes.update(changes)
        else:
            outcome.quarantine.append(bad)
    return outcome


def format_rows(rows: Iterable[dict[str, Any]], tokenizer: Any, cfg: FormatConfig) -> FormatResult:
    """Tokenise rows with the chat template and apply the length policy (pure: no file I/O)."""
    result = FormatResult()
    for row in rows:
        outcome = format_row(row, tokenizer, cfg)
        result.rows_in += 1
        result.rows += outcome.rows
        result.truncated += sum(out["truncated"] for out in outcome.rows)
        result.quarantine += outcome.quarantine
        result.dropped += sum(bad["rule"] == "overlong" for bad in outcome.quarantine)
        if outcome.rows:
            result.rendering.update(outcome.changes)
            result.expanded += HISTORY_EXPANDED in outcome.changes
    return result


def token_stats(values: np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p95 / max of a token-count array (zeros when empty)."""
    if values.size == 0:
        return {"min": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2), "p50": round(float(p50), 2),
            "p95": round(float(p95), 2), "max": int(values.max())}


def token_histogram(values: np.ndarray, max_length: int, bins: int = HISTOGRAM_BINS) -> dict[str, list[int]]:
    """Counts of n_tokens in equal-width bins over [0, max_length] (plot-ready: edges has one more entry)."""
    edges = np.unique(np.linspace(0, max_length, bins + 1).round().astype(int))
    counts, _ = np.histogram(values, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


# --------------------------------------------------------------------------------------------------
# Stage: streaming I/O, worker pool, validation, report
# --------------------------------------------------------------------------------------------------


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    """The base model's tokenizer; a StageError when it is missing or cannot render chats."""
    from transformers import AutoTokenizer  # heavy import, only when the stage runs

    require(folder, "fetch-model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"cannot load a tokenizer from '{folder}' ({exc}); re-run 'python -m pipelines fetch-model'"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(
            f"the tokenizer in '{folder}' has no chat template; use an instruct/chat base model (model.name) "
            "or add 'chat_template' to its tokenizer_config.json"
        )
    return tokenizer


def _schema_problem(rows: list[dict[str, Any]]) -> str | None:
    try:
        validate(FormattedSchema, rows)
    except pandera.errors.SchemaErrors as exc:
        return describe_failures(exc, "the formatted rows (FormattedSchema)", "this is a bug in the format stage")
    return None


@dataclass
class _Chunk:
    """What a worker sends back for one chunk: ready-to-write JSONL text and the figures for the report."""

    data: str  # JSONL lines of the formatted rows
    quarantine: str  # JSONL lines of the quarantined rows
    ids: list[str]
    n_tokens: list[int]
    n_completion: list[int]
    rules: Counter[str]
    truncated: int
    dropped: int
    rows_in: int
    rendering: Counter[str]
    expanded: int
    first_reasons: dict[str, str]  # the first quarantine reason per rule (for the error when nothing survives)
    problem: str | None  # FormattedSchema failure, or None
    per_source: dict[str, Counter[str]]  # source file -> {rows_in, rows_out, quarantined}


# Set in each worker process (fork inherits it; the pool's initializer sets it otherwise).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, cfg: FormatConfig, *, in_pool: bool = False) -> None:
    if in_pool and sys.platform.startswith("linux"):
        # Die with the parent: a SIGKILLed (or cancelled) stage must not leave tokenizer-sized workers behind.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    _WORKER["tokenizer"], _WORKER["cfg"] = tokenizer, cfg


def _format_chunk(lines: list[str]) -> _Chunk:
    """Worker task: parse, format, validate and serialise one chunk of JSONL lines.

    Workers take raw lines and return JSONL text, so the parent only moves strings: JSON parsing,
    tokenising, validation and serialisation all run in parallel.
    """
    rows_in = [json.loads(line) for line in lines]
    result = format_rows(rows_in, _WORKER["tokenizer"], _WORKER["cfg"])
    rows = result.rows
    per_source: dict[str, Counter[str]] = {}
    for key, items in (("rows_in", rows_in), ("rows_out", rows), ("quarantined", result.quarantine)):
        for item in items:
            per_source.setdefault(str(item.get("source")), Counter())[key] += 1
    return _Chunk(
        data="".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        quarantine="".join(json.dumps(q, ensure_ascii=False, default=str) + "\n" for q in result.quarantine),
        ids=[r["id"] for r in rows], n_tokens=[r["n_tokens"] for r in rows],
        n_completion=[r["n_completion_tokens"] for r in rows], rules=Counter(q["rule"] for q in result.quarantine),
        truncated=result.truncated, dropped=result.dropped, rows_in=result.rows_in, rendering=result.rendering,
        expanded=result.expanded, first_reasons={q["rule"]: q["reason"] for q in reversed(result.quarantine)},
        problem=_schema_problem(rows) if rows else None, per_source=per_source,
    )


def _line_chunks(path: Path, size: int) -> Iterator[list[str]]:
    with open(path, encoding="utf-8") as fh:
        yield from chunked((line for line in fh if line.strip()), size)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _formatted_chunks(path: Path, tokenizer: Any, cfg: FormatConfig, workers: int) -> Iterator[_Chunk]:
    """Every chunk of `path`, formatted, in input order; a pool of `workers` processes once there are two chunks."""
    chunks = _line_chunks(path, CHUNK_ROWS)
    head = list(islice(chunks, 2))
    _init_worker(tokenizer, cfg)
    if len(head) < 2 or workers <= 1:
        for chunk in chain(head, chunks):
            yield _format_chunk(chunk)
        return
    # fork: workers start in milliseconds and inherit the loaded tokenizer; spawn would re-import transformers.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=partial(_init_worker, in_pool=True),
                             initargs=(tokenizer, cfg)) as pool:
        for chunk in chain(head, chunks):
            pending.append(pool.submit(_format_chunk, chunk))
            if len(pending) >= 2 * workers:  # bounded window: memory stays a few chunks per worker
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _nothing_survived(source: Path, quarantine: Path, rules: Counter[str], first_reasons: dict[str, str]) -> str:
    """The error when every row was quarantined: the commonest rule, its first reason and what to do."""
    rule, count = max(rules.items(), key=lambda kv: (kv[1], kv[0]))
    what = {
        "overlong": "raise format.max_length or set format.overlong: truncate",
        "template": "the base model's chat template refuses these rows: use a model whose template renders them, "
                    "or change the rows",
    }.get(rule, f"see the reasons in {quarantine}")
    return (f"no row of '{source}' survived formatting: {count} of {sum(rules.values())} quarantined by rule "
            f"'{rule}' (first: {first_reasons.get(rule, '?')}); {what}")


def run(params: Params, *, workers: int | None = None) -> StageResult:
    """Format cleaned/examples.jsonl into formatted/ (see the module docstring); workers=None uses every core."""
    started = time.perf_counter()
    cfg = params.format
    preflight(params, "format")
    claim_output(params, "formatted")  # before any work: the folder is the stage's own, and writable
    source = require(params.path("cleaned") / "examples.jsonl", "clean")
    tokenizer = load_tokenizer(params.path("base_model"), params.model.trust_remote_code)
    n_tokens, n_completion = array("l"), array("l")  # 8 bytes per row: the only state that grows with the data
    rules: Counter[str] = Counter()
    rendering: Counter[str] = Counter({rule: 0 for rule in RENDERING_RULES})
    first_reasons: dict[str, str] = {}
    per_source: dict[str, Counter[str]] = {}
    seen_ids: set[str] = set()
    truncated = dropped = rows_in = expanded = 0
    out_dir = params.path("formatted")
    with atomic_dir(out_dir, "formatted") as tmp:
        with open(tmp / "dataset.jsonl", "w", encoding="utf-8") as data_fh, \
                open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine_fh:
            for chunk in _formatted_chunks(source, tokenizer, cfg, workers or _usable_cpus()):
                for row_id in chunk.ids:  # ids unique across chunks; the schema sees one chunk at a time
                    if row_id in seen_ids:
                        raise StageError(f"'{source}' has the id {row_id!r} twice; re-run the clean stage")
                    seen_ids.add(row_id)
                if chunk.problem:
                    raise StageError(f"{chunk.problem} (rows from '{source}'), please report it")
                data_fh.write(chunk.data)
                quarantine_fh.write(chunk.quarantine)
                n_tokens.extend(chunk.n_tokens)
                n_completion.extend(chunk.n_completion)
                rules.update(chunk.rules)
                truncated += chunk.truncated
                dropped += chunk.dropped
                rows_in += chunk.rows_in
                expanded += chunk.expanded
                rendering.update(chunk.rendering)
                first_reasons = {**chunk.first_reasons, **first_reasons}
                for name, counts in chunk.per_source.items():
                    per_source.setdefault(name, Counter()).update(counts)
        lengths, completions = np.asarray(n_tokens, dtype=np.int64), np.asarray(n_completion, dtype=np.int64)
        seconds = time.perf_counter() - started
        report = {
            "rows_in": rows_in, "rows_out": len(lengths), "quarantined": sum(rules.values()),
            "quarantine_by_rule": dict(sorted(rules.items())), "truncated": truncated, "overlong_dropped": dropped,
            "rendering": dict(rendering), "expanded_rows": expanded,
            "output": cfg.output, "max_length": cfg.max_length, "overlong_policy": cfg.overlong,
            "tokens_total": int(lengths.sum()), "completion_tokens_total": int(completions.sum()),
            "n_tokens": token_stats(lengths), "n_completion_tokens": token_stats(completions),
            "token_histogram": token_histogram(lengths, cfg.max_length),
            "per_source": {name: {key: per_source[name][key] for key in ("rows_in", "rows_out", "quarantined")}
                           for name in sorted(per_source)},
            "seconds": round(seconds, 2), "rows_per_second": round(rows_in / seconds, 1) if seconds else 0.0,
        }
        # Timings stay out of the file: the same rows give the same bytes, so DVC skips everything downstream.
        write_json(tmp / "report.json", {k: v for k, v in report.items() if k not in ("seconds", "rows_per_second")})
    if rows_in and not len(lengths):
        raise StageError(_nothing_survived(source, out_dir / "quarantine.jsonl", rules, first_reasons))
    log.info("formatted %d of %d rows (%d truncated, %d quarantined) in %.1fs",
             len(lengths), rows_in, truncated, report["quarantined"], seconds)
    if any(rendering.values()):
        log.info("rendering adaptations (rows): %s",
                 ", ".join(f"{rule}={n}" for rule, n in rendering.items() if n))
    metrics = {k: v for k, v in report.items() if k not in ("n_tokens", "n_completion_tokens")}
    metrics.update({f"n_tokens_{k}": v for k, v in report["n_tokens"].items()})
    return StageResult(
        stage=STAGE,
        outputs={name: out_dir / name for name in ("dataset.jsonl", "quarantine.jsonl", "report.json")},
        metrics=metrics,
    )
