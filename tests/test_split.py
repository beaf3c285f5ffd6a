"""The split stage: deterministic, order-independent, ratio-honouring, group- and stratum-aware, leak-free."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pandera.errors
import pytest

from pipelines import split as sp
from pipelines.config import ConfigError, SplitConfig, load_params
from pipelines.dedup import cluster, conversation_text
from pipelines.io import StageError, read_json, read_jsonl, write_jsonl
from pipelines.schemas import SplitSchema, validate
from tests.conftest import LONG_SYSTEM_PROMPT, write_project

VOCAB = [f"w{k}" for k in range(400)]


def _text(rng: random.Random, words: int = 30) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def _mutate(rng: random.Random, text: str) -> str:
    """One word replaced: Jaccard of word 3-shingles ~0.83 for a 30-word question."""
    words = text.split()
    words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
    return " ".join(words)


def _row(i: int, question: str, category: str | None = None) -> dict:
    return {"id": f"{i:05x}", "source": "data/raw/x.jsonl", "line": i + 1, "format": "alpaca",
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "ok fine"}],
            "tools": None, "meta": {"category": category} if category else {},
            "n_tokens": 20, "n_completion_tokens": 3, "truncated": False}


def _dataset(singles: int = 200, families: int = 20, family_size: int = 4, exact_copies: int = 10,
             seed: int = 0) -> tuple[list[dict], list[list[str]]]:
    """Rows plus the id lists of the near-duplicate families (exact copies included as families of two)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    family_ids: list[list[str]] = []
    for _ in range(singles):
        rows.append(_row(len(rows), _text(rng)))
    for _ in range(families):
        base = _text(rng)
        family = [_row(len(rows) + k, base if k == 0 else _mutate(rng, base)) for k in range(family_size)]
        rows += family
        family_ids.append([r["id"] for r in family])
    for source in rng.sample(rows[:singles], exact_copies):  # same text, another id: an exact duplicate
        copy = _row(len(rows), source["messages"][0]["content"])
        rows.append(copy)
        family_ids.append([source["id"], copy["id"]])
    return rows, family_ids


def _ids(splits: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {name: [r["id"] for r in rows] for name, rows in splits.items()}


def _split_of(splits: dict[str, list[dict]]) -> dict[str, str]:
    return {r["id"]: name for name, rows in splits.items() for r in rows}


def test_same_seed_same_split_shuffled_input_same_split_other_seed_other_split():
    rows, _ = _dataset()
    cfg = SplitConfig(seed=7)
    first = sp.split_rows(rows, cfg)
    assert sp.split_rows(rows, cfg) == first
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert sp.split_rows(shuffled, cfg) == first  # rows, groups and file order all independent of input order
    other = sp.split_rows(rows, SplitConfig(seed=8))
    assert set(_ids(other)["test"]) != set(_ids(first)["test"])
    assert sum(len(v) for v in first.values()) == len(rows)
    assert all(ids == sorted(ids) for ids in _ids(first).values())


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.7, 0.0, 0.3)])
def test_ratios_are_honoured_by_row_count(ratios):
    rows, _ = _dataset(singles=400, families=25)
    cfg = SplitConfig(train=ratios[0], validation=ratios[1], test=ratios[2], seed=3)
    counts = {name: len(v) for name, v in sp.split_rows(rows, cfg).items()}
    for name, ratio in zip(sp.SPLITS, ratios, strict=True):
        assert abs(counts[name] / len(rows) - ratio) < 0.03, counts


def test_near_duplicate_and_exact_duplicate_groups_never_straddle_splits():
    rows, families = _dataset(families=40, exact_copies=15)
    splits = sp.split_rows(rows, SplitConfig(seed=42))
    split_of = _split_of(splits)
    group_of = {r["id"]: r["group"] for v in splits.values() for r in v}
    for family in families:
        assert len({split_of[i] for i in family}) == 1, family
        assert len({group_of[i] for i in family}) == 1, family
    assert len(set(group_of.values())) == len(rows) - sum(len(f) - 1 for f in families)
    assert len({split_of[f[0]] for f in families}) == 3  # the families themselves are spread over the splits


def test_stratification_keeps_per_stratum_proportions():
    rng = random.Random(5)
    sizes = {"billing": 300, "login": 60, "shipping": 40}
    rows = [_row(i, _text(rng), category) for i, category in enumerate(c for c, n in sizes.items() for _ in range(n))]
    cfg = SplitConfig(stratify_by="meta.category", seed=11)
    splits = sp.split_rows(rows, cfg)
    per_stratum: dict[str, Counter] = defaultdict(Counter)
    for name, v in splits.items():
        for r in v:
            per_stratum[r["meta"]["category"]][name] += 1
    for category, n in sizes.items():
        for name in sp.SPLITS:  # singleton groups: every stratum is cut within one row of its ratios
            assert abs(per_stratum[category][name] - getattr(cfg, name) * n) <= 1, (category, per_stratum[category])


def test_a_group_follows_its_most_common_stratum():
    rng = random.Random(9)
    base = _text(rng)
    family = [_row(0, base, "a"), _row(1, _mutate(rng, base), "a"), _row(2, _mutate(rng, base), "b")]
    others = [_row(3 + i, _text(rng), "a" if i % 2 else "b") for i in range(40)]
    splits = sp.split_rows(family + others, SplitConfig(stratify_by="meta.category", seed=1))
    assert len({_split_of(splits)[r["id"]] for r in family}) == 1
    assert sp.stratum_of({"meta": {}}, "meta.category") == sp.MISSING
    assert sp.stratum_of({"meta": {"n": 3}}, "meta.n") == "3"


def test_leakage_is_zero_for_a_split_and_detects_injected_duplicates():
    rows, _ = _dataset()
    splits = sp.split_rows(rows, SplitConfig())
    clean = sp.leakage(splits, threshold=0.8)
    assert clean["passed"] and clean["exact_duplicates_across_splits"] == 0
    assert clean["near_duplicate_pairs_across_splits"] == 0 and clean["examples"] == []

    train_row = splits["train"][0]
    question = train_row["messages"][0]["content"]
    leaky = {name: list(v) for name, v in splits.items()}
    leaky["test"].append({**train_row, "id": "exact-copy"})
    leaky["validation"].append({**train_row, "id": "near-copy",
                                "messages": [{"role": "user", "content": _mutate(random.Random(0), question)},
                                             train_row["messages"][1]]})
    report = sp.leakage(leaky, threshold=0.8)
    assert not report["passed"]
    assert report["exact_duplicates_across_splits"] == 1 and report["near_duplicate_pairs_across_splits"] >= 1
    pairs = {frozenset((e["a"]["id"], e["b"]["id"])) for e in report["examples"]}
    assert frozenset((train_row["id"], "exact-copy")) in pairs and frozenset((train_row["id"], "near-copy")) in pairs


def test_split_schema_requires_a_group():
    rows, _ = _dataset(singles=5, families=0, exact_copies=0)
    grouped = [{**r, "group": "g"} for r in rows]
    validate(SplitSchema, grouped)
    with pytest.raises(pandera.errors.SchemaErrors):
        validate(SplitSchema, rows)
    with pytest.raises(StageError, match="split 'test' breaks the row contract"):
        list(sp._validated("test", [{**grouped[0], "n_completion_tokens": 99}]))


def test_chunked_validation_finds_a_repeated_id_across_chunks(monkeypatch):
    rows, _ = _dataset(singles=5, families=0, exact_copies=0)
    grouped = sorted(({**r, "group": "g"} for r in rows), key=lambda r: r["id"])
    monkeypatch.setattr(sp, "VALIDATE_ROWS", 2)
    assert list(sp._validated("train", grouped)) == grouped  # 3 chunks, every row passes through once
    repeated = [*grouped[:2], {**grouped[1]}, *grouped[2:]]  # the copy is the first row of the second chunk
    with pytest.raises(StageError, match="line 3: column 'id' fails field_uniqueness"):
        list(sp._validated("train", repeated))


# ---------------------------------------------------------------------------------------------------- run()


def _project(tmp_path, rows: list[dict], **overrides):
    params = load_params(write_project(tmp_path, overrides))
    write_jsonl(params.path("formatted") / "dataset.jsonl", rows)
    return params


def test_run_writes_splits_and_report(tmp_path):
    rows, families = _dataset()
    for i, r in enumerate(rows):
        r["meta"] = {"category": "a" if i % 3 else "b"}
    params = _project(tmp_path, rows, split={"stratify_by": "meta.category"})
    result = sp.run(params)
    out = params.path("splits")
    files = {name: list(read_jsonl(out / f"{name}.jsonl")) for name in sp.SPLITS}
    assert files == sp.split_rows(rows, params.split)
    report = read_json(out / "report.json")
    assert report["counts"] == {name: len(v) for name, v in files.items()} and report["rows"] == len(rows)
    assert report["leakage"]["passed"] and result.metrics["leakage_exact"] == result.metrics["leakage_near"] == 0
    assert set(report["strata"]) == {"a", "b"} and sum(report["strata"]["b"].values()) == len(rows[::3])
    assert result.metrics["rows_test"] == len(files["test"]) and result.metrics["groups"] == report["groups"]
    before = {name: (out / f"{name}.jsonl").read_bytes() for name in sp.SPLITS}
    write_jsonl(params.path("formatted") / "dataset.jsonl", rows[::-1])
    sp.run(params)
    assert {name: (out / f"{name}.jsonl").read_bytes() for name in sp.SPLITS} == before


def test_groups_looser_than_the_leakage_threshold_are_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"split.group_threshold = 0.95 is above clean.near_dup_threshold = 0.5"):
        load_params(write_project(tmp_path, {"split": {"group_threshold": 0.95}, "clean": {"near_dup_threshold": 0.5}}))


def test_run_fails_when_groups_are_looser_than_the_leakage_threshold(tmp_path):
    rows, _ = _dataset(families=30)
    # Near duplicates (Jaccard ~0.83) are not grouped at 0.95 but count as leakage at 0.5. load_params refuses
    # these params; model_copy does not validate, so the stage's own guard is tested here.
    params = _project(tmp_path, rows)
    params = params.model_copy(update={"split": params.split.model_copy(update={"group_threshold": 0.95}),
                                       "clean": params.clean.model_copy(update={"near_dup_threshold": 0.5})})
    with pytest.raises(StageError, match="group_threshold"):
        sp.run(params)
    assert not params.path("splits").exists()


@pytest.mark.parametrize(("rows", "overrides", "message"), [
    ([_row(i, f"question {i} about billing") for i in range(3)], {}, "of 3 rows is 0.15 rows, less than one"),
    ([_row(i, f"question {i} about billing") for i in range(30)], {"split": {"stratify_by": "meta.team"}},
     "not a field of any row"),
    ([], {}, "no rows to split"),
])
def test_run_user_errors(tmp_path, rows, overrides, message):
    params = _project(tmp_path, rows, **overrides)
    with pytest.raises(StageError, match=message):
        sp.run(params)


def test_run_needs_the_formatted_dataset(tmp_path):
    params = load_params(write_project(tmp_path))
    with pytest.raises(StageError, match="format"):
        sp.run(params)


# ------------------------------------------------- issue 12: template text is not evidence of duplication

def _support_row(i: int, question: str, answer: str) -> dict:
    row = _row(i, question)
    row["messages"] = [{"role": "system", "content": LONG_SYSTEM_PROMPT}, *row["messages"][:1],
                       {"role": "assistant", "content": answer}]
    return row


def test_rows_that_share_only_a_system_prompt_form_one_group_each():
    """Case 09: 20 rows, one long system prompt, 20 different short questions and answers."""
    rng = random.Random(5)
    rows = [_support_row(i, _text(rng, 8), _text(rng, 9)) for i in range(20)]
    cfg = SplitConfig(train=0.85, validation=0.05, test=0.1)
    whole = cluster([conversation_text(r) for r in rows], cfg.group_threshold)  # the fault: one glued group
    assert len(set(whole)) < 20
    splits = sp.split_rows(rows, cfg)
    assert len({r["group"] for v in splits.values() for r in v}) == 20
    assert {name: len(v) for name, v in splits.items()} == {"train": 17, "validation": 1, "test": 2}


def test_rows_that_share_a_template_inside_one_line_form_one_group_each():
    """A sibling of case 09: the instruction is written before each question on the same line."""
    rng = random.Random(6)
    template = ("Read the customer's message below and answer it politely in one or two sentences, without promising "
                "refunds or dates, and sign it as the support team. The message:")
    rows = [_row(i, f"{template} {_text(rng, 3)}") for i in range(20)]
    for row in rows:
        row["messages"][1]["content"] = _text(rng, 2)
    cfg = SplitConfig(train=0.85, validation=0.05, test=0.1)
    assert len(set(cluster([conversation_text(r) for r in rows], cfg.group_threshold))) < 20  # the fault
    splits = sp.split_rows(rows, cfg)
    assert len({r["group"] for v in splits.values() for r in v}) == 20
    assert {name: len(v) for name, v in splits.items()} == {"train": 17, "validation": 1, "test": 2}


@pytest.mark.parametrize("rows, expected", [
    pytest.param([_row(i, f"question {i} about billing") for i in range(3)],
                 "split.validation = 0.05 of 3 rows is 0.15 rows, less than one", id="too-few-rows"),
    pytest.param([_row(i, "the same question about billing and invoices " + "w" * (i % 2)) for i in range(40)],
                 "form 2 groups of near duplicates", id="one-group-too-large"),
])
def test_an_empty_split_names_its_real_cause(tmp_path, rows, expected):
    params = _project(tmp_path, rows)
    with pytest.raises(StageError, match=expected) as err:
        sp.run(params)
    if "groups" in expected:
        assert "the largest holds 20 rows" in str(err.value) and "too few" not in str(err.value)


@pytest.mark.parametrize(("groups", "families", "joined"), [
    (["a", "b", "c"], ["", "", ""], ["a", "b", "c"]),
    (["b", "c", "a"], ["x", "x", ""], ["b", "b", "a"]),  # one conversation's rows share the smaller group
    (["d", "c", "b", "a"], ["x", "y", "x", "y"], ["b", "a", "b", "a"]),
    (["c", "b", "a"], ["x", "y", "x"], ["a", "b", "a"]),
    (["c", "b", "a", "c"], ["x", "x", "y", "y"], ["a", "a", "a", "a"]),  # joined through the shared group c
])
def test_rows_expanded_from_one_conversation_share_a_group(groups, families, joined):
    from pipelines.split import join_families

    assert join_families(groups, families) == joined


def test_expanded_rows_never_straddle_splits():
    """The format stage expands a conversation into one row per trained turn for templates that rewrite history
    (Qwen3, DeepSeek-R1); those rows differ as texts but are one conversation: one group, one split."""
    rows = []
    for i in range(40):
        base = {"source": "f", "line": i + 1, "format": "messages", "n_tokens": 9, "n_completion_tokens": 2,
                "truncated": False}
        turns = [{"role": "user", "content": f"question {i} about topic {i * 7919 % 97}"},
                 {"role": "assistant", "content": f"answer {i}"},
                 {"role": "user", "content": f"follow up {i} on item {i * 104729 % 89}"},
                 {"role": "assistant", "content": f"second answer {i}"}]
        rows.append({**base, "id": f"r{i}-1", "expanded_from": f"r{i}", "messages": turns[:2]})
        rows.append({**base, "id": f"r{i}-2", "expanded_from": f"r{i}", "messages": turns})
    out = sp.split_rows(rows, SplitConfig(seed=3))
    where = {r["id"]: name for name, split in out.items() for r in split}
    assert all(where[f"r{i}-1"] == where[f"r{i}-2"] for i in range(40))
    assert len({name for name in where.values()}) == 3
