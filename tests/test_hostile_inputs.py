"""Hostile raw files: every one yields quarantined rows with file:line and reason, or one clear sentence
for the whole file; no exception escapes; the good rows beside the bad ones are all kept.

Each case is one file built in tmp_path; every case folder also holds `zz_good.jsonl` (one good row),
so even a file with nothing usable leaves the stage with something to keep.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines import ingest
from pipelines.config import load_params
from pipelines.io import StageError, read_json, read_jsonl
from tests.conftest import write_project

MB = 1_000_000


def row(q: str = "question", a: str = "answer", **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


GOOD = j(row())
BOM = b"\xef\xbb\xbf"
CSV_HEAD = b"instruction,input,output\n"


def msgs(*turns) -> bytes:
    return j({"messages": [{"role": r, "content": c} for r, c in turns]})


@dataclass
class Case:
    name: str
    file: str
    content: bytes
    good: int  # rows of this file that must be kept
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, rule) of every quarantined row
    message: str | None = None  # a sentence about the whole file must contain this


CASES = [
    # --- JSON Lines: broken lines -------------------------------------------------------------
    Case("truncated_json", "a.jsonl", GOOD + b'{"messages": [{"role": "user", "cont\n' + GOOD, 2,
         [(2, "malformed_json")]),
    Case("python_dict_repr", "a.jsonl", GOOD + b"{'prompt': 'p', 'completion': 'c'}\n", 1, [(2, "malformed_json")]),
    Case("trailing_garbage", "a.jsonl", GOOD + GOOD.rstrip() + b" xyz\n", 1, [(2, "malformed_json")]),
    Case("invalid_utf8_line", "a.jsonl", GOOD + b'{"prompt": "\xff\xfe", "completion": "c"}\n' + GOOD, 2,
         [(2, "invalid_utf8")]),
    Case("latin1_text", "a.jsonl", b'{"prompt": "caf\xe9", "completion": "c"}\n' + GOOD, 1, [(1, "invalid_utf8")]),
    Case("lone_surrogate_escape", "a.jsonl", GOOD + b'{"prompt": "x\\ud800y", "completion": "c"}\n', 1,
         [(2, "invalid_utf8")]),
    Case("bom_first_line", "a.jsonl", BOM + GOOD + GOOD, 2),
    Case("bom_every_line", "a.jsonl", BOM + GOOD + BOM + GOOD, 2),
    Case("crlf", "a.jsonl", GOOD.replace(b"\n", b"\r\n") * 3, 3),
    Case("blank_and_whitespace_lines", "a.jsonl", b"\n  \n" + GOOD + b"\t\r\n\n" + GOOD, 2),
    Case("no_final_newline", "a.jsonl", GOOD + GOOD.rstrip(), 2),
    Case("nul_inside_line", "a.jsonl", GOOD + b'{"prompt": "a\x00b", "completion": "c"}\n' + GOOD, 2,
         [(2, "malformed_json")]),
    Case("nul_only_line", "a.jsonl", b"\x00\x00\x00\x00\n" + GOOD, 1, [(1, "malformed_json")]),
    Case("escaped_nul_in_text", "a.jsonl", b'{"prompt": "a\\u0000b", "completion": "c"}\n' + GOOD, 1,
         [(1, "invalid_row")]),
    Case("ten_mb_line", "a.jsonl", GOOD + b'{"prompt": "' + b"x" * (10 * MB) + b'", "completion": "c"}\n' + GOOD, 2,
         [(2, "line_too_long")]),
    Case("ten_mb_last_line_no_newline", "a.jsonl", GOOD + b"y" * (10 * MB), 1, [(2, "line_too_long")]),
    Case("deeply_nested_line", "a.jsonl", GOOD + b"[" * 200_000 + b"\n" + GOOD, 2, [(2, "too_deep")]),
    Case("deeply_nested_field", "a.jsonl",
         b'{"prompt": "p", "completion": "c", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + GOOD, 1,
         [(1, "too_deep")]),
    Case("nan_in_meta", "a.jsonl", b'{"prompt": "p", "completion": "c", "score": NaN}\n', 1),
    # --- JSON Lines: wrong types and shapes -----------------------------------------------------
    Case("messages_is_string", "a.jsonl", j({"messages": "hello"}) + GOOD, 1, [(1, "invalid_row")]),
    Case("messages_is_null", "a.jsonl", j({"messages": None}) + GOOD, 1, [(1, "invalid_row")]),
    Case("content_is_number", "a.jsonl", GOOD + msgs(("user", 42), ("assistant", "a")), 2),  # read as "42"
    Case("content_is_null", "a.jsonl", msgs(("user", "q"), ("assistant", None)) + GOOD, 1,
         [(1, "invalid_conversation")]),  # a missing answer is an empty message
    Case("content_is_object", "a.jsonl", msgs(("user", {"text": "q"}), ("assistant", "a")) + GOOD, 1,
         [(1, "invalid_row")]),
    Case("message_is_string", "a.jsonl", j({"messages": ["hi", "there"]}) + GOOD, 1, [(1, "invalid_row")]),
    Case("empty_role", "a.jsonl", msgs(("", "q"), ("assistant", "a")) + GOOD, 1, [(1, "invalid_row")]),
    Case("missing_role", "a.jsonl", j({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}), 0,
         [(1, "invalid_row")]),
    Case("wrong_role", "a.jsonl", GOOD + msgs(("customer", "q"), ("agent", "a")), 1, [(2, "invalid_row")]),
    Case("role_is_list", "a.jsonl", msgs((["user"], "q"), ("assistant", "a")) + GOOD, 1, [(1, "invalid_row")]),
    Case("empty_strings", "a.jsonl", msgs(("user", ""), ("assistant", "")) + GOOD, 1, [(1, "invalid_conversation")]),
    Case("whitespace_answer", "a.jsonl", msgs(("user", "q"), ("assistant", " \n\t")) + GOOD, 1,
         [(1, "invalid_conversation")]),
    Case("empty_messages_list", "a.jsonl", j({"messages": []}) + GOOD, 1, [(1, "invalid_conversation")]),
    Case("opens_with_assistant_greeting", "a.jsonl",
         msgs(("assistant", "hello"), ("user", "q"), ("assistant", "a")) + GOOD, 2),  # the format stage decides
    Case("system_in_the_middle", "a.jsonl", msgs(("user", "q"), ("system", "s"), ("assistant", "a")) + GOOD, 1,
         [(1, "invalid_conversation")]),
    Case("tool_without_call", "a.jsonl", msgs(("user", "q"), ("tool", "{}"), ("assistant", "a")) + GOOD, 1,
         [(1, "invalid_conversation")]),
    Case("ends_on_user", "a.jsonl", GOOD + msgs(("user", "q"), ("assistant", "a"), ("user", "and?")), 2),  # trimmed
    Case("only_user", "a.jsonl", msgs(("user", "q")) + GOOD, 1, [(1, "invalid_conversation")]),
    Case("top_level_array", "a.jsonl", b"[1, 2, 3]\n" + GOOD, 1, [(1, "invalid_row")]),
    Case("top_level_string", "a.jsonl", b'"just text"\n' + GOOD, 1, [(1, "invalid_row")]),
    Case("top_level_null", "a.jsonl", b"null\n" + GOOD, 1, [(1, "invalid_row")]),
    Case("unknown_keys", "a.jsonl", j({"text": "plain pretraining text"}) + GOOD, 1, [(1, "unknown_format")]),
    Case("image_content_part", "a.jsonl",
         j({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                         {"role": "assistant", "content": "a"}]}) + GOOD, 1, [(1, "invalid_row")]),
    Case("alpaca_wrong_types", "a.jsonl", j({"instruction": ["q"], "input": 3, "output": "a"}) + GOOD, 1,
         [(1, "invalid_row")]),
    Case("sharegpt_unknown_speaker", "a.jsonl",
         j({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}) + GOOD, 1,
         [(1, "invalid_row")]),
    Case("sharegpt_tools_not_json", "a.jsonl",
         j({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{oops"}),
         0, [(1, "invalid_row")]),
    Case("duplicate_keys_last_wins", "a.jsonl", b'{"messages": [], "messages": "x"}\n' + GOOD, 1,
         [(1, "invalid_row")]),
    Case("preference_pair_mixed_in", "a.jsonl",
         GOOD + j({"prompt": "p", "chosen": "c", "rejected": "r"}), 1, [(2, "preference_pair")],
         "are read by the preference-data stage"),
    Case("kto_label_false", "a.jsonl", j(row(label=False)) + j(row(label=True)), 1, [(1, "undesirable_example")],
         "labelled false"),
    # --- whole files that cannot be read -------------------------------------------------------
    Case("empty_file", "a.jsonl", b"", 0, message="file is empty"),
    Case("only_blank_lines", "a.jsonl", b"\n\n  \n", 0, message="no rows found"),
    Case("unknown_extension", "a.txt", GOOD, 0, message="unknown extension '.txt'"),
    Case("hidden_file", ".gitkeep", b"", 0, message="hidden file, skipped"),
    Case("gzip_named_jsonl", "a.jsonl", gzip.compress(GOOD, mtime=0), 0, [(1, "unreadable_file")],
         "is gzip-compressed"),
    Case("utf16_jsonl", "a.jsonl", GOOD.decode().encode("utf-16"), 0, [(1, "unreadable_file")], "UTF-16"),
    Case("uppercase_extension", "A.JSONL", GOOD, 1),
    Case("nested_folder", "sub/dir/a.jsonl", GOOD, 1),
    # --- JSON arrays ---------------------------------------------------------------------------
    Case("json_array", "a.json", json.dumps([row(), row()], indent=2).encode(), 2),
    Case("json_single_object", "a.json", json.dumps(row(), indent=2).encode(), 1),
    Case("jsonl_named_json", "a.json", GOOD * 3, 3, message="read as JSON Lines"),
    Case("jsonl_named_json_with_bad_line", "a.json", GOOD + b"{oops\n" + GOOD, 2, [(2, "malformed_json")],
         "read as JSON Lines"),
    Case("json_trailing_comma", "a.json", b"[" + GOOD + b"," + GOOD + b",]", 2),
    Case("json_truncated_mid_record", "a.json", b"[\n" + GOOD + b",\n" + GOOD + b',\n{"messages": [{"ro', 2,
         [(3, "malformed_json")], "the 2 records before it were read"),
    Case("json_missing_closing_bracket", "a.json", b"[" + GOOD + b"," + GOOD, 2, message="ends before the closing"),
    Case("json_missing_comma", "a.json", b"[" + GOOD + GOOD + b"]", 1, [(2, "malformed_json")],
         "where , or ] belongs"),
    Case("json_not_json_at_all", "a.json", b"this is not json, it is prose", 0, [(1, "unreadable_file")],
         "is not a JSON array or object"),
    Case("json_broken_object", "a.json", b'{"messages": [1, 2', 0, [(1, "malformed_json")], "is not valid JSON at"),
    Case("json_top_level_number", "a.json", b"42", 0, [(1, "unreadable_file")], "is not a JSON array or object"),
    Case("json_array_of_scalars", "a.json", b'[1, "two", null, ' + GOOD + b"]", 1,
         [(1, "invalid_row"), (2, "invalid_row"), (3, "invalid_row")]),
    Case("json_empty_array", "a.json", b"[]", 0, message="no rows found"),
    Case("json_whitespace_only", "a.json", b"  \n\t ", 0, message="is empty"),
    Case("json_deeply_nested", "a.json", b"[" * 200_000, 0, [(1, "too_deep")], "nested deeper"),
    Case("json_invalid_utf8_in_one_record", "a.json",
         b'[{"prompt": "ok", "completion": "c"}, {"prompt": "\xff", "completion": "c"}]', 1, [(2, "invalid_utf8")]),
    Case("json_bom_crlf", "a.json", BOM + json.dumps([row()], indent=1).replace("\n", "\r\n").encode(), 1),
    Case("json_utf16", "a.json", json.dumps([row()]).encode("utf-16"), 0, [(1, "unreadable_file")], "UTF-16"),
    Case("json_extra_after_array", "a.json", b"[" + GOOD + b"] [1]", 1, message="extra content after"),
    # --- CSV -----------------------------------------------------------------------------------
    Case("csv_embedded_newlines", "a.csv", CSV_HEAD + b'"line one\nline two\nline three",,a\nq,,a\n', 2),
    Case("csv_wrong_field_count", "a.csv", CSV_HEAD + b"q,,a\nq,a\nq,,a,extra\nq,,a\n", 2,
         [(3, "malformed_csv"), (4, "malformed_csv")]),
    Case("csv_unclosed_quote", "a.csv", CSV_HEAD + b'q,,a\n"never closed,,a\nq,,a\n', 1, [(3, "malformed_csv")]),
    Case("csv_bom_crlf", "a.csv", BOM + CSV_HEAD.replace(b"\n", b"\r\n") + b"q,,a\r\nq2,,a2\r\n", 2),
    Case("csv_invalid_utf8_cell", "a.csv", CSV_HEAD + b"q\xff,,a\nq,,a\n", 1, [(2, "invalid_utf8")]),
    Case("csv_nul_byte", "a.csv", CSV_HEAD + b"q\x00,,a\nq,,a\n", 1, [(2, "invalid_row")]),
    Case("csv_ten_mb_line", "a.csv", CSV_HEAD + b"q,," + b"a" * (10 * MB) + b"\nq,,a\n", 1, [(2, "line_too_long")]),
    Case("csv_header_only", "a.csv", CSV_HEAD, 0, message="no rows found"),
    Case("csv_missing_columns", "a.csv", b"question,answer\nq,a\n", 0, [(2, "unknown_format")]),
    Case("csv_empty_output", "a.csv", CSV_HEAD + b"q,,\nq,,a\n", 1, [(2, "invalid_conversation")]),
    # --- Parquet -------------------------------------------------------------------------------
    Case("parquet_garbage", "a.parquet", b"PAR1 this is not really parquet", 0, [(1, "unreadable_file")],
         "could not be read as Parquet"),
    Case("parquet_named_jsonl", "a.jsonl", b"PAR1\x00\x00", 0, [(1, "unreadable_file")], "give it the .parquet"),
]


def run_folder(tmp_path: Path, files: dict[str, bytes], **data):
    raw = tmp_path / "raw_in"
    for name, content in files.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(content)
    params = load_params(write_project(tmp_path / "proj", {"data": data}, raw_from=raw))
    result = ingest.run(params)
    out = params.path("raw_examples")
    return result, list(read_jsonl(out / "examples.jsonl")), list(read_jsonl(out / "quarantine.jsonl")), out


def test_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_file(tmp_path, case: Case):
    result, kept, quarantine, out = run_folder(
        tmp_path, {case.file: case.content, "zz_good.jsonl": GOOD}, max_bad_fraction=1.0)
    source = f"data/raw/{case.file}"
    assert sum(r["source"] == source for r in kept) == case.good
    assert sum(r["source"] == "data/raw/zz_good.jsonl" for r in kept) == 1
    mine = [q for q in quarantine if q["source"] == source]
    assert sorted((q["line"], q["rule"]) for q in mine) == sorted(case.bad)
    for q in mine:
        assert q["stage"] == "ingest" and q["reason"] and len(q["excerpt"]) <= 200
    file_messages = [m for m in result.metrics["messages"] if m.startswith(source + ":")]
    if case.message:
        assert len(file_messages) == 1 and case.message in file_messages[0], file_messages
    assert result.metrics["rows_out"] == case.good + 1
    assert result.metrics["rows_in"] == case.good + 1 + len(case.bad)
    assert read_json(out / "report.json")["status"] == "ok"


def test_all_hostile_files_together_keep_every_good_row(tmp_path):
    files = {f"{c.name}/{c.file}": c.content for c in CASES if "ten_mb" not in c.name}
    result, kept, quarantine, _ = run_folder(tmp_path, files, max_bad_fraction=1.0)
    expected_good = sum(c.good for c in CASES if f"{c.name}/{c.file}" in files)
    assert len(kept) == expected_good
    assert len(quarantine) == sum(len(c.bad) for c in CASES if f"{c.name}/{c.file}" in files)
    assert len({r["id"] for r in kept}) == len(kept)
    # With the default 5% threshold the same folder fails, with one sentence that says where to look.
    with pytest.raises(StageError, match=r"rows \(\d+\.\d%\) are malformed.*quarantine.jsonl"):
        run_folder(tmp_path / "strict", files)


def test_huge_but_valid_file_is_streamed_completely(tmp_path):
    lines = b"".join(j(row(f"question {i}", f"answer {i}", n=i)) for i in range(20_000))
    big_line = j(row("q" * 900_000, "a"))  # just under data.max_line_bytes: kept, not truncated
    result, kept, quarantine, _ = run_folder(tmp_path, {"big.jsonl": lines + big_line})
    assert len(kept) == 20_001 and quarantine == []
    assert kept[19_999]["meta"] == {"n": 19_999} and kept[19_999]["line"] == 20_000
    assert len(kept[-1]["messages"][0]["content"]) == 900_000


def test_line_limit_is_configurable(tmp_path):
    content = GOOD + j(row("x" * 500)) + GOOD
    _, kept, quarantine, _ = run_folder(tmp_path, {"a.jsonl": content}, max_line_bytes=200, max_bad_fraction=0.5)
    assert len(kept) == 2
    assert [(q["line"], q["rule"]) for q in quarantine] == [(2, "line_too_long")]
    assert "max_line_bytes = 200" in quarantine[0]["reason"]


def test_csv_record_line_is_its_first_line(tmp_path):
    content = CSV_HEAD + b'"a\nb\nc",,x\n"d\ne",,y\nf,,z\n'
    _, kept, _, _ = run_folder(tmp_path, {"a.csv": content})
    assert [(r["line"], r["messages"][0]["content"]) for r in kept] == [(2, "a\nb\nc"), (5, "d\ne"), (7, "f")]


def test_io_error_mid_file_keeps_what_was_read(tmp_path, monkeypatch):
    def flaky_reader(path, limit, notes):
        yield ingest.Record(1, row())
        raise OSError(5, "Input/output error")

    monkeypatch.setitem(ingest.READERS, ".jsonl", flaky_reader)
    result, kept, _, _ = run_folder(tmp_path, {"a.jsonl": GOOD * 3})
    assert len(kept) == 1
    assert result.metrics["messages"] == ["data/raw/a.jsonl: could not be read after 1 row (Input/output error); "
                                          "check the file"]
