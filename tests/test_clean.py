"""Clean stage: each text rule on tiny literals, then clean() and run() end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipelines.clean import (
    RULES,
    clean,
    normalize_unicode,
    normalize_whitespace,
    remove_control_chars,
    run,
    strip_html,
)
from pipelines.config import CleanConfig, load_params
from pipelines.io import MARKER, StageError
from tests.conftest import write_project


@pytest.mark.parametrize(
    ("form", "text", "expected"),
    [
        ("NFKC", "ＡＢＣ１２３", "ABC123"),  # full-width letters and digits
        ("NFKC", "ﬁle", "file"),  # ligature
        ("NFKC", "a\u00a0b", "a b"),  # no-break space
        ("NFKC", "e\u0301", "é"),  # combining accent composed
        ("NFC", "ＡＢＣ", "ＡＢＣ"),  # NFC keeps compatibility characters
        ("NFC", "e\u0301", "é"),
        ("none", "ＡＢＣ", "ＡＢＣ"),
    ],
)
def test_normalize_unicode(form, text, expected):
    assert normalize_unicode(text, form) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("zero\u200bwidth", "zerowidth"),
        ("\ufeffBOM at start", "BOM at start"),
        ("bell\x07 null\x00 del\x7f", "bell null del"),
        ("soft\u00adhyphen", "softhyphen"),
        ("bidi\u202eoverride\u202c", "bidioverride"),
        ("line1\r\nline2\rline3", "line1\nline2\nline3"),
        ("keep\ttab\nand newline", "keep\ttab\nand newline"),
        ("stray\u200djoiner", "strayjoiner"),
        ("family \U0001f468\u200d\U0001f469\u200d\U0001f467", "family \U0001f468\u200d\U0001f469\u200d\U0001f467"),
        *[(t, t) for t in ["Persian \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]],  # ZWNJ kept
        ("plain text", "plain text"),
    ],
)
def test_remove_control_chars(text, expected):
    assert remove_control_chars(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<b>bold</b> and <i>italic</i>", "bold and italic"),
        ('<a href="https://x.org/a?b=1">link</a>', "link"),
        ("<p>one</p><p>two</p>", "\none\n\ntwo\n"),
        ("first<br>\nsecond", "first\nsecond"),
        ("first<br/>second", "first\nsecond"),
        ('<img src="x.png" alt="x"/>caption', "caption"),
        ('<input type="checkbox" checked> done', " done"),
        ("<script>alert(1)</script>safe<style>p{}</style>", "safe"),
        ("<!-- note -->text<!DOCTYPE html>", "text"),
        ("&amp; &lt;tag&gt; &#39;q&#39; &#x41; &nbsp;", "& <tag> 'q' A \u00a0"),
        ("a < b and c > d", "a < b and c > d"),
        ("if a<b and c>d then", "if a<b and c>d then"),
        ("std::vector<int> v; List<String> xs; Map<K, V>", "std::vector<int> v; List<String> xs; Map<K, V>"),
        ('{"html": false, "tags": ["p", "b"], "cmp": "x<y"}', '{"html": false, "tags": ["p", "b"], "cmp": "x<y"}'),
        ("AT&T and ?a=1&copy=2", "AT&T and ?a=1&copy=2"),
        ("use `<div>` in HTML", "use `<div>` in HTML"),
        ("```html\n<p>kept &amp; code</p>\n```\n<b>x</b>", "```html\n<p>kept &amp; code</p>\n```\nx"),
        ("<notatag>text</notatag>", "<notatag>text</notatag>"),
        ("a<!-- never closed", "a<!-- never closed"),
        ("<script>never closed", "<script>never closed"),
        ("<STYLE type='text/css'>p {}</Style>kept", "kept"),
    ],
)
def test_strip_html(text, expected):
    assert strip_html(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a   b    c", "a b c"),
        ("  trimmed  ", "trimmed"),
        ("trailing   \nnext", "trailing\nnext"),
        ("a\n\n\n\n\nb", "a\n\nb"),
        ("a\n \n \nb", "a\n\nb"),
        ("def f():\n    return  1", "def f():\n    return 1"),  # indentation kept, inner run collapsed
        ("no\u00a0break\u2003em", "no break em"),
        ("```\nx  =   1\n\n\n\ny\n```", "```\nx  =   1\n\n\n\ny\n```"),  # code blocks untouched
        ("say `a   b`  now", "say `a   b` now"),
        ("single\ttab", "single\ttab"),
    ],
)
def test_normalize_whitespace(text, expected):
    assert normalize_whitespace(text) == expected


# ------------------------------------------------------------------------------------ clean() end to end

SYSTEM = {"role": "system", "content": "You triage tickets."}
LONG = ("the parcel has not arrived and tracking has not updated since monday so please check with the courier "
        "and tell me when it will be delivered to my address because i need it for a birthday on friday")


def row(i: int, user: str, assistant: str = "Noted, we will look into it.", **extra) -> dict:
    return {"id": f"{i:04x}", "source": "data/raw/t.jsonl", "line": i, "format": "messages",
            "messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "tools": None, "meta": {}, **extra}


def edit_word(text: str, position: int, new: str = "changed") -> str:
    words = text.split()
    words[position] = new
    return " ".join(words)


ROWS = [
    row(1, "<p>Hello,<br>\nmy email is bob@example.com</p>"),  # html + pii
    row(2, "Hello,\nmy  email is  bob@example.com"),  # same text after cleaning: exact duplicate of 1
    row(3, "ＩＤ　ｏｋ\u200b please"),  # unicode + control chars
    row(4, LONG),
    row(5, edit_word(LONG, 20)),  # near duplicate of 4
    row(6, "where is my order", assistant="  "),  # empty answer after trimming: too short
    row(7, "x" * 300),  # too long at max_chars=250
    row(8, "HELLO,  my email is bob@example.com"),  # differs only by case: exact duplicate of 1
]


def cfg(**overrides) -> CleanConfig:
    return CleanConfig(**{"max_chars": 250, **overrides})


def test_clean_counts_every_rule():
    result = clean(copy.deepcopy(ROWS), cfg())
    assert [r["id"] for r in result.kept] == ["0001", "0003", "0004"]
    assert result.counts == {
        "unicode": {"touched": 1, "removed": 0},  # row 3 (full-width)
        "control_chars": {"touched": 1, "removed": 0},  # row 3 (zero-width space)
        "html": {"touched": 1, "removed": 0},
        "whitespace": {"touched": 4, "removed": 0},  # rows 1 (<p> line breaks), 2, 6, 8
        "too_short": {"touched": 0, "removed": 1},
        "too_long": {"touched": 0, "removed": 1},
        "pii": {"touched": 3, "removed": 0},  # rows 1, 2, 8 (counted before dedup)
        "pii_only": {"touched": 0, "removed": 0},
        "exact_duplicate": {"touched": 0, "removed": 2},
        "near_duplicate": {"touched": 0, "removed": 1},
    }
    assert result.pii == {"EMAIL": 3}
    kept = {r["id"]: r["messages"][1]["content"] for r in result.kept}
    assert kept == {"0001": "Hello,\nmy email is [EMAIL]", "0003": "ID ok please", "0004": LONG}


def test_clean_quarantine_names_rule_reason_and_duplicate():
    quarantine = {q["id"]: q for q in clean(copy.deepcopy(ROWS), cfg()).quarantined}
    assert {i: q["rule"] for i, q in quarantine.items()} == {
        "0002": "exact_duplicate", "0005": "near_duplicate", "0006": "too_short", "0007": "too_long",
        "0008": "exact_duplicate",
    }
    assert quarantine["0002"]["duplicate_of"] == "0001"
    assert quarantine["0002"]["duplicate_of_location"] == "data/raw/t.jsonl:1"
    assert quarantine["0005"]["duplicate_of"] == "0004" and 0.85 <= quarantine["0005"]["similarity"] < 1
    assert "message 2 (assistant) has 0 characters" in quarantine["0006"]["reason"]
    assert "clean.max_chars = 250" in quarantine["0007"]["reason"]
    for q in quarantine.values():
        assert {"source", "line", "stage", "rule", "reason", "excerpt"} <= q.keys()
        assert q["stage"] == "clean" and len(q["excerpt"]) <= 200
        assert "bob@example.com" not in q["excerpt"]  # excerpts are redacted too


def test_clean_does_not_modify_its_input():
    rows = copy.deepcopy(ROWS)
    clean(rows, cfg())
    assert rows == ROWS


def test_switches_turn_rules_off():
    result = clean(copy.deepcopy(ROWS), cfg(strip_html=False, redact_pii=False, exact_dedup=False,
                                             near_dedup=False, unicode_form="none"))
    assert [r["id"] for r in result.kept] == ["0001", "0002", "0003", "0004", "0005", "0008"]
    assert result.counts["html"]["touched"] == result.counts["pii"]["touched"] == 0
    assert result.counts["unicode"]["touched"] == 0
    assert "<p>" in result.kept[0]["messages"][1]["content"]


def test_near_duplicate_of_a_removed_row_is_kept():
    """A ~ B and B ~ C but not A ~ C: B goes (duplicate of A), C stays (its only match was removed)."""
    a = " ".join(f"word{i}" for i in range(40))
    b = edit_word(a, 10)
    c = edit_word(b, 30)
    result = clean([row(1, a), row(2, b), row(3, c)], cfg(near_dup_threshold=0.8, max_chars=20_000))
    assert [r["id"] for r in result.kept] == ["0001", "0003"]
    assert [(q["id"], q["duplicate_of"]) for q in result.quarantined] == [("0002", "0001")]


def test_min_chars_applies_to_every_message():
    rows = [row(1, "ok"), row(2, "a"), row(3, "fine", assistant="k")]
    result = clean(rows, cfg(min_chars=2))
    assert [r["id"] for r in result.kept] == ["0001"]
    assert result.counts["too_short"]["removed"] == 2


# ---------------------------------------------------------------------------------------------- run()


def project(tmp_path: Path, rows: list[dict], **clean_overrides) -> Path:
    empty = tmp_path / "raw_src"
    empty.mkdir()
    params_path = write_project(tmp_path, {"clean": clean_overrides}, raw_from=empty)
    raw_examples = tmp_path / "data" / "raw_examples"
    raw_examples.mkdir(parents=True)
    (raw_examples / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return params_path


def test_run_writes_examples_quarantine_and_report(tmp_path):
    params = load_params(project(tmp_path, ROWS, max_chars=250))
    result = run(params)
    out = tmp_path / "data" / "cleaned"
    kept = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    assert [r["id"] for r in kept] == ["0001", "0003", "0004"]
    assert kept[0]["tools"] is None and kept[0]["meta"] == {} and kept[0]["line"] == 1
    assert len(quarantine) == 5
    assert report["rows_in"] == 8 and report["rows_out"] == 3 and report["status"] == "ok"
    assert set(report["rules"]) == set(RULES)
    assert all({"touched", "removed"} <= set(v) for v in report["rules"].values())
    assert report["rules"]["exact_duplicate"]["removed"] == 2
    assert result.metrics["rows_out"] == 3 and set(result.outputs) == {"examples", "quarantine", "report"}
    json.dumps(result.metrics)  # metrics must be JSON-able for Dagster metadata


def test_run_streams_the_same_result_as_clean_in_memory(tmp_path, monkeypatch):
    """run() cleans in two passes over a spool file and validates in chunks; clean() holds every row."""
    import pipelines.clean as clean_module

    monkeypatch.setattr(clean_module, "VALIDATE_ROWS", 2)  # several chunks even for 8 rows
    params = load_params(project(tmp_path, ROWS, max_chars=250))
    expected = clean(copy.deepcopy(ROWS), params.clean)
    report = run(params).metrics
    out = tmp_path / "data" / "cleaned"
    assert [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()] == expected.kept
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(quarantine, key=lambda q: q["id"]) == sorted(expected.quarantined, key=lambda q: q["id"])
    assert report == expected.report(params.clean, len(ROWS))
    # no spool left behind; the marker says the clean stage owns the folder
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "examples.jsonl", "quarantine.jsonl", "report.json"]


def test_run_refuses_a_repeated_id_across_validation_chunks(tmp_path, monkeypatch):
    import pipelines.clean as clean_module

    monkeypatch.setattr(clean_module, "VALIDATE_ROWS", 1)
    rows = [row(1, "first question here"), {**row(2, "another question entirely"), "id": "0001"}]
    with pytest.raises(StageError, match="id 0001 appears twice"):
        run(load_params(project(tmp_path, rows)))
    assert not (tmp_path / "data" / "cleaned").exists()  # nothing half-written


def test_run_without_ingest_output_says_which_stage_to_run(tmp_path):
    empty = tmp_path / "raw_src"
    empty.mkdir()
    params = load_params(write_project(tmp_path, raw_from=empty))
    with pytest.raises(StageError, match="run the 'ingest' stage"):
        run(params)


def test_run_fails_clearly_when_every_row_is_removed(tmp_path):
    params = load_params(project(tmp_path, [row(1, "hi", assistant="")]))
    with pytest.raises(StageError, match="removed all 1 rows.*too_short: 1"):
        run(params)
    out = tmp_path / "data" / "cleaned"
    assert not (out / "examples.jsonl").exists()
    assert json.loads((out / "report.json").read_text())["status"] == "failed"


def test_run_reports_a_corrupt_input_line(tmp_path):
    params_path = project(tmp_path, ROWS[:1])
    with open(tmp_path / "data" / "raw_examples" / "examples.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(StageError, match="line 2 is not valid JSON"):
        run(load_params(params_path))
