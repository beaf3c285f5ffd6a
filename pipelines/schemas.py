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
from typing import Any

import pandas as pd
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
