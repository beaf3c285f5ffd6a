"""Clean stage: normalise text, redact PII, drop too short / too long rows and exact and near duplicates.

    python -m pipelines clean                  # reads paths.raw_examples, writes paths.cleaned

Rules run in this order; the report counts, for each, the rows it modified ("touched") and removed, and
shows up to SAMPLES before/after excerpts of the rows each text rule changed:

    unicode          Unicode normalisation (clean.unicode_form: NFC by default, which composes accents and
                     changes no meaning; NFKC, opt-in, also folds full-width letters and ligatures, but turns
                     x² into x2 and H₂O into H2O)
    control_chars    control and invisible format characters removed (\\n and \\t kept; \\r\\n -> \\n)
    html             known HTML tags stripped, entities unescaped (clean.strip_html), except in rows whose
                     markup is their content (markup_is_content: a row about HTML, JSX, tags, snippets, ...);
                     special-token texts such as <s>, </s>, <|eot_id|>, <start_of_turn> are text, never HTML
    whitespace       runs of spaces collapsed, lines and text trimmed, at most one blank line
    too_short        a message with fewer than clean.min_chars letters, digits or symbols (default 1: an empty
                     or punctuation-only message; one-character answers such as "4" or "嗨" are kept)
    too_long         a conversation longer than clean.max_chars in total
    pii              emails, phones, cards, IPs, secrets -> [EMAIL], ... (clean.redact_pii; pipelines.pii)
    pii_only         an assistant message that is nothing but placeholders such as [EMAIL] [PHONE] (after
                     redaction, or as written): an answer that teaches the model to emit a bare placeholder.
                     A user, system or tool message of only placeholders is kept: the model is not trained
                     on those tokens, and a user who only gives an address still gets a real answer.
    exact_duplicate  same normalised conversation text as an earlier row (clean.exact_dedup)
    near_duplicate   word-shingle Jaccard >= clean.near_dup_threshold with an earlier kept row (clean.near_dedup),
                     unless their own content, the template text both contain set aside, is less than
                     clean.own_similarity_ratio x the threshold similar (pipelines.dedup.similar_pairs):
                     rows that only share a system prompt or an instruction template are not duplicates

Duplicates keep the first occurrence in input order. Every removed row goes to quarantine.jsonl with its
rule, reason, a redacted excerpt and, for duplicates, the id and source:line of the row it duplicates.
Markdown code (``` fenced blocks and `inline` spans) is left alone by the html and whitespace rules: a
`<div>` or the indentation inside code is content, not markup.
Outputs (paths.cleaned): examples.jsonl, quarantine.jsonl, report.json, and changes.jsonl: one line per row a
text rule or the pii rule changed, {"id", "source", "line", "rules": [...]}, so every change can be traced.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pandera.errors import SchemaError, SchemaErrors
from tqdm.auto import tqdm

from pipelines.config import CleanConfig, Params
from pipelines.dedup import (
    conversation_lines,
    conversation_text,
    exact_digest,
    lsh_params,
    similar_pairs,
)
from pipelines.io import (
    StageError,
    StageResult,
    atomic_dir,
    chunked,
    claim_output,
    read_jsonl,
    require,
    write_json,
    write_jsonl,
)
from pipelines.pii import TYPES as PII_TYPES
from pipelines.pii import redact
from pipelines.schemas import ConversationSchema, describe_failures, validate

STAGE = "clean"
EXCERPT_CHARS = 200
SAMPLES = 3  # before/after samples per rule in the report
SAMPLE_CHARS = 160  # characters of each sample, starting a little before the first change
VALIDATE_ROWS = 10_000  # rows per pandera check: the contract is checked in chunks, so memory stays flat
RULES = (
    "unicode", "control_chars", "html", "whitespace", "too_short", "too_long", "pii", "pii_only",
    "exact_duplicate", "near_duplicate",
)
_TEXT_RULES = ("unicode", "control_chars", "html", "whitespace")
# A placeholder of pipelines.pii (e.g. "[EMAIL]"); a message with nothing else but punctuation is "pii only".
_PLACEHOLDER = re.compile(r"\[(?:" + "|".join(PII_TYPES) + r")\]")

# ------------------------------------------------------------------------------------ text transforms

# C0/C1 controls except \t and \n (\r is turned into \n first), and invisible format characters:
# zero-width space, word joiner, BOM, soft hyphen, Mongolian vowel separator, bidi marks and overrides.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\u00ad\u180e\u200e\u200f"
                      "\u202a-\u202e\u2066-\u2069]")
# ZWJ is kept inside emoji sequences (family, profession emoji) and ZWNJ next to the scripts that need it
# (Persian, Arabic, Indic); elsewhere they are invisible junk from copy-paste.
_EMOJI = "\U0001f000-\U0001faff\u2600-\u27bf"
_STRAY_ZWJ = re.compile(f"(?<![{_EMOJI}\ufe0f])\u200d|\u200d(?![{_EMOJI}])")
_STRAY_ZWNJ = re.compile("(?<![\u0590-\u1fff\ua800-\ufdff])\u200c")

_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]+`", re.S)
_SENTINEL = re.compile("\x00(\\d+)\x00")  # control characters are gone by then, so \x00 cannot clash

# Tags are stripped only when they are real HTML elements: "a<b and c>d", "vector<int>" and "List<T>"
# stay. (html.parser would parse "<b and c>" as a <b> tag, and has no notion of "not HTML".)
# The special-token texts of model families are plain text about models, never HTML (issue 12 kind 5), and reach
# the model as ordinary tokens: Llama/Mistral's "<s>" and "</s>" (BOS/EOS) have the form of the HTML strikethrough
# element, so "s" is no tag here, nor are the tag-shaped texts "<unk>", "<pad>", "<bos>", "<eos>", "<mask>",
# "<sep>", "<cls>", "<think>" (should a name be added to the lists below). The others ("<|eot_id|>",
# "<start_of_turn>", "<tool_call>", "[INST]", "<<SYS>>") do not have the syntax of a tag at all.
_SPECIAL_TOKEN_NAMES = frozenset("s unk pad bos eos mask sep cls think".split())
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody td tfoot th thead tr ul".split()
) - _SPECIAL_TOKEN_NAMES
_INLINE_TAGS = frozenset(
    "a abbr b bdi bdo big body button caption center cite code col colgroup data del details dfn em font "
    "head html i iframe img input ins kbd label link mark meta noscript option q s samp select small span "
    "strike strong sub summary sup svg textarea time title tt u var wbr".split()
) - _SPECIAL_TOKEN_NAMES
_BOOLEAN_ATTRS = frozenset(
    "allowfullscreen async autofocus autoplay checked controls default defer disabled hidden ismap loop "
    "multiple muted nomodule novalidate open readonly required reversed selected".split()
)
# (name, attributes, the line break right after the tag: "<br>\n" is one line break, not two)
_TAG = re.compile(
    r"</?([A-Za-z][A-Za-z0-9]*)((?:\s+[A-Za-z_:@][-\w:.@]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*)\s*/?>"
    r"([ \t]*\n)?"
)
_ATTR = re.compile(r"([A-Za-z_:@][-\w:.@]*)(\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?")
# Elements removed with their content, and comments; their ends are found with str.find (see _drop_spans).
_DROPPED_OPEN = re.compile(r"<(script|style)\b[^<>]*>|<!--|<!doctype\b[^<>]*>", re.I)
# Only entities with their ";" ("&amp;", "&#39;"): html.unescape alone also rewrites "&copy=2" in a URL.
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_WIDE_SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"  # no-break, em, ideographic, ... spaces
_SPACE_RUN = re.compile(f"[ {_WIDE_SPACES}]{{2,}}|[{_WIDE_SPACES}]")
_TRAILING = re.compile(r"[^\S\n]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")


def _outside_code(text: str, fn: Callable[[str], str]) -> str:
    """Apply `fn` to the text with Markdown code spans swapped out for placeholders, then put them back."""
    if "`" not in text:
        return fn(text)
    spans: list[str] = []

    def stash(match: re.Match[str]) -> str:
        spans.append(match.group())
        return f"\x00{len(spans) - 1}\x00"

    return _SENTINEL.sub(lambda m: spans[int(m.group(1))], fn(_CODE.sub(stash, text)))


def normalize_unicode(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def remove_control_chars(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL.sub("", text)
    if "\u200d" in text:
        text = _STRAY_ZWJ.sub("", text)
    if "\u200c" in text:
        text = _STRAY_ZWNJ.sub("", text)
    return text


def _tag(match: re.Match[str]) -> str:
    name = match.group(1).lower()
    if name not in _BLOCK_TAGS and name not in _INLINE_TAGS:
        return match.group()
    for attr, value in _ATTR.findall(match.group(2)):
        if not value and attr.lower() not in _BOOLEAN_ATTRS:
            return match.group()  # "<b and c>": words, not attributes
    return "\n" if name in _BLOCK_TAGS else match.group(3) or ""


def _drop_spans(text: str) -> str:
    """Remove <script>/<style> elements with their content, comments and doctypes.

    One left-to-right scan: a regex like "<script>.*?</script>" rescans to the end of the text for every
    unclosed opener, which is quadratic ("<script>" * 3000 took 1.5 s); an unclosed element is left alone.
    """
    lower, out, pos = text.lower(), [], 0
    while match := _DROPPED_OPEN.search(text, pos):
        opener = match.group().lower()
        if opener.startswith("<!doctype"):
            end = match.end()
        else:
            close = "-->" if opener == "<!--" else f"</{match.group(1).lower()}"
            found = lower.find(close, match.end())
            end = -1 if found < 0 else (found + 3 if close == "-->" else text.find(">", found) + 1)
            if end <= 0:
                break
        out.append(text[pos : match.start()])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _strip_markup(text: str) -> str:
    if "<" in text:
        text = _TAG.sub(_tag, _drop_spans(text))
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    return text


def strip_html(text: str) -> str:
    """Remove HTML tags (block tags become a line break) and unescape entities, outside Markdown code.

    Special-token texts ("<s>", "</s>", "<|eot_id|>", "<start_of_turn>", ...) are kept: they are not HTML."""
    return _outside_code(text, _strip_markup) if "<" in text or "&" in text else text


# Words that make a row's markup its content (looked for outside the tags, case-insensitive).
_MARKUP_TOPIC = re.compile(
    r"\b(?:x?html5?|xml|jsx|tsx|svg|markup|css|dom|tag|elements?|attributes?|snippets?|react|vue|angular|svelte"
    r"|jinja2?|markdown|extract|parse|scrape)\b", re.I)


def markup_is_content(messages: list[dict[str, Any]]) -> bool:
    """True when a row's markup is what the row is about, so the html rule must leave it alone.

    HTML stripping is for markup that wraps prose (a helpdesk or web export). In a row that names a markup
    language or markup itself (HTML, JSX, XML, a tag, an element, a snippet, extract/parse) in any message,
    outside the tags, the markup is the question or the answer: "<b>" in "make a word bold in HTML" and the
    input of "extract the plain text from this snippet" must stay. Markdown code is always left alone
    (strip_html skips it).
    """
    if not any("<" in m["content"] or "&" in m["content"] for m in messages):
        return False
    return any(_MARKUP_TOPIC.search(_TAG.sub(" ", m["content"]) if "<" in m["content"] else m["content"])
               for m in messages)


def _one_space(match: re.Match[str]) -> str:
    start = match.start()
    at_line_start = start == 0 or match.string[start - 1] == "\n"
    return match.group() if at_line_start else " "  # indentation is kept; trailing runs go in _TRAILING


def _squeeze(text: str) -> str:
    # Substring tests first: each regex costs ~3 us per message even when nothing matches.
    ascii_only = text.isascii()
    if "  " in text or not ascii_only:
        text = _SPACE_RUN.sub(_one_space, text)
    if " \n" in text or "\t\n" in text or not ascii_only:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces inside lines (indentation kept), trim lines and text, at most one blank line."""
    return _outside_code(text, _squeeze)


# ------------------------------------------------------------------------------------------ the rules


def _report(cfg: CleanConfig, counts: dict[str, dict[str, int]], pii: Counter, near_pairs: int, rows_in: int,
            rows_out: int, quarantined: int, samples: dict[str, list[dict[str, Any]]],
            markup_kept: int) -> dict[str, Any]:
    enabled = {
        "html": cfg.strip_html, "pii": cfg.redact_pii, "exact_duplicate": cfg.exact_dedup,
        "near_duplicate": cfg.near_dedup, "unicode": cfg.unicode_form != "none",
    }
    bands, rows = lsh_params(cfg.near_dup_threshold, cfg.num_perm)
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "quarantined": quarantined,
        "rules": {r: {**counts[r], "enabled": enabled.get(r, True), **({"samples": samples[r]} if r in samples else {}),
                      **({"kept_as_content": markup_kept} if r == "html" else {})} for r in RULES},
        "pii": {t: pii[t] for t in sorted(pii)},
        "near_dedup": {"threshold": cfg.near_dup_threshold, "num_perm": cfg.num_perm,
                       "shingle_size": cfg.shingle_size, "boilerplate_share": cfg.boilerplate_share,
                       "own_similarity_ratio": cfg.own_similarity_ratio,
                       "lsh_bands": bands, "lsh_rows": rows, "verified_pairs": near_pairs},
    }


@dataclass
class CleanResult:
    kept: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]  # rule -> {"touched": rows modified, "removed": rows dropped}
    pii: Counter = field(default_factory=Counter)  # replacements per PII type
    near_pairs: int = 0  # verified near-duplicate pairs among the rows that reached that rule
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # rule -> before/after samples
    markup_kept: int = 0  # rows with markup the html rule left alone (markup_is_content)
    changed: list[dict[str, Any]] = field(default_factory=list)  # {id, source, line, rules} per changed row

    def report(self, cfg: CleanConfig, rows_in: int) -> dict[str, Any]:
        return _report(cfg, self.counts, self.pii, self.near_pairs, rows_in, len(self.kept), len(self.quarantined),
                       self.samples, self.markup_kept)


# System prompts repeat on every row: redact each distinct text once. The cached Counter is never mutated.
_redact_cached = lru_cache(maxsize=1024)(redact)


def excerpt(messages: list[dict[str, str]], redact_pii: bool) -> str:
    """A quarantine excerpt of a conversation: "role: content | ...", PII redacted when the rules redact it."""
    text = " | ".join(f"{m['role']}: {m['content']}" for m in messages)[: EXCERPT_CHARS * 2]
    if redact_pii:  # the quarantine must not leak what the kept rows had redacted
        text = redact(text)[0]
    return text[:EXCERPT_CHARS]


def _quarantine(row: dict[str, Any], rule: str, reason: str, redact_pii: bool, **extra: Any) -> dict[str, Any]:
    return {"source": row["source"], "line": row["line"], "stage": STAGE, "rule": rule, "reason": reason,
            "excerpt": excerpt(row["messages"], redact_pii), "id": row["id"], **extra}


def _text_rules(cfg: CleanConfig, html: bool = True) -> list[tuple[str, Callable[[str], str]]]:
    rules: list[tuple[str, Callable[[str], str]]] = []
    if cfg.unicode_form != "none":
        rules.append(("unicode", lambda t: normalize_unicode(t, cfg.unicode_form)))
    rules.append(("control_chars", remove_control_chars))
    if cfg.strip_html and html:
        rules.append(("html", strip_html))
    rules.append(("whitespace", normalize_whitespace))
    return rules


def _sample(row: dict[str, Any], i: int, role: str, before: str, after: str, redact_pii: bool,
            show_before: bool = True) -> dict[str, Any]:
    """Excerpts of one changed message, from a little before its first change. PII in them is redacted like
    the rows themselves; the pii rule's sample shows only the after text (before is what it redacted)."""
    if redact_pii and show_before:
        before, after = redact(before)[0], redact(after)[0]
    first = next((k for k, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
                 min(len(before), len(after)))
    start = max(0, first - SAMPLE_CHARS // 4)

    def cut(text: str) -> str:
        return ("…" if start else "") + text[start:start + SAMPLE_CHARS]

    sample = {"id": row["id"], "location": f"{row['source']}:{row['line']}", "message": i, "role": role}
    if show_before:
        sample["before"] = cut(before)
    sample["after"] = cut(after)
    return sample


def _letters(text: str, enough: int) -> int:
    """Letters, digits (any script) and symbols (emoji, currency, math signs) in text, counted up to `enough`:
    punctuation and spaces do not count."""
    n = 0
    for ch in text:
        if ch.isalnum() or unicodedata.category(ch)[0] == "S":
            n += 1
            if n >= enough:
                break
    return n
def _pii_only_problem(messages: list[dict[str, str]]) -> tuple[str, str] | None:
    """The pii_only rule: an assistant message with no letter or digit outside PII placeholders."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and _PLACEHOLDER.search(m["content"]) and \
                not any(c.isalnum() for c in _PLACEHOLDER.sub("", m["content"])):
            kinds = ", ".join(sorted(set(_PLACEHOLDER.findall(m["content"]))))
            return "pii_only", (f"message {i} (assistant) is nothing but redacted PII ({kinds}); an answer of "
                                "placeholders teaches the model nothing")
    return None


def _length_problem(messages: list[dict[str, str]], cfg: CleanConfig) -> tuple[str, str] | None:
    for i, m in enumerate(messages):
        if cfg.min_chars and (n := _letters(m["content"], cfg.min_chars)) < cfg.min_chars:
            return "too_short", (f"message {i} ({m['role']}) has {n} letters, digits or symbols after cleaning, "
                                 f"fewer than clean.min_chars = {cfg.min_chars}")
    total = sum(len(m["content"]) for m in messages)
    if total > cfg.max_chars:
        return "too_long", f"conversation has {total} characters, more than clean.max_chars = {cfg.max_chars}"
    return None


@dataclass
class CleanedMessages:
    """One conversation after the per-row rules (see `clean_messages`)."""

    messages: list[dict[str, Any]]
    touched: list[str]  # the text rules that changed at least one message, in rule order
    problem: tuple[str, str] | None  # (rule, reason) when a length limit removes the conversation
    pii: Counter  # PII replacements per type (empty when redaction is off or the conversation is removed)


def clean_messages(messages: list[dict[str, Any]], cfg: CleanConfig,
                   rules: list[tuple[str, Callable[[str], str]]] | None = None) -> CleanedMessages:
    """The per-row rules of this stage on one conversation, exactly as the clean stage applies them to a row (the
    text rules, markup kept where it is the content, the length limits, PII redaction, pii_only): the
    preference-data stage applies it to every side of a pair (prompt + chosen, prompt + rejected), so both
    datasets see the same text. Input messages are not modified. (`rules` is accepted for compatibility; the
    rules are always the stage's own for `cfg`.)"""
    cleaner = _cleaner(cfg)
    before = Counter(cleaner.pii)
    row, problem, changed = cleaner._apply({"id": "", "source": "", "line": 0, "messages": messages})
    return CleanedMessages(row["messages"], [r for r in changed if r != "pii"], problem, cleaner.pii - before)


@lru_cache(maxsize=8)
def _cleaner(cfg: CleanConfig) -> Cleaner:
    """One Cleaner per config for clean_messages (its counters and samples are not used)."""
    return Cleaner(cfg)


Sink = Callable[[dict[str, Any]], Any]


class Cleaner:
    """The rules as two passes over the rows, so the stage never holds the rows themselves in memory.

    1. `screen(rows, quarantine, changed)`: the per-row rules (text, length, PII) and exact duplicates; yields
       every survivor in input order and sends {id, source, line, rules} of each row a rule changed to
       `changed`. Only a 16-byte hash, the location and (for the near-duplicate rule) the conversation
       lines of each survivor are remembered: ~0.3 KB a row instead of the whole row.
    2. `duplicates()`: near duplicates among the survivors that are not exact duplicates.
    3. `finish(survivors, quarantine)`: the same survivors again, in the same order (e.g. re-read from a spool
       file); yields the kept rows and sends each duplicate to `quarantine` with the row it duplicates.
    """

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.counts = {r: {"touched": 0, "removed": 0} for r in RULES}
        self.pii: Counter = Counter()
        self.near_pairs = 0
        self.rows_in = self.quarantined = self.kept = 0
        self._text_rules = _text_rules(cfg)
        self._text_rules_keep_markup = _text_rules(cfg, html=False)
        self.samples: dict[str, list[dict[str, Any]]] = {r: [] for r in (*_TEXT_RULES, "pii")}
        self.markup_kept = 0
        self._where: list[tuple[str, str, int]] = []  # (id, source, line) of each survivor
        self._first: dict[bytes, int] = {}  # exact hash -> index of its first survivor
        self._exact_of: dict[int, int] = {}  # survivor index of an exact duplicate -> index of its first copy
        self._unique: list[int] = []  # survivor index of each exact-unique text, in order
        self._texts: list[str] = []  # conversation_lines of each exact-unique survivor (near-duplicate rule)
        self._removed: dict[int, tuple[str, str, dict[str, Any]]] = {}  # survivor index -> (rule, reason, extra)
        self._sources: dict[str, str] = {}  # one string object per source file

    def _apply(self, row: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None, list[str]]:
        """(cleaned row, (rule, reason) if a length rule removes it, names of the rules that changed it)."""
        cfg, counts, samples = self.cfg, self.counts, self.samples
        messages = [dict(m) for m in row["messages"]]
        rules = self._text_rules
        if cfg.strip_html and markup_is_content(messages):
            rules = self._text_rules_keep_markup
            self.markup_kept += 1
        changed: list[str] = []
        for rule, fn in rules:
            touched = False
            for i, m in enumerate(messages):
                old = m["content"]
                new = fn(old)
                if new != old:
                    if not touched and len(samples[rule]) < SAMPLES:
                        samples[rule].append(_sample(row, i, m["role"], old, new, cfg.redact_pii))
                    m["content"], touched = new, True
            if touched:
                counts[rule]["touched"] += 1
                changed.append(rule)
        cleaned = {**row, "messages": messages}
        problem = _length_problem(messages, cfg)
        if problem is None and cfg.redact_pii:
            found: Counter = Counter()
            for i, m in enumerate(messages):
                new, n = _redact_cached(m["content"])
                if n and not found and len(samples["pii"]) < SAMPLES:
                    samples["pii"].append(_sample(row, i, m["role"], m["content"], new, True, show_before=False))
                m["content"] = new
                found.update(n)
            if found:
                counts["pii"]["touched"] += 1
                changed.append("pii")
            self.pii += found
        if problem is None:
            problem = _pii_only_problem(messages)
        return cleaned, problem, changed

    def _location(self, index: int) -> tuple[str, str]:
        row_id, source, line = self._where[index]
        return row_id, f"{source}:{line}"

    @property
    def survivors(self) -> int:
        return len(self._where)

    def screen(self, rows: Iterable[dict[str, Any]], quarantine: Sink,
               changed: Sink | None = None) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        for row in rows:
            self.rows_in += 1
            cleaned, problem, rules = self._apply(row)
            if rules and changed is not None:
                changed({"id": row["id"], "source": row["source"], "line": row["line"], "rules": rules})
            if problem:
                self.counts[problem[0]]["removed"] += 1
                self.quarantined += 1
                quarantine(_quarantine(cleaned, *problem, cfg.redact_pii))
                continue
            index = len(self._where)
            source = self._sources.setdefault(cleaned["source"], cleaned["source"])
            self._where.append((cleaned["id"], source, cleaned["line"]))
            yield cleaned
            if not (cfg.exact_dedup or cfg.near_dedup):
                continue
            text = conversation_text(cleaned)
            if cfg.exact_dedup:
                first = self._first.setdefault(exact_digest(text), index)
                if first != index:
                    self._exact_of[index] = first
                    kept_id, location = self._location(first)
                    self._removed[index] = ("exact_duplicate", f"same normalised text as row {kept_id}",
                                            {"duplicate_of": kept_id, "duplicate_of_location": location})
                    continue
            if cfg.near_dedup:
                self._unique.append(index)
                self._texts.append(conversation_lines(cleaned))

    def duplicates(self) -> int:
        """Find the near duplicates (after `screen`); the number of survivors that will be removed."""
        cfg = self.cfg
        self._first.clear()
        if cfg.near_dedup and self._texts:
            removed, self.near_pairs = _near_duplicates(self._texts, cfg)
            for j, (i, sim) in removed.items():
                kept_id, location = self._location(self._unique[i])
                self._removed[self._unique[j]] = (
                    "near_duplicate",
                    f"Jaccard {sim:.3f} >= clean.near_dup_threshold = {cfg.near_dup_threshold} with row {kept_id}",
                    {"duplicate_of": kept_id, "duplicate_of_location": location, "similarity": round(sim, 4)},
                )
            for index, first in self._exact_of.items():  # the first copy went as a near duplicate: name the kept row
                if (near := self._removed.get(first)) and near[0] == "near_duplicate":
                    copy_id = self._where[first][0]
                    self._removed[index] = ("exact_duplicate", f"same normalised text as row {copy_id}, itself a "
                                            f"near duplicate of row {near[2]['duplicate_of']}",
                                            {**near[2], "duplicate_of_copy": copy_id})
        self._texts, self._unique, self._exact_of = [], [], {}
        return len(self._removed)

    def finish(self, survivors: Iterable[dict[str, Any]], quarantine: Sink) -> Iterator[dict[str, Any]]:
        for index, row in enumerate(survivors):
            if row["id"] != self._where[index][0]:
                raise RuntimeError(f"survivor {index} is {row['id']}, expected {self._where[index][0]}")
            removed = self._removed.get(index)
            if removed is None:
                self.kept += 1
                yield row
                continue
            rule, reason, extra = removed
            self.counts[rule]["removed"] += 1
            self.quarantined += 1
            quarantine(_quarantine(row, rule, reason, self.cfg.redact_pii, **extra))

    def report(self) -> dict[str, Any]:
        return _report(self.cfg, self.counts, self.pii, self.near_pairs, self.rows_in, self.kept, self.quarantined,
                       self.samples, self.markup_kept)


def _near_duplicates(lines: list[str], cfg: CleanConfig) -> tuple[dict[int, tuple[int, float]], int]:
    """{index of a removed row: (index of the kept row it duplicates, jaccard)}, and the number of pairs;
    `lines` are conversation_lines (see pipelines.dedup.similar_pairs)."""
    pairs = similar_pairs(lines, cfg.near_dup_threshold, cfg.num_perm, cfg.shingle_size, cfg.boilerplate_share,
                          cfg.own_similarity_ratio)
    earlier: dict[int, list[tuple[int, float]]] = {}
    for i, j, sim in pairs:
        earlier.setdefault(j, []).append((i, sim))
    removed: dict[int, tuple[int, float]] = {}
    for j in sorted(earlier):  # input order: a text is a duplicate only of a text that was kept
        kept = [(sim, -i) for i, sim in earlier[j] if i not in removed]
        if kept:
            sim, neg_i = max(kept)  # the most similar kept text; on a tie the earliest
            removed[j] = (-neg_i, sim)
    return removed, len(pairs)


def clean(rows: Iterable[dict[str, Any]], cfg: CleanConfig) -> CleanResult:
    """Apply the rules in order (see the module docstring) in memory. Input rows are not modified."""
    cleaner = Cleaner(cfg)
    quarantined: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    survivors = list(cleaner.screen(rows, quarantined.append, changed.append))
    cleaner.duplicates()
    kept = list(cleaner.finish(survivors, quarantined.append))
    return CleanResult(kept, quarantined, cleaner.counts, cleaner.pii, cleaner.near_pairs, cleaner.samples,
                       cleaner.markup_kept, changed)


# ---------------------------------------------------------------------------------------------- stage


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"'{path}' line {n} is not valid JSON ({exc.msg}); re-run the ingest stage "
                                 "instead of editing its output") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise StageError(f"'{path}' line {n} has no 'messages' list; re-run the ingest stage")
            yield row


def _validated(rows: Iterable[dict[str, Any]], source: Path) -> Iterator[dict[str, Any]]:
    """The rows, checked against the row contract VALIDATE_ROWS at a time (ids: unique across all chunks)."""
    seen: set[str] = set()
    for chunk in chunked(rows, VALIDATE_ROWS):
        what, fix = f"the cleaned rows from '{source}'", "re-run the ingest stage, and report a bug if it persists"
        try:
            validate(ConversationSchema, chunk)
        except (SchemaError, SchemaErrors) as exc:
            raise StageError(describe_failures(exc, what, fix)) from None
        duplicate = next((r["id"] for r in chunk if r["id"] in seen or seen.add(r["id"])), None)
        if duplicate is not None:
            raise StageError(f"{what} breaks the row contract: the id {duplicate} appears twice; {fix}")
        yield from chunk


def run(params: Params) -> StageResult:
    """Two streaming passes (see Cleaner): memory grows by ~0.3 KB per row, whatever the rows' size."""
    cfg = params.clean
    out = claim_output(params, "cleaned")  # before any work: the folder is the stage's own, and writable
    source = require(params.path("raw_examples") / "examples.jsonl", "ingest")
    cleaner = Cleaner(cfg)
    failure = None
    with atomic_dir(out, "cleaned") as tmp, open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as quarantine, \
            open(tmp / "changes.jsonl", "w", encoding="utf-8") as changes:

        def to_quarantine(record: dict[str, Any]) -> None:
            quarantine.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

        def to_changes(record: dict[str, Any]) -> None:
            changes.write(json.dumps(record, ensure_ascii=False) + "\n")

        spool = tmp / "survivors.jsonl.part"  # pass 1 -> pass 2, inside the temp folder: a crash leaves nothing
        rows = tqdm(_read_rows(source), desc="clean", unit=" rows", disable=None, mininterval=2)
        write_jsonl(spool, cleaner.screen(rows, to_quarantine, to_changes))
        removed = cleaner.duplicates()
        kept = _validated(cleaner.finish(read_jsonl(spool), to_quarantine), source)
        if cleaner.rows_in and removed == cleaner.survivors:
            deque(kept, maxlen=0)  # quarantine the duplicates, but write no examples: nothing downstream may run
            by_rule = ", ".join(f"{r}: {c['removed']}" for r, c in cleaner.counts.items() if c["removed"])
            failure = (f"the clean stage removed all {cleaner.rows_in} rows of '{source}' ({by_rule}); see "
                       f"'{out / 'quarantine.jsonl'}' and relax the clean section of params.yaml")
        else:
            write_jsonl(tmp / "examples.jsonl", kept)
        spool.unlink()
        report = cleaner.report()
        write_json(tmp / "report.json", {"status": "failed" if failure else "ok", "error": failure, **report,
                                         "config": cfg.model_dump()})
    if failure:
        raise StageError(failure)
    outputs = {name: out / f"{name}.{ext}" for name, ext in
               (("examples", "jsonl"), ("quarantine", "jsonl"), ("changes", "jsonl"), ("report", "json"))}
    return StageResult(STAGE, outputs, report)
