"""Raw files as people leave them: symlinks, file names that are not UTF-8, CSV exports with other delimiters or
concatenated with their headers. Every file is read or reported by name, nothing raw leaks into the quarantine.

Handed cases 02 (a symlink to a file outside the project), 03 (a Latin-1 file name), 07 (a repeated CSV header
with a BOM) and 12 (a semicolon-delimited CSV) are the first parameters of the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import ingest
from pipelines.config import load_params
from pipelines.io import read_json, read_jsonl
from tests.conftest import REPO, write_project

GOOD = '{"prompt": "where is my parcel", "completion": "it ships today"}\n'
SECRET_LINES = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nalice@example.com:4111 1111 1111 1111\n"


def _project(tmp_path: Path, files: dict[str, str | bytes] | None = None, data: dict | None = None,
             clean: dict | None = None) -> Path:
    """A project whose data/raw holds `files` (bytes names allowed), plus one good JSONL file."""
    empty = tmp_path / "empty_raw"
    empty.mkdir(exist_ok=True)
    overrides = {"data": {"max_bad_fraction": 1.0, **(data or {})}, **({"clean": clean} if clean else {})}
    params_file = write_project(tmp_path / "proj", overrides, raw_from=empty)
    raw = params_file.parent / "data" / "raw"
    (raw / "good.jsonl").write_text(GOOD)
    for name, content in (files or {}).items():
        path = os.path.join(os.fsencode(raw), name if isinstance(name, bytes) else os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
    return params_file


def _ingest(params_file: Path):
    params = load_params(params_file)
    result = ingest.run(params)
    out = params.path("raw_examples")
    return result.metrics, list(read_jsonl(out / "examples.jsonl")), list(read_jsonl(out / "quarantine.jsonl"))


# ------------------------------------------------------------------------------------------------------- links


def test_a_link_to_a_file_outside_the_project_is_reported_not_read(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(SECRET_LINES)
    params_file = _project(tmp_path)
    raw = params_file.parent / "data" / "raw"
    (raw / "notes.jsonl").symlink_to(outside)
    (raw / "users.csv").symlink_to("/etc/passwd")
    metrics, rows, quarantine = _ingest(params_file)
    assert [r["source"] for r in rows] == ["data/raw/good.jsonl"] and quarantine == []
    assert metrics["files_skipped"] == 2
    assert f"data/raw/notes.jsonl: is a symlink to '{outside}', outside the project, so it was not read; copy the " \
           "file into the project, or set data.follow_links: true to read such links" in metrics["messages"]
    assert any(m.startswith("data/raw/users.csv: is a symlink to '/etc/passwd', outside") for m in metrics["messages"])
    out = load_params(params_file).path("raw_examples")
    for name in ("examples.jsonl", "quarantine.jsonl", "report.json"):
        text = (out / name).read_text()
        assert "wJalrXUtnFEMI" not in text and "alice@example.com" not in text and "root:x:0" not in text


def test_follow_links_reads_them_and_the_quarantine_is_redacted(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(SECRET_LINES + GOOD)
    params_file = _project(tmp_path, data={"follow_links": True})
    (params_file.parent / "data" / "raw" / "notes.jsonl").symlink_to(outside)
    metrics, rows, quarantine = _ingest(params_file)
    assert sorted(r["source"] for r in rows) == ["data/raw/good.jsonl", "data/raw/notes.jsonl"]
    assert [(q["line"], q["excerpt"]) for q in quarantine] == [
        (1, "AWS_SECRET_ACCESS_KEY=[SECRET]"), (2, "[EMAIL]:[CREDIT_CARD]")]  # redacted like the data


def test_links_inside_the_project_are_read_and_a_dangling_one_is_reported(tmp_path):
    params_file = _project(tmp_path)
    root, raw = params_file.parent, params_file.parent / "data" / "raw"
    (root / "shared_data" / "more").mkdir(parents=True)
    (root / "shared_data" / "more" / "b.jsonl").write_text(GOOD)
    (raw / "linked").symlink_to(root / "shared_data")  # a symlinked folder inside the project
    (raw / "loop").symlink_to(raw)  # a link back to the raw folder: walked once, no endless recursion
    (raw / "gone.jsonl").symlink_to(root / "deleted.jsonl")
    os.mkfifo(raw / "pipe.jsonl")  # reading it would block forever
    metrics, rows, _ = _ingest(params_file)
    assert sorted(r["source"] for r in rows) == ["data/raw/good.jsonl", "data/raw/linked/more/b.jsonl"]
    assert "data/raw/gone.jsonl: is a symlink to '" + str(root / "deleted.jsonl") + "', which does not exist (or is " \
           "a loop of links); fix or remove the link" in metrics["messages"]
    assert "data/raw/pipe.jsonl: is not a regular file (a pipe, socket or device), so it was not read" in \
           metrics["messages"]
    assert metrics["files_skipped"] == 2


def test_a_link_loop_and_a_link_with_a_latin1_target_are_reported(tmp_path):
    params_file = _project(tmp_path)
    raw = params_file.parent / "data" / "raw"
    (raw / "a.jsonl").symlink_to(raw / "b.jsonl")
    (raw / "b.jsonl").symlink_to(raw / "a.jsonl")
    os.symlink(b"/nowhere/caf\xe9.jsonl", os.fsencode(raw / "c.jsonl"))
    metrics, rows, _ = _ingest(params_file)
    assert [r["source"] for r in rows] == ["data/raw/good.jsonl"] and metrics["files_skipped"] == 3
    assert "data/raw/c.jsonl: is a symlink to '/nowhere/caf\\xe9.jsonl', which does not exist (or is a loop of " \
           "links); fix or remove the link" in metrics["messages"]
    assert sum("a loop of links" in m for m in metrics["messages"]) == 3


@pytest.mark.parametrize("redact", [True, False])
def test_quarantine_excerpts_and_reasons_are_redacted_as_the_data_is(tmp_path, redact):
    files = {"bad.jsonl": "bob@example.com called +1 (415) 555-0132 {\n",
             "keys.csv": "bob@example.com,question\nx,y\n"}  # the header (an email) is quoted by the reason
    params_file = _project(tmp_path, files, clean={"redact_pii": redact})
    _, _, quarantine = _ingest(params_file)
    text = json.dumps(quarantine)
    assert ("bob@example.com" in text) is not redact and ("[EMAIL]" in text) is redact
    by_source = {q["source"]: q for q in quarantine}
    assert by_source["data/raw/bad.jsonl"]["excerpt"] == \
        ("[EMAIL] called [PHONE] {" if redact else "bob@example.com called +1 (415) 555-0132 {")
    assert ("[EMAIL]" in by_source["data/raw/keys.csv"]["reason"]) is redact


# ------------------------------------------------------------------------------------------- file names, bytes


@pytest.mark.parametrize(("name", "source"), [
    (b"caf\xe9.jsonl", "data/raw/caf\\xe9.jsonl"),  # Latin-1, as unzip leaves names from old archives
    (b"\xff\xfe/x.jsonl", "data/raw/\\xff\\xfe/x.jsonl"),  # a folder name that is not UTF-8
    ("café ünïcode.jsonl", "data/raw/café ünïcode.jsonl"),  # valid UTF-8 stays as it is
])
def test_a_file_name_that_is_not_utf8_is_read_by_its_escaped_name(tmp_path, name, source):
    params_file = _project(tmp_path, {name: '{"prompt": "q", "completion": "a"}\n'})
    metrics, rows, _ = _ingest(params_file)
    assert sorted(r["source"] for r in rows) == sorted(["data/raw/good.jsonl", source])
    assert len({r["id"] for r in rows}) == 2
    escaped = "\\x" in source
    assert any(m == f"{source}: the file name is not valid UTF-8, so it is recorded with the undecodable bytes "
               "escaped; rename the file to a UTF-8 name" for m in metrics["messages"]) is escaped
    report = (load_params(params_file).path("raw_examples") / "report.json").read_bytes()
    report.decode("utf-8")  # valid UTF-8 on disk


def test_the_cli_reads_a_latin1_name_without_a_traceback(tmp_path):
    """Handed case 03 through the CLI, then the clean stage on its rows."""
    params_file = _project(tmp_path, {b"caf\xe9.jsonl": '{"prompt": "a question", "completion": "an answer"}\n'})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for stage in ("ingest", "clean"):
        run = subprocess.run([sys.executable, "-m", "pipelines", stage, "--params", str(params_file)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert "rows_out=2" in run.stdout


@pytest.mark.parametrize(("name", "reason"), [
    ("notes.tsv", "unknown extension '.tsv'"),  # the verifier's case: files_skipped stayed 0
    ("old/.draft.jsonl", "hidden file, skipped"),
    ("README", "unknown extension ''"),
])
def test_every_file_not_read_counts_as_skipped_with_its_reason(tmp_path, name, reason):
    metrics, rows, _ = _ingest(_project(tmp_path, {name: GOOD}))
    source = f"data/raw/{name}"
    assert [r["source"] for r in rows] == ["data/raw/good.jsonl"]
    assert metrics["files_skipped"] == 1 and metrics["skipped_files"] == [{"source": source, "reason": reason}]
    assert sorted((f["source"], f["skipped"]) for f in metrics["per_file"]) == sorted([
        ("data/raw/good.jsonl", None), (source, reason)])
    report = read_json(load_params(_project(tmp_path)).path("raw_examples") / "report.json")
    assert report["files_skipped"] == 1 and report["skipped_files"] == metrics["skipped_files"]


def test_the_cli_prints_every_file_note_not_only_the_report(tmp_path):
    """The notes went only to report.json; the command line printed the summary line alone."""
    params_file = _project(tmp_path, {"rows.jsonl": "[" + GOOD.strip() + "]\n", "notes.tsv": "a\tb\n"})
    run = subprocess.run([sys.executable, "-m", "pipelines", "ingest", "--params", str(params_file)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "WARNING data/raw/rows.jsonl: holds a JSON array, not JSON Lines; it was read as JSON (rename it to " \
           ".json)" in run.stderr
    assert "WARNING data/raw/notes.tsv: unknown extension '.tsv', skipped; supported: " in run.stderr
    assert "rows_out=2" in run.stdout and "files_skipped=1" in run.stdout


# -------------------------------------------------------------------------------------------------------- CSV


@pytest.mark.parametrize(("text", "delimiter", "name"), [
    ("instruction;input;output\nsemicolon question one;;semicolon answer one\n"
     "semicolon question two;;answer, with comma\n", ";", "semicolon"),  # handed case 12 (Excel, many locales)
    ("instruction\tinput\toutput\ntab question one\t\ttab answer one\ntab question two\t\tanswer, with comma\n",
     "\t", "tab"),
    ("instruction|input|output\r\npipe question one||pipe answer one\r\npipe question two||\"a | b\"\r\n", "|", "pipe"),
])
def test_a_csv_with_another_delimiter_is_sniffed_and_said(tmp_path, text, delimiter, name):
    metrics, rows, quarantine = _ingest(_project(tmp_path, {"export.csv": text}))
    csv_rows = [r for r in rows if r["source"] == "data/raw/export.csv"]
    assert quarantine == [] and len(csv_rows) == 2
    assert csv_rows[0]["messages"][0]["content"].endswith("question one")
    assert csv_rows[1]["messages"][1]["content"] in ("answer, with comma", "a | b")
    assert f"data/raw/export.csv: is {name}-delimited (its header line has no comma), so it was read with " \
           f"{delimiter!r} as the delimiter" in metrics["messages"]


def test_a_comma_csv_with_semicolons_in_its_text_stays_comma_delimited(tmp_path):
    text = "instruction,output\nfirst; second; third,yes; no\n"
    metrics, rows, _ = _ingest(_project(tmp_path, {"a.csv": text}))
    [row] = [r for r in rows if r["source"] == "data/raw/a.csv"]
    assert [m["content"] for m in row["messages"]] == ["first; second; third", "yes; no"]
    assert not any("delimited" in m for m in metrics["messages"])


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(("content", "repeated_at"), [
    (BOM + b"instruction,input,output\r\nfirst csv question,,first csv answer\r\n" + BOM +
     b"instruction,input,output\r\nsecond csv question,,second csv answer\r\n", [3]),  # handed case 07
    (b"instruction,input,output\nq1,,a1\ninstruction,input,output\nq2,,a2\ninstruction,input,output\nq3,,a3\n",
     [3, 5]),
    (b"instruction,input,output\nq1,,a1\n output , instruction,input\nq2,,a2\n", [3]),  # reordered, spaced
    (b"instruction,input,output\nq1,,a1\n Instruction , Input , Output \nq2,,a2\n", [3]),  # case and spaces
    (b"instruction,input,output\nq1,,a1\nInstruction,Input,Output\nq2,,a2\nINSTRUCTION,INPUT,OUTPUT\nq3,,a3\n",
     [3, 5]),
    (BOM + b"instruction\toutput\nq1\ta1\n" + BOM + b"\tInstruction\t\t Output\t\nq2\ta2\n", [3]),  # empty cells
    (b"instruction\toutput\nq1\ta1\n" + BOM + b" INSTRUCTION \t Output\nq2\ta2\n", [3]),  # tab-delimited
])
def test_a_repeated_header_is_quarantined_not_trained(tmp_path, content, repeated_at):
    metrics, rows, quarantine = _ingest(_project(tmp_path, {"all.csv": content}))
    csv_rows = [r for r in rows if r["source"] == "data/raw/all.csv"]
    assert all("instruction" not in m["content"].casefold() for r in csv_rows for m in r["messages"])
    assert len(csv_rows) == len(repeated_at) + 1
    assert [(q["line"], q["rule"]) for q in quarantine] == [(n, "repeated_header") for n in repeated_at]
    assert metrics["rules"] == {"repeated_header": len(repeated_at)}
    assert metrics["malformed"] == 0 and metrics["bad_fraction"] == 0.0  # a header is not a broken row
    assert any(m.startswith(f"data/raw/all.csv: repeats its header line at line {repeated_at[0]}")
               for m in metrics["messages"])


def test_a_row_that_only_mentions_header_words_is_kept(tmp_path):
    _, rows, quarantine = _ingest(_project(tmp_path, {"a.csv": "instruction,output\ninstruction,output please\n"}))
    assert quarantine == [] and len(rows) == 2


def test_all_rows_quarantined_says_so_not_no_data_files(tmp_path):
    params_file = _project(tmp_path, {"a.jsonl": "{bad\n"})
    (params_file.parent / "data" / "raw" / "good.jsonl").unlink()
    params = load_params(params_file)
    with pytest.raises(ingest.StageError,
                       match=r"1 rows read, 1 quarantined.*\): every row was quarantined \(malformed_json: 1\); add"):
        ingest.run(params)
    assert read_json(params.path("raw_examples") / "report.json")["status"] == "failed"


# ------------------------------------------------------------------------------------------ field names' case


@pytest.mark.parametrize(("name", "content", "answers"), [
    ("sheet.csv", b"Instruction,Input,Output\nq1,,a1\nq2,extra,a2\n", ["a1", "a2"]),  # a spreadsheet's header
    ("sheet2.csv", b" PROMPT ; Completion \nq1;a1\n", ["a1"]),  # spaces, semicolons
    ("msgs.csv", b'Messages\n"[{""role"": ""user"", ""content"": ""q1""}, {""role"": ""assistant"", ""content"": '
                 b'""a1""}]"\n', ["a1"]),  # a JSON column whose header is capitalised is still parsed
    ("rows.jsonl", b'{"Prompt": "q1", "Response": "a1"}\n{"prompt": "q2", "response": "a2"}\n', ["a1", "a2"]),
])
def test_field_names_in_another_case_are_read_as_the_standard_name(tmp_path, name, content, answers):
    metrics, rows, quarantine = _ingest(_project(tmp_path, {name: content}))
    got = [r["messages"][-1]["content"] for r in rows if r["source"] == f"data/raw/{name}"]
    assert got == answers and quarantine == []
    assert any(m.startswith(f"data/raw/{name}: names fields in another case or with spaces; read ")
               for m in metrics["messages"]), metrics["messages"]


def test_two_names_for_one_field_are_left_as_they_are(tmp_path):
    """{"Output", "output"} or {"Prompt", " prompt "}: no way to know which is meant, so nothing is renamed."""
    assert ingest.standard_keys({"Output": "a", "output": "b"}) == ({"Output": "a", "output": "b"}, [])
    assert ingest.standard_keys({"Prompt": "a", " prompt ": "b", "completion": "c"})[1] == []
    assert ingest.standard_keys({"Ticket": 1, "Prompt": "q"}) == ({"Ticket": 1, "prompt": "q"}, [("Prompt", "prompt")])
    metrics, rows, quarantine = _ingest(_project(tmp_path, {"x.jsonl": '{"Output": "a", "output": "b"}\n'}))
    assert [q["rule"] for q in quarantine] == ["unknown_format"]
