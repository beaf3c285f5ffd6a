"""Split stage: a deterministic train/validation/test split in which near duplicates never straddle splits.

    python -m pipelines split [--params params.yaml]

Reads `formatted/dataset.jsonl` and writes `splits/{train,validation,test}.jsonl` (the formatted rows
+ "group") and `splits/report.json` (rows and groups per split and per stratum, and a leakage check).

How rows are assigned, so that the same data and seed always give the same split, whatever the order
of the input rows:
1. Rows are grouped: identical conversation texts (pipelines.dedup.exact_key) share a group, and so do
   near duplicates (pipelines.dedup.similar_pairs at split.group_threshold, connected components), which
   veto pairs whose own content is dissimilar once the template text both share is set aside
   (clean.boilerplate_share, clean.own_similarity_ratio): rows that only share a system prompt or an
   instruction template are not grouped. The distinct texts are clustered in exact_key order, so
   grouping does not see the input order either.
2. A group's key is the smallest exact_key of its members, a content hash.
3. Groups are ordered by sha256(seed, group key) - a seeded shuffle that is a pure function of content -
   and cut at the cumulative split ratios by row count (a group goes where its middle row falls), within
   each stratum when split.stratify_by is set (a group's stratum is its members' most common value).
4. Rows are written sorted by id, so even the files are byte-identical for shuffled input.

5. The train split alone is then mixed (pipelines.mixing; params `data:`): per-source weights and caps
   (data.sources), balancing by a field (data.balance_by), and replayed general rows (data.replay, rows with
   `"replay": true` from the ingest stage). The split is planned on the task rows only, so validation and
   test are the same with or without mixing. A replay row at least split.group_threshold similar to a
   validation or test row, or to a row of the forgetting probe, is left out. report.json adds `per_source`
   (rows per source file in each natural split and in the written train split), `mixing` and `replay`;
   `counts.train` is the rows written.

The leakage check (also the blocking Dagster asset check) counts exact duplicates and near duplicates
(pipelines.dedup.similar_pairs at clean.near_dup_threshold, as the grouping) that sit in different splits; it
is zero by construction as long as split.group_threshold <= clean.near_dup_threshold, and the stage fails
if it is not. When a split gets no row, the error names the cause: too few rows for its ratio, or
groups too large to cut at that ratio (with the largest group's size).
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandera.errors
from tqdm.auto import tqdm

from pipelines import mixing
from pipelines.config import Params, SplitConfig
from pipelines.dedup import components, conversation_lines, conversation_text, exact_key, similar_pairs
from pipelines.io import StageError, StageResult, atomic_dir, chunked, claim_output, require, write_json, write_jsonl
from pipelines.schemas import MISSING as MISSING  # the stratum of rows without the field (re-exported)
from pipelines.schemas import (
    PROBE_FILE,
    SplitSchema,
    describe_failures,
    field_label,
    field_value,
    package_rows,
    validate,
)

log = logging.getLogger(__name__)

STAGE = "split"
SPLITS = ("train", "validation", "test")
LEAK_EXAMPLES = 5  # example pairs kept in the leakage report
VALIDATE_ROWS = 10_000  # rows per pandera check


stratum_of = field_label  # the stratum label of a row: the field's value as a string (JSON for non-strings)


def group_keys(keys: Sequence[str], lines: Sequence[str], threshold: float, num_perm: int = 128,
               shingle_size: int = 3, boilerplate_share: float = 0.1, own_ratio: float = 0.6) -> list[str]:
    """The group key of each row: the smallest exact_key among its exact and near duplicates.

    keys: exact_key(conversation_text(row)) per row; lines: conversation_lines(row) per row."""
    distinct = sorted(set(keys))  # canonical order: grouping must not depend on the input order
    lines_of: dict[str, str] = {}
    for key, form in zip(keys, lines, strict=True):  # copies may differ in line breaks: the smallest form, always
        if key not in lines_of or form < lines_of[key]:
            lines_of[key] = form
    pairs = similar_pairs([lines_of[k] for k in distinct], threshold, num_perm, shingle_size, boilerplate_share,
                          own_ratio)
    labels = components(len(distinct), pairs)
    # cluster labels a group by its smallest index, which in sorted order is the smallest exact_key.
    group_of = {k: distinct[label] for k, label in zip(distinct, labels, strict=True)}
    return [group_of[k] for k in keys]


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\x00{group}".encode()).hexdigest()


def assign_groups(sizes: dict[str, int], strata: dict[str, str], cfg: SplitConfig) -> dict[str, str]:
    """Split name of each group: seeded order within each stratum, cut at cumulative ratios by row count."""
    bounds = (cfg.train, cfg.train + cfg.validation)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group in sizes:
        by_stratum[strata[group]].append(group)
    assigned: dict[str, str] = {}
    for groups in by_stratum.values():
        groups.sort(key=lambda g: _rank(cfg.seed, g))
        total = sum(sizes[g] for g in groups)
        seen = 0
        for group in groups:
            middle = (seen + sizes[group] / 2) / total  # where the group's middle row falls, in [0, 1]
            assigned[group] = SPLITS[0] if middle < bounds[0] else SPLITS[1] if middle < bounds[1] else SPLITS[2]
            seen += sizes[group]
    return assigned


def join_families(groups: Sequence[str], families: Sequence[str]) -> list[str]:
    """Groups joined so that rows of one family (a non-empty `expanded_from`: the rows the format stage made of one
    conversation for a template that rewrites history) share one group, named by its smallest group key."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g] = parent.get(parent[g], parent[g])
        return g

    first_of: dict[str, str] = {}
    for group, family in zip(groups, families, strict=True):
        if not family:
            continue
        if family not in first_of:
            first_of[family] = group
            continue
        a, b = find(first_of[family]), find(group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(g) for g in groups]


def plan(keys: Sequence[str], lines: Sequence[str], strata: Sequence[str], cfg: SplitConfig, num_perm: int = 128,
         shingle_size: int = 3, boilerplate_share: float = 0.1, own_ratio: float = 0.6,
         families: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(group, split name) of each row from its exact key, conversation lines and stratum (see group_keys), the
    rows of one expanded conversation (`families`) kept in one group; a pure function of content."""
    groups = group_keys(keys, lines, cfg.group_threshold, num_perm, shingle_size, boilerplate_share, own_ratio)
    if families is not None and any(families):
        groups = join_families(groups, families)
    sizes = Counter(groups)
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for group, stratum in zip(groups, strata, strict=True):
        votes[group][stratum] += 1
    # most common value; ties go to the smallest value so the choice is deterministic
    group_strata = {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in votes.items()}
    split_of = assign_groups(dict(sizes), group_strata, cfg)
    return groups, [split_of[g] for g in groups]


def split_rows(rows: Sequence[dict[str, Any]], cfg: SplitConfig, num_perm: int = 128, shingle_size: int = 3,
               boilerplate_share: float = 0.1, own_ratio: float = 0.6) -> dict[str, list[dict[str, Any]]]:
    """Rows (+ "group") per split, each list sorted by id; a pure function of the rows' content and cfg."""
    strata = [stratum_of(r, cfg.stratify_by) if cfg.stratify_by else "" for r in rows]
    keys = [exact_key(conversation_text(r)) for r in rows]
    groups, names = plan(keys, [conversation_lines(r) for r in rows], strata, cfg, num_perm, shingle_size,
                         boilerplate_share, own_ratio, [str(r.get("expanded_from") or "") for r in rows])
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row, group, name in zip(rows, groups, names, strict=True):
        out[name].append({**row, "group": group})
    for name in SPLITS:
        out[name].sort(key=lambda r: str(r["id"]))
    return out


def leakage(splits: Mapping[str, Iterable[dict[str, Any]]], threshold: float, num_perm: int = 128,
            shingle_size: int = 3, boilerplate_share: float = 0.1, own_ratio: float = 0.6) -> dict[str, Any]:
    """Exact and near duplicates (similar_pairs at threshold, as the grouping) that sit in
    different splits, with a few examples.

    Each split's rows are iterated once and only their id, key and lines kept, so they can be streamed from
    files."""
    names, ids, keys, lines = [], [], [], []
    for name, rows in splits.items():
        for row in rows:
            names.append(name)
            ids.append(row.get("id"))
            keys.append(exact_key(conversation_text(row)))
            lines.append(conversation_lines(row))
    return leakage_of(names, ids, keys, lines, threshold, num_perm, shingle_size, boilerplate_share, own_ratio)


def leakage_of(names: Sequence[str], ids: Sequence[Any], keys: Sequence[str], lines: Sequence[str],
               threshold: float, num_perm: int = 128, shingle_size: int = 3,
               boilerplate_share: float = 0.1, own_ratio: float = 0.6) -> dict[str, Any]:
    """leakage() over parallel lists: the split name, id, exact_key and conversation_lines of each row."""
    splits_of_key: dict[str, set[str]] = defaultdict(set)
    for key, name in zip(keys, names, strict=True):
        splits_of_key[key].add(name)
    exact = sum(len(s) > 1 for s in splits_of_key.values())
    near = 0
    examples: list[dict[str, Any]] = []
    for i, j, jaccard in similar_pairs(lines, threshold, num_perm, shingle_size, boilerplate_share, own_ratio):
        if names[i] == names[j]:
            continue
        if keys[i] != keys[j]:  # identical texts are already counted as exact duplicates
            near += 1
        if len(examples) < LEAK_EXAMPLES:
            examples.append({"a": {"split": names[i], "id": ids[i]}, "b": {"split": names[j], "id": ids[j]},
                             "jaccard": round(jaccard, 4)})
    return {"exact_duplicates_across_splits": exact, "near_duplicate_pairs_across_splits": near,
            "threshold": threshold, "examples": examples, "passed": exact == 0 and near == 0}


def empty_split_reason(name: str, groups: Sequence[str], strata: Sequence[str], cfg: SplitConfig) -> str:
    """One sentence on why split `name` got no row: too few rows for its ratio, or groups too large."""
    ratio, n = getattr(cfg, name), len(groups)
    sizes = Counter(groups)
    largest = max(sizes.values())
    where = ""
    if cfg.stratify_by and len(set(strata)) > 1:
        by_stratum = Counter(strata)
        stratum, rows = min(by_stratum.items(), key=lambda kv: (kv[1], kv[0]))
        where = f" (split.stratify_by = '{cfg.stratify_by}': the smallest stratum, {stratum!r}, has {rows} rows)"
        n = rows
    if ratio * n < 1:
        return (f"split '{name}' is empty: split.{name} = {ratio:g} of {n} rows is {ratio * n:.2g} rows{where}, less "
                f"than one; add data or raise split.{name} in params.yaml")
    return (f"split '{name}' is empty: the {len(groups)} rows form {len(sizes)} groups of near duplicates (rows at "
            f"least split.group_threshold = {cfg.group_threshold:g} similar) and the largest holds {largest} rows"
            f"{where}; a group never spans two splits, so no group fell into the {ratio:.0%} for '{name}'; raise "
            "split.group_threshold (up to clean.near_dup_threshold), add more varied data or change the ratios")


def _validated(name: str, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of one split, checked against SplitSchema VALIDATE_ROWS at a time (memory stays flat)."""
    previous, seen = None, 0
    for chunk in chunked(rows, VALIDATE_ROWS):
        what, fix = f"split '{name}'", "re-run the format stage"
        try:
            validate(SplitSchema, chunk)
        except pandera.errors.SchemaErrors as exc:
            raise StageError(describe_failures(exc, what, fix, offset=seen)) from None
        ids = [str(r.get("id")) for r in chunk]  # sorted: a repeated id sits next to itself, across chunks too
        repeats = [i for i, (a, b) in enumerate(zip([previous, *ids], ids, strict=False)) if a == b]
        if repeats:
            raise StageError(f"{what} breaks the row contract ({len(repeats)} failure(s)) at line "
                             f"{seen + repeats[0] + 1}: column 'id' fails field_uniqueness; {fix}")
        previous, seen = ids[-1], seen + len(chunk)
        yield from chunk


def _report(names: Sequence[str], groups: Sequence[str], strata: Sequence[str], cfg: SplitConfig,
            leak: dict[str, Any]) -> dict[str, Any]:
    total = len(names)
    counts = Counter(names)
    group_sizes = Counter(groups)
    groups_per_split: dict[str, set[str]] = {name: set() for name in SPLITS}
    for name, group in zip(names, groups, strict=True):
        groups_per_split[name].add(group)
    report: dict[str, Any] = {
        "rows": total, "groups": len(group_sizes), "largest_group": max(group_sizes.values(), default=0),
        "seed": cfg.seed, "ratios": {name: getattr(cfg, name) for name in SPLITS},
        "counts": {name: counts[name] for name in SPLITS},
        "fractions": {name: round(counts[name] / total, 4) if total else 0.0 for name in SPLITS},
        "groups_per_split": {name: len(groups_per_split[name]) for name in SPLITS},
    }
    if cfg.stratify_by:
        per_stratum: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
        for name, stratum in zip(names, strata, strict=True):
            per_stratum[stratum][name] += 1
        report["stratify_by"] = cfg.stratify_by
        report["strata"] = {k: per_stratum[k] for k in sorted(per_stratum)}
    report["leakage"] = leak
    return report


@dataclass
class _Scan:
    """What the split needs of each formatted row, without the row: ~0.3 KB a row."""

    offsets: array = field(default_factory=lambda: array("q"))  # byte offset of the row's line in the file
    ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # exact_key(conversation_text): identity and group names
    lines: list[str] = field(default_factory=list)  # conversation_lines, for grouping and the leakage check
    strata: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)  # expanded_from ('' for none): one conversation, one group
    has_field: bool = False  # any row has split.stratify_by
    sources: list[str] = field(default_factory=list)  # the raw file of each row (one string object per file)
    replay: list[bool] = field(default_factory=list)  # a replayed general row (pipelines.ingest, data.replay)
    values: list[str] = field(default_factory=list)  # data.balance_by value of each row, when it is set
    has_value: bool = False  # any task row has data.balance_by


def _scan(source: Path, stratify_by: str | None, balance_by: str | None = None) -> _Scan:
    scan, labels = _Scan(), {"": ""}  # one string object per stratum label, value and source
    offset = 0
    with open(source, "rb") as fh:
        for line in tqdm(fh, desc="split: read", unit=" rows", disable=None, mininterval=2):
            if line.strip():
                row = json.loads(line)
                scan.offsets.append(offset)
                scan.ids.append(str(row.get("id")))
                scan.keys.append(exact_key(conversation_text(row)))
                scan.lines.append(conversation_lines(row))
                scan.families.append(str(row.get("expanded_from") or ""))
                replay = row.get("replay") is True
                label = ""
                if stratify_by:
                    scan.has_field |= not replay and field_value(row, stratify_by) is not None
                    label = stratum_of(row, stratify_by)
                scan.strata.append(labels.setdefault(label, label))
                src = str(row.get("source"))
                scan.sources.append(labels.setdefault(src, src))
                scan.replay.append(replay)
                if balance_by:
                    scan.has_value |= not replay and field_value(row, balance_by) is not None
                    value = stratum_of(row, balance_by)
                    scan.values.append(labels.setdefault(value, value))
            offset += len(line)
    return scan


def _eligible_replay(pool: list[int], held_out: list[int], lines: Sequence[str], probe_lines: Sequence[str],
                     threshold: float, num_perm: int, shingle_size: int, boilerplate_share: float,
                     own_ratio: float) -> tuple[list[int], int, int]:
    """(replay rows that may train, how many were too similar to a validation/test row, to a probe row).

    A replay row at least `threshold` (split.group_threshold) similar to a held-out row would have been grouped
    with it, and one similar to the forgetting probe would train on what the probe measures: both are left out."""
    if not pool:
        return [], 0, 0
    texts = [lines[i] for i in pool] + [lines[i] for i in held_out] + list(probe_lines)
    n_pool, n_held = len(pool), len(held_out)
    near_eval: set[int] = set()
    near_probe: set[int] = set()
    for a, b, _ in similar_pairs(texts, threshold, num_perm, shingle_size, boilerplate_share, own_ratio):
        if a < n_pool <= b:  # pairs are (i, j) with i < j: a replay row and a later text
            (near_eval if b < n_pool + n_held else near_probe).add(a)
    near_probe -= near_eval
    eligible = [i for k, i in enumerate(pool) if k not in near_eval and k not in near_probe]
    return eligible, len(near_eval), len(near_probe)


def _per_source(names: Sequence[str | None], sources: Sequence[str], train: Sequence[int],
                task: Sequence[int]) -> dict[str, dict[str, int]]:
    """Rows per source file: in each natural split, and in the train split as written (mixed, with replay)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {**dict.fromkeys(SPLITS, 0), "train_mixed": 0})
    for i in task:
        table[sources[i]][names[i]] += 1
    for i in train:
        table[sources[i]]["train_mixed"] += 1
    return {source: table[source] for source in sorted(table)}


def run(params: Params) -> StageResult:
    """Split formatted/dataset.jsonl into splits/ (see the module docstring).

    Two passes, so memory grows by ~0.3 KB per row whatever the rows' size: the first keeps each row's id,
    text, stratum and byte offset and plans the split; the second re-reads each split's rows in id order
    by offset, validates them in chunks and writes them.
    """
    cfg, data = params.split, params.data
    out_dir = claim_output(params, "splits")  # before any work: the folder is the stage's own, and writable
    source = require(params.path("formatted") / "dataset.jsonl", "format")
    scan = _scan(source, cfg.stratify_by, data.balance_by)
    n = len(scan.ids)
    task = [i for i in range(n) if not scan.replay[i]]  # the rows the split is planned on
    pool = [i for i in range(n) if scan.replay[i]]  # replayed general rows: train only, never held out
    if not task:
        raise StageError(f"'{source}' has no rows to split; check formatted/quarantine.jsonl and the format stage")
    if cfg.stratify_by and not scan.has_field:
        raise StageError(f"split.stratify_by = '{cfg.stratify_by}' is not a field of any row in '{source}'; "
                         "use a dotted field such as 'meta.category', or null")
    if data.balance_by and not scan.has_value:
        raise StageError(f"data.balance_by = '{data.balance_by}' is not a field of any row in '{source}'; use a "
                         "dotted field such as 'meta.category', or null")
    if data.replay.fraction > 0 and not pool:
        raise StageError(f"data.replay.fraction = {data.replay.fraction:g} but '{source}' has no replay rows; re-run "
                         "the ingest stage and the stages after it (python -m pipelines ingest, clean, format)")
    raw_rel = mixing.raw_dir_relative(params.path("raw_dir"), params.root)
    mixing.check_sources([scan.sources[i] for i in task], data, raw_rel)
    clean = params.clean

    def of_task(values: list[Any]) -> list[Any]:
        return [values[i] for i in task]

    task_groups, task_names = plan(of_task(scan.keys), of_task(scan.lines), of_task(scan.strata), cfg, clean.num_perm,
                                   clean.shingle_size, clean.boilerplate_share, clean.own_similarity_ratio,
                                   of_task(scan.families))
    counts = Counter(task_names)
    for name in SPLITS:
        if not counts[name] and getattr(cfg, name) > 0:
            raise StageError(empty_split_reason(name, task_groups, of_task(scan.strata), cfg))
    groups: list[str] = [scan.keys[i] for i in range(n)]  # a replay row is a group of its own
    names: list[str | None] = [None] * n  # None: a replay row not chosen
    for i, group, name in zip(task, task_groups, task_names, strict=True):
        groups[i], names[i] = group, name
    natural_train = [i for i in task if names[i] == "train"]
    train, mix_report = mixing.mix_train(natural_train, scan.ids, scan.sources,
                                         scan.values if data.balance_by else None, data, cfg.seed, raw_rel)
    held_out = [i for i in task if names[i] != "train"]
    probe_lines = [conversation_lines(r) for r in package_rows(PROBE_FILE)] if pool else []
    eligible, near_eval, near_probe = _eligible_replay(
        pool, held_out, scan.lines, probe_lines, cfg.group_threshold, clean.num_perm, clean.shingle_size,
        clean.boilerplate_share, clean.own_similarity_ratio)
    replayed = mixing.pick_replay(eligible, scan.ids, len(train), data.replay.fraction, cfg.seed, len(pool),
                                  data.replay.file)
    for i in replayed:
        names[i] = "train"
    written = [i for i in range(n) if names[i] is not None]  # each row once: copies add nothing to leakage
    leak = leakage_of([names[i] for i in written], [scan.ids[i] for i in written], [scan.keys[i] for i in written],
                      [scan.lines[i] for i in written], clean.near_dup_threshold, clean.num_perm, clean.shingle_size,
                      clean.boilerplate_share, clean.own_similarity_ratio)
    if not leak["passed"]:
        raise StageError(
            f"splits leak: {leak['exact_duplicates_across_splits']} exact and "
            f"{leak['near_duplicate_pairs_across_splits']} near duplicates sit in different splits; set "
            f"split.group_threshold ({cfg.group_threshold}) <= clean.near_dup_threshold "
            f"({params.clean.near_dup_threshold})"
        )
    train_picks = mixing.copies(sorted([*train, *replayed], key=scan.ids.__getitem__))
    report = _report(task_names, task_groups, of_task(scan.strata), cfg, leak)
    report["counts"]["train"] = len(train_picks)  # rows written; the natural split is in "mixing"
    report["per_source"] = _per_source(names, scan.sources, [i for i, _ in train_picks], task)
    report["mixing"] = mix_report
    report["replay"] = {
        "fraction": data.replay.fraction, "file": data.replay.file, "pool": len(pool),
        "too_similar_to_held_out": near_eval, "too_similar_to_probe": near_probe, "eligible": len(eligible),
        "train_rows": len(replayed), "unused": len(pool) - len(replayed),
        "share_of_train": round(len(replayed) / len(train_picks), 4) if train_picks else 0.0,
    }
    scan.lines.clear()
    with atomic_dir(out_dir, "splits") as tmp, open(source, "rb") as fh:

        def rows(order: Sequence[tuple[int, int]]) -> Iterator[dict[str, Any]]:
            for i, k in order:
                fh.seek(scan.offsets[i])
                row = {**json.loads(fh.readline()), "group": groups[i]}
                if k > 1:  # a repeated row (data.sources weight > 1, data.balance_rows): its own id, its group
                    row.update(id=mixing.copy_id(row["id"], k), copy_of=row["id"])
                yield row

        for name in SPLITS:
            order = train_picks if name == "train" else \
                [(i, 1) for i in sorted((i for i in task if names[i] == name), key=scan.ids.__getitem__)]
            write_jsonl(tmp / f"{name}.jsonl", _validated(name, rows(order)))
        write_json(tmp / "report.json", report)
    log.info("split %d rows in %d groups: %s", report["rows"], report["groups"], report["counts"])
    if pool or data.sources or data.balance_by:
        log.info("train split mixed: %d natural task rows -> %d task rows + %d replay rows",
                 len(natural_train), len(train), len(replayed))
    metrics: dict[str, Any] = {f"rows_{name}": n for name, n in report["counts"].items()}
    metrics.update(groups=report["groups"], largest_group=report["largest_group"],
                   leakage_exact=leak["exact_duplicates_across_splits"],
                   leakage_near=leak["near_duplicate_pairs_across_splits"],
                   rows_train_natural=len(natural_train), rows_train_replay=len(replayed),
                   rows_per_source=report["per_source"])
    if "strata" in report:
        metrics["strata"] = report["strata"]
    return StageResult(
        stage=STAGE,
        outputs={name: out_dir / f"{name}.jsonl" for name in SPLITS} | {"report": out_dir / "report.json"},
        metrics=metrics,
    )
