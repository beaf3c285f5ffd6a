"""Ingest: each raw row format normalises to the row contract; run() writes examples, quarantine and a
report; real public datasets ingest with the expected counts; user errors are one sentence."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from pipelines import ingest
from pipelines.__main__ import main as cli
from pipelines.config import load_params
from pipelines.io import StageError, read_json, read_jsonl
from tests.conftest import SHARED_DATASETS, write_project

U, A, S, T = "user", "assistant", "system", "tool"


def conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


# ---------------------------------------------------------------------------------------------------
# normalise_row: one case per format and per variant
# ---------------------------------------------------------------------------------------------------

VALID = [
    pytest.param({"messages": conv((U, "hi"), (A, "hello"))}, "messages", conv((U, "hi"), (A, "hello")), id="messages"),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}]},
        "messages", conv((U, "a\nb"), (A, "c")), id="messages-text-parts"),
    pytest.param({"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "name": "bot"}]},
                 "messages", conv((S, "be brief"), (U, "q"), (A, "a")), id="messages-developer-role-extra-keys"),
    pytest.param({"messages": conv((U, "q"), (A, "a"), (U, "q2"), (A, "a2"))}, "messages",
                 conv((U, "q"), (A, "a"), (U, "q2"), (A, "a2")), id="messages-multi-turn"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                 "sharegpt", conv((U, "q"), (A, "a")), id="sharegpt"),
    pytest.param({"conversations": [{"from": "user", "value": "q"}, {"from": "model", "value": "a"}],
                  "system": "sys"}, "sharegpt", conv((S, "sys"), (U, "q"), (A, "a")), id="sharegpt-system-field"),
    pytest.param({"conversations": [{"from": "human", "value": "weather?"},
                                    {"from": "function_call", "value": '{"name": "w"}'},
                                    {"from": "observation", "value": '{"t": 20}'},
                                    {"from": "gpt", "value": "20 degrees"}]},
                 "sharegpt", conv((U, "weather?"), (A, '{"name": "w"}'), (T, '{"t": 20}'), (A, "20 degrees")),
                 id="sharegpt-tool-call"),
    pytest.param({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca", conv((U, "Add\n\n2+2"), (A, "4")),
                 id="alpaca"),
    pytest.param({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", conv((U, "Say hi"), (A, "hi")),
                 id="alpaca-empty-input"),
    pytest.param({"instruction": "Say hi", "output": "hi", "system": "sys", "history": [["q0", "a0"]]}, "alpaca",
                 conv((S, "sys"), (U, "q0"), (A, "a0"), (U, "Say hi"), (A, "hi")), id="alpaca-system-history"),
    pytest.param({"instruction": "Say hi", "input": None, "output": "hi", "system": ""}, "alpaca",
                 conv((U, "Say hi"), (A, "hi")), id="alpaca-null-input-empty-system"),
    pytest.param({"prompt": "p", "completion": "c"}, "prompt_completion", conv((U, "p"), (A, "c")),
                 id="prompt-completion"),
    pytest.param({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]},
                 "prompt_completion", conv((U, "p"), (A, "c")), id="prompt-completion-conversational"),
    pytest.param({"prompt": "p", "response": "r"}, "prompt_response", conv((U, "p"), (A, "r")), id="prompt-response"),
    pytest.param({"input": "i", "output": "o"}, "input_output", conv((U, "i"), (A, "o")), id="input-output"),
]


@pytest.mark.parametrize("obj, fmt, messages", VALID)
def test_normalise_row_formats(obj, fmt, messages):
    row, why = ingest.normalise_row(obj)
    assert why is None
    assert row["format"] == fmt
    assert row["messages"] == messages


INVALID = [
    pytest.param({"messages": "hi"}, "invalid_row", "'messages' must be a list", id="messages-not-list"),
    pytest.param({"messages": [{"role": "narrator", "content": "x"}]}, "invalid_row", "role 'narrator'",
                 id="wrong-role"),
    pytest.param({"messages": [{"role": ["user"], "content": "x"}]}, "invalid_row", "role", id="unhashable-role"),
    pytest.param({"messages": [{"role": "user", "content": {"text": "q"}}, {"role": "assistant", "content": "a"}]},
                 "invalid_row", "got object", id="content-object"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                               {"role": "assistant", "content": "a"}]}, "invalid_row", "'image_url' content part",
                 id="image-part"),
    pytest.param({"messages": conv((U, "q"))}, "invalid_conversation", "no assistant", id="ends-on-user-only"),
    pytest.param({"messages": conv((A, "a"))}, "invalid_conversation", "no user message", id="assistant-only"),
    pytest.param({"messages": conv((U, "q"), (S, "s"), (A, "a"))}, "invalid_conversation", "not the first",
                 id="system-in-middle"),
    pytest.param({"messages": conv((U, "q"), (T, "t"), (A, "a"))}, "invalid_conversation", "tool message 1",
                 id="tool-after-user"),
    pytest.param({"messages": conv((U, "q"), (A, "  "))}, "invalid_conversation", "message 1 (assistant) is empty",
                 id="empty-answer"),
    pytest.param({"messages": []}, "invalid_conversation", "non-empty", id="empty-list"),
    pytest.param({"conversations": [{"from": "narrator", "value": "x"}]}, "invalid_row", "from 'narrator'",
                 id="sharegpt-from"),
    pytest.param({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
                 "invalid_conversation", "message 0 (user) is empty", id="sharegpt-null-value"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{x"},
                 "invalid_row", "not valid JSON", id="tools-not-json"),
    pytest.param({"instruction": [5], "output": "a"}, "invalid_row", "'instruction' must be text", id="alpaca-type"),
    pytest.param({"instruction": "q", "output": "a", "history": [["only one"]]}, "invalid_row", "history item 0",
                 id="alpaca-bad-history"),
    pytest.param({"prompt": "p", "completion": None}, "invalid_conversation", "message 1 (assistant) is empty",
                 id="completion-null"),
    pytest.param({"text": "plain text"}, "unknown_format", "no known row format in keys [text]", id="unknown-keys"),
    pytest.param(["not", "an", "object"], "invalid_row", "JSON array", id="not-an-object"),
    pytest.param({"prompt": "p\x00q", "completion": "c"}, "invalid_row", "NUL", id="nul-char"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                  "rejected": {"from": "gpt", "value": "b"}}, "preference_pair", "the preference-data stage reads it",
                 id="preference-pair"),
    pytest.param({"messages": conv((U, "q"), (A, "a")), "label": False}, "undesirable_example", "labelled false",
                 id="kto-label-false"),
]


@pytest.mark.parametrize("obj, rule, reason", INVALID)
def test_normalise_row_rejects_with_rule_and_reason(obj, rule, reason):
    row, why = ingest.normalise_row(obj)
    assert row is None
    assert why.rule == rule
    assert reason in why


def test_meta_keeps_other_fields_and_kto_label_true():
    row, _ = ingest.normalise_row({"messages": conv((U, "q"), (A, "a")), "label": True, "category": "bug"})
    assert row["meta"] == {"label": True, "category": "bug"}
    row, _ = ingest.normalise_row({"instruction": "q", "input": "", "output": "a", "category": "x", "system": "s"})
    assert row["meta"] == {"category": "x"}  # consumed fields are not repeated in meta


@pytest.mark.parametrize("tools, expected", [
    ('[{"name": "f"}]', '[{"name": "f"}]'),
    ([{"name": "f"}], '[{"name": "f"}]'),
    ("[]", None),
    ("", None),
])
def test_tools_become_a_json_string_or_none(tools, expected):
    obj = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": tools}
    row, why = ingest.normalise_row(obj)
    assert why is None and row["tools"] == expected
    assert "tools" not in row["meta"]


def test_system_prompt_is_prepended_only_when_missing():
    row, _ = ingest.normalise_row({"prompt": "p", "completion": "c"}, system_prompt="Be terse.")
    assert row["messages"][0] == {"role": "system", "content": "Be terse."}
    row, _ = ingest.normalise_row({"messages": conv((S, "own"), (U, "q"), (A, "a"))}, system_prompt="Be terse.")
    assert [m["content"] for m in row["messages"]] == ["own", "q", "a"]


def test_explicit_format_overrides_detection():
    obj = {"input": "i", "output": "o", "instruction": "ins"}
    assert ingest.normalise_row(obj)[0]["format"] == "alpaca"
    row, _ = ingest.normalise_row(obj, "input_output")
    assert row["format"] == "input_output" and row["messages"] == conv((U, "i"), (A, "o"))
    row, why = ingest.normalise_row({"prompt": "p", "completion": "c"}, "alpaca")
    assert row is None and why.rule == "unknown_format" and "data.format is 'alpaca'" in why


# ---------------------------------------------------------------------------------------------------
# run(): a tmp project
# ---------------------------------------------------------------------------------------------------


def jline(obj) -> str:
    return json.dumps(obj) + "\n"


GOOD = {"messages": conv((U, "q"), (A, "a")), "category": "demo"}


def project(tmp_path: Path, files: dict[str, str | bytes], **data) -> Path:
    raw = tmp_path / "raw_in"
    for name, content in files.items():
        path = raw / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    raw.mkdir(exist_ok=True)
    return write_project(tmp_path / "proj", {"data": data} if data else None, raw_from=raw)


def test_run_writes_examples_quarantine_and_report(tmp_path):
    files = {
        "a.jsonl": jline(GOOD) + "\n" + "{broken\n" + jline({"prompt": "p", "completion": "c"}),
        "sub/b.json": json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 2),
        "c.csv": "instruction,input,output,category\nq,,a,x\n",
        "notes.txt": "hello",
    }
    params = load_params(project(tmp_path, files, max_bad_fraction=0.5))
    result = ingest.run(params)
    out = params.path("raw_examples")
    rows = list(read_jsonl(out / "examples.jsonl"))
    assert [(r["source"], r["line"], r["format"]) for r in rows] == [
        ("data/raw/a.jsonl", 1, "messages"), ("data/raw/a.jsonl", 4, "prompt_completion"),
        ("data/raw/c.csv", 2, "alpaca"), ("data/raw/sub/b.json", 1, "alpaca"), ("data/raw/sub/b.json", 2, "alpaca")]
    assert rows[0]["id"] == hashlib.sha1(b"data/raw/a.jsonl:1").hexdigest()[:16]
    assert rows[0]["meta"] == {"category": "demo"} and rows[0]["tools"] is None
    assert rows[2]["meta"] == {"category": "x"}
    [bad] = list(read_jsonl(out / "quarantine.jsonl"))
    assert bad["source"] == "data/raw/a.jsonl" and bad["line"] == 3 and bad["rule"] == "malformed_json"
    assert bad["stage"] == "ingest" and bad["excerpt"] == "{broken"
    report = read_json(out / "report.json")
    assert report["status"] == "ok" and report["rows_in"] == 6 and report["rows_out"] == 5
    assert {f["source"]: f["kept"] for f in report["per_file"]}["data/raw/sub/b.json"] == 2
    assert any("notes.txt: unknown extension '.txt'" in m for m in report["messages"])
    assert result.metrics["formats"] == {"messages": 1, "prompt_completion": 1, "alpaca": 3}
    assert result.metrics["rules"] == {"malformed_json": 1}
    assert result.metrics["bad_fraction"] == pytest.approx(1 / 6, abs=1e-6)
    json.dumps(result.metrics)  # JSON-able metadata for Dagster
    # Same input, same ids and bytes: the stage is deterministic.
    first = (out / "examples.jsonl").read_bytes()
    ingest.run(params)
    assert (out / "examples.jsonl").read_bytes() == first


def test_too_many_malformed_rows_fail_with_one_sentence(tmp_path):
    files = {"a.jsonl": jline(GOOD) + "{bad\n" + "[1]\n" + jline(GOOD)}
    params = load_params(project(tmp_path, files))
    with pytest.raises(StageError) as err:
        ingest.run(params)
    message = str(err.value)
    assert "2 of 4 rows (50.0%) are malformed" in message
    assert "data.max_bad_fraction = 5.0%" in message
    assert "data/raw_examples/quarantine.jsonl" in message
    out = params.path("raw_examples")
    assert len(list(read_jsonl(out / "quarantine.jsonl"))) == 2  # the user can look at what went wrong
    assert not (out / "examples.jsonl").exists()  # and downstream cannot consume a failed ingest
    assert read_json(out / "report.json")["status"] == "failed"


def test_preference_and_undesirable_rows_are_not_malformed(tmp_path):
    pref = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"}}
    files = {"pref.jsonl": jline(pref) * 5, "kto.jsonl": jline({**GOOD, "label": False}) * 3 + jline(GOOD)}
    result = ingest.run(load_params(project(tmp_path, files)))  # 8 of 9 removed, yet under the 5% threshold
    assert result.metrics["rows_out"] == 1 and result.metrics["malformed"] == 0
    assert result.metrics["rules"] == {"preference_pair": 5, "undesirable_example": 3}
    [pref_msg] = [m for m in result.metrics["messages"] if m.startswith("data/raw/pref.jsonl")]
    assert "are read by the preference-data stage" in pref_msg and "not SFT" in pref_msg


@pytest.mark.parametrize("files, expected", [
    ({}, "no trainable rows in 'data/raw'"),
    ({"a.jsonl": ""}, "a.jsonl: file is empty"),
    ({"a.txt": "x"}, "unknown extension"),
])
def test_no_trainable_rows_is_a_stage_error(tmp_path, files, expected):
    with pytest.raises(StageError, match=expected):
        ingest.run(load_params(project(tmp_path, files)))


def test_missing_raw_dir_names_the_key(tmp_path):
    params = load_params(project(tmp_path, {}), {"paths.raw_dir": "nowhere"})
    with pytest.raises(StageError, match=r"raw data folder 'nowhere' does not exist.*paths.raw_dir"):
        ingest.run(params)


def test_cli_prints_one_line_and_exits_2_on_user_error(tmp_path, capsys):
    path = project(tmp_path, {"a.jsonl": "{bad\n" + jline(GOOD)})
    assert cli(["ingest", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 2 rows") and "\n" not in err and "Traceback" not in err


def test_configured_format_and_system_prompt(tmp_path):
    files = {"a.jsonl": jline({"input": "i", "output": "o", "instruction": "x"})}
    params = load_params(project(tmp_path, files, format="input_output", system_prompt="Be terse."))
    ingest.run(params)
    [row] = read_jsonl(params.path("raw_examples") / "examples.jsonl")
    assert row["format"] == "input_output"
    assert row["messages"] == conv((S, "Be terse."), (U, "i"), (A, "o"))
    assert row["meta"] == {"instruction": "x"}


def test_parquet_is_read_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw_in"
    raw.mkdir()
    table = pa.table({"prompt": ["p1", "p2", None], "completion": ["c1", "c2", "c3"], "score": [1.0, float("nan"), 2]})
    pq.write_table(table, raw / "t.parquet")
    params = load_params(write_project(tmp_path / "proj", {"data": {"max_bad_fraction": 0.5}}, raw_from=raw))
    result = ingest.run(params)
    rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    assert [(r["line"], r["messages"][0]["content"], r["meta"]["score"]) for r in rows] == [(1, "p1", 1.0),
                                                                                          (2, "p2", None)]
    assert result.metrics["rules"] == {"invalid_conversation": 1}  # the row whose prompt is null: an empty message


# ---------------------------------------------------------------------------------------------------
# Real public datasets (../shared/datasets)
# ---------------------------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent")


def ingest_shared(tmp_path: Path, *names: str) -> tuple[dict, list[dict]]:
    raw = tmp_path / "raw_in"
    raw.mkdir()
    for name in names:
        (raw / name).symlink_to(SHARED_DATASETS / name)
    params = load_params(write_project(tmp_path / "proj", raw_from=raw))
    result = ingest.run(params)
    return result.metrics, list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))


@needs_shared
@pytest.mark.parametrize("name, rows, fmt", [
    ("alpaca_en_demo.json", 999, "alpaca"),
    ("identity.json", 91, "alpaca"),
    ("glaive_toolcall_en_demo.json", 300, "sharegpt"),
])
def test_real_sft_datasets_ingest_completely(tmp_path, name, rows, fmt):
    metrics, examples = ingest_shared(tmp_path, name)
    assert metrics["rows_in"] == rows and metrics["rows_out"] == rows and metrics["quarantined"] == 0
    assert metrics["formats"] == {fmt: rows}
    assert len({r["id"] for r in examples}) == rows


@needs_shared
def test_real_glaive_tool_calls_become_assistant_and_tool_turns(tmp_path):
    _, examples = ingest_shared(tmp_path, "glaive_toolcall_en_demo.json")
    with_tools = [r for r in examples if r["tools"] is not None]
    assert len(with_tools) == 191  # 109 rows have "tools": "[]"
    assert all(isinstance(json.loads(r["tools"]), list) for r in with_tools)
    roles = {m["role"] for r in examples for m in r["messages"]}
    assert roles == {"user", "assistant", "tool"}


@needs_shared
def test_real_kto_keeps_only_desirable_rows(tmp_path):
    raw = json.loads((SHARED_DATASETS / "kto_en_demo.json").read_text())
    metrics, examples = ingest_shared(tmp_path, "kto_en_demo.json")
    assert metrics["rows_out"] == sum(r["label"] is True for r in raw) == 150
    assert metrics["rules"] == {"undesirable_example": 150} and metrics["malformed"] == 0
    assert all(r["meta"] == {"label": True} for r in examples)


@needs_shared
def test_real_dpo_is_left_to_the_preference_stage_in_one_sentence(tmp_path):
    metrics, _ = ingest_shared(tmp_path, "dpo_en_demo.json", "identity.json")
    assert metrics["rules"] == {"preference_pair": 300} and metrics["malformed"] == 0
    [sentence] = [m for m in metrics["messages"] if "dpo_en_demo.json" in m]
    assert "300 rows of preference pairs" in sentence and "not SFT" in sentence


@needs_shared
def test_real_dpo_alone_fails_with_the_reason(tmp_path):
    with pytest.raises(StageError, match="no trainable rows.*read by the preference-data stage"):
        ingest_shared(tmp_path, "dpo_en_demo.json")


@needs_shared
def test_all_shared_datasets_together(tmp_path):
    names = sorted(p.name for p in SHARED_DATASETS.glob("*.json"))
    metrics, examples = ingest_shared(tmp_path, *names)
    assert metrics["rows_out"] == 999 + 91 + 300 + 150
    assert metrics["malformed"] == 0
    assert len({r["id"] for r in examples}) == len(examples)


# ---------------------------------------------------------------------------------------------------
# Issue 12: real users' data, kept whole
# ---------------------------------------------------------------------------------------------------


def kept(obj, **kwargs):
    """normalise_row for a row that must be kept: (messages, tools, changes)."""
    changes = Counter()
    row, why = ingest.normalise_row(obj, changes=changes, **kwargs)
    assert why is None, why
    return row["messages"], row["tools"], changes


def refused(obj) -> ingest.Rejection:
    row, why = ingest.normalise_row(obj)
    assert row is None
    return why


# Kind 1: values that are not strings. A number or boolean is its JSON text; a missing value is empty.
@pytest.mark.parametrize("obj, messages, converted", [
    pytest.param({"instruction": "What is 6 times 7?", "input": "", "output": 42},
                 conv((U, "What is 6 times 7?"), (A, "42")), True, id="alpaca-int-output"),
    pytest.param({"instruction": "Convert to kilometres.", "input": 12.5, "output": "20.1 km"},
                 conv((U, "Convert to kilometres.\n\n12.5"), (A, "20.1 km")), True, id="alpaca-float-input"),
    pytest.param({"prompt": "Is 17 prime?", "completion": True}, conv((U, "Is 17 prime?"), (A, "true")), True,
                 id="completion-true"),
    pytest.param({"prompt": "Is 9 prime?", "completion": False}, conv((U, "Is 9 prime?"), (A, "false")), True,
                 id="completion-false"),
    pytest.param({"prompt": "Days in a week?", "response": 7.0}, conv((U, "Days in a week?"), (A, "7")), True,
                 id="integral-float-from-pandas"),
    pytest.param({"input": -0.25, "output": 1e20}, conv((U, "-0.25"), (A, "1e+20")), True, id="negative-and-huge"),
    pytest.param({"prompt": "Price?", "completion": Decimal("12.50")}, conv((U, "Price?"), (A, "12.50")), True,
                 id="parquet-decimal"),
    pytest.param({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": 4}]},
                 conv((U, "3"), (A, "4")), True, id="messages-numbers"),
    pytest.param({"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": True}]},
                 conv((U, "1"), (A, "true")), True, id="sharegpt-scalars"),
    pytest.param({"instruction": "q", "input": None, "output": "a", "system": None, "history": None},
                 conv((U, "q"), (A, "a")), False, id="nulls-are-missing"),
    pytest.param({"instruction": "q", "input": math.nan, "output": "a", "system": math.nan, "history": math.nan},
                 conv((U, "q"), (A, "a")), False, id="pandas-nan-is-missing"),
    pytest.param({"instruction": 2024, "output": "a leap year"}, conv((U, "2024"), (A, "a leap year")), True,
                 id="instruction-number"),
    pytest.param({"instruction": "q", "output": "a", "history": [[1, 2]]},
                 conv((U, "1"), (A, "2"), (U, "q"), (A, "a")), True, id="history-numbers"),
])
def test_scalars_become_their_json_text_and_missing_values_are_empty(obj, messages, converted):
    got, _, changes = kept(obj)
    assert got == messages
    assert changes == (Counter({"value_as_text": 1}) if converted else Counter())  # counted once per row


@pytest.mark.parametrize("obj, reason", [
    pytest.param({"prompt": "p", "completion": math.inf},
                 "'completion' must be text, a number or a boolean, got number", id="infinity"),
    pytest.param({"prompt": "p", "completion": {"a": 1}}, "got object", id="object"),
    pytest.param({"prompt": "p", "completion": [1, 2]}, "got array", id="array"),
])
def test_values_that_are_not_scalars_are_refused(obj, reason):
    why = refused(obj)
    assert why.rule == "invalid_row" and reason in why


def test_every_reader_gives_the_same_rows(tmp_path):
    """The same table written as JSONL, JSON Lines by pandas, a JSON array, CSV and Parquet ingests to the same
    rows: numbers are their text, a missing input (NaN/null/empty cell) is empty."""
    import pandas as pd

    table = pd.DataFrame({"instruction": ["What is 6 times 7?", "Convert 12.5 miles to km.", "Is 17 prime?"],
                          "input": [None, 12.5, None], "output": [42, 20, 1]})
    files = {
        "python.jsonl": "".join(json.dumps(r) + "\n" for r in table.to_dict("records")),  # NaN written as NaN
        "pandas.jsonl": table.to_json(orient="records", lines=True),  # NaN written as null
        "array.json": table.to_json(orient="records"),
        "table.csv": table.to_csv(index=False),  # NaN written as an empty cell, 12.5 as 12.5
    }
    expected = [conv((U, "What is 6 times 7?"), (A, "42")), conv((U, "Convert 12.5 miles to km.\n\n12.5"), (A, "20")),
                conv((U, "Is 17 prime?"), (A, "1"))]
    for name, content in files.items():
        params = load_params(project(tmp_path / name, {name: content}))
        ingest.run(params)
        rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
        assert [r["messages"] for r in rows] == expected, name
    raw = tmp_path / "parquet_in"
    raw.mkdir()
    table.to_parquet(raw / "table.parquet")
    params = load_params(write_project(tmp_path / "parquet", raw_from=raw))
    ingest.run(params)
    assert [r["messages"] for r in read_jsonl(params.path("raw_examples") / "examples.jsonl")] == expected


# Kind 2: tool calling and content in every shape people export.
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_order", "arguments": '{"id": 42}'}}
CALL_TEXT = '{"name": "get_order", "arguments": "{\\"id\\": 42}"}'
FN_ITEM = {"type": "function_call", "call_id": "c1", "name": "get_order", "arguments": '{"id": 42}'}  # Responses API
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}


def with_call(assistant: dict) -> dict:
    return {"messages": [{"role": "user", "content": "where is order 42"}, {"role": "assistant", **assistant},
                         RESULT, {"role": "assistant", "content": "It has shipped."}]}


def called(text: str) -> list[dict[str, str]]:
    return conv((U, "where is order 42"), (A, text), (T, '{"status": "shipped"}'), (A, "It has shipped."))


@pytest.mark.parametrize("obj, messages", [
    pytest.param(with_call({"content": None, "tool_calls": [CALL]}), called(CALL_TEXT), id="tool-calls-content-null"),
    pytest.param(with_call({"tool_calls": [CALL]}), called(CALL_TEXT), id="tool-calls-content-absent"),
    pytest.param(with_call({"content": "", "tool_calls": [CALL]}), called(CALL_TEXT), id="tool-calls-content-empty"),
    pytest.param(with_call({"content": "Let me check.", "tool_calls": [CALL]}), called("Let me check.\n" + CALL_TEXT),
                 id="tool-calls-next-to-text"),
    pytest.param(with_call({"content": [{"type": "text", "text": "Checking."}], "tool_calls": [CALL]}),
                 called("Checking.\n" + CALL_TEXT), id="tool-calls-next-to-text-parts"),
    pytest.param(with_call({"content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]}),
                 called(CALL_TEXT + "\n" + CALL_TEXT), id="two-tool-calls-one-line-each"),
    pytest.param(with_call({"content": None, "function_call": {"name": "get_order", "arguments": '{"id": 42}'}}),
                 called(CALL_TEXT), id="legacy-function-call"),
    pytest.param({"messages": [{"role": "user", "content": "where is order 42"},
                               FN_ITEM,
                               {"type": "function_call_output", "call_id": "c1", "output": '{"status": "shipped"}'},
                               {"role": "assistant", "content": [{"type": "output_text", "text": "It has shipped."}]}]},
                 called(CALL_TEXT), id="responses-api-items"),
    pytest.param({"messages": [{"role": "user", "content": "where is order 42"},
                               {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
                               FN_ITEM,
                               {"type": "function_call_output", "call_id": "c1", "output": '{"status": "shipped"}'},
                               {"role": "assistant", "content": "It has shipped."}]},
                 called("Let me check.\n" + CALL_TEXT), id="responses-api-text-then-call-is-one-turn"),
    pytest.param({"conversations": [{"from": "human", "value": "where is order 42"},
                                    {"from": "function_call", "value": CALL_TEXT},
                                    {"from": "observation", "value": '{"status": "shipped"}'},
                                    {"from": "gpt", "value": "It has shipped."}]},
                 called(CALL_TEXT), id="sharegpt-function-call-observation"),
])
def test_tool_calls_are_one_json_line_each_after_the_text(obj, messages):
    assert kept(obj)[0] == messages


def test_calls_and_results_exported_as_objects_are_json_text():
    obj = {"conversations": [{"from": "human", "value": "where is order 42"},
                             {"from": "function_call", "value": {"name": "get_order", "arguments": '{"id": 42}'}},
                             {"from": "observation", "value": {"status": "shipped"}},
                             {"from": "gpt", "value": "It has shipped."}]}
    messages, _, changes = kept(obj)
    assert messages == called(CALL_TEXT) and changes == {"value_as_text": 1}
    assert refused({"messages": conv((U, "q"), (A, "a")) + [{"role": "user", "content": {"status": 1}}]}).rule == \
        "invalid_row"  # a user message that is an object is not text


def test_legacy_functions_become_tools_and_the_case_01_row_is_kept():
    schema = [{"name": "check_availability", "parameters": {"type": "object"}}]
    obj = {"messages": [{"role": "user", "content": "Is it on the shelf?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "check_availability", "arguments": '{"title": "The Salt Road"}'}},
                        {"role": "function", "name": "check_availability", "content": '{"available": true}'},
                        {"role": "assistant", "content": "Yes."}], "functions": schema}
    row, why = ingest.normalise_row(obj)
    assert why is None and json.loads(row["tools"]) == schema and row["meta"] == {}
    assert row["messages"][1] == {"role": A, "content": '{"name": "check_availability", "arguments": '
                                                        '"{\\"title\\": \\"The Salt Road\\"}"}'}
    assert row["messages"][2] == {"role": T, "content": '{"available": true}'}
    both = ingest.normalise_row({**obj, "tools": [{"name": "other"}]})[0]  # tools win; functions stay in meta
    assert json.loads(both["tools"]) == [{"name": "other"}] and both["meta"] == {"functions": schema}


@pytest.mark.parametrize("content, text", [
    pytest.param([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb", id="chat-parts"),
    pytest.param([{"type": "input_text", "text": "a"}], "a", id="responses-input-text"),
    pytest.param([{"type": "output_text", "text": "a", "annotations": []}], "a", id="responses-output-text"),
    pytest.param([{"type": "text", "text": {"value": "a", "annotations": []}}], "a", id="assistants-text-value"),
    pytest.param([{"type": "refusal", "refusal": "I can't help with that."}], "I can't help with that.",
                 id="refusal"),
    pytest.param(["a", {"text": "b"}], "a\nb", id="bare-strings-and-untyped-text"),
])
def test_content_parts_in_the_shapes_openai_writes(content, text):
    messages, _, _ = kept({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]})
    assert messages[1] == {"role": A, "content": text}


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type": "input_image", "image_url": "x"},
    {"type": "input_audio", "input_audio": {"data": "..."}}, {"type": "image_file", "image_file": {"file_id": "f"}},
    {"type": "file", "file": {"file_id": "f"}},
])
def test_image_audio_and_file_parts_are_refused_naming_the_part(part):
    why = refused({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]},
                                {"role": "assistant", "content": "a"}]})
    assert why.rule == "invalid_row" and f"{part['type']!r} content part" in why


@pytest.mark.parametrize("speaker, role", [
    ("model", A), ("Model", A), ("gpt", A), ("bot", A), ("chatbot", A), ("CHATBOT", A), ("ai", A), ("chatgpt", A),
    ("human", U), ("Human", U), ("prompter", U), ("USER", U), ("ipython", T), ("function", T), ("observation", T),
])
def test_role_aliases_in_messages_and_sharegpt(speaker, role):
    call = [(A, "call")] if role == T else []  # a tool result follows a call
    as_messages = [(U, "q"), *call, (speaker, "x"), (A, "a")]
    for obj in ({"messages": conv(*as_messages)},
                {"conversations": [{"from": r, "value": c} for r, c in as_messages]}):
        assert {"role": role, "content": "x"} in kept(obj)[0]


@pytest.mark.parametrize("speaker", ["developer", "System"])
def test_developer_and_capitalised_system_are_system(speaker):
    messages, _, _ = kept({"messages": conv((speaker, "be brief"), (U, "q"), (A, "a"))})
    assert messages[0] == {"role": S, "content": "be brief"}


@pytest.mark.parametrize("assistant, reason", [
    pytest.param({"content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
                 "tool call without a function name", id="call-without-name"),
    pytest.param({"content": None, "tool_calls": {"name": "f"}}, "'tool_calls' must be a list", id="calls-not-a-list"),
])
def test_broken_tool_calls_are_refused(assistant, reason):
    why = refused(with_call(assistant))
    assert why.rule == "invalid_row" and reason in why


def test_tool_calls_on_a_user_message_are_refused():
    why = refused({"messages": [{"role": "user", "content": "q", "tool_calls": [CALL]},
                                {"role": "assistant", "content": "a"}]})
    assert "only assistant messages call tools" in why


# Kind 3: per-turn training flags (ingest keeps them; chat.py masks the weight-0 turns).
WEIGHTED = [{"role": "user", "content": "Capital of Australia?"}, {"role": "assistant", "content": "Sydney."},
            {"role": "user", "content": "Check again."}, {"role": "assistant", "content": "Canberra."}]


def weighted(first: dict, last: dict | None = None) -> dict:
    return {"messages": [WEIGHTED[0], {**WEIGHTED[1], **first}, WEIGHTED[2], {**WEIGHTED[3], **(last or {})}]}


@pytest.mark.parametrize("flags, weights", [
    pytest.param(({"weight": 0}, {"weight": 1}), [0, 1], id="openai-weight"),
    pytest.param(({"weight": 0},), [0, None], id="absent-means-trained"),
    pytest.param(({"weight": False}, {"weight": True}), [0, 1], id="boolean-weight"),
    pytest.param(({"weight": 0.0},), [0, None], id="float-weight"),
    pytest.param(({"train": False}, {"train": True}), [0, 1], id="axolotl-train"),
    pytest.param(({"training": False},), [0, None], id="axolotl-training"),
    pytest.param(({"weight": None},), [None, None], id="null-weight-is-absent"),
])
def test_assistant_turn_weights_are_kept(flags, weights):
    messages, _, _ = kept(weighted(*flags))
    assert [m.get("weight") for m in messages if m["role"] == A] == weights
    assert all(set(m) <= {"role", "content", "weight"} for m in messages)


def test_sharegpt_turn_flags_and_weights_on_other_roles():
    messages, _, changes = kept({"conversations": [{"from": "system", "value": "s", "train": False},
                                                   {"from": "human", "value": "q", "weight": 1},
                                                   {"from": "gpt", "value": "a", "train": False},
                                                   {"from": "human", "value": "q2", "train": False},
                                                   {"from": "gpt", "value": "a2"}]})
    assert [m.get("weight") for m in messages] == [None, None, 0, None, None]
    assert changes == {"turn_flag_ignored": 1}  # the human turn asked for training: not honoured, counted


@pytest.mark.parametrize("value", [0.5, 2, "0", [0]])
def test_a_weight_other_than_0_or_1_is_refused_naming_it(value):
    why = refused(weighted({"weight": value}))
    assert why.rule == "invalid_row" and f"has weight {value!r}" in why and "expected 0 or 1" in why


def test_every_turn_weight_zero_is_its_own_rule_not_malformed(tmp_path):
    assert refused(weighted({"weight": 0}, {"weight": 0})).rule == "all_turns_weight_zero"
    files = {"w.jsonl": jline(weighted({"weight": 0}, {"weight": 0})) * 3 + jline(weighted({"weight": 0})),
             "case03.jsonl": jline({"messages": [{"role": "user", "content": "What is the capital of Australia?"},
                                                 {"role": "assistant", "content": "Sydney.", "weight": 0},
                                                 {"role": "user", "content": "That is not right."},
                                                 {"role": "assistant", "content": "Canberra.", "weight": 1}]})}
    params = load_params(project(tmp_path, files))
    result = ingest.run(params)
    assert result.metrics["rows_out"] == 2 and result.metrics["malformed"] == 0
    assert result.metrics["rules"] == {"all_turns_weight_zero": 3}
    assert any("3 rows with weight 0 on every assistant turn" in m for m in result.metrics["messages"])
    rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    assert [m.get("weight") for m in rows[0]["messages"]] == [None, 0, None, 1]


# Kind 7: conversations other tools accept.
@pytest.mark.parametrize("obj, messages", [
    pytest.param({"messages": conv((U, "q"), (A, "a"), (U, "and?"))}, conv((U, "q"), (A, "a")), id="ends-on-user"),
    pytest.param({"messages": conv((U, "q"), (A, "a"), (U, "and?"), (U, ""))}, conv((U, "q"), (A, "a")),
                 id="ends-on-empty-user"),
    pytest.param(with_call({"content": None, "tool_calls": [CALL]})["messages"][:3],
                 conv((U, "where is order 42"), (A, CALL_TEXT)), id="ends-on-tool-result"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                    {"from": "human", "value": "thanks"}]}, conv((U, "q"), (A, "a")),
                 id="sharegpt-ends-on-human"),
])
def test_turns_after_the_last_answer_are_trimmed_and_counted(obj, messages):
    if isinstance(obj, list):
        obj = {"messages": obj}
    got, _, changes = kept(obj)
    assert got == messages and changes == {"trailing_turns_trimmed": 1}


def test_a_conversation_opening_with_an_assistant_greeting_is_kept():
    messages, _, changes = kept({"messages": conv((A, "Hi! How can I help?"), (U, "Reset my password."), (A, "Done."))})
    assert [m["role"] for m in messages] == [A, U, A] and changes == Counter()


def test_trimmed_rows_are_counted_in_the_report(tmp_path):
    files = {"a.jsonl": jline({"messages": conv((U, "q"), (A, "a"), (U, "more?"))}) * 2 + jline(GOOD)}
    result = ingest.run(load_params(project(tmp_path, files)))
    assert result.metrics["rows_out"] == 3 and result.metrics["changes"] == {"trailing_turns_trimmed": 2}
    assert result.metrics["per_file"][0]["changes"] == {"trailing_turns_trimmed": 2}
    assert any("2 rows kept with a change (trailing_turns_trimmed)" in m for m in result.metrics["messages"])


# Kind 8: files whose content does not match their name.
ALPACA = [{"instruction": "Name a primary colour.", "input": "", "output": "Red."},
          {"instruction": "Give an antonym of cold.", "input": "", "output": "Hot."}]


@pytest.mark.parametrize("content", [
    pytest.param(json.dumps(ALPACA, indent=2), id="pretty-printed"),
    pytest.param(json.dumps(ALPACA), id="one-line"),
    pytest.param("\ufeff\n" + json.dumps(ALPACA, indent=4) + "\n\n", id="bom-and-blank-lines"),
])
def test_a_json_array_saved_as_jsonl_is_read_as_json_with_a_note(tmp_path, content):
    result = ingest.run(load_params(project(tmp_path, {"saved.jsonl": content})))
    assert result.metrics["rows_in"] == result.metrics["rows_out"] == 2 and result.metrics["quarantined"] == 0
    assert result.metrics["messages"] == ["data/raw/saved.jsonl: holds a JSON array, not JSON Lines; it was read as "
                                          "JSON (rename it to .json)"]


ONE_OBJECT_NOTE = ("data/raw/saved.jsonl: holds one JSON object written over several lines, not JSON Lines; it was "
                   "read as JSON (rename it to .json)")


@pytest.mark.parametrize("content, line", [
    pytest.param(json.dumps(ALPACA[0], indent=2), 1, id="indent-2"),  # json.dump(row, f, indent=2)
    pytest.param(json.dumps(ALPACA[0], indent=4) + "\n", 1, id="indent-4-newline"),
    pytest.param("\ufeff\n\n" + json.dumps(ALPACA[0], indent=2) + "\n\n", 3, id="bom-and-blank-lines"),
    pytest.param(json.dumps(ALPACA[0], indent=2).replace("\n", "\r\n") + "\r\n", 1, id="crlf"),
    pytest.param("  " + json.dumps(ALPACA[0], indent="\t") + "  \n", 1, id="tabs-and-spaces"),
    pytest.param('{\n"instruction": "Name a primary colour.", "input": "", "output": "Red."}', 1, id="brace-alone"),
])
def test_one_pretty_printed_object_saved_as_jsonl_is_read_as_json_with_a_note(tmp_path, content, line):
    params = load_params(project(tmp_path, {"saved.jsonl": content}))
    result = ingest.run(params)
    assert result.metrics["rows_in"] == result.metrics["rows_out"] == 1 and result.metrics["quarantined"] == 0
    assert result.metrics["messages"] == [ONE_OBJECT_NOTE]  # before: 5 malformed_json rows and no note
    [row] = read_jsonl(params.path("raw_examples") / "examples.jsonl")
    assert row["messages"][-1]["content"] == "Red." and row["line"] == line  # the line the object starts on


def test_pretty_printed_objects_one_after_another_are_read_with_their_lines(tmp_path):
    """`jq '.[]' rows.json > rows.jsonl` (no -c) writes each object over several lines."""
    content = "".join(json.dumps(r, indent=2) + "\n" for r in ALPACA)
    for name in ("saved.jsonl", "saved.json"):
        params = load_params(project(tmp_path / name, {name: content}))
        result = ingest.run(params)
        assert result.metrics["rows_out"] == 2 and result.metrics["quarantined"] == 0
        assert result.metrics["messages"] == [
            f"data/raw/{name}: holds 2 JSON objects written over several lines each, not one per line; they were read "
            "one after another (write one object per line, e.g. with jq -c)"]
        rows = read_jsonl(params.path("raw_examples") / "examples.jsonl")
        assert [(r["line"], r["messages"][-1]["content"]) for r in rows] == [(1, "Red."), (6, "Hot.")]


def test_jsonl_whose_first_line_is_cut_stays_jsonl(tmp_path):
    files = {"a.jsonl": '{"messages": [\n' + jline(GOOD) + jline(GOOD | {"category": "b"})}
    result = ingest.run(load_params(project(tmp_path, files, max_bad_fraction=0.6)))
    assert result.metrics["rows_out"] == 2 and result.metrics["rules"] == {"malformed_json": 1}
    assert result.metrics["messages"] == []


def test_a_broken_json_array_saved_as_jsonl_keeps_the_records_before_the_break(tmp_path):
    content = json.dumps(ALPACA, indent=2)[:-40]  # truncated inside the second record
    result = ingest.run(load_params(project(tmp_path, {"saved.jsonl": content}, max_bad_fraction=0.6)))
    assert result.metrics["rows_out"] == 1 and result.metrics["rules"] == {"malformed_json": 1}
    assert any("holds a JSON array" in m for m in result.metrics["messages"])


def test_jsonl_whose_first_record_is_an_array_stays_jsonl(tmp_path):
    files = {"a.jsonl": json.dumps(ALPACA) + "\n" + jline(GOOD)}  # two lines: JSON Lines, the first one is bad
    result = ingest.run(load_params(project(tmp_path, files, max_bad_fraction=0.6)))
    assert result.metrics["rows_out"] == 1 and result.metrics["rules"] == {"invalid_row": 1}


def test_every_row_quarantined_names_the_reasons_not_no_data_files(tmp_path):
    with pytest.raises(StageError) as err:
        ingest.run(load_params(project(tmp_path, {"a.jsonl": "{bad\n{worse\n[1]\n"})))
    assert "no data files" not in str(err.value)
    assert "every row was quarantined (malformed_json: 2, invalid_row: 1)" in str(err.value)


@pytest.mark.parametrize(("rows", "sentence"), [
    ([{"id": "a", "source": "f", "line": 0, "format": "messages",
       "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     "rows breaks the row contract (1 failure(s)) at line 1: column 'line' fails greater_than_or_equal_to(1); fix"),
    ([{"id": "a", "source": "f", "line": 1, "format": "messages", "messages": [{"role": "user", "content": "q"}]},
      {"id": "b", "source": "f", "line": 2, "format": "messages", "messages": "not a list"}],
     "rows breaks the row contract (2 failure(s)) at line 1: column 'messages' fails messages must be a valid "
     "conversation; fix"),
])
def test_pandera_failures_are_worded_by_one_function(rows, sentence):
    """Every stage and check words a broken data contract through pipelines.schemas.describe_failures."""
    import pandera.errors

    from pipelines.schemas import ConversationSchema, describe_failures, failures, validate

    with pytest.raises(pandera.errors.SchemaErrors) as err:
        validate(ConversationSchema, rows)
    assert describe_failures(err.value, "rows", "fix") == sentence
    assert [f.row for f in failures(err.value, offset=10)][0] == 11
