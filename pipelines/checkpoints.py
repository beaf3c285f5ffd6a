"""Checkpoints of a training run: where they go, which run they belong to, and where a rerun resumes.

    <paths.checkpoints>/<run hash>/checkpoint-<step>/   written by the Trainer every train.save_steps

The run hash covers the splits, the base model, the parent adapter (train.init_from), the train params,
format.max_length and the training code, so a rerun with the same inputs resumes from the last complete checkpoint,
and a checkpoint of another run is never resumed (one sentence says what changed). A checkpoint is complete when its
fingerprint.json exists: the Fingerprint callback writes it last, after the Trainer saved everything else.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import methods
from pipelines.base_model import model_hash
from pipelines.config import Params
from pipelines.errors import StageError
from pipelines.io import read_json, sha256_file, write_json
from pipelines.stages import BY_NAME, PACKAGE_ROOT

OnLog = Callable[[dict[str, Any]], None]
FINGERPRINT = "fingerprint.json"


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


def resume_point(run_dir: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The last complete checkpoint of this run (None: start fresh); refuses one written for another run."""
    if not run_dir.is_dir():
        return None
    candidates = sorted((p for p in run_dir.glob("checkpoint-*") if step_of(p) >= 0), key=step_of)
    complete = [p for p in candidates if (p / FINGERPRINT).is_file() and (p / "trainer_state.json").is_file()]
    if not complete:
        return None
    last = complete[-1]
    stored = read_json(last / FINGERPRINT)
    if stored.get("run_hash") != fingerprint["run_hash"]:
        changed = [k for k, v in fingerprint["parts"].items() if stored.get("parts", {}).get(k) != v]
        raise StageError(
            f"checkpoint '{last}' was written for a different run ({', '.join(changed) or 'run hash'} changed); "
            "delete that folder to train from scratch, or restore the data and params it was trained with"
        )
    return last


def drop_incomplete(run_dir: Path) -> list[str]:
    """Remove checkpoint folders a crash left half-written (no fingerprint): they must not be resumed from."""
    dropped = []
    for path in run_dir.glob("checkpoint-*") if run_dir.is_dir() else []:
        if not (path / FINGERPRINT).is_file():
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


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
