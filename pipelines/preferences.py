"""Preference data: read the preference rows in paths.raw_dir, clean every side, split them by prompt.

    python -m pipelines preference-data        # reads paths.raw_dir and paths.splits, writes paths.preferences

Row formats (detected per row; the SFT ingest stage leaves exactly these rows to this stage):

    sharegpt_pair            {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {...}, "system"?}
                             (LLaMA-Factory's ranking format, as in ../shared/datasets/dpo_en_demo.json)
    messages_pair            {"prompt": [{role, content}], "chosen": [{role, content}], "rejected": [...]}
                             (TRL's conversational format with an explicit prompt; "messages" may hold the prompt)
    prompt_pair              {"prompt": "text", "chosen": "text", "rejected": "text"}    (TRL's standard format)
    implicit_pair            {"chosen": [whole conversation], "rejected": [whole conversation]} or two strings:
                             the prompt is their longest common prefix, as trl.extract_prompt takes it
    messages_label           {"messages": [...], "label": true|false}     (OpenAI / TRL unpaired, kto_en_demo.json)
    prompt_completion_label  {"prompt", "completion", "label": true|false}   (TRL's unpaired format)

Each side is normalised by the SFT ingest normaliser (pipelines.ingest.normalise_row: roles, content parts,
data.system_prompt) and cleaned by the clean stage's rules (pipelines.clean.clean_messages: Unicode, control
characters, HTML, whitespace, length limits, PII redaction), so preference and SFT rows read the same. Rows that
are neither pairs nor labelled rows (SFT examples) are counted, not quarantined: they belong to the ingest stage,
which also quarantines the lines that are not valid JSON at all.

Bad preference rows go to quarantine.jsonl with file, line, rule and reason:
    missing_prompt   no prompt, or no user turn in it (an implicit pair whose two sides share no prefix)
    empty_side       chosen, rejected or completion missing or blank
    identical_sides  chosen and rejected are the same text after cleaning: nothing to prefer
    invalid_row      a field of the wrong type, a role no chat template knows, ...
    too_short / too_long   the clean stage's length limits (clean.min_chars, clean.max_chars) on a side
    exact_duplicate  the same prompt and answers as an earlier row (clean.exact_dedup)
    straddles_sft_splits   the prompt's group near-duplicates SFT rows in two different SFT splits
The stage fails when malformed rows (all but duplicates and straddlers) exceed data.max_bad_fraction of the
preference rows, as ingest does.

Split: by prompt, and consistently with the SFT split, to the standard the split stage holds SFT rows to. Preference
prompts are grouped as SFT rows are (pipelines.split.group_keys: exact and near duplicates at split.group_threshold,
connected). A group holding a near duplicate (clean.near_dup_threshold) of an SFT prompt goes to that SFT row's
split: a preference prompt that copies an SFT test prompt is a test pair, so alignment never trains on what the SFT
test split measures, and a held-out pair was seen by neither training stage. The other groups are cut by the split
stage's own seeded rule (pipelines.split.assign_groups) at split.train / validation / test. The leakage check
(`preference_leakage`, also the blocking Dagster check preference_pairs / no_leakage) counts exact and near
duplicate prompts (clean.near_dup_threshold) in different splits, between preference rows or between a preference
row and an SFT row; it is zero by construction.

Outputs (paths.preferences): train.jsonl, validation.jsonl, test.jsonl (pipelines.schemas.PreferenceSchema, sorted
by id), quarantine.jsonl, report.json. The rows are held in memory: preference sets are small (thousands).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.clean import clean_messages, excerpt
from pipelines.config import CleanConfig, Params, SplitConfig
from pipelines.dedup import conversation_text, exact_digest, near_duplicate_pairs
from pipelines.ingest import READERS, Rejection, normalise_row, raw_files, row_id
from pipelines.io import StageError, StageResult, atomic_dir, read_jsonl, write_json, write_jsonl
from pipelines.pii import redact
from pipelines.schemas import PreferenceSchema, preference_problem, validate
from pipelines.split import SPLITS, assign_groups, group_keys, stratum_of

STAGE = "preference-data"
EXCERPT_CHARS = 200
# Rules that remove a row without it being malformed: they never count toward data.max_bad_fraction.
NOT_MALFORMED = frozenset({"exact_duplicate", "straddles_sft_splits"})
LEAK_EXAMPLES = 5


# ------------------------------------------------------------------------------------------ one raw object


def is_preference(obj: Any) -> bool:
    """A pair (any of chosen / rejected present) or a row with a boolean KTO label."""
    return isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj or isinstance(obj.get("label"), bool))


def _blank(side: Any) -> bool:
    """A side with no text at all: missing, null, "", [], {} or messages whose text is all blank."""
    if side is None:
        return True
    if isinstance(side, str):
        return not side.strip()
    if isinstance(side, dict):
        text = side.get("value", side.get("content"))
        return text is None or (isinstance(text, str) and not text.strip())
    if isinstance(side, list):
        return all(_blank(item) for item in side) if side else True
    return False


def _turns(side: Any, *, sharegpt: bool) -> list[Any]:
    """A side (string, one message or a list of messages) as a list of turns of the row's own message format."""
    if isinstance(side, str):
        return [{"from": "gpt", "value": side} if sharegpt else {"role": "assistant", "content": side}]
    return [side] if isinstance(side, dict) else side


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix; for strings backed off by one space, as trl.extract_prompt does."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if isinstance(a, str) and n and a[n - 1] == " ":
        n -= 1
    return n


def _normalised(obj: dict[str, Any], fmt: str, system_prompt: str | None, side: str) -> tuple[Any, Any]:
    """(normalised row, None) or (None, Rejection naming the side) from pipelines.ingest.normalise_row."""
    row, why = normalise_row(obj, fmt, system_prompt)
    if why is not None:
        return None, Rejection(f"{side}: {why}", why.rule)
    return row, None


@dataclass
class Parsed:
    """A preference row before cleaning: messages normalised, answers split from the prompt."""

    format: str
    kind: str  # pair | unpaired
    prompt: list[dict[str, str]]
    answers: dict[str, list[dict[str, str]]]  # pair: chosen + rejected; unpaired: completion
    label: bool | None
    tools: str | None
    meta: dict[str, Any]


def _split_answer(messages: list[dict[str, str]], n_answer: int) -> tuple[list, list]:
    return messages[:-n_answer], messages[-n_answer:]


def parse_pair(obj: dict[str, Any], system_prompt: str | None) -> Parsed | Rejection:
    """A chosen/rejected pair in any of the pair formats (module docstring) as prompt + two answers."""
    for side in ("chosen", "rejected"):
        if _blank(obj.get(side)):
            return Rejection(f"the {side} side is missing or empty; a pair needs two answers", "empty_side")
    chosen, rejected = obj["chosen"], obj["rejected"]
    used = {"chosen", "rejected"}
    if "conversations" in obj:
        fmt, key, message_format, sharegpt = "sharegpt_pair", "conversations", "sharegpt", True
    elif "prompt" in obj or "messages" in obj:
        key = "prompt" if "prompt" in obj else "messages"
        sharegpt = False
        if isinstance(obj[key], str) and isinstance(chosen, str) and isinstance(rejected, str):
            fmt, message_format = "prompt_pair", "prompt_completion"
        else:
            fmt, message_format = "messages_pair", "messages"
    else:  # implicit prompt: the longest common prefix of the two sides
        fmt, key, sharegpt = "implicit_pair", None, False
        if isinstance(chosen, str) and isinstance(rejected, str):
            n = _common_prefix(chosen, rejected)
            prompt_value, chosen, rejected, message_format = chosen[:n], chosen[n:], rejected[n:], "prompt_completion"
        elif isinstance(chosen, list) and isinstance(rejected, list):
            n = _common_prefix(chosen, rejected)
            prompt_value, chosen, rejected, message_format = chosen[:n], chosen[n:], rejected[n:], "messages"
            sharegpt = any(isinstance(turn, dict) and "from" in turn for turn in prompt_value)
            message_format = "sharegpt" if sharegpt else "messages"
        else:
            return Rejection("an implicit-prompt pair needs chosen and rejected of the same kind (two strings or two "
                             "message lists)")
        if _blank(prompt_value):
            return Rejection("chosen and rejected share no prompt (no common prefix), and the row has no 'prompt', "
                             "'messages' or 'conversations'", "missing_prompt")
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            if _blank(value):
                return Rejection(f"the {side} side is nothing but the shared prompt", "empty_side")
    if key is not None:
        prompt_value = obj[key]
        used.add(key)
        if _blank(prompt_value):
            return Rejection(f"the prompt ('{key}') is missing or empty", "missing_prompt")
    extra = {k: obj[k] for k in ("system", "tools") if k in obj}
    used |= set(extra)
    sides: dict[str, list[dict[str, str]]] = {}
    prompt: list[dict[str, str]] = []
    tools = None
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if message_format == "prompt_completion":
            if not isinstance(prompt_value, str) or not isinstance(value, str):
                return Rejection(f"prompt and {side} must both be strings or both be message lists")
            raw = {"prompt": prompt_value, "completion": value, **extra}
        else:
            if not isinstance(prompt_value, list):
                prompt_value = [{"from": "human", "value": prompt_value} if sharegpt else
                                {"role": "user", "content": prompt_value}] if isinstance(prompt_value, str) else None
                if prompt_value is None:
                    return Rejection(f"'{key}' must be a string or a list of messages")
            answer = _turns(value, sharegpt=sharegpt)
            if not isinstance(answer, list):
                return Rejection(f"{side} must be a string, a message or a list of messages")
            raw = {("conversations" if sharegpt else "messages"): [*prompt_value, *answer], **extra}
        row, why = _normalised(raw, message_format, system_prompt, side)
        if why is not None:
            return why
        n_answer = 1 if message_format == "prompt_completion" else len(answer)
        head, tail = _split_answer(row["messages"], n_answer)
        if any(m["role"] != "assistant" for m in tail):
            return Rejection(f"{side} must hold assistant messages only, got roles "
                             f"{', '.join(sorted({m['role'] for m in tail}))}")
        if prompt and head != prompt:
            return Rejection("chosen and rejected are answers to different prompts")
        prompt, sides[side], tools = head, tail, row["tools"]
    meta = {k: v for k, v in obj.items() if k not in used}
    return Parsed(fmt, "pair", prompt, sides, None, tools, meta)


def parse_unpaired(obj: dict[str, Any], system_prompt: str | None) -> Parsed | Rejection:
    """A KTO row ({"messages", "label"} or {"prompt", "completion", "label"}) as prompt + completion + label."""
    label = obj["label"]
    extra = {k: obj[k] for k in ("system", "tools") if k in obj}
    if "messages" in obj:
        fmt, raw, used = "messages_label", {"messages": obj["messages"], **extra}, {"messages", "label"}
        message_format = "messages"
        if isinstance(obj["messages"], list) and obj["messages"] and _blank(obj["messages"][-1]):
            return Rejection("the completion (the last message) is empty", "empty_side")
    elif "prompt" in obj or "completion" in obj:
        fmt, used = "prompt_completion_label", {"prompt", "completion", "label"}
        if _blank(obj.get("prompt")):
            return Rejection("the prompt is missing or empty", "missing_prompt")
        if _blank(obj.get("completion")):
            return Rejection("the completion is missing or empty", "empty_side")
        raw, message_format = {"prompt": obj["prompt"], "completion": obj["completion"], **extra}, "prompt_completion"
    else:
        return Rejection(f"a labelled row needs 'messages' or 'prompt' + 'completion'; it has "
                         f"{', '.join(sorted(map(str, obj)))}", "missing_prompt")
    row, why = _normalised(raw, message_format, system_prompt, "completion")
    if why is not None:
        return why
    messages = row["messages"]
    n_answer = len(obj["completion"]) if message_format == "prompt_completion" and isinstance(
        obj["completion"], list) else 1
    prompt, completion = _split_answer(messages, n_answer)
    if not any(m["role"] == "user" for m in prompt):
        return Rejection("the prompt has no user message", "missing_prompt")
    meta = {k: v for k, v in obj.items() if k not in used | set(extra)}
    return Parsed(fmt, "unpaired", prompt, {"completion": completion}, label, row["tools"], meta)


def parse(obj: Any, system_prompt: str | None = None) -> Parsed | Rejection | None:
    """The preference row in `obj`, the reason it cannot be one, or None when it is not a preference row."""
    if not is_preference(obj):
        return None
    if "chosen" in obj or "rejected" in obj:
        return parse_pair(obj, system_prompt)
    return parse_unpaired(obj, system_prompt)


# ------------------------------------------------------------------------------------------------ cleaning


@dataclass
class Cleaning:
    """The clean stage's rules on every side of every row, with the same per-rule counts the clean stage reports."""

    cfg: CleanConfig
    touched: Counter = field(default_factory=Counter)  # rule -> rows it changed
    pii: Counter = field(default_factory=Counter)  # PII replacements per type

    def apply(self, parsed: Parsed) -> tuple[str, str] | None:
        """Clean `parsed` in place; (rule, reason) when a length limit removes it, or its two answers are equal."""
        touched: set[str] = set()
        pii: Counter = Counter()
        n = len(parsed.prompt)
        for side, answer in list(parsed.answers.items()):
            result = clean_messages([*parsed.prompt, *answer], self.cfg)
            if result.problem:
                rule, reason = result.problem
                return rule, f"{side} side: {reason}"
            touched.update(result.touched)
            pii += result.pii
            parsed.prompt, parsed.answers[side] = result.messages[:n], result.messages[n:]
        if parsed.kind == "pair" and parsed.answers["chosen"] == parsed.answers["rejected"]:
            return "identical_sides", "chosen and rejected are the same text after cleaning; a pair must differ"
        self.touched.update(touched | ({"pii"} if pii else set()))
        self.pii += pii
        return None


def prompt_text(prompt: list[dict[str, str]]) -> str:
    """The text prompts are grouped and compared on (pipelines.dedup.conversation_text of the prompt turns)."""
    return conversation_text({"messages": prompt})


def sft_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """The turns of an SFT row before its last assistant turn: what a preference prompt is compared with."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def _row_digest(parsed: Parsed) -> bytes:
    parts = [prompt_text(parsed.prompt)]
    for side in sorted(parsed.answers):
        parts.append(f"{side}: " + conversation_text({"messages": parsed.answers[side]}))
    parts.append(f"label: {parsed.label}")
    return exact_digest("\n".join(parts))


# --------------------------------------------------------------------------------------------------- split


@dataclass
class SplitPlan:
    """Where each preference row goes: its group, its split (None: quarantined), the SFT split that decided it."""

    groups: list[str]
    splits: list[str | None]
    sft_splits: list[str | None]
    conflicts: dict[int, list[str]]  # row index -> the SFT splits its group's near duplicates sit in


def plan_splits(prompts: Sequence[str], strata: Sequence[str], sft: Sequence[tuple[str, str]], cfg: SplitConfig,
                near_dup_threshold: float, num_perm: int = 128, shingle_size: int = 3) -> SplitPlan:
    """Split preference prompts as the split stage splits SFT rows, and consistently with the SFT split.

    1. Preference prompts are grouped like SFT rows are (pipelines.split.group_keys: exact and near duplicates at
       split.group_threshold, connected).
    2. A group that holds a near duplicate (Jaccard >= `near_dup_threshold`, the leakage check's bound) of an SFT
       prompt goes to that SFT row's split; one whose near duplicates sit in two SFT splits has no split that
       keeps it held out (conflicts: quarantined by the caller).
    3. The other groups are cut by the split stage's seeded rule (pipelines.split.assign_groups).

    `prompts`: prompt text of each preference row; `sft`: (split name, prompt text) of each SFT row. A pure function
    of content and cfg: the same data and seed give the same split whatever the row order. The SFT split holds its
    own rows to the same standard (groups at split.group_threshold, no near duplicate across splits), so linking
    to it at the looser group threshold would be stricter for preference rows than for SFT rows."""
    groups = group_keys(prompts, cfg.group_threshold, num_perm, shingle_size)
    distinct = _Distinct([text for _, text in sft] + list(prompts))
    sft_splits: dict[int, set[str]] = defaultdict(set)  # distinct text -> SFT splits holding it
    pref_groups: dict[int, set[str]] = defaultdict(set)  # distinct text -> preference groups holding it
    for i, (name, _) in enumerate(sft):
        sft_splits[distinct.of[i]].add(name)
    for i, group in enumerate(groups):
        pref_groups[distinct.of[len(sft) + i]].add(group)
    owners: dict[str, set[str]] = defaultdict(set)  # preference group -> SFT splits of its near duplicates
    for a, b in [(d, d) for d in pref_groups] + distinct.near_pairs(near_dup_threshold, num_perm, shingle_size):
        for x, y in ((a, b), (b, a)):
            for group in pref_groups.get(x, ()):
                owners[group] |= sft_splits.get(y, set())
    splits: list[str | None] = [None] * len(prompts)
    forced: list[str | None] = [None] * len(prompts)
    conflicts: dict[int, list[str]] = {}
    free_sizes: Counter = Counter()
    votes: dict[str, Counter] = defaultdict(Counter)
    for i, group in enumerate(groups):
        tied = owners.get(group, set())
        if len(tied) == 1:
            splits[i] = forced[i] = next(iter(tied))
        elif tied:
            conflicts[i] = sorted(tied, key=SPLITS.index)
        else:
            free_sizes[group] += 1
            votes[group][strata[i]] += 1
    # most common stratum of a group; ties go to the smallest value, as pipelines.split.plan does
    group_strata = {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in votes.items()}
    assigned = assign_groups(dict(free_sizes), group_strata, cfg)
    for i, group in enumerate(groups):
        if splits[i] is None and i not in conflicts:
            splits[i] = assigned[group]
    return SplitPlan(groups, splits, forced, conflicts)


class _Distinct:
    """Texts reduced to their distinct values (`of[i]`: the distinct index of text i), so near-duplicate pairs are
    found once per pair of distinct texts and apply to every copy (pipelines.dedup.near_duplicate_pairs reports a
    copy only against the first occurrence of its text)."""

    def __init__(self, texts: Sequence[str]) -> None:
        index: dict[str, int] = {}
        self.of = [index.setdefault(t, len(index)) for t in texts]
        self.texts = list(index)

    def near_pairs(self, threshold: float, num_perm: int, shingle_size: int) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _ in near_duplicate_pairs(self.texts, threshold, num_perm=num_perm,
                                                           shingle_size=shingle_size)]


def preference_leakage(preference: Mapping[str, Iterable[dict[str, Any]]], sft: Mapping[str, Iterable[dict[str, Any]]],
                       threshold: float, num_perm: int = 128, shingle_size: int = 3) -> dict[str, Any]:
    """Exact and near duplicate prompts (Jaccard >= threshold) in different splits, where at least one of the two
    is a preference row: preference vs preference, or preference vs SFT. Counted per distinct prompt (exact) and per
    pair of distinct prompts (near). Rows are streamed; only id and prompt text are kept."""
    names, ids, texts, is_pref = [], [], [], []
    for kind, splits in (("preference", preference), ("sft", sft)):
        for name, rows in splits.items():
            for row in rows:
                names.append(name)
                ids.append(f"{kind}:{row.get('id')}")
                texts.append(prompt_text(row["prompt"] if kind == "preference" else sft_prompt(row)))
                is_pref.append(kind == "preference")
    distinct = _Distinct(texts)
    members: dict[int, list[int]] = defaultdict(list)  # distinct text -> rows holding it
    for i, d in enumerate(distinct.of):
        members[d].append(i)

    def crossing(a: list[int], b: list[int]) -> tuple[int, int] | None:
        """Two rows, one of each list, in different splits with at least one preference row; None if none."""
        return next(((i, j) for i in a for j in b if names[i] != names[j] and (is_pref[i] or is_pref[j])), None)

    exact = sum(crossing(rows, rows) is not None for rows in members.values())
    near, examples = 0, []
    for a, b in distinct.near_pairs(threshold, num_perm, shingle_size):
        found = crossing(members[a], members[b])
        if found is None:
            continue
        near += 1
        if len(examples) < LEAK_EXAMPLES:
            i, j = found
            examples.append({"a": {"split": names[i], "id": ids[i]}, "b": {"split": names[j], "id": ids[j]}})
    return {"exact_duplicates_across_splits": exact, "near_duplicate_pairs_across_splits": near,
            "threshold": threshold, "examples": examples, "passed": exact == 0 and near == 0}


# ----------------------------------------------------------------------------------- rows for a trainer


def _prompt_key(row: dict[str, Any]) -> str:
    return json.dumps([row["prompt"], row.get("tools")], sort_keys=True, ensure_ascii=False)


def as_pairs(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The pairs among `rows`, plus pairs made of unpaired rows: for a prompt with desirable and undesirable
    completions, the i-th desirable against the i-th undesirable (in id order). Returns (pairs, unpaired rows left
    without a partner). Each pair: id, prompt, chosen, rejected, tools."""
    pairs, by_prompt = [], defaultdict(lambda: ([], []))
    for row in rows:
        if row["kind"] == "pair":
            pairs.append({k: row.get(k) for k in ("id", "prompt", "chosen", "rejected", "tools")})
        else:
            by_prompt[_prompt_key(row)][0 if row["label"] else 1].append(row)
    left = 0
    for good, bad in by_prompt.values():
        good.sort(key=lambda r: r["id"])
        bad.sort(key=lambda r: r["id"])
        for g, b in zip(good, bad, strict=False):
            pairs.append({"id": f"{g['id']}+{b['id']}", "prompt": g["prompt"], "chosen": g["completion"],
                          "rejected": b["completion"], "tools": g.get("tools")})
        left += abs(len(good) - len(bad))
    return pairs, left


def as_unpaired(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row as KTO rows (id, prompt, completion, label, tools): a pair gives one desirable and one undesirable
    row, as trl.unpair_preference_dataset does."""
    out = []
    for row in rows:
        if row["kind"] == "pair":
            out += [{"id": f"{row['id']}:chosen", "prompt": row["prompt"], "completion": row["chosen"], "label": True,
                     "tools": row.get("tools")},
                    {"id": f"{row['id']}:rejected", "prompt": row["prompt"], "completion": row["rejected"],
                     "label": False, "tools": row.get("tools")}]
        else:
            out.append({k: row.get(k) for k in ("id", "prompt", "completion", "label", "tools")})
    return out


# --------------------------------------------------------------------------------------------------- stage


@dataclass
class FileReport:
    source: str
    rows_read: int = 0
    not_preference: int = 0  # SFT rows: the ingest stage's
    unreadable: int = 0  # not even a record (bad JSON, CSV errors): quarantined by the ingest stage
    preference: int = 0
    kept: int = 0
    quarantined: int = 0
    formats: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "not_preference": self.not_preference,
                "unreadable": self.unreadable, "preference_rows": self.preference, "kept": self.kept,
                "quarantined": self.quarantined, "formats": dict(self.formats), "rules": dict(self.rules)}


def _quarantine(source: str, line: int, rule: str, reason: str, text: str, redact_pii: bool,
                **extra: Any) -> dict[str, Any]:
    text = text[: EXCERPT_CHARS * 2]
    if redact_pii:  # the quarantine must not leak what the kept rows had redacted
        text = redact(text)[0]
    return {"source": source, "line": line, "stage": STAGE, "rule": rule, "reason": reason,
            "excerpt": text[:EXCERPT_CHARS], **extra}


def _raw_excerpt(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        return repr(obj)


def _row_excerpt(parsed: Parsed) -> str:
    return " || ".join(f"{side}: {excerpt([*parsed.prompt, *answer], False)}"
                       for side, answer in parsed.answers.items())


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def read_rows(params: Params, quarantine: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[FileReport],
                                                                           Cleaning]:
    """Every preference row of paths.raw_dir, parsed and cleaned (exact duplicates dropped); the rest counted."""
    raw_dir = params.path("raw_dir")
    if not raw_dir.is_dir():
        raise StageError(f"raw data folder '{_relative(raw_dir, params.root)}' does not exist; create it and put "
                         "JSONL, JSON, CSV or Parquet files in it (paths.raw_dir in params.yaml)")
    cleaning = Cleaning(params.clean)
    redact_pii = params.clean.redact_pii
    seen: dict[bytes, str] = {}
    rows: list[dict[str, Any]] = []
    reports: list[FileReport] = []
    for path in raw_files(raw_dir):
        source = _relative(path, params.root)
        reader = READERS.get(path.suffix.lower())
        if reader is None or any(part.startswith(".") for part in path.relative_to(raw_dir).parts):
            continue  # the ingest stage reports unknown and hidden files
        report = FileReport(source)
        reports.append(report)
        if path.stat().st_size == 0:
            continue
        for record in reader(path, params.data.max_line_bytes, []):  # the ingest stage reports file-level notes
            report.rows_read += 1
            if record.problem is not None:
                report.unreadable += 1
                continue
            parsed = parse(record.obj, params.data.system_prompt)
            if parsed is None:
                report.not_preference += 1
                continue
            report.preference += 1
            where = {k: v for k, v in record.extra.items()}
            problem = None
            if isinstance(parsed, Rejection):
                problem = (parsed.rule, str(parsed))
            else:
                problem = cleaning.apply(parsed)
            rid = row_id(source, record.line)
            if problem is None and params.clean.exact_dedup:
                first = seen.setdefault(_row_digest(parsed), rid)
                if first != rid:
                    problem = ("exact_duplicate", f"same prompt and answers as row {first}")
                    where["duplicate_of"] = first
            if problem is not None:
                text = _row_excerpt(parsed) if isinstance(parsed, Parsed) else _raw_excerpt(record.obj)
                quarantine.append(_quarantine(source, record.line, *problem, text, redact_pii, **where))
                report.quarantined += 1
                report.rules[problem[0]] += 1
                continue
            report.kept += 1
            report.formats[parsed.format] += 1
            rows.append({
                "id": rid, "source": source, "line": record.line, "format": parsed.format, "kind": parsed.kind,
                "prompt": parsed.prompt, "chosen": parsed.answers.get("chosen"),
                "rejected": parsed.answers.get("rejected"), "completion": parsed.answers.get("completion"),
                "label": parsed.label, "tools": parsed.tools, "meta": parsed.meta,
            })
    return rows, reports, cleaning


def _sft_prompts(params: Params) -> list[tuple[str, str]]:
    folder = params.path("splits")
    out = []
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise StageError(f"input '{path}' is missing; run the 'split' stage first (python -m pipelines split): "
                             "preference pairs are split consistently with the SFT split")
        out += [(name, prompt_text(sft_prompt(row))) for row in read_jsonl(path)]
    return out


def _counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    c = Counter("pair" if r["kind"] == "pair" else "desirable" if r["label"] else "undesirable" for r in rows)
    return {"pairs": c["pair"], "desirable": c["desirable"], "undesirable": c["undesirable"]}


def run(params: Params) -> StageResult:
    """Read, clean and split the preference rows (module docstring); an empty result is not an error."""
    out = params.path("preferences")
    quarantine: list[dict[str, Any]] = []
    rows, reports, cleaning = read_rows(params, quarantine)
    sft = _sft_prompts(params)
    cfg = params.split
    strata = [stratum_of(r, cfg.stratify_by) if cfg.stratify_by else "" for r in rows]
    plan = plan_splits([prompt_text(r["prompt"]) for r in rows], strata, sft, cfg, params.clean.near_dup_threshold,
                       params.clean.num_perm, params.clean.shingle_size)
    by_split: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    report_of = {r.source: r for r in reports}
    for i, row in enumerate(rows):
        if i in plan.conflicts:
            quarantine.append(_quarantine(
                row["source"], row["line"], "straddles_sft_splits",
                f"the prompt's group holds near duplicates of SFT rows in the {' and '.join(plan.conflicts[i])} "
                "splits, so no split keeps it held out from both training stages", prompt_text(row["prompt"]), False,
                id=row["id"]))
            file_report = report_of[row["source"]]
            file_report.kept -= 1
            file_report.quarantined += 1
            file_report.rules["straddles_sft_splits"] += 1
            continue
        by_split[plan.splits[i]].append({**row, "group": plan.groups[i], "sft_split": plan.sft_splits[i]})
    for name in SPLITS:
        by_split[name].sort(key=lambda r: r["id"])
        problems = [(r["id"], preference_problem(r)) for r in by_split[name]]
        bad = [(rid, p) for rid, p in problems if p]
        if bad:  # every rule above guarantees the contract: a failure here is a bug in this module
            raise RuntimeError(f"preference row {bad[0][0]} breaks the contract: {bad[0][1]}")
        if by_split[name]:
            validate(PreferenceSchema, by_split[name])
    leak = preference_leakage(by_split, _sft_rows(params), params.clean.near_dup_threshold, params.clean.num_perm,
                              params.clean.shingle_size)
    if not leak["passed"]:
        raise StageError(
            f"preference splits leak: {leak['exact_duplicates_across_splits']} exact and "
            f"{leak['near_duplicate_pairs_across_splits']} near duplicate prompts sit in different splits; set "
            f"split.group_threshold ({cfg.group_threshold}) <= clean.near_dup_threshold "
            f"({params.clean.near_dup_threshold})")
    summary = _summary(reports, by_split, quarantine, cleaning, plan, leak, params)
    failure = _failure(summary, params)
    with atomic_dir(out) as tmp:
        if not failure:
            for name in SPLITS:
                write_jsonl(tmp / f"{name}.jsonl", by_split[name])
        write_jsonl(tmp / "quarantine.jsonl", quarantine)
        write_json(tmp / "report.json", {"status": "failed" if failure else "ok", "error": failure, **summary})
    if failure:
        raise StageError(failure)
    outputs = {name: out / f"{name}.jsonl" for name in SPLITS}
    outputs.update(quarantine=out / "quarantine.jsonl", report=out / "report.json")
    metrics = {k: v for k, v in summary.items() if k != "per_file"}
    return StageResult(STAGE, outputs, metrics)


def _sft_rows(params: Params) -> dict[str, Iterator[dict[str, Any]]]:
    folder = params.path("splits")
    return {name: read_jsonl(folder / f"{name}.jsonl") for name in SPLITS}


def _summary(reports: list[FileReport], by_split: dict[str, list[dict[str, Any]]], quarantine: list[dict[str, Any]],
             cleaning: Cleaning, plan: SplitPlan, leak: dict[str, Any], params: Params) -> dict[str, Any]:
    rules: Counter = Counter(q["rule"] for q in quarantine)
    preference_rows = sum(r.preference for r in reports)
    malformed = sum(n for rule, n in rules.items() if rule not in NOT_MALFORMED)
    kept = [row for rows in by_split.values() for row in rows]
    forced = Counter(s for s in plan.sft_splits if s is not None)
    summary: dict[str, Any] = {
        "rows_read": sum(r.rows_read for r in reports),
        "not_preference": sum(r.not_preference for r in reports),
        "unreadable": sum(r.unreadable for r in reports),
        "preference_rows": preference_rows,
        "rows_out": len(kept),
        "quarantined": len(quarantine),
        "malformed": malformed,
        "bad_fraction": round(malformed / preference_rows, 6) if preference_rows else 0.0,
        "max_bad_fraction": params.data.max_bad_fraction,
        "formats": dict(sum((r.formats for r in reports), Counter())),
        "rules": dict(rules),
        **_counts(kept),
        **{f"rows_{name}": len(rows) for name, rows in by_split.items()},
        "per_split": {name: _counts(rows) for name, rows in by_split.items()},
        "groups": len({r["group"] for r in kept}),
        "placed_by_sft_split": {name: forced[name] for name in SPLITS},
        "clean": {"touched": {rule: cleaning.touched[rule] for rule in sorted(cleaning.touched)},
                  "pii": {t: cleaning.pii[t] for t in sorted(cleaning.pii)}},
        "leakage_exact": leak["exact_duplicates_across_splits"],
        "leakage_near": leak["near_duplicate_pairs_across_splits"],
        "leakage": leak,
        "messages": _messages(reports, preference_rows),
        "per_file": [r.as_dict() for r in reports],
    }
    return summary


def _messages(reports: list[FileReport], preference_rows: int) -> list[str]:
    out = []
    for r in reports:
        if r.quarantined:
            rules = ", ".join(f"{rule} {n}" for rule, n in sorted(r.rules.items()))
            out.append(f"{r.source}: {r.quarantined} of {r.preference} preference rows quarantined ({rules})")
    if not preference_rows:
        out.append("no preference rows (chosen/rejected pairs or rows with a boolean label) in paths.raw_dir: the "
                   "align stage has nothing to train on and leaves the SFT adapter as the final one")
    return out


def _failure(summary: dict[str, Any], params: Params) -> str | None:
    if summary["bad_fraction"] > params.data.max_bad_fraction:
        quarantine = _relative(params.path("preferences") / "quarantine.jsonl", params.root)
        return (f"{summary['malformed']} of {summary['preference_rows']} preference rows "
                f"({summary['bad_fraction']:.1%}) are malformed, more than data.max_bad_fraction = "
                f"{params.data.max_bad_fraction:.1%}; see '{quarantine}' for each file:line and reason, then fix the "
                "raw files or raise the threshold")
    return None
