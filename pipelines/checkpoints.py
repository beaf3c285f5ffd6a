"""Checkpoints of the train stage: which run they belong to, which one to resume from, and who may write them.

    from pipelines.checkpoints import drop_incomplete, resume_point, run_fingerprint, training_lock

Checkpoints go to <paths.checkpoints>/<run hash>, the hash of the splits, the base model, the parent adapter
(train.init_from), the train params, format.max_length and the training code (`run_fingerprint`). A checkpoint is
complete once its FINGERPRINT file is written (the trainer callback writes it last); a rerun resumes from the
newest complete checkpoint of its run:

- one written for another run (its stored hash differs) is refused with one sentence;
- one whose files do not load (`checkpoint_problem`: a truncated optimizer.pt after a full disk or a cut-off
  copy, a file swapped for a pickle that torch's weights-only loader refuses, a broken JSON) is named in one
  sentence, deleted by the main process, and the previous complete checkpoint is tried; with none left,
  training starts over. Each such sentence is logged and returned, and the stage reports them
  (train_metrics.json `corrupt_checkpoints`).

A finished run is never resumed. transformers' Trainer checks `global_step >= max_steps` (and early stopping's
`should_training_stop`) only after an optimizer step (trainer.py `_run_epoch`, trainer_callback.py
DefaultFlowCallback.on_step_end, transformers 5.23), so resuming from the checkpoint a run ended at trains one step
past the end, saves it and moves the resume point on by one at every rerun. Instead the stage keeps a copy of
the folder it wrote, `<run dir>/completed` with `completed.json` (`record_completed`), and a rerun of the same
run copies it back byte for byte without training (`completed_run`, `restore_completed`). Without that record (a
kill between the last save and the record) a checkpoint where its run ended (`finished`) is not resumed from:
the run's checkpoints are deleted and training starts over, to the same result (`unless_finished`).

Training holds a lock on the checkpoint folder (`training_lock`, fcntl.flock on <paths.checkpoints>/train.lock)
for as long as it may write there; the kernel releases it when the holder dies, however it dies. A process
that starts a run takes it exclusively, so a second concurrent trainer of the project gets one sentence
(exit 2) instead of writing the same checkpoints and adapter. The ranks of a multi-process run take it
shared, and the launching process turns its exclusive lock into a shared one before it starts them: if the
launcher is killed, the ranks it orphaned keep the lock, and a rerun is refused until they have exited, so an
orphan never writes into a folder that a rerun owns. (Two `accelerate launch` runs started by hand, without
the stage's launcher, both take the lock shared and are not kept apart from each other.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipelines import methods
from pipelines.base_model import model_hash
from pipelines.config import Params
from pipelines.io import MARKER, StageError, atomic_dir, read_json, sha256_file, sha256_tree, write_json
from pipelines.stages import BY_NAME, PACKAGE_ROOT

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
COMPLETED = "completed"  # <run dir>/completed: a copy of the folder the finished run wrote
COMPLETED_RECORD = "completed.json"  # written last: the run hash, the copy's content hash and the stage's figures
LOCK_FILE = "train.lock"
# Files the trainer writes but never reads back on resume (training_args.bin is a pickle: it is never loaded).
_NOT_LOADED = {"training_args.bin"}


def run_fingerprint(params: Params, stage: str = "train") -> dict[str, Any]:
    """What a checkpoint belongs to: hashes of the splits, the base model, the parent adapter (train.init_from), the
    train params and the training code (the code files of `stage` in the manifest, pipelines/stages.py)."""
    splits, base = params.path("splits"), params.path("base_model")
    parts = {
        "train_split": sha256_file(splits / "train.jsonl"),
        "validation_split": sha256_file(splits / "validation.jsonl") if (splits / "validation.jsonl").is_file()
        else None,
        "base_model": model_hash(base),
        "train_params": hashlib.sha256(json.dumps(params.train.model_dump(mode="json"), sort_keys=True).encode())
        .hexdigest(),
        "max_length": params.format.max_length,
        # train.init_from: the parent's weights (its path and 'promoted' are in train_params; its content is here)
        "parent_weights": _parent_weights(params),
        # the code that turns rows into batches and trains on them: a checkpoint of other code is not resumed
        "code": hashlib.sha256(b"".join((PACKAGE_ROOT / f).read_bytes() for f in BY_NAME[stage].code_files()))
        .hexdigest(),
    }
    run_hash = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"run_hash": run_hash, "parts": parts}


def _parent_weights(params: Params) -> str | None:
    parent = methods.parent_dir(params)
    return methods.weights_sha256(parent) if parent is not None and parent.is_dir() else None


def step_of(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0][:160]


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from ('optimizer.pt: <error>'), or None if every file loads.

    Each file is opened the way the trainer opens it on resume, without unpickling code and without reading
    the tensors into memory: .pt/.pth with torch.load(weights_only=True, mmap=True) and the numpy allowlist
    transformers uses for its RNG state, .safetensors by their header and size (safe_open), .json parsed.
    """
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(folder.iterdir()):
        if path.name in _NOT_LOADED or not path.is_file():
            continue
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - any failure to load makes the checkpoint unusable
            return f"{path.name}: {_first_sentence(exc)}"
    return None


@dataclass
class ResumePoint:
    """The checkpoint to resume from (None: from scratch) and one sentence per corrupt checkpoint passed over."""

    checkpoint: Path | None
    corrupt: list[str] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        return step_of(self.checkpoint) if self.checkpoint else None


def resume_point(run_dir: Path, fingerprint: dict[str, Any], *, remove_corrupt: bool = False) -> ResumePoint:
    """The newest complete checkpoint of this run whose files all load (see the module docstring).

    Raises StageError if the newest complete checkpoint was written for another run. A corrupt one is
    passed over (and deleted when `remove_corrupt`, which only the main process passes: the trainer would
    otherwise write its next checkpoint of that step into the corrupt folder).
    """
    found = ResumePoint(None)
    if not run_dir.is_dir():
        return found
    candidates = sorted((p for p in run_dir.glob("checkpoint-*") if step_of(p) >= 0), key=step_of)
    complete = [p for p in candidates if (p / FINGERPRINT).is_file() and (p / "trainer_state.json").is_file()]
    for checkpoint in reversed(complete):
        problem = None
        try:
            stored = read_json(checkpoint / FINGERPRINT)
        except (OSError, ValueError) as exc:
            stored, problem = None, f"{FINGERPRINT}: {_first_sentence(exc)}"
        if problem is None and not isinstance(stored, dict):
            problem = f"{FINGERPRINT}: not a JSON object"
        if problem is None:
            if stored.get("run_hash") != fingerprint["run_hash"]:
                changed = [k for k, v in fingerprint["parts"].items() if stored.get("parts", {}).get(k) != v]
                raise StageError(
                    f"checkpoint '{checkpoint}' was written for a different run ({', '.join(changed) or 'run hash'} "
                    "changed); delete that folder to train from scratch, or restore the data and params it was "
                    "trained with"
                )
            problem = checkpoint_problem(checkpoint)
        if problem is None:
            found.checkpoint = checkpoint
            break
        if remove_corrupt:
            shutil.rmtree(checkpoint, ignore_errors=True)
        sentence = (f"checkpoint '{checkpoint}' cannot be loaded ({problem}), so it was "
                    f"{'deleted' if remove_corrupt else 'passed over'}")
        log.warning("%s", sentence)
        found.corrupt.append(sentence)
    if found.corrupt:
        log.warning("%s", f"resuming from '{found.checkpoint}'" if found.checkpoint else
                    "no loadable checkpoint of this run is left: training starts over from step 0")
    return found


def finished(checkpoint: Path) -> bool:
    """Whether the run ended at `checkpoint`: its trainer_state.json has global_step >= max_steps, or the
    trainer's control state saved with it says training stops (early stopping, or the last step)."""
    try:
        state = read_json(checkpoint / "trainer_state.json")
    except (OSError, ValueError):
        return False
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    controls = control if isinstance(control, list) else [control]
    stop = any((c.get("args") or {}).get("should_training_stop") for c in controls if isinstance(c, dict))
    max_steps = state.get("max_steps") or 0
    return bool(stop) or (max_steps > 0 and state.get("global_step", 0) >= max_steps)


def unless_finished(resume: ResumePoint, run_dir: Path, *, remove: bool) -> ResumePoint:
    """`resume`, or no resume point when its checkpoint is where the run ended (`finished`): resuming from it
    would train past the end (module docstring). The run's checkpoints are then deleted (when `remove`, which only
    the main process passes) so the run starts over from step 0 into an empty folder."""
    if resume.checkpoint is None or not finished(resume.checkpoint):
        return resume
    log.warning("checkpoint '%s' is where its run ended, and the run's finished output was not recorded: training "
                "again from step 0 (resuming would train past the end)", resume.checkpoint)
    if remove:
        shutil.rmtree(run_dir, ignore_errors=True)
    return ResumePoint(None, resume.corrupt)


def record_completed(run_dir: Path, out: Path, fingerprint: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Keep a copy of the finished run's output folder `out` in <run dir>/completed, and completed.json (the run
    hash, the copy's sha256_tree, `metrics`) last, so a rerun of the same run restores it without training."""
    record, folder = run_dir / COMPLETED_RECORD, run_dir / COMPLETED
    record.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns(MARKER))  # atomic_dir writes the marker itself
    write_json(record, {"run_hash": fingerprint["run_hash"], "parts": fingerprint["parts"],
                        "sha256": sha256_tree(folder), "metrics": metrics})


def completed_run(run_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """completed.json of this run (`record_completed`), or None: none there, or one whose copy no longer matches
    its hash (then it is deleted, with a warning, and the run resumes or starts over as without it)."""
    record_path, folder = run_dir / COMPLETED_RECORD, run_dir / COMPLETED
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("run_hash") != fingerprint["run_hash"]:
        return None
    if not folder.is_dir() or sha256_tree(folder) != record.get("sha256"):
        log.warning("the finished run's copy '%s' does not match its record %s, so it was deleted", folder,
                    record_path)
        record_path.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return record


def restore_completed(run_dir: Path, out: Path, owner: str) -> None:
    """Write the recorded finished output (<run dir>/completed) to `out` (paths.<owner>), atomically."""
    with atomic_dir(out, owner) as tmp:
        shutil.copytree(run_dir / COMPLETED, tmp, dirs_exist_ok=True)
    log.info("'%s' is the output of this finished run (%s), copied from '%s' without training again", out,
             run_dir.name, run_dir / COMPLETED)


def drop_incomplete(run_dir: Path) -> list[str]:
    """Remove checkpoint folders a crash left half-written (no fingerprint): they must not be resumed from."""
    dropped = []
    for path in run_dir.glob("checkpoint-*") if run_dir.is_dir() else []:
        if not (path / FINGERPRINT).is_file():
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


# ------------------------------------------------------------------------------------------------------ the lock
def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on the file `path` (Linux /proc/locks; [] where that cannot be read)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit() and \
                fields[5].rsplit(":", 1)[-1] == str(inode):
            pids.add(int(fields[4]))
    return sorted(pids - {os.getpid()})


class TrainingLock:
    """An flock held on <folder>/train.lock: exclusive for the process that starts a run, shared for its ranks."""

    def __init__(self, folder: Path, handle: IO[str], shared: bool) -> None:
        self.folder, self.path, self.handle, self.shared = folder, folder / LOCK_FILE, handle, shared

    def share(self) -> None:
        """Hold the lock shared, so the processes this one starts can take it too (and keep it if it dies)."""
        try:  # flock converts by unlocking first: another trainer may take it in between, then this one yields
            fcntl.flock(self.handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(_busy(self.folder, self.path)) from None
        self.shared = True


def _busy(folder: Path, path: Path) -> str:
    pids = lock_holders(path)
    who = f"process{'es' * (len(pids) > 1)} {', '.join(map(str, pids))}" if pids else "another process"
    kill = f" (e.g. kill {' '.join(map(str, pids))})" if pids else ""
    return (f"another training run ({who}) is writing the checkpoints in '{folder}', e.g. a run still going or the "
            f"ranks of one whose launcher was killed; two trainings would write the same checkpoints and adapter, "
            f"so wait for it to finish or stop it{kill}, then rerun")


@contextlib.contextmanager
def training_lock(folder: Path, *, shared: bool = False) -> Iterator[TrainingLock]:
    """Hold the training lock on the checkpoint folder for the block; StageError (one sentence) if it is busy."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - closed below, which unlocks
    except OSError as exc:
        raise StageError(f"cannot write the checkpoint folder '{folder}' ({exc.strerror}); make it writable or "
                         "point paths.checkpoints elsewhere") from None
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise StageError(_busy(folder, folder / LOCK_FILE)) from None
        if not shared:  # who holds it, for a person looking at the folder (the lock itself is the flock)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        yield TrainingLock(folder, handle, shared)
    finally:
        handle.close()


OnLog = Callable[[dict[str, Any]], None]


def callbacks(fingerprint: dict[str, Any], on_log: OnLog | None) -> list[Any]:
    from transformers import TrainerCallback

    class Fingerprint(TrainerCallback):
        """Marks a checkpoint complete (written last) and records which run it belongs to."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / FINGERPRINT, fingerprint)

    class ForwardLogs(TrainerCallback):
        """Hands each trainer log (loss, lr, grad norm, eval loss) to the caller, e.g. the Dagster log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None and state.is_world_process_zero and logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    return [Fingerprint(), ForwardLogs(), step_timer()]


def step_timer() -> Any:
    """A trainer callback summing the seconds spent in optimizer steps (forward, backward, update), without
    evaluation and checkpoint saves: `.seconds` over `.steps` (bench/bench_train.py times both arms with it)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds, self.steps, self._start = 0.0, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._start
            self.steps += 1

    return StepTimer()
