"""Issue 18, data half: replay against forgetting (data.replay) and multi-task mixing (data.sources,
data.balance_by) of the TRAIN split, with validation and test left natural."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from pipelines import ingest, mixing, replay_data
from pipelines import split as sp
from pipelines.config import DataConfig, load_params
from pipelines.dedup import conversation_lines, conversation_text, exact_key, similar_pairs
from pipelines.io import StageError, read_json, read_jsonl, write_jsonl
from pipelines.schemas import PROBE_FILE, package_rows
from tests.conftest import REPO, write_project

REPLAY_FILE = REPO / "pipelines" / "replay_general.jsonl"


# ------------------------------------------------------------------------------------- the shipped replay set


def test_the_shipped_replay_set_is_what_its_generator_writes():
    assert REPLAY_FILE.read_text(encoding="utf-8") == replay_data.text()
    rows = package_rows("replay_general.jsonl")
    assert len(rows) == 300 and Counter(r["task"] for r in rows) == dict.fromkeys(replay_data.TASKS, 12)
    assert len({r["messages"][0]["content"] for r in rows}) == 300  # distinct questions
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def _shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + k]) for i in range(max(len(words) - k + 1, 1))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_the_replay_set_is_disjoint_from_the_forgetting_probe():
    """No replay row is a near duplicate of a probe row, even far below the dedup threshold, and no replay question
    is a probe question with other numbers: replaying the set must not teach the probe its own questions."""
    replay, probe = package_rows("replay_general.jsonl"), package_rows(PROBE_FILE)
    whole = [(_shingles(conversation_text(r)), r) for r in replay]
    for p in probe:
        probe_set = _shingles(conversation_text(p))
        worst = max(whole, key=lambda w: _jaccard(w[0], probe_set))
        assert _jaccard(worst[0], probe_set) < 0.3, (worst[1], p)

    def question(row: dict) -> set:
        return _shingles(re.sub(r"\d+", "#", row["messages"][0]["content"].casefold()))

    for p in probe:
        assert max(_jaccard(question(r), question(p)) for r in replay) < 0.3, p
    assert not {exact_key(conversation_text(r)) for r in replay} & {exact_key(conversation_text(p)) for p in probe}
    lines = [conversation_lines(r) for r in replay + probe]
    assert [(i, j) for i, j, _ in similar_pairs(lines, 0.3) if i < len(replay) <= j] == []


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _quoted(text: str) -> str:
    return re.search(r"'(\w+)'", text)[1]


CHECKS = {  # task -> (question, answer) -> the answer is right
    "addition": lambda q, a: _numbers(a)[0] == sum(_numbers(q)),
    "subtraction": lambda q, a: _numbers(a)[0] == _numbers(q)[0] - _numbers(q)[1],
    "double": lambda q, a: _numbers(a) == [_numbers(q)[0], 2 * _numbers(q)[0]],
    "half": lambda q, a: _numbers(a) == [_numbers(q)[0], _numbers(q)[0] // 2] and _numbers(q)[0] % 2 == 0,
    "sum": lambda q, a: _numbers(a)[-1] == sum(_numbers(q)),
    "boxes": lambda q, a: _numbers(a)[-1] == _numbers(q)[0] * _numbers(q)[1],
    "cost": lambda q, a: _numbers(a)[-1] == _numbers(q)[0] * _numbers(q)[1],
    "age": lambda q, a: _numbers(a)[-1] == _numbers(q)[0] + _numbers(q)[1],
    "clock": lambda q, a: _numbers(a)[0] == (_numbers(q)[0] + _numbers(q)[1] - 1) % 12 + 1,
    "even_odd": lambda q, a: ("even" in a) == (_numbers(q)[0] % 2 == 0),
    "compare": lambda q, a: _numbers(a) == sorted(_numbers(q), reverse=True),
    "sequence": lambda q, a: _numbers(a)[0] - _numbers(q)[3] == _numbers(q)[1] - _numbers(q)[0],
    "rounding": lambda q, a: _numbers(a)[-1] == 10 * round(_numbers(q)[0] / 10),
    "letter_count": lambda q, a: _numbers(a)[0] == len(_quoted(q)),
    "backwards": lambda q, a: a == _quoted(q)[::-1],
    "capitals": lambda q, a: a == re.search(r"'(.+)'", q)[1].upper(),
    "sort_words": lambda q, a: a.split(", ") == sorted(q.split(": ")[1].rstrip(".").split(", ")),
    "first_letter": lambda q, a: a == f"It begins with the letter '{_quoted(q)[0]}'.",
    "vowels": lambda q, a: _numbers(a)[0] == sum(c in "aeiou" for c in re.search(r"in '(\w+)'", q)[1]),
    "word_count": lambda q, a: _numbers(a)[0] == len(q.split("? ", 1)[1].split()),
    "weekday": lambda q, a: replay_data.DAYS.index(a.split()[-1].rstrip(".")) ==
    (replay_data.DAYS.index(q.split()[2].rstrip(".")) + _numbers(q)[0]) % 7,
    "month": lambda q, a: replay_data.MONTHS.index(a.split()[0]) ==
    (replay_data.MONTHS.index(q.split()[-1].rstrip("?")) - 1) % 12,
    "longest_word": lambda q, a: a.split("'")[1] == max(q.split(": ")[1].rstrip("?").split(", "), key=len),
    "find_animal": lambda q, a: a.split()[1] in replay_data.ANIMALS and a.split()[1] in q,
    "number_words": lambda q, a: a == replay_data.number_words(_numbers(q)[0]),
}


@pytest.mark.parametrize("task", list(replay_data.TASKS))
def test_every_replay_answer_is_right(task):
    assert set(CHECKS) == set(replay_data.TASKS)
    rows = [r for r in package_rows("replay_general.jsonl") if r["task"] == task]
    for r in rows:
        question, answer = (m["content"] for m in r["messages"])
        assert CHECKS[task](question, answer), (question, answer)


@pytest.mark.parametrize(("n", "words"), [
    (21, "twenty-one"), (40, "forty"), (100, "one hundred"), (115, "one hundred and fifteen"),
    (342, "three hundred and forty-two"), (999, "nine hundred and ninety-nine")])
def test_number_words(n, words):
    assert replay_data.number_words(n) == words


# ------------------------------------------------------------------------------------------------------ ingest

TASK_ROW = {"instruction": "Triage: the app crashes on start.", "output": '{"category": "bug"}'}


def _project(tmp_path: Path, data: dict, files: dict[str, list[dict]] | None = None) -> Path:
    raw = tmp_path / "raw_in"
    raw.mkdir()
    for name, rows in (files or {"tickets.jsonl": [TASK_ROW]}).items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_project(tmp_path / "proj", {"data": data}, raw_from=raw)


@pytest.mark.parametrize(("fraction", "replayed"), [(0.0, 0), (0.2, 300)])
def test_ingest_reads_the_shipped_set_only_when_replay_is_on(tmp_path, fraction, replayed):
    params = load_params(_project(tmp_path, {"replay": {"fraction": fraction}, "system_prompt": "Triage tickets.",
                                             "format": "alpaca"}))
    result = ingest.run(params)
    rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    replay = [r for r in rows if r.get("replay")]
    assert len(replay) == replayed and len(rows) == 1 + replayed
    assert "replay" not in rows[0] and rows[0]["messages"][0] == {"role": "system", "content": "Triage tickets."}
    if replayed:  # detected as messages (data.format: alpaca is the task's), no task system prompt added
        assert {r["source"] for r in replay} == {"pipelines/replay_general.jsonl"}
        assert {r["format"] for r in replay} == {"messages"} and all(len(r["messages"]) == 2 for r in replay)
        assert replay[0]["meta"] == {"task": "addition"}
        assert result.metrics["replay"] == {"file": "general", "source": "pipelines/replay_general.jsonl",
                                            "fraction": 0.2, "rows_read": 300, "kept": 300, "quarantined": 0}
    else:
        assert result.metrics["replay"] is None


@pytest.mark.parametrize(("fraction", "replayed"), [(0.0, 0), (0.5, 2)])
def test_a_replay_file_in_raw_dir_is_never_task_data(tmp_path, fraction, replayed):
    general = [{"prompt": "Name a colour.", "completion": "Blue."}, {"prompt": "Say hello.", "completion": "Hello."}]
    params = load_params(_project(tmp_path, {"replay": {"fraction": fraction, "file": "general/mine.jsonl"}},
                                  {"tickets.jsonl": [TASK_ROW], "general/mine.jsonl": general}))
    result = ingest.run(params)
    rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    assert [r["source"] for r in rows] == ["data/raw/tickets.jsonl"] + ["data/raw/general/mine.jsonl"] * replayed
    assert [bool(r.get("replay")) for r in rows] == [False] + [True] * replayed
    skipped = [m for m in result.metrics["messages"] if "data.replay.file" in m]
    assert len(skipped) == (fraction == 0) and result.metrics["files_skipped"] == (fraction == 0)


def test_a_missing_replay_file_is_one_sentence(tmp_path):
    params = load_params(_project(tmp_path, {"replay": {"fraction": 0.1, "file": "general.jsonl"}}))
    with pytest.raises(StageError, match=r"data.replay.file = 'general.jsonl' names 'data/raw/general.jsonl', which is "
                                         r"not a file; put the replay file there"):
        ingest.run(params)


@pytest.mark.parametrize("follow_links", [False, True])
def test_a_replay_file_linked_from_outside_follows_the_raw_link_rule(tmp_path, follow_links):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    params = load_params(_project(tmp_path, {"replay": {"fraction": 0.5, "file": "general.jsonl"},
                                             "follow_links": follow_links}))
    (params.path("raw_dir") / "general.jsonl").symlink_to(outside)
    if not follow_links:
        with pytest.raises(StageError, match=r"data.replay.file = 'general.jsonl' is a symlink to '.*elsewhere.jsonl', "
                                             r"outside the project, so it is not read"):
            ingest.run(params)
        return
    ingest.run(params)
    rows = list(read_jsonl(params.path("raw_examples") / "examples.jsonl"))
    assert [r.get("replay", False) for r in rows] == [False, True]


def test_replay_rows_alone_are_no_task_data(tmp_path):
    params = load_params(_project(tmp_path, {"replay": {"fraction": 0.2}}, {"notes.txt": []}))
    with pytest.raises(StageError, match="no trainable rows"):
        ingest.run(params)


# ------------------------------------------------------------------------------------------- mixing functions

IDS = [f"{i:04x}" for i in range(40)]


@pytest.mark.parametrize("n", [0, 1, 7, 10, 11, 25])
def test_resample_is_seeded_order_free_and_repeats_only_after_using_every_row(n):
    items = list(range(10))
    chosen = mixing.resample(items, n, IDS, seed=3, step="s")
    assert len(chosen) == n
    assert mixing.resample(items[::-1], n, IDS, seed=3, step="s") == chosen  # the input order does not matter
    counts = Counter(chosen)
    assert max(counts.values(), default=0) - min(counts.get(i, 0) for i in items) <= 1  # round robin
    if 0 < n < 10:
        assert mixing.resample(items, n, IDS, seed=4, step="s") != chosen or n == 1


@pytest.mark.parametrize(("source", "raw_rel", "expected"), [
    ("data/raw/a.jsonl", "data/raw", "a.jsonl"),
    ("data/raw/sub/b.csv", "data/raw", "sub/b.csv"),
    ("data/raw2/a.jsonl", "data/raw", "data/raw2/a.jsonl"),  # another folder: unchanged
    ("../shared/raw/a.jsonl", "../shared/raw", "a.jsonl"),
    ("pipelines/replay_general.jsonl", "data/raw", "pipelines/replay_general.jsonl"),
])
def test_relative_source(source, raw_rel, expected):
    assert mixing.relative_source(source, raw_rel) == expected


SOURCES = ["data/raw/a.jsonl"] * 6 + ["data/raw/b.csv"] * 3 + ["data/raw/sub/c.jsonl"] * 1


@pytest.mark.parametrize(("entries", "expected"), [
    pytest.param([], {"a.jsonl": 6, "b.csv": 3, "sub/c.jsonl": 1}, id="none"),
    pytest.param([{"match": "b.csv", "weight": 2}], {"a.jsonl": 6, "b.csv": 6, "sub/c.jsonl": 1}, id="double"),
    pytest.param([{"match": "a.jsonl", "weight": 0.5}], {"a.jsonl": 3, "b.csv": 3, "sub/c.jsonl": 1}, id="half"),
    pytest.param([{"match": "b.csv", "weight": 1.5}], {"a.jsonl": 6, "b.csv": 4, "sub/c.jsonl": 1},
                 id="one-and-a-half"),
    pytest.param([{"match": "a.jsonl", "weight": 0}], {"b.csv": 3, "sub/c.jsonl": 1}, id="zero"),
    pytest.param([{"match": "*.jsonl", "max_rows": 2}], {"a.jsonl|sub/c.jsonl": 2, "b.csv": 3},
                 id="glob-cap-per-entry"),  # '*' crosses '/'; the cap holds for the entry's files together
    pytest.param([{"match": "sub/*", "weight": 3}, {"match": "*", "max_rows": 4}],
                 {"a.jsonl|b.csv": 4, "sub/c.jsonl": 3}, id="first-match-wins"),
    pytest.param([{"match": "a.jsonl", "weight": 2, "max_rows": 8}], {"a.jsonl": 8, "b.csv": 3, "sub/c.jsonl": 1},
                 id="weight-then-cap"),
])
def test_sources_weight_and_cap_the_train_rows(entries, expected):
    cfg = DataConfig(sources=entries)
    train = list(range(len(SOURCES)))
    picked, report = mixing.mix_train(train, IDS, SOURCES, None, cfg, seed=0, raw_rel="data/raw")
    counts = Counter(mixing.relative_source(SOURCES[i], "data/raw") for i in picked)
    assert {files: sum(counts[f] for f in files.split("|")) for files in expected} == expected  # a|b: together
    assert sum(counts.values()) == sum(expected.values())
    assert picked == sorted(picked, key=IDS.__getitem__) and report["train_rows_mixed"] == len(picked)
    assert report["train_rows_natural"] == 10 and report["rows_left_out"] == len(set(train) - set(picked))
    if entries:
        assert [e["train_rows_mixed"] for e in report["sources"]] == [
            sum(counts[f] for f in e["files"]) for e in report["sources"]]


VALUES = ["x"] * 6 + ["y"] * 3 + [sp.MISSING] * 1


@pytest.mark.parametrize(("rows", "per_value"), [("min", 1), ("max", 6), (4, 4)])
def test_balance_by_gives_every_value_the_same_rows(rows, per_value):
    cfg = DataConfig(balance_by="meta.category", balance_rows=rows)
    picked, report = mixing.mix_train(list(range(10)), IDS, SOURCES, VALUES, cfg, seed=0, raw_rel="data/raw")
    assert Counter(VALUES[i] for i in picked) == {"x": per_value, "y": per_value, sp.MISSING: per_value}
    assert report["balance"]["rows_per_value"] == per_value
    assert report["balance"]["values"]["x"] == {"before": 6, "after": per_value}


def test_sources_come_before_balance():
    cfg = DataConfig(sources=[{"match": "a.jsonl", "weight": 0}], balance_by="meta.category", balance_rows="max")
    picked, _ = mixing.mix_train(list(range(10)), IDS, SOURCES, VALUES, cfg, seed=0, raw_rel="data/raw")
    assert Counter(VALUES[i] for i in picked) == {"y": 3, sp.MISSING: 3}  # x came only from a.jsonl


@pytest.mark.parametrize(("task_rows", "fraction", "k"), [(921, 0.2, 230), (100, 0.5, 100), (10, 0.0, 0), (7, 0.1, 1),
                                                          (90, 0.1, 10), (10, 0.9, 90)])
def test_replay_rows_make_the_fraction_of_the_train_split(task_rows, fraction, k):
    assert mixing.replay_rows(task_rows, fraction) == k
    if task_rows and k:
        assert abs(k / (k + task_rows) - fraction) < 1 / task_rows


def test_a_replay_share_the_file_cannot_fill_is_one_sentence():
    with pytest.raises(StageError, match=r"data.replay.fraction = 0.5 needs 10 replay rows next to 10 task train "
                                         r"rows, but data.replay.file 'general' has only 4 usable \(6 formatted.*at "
                                         r"most 0.285"):
        mixing.pick_replay([0, 1, 2, 3], IDS, 10, 0.5, 0, pool=6, file="general")


def test_a_glob_that_matches_nothing_is_one_sentence():
    cfg = DataConfig(sources=[{"match": "*.jsonl"}, {"match": "a.jsonl", "weight": 2}, {"match": "tickets.csv"}])
    with pytest.raises(StageError, match=r"data.sources\[1\].match = 'a.jsonl' matches no source file"):
        mixing.check_sources(SOURCES, cfg, "data/raw")


# ------------------------------------------------------------------------------------------------ split stage

VOCAB = [f"w{k}" for k in range(500)]


def _row(i: int, source: str, rng: random.Random, *, replay: bool = False, category: str = "c0") -> dict:
    question = " ".join(rng.choice(VOCAB) for _ in range(20))
    row = {"id": f"{'r' if replay else 't'}{i:05d}", "source": source, "line": i + 1, "format": "messages",
           "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"answer {i}"}],
           "tools": None, "meta": {"category": category}, "n_tokens": 30, "n_completion_tokens": 4, "truncated": False}
    if replay:
        row["replay"] = True
    return row


def _formatted(task: int = 200, replay: int = 60) -> list[dict]:
    rng = random.Random(0)
    rows = [_row(i, "data/raw/a.jsonl" if i % 4 else "data/raw/b.csv", rng, category=f"c{i % 3}") for i in range(task)]
    return rows + [_row(i, "pipelines/replay_general.jsonl", rng, replay=True) for i in range(replay)]


def _split(tmp_path: Path, rows: list[dict], data: dict | None = None) -> tuple[dict[str, list[dict]], dict, Path]:
    params = load_params(write_project(tmp_path, {"data": data or {}}))
    write_jsonl(params.path("formatted") / "dataset.jsonl", rows)
    sp.run(params)
    out = params.path("splits")
    return {name: list(read_jsonl(out / f"{name}.jsonl")) for name in sp.SPLITS}, read_json(out / "report.json"), out


def test_mixing_and_replay_change_the_train_split_only(tmp_path):
    rows = _formatted()
    task_only = [r for r in rows if not r.get("replay")]
    natural, natural_report, _ = _split(tmp_path / "natural", task_only)
    data = {"replay": {"fraction": 0.2}, "sources": [{"match": "b.csv", "weight": 2}, {"match": "a.jsonl",
                                                                                       "max_rows": 100}]}
    mixed, report, _ = _split(tmp_path / "mixed", rows, data)
    assert mixed["validation"] == natural["validation"] and mixed["test"] == natural["test"]
    by_source = Counter(r["source"] for r in mixed["train"])
    natural_b = sum(r["source"] == "data/raw/b.csv" for r in natural["train"])
    task_rows = 2 * natural_b + 100
    assert by_source == {"data/raw/b.csv": 2 * natural_b, "data/raw/a.jsonl": 100,
                         "pipelines/replay_general.jsonl": mixing.replay_rows(task_rows, 0.2)}
    ids = [r["id"] for r in mixed["train"]]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    copies = [r for r in mixed["train"] if "copy_of" in r]
    assert len(copies) == natural_b and all(r["id"] == f"{r['copy_of']}#2" for r in copies)
    originals = {r["id"]: r for r in natural["train"]}
    assert all({**r, "id": r["copy_of"]} == {**originals[r["copy_of"]], "copy_of": r["copy_of"]} for r in copies)
    assert report["counts"] == {"train": len(ids), "validation": len(natural["validation"]),
                                "test": len(natural["test"])}
    assert report["per_source"]["data/raw/b.csv"] == {"train": natural_b, "validation": natural_report["per_source"][
        "data/raw/b.csv"]["validation"], "test": natural_report["per_source"]["data/raw/b.csv"]["test"],
        "train_mixed": 2 * natural_b}
    assert report["per_source"]["pipelines/replay_general.jsonl"]["train_mixed"] == report["replay"]["train_rows"]
    assert report["replay"]["pool"] == 60 and report["replay"]["unused"] == 60 - report["replay"]["train_rows"]
    assert report["leakage"]["passed"] and report["mixing"]["train_rows_natural"] == len(natural["train"])


def test_the_mixed_split_is_the_same_for_shuffled_input(tmp_path):
    rows = _formatted()
    data = {"replay": {"fraction": 0.1}, "sources": [{"match": "b.csv", "weight": 1.5}],
            "balance_by": "meta.category", "balance_rows": "max"}
    _, _, first = _split(tmp_path / "a", rows, data)
    random.Random(1).shuffle(rows)
    _, _, second = _split(tmp_path / "b", rows, data)
    for name in sp.SPLITS:
        assert (first / f"{name}.jsonl").read_bytes() == (second / f"{name}.jsonl").read_bytes()


def test_replay_rows_like_held_out_or_probe_rows_are_left_out(tmp_path):
    rows = _formatted(replay=20)
    natural, _, _ = _split(tmp_path / "natural", [r for r in rows if not r.get("replay")])
    test_row = natural["test"][0]
    probe_row = package_rows(PROBE_FILE)[0]
    rows += [{**rows[-1], "id": "r-test", "messages": test_row["messages"][:1] + [
                {"role": "assistant", "content": test_row["messages"][1]["content"] + " indeed"}]},
             {**rows[-1], "id": "r-probe", "messages": probe_row["messages"]}]
    mixed, report, _ = _split(tmp_path / "mixed", rows, {"replay": {"fraction": 0.05}})
    assert report["replay"]["too_similar_to_held_out"] == 1 and report["replay"]["too_similar_to_probe"] == 1
    assert report["replay"]["eligible"] == 20
    assert not {"r-test", "r-probe"} & {r["id"] for r in mixed["train"]}


@pytest.mark.parametrize(("rows", "data", "message"), [
    pytest.param(_formatted(replay=0), {"replay": {"fraction": 0.2}}, "has no replay rows; re-run the ingest stage",
                 id="replay-without-rows"),
    pytest.param(_formatted(replay=10), {"replay": {"fraction": 0.5}}, "data.replay.fraction = 0.5 needs",
                 id="replay-too-small"),
    pytest.param(_formatted(), {"balance_by": "meta.team"}, "data.balance_by = 'meta.team' is not a field",
                 id="balance-field-missing"),
    pytest.param(_formatted(), {"sources": [{"match": "c.parquet", "weight": 2}]},
                 r"data.sources\[0\].match = 'c.parquet' matches no source file", id="glob-unmatched"),
    pytest.param(_formatted(), {"sources": [{"match": "*", "weight": 0}]}, "leave no row", id="weights-zero"),
])
def test_split_mixing_user_errors(tmp_path, rows, data, message):
    with pytest.raises(StageError, match=message):
        _split(tmp_path, rows, data)


def test_replayed_rows_are_cleaned_formatted_and_split_like_task_rows(tmp_path, tiny_model_dir):
    """ingest -> clean -> format -> split on the tiny model: replay rows get the same rules and token counts, are
    counted per source in every report, a task row wins over an identical replay row, and only train gets them."""
    from pipelines import clean
    from pipelines import format as fmt

    general = package_rows("replay_general.jsonl")
    tasks = [{"instruction": f"Ticket {i}: " + " ".join(VOCAB[i * 7:(i + 1) * 7]), "output": f"category {i % 3}"}
             for i in range(40)]
    tasks.append({"messages": general[0]["messages"]})  # a task row that is also a replay row
    raw = tmp_path / "raw_in"
    raw.mkdir()
    (raw / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks))
    overrides = {"model": {"source": "local", "name": str(tiny_model_dir)}, "format": {"max_length": 1024},
                 "data": {"replay": {"fraction": 0.3}}, "split": {"train": 0.7, "validation": 0.1, "test": 0.2}}
    params = load_params(write_project(tmp_path / "proj", overrides, raw_from=raw))
    params.path("base_model").symlink_to(tiny_model_dir)
    for stage in (ingest, clean, fmt, sp):
        stage.run(params)
    cleaned = read_json(params.path("cleaned") / "report.json")
    assert cleaned["rules"]["exact_duplicate"]["removed"] == 1
    formatted = list(read_jsonl(params.path("formatted") / "dataset.jsonl"))
    replay = [r for r in formatted if r.get("replay")]
    assert len(replay) == 299 and all(r["n_tokens"] > r["n_completion_tokens"] > 0 for r in replay)
    assert general[0]["messages"] in [r["messages"] for r in formatted if not r.get("replay")]
    report = read_json(params.path("formatted") / "report.json")
    assert report["per_source"]["pipelines/replay_general.jsonl"] == {"rows_in": 299, "rows_out": 299,
                                                                       "quarantined": 0}
    splits = {name: list(read_jsonl(params.path("splits") / f"{name}.jsonl")) for name in sp.SPLITS}
    assert not any(r.get("replay") for name in ("validation", "test") for r in splits[name])
    task_train = sum(not r.get("replay") for r in splits["train"])
    assert sum(bool(r.get("replay")) for r in splits["train"]) == mixing.replay_rows(task_train, 0.3)
