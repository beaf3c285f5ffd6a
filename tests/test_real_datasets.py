"""Real users' data kept whole (issue 12): every SFT file of ../shared/datasets goes through ingest, clean and
format (the tiny model's tokenizer) and loses no row a person would call good; the counts are asserted.

The preference file dpo_en_demo.json is not SFT data (tests/test_ingest.py checks that it is reported).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import clean, ingest
from pipelines import format as fmt
from pipelines.config import load_params
from pipelines.io import read_jsonl
from tests.conftest import SHARED_DATASETS, build_tiny_model, tiny_overrides, write_project

pytestmark = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent")

# name: (rows read, rows ingested, ingest rules, rows cleaned, clean rules that removed rows)
# alpaca row 92 ("Generate a hypothetical phone number." -> "(555) 123-4567") is the one deliberate loss: PII
# redaction leaves the answer "[PHONE]", which teaches nothing, so the pii_only rule quarantines it (issue 13
# kind 7); with clean.redact_pii off it is kept.
EXPECTED = {
    "alpaca_en_demo.json": (999, 999, {}, 984, {"exact_duplicate": 14, "pii_only": 1}),
    "identity.json": (91, 91, {}, 91, {}),
    "glaive_toolcall_en_demo.json": (300, 300, {}, 259, {"exact_duplicate": 38, "near_duplicate": 3}),
    "kto_en_demo.json": (300, 150, {"undesirable_example": 150}, 150, {}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # The 400-token test BPE makes real text ~4x longer than a real tokenizer: give it room, so that no row
    # is lost to format.max_length and every loss counted below is a data decision.
    return build_tiny_model(tmp_path_factory.mktemp("tiny_long"), context=16384)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, model_dir):
    """name -> what ingest, clean and format made of that file; each file runs once per module."""
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            done[name] = run_stages(tmp_path_factory.mktemp(name.split(".")[0]), model_dir, name)
        return done[name]

    return get


def run_stages(tmp_path: Path, model_dir: Path, name: str) -> dict:
    raw = tmp_path / "raw_in"
    raw.mkdir()
    (raw / name).symlink_to(SHARED_DATASETS / name)
    overrides = tiny_overrides(model_dir) | {"format": {"max_length": 16384}}
    params = load_params(write_project(tmp_path / "proj", overrides, raw_from=raw))
    shutil.copytree(model_dir, params.path("base_model"))
    out = {"ingest": ingest.run(params).metrics, "clean": clean.run(params).metrics, "format": fmt.run(params).metrics}
    out["raw_rows"] = json.loads((SHARED_DATASETS / name).read_text())
    out["ingested"] = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    out["cleaned"] = list(read_jsonl(params.path("cleaned") / "examples.jsonl"))
    out["clean_quarantine"] = list(read_jsonl(params.path("cleaned") / "quarantine.jsonl"))
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_sft_file_loses_no_good_row(stages, name):
    rows_in, ingested, ingest_rules, cleaned, clean_rules = EXPECTED[name]
    got = stages(name)
    assert (got["ingest"]["rows_in"], got["ingest"]["rows_out"], got["ingest"]["rules"]) == (rows_in, ingested,
                                                                                           ingest_rules)
    assert got["ingest"]["malformed"] == 0
    removed = {rule: c["removed"] for rule, c in got["clean"]["rules"].items() if c["removed"]}
    assert (got["clean"]["rows_out"], removed) == (cleaned, clean_rules)
    assert (got["format"]["rows_out"], got["format"]["quarantined"]) == (cleaned, 0)
    # The only rows clean removes are duplicates of a row it kept: the same conversation, or (near) one word apart,
    # and answers that redaction left as nothing but placeholders (pii_only, counted above).
    by_id = {r["id"]: r for r in got["ingested"]}
    kept_ids = {r["id"] for r in got["cleaned"]}
    for q in got["clean_quarantine"]:
        if q["rule"] == "pii_only":
            assert "[PHONE]" in q["reason"] or "PHONE" in q["reason"]
            continue
        assert q["duplicate_of"] in kept_ids
        if q["rule"] == "exact_duplicate":  # (of a copy that went as a near duplicate of the kept row)
            twin, dup = by_id[q.get("duplicate_of_copy", q["duplicate_of"])]["messages"], by_id[q["id"]]["messages"]
            assert [(m["role"], m["content"].casefold()) for m in dup] == [(m["role"], m["content"].casefold())
                                                                           for m in twin]
        else:
            assert q["rule"] == "near_duplicate" and q["similarity"] >= 0.85


def test_alpaca_keeps_its_one_character_answer(stages):
    got = stages("alpaca_en_demo.json")
    [row] = [r for r in got["cleaned"] if r["line"] == 36]  # "Output 1 for true, 2 for false, 3 for uncertain."
    assert row["messages"][-1] == {"role": "assistant", "content": "3"}


def test_identity_keeps_the_one_character_greeting_and_its_punctuation(stages):
    got = stages("identity.json")
    [row] = [r for r in got["cleaned"] if r["line"] == 35]
    assert row["messages"][0] == {"role": "user", "content": "嗨"}
    assert row["messages"][1]["content"] == got["raw_rows"][34]["output"]  # full-width "！" kept (NFC, not NFKC)


def test_kto_label_false_rows_are_excluded_from_sft_and_counted(stages):
    got = stages("kto_en_demo.json")
    undesirable = sum(r["label"] is False for r in got["raw_rows"])
    assert undesirable == 150 and got["ingest"]["rules"] == {"undesirable_example": undesirable}
    assert all(r["meta"] == {"label": True} for r in got["cleaned"])


def test_glaive_tool_calls_are_trained_text_and_results_tool_turns(stages):
    got = stages("glaive_toolcall_en_demo.json")
    calls = [m["content"] for r in got["cleaned"] for m in r["messages"]
             if m["role"] == "assistant" and m["content"].startswith('{"name": ')]
    assert len(calls) > 100 and all({"name", "arguments"} <= json.loads(c).keys() for c in calls)
    assert all(r["messages"][i - 1]["role"] in ("assistant", "tool")
               for r in got["cleaned"] for i, m in enumerate(r["messages"]) if m["role"] == "tool")
