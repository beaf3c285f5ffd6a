"""Mixing of the TRAIN split: per-source weights and caps, balancing by a field, replayed general data.

    from pipelines.mixing import mix_train, pick_replay

Pure functions over row indices (no file I/O). pipelines.split plans the natural train/validation/test split
first and then applies these to the train rows only, so validation and test keep the data's natural mix
and the evaluation measures the data as it is. In this order (params.yaml `data:`):

1. `sources` (data.sources): each train row goes to the first entry whose `match` glob matches its source
   file relative to paths.raw_dir (fnmatch: `*` also crosses `/`); an entry keeps round(weight * n) of its
   n rows, at most `max_rows`. Rows no entry matches stay as they are.
2. `balance_by` (data.balance_by): the rows of each value of the field (rows without it form the value
   "(missing)") are cut or repeated to `balance_rows` rows: the rarest value's count (min), the commonest's
   (max), or a number.
3. replay (data.replay.fraction = f): k = round(f / (1 - f) * m) replay rows join the m task rows, so that
   replay is the share f of the train split (pick_replay).

Which rows are kept, and which repeated, is a seeded choice that depends only on the rows' ids (stable:
source file and line) and split.seed, never on their order: `resample` ranks the items by
sha256(seed, step, id, occurrence) and takes the first n, going round again when n exceeds the items
(every row once before any row twice). A row taken more than once is written again with the id
`<id>#<k>` (k = 2, 3, ...) and `copy_of: <id>`, so ids stay unique and copies stay in the row's group.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig
from pipelines.io import StageError


def _rank(seed: int, step: str, row_id: str, occurrence: int) -> str:
    return hashlib.sha256(f"{seed}\x00{step}\x00{row_id}\x00{occurrence}".encode()).hexdigest()


def resample(items: Sequence[int], n: int, ids: Sequence[str], seed: int, step: str) -> list[int]:
    """n of `items` (row indices, possibly repeated) in a seeded order that depends on ids, not on the input order:
    the first n ranked items when n <= len(items), else all of them, then again from the top, as often as needed.

    A repeated index is ranked per occurrence, so the copies of one row are chosen independently."""
    if n <= 0 or not items:
        return []
    seen: Counter[int] = Counter()
    keyed = []
    for i in items:
        seen[i] += 1
        keyed.append((_rank(seed, step, ids[i], seen[i]), ids[i], seen[i], i))
    order = [i for *_, i in sorted(keyed)]
    return [order[k % len(order)] for k in range(n)]


def relative_source(source: str, raw_rel: str) -> str:
    """A row's source (relative to the project, as pipelines.ingest records it) relative to paths.raw_dir
    (`raw_rel`, that folder relative to the project); unchanged when it lies elsewhere."""
    prefix = raw_rel.rstrip("/") + "/"
    return source[len(prefix):] if raw_rel not in ("", ".") and source.startswith(prefix) else source


def raw_dir_relative(raw_dir: Path, root: Path) -> str:
    """paths.raw_dir relative to the project folder, in the form pipelines.ingest writes sources."""
    return os.fsencode(Path(os.path.relpath(raw_dir, root)).as_posix()).decode("utf-8", "backslashreplace")


def source_entries(sources: Sequence[str], cfg: DataConfig, raw_rel: str) -> list[int | None]:
    """For each source, the index of the first data.sources entry whose glob matches it, or None."""
    out: list[int | None] = []
    cache: dict[str, int | None] = {}
    for source in sources:
        if source not in cache:
            rel = relative_source(source, raw_rel)
            cache[source] = next((k for k, e in enumerate(cfg.sources) if fnmatch.fnmatchcase(rel, e.match)), None)
        out.append(cache[source])
    return out


def check_sources(all_sources: Sequence[str], cfg: DataConfig, raw_rel: str) -> None:
    """Every data.sources entry matches a source of the data; a StageError naming the entry otherwise."""
    distinct = sorted(set(all_sources))
    entries = source_entries(distinct, cfg, raw_rel)
    for k, entry in enumerate(cfg.sources):
        if k not in entries:
            have = ", ".join(relative_source(s, raw_rel) for s in distinct[:10])
            raise StageError(f"data.sources[{k}].match = '{entry.match}' matches no source file of the data "
                             f"(relative to paths.raw_dir: {have}{', ...' if len(distinct) > 10 else ''}), or only "
                             "files an earlier entry already matches; fix the glob or remove the entry")


def _target(rows: str | int, counts: Counter[str]) -> int:
    return min(counts.values()) if rows == "min" else max(counts.values()) if rows == "max" else int(rows)


def mix_train(train: Sequence[int], ids: Sequence[str], sources: Sequence[str], values: Sequence[str] | None,
              cfg: DataConfig, seed: int, raw_rel: str) -> tuple[list[int], dict[str, Any]]:
    """The task rows of the mixed train split (indices, a row repeated as often as it is taken) and the report.

    train: indices of the natural train rows; ids, sources: per row (all rows); values: the balance_by value
    of each row (None when data.balance_by is off). Steps 1 and 2 of the module docstring."""
    picked = list(train)
    report: dict[str, Any] = {"train_rows_natural": len(train)}
    if cfg.sources:
        entry_of = source_entries([sources[i] for i in train], cfg, raw_rel)
        by_entry: dict[int | None, list[int]] = defaultdict(list)
        for i, entry in zip(train, entry_of, strict=True):
            by_entry[entry].append(i)
        picked = list(by_entry.get(None, []))
        rows = []
        for k, entry in enumerate(cfg.sources):
            mine = by_entry.get(k, [])
            n = round(entry.weight * len(mine))
            if entry.max_rows is not None:
                n = min(n, entry.max_rows)
            chosen = resample(mine, n, ids, seed, f"source:{entry.match}")
            picked += chosen
            rows.append({"match": entry.match, "weight": entry.weight, "max_rows": entry.max_rows,
                         "files": sorted({relative_source(sources[i], raw_rel) for i in mine}),
                         "train_rows": len(mine), "train_rows_mixed": len(chosen)})
        report["sources"] = rows
    if values is not None:
        by_value: dict[str, list[int]] = defaultdict(list)
        for i in picked:
            by_value[values[i]].append(i)
        counts = Counter({v: len(rows) for v, rows in by_value.items()})
        target = _target(cfg.balance_rows, counts) if counts else 0
        picked = []
        for value in sorted(by_value):
            picked += resample(by_value[value], target, ids, seed, f"balance:{value}")
        report["balance"] = {"by": cfg.balance_by, "rows": cfg.balance_rows, "rows_per_value": target,
                             "values": {v: {"before": counts[v], "after": target} for v in sorted(counts)}}
    multiplicity = Counter(picked)
    report.update(train_rows_mixed=len(picked), rows_repeated=sum(n - 1 for n in multiplicity.values()),
                  rows_left_out=sum(1 for i in train if i not in multiplicity))
    if train and not picked:
        raise StageError(f"data.sources / data.balance_by leave no row of the {len(train)} train rows (weights of 0, "
                         "or a balance_rows of the rarest value's count when a value has no rows); raise a weight")
    return sorted(picked, key=lambda i: ids[i]), report


def replay_rows(task_train_rows: int, fraction: float) -> int:
    """How many replay rows make the share `fraction` of a train split with `task_train_rows` task rows."""
    return round(fraction / (1 - fraction) * task_train_rows) if fraction > 0 else 0


def pick_replay(eligible: Sequence[int], ids: Sequence[str], task_train_rows: int, fraction: float, seed: int,
                pool: int, file: str) -> list[int]:
    """replay_rows(...) of the eligible replay rows, a seeded choice by id; a StageError naming data.replay.fraction
    when the file cannot fill that share (`pool`: its rows in the formatted data, before the eligibility checks)."""
    k = replay_rows(task_train_rows, fraction)
    if k > len(eligible):
        most = len(eligible) / (len(eligible) + task_train_rows) if eligible else 0.0
        raise StageError(f"data.replay.fraction = {fraction:g} needs {k} replay rows next to {task_train_rows} task "
                         f"train rows, but data.replay.file '{file}' has only {len(eligible)} usable ({pool} "
                         "formatted, the rest too similar to validation, test or probe rows); lower the fraction to "
                         f"at most {int(most * 1000) / 1000:g} or give a larger file")
    return sorted(resample(eligible, k, ids, seed, "replay"), key=lambda i: ids[i])


def copies(picked: Sequence[int]) -> list[tuple[int, int]]:
    """(index, k) for each pick in order: k = 1 the first time a row appears, 2, 3, ... for its repeats."""
    seen: Counter[int] = Counter()
    out = []
    for i in picked:
        seen[i] += 1
        out.append((i, seen[i]))
    return out


def copy_id(row_id: str, k: int) -> str:
    """The id of the k-th copy of a row in the train split (k = 1: the row itself)."""
    return row_id if k == 1 else f"{row_id}#{k}"
