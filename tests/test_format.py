"""The format stage: token counts from pipelines.chat, the overlong policies, prompt/completion strings,
the FormattedSchema contract and run() on a throw-away project with the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandera.errors
import pytest
from transformers import AutoTokenizer

from pipelines import format as fmt
from pipelines.chat import render, render_prompt, tokenize_conversation
from pipelines.config import FormatConfig, load_params
from pipelines.io import StageError, read_json, read_jsonl, write_jsonl
from pipelines.schemas import FormattedSchema, validate
from tests.conftest import tiny_overrides, write_project

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
ANSWER = "Eat well, sleep, exercise."


def _row(i: int, messages: list[dict], **extra) -> dict:
    return {"id": f"{i:04x}", "source": "data/raw/x.jsonl", "line": i + 1, "format": "messages",
            "messages": messages, "tools": None, "meta": {}, **extra}


def _chat(n_exchanges: int, final_user: str = "Give three tips for staying healthy.", answer: str = ANSWER) -> list:
    msgs = [SYSTEM]
    for k in range(n_exchanges):
        msgs += [{"role": "user", "content": f"Where is my parcel number {k}? Tracking has not updated."},
                 {"role": "assistant", "content": "Please refund, my card was charged twice."}]
    return msgs + [{"role": "user", "content": final_user}, {"role": "assistant", "content": answer}]


def _length(tokenizer, messages) -> int:
    return tokenize_conversation(tokenizer, messages).n_tokens


@pytest.mark.parametrize("output", ["messages", "prompt_completion"])
def test_token_counts_match_tokenize_conversation(tiny_tokenizer, output):
    rows = [_row(0, _chat(0)), _row(1, _chat(2)), _row(2, _chat(1, answer="Could you add a dark mode?"))]
    result = fmt.format_rows(rows, tiny_tokenizer, FormatConfig(max_length=4096, output=output))
    assert [r["id"] for r in result.rows] == ["0000", "0001", "0002"] and not result.quarantine
    for row, out in zip(rows, result.rows, strict=True):
        tc = tokenize_conversation(tiny_tokenizer, row["messages"], only_last=output == "prompt_completion")
        assert (out["n_tokens"], out["n_completion_tokens"]) == (tc.n_tokens, tc.n_completion_tokens)
        assert out["truncated"] is False and out["messages"] == row["messages"] and out["meta"] == {}
    multi_turn = result.rows[1]
    all_turns = tokenize_conversation(tiny_tokenizer, rows[1]["messages"]).n_completion_tokens
    last_turn = tokenize_conversation(tiny_tokenizer, rows[1]["messages"], only_last=True).n_completion_tokens
    assert last_turn < all_turns  # the earlier answers count only for messages output
    assert multi_turn["n_completion_tokens"] == (all_turns if output == "messages" else last_turn)


def test_drop_policy_quarantines_overlong_rows(tiny_tokenizer):
    short, long = _chat(0), _chat(6)
    limit = _length(tiny_tokenizer, short) + 5
    assert _length(tiny_tokenizer, long) > limit
    result = fmt.format_rows([_row(0, short), _row(1, long)], tiny_tokenizer,
                             FormatConfig(max_length=limit, overlong="drop"))
    assert [r["id"] for r in result.rows] == ["0000"]
    (bad,) = result.quarantine
    assert (bad["rule"], bad["stage"], bad["line"]) == ("overlong", "format", 2)
    assert bad["n_tokens"] == _length(tiny_tokenizer, long) and str(limit) in bad["reason"]
    assert len(bad["excerpt"]) <= 200
    assert (result.dropped, result.truncated) == (1, 0)


def _assert_answer_intact(tokenizer, messages, answer: str) -> None:
    tc = tokenize_conversation(tokenizer, messages, only_last=True)
    trained = [t for t, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained) == answer + tokenizer.eos_token


@pytest.mark.parametrize("keep", [0, 1, 3])  # early exchanges that fit beside the final one
def test_truncate_drops_the_earliest_exchanges_and_keeps_the_answer(tiny_tokenizer, keep):
    messages = _chat(6)
    expected = [SYSTEM, *messages[len(messages) - 2 * keep - 2:]]
    limit = _length(tiny_tokenizer, expected)
    result = fmt.format_rows([_row(0, messages)], tiny_tokenizer, FormatConfig(max_length=limit, overlong="truncate"))
    (out,) = result.rows
    assert out["truncated"] is True and result.truncated == 1
    assert out["messages"] == expected  # whole turns, oldest first; the final question is not cut
    assert out["n_tokens"] == limit == _length(tiny_tokenizer, out["messages"])
    _assert_answer_intact(tiny_tokenizer, out["messages"], ANSWER)


def test_truncate_cuts_the_final_user_message_from_the_left(tiny_tokenizer):
    question = " ".join(f"The app crashes when I open settings page {k}." for k in range(12))
    messages = _chat(2, final_user=question)
    limit = _length(tiny_tokenizer, [SYSTEM, messages[-2], messages[-1]]) - 30
    result = fmt.format_rows([_row(0, messages)], tiny_tokenizer,
                             FormatConfig(max_length=limit, overlong="truncate", output="prompt_completion"))
    (out,) = result.rows
    kept = out["messages"]
    assert len(kept) == 3 and out["n_tokens"] <= limit and out["truncated"]
    assert question.endswith(kept[1]["content"]) and len(kept[1]["content"]) < len(question)
    assert out["completion"] == ANSWER + "<|im_end|>\n"
    _assert_answer_intact(tiny_tokenizer, kept, ANSWER)


@pytest.mark.parametrize("messages", [
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER * 20}],  # answer too long
    [SYSTEM, {"role": "assistant", "content": ANSWER * 20}],  # no user message to cut
])
def test_truncate_quarantines_when_the_answer_alone_does_not_fit(tiny_tokenizer, messages):
    result = fmt.format_rows([_row(0, messages)], tiny_tokenizer, FormatConfig(max_length=40, overlong="truncate"))
    assert not result.rows and result.dropped == 1
    assert result.quarantine[0]["rule"] == "overlong" and "answer alone" in result.quarantine[0]["reason"]


def test_prompt_completion_strings_concatenate_to_the_full_text(tiny_tokenizer):
    rows = [_row(0, _chat(0)), _row(1, _chat(2))]
    result = fmt.format_rows(rows, tiny_tokenizer, FormatConfig(output="prompt_completion", max_length=4096))
    for row, out in zip(rows, result.rows, strict=True):
        assert out["prompt"] + out["completion"] == render(tiny_tokenizer, row["messages"])
        assert out["prompt"] == render_prompt(tiny_tokenizer, row["messages"])
        assert out["prompt"].endswith("<|im_start|>assistant\n") and out["completion"].startswith(ANSWER)
    plain = fmt.format_rows(rows, tiny_tokenizer, FormatConfig(output="messages", max_length=4096))
    assert "prompt" not in plain.rows[0] and "completion" not in plain.rows[0]


@pytest.fixture
def fresh_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rows_without_completion_tokens_are_quarantined(fresh_tokenizer):
    # A template that never renders assistant turns leaves nothing to train on.
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}"
    )
    result = fmt.format_rows([_row(0, _chat(0))], fresh_tokenizer, FormatConfig())
    assert not result.rows and result.quarantine[0]["rule"] == "no_completion"


def test_template_failures_and_invalid_rows_are_quarantined(fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tool_chat = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"},
                 {"role": "assistant", "content": "ok"}]
    no_answer = [{"role": "user", "content": "Hi"}]
    result = fmt.format_rows([_row(0, tool_chat), _row(1, no_answer), _row(2, _chat(0))], fresh_tokenizer,
                             FormatConfig())
    assert [r["id"] for r in result.rows] == ["0002"]
    assert [(q["rule"], q["line"]) for q in result.quarantine] == [("template", 1), ("invalid_conversation", 2)]
    assert "no tools here" in result.quarantine[0]["reason"]


def _formatted(**changes) -> dict:
    row = _row(0, _chat(0), n_tokens=30, n_completion_tokens=8, truncated=False)
    return {**row, **changes}


@pytest.mark.parametrize("bad", [
    {"n_completion_tokens": 31},  # more completion than total tokens
    {"n_tokens": 0, "n_completion_tokens": 0},
    {"messages": [{"role": "user", "content": "no answer"}]},
    {"truncated": "no"},
    {"line": 0},
])
def test_formatted_schema_rejects_bad_rows(bad):
    validate(FormattedSchema, [_formatted()])
    with pytest.raises(pandera.errors.SchemaErrors):
        validate(FormattedSchema, [_formatted(), _formatted(id="0001", **bad)])
    assert fmt._schema_problem([_formatted(**bad)]) is not None


def test_formatted_schema_rejects_duplicate_ids():
    with pytest.raises(pandera.errors.SchemaErrors):
        validate(FormattedSchema, [_formatted(), _formatted()])


def test_token_histogram_and_stats():
    import numpy as np

    values = np.array([1, 10, 100, 250, 256])
    hist = fmt.token_histogram(values, max_length=256, bins=4)
    assert hist == {"edges": [0, 64, 128, 192, 256], "counts": [2, 1, 0, 2]}
    stats = fmt.token_stats(values)
    assert (stats["min"], stats["p50"], stats["max"], stats["mean"]) == (1, 100.0, 256, 123.4)
    assert fmt.token_stats(np.array([], dtype=int))["max"] == 0


# ---------------------------------------------------------------------------------------------------- run()


def _project(tmp_path: Path, model_dir: Path, rows: list[dict], **format_overrides):
    overrides = tiny_overrides(model_dir)
    overrides["format"] = {**overrides["format"], **format_overrides}
    params = load_params(write_project(tmp_path, overrides))
    shutil.copytree(model_dir, params.path("base_model"))
    write_jsonl(params.path("cleaned") / "examples.jsonl", rows)
    return params


def _rows(n: int) -> list[dict]:
    return [_row(i, _chat(i % 3) if i % 5 else _chat(9)) for i in range(n)]


def test_run_writes_dataset_quarantine_and_report(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = _rows(10)
    for r in rows[7:]:  # rows of another file, e.g. replayed general data (data.replay)
        r["source"] = "pipelines/replay_general.jsonl"
    params = _project(tmp_path, tiny_model_dir, rows, max_length=160, output="prompt_completion")
    overlong = [r["id"] for r in rows if _length(tiny_tokenizer, r["messages"]) > 160]
    assert overlong, "the fixture must contain overlong rows"
    result = fmt.run(params)
    out = params.path("formatted")
    data = list(read_jsonl(out / "dataset.jsonl"))
    quarantine = list(read_jsonl(out / "quarantine.jsonl"))
    report = read_json(out / "report.json")
    assert [q["id"] for q in quarantine] == overlong and {q["rule"] for q in quarantine} == {"overlong"}
    assert len(data) + len(quarantine) == 10 and all(r["n_tokens"] <= 160 and "prompt" in r for r in data)
    assert report["rows_out"] == len(data) and report["overlong_dropped"] == len(overlong)
    assert report["tokens_total"] == sum(r["n_tokens"] for r in data)
    assert report["completion_tokens_total"] == sum(r["n_completion_tokens"] for r in data)
    assert report["n_tokens"]["max"] == max(r["n_tokens"] for r in data)
    hist = result.metrics["token_histogram"]
    assert hist == report["token_histogram"] and sum(hist["counts"]) == len(data)
    assert hist["edges"][0] == 0 and hist["edges"][-1] == 160
    by_source = {s: {"rows_in": sum(r["source"] == s for r in rows), "rows_out": sum(r["source"] == s for r in data),
                     "quarantined": sum(q["source"] == s for q in quarantine)}
                 for s in ("data/raw/x.jsonl", "pipelines/replay_general.jsonl")}
    assert report["per_source"] == by_source and by_source["data/raw/x.jsonl"]["quarantined"] > 0
    assert by_source["pipelines/replay_general.jsonl"]["rows_in"] == 3
    assert result.metrics["rows_out"] == len(data) and set(result.outputs) >= {"dataset.jsonl", "report.json"}


def test_run_with_a_worker_pool_matches_a_single_process(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_ROWS", 3)  # 14 rows -> 5 chunks, so the pool really runs
    params = _project(tmp_path, tiny_model_dir, _rows(14), overlong="truncate", max_length=160)
    out = params.path("formatted")
    fmt.run(params, workers=1)
    single = (out / "dataset.jsonl").read_bytes(), (out / "quarantine.jsonl").read_bytes()
    result = fmt.run(params, workers=2)
    assert ((out / "dataset.jsonl").read_bytes(), (out / "quarantine.jsonl").read_bytes()) == single
    assert result.metrics["truncated"] > 0 and result.metrics["rows_out"] == 14


def test_run_errors_name_the_missing_piece(tmp_path, tiny_model_dir, tiny_tokenizer):
    params = _project(tmp_path, tiny_model_dir, _rows(2))
    base = params.path("base_model")
    shutil.rmtree(base)
    with pytest.raises(StageError, match="fetch-model"):
        fmt.run(params)
    tiny_tokenizer.save_pretrained(base)
    for template in base.glob("chat_template*"):
        template.unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="no chat template"):
        fmt.run(params)
    (params.path("cleaned") / "examples.jsonl").unlink()
    with pytest.raises(StageError, match="clean"):
        fmt.run(params)
