"""Preference data: every pair / KTO format parses to one schema, bad pairs are quarantined with their rule, the
clean stage's rules apply to every side, and the split follows the SFT split without leakage.

    .venv/bin/python -m pytest tests/test_preferences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipelines import preferences
from pipelines.config import CleanConfig, SplitConfig, load_params
from pipelines.ingest import Rejection
from pipelines.io import StageError, read_json, read_jsonl
from pipelines.preferences import Cleaning, Parsed, as_pairs, as_unpaired, parse, plan_splits
from tests.conftest import SHARED_DATASETS, write_project

U, A, S = "user", "assistant", "system"


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


# --------------------------------------------------------------------------------------------------- parsing

PAIRS = [
    pytest.param({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                  "rejected": {"from": "gpt", "value": "b"}}, "sharegpt_pair", msgs((U, "q")), id="sharegpt"),
    pytest.param({"conversations": [{"from": "human", "value": "q"}], "system": "sys",
                  "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
                 "sharegpt_pair", msgs((S, "sys"), (U, "q")), id="sharegpt-system"),
    pytest.param({"prompt": msgs((U, "q")), "chosen": msgs((A, "a")), "rejected": msgs((A, "b"))},
                 "messages_pair", msgs((U, "q")), id="trl-conversational"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "b"}, "prompt_pair", msgs((U, "q")), id="trl-standard"),
    pytest.param({"prompt": msgs((S, "sys"), (U, "q")), "chosen": "a", "rejected": "b"}, "messages_pair",
                 msgs((S, "sys"), (U, "q")), id="message-prompt-string-answers"),
    pytest.param({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "b"))}, "implicit_pair",
                 msgs((U, "q")), id="implicit-conversational"),
    pytest.param({"chosen": "Human: q Assistant: a", "rejected": "Human: q Assistant: b"}, "implicit_pair",
                 msgs((U, "Human: q Assistant:")), id="implicit-standard"),
]


@pytest.mark.parametrize("obj, fmt, prompt", PAIRS)
def test_pair_formats_parse_to_prompt_and_two_answers(obj, fmt, prompt):
    parsed = parse(obj)
    assert isinstance(parsed, Parsed), parsed
    assert (parsed.format, parsed.kind, parsed.prompt) == (fmt, "pair", prompt)
    # the implicit standard format keeps the space after the shared prefix with the answer, as trl.extract_prompt
    assert [m["content"].strip() for m in parsed.answers["chosen"]] == ["a"]
    assert [m["content"].strip() for m in parsed.answers["rejected"]] == ["b"]


@pytest.mark.parametrize("obj, fmt, label", [
    ({"messages": msgs((U, "q"), (A, "a")), "label": False}, "messages_label", False),
    ({"prompt": "q", "completion": "a", "label": True}, "prompt_completion_label", True),
    ({"prompt": msgs((U, "q")), "completion": msgs((A, "a")), "label": True}, "prompt_completion_label", True),
])
def test_labelled_rows_parse_to_prompt_completion_label(obj, fmt, label):
    parsed = parse(obj, system_prompt="be brief")
    assert (parsed.format, parsed.kind, parsed.label) == (fmt, "unpaired", label)
    assert parsed.prompt == msgs((S, "be brief"), (U, "q")) and parsed.answers == {"completion": msgs((A, "a"))}


@pytest.mark.parametrize("obj", [
    {"messages": msgs((U, "q"), (A, "a"))},  # an SFT row
    {"instruction": "i", "output": "o"},
    {"messages": msgs((U, "q"), (A, "a")), "label": "yes"},  # not a boolean label: the ingest stage's row
    ["not", "an", "object"],
])
def test_rows_that_are_not_preference_rows_are_left_alone(obj):
    assert parse(obj) is None


@pytest.mark.parametrize("obj, rule, words", [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_side", "chosen side is missing or empty"),
    ({"prompt": "q", "chosen": "a"}, "empty_side", "rejected side is missing"),
    ({"prompt": "q", "chosen": msgs((A, "a")), "rejected": [{"role": "assistant", "content": "  "}]}, "empty_side",
     "rejected side"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "missing_prompt", "prompt ('prompt') is missing"),
    ({"chosen": "abc", "rejected": "xyz"}, "missing_prompt", "share no prompt"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"), (U, "more"), (A, "b"))},
     "empty_side", "nothing but the shared prompt"),
    ({"prompt": "q", "completion": " ", "label": False}, "empty_side", "completion is missing"),
    ({"completion": "a", "label": True}, "missing_prompt", "prompt is missing"),
    ({"prompt": msgs((U, "q")), "chosen": msgs((U, "a")), "rejected": msgs((A, "b"))}, "invalid_conversation",
     "chosen:"),
    ({"prompt": msgs((A, "q")), "chosen": "a", "rejected": "b"}, "invalid_conversation", "has no user message"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "invalid_row", "rejected must be a string, a message or a list"),
])
def test_bad_pairs_are_rejected_with_a_rule_and_a_reason(obj, rule, words):
    why = parse(obj)
    assert isinstance(why, Rejection) and why.rule == rule, why
    assert words in str(why)


# -------------------------------------------------------------------------------------------------- cleaning


def test_the_clean_rules_apply_to_every_side():
    parsed = parse({"prompt": "<p>Mail me at anna@example.com</p>", "chosen": "Call  +1 415-555-0100  now",
                    "rejected": "&amp; nothing"})
    cleaning = Cleaning(CleanConfig())
    assert cleaning.apply(parsed) is None
    assert parsed.prompt == msgs((U, "Mail me at [EMAIL]"))
    assert parsed.answers == {"chosen": msgs((A, "Call [PHONE] now")), "rejected": msgs((A, "& nothing"))}
    assert cleaning.touched == {"html": 1, "whitespace": 1, "pii": 1} and cleaning.pii == {"EMAIL": 1, "PHONE": 1}


@pytest.mark.parametrize("chosen, rejected, rule", [
    ("The  answer", "The answer", "identical_sides"),  # equal once whitespace is normalised
    ("<b>yes</b>", "yes", "identical_sides"),  # equal once HTML is stripped
    ("...", "a fine answer", "too_short"),  # no letter, digit or symbol (clean.min_chars = 1) on the chosen side
])
def test_sides_that_clean_to_the_same_text_or_break_a_length_rule_are_removed(chosen, rejected, rule):
    parsed = parse({"prompt": "q?", "chosen": chosen, "rejected": rejected})
    problem = Cleaning(CleanConfig()).apply(parsed)
    assert problem is not None and problem[0] == rule


# --------------------------------------------------------------------------------------- trainer row shapes


def test_pairs_and_unpaired_rows_convert_both_ways():
    pair = {"id": "p", "kind": "pair", "prompt": msgs((U, "q")), "chosen": msgs((A, "a")), "rejected": msgs((A, "b")),
            "tools": None}
    good = {"id": "g", "kind": "unpaired", "prompt": msgs((U, "r")), "completion": msgs((A, "c")), "label": True}
    bad = {"id": "h", "kind": "unpaired", "prompt": msgs((U, "r")), "completion": msgs((A, "d")), "label": False}
    alone = {"id": "i", "kind": "unpaired", "prompt": msgs((U, "s")), "completion": msgs((A, "e")), "label": True}
    pairs, left = as_pairs([pair, good, bad, alone])
    assert left == 1 and [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p", msgs((A, "a")), msgs((A, "b"))), ("g+h", msgs((A, "c")), msgs((A, "d")))]
    unpaired = as_unpaired([pair, bad])
    assert [(r["id"], r["label"], r["completion"]) for r in unpaired] == [
        ("p:chosen", True, msgs((A, "a"))), ("p:rejected", False, msgs((A, "b"))), ("h", False, msgs((A, "d")))]


# ----------------------------------------------------------------------------------------------------- split

CFG = SplitConfig(train=0.8, validation=0.1, test=0.1, seed=3, group_threshold=0.6)
TICKETS = [f"ticket {i} about the invoice number {i * 7919} and the delivery slot {i % 13} of order {i * 31}"
           for i in range(60)]


def test_split_follows_the_sft_split_and_groups_near_duplicate_prompts():
    sft = [("test", TICKETS[0]), ("train", TICKETS[1]), ("validation", TICKETS[2])]
    prompts = [TICKETS[0], TICKETS[1], TICKETS[2], TICKETS[0] + " thanks", *TICKETS[10:40]]
    plan = plan_splits(prompts, [""] * len(prompts), sft, CFG, near_dup_threshold=0.85)
    assert plan.splits[:4] == ["test", "train", "validation", "test"]  # copies follow SFT; the near copy its group
    assert plan.sft_splits[:4] == ["test", "train", "validation", "test"] and plan.groups[3] == plan.groups[0]
    free = plan.splits[4:]
    assert set(free) <= {"train", "validation", "test"} and free.count("train") > free.count("test")
    assert plan.conflicts == {}


def test_a_prompt_that_duplicates_sft_rows_in_two_splits_has_no_split():
    sft = [("train", TICKETS[5]), ("test", TICKETS[5] + " please")]  # the SFT split itself allowed these apart
    plan = plan_splits([TICKETS[5]], [""], sft, CFG, near_dup_threshold=0.85)
    assert plan.conflicts == {0: ["train", "test"]} and plan.splits == [None]


def test_split_is_a_function_of_content_not_order():
    sft = [("test", TICKETS[0]), ("train", TICKETS[1])]
    prompts = TICKETS[:50]
    first = plan_splits(prompts, [""] * 50, sft, CFG, 0.85)
    order = list(range(50))
    random.Random(0).shuffle(order)
    second = plan_splits([prompts[i] for i in order], [""] * 50, sft, CFG, 0.85)
    assert [second.splits[order.index(i)] for i in range(50)] == first.splits


# ----------------------------------------------------------------------------------------------------- stage


def _project(tmp_path: Path, files: dict[str, str], sft: dict[str, list[dict]] | None = None, **overrides) -> Path:
    raw = tmp_path / "raw_in"
    raw.mkdir()
    for name, text in files.items():
        (raw / name).write_text(text, encoding="utf-8")
    params_file = write_project(tmp_path / "proj", overrides or None, raw_from=raw)
    splits = params_file.parent / "data" / "splits"
    splits.mkdir(parents=True)
    for name in ("train", "validation", "test"):
        rows = (sft or {}).get(name, [])
        (splits / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return params_file


def _sft_row(i: int, text: str) -> dict:
    return {"id": f"s{i}", "messages": msgs((U, text), (A, "ok"))}


def jl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_stage_writes_splits_quarantine_and_counts_every_row(tmp_path):
    pairs = [{"prompt": TICKETS[i], "chosen": "yes", "rejected": "no"} for i in range(20, 50)]
    files = {
        "prefs.jsonl": jl(*pairs, {"prompt": "what?", "chosen": "same", "rejected": "same"}, pairs[0], "{broken"),
        "kto.json": json.dumps([{"messages": msgs((U, TICKETS[3]), (A, "fine")), "label": True},
                                {"messages": msgs((U, TICKETS[4]), (A, "rude")), "label": False}]),
        "sft.jsonl": jl({"messages": msgs((U, "hi"), (A, "hello"))}),
    }
    sft = {"test": [_sft_row(0, TICKETS[20])], "train": [_sft_row(1, TICKETS[21])]}
    params = load_params(_project(tmp_path, files, sft))
    result = preferences.run(params)
    m = result.metrics
    assert (m["rows_read"], m["not_preference"], m["unreadable"], m["preference_rows"]) == (36, 1, 1, 34)
    assert (m["rows_out"], m["quarantined"], m["malformed"]) == (32, 2, 1)
    assert m["rules"] == {"identical_sides": 1, "exact_duplicate": 1}
    assert (m["pairs"], m["desirable"], m["undesirable"]) == (30, 1, 1)
    out = params.path("preferences")
    quarantine = list(read_jsonl(out / "quarantine.jsonl"))
    assert [(q["source"], q["line"], q["rule"]) for q in quarantine] == [
        ("data/raw/prefs.jsonl", 31, "identical_sides"), ("data/raw/prefs.jsonl", 32, "exact_duplicate")]
    rows = {name: list(read_jsonl(out / f"{name}.jsonl")) for name in ("train", "validation", "test")}
    assert sum(map(len, rows.values())) == 32
    where = {r["prompt"][-1]["content"]: (name, r["sft_split"]) for name, rs in rows.items() for r in rs}
    assert where[TICKETS[20]] == ("test", "test") and where[TICKETS[21]] == ("train", "train")
    assert m["leakage_exact"] == m["leakage_near"] == 0
    report = read_json(out / "report.json")
    assert report["status"] == "ok" and {f["source"] for f in report["per_file"]} == {
        "data/raw/prefs.jsonl", "data/raw/kto.json", "data/raw/sft.jsonl"}


def test_no_preference_rows_is_an_empty_result_not_an_error(tmp_path):
    params = load_params(_project(tmp_path, {"sft.jsonl": jl({"messages": msgs((U, "hi"), (A, "hello"))})}))
    result = preferences.run(params)
    assert result.metrics["rows_out"] == 0 and "align stage has nothing to train on" in result.metrics["messages"][0]
    assert all((params.path("preferences") / f"{n}.jsonl").read_text() == "" for n in ("train", "validation", "test"))


def test_too_many_malformed_pairs_fail_in_one_sentence(tmp_path):
    files = {"p.jsonl": jl({"prompt": "which?", "chosen": "this", "rejected": "that"},
                           {"prompt": "which now?", "chosen": "the other"})}
    params = load_params(_project(tmp_path, files))
    with pytest.raises(StageError, match=r"1 of 2 preference rows \(50.0%\) are malformed.*quarantine.jsonl"):
        preferences.run(params)


def test_the_sft_split_is_required(tmp_path):
    params = load_params(_project(tmp_path, {"p.jsonl": jl({"prompt": "q", "chosen": "a", "rejected": "b"})}))
    (params.path("splits") / "test.jsonl").unlink()
    with pytest.raises(StageError, match="run the 'split' stage first"):
        preferences.run(params)


# ----------------------------------------------------------------------------------------------- real data

needs_shared = pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent")


@needs_shared
def test_real_dpo_and_kto_datasets_lose_no_good_pair(tmp_path):
    """dpo_en_demo.json: 300 ShareGPT pairs, 5 of them byte-identical copies of earlier rows; kto_en_demo.json: 150
    desirable + 150 undesirable rows. Every other row is kept, whatever the clean rules redact or normalise."""
    files = {name: (SHARED_DATASETS / name).read_text(encoding="utf-8") for name in ("dpo_en_demo.json",
                                                                                    "kto_en_demo.json")}
    raw = json.loads(files["dpo_en_demo.json"])
    copies = len(raw) - len({json.dumps(r, sort_keys=True) for r in raw})
    params = load_params(_project(tmp_path, files))
    m = preferences.run(params).metrics
    assert copies == 5
    assert m["preference_rows"] == 600 and m["malformed"] == 0 and m["rules"] == {"exact_duplicate": copies}
    assert (m["pairs"], m["desirable"], m["undesirable"]) == (300 - copies, 150, 150)
    assert m["formats"] == {"sharegpt_pair": 295, "messages_label": 300}


def test_capitalised_preference_fields_are_read(tmp_path):
    """A spreadsheet of pairs with the header Prompt,Chosen,Rejected is read as prompt/chosen/rejected."""
    lines = "".join(f"{TICKETS[i]},yes,no\n" for i in range(20, 30))
    params = load_params(_project(tmp_path, {"pairs.csv": "Prompt,Chosen,Rejected\n" + lines}))
    m = preferences.run(params).metrics
    assert (m["preference_rows"], m["pairs"], m["quarantined"]) == (10, 10, 0)
