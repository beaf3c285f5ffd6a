"""Checkpoints: a corrupt one is named, deleted and passed over; one training at a time holds the folder's lock.

Unit tests build checkpoint folders by hand (torch.save, safetensors, JSON: milliseconds); one test trains the tiny
model twice (the handed case 08: a truncated optimizer.pt in the last checkpoint), one runs the train CLI against a
held lock. The lock tests start small Python processes that hold it, as a concurrent run or an orphaned rank would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import checkpoints, train
from pipelines.checkpoints import (
    FINGERPRINT,
    LOCK_FILE,
    checkpoint_problem,
    lock_holders,
    resume_point,
    training_lock,
)
from pipelines.config import load_params
from pipelines.io import StageError
from tests.conftest import REPO
from tests.test_train import CPU, make_project

RUN = {"run_hash": "abc", "parts": {"train_split": "1"}}


class _Evil:
    """A pickle that would run a shell command when unpickled (what weights_only loading must refuse)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def _checkpoint(run_dir: Path, step: int, fingerprint: dict = RUN) -> Path:
    """A complete checkpoint as the trainer + the Fingerprint callback write it (tiny tensors)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 0.1}]}, folder / "optimizer.pt")
    rng = {"python": (3, (1, 2), None), "numpy": ("MT19937", np.zeros(4, dtype=np.uint32), 0, 0, 0.0),
           "cpu": torch.zeros(4, dtype=torch.uint8)}  # the kinds of state transformers saves (numpy arrays included)
    torch.save(rng, folder / "rng_state.pth")
    save_file({"lora_A": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "training_args.bin").write_bytes(b"\x80\x04 never loaded")  # a pickle the trainer never reads back
    (folder / FINGERPRINT).write_text(json.dumps(fingerprint))
    return folder


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(1, path.stat().st_size // 3))


def test_a_complete_checkpoint_loads(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path, 1)) is None


@pytest.mark.parametrize(("damage", "file", "words"), [
    ("truncate", "optimizer.pt", "failed finding central directory"),  # a full disk, a copy cut short
    ("truncate", "rng_state.pth", ""),
    ("truncate", "adapter_model.safetensors", ""),
    ("garbage", "trainer_state.json", "Expecting"),
    ("pickle", "rng_state.pth", "Weights only load failed"),  # swapped for code: refused, never run
])
def test_a_damaged_file_is_named(tmp_path, damage, file, words):
    folder = _checkpoint(tmp_path, 1)
    flag = tmp_path / "pwned"
    if damage == "truncate":
        _truncate(folder / file)
    elif damage == "garbage":
        (folder / file).write_text('{"global_step": ')
    else:
        import torch

        torch.save(_Evil(flag), folder / file)
    problem = checkpoint_problem(folder)
    assert problem is not None and problem.startswith(f"{file}: ") and words in problem, problem
    assert "\n" not in problem and len(problem) < 200
    assert not flag.exists()  # the pickle's command never ran


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 1)
    bad = _checkpoint(run_dir, 2)
    _truncate(bad / "optimizer.pt")
    found = resume_point(run_dir, RUN, remove_corrupt=True)
    assert found.checkpoint == run_dir / "checkpoint-1" and found.step == 1
    assert len(found.corrupt) == 1
    assert found.corrupt[0].startswith(f"checkpoint '{bad}' cannot be loaded (optimizer.pt: ")
    assert found.corrupt[0].endswith("so it was deleted")
    assert not bad.exists()  # the trainer will write checkpoint-2 again; it must not write into the corrupt one
    assert f"resuming from '{run_dir / 'checkpoint-1'}'" in caplog.text


def test_a_rank_other_than_the_main_one_passes_over_without_deleting(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 1)
    _truncate(_checkpoint(run_dir, 2) / "adapter_model.safetensors")
    found = resume_point(run_dir, RUN, remove_corrupt=False)
    assert found.step == 1 and "passed over" in found.corrupt[0] and (run_dir / "checkpoint-2").is_dir()


def test_with_every_checkpoint_corrupt_training_starts_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    for step in (1, 2):
        (_checkpoint(run_dir, step) / "trainer_state.json").write_text("not json")
    (run_dir / "checkpoint-2" / FINGERPRINT).write_text("null")
    found = resume_point(run_dir, RUN, remove_corrupt=True)
    assert found.checkpoint is None and found.step is None
    assert [c.split("'")[1] for c in found.corrupt] == [str(run_dir / "checkpoint-2"), str(run_dir / "checkpoint-1")]
    assert "fingerprint.json: not a JSON object" in found.corrupt[0] and "trainer_state.json" in found.corrupt[1]
    assert "training starts over from step 0" in caplog.text
    assert not list(run_dir.glob("checkpoint-*"))


@pytest.mark.parametrize(("state", "ended"), [
    ({"global_step": 2, "max_steps": 2}, True),  # the last step
    ({"global_step": 1, "max_steps": 2}, False),  # a kill mid-run: resume
    ({"global_step": 2}, False),  # no max_steps recorded: not known to have ended
    ({"global_step": 1, "max_steps": 4,  # early stopping stopped it here
      "stateful_callbacks": {"TrainerControl": {"args": {"should_training_stop": True}, "attributes": {}}}}, True),
    ({"global_step": 1, "max_steps": 4,
      "stateful_callbacks": {"TrainerControl": {"args": {"should_training_stop": False}, "attributes": {}}}}, False),
])
def test_a_checkpoint_where_its_run_ended_is_not_resumed(tmp_path, caplog, state, ended):
    folder = _checkpoint(tmp_path / "run", 2)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoints.finished(folder) is ended
    resume = checkpoints.unless_finished(resume_point(tmp_path / "run", RUN), tmp_path / "run", remove=True)
    assert resume.checkpoint == (None if ended else folder)
    assert folder.exists() is not ended  # the run starts over in an empty folder
    assert ("is where its run ended" in caplog.text) is ended


def test_a_finished_run_record_whose_copy_changed_is_dropped(tmp_path, caplog):
    out, run_dir = tmp_path / "adapter", tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    checkpoints.record_completed(run_dir, out, RUN, {"steps": 2})
    assert checkpoints.completed_run(run_dir, RUN)["metrics"] == {"steps": 2}
    assert checkpoints.completed_run(run_dir, {"run_hash": "other", "parts": {}}) is None
    (run_dir / checkpoints.COMPLETED / "adapter_model.safetensors").write_bytes(b"changed")
    assert checkpoints.completed_run(run_dir, RUN) is None
    assert "does not match its record" in caplog.text and not (run_dir / checkpoints.COMPLETED).exists()


def test_a_checkpoint_of_another_run_is_still_refused(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 1, {"run_hash": "other", "parts": {"train_split": "2"}})
    with pytest.raises(StageError, match=r"different run \(train_split changed\)"):
        resume_point(run_dir, RUN)


def test_a_truncated_optimizer_in_the_last_checkpoint_resumes_from_the_one_before(tmp_path, tiny_model_dir):
    """Handed case 08 in process: train 2 steps with a checkpoint per step, cut optimizer.pt, train again. The
    finished run's record is removed too (a kill before it was written): with it the rerun restores that adapter
    and resumes nothing (test_train.py test_a_rerun_of_a_finished_run_trains_no_step_past_max_steps)."""
    params = load_params(make_project(tmp_path, tiny_model_dir, {"max_steps": 2, "save_steps": 1, "eval_steps": 1}))
    train.run(params, CPU)
    run_dir = params.path("checkpoints") / checkpoints.run_fingerprint(params)["run_hash"]
    (run_dir / checkpoints.COMPLETED_RECORD).unlink()
    with open(run_dir / "checkpoint-2" / "optimizer.pt", "r+b") as fh:
        fh.truncate(1000)

    result = train.run(params, CPU)
    assert result.metrics["resumed_from_step"] == 1 and result.metrics["steps"] == 2
    (sentence,) = result.metrics["corrupt_checkpoints"]
    assert sentence.startswith(f"checkpoint '{run_dir / 'checkpoint-2'}' cannot be loaded (optimizer.pt: ")
    stored = json.loads((params.path("adapter") / "train_metrics.json").read_text())
    assert stored["corrupt_checkpoints"] == [sentence]  # the stage's metrics say so, not only the log
    assert checkpoint_problem(run_dir / "checkpoint-2") is None  # written again, whole


# ----------------------------------------------------------------------------------------------------- the lock

_HOLDER = """
import sys, time
from pathlib import Path
from pipelines.checkpoints import training_lock
with training_lock(Path(sys.argv[1]), shared=sys.argv[2] == "shared") as lock:
    if sys.argv[2] == "launcher":  # a launcher: exclusive, then shared, then it starts a rank and waits
        import subprocess
        lock.share()
        rank = subprocess.Popen([sys.executable, __file__, sys.argv[1], "shared"], stdout=subprocess.PIPE, text=True)
        assert rank.stdout.readline().startswith("held")
        print("held", rank.pid, flush=True)
    else:
        print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock on a folder ('exclusive', 'shared' or 'launcher'); all killed at the end."""
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    started: list[subprocess.Popen] = []
    extra: list[int] = []

    def start(folder: Path, mode: str) -> tuple[subprocess.Popen, int | None]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, str(script), str(folder), mode], stdout=subprocess.PIPE, text=True,
                                env=env)
        started.append(proc)
        line = proc.stdout.readline().split()
        assert line[:1] == ["held"], line
        rank = int(line[1]) if len(line) > 1 else None
        if rank:
            extra.append(rank)
        return proc, rank

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    for pid in extra:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_trainer_is_refused_while_one_holds_the_folder(tmp_path, holder):
    folder = tmp_path / "checkpoints"
    proc, _ = holder(folder, "exclusive")
    with pytest.raises(StageError, match=rf"another training run \(process {proc.pid}\) is writing the checkpoints in "
                                         rf"'{folder}'.*kill {proc.pid}\), then rerun"):
        with training_lock(folder):
            pass
    assert lock_holders(folder / LOCK_FILE) == [proc.pid]
    assert (folder / LOCK_FILE).read_text() == f"{proc.pid}\n"


def test_a_killed_holder_releases_the_lock(tmp_path, holder):
    folder = tmp_path / "checkpoints"
    proc, _ = holder(folder, "exclusive")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with training_lock(folder) as lock:  # the kernel dropped the flock with the process
        assert not lock.shared and lock_holders(folder / LOCK_FILE) == []


def test_ranks_of_an_orphaned_run_keep_a_rerun_out(tmp_path, holder):
    """The launcher (the stage process) is killed; the rank it started keeps running and keeps the lock."""
    folder = tmp_path / "checkpoints"
    launcher, rank = holder(folder, "launcher")
    with training_lock(folder, shared=True):
        pass  # one more rank of the same run may join (shared)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    with pytest.raises(StageError, match=rf"process {rank}\).*ranks of one whose launcher was killed"):
        with training_lock(folder):
            pass
    os.kill(rank, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lock_holders(folder / LOCK_FILE) and time.monotonic() < deadline:
        time.sleep(0.05)
    with training_lock(folder):  # the orphan is gone: the rerun may write
        pass


def test_the_train_cli_refuses_in_one_sentence_while_another_run_trains(tmp_path, tiny_model_dir, holder):
    params_file = make_project(tmp_path, tiny_model_dir)
    proc, _ = holder(load_params(params_file).path("checkpoints"), "exclusive")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINES_TRAIN_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pipelines", "train", "--params", str(params_file)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"process {proc.pid}" in errors[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "data" / "adapter").exists()
