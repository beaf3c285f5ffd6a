"""The clean stage's pii_only rule: an answer that is nothing but PII placeholders is quarantined, not trained.

Decision (pipelines/clean.py docstring): the rule looks at assistant messages. A user turn of only an address is
kept when the answer is real text, since the model is not trained on the user's tokens and "my email is X" ->
"Thanks, I have updated it" is a sensible example. Handed case 14 is the first row below.
"""

from __future__ import annotations

import copy
import json

import pytest

from pipelines import clean as cl
from pipelines.config import CleanConfig, load_params
from pipelines.io import StageError, read_json, read_jsonl
from tests.conftest import write_project


def row(i: int, user: str, assistant: str) -> dict:
    return {"id": f"{i:04d}", "source": "data/raw/a.jsonl", "line": i, "format": "messages", "tools": None,
            "meta": {}, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.mark.parametrize(("user", "assistant", "removed", "kinds"), [
    ("john.doe@example.com", "+1 (415) 555-0132", True, "[PHONE]"),  # handed case 14, row 1
    ("4111 1111 1111 1111", "192.168.10.25", True, "[IP_ADDRESS]"),  # row 2
    ("what are your contacts?", "bob@example.com, +1 (415) 555-0132.", True, "[EMAIL], [PHONE]"),
    ("token please", "[SECRET]", True, "[SECRET]"),  # placeholders already in the raw data
    ("what is my email?", "It is [EMAIL].", False, None),  # words around the placeholder: something to learn
    ("john.doe@example.com", "Thanks, I have updated your address.", False, None),  # user turn of PII: kept
    ("what is 2+2?", "4", False, None),  # a short answer without placeholders is not this rule's business
])
def test_an_answer_of_only_placeholders_is_quarantined(user, assistant, removed, kinds):
    result = cl.clean([row(1, user, assistant)], CleanConfig(min_chars=1))
    assert result.counts["pii_only"]["removed"] == int(removed)
    if removed:
        [q] = result.quarantined
        assert q["rule"] == "pii_only"
        assert q["reason"] == (f"message 1 (assistant) is nothing but redacted PII ({kinds}); an answer of "
                               "placeholders teaches the model nothing")
        assert "example.com" not in q["excerpt"] and "555-0132" not in q["excerpt"]  # the excerpt is redacted
    else:
        assert len(result.kept) == 1


def test_without_redaction_real_pii_is_left_to_the_user():
    # clean.redact_pii: false keeps the text as it is; there is no placeholder, so the rule does not fire
    result = cl.clean([row(1, "contact?", "bob@example.com")], CleanConfig(redact_pii=False))
    assert result.counts["pii_only"]["removed"] == 0 and result.kept[0]["messages"][1]["content"] == "bob@example.com"


def test_the_stage_counts_and_quarantines_them(tmp_path):
    params = load_params(write_project(tmp_path))
    rows = [row(1, "john.doe@example.com", "+1 (415) 555-0132"), row(2, "4111 1111 1111 1111", "192.168.10.25"),
            row(3, "where is my parcel?", "It ships today.")]
    (params.path("raw_examples")).mkdir(parents=True)
    (params.path("raw_examples") / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cl.run(params)
    assert result.metrics["rows_out"] == 1 and result.metrics["rules"]["pii_only"] == {
        "touched": 0, "removed": 2, "enabled": True}
    out = params.path("cleaned")
    assert [r["id"] for r in read_jsonl(out / "examples.jsonl")] == ["0003"]
    assert [(q["id"], q["rule"]) for q in read_jsonl(out / "quarantine.jsonl")] == [("0001", "pii_only"),
                                                                                    ("0002", "pii_only")]
    assert read_json(out / "report.json")["rules"]["pii_only"]["removed"] == 2


def test_a_file_of_only_such_rows_fails_the_stage_and_names_the_rule(tmp_path):
    params = load_params(write_project(tmp_path))
    params.path("raw_examples").mkdir(parents=True)
    rows = [row(1, "john.doe@example.com", "+1 (415) 555-0132")]
    (params.path("raw_examples") / "examples.jsonl").write_text(json.dumps(copy.deepcopy(rows[0])) + "\n")
    with pytest.raises(StageError, match=r"removed all 1 rows .* \(pii_only: 1\)"):
        cl.run(params)
