"""Clean stage: each text rule on tiny literals, then clean() and run() end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipelines.clean import (
    RULES,
    clean,
    markup_is_content,
    normalize_unicode,
    normalize_whitespace,
    remove_control_chars,
    run,
    strip_html,
)
from pipelines.config import CleanConfig, load_params
from pipelines.dedup import conversation_text, near_duplicate_pairs
from pipelines.io import MARKER, StageError
from tests.conftest import LONG_SYSTEM_PROMPT, write_project


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


# Special-token texts of model families (Llama/Mistral, ChatML, Llama 3, Gemma, BERT-style, reasoning and tool
# tags) are plain text about models, never HTML (issue 12 kind 5): the html rule leaves them as they are.
SPECIAL_TOKEN_TEXT = [
    "It is <|eot_id|>, and Llama 2 uses </s>.",
    "Each turn is wrapped as <s>[INST] question [/INST] answer </s>.",
    "<s>",
    "</s>",
    "<S>text</S>",
    "Gemma writes <start_of_turn>model\nHi<end_of_turn> and starts with <bos>.",
    "<unk> <pad> <bos> <eos> <mask> <sep> <cls> </eos>",
    "<|im_start|>assistant\nHi<|im_end|><|endoftext|><|begin_of_text|>",
    "<think>step one</think>The answer is 4.",
    '<tool_call>{"name": "track"}</tool_call>',
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
]


@pytest.mark.parametrize("text", SPECIAL_TOKEN_TEXT)
def test_special_token_text_is_not_html(text):
    assert strip_html(text) == text


@pytest.mark.parametrize(("text", "expected"), [
    ('<div class="nav">Home | Shop</div>Llama 2 ends a turn with </s>.',
     "\nHome | Shop\nLlama 2 ends a turn with </s>."),
    ("<p>Wrap it as <s>[INST] hi [/INST]</s></p>", "\nWrap it as <s>[INST] hi [/INST]</s>\n"),
    ("<b>Note:</b> <|eot_id|> ends a Llama 3 turn.", "Note: <|eot_id|> ends a Llama 3 turn."),
])
def test_scraped_markup_around_special_token_text_is_still_stripped(text, expected):
    assert strip_html(text) == expected


@pytest.mark.parametrize("answer", SPECIAL_TOKEN_TEXT[:2])
def test_the_clean_stage_keeps_special_token_text_in_answers(answer):
    result = clean([one("Which token ends a turn?", answer)], cfg())
    [kept] = result.kept
    assert kept["messages"][1]["content"] == answer and result.counts["html"]["touched"] == 0


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
        "unicode": {"touched": 0, "removed": 0},  # NFC (the default) keeps full-width letters
        "control_chars": {"touched": 1, "removed": 0},  # row 3 (zero-width space)
        "html": {"touched": 1, "removed": 0},
        "whitespace": {"touched": 5, "removed": 0},  # rows 1 (<p> line breaks), 2, 3 (ideographic space), 6, 8
        "too_short": {"touched": 0, "removed": 1},
        "too_long": {"touched": 0, "removed": 1},
        "pii": {"touched": 3, "removed": 0},  # rows 1, 2, 8 (counted before dedup)
        "pii_only": {"touched": 0, "removed": 0},
        "exact_duplicate": {"touched": 0, "removed": 2},
        "near_duplicate": {"touched": 0, "removed": 1},
    }
    assert result.pii == {"EMAIL": 3}
    kept = {r["id"]: r["messages"][1]["content"] for r in result.kept}
    assert kept == {"0001": "Hello,\nmy email is [EMAIL]", "0003": "ＩＤ ｏｋ please", "0004": LONG}
    nfkc = clean(copy.deepcopy(ROWS), cfg(unicode_form="NFKC"))  # the opt-in folds them
    assert nfkc.counts["unicode"]["touched"] == 1 and nfkc.kept[1]["messages"][1]["content"] == "ID ok please"


def test_clean_quarantine_names_rule_reason_and_duplicate():
    quarantine = {q["id"]: q for q in clean(copy.deepcopy(ROWS), cfg()).quarantined}
    assert {i: q["rule"] for i, q in quarantine.items()} == {
        "0002": "exact_duplicate", "0005": "near_duplicate", "0006": "too_short", "0007": "too_long",
        "0008": "exact_duplicate",
    }
    assert quarantine["0002"]["duplicate_of"] == "0001"
    assert quarantine["0002"]["duplicate_of_location"] == "data/raw/t.jsonl:1"
    assert quarantine["0005"]["duplicate_of"] == "0004" and 0.85 <= quarantine["0005"]["similarity"] < 1
    assert "message 2 (assistant) has 0 letters, digits or symbols" in quarantine["0006"]["reason"]
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


def test_an_exact_copy_of_a_near_duplicate_names_the_kept_row():
    a = " ".join(f"word{i}" for i in range(40))
    result = clean([row(1, a), row(2, edit_word(a, 10)), row(3, edit_word(a, 10))], cfg(max_chars=20_000))
    assert [r["id"] for r in result.kept] == ["0001"]
    copy = next(q for q in result.quarantined if q["id"] == "0003")
    assert (copy["rule"], copy["duplicate_of"], copy["duplicate_of_copy"]) == ("exact_duplicate", "0001", "0002")
    assert copy["duplicate_of_location"] == "data/raw/t.jsonl:1" and "near duplicate of row 0001" in copy["reason"]


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
    assert result.metrics["rows_out"] == 3 and set(result.outputs) == {"examples", "quarantine", "changes", "report"}
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
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "changes.jsonl", "examples.jsonl", "quarantine.jsonl",
                                                     "report.json"]


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


# ------------------------------------------------------------------- issue 12: cleaning that keeps meaning


def one(user: str, assistant: str, i: int = 1, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"id": f"{i:04x}", "source": "data/raw/t.jsonl", "line": i, "format": "messages", "messages": messages,
            "tools": None, "meta": {}}


# Case 12 and its siblings: markup that is what the row is about stays.
MARKUP_CONTENT = [
    pytest.param("How do I make a word bold in HTML?",
                 "Wrap it in a bold tag, for example <b>important</b>; the <strong> tag works too.", id="bold-tag"),
    pytest.param("Write the HTML for a link to the tram timetable.", '<a href="https://example.org/tram">Tram</a>',
                 id="link-answer"),
    pytest.param('Fix this JSX so it compiles.\n\nreturn <div class="card">{title}</div>',
                 'In JSX use className: return <div className="card">{title}</div>', id="jsx"),
    pytest.param("Extract the plain text from this snippet.\n\n<p>Opening hours: <em>9 to 17</em></p>",
                 "Opening hours: 9 to 17", id="extraction-input"),
    pytest.param("What does the <br> tag do?", "It inserts a line break.", id="tag-named-in-question"),
    pytest.param("Convert to XML: name=Ada", "<person><name>Ada</name></person>", id="xml"),
    pytest.param("How do I escape an ampersand in markup?", "Write &amp; instead of &.", id="entity-is-content"),
]


@pytest.mark.parametrize("user, assistant", MARKUP_CONTENT)
def test_markup_that_is_the_content_is_kept(user, assistant):
    result = clean([one(user, assistant)], cfg())
    [kept] = result.kept
    assert [m["content"] for m in kept["messages"]] == [user, assistant]
    assert result.counts["html"]["touched"] == 0 and result.markup_kept == 1


@pytest.mark.parametrize("user, expected", [
    pytest.param('<div class="ticket"><p>Hello,<br>\nmy parcel is late.</p></div>', "Hello,\nmy parcel is late.",
                 id="helpdesk-export"),
    pytest.param("<p>Where is my order?</p>", "Where is my order?", id="wrapped-prose"),
    pytest.param("<html><body>The <b>website</b> is down</body></html>", "The website is down",
                 id="html-word-only-inside-tags"),
])
def test_markup_that_wraps_prose_is_still_stripped(user, expected):
    result = clean([one(user, "We will check.")], cfg())
    assert result.kept[0]["messages"][0]["content"] == expected
    assert result.counts["html"]["touched"] == 1 and result.markup_kept == 0


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "Explain the DOM."}, {"role": "assistant", "content": "It is a tree."}], False),
    ([{"role": "user", "content": "<p>Hi</p>"}, {"role": "assistant", "content": "Hello."}], False),
    ([{"role": "user", "content": "Tags for my post?"}, {"role": "assistant", "content": "<b>news</b>"}], False),
    ([{"role": "user", "content": "Parse this: <i>x</i>"}, {"role": "assistant", "content": "x"}], True),
    ([{"role": "user", "content": "A react component?"}, {"role": "assistant", "content": "<Card />"}], True),
])
def test_markup_is_content(messages, expected):
    assert markup_is_content(messages) is expected


@pytest.mark.parametrize("text", ["x²", "H₂O", "ﬁle", "ＡＢＣ", "½", "™", "①"])
def test_nfc_is_the_default_and_keeps_meaning(text):
    assert CleanConfig().unicode_form == "NFC"
    result = clean([one(f"What is {text}?", "Fine.")], cfg())
    assert result.kept[0]["messages"][0]["content"] == f"What is {text}?"


def test_nfkc_is_an_opt_in():
    result = clean([one("What is x²?", "Fine.")], cfg(unicode_form="NFKC"))
    assert result.kept[0]["messages"][0]["content"] == "What is x2?" and result.counts["unicode"]["touched"] == 1


@pytest.mark.parametrize("answer", ["4", "1", "嗨", "k", "A", "👍", "$", "0.5"])
def test_valid_short_answers_are_kept(answer):
    result = clean([one("Reply with one token.", answer)], cfg())
    assert [m["content"] for m in result.kept[0]["messages"]] == ["Reply with one token.", answer]


@pytest.mark.parametrize("answer", ["", "?", "...", "  -  ", "\u200b"])
def test_empty_and_punctuation_only_messages_are_too_short(answer):
    result = clean([one("Question?", answer)], cfg())
    [q] = result.quarantined
    assert q["rule"] == "too_short" and "fewer than clean.min_chars = 1" in q["reason"]


def test_min_chars_counts_letters_digits_and_symbols():
    rows = [one("What is 2+2?", "4", 1), one("Spell it.", "four", 2), one("Say it.", "f-o", 3)]
    result = clean(rows, cfg(min_chars=3))
    assert [r["id"] for r in result.kept] == ["0002"]  # "4" has 1, "f-o" has 2 (the dash does not count)


def test_every_rule_shows_before_after_samples_and_pii_stays_redacted():
    rows = [one(f"<p>Ticket {i} from bob{i}@example.com</p>", f"Answer   number {i}", i) for i in range(1, 6)]
    result = clean(rows, cfg())
    report = result.report(cfg(), len(rows))
    html_samples = report["rules"]["html"]["samples"]
    assert len(html_samples) == 3  # SAMPLES per rule, not one per row
    assert html_samples[0] == {"id": "0001", "location": "data/raw/t.jsonl:1", "message": 0, "role": "user",
                               "before": "<p>Ticket 1 from [EMAIL]</p>", "after": "\nTicket 1 from [EMAIL]\n"}
    whitespace = report["rules"]["whitespace"]["samples"][0]  # one sample per row: its first changed message
    assert (whitespace["message"], whitespace["after"]) == (0, "Ticket 1 from [EMAIL]")
    pii = report["rules"]["pii"]["samples"][0]
    assert "before" not in pii and pii["after"] == "Ticket 1 from [EMAIL]"
    assert "example.com" not in json.dumps(report)
    assert report["rules"]["html"]["kept_as_content"] == 0
    assert result.changed[0] == {"id": "0001", "source": "data/raw/t.jsonl", "line": 1,
                                 "rules": ["html", "whitespace", "pii"]}
    assert len(result.changed) == 5


def test_run_writes_the_changed_rows(tmp_path):
    rows = [one("<b>Hi</b> there", "Fine.", 1), one("Plain", "Fine too.", 2)]
    run(load_params(project(tmp_path, rows)))
    out = tmp_path / "data" / "cleaned"
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"id": "0001", "source": "data/raw/t.jsonl", "line": 1, "rules": ["html"]}]
    assert json.loads((out / "report.json").read_text())["rules"]["html"]["samples"][0]["before"] == "<b>Hi</b> there"


# Kind 6: a shared system prompt or template is not evidence of duplication (case 09).
BIKE_SYSTEM = LONG_SYSTEM_PROMPT
QUESTIONS = [("Do you rent tandem bikes?", "Yes, we have two tandems."),
             ("Can I return the bike in Voss?", "No, bikes come back to the Bergen shop."),
             ("Is a helmet included?", "Yes, each rental comes with a helmet."),
             ("Do you have child seats?", "Yes, ask at the desk."),
             ("Can I pay by card?", "Yes, all cards are accepted."),
             ("Are e-bikes available?", "Yes, book them a day ahead.")]


def test_rows_that_share_only_a_system_prompt_are_not_near_duplicates():
    rows = [one(q, a, i, BIKE_SYSTEM) for i, (q, a) in enumerate(QUESTIONS, 1)]
    result = clean(rows, cfg(max_chars=20_000))
    assert len(result.kept) == len(rows) and result.counts["near_duplicate"]["removed"] == 0
    whole = near_duplicate_pairs([conversation_text(r) for r in rows], 0.85)  # the fault: whole texts pair up
    assert len({j for _, j, _ in whole}) == len(rows) - 1


def test_rows_that_share_only_an_instruction_template_are_not_near_duplicates():
    template = ("Classify the sentiment of the following customer review as positive or negative, "
                "answering with one word only and nothing else.")
    reviews = ["Great phone.", "Battery died fast.", "Love the screen.", "Too heavy.", "Works fine.", "Broke."]
    rows = [one(f"{template}\n\n{r}", "positive" if i % 2 else "negative", i) for i, r in enumerate(reviews, 1)]
    assert len(clean(rows, cfg()).kept) == len(rows)


def test_near_duplicates_under_a_shared_system_prompt_are_still_removed():
    ticket = "Subject: Missing package\n\nHello,\nOnly one of the two packages in shipment LX1 was delivered. No rush."
    rows = [one(q, a, i, BIKE_SYSTEM) for i, (q, a) in enumerate(QUESTIONS, 1)]
    rows += [one(ticket, "shipping", 7, BIKE_SYSTEM), one(ticket.replace("Hello,", "Hi again, Hello,"), "shipping", 8,
                                                          BIKE_SYSTEM)]
    result = clean(rows, cfg(max_chars=20_000))
    assert [(q["id"], q["rule"], q["duplicate_of"]) for q in result.quarantined] == [("0008", "near_duplicate", "0007")]
