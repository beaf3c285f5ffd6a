"""File helpers shared by every stage: atomic writes, streaming JSONL, content hashes, stage results.

Every output is written to a temporary file in the same folder and renamed into place (os.replace is
atomic on POSIX), so a stage killed at any moment leaves the previous file or the new one, never a
partial file that a downstream stage or DVC would pick up.

A stage replaces only what it owns. Every output folder it writes holds a marker file, MARKER
(`.pipelines-output`, naming the paths key and the stage), inside the folder so that DVC caches and
restores it with the output. `atomic_dir` replaces a folder only if it is absent, empty, holds that
marker, or is recognisably an output of the same stage written before markers existed (OUTPUTS: a
signature file and nothing but the stage's own file names); anything else is refused with one sentence
before any work (`claim_output`, which each stage calls first and `check-params` calls for every key).
The same call checks that the output can be written and the previous one deleted, so a permission
problem is one sentence before the work, never a traceback after the new output was swapped in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import logging
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
log = logging.getLogger(__name__)


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
            if entry.exists() or entry.is_symlink():
                log.warning("'%s', a temporary left by a killed run, cannot be deleted (permissions); delete it "
                            "by hand", entry)


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


# ------------------------------------------------------------------------------------------ output ownership

MARKER = ".pipelines-output"
RUN_RECORD = ".run.json"  # pipelines.records: what a run made, written beside its output (never foreign to it)


@dataclass(frozen=True)
class Output:
    """The folder `paths.<key>` that one stage writes whole, and how to recognise one written before markers."""

    stage: str  # the command that writes it: python -m pipelines <stage> (from the manifest, pipelines/stages.py)
    signature: str  # a file every complete output of the stage holds ('' : none written before markers existed)
    names: tuple[str, ...]  # fnmatch patterns of every top-level name such an output holds


_MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "README.md")
_DATA = ("examples.jsonl", "quarantine.jsonl", "report.json")
# Outputs that existed before ownership markers did, recognised by their files (signature, names) so that an
# upgraded project's data/ is not refused; every stage added since writes its marker from its first run.
_BEFORE_MARKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base_model": ("source.json", _MODEL_FILES),
    "raw_examples": ("report.json", _DATA),
    "cleaned": ("report.json", (*_DATA, "changes.jsonl")),
    "formatted": ("report.json", ("dataset.jsonl", "quarantine.jsonl", "report.json")),
    "splits": ("report.json", ("train.jsonl", "validation.jsonl", "test.jsonl", "report.json")),
    "adapter": ("train_metrics.json", (*_MODEL_FILES, "loss_curve.png")),
    "evaluation": ("report.html", ("report.html", "report.md", "*.png", "*.csv", "examples.jsonl")),
    "promoted": ("PROMOTED.json", (*_MODEL_FILES, "loss_curve.png")),
}
# JSON keys by which a one-file output (a stage's DVC metrics) written before markers is recognised.
_FILE_KEYS: dict[str, tuple[str, ...]] = {"metrics": ("primary_metric", "gate")}


def _outputs() -> tuple[dict[str, Output], dict[str, tuple[str, tuple[str, ...]]]]:
    from pipelines.stages import STAGES

    folders, files = {}, {}
    for stage in STAGES:
        for key in stage.outputs:
            signature, names = _BEFORE_MARKERS.get(key, ("", ()))
            folders[key] = Output(stage.name, signature, names)
        for key in stage.metrics:
            files[key] = (stage.name, _FILE_KEYS.get(key, ()))
    return folders, files


# paths key -> Output of every folder a stage writes whole; paths key -> (stage, JSON keys) of one-file outputs.
OUTPUTS, FILE_OUTPUTS = _outputs()


def _marker(key: str) -> str:
    stage = OUTPUTS[key].stage
    return json.dumps({"key": f"paths.{key}", "stage": stage,
                       "note": f"written by `python -m pipelines {stage}`, which replaces this whole folder on "
                               "every run; keep no other files here"}, indent=2) + "\n"


def _marker_key(folder: Path) -> str | None:
    """The paths key named by the folder's marker ('' for an unreadable marker), None without one."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        key = json.loads(marker.read_text(encoding="utf-8")).get("key", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return key.removeprefix("paths.") if isinstance(key, str) else ""


def ownership_problem(path: str | Path, key: str) -> str | None:
    """Why the stage that writes `paths.<key>` must not replace `path` (a clause), or None if it may.

    It may replace nothing, an empty folder, a folder holding its own marker, or a folder written by the
    same stage before markers existed (the stage's signature file and only the stage's own file names).
    """
    path = Path(path)
    if key in FILE_OUTPUTS:
        stage, keys = FILE_OUTPUTS[key]
        if not path.exists():
            return None
        if not path.is_file():
            return f"is a folder, not the file the {stage} stage writes"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and all(k in data for k in keys):
            return None
        return f"is a file that the {stage} stage did not write (it is not its JSON metrics)"
    output = OUTPUTS[key]
    if not path.exists():
        return None  # absent, or a dangling link that the new folder replaces
    if not path.is_dir():
        return f"is a file, not a folder that the {output.stage} stage writes"
    owner = _marker_key(path)
    if owner == key:
        return None
    if owner:
        other = OUTPUTS[owner].stage if owner in OUTPUTS else "another"
        return f"holds the output of paths.{owner} (the {other} stage), not of paths.{key}"
    if owner == "":
        return f"has an unreadable {MARKER} marker"
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror}), so what it holds is unknown"
    if not entries:
        return None
    entries = [e for e in entries if e.name != RUN_RECORD]
    if not entries:
        return None
    foreign = [e.name for e in entries if not e.is_file()
               or not any(fnmatch.fnmatchcase(e.name, pattern) for pattern in output.names)]
    if not foreign and output.signature and (path / output.signature).is_file():
        return None  # written by this stage before markers existed
    example = ", ".join(f"'{name}'" for name in (foreign or [e.name for e in entries])[:3])
    return f"holds files that the {output.stage} stage did not write ({example}) and no {MARKER} marker"


def _denied(path: Path) -> str:
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"'{path}' is on a read-only file system"
    return f"'{path}' is not writable (permission denied)"


def writability_problem(path: str | Path) -> str | None:
    """Why the output `path` (a folder or a file) cannot be written and its previous version deleted, or None.

    Checks, with the process's own rights (os.access: root without CAP_DAC_OVERRIDE is refused too), that the
    nearest existing parent folder takes new entries, and that every folder of a previous output lets its
    entries be deleted; a previous output that cannot be deleted would be left behind after the swap.
    """
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"'{ancestor}' is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return _denied(ancestor)
    if path.is_dir() and not path.is_symlink():
        unreadable: list[OSError] = []
        for folder, _, _ in os.walk(path, onerror=unreadable.append):
            if not os.access(folder, os.W_OK | os.X_OK):
                return _denied(Path(folder)) + ", so the previous output in it cannot be deleted"
        if unreadable:
            return f"'{unreadable[0].filename}' cannot be read ({unreadable[0].strerror}), so the previous output " \
                   "in it cannot be deleted"
    return None


def claim_output(params: Any, key: str, *, writable: bool = True) -> Path:
    """Check before any work that the stage may replace `paths.<key>`, and can; its absolute path.

    `params` is a pipelines.config.Params. Raises StageError (one sentence naming the key, the folder and
    the fix) if the path holds something the stage did not write, or (writable=True) cannot be written.
    """
    path = params.path(key)
    value = getattr(params.paths, key)
    problem = ownership_problem(path, key)
    if problem:
        stage = FILE_OUTPUTS[key][0] if key in FILE_OUTPUTS else OUTPUTS[key].stage
        what = "file" if key in FILE_OUTPUTS else "whole folder"
        raise StageError(f"paths.{key} = '{value}' {problem}, and the {stage} stage replaces its {what}; point "
                         f"paths.{key} at a new or empty {'path' if key in FILE_OUTPUTS else 'folder'}, or move "
                         "those files away")
    if writable:
        problem = writability_problem(path)
        if problem:
            raise StageError(f"cannot write paths.{key} = '{value}': {problem}; make it writable (e.g. chmod -R u+w) "
                             f"or point paths.{key} elsewhere")
    return path


# errno of an OSError that the environment causes (full disk, permissions), not a bug: one sentence, exit 2
_ENVIRONMENT = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE}


def _environment_error(exc: OSError, target: Path) -> StageError:
    """One sentence for an OSError met while writing `target`: which file, what happened, what to do."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else str(target)
    reason = exc.strerror or str(exc)
    advice = ("free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else "check the disk" if exc.errno == errno.EIO else "fix its permissions")
    if not Path(name).is_relative_to(target.parent):  # an input the stage read while writing
        return StageError(f"could not read '{name}' ({reason}) while writing '{target}'; the previous output is "
                          f"unchanged; {advice} and rerun")
    return StageError(f"could not write '{target}' ({reason} at '{name}'); the previous output is unchanged; "
                      f"{advice} and rerun")


def umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        tmp_path.chmod(0o666 & ~umask())  # mkstemp makes it owner-only; an output has the mode open() would give
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _ENVIRONMENT:
            raise _environment_error(exc, path) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """open() for writing that only replaces `path` when the block finishes without error."""
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def _discard_previous(previous: Path, path: Path) -> None:
    """Delete the previous output after the swap; the new one is in place, so a failure here is only a warning."""
    shutil.rmtree(previous, ignore_errors=True)
    if previous.exists():
        log.warning("the previous output of '%s' could not be deleted and is left at '%s'; delete it by hand",
                    path, previous)


@contextlib.contextmanager
def atomic_dir(path: str | Path, owner: str) -> Iterator[Path]:
    """Build the whole folder `paths.<owner>` in a temporary sibling and swap it into place when the block succeeds.

    Before the block, and again just before the swap, the folder at `path` must be the stage's own
    (ownership_problem) and writable (writability_problem); otherwise StageError, and nothing is replaced.
    The marker file MARKER is written into the new folder last, so a copied folder cannot carry another's.
    On Linux the swap is one atomic exchange of the two names, so a reader (or a kill) sees the complete
    old folder or the complete new one, never neither; the old one is then deleted under the temporary
    name. Elsewhere it is two renames (old aside to .<name>.old, new in); a run killed between them
    leaves no folder, and the next write of the same folder puts the old one back first. An OSError the
    environment causes (permissions, full disk) becomes a StageError; the temporary folder is removed and
    the previous output stays as it was.
    """
    path = Path(path)
    stage = OUTPUTS[owner].stage

    def check() -> None:
        problem = ownership_problem(path, owner)
        if problem:
            raise StageError(f"'{path}' {problem}, and the {stage} stage replaces its whole folder; point "
                             f"paths.{owner} at a new or empty folder, or move those files away")
        problem = writability_problem(path)
        if problem:
            raise StageError(f"cannot write '{path}': {problem}; make it writable (e.g. chmod -R u+w) or point "
                             f"paths.{owner} elsewhere")

    check()
    old = path.with_name(f".{path.name}.old")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # a previous run died between the two renames below
        _remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it owner-only; outputs are read by other users (a team, DVC)
        yield tmp
        (tmp / MARKER).write_text(_marker(owner), encoding="utf-8")
        check()  # the folder may have changed while the stage worked (hours, for training)
        if path.exists() and _exchange(tmp, path):
            previous, tmp = tmp, None  # the temporary name now holds the previous output
            _discard_previous(previous, path)
            return
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            _discard_previous(old, path)
    except OSError as exc:
        if exc.errno in _ENVIRONMENT:
            raise _environment_error(exc, path) from None
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                log.warning("the temporary folder '%s' could not be deleted; delete it by hand", tmp)


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
