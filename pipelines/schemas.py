"""Data contracts: one pandera model per stage boundary, declared once, checked by the stage that
writes the data and exposed again as Dagster asset checks (assets/checks.py).

Row schema shared by every stage from ingest on (one JSON object per line):
    id        stable row id (hex)                  source  file the row came from (relative path)
    line      1-based line (or record) in source   format  detected raw format (alpaca, sharegpt, ...)
    messages  [{"role": ..., "content": ..., "weight"?: 0|1}]   tools   JSON string of tool schemas, or null
    meta      any other fields of the raw row (e.g. category), kept for stratification and reports

A message's optional "weight" is the per-turn training flag of OpenAI's chat fine-tuning format (also
mistral-finetune and Axolotl): an assistant message with weight 0 stays in the context but gets no loss.
Absent means 1. Only assistant messages carry it.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pandera.errors as pa_errors
import pandera.pandas as pa
from pandera.typing import Series

ROLES = ("system", "user", "assistant", "tool")
MISSING = "(missing)"  # the value of a row without the field asked for (stratum, balance or breakdown value)
PROBE_FILE = "probe_general.jsonl"  # the forgetting probe shipped in the package (pipelines.evaluate)


def field_value(row: dict[str, Any], dotted: str) -> Any:
    """row["meta"]["category"] for "meta.category"; None when any part is missing."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def field_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The dotted names the rows' fields can be asked by, sorted: each top-level key, and 'key.sub' for each key of a
    dict value ('source', 'meta', 'meta.category')."""
    names: set[str] = set()
    for row in rows:
        for key, value in row.items():
            names.add(key)
            if isinstance(value, dict):
                names.update(f"{key}.{sub}" for sub in value)
    return sorted(names)


def field_label(row: dict[str, Any], dotted: str) -> str:
    """A row's value of a dotted field as a label: the string itself, JSON for other values, MISSING for none."""
    value = field_value(row, dotted)
    if value is None:
        return MISSING
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def package_rows(name: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file shipped in the `pipelines` package (the forgetting probe, the replay set)."""
    text = importlib.resources.files("pipelines").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
MESSAGE_KEYS = frozenset({"role", "content", "weight"})


def trained(message: dict[str, Any]) -> bool:
    """True if the loss is computed on this message: an assistant turn whose weight is not 0."""
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def conversation_problem(messages: Any) -> str | None:
    """Why `messages` is not a trainable conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - MESSAGE_KEYS or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role', 'content' and optionally 'weight'"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; allowed: {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {i} content must be a string, got {type(m.get('content')).__name__}"
        if "weight" in m and (m["role"] != "assistant" or type(m["weight"]) is not int or m["weight"] not in (0, 1)):
            return f"message {i} has weight {m['weight']!r}; only assistant messages carry a weight, 0 or 1"
    if not any(trained(m) for m in messages):
        return "conversation has no assistant message to learn from (none, or every one has weight 0)"
    if messages[-1]["role"] != "assistant":
        return "conversation must end with an assistant message"
    return None


class ConversationSchema(pa.DataFrameModel):
    """Rows after ingest and after cleaning."""

    id: Series[str] = pa.Field(unique=True, description="Stable row id (hex digest).")
    source: Series[str] = pa.Field(description="Raw file the row came from, relative to the project.")
    line: Series[int] = pa.Field(ge=1, description="1-based line or record number in the source file.")
    format: Series[str] = pa.Field(description="Detected raw format of the row.")
    messages: Series[object] = pa.Field(description="List of {role, content}; ends with an assistant turn.")

    @pa.check("messages", element_wise=True, error="messages must be a valid conversation")
    def _valid_conversation(cls, messages: Any) -> bool:
        return conversation_problem(messages) is None

    class Config:
        strict = False  # tools / meta columns are optional and free-form
        coerce = False


class FormattedSchema(ConversationSchema):
    """Rows rendered with the chat template: what the trainer consumes."""

    n_tokens: Series[int] = pa.Field(ge=1, description="Tokens of the rendered conversation (template included).")
    n_completion_tokens: Series[int] = pa.Field(ge=1, description="Tokens the loss is computed on (EOS included).")
    truncated: Series[bool] = pa.Field(description="True if the prompt side was cut to fit max_length.")

    @pa.dataframe_check(error="n_completion_tokens must not exceed n_tokens")
    def _completion_within_total(cls, df: pd.DataFrame) -> Series[bool]:
        return df["n_completion_tokens"] <= df["n_tokens"]


class SplitSchema(FormattedSchema):
    """One split file (train, validation or test)."""

    group: Series[str] = pa.Field(description="Near-duplicate group; a group lives in exactly one split.")


@dataclass(frozen=True)
class Failure:
    """One failure case of a pandera check, in the words the project shows it (errors and check evidence)."""

    column: str  # the column, or '' for a check on whole rows
    check: str  # the check's name or error text
    row: int | None  # 1-based row of the validated rows (+ offset), None when pandera names none
    value: str  # the failing value, cut to 80 characters

    def describe(self) -> str:
        where = f"at line {self.row}: " if self.row is not None else ""
        what = f"column '{self.column}' fails {self.check}" if self.column else f"fails the check '{self.check}'"
        return where + what


def failures(exc: pa_errors.SchemaErrors | pa_errors.SchemaError, offset: int = 0) -> list[Failure]:
    """Every failure case of a (lazy or eager) pandera validation error, column checks first; `offset` is added to
    row numbers (the rows before the validated chunk)."""
    cases = getattr(exc, "failure_cases", None)
    if cases is None or not len(cases):
        return [Failure("", str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__,
                        None, "")]
    out = []
    for case in cases.to_dict("records"):
        column = case.get("column") if case.get("schema_context") == "Column" else None
        index = case.get("index")
        row = offset + int(index) + 1 if isinstance(index, (int, float)) and index == index else None
        out.append(Failure(str(column) if column else "", str(case.get("check")), row,
                           str(case.get("failure_case"))[:80]))
    return sorted(out, key=lambda f: not f.column)  # stable: column failures first, in pandera's order


def describe_failures(exc: pa_errors.SchemaErrors | pa_errors.SchemaError, what: str, fix: str,
                      offset: int = 0) -> str:
    """One sentence for a broken data contract: '<what> breaks the row contract (N failure(s)) at line L: column
    'c' fails check; <fix>' — the one way every stage and check words a pandera failure."""
    found = failures(exc, offset)
    return f"{what} breaks the row contract ({len(found)} failure(s)) {found[0].describe()}; {fix}"


def frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """Rows as a DataFrame for validation (object columns keep nested lists intact)."""
    return pd.DataFrame.from_records(rows, columns=columns)


def validate(schema: type[pa.DataFrameModel], rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Validate rows against `schema` (lazy: every failure is collected); raises pandera's SchemaErrors."""
    if not rows:
        columns = schema.to_schema().columns
        empty = {name: pd.Series(dtype=col.dtype.type if col.dtype else object) for name, col in columns.items()}
        return schema.validate(pd.DataFrame(empty), lazy=True)
    return schema.validate(frame(rows), lazy=True)


# ------------------------------------------------------------------------------------------ preference rows
#
# A preference row (paths.preferences/{train,validation,test}.jsonl) is one of two kinds:
#     pair      prompt + chosen + rejected       (DPO, ORPO, SimPO; KTO splits it into one row of each label)
#     unpaired  prompt + completion + label      (KTO: label true = desirable, false = undesirable)
# prompt is the conversation before the answer (it ends with a user or tool turn); chosen, rejected and
# completion are the assistant turn(s) that answer it. Besides: id, source, line, format, tools, meta as in the
# row schema above, and group (the prompt's near-duplicate group, shared with the SFT split; see
# pipelines/preferences.py).


def prompt_problem(prompt: Any) -> str | None:
    """Why `prompt` is not the conversation before an answer, or None when it is."""
    if not isinstance(prompt, list) or not prompt:
        return "prompt must be a non-empty list of messages"
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or set(m) - MESSAGE_KEYS or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            return f"prompt message {i} must be an object with a role ({', '.join(ROLES)}) and string content"
    if not any(m["role"] == "user" for m in prompt):
        return "prompt has no user message"
    if prompt[-1]["role"] not in ("user", "tool"):
        return f"prompt must end with a user or tool message, not {prompt[-1]['role']!r}"
    return None


def answer_problem(answer: Any, what: str) -> str | None:
    """Why `answer` (chosen, rejected or completion) is not a non-empty list of assistant messages, or None."""
    if not isinstance(answer, list) or not answer:
        return f"{what} must be a non-empty list of assistant messages"
    for i, m in enumerate(answer):
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            return f"{what} message {i} must be an assistant message with non-empty content"
    return None


def preference_problem(row: dict[str, Any]) -> str | None:
    """Why a preference row breaks its contract (see above), or None."""
    problem = prompt_problem(row.get("prompt"))
    if problem:
        return problem
    if row.get("kind") == "pair":
        if row.get("completion") is not None or row.get("label") is not None:
            return "a pair has no completion and no label"
        problem = answer_problem(row.get("chosen"), "chosen") or answer_problem(row.get("rejected"), "rejected")
        if problem is None and row["chosen"] == row["rejected"]:
            problem = "chosen and rejected are identical"
        return problem
    if row.get("kind") == "unpaired":
        if row.get("chosen") is not None or row.get("rejected") is not None:
            return "an unpaired row has no chosen and no rejected"
        if not isinstance(row.get("label"), bool):
            return "an unpaired row needs a boolean label"
        return answer_problem(row.get("completion"), "completion")
    return f"kind must be 'pair' or 'unpaired', got {row.get('kind')!r}"


class PreferenceSchema(pa.DataFrameModel):
    """Rows of the preference-data stage (one split file)."""

    id: Series[str] = pa.Field(unique=True, description="Stable row id (hex digest of source and line).")
    source: Series[str] = pa.Field(description="Raw file the row came from, relative to the project.")
    line: Series[int] = pa.Field(ge=1, description="1-based line or record number in the source file.")
    format: Series[str] = pa.Field(description="Detected raw preference format (sharegpt_pair, messages_label, ...).")
    kind: Series[str] = pa.Field(isin=["pair", "unpaired"], description="pair: chosen + rejected; unpaired: label.")
    group: Series[str] = pa.Field(description="Near-duplicate group of the prompt; a group lives in one split.")

    @pa.dataframe_check(error="every row must be a valid pair or unpaired row (schemas.preference_problem)")
    def _valid_row(cls, df: pd.DataFrame) -> Series[bool]:
        return pd.Series([preference_problem(r) is None for r in df.to_dict("records")], index=df.index)

    class Config:
        strict = False  # prompt / chosen / rejected / completion / label / tools / meta are checked above
        coerce = False
