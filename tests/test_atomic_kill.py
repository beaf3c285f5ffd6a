"""A data stage killed with SIGKILL at any moment leaves its previous output or its new one, never a mix.

For each of ingest, clean, format and split (`python -m pipelines <stage>`, as DVC runs it):
  1. run it once with other params ("previous", e.g. another split seed) and once with the real ones
     ("new"); both outputs are checked in full: every JSONL line parses, the rows pass the stage's pandera
     schema, report.json's counts equal the files' line counts;
  2. put the previous output back, start the stage, SIGKILL it at a seeded random moment (either anywhere
     in the run, or inside the window in which it writes its output folder), and require the folder to
     hold exactly the previous or exactly the new files (same names, same bytes), nothing else;
  3. run it to completion: the result equals the uninterrupted run, and no temporary is left behind.
The pool workers of a killed stage must not outlive it.

Inputs are generated (distinct instruction pairs, a few duplicates) and sized so each stage works for
about a second on 2 cores; 20 kills in all. The previous and new outputs are made in this process (no
interpreter start-up), so step 3 also checks that the CLI run equals the in-process one.

A second set of tests crashes atomic_dir itself at each step of its swap, in a forked child, including
the two-rename fallback for filesystems that cannot exchange two names atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipelines import io
from pipelines.records import RECORD
from pipelines.schemas import ConversationSchema, FormattedSchema, SplitSchema, validate
from tests.conftest import REPO, write_project

# 20 kills in all; format pays ~3-15 s of transformers import per kill, so it gets fewer.
TRIALS = {"ingest": 6, "clean": 5, "format": 3, "split": 6}
# Report fields that measure the run rather than describe the data.
VOLATILE = {"seconds", "rows_per_second"}


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str  # paths.<folder> is the output folder
    files: dict[str, type | None]  # file -> pandera schema of its rows (None: quarantine rows)
    prev: dict  # params that make a different, equally valid "previous" output


STAGES = [
    Stage("ingest", "raw_examples", {"examples.jsonl": ConversationSchema, "quarantine.jsonl": None},
          {"data": {"system_prompt": "You answer briefly."}}),
    Stage("clean", "cleaned", {"examples.jsonl": ConversationSchema, "quarantine.jsonl": None, "changes.jsonl": None},
          {"clean": {"exact_dedup": False, "near_dedup": False}}),
    Stage("format", "formatted", {"dataset.jsonl": FormattedSchema, "quarantine.jsonl": None},
          {"format": {"output": "prompt_completion"}}),
    Stage("split", "splits", {"train.jsonl": SplitSchema, "validation.jsonl": SplitSchema, "test.jsonl": SplitSchema},
          {"split": {"seed": 7}}),
]
BY_NAME = {s.name: s for s in STAGES}
# Rows in the raw file of each project: the tokenizer makes format ~10x slower per row than the others.
ROWS = {"ingest": 6_000, "clean": 6_000, "format": 1_200, "split": 1_200}


def generate_raw(path: Path, rows: int, seed: int = 0) -> None:
    """Distinct Alpaca rows; 4% exact copies and 2% one-word edits of earlier rows, so dedup has work."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(3000)]
    made: list[dict[str, str]] = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            draw = rng.random()
            if made and draw < 0.06:
                row = dict(rng.choice(made))
                if draw >= 0.04:
                    words = row["output"].split()
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                    row["output"] = " ".join(words)
            else:
                row = {"instruction": f"Task {i}: " + " ".join(rng.choices(vocab, k=rng.randint(6, 14))),
                       "output": " ".join(rng.choices(vocab, k=rng.randint(8, 20)))}
                made.append(row)
            fh.write(json.dumps(row) + "\n")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _temp_of(out: Path) -> list[Path]:
    """Temporaries of an output folder: io.atomic_dir names them .<name>.<pid>.<random>.tmp beside it."""
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp"))


@dataclass
class Watched:
    seconds: float  # start to exit (or to the kill)
    writing_at: float | None  # when its temporary output folder appeared
    survivors: list[int] = field(default_factory=list)  # processes of its group alive after a kill


def watch_stage(stage: str, params: Path, out: Path, kill: tuple[str, float] | None = None) -> Watched:
    """Run a stage; with kill=("any", t) SIGKILL it t s after start, with ("write", t) t s after it starts writing."""
    before = set(_temp_of(out))
    log = out.parent / f"{stage}.stderr"  # a file, not a pipe: orphaned workers would hold a pipe open forever
    started = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines", stage, "--params", str(params)], cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    writing_at = None
    try:
        while proc.poll() is None:
            now = time.perf_counter() - started
            if writing_at is None and set(_temp_of(out)) - before:
                writing_at = now
            if kill and (kill[0] == "any" and now >= kill[1] or
                         kill[0] == "write" and writing_at is not None and now >= writing_at + kill[1]):
                os.kill(proc.pid, signal.SIGKILL)  # the stage process only, as `kill -9 <pid>` would
                proc.wait()
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, f"{stage}: {log.read_text(errors='replace')[-2000:]}"
        survivors = _group(proc.pid) if proc.returncode == -signal.SIGKILL else []
    finally:
        _kill_group(proc.pid)  # never leave orphaned workers on the machine, whatever the outcome
    return Watched(seconds, writing_at, survivors)


def _group(pgid: int, grace: float = 1.0) -> list[int]:
    """Live processes still in the process group `grace` seconds after its leader died (zombies hold nothing)."""
    deadline = time.monotonic() + grace
    while True:
        alive = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _live_member(int(p.name), pgid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _live_member(pid: int, pgid: int) -> bool:
    try:
        state, _, group = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
    except (OSError, ValueError):
        return False
    return int(group) == pgid and state not in ("Z", "X")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _report_view(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in VOLATILE}


def fingerprint(out: Path) -> dict[str, str]:
    """Every entry of the output folder -> digest (report.json without its timing fields; the run record, which
    says when and by whom the output was made, is not part of the output)."""
    if not out.is_dir():
        return {}
    prints = {}
    for path in sorted(out.iterdir()):
        if path.name == RECORD:
            continue
        if path.name == "report.json":
            prints[path.name] = json.dumps(_report_view(json.loads(path.read_text())), sort_keys=True)
        else:
            prints[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def check_complete(stage: Stage, out: Path) -> None:
    """The folder is one whole, valid stage output: its files (and the ownership marker), rows that parse and pass the
    schema, true counts."""
    assert sorted(p.name for p in out.iterdir() if p.name != RECORD) == sorted([*stage.files, "report.json",
                                                                               io.MARKER])
    report = json.loads((out / "report.json").read_text())
    lines: dict[str, int] = {}
    for name, schema in stage.files.items():
        rows = [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]
        lines[name] = len(rows)
        if schema is not None:
            validate(schema, rows)
        elif name == "quarantine.jsonl":
            assert all({"rule", "reason"} <= row.keys() for row in rows)
    if stage.name == "split":
        assert report["counts"] == {name.removesuffix(".jsonl"): n for name, n in lines.items()}
        assert report["rows"] == sum(lines.values())
    else:
        data = next(name for name, schema in stage.files.items() if schema is not None)
        assert report["rows_out"] == lines[data] > 0
        assert report["quarantined"] == lines["quarantine.jsonl"]
        assert report["rows_in"] == lines[data] + lines["quarantine.jsonl"]


# ------------------------------------------------------------------------------------------------ the trials


@dataclass
class Outcome:
    prev: dict[str, str]
    new: dict[str, str]
    states: list[tuple[str, float, str]]  # (kill mode, seconds, "previous" | "new")
    survivors: list[list[int]]
    rerun: dict[str, str]
    leftovers: list[str]


def _project(root: Path, tiny_model_dir: Path, rows: int) -> Path:
    raw = root / "raw_source"
    raw.mkdir(parents=True)
    generate_raw(raw / "pairs.jsonl", rows)
    return write_project(root, {"paths": {"base_model": str(tiny_model_dir)}, "format": {"max_length": 256}},
                         raw_from=raw)


def _prev_params(params: Path, stage: Stage) -> Path:
    data = yaml.safe_load(params.read_text())
    for section, values in stage.prev.items():
        data[section].update(values)
    path = params.with_name("params_prev.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_in_process(stage: Stage, params_file: Path) -> float:
    """Run a stage in this process (no interpreter start-up); seconds spent inside its atomic_dir block.

    That block is where the output is written and swapped in: the window the "write" kills aim at.
    """
    import importlib

    from pipelines.config import load_params

    module = importlib.import_module(f"pipelines.{stage.name}")
    real = module.atomic_dir
    spans: list[float] = []

    @contextlib.contextmanager
    def timed(path, owner):
        started = time.perf_counter()
        with real(path, owner) as tmp:
            yield tmp
        spans.append(time.perf_counter() - started)

    module.atomic_dir = timed
    try:
        params = load_params(params_file)
        if stage.name == "format":
            module.run(params, workers=1)  # same output as the CLI's worker pool; no pool in the test process
        else:
            module.run(params)
    finally:
        module.atomic_dir = real
    return sum(spans)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir) -> dict[str, Outcome]:
    rng = random.Random(20240611)
    results: dict[str, Outcome] = {}
    projects: dict[int, Path] = {}
    for stage in STAGES:
        rows = ROWS[stage.name]
        if rows not in projects:
            projects[rows] = _project(tmp_path_factory.mktemp(f"kill_{rows}_"), tiny_model_dir, rows)
        params = projects[rows]
        folders = yaml.safe_load(params.read_text())["paths"]
        out = params.parent / folders[stage.folder]
        for upstream in STAGES[: STAGES.index(stage)]:  # this stage's inputs, complete
            if not (params.parent / folders[upstream.folder]).exists():
                run_in_process(upstream, params)
        run_in_process(stage, _prev_params(params, stage))
        check_complete(stage, out)
        prev, saved = fingerprint(out), out.with_name(f"{out.name}_prev_copy")
        shutil.copytree(out, saved)
        window = run_in_process(stage, params)
        check_complete(stage, out)
        new = fingerprint(out)
        assert prev != new, f"{stage.name}: the previous params must give a different output for the test to see mixes"
        states, survivors, start_up = [], [], None
        for trial in range(TRIALS[stage.name]):
            shutil.rmtree(out)
            shutil.copytree(saved, out)
            # Alternate: inside the window where the stage writes (from its temporary folder's appearance), or
            # anywhere from the start (mostly start-up and computing). The first trial learns the start-up time.
            if trial % 2 == 0 or start_up is None:
                mode, at = "write", rng.uniform(0, 1.2 * window)
            else:
                mode, at = "any", rng.uniform(0, start_up + 1.2 * window)
            watched = watch_stage(stage.name, params, out, kill=(mode, at))
            start_up = start_up if start_up is not None else watched.writing_at
            now = fingerprint(out)
            state = "previous" if now == prev else "new" if now == new else f"MIXED {sorted(now.items())}"
            states.append((mode, round(at, 3), state))
            survivors.append(watched.survivors)
        temporaries = len(_temp_of(out))
        final = watch_stage(stage.name, params, out)  # as DVC would rerun it, to completion
        rerun = fingerprint(out)
        leftovers = [p.name for p in _temp_of(out)]
        print(f"\n{stage.name}: write window {window:.2f}s in process, start-up {start_up}, rerun "
              f"{final.seconds:.1f}s, kills {states}, temporaries left by them {temporaries}, survivors {survivors}")
        results[stage.name] = Outcome(prev, new, states, survivors, rerun, leftovers)
        shutil.rmtree(saved)
    return results


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_killed_stage_leaves_previous_or_new_output(outcomes, stage):
    states = outcomes[stage].states
    assert len(states) == TRIALS[stage]
    assert all(state in ("previous", "new") for _, _, state in states), states


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_rerun_after_kills_equals_the_uninterrupted_run(outcomes, stage):
    outcome = outcomes[stage]
    assert outcome.rerun == outcome.new
    assert outcome.leftovers == []  # killed runs' temporaries are swept by the next write


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_no_process_outlives_a_killed_stage(outcomes, stage):
    orphans = [s for s in outcomes[stage].survivors if s]
    assert not orphans, f"{stage}: worker processes kept running after the stage was killed: {orphans}"


# ---------------------------------------------------------------------------- atomic_dir crashed at each step


def _crash_in_child(target, *args) -> int:
    """Run target(*args) in a forked child that may os._exit mid-way (no cleanup, like SIGKILL); its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            target(*args)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _write_version(out: Path, version: str, die_at: str | None, exchange: bool = True) -> None:
    """Write folder `out` holding version.txt with atomic_dir; die (os._exit(9)) at the step named die_at."""
    real_exchange, real_replace, real_rmtree = io._exchange, os.replace, shutil.rmtree

    def exchange_(a, b):
        if die_at == "before_swap":
            os._exit(9)
        return real_exchange(a, b) if exchange else False

    def replace_(a, b):
        real_replace(a, b)
        if die_at == "between_renames" and Path(b).name.endswith(".old"):
            os._exit(9)

    def rmtree_(p, *a, **k):
        if die_at == "after_swap":
            os._exit(9)
        return real_rmtree(p, *a, **k)

    io._exchange, os.replace, shutil.rmtree = exchange_, replace_, rmtree_
    with io.atomic_dir(out, "cleaned") as tmp:
        (tmp / "version.txt").write_text(version)
        (tmp / "rows.jsonl").write_text("".join(f'{{"v": "{version}", "i": {i}}}\n' for i in range(1000)))
        if die_at == "while_writing":
            os._exit(9)


def _version(out: Path) -> str | None:
    if not out.exists():
        return None
    rows = (out / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 1000 and {json.loads(r)["v"] for r in rows} == {(out / "version.txt").read_text()}
    return (out / "version.txt").read_text()


@pytest.mark.parametrize(("die_at", "exchange", "left"), [
    ("while_writing", True, "old"),
    ("before_swap", True, "old"),
    ("after_swap", True, "new"),  # exchanged; the old copy under the temporary name is swept later
    ("while_writing", False, "old"),
    ("between_renames", False, None),  # the fallback's one gap: no folder until the next write restores it
])
def test_atomic_dir_crash_at_each_step(tmp_path, die_at, exchange, left):
    out = tmp_path / "data" / "cleaned"
    assert _crash_in_child(_write_version, out, "old", None) == 0
    assert _crash_in_child(_write_version, out, "new", die_at, exchange) == 9
    assert _version(out) == left
    if left is None:
        assert (out.parent / ".cleaned.old").is_dir()
    # the next writer recovers: the previous folder comes back first, temporaries of dead writers are swept
    assert _crash_in_child(_write_version, out, "next", "while_writing", exchange) == 9
    assert _version(out) == ("new" if left == "new" else "old")
    assert _crash_in_child(_write_version, out, "final", None, exchange) == 0
    assert _version(out) == "final"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cleaned"]


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    out = tmp_path / "cleaned"
    live = tmp_path / f".cleaned.{os.getpid()}.abc.tmp"  # this process is alive
    dead = tmp_path / ".cleaned.999999999.abc.tmp"  # no such pid
    live.mkdir()
    dead.mkdir()
    with io.atomic_dir(out, "cleaned") as tmp:
        (tmp / "x").write_text("1")
    assert live.is_dir() and not dead.exists()
