"""Content hashes that make staleness follow the data, not the clock (no orchestration import).

Every stage output has a data version = sha256 of the files downstream stages read (`versioned_files`), so an
output rebuilt with identical content keeps its version and nothing below it looks stale. Every stage's code
version is a hash of the files its manifest entry lists, the same files dvc.yaml lists as deps. The card
(`stage_card`) records which params, input versions, code and library versions produced an output; both doors
(the command line DVC runs, and the Dagster assets) compute it the same way and keep it in the output's run
record (pipelines.records), so either door can tell that the other already made an output up to date.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import runcard
from pipelines.config import Params
from pipelines.ingest import READERS
from pipelines.io import file_state, settled, sha256_file, sha256_tree
from pipelines.stages import BY_ASSET, PACKAGE_ROOT, Stage, upstream_assets

# Exactly the files the ingest stage reads: anything else in data/raw (a README, .gitkeep, an editor's
# hidden swap file) is not data, so it neither changes the raw data version nor triggers the sensor.
RAW_SUFFIXES = tuple(READERS)

LIBRARIES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "pandas", "pandera",
    "numpy", "datasketch", "dagster",
)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _data_files(raw_dir: Path) -> list[Path]:
    if not raw_dir.is_dir():
        return []
    return sorted(
        p for p in raw_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in RAW_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts)
    )


def raw_file_states(raw_dir: Path, previous: Mapping[str, Sequence[Any]] | None = None) -> dict[str, list[Any]]:
    """{path relative to raw_dir: [size, mtime_ns, ctime_ns, sha256]} of every data file.

    A file whose size, mtime and ctime all match `previous` keeps its recorded hash, so a sensor tick over
    gigabytes of unchanged data reads nothing (ctime cannot be set back, so `cp -p`/`rsync -t` keeping an
    old mtime still get rehashed). Any other file is hashed: a touched file keeps its hash and counts as
    unchanged. The decision is always the sha256 of the bytes, never a timestamp.
    """
    states: dict[str, list[Any]] = {}
    for path in _data_files(raw_dir):
        name, stat = path.relative_to(raw_dir).as_posix(), path.stat()
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        known = (previous or {}).get(name)
        same = known is not None and list(known[:3]) == key
        states[name] = [*key, known[3] if same else sha256_file(path)]
    return states


def raw_file_hashes(raw_dir: Path) -> dict[str, str]:
    """{path relative to raw_dir: sha256 of its bytes} for every data file; mtime plays no part."""
    return {name: state[-1] for name, state in raw_file_states(raw_dir).items()}


def combined_hash(hashes: Mapping[str, str]) -> str:
    """One hash over names and contents: renaming, adding or removing a file changes it."""
    return _sha256_text(json.dumps(sorted(hashes.items())))


HASH_CACHE = Path(".cache") / "sha256.json"  # under the project root (params.root), git-ignored


class HashCache:
    """sha256 of files, kept in a JSON file under the project and reused while a file's stat is unchanged.

    An entry holds [size, mtime_ns, ctime_ns, inode, sha256] and is trusted only when all four stat fields
    match, as `raw_file_states` does for the sensor: ctime cannot be set back, so rewriting a file (even with
    `cp -p` or `touch -d`) gets it rehashed. A file changed less than a second before it is hashed is not
    remembered: the kernel's timestamps are coarse, so a second write in the same tick could keep the same
    stat (git's "racy" rule). DVC keeps the same kind of state for the same reason: hashing a
    500 MB base model on every run is most of a warm run's cost. Losing the file, or a concurrent writer's
    entries, only costs a rehash; the file is replaced atomically, never left half-written.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            self.entries: dict[str, list[Any]] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        key, state = str(path.resolve()), file_state(path)
        known = self.entries.get(key)
        if isinstance(known, list) and tuple(known[:4]) == state:
            return known[4]
        digest = sha256_file(path)
        if settled(state):
            self.entries[key] = [*state, digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        self.entries = {k: v for k, v in self.entries.items() if Path(k).is_file()}  # forget deleted files
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".sha256-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.entries, fh)
            os.replace(tmp, self.file)
        except OSError:  # a read-only project still works, it only rehashes
            return


def content_hash(paths: Iterable[Path], root: Path | None = None) -> str:
    """Hash of files and folders (names + bytes); a missing path hashes as absent rather than failing.

    With `root` (the project folder), file hashes are cached in root/.cache/sha256.json (see HashCache).
    """
    cache = HashCache(root / HASH_CACHE) if root is not None else None
    file_hash = cache.sha256 if cache else sha256_file
    parts = [(p.name, sha256_tree(p, file_hash) if p.exists() else "missing") for p in paths]
    if cache:
        cache.save()
    return _sha256_text(json.dumps(parts))


def code_version(*modules: str) -> str:
    """Short hash of the source of `modules` (the stage and the helpers it calls); '' parts for absent ones."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec and spec.origin else None
        h.update(name.encode())
        h.update(origin.read_bytes() if origin and origin.is_file() else b"")
    return h.hexdigest()[:12]


@functools.cache
def _library_versions() -> dict[str, str]:
    return runcard.library_versions(LIBRARIES)  # reading package metadata: once per process


def library_versions() -> dict[str, str]:
    return dict(_library_versions())


def _section(params: Params, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


# What downstream stages read from each asset. Reports, logs and run cards are left out: they hold
# timings, so hashing them would give every rebuild a new version even when the data is identical.
_RUN_RECORDS = {
    "README.md", "train_log.json", "train_metrics.json", "loss_curve.png", "report.json", "quarantine.jsonl",
    ".run.json",
}


def versioned_files(asset: str, params: Params) -> list[Path]:
    """The files whose content is the DataVersion of `asset` (its stage's `versioned` files, or every file of
    its outputs except run records)."""
    stage = BY_ASSET[asset]
    if stage.versioned:
        return [params.path(key) / name if name else params.path(key) for key, name in stage.versioned]
    files: list[Path] = []
    for key in stage.outputs:
        folder = params.path(key)
        if not folder.is_dir():
            files.append(folder)
            continue
        files += sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in _RUN_RECORDS)
    return files


def stage_code_version(stage: Stage) -> str:
    """Short hash of a stage's code and data files, the same files dvc.yaml lists as its deps."""
    h = hashlib.sha256()
    for rel in stage.code_files():
        h.update(rel.encode())
        h.update((PACKAGE_ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def raw_version(params: Params) -> str:
    """DataVersion of the raw files: the same hash the sensor compares, over data files only."""
    return combined_hash(raw_file_hashes(params.path("raw_dir")))[:16]


def current_version(asset: str, params: Params) -> str:
    if asset == "raw_files":
        return raw_version(params)
    return content_hash(versioned_files(asset, params), params.root)[:16]


def stage_card(params: Params, stage: Stage) -> dict[str, Any]:
    """What identifies a stage's output: its params (hash + values), the versions of its inputs (by asset), its
    code version and the library versions. Plain JSON values; two runs with equal cards made the same output."""
    values = {s: _section(params, s) for s in stage.params}
    return {
        "params_hash": _sha256_text(json.dumps(values, sort_keys=True))[:16],
        "params": values,
        "inputs": {name: current_version(name, params) for name in upstream_assets(stage)},
        "code_version": stage_code_version(stage),
        "libraries": library_versions(),
    }
