"""Ingest: each raw row format normalises to the row contract; run() writes examples, quarantine and a
report; real public datasets ingest with the expected counts; user errors are one sentence."""

from __future__ import annotations

import hashlib
import json
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
    pytest.param({"messages": [{"role": "bot", "content": "x"}]}, "invalid_row", "role 'bot'", id="wrong-role"),
    pytest.param({"messages": [{"role": ["user"], "content": "x"}]}, "invalid_row", "role", id="unhashable-role"),
    pytest.param({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
                 "invalid_row", "got number", id="content-number"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                               {"role": "assistant", "content": "a"}]}, "invalid_row", "'image_url' content part",
                 id="image-part"),
    pytest.param({"messages": conv((U, "q"))}, "invalid_conversation", "no assistant", id="ends-on-user-only"),
    pytest.param({"messages": conv((U, "q"), (A, "a"), (U, "q2"))}, "invalid_conversation", "end with an assistant",
                 id="ends-on-user"),
    pytest.param({"messages": conv((A, "a"), (U, "q"), (A, "a"))}, "invalid_conversation",
                 "starts with role 'assistant'", id="assistant-first"),
    pytest.param({"messages": conv((U, "q"), (S, "s"), (A, "a"))}, "invalid_conversation", "not the first",
                 id="system-in-middle"),
    pytest.param({"messages": conv((U, "q"), (T, "t"), (A, "a"))}, "invalid_conversation", "tool message 1",
                 id="tool-after-user"),
    pytest.param({"messages": conv((U, "q"), (A, "  "))}, "invalid_conversation", "message 1 (assistant) is empty",
                 id="empty-answer"),
    pytest.param({"messages": []}, "invalid_conversation", "non-empty", id="empty-list"),
    pytest.param({"conversations": [{"from": "bot", "value": "x"}]}, "invalid_row", "from 'bot'", id="sharegpt-from"),
    pytest.param({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
                 "invalid_row", "got null", id="sharegpt-null-value"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{x"},
                 "invalid_row", "not valid JSON", id="tools-not-json"),
    pytest.param({"instruction": 5, "output": "a"}, "invalid_row", "'instruction' must be a string", id="alpaca-type"),
    pytest.param({"instruction": "q", "output": "a", "history": [["only one"]]}, "invalid_row", "history item 0",
                 id="alpaca-bad-history"),
    pytest.param({"prompt": "p", "completion": None}, "invalid_row", "'completion' must be a string",
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
    assert result.metrics["rules"] == {"invalid_row": 1}  # the row whose prompt is null


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
