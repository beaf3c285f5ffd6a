"""File helpers shared by every stage: atomic writes, streaming JSONL, content hashes, stage results.

Every output is written to a temporary file in the same folder and renamed into place (os.replace is
atomic on POSIX), so a stage killed at any moment leaves the previous file or the new one, never a
partial file that a downstream stage or DVC would pick up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, TypeVar

from pipelines.errors import StageError  # stages import it from here

T = TypeVar("T")


@dataclass
class StageResult:
    """What a stage returns: where it wrote, and the figures that Dagster shows as metadata."""

    stage: str
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        figures = ", ".join(f"{k}={v}" for k, v in self.metrics.items() if isinstance(v, (int, float, str)))
        return f"{self.stage}: {figures}"


def _temp_prefix(path: Path) -> str:
    # The writer's pid is in the name, so a later writer can tell a killed run's leftover from a live one.
    return f".{path.name}.{os.getpid()}."


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` left by writers that were killed (their pid no longer runs).

    A pid that is alive again (reused) only keeps a leftover one run longer, never deletes a live one.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\..*\.tmp")
    for entry in path.parent.iterdir() if path.parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match.group(1))):
            _remove(entry)


def _remove(path: Path) -> None:
    """Delete a folder tree, a file or a symlink (not what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """open() for writing that only replaces `path` when the block finishes without error."""
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as fh:
            yield fh


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a whole folder in a temporary sibling and swap it into place when the block succeeds.

    On Linux the swap is one atomic exchange of the two names, so a reader (or a kill) sees the complete
    old folder or the complete new one, never neither; the old one is then deleted under the temporary
    name. Elsewhere it is two renames (old aside to .<name>.old, new in); a run killed between them
    leaves no folder, and the next write of the same folder puts the old one back first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # a previous run died between the two renames below
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists() and _exchange(tmp, path):
            _remove(tmp)  # now the previous output
            return
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Stream rows to `path` atomically; returns the number of rows written."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str))
            fh.write("\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream rows of a JSONL file written by a previous stage (trusted: errors are bugs, not user errors)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter): itertools.batched, which needs Python 3.12."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def require(path: str | Path, produced_by: str) -> Path:
    """A stage input must exist; otherwise say which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"input '{path}' is missing; run the '{produced_by}' stage first "
                         f"(python -m pipelines {produced_by})")
    return path


# A file changed less than this long ago may change again within the same coarse kernel clock tick and keep
# the same size, mtime and ctime: caches keyed by a file's stat must not remember it yet (git's "racy" rule).
RACY_NS = 1_000_000_000


def file_state(path: str | Path) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode): what a cache keyed by a file's stat compares. ctime cannot be set
    back, so a rewrite shows even when it keeps the size and restores the mtime; a replace shows as a new inode."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def settled(state: tuple[int, int, int, int]) -> bool:
    """True if the file of this `file_state` last changed more than RACY_NS ago, so the state may be remembered."""
    return time.time_ns() - max(state[1], state[2]) > RACY_NS


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path, file_hash: Callable[[Path], str] = sha256_file) -> str:
    """Content hash of a file or of a folder (relative paths + file contents, in sorted order).

    `file_hash` hashes one file; a caller that keeps hashes of unchanged files passes its cached lookup.
    """
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()
