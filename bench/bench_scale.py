"""Scale: the data stages on N generated instruction pairs, with wall time, throughput and peak memory per stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py                  # 1,000,000 rows
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py --rows 200000    # a quicker run
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py --stages ingest clean --keep

Writes a throw-away project under bench/out/scale-<rows>/ (gitignored): params.yaml (the repo's, paths
relative to it), data/raw/bench.jsonl and every stage output. The raw file is seeded: short Alpaca-style
pairs (an instruction of 4-16 words, sometimes an input, an answer of 3-24 words from a 5,000-word
vocabulary), 3% exact copies of an earlier row and 2% near copies (one word changed), so the dedup
rules have work to do at a realistic rate.

Each stage runs as `python -m pipelines <stage> --params ...` in its own process, as DVC runs it. Per
stage: wall seconds, rows in per second, peak RSS of the largest single process (wait4 rusage: the
stage or one of its pool workers) and the sampled peak of the whole process tree's PSS (proportional
set size from /proc/<pid>/smaps_rollup, every 0.2 s, so fork-shared pages are not counted twice). The
format stage needs a tokenizer with a chat template: data/base_model if it exists (the real base model,
fetched by `python -m pipelines fetch-model`), else the tiny test model of tests/conftest.py; the line
`tokenizer:` says which. The budget line flags any stage over --budget-gib (default 2 GiB).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
STAGES = ("ingest", "clean", "format", "split")
# Where each stage's report.json lives and which key counts the rows it read.
REPORTS = {"ingest": ("raw_examples", "rows_in"), "clean": ("cleaned", "rows_in"),
           "format": ("formatted", "rows_in"), "split": ("splits", "rows")}


def generate(path: Path, rows: int, seed: int = 0, exact_share: float = 0.03, near_share: float = 0.02) -> None:
    """`rows` Alpaca-style JSONL lines at `path`, seeded; a share are exact or one-word-edited copies."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    # Zipf-like: common words repeat, like text; cumulative once, or choices() re-sums 5,000 weights per call
    cum = list(itertools.accumulate(1.0 / (r + 1) ** 0.8 for r in range(len(vocab))))
    verbs = ["Explain", "Summarise", "Translate", "List", "Describe", "Classify", "Rewrite", "Answer"]

    def words(low: int, high: int) -> str:
        return " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(low, high)))

    recent: list[dict[str, str]] = []  # copies come from the last few thousand rows (a window bounds memory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            draw = rng.random()
            if recent and draw < exact_share:
                row = dict(rng.choice(recent))
            elif recent and draw < exact_share + near_share:
                row = dict(rng.choice(recent))
                tokens = row["output"].split()
                tokens[rng.randrange(len(tokens))] = rng.choice(vocab)
                row["output"] = " ".join(tokens)
            else:
                row = {"instruction": f"{rng.choice(verbs)} {words(4, 16)}", "output": words(3, 24)}
                if rng.random() < 0.3:
                    row["input"] = words(2, 10)
                recent.append(row)
                if len(recent) > 5000:
                    recent.pop(rng.randrange(len(recent)))
            fh.write(json.dumps({**row, "n": i}) + "\n")  # "n" lands in meta: no two raw lines are identical


def base_model_folder() -> tuple[Path, str]:
    """The real base model if fetched, else the tiny test model (built once into bench/out/)."""
    real = REPO / "data" / "base_model"
    if (real / "config.json").is_file():
        return real, f"real base model ({real})"
    tiny = OUT / "tiny_model"
    if not (tiny / "config.json").is_file():
        # In a child process: importing torch here would raise this process's RSS, and a child started
        # with fork/vfork inherits the parent's peak as its own ru_maxrss.
        code = "import sys; from pathlib import Path; from tests.conftest import build_tiny_model; " \
               "build_tiny_model(Path(sys.argv[1]))"
        subprocess.run([sys.executable, "-c", code, str(tiny)], cwd=REPO, check=True, capture_output=True)
    return tiny, f"tiny test model ({tiny}; the real one is absent: run python -m pipelines fetch-model)"


def make_project(root: Path, rows: int, seed: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = root / params["paths"]["raw_dir"] / "bench.jsonl"
    marker = root / "generated.json"
    wanted = {"rows": rows, "seed": seed}
    if not (raw.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted):
        started = time.perf_counter()
        generate(raw, rows, seed)
        marker.write_text(json.dumps(wanted))
        print(f"generated {rows} rows ({raw.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_stage(stage: str, params: Path, log_dir: Path) -> dict[str, float | str]:
    """Run one stage as DVC would; wall seconds, peak RSS of its largest process, sampled peak tree PSS."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_dir / f"{stage}.out", log_dir / f"{stage}.err"
    started = time.perf_counter()
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines", stage, "--params", str(params)], cwd=REPO,
                                env=env, stdout=out, stderr=err)
    peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss
        while not done.wait(0.2):
            peak_pss = max(peak_pss, sum(_pss_kib(p) for p in _tree(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4, not Popen.wait: its rusage is this child's own (ru_maxrss, KiB on Linux: the largest of the
    # stage process and its reaped pool workers), not a running maximum over every child so far.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode}):\n{stderr.read_text()[-2000:]}")
    lines = stdout.read_text().strip().splitlines()
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_tree_pss_mib": peak_pss / 1024,
            "summary": lines[-1] if lines else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="raw rows to generate (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--budget-gib", type=float, default=2.0, help="flag stages whose peak memory exceeds this")
    parser.add_argument("--keep", action="store_true", help="keep bench/out/scale-<rows>/ (default: remove outputs)")
    args = parser.parse_args(argv)

    root = OUT / f"scale-{args.rows}"
    params = make_project(root, args.rows, args.seed)
    paths = yaml.safe_load(params.read_text())["paths"]
    if "format" in args.stages:
        model, which = base_model_folder()
        print(f"tokenizer: {which}")
        target = root / paths["base_model"]
        if not (target / "config.json").is_file():
            shutil.copytree(model, target, dirs_exist_ok=True)
    over: list[str] = []
    for stage in args.stages:
        figures = run_stage(stage, params, root / "logs")
        folder, key = REPORTS[stage]
        report = json.loads((root / paths[folder] / "report.json").read_text())
        rows_in = report.get(key) or 0
        peak = max(figures["peak_rss_mib"], figures["peak_tree_pss_mib"])
        print(f"{stage}: rows_in={rows_in} wall_s={figures['wall_s']:.1f} rows_per_s={rows_in / figures['wall_s']:.0f} "
              f"peak_rss_mib={figures['peak_rss_mib']:.0f} peak_tree_pss_mib={figures['peak_tree_pss_mib']:.0f}"
              f"{'  OVER BUDGET' if peak > args.budget_gib * 1024 else ''}", flush=True)
        print(f"  {figures['summary'][:300]}", flush=True)
        if peak > args.budget_gib * 1024:
            over.append(stage)
    print(f"budget {args.budget_gib:g} GiB: " + (f"exceeded by {', '.join(over)}" if over else "every stage within"))
    if not args.keep:
        for folder in ("raw_examples", "cleaned", "formatted", "splits"):
            shutil.rmtree(root / paths[folder], ignore_errors=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
