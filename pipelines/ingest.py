"""Ingest: read every raw file, detect each row's format and normalise it to one conversation schema.

    python -m pipelines ingest                 # reads paths.raw_dir, writes paths.raw_examples

Reads `.jsonl`/`.ndjson` (streamed line by line), `.json` (an array, a single object, or JSONL saved
as .json), `.csv` (streamed; a header row, one record per row) and `.parquet` (streamed in batches),
recursively and in sorted order. Row formats (detected per row unless `data.format` says otherwise):

    messages           {"messages": [{"role", "content"}], "tools"?}          (OpenAI / TRL conversational)
    sharegpt           {"conversations": [{"from", "value"}], "system"?, "tools"?}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    prompt_completion  {"prompt", "completion"}   prompt_response {"prompt", "response"}
    input_output       {"input", "output"}

Every other field goes to `meta`. Preference pairs (`chosen`/`rejected`) are read by the preference-data stage
(pipelines/preferences.py), not SFT: they are set aside here as `preference_pair`; KTO rows with `label: false`
are excluded as `undesirable_example` (the preference-data stage reads them as undesirable rows). Neither counts
as malformed. Nothing bad crashes the stage or costs a good
row: each bad line is quarantined with its file, line and reason, and a file that cannot be read at
all gets one sentence in the report. Outputs (paths.raw_examples): examples.jsonl, quarantine.jsonl,
report.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipelines.config import Params
from pipelines.io import StageError, StageResult, atomic_dir, write_json
from pipelines.schemas import ConversationSchema, conversation_problem, validate

STAGE = "ingest"
EXCERPT_CHARS = 200
CHUNK_ROWS = 2000  # rows validated with pandera and written per batch (bounds memory on big inputs)

# Rules that remove a row without it being broken: they never count toward data.max_bad_fraction.
NOT_MALFORMED = frozenset({"preference_pair", "undesirable_example"})

_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}
_SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "function_call": "assistant",  # the model's tool call is something the model says
    "observation": "tool", "tool": "tool", "function": "tool",
}
_PAIR_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
    "input_output": ("input", "output"),
}
_REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
             **_PAIR_KEYS}
_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
               list: "array", dict: "object"}
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")


class Rejection(str):
    """Why a row was not kept: the text is the reason (one sentence), `.rule` the quarantine rule."""

    rule: str

    def __new__(cls, reason: str, rule: str = "invalid_row") -> Rejection:
        self = super().__new__(cls, reason)
        self.rule = rule
        return self


class _Invalid(Exception):
    def __init__(self, reason: str, rule: str = "invalid_row") -> None:
        super().__init__(reason)
        self.rule = rule


# ----------------------------------------------------------------------------------------------------
# Pure transform: one raw object -> one conversation row (or the reason it cannot be one)
# ----------------------------------------------------------------------------------------------------


def detect_format(obj: dict[str, Any]) -> str | None:
    """The row format of `obj` from its keys, 'preference' for chosen/rejected pairs (even with a side missing:
    the preference-data stage reports that), None if unknown."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    for fmt, (a, b) in _PAIR_KEYS.items():
        if a in obj and b in obj:
            return fmt
    return None


def normalise_row(
    obj: Any, fmt: str = "auto", system_prompt: str | None = None
) -> tuple[dict[str, Any] | None, Rejection | None]:
    """({format, messages, tools, meta}, None) for a trainable row, else (None, Rejection(reason, rule))."""
    if not isinstance(obj, dict):
        return None, Rejection(f"record is a JSON {_type(obj)}, expected an object with the row's fields")
    detected = detect_format(obj)
    if detected == "preference":
        return None, Rejection(
            "row is a preference pair (chosen/rejected): the preference-data stage reads it (python -m pipelines "
            "preference-data), not SFT", "preference_pair")
    if fmt != "auto":
        if any(k not in obj for k in _REQUIRED[fmt]):
            return None, Rejection(
                f"data.format is '{fmt}', which needs the keys {', '.join(_REQUIRED[fmt])}, but the row has "
                f"{_keys(obj)}", "unknown_format")
        detected = fmt
    if detected is None:
        return None, Rejection(
            f"no known row format in keys {_keys(obj)}; expected messages, conversations, instruction/output, "
            "prompt/completion, prompt/response or input/output", "unknown_format")
    try:
        messages, tools, used = _BUILDERS[detected](obj)
        messages = _finish(messages, system_prompt)
    except _Invalid as exc:
        return None, Rejection(str(exc), exc.rule)
    if obj.get("label") is False:
        return None, Rejection("row is labelled false (an undesirable example); SFT must not learn from it",
                               "undesirable_example")
    meta = {k: v for k, v in obj.items() if k not in used}
    return {"format": detected, "messages": messages, "tools": tools, "meta": meta}, None


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _keys(obj: dict[str, Any]) -> str:
    keys = sorted(str(k) for k in obj)
    return "[" + ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "") + "]"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a string, got {_type(value)}")
    return value


def _content(value: Any, i: int) -> str:
    """A message's content: a string, or OpenAI content parts of type text (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else _type(part)
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _Invalid(f"message {i} has a {kind!r} content part; only text parts can be used for text SFT")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _Invalid(f"message {i} content must be a string or a list of text parts, got {_type(value)}")


def _openai_message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict):
        raise _Invalid(f"message {i} must be an object with role and content, got {_type(m)}")
    role = m.get("role")
    if not isinstance(role, str) or role not in _OPENAI_ROLES:
        raise _Invalid(f"message {i} has role {role!r}; expected system, user, assistant or tool")
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        # An assistant turn that only calls tools: the calls are the text the model must learn to emit.
        content = json.dumps(m["tool_calls"], ensure_ascii=False)
    # Other keys (name, tool_call_id, weight) are not part of the row contract and are dropped.
    return {"role": _OPENAI_ROLES[role], "content": _content(content, i)}


def _tools(value: Any) -> str | None:
    """Tool schemas as a JSON string (the row contract), or None when there are none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise _Invalid("'tools' is a string but not valid JSON; expected a JSON list of tool schemas") from None
    if not isinstance(value, (list, dict)):
        raise _Invalid(f"'tools' must be a list of tool schemas, got {_type(value)}")
    return json.dumps(value, ensure_ascii=False) if value else None


def _with_system(messages: list[dict[str, str]], obj: dict[str, Any]) -> tuple[list[dict[str, str]], set[str]]:
    """Prepend the row's optional `system` field unless the conversation already has a system message."""
    system = obj.get("system")
    if system is None or any(m["role"] == "system" for m in messages):
        return messages, set()
    return [{"role": "system", "content": _text(system, "'system'")}, *messages], {"system"}


Built = tuple[list[dict[str, str]], str | None, set[str]]  # messages, tools, keys consumed (not meta)


def _from_messages(obj: dict[str, Any]) -> Built:
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise _Invalid(f"'messages' must be a list of {{role, content}} objects, got {_type(raw)}")
    return [_openai_message(m, i) for i, m in enumerate(raw)], _tools(obj.get("tools")), {"messages", "tools"}


def _from_sharegpt(obj: dict[str, Any]) -> Built:
    raw = obj["conversations"]
    if not isinstance(raw, list):
        raise _Invalid(f"'conversations' must be a list of {{from, value}} objects, got {_type(raw)}")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise _Invalid(f"turn {i} must be an object with from and value, got {_type(turn)}")
        speaker = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Invalid(f"turn {i} is from {speaker!r}; expected human, gpt, system, function_call or observation")
        messages.append({"role": role, "content": _content(turn.get("value", turn.get("content")), i)})
    messages, used = _with_system(messages, obj)
    return messages, _tools(obj.get("tools")), {"conversations", "tools", *used}


def _from_alpaca(obj: dict[str, Any]) -> Built:
    instruction = _text(obj.get("instruction"), "'instruction'")
    extra = obj.get("input")
    extra = "" if extra is None else _text(extra, "'input'")
    output = _text(obj.get("output"), "'output'")
    history = obj.get("history")
    if history in (None, ""):
        history = []
    if not isinstance(history, list):
        raise _Invalid(f"'history' must be a list of [question, answer] pairs, got {_type(history)}")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Invalid(f"history item {i} must be a [question, answer] pair")
        messages += [{"role": "user", "content": _text(pair[0], f"history item {i} question")},
                     {"role": "assistant", "content": _text(pair[1], f"history item {i} answer")}]
    user = "\n\n".join(part for part in (instruction, extra) if part.strip())
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages, used = _with_system(messages, obj)
    return messages, None, {"instruction", "input", "output", "history", *used}


def _pair_builder(fmt: str) -> Callable[[dict[str, Any]], Built]:
    prompt_key, answer_key = _PAIR_KEYS[fmt]

    def build(obj: dict[str, Any]) -> Built:
        prompt, answer = obj.get(prompt_key), obj.get(answer_key)
        if isinstance(prompt, list) and isinstance(answer, list):  # TRL's conversational prompt-completion
            messages = [_openai_message(m, i) for i, m in enumerate(prompt + answer)]
        else:
            messages = [{"role": "user", "content": _text(prompt, f"'{prompt_key}'")},
                        {"role": "assistant", "content": _text(answer, f"'{answer_key}'")}]
        messages, used = _with_system(messages, obj)
        return messages, _tools(obj.get("tools")), {prompt_key, answer_key, "tools", *used}

    return build


_BUILDERS: dict[str, Callable[[dict[str, Any]], Built]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    **{fmt: _pair_builder(fmt) for fmt in _PAIR_KEYS},
}


def _order_problem(messages: list[dict[str, str]]) -> str | None:
    """Role orders that chat templates reject or that make no sense to train on."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            return f"system message {i} is not the first message"
        if m["role"] == "tool" and (i == 0 or messages[i - 1]["role"] not in ("assistant", "tool")):
            return f"tool message {i} does not follow an assistant tool call"
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first not in (None, "user"):
        return f"conversation starts with role {first!r}; expected a user message first"
    return None


def _finish(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Drop empty system messages, add the default system prompt, and check the conversation."""
    messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _Invalid(f"message {i} ({m['role']}) is empty", "invalid_conversation")
        if "\x00" in m["content"]:
            raise _Invalid(f"message {i} ({m['role']}) contains a NUL character; the text looks like binary data")
    problem = _order_problem(messages) or conversation_problem(messages)
    if problem:
        raise _Invalid(problem, "invalid_conversation")
    return messages


# ----------------------------------------------------------------------------------------------------
# Readers: a file -> records (line, parsed object or the reason it could not be parsed)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Record:
    line: int  # 1-based physical line (JSONL, CSV record start), record number (JSON array, Parquet)
    obj: Any = None
    text: str | None = None  # raw text for the quarantine excerpt (None: serialise obj when needed)
    problem: Rejection | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # extra quarantine keys, e.g. the physical line


def _sniff(head: bytes) -> str | None:
    """Files that are not text in UTF-8, recognised by their first bytes."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 encoded; re-save it as UTF-8"
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed; decompress it first"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive; extract it first"
    if head.startswith(b"PAR1"):
        return "is a Parquet file; give it the .parquet extension"
    return None


def _physical_lines(fh: IO[bytes], limit: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too_long) per line; a line over `limit` bytes yields only its head, the rest
    is skipped unread into memory (a 10 MB line costs 1 MB of buffer, not 10)."""
    number = 0
    while chunk := fh.readline(limit + 1):
        number += 1
        if len(chunk.rstrip(b"\r\n")) > limit:
            while not chunk.endswith(b"\n") and (chunk := fh.readline(1 << 20)):
                pass
            yield number, b"", True
            continue
        yield number, chunk, False


def _too_long(line: int, limit: int) -> Record:
    return Record(line, text="", problem=Rejection(
        f"line is longer than data.max_line_bytes = {limit} bytes; it was skipped without parsing", "line_too_long"))


def _parse_json_text(text: str, line: int) -> Record:
    try:
        return Record(line, json.loads(text), text)
    except json.JSONDecodeError as exc:
        return Record(line, text=text, problem=Rejection(
            f"invalid JSON at column {exc.colno}: {exc.msg}", "malformed_json"))
    except RecursionError:
        return Record(line, text=text, problem=Rejection(
            "JSON is nested deeper than the parser allows", "too_deep"))


def _unreadable(fh: IO[bytes], notes: list[str]) -> Record | None:
    """The whole-file rejection when a streamed file's first bytes are not readable text; else rewind it."""
    if problem := _sniff(fh.read(4)):
        notes.append(problem)
        return Record(1, text="", problem=Rejection(f"file {problem}", "unreadable_file"))
    fh.seek(0)
    return None


def _read_jsonl(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    with open(path, "rb") as fh:
        if rejected := _unreadable(fh, notes):
            yield rejected
            return
        for number, raw, too_long in _physical_lines(fh, limit):
            if too_long:
                yield _too_long(number, limit)
                continue
            # A BOM may start any line when files were concatenated, not only the first.
            raw = raw.rstrip(b"\r\n").removeprefix(_BOM)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(number, text=raw.decode("utf-8", "replace"), problem=Rejection(
                    f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start}); re-save the file as "
                    "UTF-8", "invalid_utf8"))
                continue
            yield _parse_json_text(text, number)


def _read_json(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    """A JSON array (or one object) loaded whole; records are numbered 1.. in array order."""
    data = path.read_bytes()
    if problem := _sniff(data[:4]):
        notes.append(problem)
        yield Record(1, text="", problem=Rejection(f"file {problem}", "unreadable_file"))
        return
    # Invalid bytes survive as lone surrogates and get the record quarantined when it is serialised.
    text = data.removeprefix(_BOM).decode("utf-8", "surrogateescape")
    start = _WS.match(text).end()
    if start == len(text):
        notes.append("is empty")
        return
    if text[start] == "{":
        yield from _read_json_object(path, text, start, limit, notes)
    elif text[start] == "[":
        yield from _read_json_array(text, start, notes)
    else:
        notes.append(f"is not a JSON array or object (it starts with {text[start:start + 20]!r}); expected a "
                     "JSON array of row objects")
        yield Record(1, text=text[:EXCERPT_CHARS], problem=Rejection("file is not a JSON array or object",
                                                                    "unreadable_file"))


def _read_json_object(path: Path, text: str, start: int, limit: int, notes: list[str]) -> Iterator[Record]:
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
        error = None
    except (json.JSONDecodeError, RecursionError) as exc:
        obj, end, error = None, -1, exc
    if error is None and _WS.match(text, end).end() == len(text):
        yield Record(1, obj, text[start:start + EXCERPT_CHARS])
        return
    # JSON Lines saved with a .json name: several objects, each starting a line at column 0.
    if error is None or sum(1 for ln in text.splitlines() if ln.startswith("{")) > 1:
        notes.append("holds one JSON object per line, not an array; it was read as JSON Lines (rename it to .jsonl)")
        yield from _read_jsonl(path, limit, [])
        return
    where = f"line {error.lineno} column {error.colno} ({error.msg})" if isinstance(error, json.JSONDecodeError) \
        else "its start (nested deeper than the parser allows)"
    notes.append(f"is not valid JSON at {where}; no rows were read, fix it or re-export the file")
    rule = "malformed_json" if isinstance(error, json.JSONDecodeError) else "too_deep"
    yield Record(1, text=text[start:start + EXCERPT_CHARS], problem=Rejection(f"invalid JSON at {where}", rule))


def _before(n: int) -> str:
    if n == 0:
        return "no records were read"
    return "the record before it was read" if n == 1 else f"the {n} records before it were read"


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def _read_json_array(text: str, start: int, notes: list[str]) -> Iterator[Record]:
    """Element by element with raw_decode, so a broken or truncated tail keeps the records before it."""
    decoder = json.JSONDecoder()
    idx, record, line, counted = start + 1, 0, 1, 0
    while True:
        idx = _WS.match(text, idx).end()
        if idx < len(text) and text[idx] == "]":
            if _WS.match(text, idx + 1).end() != len(text):
                notes.append(f"has extra content after the closing ']' at record {record}; it was ignored")
            return
        line += text.count("\n", counted, idx)
        counted = idx
        record += 1
        try:
            obj, end = decoder.raw_decode(text, idx)
        except (json.JSONDecodeError, RecursionError) as exc:
            where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else f"line {line}"
            what = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested deeper than the parser allows"
            notes.append(f"is not valid JSON at {where} ({what}); {_before(record - 1)} and the rest of the file "
                         "was skipped, fix it or re-export the file")
            rule = "malformed_json" if isinstance(exc, json.JSONDecodeError) else "too_deep"
            yield Record(record, text=text[idx:idx + EXCERPT_CHARS], problem=Rejection(
                f"invalid JSON at {where}: {what}", rule), extra={"file_line": line})
            return
        yield Record(record, obj, text[idx:min(end, idx + EXCERPT_CHARS)], extra={"file_line": line})
        idx = _WS.match(text, end).end()
        if idx < len(text) and text[idx] == ",":
            idx += 1  # a trailing comma before ']' is tolerated: nothing is lost by accepting it
        elif idx == len(text) or text[idx] != "]":
            reason = "ends before the closing ']'" if idx == len(text) else f"has {text[idx]!r} where , or ] belongs"
            notes.append(f"{reason} after record {record}; {_before(record)}")
            if idx < len(text):
                yield Record(record + 1, text=text[idx:idx + EXCERPT_CHARS], problem=Rejection(
                    f"invalid JSON after record {record}: {reason}", "malformed_json"))
            return


_CSV_JSON_COLUMNS = ("messages", "conversations", "history", "prompt", "completion")


def _csv_cell(key: str, value: str) -> Any:
    """CSV cells are strings; nested columns may hold JSON, and KTO labels are written true/false."""
    if key in _CSV_JSON_COLUMNS and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    if key == "label" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _read_csv(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    """Streamed with the csv module; a record spanning lines gets the number of its first line."""
    overlong: list[int] = []

    def lines(fh: IO[bytes]) -> Iterator[str]:
        for number, raw, too_long in _physical_lines(fh, limit):
            if too_long:
                overlong.append(number)
                yield "\n"  # keeps csv's line count aligned with the file; a blank record is skipped
                continue
            yield (raw.removeprefix(_BOM) if number == 1 else raw).decode("utf-8", "surrogateescape")

    previous_limit = csv.field_size_limit(limit)  # an unclosed quote must not swallow the whole file
    try:
        with open(path, "rb") as fh:
            if rejected := _unreadable(fh, notes):
                yield rejected
                return
            reader = csv.reader(lines(fh))
            header: list[str] | None = None
            end = 0
            while True:
                begin = end + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    row = None
                    problem = Rejection(f"CSV error: {exc}", "malformed_csv")
                end = reader.line_num
                for number in overlong:
                    yield _too_long(number, limit)
                overlong.clear()
                if row is None:
                    yield Record(begin, text="", problem=problem)
                elif not any(cell.strip() for cell in row):
                    continue
                elif header is None:
                    header = [cell.strip() for cell in row]
                elif len(row) != len(header):
                    where = f"record on lines {begin}-{end}" if end > begin else "record"
                    yield Record(begin, text=",".join(row)[:EXCERPT_CHARS], problem=Rejection(
                        f"{where} has {len(row)} fields but the header has {len(header)}; quote fields that contain "
                        "commas or newlines, and close every quote", "malformed_csv"))
                else:
                    obj = {k: _csv_cell(k, v) for k, v in zip(header, row, strict=True)}
                    yield Record(begin, obj, ",".join(row)[:EXCERPT_CHARS])
    finally:
        csv.field_size_limit(previous_limit)


def _read_parquet(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                number += 1
                yield Record(number, obj)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        notes.append(f"could not be read as Parquet after {number} rows ({exc}); re-export it")
        yield Record(number + 1, text="", problem=Rejection(f"unreadable Parquet: {exc}", "unreadable_file"))


Reader = Callable[[Path, int, list[str]], Iterator[Record]]
READERS: dict[str, Reader] = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
                              ".csv": _read_csv, ".parquet": _read_parquet}


# ----------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------


def row_id(source: str, line: int) -> str:
    """Stable id of a row: the same file and line give the same id on every run."""
    return hashlib.sha1(f"{source}:{line}".encode()).hexdigest()[:16]


def _excerpt(record: Record) -> str:
    text = record.text
    if text is None:
        try:
            text = json.dumps(record.obj, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            text = repr(record.obj)[:EXCERPT_CHARS]
    # Lone surrogates (invalid bytes read with surrogateescape) cannot be written as UTF-8.
    return text[:EXCERPT_CHARS].encode("utf-8", "replace").decode("utf-8")


@dataclass
class FileReport:
    source: str
    rows_read: int = 0
    kept: int = 0
    quarantined: int = 0
    formats: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "kept": self.kept,
                "quarantined": self.quarantined, "formats": dict(self.formats), "rules": dict(self.rules),
                "messages": self.messages}


class _Sink:
    """Kept rows are validated against the row contract in chunks, then written; rejects go straight out."""

    def __init__(self, examples: IO[str], quarantine: IO[str]) -> None:
        self.examples, self.quarantine = examples, quarantine
        self.rows: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def keep(self, row: dict[str, Any], line: str) -> None:
        self.rows.append(row)
        self.lines.append(line)
        if len(self.rows) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            validate(ConversationSchema, self.rows)  # a failure here is a bug in this module, not a user error
            self.examples.writelines(self.lines)
        self.rows, self.lines = [], []

    def reject(self, source: str, record: Record, why: Rejection) -> None:
        entry = {"source": source, "line": record.line, "stage": STAGE, "rule": why.rule, "reason": str(why),
                 "excerpt": _excerpt(record), **record.extra}
        self.quarantine.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _finite(meta: dict[str, Any]) -> dict[str, Any]:
    """NaN and Infinity are not JSON: in meta (e.g. a Parquet float column) they become null."""
    return json.loads(json.dumps(meta, default=str), parse_constant=lambda _: None)


def _serialise(row: dict[str, Any]) -> tuple[str | None, Rejection | None]:
    try:
        try:
            line = json.dumps(row, ensure_ascii=False, default=str, allow_nan=False) + "\n"
        except ValueError:
            row["meta"] = _finite(row["meta"])
            line = json.dumps(row, ensure_ascii=False, default=str, allow_nan=False) + "\n"
        line.encode("utf-8")
    except UnicodeEncodeError:
        return None, Rejection("text is not valid UTF-8 (invalid bytes or a lone surrogate escape)", "invalid_utf8")
    except RecursionError:
        return None, Rejection("fields are nested deeper than can be serialised", "too_deep")
    return line, None


def _route(record: Record, source: str, report: FileReport, sink: _Sink, params: Params) -> None:
    """One record to the examples (normalised, serialisable) or to the quarantine, counted either way."""
    report.rows_read += 1
    why = record.problem
    row = None
    if why is None:
        row, why = normalise_row(record.obj, params.data.format, params.data.system_prompt)
    if row is not None:
        row = {"id": row_id(source, record.line), "source": source, "line": record.line, **row}
        line, why = _serialise(row)
    if why is not None:
        sink.reject(source, record, why)
        report.quarantined += 1
        report.rules[why.rule] += 1
    else:
        sink.keep(row, line)
        report.kept += 1
        report.formats[row["format"]] += 1


def _ingest_file(path: Path, source: str, params: Params, sink: _Sink) -> FileReport:
    """Read one raw file into `sink`; every record ends up kept or quarantined, never dropped."""
    report = FileReport(source)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        report.messages.append(f"{source}: unknown extension '{path.suffix}', skipped; supported: "
                               f"{', '.join(READERS)}")
        return report
    if path.stat().st_size == 0:
        report.messages.append(f"{source}: file is empty, no rows read")
        return report
    notes: list[str] = []
    try:
        for record in reader(path, params.data.max_line_bytes, notes):
            _route(record, source, report, sink, params)
    except OSError as exc:  # unreadable (permissions, vanished, I/O error): say so, keep what was read
        notes.append(f"could not be read after {_rows(report.rows_read)} ({exc.strerror or exc}); check the file")
    report.messages += [f"{source}: {note}" for note in notes]
    if n := report.rules["preference_pair"]:
        report.messages.append(
            f"{source}: {_rows(n)} of preference pairs (chosen/rejected) are read by the preference-data stage, not "
            "SFT (set aside here as preference_pair)")
    if n := report.rules["undesirable_example"]:
        report.messages.append(f"{source}: {_rows(n)} labelled false (undesirable examples) excluded; SFT "
                               "must not learn from examples marked bad (the preference-data stage reads them)")
    if report.rows_read == 0 and not notes:
        report.messages.append(f"{source}: no rows found in the file")
    return report


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def raw_files(raw_dir: Path) -> list[Path]:
    """Every file under raw_dir, recursively, in a stable order (sorted relative paths)."""
    return sorted((p for p in raw_dir.rglob("*") if p.is_file()), key=lambda p: p.relative_to(raw_dir).as_posix())


def run(params: Params) -> StageResult:
    raw_dir, out = params.path("raw_dir"), params.path("raw_examples")
    raw_rel = _relative(raw_dir, params.root)
    if not raw_dir.is_dir():
        raise StageError(f"raw data folder '{raw_rel}' does not exist; create it and put JSONL, JSON, CSV or "
                         "Parquet files in it (paths.raw_dir in params.yaml)")
    examples_path, quarantine_path = out / "examples.jsonl", out / "quarantine.jsonl"
    reports: list[FileReport] = []
    with atomic_dir(out) as tmp:
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as ex, \
                open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as qu:
            sink = _Sink(ex, qu)
            for path in raw_files(raw_dir):
                source = _relative(path, params.root)
                if any(part.startswith(".") for part in path.relative_to(raw_dir).parts):
                    reports.append(FileReport(source, messages=[f"{source}: hidden file, skipped"]))
                    continue
                reports.append(_ingest_file(path, source, params, sink))
            sink.flush()
        summary = _summary(reports, params)
        failure = _failure(summary, raw_rel, _relative(quarantine_path, params.root), params)
        if failure:
            (tmp / "examples.jsonl").unlink()  # downstream stages must not consume a failed ingest
        write_json(tmp / "report.json", {"status": "failed" if failure else "ok", "error": failure, **summary})
    if failure:
        raise StageError(failure)
    return StageResult(STAGE, {"examples": examples_path, "quarantine": quarantine_path,
                               "report": out / "report.json"}, summary)


def _summary(reports: list[FileReport], params: Params) -> dict[str, Any]:
    rows_in = sum(r.rows_read for r in reports)
    rules: Counter = sum((r.rules for r in reports), Counter())
    malformed = sum(n for rule, n in rules.items() if rule not in NOT_MALFORMED)
    return {
        "rows_in": rows_in,
        "rows_out": sum(r.kept for r in reports),
        "quarantined": sum(r.quarantined for r in reports),
        "malformed": malformed,
        "bad_fraction": round(malformed / rows_in, 6) if rows_in else 0.0,
        "max_bad_fraction": params.data.max_bad_fraction,
        "files": len(reports),
        "formats": dict(sum((r.formats for r in reports), Counter())),
        "rules": dict(rules),
        "messages": [m for r in reports for m in r.messages],
        "per_file": [r.as_dict() for r in reports],
    }


def _failure(summary: dict[str, Any], raw_rel: str, quarantine_rel: str, params: Params) -> str | None:
    if summary["rows_out"] == 0:
        why = "; ".join(summary["messages"][:3]) or "no data files"
        return (f"no trainable rows in '{raw_rel}' ({summary['rows_in']} rows read, {summary['quarantined']} "
                f"quarantined, see '{quarantine_rel}'): {why}; add JSONL, JSON, CSV or Parquet files of SFT examples")
    if summary["bad_fraction"] > params.data.max_bad_fraction:
        return (f"{summary['malformed']} of {summary['rows_in']} rows ({summary['bad_fraction']:.1%}) are malformed, "
                f"more than data.max_bad_fraction = {params.data.max_bad_fraction:.1%}; see '{quarantine_rel}' for "
                "each file:line and reason, then fix the raw files or raise the threshold")
    return None
