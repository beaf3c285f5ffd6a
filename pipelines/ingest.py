"""Ingest: read every raw file, detect each row's format and normalise it to one conversation schema.

    python -m pipelines ingest                 # reads paths.raw_dir, writes paths.raw_examples

Reads `.jsonl`/`.ndjson` (streamed line by line), `.json` (an array, a single object, or JSONL saved
as .json), `.csv` (streamed; a header row, one record per row) and `.parquet` (streamed in batches),
recursively and in sorted order. A file is read by its content when that does not match its name: JSON
Lines in a .json file, a JSON array (pretty-printed or on one line) in a .jsonl file, and JSON objects written
over several lines each (one `json.dump(row, f, indent=2)`, or jq's default output) in either, are read as what
they are, with a note in the report. Row formats (detected per row unless `data.format` says otherwise):

    messages           {"messages": [{"role", "content"}], "tools"?}          (OpenAI / TRL conversational)
    sharegpt           {"conversations": [{"from", "value"}], "system"?, "tools"?}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    prompt_completion  {"prompt", "completion"}   prompt_response {"prompt", "response"}
    input_output       {"input", "output"}

Values, the same from every reader (JSON, JSONL, CSV, Parquet):
- a number or boolean in a text field is its JSON text (42 -> "42", 12.5 -> "12.5", true -> "true"; an
  integral float 42.0, which pandas writes for an integer column with gaps, -> "42");
- a missing value (null, NaN that pandas writes into JSON, None/NaN in Parquet, an empty CSV cell) is "":
  an optional field (input, system, history) is then simply absent, an empty required one (the answer)
  gets the row quarantined as an empty message.

Roles: ROLE_ALIASES maps the speaker names other tools write (case-insensitive) to system, user,
assistant and tool: developer -> system; human, prompter -> user; gpt, chatgpt, model (Gemma / Vertex AI),
bot, chatbot, ai -> assistant; function_call -> assistant (ShareGPT tool call); function, observation,
ipython -> tool. Content is a string or a list of parts in the shapes OpenAI's APIs write: chat
{"type": "text", "text"}, Responses {"type": "input_text" | "output_text", "text"}, Assistants
{"type": "text", "text": {"value"}}, and {"type": "refusal", "refusal"}; text parts are joined by newlines.
Image, audio and file parts are refused with a reason naming the part type.

Tool calls. The row contract has no tool_calls key, so a call is text of the assistant message, the text
the model learns to write. Each call is one line of JSON, {"name": ..., "arguments": ...} (arguments as
given: a JSON string in OpenAI's format, an object in ShareGPT's), the same line for every shape:
OpenAI `tool_calls` ({"function": {"name", "arguments"}}), legacy `function_call`, Responses API
{"type": "function_call"} items and ShareGPT `function_call` turns. An assistant message with text and
calls becomes the text, a newline, then the calls one per line; with content null, absent or "" it is
the calls alone. Results (role tool / function, ShareGPT observation, Responses function_call_output)
are tool messages; a result or a ShareGPT function_call exported as a JSON object instead of JSON text
is written as that text (the call in the {"name", "arguments"} form). Row-level `tools`, or else the
legacy top-level `functions`, become `tools`.

Per-turn training flags. An assistant message keeps OpenAI's "weight" (0 or 1); Axolotl's per-message
flag "train" / "training" (false / true, read by its `message_field_training`) becomes the same weight.
Weight 0 keeps the turn as context without loss (schemas.trained). Non-assistant turns are never trained,
so a flag on them is dropped (counted as turn_flag_ignored when it asked for training). A row whose every
assistant turn has weight 0 is quarantined as all_turns_weight_zero (not counted as malformed).

Conversation shape. Turns after the last assistant message (the user's next question, a tool result) are
trimmed and the row is kept (counted as trailing_turns_trimmed); a conversation that opens with an
assistant greeting is kept, and the format stage decides whether the chat template can render it.

Every other field goes to `meta`. Preference pairs (`chosen`/`rejected`) are read by the preference-data
stage (pipelines/preferences.py), not SFT: they are set aside here as `preference_pair`; KTO rows with
`label: false` are excluded as `undesirable_example` (the preference-data stage reads them as undesirable
rows). Neither counts as malformed. Nothing bad crashes the stage or costs a good
row: each bad line is quarantined with its file, line, reason and an excerpt (PII and secrets redacted
when clean.redact_pii is on, as the data will be), and a file that cannot be read at all gets one
sentence in the report; each change made to a kept row is counted in the report's `changes` (CHANGES).
Files are found by `raw_files`: symlinks that leave the project are reported and not read unless
data.follow_links; dangling links, pipes and hidden files are reported; a file name that is not UTF-8 is
read and recorded with its bytes escaped. A CSV's delimiter is sniffed (`_read_csv`). Every file not read
at all (a link, a pipe, a hidden file, an unknown extension) counts in `files_skipped`, with its reason in
`skipped_files`; every note on a file (`messages`) is also logged as a warning, so the command line and the
Dagster run show it, not only report.json.

Replay (data.replay, pipelines.split mixes it into the train split). With data.replay.fraction > 0 the
replay file is read after the raw files, by the same readers and rules, except that data.format and
data.system_prompt are not applied (general data keeps its own form: formats are detected, no task
system prompt is added); its rows carry `"replay": true` and count in the report's `replay` section. The
file is the set shipped in the package (`general`: source `pipelines/replay_general.jsonl`) or a file in
paths.raw_dir, which is then never read as task rows (with fraction 0 it is skipped, with a note). Being
read last, a replay row that duplicates a task row is the one the clean stage drops.
Outputs (paths.raw_examples): examples.jsonl, quarantine.jsonl, report.json.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from pipelines.config import SHIPPED_REPLAY, Params
from pipelines.io import StageError, StageResult, atomic_dir, claim_output, write_json
from pipelines.pii import redact
from pipelines.schemas import ConversationSchema, conversation_problem, trained, validate

STAGE = "ingest"
log = logging.getLogger(__name__)
EXCERPT_CHARS = 200
CHUNK_ROWS = 2000  # rows validated with pandera and written per batch (bounds memory on big inputs)

# Rules that remove a row without it being broken: they never count toward data.max_bad_fraction.
NOT_MALFORMED = frozenset({"unsupported_format", "preference_pair", "undesirable_example", "all_turns_weight_zero",
                           "repeated_header"})
# Changes made to rows that are kept, counted per row in the report (report["changes"]).
CHANGES = {
    "value_as_text": "numbers, booleans or (tool results) objects in text fields were written as their JSON text",
    "trailing_turns_trimmed": "turns after the last assistant answer were trimmed",
    "turn_flag_ignored": "a non-assistant turn was flagged for training (weight 1 / train true); only assistant "
                         "turns are trained, so the flag was ignored",
}

ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatbot": "assistant", "ai": "assistant", "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_TURN_FLAGS = ("weight", "train", "training")  # OpenAI / mistral-finetune, then Axolotl's usual names
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
    obj: Any, fmt: str = "auto", system_prompt: str | None = None, changes: Counter | None = None
) -> tuple[dict[str, Any] | None, Rejection | None]:
    """({format, messages, tools, meta}, None) for a trainable row, else (None, Rejection(reason, rule)).

    `changes`, when given, counts the rows kept with a change (see CHANGES), once per row and kind.
    """
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
    notes: set[str] = set()
    try:
        messages, tools, used = _BUILDERS[detected](obj, notes)
        messages = _finish(messages, system_prompt, notes)
    except _Invalid as exc:
        return None, Rejection(str(exc), exc.rule)
    if obj.get("label") is False:
        return None, Rejection("row is labelled false (an undesirable example); SFT must not learn from it",
                               "undesirable_example")
    if notes and changes is not None:
        changes.update(notes)
    meta = {k: v for k, v in obj.items() if k not in used}
    return {"format": detected, "messages": messages, "tools": tools, "meta": meta}, None


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _keys(obj: dict[str, Any]) -> str:
    keys = sorted(str(k) for k in obj)
    return "[" + ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "") + "]"


def _missing(value: Any) -> bool:
    """null in JSON, None or NaN in Parquet, NaN that pandas writes into JSON for a missing value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _scalar(value: Any) -> str | None:
    """A number or boolean as its JSON text (true, 42, 12.5), None for any other value.

    Integral floats are written without ".0" (42.0 -> "42", as JSON.stringify does): pandas turns an integer
    column with a missing value into floats, and the answer 42 must not become "42.0".
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, Decimal) and value.is_finite():  # Parquet decimal columns
        return str(value)
    return None


def _text(value: Any, what: str, notes: set[str]) -> str:
    """A text field: a string as is, a number or boolean as its JSON text, a missing value as ""."""
    if isinstance(value, str):
        return value
    if _missing(value):
        return ""  # an optional field is simply empty; a required one is refused by _finish as empty
    text = _scalar(value)
    if text is None:
        raise _Invalid(f"{what} must be text, a number or a boolean, got {_type(value)}")
    notes.add("value_as_text")
    return text


def _part_text(part: Any, i: int) -> str:
    """The text of one content part, in the shapes OpenAI's APIs write (see the module docstring)."""
    if isinstance(part, str):
        return part
    kind = part.get("type", "text") if isinstance(part, dict) else _type(part)
    if isinstance(part, dict):
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if isinstance(text, dict):  # Assistants API: {"type": "text", "text": {"value", "annotations"}}
                text = text.get("value")
            if isinstance(text, str):
                return text
            raise _Invalid(f"message {i} has a {kind!r} content part without a text string")
        if kind == "refusal" and isinstance(part.get("refusal"), str):  # what the model said, as text
            return part["refusal"]
    raise _Invalid(f"message {i} has a {kind!r} content part; only text parts (text, input_text, output_text, "
                   "refusal) can be used for text SFT, so remove the part or the row")


def _content(value: Any, i: int, notes: set[str]) -> str:
    """A message's content: text, a number or boolean (its JSON text), missing (""), or a list of text parts
    (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_part_text(part, i) for part in value)
    if _missing(value):
        return ""
    text = _scalar(value)
    if text is None:
        raise _Invalid(f"message {i} content must be text or a list of text parts, got {_type(value)}")
    notes.add("value_as_text")
    return text


def _json_text(value: Any, notes: set[str]) -> str:
    notes.add("value_as_text")
    return json.dumps(value, ensure_ascii=False)


def _call_text(call: Any, i: int) -> str:
    """One tool call as the text the model learns to write: {"name": ..., "arguments": ...} (see the docstring)."""
    fn = call
    if isinstance(call, dict):
        for key in ("function", "custom"):  # chat: {"id", "type": "function", "function": {"name", "arguments"}}
            if isinstance(call.get(key), dict):
                fn = call[key]
                break
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise _Invalid(f"message {i} has a tool call without a function name; expected "
                       '{"function": {"name": ..., "arguments": ...}} or {"name": ..., "arguments": ...}')
    arguments = fn.get("arguments", fn.get("input", {}))  # custom tools carry "input"
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def _weight(m: dict[str, Any], i: int) -> int | None:
    """OpenAI's per-turn "weight" (0 or 1) or Axolotl's per-message "train"/"training" flag, as 0 or 1."""
    for key in _TURN_FLAGS:
        value = m.get(key)
        if _missing(value):
            continue
        if not isinstance(value, str) and value in (0, 1):  # 0, 1, false, true, 0.0, 1.0
            return int(value)
        raise _Invalid(f"message {i} has {key} {value!r}; expected 0 or 1 (false or true): 0 keeps an assistant "
                       "turn as context without training on it")
    return None


def _turn(m: Any, i: int, notes: set[str], what: str) -> dict[str, Any]:
    """One message (or ShareGPT turn, or Responses API item) -> {"role", "content", "weight"?}."""
    if not isinstance(m, dict):
        raise _Invalid(f"{what} {i} must be an object with role and content, got {_type(m)}")
    if len(m) == 2:  # the usual {"role", "content"} or {"from", "value"}, with a known role and text: no more to read
        speaker, value = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if type(value) is str and type(speaker) is str and (role := ROLE_ALIASES.get(speaker)) is not None:
            return {"role": role, "content": value}
    if "role" not in m and "from" not in m and m.get("type") in ("function_call", "function_call_output"):
        if m["type"] == "function_call":  # Responses API items
            return {"role": "assistant", "content": _call_text(m, i), "call_item": True}
        return {"role": "tool", "content": _content(m.get("output"), i, notes)}
    speaker = m["role"] if "role" in m else m.get("from")
    role = None
    if isinstance(speaker, str):
        role = ROLE_ALIASES.get(speaker) or ROLE_ALIASES.get(speaker.strip().lower())
    if role is None:
        where = f"turn {i} is from {speaker!r}" if what == "turn" else f"message {i} has role {speaker!r}"
        raise _Invalid(f"{where}; expected system, user, assistant or tool (or an alias such as human, gpt, "
                       "model, function_call, observation)")
    value = m["content"] if "content" in m else m.get("value")
    if isinstance(value, dict) and role in ("assistant", "tool"):
        # A call or a tool result exported as an object rather than JSON text (glaive-style exports).
        content = _call_text(value, i) if speaker.strip().lower() == "function_call" else _json_text(value, notes)
    else:
        content = _content(value, i, notes)
    calls = [m["function_call"]] if not _missing(m.get("function_call")) else []  # legacy OpenAI functions
    tool_calls = m.get("tool_calls")
    if not _missing(tool_calls):
        if not isinstance(tool_calls, list):
            raise _Invalid(f"message {i} 'tool_calls' must be a list of calls, got {_type(tool_calls)}")
        calls += tool_calls
    if calls:
        if role != "assistant":
            raise _Invalid(f"message {i} ({role}) has tool calls; only assistant messages call tools")
        content = "\n".join(([content] if content.strip() else []) + [_call_text(c, i) for c in calls])
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        if (weight := _weight(m, i)) is not None:
            message["weight"] = weight
    elif any(m.get(key) in (1, True) for key in _TURN_FLAGS if not isinstance(m.get(key), str)):
        notes.add("turn_flag_ignored")  # only assistant turns are trained; a request to train this one is not met
    return message


def _turns(raw: Any, key: str, what: str, notes: set[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        shape = "{role, content}" if what == "message" else "{from, value}"
        raise _Invalid(f"'{key}' must be a list of {shape} objects, got {_type(raw)}")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        turn = _turn(m, i, notes, what)
        if turn.pop("call_item", False) and messages and messages[-1]["role"] == "assistant":
            # A Responses API function_call item belongs to the assistant turn before it: text, then calls.
            previous = messages[-1]["content"]
            messages[-1]["content"] = f"{previous}\n{turn['content']}" if previous.strip() else turn["content"]
            continue
        messages.append(turn)
    return messages


def _tools(value: Any) -> str | None:
    """Tool schemas as a JSON string (the row contract), or None when there are none."""
    if _missing(value) or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise _Invalid("'tools' is a string but not valid JSON; expected a JSON list of tool schemas") from None
    if not isinstance(value, (list, dict)):
        raise _Invalid(f"'tools' must be a list of tool schemas, got {_type(value)}")
    return json.dumps(value, ensure_ascii=False) if value else None


def _row_tools(obj: dict[str, Any]) -> tuple[str | None, set[str]]:
    """`tools`, or else the legacy OpenAI `functions` list; and the keys consumed."""
    tools = _tools(obj.get("tools"))
    if tools is None and "functions" in obj:
        return _tools(obj["functions"]), {"tools", "functions"}
    return tools, {"tools"}


def _with_system(messages: list[dict[str, Any]], obj: dict[str, Any],
                 notes: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
    """Prepend the row's optional `system` field unless the conversation already has a system message."""
    system = obj.get("system")
    if _missing(system) or any(m["role"] == "system" for m in messages):
        return messages, set()
    return [{"role": "system", "content": _text(system, "'system'", notes)}, *messages], {"system"}


Built = tuple[list[dict[str, Any]], str | None, set[str]]  # messages, tools, keys consumed (not meta)


def _from_messages(obj: dict[str, Any], notes: set[str]) -> Built:
    messages = _turns(obj["messages"], "messages", "message", notes)
    tools, used = _row_tools(obj)
    return messages, tools, {"messages", *used}


def _from_sharegpt(obj: dict[str, Any], notes: set[str]) -> Built:
    messages = _turns(obj["conversations"], "conversations", "turn", notes)
    messages, system = _with_system(messages, obj, notes)
    tools, used = _row_tools(obj)
    return messages, tools, {"conversations", *used, *system}


def _from_alpaca(obj: dict[str, Any], notes: set[str]) -> Built:
    instruction = _text(obj.get("instruction"), "'instruction'", notes)
    extra = _text(obj.get("input"), "'input'", notes)
    output = _text(obj.get("output"), "'output'", notes)
    history = obj.get("history")
    if _missing(history) or history == "":
        history = []
    if not isinstance(history, list):
        raise _Invalid(f"'history' must be a list of [question, answer] pairs, got {_type(history)}")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Invalid(f"history item {i} must be a [question, answer] pair")
        messages += [{"role": "user", "content": _text(pair[0], f"history item {i} question", notes)},
                     {"role": "assistant", "content": _text(pair[1], f"history item {i} answer", notes)}]
    user = "\n\n".join(part for part in (instruction, extra) if part.strip())
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages, used = _with_system(messages, obj, notes)
    return messages, None, {"instruction", "input", "output", "history", *used}


def _pair_builder(fmt: str) -> Callable[[dict[str, Any], set[str]], Built]:
    prompt_key, answer_key = _PAIR_KEYS[fmt]

    def build(obj: dict[str, Any], notes: set[str]) -> Built:
        prompt, answer = obj.get(prompt_key), obj.get(answer_key)
        if isinstance(prompt, list) and isinstance(answer, list):  # TRL's conversational prompt-completion
            messages = _turns(prompt + answer, prompt_key, "message", notes)
        else:
            messages = [{"role": "user", "content": _text(prompt, f"'{prompt_key}'", notes)},
                        {"role": "assistant", "content": _text(answer, f"'{answer_key}'", notes)}]
        messages, used = _with_system(messages, obj, notes)
        tools, tool_keys = _row_tools(obj)
        return messages, tools, {prompt_key, answer_key, *tool_keys, *used}

    return build


_BUILDERS: dict[str, Callable[[dict[str, Any], set[str]], Built]] = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    **{fmt: _pair_builder(fmt) for fmt in _PAIR_KEYS},
}


def _order_problem(messages: list[dict[str, Any]]) -> str | None:
    """Role orders that chat templates reject or that make no sense to train on.

    An opening assistant turn (a greeting) is allowed: whether the chat template can render it is the
    format stage's decision, not ingest's."""
    previous, users = None, 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            users += 1
        elif role == "system" and i > 0:
            return f"system message {i} is not the first message"
        elif role == "tool" and previous not in ("assistant", "tool"):
            return f"tool message {i} does not follow an assistant tool call"
        previous = role
    if messages and not users:
        return "conversation has no user message; an answer needs a user turn to answer"
    return None


def _finish(messages: list[dict[str, Any]], system_prompt: str | None, notes: set[str]) -> list[dict[str, Any]]:
    """Drop empty system messages, add the default system prompt, trim turns after the last assistant
    answer, and check the conversation."""
    messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    last = len(messages) - 1
    while last >= 0 and messages[last]["role"] != "assistant":
        last -= 1
    if 0 <= last < len(messages) - 1:
        # A conversation exported mid-dialogue (it ends with the user's next question, or a tool result):
        # the turns after the last answer teach nothing; the answers before them are kept.
        messages = messages[: last + 1]
        notes.add("trailing_turns_trimmed")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _Invalid(f"message {i} ({m['role']}) is empty", "invalid_conversation")
        if "\x00" in m["content"]:
            raise _Invalid(f"message {i} ({m['role']}) contains a NUL character; the text looks like binary data")
    problem = _order_problem(messages) or conversation_problem(messages)
    if problem:
        if last >= 0 and not any(trained(m) for m in messages):
            raise _Invalid("every assistant turn has weight 0 (kept as context, not learned), so the row has "
                           "nothing to train on", "all_turns_weight_zero")
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


def _holds_json_array(fh: IO[bytes], limit: int) -> bool:
    """True when a JSON Lines file is one JSON array instead: its first line opens an array that the line
    does not close (json.dump(rows, indent=2)), or its only line is an array of objects (json.dump(rows))."""
    found = False
    for _, raw, too_long in _physical_lines(fh, limit):
        line = raw.removeprefix(_BOM).strip()
        if too_long or (line and found):
            return False  # a second line: JSON Lines whose first record happens to be an array
        if not line:
            continue
        if not line.startswith(b"["):
            return False
        try:
            text = line.decode("utf-8")
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return exc.pos >= len(text)  # the line ends inside the array: the array goes on below
        except (ValueError, RecursionError):
            return False
        if not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            return False
        found = True
    return found


def _opens_object_over_lines(fh: IO[bytes], limit: int) -> bool:
    """True when a JSON Lines file's first line opens an object that the line does not close (json.dump(row,
    indent=2), or jq's default output): then the file may be JSON objects written over several lines each."""
    for _, raw, too_long in _physical_lines(fh, limit):
        line = raw.removeprefix(_BOM).strip()
        if too_long:
            return False
        if not line:
            continue
        if not line.startswith(b"{"):
            return False
        try:
            text = line.decode("utf-8")
            json.loads(text)
        except json.JSONDecodeError as exc:
            return exc.pos >= len(text)  # the line ends inside the object: it goes on below
        except (ValueError, RecursionError):
            return False
        return False  # a whole object on the first line: JSON Lines
    return False


def _object_stream(text: str) -> list[Record] | None:
    """The JSON objects of `text` one after another (whitespace between them), each numbered by the physical
    line it starts on; None unless every value is an object and one of them is written over several lines
    (the ways a pretty-printed object or jq's default output are saved under a JSON Lines or JSON name)."""
    decoder = json.JSONDecoder()
    records: list[Record] = []
    idx, line, counted, multiline = _WS.match(text).end(), 1, 0, False
    while idx < len(text):
        if text[idx] != "{":
            return None
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            obj, end = decoder.raw_decode(text, idx)
        except (json.JSONDecodeError, RecursionError):
            return None
        multiline = multiline or "\n" in text[idx:end]
        records.append(Record(line, obj, text[idx:min(end, idx + EXCERPT_CHARS)]))
        idx = _WS.match(text, end).end()
    return records if records and multiline else None


def _stream_note(n: int) -> str:
    if n == 1:
        return ("holds one JSON object written over several lines, not JSON Lines; it was read as JSON (rename it "
                "to .json)")
    return (f"holds {n} JSON objects written over several lines each, not one per line; they were read one after "
            "another (write one object per line, e.g. with jq -c)")


def _read_jsonl(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    with open(path, "rb") as fh:
        if rejected := _unreadable(fh, notes):
            yield rejected
            return
        if _holds_json_array(fh, limit):
            notes.append("holds a JSON array, not JSON Lines; it was read as JSON (rename it to .json)")
            yield from _read_json(path, limit, notes)
            return
        fh.seek(0)
        if _opens_object_over_lines(fh, limit):
            fh.seek(0)
            records = _object_stream(fh.read().removeprefix(_BOM).decode("utf-8", "surrogateescape"))
            if records is not None:
                notes.append(_stream_note(len(records)))
                yield from records
                return
        fh.seek(0)
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
    # Objects written over several lines each, one after another (jq's default output).
    if error is None and (records := _object_stream(text)) is not None:
        notes.append(_stream_note(len(records)))
        yield from records
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
    """CSV cells are strings; nested columns may hold JSON, and KTO labels are written true/false. `key` is the
    header's name, in any case (standard_keys renames it after)."""
    key = key.strip().casefold()
    if key in _CSV_JSON_COLUMNS and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    if key == "label" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_SNIFF_BYTES = 64 * 1024  # the first lines csv.Sniffer looks at


def _delimiter(fh: IO[bytes]) -> str:
    """The file's delimiter: ',' unless its header line has no comma and csv.Sniffer finds ';', tab or '|'
    splitting it (Excel in many locales writes ';'). A header that commas split keeps ',' as before."""
    sample = fh.read(_SNIFF_BYTES)
    fh.seek(0)
    lines = [line for line in sample.decode("utf-8", "replace").splitlines() if line.strip()]
    if len(sample) == _SNIFF_BYTES and len(lines) > 1:
        lines.pop()  # cut off mid-line
    if not lines:
        return ","
    header = lines[0].removeprefix("\ufeff")
    if len(next(csv.reader([header]))) > 1:
        return ","
    try:
        found = csv.Sniffer().sniff("\n".join(lines[:50]), delimiters="".join(_DELIMITERS)[1:]).delimiter
    except csv.Error:  # too few lines to agree on one: the header alone decides
        found = max(list(_DELIMITERS)[1:], key=header.count)
    return found if len(next(csv.reader([header], delimiter=found))) > 1 else ","


def _header_cells(row: list[str]) -> list[str]:
    """A CSV record's non-empty cells, stripped and casefolded, in sorted order: a line that gives the same as
    the header line repeats it (" Instruction , Input , Output " repeats "instruction,input,output")."""
    return sorted(c for c in (cell.strip().casefold() for cell in row) if c)


def _read_csv(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
    """Streamed with the csv module; a record spanning lines gets the number of its first line.

    The delimiter is sniffed (`_delimiter`): a ';'-, tab- or '|'-delimited export is read with it, and the
    report says so. A record equal to the header (concatenated exports: `cat a.csv b.csv`, each with its
    header and maybe a BOM; compared by `_header_cells`, so order, case, spaces and empty cells do not
    matter) is never a row: it is quarantined as `repeated_header`, which is not counted as
    malformed. A BOM is dropped at the start of every line, not only the first.
    """
    overlong: list[int] = []
    repeated: list[int] = []

    def lines(fh: IO[bytes]) -> Iterator[str]:
        for number, raw, too_long in _physical_lines(fh, limit):
            if too_long:
                overlong.append(number)
                yield "\n"  # keeps csv's line count aligned with the file; a blank record is skipped
                continue
            yield raw.removeprefix(_BOM).decode("utf-8", "surrogateescape")

    previous_limit = csv.field_size_limit(limit)  # an unclosed quote must not swallow the whole file
    try:
        with open(path, "rb") as fh:
            if rejected := _unreadable(fh, notes):
                yield rejected
                return
            delimiter = _delimiter(fh)
            name = _DELIMITERS[delimiter]
            if delimiter != ",":
                notes.append(f"is {name}-delimited (its header line has no comma), so it was read with "
                             f"{delimiter!r} as the delimiter")
            reader = csv.reader(lines(fh), delimiter=delimiter)
            header: list[str] | None = None
            header_cells: list[str] = []
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
                    header_cells = _header_cells(header)
                elif _header_cells(row) == header_cells:
                    repeated.append(begin)
                    yield Record(begin, text=delimiter.join(row)[:EXCERPT_CHARS], problem=Rejection(
                        "line repeats the header (files concatenated with their headers?); it is not a row",
                        "repeated_header"))
                elif len(row) != len(header):
                    where = f"record on lines {begin}-{end}" if end > begin else "record"
                    yield Record(begin, text=delimiter.join(row)[:EXCERPT_CHARS], problem=Rejection(
                        f"{where} has {len(row)} fields but the header has {len(header)}; quote fields that contain "
                        f"{name}s or newlines, and close every quote", "malformed_csv"))
                else:
                    obj = {k: _csv_cell(k, v) for k, v in zip(header, row, strict=True)}
                    yield Record(begin, obj, delimiter.join(row)[:EXCERPT_CHARS])
    finally:
        csv.field_size_limit(previous_limit)
        if repeated:
            shown = ", ".join(map(str, repeated[:5])) + (", ..." if len(repeated) > 5 else "")
            notes.append(f"repeats its header line at line {shown} (exports concatenated with their headers?); "
                         f"{_rows(len(repeated))} quarantined as repeated_header, not read as data")


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


# The top-level field names the row builders (and the preference-data stage) read.
FIELD_NAMES = frozenset({"messages", "conversations", "instruction", "input", "output", "history", "prompt",
                         "completion", "response", "system", "tools", "functions", "label", "chosen", "rejected"})


def standard_keys(obj: Any) -> tuple[Any, list[tuple[str, str]]]:
    """`obj` with each key that is a FIELD_NAMES name in another case or with spaces around it ("Instruction",
    " Output ", "PROMPT") renamed to that name, and the renames made [(old, new)].

    Spreadsheet exports and hand-written headers capitalise column names; read literally, a whole file would be
    quarantined as unknown_format. A key is left as it is when the standard name is already a key of the row or
    when two keys would get the same name (no way to know which one is meant).
    """
    if not isinstance(obj, dict):
        return obj, []
    renames = {k: k.strip().casefold() for k in obj if isinstance(k, str) and k not in FIELD_NAMES}
    renames = {k: std for k, std in renames.items() if std in FIELD_NAMES and std not in obj}
    taken = Counter(renames.values())
    renames = {k: std for k, std in renames.items() if taken[std] == 1}
    if not renames:
        return obj, []
    return {renames.get(k, k): v for k, v in obj.items()}, sorted(renames.items())


Reader = Callable[[Path, int, list[str]], Iterator[Record]]


def _with_standard_keys(read: Reader) -> Reader:
    """`read` whose records have their field names standardised (standard_keys), with one note per file."""

    @functools.wraps(read)
    def reader(path: Path, limit: int, notes: list[str]) -> Iterator[Record]:
        renamed: Counter = Counter()
        try:
            for record in read(path, limit, notes):
                record.obj, renames = standard_keys(record.obj)
                renamed.update(renames)
                yield record
        finally:
            if renamed:
                shown = ", ".join(f"{old!r} as {new!r}" for old, new in sorted(renamed))
                rows = max(renamed.values())
                notes.append(f"names fields in another case or with spaces; read {shown} ({_rows(rows)})")

    return reader


READERS: dict[str, Reader] = {ext: _with_standard_keys(read) for ext, read in (
    (".jsonl", _read_jsonl), (".ndjson", _read_jsonl), (".json", _read_json), (".csv", _read_csv),
    (".parquet", _read_parquet))}


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
    changes: Counter = field(default_factory=Counter)  # kept rows changed, per kind (CHANGES)
    messages: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the file was not read at all (a link out of the project, an extension, ...)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "kept": self.kept,
                "quarantined": self.quarantined, "formats": dict(self.formats), "rules": dict(self.rules),
                "changes": dict(self.changes), "messages": self.messages, "skipped": self.skipped}


class _Sink:
    """Kept rows are validated against the row contract in chunks, then written; rejects go straight out."""

    def __init__(self, examples: IO[str], quarantine: IO[str], redact_pii: bool = True) -> None:
        self.examples, self.quarantine = examples, quarantine
        self.redact_pii = redact_pii  # clean.redact_pii: the quarantine must not keep what the data has redacted
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
        excerpt, reason = _excerpt(record), str(why)
        if self.redact_pii:  # the excerpt is raw input, and a reason may quote keys or values of the row
            excerpt, reason = redact(excerpt)[0], redact(reason)[0]
        entry = {"source": source, "line": record.line, "stage": STAGE, "rule": why.rule, "reason": reason,
                 "excerpt": excerpt, **record.extra}
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


def _route(record: Record, source: str, report: FileReport, sink: _Sink, params: Params,
           replay: bool = False) -> None:
    """One record to the examples (normalised, serialisable) or to the quarantine, counted either way. A replay
    row is read with format detection and no system prompt added, and is marked `"replay": true`."""
    report.rows_read += 1
    why = record.problem
    row = None
    if why is None:
        changes: Counter = Counter()
        fmt, system_prompt = ("auto", None) if replay else (params.data.format, params.data.system_prompt)
        row, why = normalise_row(record.obj, fmt, system_prompt, changes)
    if row is not None:
        row = {"id": row_id(source, record.line), "source": source, "line": record.line, **row}
        if replay:
            row["replay"] = True
        line, why = _serialise(row)
    if why is not None:
        sink.reject(source, record, why)
        report.quarantined += 1
        report.rules[why.rule] += 1
    else:
        sink.keep(row, line)
        report.kept += 1
        report.changes.update(changes)
        report.formats[row["format"]] += 1


def _ingest_file(path: Path, source: str, params: Params, sink: _Sink, replay: bool = False) -> FileReport:
    """Read one raw file (or the replay file) into `sink`; every record ends up kept or quarantined, never dropped."""
    report = FileReport(source)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        report.skipped = f"unknown extension '{path.suffix}'"
        report.messages.append(f"{source}: unknown extension '{path.suffix}', skipped; supported: "
                               f"{', '.join(READERS)}")
        return report
    if path.stat().st_size == 0:
        report.messages.append(f"{source}: file is empty, no rows read")
        return report
    notes: list[str] = []
    try:
        for record in reader(path, params.data.max_line_bytes, notes):
            _route(record, source, report, sink, params, replay)
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
    if n := report.rules["all_turns_weight_zero"]:
        report.messages.append(f"{source}: {_rows(n)} with weight 0 on every assistant turn excluded as "
                               "all_turns_weight_zero; such a row has nothing to train on")
    for kind, what in CHANGES.items():
        if n := report.changes[kind]:
            report.messages.append(f"{source}: {_rows(n)} kept with a change ({kind}): {what}")
    if report.rows_read == 0 and not notes:
        report.messages.append(f"{source}: no rows found in the file")
    return report


def _printable(path: str | Path) -> str:
    """A path as text that UTF-8 can hold: bytes of a name that are not UTF-8 (a Latin-1 name from a zip) become
    backslash escapes, e.g. data/raw/caf\\xe9.jsonl; a UTF-8 name stays as it is."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _relative(path: Path, root: Path) -> str:
    """The path relative to `root` as a report, a quarantine entry and a row id hold it (see _printable)."""
    return _printable(Path(os.path.relpath(path, root)).as_posix())


def _undecodable_name(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def raw_files(raw_dir: Path, root: Path | None = None, follow_links: bool = False) -> list[tuple[Path, str | None]]:
    """Every file under raw_dir, recursively, in a stable order (sorted relative paths): (path, None) for a file
    to read, (path, why) for one that is not read, so that nothing is skipped in silence.

    Symlinks are followed when their target lies inside the project folder `root` or inside raw_dir's real
    folder (a linked folder is walked once, however often it is linked). A link that leaves both is not
    read unless `follow_links` (data.follow_links): a committed link must not copy a file such as
    /etc/passwd or a key into the outputs. Dangling links and pipes, sockets or devices are reported.
    """
    real_raw = Path(os.path.realpath(raw_dir))
    zones = (real_raw, Path(os.path.realpath(root or raw_dir)))
    found: list[tuple[Path, str | None]] = []
    walked = {real_raw}

    def walk(folder: Path) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            found.append((folder, f"folder cannot be read ({exc.strerror}); check its permissions"))
            return
        for entry in entries:
            path = Path(entry.path)
            real = Path(os.path.realpath(path))  # a link loop resolves to a path that does not exist
            if entry.is_symlink():
                if not real.exists():
                    found.append((path, f"is a symlink to '{_printable(os.readlink(path))}', which does not exist (or "
                                        "is a loop of links); fix or remove the link"))
                    continue
                if not follow_links and not any(real.is_relative_to(zone) for zone in zones):
                    found.append((path, f"is a symlink to '{_printable(real)}', outside the project, so it was not "
                                        "read; copy the file into the project, or set data.follow_links: true to "
                                        "read such links"))
                    continue
            if real.is_dir():
                if real not in walked:
                    walked.add(real)
                    walk(path)
            elif real.is_file():
                found.append((path, None))
            else:
                found.append((path, "is not a regular file (a pipe, socket or device), so it was not read"))

    walk(raw_dir)
    return sorted(found, key=lambda item: os.fsencode(item[0].relative_to(raw_dir).as_posix()))


SHIPPED_REPLAY_FILE = "replay_general.jsonl"  # package data of `pipelines` (pipelines/replay_data.py writes it)


def replay_file(params: Params) -> tuple[Path | None, str | None]:
    """(path, source) of the replay file the stage reads, (None, None) when data.replay is off; a user file in
    paths.raw_dir that does not exist is a StageError naming the key."""
    cfg = params.data.replay
    if cfg.fraction == 0:
        return None, None
    if cfg.file == SHIPPED_REPLAY:
        return Path(str(importlib.resources.files("pipelines").joinpath(SHIPPED_REPLAY_FILE))), \
            f"pipelines/{SHIPPED_REPLAY_FILE}"
    raw_dir = params.path("raw_dir")
    path = raw_dir / cfg.file
    if not path.is_file():
        raise StageError(f"data.replay.file = '{cfg.file}' names '{_relative(path, params.root)}', which is not a "
                         "file; put the replay file there (relative to paths.raw_dir), use 'general' for the set "
                         "shipped with the project, or set data.replay.fraction: 0")
    real = Path(os.path.realpath(path))  # the rule of raw_files: a link must not read a file from outside
    zones = (Path(os.path.realpath(raw_dir)), Path(os.path.realpath(params.root)))
    if not params.data.follow_links and not any(real.is_relative_to(zone) for zone in zones):
        raise StageError(f"data.replay.file = '{cfg.file}' is a symlink to '{_printable(real)}', outside the project, "
                         "so it is not read; copy the file into paths.raw_dir, or set data.follow_links: true")
    return path, _relative(path, params.root)


def _user_replay_path(params: Params) -> Path | None:
    """The replay file when it lies in paths.raw_dir (then it is never task data), else None."""
    cfg = params.data.replay
    return None if cfg.file == SHIPPED_REPLAY else Path(os.path.realpath(params.path("raw_dir") / cfg.file))


def run(params: Params) -> StageResult:
    raw_dir, out = params.path("raw_dir"), params.path("raw_examples")
    raw_rel = _relative(raw_dir, params.root)
    if not raw_dir.is_dir():
        raise StageError(f"raw data folder '{raw_rel}' does not exist; create it and put JSONL, JSON, CSV or "
                         "Parquet files in it (paths.raw_dir in params.yaml)")
    claim_output(params, "raw_examples")  # before any work: the folder is the stage's own, and writable
    replay_path, replay_source = replay_file(params)
    user_replay = _user_replay_path(params)
    examples_path, quarantine_path = out / "examples.jsonl", out / "quarantine.jsonl"
    reports: list[FileReport] = []
    replay_report: FileReport | None = None
    with atomic_dir(out, "raw_examples") as tmp:
        with open(tmp / "examples.jsonl", "w", encoding="utf-8") as ex, \
                open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as qu:
            sink = _Sink(ex, qu, params.clean.redact_pii)
            for path, problem in raw_files(raw_dir, params.root, params.data.follow_links):
                source = _relative(path, params.root)
                if user_replay is not None and Path(os.path.realpath(path)) == user_replay:
                    if replay_path is not None:
                        continue  # read below, as replay rows
                    problem = ("the replay file (data.replay.file), not read as task rows, and not read as replay "
                               "rows while data.replay.fraction is 0")
                if problem is None and any(part.startswith(".") for part in path.relative_to(raw_dir).parts):
                    problem = "hidden file, skipped"
                if problem is not None:
                    reports.append(FileReport(source, messages=[f"{source}: {problem}"], skipped=problem))
                    continue
                report = _ingest_file(path, source, params, sink)
                if "\\x" in source and _undecodable_name(path):
                    report.messages.append(f"{source}: the file name is not valid UTF-8, so it is recorded with the "
                                           "undecodable bytes escaped; rename the file to a UTF-8 name")
                reports.append(report)
            if replay_path is not None:
                replay_report = _ingest_file(replay_path, replay_source, params, sink, replay=True)
            sink.flush()
        summary = {**_summary(reports + ([replay_report] if replay_report else []), params),
                   "replay": _replay_summary(replay_report, params)}
        failure = _failure(summary, raw_rel, _relative(quarantine_path, params.root), params)
        if failure:
            (tmp / "examples.jsonl").unlink()  # downstream stages must not consume a failed ingest
        write_json(tmp / "report.json", {"status": "failed" if failure else "ok", "error": failure, **summary})
    for message in summary["messages"]:  # file-level notes reach the terminal and the Dagster log, not only the report
        log.warning("%s", message)
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
        "files_skipped": sum(r.skipped is not None for r in reports),  # not read at all: each with its reason
        "skipped_files": [{"source": r.source, "reason": r.skipped} for r in reports if r.skipped is not None],
        "formats": dict(sum((r.formats for r in reports), Counter())),
        "rules": dict(rules),
        "changes": dict(sum((r.changes for r in reports), Counter())),
        "messages": [m for r in reports for m in r.messages],
        "per_file": [r.as_dict() for r in reports],
    }


def _replay_summary(report: FileReport | None, params: Params) -> dict[str, Any] | None:
    """The replay file's counts (its rows are also in the totals and per_file); None when replay is off."""
    if report is None:
        return None
    return {"file": params.data.replay.file, "source": report.source, "fraction": params.data.replay.fraction,
            "rows_read": report.rows_read, "kept": report.kept, "quarantined": report.quarantined}


def _failure(summary: dict[str, Any], raw_rel: str, quarantine_rel: str, params: Params) -> str | None:
    replay = summary.get("replay") or {}
    if summary["rows_out"] - replay.get("kept", 0) == 0:  # replay rows alone are no task to train
        if summary["messages"]:
            why = "; ".join(summary["messages"][:3])
        elif summary["rows_in"]:  # every row quarantined, no whole-file note: name the most common reasons
            rules = Counter(summary["rules"]).most_common(3)
            why = "every row was quarantined (" + ", ".join(f"{rule}: {n}" for rule, n in rules) + ")"
        else:
            why = "no data files"
        return (f"no trainable rows in '{raw_rel}' ({summary['rows_in']} rows read, {summary['quarantined']} "
                f"quarantined, see '{quarantine_rel}'): {why}; add JSONL, JSON, CSV or Parquet files of SFT examples")
    if summary["bad_fraction"] > params.data.max_bad_fraction:
        return (f"{summary['malformed']} of {summary['rows_in']} rows ({summary['bad_fraction']:.1%}) are malformed, "
                f"more than data.max_bad_fraction = {params.data.max_bad_fraction:.1%}; see '{quarantine_rel}' for "
                "each file:line and reason, then fix the raw files or raise the threshold")
    return None
