"""Demo data: deterministic for a seed, the label follows from the ticket text, and every kind of mess
the cleaning stage handles is present; the bundled files are exactly what the generator writes."""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from pipelines import demo_data, ingest
from pipelines.config import load_params
from pipelines.io import read_jsonl
from pipelines.metrics import parse_json_object
from tests.conftest import REPO, write_project

# Keywords a reader would use to triage; each ticket must hit those of exactly its own category.
CATEGORY_KEYWORDS = {
    "billing": ["charged", "invoice", "refund", "billed", "payment", "subscription price", "charge of"],
    "account": ["log in", "password", "locked out", "email address", "delete my account", "sign-in",
                "admin user"],
    "bug": ["crashes", "error", "blank screen", "no results", "does nothing", "looks like a bug", "broken"],
    "shipping": ["package", "parcel", "tracking", "delivery", "delivered", "shipping", "customs"],
    "feature_request": ["would be great", "could you support", "please add", "keyboard shortcut", "suggestion:",
                        "would love", "feature idea", "templates for"],
}


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return demo_data.render_files(seed=0)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, files):
    """The demo files through the ingest stage, as the pipeline sees them."""
    root = tmp_path_factory.mktemp("demo")
    raw = root / "raw_in"
    raw.mkdir()
    for name, content in files.items():
        (raw / name).write_bytes(content.encode())
    params = load_params(write_project(root / "proj", raw_from=raw))
    result = ingest.run(params)
    out = params.path("raw_examples")
    return result, list(read_jsonl(out / "examples.jsonl")), list(read_jsonl(out / "quarantine.jsonl"))


def plain(text: str) -> str:
    """What a careful reader sees: no HTML, no look-alike or invisible characters, single spaces, lower case."""
    text = unicodedata.normalize("NFKC", html.unescape(re.sub(r"<[^>]+>", " ", text)))
    text = re.sub(r"[\u200b-\u200d\ufeff]", "", text)
    return re.sub(r"\s+", " ", text).strip().lower()


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number][::-1]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def test_same_seed_same_bytes_other_seed_other_bytes(files):
    assert demo_data.render_files(seed=0) == files
    other = demo_data.render_files(seed=1)
    assert set(other) == set(files) and all(other[k] != files[k] for k in files)


def test_cli_writes_the_three_files_and_the_preference_pairs(tmp_path, files):
    assert demo_data.main(["--out", str(tmp_path), "--seed", "0"]) == 0
    written = {p.name: p.read_bytes().decode() for p in tmp_path.iterdir()}
    assert written == {**files, demo_data.PREFERENCE_FILE: demo_data.render_preference_file(0)}


def test_bundled_raw_data_is_the_seed_0_output(files):
    raw = REPO / "data" / "raw"
    bundled = {p.name: p.read_bytes().decode() for p in raw.iterdir() if p.is_file()}
    assert bundled == {**files, demo_data.PREFERENCE_FILE: demo_data.render_preference_file(0)}


def test_size_and_formats(files, ingested):
    assert sum(len(c.encode()) for c in files.values()) < 1_000_000  # commit-sized
    result, rows, _ = ingested
    assert 1150 <= result.metrics["rows_in"] <= 1250
    assert result.metrics["formats"].keys() == {"messages", "alpaca", "sharegpt"}
    assert min(result.metrics["formats"].values()) > 250
    assert {r["source"].rsplit("/", 1)[1] for r in rows} == set(demo_data.FILES)


def test_ingest_completes_with_some_quarantine_under_the_threshold(ingested):
    result, _, quarantine = ingested
    assert 5 <= len(quarantine) <= 15  # ~1% malformed JSONL lines
    assert all(q["source"] == "data/raw/tickets_helpdesk.jsonl" and q["line"] >= 1 and q["reason"] for q in quarantine)
    assert len({q["rule"] for q in quarantine}) >= 3  # broken JSON, wrong role / types, bad conversation
    assert 0 < result.metrics["bad_fraction"] < 0.05


def test_every_row_has_the_system_prompt_a_json_answer_and_its_category_in_meta(ingested):
    _, rows, _ = ingested
    for r in rows:
        system, _user, assistant = r["messages"]
        assert system == {"role": "system", "content": demo_data.SYSTEM}
        answer = json.loads(assistant["content"])
        assert assistant["content"] == demo_data.answer(answer["category"], answer["priority"])
        assert answer["category"] in demo_data.CATEGORIES and answer["priority"] in demo_data.PRIORITIES
        assert r["meta"]["category"] == answer["category"]


def test_label_is_inferable_from_the_text(ingested):
    _, rows, _ = ingested
    checked = 0
    for r in rows:
        text = plain(r["messages"][1]["content"])
        if len(text) < 2:
            continue  # the deliberately too-short rows, for the cleaning stage to drop
        answer = json.loads(r["messages"][2]["content"])
        categories = {c for c, words in CATEGORY_KEYWORDS.items() if any(w in text for w in words)}
        priorities = {p for p, cues in demo_data.PRIORITY_CUES.items() if any(plain(c) in text for c in cues)}
        assert categories == {answer["category"]}, text
        assert priorities == {answer["priority"]}, text
        checked += 1
    assert checked >= 1150


def test_tickets_are_short(ingested):
    _, rows, _ = ingested
    # ~4 characters per token: 30-80 tokens is roughly 120-320 characters.
    lengths = sorted(len(r["messages"][1]["content"]) for r in rows)
    assert 120 <= lengths[len(lengths) // 2] <= 320
    assert sum(n > 600 for n in lengths) == sum(n > demo_data.LONG_LOG_CHARS for n in lengths) == 2  # pasted logs


def test_mess_for_every_cleaning_rule(ingested):
    _, rows, _ = ingested
    users = [r["messages"][1]["content"] for r in rows]
    n = len(users)
    cards = [re.sub(r"\D", "", m) for u in users for m in re.findall(r"\b(?:\d{4}[ -]?){3}\d{4}\b", u)]
    counts = {
        "html": sum(bool(re.search(r"<(p|br|div)\b", u)) for u in users),
        "entities": sum("&amp;" in u or "&#39;" in u or "&nbsp;" in u for u in users),
        "emails": sum(bool(re.search(r"[\w.]+@[\w.]+\.\w+", u)) for u in users),
        "phones": sum(bool(re.search(r"(\+\d{1,2} |\(\d{3}\) )[\d -]{7,}", u)) for u in users),
        "cards": len(cards),
        "ips": sum(bool(re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", u)) for u in users),
        "secrets": sum(bool(re.search(r"\b(sk-\w{20,}|hf_\w{20,}|AKIA[A-Z0-9]{16})", u)) for u in users),
        "fullwidth": sum(any("\uff01" <= ch <= "\uff5e" for ch in u) for u in users),
        "nbsp": sum("\u00a0" in u for u in users),
        "zero_width": sum(bool(re.search("[\u200b-\u200d\ufeff]", u)) for u in users),
        "too_short": sum(len(u.strip()) < 2 for u in users),
        "too_long": sum(len(u) > 20_000 for u in users),  # clean.max_chars
    }
    for kind, minimum in {"html": 60, "entities": 20, "emails": 60, "phones": 40, "cards": 15, "ips": 15,
                          "secrets": 10, "fullwidth": 5, "nbsp": 5, "zero_width": 5, "too_short": 5,
                          "too_long": 2}.items():
        assert counts[kind] >= minimum, (kind, counts)
    assert all(luhn_ok(c) for c in cards)
    exact = Counter(json.dumps(r["messages"]) for r in rows)
    assert 0.03 * n <= sum(c - 1 for c in exact.values()) <= 0.07 * n  # ~5% exact duplicates
    # Near duplicates: the same text once whitespace and case are folded, but not byte-identical.
    folded = Counter(re.sub(r"\s+", " ", u).strip().lower() for u in set(users))
    assert sum(c - 1 for c in folded.values()) >= 0.01 * n
    assert sum("Hello again," in u or "Hi again," in u or "Sent from my phone" in u for u in users) >= 0.01 * n


def test_malformed_lines_are_about_one_percent_of_the_jsonl(files):
    lines = files["tickets_helpdesk.jsonl"].splitlines()
    bad = 0
    for line in lines:
        try:
            row, why = ingest.normalise_row(json.loads(line))
        except json.JSONDecodeError:
            row = None
        bad += row is None
    assert 0.005 * len(lines) <= bad <= 0.02 * len(lines)


def test_csv_has_multi_line_records_and_crlf(files):
    text = files["tickets_legacy.csv"]
    assert "\r\n" in text and re.search(r'"[^"]*\n[^"]*"', text)


def test_luhn_card_generator_is_valid():
    import random

    rng = random.Random(3)
    assert all(luhn_ok(re.sub(r"\D", "", demo_data._luhn_card(rng))) for _ in range(200))


@pytest.mark.parametrize("name", demo_data.FILES)
def test_each_file_is_non_trivial(files, name):
    assert len(files[name].splitlines()) > 250
    assert Path(name).suffix in ingest.READERS


# ------------------------------------------------------------------------------------------ preference pairs


def test_preference_pairs_prefer_the_right_answer_over_realistic_mistakes():
    """One pair per fresh ticket: chosen is the ticket's label as bare JSON; rejected is its kind of mistake (the
    neighbouring priority, a confusable category, prose, fenced JSON); four pairs are broken on purpose. 30%
    are SFT models' measured failures (a sentence they read as medium) and a fifth their contrast."""
    text = demo_data.render_preference_file(0)
    assert text == demo_data.render_preference_file(0) != demo_data.render_preference_file(1)
    assert len(text.encode()) < 1_100_000  # commit-sized
    rows = [json.loads(line) for line in text.splitlines()]
    good = [r for r in rows if not r["ticket_id"].endswith("-broken")]
    assert len(good) == demo_data.N_PREFERENCE_PROMPTS and len(rows) == len(good) + 4
    assert not {r["ticket_id"] for r in good} & {f"T-{10_000 + i}" for i in range(1080)}  # not the SFT tickets
    kinds = Counter(r["mistake"] for r in good)
    assert set(kinds) == set(demo_data.MISTAKES) and min(kinds.values()) > 0.01 * len(good)
    mined = Counter(r["mined"] for r in good)
    assert set(mined) == {"sft_error", "contrast", None}
    assert abs(mined["sft_error"] - 432) < 50 and abs(mined["contrast"] - 288) < 50  # 30% and 20% of 1440
    for r in good:
        user, chosen, rejected = r["prompt"][1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]
        if r["mined"] == "sft_error":
            [cue] = [cue for cue in demo_data.HARD_CUES if cue in user]
            assert json.loads(rejected)["priority"] == demo_data.HARD_CUES[cue] != json.loads(chosen)["priority"]
        elif r["mined"] == "contrast":
            assert any(cue in user for cue in demo_data.PRIORITY_CUES["medium"])
            assert json.loads(chosen)["priority"] == "medium" and json.loads(rejected)["priority"] in ("low", "high")
    for r in good:
        system, user = r["prompt"]
        assert system == {"role": "system", "content": demo_data.SYSTEM} and user["role"] == "user"
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        right = json.loads(chosen)
        assert chosen == demo_data.answer(right["category"], right["priority"]) and rejected != chosen
        text = plain(user["content"])
        assert {c for c, words in CATEGORY_KEYWORDS.items() if any(w in text for w in words)} == {right["category"]}
        if r["mistake"] in ("priority", "category"):
            wrong = json.loads(rejected)
            changed = {k for k in right if right[k] != wrong[k]}
            assert changed == {r["mistake"]} or (r["mistake"] == "category" and "category" in changed)
            if r["mistake"] == "priority":
                assert wrong["priority"] in demo_data.NEIGHBOURS[right["priority"]]
        else:
            assert parse_json_object(rejected) is None  # not the bare JSON the system prompt asks for
            fenced = rejected.startswith("```json\n" + chosen)
            assert fenced if r["mistake"] == "fenced" else right["priority"] in rejected
